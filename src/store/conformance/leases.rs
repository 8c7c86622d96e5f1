//! Leases, acknowledgements and releases, pending counts and the sweep's view.

use super::*;

pub async fn lease_ack_release(b: Arc<dyn Backend>) {
    let s = b.open().await;
    let c = new_conn(&s).await;
    let m: Vec<NewMessage> = (0..5).map(|i| msg(&c, &format!("p{i}"), T0 + i)).collect();
    let id = enqueue_ok(&s, m).await;
    let until = T0 + 30_000;
    let l1 = s.lease(&c, 2, "A", T0, until).await.unwrap();
    assert_eq!(ids(&l1), id[0..2].to_vec());
    let l2 = s.lease(&c, 10, "A", T0, until).await.unwrap();
    assert_eq!(ids(&l2), id[2..5].to_vec());
    assert!(s.lease(&c, 10, "B", T0 + 1, until).await.unwrap().is_empty());
    let st = s.queue_stats(&c, T0 + 1).await.unwrap();
    assert_eq!((st.pending, st.leased), (0, 5));

    assert_eq!(s.ack(&c, &[id[0]]).await.unwrap(), 1);
    assert_eq!(s.ack(&c, &[id[0]]).await.unwrap(), 0, "ack twice deletes once");
    assert_eq!(
        s.release(&c, &[id[1]], "B").await.unwrap(),
        0,
        "only the lease owner releases"
    );
    assert_eq!(s.release(&c, &[id[1]], "A").await.unwrap(), 1);
    let l3 = s.lease(&c, 10, "B", T0 + 2, until).await.unwrap();
    assert_eq!(ids(&l3), vec![id[1]]);
    assert_eq!(l3[0].attempts, 2, "a released message is a redelivery");
    // A's leases (ids 2..5, and one on another connection) go back; B's lease of id 1 stays.
    let c2 = new_conn(&s).await;
    enqueue_ok(&s, vec![msg(&c2, "other", T0)]).await;
    assert_eq!(s.lease(&c2, 10, "A", T0, until).await.unwrap().len(), 1);
    assert_eq!(s.release_owner("A").await.unwrap(), 4);
    assert_eq!(s.queue_stats(&c2, T0 + 3).await.unwrap().pending, 1);
    let st = s.queue_stats(&c, T0 + 3).await.unwrap();
    assert_eq!((st.pending, st.leased), (3, 1));
    let l4 = s.lease(&c, 10, "C", T0 + 3, until).await.unwrap();
    assert_eq!(ids(&l4), id[2..5].to_vec());
    assert!(l4.iter().all(|m| m.attempts == 2));
    assert_eq!(s.ack(&c, &id).await.unwrap(), 4);
    assert_eq!(s.total_queued().await.unwrap(), 1);
    assert_eq!(s.queue_stats(&c, T0).await.unwrap(), QueueStats::default());
    assert_eq!(s.release_owner("nobody").await.unwrap(), 0);
}

/// A message queued with a lease ([`NewMessage::lease`]) is its first lease: no other leaser
/// gets it, only its owner releases it, it runs out like any lease, and messages of the same
/// batch without one stay pending.
pub async fn queued_leased(b: Arc<dyn Backend>) {
    let s = b.open().await;
    let c = new_conn(&s).await;
    let until = T0 + 1_000;
    let leased = |p: &str| NewMessage {
        lease: Some(LeaseTo {
            owner: "n1/handoff".into(),
            until_ms: until,
        }),
        ..msg(&c, p, T0)
    };
    let id = enqueue_ok(&s, vec![leased("h1"), msg(&c, "pending", T0), leased("h2")]).await;
    let st = s.queue_stats(&c, T0).await.unwrap();
    assert_eq!((st.pending, st.leased), (1, 2));
    assert_eq!(
        s.pending_among(std::slice::from_ref(&c), T0).await.unwrap(),
        vec![c.clone()]
    );
    let l = s.lease(&c, 10, "A", T0, T0 + 30_000).await.unwrap();
    assert_eq!(ids(&l), vec![id[1]], "only the pending one");
    assert_eq!(l[0].attempts, 1);
    assert_eq!(s.release(&c, &[id[0]], "A").await.unwrap(), 0, "not A's");
    assert_eq!(s.release(&c, &[id[0]], "n1/handoff").await.unwrap(), 1);
    let l = s.lease(&c, 10, "A", T0 + 1, T0 + 30_000).await.unwrap();
    assert_eq!(ids(&l), vec![id[0]]);
    assert_eq!(l[0].attempts, 2, "queued leased was its first delivery");
    // h2 runs out at `until` and is leased again.
    assert!(s.lease(&c, 10, "B", until - 1, T0 + 30_000).await.unwrap().is_empty());
    let l = s.lease(&c, 10, "B", until, T0 + 30_000).await.unwrap();
    assert_eq!(ids(&l), vec![id[2]]);
    assert_eq!(l[0].attempts, 2);
    // Acknowledged like any other; a release after that frees nothing.
    assert_eq!(s.ack(&c, &id).await.unwrap(), 3);
    assert_eq!(s.release(&c, &id, "n1/handoff").await.unwrap(), 0);
    assert_eq!(s.release_owner("n1/handoff").await.unwrap(), 0);
    // A whole batch queued leased: its owner's shutdown gives every one back.
    let more = enqueue_ok(&s, vec![leased("h3"), leased("h4")]).await;
    assert_eq!(s.release_owner("n1/handoff").await.unwrap(), 2);
    assert_eq!(ids(&s.lease(&c, 10, "C", T0 + 2, T0 + 30_000).await.unwrap()), more);
}

