//! The WebSocket opening handshake (RFC 6455 §4.2).

use crate::http1::Head;

/// Why an upgrade request was refused (HTTP 400 or 426 before any WebSocket byte).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    /// Missing `Upgrade: websocket` / `Connection: Upgrade`: 426.
    #[error("this endpoint needs a WebSocket upgrade")]
    NotUpgrade,
    /// Missing or malformed `Sec-WebSocket-Key`: 400.
    #[error("missing or malformed Sec-WebSocket-Key")]
    BadKey,
    /// `Sec-WebSocket-Version` other than 13: 426 with `Sec-WebSocket-Version: 13`.
    #[error("unsupported Sec-WebSocket-Version (13 required)")]
    BadVersion,
}

impl HandshakeError {
    /// HTTP status for this error.
    pub fn status(&self) -> u16 {
        match self {
            HandshakeError::NotUpgrade | HandshakeError::BadVersion => 426,
            HandshakeError::BadKey => 400,
        }
    }
}

/// The subprotocol a ringcast client may offer; echoed back when offered.
pub const SUBPROTOCOL: &str = "ringcast.v1";

/// Checks an upgrade request and returns its `Sec-WebSocket-Key`.
pub fn validate(head: &Head) -> Result<&str, HandshakeError> {
    if !head.websocket_upgrade {
        return Err(HandshakeError::NotUpgrade);
    }
    if head.ws_version.as_deref() != Some("13") {
        return Err(HandshakeError::BadVersion);
    }
    let key = head.ws_key.as_deref().ok_or(HandshakeError::BadKey)?;
    // A key is 16 random bytes in base64: 24 characters ending in "==".
    if key.len() != 24 || !key.ends_with("==") {
        return Err(HandshakeError::BadKey);
    }
    Ok(key)
}

/// A token carried in `Sec-WebSocket-Protocol` (browsers cannot set headers on a WebSocket).
///
/// The list may hold `ringcast.v1` and the token, either bare (a JWT: three dot-separated
/// parts) or as `bearer.<jwt>`.
pub fn token_from_protocols(protocols: &str) -> Option<&str> {
    protocols.split(',').map(str::trim).find_map(|p| {
        if let Some(t) = p.strip_prefix("bearer.") {
            return Some(t);
        }
        (p.split('.').count() == 3).then_some(p)
    })
}

/// The subprotocol to answer with: `ringcast.v1` when the client offered it.
pub fn selected_protocol(protocols: Option<&str>) -> Option<&'static str> {
    protocols?
        .split(',')
        .any(|p| p.trim() == SUBPROTOCOL)
        .then_some(SUBPROTOCOL)
}

/// The `101 Switching Protocols` response for a validated key.
pub fn response(key: &str, protocol: Option<&str>) -> Vec<u8> {
    let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
    let mut out = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n"
    );
    if let Some(p) = protocol {
        out.push_str("Sec-WebSocket-Protocol: ");
        out.push_str(p);
        out.push_str("\r\n");
    }
    out.push_str("\r\n");
    out.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http1::parse_head;

    #[test]
    fn rfc_example_accept_key() {
        let resp = String::from_utf8(response("dGhlIHNhbXBsZSBub25jZQ==", None)).unwrap();
        assert!(
            resp.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"),
            "{resp}"
        );
    }

    #[test]
    fn validation() {
        let head = |extra: &str| {
            let s = format!(
                "GET /v1/ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n{extra}\r\n"
            );
            parse_head(s.as_bytes()).unwrap().unwrap().0
        };
        let ok =
            head("Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n");
        assert_eq!(validate(&ok), Ok("dGhlIHNhbXBsZSBub25jZQ=="));
        let v8 =
            head("Sec-WebSocket-Version: 8\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n");
        assert_eq!(validate(&v8), Err(HandshakeError::BadVersion));
        let nokey = head("Sec-WebSocket-Version: 13\r\n");
        assert_eq!(validate(&nokey), Err(HandshakeError::BadKey));
    }

    #[test]
    fn protocol_tokens() {
        assert_eq!(
            token_from_protocols("ringcast.v1, aaa.bbb.ccc"),
            Some("aaa.bbb.ccc")
        );
        assert_eq!(token_from_protocols("bearer.x.y.z"), Some("x.y.z"));
        assert_eq!(token_from_protocols("ringcast.v1"), None);
        assert_eq!(selected_protocol(Some("x, ringcast.v1")), Some(SUBPROTOCOL));
        assert_eq!(selected_protocol(Some("chat")), None);
    }
}
