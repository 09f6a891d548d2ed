//! HTTP/1.1 request heads (httparse) and the routing decision, sans-IO.
//!
//! [`parse_head`] copies the few header values ringcast acts on into an owned [`Head`], so the
//! engine can drop its read buffer right after parsing. [`route`] is a pure function from a head
//! to a [`Route`]. [`Response`] writes status lines and bodies.

mod response;

pub use response::{api_error, json_error, Response};

use std::borrow::Cow;

/// Largest request head accepted. Anything longer is a 431 and a close: real clients send well
/// under 2 KiB, and a bound stops slow-loris style memory growth.
pub const MAX_HEAD: usize = 8 * 1024;
const MAX_HEADERS: usize = 48;

/// Why a head was refused. Each maps to a 4xx status; the connection is closed after it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    /// Not HTTP/1.x: 400.
    #[error("malformed request head: {0}")]
    Malformed(&'static str),
    /// Head over [`MAX_HEAD`] or too many header lines: 431.
    #[error("request head too large")]
    TooLarge,
}

impl HeadError {
    /// HTTP status for this error.
    pub fn status(&self) -> u16 {
        match self {
            HeadError::Malformed(_) => 400,
            HeadError::TooLarge => 431,
        }
    }
}

/// Request method, as far as routing cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// GET
    Get,
    /// POST
    Post,
    /// HEAD
    Head,
    /// OPTIONS
    Options,
    /// Anything else (answered with 405).
    Other,
}

/// The parts of a request head that ringcast acts on, owned.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Head {
    /// Request method.
    pub method: Option<Method>,
    /// Path without the query string.
    pub path: String,
    /// Raw query string (without `?`), empty if none.
    pub query: String,
    /// HTTP/1.1 (true) or 1.0.
    pub http11: bool,
    /// `Connection: close` (or HTTP/1.0 without keep-alive).
    pub close: bool,
    /// `Connection` contains `upgrade` and `Upgrade` contains `websocket`.
    pub websocket_upgrade: bool,
    /// `Sec-WebSocket-Key`.
    pub ws_key: Option<String>,
    /// `Sec-WebSocket-Version`.
    pub ws_version: Option<String>,
    /// `Sec-WebSocket-Protocol`, all values joined with `,`.
    pub ws_protocol: Option<String>,
    /// `Authorization`.
    pub authorization: Option<String>,
    /// `Origin`.
    pub origin: Option<String>,
    /// `Content-Length`, if present and numeric.
    pub content_length: Option<u64>,
    /// A `Transfer-Encoding` header was present (not supported for requests: 501).
    pub chunked: bool,
    /// `Last-Event-ID` (SSE resume).
    pub last_event_id: Option<String>,
    /// `X-Forwarded-For` (trusted only behind a configured proxy).
    pub forwarded_for: Option<String>,
}

impl Head {
    /// The bearer token of an `Authorization: Bearer ...` header.
    pub fn bearer(&self) -> Option<&str> {
        let v = self.authorization.as_deref()?;
        let (scheme, token) = v.split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
    }

    /// A decoded query parameter (first occurrence).
    pub fn query_param(&self, name: &str) -> Option<Cow<'_, str>> {
        query_params(&self.query)
            .find(|(k, _)| k == name)
            .map(|(_, v)| v)
    }
}

/// Iterates `(name, value)` pairs of a query string, percent-decoded (`+` is a space).
pub fn query_params(query: &str) -> impl Iterator<Item = (Cow<'_, str>, Cow<'_, str>)> {
    query.split('&').filter(|p| !p.is_empty()).map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(k), percent_decode(v))
    })
}

