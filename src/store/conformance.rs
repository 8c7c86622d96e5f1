//! The one conformance suite of [`Store`]: every check is an async fn taking a [`Backend`] (a
//! way to open handles on one fresh, empty store) and runs unchanged on sled and PostgreSQL.
//!
//! sled runs in a temporary directory; PostgreSQL in a database created for the test
//! (`mailroom_test_<pid>_<random>` via the `postgres` database) and dropped afterwards, even
//! when the test fails. PostgreSQL is never skipped: if it is unreachable the tests fail and
//! say how to start it. `MAILROOM_TEST_PG` overrides the server URL (without database).
use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use super::*;

const T0: i64 = 1_700_000_000_000;

/// Opens handles on one store. `open` may be called again once every earlier handle is
/// dropped (sled allows one open handle per directory).
#[async_trait::async_trait]
pub trait Backend: Send + Sync {
    async fn open(&self) -> Arc<dyn Store>;
}

// ---------------------------------------------------------------------------------------------
// helpers

fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

fn conn(id: &str) -> Connection {
    Connection {
        id: id.to_owned(),
        created_at_ms: T0,
        updated_at_ms: T0,
        state: "completed".into(),
        protocol: "didexchange/1.1".into(),
        label: Some("wallet".into()),
        our_verkey: format!("our-{id}"),
        our_did: Some("did:peer:4zQm".into()),
        their_did: Some("did:peer:2.Ez".into()),
        their_verkeys: vec![format!("theirs-{id}")],
        their_endpoints: vec!["ws://127.0.0.1:1".into()],
        their_routing_keys: vec![],
        mediation: MediationState::None,
        invitation_id: Some("inv-1".into()),
        thread_id: Some(format!("thread-{id}")),
        extra: serde_json::json!({"doc": {"service": []}}),
    }
}

async fn new_conn(s: &Arc<dyn Store>) -> String {
    let id = new_id();
    s.put_connection(&conn(&id)).await.unwrap();
    id
}

fn msg(conn: &str, payload: &str, at: i64) -> NewMessage {
    NewMessage {
        connection: conn.to_owned(),
        recipient_key: format!("rk-{conn}"),
        payload: payload.as_bytes().to_vec(),
        received_at_ms: at,
        dedup_key: None,
        expires_at_ms: None,
        lease: None,
    }
}

fn dmsg(conn: &str, payload: &str, at: i64, key: u8) -> NewMessage {
    NewMessage {
        dedup_key: Some([key; 32]),
        ..msg(conn, payload, at)
    }
}

async fn enqueue_ok(s: &Arc<dyn Store>, msgs: Vec<NewMessage>) -> Vec<MessageId> {
    s.enqueue(msgs, &EnqueueLimits::UNLIMITED)
        .await
        .unwrap()
        .into_iter()
        .map(|r| {
            let e = r.unwrap();
            assert!(!e.duplicate);
            e.id
        })
        .collect()
}

fn ids(v: &[QueuedMessage]) -> Vec<MessageId> {
    v.iter().map(|m| m.id).collect()
}

// ---------------------------------------------------------------------------------------------
// the checks

pub async fn identity_race(b: Arc<dyn Backend>) {
    let s = b.open().await;
    let mut tasks = Vec::new();
    for i in 0..16 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            s.identity_get_or_create(Identity {
                created_at_ms: T0 + i,
                secrets: serde_json::json!({ "candidate": i }),
            })
            .await
            .unwrap()
        }));
    }
    let mut got = Vec::new();
    for t in tasks {
        got.push(t.await.unwrap());
    }
    assert!(got.iter().all(|g| *g == got[0]), "all racers get the same identity");
    let n = got[0].secrets["candidate"].as_i64().unwrap();
    assert_eq!(
        got[0].created_at_ms,
        T0 + n,
        "the winner is one of the candidates, whole"
    );
    let later = s
        .identity_get_or_create(Identity {
            created_at_ms: 1,
            secrets: serde_json::json!("late"),
        })
        .await
        .unwrap();
    assert_eq!(later, got[0]);
}

pub async fn connection_crud_and_indexes(b: Arc<dyn Backend>) {
    let s = b.open().await;
    s.health().await.unwrap();
    assert!(s.get_connection(&new_id()).await.unwrap().is_none());
    let id = new_id();
    let mut c = conn(&id);
    c.their_verkeys = vec!["vkA".into(), "vkB".into()];
    c.thread_id = Some("thr-1".into());
    s.put_connection(&c).await.unwrap();
    assert_eq!(s.get_connection(&id).await.unwrap().as_ref(), Some(&c));
    assert_eq!(s.connection_by_their_verkey("vkA").await.unwrap().as_ref(), Some(&c));
    assert_eq!(s.connection_by_their_verkey("vkB").await.unwrap().as_ref(), Some(&c));
    assert_eq!(s.connection_by_thread("thr-1").await.unwrap().as_ref(), Some(&c));
    assert!(s.connection_by_their_verkey("vkC").await.unwrap().is_none());

    // Update: indexes follow the new version.
    c.their_verkeys = vec!["vkB".into(), "vkC".into()];
    c.thread_id = Some("thr-2".into());
    c.state = "responded".into();
    c.mediation = MediationState::Granted;
    c.updated_at_ms += 5;
    s.put_connection(&c).await.unwrap();
    assert_eq!(s.get_connection(&id).await.unwrap().as_ref(), Some(&c));
    assert!(s.connection_by_their_verkey("vkA").await.unwrap().is_none());
    assert_eq!(s.connection_by_their_verkey("vkC").await.unwrap().as_ref(), Some(&c));
    assert!(s.connection_by_thread("thr-1").await.unwrap().is_none());
    assert_eq!(s.connection_by_thread("thr-2").await.unwrap().unwrap().id, id);

    // A peer key names one connection: a second connection listing a key another holds is
    // refused whole (a DID document claiming a victim's key), and lookups by that key keep
    // answering the holder. Threads may repeat: the most recently written wins.
    let (x, y) = (new_id(), new_id());
    let mut cx = conn(&x);
    cx.their_verkeys = vec!["shared-vk".into()];
    cx.thread_id = Some("shared-thr".into());
    let mut cy = conn(&y);
    cy.their_verkeys = vec!["y-only".into(), "shared-vk".into()];
    cy.thread_id = Some("shared-thr".into());
    s.put_connection(&cx).await.unwrap();
    match s.put_connection(&cy).await {
        Err(StoreError::KeyTaken(k)) => assert_eq!(k, "shared-vk"),
        other => panic!("a key held by another connection must be refused, got {other:?}"),
    }
    assert!(
        s.get_connection(&y).await.unwrap().is_none(),
        "nothing of a refused write stays"
    );
    assert!(s.connection_by_their_verkey("y-only").await.unwrap().is_none());
    assert_eq!(s.connection_by_their_verkey("shared-vk").await.unwrap().unwrap().id, x);
    // Rewriting the holder keeps its own key; once it lets go, another may take it.
    s.put_connection(&cx).await.unwrap();
    assert_eq!(s.connection_by_their_verkey("shared-vk").await.unwrap().unwrap().id, x);
    cx.their_verkeys.clear();
    s.put_connection(&cx).await.unwrap();
    s.put_connection(&cy).await.unwrap();
    assert_eq!(s.connection_by_their_verkey("shared-vk").await.unwrap().unwrap().id, y);
    assert_eq!(s.connection_by_thread("shared-thr").await.unwrap().unwrap().id, y);
    cy.their_verkeys = vec!["y-only".into()];
    s.put_connection(&cy).await.unwrap();
    assert!(s.connection_by_their_verkey("shared-vk").await.unwrap().is_none());

    // Pagination by id.
    let mut all = vec![id.clone(), x, y];
    for _ in 0..6 {
        all.push(new_conn(&s).await);
    }
    all.sort();
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = s.list_connections(after.as_deref(), 3).await.unwrap();
        assert!(page.len() <= 3);
        if page.is_empty() {
            break;
        }
        after = Some(page.last().unwrap().id.clone());
        seen.extend(page.into_iter().map(|c| c.id));
    }
    assert_eq!(seen, all, "pages in id order, each connection once");
    assert_eq!(s.list_connections(None, 100).await.unwrap().len(), 9);
}

