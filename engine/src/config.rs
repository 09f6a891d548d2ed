//! Configuration: defaults, a TOML file, `RINGCAST_*` environment variables and CLI flags, in
//! increasing order of precedence.
//!
//! Every key is `section.key` (TOML) or `RINGCAST_SECTION_KEY` (environment). The short names
//! (`RINGCAST_LISTEN`, `RINGCAST_SHARDS`, `RINGCAST_JWT_SECRET`, `RINGCAST_API_KEY`,
//! `RINGCAST_DIAGNOSTICS_ECHO`, `RINGCAST_CONFIG`) always work. docs/operations.md lists every key
//! with its default and the reason for it; keep the two in step.

use std::{net::SocketAddr, path::Path, time::Duration};

use anyhow::{bail, Context as _};
use proto::proxy::IpNet;
use serde::Deserialize;

pub use proto::auth::{DEV_API_KEY, DEV_JWT_SECRET};

/// All settings.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// `[server]`
    pub server: Server,
    /// `[auth]`
    pub auth: Auth,
    /// `[limits]`
    pub limits: Limits,
    /// `[delivery]`
    pub delivery: Delivery,
    /// `[history]`
    pub history: History,
    /// `[[namespaces]]`: per topic prefix rules (longest prefix wins); topics under no prefix
    /// follow [`Namespace::default`].
    pub namespaces: Vec<Namespace>,
    /// `[presence]`
    pub presence: Presence,
    /// `[diagnostics]`
    pub diagnostics: Diagnostics,
    /// `[log]`
    pub log: Log,
    /// `[broker]`
    pub broker: Broker,
    /// `[nats]`
    pub nats: Nats,
}

/// `[broker]`: how events reach the shards (and nodes) that serve their receivers.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Broker {
    /// `local` (the default: one process, nothing else needed) or `nats` (a node of a
    /// cluster joined through NATS; see `[nats]`).
    pub kind: BrokerKind,
    /// This node's name in the cluster. Empty = `<hostname>-<listen port>`.
    pub node_id: String,
}

/// Which broker a node runs.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum BrokerKind {
    /// One process.
    #[default]
    Local,
    /// A node of a cluster joined through NATS.
    Nats,
}

impl std::str::FromStr for BrokerKind {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s.trim() {
            "local" => Ok(BrokerKind::Local),
            "nats" => Ok(BrokerKind::Nats),
            other => bail!("broker.kind must be local or nats, not {other:?}"),
        }
    }
}

/// `[nats]`: the NATS servers of a cluster (`broker.kind = "nats"`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Nats {
    /// Server URLs, tried in turn (`nats://host:4222`).
    pub servers: Vec<String>,
    /// First token of every subject this cluster uses, so several clusters can share one
    /// NATS deployment.
    pub prefix: String,
    /// Milliseconds between a node's heartbeats.
    pub heartbeat_ms: u64,
    /// Milliseconds without a heartbeat after which a node is taken as gone. Default 3,500:
    /// three missed heartbeats and some slack.
    pub node_timeout_ms: u64,
    /// Seconds a node keeps its subscription to a topic after its last local subscriber
    /// left. Default 30: people who leave and come back (a page reload, a flaky network)
    /// do not churn NATS subscriptions, which every NATS server must propagate.
    pub linger_secs: u64,
    /// Copies of the JetStream history stream (1, 3 or 5; more than the NATS servers there
    /// are fails at start). Default 1, for one NATS server; use 3 with a NATS cluster.
    pub replicas: usize,
    /// Where JetStream keeps the history stream: `file` (default; survives a NATS
    /// restart) or `memory`.
    pub storage: String,
    /// Bytes the history stream keeps at most, oldest events dropped first. Default 1 GiB.
    pub history_max_bytes: i64,
    /// A NATS credentials file (`.creds`: user JWT and NKey seed), for NATS accounts.
    pub credentials_file: String,
    /// A token, or a user and password, for servers that use those instead.
    pub token: String,
    /// User name (with `password`).
    pub user: String,
    /// Password (with `user`).
    pub password: String,
    /// Require TLS to the NATS servers (`tls://` URLs require it too).
    pub tls_required: bool,
    /// PEM file of the CA that signed the NATS servers' certificates (default: the system's).
    pub tls_ca_file: String,
    /// Client certificate and key (PEM) when the NATS servers verify clients.
    pub tls_cert_file: String,
    /// See `tls_cert_file`.
    pub tls_key_file: String,
}

impl Default for Nats {
    fn default() -> Self {
        Nats {
            servers: vec!["nats://127.0.0.1:4222".into()],
            prefix: "rc".into(),
            heartbeat_ms: 1000,
            node_timeout_ms: 3500,
            linger_secs: 30,
            replicas: 1,
            storage: "file".into(),
            history_max_bytes: 1 << 30,
            credentials_file: String::new(),
            token: String::new(),
            user: String::new(),
            password: String::new(),
            tls_required: false,
            tls_ca_file: String::new(),
            tls_cert_file: String::new(),
            tls_key_file: String::new(),
        }
    }
}

