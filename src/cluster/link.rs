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
