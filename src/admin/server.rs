//! The admin listener's server: the admin routes ([`super::configure`]) behind the same
//! slow-client protection as the public listener, and a cap on its connections.
//!
//! actix-http times only a connection's first request head, and a kept-alive connection that
//! has sent one byte of its next request is held for as long as the client likes: one good
//! `GET /health`, one more byte, then silence, held a descriptor and a slot of the admin's
//! only worker forever. Enough of those took the admin listener down (`/ready` with it, so a
//! load balancer dropped the node) and the open files the node keeps for itself. So the
//! admin uses `limits.client_timeout_ms` (at least [`MIN_CLIENT_TIMEOUT`]) as its head
//! timeout and the public listener's
//! per-connection watchdog ([`crate::session::watchdog`]; its closes count in
//! `mailroom_rejected_total` as the public listener's do), and accepts at most
//! [`ADMIN_MAX_CONNECTIONS`] at once (counted in [`crate::config::Config::files_reserved`]).
//!
//! Must not: hold state of its own; the routes and their guards are [`super`]'s.

use super::AdminState;
use crate::config::ADMIN_MAX_CONNECTIONS;
use crate::session::pace::Pace;
use crate::session::watchdog;
use actix_web::dev::Server;
use actix_web::{App, HttpServer};
use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

/// How long a stopping admin listener lets its requests finish.
const SHUTDOWN_TIMEOUT_SECS: u64 = 2;

/// The shortest head timeout the admin listener uses, whatever `limits.client_timeout_ms`
/// says. That limit is tuned for wallets on the public listener (down to 100 ms); the admin's
/// clients are health checks and operators. actix-http checks a connection's head timer
/// before it reads the socket, so when the node is busy enough that its one admin worker is
/// not scheduled for that long, a complete `GET /ready` sitting in the socket is answered 408:
/// with a 500 ms limit a node under load flapped out of its load balancer.
pub const MIN_CLIENT_TIMEOUT: Duration = Duration::from_secs(2);

/// Starts serving the admin listener on one worker; the returned server runs once spawned.
/// `client_timeout` is `limits.client_timeout_ms`: the time a client has for each request
/// head, the first and every kept-alive one after it (at least [`MIN_CLIENT_TIMEOUT`]).
pub fn serve(st: Arc<AdminState>, listener: TcpListener, client_timeout: Duration) -> std::io::Result<Server> {
    let client_timeout = client_timeout.max(MIN_CLIENT_TIMEOUT);
    let pace = Pace {
        base: client_timeout,
        min_rate: st.shared.cfg.limits.min_write_bytes_per_sec,
    };
    let on_connect = watchdog::on_connect(pace, st.shared.metrics.clone());
    Ok(HttpServer::new(move || {
        App::new()
            .wrap_fn(watchdog::track)
            .configure(|c| super::configure(c, st.clone()))
    })
    .on_connect(on_connect)
    .client_request_timeout(client_timeout)
    // Per worker, and there is one: the listener's whole share of the node's open files.
    .max_connections(ADMIN_MAX_CONNECTIONS)
    .tcp_nodelay(true)
    .listen(listener)?
    .disable_signals()
    .workers(1)
    .shutdown_timeout(SHUTDOWN_TIMEOUT_SECS)
    .run())
}
