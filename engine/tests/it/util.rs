//! Helpers: start a server process, mint tokens, WebSocket and HTTP clients.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use proto::auth::{mint_hs256, Claims};
use serde_json::Value;
use tungstenite::{protocol::CloseFrame, Message, WebSocket};

pub const SECRET: &str = "integration-test-secret";
pub const API_KEY: &str = "integration-test-api-key";

/// A running server; killed on drop.
pub struct Server {
    pub child: Child,
    pub addr: SocketAddr,
    /// Server log lines after the start-up line (kept so the reader thread has a receiver).
    pub _logs: std::sync::Mutex<mpsc::Receiver<String>>,
}

impl Server {
    pub fn start(shards: usize) -> Server {
        Server::start_with(shards, &[])
    }

    #[allow(
        clippy::zombie_processes,
        reason = "the child is owned by Server, whose Drop kills and waits"
    )]
    pub fn start_with(shards: usize, env: &[(&str, &str)]) -> Server {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ringcast"));
        cmd.args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--shards",
            &shards.to_string(),
        ])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("RINGCAST_JWT_SECRET", SECRET)
        .env("RINGCAST_API_KEY", API_KEY)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
        // Knobs a whole test run may set (e.g. parking after 1 s to exercise it everywhere).
        for k in ["RINGCAST_SERVER_PARK_AFTER_SECS"] {
            if let Ok(v) = std::env::var(k) {
                cmd.env(k, v);
            }
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn ringcast");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            // Keep draining even when nobody listens: a full pipe would block the server.
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let line = rx
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .expect("server did not report its address");
            if let Some(rest) = line.split("listening on http://").nth(1) {
                let addr = rest.split_whitespace().next().unwrap().parse().unwrap();
                return Server {
                    child,
                    addr,
                    _logs: std::sync::Mutex::new(rx),
                };
            }
        }
    }

    /// Waits for a server log line containing `needle` (lines before it are skipped).
    pub fn wait_log(&self, needle: &str) -> String {
        let logs = self._logs.lock().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let line = logs
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .unwrap_or_else(|_| panic!("no log line with {needle:?}"));
            if line.contains(needle) {
                return line;
            }
        }
    }

    /// A raw WebSocket upgrade for `customer`, with `prefix` bytes before the request (a
    /// PROXY header) and extra header lines; returns the response status and the socket.
    pub fn raw_upgrade(&self, prefix: &[u8], customer: &str, headers: &str) -> (u16, TcpStream) {
        let mut s = TcpStream::connect(self.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut req = prefix.to_vec();
        req.extend_from_slice(
            format!(
                "GET /v1/ws?token={} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\
                 Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
                 Sec-WebSocket-Version: 13\r\n{headers}\r\n",
                sub_token(customer)
            )
            .as_bytes(),
        );
        s.write_all(&req).unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") && s.read(&mut byte).unwrap_or(0) == 1 {
            head.push(byte[0]);
        }
        let status = String::from_utf8_lossy(&head)
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        (status, s)
    }

    pub fn url(&self, path: &str) -> String {
        format!("ws://{}{}", self.addr, path)
    }

    /// A raw HTTP/1.1 request on a fresh connection; returns (status, body).
    pub fn http(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> (u16, String) {
        let mut s = TcpStream::connect(self.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n",
            body.len()
        );
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        req.push_str(body);
        s.write_all(req.as_bytes()).unwrap();
        let mut resp = String::new();
        s.read_to_string(&mut resp).unwrap();
        parse_response(&resp)
    }

    /// `POST /v1/publish` with the API key; returns the parsed response. Tests count
    /// deliveries, so the body asks for `"wait": "delivered"` unless it says otherwise (the
    /// default, `accepted`, has its own tests in `api.rs`).
    pub fn publish(&self, mut body: Value) -> Value {
        if body.get("wait").is_none() {
            body["wait"] = "delivered".into();
        }
        let (status, text) = self.http(
            "POST",
            "/v1/publish",
            &[("Authorization", &format!("Bearer {API_KEY}"))],
            &body.to_string(),
        );
        assert_eq!(status, 200, "{text}");
        serde_json::from_str(&text).unwrap()
    }

    pub fn metric(&self, name: &str) -> f64 {
        let (_, text) = self.http("GET", "/metrics", &[], "");
        text.lines()
            .filter(|l| l.starts_with(name) && !l.starts_with('#'))
            .filter(|l| l[name.len()..].starts_with([' ', '{']))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
            .sum()
    }

    pub fn terminate(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn parse_response(resp: &str) -> (u16, String) {
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

pub fn token(sub: &str, f: impl FnOnce(&mut Claims)) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let mut claims = Claims {
        sub: sub.into(),
        exp: now + 600,
        ..Claims::default()
    };
    f(&mut claims);
    mint_hs256(&claims, SECRET.as_bytes())
}

pub fn sub_token(sub: &str) -> String {
    token(sub, |c| c.channels = vec!["*".into()])
}

/// A WebSocket client (tungstenite over a blocking socket with a read timeout).
pub struct Client {
    pub ws: WebSocket<TcpStream>,
    pub welcome: Value,
}

impl Client {
    pub fn connect(server: &Server, token: &str) -> Client {
        let mut c = Client::connect_raw(server, &format!("/v1/ws?token={token}")).expect("upgrade");
        let welcome = c.recv_json();
        assert_eq!(welcome["type"], "welcome");
        c.welcome = welcome;
        c
    }

    pub fn connect_raw(server: &Server, path: &str) -> Result<Client, tungstenite::Error> {
        let stream = TcpStream::connect(server.addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let (ws, _) = tungstenite::client(server.url(path), stream).map_err(|e| match e {
            tungstenite::HandshakeError::Failure(e) => e,
            tungstenite::HandshakeError::Interrupted(_) => panic!("blocking handshake interrupted"),
        })?;
        Ok(Client {
            ws,
            welcome: Value::Null,
        })
    }

    /// A client with a 4 KiB receive buffer that subscribes to `topics` and then stops
    /// reading: a slow consumer.
    pub fn slow_reader(server: &Server, customer: &str, topics: &[&str]) -> Client {
        let sock = {
            let s =
                socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            s.set_recv_buffer_size(4096).unwrap();
            s.connect(&server.addr.into()).unwrap();
            TcpStream::from(s)
        };
        sock.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let (ws, _) = tungstenite::client(
            server.url(&format!("/v1/ws?token={}", sub_token(customer))),
            sock,
        )
        .unwrap();
        let mut c = Client {
            ws,
            welcome: Value::Null,
        };
        c.recv_json();
        c.subscribe(topics);
        c
    }

    pub fn send_json(&mut self, v: Value) {
        self.ws.send(Message::text(v.to_string())).unwrap();
    }

    /// Next text message as JSON (pings are answered by tungstenite on read).
    pub fn recv_json(&mut self) -> Value {
        loop {
            match self.ws.read().expect("read") {
                Message::Text(t) => return serde_json::from_str(&t).unwrap(),
                Message::Close(c) => panic!("closed: {c:?}"),
                _ => {}
            }
        }
    }

    /// Reads until the server closes; returns its close frame.
    pub fn recv_close(&mut self) -> Option<CloseFrame> {
        loop {
            match self.ws.read() {
                Ok(Message::Close(c)) => return c,
                Ok(_) => {}
                Err(_) => return None,
            }
        }
    }

    pub fn subscribe(&mut self, topics: &[&str]) -> Value {
        self.send_json(serde_json::json!({"type": "subscribe", "payload": {"topics": topics}, "requestId": "sub"}));
        let reply = self.recv_json();
        assert_eq!(reply["type"], "subscription_confirmed", "{reply}");
        reply
    }

    /// Subscribes with `payload` and returns the events that arrive before the confirmation
    /// (history replayed on join).
    pub fn subscribe_collect(&mut self, payload: Value) -> Vec<Value> {
        self.send_json(
            serde_json::json!({"type": "subscribe", "payload": payload, "requestId": "sc"}),
        );
        let mut before = Vec::new();
        loop {
            let v = self.recv_json();
            if v["type"] == "subscription_confirmed" {
                return before;
            }
            before.push(v);
        }
    }

    /// Sends a ping and returns every message that arrives before the pong: a barrier that
    /// proves nothing else was queued for this client.
    pub fn drain_until_pong(&mut self) -> Vec<Value> {
        self.send_json(serde_json::json!({"type": "ping", "requestId": "barrier"}));
        let mut seen = Vec::new();
        loop {
            let v = self.recv_json();
            if v["type"] == "pong" && v["requestId"] == "barrier" {
                return seen;
            }
            seen.push(v);
        }
    }

    /// The shard this connection lives on (from the welcome's connection id).
    pub fn shard(&self) -> usize {
        let id = self.welcome["data"]["connectionId"].as_str().unwrap();
        id.split('-').nth(1).unwrap().parse().unwrap()
    }
}

/// One Server-Sent Events record.
#[derive(Debug, Clone, PartialEq)]
pub struct SseEvent {
    pub event: String,
    pub data: String,
    pub id: Option<String>,
}

/// A minimal SSE client over a blocking socket; records are decoded by `proto::sse::Decoder`
/// (the format of the HTML standard).
pub struct SseClient {
    pub reader: BufReader<TcpStream>,
    pub status: u16,
    decoder: proto::sse::Decoder,
    ready: std::collections::VecDeque<SseEvent>,
}

impl SseClient {
    /// Opens `path` with optional extra headers; reads the response head.
    pub fn open(server: &Server, path: &str, headers: &[(&str, &str)]) -> SseClient {
        SseClient::open_with(server.addr, path, headers)
    }

    /// [`SseClient::open`] at any address (a load balancer in front of servers).
    pub fn open_at(addr: std::net::SocketAddr, path: &str) -> SseClient {
        SseClient::open_with(addr, path, &[])
    }

    fn open_with(addr: std::net::SocketAddr, path: &str, headers: &[(&str, &str)]) -> SseClient {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n");
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        s.write_all(req.as_bytes()).unwrap();
        let mut reader = BufReader::new(s);
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        let status = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        loop {
            line.clear();
            if reader.read_line(&mut line).unwrap() == 0 || line == "\r\n" {
                break;
            }
        }
        SseClient {
            reader,
            status,
            decoder: proto::sse::Decoder::default(),
            ready: std::collections::VecDeque::new(),
        }
    }

    /// The next record (one with data); None when the stream ends.
    pub fn next(&mut self) -> Option<SseEvent> {
        loop {
            if let Some(e) = self.ready.pop_front() {
                return Some(e);
            }
            let bytes = match self.reader.fill_buf() {
                Ok([]) | Err(_) => return None,
                Ok(b) => b.to_vec(),
            };
            self.reader.consume(bytes.len());
            let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
            let ready = &mut self.ready;
            self.decoder.feed(&bytes, |r| {
                ready.push_back(SseEvent {
                    event: text(r.event),
                    data: text(r.data),
                    id: r.id.map(text),
                })
            });
        }
    }
}
