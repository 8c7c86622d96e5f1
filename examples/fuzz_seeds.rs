//! Writes the seed corpora of the fuzz targets (`fuzz/corpus/<target>/`) and the v2 keyring
//! (`fuzz/seeds/v2_keys.json`): envelopes, plaintexts, DIDs and keys lifted from the real
//! peers' captures (`../shared/interop/captures`) and `tests/fixtures/didcomm`; the config
//! files of the repository; and cluster frames, handshakes and link scripts produced with the
//! cluster codec itself (never written by hand, so they follow the wire format when it
//! changes).
//!
//! `cargo run --example fuzz_seeds [CAPTURES_DIR]` from the repository root. Seeds are named
//! by the SHA-256 of their bytes, so a rerun rewrites the same files.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use mailroom::cluster::codec;
use mailroom::cluster::handshake::{self, Local, Role};
use mailroom::cluster::proto::{self, Claim, Frame, Hello, NONCE_LEN};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Largest seed kept: libFuzzer's inputs stay small and fast.
const MAX_SEED: usize = 48 * 1024;
/// Seeds per target from the captures (the rest add little coverage).
const MAX_PER_TARGET: usize = 400;

#[derive(Default)]
struct Corpus {
    seeds: BTreeMap<&'static str, BTreeMap<String, Vec<u8>>>,
    v2_keys: BTreeMap<String, Value>,
}

impl Corpus {
    fn add(&mut self, target: &'static str, bytes: Vec<u8>) {
        if bytes.is_empty() || bytes.len() > MAX_SEED {
            return;
        }
        let set = self.seeds.entry(target).or_default();
        if set.len() >= MAX_PER_TARGET {
            return;
        }
        let name = hex::encode(&Sha256::digest(&bytes)[..8]);
        set.insert(name, bytes);
    }

    fn write(&self, root: &Path) -> std::io::Result<()> {
        for (target, set) in &self.seeds {
            let dir = root.join("corpus").join(target);
            std::fs::create_dir_all(&dir)?;
            for (name, bytes) in set {
                std::fs::write(dir.join(name), bytes)?;
            }
            println!("{target}: {} seeds", set.len());
        }
        std::fs::create_dir_all(root.join("seeds"))?;
        let keys = serde_json::to_string_pretty(&self.v2_keys).expect("json");
        std::fs::write(root.join("seeds/v2_keys.json"), keys + "\n")?;
        println!("v2 keyring: {} keys", self.v2_keys.len());
        Ok(())
    }
}

fn json_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else { return };
    let mut entries: Vec<_> = rd.flatten().map(|e| e.path()).collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            json_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "json") {
            out.push(p);
        }
    }
}

fn is_did(s: &str) -> bool {
    ["did:peer:", "did:key:", "did:sov:"].iter().any(|p| s.starts_with(p))
}

/// Everything in one captured JSON document that one of the targets reads.
fn harvest(v: &Value, key: Option<&str>, c: &mut Corpus) {
    match v {
        Value::Object(o) => {
            let compact = || serde_json::to_vec(v).expect("json");
            let has = |k: &str| o.contains_key(k);
            if has("ciphertext") && has("protected") && has("iv") {
                if has("recipients") {
                    c.add("envelope_v2", compact());
                } else {
                    c.add("envelope_v1", compact());
                    c.add("mediator", [&[0u8][..], &compact()].concat());
                }
            }
            if o.get("@type").is_some_and(Value::is_string) {
                c.add("message", compact());
                // Authcrypted by the fuzz connection's key, then handled (HTTP, WebSocket).
                c.add("mediator", [&[1u8][..], &compact()].concat());
                c.add("mediator", [&[0x11u8][..], &compact()].concat());
            } else if o.get("type").is_some_and(Value::is_string) && o.get("id").is_some_and(Value::is_string) {
                c.add("message", compact());
                c.add("mediator", [&[0u8][..], &compact()].concat());
            }
            if key == Some("dids") {
                for (did, doc) in o {
                    c.add("did", format!("{did}\n{doc}").into_bytes());
                }
            }
            if let (Some(kid), Some(jwk)) = (o.get("kid").and_then(Value::as_str), o.get("private_jwk")) {
                c.v2_keys.insert(kid.to_string(), jwk.clone());
            }
            for (k, child) in o {
                harvest(child, Some(k), c);
            }
        }
        Value::Array(a) => a.iter().for_each(|x| harvest(x, key, c)),
        Value::String(s) => {
            if is_did(s) {
                c.add("did", s.clone().into_bytes());
            }
            // Envelopes kept as the exact bytes the peer wrote.
            if matches!(key, Some("envelope" | "inner_envelope")) && s.starts_with('{') {
                c.add("envelope_v2", s.clone().into_bytes());
                c.add("mediator", [&[0u8][..], s.as_bytes()].concat());
                if let Ok(inner) = serde_json::from_str::<Value>(s) {
                    harvest(&inner, None, c);
                }
            }
        }
        _ => {}
    }
}