/// A failed node's leases (every owner `<node>/...`) go back at once; another node's, even one
/// whose id starts with the same characters or holds a LIKE wildcard, stay.
pub async fn release_owners_under(b: Arc<dyn Backend>) {
    let s = b.open().await;
    let c = new_conn(&s).await;
    let until = T0 + 30_000;
    let id = enqueue_ok(&s, (0..7).map(|i| msg(&c, &format!("m{i}"), T0)).collect()).await;
    for (i, owner) in [
        "n_1/ws/7/1",
        "n_1/ws/7/2",
        "n_1/handoff",
        "n_10/http",
        "nx1/http",
        "n2/ws/9/1",
    ]
    .into_iter()
    .enumerate()
    {
        assert_eq!(ids(&s.lease(&c, 1, owner, T0, until).await.unwrap()), vec![id[i]]);
    }
    let c2 = new_conn(&s).await;
    enqueue_ok(&s, vec![msg(&c2, "other", T0)]).await;
    assert_eq!(s.lease(&c2, 1, "n_1/endpoint", T0, until).await.unwrap().len(), 1);
    assert!(
        s.release_owners_under("", i64::MAX).await.unwrap().is_empty(),
        "an empty prefix frees nothing"
    );
    let mut both = vec![c.clone(), c2.clone()];
    both.sort();
    assert_eq!(s.release_owners_under("n_1/", i64::MAX).await.unwrap(), both);
    let st = s.queue_stats(&c, T0 + 1).await.unwrap();
    assert_eq!((st.pending, st.leased), (4, 3), "n_10's, nx1's and n2's leases stay");
    assert_eq!(s.queue_stats(&c2, T0 + 1).await.unwrap().pending, 1);
    let again = s.lease(&c, 10, "n2/ws/9/2", T0 + 1, until).await.unwrap();
    assert_eq!(ids(&again), vec![id[0], id[1], id[2], id[6]]);
    assert!(
        again[..3].iter().all(|m| m.attempts == 2),
        "a released message is a redelivery"
    );
    // Released owners are gone from the store's books: nothing left to free under them.
    assert!(s.release_owners_under("n_1/", i64::MAX).await.unwrap().is_empty());
    assert_eq!(s.release_owner("n_10/http").await.unwrap(), 1);

    // Owner names repeat across a node's runs: the leases of before a restart (running out by
    // the cutoff) go back, one taken since under the same name (running out later) stays.
    let c3 = new_conn(&s).await;
    let id3 = enqueue_ok(&s, (0..3).map(|i| msg(&c3, &format!("r{i}"), T0)).collect()).await;
    assert_eq!(s.lease(&c3, 1, "n_3/ws/1/1", T0, until).await.unwrap().len(), 1);
    assert_eq!(s.lease(&c3, 1, "n_3/handoff", T0, until).await.unwrap().len(), 1);
    let later = until + 5_000;
    assert_eq!(s.lease(&c3, 1, "n_3/ws/1/1", T0 + 5_000, later).await.unwrap().len(), 1);
    assert_eq!(s.release_owners_under("n_3/", until).await.unwrap(), vec![c3.clone()]);
    let st = s.queue_stats(&c3, T0 + 6_000).await.unwrap();
    assert_eq!((st.pending, st.leased), (2, 1), "the lease taken since stays");
    assert_eq!(
        ids(&s.lease(&c3, 10, "n2/x", T0 + 6_000, later).await.unwrap()),
        vec![id3[0], id3[1]]
    );
    // ... and its owner still holds it, for a later release by name.
    assert_eq!(s.release_owner("n_3/ws/1/1").await.unwrap(), 1);
}

pub async fn lease_expiry(b: Arc<dyn Backend>) {
    let s = b.open().await;
    let c = new_conn(&s).await;
    let id = enqueue_ok(&s, vec![msg(&c, "x", T0), msg(&c, "y", T0)]).await;
    assert_eq!(s.lease(&c, 10, "A", T0, T0 + 100).await.unwrap().len(), 2);
    assert!(s.lease(&c, 10, "B", T0 + 99, T0 + 200).await.unwrap().is_empty());
    let st = s.queue_stats(&c, T0 + 99).await.unwrap();
    assert_eq!((st.pending, st.leased), (0, 2));
    let st = s.queue_stats(&c, T0 + 100).await.unwrap();
    assert_eq!((st.pending, st.leased), (2, 0), "a lease runs out at until_ms");
    assert_eq!(
        s.connections_with_pending(T0 + 100, None, 10).await.unwrap(),
        vec![c.clone()]
    );
    let again = s.lease(&c, 10, "B", T0 + 100, T0 + 200).await.unwrap();
    assert_eq!(ids(&again), id);
    assert!(again.iter().all(|m| m.attempts == 2));
    // A's lease ran out and B holds them now: neither A's shutdown nor a stale release of
    // A's (a late messages-received, a failed endpoint POST) may free B's lease.
    assert_eq!(s.release_owner("A").await.unwrap(), 0);
    assert_eq!(s.release(&c, &id, "A").await.unwrap(), 0);
    let st = s.queue_stats(&c, T0 + 150).await.unwrap();
    assert_eq!((st.pending, st.leased), (0, 2));
}

