//! Cluster mode's bus: the node's one connection to NATS (`broker.kind = "nats"`).
//!
//! async-nats needs tokio, and the shards run glommio, so the client lives on one dedicated
//! thread (`ringcast-bus`, a tokio current-thread runtime) off the shard cores. Shards send it
//! [`BusCmd`]s over one channel and get [`BusIn`]s back over one channel each; the HTTP
//! handlers see its state through [`BusState`]'s atomics.
//!
//! What it does:
//! - keeps the NATS connection (reconnecting on its own; `/readyz` answers 503 while it is
//!   down), sends this node's heartbeat every `nats.heartbeat_ms` on `<prefix>.node.hb` and
//!   keeps the table of live nodes (a node not heard from for `nats.node_timeout_ms` is gone,
//!   one that says `Leaving` is gone at once);
//! - keeps the JetStream history stream (`<PREFIX>_H`, subjects `<prefix>.h.<topic>`): every
//!   topic event is written there once, and the stream numbers it (the topic offset) and
//!   republishes it on `<prefix>.t.<topic>`, to which each node serving the topic holds one
//!   subscription (`Watch`, asked by the topic's owner shard);
//! - reads the stream back for recovery and to fill gaps (batch Direct Get, no consumers);
//! - keeps the queue stream (`<PREFIX>_Q`, subjects `<prefix>.q.<customer>`): customers'
//!   stored events, read back by a connection's resume, deleted by acks;
//! - keeps this node's inbox (`<prefix>.n.<node>`: customer events and direct-message
//!   requests for customers connected here) and the presence table (which customers each
//!   node has, `<prefix>.presence`), and passes `<prefix>.all` (roles, broadcast, disconnects,
//!   receipts) to the shards.
//!
//! Every message is a versioned `proto::bus::NodeMsg`; one of another wire-format version, or
//! one that fails validation, is counted and dropped.

use std::{
    collections::{HashMap, HashSet},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
        Arc, Mutex, OnceLock, RwLock,
    },
    time::{Duration, Instant},
};

use async_nats::{jetstream, HeaderMap};
use futures_lite::StreamExt as _;
use proto::bus::{decode_node, encode_node, subject_token, NodeError, NodeMsg};
use tokio::sync::{mpsc, oneshot};

use crate::{
    config::Config,
    shard::relay::{Fetched, Live},
};

/// Presence statuses chosen on one node: customer -> (status name, unix ms of the choice).
type Statuses = HashMap<String, (String, u64)>;

/// What the bus thread tells the rest of the process.
#[derive(Debug, Default)]
pub struct BusState {
    /// This node's id.
    pub node_id: String,
    /// Connected to a NATS server now.
    pub connected: AtomicBool,
    /// The history stream exists and answered.
    pub stream_ready: AtomicBool,
    /// The history stream's identity (its creation time): the epoch of topic offsets. A
    /// stream deleted and created again numbers from 1 again, under a new epoch.
    pub epoch: OnceLock<String>,
    /// The queue stream's identity: the epoch of customer cursors.
    pub queue_epoch: OnceLock<String>,
    /// Nodes alive, this one included once its own heartbeat has come back through NATS.
    pub nodes: AtomicU64,
    /// Heartbeats sent.
    pub heartbeats_sent: AtomicU64,
    /// Node messages refused: another wire-format version (a rolling deploy).
    pub refused_version: AtomicU64,
    /// Node messages refused: not a ringcast message, or an archive that failed validation.
    pub refused_invalid: AtomicU64,
    /// Topic events JetStream did not take (the API answered 503).
    pub publish_failures: AtomicU64,
    /// Set when the node drains: the next heartbeats say so, then it sends `Leaving`.
    pub draining: AtomicBool,
    /// Topics this node holds a live subscription to.
    pub watched: AtomicU64,
    /// First token of every subject.
    pub prefix: String,
    /// The customers connected to each other live node and their connection counts there
    /// (from their presence messages).
    remote: RwLock<HashMap<String, HashMap<String, u32>>>,
    /// Members of presence topics on each other live node: node -> topic -> customers.
    remote_members: RwLock<HashMap<String, HashMap<String, HashSet<String>>>>,
    /// Presence statuses chosen on each live node, this one included, by customers connected
    /// there: node -> customer -> (status name, unix ms of the choice).
    statuses: RwLock<HashMap<String, Statuses>>,
    /// The customers connected to this node (kept by their owner shards as they come and go).
    here: Mutex<HashSet<String>>,
    /// Commands from the shards.
    cmd: Option<mpsc::UnboundedSender<BusCmd>>,
    /// Each shard's inbound channel, taken by the shard when it starts.
    inbound: Mutex<Vec<Option<mpsc::Receiver<BusIn>>>>,
}

impl BusState {
    /// Hands the bus a command (dropped if the bus thread is gone: cluster mode is off).
    pub fn send(&self, cmd: BusCmd) {
        if let Some(tx) = &self.cmd {
            let _ = tx.send(cmd);
        }
    }

    /// Shard `shard`'s inbound channel (once).
    pub fn take_inbound(&self, shard: usize) -> Option<mpsc::Receiver<BusIn>> {
        self.inbound.lock().ok()?.get_mut(shard)?.take()
    }

    /// The epoch of topic offsets ("" until the history stream has answered).
    pub fn epoch(&self) -> &str {
        self.epoch.get().map_or("", String::as_str)
    }

    /// The epoch of customer cursors ("" until the queue stream has answered).
    pub fn queue_epoch(&self) -> &str {
        self.queue_epoch.get().map_or("", String::as_str)
    }

    /// Whether `customer` has a connection on another live node (as its presence messages
    /// said; a node that stops heartbeating is forgotten with its customers).
    pub fn online_elsewhere(&self, customer: &str) -> bool {
        self.remote
            .read()
            .is_ok_and(|r| r.values().any(|set| set.contains_key(customer)))
    }

