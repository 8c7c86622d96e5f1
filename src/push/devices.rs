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
//! A push is folded only into one the provider was asked for alike ([`Device`]): not just to
//! the same token, but built the same way. FCM gives a token registered with the platform
//! `ios` the APNs block that wakes an iPhone app in the background; one registered as
//! `android` (or with none) goes without it, and FCM accepts it all the same but the iPhone
//! app is not woken. Folded together, a stranger who registered a wallet's FCM token as
//! `android` on a connection of their own and had it pushed once a window put off every push
//! of the wallet's own, for good. APNs tokens are hex, which Apple reads in either case: one
//! device whatever the case it was registered in (else the same token in as many cases as
//! connections would be pushed once a window per connection).
//!
//! Per node, in memory: a cluster of N nodes pushes a device at most N times a window.

use crate::store::PushService;
use std::cell::RefCell;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Devices remembered at most; past it, those out of their window go, and if none does, a
/// push is not remembered (nothing is folded by it: a push too many, not a wallet asleep).
const DEVICES_MAX: usize = 100_000;

/// A device as its provider is asked to push it: pushes to one [`Device`] are alike but for
/// what the fold leaves aside (the message count, the event id: the app picks up all it holds).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(super) struct Device {
    service: PushService,
    /// The token as the provider reads it: an APNs token in lower case.
    token: String,
    /// FCM: the push carries the APNs block of an iPhone app ([`super::fcm::via_apns`]).
    via_apns: bool,
}

impl Device {
    /// The device a push of a registration of `token` under `service`, with `platform`, goes to.
    pub(super) fn of(service: PushService, token: &str, platform: Option<&str>) -> Device {
        match service {
            PushService::Fcm => Device {
                service,
                // FCM tokens are case-sensitive: kept as they are.
                token: token.to_owned(),
                via_apns: super::fcm::via_apns(platform),
            },
            // Hex, read by Apple in either case; the payload has no platform.
            PushService::Apns => Device {
                service,
                token: token.to_ascii_lowercase(),
                via_apns: false,
            },
        }
    }
}

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

    /// A provider accepted a push of `conn` to `device` at `now`.
    pub(super) fn accepted(&mut self, device: Device, conn: &str, window: Duration, now: Instant) {
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
        self.accepted.insert(device, (now, conn.to_owned()));
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

/// Begins a push of `conn` to `device`; `None` when it is folded into another connection's
/// push to the device, accepted less than `window` ago or being sent. Without a window
/// nothing is folded.
pub(super) fn begin<'a>(
    devices: &'a RefCell<Devices>,
    device: Device,
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

    fn dev(service: PushService, token: &str) -> Device {
        Device::of(service, token, None)
    }

    fn folded(d: &RefCell<Devices>, service: PushService, token: &str, conn: &str, at: Instant) -> bool {
        begin(d, dev(service, token), conn, W, at).is_none()
    }

    #[test]
    fn a_device_pushed_for_one_connection_folds_the_others_for_a_window() {
        let d = RefCell::new(Devices::default());
        let t0 = Instant::now();
        let f = begin(&d, dev(PushService::Fcm, "tok"), "a", W, t0).expect("the first push");
        // While it is being sent, another connection's push to the device is folded.
        assert!(folded(&d, PushService::Fcm, "tok", "b", t0));
        d.borrow_mut().accepted(dev(PushService::Fcm, "tok"), "a", W, t0);
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
        assert!(begin(&d, dev(PushService::Fcm, "tok"), "b", Duration::ZERO, soon).is_some());
        let none = RefCell::new(Devices::default());
        none.borrow_mut()
            .accepted(dev(PushService::Fcm, "tok"), "a", Duration::ZERO, t0);
        assert!(none.borrow().accepted.is_empty());
    }

    /// A stranger registered an iPhone wallet's FCM token as `android` on a connection of
    /// their own and had it pushed: FCM accepted that push (without the APNs block, it wakes
    /// no iPhone app), and every push of the wallet's own was folded into it, put off again
    /// and again while the stranger kept it pushed. Only pushes built alike fold.
    #[test]
    fn an_fcm_push_folds_only_into_one_built_alike() {
        let d = RefCell::new(Devices::default());
        let t0 = Instant::now();
        let android = Device::of(PushService::Fcm, "tok", Some("android"));
        let f = begin(&d, android.clone(), "a", W, t0).expect("the stranger's push");
        let ios = Device::of(PushService::Fcm, "tok", Some("ios"));
        // Neither while the stranger's push is being sent, nor once FCM accepted it.
        assert!(
            begin(&d, ios.clone(), "b", W, t0).is_some(),
            "an iPhone's push folded while sending"
        );
        d.borrow_mut().accepted(android, "a", W, t0);
        drop(f);
        let soon = t0 + Duration::from_secs(10);
        assert!(
            begin(&d, ios.clone(), "b", W, soon).is_some(),
            "an iPhone's push folded"
        );
        assert!(begin(&d, Device::of(PushService::Fcm, "tok", None), "c", W, soon).is_none());
        // The platform's case makes no other push (FCM's payload reads it so).
        d.borrow_mut().accepted(ios, "b", W, soon);
        assert!(begin(&d, Device::of(PushService::Fcm, "tok", Some("iOS")), "c", W, soon).is_none());
        // FCM tokens are case-sensitive: another case is another device.
        assert!(begin(&d, Device::of(PushService::Fcm, "TOK", Some("ios")), "c", W, soon).is_some());
    }

    /// APNs device tokens are hex, which Apple reads in either case: the same token in as
    /// many cases as connections would have been pushed once a window per connection.
    #[test]
    fn an_apns_token_is_one_device_in_either_case() {
        let d = RefCell::new(Devices::default());
        let t0 = Instant::now();
        d.borrow_mut().accepted(dev(PushService::Apns, "ab12cd"), "a", W, t0);
        assert!(folded(&d, PushService::Apns, "AB12CD", "b", t0));
        assert!(folded(&d, PushService::Apns, "aB12Cd", "c", t0));
        // The platform plays no part in an APNs push.
        assert!(begin(&d, Device::of(PushService::Apns, "AB12cd", Some("android")), "c", W, t0).is_none());
        let d = RefCell::new(Devices::default());
        d.borrow_mut().accepted(dev(PushService::Apns, "AB12CD"), "a", W, t0);
        assert!(folded(&d, PushService::Apns, "ab12cd", "b", t0));
    }

    #[test]
    fn a_push_that_fails_holds_nothing_back() {
        let d = RefCell::new(Devices::default());
        let t0 = Instant::now();
        let f = begin(&d, dev(PushService::Fcm, "tok"), "a", W, t0).unwrap();
        drop(f); // refused, or cut off: not accepted
        assert!(!folded(&d, PushService::Fcm, "tok", "b", t0));
        assert!(d.borrow().in_flight.is_empty());
    }

    #[test]
    fn devices_remembered_are_bounded() {
        let mut d = Devices::default();
        let t0 = Instant::now();
        for i in 0..DEVICES_MAX {
            d.accepted(dev(PushService::Fcm, &format!("t{i}")), "a", W, t0);
        }
        // Full, none out of its window: not remembered (fails open).
        d.accepted(dev(PushService::Fcm, "new"), "a", W, t0);
        let new = dev(PushService::Fcm, "new");
        assert!(!d.folds(&new, "b", W, t0));
        // Once the window passed, the old ones make room.
        d.accepted(new.clone(), "a", W, t0 + W);
        assert_eq!(d.accepted.len(), 1);
        assert!(d.folds(&new, "b", W, t0 + W));
    }
}
