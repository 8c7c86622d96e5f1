//! Membership and failure detection: which configured peers are up, and which link to each
//! is the one in use.
//!
//! Owns: a pure state machine, `handle(event, now) -> effects`. Must not touch sockets,
//! timers or channels; the runtime feeds it link events and periodic ticks and carries out the
//! effects (install or close a link, emit PeerUp/PeerDown, drop directory entries).
//!
//! Rules:
//! - A peer is up from its first authenticated link until nothing was heard from it for
//!   `failure_timeout` (any frame counts, heartbeats guarantee there is one), or until it
//!   sends `Leave`, or until it is removed from the config.
//! - A closed link alone does not make a peer down: a reconnect within the timeout keeps its
//!   directory entries (and the resync on the new link corrects them).
//! - At most one link per peer. When both nodes dial each other at once, the link dialed by
//!   the lower node id is kept on both sides; otherwise a newer link replaces an older one
//!   (the peer reconnected, the old one is dead or dying).
//! - The link dialed by the lower id is kept against a newer one only while it is alive: heard
//!   within [`Membership::alive_within`]. A peer dials only when it holds no link, so its new
//!   link while ours stays silent means ours is half-open (the peer died without a FIN or RST,
//!   and restarted): refusing the new link would leave the peer unheard until the failure
//!   timeout, then found down, and what its new sessions took given back.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Identifies one TCP link, unique within a node's lifetime.
pub type LinkId = u64;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemberEvent {
    /// A peer was added to the configuration.
    Added { peer: String },
    /// A peer was removed from the configuration.
    Removed { peer: String },
    /// A dial attempt finished (successfully or not).
    DialAttempted { peer: String },
    /// A link finished its handshake.
    LinkUp {
        peer: String,
        link: LinkId,
        we_dialed: bool,
    },
    /// A frame arrived on a link.
    Heard { peer: String, link: LinkId },
    /// A heartbeat round trip was measured on a link.
    Rtt { peer: String, link: LinkId, rtt: Duration },
    /// A link ended (EOF, error, bad frame).
    LinkClosed { peer: String, link: LinkId },
    /// The peer said `Leave` on a link.
    Left { peer: String, link: LinkId },
    /// Periodic check for silent peers.
    Tick,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemberEffect {
    /// Use this link for the peer (start its writer, send a resync).
    Install {
        peer: String,
        link: LinkId,
    },
    /// Close this new link: another one is preferred, or the peer is not configured.
    Reject {
        peer: String,
        link: LinkId,
    },
    /// Close this previously installed link.
    Close {
        peer: String,
        link: LinkId,
    },
    Up {
        peer: String,
    },
    /// The peer is down: drop its directory entries.
    Down {
        peer: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Link {
    id: LinkId,
    preferred: bool,
    /// When it was installed.
    since: Instant,
}

#[derive(Debug, Clone, Default)]
pub struct PeerView {
    pub up: bool,
    pub connected: bool,
    pub last_heard: Option<Instant>,
    pub rtt: Option<Duration>,
    pub attempted: bool,
}

#[derive(Debug, Clone, Default)]
struct Peer {
    up: bool,
    link: Option<Link>,
    last_heard: Option<Instant>,
    rtt: Option<Duration>,
    attempted: bool,
}

#[derive(Debug, Clone)]
pub struct Membership {
    local: String,
    failure_timeout: Duration,
    /// How long the installed link may be silent and still be preferred to a newer one.
    alive_within: Duration,
    peers: BTreeMap<String, Peer>,
}

impl Membership {
    /// A third of `failure_timeout` is the window in which an installed link counts as alive
    /// (two heartbeats at the default ratio); [`Membership::with_heartbeat`] sets it from the
    /// heartbeat interval.
    pub fn new(local: impl Into<String>, failure_timeout: Duration) -> Self {
        Membership {
            local: local.into(),
            failure_timeout,
            alive_within: failure_timeout / 3,
            peers: BTreeMap::new(),
        }
    }

    /// Counts an installed link as alive while it was heard within two heartbeats (a live
    /// peer sends one every `interval`, a late one is tolerated), half the failure timeout at
    /// most: a peer that restarted keeps dialing (with backoff), and its link must be taken
    /// well before the failure timeout finds it down.
    pub fn with_heartbeat(mut self, interval: Duration) -> Self {
        self.alive_within = interval.saturating_mul(2).min(self.failure_timeout / 2);
        self
    }

    /// How long an installed link may be silent and still count as alive: the link dialed
    /// by the lower id is kept against a newer one only while it was heard within this.
    pub fn alive_within(&self) -> Duration {
        self.alive_within
    }

    pub fn is_configured(&self, peer: &str) -> bool {
        self.peers.contains_key(peer)
    }

    /// The installed link of a peer.
    pub fn link_of(&self, peer: &str) -> Option<LinkId> {
        self.peers.get(peer)?.link.map(|l| l.id)
    }

    /// Whether this node has the lowest id among itself and the peers it sees up: the one node
    /// that takes over what a failed peer leaves behind (waking the wallets whose sessions it
    /// held). Views may differ for a moment; then two nodes take over (harmless: the push
    /// window is shared), never none that is up in its own view.
    pub fn takes_over(&self) -> bool {
        self.lowest_up_besides(None)
    }

    /// Whether this node is the one that takes over what `peer` left behind: the lowest id
    /// among itself and the peers it sees up, `peer` aside (which may be up again: a peer
    /// that restarted before it was found failed).
    pub fn takes_over_from(&self, peer: &str) -> bool {
        self.lowest_up_besides(Some(peer))
    }

    /// Whether no peer it sees up, `peer` aside, has a lower id than this node.
    fn lowest_up_besides(&self, peer: Option<&str>) -> bool {
        self.peers
            .iter()
            .all(|(id, p)| Some(id.as_str()) == peer || !p.up || *id > self.local)
    }

    /// Whether this node sees at least half of the cluster up, itself counted. A node that
    /// sees fewer is more likely cut off than its peers all dead: it leaves a failed peer's
    /// leases to run out (the peer may still be delivering) rather than give them back. Two
    /// nodes cannot tell a dead peer from a cut link; each sees half.
    pub fn sees_half(&self) -> bool {
        // up (itself counted) >= nodes / 2, nodes = peers + 1
        let up = 1 + self.peers.values().filter(|p| p.up).count();
        2 * up > self.peers.len()
    }

    pub fn is_up(&self, peer: &str) -> bool {
        self.peers.get(peer).is_some_and(|p| p.up)
    }

    pub fn view(&self, peer: &str) -> Option<PeerView> {
        self.peers.get(peer).map(|p| PeerView {
            up: p.up,
            connected: p.link.is_some(),
            last_heard: p.last_heard,
            rtt: p.rtt,
            attempted: p.attempted,
        })
    }

    pub fn peers(&self) -> impl Iterator<Item = &str> {
        self.peers.keys().map(String::as_str)
    }

    /// True once every configured peer was tried (dialed, or connected to us) at least once.
    pub fn all_attempted(&self) -> bool {
        self.peers.values().all(|p| p.attempted)
    }

    pub fn handle(&mut self, ev: MemberEvent, now: Instant) -> Vec<MemberEffect> {
        let mut fx = Vec::new();
        match ev {
            MemberEvent::Added { peer } => {
                if peer != self.local {
                    self.peers.entry(peer).or_default();
                }
            }
            MemberEvent::Removed { peer } => {
                if let Some(p) = self.peers.remove(&peer) {
                    if let Some(l) = p.link {
                        fx.push(MemberEffect::Close {
                            peer: peer.clone(),
                            link: l.id,
                        });
                    }
                    if p.up {
                        fx.push(MemberEffect::Down { peer });
                    }
                }
            }
            MemberEvent::DialAttempted { peer } => {
                if let Some(p) = self.peers.get_mut(&peer) {
                    p.attempted = true;
                }
            }
            MemberEvent::LinkUp { peer, link, we_dialed } => {
                let local_lower = self.local < peer;
                let alive_within = self.alive_within;
                let settling = self.failure_timeout / 2;
                let Some(p) = self.peers.get_mut(&peer) else {
                    fx.push(MemberEffect::Reject { peer, link });
                    return fx;
                };
                p.attempted = true;
                // Preferred: dialed by the lower node id. Both sides compute the same answer.
                let preferred = we_dialed == local_lower;
                if let Some(old) = p.link {
                    // `last_heard` is the installed link's: set when it was installed, then
                    // by its frames only. Silent for longer, it is most likely half-open: the
                    // peer dialed because it holds no link (it restarted, or closed ours), and
                    // keeping ours would leave it unheard until found down at the failure
                    // timeout. Both dialing at once, the preferred link was installed lately
                    // on both sides (half the failure timeout: the other side may install it,
                    // and speak on it, well after this one on a loaded machine), and is kept.
                    let old_alive = p
                        .last_heard
                        .is_some_and(|t| now.saturating_duration_since(t) < alive_within)
                        || now.saturating_duration_since(old.since) < settling;
                    if old.preferred && !preferred && old_alive {
                        fx.push(MemberEffect::Reject { peer, link });
                        return fx;
                    }
                    fx.push(MemberEffect::Close {
                        peer: peer.clone(),
                        link: old.id,
                    });
                }
                p.link = Some(Link {
                    id: link,
                    preferred,
                    since: now,
                });
                p.last_heard = Some(now);
                fx.push(MemberEffect::Install {
                    peer: peer.clone(),
                    link,
                });
                if !p.up {
                    p.up = true;
                    fx.push(MemberEffect::Up { peer });
                }
            }
            MemberEvent::Heard { peer, link } => {
                if let Some(p) = self.current(&peer, link) {
                    p.last_heard = Some(now);
                }
            }
            MemberEvent::Rtt { peer, link, rtt } => {
                if let Some(p) = self.current(&peer, link) {
                    p.rtt = Some(rtt);
                }
            }
            MemberEvent::LinkClosed { peer, link } => {
                if let Some(p) = self.current(&peer, link) {
                    p.link = None;
                }
            }
            MemberEvent::Left { peer, link } => {
                if let Some(p) = self.current(&peer, link) {
                    p.link = None;
                    fx.push(MemberEffect::Close {
                        peer: peer.clone(),
                        link,
                    });
                    if p.up {
                        p.up = false;
                        fx.push(MemberEffect::Down { peer });
                    }
                }
            }
            MemberEvent::Tick => {
                for (id, p) in self.peers.iter_mut() {
                    let silent = match p.last_heard {
                        None => true,
                        Some(t) => now.saturating_duration_since(t) >= self.failure_timeout,
                    };
                    if p.up && silent {
                        p.up = false;
                        if let Some(l) = p.link.take() {
                            fx.push(MemberEffect::Close {
                                peer: id.clone(),
                                link: l.id,
                            });
                        }
                        fx.push(MemberEffect::Down { peer: id.clone() });
                    }
                }
            }
        }
        fx
    }

    fn current(&mut self, peer: &str, link: LinkId) -> Option<&mut Peer> {
        self.peers
            .get_mut(peer)
            .filter(|p| p.link.is_some_and(|l| l.id == link))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const T: Duration = Duration::from_secs(3);

    fn m(local: &str, peers: &[&str]) -> Membership {
        let mut m = Membership::new(local, T);
        let now = Instant::now();
        for p in peers {
            m.handle(MemberEvent::Added { peer: p.to_string() }, now);
        }
        m
    }

    fn up(peer: &str, link: LinkId, we_dialed: bool) -> MemberEvent {
        MemberEvent::LinkUp {
            peer: peer.into(),
            link,
            we_dialed,
        }
    }

    #[test]
    fn link_up_then_silence_is_down() {
        let t0 = Instant::now();
        let mut s = m("n1", &["n2"]);
        let fx = s.handle(up("n2", 1, true), t0);
        assert!(fx.contains(&MemberEffect::Up { peer: "n2".into() }));
        assert!(s.is_up("n2"));
        s.handle(
            MemberEvent::Heard {
                peer: "n2".into(),
                link: 1,
            },
            t0 + Duration::from_secs(2),
        );
        assert!(s.handle(MemberEvent::Tick, t0 + Duration::from_secs(4)).is_empty());
        let fx = s.handle(MemberEvent::Tick, t0 + Duration::from_secs(5));
        assert_eq!(
            fx,
            vec![
                MemberEffect::Close {
                    peer: "n2".into(),
                    link: 1
                },
                MemberEffect::Down { peer: "n2".into() }
            ]
        );
        assert!(!s.is_up("n2"));
        // no repeated Down
        assert!(s.handle(MemberEvent::Tick, t0 + Duration::from_secs(9)).is_empty());
    }

    /// The lowest node id up takes over a failed peer's wallets: n2 once n1 is down, n3 only
    /// when it sees no lower node up.
    #[test]
    fn lowest_node_up_takes_over() {
        let t0 = Instant::now();
        let mut n2 = m("n2", &["n1", "n3"]);
        n2.handle(up("n1", 1, false), t0);
        n2.handle(up("n3", 2, true), t0);
        assert!(!n2.takes_over(), "n1 is up and lower");
        // What an up peer's resync drops is taken over by the lowest of the others.
        assert!(n2.takes_over_from("n1"), "n1 aside, n2 is the lowest up");
        assert!(!n2.takes_over_from("n3"), "n1 is up and lower");
        let mut n3 = m("n3", &["n1", "n2"]);
        n3.handle(up("n1", 1, false), t0);
        n3.handle(up("n2", 2, false), t0);
        // n1 falls silent for both; n2 is still heard.
        let later = t0 + Duration::from_secs(5);
        for (s, other) in [(&mut n2, "n3"), (&mut n3, "n2")] {
            s.handle(
                MemberEvent::Heard {
                    peer: other.into(),
                    link: 2,
                },
                later,
            );
            s.handle(MemberEvent::Tick, later);
            assert!(!s.is_up("n1"));
        }
        assert!(n2.takes_over());
        assert!(!n3.takes_over(), "n2 is up and lower");
        // Alone, n3 takes over.
        n3.handle(MemberEvent::Tick, later + Duration::from_secs(5));
        assert!(n3.takes_over());
    }

    /// A node gives a failed peer's leases back only while it sees half the cluster up: n3
    /// alone of three is more likely cut off; either node of two sees half.
    #[test]
    fn half_the_cluster_up_to_give_back_a_peers_leases() {
        let t0 = Instant::now();
        let mut n3 = m("n3", &["n1", "n2"]);
        assert!(!n3.sees_half(), "nothing heard yet");
        n3.handle(up("n1", 1, false), t0);
        assert!(n3.sees_half(), "two of three");
        n3.handle(MemberEvent::Tick, t0 + Duration::from_secs(5));
        assert!(!n3.is_up("n1"));
        assert!(!n3.sees_half(), "one of three: cut off, or the last one standing");
        let mut n2 = m("n2", &["n1"]);
        n2.handle(up("n1", 1, false), t0);
        n2.handle(MemberEvent::Tick, t0 + Duration::from_secs(5));
        assert!(!n2.is_up("n1"));
        assert!(n2.sees_half(), "one of two");
        let mut n5 = m("n5", &["n1", "n2", "n3", "n4"]);
        n5.handle(up("n1", 1, false), t0);
        assert!(!n5.sees_half(), "two of five");
        n5.handle(up("n2", 2, false), t0);
        assert!(n5.sees_half(), "three of five");
    }

    #[test]
    fn closed_link_keeps_peer_up_until_timeout() {
        let t0 = Instant::now();
        let mut s = m("n1", &["n2"]);
        s.handle(up("n2", 1, true), t0);
        s.handle(
            MemberEvent::LinkClosed {
                peer: "n2".into(),
                link: 1,
            },
            t0,
        );
        assert!(s.is_up("n2"));
        assert_eq!(s.link_of("n2"), None);
        // reconnect within the timeout: no Up (it never went down)
        let fx = s.handle(up("n2", 2, true), t0 + Duration::from_secs(1));
        assert_eq!(
            fx,
            vec![MemberEffect::Install {
                peer: "n2".into(),
                link: 2
            }]
        );
    }

    #[test]
    fn leave_is_immediate_down() {
        let t0 = Instant::now();
        let mut s = m("n1", &["n2"]);
        s.handle(up("n2", 1, false), t0);
        let fx = s.handle(
            MemberEvent::Left {
                peer: "n2".into(),
                link: 1,
            },
            t0,
        );
        assert!(fx.contains(&MemberEffect::Down { peer: "n2".into() }));
        // a Leave from a stale link is ignored
        s.handle(up("n2", 2, false), t0);
        let fx = s.handle(
            MemberEvent::Left {
                peer: "n2".into(),
                link: 1,
            },
            t0,
        );
        assert!(fx.is_empty());
        assert!(s.is_up("n2"));
    }

    #[test]
    fn simultaneous_dial_keeps_link_dialed_by_lower_id_on_both_sides() {
        let t0 = Instant::now();
        // link A: n1 dialed n2. link B: n2 dialed n1. Each side sees them in any order.
        for a_first in [true, false] {
            for b_first in [true, false] {
                let mut s1 = m("n1", &["n2"]);
                let mut s2 = m("n2", &["n1"]);
                let (la, lb) = (10, 20);
                let seq1 = if a_first {
                    vec![up("n2", la, true), up("n2", lb, false)]
                } else {
                    vec![up("n2", lb, false), up("n2", la, true)]
                };
                let seq2 = if b_first {
                    vec![up("n1", lb, true), up("n1", la, false)]
                } else {
                    vec![up("n1", la, false), up("n1", lb, true)]
                };
                for e in seq1 {
                    s1.handle(e, t0);
                }
                for e in seq2 {
                    s2.handle(e, t0);
                }
                assert_eq!(s1.link_of("n2"), Some(la));
                assert_eq!(s2.link_of("n1"), Some(la));
            }
        }
    }

    const HB: Duration = Duration::from_millis(500);

    fn heard(peer: &str, link: LinkId) -> MemberEvent {
        MemberEvent::Heard {
            peer: peer.into(),
            link,
        }
    }

    /// n1 dialed n2 (link 1, preferred). n2 dies without a FIN and restarts: link 1 is
    /// half-open at n1, and n2 dials n1 (link 2). Link 1 silent for two heartbeats, link 2
    /// replaces it on n1 and n2 stays up: its new claims are heard, nothing of it is given
    /// back at the failure timeout.
    #[test]
    fn silent_preferred_link_gives_way_to_a_restarted_peers_link() {
        let t0 = Instant::now();
        let mut n1 = m("n1", &["n2"]).with_heartbeat(HB);
        n1.handle(up("n2", 1, true), t0);
        n1.handle(heard("n2", 1), t0 + HB);
        // n2 restarted: it has no link, dials.
        let t1 = t0 + HB + 2 * HB;
        let mut n2 = m("n2", &["n1"]).with_heartbeat(HB);
        let fx = n2.handle(up("n1", 2, true), t1);
        assert!(fx.contains(&MemberEffect::Install {
            peer: "n1".into(),
            link: 2
        }));
        let fx = n1.handle(up("n2", 2, false), t1);
        assert_eq!(
            fx,
            vec![
                MemberEffect::Close {
                    peer: "n2".into(),
                    link: 1
                },
                MemberEffect::Install {
                    peer: "n2".into(),
                    link: 2
                },
            ]
        );
        assert_eq!(n1.link_of("n2"), Some(2));
        assert_eq!(n2.link_of("n1"), Some(2));
        // Heard on the new link: not found down when link 1's silence passes the timeout.
        n1.handle(heard("n2", 2), t1 + HB);
        assert!(n1.handle(MemberEvent::Tick, t0 + HB + T).is_empty());
        assert!(n1.is_up("n2"));
        // Frames of the closed link no longer count.
        n1.handle(heard("n2", 1), t1 + 2 * HB);
        assert_eq!(n1.view("n2").and_then(|v| v.last_heard), Some(t1 + HB));
    }

    /// Both links alive (the installed one heard just now, on both sides): the link dialed
    /// by the lower id is kept on both, the newer one refused, as when both dial at once.
    /// Silent for the whole window, it gives way.
    #[test]
    fn preferred_link_heard_within_two_heartbeats_is_kept() {
        let t0 = Instant::now();
        let window = 2 * HB;
        for (local, other, a_dialed_here) in [("n1", "n2", true), ("n2", "n1", false)] {
            let mut s = m(local, &[other]).with_heartbeat(HB);
            s.handle(up(other, 1, a_dialed_here), t0);
            let t1 = t0 + 3 * HB;
            s.handle(heard(other, 1), t1);
            // Link 2 dialed by n2.
            let late = t1 + window - Duration::from_millis(1);
            assert_eq!(
                s.handle(up(other, 2, !a_dialed_here), late),
                vec![MemberEffect::Reject {
                    peer: other.into(),
                    link: 2
                }],
                "{local}"
            );
            assert_eq!(s.link_of(other), Some(1));
            let fx = s.handle(up(other, 3, !a_dialed_here), t1 + window);
            assert_eq!(
                fx,
                vec![
                    MemberEffect::Close {
                        peer: other.into(),
                        link: 1
                    },
                    MemberEffect::Install {
                        peer: other.into(),
                        link: 3
                    },
                ],
                "{local}"
            );
        }
    }

    /// Both nodes dial at once: the preferred link is installed here, the other side installs
    /// it (and speaks on it) only after its own dial came up and was refused there; on a
    /// loaded machine that is more than two heartbeats later. The newer link, arriving while
    /// the preferred one was never heard, is refused: replaced, each side would keep the link
    /// the other closed, and both would dial again.
    #[test]
    fn a_preferred_link_installed_lately_is_kept_though_not_heard_yet() {
        let t0 = Instant::now();
        for (local, other, a_dialed_here) in [("n1", "n2", true), ("n2", "n1", false)] {
            let mut s = m(local, &[other]).with_heartbeat(HB);
            s.handle(up(other, 1, a_dialed_here), t0);
            let late = t0 + T / 2 - Duration::from_millis(1);
            assert!(late > t0 + s.alive_within(), "later than the alive window");
            assert_eq!(
                s.handle(up(other, 2, !a_dialed_here), late),
                vec![MemberEffect::Reject {
                    peer: other.into(),
                    link: 2
                }],
                "{local}"
            );
            assert_eq!(s.link_of(other), Some(1), "{local}");
        }
    }

    /// Two heartbeats, half the failure timeout at most; a third of it when the heartbeat is
    /// not given.
    #[test]
    fn alive_window_from_heartbeat_and_failure_timeout() {
        assert_eq!(Membership::new("n1", T).alive_within(), Duration::from_secs(1));
        assert_eq!(Membership::new("n1", T).with_heartbeat(HB).alive_within(), 2 * HB);
        let capped = Membership::new("n1", T).with_heartbeat(Duration::from_secs(1));
        assert_eq!(capped.alive_within(), T / 2);
    }

    #[test]
    fn unknown_peer_rejected_and_removed_peer_closed() {
        let t0 = Instant::now();
        let mut s = m("n1", &["n2"]);
        assert_eq!(
            s.handle(up("n9", 1, false), t0),
            vec![MemberEffect::Reject {
                peer: "n9".into(),
                link: 1
            }]
        );
        s.handle(up("n2", 2, true), t0);
        let fx = s.handle(MemberEvent::Removed { peer: "n2".into() }, t0);
        assert_eq!(
            fx,
            vec![
                MemberEffect::Close {
                    peer: "n2".into(),
                    link: 2
                },
                MemberEffect::Down { peer: "n2".into() }
            ]
        );
        assert!(!s.is_configured("n2"));
        assert!(s.all_attempted());
    }

    #[test]
    fn attempted_tracks_every_peer() {
        let t0 = Instant::now();
        let mut s = m("n1", &["n2", "n3"]);
        assert!(!s.all_attempted());
        s.handle(MemberEvent::DialAttempted { peer: "n2".into() }, t0);
        assert!(!s.all_attempted());
        s.handle(up("n3", 1, false), t0);
        assert!(s.all_attempted());
    }

    fn arb_event() -> impl Strategy<Value = MemberEvent> {
        let peer = prop_oneof![Just("n0"), Just("n2"), Just("n3")].prop_map(String::from);
        prop_oneof![
            (peer.clone(), 0u64..4, any::<bool>())
                .prop_map(|(peer, link, we_dialed)| { MemberEvent::LinkUp { peer, link, we_dialed } }),
            (peer.clone(), 0u64..4).prop_map(|(peer, link)| MemberEvent::Heard { peer, link }),
            (peer.clone(), 0u64..4).prop_map(|(peer, link)| MemberEvent::LinkClosed { peer, link }),
            (peer.clone(), 0u64..4).prop_map(|(peer, link)| MemberEvent::Left { peer, link }),
            peer.clone().prop_map(|peer| MemberEvent::Removed { peer }),
            peer.prop_map(|peer| MemberEvent::Added { peer }),
            Just(MemberEvent::Tick),
        ]
    }

    proptest! {
        /// Up and Down alternate per peer, and a peer that is down has no link.
        #[test]
        fn up_down_alternate(evs in proptest::collection::vec((arb_event(), 0u64..2000), 0..80)) {
            let mut s = m("n1", &["n0", "n2", "n3"]);
            let mut now = Instant::now();
            let mut up: BTreeMap<String, bool> = BTreeMap::new();
            for (ev, dt) in evs {
                now += Duration::from_millis(dt);
                for fx in s.handle(ev, now) {
                    match fx {
                        MemberEffect::Up { peer } => {
                            prop_assert!(!up.get(&peer).copied().unwrap_or(false));
                            up.insert(peer, true);
                        }
                        MemberEffect::Down { peer } => {
                            prop_assert!(up.get(&peer).copied().unwrap_or(false));
                            up.insert(peer, false);
                        }
                        _ => {}
                    }
                }
                for p in ["n0", "n2", "n3"] {
                    prop_assert_eq!(s.is_up(p), up.get(p).copied().unwrap_or(false));
                    if !s.is_up(p) {
                        prop_assert_eq!(s.link_of(p), None);
                    }
                }
            }
        }
    }
}
