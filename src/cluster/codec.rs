//! Length-prefixed framing of [`Frame`]s over tokio byte streams, in clear: the handshake's
//! frames only (after it, `link.rs` seals every frame).
//!
//! Owns: the record format `u32 big-endian length || payload` with `0 < length <= max_frame`,
//! reading/writing the raw preamble, and the errors of both framings. Must not know bincode
//! (that is `proto.rs`) nor any peer or cluster state. Any error returned here means "close
//! this connection": the caller logs the reason and drops only that peer's link.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::proto::{self, Frame, ProtoError, PREAMBLE_LEN};

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    #[error("frame length {len} exceeds the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("empty frame")]
    Empty,
    #[error("connection closed in the middle of a frame")]
    Truncated,
    #[error(transparent)]
    Proto(#[from] ProtoError),
    /// An encrypted record failed to open: altered, truncated, replayed, reordered, dropped
    /// before it, or sealed for another link.
    #[error("record failed authentication (altered, replayed, reordered or not of this link)")]
    Unauthentic,
    /// 2^64-1 records in one direction of one link (not reachable in practice).
    #[error("link counter exhausted")]
    NonceExhausted,
}

impl CodecError {
    /// True when the peer sent bytes we refuse (as opposed to the connection failing).
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            CodecError::TooLarge { .. } | CodecError::Empty | CodecError::Proto(_) | CodecError::Unauthentic
        )
    }
}

/// Reads one frame. `Ok(None)` on a clean end of stream at a frame boundary.
///
/// Not cancel-safe (it uses `read_exact`): each link has one dedicated reader task that only
/// stops by being dropped together with its stream.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R, max_frame: usize) -> Result<Option<Frame>, CodecError> {
    let mut len = [0u8; 4];
    // Distinguish EOF before the first byte (clean close) from EOF inside the header.
    let n = r.read(&mut len[..1]).await?;
    if n == 0 {
        return Ok(None);
    }
    read_exact(r, &mut len[1..]).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len == 0 {
        return Err(CodecError::Empty);
    }
    if len > max_frame {
        return Err(CodecError::TooLarge { len, max: max_frame });
    }
    let mut buf = vec![0u8; len];
    read_exact(r, &mut buf).await?;
    Ok(Some(proto::decode(&buf)?))
}

async fn read_exact<R: AsyncRead + Unpin>(r: &mut R, buf: &mut [u8]) -> Result<(), CodecError> {
    match r.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(CodecError::Truncated),
        Err(e) => Err(e.into()),
    }
}

/// Encodes a frame into one record (header + payload), refusing frames over `max_frame`
/// so we never send what the peer must refuse.
pub fn encode_record(frame: &Frame, max_frame: usize) -> Result<Vec<u8>, CodecError> {
    let payload = proto::encode(frame)?;
    if payload.len() > max_frame || payload.len() > u32::MAX as usize {
        return Err(CodecError::TooLarge {
            len: payload.len(),
            max: max_frame,
        });
    }
    let mut out = Vec::with_capacity(4 + payload.len());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Writes one frame (not flushed: callers batch and flush).
pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, frame: &Frame, max_frame: usize) -> Result<(), CodecError> {
    let rec = encode_record(frame, max_frame)?;
    w.write_all(&rec).await?;
    Ok(())
}

pub async fn write_preamble<W: AsyncWrite + Unpin>(w: &mut W) -> io::Result<()> {
    w.write_all(&proto::preamble()).await
}

pub async fn read_preamble<R: AsyncRead + Unpin>(r: &mut R) -> Result<[u8; PREAMBLE_LEN], CodecError> {
    let mut p = [0u8; PREAMBLE_LEN];
    read_exact(r, &mut p).await?;
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().build().expect("runtime")
    }

    #[tokio::test]
    async fn roundtrip_over_a_duplex_stream() {
        let (mut a, mut b) = tokio::io::duplex(64);
        let frames = vec![
            Frame::Ping { t: 1 },
            Frame::Queued { conn: "x".repeat(200) },
            Frame::Leave,
        ];
        let sent = frames.clone();
        let w = tokio::spawn(async move {
            for f in &sent {
                write_frame(&mut a, f, 1024).await.unwrap();
            }
            // dropping `a` closes the stream cleanly
        });
        for f in frames {
            assert_eq!(read_frame(&mut b, 1024).await.unwrap(), Some(f));
        }
        assert_eq!(read_frame(&mut b, 1024).await.unwrap(), None);
        w.await.unwrap();
    }

    #[tokio::test]
    async fn oversize_length_refused_before_reading_payload() {
        let mut input: &[u8] = &[0, 0x10, 0, 0, 1, 2, 3];
        let err = read_frame(&mut input, 1024).await.unwrap_err();
        assert!(matches!(
            err,
            CodecError::TooLarge {
                len: 0x100000,
                max: 1024
            }
        ));
        assert!(err.is_bad_input());
    }

    #[tokio::test]
    async fn empty_and_truncated_frames() {
        let mut input: &[u8] = &[0, 0, 0, 0];
        assert!(matches!(read_frame(&mut input, 1024).await, Err(CodecError::Empty)));
        let mut input: &[u8] = &[0, 0];
        assert!(matches!(read_frame(&mut input, 1024).await, Err(CodecError::Truncated)));
        let mut input: &[u8] = &[0, 0, 0, 5, 9];
        assert!(matches!(read_frame(&mut input, 1024).await, Err(CodecError::Truncated)));
    }

    #[test]
    fn oversize_frame_not_written() {
        let f = Frame::Queued { conn: "x".repeat(100) };
        assert!(matches!(encode_record(&f, 50), Err(CodecError::TooLarge { .. })));
        let rec = encode_record(&f, 1000).unwrap();
        assert_eq!(&rec[..4], &(rec.len() as u32 - 4).to_be_bytes());
    }

    proptest! {
        #[test]
        fn random_streams_never_panic(b in proptest::collection::vec(any::<u8>(), 0..512)) {
            rt().block_on(async {
                let mut input: &[u8] = &b;
                // read until error or end; every outcome is fine except a panic
                for _ in 0..64 {
                    match read_frame(&mut input, 256).await {
                        Ok(Some(_)) => continue,
                        _ => break,
                    }
                }
            });
        }
    }
}
