//! Enqueue: order, durability, limits, dedup across nodes, batches, routed messages, bad input.

use super::*;

pub async fn enqueue_fifo(b: Arc<dyn Backend>) {
    let s = b.open().await;
    let c1 = new_conn(&s).await;
    let c2 = new_conn(&s).await;
    let a = enqueue_ok(&s, vec![msg(&c1, "a1", T0), msg(&c2, "b1", T0), msg(&c1, "a2", T0 + 1)]).await;
    let b2 = enqueue_ok(&s, vec![msg(&c1, "a3", T0 + 2)]).await;
    assert!(a[0] < a[1] && a[1] < a[2] && a[2] < b2[0], "ids increase: {a:?} {b2:?}");
    let got = s.lease(&c1, 10, "o", T0, T0 + 60_000).await.unwrap();
    let payloads: Vec<&[u8]> = got.iter().map(|m| m.payload.as_slice()).collect();
    assert_eq!(payloads, vec![&b"a1"[..], b"a2", b"a3"]);
    assert_eq!(ids(&got), vec![a[0], a[2], b2[0]]);
    assert!(got.iter().all(|m| m.attempts == 1 && m.connection == c1));
    assert_eq!(got[0].recipient_key, format!("rk-{c1}"));
    assert_eq!(got[1].received_at_ms, T0 + 1);
    let got2 = s.lease(&c2, 10, "o", T0, T0 + 60_000).await.unwrap();
    assert_eq!(ids(&got2), vec![a[1]]);
    assert_eq!(s.enqueue(vec![], &EnqueueLimits::UNLIMITED).await.unwrap().len(), 0);
    // Binary payloads come back byte for byte.
    let bin: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
    let m = NewMessage {
        payload: bin.clone(),
        ..msg(&c2, "", T0)
    };
    enqueue_ok(&s, vec![m]).await;
    let got3 = s.lease(&c2, 10, "o", T0, T0 + 60_000).await.unwrap();
    assert_eq!(got3.len(), 1);
    assert_eq!(got3[0].payload, bin);
}

pub async fn durability_across_reopen(b: Arc<dyn Backend>) {
    let (c, first_ids, identity) = {
        let s = b.open().await;
        let identity = s
            .identity_get_or_create(Identity {
                created_at_ms: T0,
                secrets: serde_json::json!({"seed": "abc"}),
            })
            .await
            .unwrap();
        let c = new_conn(&s).await;
        s.update_keys(&c, &["rk-durable".into()], &[]).await.unwrap();
        let mut ids = Vec::new();
        for i in 0..10 {
            ids.extend(enqueue_ok(&s, vec![dmsg(&c, &format!("m{i}"), T0 + i, i as u8)]).await);
        }
        // Leased when the store goes away: deliverable again after the reopen.
        assert_eq!(s.lease(&c, 3, "gone", T0, T0 + 3_600_000).await.unwrap().len(), 3);
        // enqueue returned: durable without any explicit flush.
        (c, ids, identity)
    };
    let s = b.open().await;
    assert_eq!(
        s.identity_get_or_create(Identity {
            created_at_ms: 0,
            secrets: serde_json::json!(null)
        })
        .await
        .unwrap(),
        identity
    );
    assert_eq!(s.get_connection(&c).await.unwrap().unwrap().id, c);
    assert_eq!(s.route("rk-durable").await.unwrap(), Some(c.clone()));
    assert_eq!(s.total_queued().await.unwrap(), 10);
    assert_eq!(
        s.oldest_received_ms().await.unwrap(),
        Some(T0),
        "the first message's arrival"
    );
    // The lease of the old process is released explicitly by its owner on a clean shutdown;
    // a crashed owner's leases run out. Either way the messages come back.
    s.release_owner("gone").await.unwrap();
    let got = s.lease(&c, 100, "o", T0 + 3_600_000, T0 + 3_700_000).await.unwrap();
    assert_eq!(ids(&got), first_ids);
    assert_eq!(got[9].payload, b"m9");
    // Dedup records survive too.
    let limits = EnqueueLimits {
        dedup_window_ms: 60_000,
        ..EnqueueLimits::UNLIMITED
    };
    let r = s.enqueue(vec![dmsg(&c, "m0", T0 + 100, 0)], &limits).await.unwrap();
    assert_eq!(
        r[0].as_ref().unwrap(),
        &Enqueued {
            id: first_ids[0],
            duplicate: true
        }
    );
    // Ids keep growing after a reopen.
    let next = enqueue_ok(&s, vec![msg(&c, "after", T0)]).await;
    assert!(next[0] > *first_ids.last().unwrap());
}

