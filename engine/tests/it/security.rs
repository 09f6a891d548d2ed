//! Hostile inputs: each test reproduces an attack that once crashed or exhausted the server
//! and checks that it now gets a clear error, costs nothing else, and leaves the process up.

use std::{
    io::{Read, Write},
    net::TcpStream,
    time::{Duration, Instant},
};

use serde_json::json;
use tungstenite::Message;

use crate::util::{sub_token, token, Client, Server, API_KEY};

/// Resident memory of the server process, from /proc (an instrument independent of the
/// server's own metrics).
fn rss_kib(server: &Server) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", server.child.id())).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

fn assert_alive(server: &Server) {
    assert_eq!(
        server.http("GET", "/healthz", &[], "").0,
        200,
        "server died"
    );
}

#[test]
fn deeply_nested_json_gets_an_error_not_a_crash() {
    let server = Server::start(1);
    let mut bystander = Client::connect(&server, &sub_token("bystander"));
    let mut c = Client::connect(
        &server,
        &token("nester", |c| {
            c.channels = vec!["*".into()];
            c.publish = vec!["*".into()];
        }),
    );
    let deep = format!("{}{}", "[".repeat(8750), "]".repeat(8750));
    let in_ping = format!(
        r#"{{"type":"ping","x":{}{}}}"#,
        "[".repeat(8000),
        "]".repeat(8000)
    );
    let in_data = format!(
        r#"{{"type":"publish","requestId":"d","payload":{{"topic":"t","type":"x","data":{}1{}}}}}"#,
        "{\"a\":".repeat(5000),
        "}".repeat(5000)
    );
    for msg in [deep, in_ping, in_data] {
        c.ws.send(Message::text(msg)).unwrap();
        let reply = c.recv_json();
        assert_eq!(reply["type"], "error", "{reply}");
        assert_eq!(reply["code"], "bad_json", "{reply}");
    }
    // The connection, its neighbour and the process are all still there.
    assert!(c.drain_until_pong().is_empty());
    assert!(bystander.drain_until_pong().is_empty());
    assert_alive(&server);
}

#[test]
fn malformed_messages_count_against_the_message_rate() {
    let server = Server::start(1);
    let mut c = Client::connect(&server, &sub_token("garbler"));
    let mut errors = 0;
    for _ in 0..40 {
        if c.ws.send(Message::text("{not json")).is_err() {
            break;
        }
    }
    let close = loop {
        match c.ws.read() {
            Ok(Message::Text(t)) => {
                assert!(t.contains("bad_json"), "{t}");
                errors += 1;
            }
            Ok(Message::Close(f)) => break f.expect("a close code"),
            Ok(_) => {}
            Err(e) => panic!("no close frame: {e}"),
        }
    };
    assert_eq!(u16::from(close.code), 4029);
    assert_eq!(errors, 30, "the default allowance is 30 messages");
}

/// A client that keeps sending and reads late still gets every reply and the 4029 close
/// frame: the server does not close a socket with unread input (which sends a reset that
/// destroys what the client has not read yet).
#[test]
fn a_client_closed_for_its_rate_that_reads_late_still_gets_the_close_code() {
    let server = Server::start(1);
    let mut c = Client::connect(&server, &sub_token("late-reader"));
    for _ in 0..60 {
        if c.ws.send(Message::text("{not json")).is_err() {
            break;
        }
    }
    std::thread::sleep(std::time::Duration::from_millis(400));
    let mut errors = 0;
    let close = loop {
        match c.ws.read() {
            Ok(Message::Text(_)) => errors += 1,
            Ok(Message::Close(f)) => break f.expect("a close code"),
            Ok(_) => {}
            Err(e) => panic!("no close frame after {errors} replies: {e}"),
        }
    };
    assert_eq!((u16::from(close.code), errors), (4029, 30));
}

/// A masked frame with no payload (what a flooding client sends).
fn masked(opcode: u8) -> [u8; 6] {
    [0x80 | opcode, 0x80, 1, 2, 3, 4]
}

