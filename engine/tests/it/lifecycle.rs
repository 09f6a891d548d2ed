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

/// A subscription whose owners never answer (a stalled shard; in a cluster, a lost node) does
/// not pin its connection: a backend's disconnect closes it at once, not after the owners'
/// deadline (5 s per window of 8 topics; before the fix, 5 s per topic in turn).
#[test]
fn a_subscribe_waiting_on_silent_owners_still_obeys_a_disconnect() {
    let server = Server::start_with(2, &[("RINGCAST_FAULTS", "mute_topic_owners")]);
    let mut c = Client::connect(&server, &sub_token("waiter"));
    let topics: Vec<String> = (0..16).map(|i| format!("silent:{i}")).collect();
    c.send_json(json!({"type": "subscribe", "payload": {"topics": topics}, "requestId": "s"}));
    // The owners are silent: nothing comes back while the session waits on them.
    c.ws.get_mut()
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    assert!(c.ws.read().is_err(), "an answer came from muted owners");
    c.ws.get_mut()
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let asked = Instant::now();
    let (status, body) = server.http(
        "POST",
        "/v1/disconnect",
        &[("Authorization", &format!("Bearer {API_KEY}"))],
        &json!({"customers": ["waiter"], "code": 1000}).to_string(),
    );
    assert_eq!(status, 200, "{body}");
    let close = loop {
        match c.ws.read() {
            Ok(tungstenite::Message::Close(close)) => break close.expect("a close code"),
            Ok(tungstenite::Message::Text(t)) => {
                assert!(!t.contains("subscription_confirmed"), "{t}")
            }
            Ok(_) => {}
            Err(e) => panic!("no close frame: {e}"),
        }
    };
    let took = asked.elapsed();
    assert_eq!(u16::from(close.code), 1000);
    assert!(
        took < Duration::from_secs(3),
        "closed {took:?} after the disconnect"
    );
}