    /// The other live nodes where `customer` has connections.
    pub fn nodes_of(&self, customer: &str) -> Vec<String> {
        self.remote.read().map_or_else(
            |_| Vec::new(),
            |r| {
                r.iter()
                    .filter(|(_, set)| set.contains_key(customer))
                    .map(|(node, _)| node.clone())
                    .collect()
            },
        )
    }

    /// The customer's connections on the other live nodes (as of their last presence
    /// message: up to ~100 ms behind).
    pub fn connections_elsewhere(&self, customer: &str) -> usize {
        self.remote.read().map_or(0, |r| {
            r.values()
                .filter_map(|set| set.get(customer))
                .map(|n| *n as usize)
                .sum()
        })
    }

    /// The status `customer` chose last on any live node where it is connected, if it chose
    /// one there (`online` included).
    pub fn latest_status(&self, customer: &str) -> Option<String> {
        let all = self.statuses.read().ok()?;
        all.values()
            .filter_map(|t| t.get(customer))
            .max_by(|a, b| a.1.cmp(&b.1).then_with(|| a.0.cmp(&b.0)))
            .map(|(status, _)| status.clone())
    }

    /// `customer`, connected here, chose `status` at `at` (unix ms): recorded at once, so
    /// that this node's own answers see it, and told to the others by the bus. Called by the
    /// customer's owner shard only, like [`BusState::forget_status`].
    pub fn choose_status(&self, customer: &str, status: &str, at: u64) {
        if let Ok(mut all) = self.statuses.write() {
            all.entry(self.node_id.clone())
                .or_default()
                .insert(customer.to_owned(), (status.to_owned(), at));
        }
        self.send(BusCmd::Status {
            customer: customer.to_owned(),
            status: status.to_owned(),
            at,
        });
    }

    /// `customer` has no connection left here: its status here goes with them.
    pub fn forget_status(&self, customer: &str) {
        if let Ok(mut all) = self.statuses.write() {
            if let Some(t) = all.get_mut(&self.node_id) {
                t.remove(customer);
            }
        }
    }

    /// Forgets the statuses chosen on `node` (gone or left).
    fn forget_statuses(&self, node: &str) {
        if let Ok(mut all) = self.statuses.write() {
            all.remove(node);
        }
    }

    /// The members of a presence topic on the other live nodes.
    pub fn remote_members(&self, topic: &str) -> Vec<String> {
        let mut all: Vec<String> = self.remote_members.read().map_or_else(
            |_| Vec::new(),
            |r| {
                r.values()
                    .filter_map(|t| t.get(topic))
                    .flat_map(|set| set.iter().cloned())
                    .collect()
            },
        );
        all.sort_unstable();
        all.dedup();
        all
    }

    /// Whether `customer` has a connection on this node.
    pub fn online_here(&self, customer: &str) -> bool {
        self.here.lock().is_ok_and(|h| h.contains(customer))
    }

    /// Notes that `customer` now has (`up`) or no longer has connections on this node.
    pub fn set_here(&self, customer: &str, up: bool) {
        if let Ok(mut h) = self.here.lock() {
            if up {
                h.insert(customer.to_owned());
            } else {
                h.remove(customer);
            }
        }
    }

    /// A node's inbox subject: `<prefix>.n.<node>`.
    pub fn inbox(&self, node: &str) -> String {
        format!("{}.n.{node}", self.prefix)
    }

    /// A subject of this cluster: `<prefix>.<kind>[.<id as a token>]`.
    pub fn subject(&self, kind: &str, id: Option<&str>) -> String {
        match id {
            Some(id) => format!("{}.{kind}.{}", self.prefix, subject_token(id)),
            None => format!("{}.{kind}", self.prefix),
        }
    }
}

/// What a shard asks of the bus.
#[derive(Debug)]
pub enum BusCmd {
    /// Write an event to a stream (a topic's history subject, a customer's queue subject);
    /// answers with its sequence once JetStream has it.
    Publish {
        /// The subject (see [`BusState::subject`]).
        subject: String,
        /// The encoded `NodeMsg::TopicEvent` or `NodeMsg::Customer`.
        body: Vec<u8>,
        /// A publisher-chosen id: JetStream drops a repeat within the dedupe window.
        msg_id: Option<String>,
        /// The answer.
        reply: oneshot::Sender<Result<Accepted, Refused>>,
    },
    /// Read a customer's stored events after `after` (at most `max`) from the queue stream.
    FetchQueue {
        /// The customer.
        customer: String,
        /// The last sequence not wanted (0: all).
        after: u64,
        /// At most this many.
        max: usize,
        /// The answer.
        reply: oneshot::Sender<Fetched>,
    },
    /// Remove acknowledged events from a customer's queue: these sequences, and every one up
    /// to `up_to`.
    AckQueue {
        /// The customer.
        customer: String,
        /// Sequences acknowledged one by one.
        seqs: Vec<u64>,
        /// Everything up to this sequence is acknowledged.
        up_to: Option<u64>,
        /// Told when the stream has been asked to remove them all (whatever it answered), so
        /// that an `acked` reply means no other node will read them again.
        done: Option<oneshot::Sender<()>>,
    },
    /// Subscribe to a topic's live subject for shard `shard` (its owner here), then tell it
    /// the stream's position (`BusIn::Synced`).
    Watch {
        /// The topic.
        topic: String,
        /// The owner shard.
        shard: usize,
    },
    /// Drop the subscription.
    Unwatch {
        /// The topic.
        topic: String,
    },
    /// Publish a node message on a core subject (no store, no acknowledgement).
    Core {
        /// The subject (see [`BusState::subject`]).
        subject: String,
        /// The encoded `NodeMsg`.
        body: Vec<u8>,
    },
    /// A request on a core subject; answers with the reply's payload, or None after 5 s or
    /// when nobody listens.
    Request {
        /// The subject.
        subject: String,
        /// The encoded `NodeMsg`.
        body: Vec<u8>,
        /// The answer.
        reply: oneshot::Sender<Option<Vec<u8>>>,
    },
    /// `customer` now has `open` connections on this node: the other nodes are told
    /// (presence: where to route its events, how many it has for its limit).
    Here {
        /// The customer.
        customer: String,
        /// Its connections here.
        open: u32,
    },
    /// `customer`, connected here, chose presence status `status` at `at` (unix ms): the
    /// other nodes are told.
    Status {
        /// The customer.
        customer: String,
        /// The status's wire name.
        status: String,
        /// When it was chosen, unix ms (the latest choice on any node wins).
        at: u64,
    },
    /// `customer` became (`joined`) or stopped being a member of presence topic `topic` on
    /// this node: the other nodes are told.
    Member {
        /// The topic.
        topic: String,
        /// The customer.
        customer: String,
        /// Member now.
        joined: bool,
    },
    /// Read a topic's stored events after `after` (at most `max`) for shard `shard`.
    Fetch {
        /// The topic.
        topic: String,
        /// The asking shard.
        shard: usize,
        /// Echoed in `BusIn::Fetched`.
        id: u64,
        /// The last sequence not wanted.
        after: u64,
        /// At most this many.
        max: usize,
    },
}

