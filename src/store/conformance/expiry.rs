//! Dedup windows and their records, expiry of old messages and of senders' deadlines.

use super::*;

pub async fn dedup_window(b: Arc<dyn Backend>) {
    let s = b.open().await;
    let c = new_conn(&s).await;
    let c2 = new_conn(&s).await;
    let lim = EnqueueLimits {
        max_messages: u64::MAX,
        max_bytes: u64::MAX,
        dedup_window_ms: 1000,
    };
    let r = s.enqueue(vec![dmsg(&c, "a", T0, 1)], &lim).await.unwrap();
    let first = *r[0].as_ref().unwrap();
    assert!(!first.duplicate);
    let r = s
        .enqueue(
            vec![
                dmsg(&c, "a", T0 + 500, 1),
                dmsg(&c2, "a", T0 + 500, 1),
                dmsg(&c, "b", T0 + 500, 2),
                dmsg(&c, "b", T0 + 501, 2),
                msg(&c, "no key", T0 + 502),
                msg(&c, "no key", T0 + 502),
            ],
            &lim,
        )
        .await
        .unwrap();
    let r: Vec<Enqueued> = r.into_iter().map(|r| r.unwrap()).collect();
    assert_eq!(
        r[0],
        Enqueued {
            id: first.id,
            duplicate: true
        }
    );
    assert!(!r[1].duplicate, "dedup is per connection");
    assert!(!r[2].duplicate);
    assert_eq!(
        r[3],
        Enqueued {
            id: r[2].id,
            duplicate: true
        },
        "dedup within one call"
    );
    assert!(!r[4].duplicate && !r[5].duplicate && r[4].id != r[5].id);
    assert_eq!(s.queue_stats(&c, T0).await.unwrap().pending, 4);

    // Concurrent callers with the same key: one message queued.
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let s = s.clone();
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            s.enqueue(vec![dmsg(&c, "r", T0 + 600, 3)], &lim).await.unwrap()[0]
                .as_ref()
                .copied()
                .unwrap()
        }));
    }
    let mut outs = Vec::new();
    for t in tasks {
        outs.push(t.await.unwrap());
    }
    assert_eq!(outs.iter().filter(|e| !e.duplicate).count(), 1);
    assert!(outs.iter().all(|e| e.id == outs[0].id));

    // Acknowledged, then sent again within the window: still a duplicate.
    s.lease(&c, 100, "A", T0, T0 + 10).await.unwrap();
    assert_eq!(s.ack(&c, &[first.id]).await.unwrap(), 1);
    let r = s.enqueue(vec![dmsg(&c, "a", T0 + 900, 1)], &lim).await.unwrap();
    assert_eq!(
        *r[0].as_ref().unwrap(),
        Enqueued {
            id: first.id,
            duplicate: true
        }
    );
    // Outside the window: queued again.
    let r = s.enqueue(vec![dmsg(&c, "a", T0 + 1001, 1)], &lim).await.unwrap();
    let again = *r[0].as_ref().unwrap();
    assert!(!again.duplicate && again.id > first.id);
    // A window of 0 disables dedup.
    let r = s
        .enqueue(vec![dmsg(&c, "a", T0 + 1001, 1)], &EnqueueLimits::UNLIMITED)
        .await
        .unwrap();
    let latest = *r[0].as_ref().unwrap();
    assert!(!latest.duplicate && latest.id > again.id);
    // A duplicate is answered even when the queue is full; it names the latest copy.
    let full = EnqueueLimits { max_messages: 0, ..lim };
    let r = s.enqueue(vec![dmsg(&c, "a", T0 + 1002, 1)], &full).await.unwrap();
    assert_eq!(
        *r[0].as_ref().unwrap(),
        Enqueued {
            id: latest.id,
            duplicate: true
        }
    );
}

