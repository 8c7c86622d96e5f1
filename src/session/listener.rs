//! The public listener's server: what `actix_web::HttpServer` built for it, plus actix-http's
//! upgrade hook, so that a WebSocket leaves the h1 dispatcher (and its per-connection
//! buffers) at its handshake ([`super::upgrade`]).
//!
//! Kept from `HttpServer`: TCP_NODELAY, `limits.client_timeout_ms` as the request head
//! timeout, the per-connection watchdog ([`super::watchdog`]), keep-alive and disconnect
//! timeouts at `HttpServer`'s defaults, the graceful-shutdown notice to kept-alive
//! connections, no signal handling (the node stops it), and the shutdown grace.

use super::{http as public_http, watchdog, Shared};
use actix_service::{IntoServiceFactory as _, ServiceFactoryExt as _};
use actix_web::dev::{AppConfig, Server};
use actix_web::App;
use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

/// `HttpServer`'s default: how long a closed connection waits for the client's end.
const DISCONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Starts serving the public listener; the returned server runs once spawned.
pub fn serve(
    shared: Arc<Shared>,
    listener: TcpListener,
    client_timeout: Duration,
    grace: Duration,
) -> std::io::Result<Server> {
    let addr = listener.local_addr()?;
    let pace = super::pace::Pace {
        base: client_timeout,
        min_rate: shared.cfg.limits.min_write_bytes_per_sec,
    };
    let on_connect = Arc::new(watchdog::on_connect(pace, shared.metrics.clone()));
    let builder = Server::build();
    let shutdown = builder.graceful_shutdown_signal();
    Ok(builder
        .listen(format!("mailroom-public-{addr}"), listener, move || {
            let (shared, on_connect, shutdown) = (shared.clone(), on_connect.clone(), shutdown.clone());
            let app = App::new()
                .wrap_fn(watchdog::track)
                .configure(|c| public_http::configure(c, shared.clone()))
                .into_factory()
                .map_err(|e| e.error_response());
            actix_http::HttpService::build()
                .graceful_shutdown_signal(move || {
                    let s = shutdown.clone();
                    async move { s.notified().await }
                })
                // Slow-loris: a client that trickles its request head (or WebSocket
                // handshake) is dropped once this passes, whatever it still sends.
                .client_request_timeout(client_timeout)
                .client_disconnect_timeout(DISCONNECT_TIMEOUT)
                // Live deliveries are small frames written back to back: without TCP_NODELAY
                // each waits for the wallet's delayed ACK (up to 40 ms; docs/BENCHMARKS.md).
                .tcp_nodelay(true)
                .local_addr(addr)
                // A kept-alive connection's next request head is timed too (actix times only
                // the first): see session::watchdog.
                .on_connect_ext(move |io: &tokio::net::TcpStream, ext: &mut _| {
                    (on_connect)(io as &dyn std::any::Any, ext)
                })
                .upgrade(super::upgrade::service(shared.clone()))
                .finish(actix_service::map_config(app, move |_| AppConfig::default()))
                .tcp()
        })?
        .disable_signals()
        .shutdown_timeout(grace.as_secs())
        .run())
}
