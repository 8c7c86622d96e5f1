//! The socket of one WebSocket session once its handshake is done: a lean reader (frames in)
//! and a writer (the actor's encoded output out), sharing the one `TcpStream`.
//!
//! Idle sessions are most of what a mediator holds (a wallet keeps its socket open for
//! days), so an idle session owns no buffer: the reader waits for readiness, reads into a
//! buffer on the stack, and keeps only the bytes of a frame not yet complete (dropped as soon
//! as it is decoded); the writer holds one encoded chunk while the kernel takes it.
//! actix-http's h1 dispatcher, which served sessions before, kept 8 KiB read and 8 KiB
//! write buffers per connection for the session's whole life (docs/BENCHMARKS.md).
//!
//! Back-pressure as before: the actor runs only when the writer polls its output, and the
//! writer polls it only once the previous chunk is in the kernel; a wallet that never reads
//! stops its session (and its leases) where its socket is full. A session held there does
//! not run its heartbeat either, so the writer itself gives a socket up once it has taken none
//! of the pending bytes for `limits.ws_write_stall_ms`, or has taken a chunk slower than
//! `limits.min_write_bytes_per_sec` allows ([`Pace`]: a client reading a segment now and then
//! makes progress, and held its session otherwise): the session then stops as on any write
//! error (its leases go back, the wallet is woken elsewhere or pushed).
//!
//! Must not: allocate per idle session; buffer a frame whose header declares more than
//! `limits.max_ws_frame_bytes` (refused from its header, as `ws::ProtocolError::Overflow`:
//! actix-http's codec alone would buffer all of it first).

use actix_http::ws::{Codec, Frame, Message, ProtocolError};
use bytes::{Bytes, BytesMut};
use bytestring::ByteString;
use futures_util::{Stream, StreamExt};
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use super::pace::Pace;
use super::unfinished::{Share, Unfinished};
use super::Shared;
use std::sync::Arc;
use tokio::net::TcpStream;

/// Bytes read per system call (on the stack; a larger frame takes several).
const READ_CHUNK: usize = 8 << 10;
/// How long a closed session waits for its peer's end of the connection (its close frame's
/// answer) before dropping the socket.
const LINGER: Duration = Duration::from_secs(1);

/// The decoded frames of a session's socket, for `ctx.add_stream` (the actor's
/// `StreamHandler<Result<Message, ProtocolError>>`). Ends on EOF and after an error.
pub struct Reader {
    sock: Rc<TcpStream>,
    codec: Codec,
    /// A frame begun and not yet complete; empty (unallocated) between frames.
    buf: BytesMut,
    max_frame: usize,
    done: bool,
    /// What the bytes of a frame not yet whole take of the node's budget for unfinished
    /// messages.
    share: Share,
}

impl Reader {
    /// `early`: bytes the client sent right after its handshake, read with it.
    pub fn new(sock: Rc<TcpStream>, early: &[u8], max_frame: usize, budget: Arc<Unfinished>) -> Reader {
        Reader {
            sock,
            codec: Codec::new().max_size(max_frame),
            buf: BytesMut::from(early),
            max_frame,
            done: false,
            share: Share::of(&budget),
        }
    }

    /// The bytes received of a frame not yet whole are charged to the node's budget for
    /// unfinished messages, as they arrive: without it a client opening many sockets held a
    /// frame limit's worth on each, never finished. (Received, not allocated: the codec
    /// reserves room for a frame's declared length once its header is in, which costs no
    /// memory until bytes fill it, and a header alone must not take the budget.)
    fn charge(&mut self) -> Result<(), ProtocolError> {
        if self.share.hold(self.buf.len()) {
            return Ok(());
        }
        Err(ProtocolError::Io(io::Error::other(BudgetSpent)))
    }

    fn uncharge(&mut self) {
        self.share.clear();
    }

    /// The next complete frame in `buf`, if there is one.
    fn decode(&mut self) -> Result<Option<Message>, ProtocolError> {
        if self.buf.is_empty() {
            return Ok(None);
        }
        // The codec refuses an oversized frame only once all of it is in (buffering whatever
        // length the header declares): refuse it from its header.
        if declared_len(&self.buf).is_some_and(|n| n > self.max_frame as u64) {
            return Err(ProtocolError::Overflow);
        }
        self.charge()?;
        let frame = self.codec.decode_frame(&mut self.buf)?;
        if frame.is_some() {
            self.uncharge();
        }
        if self.buf.is_empty() {
            // Let go of the read allocation: the frame's bytes keep only their own part alive,
            // until the actor is done with them.
            self.buf = BytesMut::new();
        }
        frame.map(message).transpose()
    }
}

