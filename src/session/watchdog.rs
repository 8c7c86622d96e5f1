//! The public listener's per-connection watchdog: a kept-alive connection has
//! `limits.client_timeout_ms` between the end of one response (or its opening) and the
//! complete head of its next request, else it is closed.
//!
//! actix-http 3 arms its client request timeout once per connection, for the first request's
//! head only, and its keep-alive timer is re-armed on every read: a client that sends one good
//! request, then trickles the head of a second one byte by byte, held its connection (a file
//! descriptor and a slot of the worker) forever. The watchdog measures, from the outside, what
//! the dispatcher does not: how long a connection has had no request in a handler and no
//! response being written. Past the limit it shuts the socket down (through a duplicate of
//! its descriptor, owned here, so a closed descriptor number reused by another connection is
//! never touched) and the dispatcher ends on the EOF.
//!
//! A request counts as busy from the moment its head is complete (the middleware sees it)
//! until its response body is dropped by the dispatcher (written out, or the connection gone):
//! WebSocket sessions and slow handlers are never cut by it. Keep-alive stays on for clients
//! that send their requests promptly.
//!
//! A response being written has its own bound: `limits.client_timeout_ms` plus its size over
//! `limits.min_write_bytes_per_sec` ([`Pace`]); past it the connection is reset. actix-http
//! has no write timeout: a client that never read its reply (a pickup batch of megabytes, a
//! long keylist) held the reply and the connection's descriptor for as long as it liked, and
//! twenty thousand such requests took every file the process may open.
//!
//! Must not: hold the duplicate descriptor past the connection (it lives in the connection's
//! data, dropped with the dispatcher; requests returned to actix's pool let go of it).

use super::pace::Pace;
use crate::metrics::Metrics;
use actix_web::body::{BodySize, BoxBody, MessageBody};
use actix_web::dev::{Extensions, Service, ServiceRequest, ServiceResponse};
use bytes::Bytes;
use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::rc::{Rc, Weak};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::Instant;

/// One connection's state, shared by its watchdog task (weakly), its busy requests and the
/// connection's data (which owns it).
struct State {
    /// Requests whose head is in and whose response body is not yet dropped.
    busy: Cell<u32>,
    /// When the connection last became idle (its opening, or the last response's end).
    idle_since: Cell<Instant>,
    /// Responses being written: (their number, by when they must be taken whole).
    writing: RefCell<Vec<(u64, Instant)>>,
    /// The last response's number.
    responses: Cell<u64>,
    /// A duplicate of the connection's socket, to shut it down with; given back (closed) once
    /// the connection is upgraded to a WebSocket, so a session holds one descriptor, not two.
    socket: RefCell<Option<std::net::TcpStream>>,
}

