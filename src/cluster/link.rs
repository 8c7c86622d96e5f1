//! The encrypted cluster link: every frame after the handshake, sealed with the Noise
//! transport keys the handshake derived (see `handshake.rs`).
//!
//! Owns: the record format after the handshake and the per-direction counters. Must not know
//! bincode (frames become bytes through `proto`) nor any peer or cluster state.
//!
//! Record format, in each direction: `u32 big-endian length || Noise transport message`, the
//! length at most [`MAX_RECORD`] (65,535, Noise's own limit). A message decrypts to
//! `flag || chunk`: flag 0 ends a frame, flag 1 says more chunks of the same frame follow; a
//! frame is the concatenation of its chunks, at most `max_frame` bytes, and the frame's bytes
//! are its `proto` encoding. Frames under 64 KiB (all but large resyncs) take one record.
//!
//! Each direction has its own key (Noise `Split()`: fresh per link, since both sides bring a
//! new ephemeral key) and a counter, the ChaCha20-Poly1305 nonce: the n-th record a side sends
//! is sealed with nonce n, and the receiver opens the n-th record it reads with nonce n. The
//! counter never travels, so a record that was altered, truncated, replayed, reordered,
//! dropped or taken from another link fails to open; the receiver then closes the link
//! ([`CodecError::Unauthentic`], counted in `frames_rejected`) and the dialer reconnects.
//!
//! Key material lives only inside `snow`'s transport state, whose `Debug` prints nothing; the
//! types here print their direction counters and nothing else.

use std::fmt;
use std::sync::Arc;

use snow::StatelessTransportState;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};

use super::codec::CodecError;
use super::handshake::{self, HandshakeError, Local, Role};
use super::proto::{self, Frame};

/// Largest record body (one Noise transport message, tag included).
pub const MAX_RECORD: usize = 65_535;
/// ChaCha20-Poly1305 tag.
const TAG: usize = 16;
/// Frame bytes per record: the record less the tag and the flag byte.
const CHUNK: usize = MAX_RECORD - TAG - 1;
const FLAG_LAST: u8 = 0;
const FLAG_MORE: u8 = 1;

/// Both directions of one link, keyed by the handshake (which already used counter 0 of each
/// direction for its `Welcome`).
#[derive(Debug)]
pub struct SecureChannel {
    opener: Opener,
    sealer: Sealer,
}

impl SecureChannel {
    pub(crate) fn new(state: StatelessTransportState, max_frame: usize) -> Self {
        let state = Arc::new(state);
        let opener = Opener {
            state: state.clone(),
            nonce: 0,
            max_frame,
            record: Vec::new(),
            plain: Vec::new(),
            frame: Vec::new(),
        };
        let sealer = Sealer {
            state,
            nonce: 0,
            max_frame,
            out: Vec::new(),
            plain: Vec::new(),
        };
        SecureChannel { opener, sealer }
    }

    /// The two directions, to be used by separate tasks.
    pub fn split(self) -> (Opener, Sealer) {
        (self.opener, self.sealer)
    }

    pub(crate) fn parts(&mut self) -> (&mut Opener, &mut Sealer) {
        (&mut self.opener, &mut self.sealer)
    }

    /// Binds the two directions to the two halves of a stream.
    pub fn into_link<R, W>(self, r: R, w: W) -> (LinkReader<R>, LinkWriter<W>) {
        let (opener, sealer) = self.split();
        (LinkReader { r, opener }, LinkWriter { w, sealer })
    }
}

/// The sending direction: turns frames into sealed records.
pub struct Sealer {
    state: Arc<StatelessTransportState>,
    nonce: u64,
    max_frame: usize,
    out: Vec<u8>,
    plain: Vec<u8>,
}

impl fmt::Debug for Sealer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sealer")
            .field("sent", &self.nonce)
            .finish_non_exhaustive()
    }
}