/// Acks, releases, owner releases, leases and expiry racing on the same rows, each taking
/// them in its own order: none fails (no deadlock), and the counts add up.
pub async fn concurrent_writers_on_same_rows(b: Arc<dyn Backend>) {
    let s = b.open().await;
    let c = new_conn(&s).await;
    let all = enqueue_ok(&s, (0..300).map(|i| msg(&c, &format!("{i}"), T0 + i)).collect()).await;
    assert_eq!(s.lease(&c, 300, "A", T0, T0 + 600_000).await.unwrap().len(), 300);
    let acker = {
        let (s, c, all) = (s.clone(), c.clone(), all.clone());
        tokio::spawn(async move {
            let mut acked = 0;
            // Descending chunks: the opposite of every other writer's order.
            for chunk in all.iter().rev().copied().collect::<Vec<_>>().chunks(15) {
                acked += s.ack(&c, chunk).await.unwrap();
            }
            acked
        })
    };
    let releaser = {
        let (s, c, all) = (s.clone(), c.clone(), all.clone());
        tokio::spawn(async move {
            for round in 0..10 {
                let mut ids = all.clone();
                ids.rotate_left(round * 29);
                for chunk in ids.chunks(40) {
                    s.release(&c, chunk, "A").await.unwrap();
                }
            }
        })
    };
    let owner = {
        let (s, c) = (s.clone(), c.clone());
        tokio::spawn(async move {
            for _ in 0..10 {
                s.lease(&c, 100, "A", T0, T0 + 600_000).await.unwrap();
                s.release_owner("A").await.unwrap();
            }
        })
    };
    let expirer = {
        let s = s.clone();
        tokio::spawn(async move {
            let mut expired = 0;
            for i in 0..10 {
                expired += s.expire(T0 + i * 5).await.unwrap();
            }
            expired
        })
    };
    let acked = acker.await.unwrap();
    releaser.await.unwrap();
    owner.await.unwrap();
    let expired = expirer.await.unwrap();
    assert_eq!(s.total_queued().await.unwrap(), 300 - acked - expired);
}

/// Two handles on one store (two nodes: PostgreSQL pools, or the shared sled store) enqueue to
/// one connection at once: the limit and the dedup window hold across them, and ids of the
/// connection still come out of `lease` in FIFO order.
pub async fn limits_and_dedup_hold_across_nodes(b: Arc<dyn Backend>) {
    let n1 = b.open().await;
    let n2 = b.open().await;
    let c = new_conn(&n1).await;
    let lim = EnqueueLimits {
        max_messages: 50,
        max_bytes: u64::MAX,
        dedup_window_ms: 60_000,
    };
    let mut tasks = Vec::new();
    for (node, s) in [n1.clone(), n2.clone()].into_iter().enumerate() {
        for t in 0..8 {
            let (s, c) = (s.clone(), c.clone());
            tasks.push(tokio::spawn(async move {
                let mut ok = 0;
                let mut full = 0;
                for i in 0..10 {
                    // Every task also sends key 7 once: one copy is queued in all.
                    let m = if i == 0 {
                        dmsg(&c, "dup", T0, 7)
                    } else {
                        msg(&c, &format!("{node}-{t}-{i}"), T0)
                    };
                    match &s.enqueue(vec![m], &lim).await.unwrap()[0] {
                        Ok(e) if !e.duplicate => ok += 1,
                        Ok(_) => {}
                        Err(StoreError::QueueFull { .. }) => full += 1,
                        Err(e) => panic!("{e}"),
                    }
                }
                (ok, full)
            }));
        }
    }
    let (mut ok, mut full) = (0, 0);
    for t in tasks {
        let (o, f) = t.await.unwrap();
        ok += o;
        full += f;
    }
    assert_eq!(ok, 50, "exactly the limit was queued");
    assert_eq!(s_total(&n2).await, 50);
    assert!(full > 0);
    let leased = n2.lease(&c, 100, "o", T0, T0 + 1000).await.unwrap();
    let got = ids(&leased);
    let mut sorted = got.clone();
    sorted.sort_unstable();
    assert_eq!(got, sorted);
    let dups = leased.iter().filter(|m| m.payload == b"dup").count();
    assert!(dups <= 1, "the deduplicated message was queued {dups} times");
}