/// Why JetStream did not take an event.
#[derive(Debug, Clone)]
pub enum Refused {
    /// The customer's queue holds `delivery.offline_queue` events: the newest is refused.
    Full,
    /// NATS or JetStream could not be reached, or did not answer.
    Unavailable(String),
}

/// JetStream took an event.
#[derive(Debug, Clone, Copy)]
pub struct Accepted {
    /// Its stream sequence: the topic offset.
    pub seq: u64,
    /// A publisher-chosen id seen within the dedupe window: not stored again.
    pub duplicate: bool,
}

/// What the bus hands a shard.
#[derive(Debug)]
pub enum BusIn {
    /// Subscribed to `topic`; every event above `position` will arrive live.
    Synced {
        /// The topic.
        topic: String,
        /// The stream's last sequence after the subscription was in place.
        position: u64,
    },
    /// A topic event from the live subject.
    Live {
        /// The topic.
        topic: String,
        /// The event.
        live: Live,
    },
    /// A node message for the whole node (roles, broadcast, disconnect), from another node.
    Node(NodeMsg),
    /// An ephemeral event of a topic watched here, from another node.
    Ephemeral {
        /// The topic.
        topic: String,
        /// The customer whose connections skip it.
        except: String,
        /// The WebSocket frame and the SSE record.
        frames: (Vec<u8>, Vec<u8>),
    },
    /// A client's message to a customer connected here, from another node, allowed only if
    /// the customer follows one of `topics`; the answer goes to `reply`.
    Direct {
        /// The recipient.
        to: String,
        /// The sender's topics.
        topics: Vec<String>,
        /// The event.
        event: proto::event::Event,
        /// Where to answer.
        reply: String,
    },
    /// Members of presence topics that were on a node now gone (its heartbeats stopped or it
    /// left), for the topic's owner shard here.
    MembersGone {
        /// The topic.
        topic: String,
        /// Its members that were on that node.
        customers: Vec<String>,
    },
    /// An event for a customer connected here: from another node, or from the queue stream
    /// (with its sequence).
    Customer {
        /// The customer.
        customer: String,
        /// The event.
        event: proto::event::Event,
        /// Its sequence in the queue stream (0: not stored, from another node's core publish).
        seq: u64,
    },
    /// A fetch's answer.
    Fetched {
        /// The topic.
        topic: String,
        /// The fetch id.
        id: u64,
        /// What it found.
        fetched: Fetched,
    },
}

/// Starts the bus thread for `shards` shards. Returns at once; the connection comes up (and
/// comes back after a loss) in the background.
pub fn start(config: &Config, node_id: String, shards: usize) -> anyhow::Result<Arc<BusState>> {
    let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
    let (senders, receivers): (Vec<_>, Vec<_>) = (0..shards).map(|_| mpsc::channel(65_536)).unzip();
    let state = Arc::new(BusState {
        node_id,
        prefix: config.nats.prefix.clone(),
        cmd: Some(cmd_tx),
        inbound: Mutex::new(receivers.into_iter().map(Some).collect()),
        ..BusState::default()
    });
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let setup = Setup {
        servers: config.nats.servers.clone(),
        nats: config.nats.clone(),
        max_age: Duration::from_secs(config.history_max_age().max(1)),
        dedupe_window: Duration::from_secs(config.delivery.dedupe_window_secs.max(1)),
        queue_cap: config.delivery.offline_queue.max(1) as i64,
        queue_age: Duration::from_secs(config.delivery.offline_ttl_secs.max(1)),
    };
    let thread_state = state.clone();
    std::thread::Builder::new()
        .name("ringcast-bus".into())
        .spawn(move || runtime.block_on(run(setup, thread_state, cmd_rx, senders)))?;
    Ok(state)
}

/// What the bus thread needs from the configuration.
struct Setup {
    servers: Vec<String>,
    nats: crate::config::Nats,
    max_age: Duration,
    dedupe_window: Duration,
    queue_cap: i64,
    queue_age: Duration,
}