impl Sealer {
    /// Seals one frame into one or more records; returns their bytes (valid until the next
    /// call). A frame over `max_frame` is refused with `TooLarge` and consumes no counter.
    pub fn seal(&mut self, frame: &Frame) -> Result<&[u8], CodecError> {
        let bytes = proto::encode(frame)?;
        if bytes.len() > self.max_frame {
            return Err(CodecError::TooLarge {
                len: bytes.len(),
                max: self.max_frame,
            });
        }
        self.out.clear();
        // At least one record, even for an empty encoding (none of ours is empty).
        let records = bytes.len().div_ceil(CHUNK).max(1);
        for i in 0..records {
            let chunk = &bytes[i * CHUNK..((i + 1) * CHUNK).min(bytes.len())];
            let last = i + 1 == records;
            self.plain.clear();
            self.plain.push(if last { FLAG_LAST } else { FLAG_MORE });
            self.plain.extend_from_slice(chunk);
            let at = self.out.len();
            let body = self.plain.len() + TAG;
            self.out.extend_from_slice(&(body as u32).to_be_bytes());
            self.out.resize(at + 4 + body, 0);
            let n = self
                .state
                .write_message(self.nonce, &self.plain, &mut self.out[at + 4..])
                .map_err(|_| CodecError::NonceExhausted)?;
            debug_assert_eq!(n, body);
            self.nonce += 1;
        }
        Ok(&self.out)
    }
}

/// The receiving direction: reads and opens records, reassembles frames.
pub struct Opener {
    state: Arc<StatelessTransportState>,
    nonce: u64,
    max_frame: usize,
    record: Vec<u8>,
    plain: Vec<u8>,
    frame: Vec<u8>,
}

impl fmt::Debug for Opener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Opener")
            .field("received", &self.nonce)
            .finish_non_exhaustive()
    }
}

impl Opener {
    /// Reads one frame. `Ok(None)` on a clean end of stream between frames; any error means
    /// "close this link" (`is_bad_input` tells an attack or a bug from a failed connection).
    ///
    /// Not cancel-safe: each link has one reader task that stops only by being dropped.
    pub async fn read_frame<R: AsyncRead + Unpin>(&mut self, r: &mut R) -> Result<Option<Frame>, CodecError> {
        self.frame.clear();
        loop {
            let mut len = [0u8; 4];
            let n = r.read(&mut len[..1]).await?;
            if n == 0 {
                return if self.frame.is_empty() {
                    Ok(None)
                } else {
                    Err(CodecError::Truncated)
                };
            }
            read_exact(r, &mut len[1..]).await?;
            let len = u32::from_be_bytes(len) as usize;
            if len > MAX_RECORD {
                return Err(CodecError::TooLarge { len, max: MAX_RECORD });
            }
            if len <= TAG {
                return Err(CodecError::Unauthentic);
            }
            self.record.resize(len, 0);
            read_exact(r, &mut self.record).await?;
            self.plain.resize(len - TAG, 0);
            let n = self
                .state
                .read_message(self.nonce, &self.record, &mut self.plain)
                .map_err(|_| CodecError::Unauthentic)?;
            self.nonce += 1;
            let (flag, chunk) = (self.plain[0], &self.plain[1..n]);
            if self.frame.len() + chunk.len() > self.max_frame {
                return Err(CodecError::TooLarge {
                    len: self.frame.len() + chunk.len(),
                    max: self.max_frame,
                });
            }
            self.frame.extend_from_slice(chunk);
            match flag {
                FLAG_LAST => return Ok(Some(proto::decode(&self.frame)?)),
                FLAG_MORE => continue,
                _ => return Err(CodecError::Unauthentic),
            }
        }
    }
}

async fn read_exact<R: AsyncRead + Unpin>(r: &mut R, buf: &mut [u8]) -> Result<(), CodecError> {
    match r.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(CodecError::Truncated),
        Err(e) => Err(e.into()),
    }
}

/// The receiving half of an established link.
#[derive(Debug)]
pub struct LinkReader<R> {
    r: R,
    opener: Opener,
}

impl<R: AsyncRead + Unpin> LinkReader<R> {
    /// See [`Opener::read_frame`].
    pub async fn read_frame(&mut self) -> Result<Option<Frame>, CodecError> {
        self.opener.read_frame(&mut self.r).await
    }
}

/// The sending half of an established link.
#[derive(Debug)]
pub struct LinkWriter<W> {
    w: W,
    sealer: Sealer,
}

impl<W: AsyncWrite + Unpin> LinkWriter<W> {
    /// Seals and writes one frame, not flushed (callers batch, then [`LinkWriter::flush`]).
    pub async fn write_frame(&mut self, frame: &Frame) -> Result<(), CodecError> {
        let rec = self.sealer.seal(frame)?;
        self.w.write_all(rec).await?;
        Ok(())
    }