/// Leases that ran out go back to pending once, named by their connection, each once: not a
/// lease still running, not one taken again after it ran out (until that one runs out), not a
/// message past its sender's expiry; at most `max` messages a call, the rest at the next.
pub async fn expired_leases_are_reclaimed(b: Arc<dyn Backend>) {
    let s = b.open().await;
    let (a, c, d) = (new_conn(&s).await, new_conn(&s).await, new_conn(&s).await);
    let ia = enqueue_ok(&s, (0..3).map(|i| msg(&a, &format!("a{i}"), T0)).collect()).await;
    enqueue_ok(&s, vec![msg(&c, "c", T0)]).await;
    let id = enqueue_ok(
        &s,
        vec![NewMessage {
            expires_at_ms: Some(T0 + 150),
            ..msg(&d, "d", T0)
        }],
    )
    .await;
    assert_eq!(s.lease(&a, 2, "n1/http", T0, T0 + 100).await.unwrap().len(), 2);
    assert_eq!(s.lease(&a, 1, "n1/ws/1", T0, T0 + 100).await.unwrap().len(), 1);
    assert_eq!(s.lease(&c, 10, "n2/http", T0, T0 + 300).await.unwrap().len(), 1);
    assert_eq!(s.lease(&d, 10, "n1/http", T0, T0 + 100).await.unwrap().len(), 1);
    assert!(s.reclaim_expired_leases(T0 + 99, 100).await.unwrap().is_empty());

    // Two of a's three at the first call (the bound), the third at the next; d's message is
    // past its expiry by then, and stays where the expiry sweep finds it.
    let first = s.reclaim_expired_leases(T0 + 200, 2).await.unwrap();
    let second = s.reclaim_expired_leases(T0 + 200, 2).await.unwrap();
    assert_eq!(conns(&first), vec![a.clone()]);
    assert_eq!(conns(&second), vec![a.clone()]);
    assert_eq!((first[0].attempts, second[0].attempts), (1, 1), "delivered once");
    assert!(
        s.reclaim_expired_leases(T0 + 200, 100).await.unwrap().is_empty(),
        "once"
    );
    let st = s.queue_stats(&a, T0 + 200).await.unwrap();
    assert_eq!((st.pending, st.leased), (3, 0));
    assert_eq!(
        s.release(&d, &id, "n1/http").await.unwrap(),
        1,
        "d's expired message kept its lease"
    );
    assert_eq!(s.release_owner("n1/http").await.unwrap(), 0, "reclaimed: no owner left");

    // Taken again after it ran out: reclaimed only once the new lease runs out too. With a
    // message delivered for the first time beside them: the fewest deliveries.
    let again = s.lease(&a, 10, "n1/ws/2", T0 + 200, T0 + 400).await.unwrap();
    assert_eq!(ids(&again), ia);
    let fresh = enqueue_ok(&s, vec![msg(&a, "a3", T0 + 200)]).await;
    assert_eq!(s.lease(&a, 10, "n1/ws/2", T0 + 201, T0 + 400).await.unwrap().len(), 1);
    assert_eq!(
        conns(&s.reclaim_expired_leases(T0 + 300, 100).await.unwrap()),
        vec![c.clone()]
    );
    let r = s.reclaim_expired_leases(T0 + 400, 100).await.unwrap();
    assert_eq!((conns(&r), r[0].attempts), (vec![a.clone()], 1));
    let l = s.lease(&a, 10, "n1/ws/3", T0 + 400, T0 + 500).await.unwrap();
    assert_eq!(l.len(), 4);
    assert!(
        l.iter().filter(|m| m.id != fresh[0]).all(|m| m.attempts == 3),
        "a reclaimed message is a redelivery"
    );
    let r = s.reclaim_expired_leases(T0 + 500, 100).await.unwrap();
    assert_eq!((conns(&r), r[0].attempts), (vec![a.clone()], 2));
    // A lease taken by another owner before the reclaim ran: the first owner's is gone.
    let o1 = s.lease(&c, 10, "o1", T0 + 500, T0 + 600).await.unwrap();
    assert_eq!(s.lease(&c, 10, "o2", T0 + 650, T0 + 900).await.unwrap().len(), o1.len());
    assert!(s.reclaim_expired_leases(T0 + 700, 100).await.unwrap().is_empty());
    assert_eq!(s.release_owner("o1").await.unwrap(), 0);
    assert_eq!(s.release_owner("o2").await.unwrap(), 1);
}

fn conns(r: &[crate::store::Reclaimed]) -> Vec<ConnId> {
    r.iter().map(|r| r.conn.clone()).collect()
}

