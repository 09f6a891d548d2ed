//! WebSocket frame header codec (RFC 6455 §5.2).
//!
//! Layout: byte 0 = FIN | RSV1..3 | opcode(4); byte 1 = MASK | len7; then a 16-bit or 64-bit
//! big-endian extended length when len7 is 126 or 127; then the 4-byte mask key when MASK is set.

use bytes::{BufMut, Bytes, BytesMut};

use super::WsError;

/// Frame opcodes this implementation knows. Others are a protocol error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpCode {
    /// A continuation of a fragmented message.
    Continue,
    /// A UTF-8 text message (or its first fragment).
    Text,
    /// A binary message (or its first fragment).
    Binary,
    /// Connection close.
    Close,
    /// Ping: the peer answers with a pong carrying the same payload.
    Ping,
    /// Pong.
    Pong,
}

impl OpCode {
    /// The 4-bit wire value.
    pub fn bits(self) -> u8 {
        match self {
            OpCode::Continue => 0x0,
            OpCode::Text => 0x1,
            OpCode::Binary => 0x2,
            OpCode::Close => 0x8,
            OpCode::Ping => 0x9,
            OpCode::Pong => 0xA,
        }
    }

    fn from_bits(bits: u8) -> Option<Self> {
        Some(match bits {
            0x0 => OpCode::Continue,
            0x1 => OpCode::Text,
            0x2 => OpCode::Binary,
            0x8 => OpCode::Close,
            0x9 => OpCode::Ping,
            0xA => OpCode::Pong,
            _ => return None,
        })
    }

    /// Control frames (close, ping, pong) may not be fragmented and carry at most 125 bytes.
    pub fn is_control(self) -> bool {
        matches!(self, OpCode::Close | OpCode::Ping | OpCode::Pong)
    }
}

/// A parsed frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Last frame of a message.
    pub fin: bool,
    /// The opcode.
    pub opcode: OpCode,
    /// The masking key, present on every client-to-server frame.
    pub mask: Option<[u8; 4]>,
    /// Payload length in bytes.
    pub payload_len: u64,
}

impl FrameHeader {
    /// Parses a header from the front of `buf`.
    ///
    /// Returns `Ok(None)` when `buf` does not yet hold the whole header (nothing is consumed), or
    /// the header and its length in bytes. Reserved bits and unknown opcodes are errors because
    /// no extension is negotiated.
    pub fn parse(buf: &[u8]) -> Result<Option<(FrameHeader, usize)>, WsError> {
        if buf.len() < 2 {
            return Ok(None);
        }
        let (b0, b1) = (buf[0], buf[1]);
        if b0 & 0x70 != 0 {
            return Err(WsError::Protocol("reserved bits set without an extension"));
        }
        let opcode = OpCode::from_bits(b0 & 0x0F).ok_or(WsError::Protocol("unknown opcode"))?;
        let fin = b0 & 0x80 != 0;
        let masked = b1 & 0x80 != 0;
        let len7 = b1 & 0x7F;
        let (payload_len, mut pos) = match len7 {
            126 => {
                if buf.len() < 4 {
                    return Ok(None);
                }
                (u64::from(u16::from_be_bytes([buf[2], buf[3]])), 4)
            }
            127 => {
                if buf.len() < 10 {
                    return Ok(None);
                }
                let len = u64::from_be_bytes(buf[2..10].try_into().expect("8 bytes checked"));
                if len >> 63 != 0 {
                    return Err(WsError::Protocol("payload length has the top bit set"));
                }
                (len, 10)
            }
            n => (u64::from(n), 2),
        };
        let mask = if masked {
            if buf.len() < pos + 4 {
                return Ok(None);
            }
            let m = [buf[pos], buf[pos + 1], buf[pos + 2], buf[pos + 3]];
            pos += 4;
            Some(m)
        } else {
            None
        };
        if opcode.is_control() && (!fin || payload_len > 125) {
            return Err(WsError::Protocol(
                "control frame fragmented or longer than 125 bytes",
            ));
        }
        Ok(Some((
            FrameHeader {
                fin,
                opcode,
                mask,
                payload_len,
            },
            pos,
        )))
    }

    /// Appends this header to `out`.
    pub fn encode(&self, out: &mut BytesMut) {
        let b0 = (u8::from(self.fin) << 7) | self.opcode.bits();
        let mask_bit = if self.mask.is_some() { 0x80 } else { 0 };
        let len = self.payload_len;
        if len < 126 {
            out.put_slice(&[b0, mask_bit | len as u8]);
        } else if len <= u64::from(u16::MAX) {
            out.put_slice(&[b0, mask_bit | 126]);
            out.put_u16(len as u16);
        } else {
            out.put_slice(&[b0, mask_bit | 127]);
            out.put_u64(len);
        }
        if let Some(m) = self.mask {
            out.put_slice(&m);
        }
    }
}

