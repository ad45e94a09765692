//! Length-prefixed frames carrying one [`WireMessage`] each.
//!
//! # Format
//!
//! ```text
//! +----------------------+------------------------------+
//! | length: u32 BE       | payload: `length` bytes      |
//! +----------------------+------------------------------+
//! ```
//!
//! The payload is the message in [postcard] encoding (compact binary: log
//! bytes are carried as-is, not inflated). A frame whose length exceeds
//! [`MAX_FRAME_LEN`] is refused as soon as its header is seen, before any of
//! its payload is buffered. A payload must decode to exactly one message with
//! no trailing bytes, and the message must pass [`WireMessage::validate`].
//!
//! # Errors close the channel
//!
//! There is no resynchronisation: after any error the byte stream can no
//! longer be trusted, so the caller closes the channel and fails the job with
//! the error as the reason. [`FrameDecoder`] enforces this by refusing further
//! use after an error ([`FrameError::Poisoned`]).
//!
//! # Three ways to read
//!
//! * [`FrameDecoder`]: sans-IO; feed it whatever bytes arrived, in any split,
//!   and pull complete messages. Cancel-safe in `select!` loops.
//! * [`read_frame`] / [`write_frame`]: blocking, over `std::io` (runner agent).
//! * `read_frame_async` / `write_frame_async` (feature `tokio`): over tokio
//!   streams (host agent). `read_frame_async` is not cancel-safe; use
//!   [`FrameDecoder`] where reads race other events.

use std::io::{self, Read, Write};
use std::marker::PhantomData;

use crate::message::{PROTOCOL_VERSION, WireMessage};
use crate::validation::Violations;

pub use crate::limits::MAX_FRAME_LEN;

/// Size of the frame header (the big-endian `u32` payload length).
pub const FRAME_HEADER_LEN: usize = 4;

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The stream ended in the middle of a frame.
    #[error("stream ended inside a frame: got {got} of {needed} bytes")]
    Truncated {
        /// Bytes the frame (header included) needed.
        needed: usize,
        /// Bytes that arrived.
        got: usize,
    },
    /// A frame header announced more than the maximum payload length.
    #[error("frame of {len} bytes exceeds the maximum of {max}")]
    TooLarge {
        /// Announced (or, when writing, actual) payload length.
        len: usize,
        /// The maximum.
        max: usize,
    },
    /// The payload is not a valid encoding of a message.
    #[error("malformed frame payload: {0}")]
    Malformed(#[source] postcard::Error),
    /// The payload decoded, but bytes were left over after the message.
    #[error("malformed frame payload: {count} trailing bytes after the message")]
    TrailingBytes {
        /// Number of bytes left over.
        count: usize,
    },
    /// A handshake message announced a protocol version we do not speak.
    #[error("peer speaks protocol version {offered}, we speak {supported}")]
    UnknownVersion {
        /// Version announced by the peer.
        offered: u16,
        /// Version we speak ([`PROTOCOL_VERSION`]).
        supported: u16,
    },
    /// The message decoded but breaks a bound of the protocol.
    #[error("invalid {kind} message: {violations}")]
    Invalid {
        /// The message's variant.
        kind: &'static str,
        /// What is wrong with it.
        violations: Violations,
    },
    /// The peer closed the channel at a frame boundary.
    #[error("channel closed by peer")]
    Closed,
    /// The decoder already failed; the channel must be closed.
    #[error("frame decoder used after an earlier error")]
    Poisoned,
    /// Reading or writing the underlying stream failed.
    #[error("frame I/O failed: {0}")]
    Io(#[from] io::Error),
}

/// Encodes `msg` as one complete frame (header and payload).
///
/// Fails with [`FrameError::Invalid`] if the message breaks a bound and with
/// [`FrameError::TooLarge`] if its payload exceeds [`MAX_FRAME_LEN`], so a
/// peer following this crate never sends what the other side would refuse.
pub fn encode_frame<M: WireMessage>(msg: &M) -> Result<Vec<u8>, FrameError> {
    msg.validate().map_err(|violations| FrameError::Invalid {
        kind: msg.kind(),
        violations,
    })?;
    let mut frame =
        postcard::to_extend(msg, vec![0u8; FRAME_HEADER_LEN]).map_err(FrameError::Malformed)?;
    let len = frame.len() - FRAME_HEADER_LEN;
    let too_large = FrameError::TooLarge {
        len,
        max: MAX_FRAME_LEN,
    };
    if len > MAX_FRAME_LEN {
        return Err(too_large);
    }
    let header = u32::try_from(len).map_err(|_| too_large)?;
    frame[..FRAME_HEADER_LEN].copy_from_slice(&header.to_be_bytes());
    Ok(frame)
}

/// Decodes one frame payload (without its header) into a message.
pub fn decode_payload<M: WireMessage>(payload: &[u8]) -> Result<M, FrameError> {
    if let Some(offered) = M::announced_version(payload)
        && offered != PROTOCOL_VERSION
    {
        return Err(FrameError::UnknownVersion {
            offered,
            supported: PROTOCOL_VERSION,
        });
    }
    let (msg, rest) = postcard::take_from_bytes::<M>(payload).map_err(FrameError::Malformed)?;
    if !rest.is_empty() {
        return Err(FrameError::TrailingBytes { count: rest.len() });
    }
    msg.validate().map_err(|violations| FrameError::Invalid {
        kind: msg.kind(),
        violations,
    })?;
    Ok(msg)
}

/// Reads the payload length from a frame header, refusing oversized frames.
fn payload_len(header: [u8; FRAME_HEADER_LEN]) -> Result<usize, FrameError> {
    let len = usize::try_from(u32::from_be_bytes(header)).unwrap_or(usize::MAX);
    if len > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge {
            len,
            max: MAX_FRAME_LEN,
        });
    }
    Ok(len)
}