/// Dedup records go once their window has passed (not with message expiry, 30 days later):
/// one per forward would otherwise grow with traffic. Pruning is bounded per call.
pub async fn dedup_records_are_pruned(b: Arc<dyn Backend>) {
    let s = b.open().await;
    let c = new_conn(&s).await;
    let lim = EnqueueLimits {
        max_messages: u64::MAX,
        max_bytes: u64::MAX,
        dedup_window_ms: 1000,
    };
    for i in 0..5u8 {
        s.enqueue(vec![dmsg(&c, "x", T0 + i64::from(i), i)], &lim)
            .await
            .unwrap();
    }
    // A later copy of key 0, outside its window, replaces its record.
    let r = s.enqueue(vec![dmsg(&c, "x", T0 + 2000, 0)], &lim).await.unwrap();
    assert!(!r[0].as_ref().unwrap().duplicate);
    assert_eq!(s.dedup_records().await.unwrap(), 5);
    // Acknowledged messages keep their records (a retry is still a duplicate).
    let all = s.lease(&c, 100, "A", T0, T0 + 10).await.unwrap();
    s.ack(&c, &ids(&all)).await.unwrap();
    assert_eq!(s.dedup_records().await.unwrap(), 5);
    assert_eq!(s.prune_dedup(T0 + 1000, 2).await.unwrap(), 2, "bounded per call");
    assert_eq!(s.prune_dedup(T0 + 1000, 10).await.unwrap(), 2);
    assert_eq!(s.prune_dedup(T0 + 1000, 10).await.unwrap(), 0);
    assert_eq!(
        s.dedup_records().await.unwrap(),
        1,
        "the replaced record of key 0 stays"
    );
    let r = s.enqueue(vec![dmsg(&c, "x", T0 + 2500, 0)], &lim).await.unwrap();
    assert!(
        r[0].as_ref().unwrap().duplicate,
        "a record within its window still dedups"
    );
    assert_eq!(s.prune_dedup(T0 + 10_000, 10).await.unwrap(), 1);
    assert_eq!(s.dedup_records().await.unwrap(), 0);
}

/// A message's dedup entry outlives the message for its window, whichever way the message
/// left the queue (acknowledged, expired by its sender, dropped by an operator), across a
/// reopen; a pruned entry does not come back with it.
pub async fn dedup_outlives_its_message_across_reopen(b: Arc<dyn Backend>) {
    let lim = EnqueueLimits {
        dedup_window_ms: 60_000,
        ..EnqueueLimits::UNLIMITED
    };
    let (c, c2, c3, acked, expired, dropped) = {
        let s = b.open().await;
        let c = new_conn(&s).await;
        let c2 = new_conn(&s).await;
        let c3 = new_conn(&s).await;
        // Keys 5 (acknowledged) and 6 (still queued) arrive first, 30 s before the others.
        s.enqueue(vec![dmsg(&c, "old", T0 - 30_000, 5)], &lim).await.unwrap();
        s.enqueue(vec![dmsg(&c3, "old", T0 - 30_000, 6)], &lim).await.unwrap();
        let mut first = Vec::new();
        for (conn, key, expires) in [(&c, 1u8, None), (&c, 2, Some(T0 + 10)), (&c2, 3, None), (&c, 4, None)] {
            let m = NewMessage {
                expires_at_ms: expires,
                ..dmsg(conn, "m", T0, key)
            };
            let r = s.enqueue(vec![m], &lim).await.unwrap();
            first.push(r[0].as_ref().unwrap().id);
        }
        let got = s.lease(&c, 10, "o", T0, T0 + 1_000).await.unwrap();
        let acked: Vec<MessageId> = got.iter().map(|m| m.id).filter(|id| *id != first[1]).collect();
        assert_eq!(
            acked.len(),
            3,
            "keys 1, 4 and 5 of c (key 2 is leased too but not acked)"
        );
        assert_eq!(s.ack(&c, &acked).await.unwrap(), 3);
        assert_eq!(s.expire_due(T0 + 20, 100).await.unwrap(), 1);
        assert_eq!(s.drop_queue(&c2).await.unwrap(), 1);
        // The entries of keys 5 and 6 go, the others' stay.
        assert_eq!(s.prune_dedup(T0 - 1, 100).await.unwrap(), 2);
        assert_eq!(s.total_queued().await.unwrap(), 1, "key 6's message");
        (c, c2, c3, first[0], first[1], first[2])
    };
    let s = b.open().await;
    for (conn, key, id) in [(&c, 1u8, acked), (&c, 2, expired), (&c2, 3, dropped)] {
        let r = s.enqueue(vec![dmsg(conn, "m", T0 + 100, key)], &lim).await.unwrap();
        assert_eq!(
            *r[0].as_ref().unwrap(),
            Enqueued { id, duplicate: true },
            "key {key}: sent again within its window after a reopen"
        );
    }
    for (conn, key) in [(&c, 5u8), (&c3, 6)] {
        let r = s.enqueue(vec![dmsg(conn, "old", T0 + 100, key)], &lim).await.unwrap();
        assert!(
            !r[0].as_ref().unwrap().duplicate,
            "key {key}: a pruned entry stays pruned after a reopen"
        );
    }
    assert_eq!(s.total_queued().await.unwrap(), 3);
}