#[test]
fn a_ping_flood_meets_the_message_rate() {
    let server = Server::start(1);
    let mut c = Client::connect(&server, &sub_token("pinger"));
    let burst: Vec<u8> = (0..1000).flat_map(|_| masked(0x9)).collect();
    c.ws.get_mut().write_all(&burst).unwrap();
    let close = c.recv_close().expect("a close frame");
    assert_eq!(u16::from(close.code), 4029);
    assert_alive(&server);

    // A flooder closed for its rate is not read any further: the shard stops decoding it.
    let mut s = c.ws.into_inner();
    let before = server.metric("ringcast_bytes_in_total");
    s.set_write_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut sent = 0usize;
    let burst: Vec<u8> = (0..10_000).flat_map(|_| masked(0x9)).collect();
    while sent < 8 << 20 && s.write_all(&burst).is_ok() {
        sent += burst.len();
    }
    let read = server.metric("ringcast_bytes_in_total") - before;
    assert!(
        read < 256.0 * 1024.0,
        "{read} bytes read after the close ({sent} sent)"
    );
}

#[test]
fn ping_flood_from_a_client_that_never_reads_is_bounded() {
    // Without the message rate (which closes a flooder, see below): the queue bound and the
    // shard's fairness must hold on their own.
    let server = Server::start_with(1, &[("RINGCAST_LIMITS_CLIENT_MESSAGES_PER_MINUTE", "0")]);
    // A small receive buffer, never read: the server's pongs back up at once.
    let mut s = {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        s.set_recv_buffer_size(4096).unwrap();
        s.connect(&server.addr.into()).unwrap();
        TcpStream::from(s)
    };
    s.write_all(
        format!(
            "GET /v1/ws?token={} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Version: 13\r\n\r\n",
            sub_token("flooder")
        )
        .as_bytes(),
    )
    .unwrap();
    let mut head = [0u8; 12];
    s.read_exact(&mut head).unwrap();
    assert!(head.starts_with(b"HTTP/1.1 101"));
    // 5,000,000 empty pings (30 MB): every unanswered pong used to be queued (~40 B each).
    let before = rss_kib(&server);
    let burst: Vec<u8> = (0..50_000).flat_map(|_| masked(0x9)).collect();
    for _ in 0..100 {
        s.write_all(&burst).unwrap();
    }
    let grown = rss_kib(&server).saturating_sub(before);
    assert!(
        grown < 32 * 1024,
        "RSS grew by {grown} KiB for a ping flood (pongs must not pile up)"
    );
    // While the flood goes on, a newcomer on the same shard is still served (a socket that
    // stays readable used to hold the shard: its task never gave way).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flood = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if s.write_all(&burst).is_err() {
                    break;
                }
            }
        })
    };
    let mut bystander = Client::connect(&server, &sub_token("bystander"));
    assert!(bystander.drain_until_pong().is_empty());
    assert_alive(&server);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    flood.join().unwrap();
}

#[test]
fn a_slow_head_is_cut_at_an_absolute_deadline() {
    let server = Server::start_with(1, &[("RINGCAST_SERVER_HANDSHAKE_TIMEOUT_SECS", "2")]);
    let mut s = TcpStream::connect(server.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let start = Instant::now();
    let mut answer = Vec::new();
    // One byte every 300 ms: each read used to restart the timeout, forever.
    for b in b"GET /healthz HTTP/1.1\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa".iter() {
        if s.write_all(&[*b]).is_err() {
            break;
        }
        let mut buf = [0u8; 512];
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
            Err(_) => {}
        }
        if !answer.is_empty() {
            break;
        }
    }
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 408"), "got {text:?}");
    assert!(
        start.elapsed() < Duration::from_secs(4),
        "{:?}",
        start.elapsed()
    );
    assert!(server.metric("ringcast_limit_refusals_total{limit=\"slow_request\"}") >= 1.0);
}

/// `n` sockets that send the start of a request head and nothing more.
fn slow_heads(server: &Server, n: usize) -> Vec<TcpStream> {
    (0..n)
        .map(|_| {
            let mut s = TcpStream::connect(server.addr).unwrap();
            s.write_all(b"GET /healthz HTTP/1.1\r\n").unwrap();
            s
        })
        .collect()
}

