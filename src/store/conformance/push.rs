//! Push registrations and the push windows nodes share.

use super::*;

pub async fn device_registrations(b: Arc<dyn Backend>) {
    let s = b.open().await;
    let a = new_conn(&s).await;
    let other = new_conn(&s).await;
    assert_eq!(s.device_of(&a).await.unwrap(), None);
    let d1 = Device {
        service: PushService::Fcm,
        token: "token-1".into(),
        platform: Some("android".into()),
        updated_at_ms: T0,
    };
    s.set_device(&a, Some(&d1)).await.unwrap();
    assert_eq!(s.device_of(&a).await.unwrap(), Some(d1.clone()));
    assert_eq!(
        s.device_of(&other).await.unwrap(),
        None,
        "a registration is per connection"
    );
    // Replaced, not added.
    let d2 = Device {
        service: PushService::Apns,
        token: "token-2".into(),
        platform: None,
        updated_at_ms: T0 + 1,
    };
    s.set_device(&a, Some(&d2)).await.unwrap();
    assert_eq!(s.device_of(&a).await.unwrap(), Some(d2.clone()));
    // A dead token reported late does not remove a newer registration.
    assert!(!s.forget_device_token(&a, "token-1").await.unwrap());
    assert_eq!(s.device_of(&a).await.unwrap(), Some(d2.clone()));
    assert!(s.forget_device_token(&a, "token-2").await.unwrap());
    assert_eq!(s.device_of(&a).await.unwrap(), None);
    assert!(!s.forget_device_token(&a, "token-2").await.unwrap());
    // Unregister.
    s.set_device(&a, Some(&d1)).await.unwrap();
    s.set_device(&a, None).await.unwrap();
    assert_eq!(s.device_of(&a).await.unwrap(), None);
    s.set_device(&a, None).await.unwrap();
    // No registration without a connection.
    let ghost = new_id();
    assert!(matches!(
        s.set_device(&ghost, Some(&d1)).await,
        Err(StoreError::NotFound)
    ));
    assert_eq!(s.device_of(&ghost).await.unwrap(), None);
    // Rewriting the connection (a protocol update) keeps its registration; it is durable.
    s.set_device(&other, Some(&d1)).await.unwrap();
    s.put_connection(&conn(&other)).await.unwrap();
    drop(s);
    let s = b.open().await;
    assert_eq!(s.device_of(&other).await.unwrap(), Some(d1));
    assert_eq!(s.device_of("bad\0id").await.unwrap(), None);
}

/// A push that sent nothing (the wallet was back, or a trailing push found no mail) ends its
/// claim and reopens the window: the next event pushes at once, and a trailing push scheduled
/// meanwhile is due at once. Ended as sent, the window counts it.
pub async fn a_push_that_sent_nothing_reopens_its_window(b: Arc<dyn Backend>) {
    let s = b.open().await;
    const W: i64 = 1000;
    // Pushed at T0; an event inside the window schedules the trailing push at T0 + W.
    let (c, other) = (new_id(), new_id());
    for x in [&c, &other] {
        assert_eq!(
            s.push_event(x, T0, W, NewClaim::until(T0 + LEASE), None).await.unwrap(),
            PushSlot::Now
        );
        assert!(matches!(
            s.push_event(x, T0 + 10, W, NewClaim::until(T0 + LEASE), None)
                .await
                .unwrap(),
            PushSlot::Trailing { .. }
        ));
    }
    let due = T0 + W;
    let taken = s.push_take_due(due, due + LEASE, 0, 100).await.unwrap();
    assert_eq!(taken.len(), 2);
    let token_of = |x: &str| taken.iter().find(|t| t.conn == x).unwrap().token;
    // An event while the trailing pushes are under way: inside their (restarted) window.
    for x in [&c, &other] {
        assert_eq!(
            s.push_event(x, due + 5, W, NewClaim::until(due + 5 + LEASE), None)
                .await
                .unwrap(),
            PushSlot::Trailing { due_ms: due + W }
        );
    }
    // `c`'s sent nothing: due at once, and the event after it pushes now.
    assert!(s.push_done(&c, token_of(&c), Some(W)).await.unwrap());
    assert!(!s.push_done(&c, token_of(&c), Some(W)).await.unwrap(), "ended once");
    // `other`'s was sent: its trailing push waits for the window.
    assert!(s.push_done(&other, token_of(&other), None).await.unwrap());
    let again = s.push_take_due(due + 6, due + 6 + LEASE, 0, 100).await.unwrap();
    assert_eq!(
        conns_of(&again),
        vec![c.clone()],
        "only the reopened window's push is due"
    );
    assert!(s.push_done(&c, again[0].token, Some(W)).await.unwrap());
    assert_eq!(
        s.push_event(&c, due + 7, W, NewClaim::until(due + 7 + LEASE), None)
            .await
            .unwrap(),
        PushSlot::Now,
        "after a push that sent nothing, the next event pushes at once"
    );
    assert!(matches!(
        s.push_event(&other, due + 7, W, NewClaim::until(due + 7 + LEASE), None)
            .await
            .unwrap(),
        PushSlot::Trailing { .. }
    ));
}

