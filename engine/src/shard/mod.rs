//! Shards: one pinned glommio executor per core, each with its own listener, connections,
//! topics and timer wheel. Shards share nothing mutable but metrics atomics; they talk through
//! the mesh (`mesh`).
//!
//! Entry point: [`start`] spawns the shards and returns a [`Server`] handle; each shard runs
//! `Shard::run` (accept loop, mesh receivers, fan-out task, flusher, ticker).

pub mod broker;
pub mod chat;
pub mod conn_state;
mod countdown;
pub(crate) mod dormant;
mod fanout;
mod gather;
mod local_topics;
mod mesh;
pub mod notify;
pub mod park;
pub mod prefs;
pub mod presence;
mod registry;
mod route;
#[cfg(test)]
mod sim;
#[cfg(test)]
mod sim_acks;
#[cfg(test)]
mod sim_presence;
pub use route::Joined;
pub(crate) mod relay;
pub mod slab;
pub mod streams;
mod topic_owner;
mod wheel;

use std::{
    cell::{Cell, RefCell},
    net::SocketAddr,
    rc::Rc,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed},
        Arc,
    },
    time::{Duration, Instant, SystemTime},
};

use ahash::AHashMap;
use anyhow::Context as _;
use bytes::Bytes;
use glommio::{
    channels::channel_mesh::MeshBuilder, net::TcpListener, LocalExecutorBuilder, Placement,
};
use proto::auth::{KeyConfig, Verifier};

use crate::io::SendRing;
use crate::{config::Config, metrics::ShardMetrics};
use conn_state::{Conn, Flush, OutFrame, Queued, Written};

/// Connections written per [`SendRing`] submission in a flush round.
const SEND_CHUNK: usize = 256;
/// The longest a publish is held for a shard's fan-out to catch up before it is refused with
/// 503 (see [`Shard::room_to_publish`]).
const PUBLISH_HOLD: Duration = Duration::from_secs(5);
use fanout::FanoutQueue;
pub use mesh::Envelope;
use mesh::Mesh;
use notify::Notify;
pub use route::{DeliverJob, Job, Outcome, Payload};
use slab::{ConnKey, Slab};
use streams::{Dedupe, Poller, Streams};
use wheel::Wheel;

/// State shared by all shards: immutable configuration, metrics atomics, lifecycle flags.
pub struct Shared {
    /// Configuration.
    pub config: Config,
    /// Token verifier (algorithm pinned from configuration).
    pub verifier: Verifier,
    /// One metrics block per shard.
    pub metrics: Vec<ShardMetrics>,
    /// Number of shards.
    pub n_shards: usize,
    /// `/readyz` answers 503 and shards drain their connections.
    pub draining: AtomicBool,
    /// Shards still running.
    pub running: AtomicUsize,
    /// History epoch of this process: topics restart from offset 0 with a new epoch.
    pub epoch: String,
    /// Process start.
    pub started: Instant,
    /// The address the listeners are bound to.
    pub listen: SocketAddr,
    /// Connection attempts per client address (all shards).
    pub attempts: crate::limits::AttemptTable,
    /// Sockets still sending their request head (all shards, and per client address).
    pub heads: crate::limits::HeadTable,
    /// `server.trusted_proxies`, parsed.
    pub trusted: Vec<proto::proxy::IpNet>,
    /// `limits.exempt_ips`, parsed.
    pub exempt: Vec<proto::proxy::IpNet>,
    /// The cluster bus (`broker.kind = "nats"`), none for a single process.
    pub bus: Option<Arc<crate::cluster::BusState>>,
}

impl Shared {
    /// Whether `ip` is a configured proxy (its forwarding headers are believed).
    pub fn is_trusted(&self, ip: std::net::IpAddr) -> bool {
        self.trusted.iter().any(|n| n.contains(ip))
    }

    /// Open client connections over all shards (relaxed: a cap, not an invariant).
    pub fn open_connections(&self) -> i64 {
        self.metrics
            .iter()
            .map(|m| m.connections.load(Relaxed))
            .sum()
    }

    /// Counts a refusal by `limit` and writes its audit line.
    pub fn refuse(
        &self,
        shard: usize,
        limit: crate::limits::Limit,
        ip: Option<std::net::IpAddr>,
        customer: Option<&str>,
    ) {
        self.metrics[shard].limit_refusals[limit.index()].fetch_add(1, Relaxed);
        crate::limits::audit(limit.label(), ip, customer, "refused by a protection limit");
    }

    /// Seconds since the Unix epoch (token expiry checks).
    pub fn unix_now(&self) -> u64 {
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    }
}

/// A frame shared by many receivers.
pub type Frame = Bytes;

/// Local subscribers of a topic. Copy-on-write so a fan-out can iterate a snapshot across
/// yields while connections come and go.
pub type Subscribers = Rc<Vec<ConnKey>>;