/// The payload length the frame at the start of `buf` declares, once its length bytes are in
/// (RFC 6455 5.2: 7 bits, or 126 and 16 bits, or 127 and 64 bits).
fn declared_len(buf: &[u8]) -> Option<u64> {
    match *buf.get(1)? & 0x7f {
        126 => buf.get(2..4).map(|b| u16::from_be_bytes([b[0], b[1]]) as u64),
        127 => buf
            .get(2..10)
            .map(|b| u64::from_be_bytes(b.try_into().expect("8 bytes"))),
        n => Some(n as u64),
    }
}

/// Why a frame was refused: the node holds as many unfinished messages as it takes
/// ([`super::unfinished`]); the session closes 1013, try again later.
#[derive(Debug)]
pub struct BudgetSpent;

impl std::fmt::Display for BudgetSpent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the node holds as many unfinished messages as it takes: send again later"
        )
    }
}

impl std::error::Error for BudgetSpent {}

impl Drop for Reader {
    fn drop(&mut self) {
        self.uncharge();
    }
}

/// A frame as the actor's `StreamHandler` takes it (as actix-web-actors decodes it).
fn message(frame: Frame) -> Result<Message, ProtocolError> {
    Ok(match frame {
        Frame::Text(data) => Message::Text(
            ByteString::try_from(data).map_err(|e| ProtocolError::Io(io::Error::new(io::ErrorKind::InvalidData, e)))?,
        ),
        Frame::Binary(data) => Message::Binary(data),
        Frame::Ping(p) => Message::Ping(p),
        Frame::Pong(p) => Message::Pong(p),
        Frame::Close(reason) => Message::Close(reason),
        Frame::Continuation(item) => Message::Continuation(item),
    })
}

/// `Decoder::decode` of the codec, under a name that says what it returns.
trait DecodeFrame {
    fn decode_frame(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, ProtocolError>;
}

impl DecodeFrame for Codec {
    fn decode_frame(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, ProtocolError> {
        actix_codec::Decoder::decode(self, buf)
    }
}

impl Stream for Reader {
    type Item = Result<Message, ProtocolError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            match this.decode() {
                Ok(Some(m)) => return Poll::Ready(Some(Ok(m))),
                Ok(None) => {}
                Err(e) => {
                    this.done = true;
                    this.buf = BytesMut::new();
                    this.uncharge();
                    return Poll::Ready(Some(Err(e)));
                }
            }
            if let Err(e) = ready!(this.sock.poll_read_ready(cx)) {
                this.done = true;
                return Poll::Ready(Some(Err(ProtocolError::Io(e))));
            }
            let mut chunk = [0u8; READ_CHUNK];
            match this.sock.try_read(&mut chunk) {
                // EOF: a frame left incomplete is dropped, and its share of the budget.
                Ok(0) => {
                    this.done = true;
                    this.buf = BytesMut::new();
                    this.uncharge();
                }
                Ok(n) => this.buf.extend_from_slice(&chunk[..n]),
                // Readiness was stale: try_read cleared it; poll_read_ready registers again.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(ProtocolError::Io(e))));
                }
            }
        }
    }
}

/// How long a socket whose client takes none of its bytes is kept once the node stops
/// ([`Shared::begin_stop`]), at most: the close frame's time to go out. Its session then ends
/// as on a stall, within the stop's first phase, instead of holding it (and the phases after
/// it) for `limits.ws_write_stall_ms`.
pub const STOP_GRACE: Duration = Duration::from_secs(3);

/// Why a write gave a socket up at the node's stop ([`STOP_GRACE`]), not for a stall.
#[derive(Debug)]
struct StopCut;

impl std::fmt::Display for StopCut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "given up at the node's stop")
    }
}

impl std::error::Error for StopCut {}

/// Why a write gave a socket up: its client took its bytes slower than
/// `limits.min_write_bytes_per_sec` allows ([`Pace`]).
#[derive(Debug)]
struct TooSlow;

impl std::fmt::Display for TooSlow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "client reads too slowly")
    }
}

impl std::error::Error for TooSlow {}

