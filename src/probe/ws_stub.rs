//! A stand-in for a mediator's WebSocket in the probe's unit tests: a server on 127.0.0.1:0,
//! written on the WebSocket codec alone (no session code), that behaves as the test asks:
//! pings on a period and drops a client whose pongs stop (as ACA-Py does), or sends bytes
//! the probe cannot read. Test-only.

use actix_http::ws;
use futures_util::{SinkExt, StreamExt};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What the stub does once a client's socket is open.
#[derive(Clone)]
pub(crate) enum Behaviour {
    /// Pings every period and echoes text and binary frames; [`MISSED_PONGS`] pings in a row
    /// unanswered when the next one is due close the socket (policy violation): no pong for
    /// that many periods, as ACA-Py (1.5 s) with a period of 300 ms.
    Ping(Duration),
    /// Writes these bytes as they are (a frame of the test's making), then only reads.
    Raw(Vec<u8>),
}

/// A running stub: its URL and what it saw.
pub(crate) struct WsStub {
    pub url: String,
    pings: Arc<AtomicUsize>,
    dropped: Arc<AtomicBool>,
}

impl WsStub {
    /// Pings sent so far.
    pub fn pings(&self) -> usize {
        self.pings.load(Ordering::SeqCst)
    }

    /// Whether it closed a socket for a missed pong.
    pub fn dropped(&self) -> bool {
        self.dropped.load(Ordering::SeqCst)
    }
}

/// Starts a stub on 127.0.0.1:0 (on the current local set; it lives as long as the test's
/// runtime).
pub(crate) async fn start(b: Behaviour) -> WsStub {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind 127.0.0.1:0");
    let url = format!("ws://{}/", listener.local_addr().expect("bound"));
    let stub = WsStub {
        url,
        pings: Arc::default(),
        dropped: Arc::default(),
    };
    let (pings, dropped) = (stub.pings.clone(), stub.dropped.clone());
    tokio::task::spawn_local(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::task::spawn_local(serve(tcp, b.clone(), pings.clone(), dropped.clone()));
        }
    });
    stub
}

/// A frame a server may send: `opcode` (FIN set), unmasked, a payload under 126 bytes.
pub(crate) fn frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    assert!(payload.len() < 126, "short frames only");
    let mut f = vec![0x80 | opcode, payload.len() as u8];
    f.extend_from_slice(payload);
    f
}

async fn serve(mut tcp: TcpStream, b: Behaviour, pings: Arc<AtomicUsize>, dropped: Arc<AtomicBool>) {
    if handshake(&mut tcp).await.is_none() {
        return;
    }
    match b {
        Behaviour::Ping(every) => ping(tcp, every, &pings, &dropped).await,
        Behaviour::Raw(bytes) => {
            let _ = tcp.write_all(&bytes).await;
            // Keep the connection open: what the client makes of the bytes is the test.
            let mut sink = [0u8; 1024];
            while matches!(tcp.read(&mut sink).await, Ok(n) if n > 0) {}
        }
    }
}

/// Reads the upgrade request and accepts it (the client sends nothing more before the answer).
async fn handshake(tcp: &mut TcpStream) -> Option<()> {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(tcp.read_u8().await.ok()?);
        if head.len() > 16 << 10 {
            return None;
        }
    }
    let head = String::from_utf8_lossy(&head);
    let key = head.lines().find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.eq_ignore_ascii_case("sec-websocket-key")
            .then(|| value.trim().to_string())
    })?;
    let accept = ws::hash_key(key.as_bytes());
    let answer = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
        String::from_utf8_lossy(&accept)
    );
    tcp.write_all(answer.as_bytes()).await.ok()
}

/// Pings in a row a client may leave unanswered before the next tick drops it. More than one:
/// the stub shares a thread with the client, and after a stall of the thread its tick may run
/// before the client's pong (already on the socket) is read; a client that answers none is
/// dropped all the same.
pub(crate) const MISSED_PONGS: usize = 5;

async fn ping(tcp: TcpStream, every: Duration, pings: &AtomicUsize, dropped: &AtomicBool) {
    let mut framed = actix_codec::Framed::new(tcp, ws::Codec::new());
    let mut tick = tokio::time::interval(every);
    // After a stall, one tick at once and then a period apart (not a burst of the missed ones):
    // the client gets a period to answer each ping.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut unanswered = 0;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if unanswered >= MISSED_PONGS {
                    dropped.store(true, Ordering::SeqCst);
                    let reason = (ws::CloseCode::Policy, "missed pong").into();
                    let _ = framed.send(ws::Message::Close(Some(reason))).await;
                    return;
                }
                unanswered += 1;
                pings.fetch_add(1, Ordering::SeqCst);
                if framed.send(ws::Message::Ping("stub".into())).await.is_err() {
                    return;
                }
            }
            frame = framed.next() => match frame {
                Some(Ok(ws::Frame::Pong(_))) => unanswered = 0,
                Some(Ok(ws::Frame::Text(t))) => {
                    let _ = framed.send(ws::Message::Text(String::from_utf8_lossy(&t).into_owned().into())).await;
                }
                Some(Ok(ws::Frame::Binary(b))) => {
                    let _ = framed.send(ws::Message::Binary(b)).await;
                }
                Some(Ok(ws::Frame::Close(_))) | Some(Err(_)) | None => return,
                Some(Ok(_)) => {}
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::wallet::wait_for;

    /// A client that answers no ping is dropped once [`MISSED_PONGS`] pings went unanswered
    /// (what makes the wallet's test of a socket kept open able to fail).
    #[actix_rt::test]
    async fn a_client_that_never_answers_is_dropped() {
        let stub = start(Behaviour::Ping(Duration::from_millis(100))).await;
        let mut tcp = TcpStream::connect(stub.url.trim_start_matches("ws://").trim_end_matches('/'))
            .await
            .unwrap();
        // The upgrade, then nothing: the client never reads, so never answers a ping.
        tcp.write_all(
            b"GET / HTTP/1.1\r\nHost: stub\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        )
        .await
        .unwrap();
        wait_for("the silent client dropped", || stub.dropped()).await;
        assert_eq!(stub.pings(), MISSED_PONGS, "dropped after as many unanswered pings");
        drop(tcp);
    }
}
