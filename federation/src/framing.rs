//! Length-prefixed CBOR frames on QUIC streams (spec §5.2): the async shell around
//! `missive_spec::codec`.

use missive_spec::codec::{self, DecodeError};

/// Why a frame could not be read from a stream.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("stream ended inside a frame")]
    Truncated,
    #[error("stream read failed: {0}")]
    Read(#[from] quinn::ReadError),
    #[error(transparent)]
    Decode(#[from] DecodeError),
}

/// Reads one frame body; `Ok(None)` if the stream finished cleanly before a frame began.
pub async fn read_frame(recv: &mut quinn::RecvStream, max: usize) -> Result<Option<Vec<u8>>, FrameError> {
    let mut header = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match recv.read(&mut header[got..]).await? {
            Some(n) => got += n,
            None if got == 0 => return Ok(None),
            None => return Err(FrameError::Truncated),
        }
    }
    let len = codec::frame_len(header, max)?;
    let mut body = vec![0u8; len];
    recv.read_exact(&mut body).await.map_err(|e| match e {
        quinn::ReadExactError::FinishedEarly(_) => FrameError::Truncated,
        quinn::ReadExactError::ReadError(e) => FrameError::Read(e),
    })?;
    Ok(Some(body))
}

/// Writes one frame (length prefix and body).
pub async fn write_frame(send: &mut quinn::SendStream, body: &[u8]) -> Result<(), quinn::WriteError> {
    send.write_all(&codec::frame(body)).await
}