/// One shard's state. Lives in an `Rc` on its executor; never crosses threads.
pub struct Shard {
    /// This shard's index (its mesh peer id).
    pub id: usize,
    /// Shared state.
    pub shared: Arc<Shared>,
    /// Connections.
    pub conns: RefCell<Slab>,
    /// Connections by customer (all on this shard, its owner) and by role.
    pub registry: RefCell<registry::Registry>,
    /// Topic -> local subscribers, and subscriptions waiting for their owner.
    local: RefCell<local_topics::LocalTopics<futures_channel::oneshot::Sender<Joined>>>,
    /// How events reach the shards (and nodes) that serve their receivers: every routing
    /// decision goes through it.
    pub broker: broker::Broker,
    /// Connections with queued frames awaiting the next flush round.
    dirty: RefCell<Vec<ConnKey>>,
    /// Batched socket writes for flush rounds.
    sends: RefCell<SendRing>,
    /// Frames for connections that are joining topics, held until their
    /// `subscription_confirmed` is queued (see [`Shard::hold`]).
    held: RefCell<AHashMap<ConnKey, Held>>,
    /// The shard's one read buffer: every connection reads into it and keeps only the bytes
    /// of an incomplete frame, so an idle connection holds no buffer.
    pub scratch: RefCell<Box<[u8]>>,
    /// Transport to the other shards.
    mesh: Mesh,
    /// Publishes (and disconnects, direct messages) awaiting delivery reports.
    reports: RefCell<gather::Gather<route::Outcome>>,
    /// Stored events of customers owned here, and the offset counter of their streams.
    pub streams: RefCell<Streams>,
    /// Parked long polls, by customer.
    pub pollers: RefCell<AHashMap<Rc<str>, Vec<Rc<Poller>>>>,
    /// Publisher-chosen ids seen recently (customer, role and broadcast targets; the topic
    /// owner keeps its own).
    dedupe: RefCell<Dedupe>,
    next_req: Cell<u64>,
    next_conn: Cell<u64>,
    /// Deliveries in arrival order (keeps per-topic order), run by the fan-out task.
    fanout: RefCell<FanoutQueue<Job>>,
    deliver_notify: Notify,
    /// The fan-out task asks to pause / may go on (see [`Shard::pause_if_needed`]).
    pause: Notify,
    resume: Notify,
    /// Heartbeats, idle and close timeouts.
    wheel: RefCell<Wheel>,
    /// Seconds since the shard started, advanced by the ticker.
    pub clock: Cell<u32>,
    /// Woken when the shard starts draining.
    drain_notify: Notify,
    /// The epoll set of parked (quiet) sockets.
    pub parking: park::Parking,
    /// Client-sent events of customers owned here, for receipts.
    sent: RefCell<chat::SentLog>,
    /// Presence of customers owned here.
    pub presence: RefCell<presence::CustomerPresence>,
    /// Members of presence topics owned here.
    members: RefCell<presence::Members>,
    /// Presence topics with a diff to send, and when.
    presence_due: RefCell<Vec<(Rc<str>, Instant)>>,
    /// Delivery preferences of customers owned here (`update_preferences`).
    pub preferences: RefCell<prefs::PrefStore>,
    /// Presence queries awaiting their owner's answer.
    queries: RefCell<gather::Gather<Vec<u8>>>,
    /// Last typing indicator per (connection, topic): state and shard milliseconds.
    typing_seen: RefCell<AHashMap<(ConnKey, u64), (bool, u32)>>,
    /// Full-resolution histograms of this shard (gathered by `/v1/stats/histograms`).
    pub hists: RefCell<Hists>,
    /// Histogram gathers awaiting replies from the shards.
    hist_waiters: RefCell<gather::Gather<Hists>>,
}

/// Frames held for a connection while it joins topics.
#[derive(Default)]
struct Held {
    frames: Vec<conn_state::OutFrame>,
    bytes: usize,
}

/// A shard's HdrHistograms, in microseconds.
#[derive(Clone)]
pub struct Hists {
    /// Publish accepted to frame written to the socket.
    pub publish_to_write: hdrhistogram::Histogram<u64>,
    /// Connection accepted to `101 Switching Protocols` written.
    pub handshake: hdrhistogram::Histogram<u64>,
    /// A publish request's head parsed to its response written.
    pub publish_answer: hdrhistogram::Histogram<u64>,
}

impl Default for Hists {
    fn default() -> Self {
        let h = || {
            hdrhistogram::Histogram::new_with_bounds(1, 3_600_000_000, 3)
                .expect("static bounds are valid")
        };
        Hists {
            publish_to_write: h(),
            handshake: h(),
            publish_answer: h(),
        }
    }
}