    /// Writes one frame and flushes.
    pub async fn send(&mut self, frame: &Frame) -> Result<(), CodecError> {
        self.write_frame(frame).await?;
        self.flush().await
    }

    pub async fn flush(&mut self) -> Result<(), CodecError> {
        self.w.flush().await?;
        Ok(())
    }

    /// Flushes and closes the sending side of the stream.
    pub async fn shutdown(&mut self) -> Result<(), CodecError> {
        self.w.shutdown().await?;
        Ok(())
    }

    /// The raw stream under the link, for tests that misbehave on purpose.
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.w
    }
}

/// An established, authenticated and encrypted link.
#[derive(Debug)]
pub struct Link<S> {
    /// The peer's node id, as authenticated by the handshake.
    pub peer: String,
    pub reader: LinkReader<ReadHalf<S>>,
    pub writer: LinkWriter<WriteHalf<S>>,
}

/// Runs the handshake on `stream` as `role` and returns the link, split into its two halves.
/// `expected` and `accept_node` are as in [`handshake::run`]. This is how a program (or a
/// test) other than the node itself speaks to a cluster port.
pub async fn open<S, F>(
    mut stream: S,
    local: &Local<'_>,
    role: Role,
    expected: Option<&str>,
    accept_node: F,
) -> Result<Link<S>, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
    F: Fn(&str) -> bool,
{
    let est = handshake::run(&mut stream, local, role, expected, accept_node).await?;
    let (r, w) = tokio::io::split(stream);
    let (reader, writer) = est.channel.into_link(r, w);
    Ok(Link {
        peer: est.peer,
        reader,
        writer,
    })
}