/// Decodes `%XX` escapes and `+` (as a space) in a query value or path segment.
pub fn percent_decode(s: &str) -> Cow<'_, str> {
    if !s.bytes().any(|b| b == b'%' || b == b'+') {
        return Cow::Borrowed(s);
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    Cow::Owned(String::from_utf8_lossy(&out).into_owned())
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Parses a request head from the front of `buf`.
///
/// Returns `Ok(None)` while the head is incomplete (and under [`MAX_HEAD`]), or the head and its
/// length in bytes; the body, if any, starts there.
pub fn parse_head(buf: &[u8]) -> Result<Option<(Head, usize)>, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let n = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => return Err(HeadError::TooLarge),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
        Err(_) => return Err(HeadError::Malformed("not an HTTP/1.x request head")),
    };
    if n > MAX_HEAD {
        return Err(HeadError::TooLarge);
    }
    let target = req.path.ok_or(HeadError::Malformed("no request target"))?;
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let http11 = req.version == Some(1);
    let mut head = Head {
        method: Some(match req.method.unwrap_or("") {
            "GET" => Method::Get,
            "POST" => Method::Post,
            "HEAD" => Method::Head,
            "OPTIONS" => Method::Options,
            _ => Method::Other,
        }),
        path: path.to_owned(),
        query: query.to_owned(),
        http11,
        close: !http11,
        ..Head::default()
    };
    let mut upgrade_websocket = false;
    let mut connection_upgrade = false;
    for h in req.headers.iter() {
        let value = || String::from_utf8_lossy(h.value).trim().to_owned();
        let name = h.name;
        if name.eq_ignore_ascii_case("connection") {
            for token in String::from_utf8_lossy(h.value).split(',') {
                let token = token.trim();
                if token.eq_ignore_ascii_case("upgrade") {
                    connection_upgrade = true;
                } else if token.eq_ignore_ascii_case("close") {
                    head.close = true;
                } else if token.eq_ignore_ascii_case("keep-alive") && !http11 {
                    head.close = false;
                }
            }
        } else if name.eq_ignore_ascii_case("upgrade") {
            upgrade_websocket |= String::from_utf8_lossy(h.value)
                .split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("websocket"));
        } else if name.eq_ignore_ascii_case("sec-websocket-key") {
            once(&head.ws_key, "repeated Sec-WebSocket-Key header")?;
            head.ws_key = Some(value());
        } else if name.eq_ignore_ascii_case("sec-websocket-version") {
            head.ws_version = Some(value());
        } else if name.eq_ignore_ascii_case("sec-websocket-protocol") {
            let v = value();
            head.ws_protocol = Some(match head.ws_protocol.take() {
                Some(prev) => format!("{prev},{v}"),
                None => v,
            });
        } else if name.eq_ignore_ascii_case("authorization") {
            // Two credentials: which one a proxy checked is anybody's guess.
            once(&head.authorization, "repeated Authorization header")?;
            head.authorization = Some(value());
        } else if name.eq_ignore_ascii_case("origin") {
            once(&head.origin, "repeated Origin header")?;
            head.origin = Some(value());
        } else if name.eq_ignore_ascii_case("content-length") {
            // RFC 9110 §8.6: 1*DIGIT. `+40` or ` 4 0` read differently by a proxy in front
            // would desynchronise the connection (request smuggling).
            let v = value();
            if v.is_empty() || v.len() > 18 || !v.bytes().all(|b| b.is_ascii_digit()) {
                return Err(HeadError::Malformed("bad Content-Length"));
            }
            let len: u64 = v.parse().expect("1-18 ASCII digits fit a u64");
            if head.content_length.is_some_and(|prev| prev != len) {
                return Err(HeadError::Malformed("conflicting Content-Length headers"));
            }
            head.content_length = Some(len);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            head.chunked = true;
        } else if name.eq_ignore_ascii_case("last-event-id") {
            head.last_event_id = Some(value());
        } else if name.eq_ignore_ascii_case("x-forwarded-for") {
            // Several headers form one list, in order (each proxy may add its own line).
            let v = value();
            head.forwarded_for = Some(match head.forwarded_for.take() {
                Some(prev) => format!("{prev}, {v}"),
                None => v,
            });
        }
    }
    head.websocket_upgrade = upgrade_websocket && connection_upgrade;
    Ok(Some((head, n)))
}

/// Refuses a second occurrence of a header that must appear at most once.
fn once(seen: &Option<String>, why: &'static str) -> Result<(), HeadError> {
    match seen {
        Some(_) => Err(HeadError::Malformed(why)),
        None => Ok(()),
    }
}

/// Where a request goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// `GET /v1/ws` (alias `/v1/portal/ws`): the client WebSocket.
    WebSocket,
    /// `GET /v1/echo`: diagnostic echo WebSocket (only when enabled).
    Echo,
    /// `GET /v1/events/stream` (alias `/v1/portal/events/stream`): Server-Sent Events.
    Sse,
    /// `GET /v1/events/missed` (alias `/v1/portal/events/missed`): missed events / long poll.
    Missed,
    /// `POST /v1/publish`.
    Publish,
    /// `POST /v1/publish/batch`.
    PublishBatch,
    /// `POST /v1/disconnect`: close customers' connections (revocation, tests of resumption).
    Disconnect,
    /// `GET /healthz`.
    Health,
    /// `GET /readyz`.
    Ready,
    /// `GET /metrics`.
    Metrics,
    /// `GET /v1/stats`.
    Stats,
    /// `GET /v1/stats/histograms`.
    Histograms,
    /// `GET /v1/presence/customers/{id}`.
    PresenceCustomer,
    /// `GET /v1/presence/topics/{topic}`.
    PresenceTopic,
    /// `GET /v1/preferences/customers/{id}`.
    Preferences,
    /// A known path with the wrong method: 405.
    MethodNotAllowed,
    /// Unknown path: 404.
    NotFound,
}

impl Route {
    /// Whether this route is served on a long-lived client connection (not the request/response API).
    pub fn is_client_stream(self) -> bool {
        matches!(
            self,
            Route::WebSocket | Route::Echo | Route::Sse | Route::Missed
        )
    }
}