/// What the connection's data holds: the state, and the watchdog task to stop with it.
struct Conn {
    state: Rc<State>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The `HttpServer::on_connect` callback of the public listener: starts a watchdog for each
/// accepted TCP connection.
pub fn on_connect(pace: Pace, metrics: Arc<Metrics>) -> impl Fn(&dyn std::any::Any, &mut Extensions) + Send + Sync {
    move |io, data| {
        use std::os::fd::AsFd;
        let Some(tcp) = io.downcast_ref::<tokio::net::TcpStream>() else {
            return; // not a plain TCP connection: nothing to watch with
        };
        let socket = match tcp.as_fd().try_clone_to_owned() {
            Ok(fd) => std::net::TcpStream::from(fd),
            Err(e) => {
                tracing::warn!("connection watchdog not started (no descriptor to spare): {e}");
                return;
            }
        };
        let state = Rc::new(State {
            busy: Cell::new(0),
            idle_since: Cell::new(Instant::now()),
            writing: RefCell::new(Vec::new()),
            responses: Cell::new(0),
            socket: RefCell::new(Some(socket)),
        });
        let task = actix_rt::spawn(watch(Rc::downgrade(&state), pace.base, metrics.clone()));
        data.insert(Pace::clone(&pace));
        data.insert(Conn { state, task });
    }
}

/// Closes the connection once it has been idle (no busy request) for `limit`, or once a
/// response has taken longer to write than its pace allows.
async fn watch(state: Weak<State>, limit: Duration, metrics: Arc<Metrics>) {
    loop {
        let deadline = {
            let Some(s) = state.upgrade() else { return };
            if s.socket.borrow().is_none() {
                return; // upgraded to a WebSocket: no next request to wait for
            }
            let written_by = s.writing.borrow().iter().map(|(_, by)| *by).min();
            if written_by.is_some_and(|by| by <= Instant::now()) {
                tracing::debug!(
                    "closing a connection whose client reads its response too slowly (limits.min_write_bytes_per_sec)"
                );
                metrics.rejected("http-write-slow", "unknown");
                // The dispatcher's next write fails, and it drops the response and the
                // connection (its descriptor with it).
                if let Some(sock) = s.socket.borrow().as_ref() {
                    let _ = sock.shutdown(std::net::Shutdown::Both);
                }
                return;
            }
            if s.busy.get() > 0 {
                let next = Instant::now() + limit;
                written_by.map_or(next, |by| by.min(next))
            } else if s.idle_since.get() + limit <= Instant::now() {
                tracing::debug!(
                    "closing a connection without a complete request for {} ms (limits.client_timeout_ms)",
                    limit.as_millis()
                );
                metrics.rejected("slow-request", "unknown");
                if let Some(sock) = s.socket.borrow().as_ref() {
                    let _ = sock.shutdown(std::net::Shutdown::Both);
                }
                return;
            } else {
                s.idle_since.get() + limit
            }
        };
        tokio::time::sleep_until(deadline).await;
    }
}

/// Marks a request busy while it lives; its drop makes the connection idle from now.
struct Busy {
    state: Option<Rc<State>>,
    /// Its response's number, once it is being written ([`Busy::writing`]).
    response: Option<u64>,
}

impl Busy {
    fn of(req: &ServiceRequest) -> Busy {
        let state = req.request().conn_data::<Conn>().map(|c| {
            c.state.busy.set(c.state.busy.get() + 1);
            c.state.clone()
        });
        Busy { state, response: None }
    }

    /// Its response is being written from now, and must be taken whole within `allowed`.
    fn writing(&mut self, allowed: Duration) {
        let Some(s) = &self.state else { return };
        let n = s.responses.get() + 1;
        s.responses.set(n);
        s.writing.borrow_mut().push((n, Instant::now() + allowed));
        self.response = Some(n);
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        if let Some(s) = &self.state {
            s.busy.set(s.busy.get().saturating_sub(1));
            s.idle_since.set(Instant::now());
            if let Some(n) = self.response {
                s.writing.borrow_mut().retain(|(m, _)| *m != n);
            }
        }
    }
}

/// A response body that keeps its request busy until the dispatcher drops it.
pub struct Tracked {
    inner: BoxBody,
    _busy: Busy,
}

impl MessageBody for Tracked {
    type Error = Box<dyn std::error::Error>;

    fn size(&self) -> BodySize {
        self.inner.size()
    }

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, Self::Error>>> {
        Pin::new(&mut self.inner).poll_next(cx)
    }
}

/// The middleware (for `App::wrap_fn`) that tracks each request of a watched connection.
pub fn track<S>(
    req: ServiceRequest,
    srv: &S,
) -> impl Future<Output = Result<ServiceResponse<Tracked>, actix_web::Error>>
where
    S: Service<ServiceRequest, Response = ServiceResponse<BoxBody>, Error = actix_web::Error>,
{
    let mut busy = Busy::of(&req);
    let pace = req.request().conn_data::<Pace>().copied();
    let fut = srv.call(req);
    async move {
        let res = fut.await?;
        if res.status() == actix_web::http::StatusCode::SWITCHING_PROTOCOLS {
            // A WebSocket: one request for the connection's whole life, never a next head.
            // Its descriptor's duplicate goes back now (20,000 files per process here: a
            // session must cost one, not two). A refused upgrade keeps the watchdog.
            if let Some(s) = &busy.state {
                s.socket.borrow_mut().take();
            }
        } else if let Some(pace) = pace {
            let bytes = match res.response().body().size() {
                BodySize::Sized(n) => n,
                BodySize::None | BodySize::Stream => 0,
            };
            busy.writing(pace.allowed(bytes));
        }
        Ok(res.map_body(|_, inner| Tracked { inner, _busy: busy }))
    }
}
