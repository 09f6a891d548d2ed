//! Scenarios and what they share: the target, thread-per-core execution, opening subscribers.

pub mod connect;
pub mod fanout;

use std::{
    cell::RefCell,
    future::Future,
    net::{IpAddr, SocketAddr, ToSocketAddrs},
    rc::Rc,
    sync::{atomic::Ordering::Relaxed, Arc},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use glommio::{LocalExecutorBuilder, Placement};
use proto::ws::OpCode;

use crate::{
    net::{connect_from, Client, Framing, Incoming},
    stats::{Shared, ThreadStats},
};

/// The server under test.
#[derive(Clone, Debug)]
pub struct Target {
    /// Address of the WebSocket endpoint (the first node's).
    pub addr: SocketAddr,
    /// `Host` header value (the first node's).
    pub host: String,
    /// Every node given (`--url` with several, comma-separated): connection `i` goes to node
    /// `i % nodes.len()`, so subscribers spread evenly over a cluster.
    pub nodes: Vec<(SocketAddr, String)>,
    /// Which of `nodes` takes the publishes (None: none of them, or a single node).
    pub home: Option<usize>,
    /// Request path (and query) of the WebSocket endpoint, without the token.
    pub path: String,
    /// HS256 secret to mint a token per customer (`c-<i>`); none for generic servers.
    pub secret: Option<String>,
    /// Frame sent after connecting (`{topic}` is replaced), e.g. a subscribe message.
    pub subscribe_frame: Option<String>,
    /// A connection counts as ready once a text frame containing this arrives.
    pub ready_match: Option<String>,
    /// Source addresses to spread connections over (ephemeral-port exhaustion).
    pub sources: Vec<IpAddr>,
    /// WebSocket, or Server-Sent Events (receive only: subscribers of `fanout`, `unicast`,
    /// `storm`, `connect`).
    pub framing: Framing,
    /// Keep a second handle on each socket, so that a receive-only subscriber can leave
    /// glommio for a [`crate::net::Plain`] loop.
    pub keep_dup: bool,
}

impl Target {
    /// Parses `ws://host:port/path` (or `http://` for SSE).
    pub fn parse_url(url: &str) -> anyhow::Result<(SocketAddr, String, String)> {
        let rest = url
            .strip_prefix("ws://")
            .or_else(|| url.strip_prefix("http://"))
            .context("only ws:// and http:// URLs are supported")?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].to_owned()),
            None => (rest, "/".to_owned()),
        };
        let addr = authority
            .to_socket_addrs()?
            .next()
            .with_context(|| format!("cannot resolve {authority}"))?;
        Ok((addr, authority.to_owned(), path))
    }

    /// Whether connection `i` goes to another cluster node than the publishers'.
    fn is_remote(&self, i: usize) -> bool {
        self.nodes.len() > 1 && self.home != Some(i % self.nodes.len())
    }

    /// Opens connection number `i`: handshake, then the subscribe frame and readiness wait.
    pub async fn open(
        &self,
        i: usize,
        topic: &str,
        stats: &RefCell<ThreadStats>,
    ) -> anyhow::Result<Client> {
        let source = if self.sources.is_empty() {
            None
        } else {
            Some(self.sources[i % self.sources.len()])
        };
        let (addr, host) = match self.nodes.len() {
            0 => (self.addr, &self.host),
            n => (self.nodes[i % n].0, &self.nodes[i % n].1),
        };
        let (stream, dup) = connect_from(source, addr, self.keep_dup)?;
        let mut path = self.path.clone();
        if let Some(secret) = &self.secret {
            let now = crate::stats::unix_us() / 1_000_000;
            let claims = proto::auth::Claims {
                sub: format!("c-{i}"),
                exp: now + 24 * 3600,
                channels: vec!["*".into()],
                publish: vec!["*".into()],
                ..Default::default()
            };
            let token = proto::auth::mint_hs256(&claims, secret.as_bytes());
            path.push(if path.contains('?') { '&' } else { '?' });
            path.push_str("token=");
            path.push_str(&token);
        }
        let t0 = Instant::now();
        if self.framing == Framing::Sse {
            let mut client = self.open_sse(stream, path, topic).await?;
            client.remote = self.is_remote(i);
            if let Some(dup) = dup {
                client.keep_dup(dup);
            }
            let _ = stats
                .borrow_mut()
                .handshake
                .record((t0.elapsed().as_micros() as u64).max(1));
            return Ok(client);
        }
        let mut client = Client::handshake(stream, host, &path, Duration::from_secs(30)).await?;
        client.remote = self.is_remote(i);
        if let Some(frame) = &self.subscribe_frame {
            client
                .send(
                    OpCode::Text,
                    frame
                        .replace("{topic}", topic)
                        .replace("{i}", &i.to_string())
                        .as_bytes(),
                )
                .await?;
        }
        if let Some(want) = &self.ready_match {
            let mut ready = false;
            let deadline = Instant::now() + Duration::from_secs(30);
            while !ready {
                if Instant::now() > deadline {
                    bail!("no {want:?} within 30 s");
                }
                if !client.fill().await? {
                    bail!("closed before ready");
                }
                client.drain(|m| {
                    if let Incoming::Text(t) = m {
                        ready |= t.windows(want.len()).any(|w| w == want.as_bytes());
                    }
                })?;
            }
        }
        if let Some(dup) = dup {
            client.keep_dup(dup);
        }
        let _ = stats
            .borrow_mut()
            .handshake
            .record((t0.elapsed().as_micros() as u64).max(1));
        Ok(client)
    }
}

