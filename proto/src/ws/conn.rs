//! The receive state machine of a server-side WebSocket connection.
//!
//! [`Receiver::decode`] takes the bytes the engine has read (in its shared scratch buffer, or in
//! the connection's own buffer while a partial frame is pending), unmasks one frame in place and
//! returns a [`Message`] borrowing the input, or `Ok(None)` when the frame is incomplete. The
//! receiver owns memory only while a fragmented message is being assembled, which keeps idle
//! connections small.

use super::{close, frame::FrameHeader, mask::apply_mask, OpCode, WsError};

/// Receive limits. The defaults are those of `limits` in docs/operations.md.
#[derive(Debug, Clone, Copy)]
pub struct WsLimits {
    /// Largest message (after reassembly of fragments), in bytes. Default 64 KiB: client
    /// messages are small JSON envelopes, and a bound keeps a peer from making us buffer
    /// without end. Exceeding it closes with 1009.
    pub max_message: usize,
}

impl Default for WsLimits {
    fn default() -> Self {
        WsLimits {
            max_message: 64 * 1024,
        }
    }
}

/// A complete message (or control frame) from the client.
#[derive(Debug, PartialEq, Eq)]
pub enum Message<'a> {
    /// A complete, UTF-8-validated text message.
    Text(&'a [u8]),
    /// A complete binary message.
    Binary(&'a [u8]),
    /// A ping; answer with a pong carrying the same payload.
    Ping(&'a [u8]),
    /// A pong (answer to our heartbeat ping).
    Pong(&'a [u8]),
    /// The peer closes, with its code and reason if it sent one.
    Close(Option<(u16, &'a str)>),
}

#[derive(Debug)]
struct Fragments {
    text: bool,
    data: Vec<u8>,
    /// Bytes of `data` known to be a valid UTF-8 prefix (text messages only).
    valid_utf8: usize,
}

/// Receive-side state: owns memory only while a fragmented message is in flight (and, for one
/// call, the message it just reassembled).
#[derive(Debug, Default)]
pub struct Receiver {
    fragments: Option<Box<Fragments>>,
    assembled: Option<Box<Fragments>>,
}

/// What one [`Receiver::decode`] call did with the front of the input.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded<'a> {
    /// No complete frame yet; nothing consumed.
    NeedMore,
    /// A fragment of a message was consumed and buffered; no message is ready yet.
    Absorbed(usize),
    /// A message or control frame is ready; the input bytes consumed.
    Message(Message<'a>, usize),
}

impl Receiver {
    /// Whether a fragmented message is being assembled (the connection holds a buffer).
    pub fn is_assembling(&self) -> bool {
        self.fragments.is_some()
    }

    /// Decodes one frame from the front of `buf`, unmasking its payload in place.
    pub fn decode<'a>(
        &'a mut self,
        buf: &'a mut [u8],
        limits: &WsLimits,
    ) -> Result<Decoded<'a>, WsError> {
        self.assembled = None;
        let Some((header, header_len)) = FrameHeader::parse(buf)? else {
            return Ok(Decoded::NeedMore);
        };
        let Some(mask) = header.mask else {
            return Err(WsError::Protocol("client frames must be masked"));
        };
        let pending = self.fragments.as_ref().map_or(0, |f| f.data.len() as u64);
        let size = header.payload_len.saturating_add(pending);
        if !header.opcode.is_control() && size > limits.max_message as u64 {
            return Err(WsError::TooBig {
                size,
                limit: limits.max_message,
            });
        }
        let total = header_len + header.payload_len as usize;
        if buf.len() < total {
            return Ok(Decoded::NeedMore);
        }
        apply_mask(&mut buf[header_len..total], mask);
        let payload = &buf[header_len..total];
        let message = match header.opcode {
            OpCode::Ping => Message::Ping(payload),
            OpCode::Pong => Message::Pong(payload),
            OpCode::Close => match payload.len() {
                0 => Message::Close(None),
                1 => return Err(WsError::Protocol("close payload of one byte")),
                _ => {
                    let code = u16::from_be_bytes([payload[0], payload[1]]);
                    if !close::is_valid_on_wire(code) {
                        return Err(WsError::Protocol("invalid close code"));
                    }
                    let reason =
                        std::str::from_utf8(&payload[2..]).map_err(|_| WsError::InvalidUtf8)?;
                    Message::Close(Some((code, reason)))
                }
            },
            OpCode::Text | OpCode::Binary => {
                if self.fragments.is_some() {
                    return Err(WsError::Protocol(
                        "new message while a fragmented one is open",
                    ));
                }
                let text = header.opcode == OpCode::Text;
                if !header.fin {
                    let mut f = Box::new(Fragments {
                        text,
                        data: payload.to_vec(),
                        valid_utf8: 0,
                    });
                    if text {
                        f.valid_utf8 = utf8_prefix(&f.data, 0)?;
                    }
                    self.fragments = Some(f);
                    return Ok(Decoded::Absorbed(total));
                }
                if text {
                    std::str::from_utf8(payload).map_err(|_| WsError::InvalidUtf8)?;
                    Message::Text(payload)
                } else {
                    Message::Binary(payload)
                }
            }
            OpCode::Continue => {
                let Some(f) = self.fragments.as_mut() else {
                    return Err(WsError::Protocol("continuation without a message"));
                };
                f.data.extend_from_slice(payload);
                if f.text {
                    f.valid_utf8 = utf8_prefix(&f.data, f.valid_utf8)?;
                }
                if !header.fin {
                    return Ok(Decoded::Absorbed(total));
                }
                if f.text && f.valid_utf8 != f.data.len() {
                    return Err(WsError::InvalidUtf8);
                }
                let f = &**self
                    .assembled
                    .insert(self.fragments.take().expect("checked above"));
                if f.text {
                    Message::Text(&f.data)
                } else {
                    Message::Binary(&f.data)
                }
            }
        };
        Ok(Decoded::Message(message, total))
    }
}

/// Extends a known-valid UTF-8 prefix of `data` from `from`. An incomplete code point at the end
/// is fine (the next fragment may finish it); an invalid sequence anywhere is an error, reported
/// as soon as it is seen (fail fast, as Autobahn 6.4 expects).
fn utf8_prefix(data: &[u8], from: usize) -> Result<usize, WsError> {
    match std::str::from_utf8(&data[from..]) {
        Ok(_) => Ok(data.len()),
        Err(e) if e.error_len().is_none() => Ok(from + e.valid_up_to()),
        Err(_) => Err(WsError::InvalidUtf8),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ws::frame::encode_client_frame;
    use bytes::BytesMut;

    const MASK: [u8; 4] = [1, 2, 3, 4];

    fn frame(op: OpCode, fin: bool, payload: &[u8]) -> Vec<u8> {
        let mut out = BytesMut::new();
        encode_client_frame(op, fin, payload, MASK, &mut out);
        out.to_vec()
    }

    /// Feeds `wire` and returns what came out, as readable strings.
    fn run(wire: &[u8], limits: WsLimits) -> Vec<String> {
        let mut rx = Receiver::default();
        let mut buf = wire.to_vec();
        let mut pos = 0;
        let mut out = Vec::new();
        loop {
            match rx.decode(&mut buf[pos..], &limits) {
                Ok(Decoded::NeedMore) => break,
                Ok(Decoded::Absorbed(n)) => pos += n,
                Ok(Decoded::Message(m, n)) => {
                    out.push(match m {
                        Message::Text(t) => format!("text:{}", String::from_utf8_lossy(t)),
                        Message::Binary(b) => format!("bin:{}", b.len()),
                        Message::Ping(p) => format!("ping:{}", String::from_utf8_lossy(p)),
                        Message::Pong(_) => "pong".into(),
                        Message::Close(c) => format!("close:{c:?}"),
                    });
                    pos += n;
                }
                Err(e) => {
                    out.push(format!("err:{}", e.close_code()));
                    break;
                }
            }
        }
        out
    }

    #[test]
    fn single_and_fragmented_messages() {
        let mut wire = frame(OpCode::Text, true, b"hello");
        wire.extend(frame(OpCode::Text, false, b"fra"));
        wire.extend(frame(OpCode::Ping, true, b"p")); // control frames may interleave
        wire.extend(frame(OpCode::Continue, false, b"gm"));
        wire.extend(frame(OpCode::Continue, true, b"ent"));
        wire.extend(frame(OpCode::Close, true, &[0x03, 0xe8, b'o', b'k']));
        assert_eq!(
            run(&wire, WsLimits::default()),
            [
                "text:hello",
                "ping:p",
                "text:fragment",
                "close:Some((1000, \"ok\"))"
            ]
        );
    }

    #[test]
    fn utf8_split_across_fragments_is_fine_and_invalid_fails_fast() {
        let euro = "\u{20ac}".as_bytes(); // 3 bytes
        let mut wire = frame(OpCode::Text, false, &euro[..1]);
        wire.extend(frame(OpCode::Continue, true, &euro[1..]));
        assert_eq!(run(&wire, WsLimits::default()), ["text:\u{20ac}"]);
        // 0xFF can never start a code point: fail on the first fragment, not at the end.
        let wire = frame(OpCode::Text, false, &[b'a', 0xFF]);
        assert_eq!(run(&wire, WsLimits::default()), ["err:1007"]);
        let wire = frame(OpCode::Text, true, &[0xE2, 0x82]);
        assert_eq!(run(&wire, WsLimits::default()), ["err:1007"]);
    }

    #[test]
    fn protocol_errors() {
        // Unmasked client frame.
        assert_eq!(run(&[0x81, 0x00], WsLimits::default()), ["err:1002"]);
        // Continuation without a start.
        assert_eq!(
            run(&frame(OpCode::Continue, true, b"x"), WsLimits::default()),
            ["err:1002"]
        );
        // New data message inside a fragmented one.
        let mut wire = frame(OpCode::Text, false, b"a");
        wire.extend(frame(OpCode::Text, true, b"b"));
        assert_eq!(run(&wire, WsLimits::default()), ["err:1002"]);
        // Close codes: reserved 1005 and 999 are invalid, one-byte payload too.
        assert_eq!(
            run(
                &frame(OpCode::Close, true, &[0x03, 0xed]),
                WsLimits::default()
            ),
            ["err:1002"]
        );
        assert_eq!(
            run(
                &frame(OpCode::Close, true, &[0x03, 0xe7]),
                WsLimits::default()
            ),
            ["err:1002"]
        );
        assert_eq!(
            run(&frame(OpCode::Close, true, &[0x03]), WsLimits::default()),
            ["err:1002"]
        );
        // Close reason must be UTF-8.
        assert_eq!(
            run(
                &frame(OpCode::Close, true, &[0x03, 0xe8, 0xFF]),
                WsLimits::default()
            ),
            ["err:1007"]
        );
    }

    #[test]
    fn size_limit_applies_before_the_payload_arrives_and_across_fragments() {
        let limits = WsLimits { max_message: 10 };
        // Header announcing 11 bytes: rejected from the header alone.
        let wire = frame(OpCode::Binary, true, &[0; 11]);
        assert_eq!(run(&wire[..6], limits), ["err:1009"]);
        let mut wire = frame(OpCode::Binary, false, &[0; 6]);
        wire.extend(frame(OpCode::Continue, true, &[0; 5]));
        assert_eq!(run(&wire, limits), ["err:1009"]);
    }

    #[test]
    fn partial_frames_consume_nothing() {
        let wire = frame(OpCode::Text, true, b"hello");
        for cut in 0..wire.len() {
            assert!(run(&wire[..cut], WsLimits::default()).is_empty());
        }
    }
}
