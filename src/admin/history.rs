//! A small in-node history of the node's rates for the status page and `mailroom status`: no
//! external service. Every second the node's own counters (its Prometheus registry, read as
//! text: one source of truth) are sampled; per-second rates are kept for the last two minutes
//! and per-10-second rates for the last hour, in fixed ring buffers (~50 kB).
//!
//! The cluster view (`GET /history`) is assembled on demand by the node asked: it fetches each
//! peer's own history from the peer's admin listener (`GET /history?scope=node`, same token: one
//! config file describes the cluster) in parallel with a short timeout. That is simpler and more
//! robust than carrying history in cluster frames: nothing changes on the peer protocol, frame
//! sizes stay small, a peer that is down or slow is shown as unreachable instead of stalling the
//! link, and an operator can read any one node's history directly.

use std::collections::{BTreeMap, VecDeque};

use parking_lot::Mutex;
use serde::Serialize;

/// Per-second points kept.
pub const FINE_POINTS: usize = 120;
/// Per-10-second points kept (one hour).
pub const COARSE_POINTS: usize = 360;
pub const COARSE_STEP_S: u64 = 10;

/// Counter totals at one instant.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Totals {
    pub forwards: u64,
    pub deliveries: u64,
    pub acks: u64,
    pub pushes: u64,
    /// Refused inputs by reason.
    pub refusals: BTreeMap<String, u64>,
}

impl Totals {
    /// Reads the node's counters from its OpenMetrics text.
    pub fn from_metrics_text(text: &str) -> Totals {
        let mut t = Totals::default();
        for line in text.lines() {
            if line.starts_with('#') {
                continue;
            }
            let Some((name_labels, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(v) = value.parse::<f64>() else { continue };
            let v = v.max(0.0) as u64;
            let (name, labels) = match name_labels.split_once('{') {
                Some((n, l)) => (n, l.trim_end_matches('}')),
                None => (name_labels, ""),
            };
            let label = |key: &str| -> Option<&str> {
                labels.split(',').find_map(|kv| {
                    let (k, v) = kv.split_once('=')?;
                    (k == key).then(|| v.trim_matches('"'))
                })
            };
            match name {
                "mailroom_forwards_received_total" => t.forwards += v,
                "mailroom_delivered_total" => t.deliveries += v,
                "mailroom_acknowledged_total" => t.acks += v,
                "mailroom_push_total" if label("result") == Some("sent") => t.pushes += v,
                "mailroom_rejected_total" => {
                    *t.refusals
                        .entry(label("reason").unwrap_or("other").to_string())
                        .or_default() += v
                }
                _ => {}
            }
        }
        t
    }
}

/// Rates (per second) over one step.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct Point {
    /// End of the step (unix ms).
    pub t: i64,
    pub forwards: f64,
    pub deliveries: f64,
    pub acks: f64,
    pub pushes: f64,
    pub refusals: BTreeMap<String, f64>,
}

fn rate(now: &Totals, before: &Totals, secs: f64, t: i64) -> Point {
    let d = |a: u64, b: u64| a.saturating_sub(b) as f64 / secs;
    Point {
        t,
        forwards: d(now.forwards, before.forwards),
        deliveries: d(now.deliveries, before.deliveries),
        acks: d(now.acks, before.acks),
        pushes: d(now.pushes, before.pushes),
        refusals: now
            .refusals
            .iter()
            .map(|(k, v)| (k.clone(), d(*v, before.refusals.get(k).copied().unwrap_or(0))))
            .filter(|(_, r)| *r > 0.0)
            .collect(),
    }
}

#[derive(Default)]
struct Rings {
    last: Option<(i64, Totals)>,
    coarse_base: Option<(i64, Totals)>,
    fine: VecDeque<Point>,
    coarse: VecDeque<Point>,
}

/// The ring buffers of one node.
#[derive(Default)]
pub struct History {
    rings: Mutex<Rings>,
}

/// What `GET /history?scope=node` answers (and what a peer's history is read as).
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize, PartialEq)]
pub struct NodeHistory {
    pub fine_step_s: u64,
    pub coarse_step_s: u64,
    pub fine: Vec<PointDe>,
    pub coarse: Vec<PointDe>,
}

/// [`Point`] as read back from a peer.
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize, PartialEq)]
pub struct PointDe {
    pub t: i64,
    pub forwards: f64,
    pub deliveries: f64,
    pub acks: f64,
    pub pushes: f64,
    #[serde(default)]
    pub refusals: BTreeMap<String, f64>,
}

impl From<&Point> for PointDe {
    fn from(p: &Point) -> PointDe {
        PointDe {
            t: p.t,
            forwards: p.forwards,
            deliveries: p.deliveries,
            acks: p.acks,
            pushes: p.pushes,
            refusals: p.refusals.clone(),
        }
    }
}