/// Writes the actor's output to the socket until the actor stops (its output ends) or the
/// socket fails, takes nothing for `pace.base` (`limits.ws_write_stall_ms`) or takes a chunk
/// slower than `pace` allows (the output is dropped, which stops the actor), or for
/// [`STOP_GRACE`] once `node` stops; then closes the connection. When it gave the socket up
/// for its client's reading, the reason (a `_rejected_total` label).
pub async fn write_out<E>(
    sock: Rc<TcpStream>,
    out: impl Stream<Item = Result<Bytes, E>>,
    pace: Pace,
    node: &Shared,
) -> Option<&'static str> {
    // `pump` owns the context (and the reader in it): once it returns, this is the socket's
    // last owner.
    if let Err(e) = pump(&sock, out, pace, node).await {
        if e.get_ref().is_some_and(|r| r.is::<StopCut>()) {
            tracing::info!(
                peer = ?sock.peer_addr().ok(),
                "WebSocket closed at the node's stop: its client took none of our bytes {} s into it",
                STOP_GRACE.as_secs()
            );
            reset(&sock);
            return None;
        }
        if e.get_ref().is_some_and(|r| r.is::<TooSlow>()) {
            tracing::info!(
                peer = ?sock.peer_addr().ok(),
                "WebSocket closed: its client took our bytes slower than {} bytes/s (limits.min_write_bytes_per_sec)",
                pace.min_rate
            );
            reset(&sock);
            return Some("ws-write-slow");
        }
        if e.kind() == io::ErrorKind::TimedOut {
            tracing::info!(
                peer = ?sock.peer_addr().ok(),
                "WebSocket closed: its client took none of our bytes for {} ms (limits.ws_write_stall_ms)",
                pace.base.as_millis()
            );
            reset(&sock);
            return Some("ws-write-stall");
        }
    }
    if let Ok(sock) = Rc::try_unwrap(sock) {
        close(sock).await;
    }
    None
}

async fn pump<E>(
    sock: &TcpStream,
    out: impl Stream<Item = Result<Bytes, E>>,
    pace: Pace,
    node: &Shared,
) -> io::Result<()> {
    let mut out = std::pin::pin!(out);
    while let Some(Ok(chunk)) = out.next().await {
        write_all(sock, &chunk, pace, node).await?;
    }
    Ok(())
}

/// Writes `data` whole: at most `pace.base` without progress (any progress starts it again),
/// and at most what `pace` allows its size in all.
async fn write_all(sock: &TcpStream, mut data: &[u8], pace: Pace, node: &Shared) -> io::Result<()> {
    let deadline = tokio::time::Instant::now() + pace.allowed(data.len() as u64);
    while !data.is_empty() {
        // Tried first: a socket with room takes the chunk at once, and the wait below (with
        // its timer) exists only while it is full.
        match sock.try_write(data) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => writable_within(sock, pace.base, deadline, node).await?,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Waits until `sock` takes more, at most `stall` and not past `deadline` ([`STOP_GRACE`] once
/// `node` stops). Boxed: its timers and readiness wait live on the heap while a socket is
/// full, not in every idle session's task (+200 bytes each inline: 7.4 -> 7.6 KiB per idle
/// session).
fn writable_within<'a>(
    sock: &'a TcpStream,
    stall: Duration,
    deadline: tokio::time::Instant,
    node: &'a Shared,
) -> Pin<Box<dyn std::future::Future<Output = io::Result<()>> + 'a>> {
    Box::pin(async move {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let (wait, late) = if left < stall {
            (left, io::Error::new(io::ErrorKind::TimedOut, TooSlow))
        } else {
            (stall, io::Error::from(io::ErrorKind::TimedOut))
        };
        tokio::select! {
            r = tokio::time::timeout(wait, sock.writable()) => r.map_err(|_| late)?,
            _ = node.stop_grace_over() => Err(io::Error::other(StopCut)),
        }
    })
}

/// Reset, not FIN: the kernel would keep the unsent bytes (megabytes) of a socket nobody
/// reads until its own timers gave up.
fn reset(sock: &TcpStream) {
    #[allow(deprecated)]
    let _ = sock.set_linger(Some(Duration::ZERO));
}

/// Ends our side (FIN after what was written), then waits a little for the peer's end, so
/// that what it still sends (a close frame's answer) does not turn our close into a reset
/// that could discard the close frame before the peer reads it.
pub async fn close(mut sock: TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    if sock.shutdown().await.is_err() {
        return;
    }
    let _ = tokio::time::timeout(LINGER, async {
        let mut sink = [0u8; 512];
        while matches!(sock.read(&mut sink).await, Ok(n) if n > 0) {}
    })
    .await;
}
