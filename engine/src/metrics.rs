//! Counters and histograms, one set per shard.
//!
//! Each shard writes only its own [`ShardMetrics`] (relaxed atomics, no contention); `/metrics`
//! and `/v1/stats` read all of them from whichever shard serves the request. This is the one
//! piece of mutable state shared across shards, and it is write-only on the hot path.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};

/// Live heap bytes, maintained by `io::CountingAlloc` when the `alloc-stats` feature
/// installs it as the global allocator; 0 (and absent from `/v1/stats`) otherwise.
pub static HEAP_BYTES: AtomicI64 = AtomicI64::new(0);

/// Reasons a handshake is refused; the label of `ringcast_auth_failures_total`.
pub const AUTH_REASONS: [proto::error::Code; 5] = [
    proto::error::Code::MissingToken,
    proto::error::Code::InvalidToken,
    proto::error::Code::TokenExpired,
    proto::error::Code::WrongIssuerOrAudience,
    proto::error::Code::OriginRefused,
];

/// Upper bounds (microseconds) of the publish-to-write latency buckets.
pub const LATENCY_BOUNDS_US: [u64; 16] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 10_000_000,
];

/// A Prometheus-style cumulative histogram on atomics.
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; LATENCY_BOUNDS_US.len() + 1],
    sum_us: AtomicU64,
}

impl Histogram {
    /// Records one observation.
    pub fn record_us(&self, us: u64) {
        let i = LATENCY_BOUNDS_US
            .iter()
            .position(|&b| us <= b)
            .unwrap_or(LATENCY_BOUNDS_US.len());
        self.buckets[i].fetch_add(1, Relaxed);
        self.sum_us.fetch_add(us, Relaxed);
    }

    /// Records `n` observations of the same value (one flush writing `n` frames).
    pub fn record_us_n(&self, us: u64, n: u64) {
        let i = LATENCY_BOUNDS_US
            .iter()
            .position(|&b| us <= b)
            .unwrap_or(LATENCY_BOUNDS_US.len());
        self.buckets[i].fetch_add(n, Relaxed);
        self.sum_us.fetch_add(us * n, Relaxed);
    }
}