/// Concurrent patches of different fields of one connection all land: none is overwritten
/// by another's stale copy.
pub async fn connection_patches_do_not_overwrite_each_other(b: Arc<dyn Backend>) {
    let s = b.open().await;
    let id = new_conn(&s).await;
    let mut tasks = Vec::new();
    for i in 0..20 {
        let s = s.clone();
        let id = id.clone();
        tasks.push(tokio::spawn(async move {
            let patch = if i == 7 {
                ConnectionPatch {
                    mediation: Some(MediationState::Granted),
                    updated_at_ms: i,
                    ..ConnectionPatch::default()
                }
            } else {
                ConnectionPatch {
                    state: Some("patched".into()),
                    updated_at_ms: i,
                    ..ConnectionPatch::default()
                }
            };
            s.update_connection(&id, &patch).await.unwrap().expect("exists")
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let c = s.get_connection(&id).await.unwrap().unwrap();
    assert_eq!(c.state, "patched");
    assert_eq!(
        c.mediation,
        MediationState::Granted,
        "the grant survived 19 concurrent state patches"
    );
    assert_eq!(c.updated_at_ms, 19.max(c.created_at_ms));
    assert!(s
        .update_connection("no-such-connection", &ConnectionPatch::default())
        .await
        .unwrap()
        .is_none());
    // The indexes still find it.
    let vk = c.their_verkeys[0].clone();
    assert_eq!(s.connection_by_their_verkey(&vk).await.unwrap().unwrap().id, id);
}

/// A single-use invitation is claimed once, even by racing handshakes on several nodes.
pub async fn single_use_invitations_are_claimed_once(b: Arc<dyn Backend>) {
    let s1 = b.open().await;
    let s2 = b.open().await;
    s1.put_invitation("inv-single", true, T0).await.unwrap();
    s1.put_invitation("inv-multi", false, T0).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..10 {
        let s = if i % 2 == 0 { s1.clone() } else { s2.clone() };
        tasks.push(tokio::spawn(
            async move { s.use_invitation("inv-single").await.unwrap() },
        ));
    }
    let mut uses = Vec::new();
    for t in tasks {
        uses.push(t.await.unwrap());
    }
    assert_eq!(
        uses.iter().filter(|u| **u == InvitationUse::FirstUse).count(),
        1,
        "{uses:?}"
    );
    assert_eq!(uses.iter().filter(|u| **u == InvitationUse::AlreadyUsed).count(), 9);
    assert_eq!(s2.use_invitation("inv-multi").await.unwrap(), InvitationUse::MultiUse);
    assert_eq!(s2.use_invitation("inv-multi").await.unwrap(), InvitationUse::MultiUse);
    assert_eq!(s1.use_invitation("never-issued").await.unwrap(), InvitationUse::Unknown);
}

pub async fn routing_keys(b: Arc<dyn Backend>) {
    let s = b.open().await;
    let missing = new_id();
    assert!(matches!(
        s.update_keys(&missing, &["x".into()], &[]).await,
        Err(StoreError::NotFound)
    ));
    let c1 = new_conn(&s).await;
    let c2 = new_conn(&s).await;
    let k = |s: &str| s.to_string();
    assert_eq!(
        s.update_keys(&c1, &[k("k2"), k("k1")], &[]).await.unwrap(),
        vec![(k("k2"), KeyUpdate::Added), (k("k1"), KeyUpdate::Added)]
    );
    assert_eq!(
        s.update_keys(&c1, &[k("k1")], &[]).await.unwrap(),
        vec![(k("k1"), KeyUpdate::AlreadyAdded)]
    );
    assert_eq!(
        s.update_keys(&c2, &[k("k1"), k("k3")], &[k("k2")]).await.unwrap(),
        vec![
            (k("k1"), KeyUpdate::HeldByOther),
            (k("k3"), KeyUpdate::Added),
            (k("k2"), KeyUpdate::NotFound)
        ]
    );
    assert_eq!(s.route("k1").await.unwrap(), Some(c1.clone()));
    assert_eq!(s.route("k2").await.unwrap(), Some(c1.clone()));
    assert_eq!(s.route("k3").await.unwrap(), Some(c2.clone()));
    assert_eq!(s.route("nope").await.unwrap(), None);
    assert_eq!(s.keys_of(&c1).await.unwrap(), vec![k("k1"), k("k2")]);
    assert_eq!(s.keys_of(&c2).await.unwrap(), vec![k("k3")]);
    assert_eq!(
        s.update_keys(&c1, &[], &[k("k1"), k("zz")]).await.unwrap(),
        vec![(k("k1"), KeyUpdate::Removed), (k("zz"), KeyUpdate::NotFound)]
    );
    assert_eq!(s.route("k1").await.unwrap(), None);
    assert_eq!(s.keys_of(&c1).await.unwrap(), vec![k("k2")]);
    assert_eq!(
        s.update_keys(&c2, &[k("k1")], &[]).await.unwrap(),
        vec![(k("k1"), KeyUpdate::Added)]
    );
    assert_eq!(s.route("k1").await.unwrap(), Some(c2.clone()));

    // Many connections race for one key: exactly one wins, the route names the winner.
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let s = s.clone();
        let c = new_conn(&s).await;
        tasks.push(tokio::spawn(async move {
            let r = s.update_keys(&c, &["contested".into()], &[]).await.unwrap();
            (c, r[0].1)
        }));
    }
    let mut winners = Vec::new();
    for t in tasks {
        let (c, r) = t.await.unwrap();
        match r {
            KeyUpdate::Added => winners.push(c),
            KeyUpdate::HeldByOther => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(winners.len(), 1);
    assert_eq!(s.route("contested").await.unwrap(), Some(winners[0].clone()));

    // Two connections update overlapping keys in opposite orders, many times: no deadlock, no
    // error, and every key ends up with exactly one holder.
    let (ca, cb) = (new_conn(&s).await, new_conn(&s).await);
    let keys: Vec<String> = (0..6).map(|i| format!("swap-{i}")).collect();
    let mut tasks = Vec::new();
    for (c, rev) in [(ca.clone(), false), (cb.clone(), true)] {
        let s = s.clone();
        let mut ks = keys.clone();
        if rev {
            ks.reverse();
        }
        tasks.push(tokio::spawn(async move {
            for _ in 0..20 {
                s.update_keys(&c, &ks, &[]).await.unwrap();
                s.update_keys(&c, &[], &ks).await.unwrap();
            }
            s.update_keys(&c, &ks, &[]).await.unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    for k in &keys {
        let holder = s.route(k).await.unwrap().unwrap();
        assert!(holder == ca || holder == cb);
    }
    let held = s.keys_of(&ca).await.unwrap().len() + s.keys_of(&cb).await.unwrap().len();
    assert_eq!(held, keys.len());
}

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
    assert_eq!(
        s.release_owners_under("").await.unwrap(),
        0,
        "an empty prefix frees nothing"
    );
    assert_eq!(s.release_owners_under("n_1/").await.unwrap(), 4);
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
    assert_eq!(s.release_owners_under("n_1/").await.unwrap(), 0);
    assert_eq!(s.release_owner("n_10/http").await.unwrap(), 1);
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

/// A peer key is claimed by one connection across every handle (node) of the store, even
/// when two claim it at once.
pub async fn peer_keys_are_unique_across_nodes(b: Arc<dyn Backend>) {
    let n1 = b.open().await;
    let n2 = b.open().await;
    for round in 0..10 {
        let key = format!("contested-{round}");
        let (x, y) = (new_id(), new_id());
        let mut cx = conn(&x);
        cx.their_verkeys = vec![format!("x-{round}"), key.clone()];
        let mut cy = conn(&y);
        cy.their_verkeys = vec![key.clone(), format!("y-{round}")];
        let (rx, ry) = tokio::join!(n1.put_connection(&cx), n2.put_connection(&cy));
        let ok = [rx.is_ok(), ry.is_ok()];
        assert_eq!(
            ok.iter().filter(|o| **o).count(),
            1,
            "exactly one claim wins: {rx:?} {ry:?}"
        );
        for r in [rx, ry] {
            if let Err(e) = r {
                assert!(matches!(e, StoreError::KeyTaken(ref k) if *k == key), "{e:?}");
            }
        }
        let winner = if ok[0] { &x } else { &y };
        for s in [&n1, &n2] {
            assert_eq!(&s.connection_by_their_verkey(&key).await.unwrap().unwrap().id, winner);
        }
    }
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
    let (r1, r2) = tokio::join!(
        s.enqueue(
            vec![msg(&c, "ok1", T0), bad_key, msg("con\0n", "y", T0), msg(&c, "ok2", T0)],
            &EnqueueLimits::UNLIMITED
        ),
        s.enqueue(vec![msg(&c, "ok3", T0)], &EnqueueLimits::UNLIMITED)
    );
    let r1 = r1.unwrap();
    assert!(r1[0].is_ok() && r1[3].is_ok() && r2.unwrap()[0].is_ok());
    assert!(matches!(r1[1], Err(StoreError::Invalid(_))), "{:?}", r1[1]);
    assert!(matches!(r1[2], Err(StoreError::Invalid(_))), "{:?}", r1[2]);
    assert_eq!(s.queue_stats(&c, T0).await.unwrap().pending, 3);

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

// ---------------------------------------------------------------------------------------------
// backends

/// Runs `check` on its own task so that a failure still lets the caller clean up.
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

pub async fn operator_removals(b: Arc<dyn Backend>) {
    let s = b.open().await;
    let a = new_conn(&s).await;
    let other = new_conn(&s).await;
    let limits = EnqueueLimits {
        dedup_window_ms: 60_000,
        ..EnqueueLimits::UNLIMITED
    };
    s.update_keys(&a, &["rk-a1".into(), "rk-a2".into()], &[]).await.unwrap();
    s.update_keys(&other, &["rk-o1".into()], &[]).await.unwrap();
    for (i, c) in [&a, &a, &a, &other].into_iter().enumerate() {
        let r = s
            .enqueue(vec![dmsg(c, "m", T0 + i as i64, i as u8)], &limits)
            .await
            .unwrap();
        assert!(r[0].is_ok());
    }
    // One of a's messages is leased: it goes too.
    assert_eq!(s.lease(&a, 1, "n1", T0, T0 + 60_000).await.unwrap().len(), 1);
    let dev = Device {
        service: PushService::Fcm,
        token: "tok".into(),
        platform: None,
        updated_at_ms: T0,
    };
    s.set_device(&a, Some(&dev)).await.unwrap();
    s.push_event(&a, T0, 1000).await.unwrap();

    // drop_queue: messages only.
    assert_eq!(s.drop_queue(&other).await.unwrap(), 1);
    assert_eq!(s.drop_queue(&other).await.unwrap(), 0, "idempotent");
    assert_eq!(s.queue_stats(&other, T0).await.unwrap().pending, 0);
    assert_eq!(s.route("rk-o1").await.unwrap(), Some(other.clone()), "keys stay");
    assert!(s.get_connection(&other).await.unwrap().is_some());
    let again = s.enqueue(vec![dmsg(&other, "m", T0 + 5, 3)], &limits).await.unwrap();
    assert!(again[0].as_ref().unwrap().duplicate, "dedup records stay");

    let top = s.top_queues(10).await.unwrap();
    assert_eq!(top.deepest.len(), 1);
    assert_eq!(top.deepest[0].connection, a);
    assert_eq!(top.deepest[0].depth, 3);
    assert_eq!(top.oldest[0].oldest_received_ms, Some(T0));

    // delete_connection: everything of a, nothing of other.
    let removed = s.delete_connection(&a).await.unwrap();
    assert_eq!(
        removed,
        Removed {
            connection: true,
            peer_keys: 1,
            routing_keys: 2,
            messages: 3,
            dedup_records: 3,
            device: true,
        }
    );
    assert_eq!(s.get_connection(&a).await.unwrap(), None);
    assert_eq!(
        s.connection_by_their_verkey(&format!("theirs-{a}")).await.unwrap(),
        None
    );
    assert_eq!(s.connection_by_thread(&format!("thread-{a}")).await.unwrap(), None);
    assert_eq!(s.route("rk-a1").await.unwrap(), None);
    assert_eq!(s.route("rk-a2").await.unwrap(), None);
    assert!(s.keys_of(&a).await.unwrap().is_empty());
    assert_eq!(s.queue_stats(&a, T0).await.unwrap(), QueueStats::default());
    assert_eq!(s.device_of(&a).await.unwrap(), None);
    assert_eq!(s.total_queued().await.unwrap(), 0);
    assert!(s
        .lease(&a, 10, "n2", T0 + 120_000, T0 + 180_000)
        .await
        .unwrap()
        .is_empty());
    assert!(s.top_queues(10).await.unwrap().deepest.is_empty());
    // Idempotent.
    assert_eq!(s.delete_connection(&a).await.unwrap(), Removed::default());
    assert_eq!(s.delete_connection("bad\0id").await.unwrap(), Removed::default());
    // Other connection untouched; a's keys are free for someone else; no key update on a.
    assert_eq!(s.route("rk-o1").await.unwrap(), Some(other.clone()));
    assert!(matches!(
        s.update_keys(&a, &["rk-a1".into()], &[]).await,
        Err(StoreError::NotFound)
    ));
    assert_eq!(
        s.update_keys(&other, &["rk-a1".into()], &[]).await.unwrap()[0].1,
        KeyUpdate::Added
    );
    // A new message for the same dedup key is queued again (its record went with a).
    let r = s.enqueue(vec![dmsg(&a, "m", T0 + 10, 0)], &limits).await.unwrap();
    assert!(!r[0].as_ref().unwrap().duplicate);
    // Removing again clears what was queued for the id since, without a connection.
    let removed = s.delete_connection(&a).await.unwrap();
    assert_eq!(
        (removed.connection, removed.messages, removed.dedup_records),
        (false, 1, 1)
    );
    // Durable: still gone after reopening.
    drop(s);
    let s = b.open().await;
    assert_eq!(s.get_connection(&a).await.unwrap(), None);
    assert_eq!(s.route("rk-a2").await.unwrap(), None);
    assert_eq!(s.total_queued().await.unwrap(), 0);
    assert_eq!(s.dedup_records().await.unwrap(), 1, "only other's record is left");
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
        tasks.push(tokio::spawn(
            async move { s.push_event(&c, T0 + i, 1000).await.unwrap() },
        ));
    }
    let mut now = 0;
    let mut dues = HashSet::new();
    for t in tasks {
        match t.await.unwrap() {
            PushSlot::Now => now += 1,
            PushSlot::Trailing { due_ms } => {
                dues.insert(due_ms);
            }
        }
    }
    assert_eq!(now, 1, "one push now across nodes");
    assert_eq!(dues.len(), 1, "one trailing push: {dues:?}");
    let due = *dues.iter().next().unwrap();
    assert!((T0 + 1000..T0 + 1016).contains(&due));
    assert!(n1.push_take_due(due - 1, 0, 100).await.unwrap().is_empty());
    // Due: taken by exactly one of the nodes polling at once.
    let (a, b2) = tokio::join!(n1.push_take_due(due, 0, 100), n2.push_take_due(due, 0, 100));
    let mut taken = a.unwrap();
    taken.extend(b2.unwrap());
    assert_eq!(taken, vec![c.clone()]);
    assert!(n1.push_take_due(due + 10, 0, 100).await.unwrap().is_empty());
    // The trailing push restarted the window.
    assert_eq!(
        n2.push_event(&c, due + 1, 1000).await.unwrap(),
        PushSlot::Trailing { due_ms: due + 1000 }
    );
    // An event after the window pushes now; the trailing push not yet taken is that push.
    assert_eq!(n1.push_event(&c, due + 5000, 1000).await.unwrap(), PushSlot::Now);
    assert!(n1.push_take_due(due + 6000, 0, 100).await.unwrap().is_empty());
    // No window: every event pushes.
    let d = new_id();
    assert_eq!(n1.push_event(&d, T0, 0).await.unwrap(), PushSlot::Now);
    assert_eq!(n2.push_event(&d, T0, 0).await.unwrap(), PushSlot::Now);
}

async fn run_check<F, Fut>(b: Arc<dyn Backend>, check: F) -> Result<(), tokio::task::JoinError>
where
    F: FnOnce(Arc<dyn Backend>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    tokio::spawn(check(b)).await
}

fn rethrow(r: Result<(), tokio::task::JoinError>) {
    if let Err(e) = r {
        match e.try_into_panic() {
            Ok(p) => std::panic::resume_unwind(p),
            Err(e) => panic!("check task failed: {e}"),
        }
    }
}

pub mod sled_backend {
    use super::*;

    pub struct SledBackend {
        pub dir: tempfile::TempDir,
    }

    #[async_trait::async_trait]
    impl Backend for SledBackend {
        async fn open(&self) -> Arc<dyn Store> {
            open_sled(self.dir.path()).await.expect("open sled store")
        }
    }

    const CRASH_DIR: &str = "MAILROOM_STORE_CRASH_DIR";
    const CRASH_TEST: &str = "store::conformance::sled_backend::enqueue_is_durable_when_it_returns";

    /// `enqueue` must not answer before its messages are on disk. A child process (this same
    /// test binary, re-run on this test with `MAILROOM_STORE_CRASH_DIR` set) enqueues from 16
    /// tasks, prints each id it got back, and exits abruptly mid-stream (no destructor, no
    /// final flush, sled's periodic flush disabled). The parent reopens the directory: every
    /// printed id must be there.
    #[test]
    fn enqueue_is_durable_when_it_returns() {
        match std::env::var(CRASH_DIR) {
            Ok(dir) => crash_child(std::path::Path::new(&dir)),
            Err(_) => crash_parent(),
        }
    }

    fn crash_child(dir: &std::path::Path) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let s = Arc::new(SledStore::open_without_background_flush(dir).await.unwrap());
            let c = "crash-conn".to_string();
            let acked = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            for t in 0..16 {
                let (s, c, acked) = (s.clone(), c.clone(), acked.clone());
                tokio::spawn(async move {
                    for i in 0.. {
                        let m = msg(&c, &format!("{t}-{i}"), T0);
                        let r = s.enqueue(vec![m], &EnqueueLimits::UNLIMITED).await.unwrap();
                        let id = r[0].as_ref().unwrap().id;
                        println!("ENQ {id}");
                        acked.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                });
            }
            while acked.load(std::sync::atomic::Ordering::SeqCst) < 2000 {
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
            // Crash: other enqueues are in flight.
            std::process::exit(0);
        });
    }

    fn crash_parent() {
        let dir = tempfile::tempdir().unwrap();
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([CRASH_TEST, "--exact", "--nocapture", "--test-threads=1"])
            .env(CRASH_DIR, dir.path())
            .output()
            .expect("run crash child");
        let stdout = String::from_utf8_lossy(&out.stdout);
        // Only whole lines: the child dies mid-write, so its last line may be cut short.
        let whole = match stdout.rfind('\n') {
            Some(i) => &stdout[..i],
            None => "",
        };
        let acked: Vec<MessageId> = whole
            .lines()
            .filter_map(|l| l.strip_prefix("ENQ "))
            .filter_map(|n| n.trim().parse().ok())
            .collect();
        assert!(
            // The child stops at 2000; a last line cut short is not counted.
            acked.len() >= 1000,
            "child acknowledged {} messages; stderr: {}",
            acked.len(),
            String::from_utf8_lossy(&out.stderr)
        );
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let s = open_sled(dir.path()).await.unwrap();
            let got = s.lease("crash-conn", 1_000_000, "o", T0, T0 + 1).await.unwrap();
            let have: HashSet<MessageId> = ids(&got).into_iter().collect();
            let lost: Vec<_> = acked.iter().filter(|id| !have.contains(id)).collect();
            assert!(
                lost.is_empty(),
                "{} acknowledged messages lost: {:?}",
                lost.len(),
                &lost[..lost.len().min(10)]
            );
            println!(
                "crash test: {} acknowledged, {} on disk after the crash",
                acked.len(),
                have.len()
            );
        });
    }

    /// A lease or acknowledgement that panics on the live path's thread fails alone: its caller
    /// gets an error, the thread goes on, and the next lease and acknowledgement are served.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panic_on_the_live_thread_fails_only_its_call() {
        let s = SledStore::temporary().await.unwrap();
        s.enqueue(vec![msg("c", "a", T0)], &EnqueueLimits::UNLIMITED)
            .await
            .unwrap();
        assert!(matches!(s.live_panic_for_test().await, Err(StoreError::Unavailable(_))));
        let got = s.lease("c", 10, "o", T0, T0 + 1_000).await.unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(s.ack_leased("c", &ids(&got)).await.unwrap().len(), 1);
        assert_eq!(s.total_queued().await.unwrap(), 0);
    }

    /// Ingest writes one record per forward: a queued message's record holds its dedup key,
    /// and the `dedup` tree gets a record only when a message leaves the queue inside its
    /// window (acknowledged here); pruning deletes it. Rebuilt from both at open.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ingest_writes_no_dedup_record() {
        let dir = tempfile::tempdir().unwrap();
        let lim = EnqueueLimits {
            dedup_window_ms: 60_000,
            ..EnqueueLimits::UNLIMITED
        };
        let s = SledStore::open_shared(dir.path()).await.unwrap();
        let batch: Vec<NewMessage> = (0..50u8).map(|i| dmsg("c", "m", T0, i)).collect();
        assert!(s
            .enqueue(batch, &lim)
            .await
            .unwrap()
            .iter()
            .all(|r| !r.as_ref().unwrap().duplicate));
        assert_eq!(s.dedup_tree_len_for_test(), 0, "no record beside the messages");
        assert_eq!(s.dedup_records().await.unwrap(), 50);
        let got = s.lease("c", 10, "o", T0, T0 + 1_000).await.unwrap();
        assert_eq!(s.ack_leased("c", &ids(&got)).await.unwrap().len(), 10);
        assert_eq!(s.dedup_tree_len_for_test(), 10, "the acknowledged keep theirs");
        drop(s);
        let s = SledStore::open_shared(dir.path()).await.unwrap();
        assert_eq!(
            s.dedup_records().await.unwrap(),
            50,
            "40 from messages, 10 from records"
        );
        assert_eq!(s.prune_dedup(T0 + 1, 100).await.unwrap(), 50);
        assert_eq!(s.dedup_tree_len_for_test(), 0);
        // Acknowledged after its entry was pruned: no record comes back.
        let got = s.lease("c", 100, "o", T0, T0 + 1_000).await.unwrap();
        assert_eq!(s.ack_leased("c", &ids(&got)).await.unwrap().len(), 40);
        assert_eq!(s.dedup_tree_len_for_test(), 0);
    }

    /// In-process nodes opening one path share one store (sled allows one handle per
    /// directory): both see the same data and the same leases; once all are dropped the path
    /// opens again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn same_path_opened_twice_is_one_store() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = tokio::join!(open_sled(dir.path()), open_sled(dir.path()));
        let (a, b) = (a.unwrap(), b.unwrap());
        let c = new_conn(&a).await;
        assert!(b.get_connection(&c).await.unwrap().is_some());
        let id = enqueue_ok(&a, vec![msg(&c, "m", T0)]).await;
        assert_eq!(ids(&b.lease(&c, 10, "n2", T0, T0 + 1000).await.unwrap()), id);
        assert!(a.lease(&c, 10, "n1", T0, T0 + 1000).await.unwrap().is_empty());
        drop(a);
        drop(b);
        let again = open_sled(dir.path()).await.unwrap();
        assert_eq!(again.total_queued().await.unwrap(), 1);
    }

    pub async fn run<F, Fut>(check: F)
    where
        F: FnOnce(Arc<dyn Backend>) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let b = Arc::new(SledBackend {
            dir: tempfile::tempdir().expect("tempdir"),
        });
        rethrow(run_check(b, check).await);
    }
}

/// The stack a node puts over its store (`src/node.rs`): the route cache over the latency
/// histograms over sled. The wrappers pass most calls through ([`store_pass_through!`](crate::store_pass_through)); the
/// whole suite on them shows that each passed call reaches the same method of the store.
pub mod layered_backend {
    use super::*;

    pub struct LayeredBackend {
        sled: sled_backend::SledBackend,
    }

    #[async_trait::async_trait]
    impl Backend for LayeredBackend {
        async fn open(&self) -> Arc<dyn Store> {
            let latency = metered::latency_family();
            route_cache::RouteCache::wrap(metered::Metered::wrap(self.sled.open().await, latency))
        }
    }

    pub async fn run<F, Fut>(check: F)
    where
        F: FnOnce(Arc<dyn Backend>) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let b = Arc::new(LayeredBackend {
            sled: sled_backend::SledBackend {
                dir: tempfile::tempdir().expect("tempdir"),
            },
        });
        rethrow(run_check(b, check).await);
    }
}

pub mod pg_backend {
    use super::*;

    /// Server URL without database; the checks make their own database on it.
    fn server_url() -> String {
        std::env::var("MAILROOM_TEST_PG").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".to_owned())
    }

    async fn admin() -> tokio_postgres::Client {
        let url = format!("{}/postgres", server_url());
        let (client, conn) = match tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
            Ok(c) => c,
            Err(e) => panic!(
                "PostgreSQL is not reachable at {url} ({e}); the PostgreSQL conformance tests \
                 need it. Start it with `pg_ctlcluster --skip-systemctl-redirect \
                 $(ls /etc/postgresql) main start` or set MAILROOM_TEST_PG"
            ),
        };
        tokio::spawn(conn);
        client
    }

    /// Drops test databases left by test processes that died before their cleanup (killed on
    /// a timeout): `mailroom_test_<pid>_<hex>` whose pid no longer runs on this machine.
    async fn drop_leftovers(admin: &tokio_postgres::Client) {
        let rows = admin
            .query(
                "SELECT datname FROM pg_database WHERE datname LIKE 'mailroom\\_test\\_%'",
                &[],
            )
            .await
            .expect("list test databases");
        for r in rows {
            let name: String = r.get(0);
            let mut parts = name.trim_start_matches("mailroom_test_").splitn(2, '_');
            let (Some(pid), Some(rand)) = (parts.next(), parts.next()) else {
                continue;
            };
            let well_formed = pid.chars().all(|c| c.is_ascii_digit())
                && rand.len() == 32
                && rand.chars().all(|c| c.is_ascii_hexdigit());
            if well_formed && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                // Another run may be dropping it at the same moment: ignore errors.
                let _ = admin
                    .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .await;
            }
        }
    }

    /// `mailroom_test_<pid>_<random>` (a later run drops it if this process dies first).
    fn test_db_name() -> String {
        format!("mailroom_test_{}_{}", std::process::id(), uuid::Uuid::new_v4().simple())
    }

    async fn drop_test_db(name: &str) {
        admin()
            .await
            .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .await
            .expect("drop test database");
    }

    /// `sql` run under `EXPLAIN ANALYZE` (in a transaction rolled back: a lease's update is
    /// not kept): the rows its plan removed by filter, and the plan.
    async fn rows_removed_by_filter(
        db: &tokio_postgres::Client,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> (u64, String) {
        db.batch_execute("BEGIN").await.unwrap();
        let plan: Vec<String> = db
            .query(&format!("EXPLAIN (ANALYZE, FORMAT TEXT) {sql}"), params)
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        db.batch_execute("ROLLBACK").await.unwrap();
        let removed = plan
            .iter()
            .filter_map(|l| l.trim().strip_prefix("Rows Removed by Filter: "))
            .map(|n| n.parse::<u64>().unwrap())
            .sum();
        (removed, plan.join("\n"))
    }

    pub struct PgBackend {
        pub url: String,
    }

    #[async_trait::async_trait]
    impl Backend for PgBackend {
        async fn open(&self) -> Arc<dyn Store> {
            open_postgres(&self.url, 8).await.expect("open postgres store")
        }
    }

    /// Creates `mailroom_test_<pid>_<random>`, runs the check, drops the database.
    pub async fn run<F, Fut>(check: F)
    where
        F: FnOnce(Arc<dyn Backend>) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let name = test_db_name();
        let admin = admin().await;
        drop_leftovers(&admin).await;
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create test database");
        let b = Arc::new(PgBackend {
            url: format!("{}/{name}", server_url()),
        });
        let r = run_check(b, check).await;
        admin
            .batch_execute(&format!("DROP DATABASE {name} WITH (FORCE)"))
            .await
            .expect("drop test database");
        rethrow(r);
    }

    /// A node pointed at a database that does not exist yet creates it (several at once).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn missing_database_is_created() {
        let name = test_db_name();
        let url = format!("{}/{name}", server_url());
        let (a, b) = tokio::join!(open_postgres(&url, 2), open_postgres(&url, 2));
        let r = async {
            let (a, b) = (a?, b?);
            a.health().await?;
            let c = new_id();
            a.put_connection(&conn(&c)).await?;
            assert!(b.get_connection(&c).await?.is_some());
            Ok::<_, StoreError>(())
        }
        .await;
        drop_test_db(&name).await;
        r.unwrap();
    }

    /// A store written by an older version (one peer key listed by two connections; queue
    /// counters that drifted while migration 3 ran beside older writers) is repaired by
    /// migration 4: the latest holder keeps the key, counters are recounted.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn migration_4_makes_keys_unique_and_recounts_queues() {
        let name = test_db_name();
        let admin = admin().await;
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create test database");
        let url = format!("{}/{name}", server_url());
        let r = async move {
            let (c, conn_task) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
            tokio::spawn(conn_task);
            c.batch_execute(
                "CREATE TABLE mailroom_schema (version integer PRIMARY KEY, \
                 applied_at timestamptz NOT NULL DEFAULT now())",
            )
            .await
            .unwrap();
            for (v, sql) in super::super::postgres::MIGRATIONS.iter().filter(|(v, _)| *v <= 3) {
                c.batch_execute(sql).await.unwrap();
                c.execute("INSERT INTO mailroom_schema (version) VALUES ($1)", &[v])
                    .await
                    .unwrap();
            }
            let mut old = conn("old");
            old.their_verkeys = vec!["vk".into(), "vk-old".into()];
            let mut new = conn("new");
            new.their_verkeys = vec!["vk".into()];
            for (c_, written) in [(&old, 1i64), (&new, 2)] {
                c.execute(
                    "INSERT INTO mailroom_connections (id, thread_id, written, data) VALUES ($1, NULL, $2, $3)",
                    &[&c_.id, &written, &serde_json::to_string(c_).unwrap()],
                )
                .await
                .unwrap();
            }
            c.batch_execute(
                "INSERT INTO mailroom_connection_verkeys VALUES ('vk', 'old'), ('vk', 'new'), ('vk-old', 'old'); \
                 INSERT INTO mailroom_messages (id, conn_id, recipient_key, payload, size, received_at_ms) \
                   VALUES (nextval('mailroom_message_ids'), 'new', 'rk', '\\x00', 1, 0), (nextval('mailroom_message_ids'), 'new', 'rk', '\\x0000', 2, 0); \
                 UPDATE mailroom_queue_counts SET n = 7, bytes = 70",
            )
            .await
            .unwrap();
            let s = open_postgres(&url, 2).await.unwrap();
            assert_eq!(s.connection_by_their_verkey("vk").await.unwrap().unwrap().id, "new");
            assert_eq!(s.connection_by_their_verkey("vk-old").await.unwrap().unwrap().id, "old");
            assert!(matches!(s.put_connection(&old).await, Err(StoreError::KeyTaken(_))));
            // Counters recounted: 2 queued, so a limit of 3 takes exactly one more.
            let lim = EnqueueLimits {
                max_messages: 3,
                ..EnqueueLimits::UNLIMITED
            };
            let r = s
                .enqueue(vec![msg("new", "a", T0), msg("new", "b", T0)], &lim)
                .await
                .unwrap();
            assert!(r[0].is_ok(), "{:?}", r[0]);
            assert!(
                matches!(r[1], Err(StoreError::QueueFull { pending: 3, .. })),
                "{:?}",
                r[1]
            );
        };
        let r = tokio::spawn(r).await;
        admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .await
            .expect("drop test database");
        r.unwrap();
    }

    /// A lease reads the connection's pending messages and its leases that ran out, never the
    /// messages it holds leased and not yet due (migration 9): with 1,999 of them ahead of the
    /// one pending message, the statement's plan removes (almost) no row by filter. Through the
    /// `(conn_id, id)` index alone it read all 1,999 first, on every lease.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lease_never_reads_messages_leased_and_not_due() {
        let name = test_db_name();
        let url = format!("{}/{name}", server_url());
        // Spawned: a failed assertion still drops the database below.
        let r = tokio::spawn(async move {
            let s = open_postgres(&url, 2).await.unwrap();
            let c = new_conn(&s).await;
            let m = (0..2000).map(|i| msg(&c, &format!("{i}"), T0)).collect();
            enqueue_ok(&s, m).await;
            assert_eq!(s.lease(&c, 1999, "A", T0, T0 + 60_000).await.unwrap().len(), 1999);
            let (db, conn_task) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
            tokio::spawn(conn_task);
            let (removed, plan) = rows_removed_by_filter(
                &db,
                super::super::postgres::LEASE_SQL,
                &[
                    &vec![c.as_str()],
                    &vec![None::<&str>],
                    &vec![10i64],
                    &vec![T0 + 1],
                    &vec![T0 + 1000],
                    &vec!["B"],
                ],
            )
            .await;
            assert!(removed < 50, "the lease read {removed} rows it could not take:\n{plan}");
            // And it takes the one pending message, then the first of those whose lease ran out.
            let got = s.lease(&c, 10, "B", T0 + 1, T0 + 1000).await.unwrap();
            assert_eq!(
                got.iter().map(|q| q.payload.clone()).collect::<Vec<_>>(),
                vec![b"1999".to_vec()]
            );
            let due = s.lease(&c, 2, "C", T0 + 60_000, T0 + 61_000).await.unwrap();
            assert_eq!(
                due.iter().map(|q| q.payload.clone()).collect::<Vec<_>>(),
                vec![b"0".to_vec(), b"1".to_vec()]
            );
            assert!(due.iter().all(|q| q.attempts == 2));
        })
        .await;
        drop_test_db(&name).await;
        if let Err(e) = r {
            std::panic::resume_unwind(e.into_panic());
        }
    }

    /// The pickup status that answers every acknowledgement reads what a lease reads, never
    /// the messages held leased and not due: with 1,999 of them beside one pending message
    /// its plan removes (almost) no row by filter. Counting the whole queue read all 1,999.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_pickup_status_never_reads_messages_leased_and_not_due() {
        let name = test_db_name();
        let url = format!("{}/{name}", server_url());
        // Spawned: a failed assertion still drops the database below.
        let r = tokio::spawn(async move {
            let s = open_postgres(&url, 2).await.unwrap();
            let c = new_conn(&s).await;
            let m = (0..2000).map(|i| msg(&c, &format!("{i}"), T0 + i)).collect();
            enqueue_ok(&s, m).await;
            assert_eq!(s.lease(&c, 1999, "A", T0, T0 + 60_000).await.unwrap().len(), 1999);
            let (db, conn_task) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
            tokio::spawn(conn_task);
            for key in [None, Some(format!("rk-{c}"))] {
                let (removed, plan) = rows_removed_by_filter(
                    &db,
                    super::super::postgres::PENDING_STATS_SQL,
                    &[&c.as_str(), &(T0 + 1), &key.as_deref()],
                )
                .await;
                assert!(
                    removed < 50,
                    "the status ({key:?}) read {removed} rows it does not count:\n{plan}"
                );
            }
            assert_eq!(
                s.pending_stats(&c, None, T0 + 1).await.unwrap(),
                PendingStats {
                    count: 1,
                    oldest_received_ms: Some(T0 + 1999)
                }
            );
        })
        .await;
        drop_test_db(&name).await;
        if let Err(e) = r {
            std::panic::resume_unwind(e.into_panic());
        }
    }

    /// Several pools (nodes) open one fresh database at once: migrations apply once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_open_migrates_once() {
        run(|b| async move {
            let mut tasks = Vec::new();
            for _ in 0..4 {
                let b = b.clone();
                tasks.push(tokio::spawn(async move { b.open().await }));
            }
            let mut stores = Vec::new();
            for t in tasks {
                stores.push(t.await.unwrap());
            }
            for s in &stores {
                s.health().await.unwrap();
                assert_eq!(s.backend(), "postgres");
            }
            // Two nodes on one queue: leases never overlap across pools either.
            let c = new_conn(&stores[0]).await;
            let m = (0..50).map(|i| msg(&c, &format!("{i}"), T0)).collect();
            enqueue_ok(&stores[1], m).await;
            let (a, b2) = tokio::join!(
                stores[2].lease(&c, 50, "n2", T0, T0 + 1000),
                stores[3].lease(&c, 50, "n3", T0, T0 + 1000)
            );
            let (a, b2) = (a.unwrap(), b2.unwrap());
            assert_eq!(a.len() + b2.len(), 50);
            let ia: HashSet<_> = ids(&a).into_iter().collect();
            assert!(ids(&b2).iter().all(|i| !ia.contains(i)));
        })
        .await
    }
}

