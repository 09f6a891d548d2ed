//! Fuzz targets: one function per parser that sees untrusted bytes.
//!
//! Each takes arbitrary bytes and drives the parser the way the engine does; it must return
//! without panicking, overflowing the stack or allocating without bound. The same functions
//! run under libFuzzer (`proto/fuzz`, `cargo fuzz`, nightly) and in a stable `#[test]` that
//! replays the committed corpus (`proto/fuzz/corpus/<target>/`), so every input a fuzzer
//! once found interesting is checked on every test run.

use crate::{auth, bus, client, http1, json, proxy, ws};

/// Names of the targets, as used for `proto/fuzz/fuzz_targets/<name>.rs` and the corpus.
pub const TARGETS: [&str; 7] = [
    "http_head",
    "ws_receiver",
    "client_json",
    "proxy_header",
    "jwt",
    "api_body",
    "bus_message",
];

/// Runs target `name` on `data`. Panics on an unknown name.
pub fn run(name: &str, data: &[u8]) {
    match name {
        "http_head" => http_head(data),
        "ws_receiver" => ws_receiver(data),
        "client_json" => client_json(data),
        "proxy_header" => proxy_header(data),
        "jwt" => jwt(data),
        "api_body" => api_body(data),
        "bus_message" => bus_message(data),
        other => panic!("no fuzz target {other:?}"),
    }
}

/// A request head, its route, the WebSocket handshake checks and the query and bearer
/// helpers the engine calls on it.
pub fn http_head(data: &[u8]) {
    if let Ok(Some((head, len))) = http1::parse_head(data) {
        assert!(len <= data.len());
        let _ = http1::route(&head);
        let _ = head.bearer();
        let _ = head.query_param("token");
        let _ = http1::query_params(&head.query).count();
        if let Ok(key) = ws::handshake::validate(&head) {
            let _ = ws::handshake::response(key, head.ws_protocol.as_deref());
        }
        if let Some(p) = head.ws_protocol.as_deref() {
            let _ = ws::handshake::token_from_protocols(p);
        }
        if let Some(f) = head.forwarded_for.as_deref() {
            let _ = proxy::forwarded_client([10, 0, 0, 1].into(), Some(f), |_| true);
        }
    }
}

/// Frames through the receive state machine, fed in pieces: the first byte picks where the
/// input is cut, so frames split across reads are exercised as the engine sees them.
pub fn ws_receiver(data: &[u8]) {
    let Some((&cut, data)) = data.split_first() else {
        return;
    };
    let limits = ws::WsLimits { max_message: 4096 };
    let mut rx = ws::Receiver::default();
    let mut pending: Vec<u8> = Vec::new();
    let step = usize::from(cut).max(1);
    for chunk in data.chunks(step) {
        pending.extend_from_slice(chunk);
        let mut pos = 0;
        loop {
            match rx.decode(&mut pending[pos..], &limits) {
                Ok(ws::conn::Decoded::NeedMore) => break,
                Ok(ws::conn::Decoded::Absorbed(n)) => pos += n,
                Ok(ws::conn::Decoded::Message(msg, n)) => {
                    pos += n;
                    if let ws::Message::Text(t) = msg {
                        assert!(std::str::from_utf8(t).is_ok(), "text must be UTF-8");
                    }
                }
                Err(e) => {
                    let _ = e.close_code();
                    return;
                }
            }
        }
        pending.drain(..pos);
    }
}

/// A client text message: the depth bound, simd-json and the request shapes.
pub fn client_json(data: &[u8]) {
    let mut buf = data.to_vec();
    match client::parse(&mut buf) {
        Ok(m) => {
            // Whatever was accepted must be re-encodable and bounded by the input.
            if let client::Request::Publish { data: d, .. }
            | client::Request::SendMessage { data: d, .. } = &m.request
            {
                assert!(json::check_depth(d.as_bytes(), json::MAX_CLIENT_DEPTH).is_ok());
            }
        }
        Err(e) => {
            let _ = e.to_json();
        }
    }
}

/// A PROXY protocol v1/v2 header.
pub fn proxy_header(data: &[u8]) {
    if let Ok(proxy::Parsed::Header { len, .. }) = proxy::parse(data) {
        assert!(len <= data.len());
    }
}

/// A bearer token (header, claims, signature) against a pinned HS256 verifier with issuer
/// and audience configured, and the permission globs of whatever it carries.
pub fn jwt(data: &[u8]) {
    thread_local! {
        static VERIFIER: auth::Verifier = auth::Verifier::new(
            &auth::KeyConfig::Hs256 { secret: b"fuzz-secret".to_vec() },
            Some("fuzz"),
            Some("ringcast"),
        )
        .expect("a secret always makes a verifier");
    }
    let Ok(token) = std::str::from_utf8(data) else {
        return;
    };
    VERIFIER.with(|v| {
        let _ = v.verify(token, 1_700_000_000);
    });
    // The glob matcher sees token patterns and client topic names.
    if let Some((pattern, text)) = token.split_once('\n') {
        let _ = auth::glob_match(pattern, text);
    }
}

/// A backend API body: publish, batch and disconnect shapes, validated as the engine does.
pub fn api_body(data: &[u8]) {
    let id = || "id".to_owned();
    let now = || "2026-01-01T00:00:00Z".to_owned();
    if let Ok(p) = crate::api::parse_body::<crate::api::PublishIn>(data) {
        if let Ok(p) = p.validate(id, now) {
            let _ = p.event.to_sse(Some("e.0-1"));
            let _ = p.event.to_client_json(crate::event::Via {
                topic: p.topics.first().map(String::as_str),
                offset: Some(1),
                cursor: None,
            });
        }
    }
    let _ = crate::api::parse_body::<Vec<serde_json::Value>>(data);
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = crate::prefs::Preferences::parse(s);
    }
}

/// An encoded shard message: validated in place (rkyv's checks) and, when valid,
/// deserialised. Messages cross threads today and processes in a cluster.
pub fn bus_message(data: &[u8]) {
    let mut aligned = rkyv::util::AlignedVec::<16>::with_capacity(data.len());
    aligned.extend_from_slice(data);
    if let Ok(archived) = bus::access(&aligned) {
        let _ = bus::to_owned(archived);
    }
    // The same bytes as a node-to-node message (envelope, version, unaligned archive).
    let _ = bus::decode_node(data);
}
