//! The store link's bounds below the statements: TCP keepalives and `TCP_USER_TIMEOUT` on
//! every socket, so that a silent link is found in seconds rather than after the kernel's
//! 2 hours idle or ~15 minutes of retransmissions; and the timeouts every session of the store
//! runs with on the server, so that a node that froze or lost its link in a transaction does
//! not keep that transaction's locks (a connection's enqueue lock: every batch of every node
//! holding a forward to it would wait) until the server notices on its own.
//!
//! The URL's own `keepalives`, `keepalives_idle`, `keepalives_interval`, `keepalives_count`
//! (or tokio-postgres's `keepalives_retries`) and `tcp_user_timeout` win, with libpq's meaning:
//! `tcp_user_timeout` in milliseconds (tokio-postgres would read seconds), 0 for the system's
//! default. So do `lock_timeout` and `idle_in_transaction_session_timeout` set by its
//! `options` (`-c name=value`). The sessions' isolation level is READ COMMITTED whatever the
//! database, role or `options` say (the store's locking needs it: see [`READ_COMMITTED`]).
//!
//! Must not: open sockets, read the TLS parameters (`tls.rs`).

use std::time::Duration;

/// Keepalive probes start after this long without traffic (tokio-postgres: 2 hours).
pub const KEEPALIVES_IDLE: Duration = Duration::from_secs(15);
/// Between keepalive probes.
pub const KEEPALIVES_INTERVAL: Duration = Duration::from_secs(5);
/// Probes unanswered before the socket is closed: an idle link that went silent is closed
/// within 15 + 3 x 5 = 30 s.
pub const KEEPALIVES_COUNT: u32 = 3;
/// Data sent and unacknowledged for this long closes the socket (the kernel: ~15 minutes of
/// retransmissions).
pub const TCP_USER_TIMEOUT: Duration = Duration::from_secs(30);

/// The socket settings a store URL names, with libpq's meaning; taken out of the URL so that
/// tokio-postgres does not read them with its own (see [`take_socket_params`]).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct SocketParams {
    keepalives: Option<bool>,
    /// Seconds (0: the system's default).
    idle_secs: Option<u64>,
    /// Seconds (0: the system's default).
    interval_secs: Option<u64>,
    /// Probes (0: the system's default).
    count: Option<u32>,
    /// Milliseconds (0: the system's default).
    user_timeout_ms: Option<u64>,
}

const SOCKET_PARAMS: [&str; 6] = [
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_count",
    "keepalives_retries",
    "tcp_user_timeout",
];

/// Takes the socket parameters out of a `postgres://` URL (the last of each wins). Returns
/// the URL without them. The error names the parameter, never the URL (it may hold a password).
pub(super) fn take_socket_params(url: &str) -> Result<(String, SocketParams), String> {
    let (rest, taken) = super::take_url_params(url, &SOCKET_PARAMS)?;
    let mut p = SocketParams::default();
    for (name, value) in taken {
        let number = |what: &str| {
            value
                .trim()
                .parse::<u64>()
                .map_err(|_| format!("{name} must be a whole number of {what} (0: the system's default)"))
        };
        match name {
            "keepalives" => p.keepalives = Some(number("(1 on, 0 off)")? != 0),
            "keepalives_idle" => p.idle_secs = Some(number("seconds")?),
            "keepalives_interval" => p.interval_secs = Some(number("seconds")?),
            "keepalives_count" | "keepalives_retries" => {
                p.count = Some(u32::try_from(number("probes")?).map_err(|_| format!("{name} is too large"))?)
            }
            "tcp_user_timeout" => p.user_timeout_ms = Some(number("milliseconds")?),
            _ => unreachable!("only SOCKET_PARAMS are taken"),
        }
    }
    Ok((rest, p))
}

impl SocketParams {
    /// The URL's settings, and this module's where it names none.
    pub(super) fn apply(&self, cfg: &mut tokio_postgres::Config) {
        cfg.keepalives(self.keepalives.unwrap_or(true));
        // 0 leaves tokio-postgres's own (the system's, for all but the idle time).
        match self.idle_secs {
            None => {
                cfg.keepalives_idle(KEEPALIVES_IDLE);
            }
            Some(0) => {}
            Some(s) => {
                cfg.keepalives_idle(Duration::from_secs(s));
            }
        }
        match self.interval_secs {
            None => {
                cfg.keepalives_interval(KEEPALIVES_INTERVAL);
            }
            Some(0) => {}
            Some(s) => {
                cfg.keepalives_interval(Duration::from_secs(s));
            }
        }
        match self.count {
            None => {
                cfg.keepalives_retries(KEEPALIVES_COUNT);
            }
            Some(0) => {}
            Some(n) => {
                cfg.keepalives_retries(n);
            }
        }
        match self.user_timeout_ms {
            None => {
                cfg.tcp_user_timeout(TCP_USER_TIMEOUT);
            }
            Some(0) => {}
            Some(ms) => {
                cfg.tcp_user_timeout(Duration::from_millis(ms));
            }
        }
    }
}