impl History {
    /// Records the counters at `now_ms` (called about once a second).
    pub fn sample(&self, now_ms: i64, totals: Totals) {
        let mut r = self.rings.lock();
        if let Some((t0, before)) = &r.last {
            let secs = ((now_ms - t0) as f64 / 1000.0).max(0.001);
            let p = rate(&totals, before, secs, now_ms);
            r.fine.push_back(p);
            while r.fine.len() > FINE_POINTS {
                r.fine.pop_front();
            }
        }
        match &r.coarse_base {
            Some((t0, before)) if now_ms - t0 >= (COARSE_STEP_S * 1000) as i64 => {
                let secs = (now_ms - t0) as f64 / 1000.0;
                let p = rate(&totals, before, secs, now_ms);
                r.coarse.push_back(p);
                while r.coarse.len() > COARSE_POINTS {
                    r.coarse.pop_front();
                }
                r.coarse_base = Some((now_ms, totals.clone()));
            }
            Some(_) => {}
            None => r.coarse_base = Some((now_ms, totals.clone())),
        }
        r.last = Some((now_ms, totals));
    }

    pub fn snapshot(&self) -> NodeHistory {
        let r = self.rings.lock();
        NodeHistory {
            fine_step_s: 1,
            coarse_step_s: COARSE_STEP_S,
            fine: r.fine.iter().map(PointDe::from).collect(),
            coarse: r.coarse.iter().map(PointDe::from).collect(),
        }
    }
}

/// The cluster's rates: the nodes' series summed point by point, aligned on their latest point
/// (nodes sample on their own clocks, at most one step apart).
pub fn sum(histories: &[&NodeHistory]) -> NodeHistory {
    let add = |series: Vec<&Vec<PointDe>>| -> Vec<PointDe> {
        let len = series.iter().map(|s| s.len()).max().unwrap_or(0);
        (0..len)
            .map(|i| {
                let mut p = PointDe::default();
                for s in &series {
                    // Right-aligned: index i of the longest series.
                    let Some(j) = (i + s.len()).checked_sub(len) else {
                        continue;
                    };
                    let q = &s[j];
                    p.t = p.t.max(q.t);
                    p.forwards += q.forwards;
                    p.deliveries += q.deliveries;
                    p.acks += q.acks;
                    p.pushes += q.pushes;
                    for (k, v) in &q.refusals {
                        *p.refusals.entry(k.clone()).or_default() += v;
                    }
                }
                p
            })
            .collect()
    };
    NodeHistory {
        fine_step_s: 1,
        coarse_step_s: COARSE_STEP_S,
        fine: add(histories.iter().map(|h| &h.fine).collect()),
        coarse: add(histories.iter().map(|h| &h.coarse).collect()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_read_from_the_metrics_text() {
        let text = "# TYPE x counter\nmailroom_forwards_received_total 7\nmailroom_delivered_total{path=\"live\"} 3\n\
                    mailroom_delivered_total{path=\"pickup\"} 2\nmailroom_acknowledged_total 4\n\
                    mailroom_push_total{provider=\"fcm\",result=\"sent\"} 2\nmailroom_push_total{provider=\"fcm\",result=\"failed\"} 9\n\
                    mailroom_rejected_total{reason=\"queue-full\"} 5\n# EOF\n";
        let t = Totals::from_metrics_text(text);
        assert_eq!((t.forwards, t.deliveries, t.acks, t.pushes), (7, 5, 4, 2));
        assert_eq!(t.refusals.get("queue-full"), Some(&5));
    }

    #[test]
    fn rates_per_second_and_per_ten_seconds_in_bounded_rings() {
        let h = History::default();
        let mut t = Totals::default();
        for s in 0..(COARSE_POINTS as i64 * 10 + 50) {
            t.forwards += 2;
            if s % 10 == 0 {
                *t.refusals.entry("queue-full".into()).or_default() += 10;
            }
            h.sample(s * 1000, t.clone());
        }
        let snap = h.snapshot();
        assert_eq!(snap.fine.len(), FINE_POINTS);
        assert_eq!(snap.coarse.len(), COARSE_POINTS);
        assert!(snap.fine.iter().all(|p| (p.forwards - 2.0).abs() < 1e-9));
        assert!(snap.coarse.iter().all(|p| (p.forwards - 2.0).abs() < 1e-9));
        assert!(snap
            .coarse
            .iter()
            .all(|p| (p.refusals["queue-full"] - 1.0).abs() < 1e-9));
        let both = sum(&[&snap, &snap]);
        assert!((both.coarse[0].forwards - 4.0).abs() < 1e-9);
    }
}
