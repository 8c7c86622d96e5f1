//! What keeps one caller, one sender's input or one node's clock from harming the others on
//! PostgreSQL: a connection's lease requests in the shared lease task, a value past one of the
//! server's limits in an enqueue batch (and a batch's size), a node whose clock is off.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::pg_backend::in_own_db;
use super::*;
use crate::store::postgres::{MAX_BATCH_BYTES, MAX_CLOCK_SKEW, MAX_WAITING_PER_CONN};

/// Lease calls of connection X in flight at once: more than the lease task's window holds
/// (`2 * MAX_LEASE_BATCH`).
const X_CALLS: usize = 600;

/// One wallet asks for its messages hundreds of times at once (connection X, each call one
/// message of its queue), then another wallet once (Y). Y is answered after at most a few of
/// X's calls, not after every X call that came before it: before, X's requests filled the
/// lease task's whole window, each statement served one of them, and Y waited behind ~90
/// statements here (behind ~500, past its deadline, with more of X's waiting).
///
/// Runs on one thread, so that every X call is handed over before Y's is: the order is that of
/// the spawns, not of a race.
#[tokio::test]
async fn one_connection_leasing_hundreds_of_times_at_once_does_not_hold_up_another() {
    in_own_db(|url| async move {
        let s = Arc::new(PgStore::open(&url, 4).await.unwrap());
        let dyn_s: Arc<dyn Store> = s.clone();
        let (x, y) = (new_conn(&dyn_s).await, new_conn(&dyn_s).await);
        let t = T0 + 1_000;
        enqueue_ok(&dyn_s, (0..X_CALLS as i64).map(|i| msg(&x, "x", T0 + i)).collect()).await;
        enqueue_ok(&dyn_s, vec![msg(&y, "y", T0)]).await;
        let x_done = Arc::new(AtomicUsize::new(0));
        let xs: Vec<_> = (0..X_CALLS)
            .map(|i| {
                let (s, x, x_done) = (s.clone(), x.clone(), x_done.clone());
                tokio::spawn(async move {
                    let r = s.lease(&x, 1, &format!("n1/x/{i}"), t, t + 60_000).await;
                    x_done.fetch_add(1, Ordering::SeqCst);
                    r
                })
            })
            .collect();
        let y_call = tokio::spawn({
            let (s, y, x_done) = (s.clone(), y.clone(), x_done.clone());
            async move {
                let r = s.lease(&y, 1, "n1/y", t, t + 60_000).await;
                (r, x_done.load(Ordering::SeqCst))
            }
        });
        let (got, x_before_y) = y_call.await.unwrap();
        assert_eq!(got.unwrap().len(), 1, "Y's message");
        assert!(
            x_before_y <= MAX_WAITING_PER_CONN,
            "{x_before_y} of X's {X_CALLS} calls were answered before Y's, which came after them: \
             one connection held the shared lease queue up"
        );
        let mut leased = 0;
        for h in xs {
            match h.await.unwrap() {
                Ok(m) => leased += m.len(),
                // X's own calls wait their turn; those whose deadline passes fail alone.
                Err(StoreError::Unavailable(_)) => {}
                Err(e) => panic!("an X call: {e}"),
            }
        }
        assert!(leased > 0, "X's calls leased nothing");
        assert_eq!(
            s.lease_gate_conns_for_test(),
            0,
            "the gate forgets connections with no call"
        );
    })
    .await;
}

/// A connection id of 32 KB of random text: past the size of an index entry, so PostgreSQL
/// refuses the statement inserting it (`program_limit_exceeded`).
fn past_an_index_entry() -> String {
    (0..1_000).map(|_| uuid::Uuid::new_v4().simple().to_string()).collect()
}

/// One sender's message whose connection id PostgreSQL cannot index shares an enqueue batch
/// with another's: that one is refused as invalid (the input's fault, answered 4xx, not worth a
/// retry), and the other is queued. Before, every caller of the batch was told
/// `Unavailable`, the bad one too.
///
/// One thread: both requests are handed over before the writer takes its batch.
#[tokio::test]
async fn a_value_past_a_server_limit_is_refused_to_its_sender_only() {
    in_own_db(|url| async move {
        let s = open_postgres(&url, 4).await.unwrap();
        let good = new_conn(&s).await;
        let bad = past_an_index_entry();
        let calls = [msg(&bad, "bad", T0), msg(&good, "good", T0)].map(|m| {
            let s = s.clone();
            tokio::spawn(async move { s.enqueue(vec![m], &EnqueueLimits::UNLIMITED).await })
        });
        let [bad_r, good_r] = calls;
        match bad_r.await.unwrap() {
            Err(StoreError::Invalid(_)) => {}
            Ok(out) if matches!(out.as_slice(), [Err(StoreError::Invalid(_))]) => {}
            r => panic!("the message PostgreSQL cannot index: {r:?}"),
        }
        let out = good_r.await.unwrap().expect("the other sender's batch");
        assert!(matches!(out.as_slice(), [Ok(_)]), "{out:?}");
        assert_eq!(s.queue_stats(&good, T0).await.unwrap().pending, 1);
    })
    .await;
}