/// The server's `lock_timeout` for the store's sessions: half the statement timeout, so that
/// the server ends a statement waiting on a lock (a cleanly rolled-back error the node acts on:
/// an enqueue batch answers 503 only the connections whose lock is held) before the node stops
/// waiting for its answer. A statement the node abandoned would otherwise keep waiting, and
/// keep the locks it holds already, as long as the holder does.
pub(super) fn lock_timeout(statement_timeout: Duration) -> Duration {
    statement_timeout / 2
}

/// The server's `idle_in_transaction_session_timeout` for the store's sessions: between two
/// statements of a transaction the node never waits on anything but its own CPU, so a
/// transaction idle for three statement timeouts belongs to a node that froze or lost its
/// link; the server ends that session and frees its locks.
pub(super) fn idle_in_transaction_timeout(statement_timeout: Duration) -> Duration {
    statement_timeout * 3
}

/// Raises `synchronous_commit` to `on` where the database or role set it `off` (a common
/// tuning): a forward answered 2xx must survive the server's crash, and with `off` the last
/// ones would be lost silently. A stronger setting (`remote_apply`) or a deliberate `local` is
/// kept; the one statement that may lose its write, a lease, sets it off for itself.
const DURABLE_COMMITS: &str =
    "SELECT set_config('synchronous_commit', 'on', false) WHERE current_setting('synchronous_commit') = 'off'";

/// READ COMMITTED for every transaction of the store's sessions, whatever the database's or
/// role's `default_transaction_isolation` (an `ALTER DATABASE/ROLE ... SET` an operator may
/// have made for other clients). The store's writes take an advisory lock and then read what
/// the lock's holder wrote: a revocation or a removal then an enqueue's route check, a node's
/// migrations then another's read of the schema version. Under REPEATABLE READ or SERIALIZABLE
/// a transaction reads a snapshot from its first statement, taken before the lock: a forward
/// racing a revocation was queued (2xx) for a connection that never gets it, a second node
/// migrating at once applied migration 1 again and failed to start, and `FOR UPDATE SKIP
/// LOCKED` raised serialization failures (leases answered `Unavailable`). Not the operator's
/// to change through the URL's `options` either: set after them.
const READ_COMMITTED: &str = "SET default_transaction_isolation = 'read committed'";

/// What every new connection of the store's pool runs: [`READ_COMMITTED`], the server-side
/// timeouts above and [`DURABLE_COMMITS`], but those the URL's `options` set (the operator's
/// word).
pub(super) fn session_setup(cfg: &tokio_postgres::Config, statement_timeout: Duration) -> String {
    let options = cfg.get_options().unwrap_or("");
    let set = |name: &str, d: Duration| format!("SET {name} = {}", d.as_millis().max(1));
    std::iter::once(READ_COMMITTED.to_string())
        .chain(
            [
                ("lock_timeout", set("lock_timeout", lock_timeout(statement_timeout))),
                (
                    "idle_in_transaction_session_timeout",
                    set(
                        "idle_in_transaction_session_timeout",
                        idle_in_transaction_timeout(statement_timeout),
                    ),
                ),
                ("synchronous_commit", DURABLE_COMMITS.to_string()),
            ]
            .into_iter()
            .filter(|(name, _)| !options_set(options, name))
            .map(|(_, statement)| statement),
        )
        .collect::<Vec<_>>()
        .join("; ")
}

