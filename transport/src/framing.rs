//! Length-prefixed CBOR frames on QUIC streams (spec §5.2): the async shell around
//! `missive_spec::codec`.
//!
//! Reading an untrusted peer's request is bounded three ways: the announced length against
//! the frame limit (before any body byte is read), a deadline for the whole frame, and a
//! shared budget of body bytes being read at once, taken for the announced length of any
//! but a small frame before the body is read and given back when the frame is dropped.
//! The body buffer grows with
//! the bytes that actually arrive, never to the announced size up front.

use std::sync::Arc;
use std::time::Duration;

use missive_spec::codec::{self, DecodeError};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Why a frame could not be read from a stream.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("stream ended inside a frame")]
    Truncated,
    #[error("stream read failed: {0}")]
    Read(#[from] quinn::ReadError),
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error("the request frame did not arrive within {0:?}")]
    Timeout(Duration),
}

/// Bytes of request bodies a server reads at once, over all streams of one kind. One
/// permit is one KiB.
#[derive(Clone)]
pub struct BodyBudget(Arc<Semaphore>, u32);

impl BodyBudget {
    pub fn new(bytes: usize) -> BodyBudget {
        let kib = u32::try_from(bytes.div_ceil(1024)).unwrap_or(u32::MAX).min(Semaphore::MAX_PERMITS as u32);
        BodyBudget(Arc::new(Semaphore::new(kib as usize)), kib)
    }
}

/// Bodies up to this size are read without waiting for the budget: a connection's flow
/// control window already bounds what its small requests can hold, and a busy budget
/// must not keep everyday requests waiting.
pub const SMALL_FRAME: usize = 8 * 1024;

/// A frame body, holding its share of the reader's [`BodyBudget`] until dropped.
pub struct Frame {
    pub body: Vec<u8>,
    _share: Option<OwnedSemaphorePermit>,
}

async fn read_header(recv: &mut quinn::RecvStream) -> Result<Option<[u8; 4]>, FrameError> {
    let mut header = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match recv.read(&mut header[got..]).await? {
            Some(n) => got += n,
            None if got == 0 => return Ok(None),
            None => return Err(FrameError::Truncated),
        }
    }
    Ok(Some(header))
}

/// Reads `len` body bytes, growing the buffer only as bytes arrive.
async fn read_body(recv: &mut quinn::RecvStream, len: usize) -> Result<Vec<u8>, FrameError> {
    let mut body = Vec::with_capacity(len.min(16 * 1024));
    while body.len() < len {
        match recv.read_chunk(len - body.len(), true).await? {
            Some(chunk) => body.extend_from_slice(&chunk.bytes),
            None => return Err(FrameError::Truncated),
        }
    }
    Ok(body)
}

/// Reads one frame body from a trusted peer (a server's response); `Ok(None)` if the
/// stream finished cleanly before a frame began.
pub async fn read_frame(recv: &mut quinn::RecvStream, max: usize) -> Result<Option<Vec<u8>>, FrameError> {
    let Some(header) = read_header(recv).await? else { return Ok(None) };
    let len = codec::frame_len(header, max)?;
    read_body(recv, len).await.map(Some)
}

/// Reads one request frame from an untrusted peer within `deadline`, holding `budget` for
/// its announced length while its body is read; `Ok(None)` if the stream finished cleanly
/// before a frame began.
pub async fn read_request(recv: &mut quinn::RecvStream, max: usize, deadline: Duration, budget: &BodyBudget) -> Result<Option<Frame>, FrameError> {
    let read = async {
        let Some(header) = read_header(recv).await? else { return Ok(None) };
        let len = codec::frame_len(header, max)?;
        let share = if len <= SMALL_FRAME {
            None
        } else {
            let kib = u32::try_from(len.div_ceil(1024)).unwrap_or(u32::MAX).clamp(1, budget.1.max(1));
            // Waits for other requests' bodies to be handled; bounded by the deadline.
            Some(budget.0.clone().acquire_many_owned(kib).await.map_err(|_| FrameError::Timeout(deadline))?)
        };
        let body = read_body(recv, len).await?;
        Ok(Some(Frame { body, _share: share }))
    };
    tokio::time::timeout(deadline, read).await.map_err(|_| FrameError::Timeout(deadline))?
}

/// Writes one frame (length prefix and body).
pub async fn write_frame(send: &mut quinn::SendStream, body: &[u8]) -> Result<(), quinn::WriteError> {
    send.write_all(&codec::frame(body)).await
}