/// `[server]`: sockets, shards, timers.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Server {
    /// Listen address. Default `127.0.0.1:8080`: loopback until an operator decides otherwise.
    pub listen: String,
    /// Number of shards (one pinned executor each). 0 = one per available CPU.
    pub shards: usize,
    /// Seconds between server pings on an idle WebSocket. 25 s stays under the usual 60 s
    /// idle timeout of load balancers.
    pub heartbeat_secs: u64,
    /// Seconds without any client frame (pong included) before the connection is closed.
    /// Default 60: two missed heartbeats plus slack.
    pub idle_timeout_secs: u64,
    /// Seconds without a client frame after which a connection's socket is parked: it leaves
    /// glommio (whose pending read costs ~0.5 KB per socket) for the shard's shared epoll set.
    /// Default 10. A parked socket's next message pays one thread hop; 0 never parks.
    pub park_after_secs: u64,
    /// Seconds a client has, from accept, to send a complete request head (and a PROXY
    /// header before it). Default 10. An absolute deadline, not one per read: a byte every
    /// few seconds cannot hold a socket open (slow-loris).
    pub handshake_timeout_secs: u64,
    /// Seconds a backend has, from the end of a request's head, to send its whole body.
    /// Default 30: a 1 MiB body on a slow link, not a socket held open a byte at a time.
    pub body_timeout_secs: u64,
    /// Seconds a keep-alive API connection may stay idle. Default 60.
    pub api_idle_secs: u64,
    /// Upper bound on the graceful drain at SIGTERM/SIGINT, in seconds. Default 10.
    pub drain_timeout_secs: u64,
    /// Seconds between SIGTERM and closing the listeners, during which `/readyz` answers 503
    /// so a load balancer can take the node out first. Default 0 (set it to a few health-check
    /// intervals behind a load balancer).
    pub drain_grace_secs: u64,
    /// Seconds over which a drain closes its connections, evenly, after the grace period.
    /// Default 5: the clients of a draining node reconnect to the others over that window
    /// rather than all at once (at most half of `drain_timeout_secs`).
    pub drain_spread_secs: u64,
    /// glommio's registered I/O memory per shard, KiB. ringcast does not use glommio's file
    /// I/O, so a small pool saves locked memory. Default 512 (the minimum glommio accepts).
    pub io_memory_kib: usize,
    /// io_uring ring depth per shard (glommio's three rings). Default 4096: besides room for
    /// bursts, the kernel sizes a ring's cancellation hash from it (buckets = completion
    /// entries / 32, at most 256, reached at 4096), and glommio cancels a timer on its main
    /// ring at every turn of its loop; each cancel walks one bucket of the read polls of every
    /// connection that is not parked. At 1024 (64 buckets) that walk was 14% of a shard's CPU
    /// with 5,000 fresh connections; at 4096, 5%. Costs about 0.9 MiB per shard, once.
    pub ring_depth: usize,
    /// Capacity of each cross-shard channel, in messages. Default 4096; overflow is queued,
    /// never dropped.
    pub mesh_capacity: usize,
    /// Shortest time, in microseconds, between two flush rounds of a busy shard: frames
    /// fanned out meanwhile leave together, one write per socket. Default 1000. A quiet shard
    /// flushes at once whatever this is.
    pub flush_window_us: u64,
    /// How far behind, in milliseconds, a shard's fan-out may fall (the age of its oldest
    /// accepted event not yet written to its sockets) before the publish API holds new
    /// publishes until it catches up (503 `overloaded` after 5 s). Default 100; 0 turns the
    /// bound off. Publishes are answered on acceptance, so this is what keeps publishers
    /// from outrunning delivery.
    pub max_fanout_lag_ms: u64,
    /// How many deliveries may wait in a shard's fan-out queue for its next round before the
    /// publish API holds new publishes (each topic event counts its subscribers on the
    /// shard). Default 131072; 0 turns the bound off. It caps a round's size under
    /// overload, and so how long a delivery waits for its round and the rounds before it.
    pub max_fanout_backlog: u64,
    /// Load balancers whose word about the client's address is believed (CIDR ranges or
    /// addresses): their `X-Forwarded-For`, and their PROXY header with `proxy_protocol`.
    /// Default none: the TCP peer is the client, and the headers are ignored.
    pub trusted_proxies: Vec<String>,
    /// Connections from trusted proxies start with a PROXY protocol header (v1 or v2, as
    /// HAProxy's `send-proxy` / `send-proxy-v2` sends). Default off. A PROXY header from any
    /// other peer is refused (400).
    pub proxy_protocol: bool,
}

/// The one algorithm tokens must be signed with (a token's own `alg` header never chooses).
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
pub enum JwtAlgorithm {
    /// HMAC-SHA256 with `auth.jwt_secret`.
    #[serde(rename = "HS256")]
    Hs256,
    /// RSA-SHA256, verified with `auth.jwt_public_key_file`.
    #[serde(rename = "RS256")]
    Rs256,
}

impl std::str::FromStr for JwtAlgorithm {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s.trim() {
            "HS256" => Ok(JwtAlgorithm::Hs256),
            "RS256" => Ok(JwtAlgorithm::Rs256),
            other => bail!("auth.jwt_algorithm must be HS256 or RS256, not {other:?}"),
        }
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Text for a terminal.
    Human,
    /// One JSON object per line, for log collectors.
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s.trim() {
            "human" => Ok(LogFormat::Human),
            "json" => Ok(LogFormat::Json),
            other => bail!("log.format must be human or json, not {other:?}"),
        }
    }
}

/// `[auth]`: tokens and the API key.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Auth {
    /// Token algorithm, pinned: `HS256` or `RS256`.
    pub jwt_algorithm: JwtAlgorithm,
    /// HS256 secret. Empty = the development secret (with a warning).
    pub jwt_secret: String,
    /// RS256: path of the PEM public key.
    pub jwt_public_key_file: String,
    /// Required `iss`, if set.
    pub issuer: String,
    /// Required `aud`, if set.
    pub audience: String,
    /// Bearer key for the backend API. Empty = the development key (with a warning).
    pub api_key: String,
    /// Allowed `Origin` values for browser clients; empty = any origin.
    pub allowed_origins: Vec<String>,
    /// Bearer key for `/metrics`, `/v1/stats` and `/v1/stats/histograms` (a Prometheus
    /// scrape credential). Empty = those endpoints are open to whoever reaches the port
    /// (logged as a warning when the listener is not on loopback).
    pub metrics_key: String,
}

