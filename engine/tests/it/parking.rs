//! Parked connections: quiet sockets leave glommio for the shard's epoll set and keep
//! working (reads through the parking thread, direct writes, closes, back-pressure).

use std::time::{Duration, Instant};

use serde_json::json;

use crate::util::*;

/// Waits until the parked-connections gauge reads `n`.
fn wait_parked(server: &Server, n: f64) {
    let start = Instant::now();
    loop {
        let parked = server.metric("ringcast_parked_connections");
        if parked == n {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "parked connections stayed at {parked}, expected {n}"
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

    // A parked socket's request is read (through the parking thread) and answered.
    assert!(a.drain_until_pong().is_empty());
    // Talking again soon after brings it back to glommio; it keeps working there.
    assert!(a.drain_until_pong().is_empty());
    assert!(server.metric("ringcast_parked_connections") < 3.0);
    a.subscribe(&["other"]);
    // Quiet again: parked again.
    wait_parked(&server, 3.0);

    // A parked client's close handshake completes; the SSE client going away is noticed.
    b.ws.close(None).unwrap();
    let start = Instant::now();
    while server.metric("ringcast_connections") != 2.0 {
        assert!(start.elapsed() < Duration::from_secs(10), "close not seen");
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(sse);
    wait_parked(&server, 1.0);
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
