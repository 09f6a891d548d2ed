//! WebSocket and client-protocol conformance: malformed frames and JSON, size limits,
//! heartbeats and idle timeouts.

use std::io::Write;

use serde_json::json;
use tungstenite::{protocol::frame::coding::CloseCode, Message};

use crate::util::*;

fn close_code(c: &mut Client) -> Option<u16> {
    c.recv_close().map(|f| u16::from(f.code))
}

#[test]
fn malformed_json_gets_an_error_and_the_connection_stays_open() {
    let server = Server::start(1);
    let mut c = Client::connect(&server, &sub_token("j"));
    c.ws.send(Message::text("{nope")).unwrap();
    let e = c.recv_json();
    assert_eq!(
        (e["type"].as_str(), e["code"].as_str()),
        (Some("error"), Some("bad_json"))
    );
    c.send_json(json!({"type": "dance", "requestId": "r7"}));
    let e = c.recv_json();
    assert_eq!(
        (
            e["code"].as_str(),
            e["receivedType"].as_str(),
            e["requestId"].as_str()
        ),
        (Some("unknown_type"), Some("dance"), Some("r7"))
    );
    c.send_json(json!({"type": "subscribe", "payload": {"topics": "a b"}, "requestId": "r8"}));
    assert_eq!(c.recv_json()["code"], "invalid_topic");
    c.ws.send(Message::binary(vec![1, 2, 3])).unwrap();
    assert_eq!(c.recv_json()["code"], "unsupported");
    assert!(c.drain_until_pong().is_empty(), "still open and answering");
}

#[test]
fn unmasked_frame_closes_with_1002_and_bad_utf8_with_1007() {
    let server = Server::start(1);
    let mut c = Client::connect(&server, &sub_token("m"));
    c.ws.get_mut().write_all(&[0x81, 0x02, b'h', b'i']).unwrap(); // unmasked text
    assert_eq!(close_code(&mut c), Some(1002));
    let mut c = Client::connect(&server, &sub_token("m"));
    c.ws.get_mut()
        .write_all(&[0x81, 0x82, 0, 0, 0, 0, 0xC3, 0x28])
        .unwrap(); // masked, invalid UTF-8
    assert_eq!(close_code(&mut c), Some(1007));
    // Other clients are untouched.
    let mut other = Client::connect(&server, &sub_token("n"));
    assert!(other.drain_until_pong().is_empty());
}

#[test]
fn oversized_message_closes_with_1009() {
    let server = Server::start_with(1, &[("RINGCAST_LIMITS_MAX_MESSAGE", "4096")]);
    let mut c = Client::connect(&server, &sub_token("big"));
    let _ = c.ws.send(Message::text("x".repeat(5000)));
    assert_eq!(close_code(&mut c), Some(1009));
}

#[test]
fn client_close_is_answered_with_the_same_code() {
    let server = Server::start(1);
    let mut c = Client::connect(&server, &sub_token("bye"));
    c.ws.close(Some(tungstenite::protocol::CloseFrame {
        code: CloseCode::Normal,
        reason: "done".into(),
    }))
    .unwrap();
    assert_eq!(close_code(&mut c), Some(1000));
}

#[test]
fn server_pings_on_the_heartbeat_and_closes_idle_clients() {
    let server = Server::start_with(
        1,
        &[
            ("RINGCAST_SERVER_HEARTBEAT_SECS", "1"),
            ("RINGCAST_SERVER_IDLE_TIMEOUT_SECS", "3"),
        ],
    );
    let mut c = Client::connect(&server, &sub_token("hb"));
    let ping = loop {
        match c.ws.read().unwrap() {
            Message::Ping(p) => break p,
            _ => continue,
        }
    };
    assert!(ping.is_empty());
    // tungstenite answered that ping; a raw client that never answers is closed.
    let mut raw = std::net::TcpStream::connect(server.addr).unwrap();
    let tok = sub_token("silent");
    write!(raw, "GET /v1/ws?token={tok} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").unwrap();
    raw.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let start = std::time::Instant::now();
    let mut all = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match std::io::Read::read(&mut raw, &mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => all.extend_from_slice(&buf[..n]),
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    assert!((2.0..9.0).contains(&elapsed), "closed after {elapsed}s");
    // The close frame (0x88) with 1001 ends the stream.
    let close = all
        .windows(4)
        .rposition(|w| w[0] == 0x88 && w[2] == 0x03 && w[3] == 0xE9);
    assert!(
        close.is_some(),
        "no 1001 close frame in {:?}",
        &all[all.len().saturating_sub(40)..]
    );
}

#[test]
fn echo_endpoint_only_when_enabled() {
    let server = Server::start(1);
    assert!(Client::connect_raw(&server, "/v1/echo").is_err());
    let server = Server::start_with(1, &[("RINGCAST_DIAGNOSTICS_ECHO", "true")]);
    let mut c = Client::connect_raw(&server, "/v1/echo").unwrap();
    c.ws.send(Message::binary(vec![7u8; 100_000])).unwrap();
    assert_eq!(c.ws.read().unwrap(), Message::binary(vec![7u8; 100_000]));
}