/// One shard's counters.
#[derive(Debug, Default)]
pub struct ShardMetrics {
    /// Open client connections (WebSocket and SSE).
    pub connections: AtomicI64,
    /// Of which SSE streams.
    pub sse_connections: AtomicI64,
    /// Long-poll requests parked.
    pub polls_waiting: AtomicI64,
    /// Connections whose quiet socket is parked in the shard's epoll set.
    pub parked: AtomicI64,
    /// Parked connections without a task (their state saved in the slot).
    pub dormant: AtomicI64,
    /// Persistent events stored for customers with no connection taking them.
    pub events_queued: AtomicU64,
    /// Persistent events dropped unacknowledged: queue full or time to live passed.
    pub stored_lost: AtomicU64,
    /// Non-persistent events for customers with no connection (dropped by design).
    pub offline_dropped: AtomicU64,
    /// Deliveries skipped as repeats of a publisher-chosen id.
    pub duplicates: AtomicU64,
    /// Persistent events acknowledged by clients.
    pub acks: AtomicU64,
    /// Events replayed (stored customer events at connect, topic history at subscribe).
    pub replayed: AtomicU64,
    /// Open backend API connections.
    pub api_connections: AtomicI64,
    /// When the oldest job of this shard's fan-out queue not yet written arrived, in
    /// microseconds since the process started, plus one; 0 while the shard has caught up.
    pub fanout_unwritten_since: AtomicU64,
    /// Deliveries of the jobs waiting in this shard's fan-out queue for a round.
    pub fanout_waiting: AtomicU64,
    /// Publishes the API held because a shard's fan-out was behind.
    pub publishes_held: AtomicU64,
    /// Topics this shard owns (offset, interest, history), as of its last sweep or change.
    pub topics_owned: AtomicI64,
    /// Owned topics forgotten by the sweep (no interest, no history left).
    pub topics_forgotten: AtomicU64,
    /// Cluster mode: events a topic's live subscription did not bring, found by their
    /// sequence chain and fetched from the history stream.
    pub cluster_gaps: AtomicU64,
    /// Completed WebSocket handshakes.
    pub handshakes: AtomicU64,
    /// Refused handshakes by [`AUTH_REASONS`].
    pub auth_failures: [AtomicU64; 5],
    /// Subscriptions refused: the topic had its namespace's `max_subscribers`.
    pub topic_full: AtomicU64,
    /// Ephemeral frames (typing, presence) queued to connections.
    pub ephemeral_out: AtomicU64,
    /// Presence diffs sent to topic members.
    pub presence_diffs: AtomicU64,
    /// Typing indicators dropped by the per-connection throttle.
    pub typing_throttled: AtomicU64,
    /// Delivered/read receipts passed to senders.
    pub receipts: AtomicU64,
    /// Direct messages refused by policy.
    pub direct_forbidden: AtomicU64,
    /// Refusals by protection limit (`limits::LIMIT_LABELS`).
    pub limit_refusals: [AtomicU64; crate::limits::LIMIT_LABELS.len()],
    /// Requests refused before routing (malformed, too large, timeout, wrong upgrade).
    pub bad_requests: AtomicU64,
    /// Connections handed to their owner shard.
    pub handoffs_out: AtomicU64,
    /// Token signatures checked for client connections.
    pub tokens_verified: AtomicU64,
    /// Connections received from other shards.
    pub handoffs_in: AtomicU64,
    /// Client messages received.
    pub messages_in: AtomicU64,
    /// Client bytes received (frames, on WebSocket connections).
    pub bytes_in: AtomicU64,
    /// Frames queued to clients.
    pub messages_out: AtomicU64,
    /// Event frames queued to clients (deliveries; excludes replies, pings and closes).
    pub events_out: AtomicU64,
    /// Bytes written to clients.
    pub bytes_out: AtomicU64,
    /// Frames not delivered (connection closing or over its backlog).
    pub drops: AtomicU64,
    /// Connections closed with 4008.
    pub slow_consumer_closes: AtomicU64,
    /// Events published (API and clients), counted on the shard that accepted them.
    pub publishes: AtomicU64,
    /// Cross-shard messages sent.
    pub mesh_out: AtomicU64,
    /// Accept errors (EMFILE and friends).
    pub accept_errors: AtomicU64,
    /// Publish-to-write latency.
    pub latency: Histogram,
}

fn sum(shards: &[ShardMetrics], f: impl Fn(&ShardMetrics) -> u64) -> u64 {
    shards.iter().map(f).sum()
}