async fn s_total(s: &Arc<dyn Store>) -> u64 {
    s.total_queued().await.unwrap()
}

pub async fn queue_limits(b: Arc<dyn Backend>) {
    let s = b.open().await;
    let c = new_conn(&s).await;
    let other = new_conn(&s).await;
    let lim = EnqueueLimits {
        max_messages: 3,
        max_bytes: u64::MAX,
        dedup_window_ms: 0,
    };
    let r = s
        .enqueue((0..5).map(|i| msg(&c, &format!("m{i}"), T0)).collect(), &lim)
        .await
        .unwrap();
    assert!(r[..3].iter().all(|r| r.is_ok()));
    for e in &r[3..] {
        assert!(matches!(e, Err(StoreError::QueueFull { pending: 3, .. })), "{e:?}");
    }
    let r = s
        .enqueue(vec![msg(&c, "late", T0), msg(&other, "o", T0)], &lim)
        .await
        .unwrap();
    assert!(
        matches!(r[0], Err(StoreError::QueueFull { pending: 3, bytes: 6 })),
        "{:?}",
        r[0]
    );
    assert!(r[1].is_ok(), "another connection is not affected");
    // Nothing already queued was dropped; leased messages still count.
    let l = s.lease(&c, 10, "A", T0, T0 + 1000).await.unwrap();
    let payloads: Vec<&[u8]> = l.iter().map(|m| m.payload.as_slice()).collect();
    assert_eq!(payloads, vec![&b"m0"[..], b"m1", b"m2"]);
    assert!(s.enqueue(vec![msg(&c, "x", T0)], &lim).await.unwrap()[0].is_err());
    assert_eq!(s.ack(&c, &[l[0].id]).await.unwrap(), 1);
    assert!(s.enqueue(vec![msg(&c, "x", T0)], &lim).await.unwrap()[0].is_ok());

    // Byte limit: refused when the message would go over it.
    let c2 = new_conn(&s).await;
    let lim = EnqueueLimits {
        max_messages: u64::MAX,
        max_bytes: 100,
        dedup_window_ms: 0,
    };
    let p = |n: usize| "z".repeat(n);
    let r = s.enqueue(vec![msg(&c2, &p(60), T0)], &lim).await.unwrap();
    assert!(r[0].is_ok());
    let r = s.enqueue(vec![msg(&c2, &p(50), T0)], &lim).await.unwrap();
    assert!(
        matches!(r[0], Err(StoreError::QueueFull { pending: 1, bytes: 60 })),
        "{:?}",
        r[0]
    );
    let r = s.enqueue(vec![msg(&c2, &p(40), T0)], &lim).await.unwrap();
    assert!(r[0].is_ok(), "exactly at the limit is accepted");
    let st = s.queue_stats(&c2, T0).await.unwrap();
    assert_eq!((st.pending, st.bytes), (2, 100));
}