impl Target {
    /// SSE: `topics=<topic>` joins the topic (ringcast); ready once the stream contains
    /// `ready_match` (ringcast: the `subscription_confirmed` record), or at once without one.
    async fn open_sse(
        &self,
        stream: glommio::net::TcpStream,
        mut path: String,
        topic: &str,
    ) -> anyhow::Result<Client> {
        if self.secret.is_some() {
            path.push_str("&topics=");
            path.push_str(topic);
        } else {
            path = path.replace("{topic}", topic);
        }
        let mut client =
            Client::open_sse(stream, &self.host, &path, Duration::from_secs(30)).await?;
        if let Some(want) = &self.ready_match {
            let deadline = Instant::now() + Duration::from_secs(30);
            while !client.buffered_contains(want.as_bytes()) {
                if Instant::now() > deadline {
                    bail!("no {want:?} within 30 s");
                }
                if !client.fill().await? {
                    bail!("closed before ready");
                }
            }
            client.drain(|_| {})?;
        }
        Ok(client)
    }
}

/// Runs `f(thread_index)` on `threads` glommio executors (pinned when there are enough CPUs)
/// and returns their merged statistics.
pub fn run_threads<F, Fut>(threads: usize, f: F) -> anyhow::Result<ThreadStats>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ThreadStats> + 'static,
{
    let f = Arc::new(f);
    let mut handles = Vec::new();
    for t in 0..threads {
        let f = f.clone();
        // Not pinned: the server under test (ringcast) pins its shards to CPUs 0..n, and a
        // client pinned to the same CPUs could neither move off a busy one nor leave the
        // server's cores to it; the scheduler places an unbound thread where there is room.
        let h = LocalExecutorBuilder::new(Placement::Unbound)
            .name(&format!("loadgen-{t}"))
            .io_memory(512 * 1024)
            .ring_depth(2048)
            .spawn(move || async move { f(t).await })
            .map_err(|e| anyhow::anyhow!("starting executor {t}: {e}"))?;
        handles.push(h);
    }
    let mut total = ThreadStats::default();
    for h in handles {
        let s = h
            .join()
            .map_err(|e| anyhow::anyhow!("executor failed: {e}"))?;
        total.merge(&s);
    }
    Ok(total)
}

/// A connection ramp: `n` connections at `rate` per second in total, subscribed to `topic`.
pub struct Ramp<'a> {
    /// Connections (over all threads).
    pub n: usize,
    /// Connections per second (over all threads).
    pub rate: f64,
    /// Topic for the subscribe frame.
    pub topic: &'a str,
    /// `(this thread, threads)`.
    pub thread: (usize, usize),
    /// Rooms of this many members: connection `i` uses topic `<topic>:<i / size>`.
    pub room_size: Option<usize>,
    /// Topics spread round-robin: with more than one, connection `i` uses `<topic>:<i mod N>`.
    pub topics: usize,
    /// Index of the first connection (customer `c-<first>`): processes of one run take
    /// disjoint ranges.
    pub first: usize,
}

/// Opens this thread's share (`i % threads == t`) of the ramp's connections, calling `on_open`
/// with each; returns when all are attempted.
pub async fn ramp(
    target: &Target,
    shared: &Shared,
    stats: &Rc<RefCell<ThreadStats>>,
    plan: Ramp<'_>,
    mut on_open: impl FnMut(usize, Client),
) {
    let Ramp {
        n,
        rate,
        topic,
        thread: (t, threads),
        room_size,
        topics,
        first,
    } = plan;
    let per_thread_rate = (rate / threads as f64).max(1.0);
    let start = Instant::now();
    let mine: Vec<usize> = (t..n).step_by(threads).map(|i| first + i).collect();
    // Handshakes in flight per thread: enough to hide round trips, bounded so a slow server
    // is not buried under SYNs.
    let window = 64;
    let mut pending: Vec<glommio::task::JoinHandle<(usize, anyhow::Result<Client>)>> = Vec::new();
    for (k, &i) in mine.iter().enumerate() {
        let due = start + Duration::from_secs_f64(k as f64 / per_thread_rate);
        let now = Instant::now();
        if due > now {
            glommio::timer::sleep(due - now).await;
        }
        let target = target.clone();
        let stats = stats.clone();
        let topic = match room_size {
            Some(k) => format!("{topic}:{}", i / k.max(1)),
            None if topics > 1 => format!("{topic}:{}", i % topics),
            None => topic.to_owned(),
        };
        pending.push(
            glommio::spawn_local(async move { (i, target.open(i, &topic, &stats).await) }).detach(),
        );
        if pending.len() >= window {
            for h in pending.drain(..) {
                collect(h.await, shared, &mut on_open);
            }
        }
    }
    for h in pending.drain(..) {
        collect(h.await, shared, &mut on_open);
    }
}

fn collect(
    result: Option<(usize, anyhow::Result<Client>)>,
    shared: &Shared,
    on_open: &mut impl FnMut(usize, Client),
) {
    match result {
        Some((i, Ok(client))) => {
            shared.connected.fetch_add(1, Relaxed);
            on_open(i, client);
        }
        Some((i, Err(e))) => {
            if shared.connect_errors.fetch_add(1, Relaxed) < 5 {
                eprintln!("connection {i}: {e:#}");
            }
        }
        None => {
            shared.connect_errors.fetch_add(1, Relaxed);
        }
    }
}