/// `[limits]`: per-connection bounds.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest client message in bytes (1009 above). Default 64 KiB.
    pub max_message: usize,
    /// Outbound backlog per connection in bytes before a slow-consumer close (4008).
    /// Default 1 MiB: about 10k small events, far beyond a healthy client's lag.
    pub max_backlog: usize,
    /// Largest backend API request body in bytes (413 above). Default 1 MiB.
    pub max_body: usize,
    /// Client requests per minute per connection (a token bucket of this size, refilled
    /// evenly; a request that cannot be served counts, a ping costs an eighth, an `ack` nothing).
    /// Over it: close 4029. Default 30, from the seeds.
    /// 0 = unlimited.
    pub client_messages_per_minute: u32,
    /// Open WebSocket and SSE connections per customer; the next one gets 429. Default 5.
    /// 0 = unlimited.
    pub connections_per_customer: usize,
    /// Connection attempts (WebSocket, SSE, long poll) per client address per minute (a fixed
    /// one-minute window); over it: 429. Default 10. 0 = unlimited.
    pub connect_attempts_per_ip: u32,
    /// Client addresses the attempt limit ignores. Default loopback: local tools and tests,
    /// and a local reverse proxy that is not (yet) listed in `server.trusted_proxies`, whose
    /// clients would otherwise share one address.
    pub exempt_ips: Vec<String>,
    /// Open client connections per process; the next one gets 503. Sockets still sending
    /// their request head count too, so unauthenticated sockets cannot use up the open files
    /// that clients need. Default 0: only the open-files limit bounds it.
    pub max_connections: usize,
    /// Sockets from one client address still sending their request head, at once; beyond it
    /// new ones are closed at accept. Default 32 (a browser opens at most 6 per host; a NAT
    /// of many users rarely has 32 heads in flight). Addresses in `exempt_ips` are not
    /// counted. 0 = unlimited.
    pub pending_heads_per_ip: u32,
    /// Topics one connection may subscribe to. Default 128. Each topic costs its owner shard
    /// memory, so a token with a wildcard grant must not subscribe to millions.
    pub topics_per_connection: usize,
    /// Event-type prefixes (`payload.events`, `?events=`) one connection may filter on.
    /// Default 32.
    pub filters_per_connection: usize,
}

/// `[delivery]`: the customer stream's guarantees (offline queue, acks, deduplication) and
/// the HTTP transports.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Delivery {
    /// Persistent events kept per customer until acknowledged (the offline queue). Default 50,
    /// from the seeds; the oldest is dropped (and counted) beyond it.
    pub offline_queue: usize,
    /// Seconds a persistent event waits for its customer at most (an event's own `ttl` can
    /// only shorten it). Default 86400: a day covers a phone left off overnight.
    pub offline_ttl_secs: u64,
    /// Seconds during which a publisher-chosen event id is delivered at most once per target.
    /// Default 300: longer than any sane publisher retry loop.
    pub dedupe_window_secs: u64,
    /// Longest `wait` a long-poll request may ask for, in seconds. Default 55: under the usual
    /// 60 s proxy timeout.
    pub max_poll_wait_secs: u64,
    /// `retry:` sent to SSE clients, in milliseconds: how soon a browser reconnects. Default 2000.
    pub sse_retry_ms: u64,
    /// Client-sent messages per shard whose sender is remembered for delivered/read
    /// receipts (the oldest is forgotten first; a receipt for it is dropped). Default 50000.
    pub receipts_kept: usize,
}

/// History of one topic prefix.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HistoryRule {
    /// Topic prefix, e.g. `conversation:`.
    pub prefix: String,
    /// Events kept.
    pub size: usize,
    /// Seconds an event is kept.
    pub age_secs: u64,
}

/// `[history]`: what each topic keeps for recovery (`subscribe` with `since`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct History {
    /// Events kept per topic when no rule matches. Default 100: a reconnect after a short
    /// outage on a busy chat recovers; 0 disables history.
    pub size: usize,
    /// Seconds an event is kept when no rule matches. Default 600.
    pub age_secs: u64,
    /// Per-prefix overrides, longest prefix first wins. TOML: `[[history.rules]]` tables;
    /// environment: `RINGCAST_HISTORY_RULES="conversation:=200/3600,ticker:=0/0"`.
    pub rules: Vec<HistoryRule>,
}

/// Rules for the topics under one prefix (`conversation:`, `product:`, `hospital:`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Namespace {
    /// Topic prefix, e.g. `conversation:`.
    pub prefix: String,
    /// Token roles of which one is needed to subscribe, besides the token's `channels`
    /// patterns. Empty (default): the channels decide.
    pub roles: Vec<String>,
    /// Clients may publish here (when their token's `publish` patterns allow). Default true;
    /// false keeps a namespace backend-only (alerts, order updates).
    pub client_publish: bool,
    /// Topic presence: who is in the topic (`GET /v1/presence/topics/{topic}`), coalesced
    /// join/leave events to the members, and members' status changes. Default false.
    pub presence: bool,
    /// Events kept per topic (default: `[history]` and its rules). 50 for chat rooms gives
    /// "last messages on join".
    pub history_size: Option<usize>,
    /// Seconds events are kept (default: `[history]` and its rules).
    pub history_age_secs: Option<u64>,
    /// Latest kept messages a `subscribe` without `since` receives before the live stream
    /// ("last messages on join"; `payload.last` overrides). Default 50 in a configured
    /// namespace (chat rooms), 0 for topics under no prefix.
    pub join_history: usize,
    /// Subscriptions a topic takes at most (the next gets `topic_full`). Default 0: no cap.
    pub max_subscribers: usize,
}