/// Whether PostgreSQL's command-line `options` (`-c name=value`, `-cname=value`,
/// `--name=value`) set the setting `name`.
fn options_set(options: &str, name: &str) -> bool {
    let mut words = options.split_whitespace();
    while let Some(w) = words.next() {
        let assignment = if w == "-c" {
            words.next()
        } else {
            w.strip_prefix("--").or_else(|| w.strip_prefix("-c"))
        };
        if let Some((n, _)) = assignment.and_then(|a| a.split_once('=')) {
            if n.replace('-', "_").eq_ignore_ascii_case(name) {
                return true;
            }
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(url: &str) -> tokio_postgres::Config {
        let (rest, p) = take_socket_params(url).unwrap();
        let mut cfg: tokio_postgres::Config = rest.parse().unwrap();
        p.apply(&mut cfg);
        cfg
    }

    #[test]
    fn a_url_without_socket_settings_gets_short_keepalives_and_a_user_timeout() {
        let cfg = link("postgres://u@h:5432/db?application_name=x");
        assert!(cfg.get_keepalives());
        assert_eq!(cfg.get_keepalives_idle(), KEEPALIVES_IDLE);
        assert_eq!(cfg.get_keepalives_interval(), Some(KEEPALIVES_INTERVAL));
        assert_eq!(cfg.get_keepalives_retries(), Some(KEEPALIVES_COUNT));
        assert_eq!(cfg.get_tcp_user_timeout(), Some(&TCP_USER_TIMEOUT));
        assert_eq!(cfg.get_application_name(), Some("x"));
    }

    #[test]
    fn the_urls_socket_settings_win_with_libpqs_meaning() {
        let cfg =
            link("postgres://h/db?keepalives_idle=60&keepalives_interval=7&keepalives_count=9&tcp_user_timeout=2500");
        assert_eq!(cfg.get_keepalives_idle(), Duration::from_secs(60));
        assert_eq!(cfg.get_keepalives_interval(), Some(Duration::from_secs(7)));
        assert_eq!(cfg.get_keepalives_retries(), Some(9));
        // libpq's milliseconds, not tokio-postgres's seconds.
        assert_eq!(cfg.get_tcp_user_timeout(), Some(&Duration::from_millis(2500)));
        assert_eq!(
            link("postgres://h/db?keepalives_retries=4").get_keepalives_retries(),
            Some(4)
        );
        // 0: the system's default (tokio-postgres's for the idle time).
        let cfg = link("postgres://h/db?tcp_user_timeout=0&keepalives_idle=0&keepalives_interval=0");
        assert_eq!(cfg.get_tcp_user_timeout(), None);
        assert_eq!(cfg.get_keepalives_idle(), Duration::from_secs(2 * 3600));
        assert_eq!(cfg.get_keepalives_interval(), None);
        assert!(!link("postgres://h/db?keepalives=0").get_keepalives());
        let err = |u: &str| take_socket_params(u).err().unwrap();
        assert!(err("postgres://u:hunter2@h/db?keepalives_idle=soon").contains("keepalives_idle must be"));
        assert!(!err("postgres://u:hunter2@h/db?tcp_user_timeout=-1").contains("hunter2"));
        assert!(err("postgres://h/db?keepalives_count=99999999999").contains("too large"));
    }

    #[test]
    fn the_server_side_timeouts_follow_the_statement_timeout_unless_the_options_set_them() {
        let cfg = |u: &str| -> tokio_postgres::Config { u.parse().unwrap() };
        let t = Duration::from_secs(10);
        assert_eq!(
            session_setup(&cfg("postgres://h/db"), t),
            format!(
                "{READ_COMMITTED}; SET lock_timeout = 5000; SET idle_in_transaction_session_timeout = 30000; \
                 {DURABLE_COMMITS}"
            )
        );
        assert_eq!(
            session_setup(&cfg("postgres://h/db?options=-c%20lock_timeout%3D1s"), t),
            format!("{READ_COMMITTED}; SET idle_in_transaction_session_timeout = 30000; {DURABLE_COMMITS}")
        );
        assert_eq!(
            session_setup(
                &cfg("postgres://h/db?options=--idle-in-transaction-session-timeout%3D0%20-clock_timeout%3D0%20-csynchronous_commit%3Doff"),
                t
            ),
            READ_COMMITTED
        );
        // The isolation level is the store's own: the options do not change it.
        assert_eq!(
            session_setup(
                &cfg("postgres://h/db?options=-c%20default_transaction_isolation%3Dserializable%20-clock_timeout%3D0%20-c%20idle_in_transaction_session_timeout%3D0%20-csynchronous_commit%3Don"),
                t
            ),
            READ_COMMITTED
        );
        // deadlock_timeout is another setting.
        assert!(session_setup(&cfg("postgres://h/db?options=-c%20deadlock_timeout%3D2s"), t).contains("lock_timeout"));
    }
}