pub async fn push_windows_are_shared(b: Arc<dyn Backend>) {
    let n1 = b.open().await;
    let n2 = b.open().await;
    let c = new_id();
    // A burst from two nodes at once: one push now, every other event folded into one trailing push.
    let mut tasks = Vec::new();
    for i in 0..16i64 {
        let s = if i % 2 == 0 { n1.clone() } else { n2.clone() };
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            s.push_event(&c, T0 + i, 1000, NewClaim::until(T0 + i + LEASE), None)
                .await
                .unwrap()
        }));
    }
    let mut now = 0;
    let mut dues = HashSet::new();
    for t in tasks {
        match t.await.unwrap() {
            PushSlot::Now => now += 1,
            PushSlot::Trailing { due_ms } => {
                dues.insert(due_ms);
            }
            PushSlot::PushedSince => panic!("no condition was given"),
        }
    }
    assert_eq!(now, 1, "one push now across nodes");
    assert_eq!(dues.len(), 1, "one trailing push: {dues:?}");
    let due = *dues.iter().next().unwrap();
    assert!((T0 + 1000..T0 + 1016).contains(&due));
    assert!(n1.push_take_due(due - 1, due + LEASE, 0, 100).await.unwrap().is_empty());
    // Due: taken by exactly one of the nodes polling at once.
    let (a, b2) = tokio::join!(
        n1.push_take_due(due, due + LEASE, 0, 100),
        n2.push_take_due(due, due + LEASE, 0, 100)
    );
    let mut taken = a.unwrap();
    taken.extend(b2.unwrap());
    assert_eq!(conns_of(&taken), vec![c.clone()]);
    assert!(n1
        .push_take_due(due + 10, due + LEASE, 0, 100)
        .await
        .unwrap()
        .is_empty());
    assert!(n2.push_done(&c, taken[0].token, None).await.unwrap(), "sent");
    // The trailing push restarted the window.
    assert_eq!(
        n2.push_event(&c, due + 1, 1000, NewClaim::until(due + 1 + LEASE), None)
            .await
            .unwrap(),
        PushSlot::Trailing { due_ms: due + 1000 }
    );
    // An event after the window pushes now; the trailing push not yet taken is that push.
    assert!(matches!(
        n1.push_event(&c, due + 5000, 1000, NewClaim::until(due + 5000 + LEASE), None)
            .await
            .unwrap(),
        PushSlot::Now
    ));
    assert!(n1
        .push_take_due(due + 6000, due + 6000 + LEASE, 0, 100)
        .await
        .unwrap()
        .is_empty());
    // No window: every event pushes.
    let d = new_id();
    assert!(matches!(
        n1.push_event(&d, T0, 0, NewClaim::until(T0 + LEASE), None)
            .await
            .unwrap(),
        PushSlot::Now
    ));
    assert!(matches!(
        n2.push_event(&d, T0, 0, NewClaim::until(T0 + LEASE), None)
            .await
            .unwrap(),
        PushSlot::Now
    ));
}

/// A claim's length in these checks.
const LEASE: i64 = 60_000;

fn conns_of(claims: &[PushClaim]) -> Vec<ConnId> {
    claims.iter().map(|c| c.conn.clone()).collect()
}