impl Default for Namespace {
    /// A configured namespace's defaults: channels decide who subscribes, clients may publish
    /// with a grant, no presence, `[history]` applies, 50 messages on join. (Topics under no
    /// prefix get the same with no messages on join.)
    fn default() -> Self {
        Namespace {
            prefix: String::new(),
            roles: Vec::new(),
            client_publish: true,
            presence: false,
            history_size: None,
            history_age_secs: None,
            join_history: 50,
            max_subscribers: 0,
        }
    }
}

/// `[presence]`: how presence changes travel.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Presence {
    /// Joins and leaves in a topic are gathered this long and sent to its members as one
    /// `presence_diff` (a leave and a join of the same customer inside it cancel out).
    /// Default 1000.
    pub coalesce_ms: u64,
    /// Customers named in one `presence_diff` (beyond: counts only, `truncated: true`).
    /// Default 100.
    pub max_diff_names: usize,
}

impl Default for Presence {
    fn default() -> Self {
        Presence {
            coalesce_ms: 1000,
            max_diff_names: 100,
        }
    }
}

impl History {
    /// `(size, age_secs)` for a topic.
    pub fn for_topic(&self, topic: &str) -> (usize, u64) {
        self.rules
            .iter()
            .filter(|r| topic.starts_with(&r.prefix))
            .max_by_key(|r| r.prefix.len())
            .map_or((self.size, self.age_secs), |r| (r.size, r.age_secs))
    }
}

impl Default for Delivery {
    fn default() -> Self {
        Delivery {
            offline_queue: 50,
            offline_ttl_secs: 86_400,
            dedupe_window_secs: 300,
            max_poll_wait_secs: 55,
            sse_retry_ms: 2000,
            receipts_kept: 50_000,
        }
    }
}

impl Default for History {
    fn default() -> Self {
        History {
            size: 100,
            age_secs: 600,
            rules: Vec::new(),
        }
    }
}

/// `[diagnostics]`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Diagnostics {
    /// Serve the `/v1/echo` WebSocket (for Autobahn). Off by default: it is unauthenticated.
    pub echo: bool,
    /// Largest message on `/v1/echo`. Default 16 MiB, what Autobahn's 9.* cases send.
    pub echo_max_message: usize,
}

/// `[log]`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Log {
    /// `human` or `json`.
    pub format: LogFormat,
    /// A tracing filter, e.g. `info` or `ringcast=debug`. `RUST_LOG` also works.
    pub level: String,
}

impl Default for Server {
    fn default() -> Self {
        Server {
            listen: "127.0.0.1:8080".into(),
            shards: 0,
            heartbeat_secs: 25,
            idle_timeout_secs: 60,
            park_after_secs: 10,
            handshake_timeout_secs: 10,
            body_timeout_secs: 30,
            api_idle_secs: 60,
            drain_timeout_secs: 10,
            drain_grace_secs: 0,
            drain_spread_secs: 5,
            io_memory_kib: 512,
            ring_depth: 4096,
            mesh_capacity: 4096,
            flush_window_us: 1000,
            max_fanout_lag_ms: 100,
            max_fanout_backlog: 131_072,
            trusted_proxies: Vec::new(),
            proxy_protocol: false,
        }
    }
}

impl Default for Auth {
    fn default() -> Self {
        Auth {
            jwt_algorithm: JwtAlgorithm::Hs256,
            jwt_secret: String::new(),
            jwt_public_key_file: String::new(),
            issuer: String::new(),
            audience: String::new(),
            api_key: String::new(),
            allowed_origins: Vec::new(),
            metrics_key: String::new(),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message: 64 * 1024,
            max_backlog: 1024 * 1024,
            max_body: 1024 * 1024,
            client_messages_per_minute: 30,
            connections_per_customer: 5,
            connect_attempts_per_ip: 10,
            exempt_ips: vec!["127.0.0.0/8".into(), "::1".into()],
            max_connections: 0,
            pending_heads_per_ip: 32,
            topics_per_connection: 128,
            filters_per_connection: 32,
        }
    }
}

impl Default for Diagnostics {
    fn default() -> Self {
        Diagnostics {
            echo: false,
            echo_max_message: 16 * 1024 * 1024,
        }
    }
}

impl Default for Log {
    fn default() -> Self {
        Log {
            format: LogFormat::Human,
            level: "info".into(),
        }
    }
}

/// Short environment names that map to a `section.key`.
const SHORT_ENV: &[(&str, &str)] = &[
    ("RINGCAST_LISTEN", "server.listen"),
    ("RINGCAST_SHARDS", "server.shards"),
    ("RINGCAST_JWT_SECRET", "auth.jwt_secret"),
    ("RINGCAST_API_KEY", "auth.api_key"),
    ("RINGCAST_DIAGNOSTICS_ECHO", "diagnostics.echo"),
    ("RINGCAST_BROKER", "broker.kind"),
    ("RINGCAST_NODE_ID", "broker.node_id"),
    ("RINGCAST_NATS_URL", "nats.servers"),
];

