//! The backend API: authentication, validation, keep-alive, operational endpoints.

use std::{
    io::{Read, Write},
    time::{Duration, Instant},
};

use serde_json::json;

use crate::util::*;

#[test]
fn publish_requires_the_api_key_and_valid_bodies() {
    let server = Server::start(1);
    let body = json!({"topics": ["t"], "event": {"type": "x"}}).to_string();
    let (status, text) = server.http("POST", "/v1/publish", &[], &body);
    assert_eq!(status, 401, "{text}");
    let (status, _) = server.http(
        "POST",
        "/v1/publish",
        &[("Authorization", "Bearer wrong")],
        &body,
    );
    assert_eq!(status, 401);
    let auth = format!("Bearer {API_KEY}");
    let cases = [
        ("{oops", "bad_json"),
        (r#"{"event": {"type": "x"}}"#, "no_target"),
        (
            r#"{"topics": ["t"], "event": {"type": ""}}"#,
            "invalid_type",
        ),
        (
            r#"{"topics": ["a b"], "event": {"type": "x"}}"#,
            "invalid_topic",
        ),
        (
            r#"{"topics": ["t"], "event": {"type": "x", "priority": "asap"}}"#,
            "invalid_priority",
        ),
    ];
    for (body, code) in cases {
        let (status, text) = server.http("POST", "/v1/publish", &[("Authorization", &auth)], body);
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            (status, v["error"]["code"].as_str()),
            (400, Some(code)),
            "{body}"
        );
    }
    let (status, text) = server.http("GET", "/v1/publish", &[], "");
    assert_eq!(status, 405, "{text}");
    assert_eq!(server.http("GET", "/nowhere", &[], "").0, 404);
}

