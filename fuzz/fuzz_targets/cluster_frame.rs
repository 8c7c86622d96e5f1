//! Cluster frame decoding in clear, as the handshake reads it: the `u32` length-prefixed
//! records of `codec.rs` (empty, oversize, truncated) and the bincode `Frame`s of `proto.rs`
//! inside them, read one after another from one stream until it ends or fails.
//!
//! Every frame that decodes must encode again and decode to the same frame, and fit the
//! record limit it was read under.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailroom::cluster::codec;
use mailroom::cluster::proto;

/// Small, so the length checks are reached often; the node's default is 1 MiB.
const MAX_FRAME: usize = 4096;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RT.get_or_init(|| tokio::runtime::Builder::new_current_thread().build().expect("runtime"))
}

fuzz_target!(|data: &[u8]| {
    // The raw payload decoder alone, and the preamble check on the first bytes.
    if let Ok(f) = proto::decode(data) {
        let _ = f.kind();
        let again = proto::encode(&f).expect("a decoded frame encodes");
        assert_eq!(proto::decode(&again).expect("re-decodes"), f);
    }
    if let Some(p) = data.first_chunk::<{ proto::PREAMBLE_LEN }>() {
        let _ = proto::check_preamble(p);
    }
    runtime().block_on(async {
        let mut input = data;
        for _ in 0..64 {
            match codec::read_frame(&mut input, MAX_FRAME).await {
                Ok(Some(f)) => {
                    let rec = codec::encode_record(&f, MAX_FRAME).expect("a frame read encodes");
                    assert!(rec.len() <= MAX_FRAME + 4);
                }
                Ok(None) | Err(_) => break,
            }
        }
    });
});