impl Shard {
    /// This shard's metrics.
    pub fn metrics(&self) -> &ShardMetrics {
        &self.shared.metrics[self.id]
    }

    /// A new request id, unique on this shard.
    pub fn next_req(&self) -> u64 {
        let r = self.next_req.get() + 1;
        self.next_req.set(r);
        r
    }

    /// A new connection id, unique in this process.
    pub fn next_conn_id(&self) -> String {
        let n = self.next_conn.get() + 1;
        self.next_conn.set(n);
        format!("{}-{}-{n}", self.shared.epoch, self.id)
    }

    /// Registers a connection of `customer` with `roles`; returns its key.
    pub fn register(&self, conn: Conn, roles: &[String]) -> ConnKey {
        let customer = conn.customer.clone();
        let sse = conn.life.is_sse();
        let server = &self.shared.config.server;
        let first_check = match server.park_after_secs {
            0 => server.heartbeat_secs,
            park => park.min(server.heartbeat_secs),
        };
        let key = {
            let mut conns = self.conns.borrow_mut();
            let key = conns.insert(conn);
            let c = conns.get_mut(key).expect("just inserted");
            self.schedule(key, c, self.clock.get() + first_check as u32);
            key
        };
        if !customer.is_empty() {
            let open = self.registry.borrow_mut().add(key, &customer, roles);
            self.customer_connection(&customer, open, true);
        }
        self.metrics().connections.fetch_add(1, Relaxed);
        if sse {
            self.metrics().sse_connections.fetch_add(1, Relaxed);
        }
        key
    }

    /// Forgets a connection (its task is ending).
    pub fn unregister(&self, key: ConnKey, roles: &[String], topics: &[Rc<str>]) {
        let Some(conn) = self.conns.borrow_mut().remove(key) else {
            return;
        };
        self.metrics().connections.fetch_sub(1, Relaxed);
        if conn.parked {
            self.metrics().parked.fetch_sub(1, Relaxed);
        }
        if conn.life.is_sse() {
            self.metrics().sse_connections.fetch_sub(1, Relaxed);
        }
        let held = self
            .held
            .borrow_mut()
            .remove(&key)
            .map_or(0, |h| h.frames.len());
        let dropped = (conn.out.len() + held) as u64;
        self.metrics().drops.fetch_add(dropped, Relaxed);
        for topic in topics {
            self.membership(topic, &conn.customer, false);
        }
        if !conn.customer.is_empty() {
            let open = self
                .registry
                .borrow_mut()
                .remove(key, &conn.customer, roles);
            self.customer_connection(&conn.customer, open, false);
        }
        for topic in topics {
            self.remove_subscriber(topic, key);
        }
    }

    /// Queues a frame on a connection. Returns false when it was not queued: the connection is
    /// gone or closing, or the frame would push its backlog over the limit (which also asks
    /// the connection to close with 4008). While the connection joins topics, the frame is
    /// held until its confirmation is queued (see [`Shard::hold`]).
    pub fn enqueue(
        &self,
        conns: &mut Slab,
        key: ConnKey,
        frame: &Frame,
        published: Option<Instant>,
    ) -> bool {
        self.enqueue_to(conns, key, frame, published, true)
    }

    fn enqueue_to(
        &self,
        conns: &mut Slab,
        key: ConnKey,
        frame: &Frame,
        published: Option<Instant>,
        may_hold: bool,
    ) -> bool {
        let Some(c) = conns.get_mut(key) else {
            return false;
        };
        let m = self.metrics();
        let queued = if may_hold && c.holding {
            let mut held = self.held.borrow_mut();
            let h = held.entry(key).or_default();
            if !c.life.is_open() {
                Queued::Closing
            } else if c.out_bytes as usize + h.bytes + frame.len() > c.max_backlog as usize {
                c.life.close(proto::ws::close::SLOW_CONSUMER);
                Queued::OverBacklog
            } else {
                h.bytes += frame.len();
                h.frames.push(conn_state::OutFrame {
                    bytes: frame.clone(),
                    published,
                });
                Queued::Yes
            }
        } else {
            c.queue(frame, published)
        };
        match queued {
            Queued::Yes => {}
            Queued::Closing => {
                m.drops.fetch_add(1, Relaxed);
                return false;
            }
            Queued::OverBacklog => {
                m.slow_consumer_closes.fetch_add(1, Relaxed);
                m.drops.fetch_add(1, Relaxed);
                c.wake();
                return false;
            }
        }
        m.messages_out.fetch_add(1, Relaxed);
        if published.is_some() {
            m.events_out.fetch_add(1, Relaxed);
        }
        if !c.holding && !c.dirty && !c.write_blocked {
            c.dirty = true;
            self.dirty.borrow_mut().push(key);
        }
        true
    }