/// About 15 MiB of forwards, then one larger than the room left in their batch, then one
/// larger than a batch, all at once: every one is queued (the batching itself is checked in
/// `writer.rs`, `a_batch_never_grows_past_its_byte_limit`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwards_larger_than_the_room_in_a_batch_are_queued() {
    in_own_db(|url| async move {
        let s = open_postgres(&url, 4).await.unwrap();
        let c = new_conn(&s).await;
        const MIB: usize = 1 << 20;
        let mut sizes = vec![MIB; 15];
        sizes.push(3 * MIB);
        sizes.push(MAX_BATCH_BYTES + MIB);
        let calls: Vec<_> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                let m = NewMessage {
                    payload: vec![b'x'; n],
                    ..msg(&c, "", T0 + i as i64)
                };
                let s = s.clone();
                tokio::spawn(async move { s.enqueue(vec![m], &EnqueueLimits::UNLIMITED).await })
            })
            .collect();
        for h in calls {
            let out = h.await.unwrap().expect("a forward's batch");
            assert!(matches!(out.as_slice(), [Ok(_)]), "{out:?}");
        }
        let st = s.queue_stats(&c, T0).await.unwrap();
        assert_eq!(st.pending, sizes.len() as u64);
    })
    .await;
}

/// A node whose clock is off from PostgreSQL's by more than [`MAX_CLOCK_SKEW`], ahead or
/// behind, reports its store not ready (the health check `/ready` polls), saying why; within
/// it, or once fixed, ready again. Before, the health check was a bare round trip, and a node
/// ahead by a lease took back every other node's live leases.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_clock_is_off_reports_its_store_not_ready() {
    in_own_db(|url| async move {
        let s = PgStore::open(&url, 2).await.unwrap();
        s.health().await.expect("a node on the server's own clock");
        let bound = i64::try_from(MAX_CLOCK_SKEW.as_millis()).unwrap();
        for (shift, words) in [(bound + 5_000, "ahead of"), (-(bound + 5_000), "behind")] {
            s.shift_clock_for_test(shift);
            match s.health().await {
                Err(StoreError::Unavailable(why)) => {
                    assert!(why.contains("clock skew") && why.contains(words), "{why}")
                }
                r => panic!("a node {shift} ms off: {r:?}"),
            }
        }
        s.shift_clock_for_test(bound / 2);
        s.health().await.expect("a node off by less than the bound");
        s.shift_clock_for_test(0);
        s.health().await.expect("a node whose clock was fixed");
    })
    .await;
}

/// A node whose clock runs ahead takes back no lease: every deadline looks run out to it, so
/// its sweep took back the live leases of other nodes' sessions (their messages went out
/// twice). Nodes whose clocks agree with the server's do the taking back meanwhile.
#[tokio::test]
async fn a_node_whose_clock_is_ahead_takes_back_no_lease_another_node_holds() {
    in_own_db(|url| async move {
        let ahead = PgStore::open(&url, 2).await.unwrap();
        let other: Arc<dyn Store> = Arc::new(PgStore::open(&url, 2).await.unwrap());
        let x = new_conn(&other).await;
        enqueue_ok(&other, vec![msg(&x, "x", T0)]).await;
        let t = T0 + 1_000;
        assert_eq!(other.lease(&x, 1, "n2/x", t, t + 30_000).await.unwrap().len(), 1);
        let hour = 3_600_000;
        ahead.shift_clock_for_test(hour);
        // The sweep of the node an hour ahead: the lease has an hour to go, it reads it run out.
        assert_eq!(ahead.reclaim_expired_leases(t + hour, 100).await.unwrap().len(), 0);
        // Its clock fixed, the same call would take it (what the refusal stands between).
        ahead.shift_clock_for_test(0);
        assert_eq!(ahead.reclaim_expired_leases(t + hour, 100).await.unwrap().len(), 1);
    })
    .await;
}
