//! The cluster handshake against a hostile peer: our node (`n1` of cluster `fuzz`) runs
//! `handshake::run` while everything the peer says comes from the input: preamble (magic,
//! version), `Hello` (cluster, node id, nonce), the Noise message, then the first sealed
//! record (`Welcome`). What we write goes nowhere.
//!
//! Input: byte 0 picks our role (bit 0: dialer) and whether we expect a given peer id
//! (bit 1), the rest is the peer's byte stream. Seeds are a real peer's side of handshakes
//! recorded by `examples/fuzz_seeds.rs`.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use mailroom::cluster::handshake::{self, Local, Role};

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| tokio::runtime::Builder::new_current_thread().build().expect("runtime"))
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, peer_bytes)) = data.split_first() else {
        return;
    };
    let local = Local {
        cluster: "fuzz",
        node: "n1",
        secret: b"fuzz cluster secret",
        max_frame: 4096,
    };
    let role = if mode & 1 == 1 { Role::Dialer } else { Role::Acceptor };
    let expected = if mode & 2 == 2 { Some("n2") } else { None };
    let mut stream = tokio::io::join(peer_bytes, tokio::io::sink());
    let res = runtime().block_on(handshake::run(&mut stream, &local, role, expected, |id| {
        id == "n2" || id == "n3"
    }));
    match res {
        // Our nonce and ephemeral key are fresh per run: no recorded or forged input can
        // complete a handshake with us.
        Ok(est) => panic!("handshake completed with a peer replaying input: {:?}", est.peer),
        Err(e) => {
            let _ = (
                e.is_auth_failure(),
                e.is_bad_input(),
                e.is_version_mismatch(),
                e.to_string(),
            );
        }
    }
});