impl Config {
    /// Loads the file (if any), then applies the environment.
    pub fn load(
        file: Option<&Path>,
        env: impl Iterator<Item = (String, String)>,
    ) -> anyhow::Result<Config> {
        let mut config = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?;
                toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?
            }
            None => Config::default(),
        };
        let env: Vec<(String, String)> = env.filter(|(k, _)| k.starts_with("RINGCAST_")).collect();
        // Long names first, then short names, so a short name always wins.
        for (key, value) in &env {
            if key == "RINGCAST_CONFIG" || SHORT_ENV.iter().any(|(s, _)| s == key) {
                continue;
            }
            // Test faults (`engine::faults`) exist in debug builds only; a release build
            // refuses the variable like any unknown one.
            if key == "RINGCAST_FAULTS" && cfg!(debug_assertions) {
                continue;
            }
            let rest = &key["RINGCAST_".len()..];
            let Some((section, field)) = rest.split_once('_') else {
                bail!("unknown environment variable {key}");
            };
            config
                .set(
                    &format!("{}.{}", section.to_lowercase(), field.to_lowercase()),
                    value,
                )
                .with_context(|| format!("environment variable {key}"))?;
        }
        for (short, path) in SHORT_ENV {
            if let Some((_, value)) = env.iter().find(|(k, _)| k == short) {
                config
                    .set(path, value)
                    .with_context(|| format!("environment variable {short}"))?;
            }
        }
        Ok(config)
    }

    /// Sets one key from its text form (environment variables and CLI flags).
    pub fn set(&mut self, key: &str, value: &str) -> anyhow::Result<()> {
        fn num<T: std::str::FromStr>(v: &str) -> anyhow::Result<T>
        where
            T::Err: std::fmt::Display,
        {
            v.trim()
                .parse()
                .map_err(|e| anyhow::anyhow!("{v:?} is not a valid number: {e}"))
        }
        fn flag(v: &str) -> anyhow::Result<bool> {
            match v.trim().to_ascii_lowercase().as_str() {
                "1" | "true" | "yes" | "on" => Ok(true),
                "0" | "false" | "no" | "off" | "" => Ok(false),
                _ => bail!("{v:?} is not a boolean"),
            }
        }
        let list = |v: &str| -> Vec<String> {
            v.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect()
        };
        match key {
            "server.listen" => self.server.listen = value.into(),
            "server.shards" => self.server.shards = num(value)?,
            "server.heartbeat_secs" => self.server.heartbeat_secs = num(value)?,
            "server.idle_timeout_secs" => self.server.idle_timeout_secs = num(value)?,
            "server.park_after_secs" => self.server.park_after_secs = num(value)?,
            "server.handshake_timeout_secs" => self.server.handshake_timeout_secs = num(value)?,
            "server.body_timeout_secs" => self.server.body_timeout_secs = num(value)?,
            "server.api_idle_secs" => self.server.api_idle_secs = num(value)?,
            "server.drain_timeout_secs" => self.server.drain_timeout_secs = num(value)?,
            "server.drain_grace_secs" => self.server.drain_grace_secs = num(value)?,
            "server.drain_spread_secs" => self.server.drain_spread_secs = num(value)?,
            "server.io_memory_kib" => self.server.io_memory_kib = num(value)?,
            "server.ring_depth" => self.server.ring_depth = num(value)?,
            "server.mesh_capacity" => self.server.mesh_capacity = num(value)?,
            "server.flush_window_us" => self.server.flush_window_us = num(value)?,
            "server.max_fanout_lag_ms" => self.server.max_fanout_lag_ms = num(value)?,
            "server.max_fanout_backlog" => self.server.max_fanout_backlog = num(value)?,
            "server.trusted_proxies" => self.server.trusted_proxies = list(value),
            "server.proxy_protocol" => self.server.proxy_protocol = flag(value)?,
            "auth.jwt_algorithm" => self.auth.jwt_algorithm = value.parse()?,
            "auth.jwt_secret" => self.auth.jwt_secret = value.into(),
            "auth.jwt_public_key_file" => self.auth.jwt_public_key_file = value.into(),
            "auth.issuer" => self.auth.issuer = value.into(),
            "auth.audience" => self.auth.audience = value.into(),
            "auth.api_key" => self.auth.api_key = value.into(),
            "auth.allowed_origins" => self.auth.allowed_origins = list(value),
            "auth.metrics_key" => self.auth.metrics_key = value.into(),
            "limits.max_message" => self.limits.max_message = num(value)?,
            "limits.max_backlog" => self.limits.max_backlog = num(value)?,
            "limits.max_body" => self.limits.max_body = num(value)?,
            "limits.client_messages_per_minute" => {
                self.limits.client_messages_per_minute = num(value)?
            }
            "limits.connections_per_customer" => self.limits.connections_per_customer = num(value)?,
            "limits.connect_attempts_per_ip" => self.limits.connect_attempts_per_ip = num(value)?,
            "limits.exempt_ips" => self.limits.exempt_ips = list(value),
            "limits.max_connections" => self.limits.max_connections = num(value)?,
            "limits.pending_heads_per_ip" => self.limits.pending_heads_per_ip = num(value)?,
            "limits.topics_per_connection" => self.limits.topics_per_connection = num(value)?,
            "limits.filters_per_connection" => self.limits.filters_per_connection = num(value)?,
            "delivery.offline_queue" => self.delivery.offline_queue = num(value)?,
            "delivery.offline_ttl_secs" => self.delivery.offline_ttl_secs = num(value)?,
            "delivery.dedupe_window_secs" => self.delivery.dedupe_window_secs = num(value)?,
            "delivery.max_poll_wait_secs" => self.delivery.max_poll_wait_secs = num(value)?,
            "delivery.sse_retry_ms" => self.delivery.sse_retry_ms = num(value)?,
            "delivery.receipts_kept" => self.delivery.receipts_kept = num(value)?,
            "history.size" => self.history.size = num(value)?,
            "history.age_secs" => self.history.age_secs = num(value)?,
            "history.rules" => {
                self.history.rules = list(value)
                    .into_iter()
                    .map(|r: String| {
                        let (prefix, spec) = r
                            .rsplit_once('=')
                            .ok_or_else(|| anyhow::anyhow!("{r:?} is not prefix=size/age_secs"))?;
                        let (size, age) = spec
                            .split_once('/')
                            .ok_or_else(|| anyhow::anyhow!("{r:?} is not prefix=size/age_secs"))?;
                        Ok(HistoryRule {
                            prefix: prefix.to_owned(),
                            size: num(size)?,
                            age_secs: num(age)?,
                        })
                    })
                    .collect::<anyhow::Result<_>>()?
            }
            "presence.coalesce_ms" => self.presence.coalesce_ms = num(value)?,
            "presence.max_diff_names" => self.presence.max_diff_names = num(value)?,
            "diagnostics.echo" => self.diagnostics.echo = flag(value)?,
            "diagnostics.echo_max_message" => self.diagnostics.echo_max_message = num(value)?,
            "log.format" => self.log.format = value.parse()?,
            "log.level" => self.log.level = value.into(),
            "broker.kind" => self.broker.kind = value.parse()?,
            "broker.node_id" => self.broker.node_id = value.into(),
            "nats.servers" => self.nats.servers = list(value),
            "nats.prefix" => self.nats.prefix = value.into(),
            "nats.heartbeat_ms" => self.nats.heartbeat_ms = num(value)?,
            "nats.node_timeout_ms" => self.nats.node_timeout_ms = num(value)?,
            "nats.linger_secs" => self.nats.linger_secs = num(value)?,
            "nats.replicas" => self.nats.replicas = num(value)?,
            "nats.storage" => self.nats.storage = value.into(),
            "nats.history_max_bytes" => self.nats.history_max_bytes = num(value)?,
            "nats.credentials_file" => self.nats.credentials_file = value.into(),
            "nats.token" => self.nats.token = value.into(),
            "nats.user" => self.nats.user = value.into(),
            "nats.password" => self.nats.password = value.into(),
            "nats.tls_required" => self.nats.tls_required = flag(value)?,
            "nats.tls_ca_file" => self.nats.tls_ca_file = value.into(),
            "nats.tls_cert_file" => self.nats.tls_cert_file = value.into(),
            "nats.tls_key_file" => self.nats.tls_key_file = value.into(),
            _ => bail!("unknown setting {key}"),
        }
        Ok(())
    }

    /// Checks values that would otherwise fail later or silently misbehave.
    pub fn validate(&self) -> anyhow::Result<()> {
        self.listen_addr()?;
        if self.server.heartbeat_secs == 0
            || self.server.idle_timeout_secs <= self.server.heartbeat_secs
        {
            bail!("server.idle_timeout_secs must exceed server.heartbeat_secs (> 0)");
        }
        if self.auth.jwt_algorithm == JwtAlgorithm::Rs256
            && self.auth.jwt_public_key_file.is_empty()
        {
            bail!("auth.jwt_public_key_file is required with RS256");
        }
        if self.limits.max_message < 125 || self.limits.max_backlog < self.limits.max_message {
            bail!("limits.max_message must be >= 125 and limits.max_backlog >= limits.max_message");
        }
        if self.delivery.offline_queue > 10_000 || self.history.size > 100_000 {
            bail!("delivery.offline_queue is at most 10000 and history.size at most 100000");
        }
        self.trusted_proxies()?;
        self.exempt_ips()?;
        if self.namespaces.iter().any(|n| n.prefix.is_empty()) {
            bail!("every [[namespaces]] entry needs a prefix");
        }
        if self.server.proxy_protocol && self.server.trusted_proxies.is_empty() {
            bail!("server.proxy_protocol needs server.trusted_proxies (whose headers to believe)");
        }
        if self.broker.kind == BrokerKind::Nats {
            if self.nats.servers.is_empty() {
                bail!("broker.kind = \"nats\" needs nats.servers");
            }
            for url in &self.nats.servers {
                if url.parse::<async_nats::ServerAddr>().is_err() {
                    bail!("nats.servers: {url:?} is not a NATS URL (nats://host:port)");
                }
            }
            let token = |s: &str| {
                !s.is_empty()
                    && s.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            };
            if !token(&self.nats.prefix) {
                bail!("nats.prefix must be letters, digits, - or _ (one subject token)");
            }
            if !self.broker.node_id.is_empty() && !token(&self.broker.node_id) {
                bail!("broker.node_id must be letters, digits, - or _");
            }
            if self.nats.heartbeat_ms == 0 || self.nats.node_timeout_ms <= self.nats.heartbeat_ms {
                bail!("nats.node_timeout_ms must exceed nats.heartbeat_ms (> 0)");
            }
            if !matches!(self.nats.replicas, 1 | 3 | 5) {
                bail!("nats.replicas must be 1, 3 or 5");
            }
            if !matches!(self.nats.storage.as_str(), "file" | "memory") {
                bail!("nats.storage must be \"file\" or \"memory\"");
            }
            if self.nats.history_max_bytes < 1 << 20 {
                bail!("nats.history_max_bytes must be at least 1 MiB");
            }
            let n = &self.nats;
            let ways = [
                !n.credentials_file.is_empty(),
                !n.token.is_empty(),
                !n.user.is_empty() || !n.password.is_empty(),
            ];
            if ways.iter().filter(|w| **w).count() > 1 {
                bail!("nats: give one of credentials_file, token, or user and password");
            }
            if n.user.is_empty() != n.password.is_empty() {
                bail!("nats.user and nats.password go together");
            }
            if n.tls_cert_file.is_empty() != n.tls_key_file.is_empty() {
                bail!("nats.tls_cert_file and nats.tls_key_file go together");
            }
            for (key, path) in [
                ("nats.credentials_file", &n.credentials_file),
                ("nats.tls_ca_file", &n.tls_ca_file),
                ("nats.tls_cert_file", &n.tls_cert_file),
                ("nats.tls_key_file", &n.tls_key_file),
            ] {
                if !path.is_empty() && std::fs::metadata(path).is_err() {
                    bail!("{key}: cannot read {path:?}");
                }
            }
        }
        Ok(())
    }

    /// This node's id: `broker.node_id`, else `<hostname>-<port>` with the port the listener
    /// is bound to (a host's processes differ by port).
    pub fn node_id(&self, port: u16) -> String {
        if !self.broker.node_id.is_empty() {
            return self.broker.node_id.clone();
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_default();
        let host: String = host
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        format!("{}-{port}", if host.is_empty() { "node" } else { &host })
    }

    /// `server.trusted_proxies`, parsed.
    pub fn trusted_proxies(&self) -> anyhow::Result<Vec<IpNet>> {
        nets("server.trusted_proxies", &self.server.trusted_proxies)
    }

    /// `limits.exempt_ips`, parsed.
    pub fn exempt_ips(&self) -> anyhow::Result<Vec<IpNet>> {
        nets("limits.exempt_ips", &self.limits.exempt_ips)
    }

    /// The namespace of a topic: the longest matching prefix, else the default.
    pub fn namespace(&self, topic: &str) -> &Namespace {
        static DEFAULT: std::sync::OnceLock<Namespace> = std::sync::OnceLock::new();
        self.namespaces
            .iter()
            .filter(|n| topic.starts_with(&n.prefix))
            .max_by_key(|n| n.prefix.len())
            .unwrap_or_else(|| {
                DEFAULT.get_or_init(|| Namespace {
                    join_history: 0,
                    ..Namespace::default()
                })
            })
    }

    /// `(size, age_secs)` of a topic's history: its namespace's, else `[history]`'s rules.
    pub fn history_for(&self, topic: &str) -> (usize, u64) {
        let (size, age) = self.history.for_topic(topic);
        let ns = self.namespace(topic);
        (
            ns.history_size.unwrap_or(size),
            ns.history_age_secs.unwrap_or(age),
        )
    }

    /// The longest any topic keeps its history (seconds): how long the cluster's history
    /// stream keeps an event.
    pub fn history_max_age(&self) -> u64 {
        let rules = self.history.rules.iter().map(|r| r.age_secs);
        let namespaces = self.namespaces.iter().filter_map(|n| n.history_age_secs);
        rules
            .chain(namespaces)
            .fold(self.history.age_secs, u64::max)
    }

    /// The parsed listen address.
    pub fn listen_addr(&self) -> anyhow::Result<SocketAddr> {
        self.server
            .listen
            .parse()
            .with_context(|| format!("server.listen {:?} is not an IP:port", self.server.listen))
    }

    /// The HS256 secret in effect (the development one when unset).
    pub fn jwt_secret(&self) -> &str {
        if self.auth.jwt_secret.is_empty() {
            DEV_JWT_SECRET
        } else {
            &self.auth.jwt_secret
        }
    }

    /// The API key in effect (the development one when unset).
    pub fn api_key(&self) -> &str {
        if self.auth.api_key.is_empty() {
            DEV_API_KEY
        } else {
            &self.auth.api_key
        }
    }

    /// Whether development credentials are in effect.
    pub fn uses_dev_credentials(&self) -> bool {
        (self.auth.jwt_algorithm == JwtAlgorithm::Hs256 && self.auth.jwt_secret.is_empty())
            || self.auth.api_key.is_empty()
    }

    /// Heartbeat interval.
    pub fn heartbeat(&self) -> Duration {
        Duration::from_secs(self.server.heartbeat_secs)
    }
}