#[test]
fn unfinished_heads_count_per_address_and_against_the_cap() {
    let server = Server::start_with(
        1,
        &[
            ("RINGCAST_LIMITS_EXEMPT_IPS", ""),
            ("RINGCAST_LIMITS_CONNECT_ATTEMPTS_PER_IP", "0"),
            ("RINGCAST_LIMITS_PENDING_HEADS_PER_IP", "4"),
        ],
    );
    let held = slow_heads(&server, 4);
    std::thread::sleep(Duration::from_millis(200));
    // The fifth unfinished head from this address is refused at once.
    let mut fifth = slow_heads(&server, 1).pop().unwrap();
    fifth
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut resp = String::new();
    let _ = fifth.read_to_string(&mut resp);
    assert!(resp.starts_with("HTTP/1.1 429"), "got {resp:?}");
    drop(held);
    std::thread::sleep(Duration::from_millis(200));
    assert_alive(&server);

    // With a process cap, sockets reading a head count against it: with one client and two
    // slow heads, a new client stream is refused while the API is still served...
    let capped = Server::start_with(1, &[("RINGCAST_LIMITS_MAX_CONNECTIONS", "3")]);
    let _client = Client::connect(&capped, &sub_token("capped"));
    let slow = slow_heads(&capped, 2);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(capped.raw_upgrade(b"", "capped-2", "").0, 503);
    assert_alive(&capped);
    drop(slow);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(capped.raw_upgrade(b"", "capped-3", "").0, 101);
    // ...and heads alone may not reach the cap.
    let held = slow_heads(&capped, 3);
    std::thread::sleep(Duration::from_millis(200));
    let (status, _) = capped.http("GET", "/healthz", &[], "");
    assert_eq!(status, 503);
    drop(held);
    std::thread::sleep(Duration::from_millis(200));
    assert_alive(&capped);
}

