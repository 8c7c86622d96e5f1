//! File descriptors per WebSocket session. These machines cap a process at 20,000 open
//! files, so what one session costs on the node bounds how many wallets a node can hold.
//! The public listener's watchdog (src/session/watchdog.rs) keeps a duplicate of each
//! connection's descriptor to shut a slow keep-alive client down with; once the connection is
//! upgraded to a WebSocket it must give that duplicate back.
//!
//! Alone in its test binary: it counts this process's descriptors, which another test running
//! beside it would disturb.

mod common;

use common::*;
use mailroom::config::Strategy;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn open_files() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

async fn upgrade(addr: std::net::SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
        .await
        .unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match tokio::time::timeout(Duration::from_secs(20), s.read(&mut b)).await {
            Ok(Ok(1)) => head.push(b[0]),
            other => panic!("no answer to an upgrade: {other:?}"),
        }
    }
    assert!(head.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head));
    s
}

#[actix_rt::test]
async fn a_websocket_session_holds_one_descriptor_on_the_node() {
    const N: usize = 150;
    let dir = tempfile::tempdir().unwrap();
    let n = start(&test_config(dir.path(), Strategy::QueueAndLiveModeDelivery));
    // Warm the node (workers, store, pools) so its own descriptors are open before counting.
    let _ = invitation(&n).await;
    let before = open_files();
    let mut sockets = Vec::with_capacity(N);
    for _ in 0..N {
        sockets.push(upgrade(n.public_addr).await);
    }
    let after = open_files();
    let per_session = (after - before) as f64 / N as f64;
    // Each session: the test's client socket and the node's accepted socket. A third (the
    // watchdog's duplicate, kept for the session's life) would make it 3.
    assert!(
        per_session < 2.3,
        "{per_session:.2} descriptors per WebSocket session in this process ({before} -> {after} for {N}); expected 2 (client + node)"
    );
    drop(sockets);
}