/// A trailing push is claimed, not handed over: one whose claim ran out without
/// `push_done` (its node died, stopped or failed before sending) is taken again by any node,
/// never before; `push_done` ends only its own claim; events during a claim schedule the next
/// trailing push as without one; a window with a live claim is not forgotten as idle.
pub async fn trailing_push_claims_run_out(b: Arc<dyn Backend>) {
    let n1 = b.open().await;
    let n2 = b.open().await;
    let c = new_id();
    let other = new_id();
    assert!(matches!(
        n1.push_event(&c, T0, 1000, NewClaim::until(T0 + LEASE), None)
            .await
            .unwrap(),
        PushSlot::Now
    ));
    let due = T0 + 1000;
    assert_eq!(
        n2.push_event(&c, T0 + 10, 1000, NewClaim::until(T0 + 10 + LEASE), None)
            .await
            .unwrap(),
        PushSlot::Trailing { due_ms: due }
    );
    let first = n1.push_take_due(due, due + LEASE, 0, 100).await.unwrap();
    assert_eq!(conns_of(&first), vec![c.clone()]);
    // A trailing push is a new push: named by the claim that takes it.
    assert_eq!(first[0].push_id, first[0].token);
    let push_id = first[0].push_id;
    let first = first[0].token;
    // Claimed: not taken again while the claim lasts, by either node.
    assert!(n2
        .push_take_due(due + 1, due + 1 + LEASE, 0, 100)
        .await
        .unwrap()
        .is_empty());
    assert!(n2
        .push_take_due(due + LEASE - 1, due + 2 * LEASE, 0, 100)
        .await
        .unwrap()
        .is_empty());
    // Windows idle long ago are forgotten, not one with a live claim.
    assert!(n2
        .push_take_due(due + 2, due + 2 + LEASE, i64::MAX, 100)
        .await
        .unwrap()
        .is_empty());
    // Never marked done: taken again once the claim ran out, under a new claim.
    let second = n2.push_take_due(due + LEASE, due + 2 * LEASE, 0, 100).await.unwrap();
    assert_eq!(
        conns_of(&second),
        vec![c.clone()],
        "a claim that ran out is taken again"
    );
    assert_eq!(second[0].push_id, push_id, "the same push, taken again");
    let second = second[0].token;
    assert_ne!(second, first);
    // The first claimer finishing late does not end the second claim.
    assert!(
        !n1.push_done(&c, first, None).await.unwrap(),
        "a later claim is not ended"
    );
    assert!(
        !n1.push_done(&other, second, None).await.unwrap(),
        "another wallet's claim is not ended"
    );
    let t = due + LEASE;
    assert!(n1
        .push_take_due(t + LEASE - 1, t + 2 * LEASE, 0, 100)
        .await
        .unwrap()
        .is_empty());
    let third = n1.push_take_due(t + LEASE, t + 2 * LEASE, 0, 100).await.unwrap();
    assert_eq!(conns_of(&third), vec![c.clone()], "the second claim stood and ran out");
    assert_eq!(third[0].push_id, push_id, "still the same push");
    let third = third[0].token;
    // The take restarted the window: an event during the claim schedules the next trailing
    // push a window after it, as without a claim; it is taken when due, whatever the claim.
    let t = t + LEASE;
    assert_eq!(
        n2.push_event(&c, t + 10, 1000, NewClaim::until(t + 10 + LEASE), None)
            .await
            .unwrap(),
        PushSlot::Trailing { due_ms: t + 1000 }
    );
    assert_eq!(
        n1.push_event(&c, t + 20, 1000, NewClaim::until(t + 20 + LEASE), None)
            .await
            .unwrap(),
        PushSlot::Trailing { due_ms: t + 1000 }
    );
    assert!(n2
        .push_take_due(t + 999, t + 999 + LEASE, 0, 100)
        .await
        .unwrap()
        .is_empty());
    let fourth = n2.push_take_due(t + 1000, t + 1000 + LEASE, 0, 100).await.unwrap();
    assert_eq!(
        conns_of(&fourth),
        vec![c.clone()],
        "the next trailing push is not held back"
    );
    assert_eq!(fourth[0].push_id, fourth[0].token, "events since: a new push");
    let fourth = fourth[0].token;
    assert!(
        !n1.push_done(&c, third, None).await.unwrap(),
        "replaced by the fourth claim"
    );
    // Done: the claim ends (once), and the push is not taken again.
    assert!(n2.push_done(&c, fourth, None).await.unwrap());
    assert!(!n2.push_done(&c, fourth, None).await.unwrap());
    let t = t + 1000;
    assert!(n1
        .push_take_due(t + 10 * LEASE, t + 11 * LEASE, 0, 100)
        .await
        .unwrap()
        .is_empty());
    // Done and idle: forgotten, as a window without a claim (an event then pushes at once).
    assert!(n1
        .push_take_due(t + 10 * LEASE, t + 11 * LEASE, t + 1, 100)
        .await
        .unwrap()
        .is_empty());
    assert!(matches!(
        n1.push_event(&c, t + 500, 1000, NewClaim::until(t + 500 + LEASE), None)
            .await
            .unwrap(),
        PushSlot::Now
    ));
}

