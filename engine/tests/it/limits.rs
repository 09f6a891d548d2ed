//! Protection limits: each one crossed by a test that checks the close code or status, the
//! metric and the audit line, and that a neighbour on the same shard is unaffected.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::util::*;

fn refusals(server: &Server, limit: &str) -> f64 {
    server.metric(&format!(
        "ringcast_limit_refusals_total{{limit=\"{limit}\"}}"
    ))
}

#[test]
fn a_client_over_its_message_rate_is_closed_with_4029_and_its_neighbour_is_not() {
    let server = Server::start_with(1, &[("RINGCAST_LIMITS_CLIENT_MESSAGES_PER_MINUTE", "5")]);
    let mut calm = Client::connect(&server, &sub_token("calm"));
    calm.subscribe(&["room"]);
    let mut noisy = Client::connect(&server, &sub_token("noisy"));
    for i in 0..4 {
        noisy.subscribe(&[&format!("t{i}")]);
    }
    // A `ping` costs an eighth of a request: eight barriers take the fifth token.
    for _ in 0..8 {
        assert!(noisy.drain_until_pong().is_empty());
    }
    noisy.send_json(json!({"type": "subscribe", "payload": {"topics": ["t4"]}}));
    let close = noisy.recv_close().expect("a close frame");
    assert_eq!(u16::from(close.code), 4029);
    assert_eq!(close.reason.as_str(), "rate limited");
    assert_eq!(refusals(&server, "message_rate"), 1.0);
    let line = server.wait_log(r#""audit":"message_rate""#);
    assert!(line.contains(r#""customer":"noisy""#), "{line}");
    // The neighbour on the same shard is served as before.
    let r = server.publish(json!({"topics": ["room"], "event": {"type": "t", "data": {}}}));
    assert_eq!(r["delivered"]["websocket"], 1, "{r}");
    assert_eq!(calm.recv_json()["type"], "t");
}

#[test]
fn a_customer_over_its_connection_limit_gets_429() {
    let server = Server::start_with(2, &[("RINGCAST_LIMITS_CONNECTIONS_PER_CUSTOMER", "2")]);
    let mut first = Client::connect(&server, &sub_token("multi"));
    let _second = Client::connect(&server, &sub_token("multi"));
    let (status, _) = server.raw_upgrade(b"", "multi", "");
    assert_eq!(status, 429);
    let sse = SseClient::open(
        &server,
        &format!("/v1/events/stream?token={}", sub_token("multi")),
        &[],
    );
    assert_eq!(sse.status, 429, "SSE streams count too");
    assert_eq!(refusals(&server, "customer_connections"), 2.0);
    let line = server.wait_log(r#""audit":"customer_connections""#);
    assert!(line.contains(r#""customer":"multi""#), "{line}");
    // Other customers are not affected; a closed connection frees its place.
    let _other = Client::connect(&server, &sub_token("single"));
    first.ws.close(None).unwrap();
    let _ = first.recv_close();
    let start = Instant::now();
    loop {
        let (status, _s) = server.raw_upgrade(b"", "multi", "");
        if status == 101 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the place was not freed"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn attempts_per_address_count_the_client_behind_a_trusted_proxy() {
    let server = Server::start_with(
        2,
        &[
            ("RINGCAST_SERVER_TRUSTED_PROXIES", "127.0.0.1"),
            ("RINGCAST_LIMITS_CONNECT_ATTEMPTS_PER_IP", "3"),
        ],
    );
    let xff = |ip: &str| format!("X-Forwarded-For: {ip}\r\n");
    let mut open = Vec::new();
    for i in 0..3 {
        let (status, s) = server.raw_upgrade(b"", &format!("p{i}"), &xff("203.0.113.7"));
        assert_eq!(status, 101);
        open.push(s);
    }
    let (status, _) = server.raw_upgrade(b"", "p3", &xff("203.0.113.7"));
    assert_eq!(status, 429);
    // Another client behind the same proxy is not affected.
    let (status, _s) = server.raw_upgrade(b"", "p4", &xff("198.51.100.1"));
    assert_eq!(status, 101);
    assert_eq!(refusals(&server, "ip_attempts"), 1.0);
    let line = server.wait_log(r#""audit":"ip_attempts""#);
    assert!(line.contains(r#""ip":"203.0.113.7""#), "{line}");
}

#[test]
fn forwarded_for_from_an_untrusted_peer_is_ignored() {
    // No trusted proxy, and loopback not exempt: every attempt counts for 127.0.0.1, whatever
    // the client claims.
    let server = Server::start_with(
        1,
        &[
            ("RINGCAST_LIMITS_EXEMPT_IPS", ""),
            ("RINGCAST_LIMITS_CONNECT_ATTEMPTS_PER_IP", "3"),
        ],
    );
    let mut open = Vec::new();
    for i in 0..3 {
        let (status, s) = server.raw_upgrade(
            b"",
            &format!("u{i}"),
            &format!("X-Forwarded-For: 10.9.9.{i}\r\n"),
        );
        assert_eq!(status, 101);
        open.push(s);
    }
    let (status, _) = server.raw_upgrade(b"", "u3", "X-Forwarded-For: 10.9.9.3\r\n");
    assert_eq!(status, 429);
    let line = server.wait_log(r#""audit":"ip_attempts""#);
    assert!(line.contains(r#""ip":"127.0.0.1""#), "{line}");
}

#[test]
fn proxy_protocol_v1_and_v2_name_the_client() {
    let server = Server::start_with(
        2,
        &[
            ("RINGCAST_SERVER_TRUSTED_PROXIES", "127.0.0.0/8"),
            ("RINGCAST_SERVER_PROXY_PROTOCOL", "true"),
            ("RINGCAST_LIMITS_CONNECT_ATTEMPTS_PER_IP", "2"),
        ],
    );
    let v1 = b"PROXY TCP4 198.51.100.9 127.0.0.1 40000 8080\r\n";
    let mut open = Vec::new();
    for i in 0..2 {
        let (status, s) = server.raw_upgrade(v1, &format!("v{i}"), "");
        assert_eq!(status, 101, "the request after a v1 header is served");
        open.push(s);
    }
    let (status, _) = server.raw_upgrade(v1, "v2", "");
    assert_eq!(
        status, 429,
        "attempts count for the address the header names"
    );
    let line = server.wait_log(r#""audit":"ip_attempts""#);
    assert!(line.contains(r#""ip":"198.51.100.9""#), "{line}");
    // v2 (binary), another client.
    let mut v2 = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c".to_vec();
    v2.extend_from_slice(&[198, 51, 100, 10, 127, 0, 0, 1, 0x9c, 0x40, 0x1f, 0x90]);
    let (status, _s) = server.raw_upgrade(&v2, "v3", "");
    assert_eq!(status, 101);
    // From a trusted proxy the header is required.
    let (status, _) = server.raw_upgrade(b"", "v4", "");
    assert_eq!(status, 400);
}

#[test]
fn the_process_connection_cap_answers_503() {
    let server = Server::start_with(2, &[("RINGCAST_LIMITS_MAX_CONNECTIONS", "2")]);
    let _a = Client::connect(&server, &sub_token("cap-a"));
    let _b = Client::connect(&server, &sub_token("cap-b"));
    let (status, _) = server.raw_upgrade(b"", "cap-c", "");
    assert_eq!(status, 503);
    assert_eq!(refusals(&server, "max_connections"), 1.0);
    // The API is not a client connection: still served.
    let (status, _) = server.http("GET", "/healthz", &[], "");
    assert_eq!(status, 200);
}

#[test]
fn a_refused_token_writes_an_audit_line() {
    let server = Server::start(1);
    let (status, _) = server.http(
        "GET",
        "/v1/ws?token=not.a.token",
        &[
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("Sec-WebSocket-Version", "13"),
        ],
        "",
    );
    assert_eq!(status, 401);
    let line = server.wait_log(r#""audit":"auth_failed""#);
    assert!(line.contains(r#""ip":"127.0.0.1""#), "{line}");
}