/// Renders all shards' metrics in the Prometheus text format.
pub fn render_prometheus(
    shards: &[ShardMetrics],
    rss: Option<u64>,
    bus: Option<&crate::cluster::BusState>,
) -> String {
    let mut out = String::with_capacity(4096);
    let mut gauge = |name: &str, help: &str, kind: &str| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        name.to_owned()
    };
    let name = gauge(
        "ringcast_connections",
        "Open client connections (WebSocket and SSE) per shard.",
        "gauge",
    );
    let mut lines = String::new();
    for (i, s) in shards.iter().enumerate() {
        let _ = writeln!(
            lines,
            "{name}{{shard=\"{i}\"}} {}",
            s.connections.load(Relaxed)
        );
    }
    out.push_str(&lines);
    type Counter = (&'static str, &'static str, fn(&ShardMetrics) -> u64);
    let counters: [Counter; 35] = [
        ("ringcast_sse_connections", "Open SSE streams.", |s| {
            s.sse_connections.load(Relaxed).max(0) as u64
        }),
        (
            "ringcast_polls_waiting",
            "Long-poll requests parked.",
            |s| s.polls_waiting.load(Relaxed).max(0) as u64,
        ),
        (
            "ringcast_topic_full_total",
            "Subscriptions refused: the topic had its namespace's max_subscribers.",
            |s| s.topic_full.load(Relaxed),
        ),
        (
            "ringcast_ephemeral_out_total",
            "Ephemeral frames (typing, presence) queued to connections.",
            |s| s.ephemeral_out.load(Relaxed),
        ),
        (
            "ringcast_presence_diffs_total",
            "Coalesced presence diffs (joins and leaves) sent to topic members.",
            |s| s.presence_diffs.load(Relaxed),
        ),
        (
            "ringcast_typing_throttled_total",
            "Typing indicators dropped by the per-connection throttle.",
            |s| s.typing_throttled.load(Relaxed),
        ),
        (
            "ringcast_receipts_total",
            "Delivered/read receipts passed to the senders of client messages.",
            |s| s.receipts.load(Relaxed),
        ),
        (
            "ringcast_direct_forbidden_total",
            "Direct messages refused: no token grant and no shared topic.",
            |s| s.direct_forbidden.load(Relaxed),
        ),
        (
            "ringcast_topics_owned",
            "Topics the shards own (offset, interest, history); idle ones are forgotten.",
            |s| s.topics_owned.load(Relaxed).max(0) as u64,
        ),
        (
            "ringcast_topics_forgotten_total",
            "Idle topics forgotten by the sweep (no subscriber shard, no history left).",
            |s| s.topics_forgotten.load(Relaxed),
        ),
        (
            "ringcast_parked_connections",
            "Quiet connections parked in the shards' epoll sets.",
            |s| s.parked.load(Relaxed).max(0) as u64,
        ),
        (
            "ringcast_dormant_connections",
            "Parked connections without a task, their state saved in the slot.",
            |s| s.dormant.load(Relaxed).max(0) as u64,
        ),
        (
            "ringcast_events_queued_total",
            "Persistent events stored for offline customers.",
            |s| s.events_queued.load(Relaxed),
        ),
        (
            "ringcast_stored_events_lost_total",
            "Persistent events dropped unacknowledged (queue full or expired).",
            |s| s.stored_lost.load(Relaxed),
        ),
        (
            "ringcast_offline_dropped_total",
            "Non-persistent events for customers with no connection.",
            |s| s.offline_dropped.load(Relaxed),
        ),
        (
            "ringcast_duplicates_total",
            "Deliveries skipped as repeats of a publisher-chosen event id.",
            |s| s.duplicates.load(Relaxed),
        ),
        (
            "ringcast_acks_total",
            "Persistent events acknowledged by clients.",
            |s| s.acks.load(Relaxed),
        ),
        (
            "ringcast_replayed_total",
            "Events replayed from storage (customer streams, topic history).",
            |s| s.replayed.load(Relaxed),
        ),
        (
            "ringcast_events_out_total",
            "Event frames queued to clients (deliveries).",
            |s| s.events_out.load(Relaxed),
        ),
        (
            "ringcast_api_connections",
            "Open backend API connections.",
            |s| s.api_connections.load(Relaxed).max(0) as u64,
        ),
        (
            "ringcast_publishes_held_total",
            "Publishes held by the API while a shard's fan-out was behind (server.max_fanout_lag_ms, server.max_fanout_backlog).",
            |s| s.publishes_held.load(Relaxed),
        ),
        (
            "ringcast_handshakes_total",
            "Completed WebSocket handshakes.",
            |s| s.handshakes.load(Relaxed),
        ),
        (
            "ringcast_bad_requests_total",
            "Requests refused before routing.",
            |s| s.bad_requests.load(Relaxed),
        ),
        (
            "ringcast_handoffs_total",
            "Connections handed to their owner shard.",
            |s| s.handoffs_out.load(Relaxed),
        ),
        (
            "ringcast_tokens_verified_total",
            "Token signatures checked for client connections.",
            |s| s.tokens_verified.load(Relaxed),
        ),
        (
            "ringcast_messages_in_total",
            "Client messages received.",
            |s| s.messages_in.load(Relaxed),
        ),
        ("ringcast_bytes_in_total", "Client bytes received.", |s| {
            s.bytes_in.load(Relaxed)
        }),
        (
            "ringcast_messages_out_total",
            "Frames queued to clients.",
            |s| s.messages_out.load(Relaxed),
        ),
        (
            "ringcast_bytes_out_total",
            "Bytes written to clients.",
            |s| s.bytes_out.load(Relaxed),
        ),
        ("ringcast_drops_total", "Frames not delivered.", |s| {
            s.drops.load(Relaxed)
        }),
        (
            "ringcast_slow_consumer_closes_total",
            "Connections closed for exceeding the outbound backlog.",
            |s| s.slow_consumer_closes.load(Relaxed),
        ),
        ("ringcast_publishes_total", "Events published.", |s| {
            s.publishes.load(Relaxed)
        }),
        (
            "ringcast_mesh_messages_total",
            "Cross-shard messages sent.",
            |s| s.mesh_out.load(Relaxed),
        ),
        (
            "ringcast_accept_errors_total",
            "Accept errors (EMFILE and others).",
            |s| s.accept_errors.load(Relaxed),
        ),
        (
            "ringcast_handoffs_received_total",
            "Connections received from other shards.",
            |s| s.handoffs_in.load(Relaxed),
        ),
    ];
    for (name, help, f) in counters {
        let kind = if name.ends_with("_total") {
            "counter"
        } else {
            "gauge"
        };
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {}",
            sum(shards, f)
        );
    }
    let _ = writeln!(out, "# HELP ringcast_auth_failures_total Refused handshakes by reason.\n# TYPE ringcast_auth_failures_total counter");
    for (i, reason) in AUTH_REASONS.iter().enumerate() {
        let _ = writeln!(
            out,
            "ringcast_auth_failures_total{{reason=\"{reason}\"}} {}",
            sum(shards, |s| s.auth_failures[i].load(Relaxed))
        );
    }
    let _ = writeln!(out, "# HELP ringcast_limit_refusals_total Connections and messages refused by a protection limit.\n# TYPE ringcast_limit_refusals_total counter");
    for (i, limit) in crate::limits::LIMIT_LABELS.iter().enumerate() {
        let _ = writeln!(
            out,
            "ringcast_limit_refusals_total{{limit=\"{limit}\"}} {}",
            sum(shards, |s| s.limit_refusals[i].load(Relaxed))
        );
    }
    let name = "ringcast_publish_to_write_seconds";
    let _ = writeln!(out, "# HELP {name} Time from accepting a publish to writing its frame to a client socket.\n# TYPE {name} histogram");
    let mut cumulative = 0;
    for (i, bound) in LATENCY_BOUNDS_US.iter().enumerate() {
        cumulative += sum(shards, |s| s.latency.buckets[i].load(Relaxed));
        let _ = writeln!(
            out,
            "{name}_bucket{{le=\"{}\"}} {cumulative}",
            *bound as f64 / 1e6
        );
    }
    cumulative += sum(shards, |s| {
        s.latency.buckets[LATENCY_BOUNDS_US.len()].load(Relaxed)
    });
    let _ = writeln!(
        out,
        "{name}_bucket{{le=\"+Inf\"}} {cumulative}\n{name}_count {cumulative}"
    );
    let _ = writeln!(
        out,
        "{name}_sum {}",
        sum(shards, |s| s.latency.sum_us.load(Relaxed)) as f64 / 1e6
    );
    if let Some(rss) = rss {
        let _ = writeln!(out, "# HELP ringcast_resident_memory_bytes Resident set size.\n# TYPE ringcast_resident_memory_bytes gauge\nringcast_resident_memory_bytes {rss}");
    }
    if let Some(bus) = bus {
        let _ = writeln!(
            out,
            "# HELP ringcast_nats_connected 1 while the node is connected to NATS.\n\
             # TYPE ringcast_nats_connected gauge\nringcast_nats_connected {}\n\
             # HELP ringcast_cluster_nodes Nodes alive (heartbeats heard within nats.node_timeout_ms), this one included.\n\
             # TYPE ringcast_cluster_nodes gauge\nringcast_cluster_nodes {}\n\
             # HELP ringcast_node_heartbeats_sent_total Heartbeats this node sent.\n\
             # TYPE ringcast_node_heartbeats_sent_total counter\nringcast_node_heartbeats_sent_total {}\n\
             # HELP ringcast_node_messages_refused_total Node messages dropped unread, by reason.\n\
             # TYPE ringcast_node_messages_refused_total counter\n\
             ringcast_node_messages_refused_total{{reason=\"version\"}} {}\n\
             ringcast_node_messages_refused_total{{reason=\"invalid\"}} {}\n\
             # HELP ringcast_history_stream_ready 1 once the JetStream history stream has answered.\n\
             # TYPE ringcast_history_stream_ready gauge\nringcast_history_stream_ready {}\n\
             # HELP ringcast_cluster_topics_watched Topics this node holds a NATS subscription to.\n\
             # TYPE ringcast_cluster_topics_watched gauge\nringcast_cluster_topics_watched {}\n\
             # HELP ringcast_cluster_publish_failures_total Topic events JetStream did not take (answered 503).\n\
             # TYPE ringcast_cluster_publish_failures_total counter\nringcast_cluster_publish_failures_total {}\n\
             # HELP ringcast_cluster_gaps_total Topic events missed on a live subscription and fetched from the stream.\n\
             # TYPE ringcast_cluster_gaps_total counter\nringcast_cluster_gaps_total {}",
            u8::from(bus.connected.load(Relaxed)),
            bus.nodes.load(Relaxed),
            bus.heartbeats_sent.load(Relaxed),
            bus.refused_version.load(Relaxed),
            bus.refused_invalid.load(Relaxed),
            u8::from(bus.stream_ready.load(Relaxed)),
            bus.watched.load(Relaxed),
            bus.publish_failures.load(Relaxed),
            sum(shards, |s| s.cluster_gaps.load(Relaxed)),
        );
    }
    out
}

