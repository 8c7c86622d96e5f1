//! The encrypted cluster link after the handshake (`link.rs`): a real handshake between two
//! in-memory ends per input, then the acceptor's `Opener` reads a byte stream that the input
//! composes from records the dialer sealed honestly and from an on-path attacker's moves:
//! raw bytes, a replayed record, a flipped bit, a dropped record, a truncation, a frame large
//! enough to span several records.
//!
//! Checked, beyond "no panic": the frames the reader accepts are a prefix of the frames the
//! dialer sealed, in sealing order (whatever was dropped, cut, replayed or altered on the
//! way, nothing out of order, forged or altered is ever accepted); with no attack it reads
//! every frame and then a clean end.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use mailroom::cluster::handshake::{self, Local, Role};
use mailroom::cluster::proto::{Claim, Frame, HandedMsg};

const MAX_FRAME: usize = 256 * 1024;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| tokio::runtime::Builder::new_current_thread().build().expect("runtime"))
}

struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }
    fn bytes(&mut self) -> Vec<u8> {
        let n = (self.byte().unwrap_or(0) as usize).min(self.0.len());
        let (b, rest) = self.0.split_at(n);
        self.0 = rest;
        b.to_vec()
    }
    fn text(&mut self) -> String {
        String::from_utf8_lossy(&self.bytes()).into_owned()
    }
    fn u64(&mut self) -> u64 {
        let mut v = 0u64;
        for _ in 0..8 {
            v = (v << 8) | self.byte().unwrap_or(0) as u64;
        }
        v
    }
    fn frame(&mut self) -> Frame {
        match self.byte().unwrap_or(0) % 10 {
            0 => Frame::Ping { t: self.u64() },
            1 => Frame::Pong { t: self.u64() },
            2 => Frame::Own {
                conn: self.text(),
                epoch: self.u64(),
            },
            3 => Frame::Disown {
                conn: self.text(),
                epoch: self.u64(),
            },
            4 => Frame::Queued { conn: self.text() },
            5 => {
                let n = self.byte().unwrap_or(0) % 8;
                let claims = (0..n)
                    .map(|_| Claim {
                        conn: self.text(),
                        epoch: self.u64(),
                    })
                    .collect();
                Frame::Resync {
                    claims,
                    last: self.byte().unwrap_or(0) & 1 == 1,
                }
            }
            6 => Frame::CloseSessions {
                conn: self.text(),
                reason: self.text(),
            },
            7 => Frame::RoutesChanged {
                conn: self.text(),
                keys: vec![self.text(), self.text()],
            },
            // Messages handed to the session's node with their notification (protocol 3).
            8 => {
                let n = self.byte().unwrap_or(0) % 4;
                let conn = self.text();
                let msgs = (0..n)
                    .map(|_| HandedMsg {
                        id: self.u64() as i64,
                        recipient_key: self.text(),
                        payload: self.bytes(),
                        received_at_ms: self.u64() as i64,
                    })
                    .collect();
                Frame::Deliver { conn, msgs }
            }
            _ => Frame::Leave,
        }
    }
}

fuzz_target!(|data: &[u8]| {
    runtime().block_on(async {
        let (mut a, mut b) = tokio::io::duplex(64 * 1024);
        let dialer = Local {
            cluster: "fuzz",
            node: "n1",
            secret: b"fuzz cluster secret",
            max_frame: MAX_FRAME,
        };
        let acceptor = Local { node: "n2", ..dialer };
        let (d, r) = tokio::join!(
            handshake::run(&mut a, &dialer, Role::Dialer, Some("n2"), |id| id == "n2"),
            handshake::run(&mut b, &acceptor, Role::Acceptor, None, |id| id == "n1"),
        );
        let (_, mut sealer) = d.expect("in-memory handshake").channel.split();
        let (mut opener, _) = r.expect("in-memory handshake").channel.split();

        let mut input = Input(data);
        let mut wire: Vec<u8> = Vec::new();
        let mut records: Vec<Vec<u8>> = Vec::new();
        let mut honest: Vec<Frame> = Vec::new();
        // Every frame sealed, in order, delivered or not.
        let mut sealed: Vec<Frame> = Vec::new();
        let mut attacked = false;
        for _ in 0..32 {
            let Some(op) = input.byte() else { break };
            match op % 9 {
                // An honest frame, delivered intact.
                0..=2 => {
                    let f = input.frame();
                    let rec = sealer.seal(&f).expect("seal").to_vec();
                    wire.extend_from_slice(&rec);
                    records.push(rec);
                    if !attacked {
                        honest.push(f.clone());
                    }
                    sealed.push(f);
                }
                // Bytes of the attacker's choosing.
                3 => {
                    let raw = input.bytes();
                    attacked |= !raw.is_empty();
                    wire.extend_from_slice(&raw);
                }
                // A record seen before, again.
                4 => {
                    if !records.is_empty() {
                        let i = input.byte().unwrap_or(0) as usize % records.len();
                        wire.extend_from_slice(&records[i]);
                        attacked = true;
                    }
                }
                // An honest record with one bit flipped on the way.
                5 => {
                    let f = input.frame();
                    let mut rec = sealer.seal(&f).expect("seal").to_vec();
                    sealed.push(f);
                    let at = (input.u64() as usize) % (rec.len() * 8);
                    rec[at / 8] ^= 1 << (at % 8);
                    wire.extend_from_slice(&rec);
                    attacked = true;
                }
                // An honest record the attacker drops.
                6 => {
                    let f = input.frame();
                    let _ = sealer.seal(&f).expect("seal");
                    sealed.push(f);
                    attacked = true;
                }
                // A frame over one record (Noise's 64 KiB limit): chunks with the MORE flag.
                // The stream cut short by 1-128 bytes (the peer's side sees a truncated record).
                8 => {
                    let cut = (input.byte().unwrap_or(0) as usize & 0x7f) + 1;
                    if !wire.is_empty() {
                        wire.truncate(wire.len().saturating_sub(cut));
                        attacked = true;
                    }
                }
                _ if wire.len() < 256 * 1024 => {
                    let fill = input.byte().unwrap_or(0);
                    let len = 65_000 + (input.u64() % 70_000) as usize;
                    let f = Frame::Noise { msg: vec![fill; len] };
                    let rec = sealer.seal(&f).expect("seal").to_vec();
                    wire.extend_from_slice(&rec);
                    records.push(rec);
                    if !attacked {
                        honest.push(f.clone());
                    }
                    sealed.push(f);
                }
                _ => {}
            }
        }
        let mut stream = &wire[..];
        let mut read = Vec::new();
        let end = loop {
            match opener.read_frame(&mut stream).await {
                Ok(Some(f)) => read.push(f),
                other => break other,
            }
        };
        assert!(
            read.len() <= sealed.len() && read[..] == sealed[..read.len()],
            "the link accepted a frame out of sealing order, forged or altered"
        );
        if !attacked {
            assert!(
                matches!(end, Ok(None)) && read.len() == honest.len(),
                "honest records refused: {end:?}"
            );
        }
    });
});
