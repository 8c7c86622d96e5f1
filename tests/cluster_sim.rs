//! The cluster simulation of `benches/cluster_sim.rs`, small enough for a test: every node
//! keeps a real directory, and after a link flap (with sessions changing while it is cut) and
//! a node's death (its wallets reconnecting elsewhere), every node's directory must match the
//! truth exactly. The second test shows the check is not vacuous: lose the resync frames and
//! it reports the divergence.

#[path = "../benches/cluster_sim/sim.rs"]
mod sim;

use mailroom::cluster::proto::Frame;
use sim::{conn_id, Params, Rng, Sim};

const SEC: u64 = 1_000_000_000;

/// Runs the scenario and returns the check after a flap only, and after everything.
fn scenario(lose: Option<sim::DeliverFilter>) -> (Vec<String>, Vec<String>) {
    let n = 6;
    let victim = n - 1;
    let mut s = Sim::new(Params::new(n));
    s.deliver_filter = lose;
    let mut rng = Rng::new(5);
    let conns: Vec<String> = (0..3000).map(|_| conn_id(&mut rng)).collect();
    // The victim holds 500; the rest are spread.
    s.preload(&conns, |i| if i < 500 { victim } else { i % (n - 1) });
    s.run_until(SEC);
    assert!(s.check(1).is_empty(), "preloaded directories agree");

    // Node 1's link to node 0 breaks; while it is down, node 1's sessions change (those
    // frames cannot reach node 0), and a session moves from node 2 to node 1.
    s.cut(0, 1);
    let mine: Vec<String> = s.nodes[1].own.keys().take(50).cloned().collect();
    for c in &mine {
        s.close(1, c);
    }
    for _ in 0..50 {
        let c = conn_id(&mut rng);
        s.open(1, &c);
    }
    let moved = s.nodes[2].own.keys().next().cloned().expect("node 2 holds sessions");
    s.open(1, &moved);
    s.close(2, &moved);
    s.run_until(SEC + SEC / 10);
    let during = s.check(1);
    assert!(!during.is_empty(), "node 0 cannot know yet: the check must see it");
    s.link_up(0, 1);
    s.run_until(2 * SEC);
    let after_flap = s.check(5);

    // The victim dies; its wallets reconnect to the others over half a second.
    let lost: Vec<String> = s.nodes[victim].own.keys().cloned().collect();
    s.kill(victim, true);
    for c in lost {
        let at = 2 * SEC + s.rng.below(SEC / 2);
        let to = s.rng.below(n as u64 - 1) as usize;
        s.schedule_open(at, to, c);
    }
    s.run_until(2 * SEC + SEC / 2 + SEC / 100);
    assert!(
        !s.check(1).is_empty(),
        "before the failure timeout the dead node's claims are still kept"
    );
    s.run_until(8 * SEC);
    let down_everywhere = (0..n - 1).all(|i| s.nodes[i].down_at[victim].is_some());
    assert!(down_everywhere, "every survivor declared the dead node down");
    (after_flap, s.check(5))
}

#[test]
fn directories_match_the_truth_after_a_flap_and_a_death() {
    let (after_flap, after_death) = scenario(None);
    assert!(after_flap.is_empty(), "after the flap: {after_flap:#?}");
    assert!(after_death.is_empty(), "after the death: {after_death:#?}");
}

#[test]
fn lost_resync_frames_are_caught() {
    let (after_flap, _) = scenario(Some(|f| !matches!(f, Frame::Resync { .. })));
    assert!(!after_flap.is_empty(), "a lost resync must leave node 0 behind");
}