fn nets(key: &str, v: &[String]) -> anyhow::Result<Vec<IpNet>> {
    v.iter()
        .map(|s| s.parse().map_err(|e| anyhow::anyhow!("{key}: {e}")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Iterator<Item = (String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<Vec<_>>()
            .into_iter()
    }

    #[test]
    fn defaults_are_valid() {
        let c = Config::load(None, env(&[])).unwrap();
        c.validate().unwrap();
        assert_eq!(c.server.listen, "127.0.0.1:8080");
        assert!(c.uses_dev_credentials());
        assert_eq!(c.jwt_secret(), DEV_JWT_SECRET);
    }

    #[test]
    fn environment_long_and_short_names() {
        let c = Config::load(
            None,
            env(&[
                ("RINGCAST_SERVER_HEARTBEAT_SECS", "5"),
                ("RINGCAST_SERVER_LISTEN", "127.0.0.1:1"),
                ("RINGCAST_LISTEN", "127.0.0.1:2"),
                ("RINGCAST_DIAGNOSTICS_ECHO", "true"),
                ("RINGCAST_AUTH_ALLOWED_ORIGINS", "https://a, https://b"),
                ("OTHER", "x"),
            ]),
        )
        .unwrap();
        assert_eq!(c.server.heartbeat_secs, 5);
        assert_eq!(c.server.listen, "127.0.0.1:2");
        assert!(c.diagnostics.echo);
        assert_eq!(c.auth.allowed_origins, ["https://a", "https://b"]);
        let c = Config::load(
            None,
            env(&[
                ("RINGCAST_HISTORY_RULES", "conversation:=200/60, conv=1/2"),
                ("RINGCAST_DELIVERY_OFFLINE_QUEUE", "7"),
            ]),
        )
        .unwrap();
        assert_eq!(c.history.for_topic("conversation:7"), (200, 60));
        assert_eq!(c.history.for_topic("convo"), (1, 2));
        assert_eq!(c.history.for_topic("other"), (100, 600));
        assert_eq!(c.delivery.offline_queue, 7);
        assert!(Config::load(None, env(&[("RINGCAST_HISTORY_RULES", "x=1")])).is_err());
        assert!(Config::load(None, env(&[("RINGCAST_SERVER_NOPE", "1")])).is_err());
        assert!(Config::load(None, env(&[("RINGCAST_SHARDS", "many")])).is_err());
    }

    #[test]
    fn algorithm_and_log_format_take_only_their_names() {
        let c = Config::load(
            None,
            env(&[
                ("RINGCAST_AUTH_JWT_ALGORITHM", "RS256"),
                ("RINGCAST_LOG_FORMAT", "json"),
            ]),
        )
        .unwrap();
        assert_eq!(
            (c.auth.jwt_algorithm, c.log.format),
            (JwtAlgorithm::Rs256, LogFormat::Json)
        );
        let e = Config::load(None, env(&[("RINGCAST_AUTH_JWT_ALGORITHM", "none")])).unwrap_err();
        assert!(format!("{e:#}").contains("HS256 or RS256"), "{e:#}");
        assert!(Config::load(None, env(&[("RINGCAST_LOG_FORMAT", "xml")])).is_err());
        let bad: Result<Config, _> = toml::from_str("[auth]\njwt_algorithm = \"HS512\"\n");
        assert!(
            bad.is_err(),
            "an algorithm the file names must be one we pin"
        );
    }

    #[test]
    fn cluster_settings_are_checked_when_the_broker_is_nats() {
        let nats = |extra: &[(&str, &str)]| {
            let mut pairs = vec![("RINGCAST_BROKER", "nats")];
            pairs.extend_from_slice(extra);
            Config::load(None, env(&pairs)).and_then(|c| c.validate().map(|()| c))
        };
        let c = nats(&[
            (
                "RINGCAST_NATS_URL",
                "nats://10.0.0.1:4222, nats://10.0.0.2:4222",
            ),
            ("RINGCAST_NODE_ID", "node-1"),
            ("RINGCAST_NATS_PREFIX", "prod_a"),
        ])
        .unwrap();
        assert_eq!(c.broker.kind, BrokerKind::Nats);
        assert_eq!(c.nats.servers.len(), 2);
        assert_eq!(c.node_id(8080), "node-1");
        assert!(nats(&[]).is_ok(), "the default server is local");
        for (key, value, says) in [
            ("RINGCAST_NATS_URL", "", "needs nats.servers"),
            ("RINGCAST_NATS_URL", "http://x:1", "not a NATS URL"),
            ("RINGCAST_NATS_PREFIX", "a.b", "nats.prefix"),
            ("RINGCAST_NODE_ID", "a b", "broker.node_id"),
            ("RINGCAST_NATS_NODE_TIMEOUT_MS", "500", "node_timeout_ms"),
            ("RINGCAST_NATS_REPLICAS", "2", "nats.replicas"),
            ("RINGCAST_NATS_STORAGE", "disk", "nats.storage"),
            ("RINGCAST_NATS_USER", "u", "go together"),
            (
                "RINGCAST_NATS_CREDENTIALS_FILE",
                "/nonexistent.creds",
                "cannot read",
            ),
            (
                "RINGCAST_NATS_TLS_CERT_FILE",
                "/etc/hostname",
                "go together",
            ),
        ] {
            let e = nats(&[(key, value)]).unwrap_err();
            assert!(format!("{e:#}").contains(says), "{key}={value}: {e:#}");
        }
        let both = nats(&[
            ("RINGCAST_NATS_TOKEN", "t"),
            ("RINGCAST_NATS_USER", "u"),
            ("RINGCAST_NATS_PASSWORD", "p"),
        ]);
        assert!(format!("{:#}", both.unwrap_err()).contains("one of"));
        let tls = nats(&[
            ("RINGCAST_NATS_TLS_REQUIRED", "true"),
            ("RINGCAST_NATS_TOKEN", "t"),
        ])
        .unwrap();
        assert!(tls.nats.tls_required);
        let e = Config::load(None, env(&[("RINGCAST_BROKER", "redis")])).unwrap_err();
        assert!(format!("{e:#}").contains("local or nats"), "{e:#}");
        // Unset, the node id comes from the host and the bound port.
        let local = Config::load(None, env(&[])).unwrap();
        assert!(local.node_id(9001).ends_with("-9001"));
    }

    #[test]
    fn the_example_in_deploy_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/ringcast.toml");
        let c = Config::load(Some(&path), env(&[])).unwrap();
        c.validate().unwrap();
        assert_eq!(c.server.drain_grace_secs, 5);
    }

    #[test]
    fn toml_file() {
        let dir = std::env::temp_dir().join(format!("ringcast-cfg-{}", std::process::id()));
        std::fs::write(&dir, "[server]\nshards = 3\n[limits]\nmax_message = 1000\n").unwrap();
        let c = Config::load(Some(&dir), env(&[])).unwrap();
        assert_eq!((c.server.shards, c.limits.max_message), (3, 1000));
        std::fs::write(&dir, "[server]\nshard = 3\n").unwrap();
        assert!(
            Config::load(Some(&dir), env(&[])).is_err(),
            "unknown keys are refused"
        );
        std::fs::remove_file(&dir).unwrap();
    }
}