async fn run(
    setup: Setup,
    state: Arc<BusState>,
    mut cmds: mpsc::UnboundedReceiver<BusCmd>,
    shards: Vec<mpsc::Sender<BusIn>>,
) {
    let events = state.clone();
    let options = match authenticated(&setup.nats).await {
        Ok(o) => o,
        Err(e) => {
            tracing::error!(error = %e, "cannot read the NATS credentials; cluster mode is off");
            return;
        }
    };
    let options = options
        .name(format!("ringcast {}", state.node_id))
        .retry_on_initial_connect()
        .event_callback(move |event| {
            let state = events.clone();
            async move {
                match event {
                    async_nats::Event::Connected => {
                        state.connected.store(true, Relaxed);
                        tracing::info!("connected to NATS");
                    }
                    async_nats::Event::Disconnected => {
                        state.connected.store(false, Relaxed);
                        tracing::warn!("lost the NATS connection; reconnecting");
                    }
                    other => tracing::debug!(event = %other, "NATS"),
                }
            }
        });
    let addrs: Vec<async_nats::ServerAddr> = setup
        .servers
        .iter()
        .filter_map(|s| s.parse().ok())
        .collect();
    let client = match options.connect(addrs).await {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot use the NATS servers; cluster mode is off");
            return;
        }
    };
    let prefix = setup.nats.prefix.clone();
    let js = jetstream::new(client.clone());
    let history = Arc::new(tokio::sync::OnceCell::new());
    let queue = Arc::new(tokio::sync::OnceCell::new());
    tokio::spawn(keep_stream(
        js.clone(),
        stream_config(&setup),
        history.clone(),
        state.clone(),
        false,
    ));
    tokio::spawn(keep_stream(
        js.clone(),
        queue_config(&setup),
        queue.clone(),
        state.clone(),
        true,
    ));
    let subject = format!("{prefix}.node.hb");
    let mut heard = match client.subscribe(subject.clone()).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot subscribe to {subject}; cluster mode is off");
            return;
        }
    };
    let all_subject = format!("{prefix}.all");
    let presence_subject = format!("{prefix}.presence");
    let inbox_subject = state.inbox(&state.node_id);
    let (Ok(mut all), Ok(mut presence), Ok(mut inbox)) = (
        client.subscribe(all_subject.clone()).await,
        client.subscribe(presence_subject.clone()).await,
        client.subscribe(inbox_subject.clone()).await,
    ) else {
        tracing::error!(
            "cannot subscribe to {all_subject} and {presence_subject}; cluster mode is off"
        );
        return;
    };
    // Customers connected here with their counts, and the changes not yet told.
    let mut mine: HashMap<String, u32> = HashMap::new();
    let mut changed: HashMap<String, u32> = HashMap::new();
    // Members of presence topics here, and the changes not yet told.
    let mut my_members: HashSet<(String, String)> = HashSet::new();
    let mut member_changes: Vec<(String, String, bool)> = Vec::new();
    // Statuses chosen here not yet told (this node's own are in `state.statuses`).
    let mut status_changes: Vec<(String, String, u64)> = Vec::new();
    let mut presence_tick = tokio::time::interval(Duration::from_millis(100));
    let timeout = Duration::from_millis(setup.nats.node_timeout_ms);
    let mut tick = tokio::time::interval(Duration::from_millis(setup.nats.heartbeat_ms));
    let mut nodes: HashMap<String, Instant> = HashMap::new();
    let mut watches: HashMap<String, tokio::task::AbortHandle> = HashMap::new();
    let mut left = false;
    loop {
        tokio::select! {
            Some(cmd) = cmds.recv() => match cmd {
                BusCmd::Publish { subject, body, msg_id, reply } => {
                    if !state.connected.load(Relaxed) {
                        state.publish_failures.fetch_add(1, Relaxed);
                        let _ = reply.send(Err(Refused::Unavailable("NATS is unreachable".into())));
                        continue;
                    }
                    let mut headers = HeaderMap::new();
                    if let Some(id) = msg_id {
                        headers.insert("Nats-Msg-Id", id.as_str());
                    }
                    // Sent here, in command order; the acknowledgement is awaited apart.
                    match js.publish_with_headers(subject, headers, body.into()).await {
                        Ok(ack) => {
                            let state = state.clone();
                            tokio::spawn(async move {
                                let r = ack
                                    .await
                                    .map(|a| Accepted { seq: a.sequence, duplicate: a.duplicate })
                                    .map_err(|e| {
                                        let e = e.to_string();
                                        if e.contains("per subject") {
                                            Refused::Full
                                        } else {
                                            Refused::Unavailable(e)
                                        }
                                    });
                                if matches!(r, Err(Refused::Unavailable(_))) {
                                    state.publish_failures.fetch_add(1, Relaxed);
                                }
                                let _ = reply.send(r);
                            });
                        }
                        Err(e) => {
                            state.publish_failures.fetch_add(1, Relaxed);
                            let _ = reply.send(Err(Refused::Unavailable(e.to_string())));
                        }
                    }
                }
                BusCmd::Watch { topic, shard } => {
                    let Some(tx) = shards.get(shard).cloned() else { continue };
                    let task = tokio::spawn(watch(
                        client.clone(),
                        history.clone(),
                        prefix.clone(),
                        topic.clone(),
                        tx,
                        state.clone(),
                    ));
                    if let Some(old) = watches.insert(topic, task.abort_handle()) {
                        old.abort();
                    }
                }
                BusCmd::Unwatch { topic } => {
                    if let Some(task) = watches.remove(&topic) {
                        task.abort(); // drops the subscription: NATS gets the UNSUB
                    }
                }
                BusCmd::Core { subject, body } => {
                    let _ = client.publish(subject, body.into()).await;
                }
                BusCmd::Request { subject, body, reply } => {
                    let client = client.clone();
                    tokio::spawn(async move {
                        let answer = tokio::time::timeout(
                            Duration::from_secs(5),
                            client.request(subject, body.into()),
                        )
                        .await;
                        let _ = reply.send(match answer {
                            Ok(Ok(m)) => Some(m.payload.to_vec()),
                            _ => None,
                        });
                    });
                }
                BusCmd::Member { topic, customer, joined } => {
                    let key = (topic, customer);
                    if joined {
                        my_members.insert(key.clone());
                    } else {
                        my_members.remove(&key);
                    }
                    member_changes.push((key.0, key.1, joined));
                }
                BusCmd::Status { customer, status, at } => {
                    status_changes.push((customer, status, at));
                }
                BusCmd::Here { customer, open } => {
                    if open == 0 {
                        mine.remove(&customer);
                        // A status lives as long as the customer's connections here (the
                        // owner shard forgot it already); the count 0 tells the others.
                        status_changes.retain(|(c, _, _)| *c != customer);
                    } else if mine.insert(customer.clone(), open).is_none() {
                        // The others send this customer's events only to the nodes their
                        // table names: an arrival is told at once, not at the next tick, so
                        // an event published meanwhile elsewhere is not lost to the batching.
                        changed.remove(&customer);
                        let msg = NodeMsg::Presence {
                            node: state.node_id.clone(),
                            full: false,
                            ask: false,
                            counts: vec![(customer, open)],
                            members: Vec::new(),
                        };
                        let _ = client.publish(presence_subject.clone(), encode_node(&msg).into()).await;
                        continue;
                    }
                    changed.insert(customer, open);
                }
                BusCmd::Fetch { topic, shard, id, after, max } => {
                    let Some(tx) = shards.get(shard).cloned() else { continue };
                    let (client, history, state) = (client.clone(), history.clone(), state.clone());
                    let subject = format!("{prefix}.h.{}", subject_token(&topic));
                    tokio::spawn(async move {
                        let read = |m: &async_nats::Message| read_event(m, &topic);
                        let fetched = fetch(&client, &history, &subject, after, max, &state, read).await;
                        let _ = tx.send(BusIn::Fetched { topic, id, fetched }).await;
                    });
                }
                BusCmd::FetchQueue { customer, after, max, reply } => {
                    let (client, queue, state) = (client.clone(), queue.clone(), state.clone());
                    let subject = format!("{prefix}.q.{}", subject_token(&customer));
                    tokio::spawn(async move {
                        let read = |m: &async_nats::Message| read_stored(m, &customer);
                        let fetched = fetch(&client, &queue, &subject, after, max, &state, read).await;
                        let _ = reply.send(fetched);
                    });
                }
                BusCmd::AckQueue { customer, seqs, up_to, done } => {
                    let queue = queue.clone();
                    let subject = format!("{prefix}.q.{}", subject_token(&customer));
                    tokio::spawn(async move {
                        let Some(stream) = queue.get() else { return };
                        if let Some(n) = up_to {
                            if let Err(e) = stream.purge().filter(subject).sequence(n + 1).await {
                                tracing::warn!(error = %e, "acknowledging queued events");
                            }
                        }
                        for seq in seqs {
                            // Already gone (acked twice, expired) is fine.
                            let _ = stream.delete_message(seq).await;
                        }
                        if let Some(done) = done {
                            let _ = done.send(());
                        }
                    });
                }
            },
            _ = tick.tick() => {
                let draining = state.draining.load(Relaxed);
                let msg = NodeMsg::Heartbeat { node: state.node_id.clone(), draining };
                if client.publish(subject.clone(), encode_node(&msg).into()).await.is_ok() {
                    state.heartbeats_sent.fetch_add(1, Relaxed);
                }
                nodes.retain(|_, seen| seen.elapsed() < timeout);
                if let Ok(mut remote) = state.remote.write() {
                    remote.retain(|node, _| nodes.contains_key(node));
                }
                if let Ok(mut all) = state.statuses.write() {
                    all.retain(|node, _| *node == state.node_id || nodes.contains_key(node));
                }
                let gone: Vec<String> = state
                    .remote_members
                    .read()
                    .map(|r| r.keys().filter(|n| !nodes.contains_key(*n)).cloned().collect())
                    .unwrap_or_default();
                for node in gone {
                    members_gone(&state, &node, &shards).await;
                }
                state.nodes.store(nodes.len() as u64, Relaxed);
                state.watched.store(watches.len() as u64, Relaxed);
                if draining && !left {
                    // The drain's grace is the load balancer's; the other nodes need not
                    // wait for the timeout to know this one is going.
                    left = true;
                    let bye = NodeMsg::Leaving { node: state.node_id.clone() };
                    let _ = client.publish(subject.clone(), encode_node(&bye).into()).await;
                    let _ = client.flush().await;
                }
            }
            Some(message) = heard.next() => {
                match decode_node(&message.payload) {
                    Ok(NodeMsg::Heartbeat { node, .. }) => {
                        let new = nodes.insert(node.clone(), Instant::now()).is_none();
                        if new && node != state.node_id {
                            // A node we did not know (or had forgotten): it learns who is
                            // connected here from the whole set.
                            tell_presence(&client, &presence_subject, &state, &mine, &my_members, true).await;
                        }
                    }
                    Ok(NodeMsg::Leaving { node }) => {
                        nodes.remove(&node);
                        if let Ok(mut remote) = state.remote.write() {
                            remote.remove(&node);
                        }
                        state.forget_statuses(&node);
                        members_gone(&state, &node, &shards).await;
                    }
                    Ok(_) => {} // not on this subject
                    Err(e) => refused(&state, &e),
                }
                state.nodes.store(nodes.len() as u64, Relaxed);
            }
            _ = presence_tick.tick(), if !changed.is_empty() || !member_changes.is_empty() || !status_changes.is_empty() => {
                let msg = NodeMsg::Presence {
                    node: state.node_id.clone(),
                    full: false,
                    ask: false,
                    counts: std::mem::take(&mut changed).into_iter().collect(),
                    members: std::mem::take(&mut member_changes),
                };
                let _ = client.publish(presence_subject.clone(), encode_node(&msg).into()).await;
                if !status_changes.is_empty() {
                    let msg = NodeMsg::Statuses {
                        node: state.node_id.clone(),
                        full: false,
                        statuses: std::mem::take(&mut status_changes),
                    };
                    let _ = client.publish(presence_subject.clone(), encode_node(&msg).into()).await;
                }
            }
            Some(message) = presence.next() => {
                match decode_node(&message.payload) {
                    Ok(NodeMsg::Statuses { node, full, statuses }) if node != state.node_id => {
                        if let Ok(mut all) = state.statuses.write() {
                            let table = all.entry(node).or_default();
                            if full {
                                table.clear();
                            }
                            for (customer, status, at) in statuses {
                                table.insert(customer, (status, at));
                            }
                        }
                    }
                    Ok(NodeMsg::Presence { node, full, ask, counts, members }) if node != state.node_id => {
                        if ask {
                            // A node that (re)started knows nothing of this one: even if it
                            // kept its id and was never forgotten here, it gets the table.
                            tell_presence(&client, &presence_subject, &state, &mine, &my_members, false).await;
                        }
                        // A customer's status there goes with its last connection there.
                        if let Ok(mut all) = state.statuses.write() {
                            if let Some(table) = all.get_mut(&node) {
                                for (customer, n) in &counts {
                                    if *n == 0 {
                                        table.remove(customer);
                                    }
                                }
                            }
                        }
                        if let Ok(mut remote) = state.remote_members.write() {
                            let topics = remote.entry(node.clone()).or_default();
                            if full {
                                topics.clear();
                            }
                            for (topic, customer, joined) in members {
                                let set = topics.entry(topic.clone()).or_default();
                                if joined {
                                    set.insert(customer);
                                } else {
                                    set.remove(&customer);
                                    if set.is_empty() {
                                        topics.remove(&topic);
                                    }
                                }
                            }
                        }
                        if let Ok(mut remote) = state.remote.write() {
                            let table = remote.entry(node).or_default();
                            if full {
                                table.clear();
                            }
                            for (customer, n) in counts {
                                if n == 0 {
                                    table.remove(&customer);
                                } else {
                                    table.insert(customer, n);
                                }
                            }
                        }
                    }
                    Ok(_) => {}
                    Err(e) => refused(&state, &e),
                }
            }
            Some(message) = inbox.next() => {
                if let Some((shard, msg)) = from_inbox(&message, &state, shards.len()) {
                    if let Some(tx) = shards.get(shard) {
                        let _ = tx.send(msg).await;
                    }
                }
            }
            Some(message) = all.next() => {
                match decode_node(&message.payload) {
                    Ok(msg @ (NodeMsg::Fanout { .. } | NodeMsg::Disconnect { .. } | NodeMsg::Receipts { .. })) => {
                        let (NodeMsg::Fanout { origin, .. }
                        | NodeMsg::Disconnect { origin, .. }
                        | NodeMsg::Receipts { origin, .. }) = &msg
                        else {
                            unreachable!()
                        };
                        if *origin != state.node_id {
                            if let Some(tx) = shards.first() {
                                let _ = tx.send(BusIn::Node(msg)).await;
                            }
                        }
                    }
                    Ok(_) => {}
                    Err(e) => refused(&state, &e),
                }
            }
        }
    }
}