/// One batch (one call, and forwards arriving at once from many callers) is decided message
/// by message in input order: dedup within the batch and against earlier batches, the limits
/// of each connection counting what the batch already queued for it, and a message refused by
/// a limit refusing only itself.
pub async fn batch_decides_each_message_in_order(b: Arc<dyn Backend>) {
    let s = b.open().await;
    let a = new_conn(&s).await;
    let other = new_conn(&s).await;
    let lim = EnqueueLimits {
        max_messages: 3,
        max_bytes: 100,
        dedup_window_ms: 60_000,
    };
    let p = |n: usize| "z".repeat(n);
    let r = s
        .enqueue(
            vec![
                dmsg(&a, &p(10), T0, 1),     // 0: queued
                dmsg(&a, &p(10), T0 + 1, 1), // 1: duplicate of 0, in the same batch
                msg(&other, &p(90), T0),     // 2: queued (its own connection's limits)
                msg(&a, &p(95), T0),         // 3: over a's bytes (10 + 95 > 100): refused alone
                dmsg(&other, &p(10), T0, 1), // 4: same dedup key, other connection: queued
                msg(&a, &p(10), T0),         // 5: queued: the refused 3 does not count
                msg(&a, &p(10), T0),         // 6: queued: a holds 3 now
                msg(&a, &p(1), T0),          // 7: over a's count
            ],
            &lim,
        )
        .await
        .unwrap();
    let e = |i: usize| -> Enqueued { *r[i].as_ref().unwrap_or_else(|e| panic!("message {i}: {e:?}")) };
    assert!(!e(0).duplicate);
    assert_eq!(
        e(1),
        Enqueued {
            id: e(0).id,
            duplicate: true
        }
    );
    assert!(!e(2).duplicate && !e(4).duplicate && !e(5).duplicate && !e(6).duplicate);
    assert!(
        matches!(r[3], Err(StoreError::QueueFull { pending: 1, bytes: 10 })),
        "{:?}",
        r[3]
    );
    assert!(
        matches!(r[7], Err(StoreError::QueueFull { pending: 3, bytes: 30 })),
        "{:?}",
        r[7]
    );
    let ids_a = [e(0).id, e(5).id, e(6).id];
    assert!(
        ids_a.windows(2).all(|w| w[0] < w[1]),
        "ids follow input order: {ids_a:?}"
    );
    let st = s.queue_stats(&a, T0).await.unwrap();
    assert_eq!((st.pending, st.bytes), (3, 30));
    let st = s.queue_stats(&other, T0).await.unwrap();
    assert_eq!((st.pending, st.bytes), (2, 100));

    // A later batch: the duplicate is answered although a is full; a new message is refused.
    let r = s
        .enqueue(vec![dmsg(&a, &p(10), T0 + 2, 1), msg(&a, &p(1), T0)], &lim)
        .await
        .unwrap();
    assert_eq!(
        *r[0].as_ref().unwrap(),
        Enqueued {
            id: e(0).id,
            duplicate: true
        }
    );
    assert!(
        matches!(r[1], Err(StoreError::QueueFull { pending: 3, .. })),
        "{:?}",
        r[1]
    );

    // Forwards arriving at once from many callers (one batch or several): the limit holds per
    // connection, one copy of a payload is queued, and the others are unaffected.
    let c = new_conn(&s).await;
    let d = new_conn(&s).await;
    let e = new_conn(&s).await;
    let lim = EnqueueLimits {
        max_messages: 5,
        max_bytes: u64::MAX,
        dedup_window_ms: 60_000,
    };
    let mut msgs = Vec::new();
    for i in 0..8 {
        msgs.push(msg(&c, &format!("c{i}"), T0)); // 5 fit
        msgs.push(dmsg(&e, "same", T0, 9)); // one copy
        if i < 4 {
            msgs.push(msg(&d, &format!("d{i}"), T0)); // all fit
        }
    }
    let tasks: Vec<_> = msgs
        .into_iter()
        .map(|m| {
            let s = s.clone();
            let conn = m.connection.clone();
            tokio::spawn(async move { (conn, s.enqueue(vec![m], &lim).await.unwrap().remove(0)) })
        })
        .collect();
    let mut outcomes: Vec<(String, StoreResult<Enqueued>)> = Vec::new();
    for t in tasks {
        outcomes.push(t.await.unwrap());
    }
    let of = |conn: &str| -> Vec<&StoreResult<Enqueued>> {
        outcomes.iter().filter(|(c, _)| c == conn).map(|(_, r)| r).collect()
    };
    let full = |r: &&&StoreResult<Enqueued>| matches!(r, Err(StoreError::QueueFull { pending: 5, .. }));
    assert_eq!(of(&c).iter().filter(|r| r.is_ok()).count(), 5, "{:?}", of(&c));
    assert_eq!(of(&c).iter().filter(full).count(), 3, "{:?}", of(&c));
    assert!(
        of(&d).iter().all(|r| matches!(r, Ok(e) if !e.duplicate)),
        "{:?}",
        of(&d)
    );
    let same: Vec<Enqueued> = of(&e).iter().map(|r| *r.as_ref().unwrap()).collect();
    assert_eq!(same.iter().filter(|e| !e.duplicate).count(), 1, "{same:?}");
    assert!(same.iter().all(|x| x.id == same[0].id), "{same:?}");
    assert_eq!(s.queue_stats(&c, T0).await.unwrap().pending, 5);
    assert_eq!(s.queue_stats(&d, T0).await.unwrap().pending, 4);
    assert_eq!(s.queue_stats(&e, T0).await.unwrap().pending, 1);
}