/// An immediate push is claimed by the event that gets it, as a trailing push by its take:
/// never taken while the claim lasts (nor its window forgotten as idle), taken by any node
/// once it runs out without `push_done`; ended by `push_done`; an event folded into the window
/// meanwhile leaves the claim as it is.
pub async fn immediate_push_claims_run_out(b: Arc<dyn Backend>) {
    let n1 = b.open().await;
    let n2 = b.open().await;
    let (c, e) = (new_id(), new_id());
    let (claim, e_claim) = (NewClaim::until(T0 + LEASE), NewClaim::until(T0 + LEASE));
    let token = claim.token;
    let e_token = e_claim.token;
    assert_eq!(n1.push_event(&c, T0, 1000, claim, None).await.unwrap(), PushSlot::Now);
    assert_eq!(n1.push_event(&e, T0, 1000, e_claim, None).await.unwrap(), PushSlot::Now);
    // Folded into the window: the claim stays, and still ends with its token.
    assert_eq!(
        n2.push_event(&e, T0 + 10, 1000, NewClaim::until(T0 + 10 + LEASE), None)
            .await
            .unwrap(),
        PushSlot::Trailing { due_ms: T0 + 1000 }
    );
    assert!(n1.push_done(&e, e_token, None).await.unwrap(), "e's push was sent");
    assert!(n2
        .push_take_due(T0 + 1, T0 + 1 + LEASE, i64::MAX, 100)
        .await
        .unwrap()
        .is_empty());
    // e's trailing push is due; c's push claimed, not done, not yet run out.
    let taken = n2.push_take_due(T0 + 1000, T0 + 1000 + LEASE, 0, 100).await.unwrap();
    assert_eq!(conns_of(&taken), vec![e.clone()]);
    assert_eq!(taken[0].push_id, taken[0].token, "a trailing push is a new push");
    assert_ne!(taken[0].push_id, e_token);
    assert!(n2.push_done(&e, taken[0].token, None).await.unwrap());
    assert!(n2
        .push_take_due(T0 + LEASE - 1, T0 + 2 * LEASE, 0, 100)
        .await
        .unwrap()
        .is_empty());
    // c's node never said it was done: its claim ran out, another node takes the push.
    let again = n2.push_take_due(T0 + LEASE, T0 + 2 * LEASE, 0, 100).await.unwrap();
    assert_eq!(conns_of(&again), vec![c.clone()]);
    assert_eq!(again[0].push_id, token, "the event's push, taken again: its id stays");
    assert_ne!(again[0].token, token);
    assert!(
        !n1.push_done(&c, token, None).await.unwrap(),
        "the first claim was replaced"
    );
    assert!(n2.push_done(&c, again[0].token, None).await.unwrap());
    assert!(n1
        .push_take_due(T0 + 10 * LEASE, T0 + 11 * LEASE, 0, 100)
        .await
        .unwrap()
        .is_empty());
}