/// A stream that records every byte written to it.
struct Recorder<S> {
    inner: S,
    sent: Arc<Mutex<Vec<u8>>>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Recorder<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Recorder<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            self.sent.lock().expect("lock").extend_from_slice(&buf[..n]);
        }
        r
    }
    fn poll_flush(mut self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

const SECRET: &[u8] = b"fuzz cluster secret";

/// What peer `peer` (in `cluster`) sends to the fuzz targets' node n1 of cluster `fuzz` in a
/// handshake where n1 has `n1_role`.
async fn handshake_transcript(peer: &str, cluster: &str, n1_role: Role) -> Vec<u8> {
    let (a, mut b) = tokio::io::duplex(64 * 1024);
    let sent = Arc::new(Mutex::new(Vec::new()));
    let mut rec = Recorder {
        inner: a,
        sent: sent.clone(),
    };
    let theirs = Local {
        cluster,
        node: peer,
        secret: SECRET,
        max_frame: 4096,
    };
    let ours = Local {
        cluster: "fuzz",
        node: "n1",
        secret: SECRET,
        max_frame: 4096,
    };
    let peer_role = match n1_role {
        Role::Dialer => Role::Acceptor,
        Role::Acceptor => Role::Dialer,
    };
    let expected = (n1_role == Role::Dialer).then_some(peer);
    let _ = tokio::join!(
        handshake::run(&mut rec, &theirs, peer_role, None, |_| true),
        handshake::run(&mut b, &ours, n1_role, expected, |id| id == "n2" || id == "n3"),
    );
    let bytes = sent.lock().expect("lock").clone();
    bytes
}

fn frames() -> Vec<Frame> {
    vec![
        Frame::Hello(Hello {
            cluster: "fuzz".into(),
            node: "n2".into(),
            nonce: [7; NONCE_LEN],
        }),
        Frame::Proof { mac: [9; 32] },
        Frame::Welcome,
        Frame::Refused {
            reason: "unknown node id".into(),
        },
        Frame::Ping { t: 1_700_000_000_000 },
        Frame::Pong { t: 42 },
        Frame::Own {
            conn: "3f1c2b9e-conn".into(),
            epoch: 3,
        },
        Frame::Disown {
            conn: "3f1c2b9e-conn".into(),
            epoch: 3,
        },
        Frame::Resync {
            claims: vec![
                Claim {
                    conn: "a".into(),
                    epoch: 1,
                },
                Claim {
                    conn: "b".into(),
                    epoch: u64::MAX,
                },
            ],
            last: true,
        },
        Frame::Queued { conn: "conn-1".into() },
        Frame::Leave,
        Frame::Noise { msg: vec![0xab; 48] },
        Frame::CloseSessions {
            conn: "conn-1".into(),
            reason: "removed by an operator".into(),
        },
        Frame::RoutesChanged {
            conn: "conn-1".into(),
            keys: vec!["2iY6VmbKLvLvSKrQto4rehyMWRnJnhLhW8NY5BooqJ7U".into()],
        },
        Frame::Deliver {
            conn: "conn-1".into(),
            msgs: vec![proto::HandedMsg {
                id: 42,
                recipient_key: "2iY6VmbKLvLvSKrQto4rehyMWRnJnhLhW8NY5BooqJ7U".into(),
                payload: br#"{"protected":"e30","iv":"aXY","ciphertext":"Y3Q","tag":"dGFn"}"#.to_vec(),
                received_at_ms: 1_764_000_000_000,
            }],
        },
    ]
}

async fn cluster_seeds(c: &mut Corpus) {
    let all = frames();
    let mut stream = Vec::new();
    for f in &all {
        // The payload alone (what `proto::decode` reads) and as a record.
        c.add("cluster_frame", proto::encode(f).expect("encode"));
        let rec = codec::encode_record(f, 4096).expect("record");
        stream.extend_from_slice(&rec);
        c.add("cluster_frame", rec);
    }
    c.add("cluster_frame", stream.clone());
    c.add("cluster_frame", [&proto::preamble()[..], &stream].concat());

    for (peer, cluster, role, mode) in [
        ("n2", "fuzz", Role::Acceptor, 0u8),
        ("n2", "fuzz", Role::Dialer, 1),
        ("n2", "fuzz", Role::Dialer, 3),
        ("n3", "fuzz", Role::Acceptor, 2),
        ("n9", "fuzz", Role::Acceptor, 0),
        ("n2", "other", Role::Acceptor, 0),
    ] {
        let t = handshake_transcript(peer, cluster, role).await;
        c.add("cluster_handshake", [&[mode][..], &t].concat());
    }
    // Peers of the retired versions 1 and 2 (same magic), and one that is not a peer at all.
    for old in [1u16, 2] {
        let mut pre = proto::preamble();
        pre[4..].copy_from_slice(&old.to_be_bytes());
        c.add("cluster_handshake", [&[0u8][..], &pre[..]].concat());
    }
    c.add("cluster_handshake", b"\x00GET / HTTP/1.1\r\n\r\n".to_vec());

    // Link scripts (see fuzz/fuzz_targets/cluster_link.rs): honest frames of every kind,
    // then each attack after a few of them.
    let honest: Vec<u8> = vec![
        0, 0, 0, 0, 0, 0, 0, 0, 0, 1, // ping t=1
        1, 4, 6, b'c', b'o', b'n', b'n', b'-', b'1', // queued conn-1
        2, 2, 3, b'a', b'b', b'c', 0, 0, 0, 0, 0, 0, 0, 5, // own abc@5
        0, 5, 2, 1, b'x', 0, 0, 0, 0, 0, 0, 0, 1, 1, b'y', 0, 0, 0, 0, 0, 0, 0, 2, 1, // resync
        1, 6, 1, b'z', 4, b'g', b'o', b'n', b'e', // close-sessions
        2, 7, 1, b'z', 1, b'k', 1, b'l', // routes-changed
        0, 8, // leave
    ];
    c.add("cluster_link", honest.clone());
    for attack in [
        &[3u8, 4, 0, 0, 0, 32][..],            // raw bytes
        &[4, 1],                               // replay
        &[5, 0, 0, 0, 0, 0, 0, 0, 0, 0, 77],   // bit flip
        &[6, 8],                               // drop
        &[7, 0x5a, 0, 0, 0, 0, 0, 0, 0x10, 0], // a frame over several records
        &[8, 5],                               // truncation
    ] {
        c.add("cluster_link", [&honest[..], attack, &[0, 8]].concat());
    }
}

fn config_seeds(c: &mut Corpus, root: &Path) {
    let mut files = vec![root.join("cluster.toml")];
    for dir in ["container", "examples", "tests/fixtures"] {
        if let Ok(rd) = std::fs::read_dir(root.join(dir)) {
            files.extend(
                rd.flatten()
                    .map(|e| e.path())
                    .filter(|p| p.extension().is_some_and(|e| e == "toml")),
            );
        }
    }
    files.sort();
    for f in files {
        if let Ok(text) = std::fs::read(&f) {
            c.add("config", text.clone());
            // The same file with the environment a container gives it.
            let env = b"#--env\nMAILROOM_LISTEN=0.0.0.0:8080\nMAILROOM_PUBLIC_URL=https://mediator.example\nMAILROOM_CLUSTER_SECRET=s3cret-from-env\n";
            c.add("config", [&text[..], env].concat());
        }
    }
    c.add(
        "config",
        b"[[node]]\nid = \"n1\"\nlisten = \"127.0.0.1:8080\"\nadmin = \"127.0.0.1:8081\"\n".to_vec(),
    );
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let captures = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("../shared/interop/captures"));
    let mut c = Corpus::default();
    let mut files = Vec::new();
    json_files(&root.join("tests/fixtures/didcomm"), &mut files);
    json_files(&captures, &mut files);
    if !captures.is_dir() {
        eprintln!("fuzz_seeds: no captures at {} (fixtures only)", captures.display());
    }
    for f in files {
        let Ok(text) = std::fs::read_to_string(&f) else {
            continue;
        };
        if let Ok(v) = serde_json::from_str::<Value>(&text) {
            harvest(&v, None, &mut c);
        }
    }
    cluster_seeds(&mut c).await;
    config_seeds(&mut c, &root);
    c.write(&root.join("fuzz"))
}
