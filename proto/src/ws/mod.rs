//! WebSocket (RFC 6455), server side, sans-IO.
//!
//! - [`frame`]: the header codec and server frame encoders (one encoded frame is shared by many
//!   receivers because server frames are unmasked).
//! - [`mask`]: payload masking, fast path and bytewise twin.
//! - [`conn`]: [`Receiver`], the receive state machine: it turns client bytes into messages,
//!   enforcing masking, fragmentation rules, UTF-8 (also across fragments), close codes and the
//!   message size limit.
//! - [`handshake`]: the opening handshake (validation and the 101 response).

pub mod conn;
pub mod frame;
pub mod handshake;
pub mod mask;

pub use conn::{Message, Receiver, WsLimits};
pub use frame::{close_frame, encode_frame, server_frame, FrameHeader, OpCode};

/// Close codes used by ringcast (RFC 6455 §7.4 and the application range).
pub mod close {
    /// Normal closure.
    pub const NORMAL: u16 = 1000;
    /// The server is going away (drain on shutdown).
    pub const GOING_AWAY: u16 = 1001;
    /// The peer broke the protocol.
    pub const PROTOCOL: u16 = 1002;
    /// A text message was not valid UTF-8.
    pub const INVALID_PAYLOAD: u16 = 1007;
    /// Policy violation.
    pub const POLICY: u16 = 1008;
    /// A message exceeded the size limit.
    pub const TOO_BIG: u16 = 1009;
    /// The server hit an unexpected condition.
    pub const SERVER_ERROR: u16 = 1011;
    /// Try again later (overload).
    pub const TRY_AGAIN: u16 = 1013;
    /// The token expired while connected.
    pub const TOKEN_EXPIRED: u16 = 4001;
    /// Forbidden by the token's claims.
    pub const FORBIDDEN: u16 = 4003;
    /// The connection could not keep up with its outbound traffic.
    pub const SLOW_CONSUMER: u16 = 4008;
    /// Rate limited.
    pub const RATE_LIMITED: u16 = 4029;

    /// Whether a peer may send `code` in a close frame (RFC 6455 §7.4.1-2; 1004-1006 and 1015
    /// are reserved and never sent on the wire).
    pub fn is_valid_on_wire(code: u16) -> bool {
        matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
    }
}

/// Why the receive side gave up. Every variant maps to the close code the server must send
/// before closing; the caller sends it and stops reading.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WsError {
    /// The peer broke the framing rules: close with 1002.
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    /// A text message or close reason was not UTF-8: close with 1007.
    #[error("invalid UTF-8 in a text message or close reason")]
    InvalidUtf8,
    /// A message exceeded the configured limit: close with 1009.
    #[error("message of {size} bytes exceeds the limit of {limit}")]
    TooBig {
        /// Bytes announced or accumulated so far.
        size: u64,
        /// The configured maximum.
        limit: usize,
    },
}

impl WsError {
    /// The close code to send for this error.
    pub fn close_code(&self) -> u16 {
        match self {
            WsError::Protocol(_) => close::PROTOCOL,
            WsError::InvalidUtf8 => close::INVALID_PAYLOAD,
            WsError::TooBig { .. } => close::TOO_BIG,
        }
    }
}