pub async fn ack_is_scoped_to_connection(b: Arc<dyn Backend>) {
    let s = b.open().await;
    let c1 = new_conn(&s).await;
    let c2 = new_conn(&s).await;
    let id = enqueue_ok(&s, vec![msg(&c1, "secret", T0)]).await;
    s.lease(&c1, 1, "A", T0, T0 + 1000).await.unwrap();
    assert_eq!(s.ack(&c2, &id).await.unwrap(), 0);
    assert_eq!(s.release(&c2, &id, "A").await.unwrap(), 0);
    assert!(s.lease(&c2, 10, "B", T0 + 5000, T0 + 6000).await.unwrap().is_empty());
    let st = s.queue_stats(&c1, T0).await.unwrap();
    assert_eq!((st.pending, st.leased), (0, 1), "the other connection changed nothing");
    assert_eq!(s.ack(&c1, &id).await.unwrap(), 1);
}

pub async fn pending_for_key_counts_one_recipient(b: Arc<dyn Backend>) {
    let s = b.open().await;
    let c1 = new_conn(&s).await;
    let c2 = new_conn(&s).await;
    let keyed = |conn: &str, key: &str, p: &str| NewMessage {
        recipient_key: key.to_owned(),
        ..msg(conn, p, T0)
    };
    enqueue_ok(
        &s,
        vec![
            keyed(&c1, "did:a", "1"),
            keyed(&c1, "did:b", "2"),
            keyed(&c1, "did:a", "3"),
            keyed(&c2, "did:a", "4"),
        ],
    )
    .await;
    assert_eq!(s.pending_stats(&c1, Some("did:a"), T0).await.unwrap().count, 2);
    assert_eq!(s.pending_stats(&c1, Some("did:b"), T0).await.unwrap().count, 1);
    assert_eq!(s.pending_stats(&c2, Some("did:a"), T0).await.unwrap().count, 1);
    assert_eq!(s.pending_stats(&c1, Some("did:none"), T0).await.unwrap().count, 0);
    assert_eq!(
        s.pending_stats("no-such-conn", Some("did:a"), T0).await.unwrap().count,
        0
    );
    assert_eq!(s.pending_stats(&c1, Some("did:\0a"), T0).await.unwrap().count, 0);
    // The oldest (did:a "1") leased: no longer pending until its lease runs out.
    s.lease(&c1, 1, "A", T0, T0 + 1000).await.unwrap();
    assert_eq!(s.pending_stats(&c1, Some("did:a"), T0).await.unwrap().count, 1);
    assert_eq!(s.pending_stats(&c1, Some("did:a"), T0 + 1000).await.unwrap().count, 2);
}

/// A pickup status counts what a lease could take now (pending messages and leases that ran
/// out, none past the sender's expiry) and names the oldest of them; the messages held leased
/// and not due are neither counted nor the oldest.
pub async fn pending_stats_counts_what_a_lease_could_take(b: Arc<dyn Backend>) {
    let s = b.open().await;
    let (c, other) = (new_conn(&s).await, new_conn(&s).await);
    assert_eq!(s.pending_stats(&c, None, T0).await.unwrap(), PendingStats::default());
    let expiring = NewMessage {
        expires_at_ms: Some(T0 + 500),
        lease: None,
        ..msg(&c, "expiring", T0 + 40)
    };
    enqueue_ok(
        &s,
        vec![
            msg(&c, "held", T0 + 10),
            msg(&c, "due", T0 + 20),
            msg(&c, "pending", T0 + 30),
            expiring,
            msg(&other, "other", T0),
        ],
    )
    .await;
    // "held" leased until T0 + 10,000, "due" until T0 + 1,000.
    assert_eq!(s.lease(&c, 1, "A", T0, T0 + 10_000).await.unwrap().len(), 1);
    assert_eq!(s.lease(&c, 1, "A", T0, T0 + 1_000).await.unwrap().len(), 1);
    let expect = |count, oldest| PendingStats {
        count,
        oldest_received_ms: Some(oldest),
    };
    for (now, want, why) in [
        (T0 + 100, expect(2, T0 + 30), "pending and expiring; neither leased one"),
        (T0 + 600, expect(1, T0 + 30), "past its expiry a message is not pending"),
        (T0 + 1_000, expect(2, T0 + 20), "a lease that ran out is pending again"),
        (T0 + 10_000, expect(3, T0 + 10), "both leases ran out"),
    ] {
        assert_eq!(s.pending_stats(&c, None, now).await.unwrap(), want, "{why}");
    }
    let key = format!("rk-{c}");
    assert_eq!(s.pending_stats(&c, Some(&key), T0 + 100).await.unwrap().count, 2);
    assert_eq!(s.pending_stats(&c, Some("rk-none"), T0 + 100).await.unwrap().count, 0);
    // Another connection's queue is its own.
    assert_eq!(s.pending_stats(&other, None, T0 + 100).await.unwrap(), expect(1, T0));
    // The whole-queue figures still count every message.
    let st = s.queue_stats(&c, T0 + 100).await.unwrap();
    assert_eq!((st.pending, st.leased), (2, 2));
}