/// `enqueue_routed` queues only while the recipient key routes to the message's connection:
/// a key removed or moved since the route was read (a stale cache) queues nothing for the
/// connection that no longer holds it.
pub async fn routed_enqueue_checks_the_route(b: Arc<dyn Backend>) {
    let s = b.open().await;
    let c = new_conn(&s).await;
    let d = new_conn(&s).await;
    let k = format!("key-{}", new_id());
    let rmsg = |conn: &str, p: &str| NewMessage {
        recipient_key: k.clone(),
        ..msg(conn, p, T0)
    };
    s.update_keys(&c, std::slice::from_ref(&k), &[]).await.unwrap();
    let lim = EnqueueLimits::UNLIMITED;
    let r = s
        .enqueue_routed(vec![rmsg(&c, "m1"), msg(&c, "no key", T0), rmsg(&d, "not d's")], &lim)
        .await
        .unwrap();
    assert!(r[0].is_ok(), "{:?}", r[0]);
    assert!(matches!(r[1], Err(StoreError::NoRoute)), "{:?}", r[1]);
    assert!(matches!(r[2], Err(StoreError::NoRoute)), "{:?}", r[2]);
    // Plain enqueue does not look at routes.
    assert!(s.enqueue(vec![msg(&c, "no key", T0)], &lim).await.unwrap()[0].is_ok());

    s.update_keys(&c, &[], std::slice::from_ref(&k)).await.unwrap();
    let r = s.enqueue_routed(vec![rmsg(&c, "after removal")], &lim).await.unwrap();
    assert!(matches!(r[0], Err(StoreError::NoRoute)), "{:?}", r[0]);
    assert_eq!(s.queue_stats(&c, T0).await.unwrap().pending, 2, "nothing queued for c");

    // Moved to d: queued for d only.
    s.update_keys(&d, std::slice::from_ref(&k), &[]).await.unwrap();
    let r = s
        .enqueue_routed(vec![rmsg(&c, "stale"), rmsg(&d, "fresh")], &lim)
        .await
        .unwrap();
    assert!(matches!(r[0], Err(StoreError::NoRoute)), "{:?}", r[0]);
    assert!(r[1].is_ok(), "{:?}", r[1]);
    assert_eq!(s.queue_stats(&c, T0).await.unwrap().pending, 2);
    assert_eq!(s.queue_stats(&d, T0).await.unwrap().pending, 1);
}