/// An event with `unless_pushed_since_ms` goes through the window as any event while the
/// wallet's last push is older, and changes nothing once it is not (another node pushed the
/// wallet for this mail already).
pub async fn push_event_unless_pushed_since(b: Arc<dyn Backend>) {
    let n1 = b.open().await;
    let n2 = b.open().await;
    let c = new_id();
    let since = |t: i64| Some(t);
    // No window yet: nothing says it was pushed.
    assert_eq!(
        n1.push_event(&c, T0, 1000, NewClaim::until(T0 + LEASE), since(T0 - 5))
            .await
            .unwrap(),
        PushSlot::Now
    );
    assert_eq!(
        n2.push_event(&c, T0 + 10, 1000, NewClaim::until(T0 + LEASE), since(T0))
            .await
            .unwrap(),
        PushSlot::PushedSince,
        "pushed at T0"
    );
    // Not even folded: no trailing push scheduled.
    let due = n2.push_take_due(T0 + 1000, T0 + LEASE, 0, 100).await.unwrap();
    assert!(due.iter().all(|p| p.conn != c), "{due:?}");
    let t = T0 + 5000;
    assert_eq!(
        n2.push_event(&c, t, 1000, NewClaim::until(t + LEASE), since(T0 + 1))
            .await
            .unwrap(),
        PushSlot::Now,
        "last pushed before it: as any event"
    );
    assert_eq!(
        n1.push_event(&c, t + 1, 1000, NewClaim::until(t + LEASE), since(t))
            .await
            .unwrap(),
        PushSlot::PushedSince
    );
    // The window still runs from t.
    assert_eq!(
        n1.push_event(&c, t + 2, 1000, NewClaim::until(t + LEASE), None)
            .await
            .unwrap(),
        PushSlot::Trailing { due_ms: t + 1000 }
    );
}

/// Push windows outlive the store's handles (a node's restart): a wallet pushed a moment ago
/// is not pushed again at once, a trailing push scheduled before is still taken when due, and
/// a claim left unended (the node stopped mid-push) is taken again once it runs out.
pub async fn push_windows_survive_a_reopen(b: Arc<dyn Backend>) {
    const WINDOW: i64 = 10_000;
    let (pushed, claimed, deleted) = (new_id(), new_id(), new_id());
    let unended = NewClaim::until(T0 + 5_000);
    {
        let s = b.open().await;
        let gone = NewClaim::until(T0 + 1_000);
        assert_eq!(
            s.push_event(&deleted, T0, WINDOW, gone, None).await.unwrap(),
            PushSlot::Now
        );
        s.delete_connection(&deleted).await.unwrap();
        let claim = NewClaim::until(T0 + 1_000);
        assert_eq!(
            s.push_event(&pushed, T0, WINDOW, claim, None).await.unwrap(),
            PushSlot::Now
        );
        assert!(s.push_done(&pushed, claim.token, None).await.unwrap());
        let later = s
            .push_event(&pushed, T0 + 100, WINDOW, NewClaim::until(T0 + 1_100), None)
            .await
            .unwrap();
        assert_eq!(later, PushSlot::Trailing { due_ms: T0 + WINDOW });
        assert_eq!(
            s.push_event(&claimed, T0, WINDOW, unended, None).await.unwrap(),
            PushSlot::Now
        );
    }
    let s = b.open().await;
    let again = s
        .push_event(&pushed, T0 + 200, WINDOW, NewClaim::until(T0 + 1_200), None)
        .await
        .unwrap();
    assert_eq!(
        again,
        PushSlot::Trailing { due_ms: T0 + WINDOW },
        "pushed again at once"
    );
    let claim = NewClaim::until(T0 + 1_300);
    let fresh = s.push_event(&deleted, T0 + 300, WINDOW, claim, None).await.unwrap();
    assert_eq!(fresh, PushSlot::Now, "the window of a deleted connection came back");
    assert!(s.push_done(&deleted, claim.token, None).await.unwrap());
    assert!(s
        .push_take_due(T0 + 4_999, T0 + 70_000, 0, 10)
        .await
        .unwrap()
        .is_empty());
    let ran_out = s.push_take_due(T0 + 5_000, T0 + 70_000, 0, 10).await.unwrap();
    assert_eq!(
        ran_out.iter().map(|c| &c.conn).collect::<Vec<_>>(),
        vec![&claimed],
        "claim lost"
    );
    assert_eq!(ran_out[0].push_id, unended.token, "the push it names, lost");
    let due = s.push_take_due(T0 + WINDOW, T0 + 70_000, 0, 10).await.unwrap();
    assert_eq!(
        due.iter().map(|c| &c.conn).collect::<Vec<_>>(),
        vec![&pushed],
        "trailing push lost"
    );
    assert!(s.push_done(&pushed, due[0].token, None).await.unwrap());
}