pub async fn concurrent_leasers_never_share(b: Arc<dyn Backend>) {
    let s = b.open().await;
    let c = new_conn(&s).await;
    let mut all = Vec::new();
    for chunk in 0..5 {
        let m = (0..100).map(|i| msg(&c, &format!("{chunk}-{i}"), T0)).collect();
        all.extend(enqueue_ok(&s, m).await);
    }
    assert_eq!(all.len(), 500);
    let mut tasks = Vec::new();
    for t in 0..8 {
        let s = s.clone();
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            let owner = format!("leaser-{t}");
            let mut got = Vec::new();
            loop {
                let l = s.lease(&c, 7, &owner, T0, T0 + 600_000).await.unwrap();
                if l.is_empty() {
                    break;
                }
                got.extend(ids(&l));
                tokio::task::yield_now().await;
            }
            got
        }));
    }
    let mut union = Vec::new();
    for t in tasks {
        union.extend(t.await.unwrap());
    }
    let distinct: HashSet<_> = union.iter().copied().collect();
    assert_eq!(union.len(), distinct.len(), "a message was leased twice");
    assert_eq!(distinct, all.iter().copied().collect::<HashSet<_>>());
    assert_eq!(s.ack(&c, &all).await.unwrap(), 500);
}

/// Leases of many connections asked at once (PostgreSQL serves them in one statement): each
/// caller gets its own connection's messages, filtered by its key when it gave one, oldest
/// first, and never a message another caller got.
pub async fn concurrent_leases_of_many_connections(b: Arc<dyn Backend>) {
    let s = b.open().await;
    let mut conns = Vec::new();
    for _ in 0..24 {
        let c = new_conn(&s).await;
        let m = |p: &str, key: &str| NewMessage {
            recipient_key: key.to_owned(),
            ..msg(&c, p, T0)
        };
        enqueue_ok(&s, vec![m("a1", "A"), m("b1", "B"), m("a2", "A")]).await;
        conns.push(c);
    }
    let tasks: Vec<_> = conns
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let (s, c) = (s.clone(), c.clone());
            tokio::spawn(async move {
                let owner = format!("owner-{i}");
                let got = if i % 2 == 0 {
                    s.lease(&c, 10, &owner, T0, T0 + 1000).await.unwrap()
                } else {
                    s.lease_for_key(&c, "A", 10, &owner, T0, T0 + 1000).await.unwrap()
                };
                (i, c, got)
            })
        })
        .collect();
    let mut seen = HashSet::new();
    for t in tasks {
        let (i, c, got) = t.await.unwrap();
        let payloads: Vec<&[u8]> = got.iter().map(|m| m.payload.as_slice()).collect();
        if i % 2 == 0 {
            assert_eq!(payloads, vec![&b"a1"[..], b"b1", b"a2"], "caller {i}");
        } else {
            assert_eq!(payloads, vec![&b"a1"[..], b"a2"], "caller {i} (key A)");
        }
        for m in &got {
            assert_eq!(m.connection, c, "caller {i} got another connection's message");
            assert_eq!(m.attempts, 1);
            assert!(seen.insert(m.id), "message {} leased twice", m.id);
        }
        let st = s.queue_stats(&c, T0).await.unwrap();
        assert_eq!((st.pending, st.leased), (3 - got.len() as u64, got.len() as u64));
    }
}

/// Pickup filters: leases and counts of one recipient key only, the others untouched.
pub async fn recipient_key_filters(b: Arc<dyn Backend>) {
    let s = b.open().await;
    let c = new_conn(&s).await;
    let for_key = |k: &str, p: &str, at: i64| NewMessage {
        recipient_key: k.to_owned(),
        ..msg(&c, p, at)
    };
    // 150 messages for key A first: a filter for B must look past them.
    let mut m: Vec<NewMessage> = (0..150).map(|i| for_key("A", "a", T0 + i)).collect();
    m.push(for_key("B", "b1", T0 + 200));
    m.push(for_key("B", "b22", T0 + 201));
    let id = enqueue_ok(&s, m).await;
    let st = s.pending_stats(&c, Some("B"), T0).await.unwrap();
    assert_eq!(
        st,
        PendingStats {
            count: 2,
            oldest_received_ms: Some(T0 + 200)
        }
    );
    assert_eq!(
        s.pending_stats(&c, Some("none"), T0).await.unwrap(),
        PendingStats::default()
    );
    let l = s.lease_for_key(&c, "B", 1, "o", T0, T0 + 1000).await.unwrap();
    assert_eq!(ids(&l), vec![id[150]]);
    assert_eq!(l[0].recipient_key, "B");
    let l = s.lease_for_key(&c, "B", 10, "o", T0, T0 + 1000).await.unwrap();
    assert_eq!(ids(&l), vec![id[151]]);
    assert!(s
        .lease_for_key(&c, "B", 10, "o", T0, T0 + 1000)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        s.pending_stats(&c, Some("B"), T0).await.unwrap(),
        PendingStats::default()
    );
    let st = s.queue_stats(&c, T0).await.unwrap();
    assert_eq!((st.pending, st.leased), (150, 2));
    // Nothing of key A was touched: all pending, never attempted.
    let a = s.lease(&c, 1000, "p", T0, T0 + 1000).await.unwrap();
    assert_eq!(a.len(), 150);
    assert!(a.iter().all(|q| q.recipient_key == "A" && q.attempts == 1));
    // Owner release still applies to filtered leases.
    assert_eq!(s.release_owner("o").await.unwrap(), 2);
}

const KIB: usize = 1024;

/// A message of `kib` KiB of payload for recipient key `key`.
fn of_kib(conn: &str, key: &str, kib: usize, at: i64) -> NewMessage {
    NewMessage {
        recipient_key: key.to_owned(),
        payload: vec![b'x'; kib * KIB],
        ..msg(conn, "", at)
    }
}