    /// Queues a frame for one connection, ahead of any held frames, and flushes it at once
    /// (replies to its own requests, replayed history).
    pub fn send_now(&self, key: ConnKey, frame: &Frame) -> bool {
        let mut conns = self.conns.borrow_mut();
        let queued = self.enqueue_to(&mut conns, key, frame, None, false);
        if let Some(c) = conns.get_mut(key) {
            self.flush_conn(c);
        }
        queued
    }

    /// Holds the frames fanned out to a connection from now until [`Shard::confirm`]: a
    /// connection that joins topics gets their replayed history, then its
    /// `subscription_confirmed`, then the live events, although the topics' owners answer
    /// one by one and each topic goes live as soon as its owner has answered.
    pub fn hold(&self, key: ConnKey) {
        if let Some(c) = self.conns.borrow_mut().get_mut(key) {
            c.holding = true;
        }
    }

    /// Queues a connection's confirmation (or its last reply to a subscribe), then the frames
    /// held since [`Shard::hold`], and flushes.
    pub fn confirm(&self, key: ConnKey, frame: &Frame) {
        self.release(key, std::slice::from_ref(frame));
    }

    /// Queues `first`, then the frames held since [`Shard::hold`], and flushes.
    pub fn release(&self, key: ConnKey, first: &[Frame]) {
        let held = self.held.borrow_mut().remove(&key).unwrap_or_default();
        let mut conns = self.conns.borrow_mut();
        for frame in first {
            self.enqueue_to(&mut conns, key, frame, None, false);
        }
        let Some(c) = conns.get_mut(key) else {
            return;
        };
        c.holding = false;
        for f in held.frames {
            // Counted when they were held; the backlog was checked with them included.
            if c.queue(&f.bytes, f.published) != Queued::Yes {
                self.metrics().drops.fetch_add(1, Relaxed);
            }
        }
        self.flush_conn(c);
    }

    /// Queues a pong without writing it (see [`Conn::queue_pong`]); the caller flushes once
    /// for all the pongs of a read ([`Shard::flush_key`]).
    pub fn queue_pong(&self, key: ConnKey, frame: &Frame) {
        let mut conns = self.conns.borrow_mut();
        if let Some(c) = conns.get_mut(key) {
            if c.queue_pong(frame) == Queued::OverBacklog {
                self.metrics().slow_consumer_closes.fetch_add(1, Relaxed);
                c.wake();
            }
        }
    }

    /// Writes what one connection has queued.
    pub fn flush_key(&self, key: ConnKey) {
        if let Some(c) = self.conns.borrow_mut().get_mut(key) {
            self.flush_conn(c);
        }
    }

    /// Queues a frame that must go out even past the backlog limit (close frames).
    pub fn send_control(&self, key: ConnKey, frame: &Frame) {
        let mut conns = self.conns.borrow_mut();
        if let Some(c) = conns.get_mut(key) {
            c.out.push_back(OutFrame {
                bytes: frame.clone(),
                published: None,
            });
            c.out_bytes += frame.len() as u32;
            self.flush_conn(c);
        }
    }

    /// Flushes one connection unless its task is already waiting for writability. A
    /// connection in the dirty list stays there (and marked) until the next flush round.
    pub fn flush_conn(&self, c: &mut Conn) {
        if c.write_blocked || c.out.is_empty() {
            return;
        }
        let flush = self.writing(|written| c.flush(written));
        Self::after_flush(c, flush);
    }

