//! [`store_pass_through!`](crate::store_pass_through): the [`Store`](super::Store) methods a
//! wrapper hands to the store it wraps unchanged, written once. A wrapper (the route cache, a
//! test's fault injector) writes the methods it changes and names the rest:
//!
//! ```ignore
//! #[async_trait::async_trait]
//! impl Store for RouteCache {
//!     async fn route(&self, recipient_key: &str) -> StoreResult<Option<ConnId>> { ... }
//!     mailroom::store_pass_through!(inner: backend, health, get_connection, ...);
//! }
//! ```
//!
//! A passed method returns the wrapped store's own future (the shape `async_trait` gives the
//! trait's methods), so passing adds no allocation and no poll. A method left out of both
//! lists is a compile error, as in any impl.

use super::StoreResult;
use std::future::Future;
use std::pin::Pin;

/// What an `async fn` of [`Store`](super::Store) returns once `async_trait` has desugared it.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = StoreResult<T>> + Send + 'a>>;

/// Writes the named [`Store`](crate::store::Store) methods as calls on `self.$inner` (an
/// `Arc<dyn Store>`), inside an `#[async_trait]` impl of `Store`. See
/// [`store::pass_through`](crate::store::pass_through).
#[macro_export]
macro_rules! store_pass_through {
    ($inner:ident: $($method:ident),+ $(,)?) => {
        $( $crate::store_pass_through!(@method $inner $method); )+
    };

    // One method: `(argument: type, ...)`, the lifetimes the argument types name, the output.
    (@fn $i:ident $name:ident ($($arg:ident: $ty:ty),*) [$($l:lifetime),*] -> $out:ty) => {
        fn $name<'s, $($l,)* 'f>(&'s self $(, $arg: $ty)*) -> $crate::store::pass_through::StoreFuture<'f, $out>
        where
            's: 'f,
            $($l: 'f,)*
            Self: 'f,
        {
            self.$i.$name($($arg),*)
        }
    };

    (@method $i:ident backend) => {
        fn backend(&self) -> &'static str {
            self.$i.backend()
        }
    };
    (@method $i:ident health) => {
        $crate::store_pass_through!(@fn $i health () [] -> ());
    };
    (@method $i:ident identity_get_or_create) => {
        $crate::store_pass_through!(@fn $i identity_get_or_create
            (candidate: $crate::store::Identity) [] -> $crate::store::Identity);
    };
    (@method $i:ident put_connection) => {
        $crate::store_pass_through!(@fn $i put_connection (c: &'a $crate::store::Connection) ['a] -> ());
    };
    (@method $i:ident get_connection) => {
        $crate::store_pass_through!(@fn $i get_connection (id: &'a str) ['a]
            -> Option<$crate::store::Connection>);
    };
    (@method $i:ident put_invitation) => {
        $crate::store_pass_through!(@fn $i put_invitation
            (id: &'a str, single_use: bool, created_at_ms: i64) ['a] -> ());
    };
    (@method $i:ident use_invitation) => {
        $crate::store_pass_through!(@fn $i use_invitation (id: &'a str, claimant: &'b str) ['a, 'b]
            -> $crate::store::InvitationUse);
    };
    (@method $i:ident update_connection) => {
        $crate::store_pass_through!(@fn $i update_connection
            (id: &'a str, patch: &'b $crate::store::ConnectionPatch) ['a, 'b]
            -> Option<$crate::store::Connection>);
    };
    (@method $i:ident connection_by_their_verkey) => {
        $crate::store_pass_through!(@fn $i connection_by_their_verkey (verkey: &'a str) ['a]
            -> Option<$crate::store::Connection>);
    };
    (@method $i:ident connection_by_thread) => {
        $crate::store_pass_through!(@fn $i connection_by_thread (thid: &'a str) ['a]
            -> Option<$crate::store::Connection>);
    };
    (@method $i:ident list_connections) => {
        $crate::store_pass_through!(@fn $i list_connections (after: Option<&'a str>, limit: usize) ['a]
            -> Vec<$crate::store::Connection>);
    };
    (@method $i:ident update_keys) => {
        $crate::store_pass_through!(@fn $i update_keys
            (conn: &'a str, add: &'b [String], remove: &'c [String]) ['a, 'b, 'c]
            -> Vec<(String, $crate::store::KeyUpdate)>);
    };
    (@method $i:ident keys_of) => {
        $crate::store_pass_through!(@fn $i keys_of (conn: &'a str) ['a] -> Vec<String>);
    };
    (@method $i:ident route) => {
        $crate::store_pass_through!(@fn $i route (recipient_key: &'a str) ['a]
            -> Option<$crate::store::ConnId>);
    };
    (@method $i:ident route_long_forms) => {
        $crate::store_pass_through!(@fn $i route_long_forms (short: &'a str, limit: usize) ['a]
            -> Vec<(String, $crate::store::ConnId)>);
    };
    (@method $i:ident enqueue) => {
        $crate::store_pass_through!(@fn $i enqueue
            (msgs: Vec<$crate::store::NewMessage>, limits: &'a $crate::store::EnqueueLimits) ['a]
            -> Vec<$crate::store::StoreResult<$crate::store::Enqueued>>);
    };
    (@method $i:ident enqueue_routed) => {
        $crate::store_pass_through!(@fn $i enqueue_routed
            (msgs: Vec<$crate::store::NewMessage>, limits: &'a $crate::store::EnqueueLimits) ['a]
            -> Vec<$crate::store::StoreResult<$crate::store::Enqueued>>);
    };
    // `lease` and `lease_for_key` are provided (they call the `_upto` methods with no byte
    // budget). A wrapper passes them as well as the `_upto` ones: left to the provided
    // methods, a call of them would go to the wrapped store's `_upto` method and miss a
    // `lease` of its own (a test's wrapper under this one).
    (@method $i:ident lease) => {
        $crate::store_pass_through!(@fn $i lease
            (conn: &'a str, max: usize, owner: &'b str, now_ms: i64, until_ms: i64) ['a, 'b]
            -> Vec<$crate::store::QueuedMessage>);
    };
    (@method $i:ident lease_upto) => {
        $crate::store_pass_through!(@fn $i lease_upto
            (conn: &'a str, max: usize, max_bytes: usize, owner: &'b str, now_ms: i64, until_ms: i64)
            ['a, 'b] -> Vec<$crate::store::QueuedMessage>);
    };
    (@method $i:ident ack_leased) => {
        $crate::store_pass_through!(@fn $i ack_leased
            (conn: &'a str, ids: &'b [$crate::store::MessageId]) ['a, 'b] -> Vec<i64>);
    };
    (@method $i:ident release) => {
        $crate::store_pass_through!(@fn $i release
            (conn: &'a str, ids: &'b [$crate::store::MessageId], owner: &'c str) ['a, 'b, 'c] -> u64);
    };
    (@method $i:ident release_owner) => {
        $crate::store_pass_through!(@fn $i release_owner (owner: &'a str) ['a] -> u64);
    };
    (@method $i:ident reclaim_expired_leases) => {
        $crate::store_pass_through!(@fn $i reclaim_expired_leases (now_ms: i64, max: usize) []
            -> Vec<$crate::store::Reclaimed>);
    };
    (@method $i:ident release_owners_under) => {
        $crate::store_pass_through!(@fn $i release_owners_under (prefix: &'a str, until_at_most_ms: i64) ['a]
            -> Vec<$crate::store::ConnId>);
    };
    (@method $i:ident queue_stats) => {
        $crate::store_pass_through!(@fn $i queue_stats (conn: &'a str, now_ms: i64) ['a]
            -> $crate::store::QueueStats);
    };
    (@method $i:ident total_queued) => {
        $crate::store_pass_through!(@fn $i total_queued () [] -> u64);
    };
    (@method $i:ident connections_with_pending) => {
        $crate::store_pass_through!(@fn $i connections_with_pending
            (now_ms: i64, after: Option<&'a str>, limit: usize) ['a] -> Vec<$crate::store::ConnId>);
    };
    (@method $i:ident pending_among) => {
        $crate::store_pass_through!(@fn $i pending_among
            (conns: &'a [$crate::store::ConnId], now_ms: i64) ['a] -> Vec<$crate::store::ConnId>);
    };
    (@method $i:ident prune_dedup) => {
        $crate::store_pass_through!(@fn $i prune_dedup (before_ms: i64, max: usize) [] -> u64);
    };
    (@method $i:ident dedup_records) => {
        $crate::store_pass_through!(@fn $i dedup_records () [] -> u64);
    };
    (@method $i:ident queue_log) => {
        $crate::store_pass_through!(@fn $i queue_log () [] -> Option<$crate::store::QueueLogStats>);
    };
    (@method $i:ident begin_run) => {
        $crate::store_pass_through!(@fn $i begin_run () [] -> Option<bool>);
    };
    (@method $i:ident end_run) => {
        $crate::store_pass_through!(@fn $i end_run () [] -> ());
    };
    (@method $i:ident begin_node_run) => {
        $crate::store_pass_through!(@fn $i begin_node_run (node_id: &'a str) ['a] -> Option<bool>);
    };
    (@method $i:ident end_node_run) => {
        $crate::store_pass_through!(@fn $i end_node_run (node_id: &'a str) ['a] -> ());
    };
    (@method $i:ident owed_wakes) => {
        $crate::store_pass_through!(@fn $i owed_wakes (now_ms: i64, after: Option<&'a str>, limit: usize) ['a]
            -> Option<$crate::store::OwedPage>);
    };
    (@method $i:ident expire) => {
        $crate::store_pass_through!(@fn $i expire (received_before_ms: i64) [] -> u64);
    };
    (@method $i:ident expire_due) => {
        $crate::store_pass_through!(@fn $i expire_due (now_ms: i64, max: usize) [] -> u64);
    };
    (@method $i:ident oldest_received_ms) => {
        $crate::store_pass_through!(@fn $i oldest_received_ms () [] -> Option<i64>);
    };
    (@method $i:ident flush) => {
        $crate::store_pass_through!(@fn $i flush () [] -> ());
    };
    (@method $i:ident device_of) => {
        $crate::store_pass_through!(@fn $i device_of (conn: &'a str) ['a]
            -> Option<$crate::store::Device>);
    };
    (@method $i:ident set_device) => {
        $crate::store_pass_through!(@fn $i set_device
            (conn: &'a str, device: Option<&'b $crate::store::Device>) ['a, 'b] -> ());
    };
    (@method $i:ident forget_device_token) => {
        $crate::store_pass_through!(@fn $i forget_device_token (conn: &'a str, token: &'b str) ['a, 'b]
            -> bool);
    };
    (@method $i:ident push_event) => {
        $crate::store_pass_through!(@fn $i push_event (conn: &'a str, now_ms: i64, window_ms: i64, claim: $crate::store::NewClaim, unless_pushed_since_ms: Option<i64>) ['a]
            -> $crate::store::PushSlot);
    };
    (@method $i:ident push_take_due) => {
        $crate::store_pass_through!(@fn $i push_take_due
            (now_ms: i64, claim_until_ms: i64, idle_before_ms: i64, limit: usize) []
            -> Vec<$crate::store::PushClaim>);
    };
    (@method $i:ident push_done) => {
        $crate::store_pass_through!(@fn $i push_done (conn: &'a str, token: i64, reopen_ms: Option<i64>) ['a] -> bool);
    };
    (@method $i:ident first_sight) => {
        $crate::store_pass_through!(@fn $i first_sight (digest: &'a [u8; 32], now_ms: i64, until_ms: i64) ['a]
            -> bool);
    };
    (@method $i:ident forget_sight) => {
        $crate::store_pass_through!(@fn $i forget_sight (digest: &'a [u8; 32], until_ms: i64) ['a] -> ());
    };
    (@method $i:ident prune_sights) => {
        $crate::store_pass_through!(@fn $i prune_sights (now_ms: i64, max: usize) [] -> u64);
    };
    (@method $i:ident lease_for_key) => {
        $crate::store_pass_through!(@fn $i lease_for_key
            (conn: &'a str, recipient_key: &'b str, max: usize, owner: &'c str, now_ms: i64, until_ms: i64)
            ['a, 'b, 'c] -> Vec<$crate::store::QueuedMessage>);
    };
    (@method $i:ident lease_for_key_upto) => {
        $crate::store_pass_through!(@fn $i lease_for_key_upto
            (conn: &'a str, recipient_key: &'b str, max: usize, max_bytes: usize, owner: &'c str,
             now_ms: i64, until_ms: i64)
            ['a, 'b, 'c] -> Vec<$crate::store::QueuedMessage>);
    };
    (@method $i:ident pending_stats) => {
        $crate::store_pass_through!(@fn $i pending_stats
            (conn: &'a str, recipient_key: Option<&'b str>, now_ms: i64) ['a, 'b] -> $crate::store::PendingStats);
    };
    (@method $i:ident delete_connection) => {
        $crate::store_pass_through!(@fn $i delete_connection (id: &'a str) ['a] -> $crate::store::Removed);
    };
    (@method $i:ident delete_unmediated) => {
        $crate::store_pass_through!(@fn $i delete_unmediated (id: &'a str, created_before_ms: i64) ['a] -> bool);
    };
    (@method $i:ident revoke_mediation) => {
        $crate::store_pass_through!(@fn $i revoke_mediation (id: &'a str, updated_at_ms: i64) ['a]
            -> Option<Vec<String>>);
    };
    (@method $i:ident drop_queue) => {
        $crate::store_pass_through!(@fn $i drop_queue (conn: &'a str) ['a] -> u64);
    };
    (@method $i:ident top_queues) => {
        $crate::store_pass_through!(@fn $i top_queues (limit: usize) [] -> $crate::store::TopQueues);
    };
}