/// A connection whose mediation was revoked (`Denied`) takes no routed message, even while its
/// routing keys are still registered (a forward that arrives between a revocation and the
/// removal of the keys, or a revocation whose key removal failed): `enqueue_routed` answers
/// `NoRoute`, as for a key nobody registered, and queues nothing; the sender is never told a
/// message is queued that pickup will never hand out. Other connections of the batch are not
/// affected, and what a connection's label or extra data say does not count: its mediation does.
pub async fn a_denied_connection_takes_no_routed_message(b: Arc<dyn Backend>) {
    let s = b.open().await;
    let (c, d) = (new_conn(&s).await, new_conn(&s).await);
    let (kc, kd) = (format!("key-{}", new_id()), format!("key-{}", new_id()));
    s.update_keys(&c, std::slice::from_ref(&kc), &[]).await.unwrap();
    s.update_keys(&d, std::slice::from_ref(&kd), &[]).await.unwrap();
    let rmsg = |conn: &str, key: &str, p: &str, dedup: u8| NewMessage {
        recipient_key: key.to_owned(),
        ..dmsg(conn, p, T0, dedup)
    };
    let lim = EnqueueLimits {
        dedup_window_ms: 60_000,
        ..EnqueueLimits::UNLIMITED
    };
    let r = s.enqueue_routed(vec![rmsg(&c, &kc, "before", 1)], &lim).await.unwrap();
    assert!(r[0].is_ok(), "{:?}", r[0]);
    // Looked up (and cached, on a node's stack) before the revocation.
    assert_eq!(s.route(&kc).await.unwrap(), Some(c.clone()));

    let deny = ConnectionPatch {
        mediation: Some(MediationState::Denied),
        updated_at_ms: T0,
        ..ConnectionPatch::default()
    };
    assert!(s.update_connection(&c, &deny).await.unwrap().is_some());
    assert_eq!(
        s.keys_of(&c).await.unwrap(),
        vec![kc.clone()],
        "the key is still registered"
    );
    for _ in 0..2 {
        let r = s
            .enqueue_routed(
                vec![
                    rmsg(&c, &kc, "after", 2),
                    rmsg(&d, &kd, "for d", 3),
                    // A retry of what was queued before: the route is checked before dedup.
                    rmsg(&c, &kc, "before", 1),
                ],
                &lim,
            )
            .await
            .unwrap();
        assert!(matches!(r[0], Err(StoreError::NoRoute)), "{:?}", r[0]);
        assert!(r[1].is_ok(), "{:?}", r[1]);
        assert!(matches!(r[2], Err(StoreError::NoRoute)), "{:?}", r[2]);
    }
    // Before the limits too: a full queue answers NoRoute, not QueueFull.
    let full = EnqueueLimits { max_messages: 1, ..lim };
    let r = s.enqueue_routed(vec![rmsg(&c, &kc, "full", 4)], &full).await.unwrap();
    assert!(matches!(r[0], Err(StoreError::NoRoute)), "{:?}", r[0]);
    assert_eq!(
        s.queue_stats(&c, T0).await.unwrap().pending,
        1,
        "nothing queued after the revocation"
    );
    assert_eq!(s.queue_stats(&d, T0).await.unwrap().pending, 1);

    // What the connection's own fields say is not its mediation: a label and extra data that
    // read `"mediation":"Denied"` (and hold a NUL, which PostgreSQL's JSON types refuse) on a
    // granted connection are routed; the same connection denied is not.
    let mut t = conn(&new_id());
    t.mediation = MediationState::Granted;
    t.label = Some("\"mediation\":\"Denied\" \0 \\\"mediation\":\"Denied\"".into());
    t.extra = serde_json::json!({"mediation": "Denied", "nul": "\0", "x\"mediation": "Denied"});
    s.put_connection(&t).await.unwrap();
    let kt = format!("key-{}", new_id());
    s.update_keys(&t.id, std::slice::from_ref(&kt), &[]).await.unwrap();
    let r = s
        .enqueue_routed(vec![rmsg(&t.id, &kt, "granted", 5)], &lim)
        .await
        .unwrap();
    assert!(r[0].is_ok(), "{:?}", r[0]);
    assert!(s.update_connection(&t.id, &deny).await.unwrap().is_some());
    let r = s
        .enqueue_routed(vec![rmsg(&t.id, &kt, "denied", 6)], &lim)
        .await
        .unwrap();
    assert!(matches!(r[0], Err(StoreError::NoRoute)), "{:?}", r[0]);

    // Durable: a reopened store (or another node) refuses it too.
    drop(s);
    let s = b.open().await;
    let r = s
        .enqueue_routed(
            vec![rmsg(&c, &kc, "reopened", 7), rmsg(&t.id, &kt, "reopened", 8)],
            &lim,
        )
        .await
        .unwrap();
    assert!(matches!(r[0], Err(StoreError::NoRoute)), "{:?}", r[0]);
    assert!(matches!(r[1], Err(StoreError::NoRoute)), "{:?}", r[1]);
    assert_eq!(s.queue_stats(&c, T0).await.unwrap().pending, 1);
    assert_eq!(s.queue_stats(&t.id, T0).await.unwrap().pending, 1);
}