/// Routes a head. A pure function: no configuration, no state.
pub fn route(head: &Head) -> Route {
    let get = matches!(head.method, Some(Method::Get) | Some(Method::Head));
    let post = head.method == Some(Method::Post);
    let (want_get, route) = match head.path.as_str() {
        "/v1/ws" | "/v1/portal/ws" => (true, Route::WebSocket),
        "/v1/echo" => (true, Route::Echo),
        "/v1/events/stream" | "/v1/portal/events/stream" => (true, Route::Sse),
        "/v1/events/missed" | "/v1/portal/events/missed" => (true, Route::Missed),
        "/v1/publish" => (false, Route::Publish),
        "/v1/publish/batch" => (false, Route::PublishBatch),
        "/v1/disconnect" => (false, Route::Disconnect),
        "/healthz" => (true, Route::Health),
        "/readyz" => (true, Route::Ready),
        "/metrics" => (true, Route::Metrics),
        "/v1/stats" => (true, Route::Stats),
        "/v1/stats/histograms" => (true, Route::Histograms),
        p if p.starts_with("/v1/presence/customers/") => (true, Route::PresenceCustomer),
        p if p.starts_with("/v1/presence/topics/") => (true, Route::PresenceTopic),
        p if p.starts_with("/v1/preferences/customers/") => (true, Route::Preferences),
        _ => return Route::NotFound,
    };
    if (want_get && get) || (!want_get && post) {
        route
    } else {
        Route::MethodNotAllowed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Head {
        parse_head(s.as_bytes()).unwrap().unwrap().0
    }

    #[test]
    fn parses_websocket_upgrade() {
        let h = parse(
            "GET /v1/ws?token=a%2Eb&x=1 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\
             Connection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: ringcast.v1\r\n\
             Sec-WebSocket-Protocol: abc\r\n\r\n",
        );
        assert!(h.websocket_upgrade);
        assert_eq!(h.path, "/v1/ws");
        assert_eq!(h.query_param("token").as_deref(), Some("a.b"));
        assert_eq!(h.ws_protocol.as_deref(), Some("ringcast.v1,abc"));
        assert_eq!(route(&h), Route::WebSocket);
        assert!(!h.close);
    }

    #[test]
    fn partial_oversized_and_malformed() {
        assert_eq!(parse_head(b"GET / HTTP/1.1\r\nHost:"), Ok(None));
        let big = format!("GET / HTTP/1.1\r\nX: {}\r\n", "a".repeat(MAX_HEAD));
        assert_eq!(parse_head(big.as_bytes()), Err(HeadError::TooLarge));
        assert_eq!(
            parse_head(b"\x16\x03\x01garbage\r\n\r\n")
                .unwrap_err()
                .status(),
            400
        );
        assert!(parse_head(b"POST / HTTP/1.1\r\nContent-Length: x\r\n\r\n").is_err());
        // Only digits: a proxy may read `+40` or `4 0` differently (request smuggling).
        for cl in ["+40", "-1", "4 0", "0x10", "", "1234567890123456789"] {
            let req = format!("POST / HTTP/1.1\r\nContent-Length: {cl}\r\n\r\n");
            assert!(parse_head(req.as_bytes()).is_err(), "{cl:?} accepted");
        }
        let ok = parse_head(b"POST / HTTP/1.1\r\nContent-Length: 40\r\n\r\n");
        assert_eq!(ok.unwrap().unwrap().0.content_length, Some(40));
        let two = b"POST / HTTP/1.1\r\nAuthorization: Bearer a\r\nAuthorization: Bearer b\r\n\r\n";
        assert_eq!(parse_head(two).unwrap_err().status(), 400);
    }

    #[test]
    fn routes() {
        let r = |s: &str| route(&parse(s));
        assert_eq!(r("POST /v1/publish HTTP/1.1\r\n\r\n"), Route::Publish);
        assert_eq!(
            r("GET /v1/publish HTTP/1.1\r\n\r\n"),
            Route::MethodNotAllowed
        );
        assert_eq!(
            r("GET /v1/portal/events/stream HTTP/1.1\r\n\r\n"),
            Route::Sse
        );
        assert_eq!(r("GET /nope HTTP/1.1\r\n\r\n"), Route::NotFound);
        assert_eq!(r("GET /healthz HTTP/1.0\r\n\r\n"), Route::Health);
        assert!(parse("GET /healthz HTTP/1.0\r\n\r\n").close);
    }

    #[test]
    fn bearer_and_query_decoding() {
        let h = parse("GET /?a=%41+b&c HTTP/1.1\r\nAuthorization: Bearer  tok \r\n\r\n");
        assert_eq!(h.bearer(), Some("tok"));
        assert_eq!(h.query_param("a").as_deref(), Some("A b"));
        assert_eq!(h.query_param("c").as_deref(), Some(""));
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
    }
}