/// Incremental, sans-IO frame decoder.
///
/// Feed it bytes as they arrive with [`feed`](Self::feed), in any split, then
/// call [`next_message`](Self::next_message) until it returns `Ok(None)`. At
/// end of stream call [`finish`](Self::finish) to detect a truncated frame.
/// Buffered data never exceeds one maximum frame plus what was fed since the
/// last drain.
#[derive(Debug)]
pub struct FrameDecoder<M> {
    buf: Vec<u8>,
    start: usize,
    poisoned: bool,
    _message: PhantomData<fn() -> M>,
}

impl<M: WireMessage> Default for FrameDecoder<M> {
    fn default() -> Self {
        Self::new()
    }
}

impl<M: WireMessage> FrameDecoder<M> {
    /// A decoder with an empty buffer.
    pub fn new() -> Self {
        Self {
            buf: Vec::new(),
            start: 0,
            poisoned: false,
            _message: PhantomData,
        }
    }

    /// Appends received bytes.
    pub fn feed(&mut self, bytes: &[u8]) {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes received but not yet consumed by a complete frame.
    pub fn buffered_len(&self) -> usize {
        self.buf.len() - self.start
    }

    /// The next complete message, `Ok(None)` if more bytes are needed, or
    /// the error that ends the channel (after which the decoder is poisoned).
    pub fn next_message(&mut self) -> Result<Option<M>, FrameError> {
        if self.poisoned {
            return Err(FrameError::Poisoned);
        }
        let result = self.take_message();
        if result.is_err() {
            self.poisoned = true;
            self.buf = Vec::new();
            self.start = 0;
        }
        result
    }

    /// Checks the stream ended at a frame boundary: call at end of stream.
    pub fn finish(&self) -> Result<(), FrameError> {
        if self.poisoned {
            return Err(FrameError::Poisoned);
        }
        let got = self.buffered_len();
        if got == 0 {
            return Ok(());
        }
        let needed = match self.header() {
            Some(header) => FRAME_HEADER_LEN + payload_len(header)?,
            None => FRAME_HEADER_LEN,
        };
        Err(FrameError::Truncated { needed, got })
    }

    fn header(&self) -> Option<[u8; FRAME_HEADER_LEN]> {
        self.buf
            .get(self.start..self.start + FRAME_HEADER_LEN)?
            .try_into()
            .ok()
    }

    fn take_message(&mut self) -> Result<Option<M>, FrameError> {
        let Some(header) = self.header() else {
            return Ok(None);
        };
        let len = payload_len(header)?;
        let payload_start = self.start + FRAME_HEADER_LEN;
        let Some(payload) = self.buf.get(payload_start..payload_start + len) else {
            return Ok(None);
        };
        let msg = decode_payload(payload)?;
        self.start = payload_start + len;
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        Ok(Some(msg))
    }
}

/// Writes `msg` as one frame and flushes `writer`.
pub fn write_frame<M: WireMessage>(writer: &mut impl Write, msg: &M) -> Result<(), FrameError> {
    let frame = encode_frame(msg)?;
    writer.write_all(&frame)?;
    writer.flush()?;
    Ok(())
}

/// Reads exactly one frame from `reader` (blocking) and decodes it.
///
/// Returns [`FrameError::Closed`] if the stream ends before the first header
/// byte, and [`FrameError::Truncated`] if it ends anywhere inside a frame.
pub fn read_frame<M: WireMessage>(reader: &mut impl Read) -> Result<M, FrameError> {
    let mut header = [0u8; FRAME_HEADER_LEN];
    let got = read_full(reader, &mut header)?;
    if got == 0 {
        return Err(FrameError::Closed);
    }
    if got < FRAME_HEADER_LEN {
        return Err(FrameError::Truncated {
            needed: FRAME_HEADER_LEN,
            got,
        });
    }
    let len = payload_len(header)?;
    let mut payload = vec![0u8; len];
    let got = read_full(reader, &mut payload)?;
    if got < len {
        return Err(FrameError::Truncated {
            needed: FRAME_HEADER_LEN + len,
            got: FRAME_HEADER_LEN + got,
        });
    }
    decode_payload(&payload)
}

/// Fills `buf` unless the stream ends first; returns the bytes read.
fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
    Ok(filled)
}

