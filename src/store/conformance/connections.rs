//! Identity, connections and their indexes, invitations, routing keys, peer keys, removals.

use super::*;

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

/// Several connections naming one thread (ids come from the peer): a lookup by thread
/// answers the one most recently written, a patch and a revocation counting as writes, the
/// same on every backend.
pub async fn connection_by_thread_takes_the_latest_write(b: Arc<dyn Backend>) {
    let s = b.open().await;
    let (x, y) = (new_id(), new_id());
    let thread = format!("thread-{}", new_id());
    let mut cx = conn(&x);
    cx.thread_id = Some(thread.clone());
    let mut cy = conn(&y);
    cy.thread_id = Some(thread.clone());
    let by_thread = || async { s.connection_by_thread(&thread).await.unwrap().map(|c| c.id) };
    s.put_connection(&cx).await.unwrap();
    s.put_connection(&cy).await.unwrap();
    assert_eq!(by_thread().await, Some(y.clone()), "the later put");
    let patch = ConnectionPatch {
        state: Some("completed".into()),
        updated_at_ms: T0 + 1,
        ..ConnectionPatch::default()
    };
    s.update_connection(&x, &patch).await.unwrap().unwrap();
    assert_eq!(by_thread().await, Some(x.clone()), "a patch is a write");
    s.revoke_mediation(&y, T0 + 2).await.unwrap().unwrap();
    assert_eq!(by_thread().await, Some(y.clone()), "a revocation is a write");
    s.put_connection(&cx).await.unwrap();
    assert_eq!(by_thread().await, Some(x.clone()));
    s.delete_connection(&x).await.unwrap();
    assert_eq!(by_thread().await, Some(y.clone()), "the other holder stays findable");
    cy.thread_id = None;
    s.put_connection(&cy).await.unwrap();
    assert_eq!(by_thread().await, None);
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

/// A single-use invitation is claimed once, even by racing handshakes on several nodes, and
/// stays its claimant's: the claimant's retry (its connection not written after the claim)
/// claims it again, on any node; nobody else ever does.
pub async fn single_use_invitations_are_claimed_once(b: Arc<dyn Backend>) {
    let s1 = b.open().await;
    let s2 = b.open().await;
    s1.put_invitation("inv-single", true, T0).await.unwrap();
    s1.put_invitation("inv-multi", false, T0).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..10 {
        let s = if i % 2 == 0 { s1.clone() } else { s2.clone() };
        tasks.push(tokio::spawn(async move {
            let claimant = format!("key-{i}");
            (
                claimant.clone(),
                s.use_invitation("inv-single", &claimant).await.unwrap(),
            )
        }));
    }
    let mut uses = Vec::new();
    for t in tasks {
        uses.push(t.await.unwrap());
    }
    let first: Vec<_> = uses.iter().filter(|(_, u)| *u == InvitationUse::FirstUse).collect();
    assert_eq!(first.len(), 1, "{uses:?}");
    assert_eq!(uses.iter().filter(|(_, u)| *u == InvitationUse::AlreadyUsed).count(), 9);
    let winner = first[0].0.clone();
    for s in [&s1, &s2] {
        assert_eq!(
            s.use_invitation("inv-single", &winner).await.unwrap(),
            InvitationUse::FirstUse,
            "the claimant's retry"
        );
        for (other, _) in uses.iter().filter(|(k, _)| *k != winner) {
            assert_eq!(
                s.use_invitation("inv-single", other).await.unwrap(),
                InvitationUse::AlreadyUsed
            );
        }
        assert_eq!(
            s.use_invitation("inv-single", "").await.unwrap(),
            InvitationUse::AlreadyUsed
        );
    }
    assert_eq!(
        s2.use_invitation("inv-multi", "key-0").await.unwrap(),
        InvitationUse::MultiUse
    );
    assert_eq!(
        s2.use_invitation("inv-multi", "key-1").await.unwrap(),
        InvitationUse::MultiUse
    );
    assert_eq!(
        s1.use_invitation("never-issued", "key-0").await.unwrap(),
        InvitationUse::Unknown
    );
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

    // Revoked mediation: the operator's revocation is a patch; an addition after it is
    // refused by the store itself (a keylist update that read the connection before the
    // revocation cannot leave a key behind), a removal still works.
    let cr = new_conn(&s).await;
    s.update_keys(&cr, &[k("kept-before")], &[]).await.unwrap();
    let patch = ConnectionPatch {
        mediation: Some(MediationState::Denied),
        updated_at_ms: 1,
        ..ConnectionPatch::default()
    };
    assert!(s.update_connection(&cr, &patch).await.unwrap().is_some());
    // A grant read before the revocation (a mediate-request racing with it) does not undo it.
    let regrant = ConnectionPatch {
        mediation: Some(MediationState::Granted),
        updated_at_ms: 2,
        ..ConnectionPatch::default()
    };
    let after = s.update_connection(&cr, &regrant).await.unwrap().unwrap();
    assert_eq!(after.mediation, MediationState::Denied);
    assert_eq!(
        s.get_connection(&cr).await.unwrap().unwrap().mediation,
        MediationState::Denied
    );
    assert_eq!(
        s.update_keys(&cr, &[k("after-revocation")], &[k("kept-before")])
            .await
            .unwrap(),
        vec![
            (k("after-revocation"), KeyUpdate::Revoked),
            (k("kept-before"), KeyUpdate::Removed)
        ]
    );
    assert_eq!(s.route("after-revocation").await.unwrap(), None);
    assert!(s.keys_of(&cr).await.unwrap().is_empty());

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

/// [`Store::route_long_forms`]: the keys `short:...` exactly (not `short` itself, nor a key
/// that merely starts with `short`), in key order, at most `limit`, never one held by a
/// connection whose mediation is revoked (whatever a granted connection's label says).
/// A key as long as a did:peer:2 with a few services (8,000 bytes of text that does not
/// compress) is stored and routed, or refused as the client's input (`Invalid`: 400), never a
/// store failure (503: the wallet would retry for ever). PostgreSQL's index takes at most
/// ~2.7 KB an entry; before, its error was answered 503.
pub async fn a_key_too_long_to_index_is_the_clients_input(b: Arc<dyn Backend>) {
    let s = b.open().await;
    let c = new_conn(&s).await;
    let long: String = (0..250).map(|_| uuid::Uuid::new_v4().simple().to_string()).collect();
    match s.update_keys(&c, std::slice::from_ref(&long), &[]).await {
        Ok(out) => {
            assert_eq!(out, vec![(long.clone(), KeyUpdate::Added)]);
            assert_eq!(s.route(&long).await.unwrap(), Some(c));
        }
        Err(StoreError::Invalid(_)) => {}
        Err(e) => panic!("a key the store cannot index is the client's input, not a store failure: {e}"),
    }
}

pub async fn routing_keys_by_long_form_prefix(b: Arc<dyn Backend>) {
    let s = b.open().await;
    let short = format!("did:peer:4zQm{}", new_id().replace('-', ""));
    let k = |tail: &str| format!("{short}{tail}");
    let (c1, c2, c3) = (new_conn(&s).await, new_conn(&s).await, new_conn(&s).await);
    for (c, keys) in [
        // '9' sorts just before ':', ';' just after, '\u{e9}' far after: none of them is `short:`.
        (&c1, vec![k(":doc-b"), k("9:doc"), k("x:doc")]),
        (&c2, vec![short.clone(), k(":doc-a"), k(";doc"), k("\u{e9}:doc")]),
        (&c3, vec![k(":doc-c\u{e9}"), format!("x{short}:doc")]),
    ] {
        let r = s.update_keys(c, &keys, &[]).await.unwrap();
        assert!(r.iter().all(|(_, u)| *u == KeyUpdate::Added), "{r:?}");
    }
    let pair = |key: String, c: &String| (key, c.clone());
    let all = vec![
        pair(k(":doc-a"), &c2),
        pair(k(":doc-b"), &c1),
        pair(k(":doc-c\u{e9}"), &c3),
    ];
    assert_eq!(s.route_long_forms(&short, 10).await.unwrap(), all);
    assert_eq!(s.route_long_forms(&short, 2).await.unwrap(), all[..2].to_vec());
    assert_eq!(s.route_long_forms(&short, 0).await.unwrap(), vec![]);
    // A longer or shorter prefix is another DID.
    assert_eq!(
        s.route_long_forms(&k("x"), 10).await.unwrap(),
        vec![pair(k("x:doc"), &c1)]
    );
    assert_eq!(s.route_long_forms(&short[..short.len() - 1], 10).await.unwrap(), vec![]);
    assert_eq!(s.route_long_forms("bad\0", 10).await.unwrap(), vec![]);

    // A revoked connection's key is left out while the connection still holds it.
    let deny = ConnectionPatch {
        mediation: Some(MediationState::Denied),
        updated_at_ms: T0,
        ..ConnectionPatch::default()
    };
    assert!(s.update_connection(&c1, &deny).await.unwrap().is_some());
    assert_eq!(s.route(&k(":doc-b")).await.unwrap(), Some(c1.clone()), "still held");
    assert_eq!(
        s.route_long_forms(&short, 10).await.unwrap(),
        vec![all[0].clone(), all[2].clone()]
    );
    // A granted connection whose own fields read `"mediation":"Denied"` is not revoked.
    let mut t = conn(&new_id());
    t.mediation = MediationState::Granted;
    t.label = Some("\"mediation\":\"Denied\"".into());
    t.extra = serde_json::json!({"mediation": "Denied"});
    s.put_connection(&t).await.unwrap();
    s.update_keys(&t.id, &[k(":doc-d")], &[]).await.unwrap();
    assert_eq!(
        s.route_long_forms(&short, 10).await.unwrap(),
        vec![all[0].clone(), all[2].clone(), pair(k(":doc-d"), &t.id)]
    );
}

/// The operator's revocation ([`Store::revoke_mediation`]): the state and every routing key of
/// the connection in one step. Routed enqueues racing with it (many tasks, as from many nodes)
/// are queued before it or refused: none started after it returned is queued, and every
/// message queued was answered `Ok`.
pub async fn revoking_mediation_is_one_step(b: Arc<dyn Backend>) {
    let s = b.open().await;
    assert_eq!(s.revoke_mediation(&new_id(), T0).await.unwrap(), None);
    assert_eq!(s.revoke_mediation("bad\0id", T0).await.unwrap(), None);
    let k = |s: &str| s.to_string();
    let (c, other) = (new_conn(&s).await, new_conn(&s).await);
    let grant = ConnectionPatch {
        mediation: Some(MediationState::Granted),
        updated_at_ms: T0 + 1,
        ..ConnectionPatch::default()
    };
    s.update_connection(&c, &grant).await.unwrap().unwrap();
    s.update_keys(&c, &[k("rv-b"), k("rv-a")], &[]).await.unwrap();
    s.update_keys(&other, &[k("rv-o")], &[]).await.unwrap();
    assert_eq!(s.route("rv-a").await.unwrap(), Some(c.clone()));

    assert_eq!(
        s.revoke_mediation(&c, T0 + 5).await.unwrap(),
        Some(vec![k("rv-a"), k("rv-b")])
    );
    let after = s.get_connection(&c).await.unwrap().unwrap();
    assert_eq!(after.mediation, MediationState::Denied);
    assert_eq!(after.updated_at_ms, T0 + 5);
    assert_eq!(s.route("rv-a").await.unwrap(), None);
    assert_eq!(s.route("rv-b").await.unwrap(), None);
    assert!(s.keys_of(&c).await.unwrap().is_empty());
    assert_eq!(
        s.route("rv-o").await.unwrap(),
        Some(other.clone()),
        "other connections keep theirs"
    );
    let r = s
        .enqueue_routed(
            vec![NewMessage {
                recipient_key: k("rv-a"),
                ..msg(&c, "after", T0)
            }],
            &EnqueueLimits::UNLIMITED,
        )
        .await
        .unwrap();
    assert!(matches!(r[0], Err(StoreError::NoRoute)), "{:?}", r[0]);
    // Final: no key comes back, no grant undoes it.
    assert_eq!(
        s.update_keys(&c, &[k("rv-c")], &[]).await.unwrap(),
        vec![(k("rv-c"), KeyUpdate::Revoked)]
    );
    let regrant = ConnectionPatch {
        updated_at_ms: T0 + 6,
        ..grant.clone()
    };
    assert_eq!(
        s.update_connection(&c, &regrant).await.unwrap().unwrap().mediation,
        MediationState::Denied
    );
    // Nor a whole record read before the revocation and written back after it (a v2 DID
    // rotation): it is written, still denied.
    let mut stale = s.get_connection(&c).await.unwrap().unwrap();
    stale.mediation = MediationState::Granted;
    stale.label = Some("rotated".into());
    s.put_connection(&stale).await.unwrap();
    let back = s.get_connection(&c).await.unwrap().unwrap();
    assert_eq!(back.label.as_deref(), Some("rotated"));
    assert_eq!(
        back.mediation,
        MediationState::Denied,
        "put_connection undid a revocation"
    );
    // Idempotent; and it removes what a connection denied some other way still holds.
    assert_eq!(s.revoke_mediation(&c, T0 + 7).await.unwrap(), Some(vec![]));
    let d = new_conn(&s).await;
    s.update_keys(&d, &[k("rv-d")], &[]).await.unwrap();
    let deny = ConnectionPatch {
        mediation: Some(MediationState::Denied),
        updated_at_ms: T0,
        ..ConnectionPatch::default()
    };
    s.update_connection(&d, &deny).await.unwrap().unwrap();
    assert_eq!(s.revoke_mediation(&d, T0).await.unwrap(), Some(vec![k("rv-d")]));
    assert_eq!(s.route("rv-d").await.unwrap(), None);
    // The keys are free for someone else.
    assert_eq!(
        s.update_keys(&other, &[k("rv-a")], &[]).await.unwrap(),
        vec![(k("rv-a"), KeyUpdate::Added)]
    );

    // Racing with routed enqueues.
    let e = new_conn(&s).await;
    let ke = format!("rv-e-{e}");
    s.update_keys(&e, std::slice::from_ref(&ke), &[]).await.unwrap();
    let revoked = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for t in 0..4 {
        let (s, e, ke, revoked) = (s.clone(), e.clone(), ke.clone(), revoked.clone());
        tasks.push(tokio::spawn(async move {
            let mut queued = 0u64;
            for i in 0..100 {
                let after = revoked.load(std::sync::atomic::Ordering::SeqCst);
                let m = NewMessage {
                    recipient_key: ke.clone(),
                    ..msg(&e, &format!("{t}-{i}"), T0)
                };
                match s
                    .enqueue_routed(vec![m], &EnqueueLimits::UNLIMITED)
                    .await
                    .unwrap()
                    .remove(0)
                {
                    Ok(_) => {
                        assert!(!after, "queued for a connection revoked before the call");
                        queued += 1;
                    }
                    Err(StoreError::NoRoute) => {}
                    Err(e) => panic!("{e}"),
                }
            }
            queued
        }));
    }
    while s.queue_stats(&e, T0).await.unwrap().pending < 20 {
        tokio::task::yield_now().await;
    }
    assert_eq!(s.revoke_mediation(&e, T0).await.unwrap(), Some(vec![ke.clone()]));
    revoked.store(true, std::sync::atomic::Ordering::SeqCst);
    let at_revocation = s.queue_stats(&e, T0).await.unwrap().pending;
    let mut answered_ok = 0;
    for t in tasks {
        answered_ok += t.await.unwrap();
    }
    let held = s.queue_stats(&e, T0).await.unwrap().pending;
    assert_eq!(held, at_revocation, "nothing queued once the revocation returned");
    assert_eq!(
        held, answered_ok,
        "every message queued was answered Ok, and only those"
    );

    // Durable.
    drop(s);
    let s = b.open().await;
    assert_eq!(
        s.get_connection(&c).await.unwrap().unwrap().mediation,
        MediationState::Denied
    );
    assert_eq!(s.route("rv-b").await.unwrap(), None);
    assert_eq!(s.route(&ke).await.unwrap(), None);
}

/// A DID rotation is a patch of the stored record: the peer-key index follows it, a new DID
/// another connection holds refuses it whole, and a connection deleted before it is not put
/// back (a rotation racing the operator's `DELETE /connections/{id}`).
pub async fn a_rotation_patch_moves_peer_keys_and_creates_nothing(b: Arc<dyn Backend>) {
    let s = b.open().await;
    let id = new_id();
    let mut c = conn(&id);
    c.their_did = Some("did:old".into());
    c.their_verkeys = vec!["did:old".into(), "kept".into()];
    s.put_connection(&c).await.unwrap();
    let rotate = |old: &str, new: &str| ConnectionPatch {
        rotate_did: Some((old.into(), new.into())),
        updated_at_ms: T0 + 5,
        ..ConnectionPatch::default()
    };
    let holder = |k: &'static str| {
        let s = s.clone();
        async move { s.connection_by_their_verkey(k).await.unwrap().map(|c| c.id) }
    };
    let after = s
        .update_connection(&id, &rotate("did:old", "did:new"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(after.their_did.as_deref(), Some("did:new"));
    assert_eq!(after.their_verkeys, vec!["did:new".to_string(), "kept".into()]);
    assert_eq!(s.get_connection(&id).await.unwrap(), Some(after.clone()));
    assert_eq!(holder("did:new").await, Some(id.clone()));
    assert_eq!(holder("did:old").await, None);
    assert_eq!(holder("kept").await, Some(id.clone()));
    // Again (a wallet repeats its from_prior until it hears from the new DID): no change.
    let again = s
        .update_connection(&id, &rotate("did:old", "did:new"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(again.their_verkeys, after.their_verkeys);

    // Onto a DID another connection holds: refused, nothing written.
    let other = new_conn(&s).await;
    let taken = format!("theirs-{other}");
    match s.update_connection(&id, &rotate("did:new", &taken)).await {
        Err(StoreError::KeyTaken(k)) => assert_eq!(k, taken),
        r => panic!("a rotation onto another connection's key: {r:?}"),
    }
    assert_eq!(
        s.get_connection(&id).await.unwrap().map(|c| c.their_verkeys),
        Some(again.their_verkeys)
    );
    assert_eq!(holder("did:new").await, Some(id.clone()));
    assert_eq!(
        s.connection_by_their_verkey(&taken).await.unwrap().map(|c| c.id),
        Some(other)
    );

    // Deleted first: the rotation finds nothing and writes nothing.
    assert!(s.delete_connection(&id).await.unwrap().connection);
    assert_eq!(
        s.update_connection(&id, &rotate("did:new", "did:newer")).await.unwrap(),
        None
    );
    assert_eq!(s.get_connection(&id).await.unwrap(), None);
    assert_eq!(holder("did:newer").await, None);
    assert_eq!(holder("did:new").await, None);
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

/// `delete_unmediated` removes a connection only while it has no mediation and was made
/// before the cutoff, whatever was read of it before: a grant or a revocation keeps it.
pub async fn unmediated_connections_are_collected_alone(b: Arc<dyn Backend>) {
    let s = b.open().await;
    let old = new_conn(&s).await; // made at T0, no mediation
    let granted = new_conn(&s).await;
    let revoked = new_conn(&s).await;
    let mut young = conn(&new_id());
    young.created_at_ms = T0 + 10_000;
    s.put_connection(&young).await.unwrap();
    let grant = ConnectionPatch {
        mediation: Some(MediationState::Granted),
        updated_at_ms: T0 + 1,
        ..ConnectionPatch::default()
    };
    s.update_connection(&granted, &grant).await.unwrap();
    s.revoke_mediation(&revoked, T0 + 1).await.unwrap();

    let cutoff = T0 + 5_000;
    assert!(!s.delete_unmediated(&granted, cutoff).await.unwrap(), "granted: kept");
    assert!(!s.delete_unmediated(&revoked, cutoff).await.unwrap(), "revoked: kept");
    assert!(
        !s.delete_unmediated(&young.id, cutoff).await.unwrap(),
        "made after the cutoff: kept"
    );
    assert!(
        !s.delete_unmediated(&old, T0).await.unwrap(),
        "made at the cutoff: kept"
    );
    assert!(!s.delete_unmediated("missing", cutoff).await.unwrap());
    assert!(!s.delete_unmediated("bad\0id", cutoff).await.unwrap());
    for id in [&granted, &revoked, &young.id] {
        assert!(s.get_connection(id).await.unwrap().is_some(), "{id} kept");
    }
    assert!(
        s.delete_unmediated(&old, cutoff).await.unwrap(),
        "unmediated and old: removed"
    );
    assert_eq!(s.get_connection(&old).await.unwrap(), None);
    assert_eq!(
        s.connection_by_their_verkey(&format!("theirs-{old}")).await.unwrap(),
        None,
        "its key is free again"
    );
    assert_eq!(s.connection_by_thread(&format!("thread-{old}")).await.unwrap(), None);
    assert!(!s.delete_unmediated(&old, cutoff).await.unwrap(), "idempotent");
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
    s.push_event(&a, T0, 1000, NewClaim::until(T0 + 60_000), None)
        .await
        .unwrap();

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