/// Connection options with the configured credentials and TLS settings (checked at start).
async fn authenticated(nats: &crate::config::Nats) -> std::io::Result<async_nats::ConnectOptions> {
    let mut o = if !nats.credentials_file.is_empty() {
        async_nats::ConnectOptions::with_credentials_file(&nats.credentials_file).await?
    } else if !nats.token.is_empty() {
        async_nats::ConnectOptions::with_token(nats.token.clone())
    } else if !nats.user.is_empty() {
        async_nats::ConnectOptions::with_user_and_password(nats.user.clone(), nats.password.clone())
    } else {
        async_nats::ConnectOptions::new()
    };
    if nats.tls_required {
        o = o.require_tls(true);
    }
    if !nats.tls_ca_file.is_empty() {
        o = o.add_root_certificates(nats.tls_ca_file.clone().into());
    }
    if !nats.tls_cert_file.is_empty() {
        o = o.add_client_certificate(
            nats.tls_cert_file.clone().into(),
            nats.tls_key_file.clone().into(),
        );
    }
    Ok(o)
}

/// Counts and logs a node message that cannot be read.
fn refused(state: &BusState, e: &NodeError) {
    if let NodeError::UnknownVersion(v) = e {
        state.refused_version.fetch_add(1, Relaxed);
        tracing::warn!(
            version = v,
            "refused a node message of another wire-format version"
        );
    } else {
        state.refused_invalid.fetch_add(1, Relaxed);
        tracing::warn!(error = %e, "refused an invalid node message");
    }
}

