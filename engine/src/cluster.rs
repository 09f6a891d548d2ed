//! Cluster mode's bus: the node's one connection to NATS (`broker.kind = "nats"`).
//!
//! async-nats needs tokio, and the shards run glommio, so the client lives on one dedicated
//! thread (`ringcast-bus`, a tokio current-thread runtime) off the shard cores; shards and
//! the HTTP handlers see its state through [`BusState`]'s atomics.
//!
//! What it does so far: it keeps the NATS connection (reconnecting on its own, `/readyz`
//! answers 503 while it is down), sends this node's heartbeat every `nats.heartbeat_ms` on
//! `<prefix>.node.hb`, and keeps the table of live nodes from everyone's heartbeats: a node
//! not heard from for `nats.node_timeout_ms` is gone, one that says `Leaving` is gone at once.
//! Every message is a versioned `proto::bus::NodeMsg`; one of another wire-format version, or
//! one that fails validation, is counted and dropped. Routing events between nodes is not
//! done yet: a `nats` node delivers to its own clients only.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
        Arc,
    },
    time::{Duration, Instant},
};

use futures_lite::StreamExt as _;
use proto::bus::{decode_node, encode_node, NodeError, NodeMsg};

use crate::config::Config;

/// What the bus thread tells the rest of the process.
#[derive(Debug, Default)]
pub struct BusState {
    /// This node's id.
    pub node_id: String,
    /// Connected to a NATS server now.
    pub connected: AtomicBool,
    /// Nodes alive, this one included once its own heartbeat has come back through NATS.
    pub nodes: AtomicU64,
    /// Heartbeats sent.
    pub heartbeats_sent: AtomicU64,
    /// Node messages refused: another wire-format version (a rolling deploy).
    pub refused_version: AtomicU64,
    /// Node messages refused: not a ringcast message, or an archive that failed validation.
    pub refused_invalid: AtomicU64,
    /// Set when the node drains: the next heartbeats say so, then it sends `Leaving`.
    pub draining: AtomicBool,
}

/// Starts the bus thread. Returns at once; the connection comes up (and comes back after a
/// loss) in the background.
pub fn start(config: &Config, node_id: String) -> anyhow::Result<Arc<BusState>> {
    let state = Arc::new(BusState {
        node_id,
        ..BusState::default()
    });
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (servers, nats) = (config.nats.servers.clone(), config.nats.clone());
    let thread_state = state.clone();
    std::thread::Builder::new()
        .name("ringcast-bus".into())
        .spawn(move || runtime.block_on(run(servers, nats, thread_state)))?;
    Ok(state)
}

async fn run(servers: Vec<String>, nats: crate::config::Nats, state: Arc<BusState>) {
    let events = state.clone();
    let options = async_nats::ConnectOptions::new()
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
    let addrs: Vec<async_nats::ServerAddr> =
        servers.iter().filter_map(|s| s.parse().ok()).collect();
    let client = match options.connect(addrs).await {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot use the NATS servers; cluster mode is off");
            return;
        }
    };
    let subject = format!("{}.node.hb", nats.prefix);
    let mut heard = match client.subscribe(subject.clone()).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot subscribe to {subject}; cluster mode is off");
            return;
        }
    };
    let timeout = Duration::from_millis(nats.node_timeout_ms);
    let mut tick = tokio::time::interval(Duration::from_millis(nats.heartbeat_ms));
    let mut nodes: HashMap<String, Instant> = HashMap::new();
    let mut left = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let draining = state.draining.load(Relaxed);
                let msg = NodeMsg::Heartbeat { node: state.node_id.clone(), draining };
                if client.publish(subject.clone(), encode_node(&msg).into()).await.is_ok() {
                    state.heartbeats_sent.fetch_add(1, Relaxed);
                }
                nodes.retain(|_, seen| seen.elapsed() < timeout);
                state.nodes.store(nodes.len() as u64, Relaxed);
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
                        nodes.insert(node, Instant::now());
                    }
                    Ok(NodeMsg::Leaving { node }) => {
                        nodes.remove(&node);
                    }
                    Ok(NodeMsg::Shard(_)) => {} // not routed between nodes yet
                    Err(NodeError::UnknownVersion(v)) => {
                        state.refused_version.fetch_add(1, Relaxed);
                        tracing::warn!(version = v, "refused a node message of another wire-format version");
                    }
                    Err(e) => {
                        state.refused_invalid.fetch_add(1, Relaxed);
                        tracing::warn!(error = %e, "refused an invalid node message");
                    }
                }
                state.nodes.store(nodes.len() as u64, Relaxed);
            }
        }
    }
}
