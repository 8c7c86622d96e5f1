//! The WebSocket handshake of the public listener, on raw TCP against one real node
//! (src/session/upgrade.rs): the node answers it itself and hands the socket to its session,
//! so what the client sends right behind its handshake must reach the session, and a
//! handshake it cannot accept must be answered (4xx) without taking a session place.

mod common;

use common::*;
use mailroom::config::Strategy;
use serde_json::json;
use std::net::SocketAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

fn handshake(path: &str, method: &str, extra: &str) -> String {
    format!("{method} {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n{extra}\r\n")
}

fn good_headers() -> String {
    format!("Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {KEY}\r\n")
}

/// The answer's head, read a byte at a time (what follows stays in the socket).
async fn read_head(s: &mut TcpStream) -> String {
    String::from_utf8(read_until(s, b"\r\n\r\n", "answer head").await).unwrap()
}

/// The next data frame from the node (unmasked), skipping its pings.
async fn read_data_frame(s: &mut TcpStream) -> Vec<u8> {
    loop {
        let mut h = [0u8; 2];
        s.read_exact(&mut h).await.unwrap();
        let len = match h[1] & 0x7f {
            126 => {
                let mut l = [0u8; 2];
                s.read_exact(&mut l).await.unwrap();
                u16::from_be_bytes(l) as usize
            }
            127 => {
                let mut l = [0u8; 8];
                s.read_exact(&mut l).await.unwrap();
                u64::from_be_bytes(l) as usize
            }
            n => n as usize,
        };
        let mut payload = vec![0u8; len];
        s.read_exact(&mut payload).await.unwrap();
        match h[0] & 0x0f {
            0x1 | 0x2 => return payload,
            0x9 | 0xa => continue,
            op => panic!(
                "unexpected frame opcode {op:#x}: {:?}",
                String::from_utf8_lossy(&payload)
            ),
        }
    }
}

async fn open_sockets(admin: &str) -> u64 {
    get_json(&format!("{admin}/status")).await["open_sockets"]
        .as_u64()
        .unwrap()
}

/// Sends `request` and returns the status code of the answer, and whether the node closed
/// the connection after it.
async fn answer(addr: SocketAddr, request: &str) -> (u16, String, bool) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let head = read_head(&mut s).await;
    let code = head.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let mut rest = Vec::new();
    let closed = matches!(tokio::time::timeout(WAIT, s.read_to_end(&mut rest)).await, Ok(Ok(_)));
    (code, String::from_utf8_lossy(&rest).into_owned(), closed)
}

#[actix_rt::test]
async fn a_frame_sent_in_the_handshake_packet_reaches_the_session() {
    let (_dir, n, a, _) = node_with_wallet(Strategy::QueueAndLiveModeDelivery, |_| {}).await;
    let ping = json!({"@type": "https://didcomm.org/trust_ping/1.0/ping", "@id": "early", "response_requested": true, "~transport": {"return_route": "all"}});
    // The handshake and the first frame in one write: one segment on loopback, read by the
    // node together with the head.
    let mut bytes = handshake("/", "GET", &good_headers()).into_bytes();
    bytes.extend_from_slice(&common::masked_frame(&a.pack(&ping).unwrap()));
    let mut s = TcpStream::connect(n.public_addr).await.unwrap();
    s.set_nodelay(true).unwrap();
    s.write_all(&bytes).await.unwrap();
    let head = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
        "{head}"
    );
    let reply = tokio::time::timeout(WAIT, read_data_frame(&mut s))
        .await
        .expect("a reply to the frame sent with the handshake");
    let (pong, _) = a.unpack(&reply).expect("reply unpacks");
    assert_eq!(type_name(&pong), "ping_response", "{pong}");
    assert_eq!(pong["~thread"]["thid"], "early");
}

#[actix_rt::test]
async fn handshakes_off_root_or_malformed_are_refused_and_the_node_serves_on() {
    let (_dir, n, a, _) = node_with_wallet(Strategy::QueueAndLiveModeDelivery, |_| {}).await;
    let admin = n.admin_url();
    let cases = [
        (handshake("/elsewhere", "GET", &good_headers()), 404),
        (handshake("/invitation", "GET", &good_headers()), 404),
        (handshake("/", "GET", "Sec-WebSocket-Version: 13\r\n"), 400),
        (
            handshake(
                "/",
                "GET",
                &format!("Sec-WebSocket-Version: 12\r\nSec-WebSocket-Key: {KEY}\r\n"),
            ),
            400,
        ),
        (handshake("/", "POST", &good_headers()), 405),
    ];
    for (request, want) in &cases {
        let (code, body, closed) = answer(n.public_addr, request).await;
        assert_eq!(code, *want, "{request}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body:?}"));
        assert!(v["error"].is_string(), "{v}");
        assert!(closed, "the node closes a refused handshake's connection");
    }
    assert_eq!(open_sockets(&admin).await, 0, "refused handshakes hold no place");
    // The node serves on: HTTP and a real session.
    let pong = a
        .request(&json!({"@type": "https://didcomm.org/trust_ping/1.0/ping", "@id": "http", "response_requested": true, "~transport": {"return_route": "all"}}))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(type_name(&pong), "ping_response");
    let mut ws = a.websocket(&ws_url(&n)).await.unwrap();
    let pong = ws_request(
        &a,
        &mut ws,
        &json!({"@type": "https://didcomm.org/trust_ping/1.0/ping", "@id": "ws", "response_requested": true, "~transport": {"return_route": "all"}}),
    )
    .await;
    assert_eq!(pong["~thread"]["thid"], "ws");
    assert_eq!(open_sockets(&admin).await, 1);
}

#[actix_rt::test]
async fn a_frame_declared_over_max_ws_frame_bytes_is_refused_from_its_header() {
    const LIMIT: usize = 64 << 10;
    let (_dir, n, _a, _) = node_with_wallet(Strategy::QueueAndLiveModeDelivery, |c| {
        c.limits.max_ws_frame_bytes = LIMIT;
    })
    .await;
    let mut s = TcpStream::connect(n.public_addr).await.unwrap();
    s.write_all(handshake("/", "GET", &good_headers()).as_bytes())
        .await
        .unwrap();
    assert!(read_head(&mut s).await.starts_with("HTTP/1.1 101"));
    // A binary frame that says it is 4 x the limit, and only the first 4 KiB of it: the node
    // must close (1009) on the header, not wait for (or buffer) the rest.
    let mut f = vec![0x82u8, 0x80 | 127];
    f.extend_from_slice(&((4 * LIMIT) as u64).to_be_bytes());
    f.extend_from_slice(&[0x12, 0x34, 0x56, 0x78]);
    f.extend_from_slice(&[0u8; 4096]);
    s.write_all(&f).await.unwrap();
    let mut h = [0u8; 2];
    tokio::time::timeout(WAIT, s.read_exact(&mut h))
        .await
        .expect("a close frame")
        .unwrap();
    assert_eq!(h[0] & 0x0f, 0x8, "a close frame, got opcode {:#x}", h[0] & 0x0f);
    let mut payload = vec![0u8; (h[1] & 0x7f) as usize];
    s.read_exact(&mut payload).await.unwrap();
    assert_eq!(u16::from_be_bytes([payload[0], payload[1]]), 1009, "{payload:?}");
}
