//! Cluster mode against a real nats-server: nodes find each other by heartbeats, forget one
//! that dies or leaves, `/readyz` follows the NATS connection, and node messages of another
//! wire-format version or of no format are counted and dropped.
//!
//! They need nats-server: `bash .ci/cluster.sh` installs it (pip, into target/) and runs
//! them with `RINGCAST_TEST_NATS_SERVER` set to its path. Without it they are ignored, so a
//! plain `cargo test` needs no external service.

use std::{
    io::{BufRead, BufReader, Write},
    net::TcpStream,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::util::*;

/// A nats-server with JetStream (file storage in its own directory) and its monitoring
/// endpoint, on free loopback ports; killed on drop.
struct Nats {
    child: Child,
    port: u16,
    monitor: u16,
    store: std::path::PathBuf,
}

/// A loopback port free now, for a server these tests start. Taken below the kernel's
/// ephemeral range (32768 and up here) so that no outgoing connection of a test running in
/// parallel can take it between this check and the server's bind, and never the same one twice
/// in this process. (CI once saw nats-server fail to start on a port picked with `bind(0)`.)
fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let _ = NEXT.compare_exchange(
        u32::MAX,
        std::process::id().wrapping_mul(7919) % SPAN,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    loop {
        let port = (LOW + NEXT.fetch_add(1, Ordering::Relaxed) % SPAN) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

impl Nats {
    /// Starts on `port`, keeping JetStream's files in `store` (the same directory again is a
    /// restart that keeps the streams).
    fn start_at(port: u16, store: std::path::PathBuf) -> Nats {
        Nats::start_with(port, store, &[])
    }

    fn start_with(port: u16, store: std::path::PathBuf, extra: &[&str]) -> Nats {
        let bin = std::env::var("RINGCAST_TEST_NATS_SERVER")
            .expect("RINGCAST_TEST_NATS_SERVER: the nats-server binary (bash .ci/cluster.sh)");
        let monitor = free_port();
        std::fs::create_dir_all(&store).unwrap();
        let log = store.with_extension("log");
        let mut child = Command::new(bin)
            .args(["-a", "127.0.0.1", "-p", &port.to_string()])
            .args(["-m", &monitor.to_string(), "-js", "-sd"])
            .arg(&store)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start nats-server");
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            let exited = child.try_wait().unwrap();
            if exited.is_some() || Instant::now() > deadline {
                let _ = child.kill();
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(20).collect();
                panic!(
                    "nats-server on port {port} did not listen ({exited:?}); its log ends:\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Nats {
            child,
            port,
            monitor,
            store,
        }
    }

    fn start_on(port: u16) -> Nats {
        let store = std::env::temp_dir().join(format!("ringcast-js-{}-{port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&store);
        Nats::start_at(port, store)
    }

    fn start() -> Nats {
        Nats::start_on(free_port())
    }

    /// The subjects the client named `ringcast <node>` subscribes to, from the monitoring
    /// endpoint (one entry per subscription).
    fn subscriptions_of(&self, node: &str) -> Vec<String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.monitor)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(
            s,
            "GET /connz?subs=1&limit=1000 HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n"
        )
        .unwrap();
        let mut text = String::new();
        std::io::Read::read_to_string(&mut s, &mut text).unwrap();
        let body = &text[text.find("\r\n\r\n").expect("a body") + 4..];
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        v["connections"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["name"] == format!("ringcast {node}").as_str())
            .flat_map(|c| {
                c["subscriptions_list"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
            })
            .map(|s| s.as_str().unwrap().to_owned())
            .collect()
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Publishes raw bytes, as any NATS client could (the text protocol over TCP).
    fn publish_raw(&self, subject: &str, payload: &[u8]) {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut info = String::new();
        r.read_line(&mut info).unwrap();
        assert!(info.starts_with("INFO"), "{info}");
        s.write_all(b"CONNECT {\"verbose\":false}\r\n").unwrap();
        s.write_all(format!("PUB {subject} {}\r\n", payload.len()).as_bytes())
            .unwrap();
        s.write_all(payload).unwrap();
        s.write_all(b"\r\nPING\r\n").unwrap();
        let mut pong = String::new();
        r.read_line(&mut pong).unwrap();
        assert_eq!(pong.trim(), "PONG");
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.store);
        let _ = std::fs::remove_file(self.store.with_extension("log"));
    }
}

impl Nats {
    /// Stops the server, runs `meanwhile`, and starts it again on the same port with the
    /// same JetStream files.
    fn restart(&mut self, meanwhile: impl FnOnce()) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        meanwhile();
        let again = Nats::start_at(self.port, self.store.clone());
        let old = std::mem::replace(self, again);
        std::mem::forget(old); // its child is reaped, its files are ours now
    }
}

fn node(nats: &str, id: &str, timeout_ms: &str) -> Server {
    node_with(nats, id, timeout_ms, 1)
}

fn node_with(nats: &str, id: &str, timeout_ms: &str, shards: usize) -> Server {
    cluster_node(
        nats,
        id,
        shards,
        &[("RINGCAST_NATS_NODE_TIMEOUT_MS", timeout_ms)],
    )
}

/// A cluster node `id` on `nats` (heartbeats every 200 ms, gone after 3 s), with `extra`
/// settings (later ones win).
fn cluster_node(nats: &str, id: &str, shards: usize, extra: &[(&str, &str)]) -> Server {
    let mut env = vec![
        ("RINGCAST_BROKER", "nats"),
        ("RINGCAST_NATS_URL", nats),
        ("RINGCAST_NODE_ID", id),
        ("RINGCAST_NATS_HEARTBEAT_MS", "200"),
        ("RINGCAST_NATS_NODE_TIMEOUT_MS", "3000"),
    ];
    env.extend_from_slice(extra);
    let node = Server::start_with(shards, &env);
    // Ready once it reaches NATS and its streams exist (tests of an unreachable NATS go on
    // after the bound and check `/readyz` themselves).
    let until = Instant::now() + Duration::from_secs(10);
    while node.http("GET", "/readyz", &[], "").0 != 200 && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(50));
    }
    node
}

/// A resilient subscriber's thread: what it started above, what it got, its recovered flags.
type Subscriber = std::thread::JoinHandle<(u64, Vec<u64>, Vec<bool>)>;

/// Each subscriber got every accepted event of its topic after the offset it started above,
/// once, in order, and every (re)subscription said `recovered: true`.
/// Nodes `node-a` and `node-b` (two shards, 3 s node timeout), once each sees the other.
fn two_nodes(nats: &Nats) -> (Server, Server) {
    let a = node_with(&nats.url(), "node-a", "3000", 2);
    let b = node_with(&nats.url(), "node-b", "3000", 2);
    see_each_other(&a, &b);
    (a, b)
}

/// Waits until each of two nodes counts both.
fn see_each_other(a: &Server, b: &Server) {
    eventually(10, "two nodes", || {
        a.metric("ringcast_cluster_nodes") == 2.0 && b.metric("ringcast_cluster_nodes") == 2.0
    });
}

fn assert_every_event_once(
    subs: Vec<(String, Subscriber)>,
    accepted: &std::collections::HashMap<String, Vec<u64>>,
    label: &str,
) {
    for (topic, h) in subs {
        let (start, got, recovered) = h.join().unwrap();
        let want: Vec<u64> = accepted[&topic]
            .iter()
            .copied()
            .filter(|o| *o > start)
            .collect();
        assert_eq!(
            got, want,
            "{label}{topic}: every event after {start}, once, in order"
        );
        assert!(recovered.iter().all(|r| *r), "{label}{recovered:?}");
    }
}

/// Waits until `f` holds (checked every 50 ms), or fails naming `what`.
fn eventually(secs: u64, what: &str, mut f: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < Duration::from_secs(secs),
            "{what}: not within {secs} s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    start.elapsed()
}

fn labelled(server: &Server, line_start: &str) -> f64 {
    let (_, text) = server.http("GET", "/metrics", &[], "");
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .map_or(0.0, |v| v.parse().unwrap())
}

#[test]
#[ignore = "needs nats-server: bash .ci/cluster.sh"]
fn nodes_see_each_other_and_forget_one_that_dies_or_leaves() {
    let nats = Nats::start();
    let a = node(&nats.url(), "node-a", "1000");
    let mut b = node(&nats.url(), "node-b", "1000");
    let c = node(&nats.url(), "node-c", "1000");
    for n in [&a, &b, &c] {
        eventually(10, "three nodes alive", || {
            n.metric("ringcast_cluster_nodes") == 3.0
        });
    }
    // Killed: gone from the others' table after the timeout (1 s), not before ~0.8 s.
    drop(c);
    let took = eventually(10, "a dead node forgotten", || {
        a.metric("ringcast_cluster_nodes") == 2.0
    });
    assert!(
        took >= Duration::from_millis(500),
        "forgotten after {took:?}"
    );
    // Draining: says so and is forgotten at once (SIGTERM; its grace is 0 s here).
    let before = Instant::now();
    b.terminate();
    eventually(5, "a leaving node forgotten", || {
        a.metric("ringcast_cluster_nodes") == 1.0
    });
    let _ = b.child.wait();
    assert!(before.elapsed() < Duration::from_secs(5));
}

#[test]
#[ignore = "needs nats-server: bash .ci/cluster.sh"]
fn readyz_follows_the_nats_connection() {
    let nats = Nats::start();
    let port = nats.port;
    let a = node(&nats.url(), "node-a", "1000");
    let ready = |s: &Server| s.http("GET", "/readyz", &[], "");
    eventually(10, "ready once connected", || ready(&a).0 == 200);
    assert_eq!(a.metric("ringcast_nats_connected"), 1.0);
    drop(nats);
    eventually(10, "503 while NATS is down", || {
        let (status, body) = ready(&a);
        status == 503 && body.contains("nats unreachable")
    });
    // Liveness is the process's, not the cluster's.
    assert_eq!(a.http("GET", "/healthz", &[], "").0, 200);
    let _nats = Nats::start_on(port);
    eventually(30, "ready again after NATS is back", || ready(&a).0 == 200);
}

#[test]
#[ignore = "needs nats-server: bash .ci/cluster.sh"]
fn node_messages_of_another_version_or_no_format_are_counted_and_dropped() {
    let nats = Nats::start();
    let a = node(&nats.url(), "node-a", "1000");
    eventually(10, "alone", || a.metric("ringcast_cluster_nodes") == 1.0);
    let mut other_version = proto::bus::encode_node(&proto::bus::NodeMsg::Heartbeat {
        node: "from-the-future".into(),
        draining: false,
    });
    other_version[2] = proto::bus::WIRE_VERSION + 1;
    nats.publish_raw("rc.node.hb", &other_version);
    nats.publish_raw("rc.node.hb", b"hello");
    nats.publish_raw(
        "rc.node.hb",
        &[b'r', b'c', proto::bus::WIRE_VERSION, 0, 1, 2, 3],
    );
    eventually(10, "refusals counted", || {
        labelled(
            &a,
            "ringcast_node_messages_refused_total{reason=\"version\"}",
        ) == 1.0
            && labelled(
                &a,
                "ringcast_node_messages_refused_total{reason=\"invalid\"}",
            ) == 2.0
    });
    // Still up, and the refused "node" never joined.
    assert_eq!(a.metric("ringcast_cluster_nodes"), 1.0);
    assert_eq!(a.http("GET", "/healthz", &[], "").0, 200);
}

#[test]
fn a_nats_node_that_cannot_reach_nats_is_alive_but_not_ready() {
    // Nothing listens on this port: no nats-server needed.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let a = node(&format!("nats://127.0.0.1:{port}"), "lonely", "1000");
    assert_eq!(a.http("GET", "/healthz", &[], "").0, 200);
    let (status, body) = a.http("GET", "/readyz", &[], "");
    assert_eq!(
        (status, body.contains("nats unreachable")),
        (503, true),
        "{body}"
    );
    assert_eq!(a.metric("ringcast_nats_connected"), 0.0);
}

/// A customer allowed to read and publish every `room:` topic.
fn room_token(customer: &str) -> String {
    token(customer, |c| {
        c.channels = vec!["room:*".into()];
        c.publish = vec!["room:*".into()];
    })
}

/// Topic events of `topic` among `msgs`: (offset, id).
fn events_of(msgs: &[serde_json::Value], topic: &str) -> Vec<(u64, String)> {
    msgs.iter()
        .filter(|m| m["topic"] == topic)
        .map(|m| {
            (
                m["offset"].as_u64().unwrap(),
                m["id"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// Reads until `n` events of `topic` have come (or fails after 10 s).
fn collect(c: &mut Client, topic: &str, n: usize) -> Vec<(u64, String)> {
    let mut got = Vec::new();
    while got.len() < n {
        let m = c.recv_json();
        got.extend(events_of(&[m], topic));
    }
    got
}

#[test]
#[ignore = "needs nats-server: bash .ci/cluster.sh"]
fn a_topic_event_from_any_node_reaches_every_node_once_in_order_with_one_subscription_per_node() {
    let nats = Nats::start();
    let a = node_with(&nats.url(), "node-a", "3000", 2);
    let b = node_with(&nats.url(), "node-b", "3000", 2);
    let c = node_with(&nats.url(), "node-c", "3000", 2);
    eventually(10, "three nodes", || {
        a.metric("ringcast_cluster_nodes") == 3.0
    });
    // Two subscribers on node A (on whichever shards), one on node B.
    let mut a1 = Client::connect(&a, &room_token("ann"));
    let mut a2 = Client::connect(&a, &room_token("amy"));
    let mut b1 = Client::connect(&b, &room_token("bob"));
    let confirmed = a1.subscribe(&["room:1", "room:2"]);
    assert!(
        confirmed["data"]["topics"]["room:1"]["epoch"]
            .as_str()
            .unwrap()
            .starts_with("js"),
        "{confirmed}"
    );
    a2.subscribe(&["room:1"]);
    b1.subscribe(&["room:1"]);
    // Published through node B's API and by a client on node C, interleaved.
    let mut cc = Client::connect(&c, &room_token("cat"));
    let mut offsets = Vec::new();
    for i in 0..20 {
        if i % 2 == 0 {
            let out = b.publish(serde_json::json!({
                "topics": ["room:1"], "wait": "accepted",
                "event": {"type": "api", "data": {"i": i}}}));
            offsets.push(out["offsets"]["room:1"].as_u64().expect("an offset"));
        } else {
            cc.send_json(
                serde_json::json!({"type": "publish", "requestId": format!("p{i}"),
                "payload": {"topic": "room:1", "type": "client", "data": {"i": i}}}),
            );
            let reply = cc.recv_json();
            assert_eq!(reply["type"], "published", "{reply}");
        }
    }
    for client in [&mut a1, &mut a2, &mut b1] {
        let got = collect(client, "room:1", 20);
        let seqs: Vec<u64> = got.iter().map(|g| g.0).collect();
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "in order: {seqs:?}");
        let ids: std::collections::HashSet<&String> = got.iter().map(|g| &g.1).collect();
        assert_eq!(ids.len(), 20, "each once");
        for o in &offsets {
            assert!(seqs.contains(o), "the API's offset {o} delivered: {seqs:?}");
        }
        // Nothing more (no duplicate arrives late).
        assert!(events_of(&client.drain_until_pong(), "room:1").is_empty());
    }
    // One subscription per topic on node A, although two of its clients follow room:1.
    let subs = nats.subscriptions_of("node-a");
    assert_eq!(
        subs.iter().filter(|s| *s == "rc.t.room:1").count(),
        1,
        "{subs:?}"
    );
    assert_eq!(
        subs.iter().filter(|s| *s == "rc.t.room:2").count(),
        1,
        "{subs:?}"
    );
    // Node C has no subscriber: no subscription, so no event crossed NATS to it.
    assert!(!nats
        .subscriptions_of("node-c")
        .iter()
        .any(|s| s.starts_with("rc.t.")));
    eventually(5, "the gauge of watched topics", || {
        a.metric("ringcast_cluster_topics_watched") == 2.0
    });
}

#[test]
#[ignore = "needs nats-server: bash .ci/cluster.sh"]
fn a_subscriber_recovers_on_another_node_exactly_what_it_missed() {
    let nats = Nats::start();
    let a = node_with(&nats.url(), "node-a", "3000", 2);
    let b = node_with(&nats.url(), "node-b", "3000", 2);
    let c = node_with(&nats.url(), "node-c", "3000", 2);
    let publish = |i: u32| {
        b.publish(serde_json::json!({"topics": ["room:9"], "wait": "accepted",
            "event": {"type": "t", "data": {"i": i}}}))["offsets"]["room:9"]
            .as_u64()
            .unwrap()
    };
    let mut sub = Client::connect(&a, &room_token("ann"));
    let confirmed = sub.subscribe(&["room:9"]);
    let epoch = confirmed["data"]["topics"]["room:9"]["epoch"]
        .as_str()
        .unwrap()
        .to_owned();
    // Events on other topics interleave: offsets are the stream's, not contiguous.
    for i in 0..3 {
        publish(i);
        b.publish(
            serde_json::json!({"topics": ["room:other"], "wait": "accepted",
            "event": {"type": "t", "data": {}}}),
        );
    }
    let seen = collect(&mut sub, "room:9", 3);
    let last = seen[2].0;
    drop(sub); // its node could have died: it comes back elsewhere
    let missed: Vec<u64> = (3..8).map(publish).collect();
    // On node C, which has never served room:9 (nothing cached): read from the stream.
    let mut again = Client::connect(&c, &room_token("ann"));
    let replay = again.subscribe_collect(serde_json::json!({"topics": ["room:9"],
        "since": {"room:9": {"offset": last, "epoch": epoch}}}));
    let replayed: Vec<u64> = events_of(&replay, "room:9").iter().map(|e| e.0).collect();
    assert_eq!(replayed, missed);
    // Live after the replay, nothing twice.
    let next = publish(8);
    assert_eq!(collect(&mut again, "room:9", 1)[0].0, next);
    // On node A again, now from its cache (it still serves the topic): the same answer.
    let mut third = Client::connect(&a, &room_token("ann"));
    let mut keep_a_subscriber = Client::connect(&a, &room_token("amy"));
    keep_a_subscriber.subscribe(&["room:9"]);
    let replay = third.subscribe_collect(serde_json::json!({"topics": ["room:9"],
        "since": {"room:9": {"offset": last, "epoch": epoch}}}));
    let mut want = missed.clone();
    want.push(next);
    assert_eq!(
        events_of(&replay, "room:9")
            .iter()
            .map(|e| e.0)
            .collect::<Vec<_>>(),
        want
    );
    // Another epoch (another history stream): not recovered, nothing replayed.
    let mut fourth = Client::connect(&c, &room_token("ann"));
    fourth.send_json(
        serde_json::json!({"type": "subscribe", "requestId": "x", "payload": {
        "topics": ["room:9"], "since": {"room:9": {"offset": last, "epoch": "js0"}}}}),
    );
    let reply = fourth.recv_json();
    assert_eq!(reply["type"], "subscription_confirmed", "{reply}");
    assert_eq!(
        reply["data"]["topics"]["room:9"]["recovered"], false,
        "{reply}"
    );
}

#[test]
#[ignore = "needs nats-server: bash .ci/cluster.sh"]
fn while_nats_is_down_publishes_get_503_and_live_delivery_resumes_after() {
    let mut nats = Nats::start();
    let a = node_with(&nats.url(), "node-a", "3000", 1);
    let b = node_with(&nats.url(), "node-b", "3000", 1);
    let mut sub = Client::connect(&a, &room_token("ann"));
    sub.subscribe(&["room:5"]);
    let publish = |i: u32| {
        b.http(
            "POST",
            "/v1/publish",
            &[("Authorization", &format!("Bearer {API_KEY}"))],
            &serde_json::json!({"topics": ["room:5"], "event": {"type": "t", "data": {"i": i}}})
                .to_string(),
        )
    };
    assert_eq!(publish(0).0, 200);
    collect(&mut sub, "room:5", 1);
    nats.restart(|| {
        eventually(10, "B sees NATS gone", || {
            b.http("GET", "/readyz", &[], "").0 == 503
        });
        let (status, body) = publish(1);
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("\"unavailable\""), "{body}");
        assert_eq!(a.http("GET", "/healthz", &[], "").0, 200);
    });
    eventually(30, "both ready again", || {
        a.http("GET", "/readyz", &[], "").0 == 200 && b.http("GET", "/readyz", &[], "").0 == 200
    });
    // The first publishes after the restart may race the resubscription: the subscriber
    // still gets every one that was accepted (gaps are fetched), in order.
    let mut accepted = Vec::new();
    for i in 2..12 {
        let (status, body) = publish(i);
        if status == 200 {
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            accepted.push(v["offsets"]["room:5"].as_u64().unwrap());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        accepted.len() >= 5,
        "accepted after the restart: {accepted:?}"
    );
    let got: Vec<u64> = collect(&mut sub, "room:5", accepted.len())
        .iter()
        .map(|e| e.0)
        .collect();
    assert_eq!(got, accepted);
    assert!(b.metric("ringcast_cluster_publish_failures_total") >= 1.0);
}

/// A subscriber that survives its node: reads `topic` events on its own thread and, when its
/// connection breaks, reconnects to the next address in `nodes` with the last offset seen.
/// Returns (the offset it started above, every offset received in order, recovered flags).
fn resilient_subscriber(
    nodes: Vec<std::net::SocketAddr>,
    customer: String,
    topic: String,
    until: std::sync::Arc<std::sync::atomic::AtomicBool>,
    epoch_and_start: std::sync::mpsc::Sender<()>,
) -> Subscriber {
    let (tx, _) = std::sync::mpsc::channel();
    resilient_subscriber_via(nodes, customer, topic, until, epoch_and_start, tx)
}

/// [`resilient_subscriber`] that also reports each time its connection breaks, and says
/// `cid=<customer>` in its URL (the load balancer's affinity key).
fn resilient_subscriber_via(
    nodes: Vec<std::net::SocketAddr>,
    customer: String,
    topic: String,
    until: std::sync::Arc<std::sync::atomic::AtomicBool>,
    epoch_and_start: std::sync::mpsc::Sender<()>,
    broken: std::sync::mpsc::Sender<(String, Instant, String)>,
) -> Subscriber {
    std::thread::spawn(move || {
        let token = room_token(&customer);
        let mut start = None;
        let mut got: Vec<u64> = Vec::new();
        let mut recovered = Vec::new();
        let mut epoch = String::new();
        let mut ready = Some(epoch_and_start);
        for addr in nodes.iter().cycle() {
            if until.load(std::sync::atomic::Ordering::SeqCst) && start.is_some() {
                break;
            }
            let Ok(stream) = TcpStream::connect(addr) else {
                continue;
            };
            stream
                .set_read_timeout(Some(Duration::from_millis(300)))
                .unwrap();
            let url = format!("ws://{addr}/v1/ws?cid={customer}&token={token}");
            let Ok((mut ws, _)) = tungstenite::client(url, stream) else {
                continue;
            };
            let mut payload = serde_json::json!({"topics": [topic]});
            if let Some(last) = got.last().copied().or(start) {
                payload["since"] =
                    serde_json::json!({ topic.as_str(): {"offset": last, "epoch": epoch} });
            }
            let sub =
                serde_json::json!({"type": "subscribe", "requestId": "s", "payload": payload});
            if ws
                .send(tungstenite::Message::text(sub.to_string()))
                .is_err()
            {
                continue;
            }
            loop {
                match ws.read() {
                    Ok(tungstenite::Message::Text(t)) => {
                        let v: serde_json::Value = serde_json::from_str(&t).unwrap();
                        if v["type"] == "subscription_confirmed" {
                            let t = &v["data"]["topics"][topic.as_str()];
                            recovered.push(t["recovered"].as_bool().unwrap());
                            epoch = t["epoch"].as_str().unwrap().to_owned();
                            if start.is_none() {
                                start = t["offset"].as_u64();
                            }
                            if let Some(r) = ready.take() {
                                let _ = r.send(());
                            }
                        } else if v["topic"] == topic.as_str() {
                            got.push(v["offset"].as_u64().unwrap());
                        }
                    }
                    Ok(tungstenite::Message::Close(c)) => {
                        let why = c
                            .map(|c| format!("{} {}", c.code, c.reason))
                            .unwrap_or_default();
                        let _ = broken.send((customer.clone(), Instant::now(), why));
                        let _ = ws.flush();
                        break;
                    }
                    Ok(_) => {}
                    Err(tungstenite::Error::Io(e))
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) =>
                    {
                        if until.load(std::sync::atomic::Ordering::SeqCst) {
                            return (start.unwrap_or(0), got, recovered);
                        }
                    }
                    Err(e) => {
                        // The node is gone or closed us (a drain's 1001): the next one.
                        let _ = broken.send((customer.clone(), Instant::now(), e.to_string()));
                        break;
                    }
                }
            }
        }
        (start.unwrap_or(0), got, recovered)
    })
}

/// A tiny deterministic generator (the test's seed decides who goes where and when A dies).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

#[test]
#[ignore = "needs nats-server: bash .ci/cluster.sh"]
fn when_a_node_is_killed_its_subscribers_get_every_event_once_in_order_on_the_others() {
    for seed in [1u64, 2, 3] {
        let mut rng = Lcg(seed);
        let nats = Nats::start();
        let mut a = node_with(&nats.url(), "node-a", "3000", 2);
        let b = node_with(&nats.url(), "node-b", "3000", 2);
        let c = node_with(&nats.url(), "node-c", "3000", 2);
        let topics = ["room:k0", "room:k1", "room:k2"];
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        // Six subscribers: four start on A (the node that dies), two on B or C; each then
        // moves to the others in a seeded order.
        let mut subs = Vec::new();
        for i in 0..6 {
            let first = if i < 4 {
                a.addr
            } else {
                [b.addr, c.addr][rng.next(2) as usize]
            };
            let mut order = vec![first];
            if rng.next(2) == 0 {
                order.extend([b.addr, c.addr]);
            } else {
                order.extend([c.addr, b.addr]);
            }
            let topic = topics[rng.next(3) as usize].to_owned();
            let (tx, rx) = std::sync::mpsc::channel();
            let h = resilient_subscriber(order, format!("s{i}"), topic.clone(), stop.clone(), tx);
            rx.recv_timeout(Duration::from_secs(10))
                .expect("subscribed");
            subs.push((topic, h));
        }
        // Events flow through B's and C's APIs; A is killed part-way.
        let kill_at = 10 + rng.next(30);
        let mut accepted: std::collections::HashMap<String, Vec<u64>> = Default::default();
        for i in 0..60u64 {
            if i == kill_at {
                let _ = a.child.kill(); // SIGKILL
                let _ = a.child.wait();
            }
            let topic = topics[(i % 3) as usize];
            let via = if i % 2 == 0 { &b } else { &c };
            let out = via.publish(serde_json::json!({"topics": [topic], "wait": "accepted",
                "event": {"type": "t", "persistent": true, "data": {"i": i}}}));
            accepted
                .entry(topic.to_owned())
                .or_default()
                .push(out["offsets"][topic].as_u64().unwrap());
            std::thread::sleep(Duration::from_millis(20));
        }
        // Give the movers time to reconnect and catch up, then stop them.
        std::thread::sleep(Duration::from_secs(3));
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        assert_every_event_once(subs, &accepted, &format!("seed {seed}, "));
    }
}

/// A load balancer (HAProxy or nginx) running a configuration from deploy/ with only its
/// listening port and its server lines replaced by loopback ones; killed on drop.
struct Balancer {
    child: Child,
    addr: std::net::SocketAddr,
    dir: std::path::PathBuf,
}

impl Balancer {
    fn haproxy(nodes: &[&Server]) -> Balancer {
        let bin = std::env::var("RINGCAST_TEST_HAPROXY")
            .expect("RINGCAST_TEST_HAPROXY: the haproxy binary (bash .ci/cluster.sh)");
        let port = free_port();
        let conf = include_str!("../../../deploy/haproxy/haproxy.cfg");
        let mut out = String::new();
        for line in conf.lines() {
            if line.trim_start().starts_with("bind ") {
                out.push_str(&format!("    bind 127.0.0.1:{port}\n"));
            } else if line.trim_start().starts_with("server node1 ") {
                for (i, n) in nodes.iter().enumerate() {
                    out.push_str(&format!("    server node{i} {} check\n", n.addr));
                }
            } else if !line.trim_start().starts_with("server node") {
                out.push_str(line);
                out.push('\n');
            }
        }
        let dir =
            std::env::temp_dir().join(format!("ringcast-haproxy-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("haproxy.cfg"), out).unwrap();
        let child = Command::new(bin)
            .arg("-db")
            .arg("-f")
            .arg(dir.join("haproxy.cfg"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start haproxy");
        Balancer::up(child, port, dir)
    }

    fn nginx(nodes: &[&Server]) -> Balancer {
        let bin = std::env::var("RINGCAST_TEST_NGINX")
            .expect("RINGCAST_TEST_NGINX: the nginx binary (bash .ci/cluster.sh)");
        let port = free_port();
        let conf = include_str!("../../../deploy/nginx/nginx.conf");
        let dir =
            std::env::temp_dir().join(format!("ringcast-nginx-{}-{port}", std::process::id()));
        std::fs::create_dir_all(dir.join("logs")).unwrap();
        let mut out = String::new();
        for line in conf.lines() {
            let t = line.trim_start();
            if t.starts_with("listen ") {
                out.push_str(&format!("        listen 127.0.0.1:{port};\n"));
            } else if t.starts_with("server 10.0.0.1:") {
                for n in nodes {
                    out.push_str(&format!(
                        "        server {} max_fails=1 fail_timeout=5s;\n",
                        n.addr
                    ));
                }
            } else if !t.starts_with("server 10.0.0.") {
                out.push_str(line);
                out.push('\n');
            }
        }
        std::fs::write(dir.join("nginx.conf"), out).unwrap();
        let child = Command::new(bin)
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .args(["-g", "daemon off; pid nginx.pid; error_log stderr;"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nginx");
        Balancer::up(child, port, dir)
    }

    fn up(child: Child, port: u16, dir: std::path::PathBuf) -> Balancer {
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "the load balancer did not listen"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Balancer {
            child,
            addr: ([127, 0, 0, 1], port).into(),
            dir,
        }
    }

    /// A request through the balancer (HTTP/1.0, so it closes): status and body.
    fn http(&self, method: &str, path: &str, body: &str) -> (u16, String) {
        let mut s = TcpStream::connect(self.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            s,
            "{method} {path} HTTP/1.0\r\nHost: lb\r\nAuthorization: Bearer {API_KEY}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut s, &mut text);
        parse_response(&text)
    }

    fn publish(&self, topic: &str, i: u64) -> Option<u64> {
        let body = serde_json::json!({"topics": [topic], "wait": "accepted",
            "event": {"type": "t", "persistent": true, "data": {"i": i}}});
        let (status, text) = self.http("POST", "/v1/publish", &body.to_string());
        (status == 200).then(|| {
            let v: serde_json::Value = serde_json::from_str(&text).unwrap();
            v["offsets"][topic].as_u64().unwrap()
        })
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn drain_node(nats: &str, id: &str) -> Server {
    cluster_node(
        nats,
        id,
        2,
        &[
            // HAProxy takes a node out after 2 failed checks 2 s apart (deploy/haproxy).
            ("RINGCAST_SERVER_DRAIN_GRACE_SECS", "5"),
            ("RINGCAST_SERVER_DRAIN_SPREAD_SECS", "2"),
            ("RINGCAST_SERVER_DRAIN_TIMEOUT_SECS", "10"),
        ],
    )
}

#[test]
#[ignore = "needs nats-server and haproxy: bash .ci/cluster.sh"]
fn a_node_drained_behind_haproxy_loses_no_event_and_its_clients_move_gradually() {
    let nats = Nats::start();
    let mut nodes: Vec<Server> = ["node-a", "node-b", "node-c"]
        .iter()
        .map(|id| drain_node(&nats.url(), id))
        .collect();
    let lb = Balancer::haproxy(&nodes.iter().collect::<Vec<_>>());
    eventually(10, "HAProxy passes requests", || {
        lb.http("GET", "/readyz", "").0 == 200
    });
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (broken_tx, broken_rx) = std::sync::mpsc::channel();
    let mut subs = Vec::new();
    for i in 0..9 {
        let topic = format!("room:d{}", i % 3);
        let (tx, rx) = std::sync::mpsc::channel();
        let h = resilient_subscriber_via(
            vec![lb.addr],
            format!("cust{i}"),
            topic.clone(),
            stop.clone(),
            tx,
            broken_tx.clone(),
        );
        rx.recv_timeout(Duration::from_secs(10))
            .expect("subscribed");
        subs.push((topic, h));
    }
    // Affinity spread them; drain the node that holds the most.
    let held: Vec<f64> = nodes
        .iter()
        .map(|n| n.metric("ringcast_connections"))
        .collect();
    let victim = (0..3).max_by(|a, b| held[*a].total_cmp(&held[*b])).unwrap();
    assert!(held[victim] >= 2.0, "connections per node: {held:?}");
    let mut accepted: std::collections::HashMap<String, Vec<u64>> = Default::default();
    let mut i = 0u64;
    let mut publish_for =
        |secs: u64, accepted: &mut std::collections::HashMap<String, Vec<u64>>| {
            let until = Instant::now() + Duration::from_secs(secs);
            while Instant::now() < until {
                let topic = format!("room:d{}", i % 3);
                if let Some(o) = lb.publish(&topic, i) {
                    accepted.entry(topic).or_default().push(o);
                }
                i += 1;
                std::thread::sleep(Duration::from_millis(30));
            }
        };
    publish_for(1, &mut accepted);
    let sigterm = Instant::now();
    nodes[victim].terminate();
    publish_for(10, &mut accepted);
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    assert_every_event_once(subs, &accepted, "");
    drop(broken_tx);
    let closes: Vec<(String, Instant, String)> = broken_rx.try_iter().collect();
    assert_eq!(
        closes.len() as f64,
        held[victim],
        "one close per client of the drained node: {closes:?}"
    );
    for (_, at, why) in &closes {
        assert!(
            why.starts_with("1001 server shutting down; reconnect in"),
            "{why}"
        );
        // After the grace: HAProxy had taken the node out, so they reconnected elsewhere.
        assert!(
            *at - sigterm >= Duration::from_secs(4),
            "closed {:?} after SIGTERM",
            *at - sigterm
        );
    }
    // Spread over the drain window, not all at once.
    let first = closes.iter().map(|c| c.1).min().unwrap();
    let last = closes.iter().map(|c| c.1).max().unwrap();
    assert!(
        last - first >= Duration::from_millis(700),
        "closes spread over {:?}",
        last - first
    );
    let _ = nodes[victim].child.wait();
}

#[test]
#[ignore = "needs nats-server and nginx: bash .ci/cluster.sh"]
fn nginx_keeps_a_customer_on_one_node_and_passes_websocket_and_sse() {
    let nats = Nats::start();
    let nodes: Vec<Server> = ["node-a", "node-b", "node-c"]
        .iter()
        .map(|id| node_with(&nats.url(), id, "3000", 1))
        .collect();
    let lb = Balancer::nginx(&nodes.iter().collect::<Vec<_>>());
    // The same cid, three connections: all on one node.
    let token = room_token("carol");
    let clients: Vec<Client> = (0..3)
        .map(|_| {
            let stream = TcpStream::connect(lb.addr).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let url = format!("ws://{}/v1/ws?cid=carol&token={token}", lb.addr);
            let (ws, _) = tungstenite::client(url, stream).expect("upgrade through nginx");
            let mut c = Client {
                ws,
                welcome: serde_json::Value::Null,
            };
            c.welcome = c.recv_json();
            c
        })
        .collect();
    let per_node: Vec<f64> = nodes
        .iter()
        .map(|n| n.metric("ringcast_connections"))
        .collect();
    assert!(
        per_node.contains(&3.0),
        "one node holds carol's three: {per_node:?}"
    );
    // A topic event published through nginx (to whichever node) reaches her there.
    let mut ws = clients.into_iter().next().unwrap();
    ws.subscribe(&["room:n"]);
    let mut sse = SseClient::open_at(
        lb.addr,
        &format!("/v1/events/stream?cid=carol&token={token}&topics=room:n"),
    );
    while sse.next().expect("stream open").event != "subscription_confirmed" {}
    let offset = lb.publish("room:n", 1).expect("published through nginx");
    assert_eq!(collect(&mut ws, "room:n", 1)[0].0, offset);
    loop {
        let ev = sse.next().expect("an SSE event through nginx");
        if ev.event == "t" {
            assert!(ev.data.contains("\"i\":1"), "{}", ev.data);
            break;
        }
    }
}

fn presence_of(server: &Server, customer: &str) -> String {
    let (_, body) = server.http(
        "GET",
        &format!("/v1/presence/customers/{customer}"),
        &[("Authorization", &format!("Bearer {API_KEY}"))],
        "",
    );
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["status"].as_str().unwrap_or_default().to_owned()
}

/// Events of type `kind` among what arrives before a pong.
fn of_type(c: &mut Client, kind: &str) -> Vec<serde_json::Value> {
    c.drain_until_pong()
        .into_iter()
        .filter(|m| m["type"] == kind)
        .collect()
}

#[test]
#[ignore = "needs nats-server: bash .ci/cluster.sh"]
fn customer_role_broadcast_and_disconnect_reach_clients_on_other_nodes() {
    let nats = Nats::start();
    let a = node_with(&nats.url(), "node-a", "3000", 2);
    let b = node_with(&nats.url(), "node-b", "3000", 2);
    let c = node_with(&nats.url(), "node-c", "3000", 2);
    eventually(10, "three nodes", || {
        b.metric("ringcast_cluster_nodes") == 3.0
    });
    let mut dora = Client::connect(&a, &token("dora", |c| c.roles = vec!["nurse".into()]));
    let mut ed = Client::connect(&c, &sub_token("ed"));
    let mut ed_here = Client::connect(&b, &sub_token("ed"));
    eventually(5, "B knows dora and ed are connected elsewhere", || {
        presence_of(&b, "dora") == "online" && presence_of(&c, "dora") == "online"
    });
    // Through B's API: a role, everyone, a customer connected on C and on B itself.
    b.publish(serde_json::json!({"roles": ["nurse"], "wait": "accepted",
        "event": {"type": "ward_alert", "data": {}}}));
    b.publish(serde_json::json!({"broadcast": true, "wait": "accepted",
        "event": {"type": "maintenance", "data": {}}}));
    let out = b.publish(serde_json::json!({"customers": ["ed"], "wait": "accepted",
        "event": {"type": "note", "persistent": true, "data": {}}}));
    assert_eq!(out["dropped"], 0, "{out}");
    // Reads until every type in `kinds` has come (in any order: they travel different
    // subjects and shards); the read times out after 10 s.
    let expect = |c: &mut Client, kinds: &[&str]| {
        let mut missing: Vec<&str> = kinds.to_vec();
        while !missing.is_empty() {
            let m = c.recv_json();
            missing.retain(|k| m["type"] != *k);
        }
    };
    expect(&mut dora, &["ward_alert", "maintenance"]);
    expect(&mut ed, &["maintenance", "note"]);
    expect(&mut ed_here, &["maintenance", "note"]);
    // Each once: nothing more comes.
    std::thread::sleep(Duration::from_millis(300));
    assert!(of_type(&mut dora, "ward_alert").is_empty());
    assert!(of_type(&mut dora, "maintenance").is_empty());
    assert!(of_type(&mut ed, "note").is_empty());
    assert!(of_type(&mut ed_here, "note").is_empty());
    // Disconnect through C closes dora on A.
    let (status, body) = c.http(
        "POST",
        "/v1/disconnect",
        &[("Authorization", &format!("Bearer {API_KEY}"))],
        r#"{"customers": ["dora"], "code": 4003}"#,
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(dora.recv_close().map(|f| u16::from(f.code)), Some(4003));
    eventually(5, "dora offline everywhere", || {
        presence_of(&b, "dora") == "offline" && presence_of(&a, "dora") == "offline"
    });
}

#[test]
#[ignore = "needs nats-server: bash .ci/cluster.sh"]
fn a_live_customer_event_reaches_a_connection_opened_on_another_node_moments_before() {
    let nats = Nats::start();
    let (a, b) = two_nodes(&nats);
    // Each customer's first connection is on B; 50 ms later A's API sends it a live
    // (not stored) event. A routes by what B told it: one NATS hop, not a 100 ms batch.
    let mut clients = Vec::new();
    for i in 0..20 {
        let name = format!("fresh-{i}");
        clients.push(Client::connect(&b, &sub_token(&name)));
        std::thread::sleep(Duration::from_millis(50));
        a.publish(serde_json::json!({"customers": [name], "wait": "accepted",
            "event": {"type": "hello", "data": {}}}));
    }
    // A new customer connection holds live frames until its second read of the stored queue
    // (300 ms after it opened), then sends them in order.
    std::thread::sleep(Duration::from_millis(600));
    let got: Vec<usize> = clients
        .iter_mut()
        .map(|c| of_type(c, "hello").len())
        .collect();
    assert_eq!(got, vec![1; 20], "hello received by each fresh connection");
}

#[test]
#[ignore = "needs nats-server: bash .ci/cluster.sh"]
fn a_follower_hears_a_status_chosen_again_on_a_node_after_another_nodes_choice() {
    let nats = Nats::start();
    let (a, b) = two_nodes(&nats);
    let status = |v: &str| serde_json::json!({"type": "presence", "payload": {"status": v}});
    let mut fay = Client::connect(&a, &sub_token("fay"));
    fay.subscribe(&["presence:ann"]);
    let mut ann = Client::connect(&a, &sub_token("ann"));
    let mut ann_b = Client::connect(&b, &sub_token("ann"));
    eventually(5, "each node sees ann on the other", || {
        presence_of(&a, "ann") == "online" && presence_of(&b, "ann") == "online"
    });
    let heard = |fay: &mut Client, want: &str| loop {
        let m = fay.recv_json();
        if m["type"] == "presence" && m["data"]["status"] == want {
            return;
        }
    };
    ann.send_json(status("away"));
    heard(&mut fay, "away");
    ann_b.send_json(status("busy"));
    heard(&mut fay, "busy");
    eventually(5, "A knows B's choice", || presence_of(&a, "ann") == "busy");
    // Away again on A: A's own choice was already away, but ann's status (the latest choice
    // on any node) changes, and fay is told.
    ann.send_json(status("away"));
    heard(&mut fay, "away");
    assert_eq!(presence_of(&a, "ann"), "away");
    drop(ann_b);
}

#[test]
#[ignore = "needs nats-server: bash .ci/cluster.sh"]
fn a_status_chosen_on_one_node_is_the_customers_status_on_every_node() {
    let nats = Nats::start();
    let a = node_with(&nats.url(), "node-a", "3000", 2);
    let b = node_with(&nats.url(), "node-b", "3000", 2);
    let status = |v: &str| serde_json::json!({"type": "presence", "payload": {"status": v}});
    let mut ann = Client::connect(&a, &sub_token("ann"));
    eventually(5, "B sees ann", || presence_of(&b, "ann") == "online");
    ann.send_json(status("away"));
    eventually(5, "B sees ann away", || presence_of(&b, "ann") == "away");
    assert_eq!(presence_of(&a, "ann"), "away");
    // Connected to B as well, ann chooses again there: the latest choice is hers everywhere.
    let mut ann_b = Client::connect(&b, &sub_token("ann"));
    ann_b.send_json(status("busy"));
    eventually(5, "busy on both", || {
        presence_of(&a, "ann") == "busy" && presence_of(&b, "ann") == "busy"
    });
    // A node that starts later learns it with the whole table.
    let c = node_with(&nats.url(), "node-c", "3000", 2);
    eventually(5, "C sees ann busy", || presence_of(&c, "ann") == "busy");
    // The choice lives with the connections of the node where it was made: B's goes with
    // ann's connection there, and A's stands again.
    drop(ann_b);
    eventually(5, "away again on all three", || {
        [&a, &b, &c].iter().all(|n| presence_of(n, "ann") == "away")
    });
    drop(ann);
    eventually(5, "offline on all three", || {
        [&a, &b, &c]
            .iter()
            .all(|n| presence_of(n, "ann") == "offline")
    });
}

#[test]
#[ignore = "needs nats-server: bash .ci/cluster.sh"]
fn a_killed_nodes_customers_go_offline_on_the_others_within_the_node_timeout() {
    let nats = Nats::start();
    let mut a = node_with(&nats.url(), "node-a", "1500", 1);
    let b = node_with(&nats.url(), "node-b", "1500", 1);
    let _ann = Client::connect(&a, &sub_token("ann"));
    eventually(5, "B sees ann", || presence_of(&b, "ann") == "online");
    // A node that starts later learns who is connected from the whole set.
    let c = node_with(&nats.url(), "node-c", "1500", 1);
    eventually(5, "C sees ann", || presence_of(&c, "ann") == "online");
    let _ = a.child.kill();
    let took = eventually(10, "ann gone from B and C", || {
        presence_of(&b, "ann") == "offline" && presence_of(&c, "ann") == "offline"
    });
    assert!(
        took <= Duration::from_millis(2500),
        "took {took:?} (timeout 1.5 s)"
    );
}

#[test]
#[ignore = "needs nats-server: bash .ci/cluster.sh"]
fn typing_reaches_a_topic_member_on_another_node() {
    let nats = Nats::start();
    let a = node_with(&nats.url(), "node-a", "3000", 2);
    let b = node_with(&nats.url(), "node-b", "3000", 2);
    let mut ann = Client::connect(&a, &room_token("ann"));
    let mut bob = Client::connect(&b, &room_token("bob"));
    ann.subscribe(&["room:t"]);
    bob.subscribe(&["room:t"]);
    ann.send_json(serde_json::json!({"type": "typing",
        "payload": {"topic": "room:t", "state": "start"}}));
    let typing = loop {
        let m = bob.recv_json();
        if m["type"] == "typing" {
            break m;
        }
    };
    assert_eq!(typing["topic"], "room:t", "{typing}");
    // The typist's own connections skip it, here and there.
    assert!(of_type(&mut ann, "typing").is_empty());
}

/// Connects `customer` to `server` (with `?since=` when given); returns the client, the
/// welcome's cursor and recovered flag, and the events replayed right after the welcome (up to
/// the first pong).
fn connect_customer(
    server: &Server,
    customer: &str,
    since: Option<&str>,
) -> (Client, String, bool, Vec<serde_json::Value>) {
    let token = sub_token(customer);
    let path = match since {
        Some(s) => format!("/v1/ws?token={token}&since={s}"),
        None => format!("/v1/ws?token={token}"),
    };
    let mut c = Client::connect_raw(server, &path).expect("upgrade");
    let welcome = c.recv_json();
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    let replay = c.drain_until_pong();
    (
        c,
        welcome["data"]["cursor"].as_str().unwrap().to_owned(),
        welcome["data"]["recovered"].as_bool().unwrap(),
        replay,
    )
}

fn kinds(events: &[serde_json::Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| e["type"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
#[ignore = "needs nats-server: bash .ci/cluster.sh"]
fn a_customers_stored_events_follow_it_to_any_node_and_acks_hold_everywhere() {
    let nats = Nats::start();
    let env = |id| {
        cluster_node(
            &nats.url(),
            id,
            2,
            &[("RINGCAST_DELIVERY_OFFLINE_QUEUE", "4")],
        )
    };
    let (a, b, c) = (env("node-a"), env("node-b"), env("node-c"));
    let store = |via: &Server, kind: &str| {
        via.publish(serde_json::json!({"customers": ["gus"], "wait": "accepted",
            "event": {"type": kind, "persistent": true, "data": {}}}))
    };
    // Gus is connected nowhere: his queue is the cluster's, not the taking node's.
    for k in ["e1", "e2", "e3"] {
        assert_eq!(store(&b, k)["queued"], 1);
    }
    let (mut on_a, _, recovered, replay) = connect_customer(&a, "gus", None);
    assert!(recovered);
    assert_eq!(kinds(&replay), ["e1", "e2", "e3"]);
    let cursor_of = |e: &serde_json::Value| e["cursor"].as_str().unwrap().to_owned();
    // Acked on A: e1 by id, e2 by cursor.
    on_a.send_json(serde_json::json!({"type": "ack", "requestId": "k",
        "payload": {"ids": [replay[0]["id"]], "cursors": [cursor_of(&replay[1])]}}));
    let acked = loop {
        let m = on_a.recv_json();
        if m["type"] == "acked" {
            break m;
        }
    };
    assert_eq!(acked["data"]["acked"], 2, "{acked}");
    drop(on_a);
    store(&c, "e4");
    // On C, without a cursor: what is not acked, in order.
    let (mut on_c, _, _, replay) = connect_customer(&c, "gus", None);
    assert_eq!(kinds(&replay), ["e3", "e4"]);
    // Live on C from a publish through A, once.
    store(&a, "e5");
    let e5 = loop {
        let m = on_c.recv_json();
        if m["type"] == "e5" {
            break m;
        }
    };
    assert!(on_c.drain_until_pong().iter().all(|m| m["type"] != "e5"));
    drop(on_c);
    // On B with the last cursor: nothing again (the cursor acknowledges all before it).
    let (_on_b, _, recovered, replay) = connect_customer(&b, "gus", Some(&cursor_of(&e5)));
    assert!(recovered);
    assert!(kinds(&replay).is_empty(), "{replay:?}");
    // The queue holds 4 per customer: the fifth is refused and said so, none pushed out.
    for k in ["f1", "f2", "f3", "f4"] {
        assert_eq!(store(&a, k)["queued"], 1, "{k}");
    }
    let out = store(&a, "f5");
    assert_eq!(
        (out["queued"].as_u64(), out["dropped"].as_u64()),
        (Some(0), Some(1)),
        "{out}"
    );
}

#[test]
#[ignore = "needs nats-server: bash .ci/cluster.sh"]
fn when_a_customers_node_is_killed_it_resumes_elsewhere_with_every_persistent_event_once() {
    for seed in [11u64, 12, 13] {
        let mut rng = Lcg(seed);
        let nats = Nats::start();
        let mut a = node_with(&nats.url(), "node-a", "3000", 2);
        let b = node_with(&nats.url(), "node-b", "3000", 2);
        let c = node_with(&nats.url(), "node-c", "3000", 2);
        let customer = format!("kim{seed}");
        let (mut on_a, mut cursor, _, replay) = connect_customer(&a, &customer, None);
        assert!(replay.is_empty());
        let kill_at = 5 + rng.next(15);
        let mut sent = Vec::new();
        let mut got: Vec<String> = Vec::new();
        for i in 0..30u64 {
            if i == kill_at {
                let _ = a.child.kill();
                let _ = a.child.wait();
            }
            let via = if rng.next(2) == 0 { &b } else { &c };
            let id = format!("{customer}-{i}");
            via.publish(
                serde_json::json!({"customers": [customer], "wait": "accepted",
                "event": {"type": "t", "id": id, "persistent": true, "data": {}}}),
            );
            sent.push(id);
            if i < kill_at {
                // Read and ack each one on A, as an app does.
                let m = loop {
                    let m = on_a.recv_json();
                    if m["type"] == "t" {
                        break m;
                    }
                };
                got.push(m["id"].as_str().unwrap().to_owned());
                cursor = m["cursor"].as_str().unwrap().to_owned();
                on_a.send_json(serde_json::json!({"type": "ack", "payload": {"ids": [m["id"]]}}));
            }
        }
        drop(on_a);
        // Back on a node the seed picks, with the last cursor seen.
        let again = if rng.next(2) == 0 { &b } else { &c };
        let (mut on, _, recovered, replay) = connect_customer(again, &customer, Some(&cursor));
        assert!(recovered, "seed {seed}");
        got.extend(
            replay
                .iter()
                .filter(|m| m["type"] == "t")
                .map(|m| m["id"].as_str().unwrap().to_owned()),
        );
        assert_eq!(
            got, sent,
            "seed {seed}: each persistent event once, in order"
        );
        assert!(on.drain_until_pong().iter().all(|m| m["type"] != "t"));
    }
}

/// Reads until a `presence_diff` whose `field` (`joined` or `left`) names `customer`.
fn until_diff(c: &mut Client, field: &str, customer: &str) {
    diffs_until(c, field, customer);
}

/// Reads `presence_diff`s until one names `customer` under `field`; returns every diff read.
fn diffs_until(c: &mut Client, field: &str, customer: &str) -> Vec<serde_json::Value> {
    let mut seen = Vec::new();
    loop {
        let m = c.recv_json();
        if m["type"] != "presence_diff" {
            continue;
        }
        let done = m["data"][field]
            .as_array()
            .unwrap()
            .contains(&serde_json::json!(customer));
        seen.push(m);
        if done {
            return seen;
        }
    }
}

/// A config file whose `room:` topics have presence.
fn presence_rooms() -> crate::presence::tempfile_path::TempFile {
    crate::presence::tempfile_path::TempFile::new(
        "[[namespaces]]\nprefix = \"room:\"\npresence = true\n",
    )
}

/// A two-shard node reading `rooms` (see [`presence_rooms`]), with diffs every 50 ms.
fn presence_node(
    nats: &Nats,
    rooms: &crate::presence::tempfile_path::TempFile,
    id: &str,
    extra: &[(&str, &str)],
) -> Server {
    let mut env = vec![
        ("RINGCAST_CONFIG", rooms.path()),
        ("RINGCAST_PRESENCE_COALESCE_MS", "50"),
    ];
    env.extend_from_slice(extra);
    cluster_node(&nats.url(), id, 2, &env)
}

/// Reads until a message of type `kind`; returns it.
fn until(c: &mut Client, kind: &str) -> serde_json::Value {
    loop {
        let m = c.recv_json();
        if m["type"] == kind {
            return m;
        }
    }
}

#[test]
#[ignore = "needs nats-server: bash .ci/cluster.sh"]
fn direct_messages_and_read_receipts_cross_nodes_between_topic_members_only() {
    let nats = Nats::start();
    let a = node_with(&nats.url(), "node-a", "3000", 2);
    let b = node_with(&nats.url(), "node-b", "3000", 2);
    let c = node_with(&nats.url(), "node-c", "3000", 2);
    let mut ann = Client::connect(&a, &room_token("ann"));
    let mut bob = Client::connect(&b, &room_token("bob"));
    let mut cid = Client::connect(&c, &room_token("cid"));
    ann.subscribe(&["room:x"]);
    bob.subscribe(&["room:x"]);
    cid.subscribe(&["room:y"]);
    eventually(5, "A knows bob and cid are on other nodes", || {
        presence_of(&a, "bob") == "online" && presence_of(&a, "cid") == "online"
    });
    // No message grant: allowed because bob, on B, follows room:x as ann does.
    ann.send_json(serde_json::json!({"type": "send_message", "requestId": "o",
        "payload": {"to": "bob", "type": "webrtc_offer", "data": {"sdp": "v=0"}}}));
    let sent = until(&mut ann, "sent");
    assert_eq!(sent["requestId"], "o", "{sent}");
    let offer = until(&mut bob, "webrtc_offer");
    assert_eq!(offer["from"], "ann");
    // Bob's read receipt, taken by B, reaches ann on A.
    bob.send_json(serde_json::json!({"type": "ack",
        "payload": {"ids": [offer["id"]], "status": "read"}}));
    let receipt = until(&mut ann, "message_read");
    assert_eq!(receipt["data"]["id"], offer["id"], "{receipt}");
    assert_eq!(receipt["data"]["by"], "bob", "{receipt}");
    // Cid, on C, shares no topic with ann: refused, nothing delivered.
    ann.send_json(serde_json::json!({"type": "send_message", "requestId": "x",
        "payload": {"to": "cid", "type": "webrtc_offer", "data": {}}}));
    let refused = until(&mut ann, "error");
    assert_eq!(refused["code"], "forbidden", "{refused}");
    assert!(of_type(&mut cid, "webrtc_offer").is_empty());
}

#[test]
#[ignore = "needs nats-server: bash .ci/cluster.sh"]
fn a_node_authenticates_to_nats_with_the_configured_token() {
    let port = free_port();
    let store =
        std::env::temp_dir().join(format!("ringcast-js-auth-{}-{port}", std::process::id()));
    let nats = Nats::start_with(port, store, &["--auth", "s3cret-token"]);
    let with = |token: &str| {
        Server::start_with(
            1,
            &[
                ("RINGCAST_BROKER", "nats"),
                ("RINGCAST_NATS_URL", &nats.url()),
                ("RINGCAST_NATS_TOKEN", token),
            ],
        )
    };
    let good = with("s3cret-token");
    eventually(10, "ready with the right token", || {
        good.http("GET", "/readyz", &[], "").0 == 200
    });
    let bad = with("wrong");
    std::thread::sleep(Duration::from_secs(2));
    let (status, body) = bad.http("GET", "/readyz", &[], "");
    assert_eq!(status, 503, "{body}");
    assert_eq!(bad.http("GET", "/healthz", &[], "").0, 200);
}

#[test]
#[ignore = "needs nats-server: bash .ci/cluster.sh"]
fn the_per_customer_connection_limit_counts_every_node() {
    let nats = Nats::start();
    let node = |id: &str| {
        cluster_node(
            &nats.url(),
            id,
            1,
            &[("RINGCAST_LIMITS_CONNECTIONS_PER_CUSTOMER", "2")],
        )
    };
    let (a, b) = (node("node-a"), node("node-b"));
    eventually(10, "two nodes", || {
        b.metric("ringcast_cluster_nodes") == 2.0
    });
    let token = sub_token("lim");
    let _one = Client::connect(&a, &token);
    let _two = Client::connect(&a, &token);
    // B learns A's count (presence, within ~100 ms): a third connection there is refused.
    eventually(5, "refused on B", || {
        matches!(
            Client::connect_raw(&b, &format!("/v1/ws?token={token}")),
            Err(tungstenite::Error::Http(r)) if r.status() == 429
                && String::from_utf8_lossy(r.body().as_deref().unwrap_or_default())
                    .contains("too_many_connections")
        )
    });
    drop(_one);
    eventually(5, "accepted on B once one closed on A", || {
        Client::connect_raw(&b, &format!("/v1/ws?token={token}")).is_ok()
    });
}

#[test]
#[ignore = "needs nats-server: bash .ci/cluster.sh"]
fn a_presence_topic_lists_members_of_every_node_and_a_killed_nodes_members_leave() {
    let nats = Nats::start();
    let file = presence_rooms();
    let node = |id: &str| {
        presence_node(
            &nats,
            &file,
            id,
            &[("RINGCAST_NATS_NODE_TIMEOUT_MS", "1500")],
        )
    };
    let (mut a, b) = (node("node-a"), node("node-b"));
    eventually(10, "two nodes", || {
        b.metric("ringcast_cluster_nodes") == 2.0
    });
    let mut ann = Client::connect(&a, &room_token("ann"));
    let mut bob = Client::connect(&b, &room_token("bob"));
    ann.subscribe(&["room:p"]);
    bob.subscribe(&["room:p"]);
    let members = |s: &Server| {
        let (_, body) = s.http(
            "GET",
            "/v1/presence/topics/room:p",
            &[("Authorization", &format!("Bearer {API_KEY}"))],
            "",
        );
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let mut names: Vec<String> = v["members"]
            .as_array()
            .map(|m| {
                m.iter()
                    .map(|x| x["customerId"].as_str().unwrap_or_default().to_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    };
    eventually(5, "both nodes list both members", || {
        members(&a) == ["ann", "bob"] && members(&b) == ["ann", "bob"]
    });
    // Bob hears that ann joined (her node's diff crosses to his).
    until_diff(&mut bob, "joined", "ann");
    let _ = a.child.kill();
    let killed = Instant::now();
    // Within the node timeout (1.5 s) and a tick: bob is told ann left, and B lists him alone.
    until_diff(&mut bob, "left", "ann");
    assert!(
        killed.elapsed() < Duration::from_millis(3000),
        "{:?}",
        killed.elapsed()
    );
    assert_eq!(members(&b), ["bob"]);
    drop(ann);
}

#[test]
#[ignore = "needs nats-server: bash .ci/cluster.sh"]
fn a_presence_diff_counts_every_nodes_members_and_names_only_cluster_wide_changes() {
    let nats = Nats::start();
    let file = presence_rooms();
    let node = |id: &str| presence_node(&nats, &file, id, &[]);
    let (a, b) = (node("node-a"), node("node-b"));
    see_each_other(&a, &b);
    let mut ann = Client::connect(&a, &room_token("ann"));
    ann.subscribe(&["room:q"]);
    let mut bob = Client::connect(&b, &room_token("bob"));
    bob.subscribe(&["room:q"]);
    diffs_until(&mut ann, "joined", "bob");
    // cat joins on A: A's diff counts bob, who is on B (before: 2, A's own view).
    let mut cat = Client::connect(&a, &room_token("cat"));
    cat.subscribe(&["room:q"]);
    let seen = diffs_until(&mut bob, "joined", "cat");
    assert_eq!(seen.last().unwrap()["data"]["members"], 3, "{seen:?}");
    // bob opens a second connection, on A: new to A, not to the room. Then dan joins on A.
    let mut bob2 = Client::connect(&a, &room_token("bob"));
    bob2.subscribe(&["room:q"]);
    std::thread::sleep(Duration::from_millis(300));
    let mut dan = Client::connect(&a, &room_token("dan"));
    dan.subscribe(&["room:q"]);
    let seen = diffs_until(&mut ann, "joined", "dan");
    assert!(
        seen.iter()
            .all(|d| d["data"]["joined"] != serde_json::json!(["bob"])),
        "bob was already a member (on B): {seen:?}"
    );
    assert_eq!(seen.last().unwrap()["data"]["members"], 4, "{seen:?}");
    // bob's connection on A goes: he is still a member on B. Then dan leaves.
    drop(bob2);
    std::thread::sleep(Duration::from_millis(300));
    drop(dan);
    let seen = diffs_until(&mut cat, "left", "dan");
    assert!(
        seen.iter().all(|d| !d["data"]["left"]
            .as_array()
            .unwrap()
            .contains(&serde_json::json!("bob"))),
        "bob is still a member (on B): {seen:?}"
    );
    assert_eq!(seen.last().unwrap()["data"]["members"], 3, "{seen:?}");
}

#[test]
#[ignore = "needs nats-server: bash .ci/cluster.sh"]
fn a_publisher_chosen_id_is_deduplicated_per_topic_and_per_customer_not_across_them() {
    let nats = Nats::start();
    let a = node_with(&nats.url(), "node-a", "3000", 2);
    let body = serde_json::json!({"topics": ["room:d1", "room:d2"], "customers": ["dan", "dee"],
        "wait": "accepted",
        "event": {"type": "t", "id": "order-42", "persistent": true, "data": {}}});
    let first = a.publish(body.clone());
    assert_eq!(
        first["offsets"].as_object().map(|o| o.len()),
        Some(2),
        "{first}"
    );
    assert_eq!(
        (first["queued"].as_u64(), first["duplicates"].as_u64()),
        (Some(2), Some(0)),
        "{first}"
    );
    // The same id again: a duplicate for each of the four targets, nothing stored twice.
    let again = a.publish(body);
    assert_eq!(again["duplicates"], 4, "{again}");
    assert_eq!(again["queued"], 0, "{again}");
}

#[test]
#[ignore = "needs nats-server: bash .ci/cluster.sh"]
fn a_node_restarted_under_the_same_id_learns_the_others_presence() {
    let nats = Nats::start();
    let mut a = node_with(&nats.url(), "node-a", "3000", 1);
    let b = node_with(&nats.url(), "node-b", "3000", 1);
    let _bob = Client::connect(&b, &sub_token("bob"));
    eventually(5, "A sees bob", || presence_of(&a, "bob") == "online");
    // Killed and back under the same id before B's 3 s timeout: B never forgot it.
    let _ = a.child.kill();
    let _ = a.child.wait();
    let again = node_with(&nats.url(), "node-a", "3000", 1);
    eventually(5, "the new A sees bob", || {
        presence_of(&again, "bob") == "online"
    });
}

/// Three nats-servers clustered on loopback (routes between all, JetStream on each), each
/// with its own store; the JetStream meta group has a leader when this returns.
fn nats_cluster() -> Vec<Nats> {
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let routes: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let all_routes = routes
        .iter()
        .map(|p| format!("nats://127.0.0.1:{p}"))
        .collect::<Vec<_>>()
        .join(",");
    let servers: Vec<Nats> = (0..3)
        .map(|i| {
            let store = std::env::temp_dir().join(format!(
                "ringcast-js-c{i}-{}-{}",
                std::process::id(),
                ports[i]
            ));
            let _ = std::fs::remove_dir_all(&store);
            let name = format!("n{i}");
            let cluster = format!("nats://127.0.0.1:{}", routes[i]);
            Nats::start_with(
                ports[i],
                store,
                &[
                    "--server_name",
                    &name,
                    "--cluster_name",
                    "rc",
                    "--cluster",
                    &cluster,
                    "--routes",
                    &all_routes,
                ],
            )
        })
        .collect();
    eventually(30, "JetStream clustered and healthy on all three", || {
        servers.iter().all(|s| s.healthz() == 200)
    });
    servers
}

impl Nats {
    /// A monitoring endpoint's whole answer (status line, headers, body), or "" if closed.
    fn monitoring(&self, path: &str) -> String {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.monitor)) else {
            return String::new();
        };
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n");
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut s, &mut text);
        text
    }

    /// The monitoring endpoint's `/healthz` status (200 once JetStream is current).
    fn healthz(&self) -> u16 {
        self.monitoring("/healthz")
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0)
    }
}

#[test]
#[ignore = "needs nats-server: bash .ci/cluster.sh"]
fn a_nats_server_killed_in_a_three_server_cluster_loses_no_event_and_a_retry_stores_none_twice() {
    // Streams replicated on all three servers; each node knows every server, listed from a
    // different one first.
    let mut nats = nats_cluster();
    let urls: Vec<String> = nats.iter().map(Nats::url).collect();
    let node = |id: &str, first: usize| {
        let list = (0..3)
            .map(|i| urls[(first + i) % 3].clone())
            .collect::<Vec<_>>()
            .join(",");
        cluster_node(&list, id, 2, &[("RINGCAST_NATS_REPLICAS", "3")])
    };
    let a = node("node-a", 0);
    let b = node("node-b", 1);
    eventually(30, "both nodes ready", || {
        a.http("GET", "/readyz", &[], "").0 == 200 && b.http("GET", "/readyz", &[], "").0 == 200
    });
    // Both of ringcast's streams are replicated on the three servers.
    let jsz = nats[1].monitoring("/jsz?accounts=true&streams=true&config=true");
    let jsz: serde_json::Value =
        serde_json::from_str(&jsz[jsz.find("\r\n\r\n").unwrap()..]).unwrap();
    let replicas: Vec<(String, u64)> = jsz["account_details"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|a| a["stream_detail"].as_array().cloned().unwrap_or_default())
        .map(|s| {
            let config = &s["config"];
            (
                config["name"].as_str().unwrap().to_owned(),
                config["num_replicas"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(replicas.len(), 2, "{replicas:?}");
    assert!(replicas.iter().all(|(_, n)| *n == 3), "{replicas:?}");
    let topics = ["room:r0", "room:r1"];
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut subs = Vec::new();
    for (i, topic) in topics.iter().enumerate() {
        for (j, first) in [a.addr, b.addr].into_iter().enumerate() {
            let (tx, rx) = std::sync::mpsc::channel();
            let other = if j == 0 { b.addr } else { a.addr };
            let h = resilient_subscriber(
                vec![first, other],
                format!("r{i}{j}"),
                topic.to_string(),
                stop.clone(),
                tx,
            );
            rx.recv_timeout(Duration::from_secs(10))
                .expect("subscribed");
            subs.push((topic.to_string(), h));
        }
    }
    // Persistent events with publisher-chosen ids through both nodes' APIs; the server node
    // A lists first is killed part-way. What JetStream could not confirm is refused (503)
    // and retried with the same id, as docs/protocol.md tells publishers to: a refused
    // publish may still have been stored, and then its retry is answered as a duplicate.
    let mut accepted: std::collections::HashMap<&str, Vec<u64>> = Default::default();
    let mut stored_by_refused: std::collections::HashMap<&str, usize> = Default::default();
    let mut refused = 0;
    for i in 0..80u64 {
        if i == 20 {
            let _ = nats[0].child.kill(); // SIGKILL
            let _ = nats[0].child.wait();
        }
        let topic = topics[(i % 2) as usize];
        let via = if i % 3 == 0 { &a } else { &b };
        let body = serde_json::json!({"topics": [topic], "wait": "accepted",
            "event": {"id": format!("e{i}"), "type": "t", "persistent": true, "data": {"i": i}}})
        .to_string();
        let auth = format!("Bearer {API_KEY}");
        let mut tries = 0;
        loop {
            let (status, text) =
                via.http("POST", "/v1/publish", &[("Authorization", &auth)], &body);
            if status == 200 {
                let v: serde_json::Value = serde_json::from_str(&text).unwrap();
                match v["offsets"][topic].as_u64() {
                    Some(offset) => accepted.entry(topic).or_default().push(offset),
                    None => {
                        assert_eq!(v["duplicates"], 1, "{text}");
                        assert!(tries > 0, "a first try is never a duplicate: {text}");
                        *stored_by_refused.entry(topic).or_default() += 1;
                    }
                }
                break;
            }
            assert_eq!(status, 503, "publish {i}: {text}");
            assert!(text.contains("\"unavailable\""), "{text}");
            refused += 1;
            tries += 1;
            assert!(tries < 100, "publish {i} still refused after 100 tries");
            std::thread::sleep(Duration::from_millis(100));
        }
        std::thread::sleep(Duration::from_millis(30));
    }
    eprintln!("three-server cluster: {refused} refusals, stored by refused publishes {stored_by_refused:?}");
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    for (topic, h) in subs {
        let (start, got, recovered) = h.join().unwrap();
        let want = &accepted[topic.as_str()];
        assert!(want.iter().all(|o| *o > start));
        assert!(
            got.windows(2).all(|w| w[0] < w[1]),
            "{topic}: in order, none twice: {got:?}"
        );
        assert!(
            want.iter().all(|o| got.contains(o)),
            "{topic}: every accepted event: got {got:?}, accepted {want:?}"
        );
        let extra = stored_by_refused.get(topic.as_str()).copied().unwrap_or(0);
        assert_eq!(
            got.len(),
            want.len() + extra,
            "{topic}: beyond the accepted ones, only the refused-but-stored ({extra}); {refused} refusals"
        );
        assert!(recovered.iter().all(|r| *r), "{recovered:?}");
    }
    // A client that comes now recovers the whole run from the two surviving replicas.
    let mut first = Client::connect(&b, &room_token("late0"));
    let confirmed = first.subscribe(&["room:r0"]);
    let epoch = confirmed["data"]["topics"]["room:r0"]["epoch"]
        .as_str()
        .unwrap()
        .to_owned();
    let from = accepted["room:r0"][0] - 1;
    let mut late = Client::connect(&b, &room_token("late"));
    let replay = late.subscribe_collect(serde_json::json!({"topics": ["room:r0"],
        "since": {"room:r0": {"offset": from, "epoch": epoch}}}));
    let replayed: Vec<u64> = events_of(&replay, "room:r0").iter().map(|e| e.0).collect();
    assert!(
        accepted["room:r0"].iter().all(|o| replayed.contains(o)),
        "replayed {replayed:?}"
    );
    assert_eq!(
        replayed.len(),
        accepted["room:r0"].len() + stored_by_refused.get("room:r0").copied().unwrap_or(0)
    );
}

#[test]
#[ignore = "needs nats-server: bash .ci/cluster.sh"]
fn an_ack_on_one_node_holds_for_the_customers_connections_on_another() {
    let nats = Nats::start();
    let a = cluster_node(&nats.url(), "node-a", 2, &[]);
    let b = cluster_node(&nats.url(), "node-b", 2, &[]);
    // Hal is connected on both nodes.
    let (mut on_a, _, _, _) = connect_customer(&a, "hal", None);
    let (mut on_b, _, _, _) = connect_customer(&b, "hal", None);
    eventually(5, "both nodes see hal", || {
        presence_of(&a, "hal").contains("online") && presence_of(&b, "hal").contains("online")
    });
    for k in ["e1", "e2"] {
        let out = a.publish(serde_json::json!({"customers": ["hal"], "wait": "accepted",
            "event": {"type": k, "persistent": true, "data": {}}}));
        assert_eq!(out["queued"], 1, "{out}");
    }
    let e1 = until(&mut on_a, "e1");
    until(&mut on_a, "e2");
    until(&mut on_b, "e1");
    until(&mut on_b, "e2");
    // Acked on A.
    on_a.send_json(serde_json::json!({"type": "ack", "requestId": "k",
        "payload": {"ids": [e1["id"]]}}));
    let acked = until(&mut on_a, "acked");
    assert_eq!(acked["data"]["acked"], 1, "{acked}");
    // A long poll on B, a new connection there, and one on A, without a cursor: only what is
    // not acked.
    let (status, body) = b.http(
        "GET",
        "/v1/events/missed",
        &[("Authorization", &format!("Bearer {}", sub_token("hal")))],
        "",
    );
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        kinds(v["events"].as_array().unwrap()),
        ["e2"],
        "a long poll on B: {v}"
    );
    let (_again_b, _, _, replay) = connect_customer(&b, "hal", None);
    assert_eq!(kinds(&replay), ["e2"], "on B after an ack on A");
    let (_again_a, _, _, replay) = connect_customer(&a, "hal", None);
    assert_eq!(kinds(&replay), ["e2"], "on A");
    drop(on_b);
}
