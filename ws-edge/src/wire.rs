//! Server frames as the socket carries them, and the write half of a socket's TCP connection.
//!
//! A server does not mask its frames (RFC 6455, section 5.1), so a frame's header depends only on
//! its opcode and payload length. An event's payload is encoded once and shared by every
//! recipient. Each write sends a header of at most 10 bytes and the shared payload in one `writev`.

use std::io::{self, IoSlice};

use bytes::{BufMut, Bytes, BytesMut};
use tokio::net::tcp::OwnedWriteHalf;

/// The final-fragment bit of the first header byte.
const FIN: u8 = 0x80;
/// Opcode of a text frame.
const OPCODE_TEXT: u8 = 0x1;
/// Opcode of a close frame.
const OPCODE_CLOSE: u8 = 0x8;
/// Opcode of a ping frame.
const OPCODE_PING: u8 = 0x9;
/// Largest payload of a control frame (RFC 6455, section 5.5).
const MAX_CONTROL_PAYLOAD: usize = 125;

/// The header of an unmasked frame: 2, 4 or 10 bytes, or none for bytes that are already framed.
#[derive(Debug, Clone, Copy, Default)]
pub struct Header {
    bytes: [u8; 10],
    len: u8,
}

impl Header {
    /// Returns the header of a text frame with a payload of `len` bytes.
    pub fn text(len: usize) -> Self {
        Self::new(OPCODE_TEXT, len)
    }

    fn new(opcode: u8, len: usize) -> Self {
        let mut bytes = [0; 10];
        bytes[0] = FIN | opcode;
        let used = match u16::try_from(len) {
            Ok(short) if short < 126 => {
                bytes[1] = short as u8;
                2
            }
            Ok(medium) => {
                bytes[1] = 126;
                bytes[2..4].copy_from_slice(&medium.to_be_bytes());
                4
            }
            Err(_) => {
                bytes[1] = 127;
                bytes[2..10].copy_from_slice(&(len as u64).to_be_bytes());
                10
            }
        };
        Self { bytes, len: used }
    }

    /// Returns the header's bytes; empty for bytes that are already framed.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

/// Returns a close frame with `code` and `reason`; a reason longer than a control frame allows is
/// cut at a character boundary.
pub fn close_frame(code: u16, reason: &str) -> Bytes {
    let mut end = reason.len().min(MAX_CONTROL_PAYLOAD - 2);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let reason = &reason.as_bytes()[..end];
    let header = Header::new(OPCODE_CLOSE, 2 + reason.len());
    let mut frame = BytesMut::with_capacity(header.as_bytes().len() + 2 + reason.len());
    frame.put_slice(header.as_bytes());
    frame.put_u16(code);
    frame.put_slice(reason);
    frame.freeze()
}

/// Returns a ping frame with no payload.
pub fn ping_frame() -> Bytes {
    Bytes::copy_from_slice(Header::new(OPCODE_PING, 0).as_bytes())
}

/// The write half of a socket's TCP connection. Writes never wait: a write that would block
/// returns [`io::ErrorKind::WouldBlock`], and [`Wire::writable`] waits for room.
#[derive(Debug)]
pub struct Wire(OwnedWriteHalf);

impl Wire {
    /// Wraps the write half of an upgraded connection.
    pub fn new(half: OwnedWriteHalf) -> Self {
        Self(half)
    }

    /// Writes as much of `slices` as the socket's send buffer takes, without waiting.
    ///
    /// # Errors
    /// [`io::ErrorKind::WouldBlock`] when the send buffer is full, or the socket's error.
    pub fn try_write(&self, slices: &[IoSlice<'_>]) -> io::Result<usize> {
        self.0.try_write_vectored(slices)
    }

    /// Waits until the socket may take more bytes.
    ///
    /// # Errors
    /// Fails when the socket's readiness cannot be polled.
    pub async fn writable(&self) -> io::Result<()> {
        self.0.writable().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_sizes_follow_the_payload_length() {
        assert_eq!(Header::text(0).as_bytes(), [0x81, 0]);
        assert_eq!(Header::text(125).as_bytes(), [0x81, 125]);
        assert_eq!(Header::text(126).as_bytes(), [0x81, 126, 0, 126]);
        assert_eq!(Header::text(65_535).as_bytes(), [0x81, 126, 0xff, 0xff]);
        assert_eq!(Header::text(65_536).as_bytes(), [0x81, 127, 0, 0, 0, 0, 0, 1, 0, 0]);
        assert!(Header::default().as_bytes().is_empty());
    }

    #[test]
    fn close_frame_carries_code_and_reason() {
        assert_eq!(
            &close_frame(4008, "slow")[..],
            [0x88, 6, 0x0f, 0xa8, b's', b'l', b'o', b'w']
        );
    }

    #[test]
    fn close_reason_cut_at_char_boundary() {
        let reason = "א".repeat(100);
        let frame = close_frame(1000, &reason);
        let payload = &frame[2..];
        assert!(payload.len() <= MAX_CONTROL_PAYLOAD);
        assert_eq!(usize::from(frame[1]), payload.len());
        assert!(std::str::from_utf8(&payload[2..]).is_ok());
    }

    #[test]
    fn ping_has_no_payload() {
        assert_eq!(&ping_frame()[..], [0x89, 0]);
    }
}