#[test]
fn idle_topics_are_forgotten_and_topics_per_connection_are_capped() {
    let server = Server::start(2);
    let base = server.metric("ringcast_topics_owned");
    let mut c = Client::connect(
        &server,
        &token("t", |c| c.channels = vec!["made-up:*".into()]),
    );
    let names: Vec<String> = (0..100).map(|i| format!("made-up:{i}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    c.subscribe(&refs);
    assert!(server.metric("ringcast_topics_owned") >= base + 100.0);
    // Over the cap (128): refused as a whole, nothing changes.
    let more: Vec<String> = (100..129).map(|i| format!("made-up:{i}")).collect();
    c.send_json(json!({"type": "subscribe", "requestId": "m", "payload": {"topics": more}}));
    let reply = c.recv_json();
    assert_eq!(
        (reply["code"].as_str(), reply["requestId"].as_str()),
        (Some("too_many_topics"), Some("m")),
        "{reply}"
    );
    drop(c);
    // Topics nobody follows that keep no history are forgotten as they go idle.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let owned = server.metric("ringcast_topics_owned");
        if owned <= base {
            break;
        }
        assert!(Instant::now() < deadline, "{owned} topics still owned");
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(server.metric("ringcast_topics_forgotten_total") >= 100.0);
    // A backend's events to names nobody follows are kept for their time to live, then the
    // names are forgotten too.
    for i in 0..50 {
        server.publish(json!({"topics": [format!("backend-made-up:{i}")],
            "event": {"type": "x", "data": {}, "ttl": 1}}));
    }
    assert!(server.metric("ringcast_topics_owned") >= base + 50.0);
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.metric("ringcast_topics_owned") > base {
        assert!(
            Instant::now() < deadline,
            "kept topics not forgotten after their ttl"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // A forgotten name starts again where its old life ended: a stale position is not
    // mistaken for a complete recovery.
    let mut c = Client::connect(
        &server,
        &token("t2", |c| c.channels = vec!["made-up:*".into()]),
    );
    let reply = c.subscribe(&["made-up:1"]);
    assert_eq!(reply["data"]["topics"]["made-up:1"]["recovered"], true);
}

#[test]
fn recipients_and_filters_are_bounded() {
    let server = Server::start(1);
    let mut c = Client::connect(
        &server,
        &token("agent", |c| {
            c.channels = vec!["*".into()];
            c.message = vec!["*".into()];
        }),
    );
    c.send_json(
        json!({"type": "send_message", "requestId": "r", "payload": {"to": "x".repeat(60_000)}}),
    );
    let reply = c.recv_json();
    assert_eq!(
        (reply["code"].as_str(), reply["requestId"].as_str()),
        (Some("invalid_customer"), Some("r")),
        "{reply}"
    );
    // 6,500 prefixes used to cost O(n^2) on the shard; now a bounded refusal.
    let events: Vec<String> = (0..6500).map(|i| format!("e{i}")).collect();
    let start = Instant::now();
    c.send_json(json!({"type": "subscribe", "requestId": "f", "payload": {"events": events}}));
    let reply = c.recv_json();
    assert_eq!(reply["code"], "too_many_filters", "{reply}");
    assert!(start.elapsed() < Duration::from_secs(2));
    let ok: Vec<String> = (0..32).map(|i| format!("e{i}")).collect();
    c.send_json(json!({"type": "subscribe", "payload": {"events": ok}}));
    assert_eq!(c.recv_json()["type"], "subscription_confirmed");
    assert_alive(&server);
}

#[test]
fn parked_long_polls_are_capped_per_customer() {
    let server = Server::start_with(1, &[("RINGCAST_LIMITS_CONNECTIONS_PER_CUSTOMER", "2")]);
    let tok = sub_token("poller");
    let poll = || {
        let mut s = TcpStream::connect(server.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(
            format!("GET /v1/events/missed?wait=20&token={tok} HTTP/1.1\r\nHost: x\r\n\r\n")
                .as_bytes(),
        )
        .unwrap();
        s
    };
    let parked = [poll(), poll()];
    std::thread::sleep(Duration::from_millis(300));
    let mut third = poll();
    let mut resp = String::new();
    let _ = third.read_to_string(&mut resp);
    assert!(resp.starts_with("HTTP/1.1 429"), "{resp}");
    assert!(resp.contains("too_many_connections"), "{resp}");
    drop(parked);
    assert_alive(&server);
}

#[test]
fn metrics_can_require_a_key() {
    let server = Server::start_with(1, &[("RINGCAST_AUTH_METRICS_KEY", "scrape-key")]);
    for path in ["/metrics", "/v1/stats", "/v1/stats/histograms"] {
        assert_eq!(server.http("GET", path, &[], "").0, 401, "{path}");
        let (status, _) = server.http("GET", path, &[("Authorization", "Bearer wrong")], "");
        assert_eq!(status, 401, "{path}");
        let (status, _) = server.http("GET", path, &[("Authorization", "Bearer scrape-key")], "");
        assert_eq!(status, 200, "{path}");
    }
    // Load-balancer probes stay open.
    assert_alive(&server);
    assert_eq!(server.http("GET", "/readyz", &[], "").0, 200);
}

#[test]
fn strict_request_heads() {
    let server = Server::start(1);
    let auth = format!("Bearer {API_KEY}");
    let (status, body) = server.http(
        "POST",
        "/v1/publish",
        &[("Authorization", &auth), ("Authorization", "Bearer other")],
        "{}",
    );
    assert_eq!(status, 400, "{body}");
    let mut s = TcpStream::connect(server.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"POST /v1/publish HTTP/1.1\r\nHost: x\r\nContent-Length: +2\r\n\r\n{}")
        .unwrap();
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
}

#[test]
fn drain_grace_serves_probes_and_idle_api_connections_do_not_hold_it() {
    let mut server = Server::start_with(1, &[("RINGCAST_SERVER_DRAIN_GRACE_SECS", "2")]);
    let mut client = Client::connect(&server, &sub_token("stays"));
    // A backend's pooled keep-alive connection, idle.
    let mut pooled = TcpStream::connect(server.addr).unwrap();
    pooled
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut buf = [0u8; 256];
    assert!(pooled.read(&mut buf).unwrap() > 0);
    let start = Instant::now();
    server.terminate();
    std::thread::sleep(Duration::from_millis(100));
    // Every probe during the grace period is answered 503; none ends the grace early.
    for _ in 0..5 {
        assert_eq!(server.http("GET", "/readyz", &[], "").0, 503);
        std::thread::sleep(Duration::from_millis(100));
    }
    let close = client.recv_close().expect("close frame");
    assert_eq!(u16::from(close.code), 1001);
    assert!(
        start.elapsed() >= Duration::from_millis(1900),
        "closed {:?} after SIGTERM, before the grace period ended",
        start.elapsed()
    );
    // The idle pooled connection does not hold the exit to the 10 s drain timeout.
    let status = loop {
        if let Some(s) = server.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(6),
            "still running {:?} after SIGTERM",
            start.elapsed()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success());
}
