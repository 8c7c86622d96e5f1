//! Pushes by device: this node pushes one device (a provider and a token) at most once a
//! window (`min_interval_secs`), whichever connections registered its token.
//!
//! A connection's own pushes are spaced by its window in the store. But anyone who learned a
//! wallet's device token could register it on connections of their own and forward to each:
//! the phone was pushed once a window per connection, as often as they opened connections,
//! and the provider's per-device rate limit then throttled the wallet's own wake-ups.
//!
//! A push to a device this node had a provider *accept* a push to, for another connection,
//! less than a window ago is folded: the device was woken then (a push carries no connection,
//! only "mail waits": the app picks up all it holds), and the wallet's push is put off to its
//! window's end, when it goes out unless the wallet came back, picked up, or the device was
//! pushed again meanwhile. Only pushes a provider accepted count, under the service they were
//! accepted for: registering a wallet's token under another service, or pushes that fail,
//! hold nothing back. The webhook is per connection and never folded.
//!
//! Per node, in memory: a cluster of N nodes pushes a device at most N times a window.

use crate::store::PushService;
use std::cell::RefCell;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Devices remembered at most; past it, those out of their window go, and if none does, a
/// push is not remembered (nothing is folded by it: a push too many, not a wallet asleep).
const DEVICES_MAX: usize = 100_000;

type Device = (PushService, String);

#[derive(Default)]
pub(super) struct Devices {
    /// Device -> when a provider last accepted a push to it, and for which connection.
    accepted: HashMap<Device, (Instant, String)>,
    /// Device -> the connection whose push to it is being sent: pushes of several connections
    /// to one device that come due together (their windows end together) go out once, not
    /// all at once before the first is accepted.
    in_flight: HashMap<Device, String>,
}

impl Devices {
    /// Whether a push of `conn` to the device is folded: one of another connection was
    /// accepted less than `window` before `now`, or is being sent.
    fn folds(&self, device: &Device, conn: &str, window: Duration, now: Instant) -> bool {
        let sending = self.in_flight.get(device).is_some_and(|by| by != conn);
        let accepted = self
            .accepted
            .get(device)
            .is_some_and(|(at, by)| by != conn && now.saturating_duration_since(*at) < window);
        sending || accepted
    }

    /// A provider accepted a push of `conn` to `token` under `service` at `now`.
    pub(super) fn accepted(&mut self, service: PushService, token: &str, conn: &str, window: Duration, now: Instant) {
        if window.is_zero() {
            return;
        }
        if self.accepted.len() >= DEVICES_MAX {
            self.accepted
                .retain(|_, (at, _)| now.saturating_duration_since(*at) < window);
            if self.accepted.len() >= DEVICES_MAX {
                return;
            }
        }
        self.accepted
            .insert((service, token.to_owned()), (now, conn.to_owned()));
    }
}

/// A push of one connection to one device being sent ([`begin`]): other connections' pushes
/// to the device are folded until it ends (dropped: sent, failed, or cut off).
pub(super) struct Flight<'a> {
    devices: &'a RefCell<Devices>,
    device: Option<Device>,
    conn: String,
}

impl Drop for Flight<'_> {
    fn drop(&mut self) {
        if let Some(d) = self.device.take() {
            let mut devices = self.devices.borrow_mut();
            if devices.in_flight.get(&d).is_some_and(|by| *by == self.conn) {
                devices.in_flight.remove(&d);
            }
        }
    }
}

/// Begins a push of `conn` to `token` under `service`; `None` when it is folded into another
/// connection's push to the device, accepted less than `window` ago or being sent. Without
/// a window nothing is folded.
pub(super) fn begin<'a>(
    devices: &'a RefCell<Devices>,
    service: PushService,
    token: &str,
    conn: &str,
    window: Duration,
    now: Instant,
) -> Option<Flight<'a>> {
    let mut flight = Flight {
        devices,
        device: None,
        conn: conn.to_owned(),
    };
    if window.is_zero() {
        return Some(flight);
    }
    let device = (service, token.to_owned());
    let mut d = devices.borrow_mut();
    if d.folds(&device, conn, window, now) {
        return None;
    }
    d.in_flight.insert(device.clone(), conn.to_owned());
    flight.device = Some(device);
    Some(flight)
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: Duration = Duration::from_secs(60);

    fn folded(d: &RefCell<Devices>, service: PushService, token: &str, conn: &str, at: Instant) -> bool {
        begin(d, service, token, conn, W, at).is_none()
    }

    #[test]
    fn a_device_pushed_for_one_connection_folds_the_others_for_a_window() {
        let d = RefCell::new(Devices::default());
        let t0 = Instant::now();
        let f = begin(&d, PushService::Fcm, "tok", "a", W, t0).expect("the first push");
        // While it is being sent, another connection's push to the device is folded.
        assert!(folded(&d, PushService::Fcm, "tok", "b", t0));
        d.borrow_mut().accepted(PushService::Fcm, "tok", "a", W, t0);
        drop(f);
        let soon = t0 + Duration::from_secs(10);
        assert!(folded(&d, PushService::Fcm, "tok", "b", soon));
        // The connection's own pushes are its window's (in the store), not folded here.
        assert!(!folded(&d, PushService::Fcm, "tok", "a", soon));
        // Another service's token of the same text is another device.
        assert!(!folded(&d, PushService::Apns, "tok", "b", soon));
        assert!(!folded(&d, PushService::Fcm, "other", "b", soon));
        // After the window, pushed again.
        assert!(!folded(&d, PushService::Fcm, "tok", "b", t0 + W));
        // Without a window nothing is folded nor kept.
        assert!(begin(&d, PushService::Fcm, "tok", "b", Duration::ZERO, soon).is_some());
        let none = RefCell::new(Devices::default());
        none.borrow_mut()
            .accepted(PushService::Fcm, "tok", "a", Duration::ZERO, t0);
        assert!(none.borrow().accepted.is_empty());
    }

    #[test]
    fn a_push_that_fails_holds_nothing_back() {
        let d = RefCell::new(Devices::default());
        let t0 = Instant::now();
        let f = begin(&d, PushService::Fcm, "tok", "a", W, t0).unwrap();
        drop(f); // refused, or cut off: not accepted
        assert!(!folded(&d, PushService::Fcm, "tok", "b", t0));
        assert!(d.borrow().in_flight.is_empty());
    }

    #[test]
    fn devices_remembered_are_bounded() {
        let mut d = Devices::default();
        let t0 = Instant::now();
        for i in 0..DEVICES_MAX {
            d.accepted(PushService::Fcm, &format!("t{i}"), "a", W, t0);
        }
        // Full, none out of its window: not remembered (fails open).
        d.accepted(PushService::Fcm, "new", "a", W, t0);
        let new = (PushService::Fcm, "new".to_string());
        assert!(!d.folds(&new, "b", W, t0));
        // Once the window passed, the old ones make room.
        d.accepted(PushService::Fcm, "new", "a", W, t0 + W);
        assert_eq!(d.accepted.len(), 1);
        assert!(d.folds(&new, "b", W, t0 + W));
    }
}