/// Payload sizes of a lease, in KiB, and whether each is its first delivery.
fn kib_first(v: &[QueuedMessage]) -> Vec<(usize, bool)> {
    v.iter().map(|m| (m.payload.len() / KIB, m.attempts == 1)).collect()
}

/// A lease with a byte budget (a pickup's delivery holds what it leases in memory) takes its
/// messages oldest first and stops before the one that would take the payload bytes past the
/// budget; a message larger than the budget still goes, alone. What it did not take is left
/// pending and untouched (its attempts are not counted), whichever way a message came to be
/// pending (never leased, released, or its lease ran out).
pub async fn leases_stop_at_their_byte_budget(b: Arc<dyn Backend>) {
    let s = b.open().await;
    let c = new_conn(&s).await;
    let id = enqueue_ok(&s, [1, 3, 1, 10, 1].map(|k| of_kib(&c, "rk", k, T0)).to_vec()).await;
    let until = T0 + 1_000;
    let lease = |budget: usize, now: i64| s.lease_upto(&c, 10, budget, "A", now, until.max(now + 1_000));
    let l = lease(4 * KIB, T0).await.unwrap();
    assert_eq!(ids(&l), id[0..2].to_vec(), "1 + 3 KiB: exactly the budget");
    let st = s.queue_stats(&c, T0).await.unwrap();
    assert_eq!((st.pending, st.leased), (3, 2), "the rest is left pending");
    let l = lease(4 * KIB, T0).await.unwrap();
    assert_eq!(kib_first(&l), vec![(1, true)], "the 10 KiB one would pass the budget");
    let l = lease(4 * KIB, T0).await.unwrap();
    assert_eq!(kib_first(&l), vec![(10, true)], "larger than the budget: alone");
    let l = lease(4 * KIB, T0).await.unwrap();
    assert_eq!(kib_first(&l), vec![(1, true)]);
    assert!(lease(4 * KIB, T0).await.unwrap().is_empty());
    // Released (pending again) and run out (due again) are taken in one order, one budget.
    assert_eq!(s.release(&c, &[id[1]], "A").await.unwrap(), 1);
    let l = lease(5 * KIB, until).await.unwrap();
    assert_eq!(ids(&l), id[0..3].to_vec(), "1 + 3 + 1 KiB");
    assert!(l.iter().all(|m| m.attempts == 2));
    let l = lease(5 * KIB, until).await.unwrap();
    assert_eq!(ids(&l), vec![id[3]]);
    // The count still bounds a lease, and a budget of nothing still takes one message.
    let l = s
        .lease_upto(&c, 1, usize::MAX, "A", until, until + 1_000)
        .await
        .unwrap();
    assert_eq!(ids(&l), vec![id[4]]);
    s.release_owner("A").await.unwrap();
    let l = s.lease_upto(&c, 10, 0, "A", until, until + 1_000).await.unwrap();
    assert_eq!(ids(&l), vec![id[0]]);
    // No budget: the whole queue.
    let l = s.lease(&c, 10, "B", until, until + 1_000).await.unwrap();
    assert_eq!(ids(&l), id[1..].to_vec());
}

/// As [`leases_stop_at_their_byte_budget`], for one recipient key of a queue holding two: the
/// budget counts that key's messages alone, and the other key's are never touched.
pub async fn leases_for_a_key_stop_at_their_byte_budget(b: Arc<dyn Backend>) {
    let s = b.open().await;
    let c = new_conn(&s).await;
    let queued = [
        ("ka", 1),
        ("kb", 1),
        ("ka", 3),
        ("kb", 10),
        ("ka", 1),
        ("ka", 10),
        ("kb", 1),
        ("ka", 1),
    ];
    let id = enqueue_ok(&s, queued.map(|(k, n)| of_kib(&c, k, n, T0)).to_vec()).await;
    let lease = |key: &'static str| s.lease_for_key_upto(&c, key, 10, 4 * KIB, "A", T0, T0 + 1_000);
    let l = lease("ka").await.unwrap();
    assert_eq!(
        ids(&l),
        vec![id[0], id[2]],
        "1 + 3 KiB of ka; kb's between them do not count"
    );
    assert_eq!(s.pending_stats(&c, Some("kb"), T0).await.unwrap().count, 3);
    let l = lease("ka").await.unwrap();
    assert_eq!((ids(&l), kib_first(&l)), (vec![id[4]], vec![(1, true)]));
    let l = lease("ka").await.unwrap();
    assert_eq!((ids(&l), kib_first(&l)), (vec![id[5]], vec![(10, true)]), "alone");
    let l = lease("ka").await.unwrap();
    assert_eq!((ids(&l), kib_first(&l)), (vec![id[7]], vec![(1, true)]));
    assert!(lease("ka").await.unwrap().is_empty());
    let st = s.queue_stats(&c, T0).await.unwrap();
    assert_eq!((st.pending, st.leased), (3, 5), "kb's are all left pending");
    let l = lease("kb").await.unwrap();
    assert_eq!(
        (ids(&l), kib_first(&l)),
        (vec![id[1]], vec![(1, true)]),
        "1 + 10 KiB would pass"
    );
    let l = lease("kb").await.unwrap();
    assert_eq!((ids(&l), kib_first(&l)), (vec![id[3]], vec![(10, true)]));
    let l = lease("kb").await.unwrap();
    assert_eq!((ids(&l), kib_first(&l)), (vec![id[6]], vec![(1, true)]));
    assert!(lease("kb").await.unwrap().is_empty());
    // No budget: every message of the key.
    s.release_owner("A").await.unwrap();
    let l = s.lease_for_key(&c, "ka", 10, "B", T0, T0 + 1_000).await.unwrap();
    assert_eq!(ids(&l), vec![id[0], id[2], id[4], id[5], id[7]]);
}