/// Input no backend can hold (a NUL from the network, an oversized key) is refused for itself
/// only: other messages of the same batch, and of concurrent callers, are queued.
pub async fn unstorable_input_is_refused_alone(b: Arc<dyn Backend>) {
    let s = b.open().await;
    let c = new_conn(&s).await;
    let bad_key = NewMessage {
        recipient_key: "k\0ey".into(),
        ..msg(&c, "x", T0)
    };
    let long = "k".repeat(MAX_TEXT_LEN + 1);
    // Queued already leased (the live path) to an owner no backend can hold.
    let bad_owner = NewMessage {
        lease: Some(LeaseTo {
            owner: "ow\0ner".into(),
            until_ms: T0 + 60_000,
        }),
        ..msg(&c, "z", T0)
    };
    let (r1, r2) = tokio::join!(
        s.enqueue(
            vec![
                msg(&c, "ok1", T0),
                bad_key,
                msg("con\0n", "y", T0),
                msg(&c, "ok2", T0),
                bad_owner
            ],
            &EnqueueLimits::UNLIMITED
        ),
        s.enqueue(vec![msg(&c, "ok3", T0)], &EnqueueLimits::UNLIMITED)
    );
    let r1 = r1.unwrap();
    assert!(r1[0].is_ok() && r1[3].is_ok() && r2.unwrap()[0].is_ok(), "{r1:?}");
    assert!(matches!(r1[1], Err(StoreError::Invalid(_))), "{:?}", r1[1]);
    assert!(matches!(r1[2], Err(StoreError::Invalid(_))), "{:?}", r1[2]);
    assert!(matches!(r1[4], Err(StoreError::Invalid(_))), "{:?}", r1[4]);
    assert_eq!(s.queue_stats(&c, T0).await.unwrap().pending, 3);
    assert_eq!(s.queue_stats(&c, T0).await.unwrap().leased, 0);

    assert!(matches!(
        s.update_keys(&c, &["good".into(), "b\0d".into()], &[]).await,
        Err(StoreError::Invalid(_))
    ));
    assert!(matches!(
        s.update_keys(&c, std::slice::from_ref(&long), &[]).await,
        Err(StoreError::Invalid(_))
    ));
    assert_eq!(s.route("good").await.unwrap(), None, "a refused call changes nothing");
    let mut bad = conn(&new_id());
    bad.their_verkeys.push("v\0k".into());
    assert!(matches!(s.put_connection(&bad).await, Err(StoreError::Invalid(_))));
    assert!(s.get_connection(&bad.id).await.unwrap().is_none());
    // Lookups of such input find nothing instead of failing.
    assert_eq!(s.route("b\0d").await.unwrap(), None);
    assert_eq!(s.route(&long).await.unwrap(), None);
    assert!(s.get_connection("a\0").await.unwrap().is_none());
    assert!(s.connection_by_their_verkey("v\0k").await.unwrap().is_none());
    assert!(s.connection_by_thread("t\0").await.unwrap().is_none());
    assert!(s.keys_of("c\0").await.unwrap().is_empty());
    assert!(s.lease("c\0", 10, "o", T0, T0 + 1).await.unwrap().is_empty());
    assert_eq!(s.ack("c\0", &[1]).await.unwrap(), 0);
    assert_eq!(s.release("c\0", &[1], "o").await.unwrap(), 0);
    assert_eq!(s.release_owner("o\0").await.unwrap(), 0);
    assert_eq!(s.queue_stats("c\0", T0).await.unwrap(), QueueStats::default());
    assert_eq!(s.list_connections(Some("\0"), 10).await.unwrap().len(), 1);
}

/// Many tasks, each enqueueing one small message per call: the figure shows whether their
/// flushes are shared. Printed, not asserted (it depends on the machine and build).
pub async fn group_commit_throughput(b: Arc<dyn Backend>) {
    let s = b.open().await;
    let tasks_n = 64;
    let per_task = 100;
    let conns: Vec<String> = {
        let mut v = Vec::new();
        for _ in 0..8 {
            v.push(new_conn(&s).await);
        }
        v
    };
    let start = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..tasks_n {
        let s = s.clone();
        let c = conns[t % conns.len()].clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..per_task {
                let payload = format!("{{\"protected\":\"x\",\"ciphertext\":\"{t}-{i}\"}}");
                let r = s.enqueue(vec![msg(&c, &payload, T0)], &EnqueueLimits::UNLIMITED);
                r.await.unwrap()[0].as_ref().unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let dt = start.elapsed();
    let n = (tasks_n * per_task) as u64;
    assert_eq!(s.total_queued().await.unwrap(), n);
    println!(
        "group commit [{}]: {n} messages from {tasks_n} concurrent tasks in {:.3}s = {:.0} msg/s",
        s.backend(),
        dt.as_secs_f64(),
        n as f64 / dt.as_secs_f64()
    );
}