    /// Runs `f` with the accounting of a write (publish-to-write latencies, then the bytes
    /// written added to the shard's counter).
    pub fn writing<R>(&self, f: impl FnOnce(&mut Written<'_>) -> R) -> R {
        let m = self.metrics();
        let mut hists = self.hists.borrow_mut();
        let mut written = Written {
            bytes: 0,
            latency: &m.latency,
            hdr: Some(&mut hists.publish_to_write),
        };
        let r = f(&mut written);
        m.bytes_out.fetch_add(written.bytes, Relaxed);
        r
    }

    /// What a connection's task must do after a flush.
    fn after_flush(c: &mut Conn, flush: Flush) {
        match flush {
            Flush::Done => {}
            Flush::Blocked => {
                c.write_blocked = true;
                c.wake();
            }
            Flush::Failed => {
                c.life.kill();
                c.wake();
            }
        }
    }

    /// One flush round: every connection that got frames since the last round is written with
    /// one vectored send, all of them through the shard's [`SendRing`] (one system call per
    /// few hundred sockets).
    pub fn flush_dirty(&self) {
        let keys = std::mem::take(&mut *self.dirty.borrow_mut());
        if keys.is_empty() {
            return;
        }
        {
            let mut conns = self.conns.borrow_mut();
            let mut ring = self.sends.borrow_mut();
            for chunk in keys.chunks(SEND_CHUNK) {
                self.flush_batch(&mut conns, chunk, &mut ring);
            }
        }
        self.reuse_dirty(keys);
    }

    /// The fan-out task's flush round: as [`Shard::flush_dirty`], but it lets the rest of the
    /// shard run between chunks when something waits (see [`Shard::pause_if_needed`]), so a
    /// round over thousands of sockets does not hold a publish's answer for its whole length.
    /// A connection flushed before a pause and given frames during it is simply dirty again.
    pub async fn flush_round(&self) {
        let keys = std::mem::take(&mut *self.dirty.borrow_mut());
        for chunk in keys.chunks(SEND_CHUNK) {
            {
                let mut conns = self.conns.borrow_mut();
                let mut ring = self.sends.borrow_mut();
                self.flush_batch(&mut conns, chunk, &mut ring);
            }
            self.pause_if_needed().await;
        }
        self.reuse_dirty(keys);
    }

    /// Gives the dirty list's allocation back for the next round.
    fn reuse_dirty(&self, mut keys: Vec<ConnKey>) {
        let mut dirty = self.dirty.borrow_mut();
        if dirty.is_empty() && keys.capacity() > dirty.capacity() {
            keys.clear();
            *dirty = keys;
        }
    }

    /// How far behind the furthest-behind shard's fan-out is: the age of the oldest accepted
    /// job whose frames are not written yet.
    pub fn fanout_lag(&self) -> Duration {
        let now = self.shared.started.elapsed().as_micros() as u64 + 1;
        let oldest = self
            .shared
            .metrics
            .iter()
            .map(|m| m.fanout_unwritten_since.load(Relaxed))
            .filter(|&since| since != 0)
            .min();
        oldest.map_or(Duration::ZERO, |since| {
            Duration::from_micros(now.saturating_sub(since))
        })
    }

    /// Whether any shard's fan-out is behind: its oldest unwritten job older than
    /// `server.max_fanout_lag_ms`, or more deliveries waiting for its next round than
    /// `server.max_fanout_backlog` (0 turns either off).
    fn fanout_behind(&self) -> bool {
        let server = &self.shared.config.server;
        let lag = Duration::from_millis(server.max_fanout_lag_ms);
        let backlog = server.max_fanout_backlog;
        (!lag.is_zero() && self.fanout_lag() > lag)
            || (backlog != 0
                && self
                    .shared
                    .metrics
                    .iter()
                    .any(|m| m.fanout_waiting.load(Relaxed) > backlog))
    }

    /// Holds a publish while any shard's fan-out is behind (see `fanout_behind`), up to
    /// `PUBLISH_HOLD`. An answer on acceptance would otherwise let publishers that wait for
    /// it outrun delivery and grow the shards' queues without bound; holding the answer slows
    /// them to what the shards deliver, and the backlog bound keeps each round short. False:
    /// still behind, not accepted.
    pub async fn room_to_publish(&self) -> bool {
        if !self.fanout_behind() {
            return true;
        }
        self.metrics().publishes_held.fetch_add(1, Relaxed);
        let until = Instant::now() + PUBLISH_HOLD;
        while Instant::now() < until {
            glommio::timer::sleep(Duration::from_millis(1)).await;
            if !self.fanout_behind() {
                return true;
            }
        }
        false
    }

    /// Called by the fan-out task between chunks of work. When glommio says something waits
    /// (an event on its latency ring: a socket receive such as an API request's first byte,
    /// a message from another shard, or its preemption timer), the task steps aside until
    /// the rest of the shard has run once. The fan-out task runs in a task queue of its own;
    /// a queue that merely yielded would be picked again before the woken tasks (glommio
    /// gives a newly woken queue the lowest running vruntime plus one), so instead it waits
    /// for the resume task, which runs in the shard's main queue ahead of whatever the next
    /// I/O poll wakes there.
    pub async fn pause_if_needed(&self) {
        if glommio::executor().need_preempt() {
            self.pause.notify();
            self.resume.wait().await;
        }
    }

    /// Lets the fan-out task go on after a pause: by the time this task runs, the executor
    /// has polled for I/O and the tasks it woke are queued right behind it.
    async fn resume_task(self: Rc<Self>) {
        loop {
            self.pause.wait().await;
            self.resume.notify();
        }
    }

    /// Writes the connections `keys` with one submission to `ring`.
    fn flush_batch(&self, conns: &mut Slab, keys: &[ConnKey], ring: &mut SendRing) {
        let mut ready = Vec::with_capacity(keys.len());
        for &key in keys {
            if let Some(c) = conns.get_mut(key) {
                c.dirty = false;
                if !c.write_blocked && !c.out.is_empty() {
                    ready.push(key);
                }
            }
        }
        let mut results = Vec::with_capacity(ready.len());
        {
            let mut iov = Vec::with_capacity(ready.len());
            let mut spans = Vec::with_capacity(ready.len());
            for &key in &ready {
                let c = conns.get(key).expect("present above");
                let start = iov.len();
                c.unsent(&mut iov);
                spans.push((c.fd, start..iov.len()));
            }
            let msgs: Vec<_> = spans.into_iter().map(|(fd, r)| (fd, &iov[r])).collect();
            ring.send_each(&msgs, &mut results);
        }
        let now = Instant::now();
        self.writing(|written| {
            for (key, result) in ready.into_iter().zip(results) {
                let c = conns.get_mut(key).expect("present above");
                let flush = c.sent_batched(result, now, written);
                Self::after_flush(c, flush);
            }
        });
    }

    /// Whether the process is draining.
    pub fn draining(&self) -> bool {
        self.shared.draining.load(Relaxed)
    }

    /// Schedules a check of connection `c` at second `at`, unless an earlier one is pending.
    pub fn schedule(&self, key: ConnKey, c: &mut Conn, at: u32) {
        self.wheel.borrow_mut().schedule(key, c, at);
    }
}

/// Handle to running shards.
pub struct Server {
    /// Shared state (flags, metrics, the bound address).
    pub shared: Arc<Shared>,
    handles: Vec<glommio::ExecutorJoinHandle<()>>,
}

impl Server {
    /// Starts draining: `/readyz` turns 503, listeners close, connections get 1001.
    pub fn drain(&self) {
        self.shared.draining.store(true, Relaxed);
        if let Some(bus) = &self.shared.bus {
            bus.draining.store(true, Relaxed);
        }
    }

