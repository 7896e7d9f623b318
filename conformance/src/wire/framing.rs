//! Length-prefixed frames (spec §5.2), read and written by the suite itself: a 4-byte
//! big-endian length, then a body of that many bytes holding one CBOR item.
//!
//! The limits are the numbers of the spec's table, not `missive_spec::limits`: the server
//! under test may build on that crate, and the suite must notice if the two ever drift
//! apart (a test below compares them).

use tokio::io::{AsyncRead, AsyncReadExt};

/// Largest request body a client may send (§5.2: 65 536 bytes).
pub const MAX_REQUEST_BODY: usize = 65_536;
/// Largest response or event body a server may send (§5.2: 4 194 304 bytes).
pub const MAX_RESPONSE_BODY: usize = 4_194_304;
/// Bytes of the length prefix.
pub const HEADER: usize = 4;

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("the stream ended {got} bytes into a frame's 4-byte length")]
    TruncatedHeader { got: usize },
    #[error("the stream ended after {got} of a frame's {len} body bytes")]
    TruncatedBody { got: usize, len: usize },
    #[error("a frame of {len} bytes announced; the limit is {max} (§5.2)")]
    TooLarge { len: usize, max: usize },
    #[error("bytes follow the one response frame on a request's stream (§5.4)")]
    AfterResponse,
    #[error("reading the stream failed: {0}")]
    Read(#[from] std::io::Error),
}

/// `body` with its length prefix. A body too long for the prefix is a bug in the caller.
pub fn frame(body: &[u8]) -> Vec<u8> {
    let len = u32::try_from(body.len()).expect("a frame body fits a 4-byte length");
    let mut out = Vec::with_capacity(HEADER + body.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// Reads one frame's body, refusing a length over `max` before reading any of it;
/// `Ok(None)` when the stream ended cleanly before a frame began.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R, max: usize) -> Result<Option<Vec<u8>>, FrameError> {
    let mut header = [0u8; HEADER];
    let mut got = 0;
    while got < HEADER {
        match r.read(&mut header[got..]).await? {
            0 if got == 0 => return Ok(None),
            0 => return Err(FrameError::TruncatedHeader { got }),
            n => got += n,
        }
    }
    let len = u32::from_be_bytes(header) as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    // The buffer grows with the bytes that arrive, never to the announced length at once.
    let mut body = Vec::with_capacity(len.min(16 * 1024));
    (&mut *r).take(len as u64).read_to_end(&mut body).await?;
    if body.len() < len {
        return Err(FrameError::TruncatedBody { got: body.len(), len });
    }
    Ok(Some(body))
}

/// Checks that the stream ends here: a request's stream carries exactly one response frame.
pub async fn expect_end<R: AsyncRead + Unpin>(r: &mut R) -> Result<(), FrameError> {
    let mut probe = [0u8; 1];
    match r.read(&mut probe).await? {
        0 => Ok(()),
        _ => Err(FrameError::AfterResponse),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_round_trip_and_end_cleanly() {
        let mut bytes = frame(b"\xa0");
        bytes.extend(frame(b""));
        let mut r = &bytes[..];
        assert_eq!(read_frame(&mut r, 10).await.unwrap(), Some(vec![0xa0]));
        assert_eq!(read_frame(&mut r, 10).await.unwrap(), Some(vec![]));
        assert_eq!(read_frame(&mut r, 10).await.unwrap(), None);
        expect_end(&mut r).await.unwrap();
    }

    #[tokio::test]
    async fn length_is_checked_before_the_body() {
        // Nothing follows the header: reading any body would report truncation instead.
        let mut r = &(MAX_RESPONSE_BODY as u32 + 1).to_be_bytes()[..];
        assert!(matches!(read_frame(&mut r, MAX_RESPONSE_BODY).await, Err(FrameError::TooLarge { len, .. }) if len == MAX_RESPONSE_BODY + 1));
        let mut r = &(10u32).to_be_bytes()[..];
        assert!(matches!(read_frame(&mut r, 10).await, Err(FrameError::TruncatedBody { got: 0, len: 10 })));
    }

    #[tokio::test]
    async fn truncation_and_trailing_bytes_are_errors() {
        let mut r = &[0u8, 0][..];
        assert!(matches!(read_frame(&mut r, 10).await, Err(FrameError::TruncatedHeader { got: 2 })));
        let mut r = &[0u8][..];
        assert!(matches!(expect_end(&mut r).await, Err(FrameError::AfterResponse)));
    }

    #[test]
    fn the_shared_crate_agrees_with_the_spec_text() {
        assert_eq!(missive_spec::limits::MAX_REQUEST_FRAME, MAX_REQUEST_BODY);
        assert_eq!(missive_spec::limits::MAX_RESPONSE_FRAME, MAX_RESPONSE_BODY);
        assert_eq!(missive_spec::codec::frame(b"abc"), frame(b"abc"));
    }
}
