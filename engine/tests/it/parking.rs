//! Parked connections: quiet sockets leave glommio for the shard's epoll set and keep
//! working (reads through the parking thread, direct writes, closes, back-pressure).

use std::time::{Duration, Instant};

use serde_json::json;

use crate::util::*;

/// Waits until the parked-connections gauge reads `n`.
fn wait_parked(server: &Server, n: f64) {
    wait_gauge(server, "ringcast_parked_connections", n);
}

/// Waits until gauge `name` reads `n`.
fn wait_gauge(server: &Server, name: &str, n: f64) {
    let start = Instant::now();
    loop {
        let value = server.metric(name);
        if value == n {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "{name} stayed at {value}, expected {n}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn parked_connections_read_write_and_close() {
    let server = Server::start_with(2, &[("RINGCAST_SERVER_PARK_AFTER_SECS", "1")]);
    let mut a = Client::connect(&server, &sub_token("park-a"));
    let mut b = Client::connect(&server, &sub_token("park-b"));
    a.subscribe(&["room"]);
    b.subscribe(&["room"]);
    let mut sse = SseClient::open(
        &server,
        &format!("/v1/events/stream?token={}", sub_token("park-c")),
        &[],
    );
    assert_eq!(sse.status, 200);
    assert_eq!(sse.next().unwrap().event, "connection_established");
    wait_parked(&server, 3.0);
    // None of them has a task left.
    wait_gauge(&server, "ringcast_dormant_connections", 3.0);

    // Writes to parked sockets: a topic event and a customer event.
    let r = server.publish(json!({"topics": ["room"], "event": {"type": "t", "data": {"n": 1}}}));
    assert_eq!(r["delivered"]["websocket"], 2, "{r}");
    assert_eq!(a.recv_json()["data"]["n"], 1);
    assert_eq!(b.recv_json()["data"]["n"], 1);
    let r =
        server.publish(json!({"customers": ["park-c"], "event": {"type": "c", "data": {"n": 2}}}));
    assert_eq!(r["delivered"]["sse"], 1, "{r}");
    let rec = sse.next().unwrap();
    assert_eq!(
        (rec.event.as_str(), rec.data.contains("\"n\":2")),
        ("c", true)
    );

    // A parked socket's request is read (through the parking thread) and answered: it gets
    // a task again.
    assert!(a.drain_until_pong().is_empty());
    // Talking again soon after brings it back to glommio; it keeps working there.
    assert!(a.drain_until_pong().is_empty());
    assert!(server.metric("ringcast_parked_connections") < 3.0);
    assert!(server.metric("ringcast_dormant_connections") < 3.0);
    a.subscribe(&["other"]);
    // Quiet again: parked again, and without a task again.
    wait_parked(&server, 3.0);
    wait_gauge(&server, "ringcast_dormant_connections", 3.0);

    // A parked client's close handshake completes; the SSE client going away is noticed.
    b.ws.close(None).unwrap();
    let start = Instant::now();
    while server.metric("ringcast_connections") != 2.0 {
        assert!(start.elapsed() < Duration::from_secs(10), "close not seen");
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(sse);
    wait_parked(&server, 1.0);
    wait_gauge(&server, "ringcast_dormant_connections", 1.0);
    assert_eq!(server.metric("ringcast_connections"), 1.0);
    let seen = a.drain_until_pong();
    assert!(seen.iter().all(|v| v["type"] != "error"), "{seen:?}");
}

#[test]
fn a_parked_slow_consumer_is_still_closed_with_4008() {
    let server = Server::start_with(
        1,
        &[
            ("RINGCAST_SERVER_PARK_AFTER_SECS", "1"),
            ("RINGCAST_LIMITS_MAX_BACKLOG", "262144"),
        ],
    );
    let mut slow = Client::slow_reader(&server, "slow", &["firehose"]);
    wait_parked(&server, 1.0);
    // The blocked socket returns to glommio to wait for writability, then is cut off.
    let payload = "x".repeat(8000);
    let start = Instant::now();
    while server.metric("ringcast_slow_consumer_closes_total") < 1.0 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no slow-consumer close"
        );
        for _ in 0..20 {
            server.publish(
                json!({"topics": ["firehose"], "event": {"type": "bulk", "data": {"p": payload}}}),
            );
        }
    }
    let close = slow.recv_close().expect("close frame");
    assert_eq!(u16::from(close.code), 4008);
    let start = Instant::now();
    while server.metric("ringcast_connections") != 0.0 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "connection not released"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(server.metric("ringcast_parked_connections"), 0.0);
}

#[test]
fn dormant_connections_answer_heartbeats_and_are_closed_when_idle() {
    let server = Server::start_with(
        1,
        &[
            ("RINGCAST_SERVER_PARK_AFTER_SECS", "1"),
            // Pings every 2 s: a pong finds its connection quiet for longer than the 1 s
            // park delay, so it is read while parked and the connection stays parked.
            ("RINGCAST_SERVER_HEARTBEAT_SECS", "2"),
            ("RINGCAST_SERVER_IDLE_TIMEOUT_SECS", "5"),
        ],
    );
    // A client that answers every ping (tungstenite does, while it reads) stays: each pong
    // wakes its dormant connection, which reads it and goes dormant again.
    let mut alive = Client::connect(&server, &sub_token("alive"));
    alive.subscribe(&["hb"]);
    wait_gauge(&server, "ringcast_dormant_connections", 1.0);
    // A raw client that never answers a ping: parked, dormant, then closed by the idle
    // timeout (the timer wheel wakes a connection that has no task).
    let mut silent = std::net::TcpStream::connect(server.addr).unwrap();
    let tok = sub_token("silent");
    std::io::Write::write_all(
        &mut silent,
        format!(
            "GET /v1/ws?token={tok} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Version: 13\r\n\r\n"
        )
        .as_bytes(),
    )
    .unwrap();
    silent
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let start = Instant::now();
    let reader = std::thread::spawn(move || {
        let mut all = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match std::io::Read::read(&mut silent, &mut buf) {
                Ok(0) | Err(_) => return all,
                Ok(n) => all.extend_from_slice(&buf[..n]),
            }
        }
    });
    alive
        .ws
        .get_mut()
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut dormant_seen = 0.0f64;
    while !reader.is_finished() {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "silent client not closed"
        );
        match alive.ws.read() {
            Ok(tungstenite::Message::Close(c)) => panic!("the answering client was closed: {c:?}"),
            Ok(_) => {}
            Err(tungstenite::Error::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("{e}"),
        }
        dormant_seen = dormant_seen.max(server.metric("ringcast_dormant_connections"));
    }
    let all = reader.join().unwrap();
    let elapsed = start.elapsed().as_secs_f64();
    assert!((2.0..12.0).contains(&elapsed), "closed after {elapsed}s");
    assert!(
        all.windows(4)
            .any(|w| w[0] == 0x88 && w[2] == 0x03 && w[3] == 0xE9),
        "no 1001 close frame in {all:?}"
    );
    assert_eq!(
        dormant_seen, 2.0,
        "both connections were dormant at some point"
    );
    // The answering client, woken by its pongs many times over, still gets events.
    alive
        .ws
        .get_mut()
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let r = server.publish(json!({"topics": ["hb"], "event": {"type": "t", "data": {"n": 7}}}));
    assert_eq!(r["delivered"]["websocket"], 1, "{r}");
    loop {
        let v = alive.recv_json();
        if v["type"] == "t" {
            assert_eq!(v["data"]["n"], 7);
            break;
        }
    }
    assert_eq!(server.metric("ringcast_connections"), 1.0);
}