    /// Waits for every shard to finish.
    pub fn join(self) {
        for h in self.handles {
            let _ = h.join();
        }
    }
}

fn verifier(config: &Config) -> anyhow::Result<Verifier> {
    let key = match config.auth.jwt_algorithm {
        crate::config::JwtAlgorithm::Rs256 => KeyConfig::Rs256 {
            public_pem: std::fs::read(&config.auth.jwt_public_key_file)
                .with_context(|| format!("reading {}", config.auth.jwt_public_key_file))?,
        },
        crate::config::JwtAlgorithm::Hs256 => KeyConfig::Hs256 {
            secret: config.jwt_secret().as_bytes().to_vec(),
        },
    };
    let opt = |s: &str| (!s.is_empty()).then(|| s.to_owned());
    Verifier::new(
        &key,
        opt(&config.auth.issuer).as_deref(),
        opt(&config.auth.audience).as_deref(),
    )
    .map_err(|e| anyhow::anyhow!("{e}"))
}

/// Binds a socket with SO_REUSEPORT to learn the port when `:0` was asked, without listening
/// on it (a listening socket in the group would take a share of the connections).
fn reserve_port(addr: SocketAddr) -> anyhow::Result<(SocketAddr, socket2::Socket)> {
    let domain = if addr.is_ipv4() {
        socket2::Domain::IPV4
    } else {
        socket2::Domain::IPV6
    };
    let sock = socket2::Socket::new(domain, socket2::Type::STREAM, None)?;
    sock.set_reuse_port(true)?;
    sock.set_reuse_address(true)?;
    sock.bind(&addr.into())
        .with_context(|| format!("binding {addr}"))?;
    let local = sock
        .local_addr()?
        .as_socket()
        .context("bound address is not IP")?;
    Ok((local, sock))
}

/// Starts all shards. Returns once every shard is listening.
pub fn start(config: Config) -> anyhow::Result<Server> {
    let n_cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let n_shards = if config.server.shards == 0 {
        n_cpus
    } else {
        config.server.shards
    };
    anyhow::ensure!(
        (1..=256).contains(&n_shards),
        "server.shards must be 1..=256"
    );
    let (listen, reservation) = reserve_port(config.listen_addr()?)?;
    let epoch = format!(
        "{:x}",
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)?
            .as_millis()
    );
    let shared = Arc::new(Shared {
        verifier: verifier(&config)?,
        metrics: (0..n_shards).map(|_| ShardMetrics::default()).collect(),
        n_shards,
        draining: AtomicBool::new(false),
        running: AtomicUsize::new(n_shards),
        epoch,
        started: Instant::now(),
        listen,
        attempts: crate::limits::AttemptTable::default(),
        heads: crate::limits::HeadTable::default(),
        trusted: config.trusted_proxies()?,
        exempt: config.exempt_ips()?,
        bus: match config.broker.kind {
            crate::config::BrokerKind::Local => None,
            crate::config::BrokerKind::Nats => Some(crate::cluster::start(
                &config,
                config.node_id(listen.port()),
                n_shards,
            )?),
        },
        config,
    });
    let mesh_builder =
        MeshBuilder::<Envelope, _>::full(n_shards, shared.config.server.mesh_capacity);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<anyhow::Result<()>>();
    let mut handles = Vec::with_capacity(n_shards);
    for i in 0..n_shards {
        let shared = shared.clone();
        let mesh_builder = mesh_builder.clone();
        let ready_tx = ready_tx.clone();
        let placement = if n_shards <= n_cpus {
            Placement::Fixed(i)
        } else {
            Placement::Unbound
        };
        let builder = LocalExecutorBuilder::new(placement)
            .name(&format!("shard-{i}"))
            .io_memory(shared.config.server.io_memory_kib * 1024)
            .ring_depth(shared.config.server.ring_depth)
            .preempt_timer(Duration::from_millis(10));
        let handle = builder
            .spawn(move || async move {
                let listener = match TcpListener::bind(listen) {
                    Ok(l) => l,
                    Err(e) => {
                        let _ =
                            ready_tx.send(Err(anyhow::anyhow!("shard {i}: binding {listen}: {e}")));
                        shared.running.fetch_sub(1, Relaxed);
                        return;
                    }
                };
                let mesh = match Mesh::join(mesh_builder, n_shards).await {
                    Ok(m) => m,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        shared.running.fetch_sub(1, Relaxed);
                        return;
                    }
                };
                let id = mesh.id();
                let (parking, parked_keys) = match park::Parking::start(id) {
                    Ok(p) => p,
                    Err(e) => {
                        let _ = ready_tx.send(Err(anyhow::anyhow!("shard {id}: parking: {e}")));
                        shared.running.fetch_sub(1, Relaxed);
                        return;
                    }
                };
                let shard = Rc::new(Shard {
                    id,
                    shared: shared.clone(),
                    conns: RefCell::default(),
                    registry: RefCell::default(),
                    local: RefCell::default(),
                    broker: match &shared.bus {
                        None => broker::Broker::Local(broker::local::Local::new(&shared)),
                        Some(bus) => {
                            broker::Broker::Nats(broker::nats::Nats::new(&shared, bus.clone()))
                        }
                    },
                    dirty: RefCell::default(),
                    sends: RefCell::new({
                        let (ring, error) = crate::io::SendRing::new();
                        if let Some(e) = error {
                            tracing::warn!(
                                shard = id,
                                error = %e,
                                "no io_uring for batched writes: one sendmsg per socket write"
                            );
                        }
                        ring
                    }),
                    held: RefCell::default(),
                    scratch: RefCell::new(vec![0u8; 64 * 1024].into_boxed_slice()),
                    mesh,
                    reports: RefCell::default(),
                    streams: RefCell::new(Streams::new(format!("{}.{id}", shared.epoch))),
                    pollers: RefCell::default(),
                    dedupe: RefCell::default(),
                    next_req: Cell::new(0),
                    next_conn: Cell::new(0),
                    fanout: RefCell::new(FanoutQueue::new(Duration::from_micros(
                        shared.config.server.flush_window_us,
                    ))),
                    deliver_notify: Notify::default(),
                    pause: Notify::default(),
                    resume: Notify::default(),
                    wheel: RefCell::new(Wheel::default()),
                    clock: Cell::new(0),
                    drain_notify: Notify::default(),
                    parking,
                    sent: RefCell::new(chat::SentLog::new(shared.config.delivery.receipts_kept)),
                    typing_seen: RefCell::default(),
                    presence: RefCell::default(),
                    members: RefCell::default(),
                    presence_due: RefCell::default(),
                    preferences: RefCell::default(),
                    queries: RefCell::default(),
                    hists: RefCell::default(),
                    hist_waiters: RefCell::default(),
                });
                let _ = ready_tx.send(Ok(()));
                drop(ready_tx);
                shard.run(listener, parked_keys).await;
                shared.running.fetch_sub(1, Relaxed);
            })
            .map_err(|e| anyhow::anyhow!("starting shard {i}: {e}"))?;
        handles.push(handle);
    }
    drop(ready_tx);
    for _ in 0..n_shards {
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                shared.draining.store(true, Relaxed);
                return Err(e);
            }
            Err(_) => anyhow::bail!("a shard exited during start-up"),
        }
    }
    drop(reservation);
    Ok(Server { shared, handles })
}

