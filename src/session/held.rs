//! The connection records bound sessions hold: one shared copy per connection on this
//! node, whatever the number of its sessions (a wallet reconnecting, several devices, the
//! benchmark's thousands of sockets on one connection), instead of one clone per session.
//!
//! Must not: hand out a stale record (a changed record gets a new copy, which later binds
//! share); keep an entry once no session holds its connection.

use crate::store::Connection;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::{Arc, Weak};

#[derive(Default)]
pub struct Held(Mutex<HashMap<String, Weak<Connection>>>);

impl Held {
    /// The shared copy of `conn` for a session that binds to it: the one already held if it
    /// is the same record, else a new one.
    pub fn hold(&self, conn: &Connection) -> Arc<Connection> {
        let mut held = self.0.lock();
        if let Some(c) = held.get(&conn.id).and_then(Weak::upgrade) {
            if *c == *conn {
                return c;
            }
        }
        let c = Arc::new(conn.clone());
        held.insert(conn.id.clone(), Arc::downgrade(&c));
        c
    }

    /// A session gives its copy back; the last one out removes the entry.
    pub fn let_go(&self, conn: Arc<Connection>) {
        let mut held = self.0.lock();
        // Under the lock no session can take a new reference from the entry. Sessions clone
        // the record only while they hold it themselves (futures take its id), so the count
        // is the number of sessions holding this copy.
        if Arc::strong_count(&conn) == 1 {
            if let Some(w) = held.get(&conn.id) {
                if w.as_ptr() == Arc::as_ptr(&conn) {
                    held.remove(&conn.id);
                }
            }
        }
    }

    /// Connections with an entry (for tests and the admin figures).
    pub fn len(&self) -> usize {
        self.0.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(id: &str) -> Connection {
        Connection {
            id: id.to_owned(),
            created_at_ms: 1,
            updated_at_ms: 1,
            state: "completed".into(),
            protocol: "didexchange/1.1".into(),
            label: None,
            our_verkey: format!("our-{id}"),
            our_did: None,
            their_did: None,
            their_verkeys: vec![format!("theirs-{id}")],
            their_endpoints: vec![],
            their_routing_keys: vec![],
            mediation: Default::default(),
            invitation_id: None,
            thread_id: None,
            extra: serde_json::json!({"doc": {"service": []}}),
        }
    }

    #[test]
    fn sessions_of_one_connection_share_one_copy_until_the_last_lets_go() {
        let held = Held::default();
        let (a, b) = (held.hold(&conn("c1")), held.hold(&conn("c1")));
        assert!(Arc::ptr_eq(&a, &b), "one copy for two sessions");
        let other = held.hold(&conn("c2"));
        assert!(!Arc::ptr_eq(&a, &other));
        assert_eq!(held.len(), 2);
        held.let_go(a);
        assert_eq!(held.len(), 2, "c1 is still held by one session");
        held.let_go(b);
        held.let_go(other);
        assert!(held.is_empty(), "no session holds anything");
    }

    #[test]
    fn a_changed_record_gets_a_new_copy_and_the_old_one_stays_with_its_sessions() {
        let held = Held::default();
        let old = held.hold(&conn("c1"));
        let mut changed = conn("c1");
        changed.their_endpoints = vec!["https://agent.example/didcomm".into()];
        let new = held.hold(&changed);
        assert_eq!(new.their_endpoints, changed.their_endpoints);
        assert_eq!(old.their_endpoints, Vec::<String>::new());
        assert!(
            Arc::ptr_eq(&held.hold(&changed), &new),
            "later binds share the new copy"
        );
        // The old copy's last session leaves: the entry (the new copy's) stays.
        held.let_go(old);
        assert_eq!(held.len(), 1);
    }
}