/// Both ends of one in-memory Noise session, as the handshake would leave them (before its
/// `Welcome`s): for tests of what runs over a link.
#[cfg(test)]
pub(crate) fn test_pair(max_dialer: usize, max_acceptor: usize) -> (SecureChannel, SecureChannel) {
    let params: snow::params::NoiseParams = handshake::NOISE_PARAMS.parse().unwrap();
    let psk = [1u8; 32];
    let mut i = snow::Builder::new(params.clone())
        .psk(0, &psk)
        .build_initiator()
        .unwrap();
    let mut r = snow::Builder::new(params).psk(0, &psk).build_responder().unwrap();
    let (mut m, mut p) = ([0u8; 256], [0u8; 256]);
    let n = i.write_message(&[], &mut m).unwrap();
    r.read_message(&m[..n], &mut p).unwrap();
    let n = r.write_message(&[], &mut m).unwrap();
    i.read_message(&m[..n], &mut p).unwrap();
    (
        SecureChannel::new(i.into_stateless_transport_mode().unwrap(), max_dialer),
        SecureChannel::new(r.into_stateless_transport_mode().unwrap(), max_acceptor),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::proto::Claim;
    use proptest::prelude::*;

    use super::test_pair as pair;

    /// Splits sealed bytes into their records.
    fn records(mut b: &[u8]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        while !b.is_empty() {
            let n = u32::from_be_bytes(b[..4].try_into().unwrap()) as usize;
            out.push(b[..4 + n].to_vec());
            b = &b[4 + n..];
        }
        out
    }

    fn big_resync(claims: usize) -> Frame {
        Frame::Resync {
            claims: (0..claims)
                .map(|i| Claim {
                    conn: format!("conn-{i:08}-{}", "x".repeat(40)),
                    epoch: i as u64,
                })
                .collect(),
            last: true,
        }
    }

    #[tokio::test]
    async fn large_frames_span_records_and_come_back_whole() {
        let (a, b) = pair(1 << 20, 1 << 20);
        let (_, mut seal) = a.split();
        let (mut open, _) = b.split();
        let f = big_resync(4000); // ~230 KB
        let wire = seal.seal(&f).unwrap().to_vec();
        let recs = records(&wire);
        assert!(recs.len() >= 4, "{} records", recs.len());
        assert!(recs.iter().all(|r| r.len() - 4 <= MAX_RECORD));
        let small = seal.seal(&Frame::Leave).unwrap().to_vec();
        let mut input = [wire.clone(), small].concat();
        let mut r = &input[..];
        assert_eq!(open.read_frame(&mut r).await.unwrap(), Some(f));
        assert_eq!(open.read_frame(&mut r).await.unwrap(), Some(Frame::Leave));
        assert_eq!(open.read_frame(&mut r).await.unwrap(), None);

        // Dropping a middle record, or the stream ending inside the frame, is refused.
        let (a, b) = pair(1 << 20, 1 << 20);
        let (_, mut seal) = a.split();
        let wire = seal.seal(&big_resync(4000)).unwrap().to_vec();
        let recs = records(&wire);
        let (mut open, _) = b.split();
        input = [recs[0].clone(), recs[2].clone()].concat();
        let err = open.read_frame(&mut &input[..]).await.unwrap_err();
        assert!(matches!(err, CodecError::Unauthentic) && err.is_bad_input());
        let (a, b) = pair(1 << 20, 1 << 20);
        let (_, mut seal) = a.split();
        let wire = seal.seal(&big_resync(4000)).unwrap().to_vec();
        let recs = records(&wire);
        let (mut open, _) = b.split();
        let input = [recs[0].clone(), recs[1].clone()].concat();
        let err = open.read_frame(&mut &input[..]).await.unwrap_err();
        assert!(matches!(err, CodecError::Truncated), "{err}");
    }

    #[tokio::test]
    async fn frame_limits_hold_on_both_sides() {
        // The sender refuses a frame over its limit without spending a counter.
        let (a, b) = pair(1024, 1 << 20);
        let (_, mut seal) = a.split();
        let (mut open, _) = b.split();
        assert!(matches!(seal.seal(&big_resync(100)), Err(CodecError::TooLarge { .. })));
        let wire = seal.seal(&Frame::Leave).unwrap().to_vec();
        assert_eq!(open.read_frame(&mut &wire[..]).await.unwrap(), Some(Frame::Leave));
        // The receiver refuses a frame over its own limit, whatever the sender allows.
        let (a, b) = pair(1 << 20, 4096);
        let (_, mut seal) = a.split();
        let (mut open, _) = b.split();
        let wire = seal.seal(&big_resync(2000)).unwrap().to_vec();
        let err = open.read_frame(&mut &wire[..]).await.unwrap_err();
        assert!(matches!(err, CodecError::TooLarge { max: 4096, .. }) && err.is_bad_input());
        // A record length over Noise's limit is refused before reading it.
        let (mut open, _) = pair(1 << 20, 1 << 20).1.split();
        let input = [&(MAX_RECORD as u32 + 1).to_be_bytes()[..], &[0; 8]].concat();
        assert!(matches!(
            open.read_frame(&mut &input[..]).await,
            Err(CodecError::TooLarge { .. })
        ));
    }

    #[tokio::test]
    async fn every_single_bit_flip_is_refused() {
        let f = Frame::Own {
            conn: "conn-1".into(),
            epoch: 42,
        };
        let (a, b) = pair(1 << 20, 1 << 20);
        let (_, mut seal) = a.split();
        let wire = seal.seal(&f).unwrap().to_vec();
        let (b_open, _) = b.split();
        // A fresh receiver per try, expecting counter 0 as the real one would.
        let fresh = || Opener {
            state: b_open.state.clone(),
            nonce: 0,
            max_frame: 1 << 20,
            record: Vec::new(),
            plain: Vec::new(),
            frame: Vec::new(),
        };
        assert_eq!(fresh().read_frame(&mut &wire[..]).await.unwrap(), Some(f));
        for bit in 0..wire.len() * 8 {
            let mut w = wire.clone();
            w[bit / 8] ^= 1 << (bit % 8);
            assert!(fresh().read_frame(&mut &w[..]).await.is_err(), "bit {bit}");
        }
    }

    proptest! {
        #[test]
        fn random_input_never_panics(b in proptest::collection::vec(any::<u8>(), 0..600)) {
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            rt.block_on(async {
                let (mut open, _) = pair(1 << 20, 4096).1.split();
                let mut input: &[u8] = &b;
                for _ in 0..8 {
                    match open.read_frame(&mut input).await {
                        Ok(Some(_)) => continue,
                        _ => break,
                    }
                }
            });
        }
    }
}