#[cfg(test)]
mod tests;

#[cfg(feature = "tokio")]
pub use self::tokio_io::{read_frame_async, write_frame_async};

#[cfg(feature = "tokio")]
mod tokio_io {
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

    use super::*;

    /// Writes `msg` as one frame and flushes `writer`.
    pub async fn write_frame_async<M: WireMessage>(
        writer: &mut (impl AsyncWrite + Unpin),
        msg: &M,
    ) -> Result<(), FrameError> {
        let frame = encode_frame(msg)?;
        writer.write_all(&frame).await?;
        writer.flush().await?;
        Ok(())
    }

    /// Reads exactly one frame from `reader` and decodes it; same errors as
    /// [`read_frame`]. Not cancel-safe: a cancelled read loses its bytes.
    pub async fn read_frame_async<M: WireMessage>(
        reader: &mut (impl AsyncRead + Unpin),
    ) -> Result<M, FrameError> {
        let mut header = [0u8; FRAME_HEADER_LEN];
        let got = read_full_async(reader, &mut header).await?;
        if got == 0 {
            return Err(FrameError::Closed);
        }
        if got < FRAME_HEADER_LEN {
            return Err(FrameError::Truncated {
                needed: FRAME_HEADER_LEN,
                got,
            });
        }
        let len = payload_len(header)?;
        let mut payload = vec![0u8; len];
        let got = read_full_async(reader, &mut payload).await?;
        if got < len {
            return Err(FrameError::Truncated {
                needed: FRAME_HEADER_LEN + len,
                got: FRAME_HEADER_LEN + got,
            });
        }
        decode_payload(&payload)
    }

    async fn read_full_async(
        reader: &mut (impl AsyncRead + Unpin),
        buf: &mut [u8],
    ) -> std::io::Result<usize> {
        let mut filled = 0;
        while filled < buf.len() {
            match reader.read(&mut buf[filled..]).await? {
                0 => break,
                n => filled += n,
            }
        }
        Ok(filled)
    }
}
