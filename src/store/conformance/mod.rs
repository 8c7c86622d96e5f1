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

mod connections;
mod expiry;
pub mod layered_backend;
mod leases;
pub mod pg_backend;
mod pg_guards;
mod pg_owed;
mod pg_timeouts;
mod pg_tls;
mod push;
mod queue;
mod sights;
pub mod sled_backend;

use connections::*;
use expiry::*;
use leases::*;
use push::*;
use queue::*;
use sights::*;

/// Runs `check` on its own task so that a failure still lets the caller clean up.
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
            async fn connection_by_thread_takes_the_latest_write() {
                backend::run(super::connection_by_thread_takes_the_latest_write).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn connection_patches_do_not_overwrite_each_other() {
                backend::run(super::connection_patches_do_not_overwrite_each_other).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_rotation_patch_moves_peer_keys_and_creates_nothing() {
                backend::run(super::a_rotation_patch_moves_peer_keys_and_creates_nothing).await
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
            async fn a_key_too_long_to_index_is_the_clients_input() {
                backend::run(super::a_key_too_long_to_index_is_the_clients_input).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn routing_keys_by_long_form_prefix() {
                backend::run(super::routing_keys_by_long_form_prefix).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn revoking_mediation_is_one_step() {
                backend::run(super::revoking_mediation_is_one_step).await
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
            async fn oldest_is_the_earliest_received() {
                backend::run(super::oldest_is_the_earliest_received).await
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
            async fn expired_leases_are_reclaimed() {
                backend::run(super::expired_leases_are_reclaimed).await
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
            async fn a_denied_connection_takes_no_routed_message() {
                backend::run(super::a_denied_connection_takes_no_routed_message).await
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
            async fn leases_stop_at_their_byte_budget() {
                backend::run(super::leases_stop_at_their_byte_budget).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn leases_for_a_key_stop_at_their_byte_budget() {
                backend::run(super::leases_for_a_key_stop_at_their_byte_budget).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn dedup_records_are_pruned() {
                backend::run(super::dedup_records_are_pruned).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_message_is_seen_once_within_its_record() {
                backend::run(super::a_message_is_seen_once_within_its_record).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sights_survive_a_reopen() {
                backend::run(super::sights_survive_a_reopen).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn concurrent_sights_across_nodes() {
                backend::run(super::concurrent_sights_across_nodes).await
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
            async fn pending_connections_page_through_many() {
                backend::run(super::pending_connections_page_through_many).await
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
            async fn unmediated_connections_are_collected_alone() {
                backend::run(super::unmediated_connections_are_collected_alone).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn push_windows_are_shared() {
                backend::run(super::push_windows_are_shared).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_push_that_sent_nothing_reopens_its_window() {
                backend::run(super::a_push_that_sent_nothing_reopens_its_window).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn trailing_push_claims_run_out() {
                backend::run(super::trailing_push_claims_run_out).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn immediate_push_claims_run_out() {
                backend::run(super::immediate_push_claims_run_out).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn push_event_unless_pushed_since() {
                backend::run(super::push_event_unless_pushed_since).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn push_windows_survive_a_reopen() {
                backend::run(super::push_windows_survive_a_reopen).await
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