pub async fn pending_sweep_and_stats(b: Arc<dyn Backend>) {
    let s = b.open().await;
    let busy = new_conn(&s).await; // everything leased
    let older = new_conn(&s).await;
    let newer = new_conn(&s).await;
    let _empty = new_conn(&s).await;
    enqueue_ok(&s, vec![msg(&busy, "b", T0)]).await;
    enqueue_ok(&s, vec![msg(&older, "o1", T0 + 5), msg(&older, "o22", T0 + 6)]).await;
    enqueue_ok(&s, vec![msg(&newer, "n1", T0 + 7)]).await;
    s.lease(&busy, 10, "A", T0, T0 + 1000).await.unwrap();
    let mut expect = vec![older.clone(), newer.clone()];
    expect.sort();
    assert_eq!(
        s.connections_with_pending(T0, None, 10).await.unwrap(),
        expect,
        "in id order; fully leased and empty connections left out"
    );
    // A cursor: pages of one reach every connection.
    let first = s.connections_with_pending(T0, None, 1).await.unwrap();
    assert_eq!(first, vec![expect[0].clone()]);
    assert_eq!(
        s.connections_with_pending(T0, Some(&first[0]), 1).await.unwrap(),
        vec![expect[1].clone()]
    );
    assert!(s
        .connections_with_pending(T0, Some(&expect[1]), 1)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(s.connections_with_pending(T0 + 1000, None, 10).await.unwrap().len(), 3);
    // Asked about given connections (the sweep's local sessions) only.
    let mut among = s
        .pending_among(&[busy.clone(), newer.clone(), _empty.clone(), new_id()], T0)
        .await
        .unwrap();
    among.sort();
    assert_eq!(among, vec![newer.clone()]);
    assert_eq!(
        s.pending_among(std::slice::from_ref(&busy), T0 + 1000).await.unwrap(),
        vec![busy.clone()]
    );
    assert!(s.pending_among(&[], T0).await.unwrap().is_empty());
    assert_eq!(s.total_queued().await.unwrap(), 4);
    s.lease(&older, 1, "A", T0, T0 + 1000).await.unwrap();
    assert_eq!(
        s.queue_stats(&older, T0).await.unwrap(),
        QueueStats {
            pending: 1,
            leased: 1,
            bytes: 5,
            oldest_received_ms: Some(T0 + 5)
        }
    );
    assert_eq!(s.queue_stats(&new_id(), T0).await.unwrap(), QueueStats::default());
    s.flush().await.unwrap();
}

/// Paging through many connections with mail a few at a time reaches each exactly once, in id
/// order (their bytes': ids of several shapes, upper and lower case), every page full but the
/// last; fully leased queues and queues holding only expired messages are left out, a queue
/// whose lease ran out is in, whatever page it falls on.
pub async fn pending_connections_page_through_many(b: Arc<dyn Backend>) {
    const CONNS: usize = 300;
    const PAGE: usize = 7;
    let s = b.open().await;
    let now = T0 + 1_000;
    let conns: Vec<String> = (0..CONNS)
        .map(|i| match i % 4 {
            0 => new_id(),
            1 => new_id().to_uppercase(),
            2 => format!("conn-{i}"),
            _ => format!("Conn_{i:03}"),
        })
        .collect();
    let batch = conns
        .iter()
        .enumerate()
        .map(|(i, c)| match i % 5 {
            3 => NewMessage {
                expires_at_ms: Some(now),
                ..msg(c, "expired", T0)
            },
            _ => msg(c, "m", T0),
        })
        .collect();
    enqueue_ok(&s, batch).await;
    for (i, c) in conns.iter().enumerate() {
        let until = match i % 5 {
            1 => now + 60_000,
            2 => now,
            _ => continue,
        };
        assert_eq!(s.lease(c, 10, "A", T0, until).await.unwrap().len(), 1);
    }
    let mut expect: Vec<String> = conns
        .iter()
        .enumerate()
        .filter(|(i, _)| matches!(i % 5, 0 | 2 | 4))
        .map(|(_, c)| c.clone())
        .collect();
    expect.sort();
    let (mut seen, mut sizes, mut after) = (Vec::new(), Vec::new(), None::<String>);
    loop {
        let page = s.connections_with_pending(now, after.as_deref(), PAGE).await.unwrap();
        let Some(last) = page.last() else { break };
        after = Some(last.clone());
        sizes.push(page.len());
        seen.extend(page);
    }
    assert_eq!(seen.len(), expect.len(), "each connection once");
    assert_eq!(seen, expect, "in id order");
    let (last, full) = sizes.split_last().unwrap();
    assert!(
        full.iter().all(|n| *n == PAGE) && (1..=PAGE).contains(last),
        "{sizes:?}"
    );
}

/// The oldest-message figures of the queues: `oldest_received_ms`, `top_queues`' oldest list
/// and `queue_stats` of those of `conns` with messages, as (connection, oldest); `top_queues`'
/// deepest list must name the same as `queue_stats`.
async fn oldest_figures(
    s: &Arc<dyn Store>,
    conns: &[&str],
) -> (Option<i64>, Vec<(ConnId, Option<i64>)>, Vec<(ConnId, Option<i64>)>) {
    let top = s.top_queues(10).await.unwrap();
    let mut deepest: Vec<(ConnId, Option<i64>)> = top
        .deepest
        .iter()
        .map(|q| (q.connection.clone(), q.oldest_received_ms))
        .collect();
    deepest.sort();
    let mut stats = Vec::new();
    for c in conns {
        let q = s.queue_stats(c, T0 + 100).await.unwrap();
        if q.oldest_received_ms.is_some() {
            stats.push(((*c).to_owned(), q.oldest_received_ms));
        }
    }
    stats.sort();
    assert_eq!(deepest, stats, "top_queues and queue_stats name the same oldest");
    let oldest = top
        .oldest
        .iter()
        .map(|q| (q.connection.clone(), q.oldest_received_ms))
        .collect();
    (s.oldest_received_ms().await.unwrap(), oldest, stats)
}

/// A queue's oldest message is the one received first, whatever its id: ids follow the order
/// messages reach the store (concurrent forwards, retries, hand-backs), not the order they
/// were received. The queue-age gauge (`oldest_received_ms`), the status page's lists
/// (`top_queues`) and `queue_stats` agree, as messages leave and across a reopen.
pub async fn oldest_is_the_earliest_received(b: Arc<dyn Backend>) {
    let (a, other, queued) = {
        let s = b.open().await;
        let (a, other) = (new_conn(&s).await, new_conn(&s).await);
        let mut queued = enqueue_ok(&s, vec![msg(&a, "50", T0 + 50)]).await;
        enqueue_ok(&s, vec![msg(&other, "30", T0 + 30)]).await;
        queued.extend(enqueue_ok(&s, vec![msg(&a, "10", T0 + 10)]).await);
        assert!(queued[0] < queued[1], "received later, queued first");
        let (oldest, top, _) = oldest_figures(&s, &[&a, &other]).await;
        assert_eq!(oldest, Some(T0 + 10));
        assert_eq!(top, vec![(a.clone(), Some(T0 + 10)), (other.clone(), Some(T0 + 30))]);
        assert_eq!(
            s.queue_stats(&a, T0 + 100).await.unwrap().oldest_received_ms,
            Some(T0 + 10)
        );
        // Once more each way: one in order after them, one older than all.
        queued.extend(enqueue_ok(&s, vec![msg(&a, "60", T0 + 60), msg(&a, "5", T0 + 5)]).await);
        let (oldest, top, _) = oldest_figures(&s, &[&a, &other]).await;
        assert_eq!(oldest, Some(T0 + 5));
        assert_eq!(top[0], (a.clone(), Some(T0 + 5)));
        (a, other, queued)
    };
    let s = b.open().await;
    let (oldest, top, _) = oldest_figures(&s, &[&a, &other]).await;
    assert_eq!(oldest, Some(T0 + 5), "after a reopen");
    assert_eq!(top, vec![(a.clone(), Some(T0 + 5)), (other.clone(), Some(T0 + 30))]);
    let leased = s.lease(&a, 10, "o", T0 + 100, T0 + 60_000).await.unwrap();
    assert_eq!(ids(&leased), queued, "leased in id order");
    // The oldest leaves: the next oldest, not the first id, is the queue's oldest.
    assert_eq!(s.ack_leased(&a, &[queued[3]]).await.unwrap().len(), 1);
    let (oldest, top, _) = oldest_figures(&s, &[&a, &other]).await;
    assert_eq!(oldest, Some(T0 + 10));
    assert_eq!(top[0], (a.clone(), Some(T0 + 10)));
    assert_eq!(s.ack_leased(&a, &[queued[1]]).await.unwrap().len(), 1);
    let (oldest, top, stats) = oldest_figures(&s, &[&a, &other]).await;
    assert_eq!(oldest, Some(T0 + 30), "the other queue's");
    assert_eq!(top, vec![(other.clone(), Some(T0 + 30)), (a.clone(), Some(T0 + 50))]);
    assert!(stats.contains(&(a.clone(), Some(T0 + 50))), "{stats:?}");
    // The first id leaves too.
    assert_eq!(s.ack_leased(&a, &[queued[0]]).await.unwrap().len(), 1);
    let (_, top, _) = oldest_figures(&s, &[&a, &other]).await;
    assert_eq!(top[1], (a.clone(), Some(T0 + 60)));
    assert_eq!(s.ack_leased(&a, &[queued[2]]).await.unwrap().len(), 1);
    let (oldest, top, _) = oldest_figures(&s, &[&a, &other]).await;
    assert_eq!(oldest, Some(T0 + 30));
    assert_eq!(top, vec![(other.clone(), Some(T0 + 30))]);
}