impl Shard {
    /// Runs the shard until it has drained.
    async fn run(self: Rc<Self>, listener: TcpListener, parked_keys: glommio::net::UnixStream) {
        use glommio::spawn_local;
        self.mesh.spawn_receivers(&self);
        if let Some(mut inbound) = self
            .shared
            .bus
            .as_ref()
            .and_then(|b| b.take_inbound(self.id))
        {
            // What the cluster bus brings for topics this shard owns, in arrival order.
            let shard = self.clone();
            glommio::spawn_local(async move {
                while let Some(msg) = inbound.recv().await {
                    if let Some(cluster) = shard.broker.cluster() {
                        cluster.on_bus(&shard, msg);
                    }
                }
            })
            .detach();
        }
        spawn_local(self.clone().parking_task(parked_keys)).detach();
        // Its own task queue, so that a pause lets the main queue's woken tasks run first.
        let fanout = glommio::executor().create_task_queue(
            glommio::Shares::default(),
            glommio::Latency::NotImportant,
            "fanout",
        );
        glommio::spawn_local_into(self.clone().fanout_task(), fanout)
            .expect("the fan-out queue was just created")
            .detach();
        spawn_local(self.clone().resume_task()).detach();
        spawn_local(self.clone().revive_task()).detach();
        let ticker = spawn_local(self.clone().ticker_task());
        // Returns when the drain's grace period is over; until then every connection is
        // served (a load balancer's `/readyz` probe gets its 503).
        self.clone().accept_loop(listener).await;
        // Let the tasks of the last accepted sockets start, so the wait below sees them.
        futures_lite::future::yield_now().await;
        // Draining: ask every connection to close with 1001 and wait for them (bounded).
        let deadline =
            Instant::now() + Duration::from_secs(self.shared.config.server.drain_timeout_secs);
        for pollers in self.pollers.borrow().values() {
            for p in pollers {
                p.notify.notify();
            }
        }
        self.close_paced(deadline).await;
        while (!self.conns.borrow().is_empty()
            || self.metrics().api_connections.load(Relaxed) > 0
            || self.shared.heads.pending.load(Relaxed) > 0)
            && Instant::now() < deadline
        {
            glommio::timer::sleep(Duration::from_millis(20)).await;
        }
        ticker.cancel().await;
    }