/// Appends an unmasked (server-to-client) frame to `out`.
pub fn encode_frame(opcode: OpCode, payload: &[u8], out: &mut BytesMut) {
    out.reserve(payload.len() + 10);
    FrameHeader {
        fin: true,
        opcode,
        mask: None,
        payload_len: payload.len() as u64,
    }
    .encode(out);
    out.put_slice(payload);
}

/// An unmasked server frame as one shareable buffer: encoded once, sent to many.
pub fn server_frame(opcode: OpCode, payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(payload.len() + 10);
    encode_frame(opcode, payload, &mut out);
    out.freeze()
}

/// A close frame with `code` and a reason (truncated to fit the 125-byte control limit).
pub fn close_frame(code: u16, reason: &str) -> Bytes {
    let mut payload = Vec::with_capacity(2 + reason.len().min(123));
    payload.extend_from_slice(&code.to_be_bytes());
    let mut cut = reason.len().min(123);
    while !reason.is_char_boundary(cut) {
        cut -= 1;
    }
    payload.extend_from_slice(&reason.as_bytes()[..cut]);
    server_frame(OpCode::Close, &payload)
}

/// Appends a masked (client-to-server) frame to `out`; used by the load generator and tests.
pub fn encode_client_frame(
    opcode: OpCode,
    fin: bool,
    payload: &[u8],
    mask: [u8; 4],
    out: &mut BytesMut,
) {
    FrameHeader {
        fin,
        opcode,
        mask: Some(mask),
        payload_len: payload.len() as u64,
    }
    .encode(out);
    let start = out.len();
    out.put_slice(payload);
    super::mask::apply_mask(&mut out[start..], mask);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (fin, opcode, mask, payload length, header length)
    type Expect = Option<(bool, OpCode, Option<[u8; 4]>, u64, usize)>;

    fn check(bytes: &[u8], expect: Expect) {
        let got = FrameHeader::parse(bytes).unwrap();
        let got = got.map(|(h, n)| (h.fin, h.opcode, h.mask, h.payload_len, n));
        assert_eq!(got, expect);
    }

    #[test]
    fn parses_rfc_examples() {
        // RFC 6455 §5.7: a single-frame unmasked text message "Hello".
        check(&[0x81, 0x05], Some((true, OpCode::Text, None, 5, 2)));
        // A single-frame masked text message "Hello".
        check(
            &[0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d],
            Some((true, OpCode::Text, Some([0x37, 0xfa, 0x21, 0x3d]), 5, 6)),
        );
        // 256 bytes binary message in a single unmasked frame.
        check(
            &[0x82, 0x7E, 0x01, 0x00],
            Some((true, OpCode::Binary, None, 256, 4)),
        );
        // 64 KiB binary message.
        check(
            &[0x82, 0x7F, 0, 0, 0, 0, 0, 1, 0, 0],
            Some((true, OpCode::Binary, None, 65536, 10)),
        );
    }

    #[test]
    fn incomplete_headers_consume_nothing() {
        check(&[], None);
        check(&[0x81], None);
        check(&[0x82, 0x7E, 0x01], None);
        check(&[0x81, 0x85, 0x37, 0xfa], None);
    }

    #[test]
    fn rejects_bad_headers() {
        assert!(FrameHeader::parse(&[0xC1, 0x00]).is_err()); // RSV1
        assert!(FrameHeader::parse(&[0x83, 0x00]).is_err()); // opcode 3
        assert!(FrameHeader::parse(&[0x09, 0x00]).is_err()); // fragmented ping
        assert!(FrameHeader::parse(&[0x89, 0x7E, 0x00, 0x7E]).is_err()); // 126-byte ping
    }

    #[test]
    fn encode_round_trips() {
        for len in [0usize, 125, 126, 65535, 65536] {
            let payload = vec![b'x'; len];
            let frame = server_frame(OpCode::Binary, &payload);
            let (h, n) = FrameHeader::parse(&frame).unwrap().unwrap();
            assert_eq!(h.payload_len as usize, len);
            assert_eq!(&frame[n..], &payload[..]);
        }
        let mut out = BytesMut::new();
        encode_client_frame(
            OpCode::Text,
            true,
            b"Hello",
            [0x37, 0xfa, 0x21, 0x3d],
            &mut out,
        );
        assert_eq!(
            &out[..],
            &[0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58]
        );
        let close = close_frame(1000, "bye");
        assert_eq!(&close[..], &[0x88, 0x05, 0x03, 0xe8, b'b', b'y', b'e']);
    }
}