#[test]
fn malformed_oversized_and_slow_heads() {
    let server = Server::start_with(1, &[("RINGCAST_SERVER_HANDSHAKE_TIMEOUT_SECS", "1")]);
    let raw = |bytes: &[u8]| {
        let mut s = std::net::TcpStream::connect(server.addr).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        s.write_all(bytes).unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        parse_response(&out).0
    };
    assert_eq!(raw(b"\x16\x03\x01\x00garbage\r\n\r\n"), 400);
    let big = format!(
        "GET /healthz HTTP/1.1\r\nX-Big: {}\r\n\r\n",
        "a".repeat(9000)
    );
    assert_eq!(raw(big.as_bytes()), 431);
    assert_eq!(
        raw(b"GET /healthz HTTP/1.1\r\nHost: x\r\n"),
        408,
        "incomplete head times out"
    );
    assert_eq!(
        raw(b"POST /v1/publish HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
        501
    );
    // A body over the limit is refused before it is read.
    let huge = format!("POST /v1/publish HTTP/1.1\r\nContent-Length: {}\r\nAuthorization: Bearer {API_KEY}\r\n\r\n", 10 << 20);
    assert_eq!(raw(huge.as_bytes()), 413);
    assert!(server.metric("ringcast_bad_requests_total") >= 3.0);
    assert_eq!(
        server.http("GET", "/healthz", &[], "").0,
        200,
        "still serving"
    );
}

#[test]
fn keep_alive_batch_and_operational_endpoints() {
    let server = Server::start(2);
    let mut c = Client::connect(&server, &sub_token("batchy"));
    let mut s = std::net::TcpStream::connect(server.addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let body = json!([
        {"customers": ["batchy"], "event": {"type": "a"}},
        {"customers": ["batchy"], "event": {"type": "b", "id": "fixed-id"}},
        {"event": {"type": "c"}}
    ])
    .to_string();
    // Two requests pipelined on one keep-alive connection.
    let req = format!(
        "POST /v1/publish/batch HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\nContent-Length: {}\r\n\r\n{body}GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let responses: Vec<&str> = out.split("HTTP/1.1 ").filter(|r| !r.is_empty()).collect();
    assert_eq!(responses.len(), 2, "{out}");
    let (status, text) = parse_response(&format!("HTTP/1.1 {}", responses[0]));
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["results"][0]["delivered"]["websocket"], 1);
    assert_eq!(v["results"][1]["id"], "fixed-id");
    assert_eq!(v["results"][2]["error"]["code"], "no_target");
    assert!(responses[1].starts_with("200"));
    let got: Vec<_> = c
        .drain_until_pong()
        .iter()
        .map(|e| e["type"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(got, ["a", "b"]);
    let (status, metrics) = server.http("GET", "/metrics", &[], "");
    assert_eq!(status, 200);
    for name in [
        "ringcast_connections{shard=\"0\"}",
        "ringcast_connections{shard=\"1\"}",
        "ringcast_publish_to_write_seconds_bucket",
        "ringcast_auth_failures_total{reason=\"token_expired\"}",
        "ringcast_bytes_out_total",
    ] {
        assert!(metrics.contains(name), "{name} missing");
    }
    assert!(server.metric("ringcast_publish_to_write_seconds_count") >= 2.0);
    // Server-side HdrHistograms from every shard, in the standard serialised form.
    let (status, text) = server.http("GET", "/v1/stats/histograms", &[], "");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(status, 200, "{text}");
    assert!(v["publishToWrite"]["count"].as_u64().unwrap() >= 2, "{v}");
    assert!(v["handshake"]["count"].as_u64().unwrap() >= 1, "{v}");
    // The pipelined batch above is the only publish request so far.
    assert_eq!(v["publishAnswer"]["count"].as_u64(), Some(1), "{v}");
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(v["publishToWrite"]["histogram"].as_str().unwrap())
        .unwrap();
    let h: hdrhistogram::Histogram<u64> = hdrhistogram::serialization::Deserializer::new()
        .deserialize(&mut std::io::Cursor::new(bytes))
        .unwrap();
    assert_eq!(h.len(), v["publishToWrite"]["count"].as_u64().unwrap());
    let (status, stats) = server.http("GET", "/v1/stats", &[], "");
    let v: serde_json::Value = serde_json::from_str(&stats).unwrap();
    assert_eq!((status, v["connections"].as_i64()), (200, Some(1)));
}

/// By default a publish is answered once its topics' owners have numbered it (the offsets are
/// in the answer) and its customers' owners have taken it; topic deliveries follow. With
/// `"wait": "delivered"` the answer also counts them.
#[test]
fn publish_answers_on_acceptance_with_offsets_or_after_delivery_when_asked() {
    let server = Server::start(2);
    let mut clients: Vec<Client> = (0..6)
        .map(|i| {
            let mut c = Client::connect(&server, &sub_token(&format!("acc-{i}")));
            c.subscribe(&["acc:1", "acc:2"]);
            c
        })
        .collect();
    let body = |n: u32, wait: Option<&str>| {
        let mut b = json!({"topics": ["acc:1", "acc:2"], "customers": ["acc-0"],
            "event": {"type": "x", "data": {"n": n}, "persistent": true}});
        if let Some(w) = wait {
            b["wait"] = w.into();
        }
        b.to_string()
    };
    let post = |b: String| {
        let (status, text) = server.http(
            "POST",
            "/v1/publish",
            &[("Authorization", &format!("Bearer {API_KEY}"))],
            &b,
        );
        assert_eq!(status, 200, "{text}");
        serde_json::from_str::<serde_json::Value>(&text).unwrap()
    };
    let mut last = None;
    for n in 1..=3 {
        let r = post(body(n, None));
        let (o1, o2) = (
            r["offsets"]["acc:1"].as_u64(),
            r["offsets"]["acc:2"].as_u64(),
        );
        assert!(o1.is_some() && o2.is_some(), "offsets of both topics: {r}");
        if let Some((p1, p2)) = last {
            assert_eq!((o1.unwrap(), o2.unwrap()), (p1 + 1, p2 + 1), "{r}");
        }
        last = Some((o1.unwrap(), o2.unwrap()));
        // The customer target's owner took it before the answer: it is counted.
        assert_eq!(r["delivered"]["websocket"], 1, "{r}");
    }
    let r = post(body(4, Some("delivered")));
    assert_eq!(
        r["delivered"]["websocket"], 13,
        "12 topic deliveries and the customer's own: {r}"
    );
    assert_eq!(r["offsets"]["acc:1"], last.unwrap().0 + 1, "{r}");
    // Every event reached every subscriber, with the offsets the answers gave.
    for c in &mut clients {
        let mut seen = Vec::new();
        while seen.len() < 8 {
            let m = c.recv_json();
            if m["topic"] == "acc:1" {
                seen.push(m["offset"].as_u64().unwrap());
            } else if m["topic"] == "acc:2" {
                seen.push(0);
            }
        }
        let acc1: Vec<u64> = seen.into_iter().filter(|o| *o > 0).collect();
        let first = last.unwrap().0 - 2;
        assert_eq!(acc1, (first..=first + 3).collect::<Vec<_>>());
    }
    let (status, text) = server.http(
        "POST",
        "/v1/publish",
        &[("Authorization", &format!("Bearer {API_KEY}"))],
        r#"{"topics": ["acc:1"], "event": {"type": "x"}, "wait": "soon"}"#,
    );
    assert_eq!(status, 400, "{text}");
}

fn post_publish(server: &Server, topic: &str, n: u32) -> (u16, serde_json::Value, Duration) {
    let started = Instant::now();
    let (status, text) = server.http(
        "POST",
        "/v1/publish",
        &[("Authorization", &format!("Bearer {API_KEY}"))],
        &json!({"topics": [topic], "event": {"type": "x", "data": {"n": n}}}).to_string(),
    );
    let body = serde_json::from_str(&text).unwrap_or_else(|_| panic!("{status} {text}"));
    (status, body, started.elapsed())
}

/// Publishes are answered on acceptance, so the API bounds how far delivery may fall behind:
/// while a shard's oldest accepted event is unwritten for longer than
/// `server.max_fanout_lag_ms`, a new publish waits, and is accepted once the shard catches
/// up. (The fault makes every fan-out round take 2 s; the subscription's round is the first.)
#[test]
fn a_publish_waits_while_delivery_is_behind_and_is_accepted_once_it_catches_up() {
    let server = Server::start_with(
        1,
        &[
            ("RINGCAST_FAULTS", "stall_fanout=2000"),
            ("RINGCAST_SERVER_MAX_FANOUT_LAG_MS", "100"),
        ],
    );
    let mut c = Client::connect(&server, &sub_token("lagging"));
    c.subscribe(&["lag:1"]);
    let (status, a, took) = post_publish(&server, "lag:1", 1);
    assert_eq!(status, 200, "{a}");
    assert!(
        took < Duration::from_millis(1500),
        "caught up, yet held {took:?}"
    );
    // Past the bound: the oldest unwritten job has waited longer than 100 ms.
    std::thread::sleep(Duration::from_millis(300));
    let (status, b, took) = post_publish(&server, "lag:1", 2);
    assert_eq!(status, 200, "{b}");
    assert!(
        took >= Duration::from_millis(1000),
        "answered after {took:?} while the first event was still unwritten"
    );
    assert_eq!(
        b["offsets"]["lag:1"],
        a["offsets"]["lag:1"].as_u64().unwrap() + 1
    );
    assert!(server.metric("ringcast_publishes_held_total") >= 1.0);
    let got: Vec<_> = (0..2).map(|_| c.recv_json()["data"]["n"].clone()).collect();
    assert_eq!(got, [json!(1), json!(2)], "both delivered, in order");
}

/// A publish still behind a stalled fan-out after 5 s is refused with 503 `overloaded` and
/// not accepted, so nobody receives it. (Every round takes 8 s here; the subscription's round
/// is the first, the first event's the second.)
#[test]
fn a_publish_behind_a_stalled_fanout_is_refused_and_not_delivered() {
    let server = Server::start_with(
        1,
        &[
            ("RINGCAST_FAULTS", "stall_fanout=8000"),
            ("RINGCAST_SERVER_MAX_FANOUT_LAG_MS", "100"),
        ],
    );
    let mut c = Client::connect(&server, &sub_token("stalled"));
    c.subscribe(&["lag:2"]);
    let (status, a, _) = post_publish(&server, "lag:2", 1);
    assert_eq!(status, 200, "{a}");
    std::thread::sleep(Duration::from_millis(300));
    let (status, b, took) = post_publish(&server, "lag:2", 2);
    assert_eq!(
        (status, b["error"]["code"].as_str()),
        (503, Some("overloaded")),
        "{b}"
    );
    assert!(
        took >= Duration::from_millis(4500),
        "refused after {took:?}"
    );
    // Had the second been accepted, it would have been in the first event's round.
    assert_eq!(c.recv_json()["data"]["n"], 1);
    c.ws.get_mut()
        .set_read_timeout(Some(Duration::from_millis(1500)))
        .unwrap();
    match c.ws.read() {
        Err(tungstenite::Error::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("after the refusal: {other:?}"),
    }
}

/// The other bound: while more deliveries wait for a shard's next fan-out round than
/// `server.max_fanout_backlog`, a publish waits; it is accepted once a round takes them. (Lag
/// bound off; every round takes 2 s; one subscriber, so each event is one delivery.)
#[test]
fn a_publish_waits_while_too_many_deliveries_wait_for_a_round() {
    let server = Server::start_with(
        1,
        &[
            ("RINGCAST_FAULTS", "stall_fanout=2000"),
            ("RINGCAST_SERVER_MAX_FANOUT_LAG_MS", "0"),
            ("RINGCAST_SERVER_MAX_FANOUT_BACKLOG", "1"),
        ],
    );
    let mut c = Client::connect(&server, &sub_token("backlogged"));
    c.subscribe(&["lag:3"]);
    // The subscription's round is stalled: these two wait for the next one.
    for n in 1..=2 {
        let (status, r, took) = post_publish(&server, "lag:3", n);
        assert_eq!(status, 200, "{r}");
        assert!(
            took < Duration::from_millis(1000),
            "held {took:?} under the bound"
        );
    }
    let (status, r, took) = post_publish(&server, "lag:3", 3);
    assert_eq!(status, 200, "{r}");
    assert!(
        took >= Duration::from_millis(700),
        "answered after {took:?} with two deliveries waiting"
    );
    let got: Vec<_> = (0..3).map(|_| c.recv_json()["data"]["n"].clone()).collect();
    assert_eq!(got, [json!(1), json!(2), json!(3)]);
}
