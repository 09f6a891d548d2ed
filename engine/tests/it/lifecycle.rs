//! Slow consumers and graceful shutdown.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::util::*;

#[test]
fn slow_consumer_is_closed_with_4008_and_others_are_untouched() {
    let server = Server::start_with(1, &[("RINGCAST_LIMITS_MAX_BACKLOG", "262144")]);
    // A client that subscribes and then stops reading.
    let mut slow = Client::slow_reader(&server, "slow", &["firehose"]);
    let mut healthy = Client::connect(&server, &sub_token("healthy"));
    healthy.subscribe(&["firehose"]);
    let payload = "x".repeat(8000);
    let start = Instant::now();
    let mut healthy_got = 0;
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
        healthy_got += healthy.drain_until_pong().len();
    }
    assert!(healthy_got >= 20);
    // The slow client finally reads: the frames it got, then the 4008 close.
    let close = slow.recv_close().expect("close frame");
    assert_eq!(u16::from(close.code), 4008);
    assert!(
        healthy.drain_until_pong().is_empty(),
        "healthy client still served"
    );
}

#[test]
fn sigterm_drains_with_1001_and_exits() {
    let mut server = Server::start_with(2, &[("RINGCAST_SERVER_DRAIN_GRACE_SECS", "1")]);
    let mut clients: Vec<Client> = (0..4)
        .map(|i| Client::connect(&server, &sub_token(&format!("d-{i}"))))
        .collect();
    assert_eq!(server.http("GET", "/readyz", &[], "").0, 200);
    let start = Instant::now();
    server.terminate();
    // During the grace period the listener still answers, and /readyz says 503 so the load
    // balancer stops sending new clients.
    let ready = loop {
        let (status, _) = server.http("GET", "/readyz", &[], "");
        if status != 200 || start.elapsed() > Duration::from_millis(900) {
            break status;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(ready, 503);
    for c in &mut clients {
        let close = c.recv_close().expect("close frame");
        assert_eq!(u16::from(close.code), 1001);
    }
    assert!(
        start.elapsed() >= Duration::from_millis(900),
        "connections closed before the grace period ended"
    );
    let status = loop {
        if let Some(s) = server.child.try_wait().unwrap() {
            break s;
        }
        assert!(start.elapsed() < Duration::from_secs(15), "did not exit");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success());
}
