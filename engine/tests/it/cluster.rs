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

/// A nats-server on a free loopback port, killed on drop.
struct Nats {
    child: Child,
    port: u16,
}

impl Nats {
    fn start_on(port: u16) -> Nats {
        let bin = std::env::var("RINGCAST_TEST_NATS_SERVER")
            .expect("RINGCAST_TEST_NATS_SERVER: the nats-server binary (bash .ci/cluster.sh)");
        let child = Command::new(bin)
            .args(["-a", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nats-server");
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "nats-server did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
        Nats { child, port }
    }

    fn start() -> Nats {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        Nats::start_on(port)
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
    }
}

fn node(nats: &str, id: &str, timeout_ms: &str) -> Server {
    Server::start_with(
        1,
        &[
            ("RINGCAST_BROKER", "nats"),
            ("RINGCAST_NATS_URL", nats),
            ("RINGCAST_NODE_ID", id),
            ("RINGCAST_NATS_HEARTBEAT_MS", "200"),
            ("RINGCAST_NATS_NODE_TIMEOUT_MS", timeout_ms),
        ],
    )
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
