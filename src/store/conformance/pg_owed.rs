//! PostgreSQL's record of what a dead node left owed: the mark of each node's run
//! ([`Store::begin_node_run`]) and the wallets owed a wake-up ([`Store::owed_wakes`]). Not in
//! the suite both backends run: sled tracks neither (one mark for the store, and every wallet
//! with mail pending woken after a run that did not stop).

use super::pg_backend::in_own_db;
use super::*;

fn device(token: &str) -> Device {
    Device {
        service: PushService::Fcm,
        token: token.into(),
        platform: Some("android".into()),
        updated_at_ms: T0,
    }
}

/// A connection with a device registration.
async fn registered(s: &Arc<dyn Store>) -> String {
    let c = new_conn(s).await;
    s.set_device(&c, Some(&device(&format!("token-{c}")))).await.unwrap();
    c
}

/// Every page of [`Store::owed_wakes`] at `now`, `limit` registrations a page: the wallets
/// owed, and how many pages it took.
async fn owed_all(s: &Arc<dyn Store>, now: i64, limit: usize) -> (Vec<(String, i64)>, usize) {
    let mut after: Option<String> = None;
    let mut all = Vec::new();
    let mut pages = 0;
    loop {
        let page = s
            .owed_wakes(now, after.as_deref(), limit)
            .await
            .unwrap()
            .expect("tracked");
        pages += 1;
        assert!(pages < 100, "the pages never end");
        all.extend(page.owed.into_iter().map(|o| (o.connection, o.newest_received_ms)));
        match page.next {
            Some(n) => after = Some(n),
            None => return (all, pages),
        }
    }
}