/// The history stream: every topic's events under `<prefix>.h.>`, dropped oldest first (by
/// age, the longest any topic keeps, and by bytes), never per subject, so that a stored
/// sequence proves every later event of its topic is still there. Republished to
/// `<prefix>.t.>` for live delivery; read back by Direct Get.
fn stream_config(setup: &Setup) -> jetstream::stream::Config {
    let prefix = &setup.nats.prefix;
    jetstream::stream::Config {
        max_age: setup.max_age,
        discard: jetstream::stream::DiscardPolicy::Old,
        republish: Some(jetstream::stream::Republish {
            source: format!("{prefix}.h.>"),
            destination: format!("{prefix}.t.>"),
            headers_only: false,
        }),
        ..stream_base(setup, stream_name(prefix), format!("{prefix}.h.>"))
    }
}

/// What both streams share: name and subjects, the configured size bound, storage and
/// replicas, Direct Get for reads, and the dedupe window for publisher-chosen ids.
fn stream_base(setup: &Setup, name: String, subject: String) -> jetstream::stream::Config {
    jetstream::stream::Config {
        name,
        subjects: vec![subject],
        max_bytes: setup.nats.history_max_bytes,
        storage: if setup.nats.storage == "memory" {
            jetstream::stream::StorageType::Memory
        } else {
            jetstream::stream::StorageType::File
        },
        num_replicas: setup.nats.replicas,
        allow_direct: true,
        duplicate_window: setup.dedupe_window,
        ..Default::default()
    }
}