    /// Asks every connection to close with 1001, spread evenly over
    /// `server.drain_spread_secs` (and before `deadline`), so that the clients of a draining
    /// node do not all reconnect to the others at the same instant.
    async fn close_paced(&self, deadline: Instant) {
        let keys: Vec<ConnKey> = {
            let conns = self.conns.borrow();
            (0..conns.capacity())
                .filter_map(|i| conns.key_at(i))
                .collect()
        };
        let spread = Duration::from_secs(self.shared.config.server.drain_spread_secs)
            .min(deadline.saturating_duration_since(Instant::now()) / 2);
        let start = Instant::now();
        let n = keys.len().max(1) as u32;
        for (i, key) in keys.into_iter().enumerate() {
            let due = start + spread * i as u32 / n;
            let wait = due.saturating_duration_since(Instant::now());
            if !wait.is_zero() {
                glommio::timer::sleep(wait).await;
            }
            if let Some(c) = self.conns.borrow_mut().get_mut(key) {
                c.life.close(proto::ws::close::GOING_AWAY);
                c.wake();
            }
        }
    }

    async fn accept_loop(self: Rc<Self>, listener: TcpListener) {
        let mut backoff = Duration::from_millis(5);
        loop {
            let accepted =
                futures_lite::future::or(async { Some(listener.accept().await) }, async {
                    self.drain_notify.wait().await;
                    None
                })
                .await;
            let Some(result) = accepted else { return };
            match result {
                Ok(stream) => {
                    backoff = Duration::from_millis(5);
                    glommio::spawn_local(crate::conn::serve(self.clone(), stream)).detach();
                }
                Err(e) => {
                    // EMFILE/ENFILE/ENOBUFS: back off instead of spinning on a full table.
                    self.metrics().accept_errors.fetch_add(1, Relaxed);
                    tracing::warn!(shard = self.id, error = %e, backoff_ms = backoff.as_millis() as u64, "accept failed");
                    glommio::timer::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
    }

    /// Advances the shard clock, runs the timer wheel and watches for the drain flag.
    async fn ticker_task(self: Rc<Self>) {
        let start = Instant::now();
        let grace = Duration::from_secs(self.shared.config.server.drain_grace_secs);
        let mut drain_seen: Option<Instant> = None;
        let mut drained = false;
        loop {
            glommio::timer::sleep(Duration::from_millis(100)).await;
            if self.draining() && !drained {
                let seen = *drain_seen.get_or_insert_with(Instant::now);
                if seen.elapsed() >= grace {
                    drained = true;
                    self.drain_notify.notify();
                }
            }
            self.flush_presence();
            if let Some(cluster) = self.broker.cluster() {
                cluster.tick(&self);
            }
            let now = start.elapsed().as_secs() as u32;
            while self.clock.get() < now {
                self.clock.set(self.clock.get() + 1);
                self.run_timers(self.clock.get());
                let shrink = self.clock.get().is_multiple_of(10);
                self.broker.sweep(&self, 10_000, shrink);
                if shrink {
                    self.sweep_streams();
                    self.shrink_tables();
                }
                if self.clock.get().is_multiple_of(2) {
                    // After the sweep, so what it freed goes back too; forced every 10 s.
                    crate::io::collect_allocator(shrink);
                }
            }
        }
    }
}