/// The wallets owed a wake-up are those with a device and mail deliverable now received after
/// their last push (or never pushed), no push due or claimed, mediation not revoked; each with
/// its newest deliverable message's receipt; paged by connection id however few are owed.
#[tokio::test]
async fn the_wallets_owed_a_wake_up_are_those_nobody_will_push() {
    in_own_db(|url| async move {
        let s: Arc<dyn Store> = Arc::new(PgStore::open(&url, 4).await.unwrap());
        let now = T0 + 10_000;
        let window = 60_000;
        // Never pushed, two messages: owed, as of the newer.
        let never = registered(&s).await;
        enqueue_ok(&s, vec![msg(&never, "a", T0 + 10), msg(&never, "b", T0 + 20)]).await;
        // Pushed after its mail (the push done): not owed.
        let pushed = registered(&s).await;
        enqueue_ok(&s, vec![msg(&pushed, "a", T0 + 10)]).await;
        let claim = NewClaim::until(now + 60_000);
        assert_eq!(
            s.push_event(&pushed, T0 + 100, window, claim, None).await.unwrap(),
            PushSlot::Now
        );
        assert!(s.push_done(&pushed, claim.token, None).await.unwrap());
        // Pushed, then mail again, its event never recorded: owed.
        let again = registered(&s).await;
        let claim = NewClaim::until(now + 60_000);
        s.push_event(&again, T0 + 100, window, claim, None).await.unwrap();
        s.push_done(&again, claim.token, None).await.unwrap();
        enqueue_ok(&s, vec![msg(&again, "late", T0 + 200)]).await;
        // A push claimed (being sent, or any node's once its claim runs out): not owed.
        let claimed = registered(&s).await;
        s.push_event(&claimed, T0 + 100, window, NewClaim::until(now + 60_000), None)
            .await
            .unwrap();
        enqueue_ok(&s, vec![msg(&claimed, "during the push", T0 + 200)]).await;
        // A trailing push due (any node's poll sends it): not owed.
        let trailing = registered(&s).await;
        let claim = NewClaim::until(now + 60_000);
        s.push_event(&trailing, T0 + 100, window, claim, None).await.unwrap();
        s.push_done(&trailing, claim.token, None).await.unwrap();
        enqueue_ok(&s, vec![msg(&trailing, "folded", T0 + 200)]).await;
        assert!(matches!(
            s.push_event(&trailing, T0 + 200, window, NewClaim::until(now + 60_000), None)
                .await
                .unwrap(),
            PushSlot::Trailing { .. }
        ));
        // No device: nobody to push.
        let no_device = new_conn(&s).await;
        enqueue_ok(&s, vec![msg(&no_device, "a", T0 + 10)]).await;
        // Nothing queued.
        let empty = registered(&s).await;
        // Its only message leased to a session: not owed while the lease runs; owed once it ran
        // out (as of that message).
        let leased = registered(&s).await;
        enqueue_ok(&s, vec![msg(&leased, "a", T0 + 30)]).await;
        assert_eq!(
            s.lease(&leased, 10, "n1/s/1", T0 + 40, now + 5_000)
                .await
                .unwrap()
                .len(),
            1
        );
        // Its newest message leased, an older one pending: owed as of the older.
        let half = registered(&s).await;
        enqueue_ok(&s, vec![msg(&half, "old", T0 + 10), msg(&half, "new", T0 + 50)]).await;
        let taken = s.lease(&half, 10, "n1/s/2", T0 + 60, now + 5_000).await.unwrap();
        let old: Vec<MessageId> = taken.iter().filter(|m| m.payload == b"old").map(|m| m.id).collect();
        assert_eq!((taken.len(), old.len()), (2, 1));
        assert_eq!(s.release(&half, &old, "n1/s/2").await.unwrap(), 1);
        // Mediation revoked: pickup refuses it, nobody wakes it.
        let revoked = registered(&s).await;
        enqueue_ok(&s, vec![msg(&revoked, "a", T0 + 10)]).await;
        let mut c = s.get_connection(&revoked).await.unwrap().unwrap();
        c.mediation = MediationState::Denied;
        s.put_connection(&c).await.unwrap();
        // Its only message past its sender's expiry.
        let expired = registered(&s).await;
        enqueue_ok(
            &s,
            vec![NewMessage {
                expires_at_ms: Some(T0 + 500),
                ..msg(&expired, "a", T0 + 10)
            }],
        )
        .await;

        let mut want = vec![
            (never.clone(), T0 + 20),
            (again.clone(), T0 + 200),
            (half.clone(), T0 + 10),
        ];
        want.sort();
        for limit in [1, 2, 3, 100] {
            let (got, pages) = owed_all(&s, now, limit).await;
            assert_eq!(got, want, "{limit} a page");
            // 10 registrations (the connection without a device is not read).
            assert_eq!(pages, 10 / limit + 1, "{limit} a page");
        }
        let _ = (pushed, claimed, trailing, no_device, empty, revoked, expired);

        // The leases ran out: deliverable, and owed.
        let later = now + 6_000;
        let (got, _) = owed_all(&s, later, 100).await;
        let mut want_later: Vec<_> = want.iter().filter(|(c, _)| *c != half).cloned().collect();
        want_later.extend([(leased.clone(), T0 + 30), (half.clone(), T0 + 50)]);
        want_later.sort();
        assert_eq!(got, want_later);

        // Pushed now (its window records the event): no longer owed.
        let claim = NewClaim::until(later + 60_000);
        assert_eq!(
            s.push_event(&never, T0 + 300, window, claim, Some(T0 + 20))
                .await
                .unwrap(),
            PushSlot::Now
        );
        s.push_done(&never, claim.token, None).await.unwrap();
        let (got, _) = owed_all(&s, now, 100).await;
        let mut want_now: Vec<_> = want.iter().filter(|(c, _)| *c != never).cloned().collect();
        want_now.sort();
        assert_eq!(got, want_now);
        // A node that wakes it again pushes it not, as it was pushed since.
        assert_eq!(
            s.push_event(&never, T0 + 400, window, NewClaim::until(later), Some(T0 + 20))
                .await
                .unwrap(),
            PushSlot::PushedSince
        );
    })
    .await;
}

/// Each node's run is marked apart: a run of one node that never ended is found by that
/// node's next start, once, and by no other node's.
#[tokio::test]
async fn each_node_finds_its_own_run_that_did_not_stop() {
    in_own_db(|url| async move {
        let s: Arc<dyn Store> = Arc::new(PgStore::open(&url, 2).await.unwrap());
        assert_eq!(
            s.begin_run().await.unwrap(),
            None,
            "the store-wide mark is not PostgreSQL's"
        );
        assert_eq!(s.begin_node_run("n1").await.unwrap(), Some(false), "a new store");
        assert_eq!(s.begin_node_run("n2").await.unwrap(), Some(false), "another node");
        // n1 dies (no end) and starts again.
        assert_eq!(s.begin_node_run("n1").await.unwrap(), Some(true), "n1's crash is found");
        // n1 stops cleanly, and starts again.
        s.end_node_run("n1").await.unwrap();
        assert_eq!(s.begin_node_run("n1").await.unwrap(), Some(false), "a clean stop");
        s.end_node_run("n1").await.unwrap();
        // n2 never ended.
        assert_eq!(s.begin_node_run("n2").await.unwrap(), Some(true), "n2's crash is n2's");
        // A second handle on the store (another process) sees the same marks.
        let other: Arc<dyn Store> = Arc::new(PgStore::open(&url, 2).await.unwrap());
        assert_eq!(other.begin_node_run("n2").await.unwrap(), Some(true));
        other.end_node_run("n2").await.unwrap();
        assert_eq!(s.begin_node_run("n2").await.unwrap(), Some(false));
    })
    .await;
}