/// The `/v1/stats` body.
pub fn stats(shards: &[ShardMetrics], rss: Option<u64>, uptime_secs: u64) -> proto::api::StatsOut {
    let gauge = |f: fn(&ShardMetrics) -> i64| shards.iter().map(f).sum::<i64>();
    proto::api::StatsOut {
        uptime_secs,
        connections: gauge(|s| s.connections.load(Relaxed)),
        handshakes: sum(shards, |s| s.handshakes.load(Relaxed)),
        auth_failures: sum(shards, |s| {
            s.auth_failures.iter().map(|a| a.load(Relaxed)).sum()
        }),
        limit_refusals: sum(shards, |s| {
            s.limit_refusals.iter().map(|a| a.load(Relaxed)).sum()
        }),
        messages_in: sum(shards, |s| s.messages_in.load(Relaxed)),
        messages_out: sum(shards, |s| s.messages_out.load(Relaxed)),
        events_out: sum(shards, |s| s.events_out.load(Relaxed)),
        bytes_out: sum(shards, |s| s.bytes_out.load(Relaxed)),
        drops: sum(shards, |s| s.drops.load(Relaxed)),
        sse_connections: gauge(|s| s.sse_connections.load(Relaxed)),
        polls_waiting: gauge(|s| s.polls_waiting.load(Relaxed)),
        parked_connections: gauge(|s| s.parked.load(Relaxed)),
        events_queued: sum(shards, |s| s.events_queued.load(Relaxed)),
        stored_lost: sum(shards, |s| s.stored_lost.load(Relaxed)),
        offline_dropped: sum(shards, |s| s.offline_dropped.load(Relaxed)),
        duplicates: sum(shards, |s| s.duplicates.load(Relaxed)),
        acks: sum(shards, |s| s.acks.load(Relaxed)),
        replayed: sum(shards, |s| s.replayed.load(Relaxed)),
        slow_consumer_closes: sum(shards, |s| s.slow_consumer_closes.load(Relaxed)),
        publishes: sum(shards, |s| s.publishes.load(Relaxed)),
        resident_bytes: rss,
        heap_bytes: match HEAP_BYTES.load(Relaxed) {
            0 => None,
            n => Some(n),
        },
        shards: shards
            .iter()
            .enumerate()
            .map(|(shard, s)| proto::api::ShardStats {
                shard,
                connections: s.connections.load(Relaxed),
                messages_out: s.messages_out.load(Relaxed),
            })
            .collect(),
    }
}