pub async fn expire_old_messages(b: Arc<dyn Backend>) {
    let s = b.open().await;
    let c1 = new_conn(&s).await;
    let c2 = new_conn(&s).await;
    let lim = EnqueueLimits {
        dedup_window_ms: i64::MAX / 4,
        ..EnqueueLimits::UNLIMITED
    };
    let r = s
        .enqueue(
            vec![
                dmsg(&c1, "old", T0 + 100, 9),
                msg(&c2, "old2", T0 + 200),
                msg(&c1, "new", T0 + 300),
            ],
            &lim,
        )
        .await
        .unwrap();
    let keep = r[2].as_ref().unwrap().id;
    s.lease(&c2, 10, "A", T0, T0 + 10_000).await.unwrap();
    assert_eq!(s.expire(T0 + 250).await.unwrap(), 2, "leased or not");
    assert_eq!(s.expire(T0 + 250).await.unwrap(), 0);
    assert_eq!(s.total_queued().await.unwrap(), 1);
    assert_eq!(s.queue_stats(&c2, T0).await.unwrap(), QueueStats::default());
    let l = s.lease(&c1, 10, "A", T0, T0 + 10_000).await.unwrap();
    assert_eq!(ids(&l), vec![keep]);
    // The expired message's dedup record went with it.
    let r = s.enqueue(vec![dmsg(&c1, "old", T0 + 400, 9)], &lim).await.unwrap();
    assert!(!r[0].as_ref().unwrap().duplicate);
}

/// A message past the sender's expiry is never leased (pending or with a lease that ran out),
/// counts as neither pending nor leased, and `expire_due` deletes it, earliest first, bounded;
/// the sender's expiry survives a reopen.
pub async fn sender_expiry(b: Arc<dyn Backend>) {
    let exp = |conn: &str, p: &str, at: i64, until: i64| NewMessage {
        expires_at_ms: Some(until),
        lease: None,
        ..msg(conn, p, at)
    };
    let (c1, c2, keep, late) = {
        let s = b.open().await;
        let c1 = new_conn(&s).await;
        let c2 = new_conn(&s).await;
        let id = enqueue_ok(
            &s,
            vec![
                exp(&c1, "soon", T0, T0 + 100),
                msg(&c1, "keep", T0),
                exp(&c2, "leased", T0, T0 + 200),
                exp(&c1, "late", T0, T0 + 10_000),
            ],
        )
        .await;
        // Leased before its expiry, never again after it.
        assert_eq!(ids(&s.lease(&c2, 10, "A", T0, T0 + 50).await.unwrap()), vec![id[2]]);
        s.flush().await.unwrap();
        (c1, c2, id[1], id[3])
    };
    let s = b.open().await;
    let now = T0 + 300;
    assert!(s.lease(&c2, 10, "B", now, now + 1000).await.unwrap().is_empty());
    assert!(s
        .lease_for_key(&c1, &format!("rk-{c1}"), 10, "B", T0 + 150, T0 + 151)
        .await
        .unwrap()
        .iter()
        .all(|m| m.payload != b"soon"));
    s.release_owner("B").await.unwrap();
    let st = s.queue_stats(&c1, now).await.unwrap();
    assert_eq!(
        (st.pending, st.leased),
        (2, 0),
        "the expired one is not pending: {st:?}"
    );
    assert_eq!(
        s.pending_stats(&c1, Some(&format!("rk-{c1}")), now)
            .await
            .unwrap()
            .count,
        2
    );
    assert_eq!(s.queue_stats(&c2, now).await.unwrap().pending, 0);
    assert!(s
        .pending_among(std::slice::from_ref(&c2), now)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        s.connections_with_pending(now, None, 10).await.unwrap(),
        vec![c1.clone()]
    );
    // Earliest first, bounded, then nothing more is due.
    assert_eq!(s.expire_due(now, 1).await.unwrap(), 1);
    assert_eq!(s.total_queued().await.unwrap(), 3);
    assert_eq!(s.expire_due(now, 10).await.unwrap(), 1);
    assert_eq!(s.expire_due(now, 10).await.unwrap(), 0);
    assert_eq!(s.total_queued().await.unwrap(), 2);
    assert_eq!(s.queue_stats(&c2, now).await.unwrap(), QueueStats::default());
    let got = s.lease(&c1, 10, "C", now, now + 1000).await.unwrap();
    assert_eq!(ids(&got), vec![keep, late]);
    // Acknowledged before its expiry: nothing left to expire.
    s.ack(&c1, &[late]).await.unwrap();
    assert_eq!(s.expire_due(T0 + 20_000, 10).await.unwrap(), 0);
    assert_eq!(s.total_queued().await.unwrap(), 1);
}
