//! Length-prefixed frames: a little-endian u32 length, then a postcard message.
//! The length is checked against the limit before anything is allocated.

use serde::{Serialize, de::DeserializeOwned};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: u64, max: u64 },
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error("stream closed")]
    Closed,
    #[error("stream i/o: {0}")]
    Io(#[from] std::io::Error),
}

pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    // Serialized behind room for the length, not copied behind it: a batch
    // of chunks is megabytes.
    let mut out =
        postcard::to_extend(msg, vec![0u8; 4]).map_err(|e| FrameError::Malformed(e.to_string()))?;
    let len = u32::try_from(out.len() - 4).map_err(|_| FrameError::TooLarge {
        len: out.len() as u64 - 4,
        max: u64::from(u32::MAX),
    })?;
    out[..4].copy_from_slice(&len.to_le_bytes());
    Ok(out)
}

/// Writes one frame; returns the bytes written.
pub async fn write<T: Serialize, W: AsyncWrite + Unpin>(
    w: &mut W,
    msg: &T,
    max: u64,
) -> Result<u64, FrameError> {
    let buf = encode_to_send(msg, max).await?;
    w.write_all(&buf).await?;
    Ok(buf.len() as u64)
}

/// As [`write`], to a QUIC stream: the frame is handed to quinn as it is,
/// not copied into its send buffer.
pub async fn write_quic<T: Serialize>(
    w: &mut quinn::SendStream,
    msg: &T,
    max: u64,
) -> Result<u64, FrameError> {
    let buf = encode_to_send(msg, max).await?;
    let n = buf.len() as u64;
    w.write_chunk(bytes::Bytes::from(buf))
        .await
        .map_err(std::io::Error::from)?;
    Ok(n)
}

/// A frame checked against `max`, once the link's bandwidth limit (which
/// every frame to the peer goes through) lets it go.
async fn encode_to_send<T: Serialize>(msg: &T, max: u64) -> Result<Vec<u8>, FrameError> {
    let buf = encode(msg)?;
    let len = buf.len() as u64 - 4;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    crate::transport::limit::LINK.take(buf.len() as u64).await;
    Ok(buf)
}

/// Reads one frame; returns the message and the bytes read.
pub async fn read<T: DeserializeOwned, R: AsyncRead + Unpin>(
    r: &mut R,
    max: u64,
) -> Result<(T, u64), FrameError> {
    let len = read_len(r, max).await?;
    let mut body = vec![0u8; len as usize];
    r.read_exact(&mut body).await?;
    let msg = decode(&body)?;
    Ok((msg, 4 + len))
}

/// Reads a frame's length, checked against `max` (nothing allocated yet).
pub async fn read_len<R: AsyncRead + Unpin>(r: &mut R, max: u64) -> Result<u64, FrameError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(FrameError::Closed),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_le_bytes(len) as u64;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    Ok(len)
}

/// Reads and decodes a frame's body of `len` bytes (its length read
/// before), failing if no byte arrives for `stall`.
pub async fn read_body<T: DeserializeOwned, R: AsyncRead + Unpin>(
    r: &mut R,
    len: u64,
    stall: std::time::Duration,
) -> Result<T, FrameError> {
    let mut body = vec![0u8; len as usize];
    let mut at = 0;
    while at < body.len() {
        let n = tokio::time::timeout(stall, r.read(&mut body[at..]))
            .await
            .map_err(|_| {
                FrameError::Io(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "no byte of the frame for {} s ({at} of {len} read)",
                        stall.as_secs()
                    ),
                ))
            })??;
        if n == 0 {
            return Err(FrameError::Io(std::io::ErrorKind::UnexpectedEof.into()));
        }
        at += n;
    }
    decode(&body)
}

pub fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    postcard::from_bytes(body).map_err(|e| FrameError::Malformed(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::messages::Request;

    #[tokio::test]
    async fn an_oversized_length_is_refused_before_allocation() {
        let mut input: &[u8] = &[0xff, 0xff, 0xff, 0xff];
        let r: Result<(Request, u64), _> = read(&mut input, 1 << 20).await;
        assert!(matches!(r, Err(FrameError::TooLarge { .. })));
    }

    #[tokio::test]
    async fn garbage_is_malformed_not_a_panic() {
        let mut input: &[u8] = &[5, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0xff];
        let r: Result<(Request, u64), _> = read(&mut input, 1 << 20).await;
        assert!(matches!(r, Err(FrameError::Malformed(_))));
    }

    #[tokio::test]
    async fn frames_round_trip() {
        let mut buf = Vec::new();
        let n = write(&mut buf, &Request::Points { volume: "v".into() }, 1 << 20)
            .await
            .unwrap();
        assert_eq!(n as usize, buf.len());
        let (m, _): (Request, u64) = read(&mut &buf[..], 1 << 20).await.unwrap();
        assert!(matches!(m, Request::Points { volume } if volume == "v"));
    }

    proptest::proptest! {
        #[test]
        fn no_byte_string_panics_the_decoder(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let _ = decode::<Request>(&bytes);
            let _ = decode::<crate::proto::messages::Response>(&bytes);
        }
    }
}