/// The queue stream: each customer's stored (persistent) events under `<prefix>.q.<customer>`,
/// at most `delivery.offline_queue` per customer (the newest refused beyond: the publisher
/// is told, nothing already stored is pushed out silently), for `delivery.offline_ttl_secs`.
/// Not republished: the node that stores an event sends it, with its sequence, to the inboxes
/// of the nodes where the customer is connected (one subscription per node, not one per
/// customer).
fn queue_config(setup: &Setup) -> jetstream::stream::Config {
    let prefix = &setup.nats.prefix;
    jetstream::stream::Config {
        max_age: setup.queue_age,
        max_messages_per_subject: setup.queue_cap,
        discard: jetstream::stream::DiscardPolicy::New,
        discard_new_per_subject: true,
        ..stream_base(
            setup,
            format!("{}_Q", prefix.to_uppercase()),
            format!("{prefix}.q.>"),
        )
    }
}

/// The history stream's name: `<PREFIX>_H`.
pub fn stream_name(prefix: &str) -> String {
    format!("{}_H", prefix.to_uppercase())
}

/// Creates the history stream (or finds it), retrying until JetStream answers; sets the epoch.
async fn keep_stream(
    js: jetstream::Context,
    config: jetstream::stream::Config,
    cell: Arc<tokio::sync::OnceCell<jetstream::stream::Stream>>,
    state: Arc<BusState>,
    queue: bool,
) {
    loop {
        match js.get_or_create_stream(config.clone()).await {
            Ok(mut stream) => {
                let created = match stream.info().await {
                    Ok(info) => info.created.unix_timestamp_nanos(),
                    Err(e) => {
                        tracing::warn!(error = %e, "history stream info");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        continue;
                    }
                };
                let _ = cell.set(stream);
                if queue {
                    let _ = state.queue_epoch.set(format!("jq{created:x}"));
                } else {
                    let _ = state.epoch.set(format!("js{created:x}"));
                    state.stream_ready.store(true, Relaxed);
                }
                tracing::info!(stream = %config.name, "history stream ready");
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, stream = %config.name, "cannot create the history stream yet");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

/// The history stream once it exists.
async fn history_stream(
    cell: &tokio::sync::OnceCell<jetstream::stream::Stream>,
) -> jetstream::stream::Stream {
    loop {
        if let Some(s) = cell.get() {
            return s.clone();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Holds this node's subscription to a topic's live subject and passes its events to the
/// owner shard, after telling it the position the subscription starts above.
async fn watch(
    client: async_nats::Client,
    history: Arc<tokio::sync::OnceCell<jetstream::stream::Stream>>,
    prefix: String,
    topic: String,
    tx: mpsc::Sender<BusIn>,
    state: Arc<BusState>,
) {
    let subject = format!("{prefix}.t.{}", subject_token(&topic));
    let mut sub = loop {
        match client.subscribe(subject.clone()).await {
            Ok(s) => break s,
            Err(e) => {
                tracing::warn!(error = %e, %subject, "subscribe");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    };
    // Read after the subscription is in place (the flush's PONG comes after the server has
    // it): every event stored after this position is republished to us.
    let stream = history_stream(&history).await;
    let position = loop {
        if client.flush().await.is_ok() {
            if let Ok(info) = stream.get_info().await {
                break info.state.last_sequence;
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let synced = BusIn::Synced {
        topic: topic.clone(),
        position,
    };
    if tx.send(synced).await.is_err() {
        return;
    }
    while let Some(m) = sub.next().await {
        if m.headers
            .as_ref()
            .and_then(|h| h.get("Nats-Sequence"))
            .is_none()
        {
            // Not from the stream: an ephemeral event another node sent.
            match decode_node(&m.payload) {
                Ok(NodeMsg::Ephemeral {
                    origin,
                    topic: t,
                    except,
                    ws,
                    sse,
                }) if t == topic => {
                    if origin != state.node_id {
                        let msg = BusIn::Ephemeral {
                            topic: t,
                            except,
                            frames: (ws, sse),
                        };
                        if tx.send(msg).await.is_err() {
                            return;
                        }
                    }
                }
                Ok(_) => refused(
                    &state,
                    &NodeError::Invalid("not an event of this topic".into()),
                ),
                Err(e) => refused(&state, &e),
            }
            continue;
        }
        match read_event(&m, &topic) {
            Ok(live) => {
                let live = BusIn::Live {
                    topic: topic.clone(),
                    live,
                };
                if tx.send(live).await.is_err() {
                    return;
                }
            }
            Err(e) => refused(&state, &e),
        }
    }
}

/// Reads a stored or republished topic event: sequence, previous sequence of the topic,
/// store time, and the `NodeMsg::TopicEvent` body (of this very topic).
fn read_event(m: &async_nats::Message, topic: &str) -> Result<Live, NodeError> {
    read_stream_message(m, |msg| match msg {
        NodeMsg::TopicEvent { topic: t, event } if t == topic => Some(event),
        _ => None,
    })
}

/// Reads a stored customer event (queue stream) of `customer`.
fn read_stored(m: &async_nats::Message, customer: &str) -> Result<Live, NodeError> {
    read_stream_message(m, |msg| match msg {
        NodeMsg::Customer {
            customer: c, event, ..
        } if c == customer => Some(event),
        _ => None,
    })
}

/// A stream message's sequence, previous sequence of its subject, store time, and the event
/// `pick` takes from its body.
fn read_stream_message(
    m: &async_nats::Message,
    pick: impl FnOnce(NodeMsg) -> Option<proto::event::Event>,
) -> Result<Live, NodeError> {
    let header = |name: &str| {
        m.headers
            .as_ref()
            .and_then(|h| h.get(name))
            .map(|v| v.as_str().to_owned())
    };
    let number = |name: &str| header(name).and_then(|v| v.parse::<u64>().ok());
    let seq = number("Nats-Sequence")
        .ok_or_else(|| NodeError::Invalid("no Nats-Sequence header".into()))?;
    let prev = number("Nats-Last-Sequence").unwrap_or(0);
    let stored = header("Nats-Time-Stamp")
        .and_then(|t| humantime::parse_rfc3339(&t).ok())
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs());
    match pick(decode_node(&m.payload)?) {
        Some(event) => Ok(Live {
            seq,
            prev,
            stored,
            event,
        }),
        None => Err(NodeError::Invalid("not an event of this subject".into())),
    }
}

/// Reads a topic's stored events after `after` (at most `max`) with one batch Direct Get,
/// and whether nothing after `after` has been dropped from the stream.
async fn fetch(
    client: &async_nats::Client,
    history: &tokio::sync::OnceCell<jetstream::stream::Stream>,
    subject: &str,
    after: u64,
    max: usize,
    state: &BusState,
    read: impl Fn(&async_nats::Message) -> Result<Live, NodeError>,
) -> Fetched {
    let stream = history_stream(history).await;
    let run = async {
        let info = stream.get_info().await.map_err(|e| e.to_string())?;
        let inbox = client.new_inbox();
        let mut replies = client
            .subscribe(inbox.clone())
            .await
            .map_err(|e| e.to_string())?;
        let request = serde_json::json!({
            "seq": after + 1,
            "batch": max,
            "next_by_subj": subject,
        });
        client
            .publish_with_reply(
                format!("$JS.API.DIRECT.GET.{}", info.config.name),
                inbox,
                request.to_string().into(),
            )
            .await
            .map_err(|e| e.to_string())?;
        let mut fetched = Fetched {
            complete: info.state.first_sequence <= after + 1,
            events: Vec::new(),
            whole: true,
        };
        let mut prev = after;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while fetched.events.len() < max {
            let m = match tokio::time::timeout_at(deadline, replies.next()).await {
                Ok(Some(m)) => m,
                _ => return Err("the batch read did not finish".to_owned()),
            };
            if m.status.is_some() {
                break; // 204 end of batch, 404 nothing stored after `after`
            }
            match read(&m) {
                Ok(mut live) => {
                    live.prev = prev;
                    prev = live.seq;
                    fetched.events.push(live);
                }
                Err(e) => {
                    // Unreadable (another wire version): the replay cannot be whole.
                    refused(state, &e);
                    fetched.complete = false;
                    fetched.whole = false;
                }
            }
        }
        Ok::<_, String>(fetched)
    };
    match run.await {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!(error = %e, subject, "reading a stream");
            Fetched::default()
        }
    }
}

/// Publishes the whole table of customers connected here and of presence-topic members,
/// in chunks.
async fn tell_presence(
    client: &async_nats::Client,
    subject: &str,
    state: &BusState,
    mine: &HashMap<String, u32>,
    members: &HashSet<(String, String)>,
    ask: bool,
) {
    let node = &state.node_id;
    let counts: Vec<(String, u32)> = mine.iter().map(|(c, n)| (c.clone(), *n)).collect();
    let members: Vec<(String, String, bool)> = members
        .iter()
        .map(|(t, c)| (t.clone(), c.clone(), true))
        .collect();
    let statuses: Vec<(String, String, u64)> = state
        .statuses
        .read()
        .ok()
        .and_then(|all| {
            all.get(node).map(|t| {
                t.iter()
                    .map(|(c, (s, at))| (c.clone(), s.clone(), *at))
                    .collect()
            })
        })
        .unwrap_or_default();
    let chunks = counts.len().max(members.len()).div_ceil(2000).max(1);
    for i in 0..chunks {
        let range = |len: usize| (i * 2000).min(len)..((i + 1) * 2000).min(len);
        let msg = NodeMsg::Presence {
            node: node.to_owned(),
            full: i == 0,
            ask: ask && i == 0,
            counts: counts[range(counts.len())].to_vec(),
            members: members[range(members.len())].to_vec(),
        };
        let _ = client
            .publish(subject.to_owned(), encode_node(&msg).into())
            .await;
    }
    // After the counts (the same subject keeps the order): the statuses chosen here. At least
    // one message, since the first (`full`) also clears what the others knew of this node.
    let mut chunks: Vec<&[(String, String, u64)]> = statuses.chunks(2000).collect();
    if chunks.is_empty() {
        chunks.push(&[]);
    }
    for (i, chunk) in chunks.into_iter().enumerate() {
        let msg = NodeMsg::Statuses {
            node: node.to_owned(),
            full: i == 0,
            statuses: chunk.to_vec(),
        };
        let _ = client
            .publish(subject.to_owned(), encode_node(&msg).into())
            .await;
    }
}

/// A node is gone: forgets the members it had and tells each topic's owner shard here which
/// ones left with it.
async fn members_gone(state: &BusState, node: &str, shards: &[mpsc::Sender<BusIn>]) {
    let Some(topics) = state
        .remote_members
        .write()
        .ok()
        .and_then(|mut r| r.remove(node))
    else {
        return;
    };
    for (topic, customers) in topics {
        let owner = proto::placement::topic_shard(&topic, shards.len().max(1));
        if let Some(tx) = shards.get(owner) {
            let msg = BusIn::MembersGone {
                topic,
                customers: customers.into_iter().collect(),
            };
            let _ = tx.send(msg).await;
        }
    }
}

/// What arrived in this node's inbox, for the owner shard of the customer it is about: an
/// event for a customer connected here, or a direct message to check and deliver (a request).
fn from_inbox(m: &async_nats::Message, state: &BusState, shards: usize) -> Option<(usize, BusIn)> {
    let owner = |c: &str| proto::placement::owner_shard(c, shards.max(1));
    match decode_node(&m.payload) {
        Ok(NodeMsg::Customer {
            customer,
            event,
            seq,
            ..
        }) => Some((
            owner(&customer),
            BusIn::Customer {
                customer,
                event,
                seq,
            },
        )),
        Ok(NodeMsg::Direct { to, topics, event }) => {
            let reply = m.reply.as_ref()?.to_string();
            Some((
                owner(&to),
                BusIn::Direct {
                    to,
                    topics,
                    event,
                    reply,
                },
            ))
        }
        Ok(_) => {
            refused(state, &NodeError::Invalid("not an inbox message".into()));
            None
        }
        Err(e) => {
            refused(state, &e);
            None
        }
    }
}