macro_rules! conformance {
    ($name:ident, $backend:ident) => {
        mod $name {
            use super::$backend as backend;
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn identity_race() {
                backend::run(super::identity_race).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn connection_crud_and_indexes() {
                backend::run(super::connection_crud_and_indexes).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn connection_patches_do_not_overwrite_each_other() {
                backend::run(super::connection_patches_do_not_overwrite_each_other).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn single_use_invitations_are_claimed_once() {
                backend::run(super::single_use_invitations_are_claimed_once).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn routing_keys() {
                backend::run(super::routing_keys).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn enqueue_fifo() {
                backend::run(super::enqueue_fifo).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn durability_across_reopen() {
                backend::run(super::durability_across_reopen).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn lease_ack_release() {
                backend::run(super::lease_ack_release).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn queued_leased() {
                backend::run(super::queued_leased).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn release_owners_under() {
                backend::run(super::release_owners_under).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn lease_expiry() {
                backend::run(super::lease_expiry).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn ack_is_scoped_to_connection() {
                backend::run(super::ack_is_scoped_to_connection).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn pending_for_key_counts_one_recipient() {
                backend::run(super::pending_for_key_counts_one_recipient).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn pending_stats_counts_what_a_lease_could_take() {
                backend::run(super::pending_stats_counts_what_a_lease_could_take).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn concurrent_leasers_never_share() {
                backend::run(super::concurrent_leasers_never_share).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn concurrent_writers_on_same_rows() {
                backend::run(super::concurrent_writers_on_same_rows).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn limits_and_dedup_hold_across_nodes() {
                backend::run(super::limits_and_dedup_hold_across_nodes).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn queue_limits() {
                backend::run(super::queue_limits).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn batch_decides_each_message_in_order() {
                backend::run(super::batch_decides_each_message_in_order).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn routed_enqueue_checks_the_route() {
                backend::run(super::routed_enqueue_checks_the_route).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn concurrent_leases_of_many_connections() {
                backend::run(super::concurrent_leases_of_many_connections).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn dedup_window() {
                backend::run(super::dedup_window).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn dedup_outlives_its_message_across_reopen() {
                backend::run(super::dedup_outlives_its_message_across_reopen).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn recipient_key_filters() {
                backend::run(super::recipient_key_filters).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn dedup_records_are_pruned() {
                backend::run(super::dedup_records_are_pruned).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn peer_keys_are_unique_across_nodes() {
                backend::run(super::peer_keys_are_unique_across_nodes).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn expire_old_messages() {
                backend::run(super::expire_old_messages).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sender_expiry() {
                backend::run(super::sender_expiry).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn pending_sweep_and_stats() {
                backend::run(super::pending_sweep_and_stats).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn unstorable_input_is_refused_alone() {
                backend::run(super::unstorable_input_is_refused_alone).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn device_registrations() {
                backend::run(super::device_registrations).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn operator_removals() {
                backend::run(super::operator_removals).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn push_windows_are_shared() {
                backend::run(super::push_windows_are_shared).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn group_commit_throughput() {
                backend::run(super::group_commit_throughput).await
            }
        }
    };
}

conformance!(sled, sled_backend);
conformance!(postgres, pg_backend);
conformance!(layered, layered_backend);
