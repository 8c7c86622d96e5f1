//! The WebSocket handshake of the public listener, and the hand-off of the connection to its
//! session.
//!
//! actix-http calls [`service`] with every request that asks for `Upgrade: websocket` (and
//! `CONNECT`s), with the connection's socket and what it read past the request head. Here the
//! path (`/`), what shutdown and `limits` allow (draining: 503, `limits.max_sessions`: 503)
//! and the handshake (`GET`, `Connection: Upgrade`, version 13, a key) are checked, and the
//! answer is written on the raw socket. An accepted socket leaves the HTTP machinery entirely: its
//! session ([`super::ws::WsSession`], an actix actor) reads and writes it through
//! [`super::wsio`], holding no buffer while idle. A refused one is closed after its answer.
//!
//! Must not: lose the bytes a client sends right behind its handshake (its first frame may
//! come in the same packet); keep a session place for a malformed handshake; keep
//! the request (it holds the connection watchdog's duplicate descriptor) past the hand-off.

use super::ws::WsSession;
use super::Shared;
use actix_codec::Framed;
use actix_http::{h1, ws as proto, Request};
use actix_web_actors::ws::WebsocketContext;
use futures_util::future::LocalBoxFuture;
use serde_json::json;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// The upgrade service of the public listener (`HttpService::build().upgrade(..)`).
pub fn service(
    shared: Arc<Shared>,
) -> impl actix_service::ServiceFactory<
    (Request, Framed<TcpStream, h1::Codec>),
    Config = (),
    Response = (),
    Error = actix_web::Error,
    InitError = (),
> + Clone {
    actix_service::fn_service(move |(req, framed): (Request, Framed<TcpStream, h1::Codec>)| {
        let shared = shared.clone();
        let fut: LocalBoxFuture<'static, Result<(), actix_web::Error>> = Box::pin(async move {
            upgrade(shared, req, framed).await;
            Ok(())
        });
        fut
    })
}

/// A refusal: status line and JSON body.
struct Refusal {
    status: &'static str,
    body: serde_json::Value,
}

impl Refusal {
    fn unavailable(body: serde_json::Value) -> Refusal {
        Refusal {
            status: "503 Service Unavailable",
            body,
        }
    }
}

/// What a handshake is answered with: its session place and accept key, or a refusal. In
/// the order the actix-web handler checked them: draining and the session limit first (a
/// client at the limit learns why, whatever its headers), then the handshake itself (its
/// place goes back if it is malformed).
fn check(shared: &Arc<Shared>, req: &Request) -> Result<(SocketSlot, [u8; 28]), Refusal> {
    let head = req.head();
    if head.uri.path() != "/" {
        return Err(Refusal {
            status: "404 Not Found",
            body: json!({"error": "not-found", "reason": "WebSockets open on /"}),
        });
    }
    if shared.draining.load(Ordering::SeqCst) || shared.stopping.load(Ordering::SeqCst) {
        return Err(Refusal::unavailable(
            json!({"error": "shutting-down", "reason": "this node is shutting down: reconnect"}),
        ));
    }
    let max = shared.cfg.limits.max_sessions;
    let Some(slot) = SocketSlot::take(shared, max) else {
        shared.metrics.rejected("session-limit", "unknown");
        return Err(Refusal::unavailable(
            json!({"error": "session-limit", "reason": format!("this node holds its limit of {max} sessions")}),
        ));
    };
    if let Err(e) = proto::verify_handshake(head) {
        let status = match e {
            proto::HandshakeError::GetMethodRequired => "405 Method Not Allowed",
            _ => "400 Bad Request",
        };
        return Err(Refusal {
            status,
            body: json!({"error": "bad-handshake", "reason": format!("WebSocket handshake failed: {e}")}),
        });
    }
    let key = head
        .headers()
        .get(actix_http::header::SEC_WEBSOCKET_KEY)
        .expect("verify_handshake checked the key");
    Ok((slot, proto::hash_key(key.as_bytes())))
}

async fn upgrade(shared: Arc<Shared>, req: Request, framed: Framed<TcpStream, h1::Codec>) {
    let checked = check(&shared, &req);
    // The request goes now: it holds the connection's data (the watchdog and its duplicate
    // descriptor), which a session must not keep.
    drop(req);
    let parts = framed.into_parts();
    let mut sock = parts.io;
    // Bytes the client sent right behind the head (its first frame, maybe): copied out, so
    // the dispatcher's 8 KiB read buffer goes with the rest.
    let early = parts.read_buf.to_vec();
    drop((parts.read_buf, parts.write_buf, parts.codec));
    let (slot, accept) = match checked {
        Ok(ok) => ok,
        Err(r) => return refuse(sock, r).await,
    };
    let mut head = Vec::with_capacity(160);
    head.extend_from_slice(
        b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\nsec-websocket-accept: ",
    );
    head.extend_from_slice(&accept);
    head.extend_from_slice(b"\r\n\r\n");
    if sock.write_all(&head).await.is_err() {
        return; // gone already; the slot goes back with it
    }
    drop(head);
    let sock = Rc::new(sock);
    let max_frame = shared.cfg.limits.max_ws_frame_bytes;
    let pace = super::pace::Pace {
        base: std::time::Duration::from_millis(shared.cfg.limits.ws_write_stall_ms),
        min_rate: shared.cfg.limits.min_write_bytes_per_sec,
    };
    let metrics = shared.metrics.clone();
    let node = shared.clone();
    let reader = super::wsio::Reader::new(sock.clone(), &early, max_frame, shared.unfinished.clone());
    drop(early);
    // The context's own input stays empty: frames come decoded from the reader, whose
    // buffer is released between frames (the context's decoder would keep its last one).
    let out = WebsocketContext::with_factory(
        futures_util::stream::pending::<Result<bytes::Bytes, actix_http::error::PayloadError>>(),
        move |ctx| {
            use actix::AsyncContext;
            ctx.add_stream(reader);
            WsSession::new(shared, slot)
        },
    );
    if let Some(reason) = super::wsio::write_out(sock, out, pace, &node).await {
        metrics.rejected(reason, "unknown");
    }
}

/// Answers a refused handshake and closes the connection.
async fn refuse(mut sock: TcpStream, r: Refusal) {
    let body = r.body.to_string();
    let msg = format!(
        "HTTP/1.1 {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        r.status,
        body.len()
    );
    if sock.write_all(msg.as_bytes()).await.is_ok() {
        super::wsio::close(sock).await;
    }
}

/// One of `limits.max_sessions`, held by a socket for as long as it lives: taken atomically
/// (a burst of handshakes on several workers cannot pass the limit) and given back on drop,
/// on every path (a handshake refused after the check, a session that ends, one never started).
pub struct SocketSlot(Arc<Shared>);

impl SocketSlot {
    fn take(shared: &Arc<Shared>, max: usize) -> Option<SocketSlot> {
        shared
            .open_sockets
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1))
            .ok()
            .map(|_| SocketSlot(shared.clone()))
    }
}

impl Drop for SocketSlot {
    fn drop(&mut self) {
        self.0.open_sockets.fetch_sub(1, Ordering::AcqRel);
    }
}
