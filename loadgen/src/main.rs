//! `ringcast-loadgen`: load generator and capacity reports for ringcast, and for other
//! WebSocket servers in generic target mode.
//!
//! Thread-per-core on glommio like the server; connections spread over several 127.0.0.x
//! source addresses; tokens minted per customer (`c-0..c-N`) from the shared secret. Each
//! scenario is bounded in count and time and writes a JSON summary, `.hgrm` percentile
//! distributions and an HTML report.
#![forbid(unsafe_code)]

mod net;
mod procs;
mod report;
mod scenario;
mod server;
mod stats;

use std::{net::IpAddr, path::PathBuf, process::ExitCode};

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};

use scenario::{fanout::Publisher, Target};

/// Load generator for ringcast and other WebSocket servers.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(flatten)]
    target: TargetArgs,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Args)]
pub(crate) struct TargetArgs {
    /// WebSocket endpoint; several, comma-separated, for the nodes of a cluster (the same
    /// path on each): connections are spread over them in turn.
    #[arg(long, global = true, default_value = "ws://127.0.0.1:8080/v1/ws")]
    url: String,
    /// HS256 secret to mint tokens (default: $RINGCAST_JWT_SECRET, else the development secret).
    #[arg(long, global = true)]
    secret: Option<String>,
    /// Generic target: no token, and no ringcast subscribe frame unless --subscribe-frame.
    #[arg(long, global = true)]
    generic: bool,
    /// Frame sent after connecting; `{topic}` is replaced by the connection's topic and `{i}`
    /// by its index (the `i` of its customer `c-{i}`: a generic server's per-customer channel).
    #[arg(long, global = true)]
    subscribe_frame: Option<String>,
    /// Text a server frame must contain before a connection counts as ready.
    #[arg(long, global = true)]
    ready_match: Option<String>,
    /// Source addresses as a range (127.0.0.2-127.0.0.9) or a list; empty: the kernel picks.
    #[arg(long, global = true, default_value = "127.0.0.2-127.0.0.9")]
    sources: String,
    /// `ws`, or `sse`: subscribers read Server-Sent Events (ringcast: /v1/events/stream with
    /// `topics=<topic>`, used instead of the default /v1/ws path; `chat` needs `ws`).
    #[arg(long, global = true, default_value = "ws", value_parser = ["ws", "sse"])]
    transport: String,
    /// Executor threads (default: one per CPU).
    #[arg(long, global = true)]
    threads: Option<usize>,
    /// Directory for summary.json, *.hgrm and report.html.
    #[arg(long, global = true)]
    out: Option<PathBuf>,
    /// Label of this run in reports.
    #[arg(long, global = true, default_value = "ringcast")]
    label: String,
}

/// Options shared by the traffic scenarios (`fanout`, `unicast`, `chat`).
#[derive(Args)]
struct Traffic {
    /// Subscribers.
    #[arg(long, default_value_t = 1000)]
    subscribers: usize,
    /// Topic.
    #[arg(long, default_value = "loadgen")]
    topic: String,
    /// `fanout` over several topics: subscriber i joins `<topic>:<i mod N>` and event n goes
    /// to `<topic>:<n mod N>`, so each event reaches subscribers / N (which must divide
    /// evenly). 1: every subscriber on `<topic>` itself.
    #[arg(long, default_value_t = 1)]
    topics: usize,
    /// Events per second (total, open loop).
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    /// Bytes of each event's data object.
    #[arg(long, default_value_t = 100)]
    size: usize,
    /// Seconds of publishing.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Concurrent publishing connections.
    #[arg(long, default_value_t = 8)]
    publishers: usize,
    /// Connections per second while ramping the subscribers.
    #[arg(long, default_value_t = 4000.0)]
    connect_rate: f64,
    /// Publish endpoint (default: /v1/publish on the WebSocket host).
    #[arg(long)]
    publish_url: Option<String>,
    /// API key for ringcast's publish endpoint (default: $RINGCAST_API_KEY or the development key).
    #[arg(long)]
    api_key: Option<String>,
    /// Publish body template: {topic} {seq} {ts} {pad}.
    #[arg(long)]
    publish_body: Option<String>,
    /// Extra publish header lines, e.g. 'Authorization: Bearer x'.
    #[arg(long)]
    publish_header: Vec<String>,
    /// Server process ids, comma-separated: their CPU time over the run is reported.
    #[arg(long, value_delimiter = ',')]
    server_pid: Vec<u32>,
    /// Spread the subscribers over this many child processes (one process holds at most its
    /// open-files limit, 20,000 here); this process publishes over HTTP and merges the
    /// children's counts (chat: the children's members publish; rooms never span children).
    #[arg(long, default_value_t = 1)]
    procs: usize,
    /// Internal (set by --procs): index of this process's first subscriber.
    #[arg(long, default_value_t = 0, hide = true)]
    first: usize,
    /// Internal (set by --procs): run as a child of a multi-process run.
    #[arg(long, hide = true)]
    child: bool,
}

#[derive(Subcommand)]
enum Scenario {
    /// Ramp to N connections at R per second and hold them; with --server-pid, RSS per connection.
    Connect {
        /// Connections.
        #[arg(long, default_value_t = 1000)]
        conns: usize,
        /// Connections per second.
        #[arg(long, default_value_t = 2000.0)]
        rate: f64,
        /// Seconds to hold once all are open.
        #[arg(long, default_value_t = 5.0)]
        hold: f64,
        /// Topic each connection subscribes to.
        #[arg(long, default_value = "loadgen")]
        topic: String,
        /// Server process ids, comma-separated (resident memory before and after, summed).
        #[arg(long, value_delimiter = ',')]
        server_pid: Vec<u32>,
        /// Spread the connections over this many processes (one process holds at most its
        /// open-files limit, 20,000 here).
        #[arg(long, default_value_t = 1)]
        procs: usize,
        /// Internal (set by --procs): index of this process's first connection.
        #[arg(long, default_value_t = 0, hide = true)]
        first: usize,
        /// Internal (set by --procs): run as a child of a multi-process run.
        #[arg(long, hide = true)]
        child: bool,
    },
    /// N subscribers on a topic; events of S bytes published at R per second over HTTP.
    Fanout(Traffic),
    /// N customers, each on its own connection; events published to one customer each.
    Unicast(Traffic),
    /// Fan-out during which every subscriber drops and reconnects at once: reconnect time and
    /// what was missed.
    Storm {
        #[command(flatten)]
        traffic: Traffic,
        /// Seconds into publishing when the storm starts.
        #[arg(long, default_value_t = 2.0)]
        at: f64,
    },
    /// Rooms of K members; each member publishes to its room over its WebSocket at R per second.
    Chat {
        #[command(flatten)]
        traffic: Traffic,
        /// Members per room.
        #[arg(long, default_value_t = 10)]
        room_size: usize,
    },
    /// Merge the summaries and latency histograms of earlier runs into one HTML report.
    Report {
        /// Run directories (each with summary.json and latency.hgrm).
        runs: Vec<PathBuf>,
    },
}

fn parse_sources(s: &str) -> anyhow::Result<Vec<IpAddr>> {
    if s.is_empty() {
        return Ok(Vec::new());
    }
    if let Some((a, b)) = s.split_once('-') {
        let (a, b): (std::net::Ipv4Addr, std::net::Ipv4Addr) = (a.parse()?, b.parse()?);
        let (a, b) = (u32::from(a), u32::from(b));
        anyhow::ensure!(
            a <= b && b - a < 256,
            "source range must be ascending and at most 256 addresses"
        );
        return Ok((a..=b).map(|x| IpAddr::V4(x.into())).collect());
    }
    s.split(',')
        .map(|x| x.trim().parse().context("source address"))
        .collect()
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ringcast-loadgen: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let t = &cli.target;
    let threads = t
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let mut nodes = Vec::new();
    for url in t.url.split(',').map(str::trim).filter(|u| !u.is_empty()) {
        let (addr, host, path) = Target::parse_url(url)?;
        nodes.push((addr, host, path));
    }
    let (addr, host, mut path) = nodes.first().cloned().context("--url is empty")?;
    anyhow::ensure!(
        nodes.iter().all(|n| n.2 == path),
        "every --url must have the same path"
    );
    let ringcast = !t.generic;
    let framing = if t.transport == "sse" {
        net::Framing::Sse
    } else {
        net::Framing::WebSocket
    };
    if framing == net::Framing::Sse && ringcast && path == "/v1/ws" {
        path = "/v1/events/stream".into();
    }
    if framing == net::Framing::Sse && matches!(cli.scenario, Scenario::Chat { .. }) {
        anyhow::bail!("chat members publish over their connection: use --transport ws");
    }
    let mut target = Target {
        home: None,
        addr,
        host: host.clone(),
        nodes: nodes.into_iter().map(|(a, h, _)| (a, h)).collect(),
        path,
        secret: ringcast.then(|| {
            t.secret
                .clone()
                .or_else(|| std::env::var("RINGCAST_JWT_SECRET").ok())
                .unwrap_or_else(|| proto::auth::DEV_JWT_SECRET.to_owned())
        }),
        subscribe_frame: t.subscribe_frame.clone().or_else(|| {
            ringcast.then(|| r#"{"type":"subscribe","payload":{"topics":["{topic}"]}}"#.to_owned())
        }),
        ready_match: t
            .ready_match
            .clone()
            .or_else(|| ringcast.then(|| "subscription_confirmed".to_owned())),
        sources: parse_sources(&t.sources)?,
        framing,
        keep_dup: false,
    };
    let (summary, stats) = match cli.scenario {
        Scenario::Connect {
            conns,
            rate,
            hold,
            topic,
            server_pid,
            procs,
            ..
        } if procs > 1 => procs::connect_procs(
            t,
            &target,
            procs::ConnectPlan {
                conns,
                rate,
                hold,
                topic,
                server_pid,
                procs,
            },
        )?,
        Scenario::Connect {
            conns,
            rate,
            hold,
            topic,
            server_pid,
            first,
            child,
            ..
        } => scenario::connect::run(scenario::connect::Args {
            target,
            conns,
            rate,
            hold,
            threads,
            topic,
            server_pid,
            first,
            child,
        })?,
        scenario @ (Scenario::Fanout(_)
        | Scenario::Unicast(_)
        | Scenario::Storm { .. }
        | Scenario::Chat { .. }) => {
            let (mode, tr) = match scenario {
                Scenario::Fanout(tr) => {
                    anyhow::ensure!(
                        tr.topics >= 1 && tr.subscribers % tr.topics == 0,
                        "--topics must divide --subscribers ({} over {})",
                        tr.subscribers,
                        tr.topics
                    );
                    (scenario::fanout::Mode::Topic { topics: tr.topics }, tr)
                }
                Scenario::Unicast(tr) => (scenario::fanout::Mode::Unicast, tr),
                Scenario::Storm { traffic, at } => (scenario::fanout::Mode::Storm { at }, traffic),
                Scenario::Chat { traffic, room_size } => (
                    scenario::fanout::Mode::Chat {
                        room_size,
                        per_member_rate: traffic.rate,
                    },
                    traffic,
                ),
                _ => unreachable!("matched above"),
            };
            let Traffic {
                subscribers,
                topic,
                topics: _,
                rate,
                size,
                duration,
                publishers,
                connect_rate,
                publish_url,
                api_key,
                publish_body,
                mut publish_header,
                server_pid,
                procs,
                first,
                child,
            } = tr;
            // The node that takes the publishes, among several --url nodes: its subscribers'
            // latency is same-node, the others' cross-node.
            if target.nodes.len() > 1 {
                target.home = match &publish_url {
                    None => Some(0),
                    Some(u) => {
                        let (a, _, _) = Target::parse_url(u)?;
                        target.nodes.iter().position(|(n, _)| *n == a)
                    }
                };
            }
            let children = if procs > 1 {
                let (room_size, extra) = match mode {
                    scenario::fanout::Mode::Chat {
                        room_size,
                        per_member_rate,
                    } => (
                        Some(room_size),
                        vec![
                            "--room-size".to_owned(),
                            room_size.to_string(),
                            "--rate".to_owned(),
                            per_member_rate.to_string(),
                            "--size".to_owned(),
                            size.to_string(),
                            "--duration".to_owned(),
                            duration.to_string(),
                        ],
                    ),
                    scenario::fanout::Mode::Storm { at } => {
                        (None, vec!["--at".to_owned(), at.to_string()])
                    }
                    scenario::fanout::Mode::Topic { topics } => {
                        (None, vec!["--topics".to_owned(), topics.to_string()])
                    }
                    _ => (None, Vec::new()),
                };
                // Children count cross-node latency against the same publishing node.
                let mut extra = extra;
                if let Some(u) = &publish_url {
                    extra.extend(["--publish-url".to_owned(), u.clone()]);
                }
                Some(procs::Children::start(
                    t,
                    &target,
                    procs::TrafficPlan {
                        scenario: mode.name(),
                        subscribers,
                        connect_rate,
                        topic: &topic,
                        procs,
                        room_size,
                        extra,
                    },
                )?)
            } else {
                None
            };
            let url = publish_url.unwrap_or_else(|| format!("http://{host}/v1/publish"));
            let rest = url
                .strip_prefix("http://")
                .context("only http:// publish URLs are supported")?;
            let (authority, ppath) = rest
                .split_once('/')
                .map(|(a, p)| (a.to_owned(), format!("/{p}")))
                .unwrap_or((rest.to_owned(), "/".into()));
            let paddr = std::net::ToSocketAddrs::to_socket_addrs(&authority)?
                .next()
                .context("publish address")?;
            if ringcast {
                let key = api_key
                    .or_else(|| std::env::var("RINGCAST_API_KEY").ok())
                    .unwrap_or_else(|| proto::auth::DEV_API_KEY.to_owned());
                publish_header.push(format!("Authorization: Bearer {key}"));
            }
            let body = publish_body.unwrap_or_else(|| match mode {
                scenario::fanout::Mode::Unicast => r#"{"customers":["c-{cust}"],"event":{"type":"lg","data":{"seq":{seq},"ts":{ts},"pad":"{pad}"}}}"#.to_owned(),
                _ => r#"{"topics":["{topic}"],"event":{"type":"lg","data":{"seq":{seq},"ts":{ts},"pad":"{pad}"}}}"#.to_owned(),
            });
            let publisher = Publisher {
                addr: paddr,
                host: authority.clone(),
                path: ppath,
                headers: publish_header,
                body,
            };
            let before = ringcast
                .then(|| server::server_counter(&authority, "ringcast_events_out_total"))
                .flatten();
            let hists_before = if ringcast {
                server::server_histograms(&authority)
            } else {
                None
            };
            let (mut summary, stats) = scenario::fanout::run(scenario::fanout::Args {
                target,
                publisher,
                subscribers,
                connect_rate,
                rate,
                size,
                duration,
                publishers,
                threads,
                topic,
                mode,
                server_pid,
                first,
                children,
                child,
            })?;
            if child {
                println!("{}", procs::child_report(&summary, &stats));
                return Ok(());
            }
            if let (Some(b), Some(a)) = (
                before,
                ringcast
                    .then(|| server::server_counter(&authority, "ringcast_events_out_total"))
                    .flatten(),
            ) {
                summary["server_check"] = serde_json::json!({
                    "server_events_out": a - b,
                    "loadgen_received": summary["received"],
                                        "agree": Some(a - b) == summary["received"].as_u64(),
                });
                if matches!(mode, scenario::fanout::Mode::Storm { .. }) {
                    summary["server_check"]["note"] = serde_json::json!(
                        "in a storm the server also counts frames queued to connections the client was dropping, which it never read"
                    );
                }
            }
            // The server's own view of this run: its histograms after minus before.
            if let (Some(after), Some(before)) = (
                if ringcast {
                    server::server_histograms(&authority)
                } else {
                    None
                },
                hists_before,
            ) {
                let h = after.since(&before);
                summary["server_histograms"] = serde_json::json!({
                    "publish_to_write": stats::Percentiles::from(&h.publish_to_write),
                    "handshake": stats::Percentiles::from(&h.handshake),
                    "publish_answer": stats::Percentiles::from(&h.publish_answer),
                });
                if let Some(dir) = &t.out {
                    std::fs::create_dir_all(dir)?;
                    std::fs::write(
                        dir.join("server-publish-to-write.hgrm"),
                        report::hgrm(&h.publish_to_write),
                    )?;
                }
            }
            (summary, stats)
        }
        Scenario::Report { runs } => {
            let out = t
                .out
                .clone()
                .unwrap_or_else(|| PathBuf::from("loadgen-report"));
            let mut summaries = Vec::new();
            let mut series = Vec::new();
            for dir in &runs {
                let summary: serde_json::Value =
                    serde_json::from_str(&std::fs::read_to_string(dir.join("summary.json"))?)?;
                let hgrm = std::fs::read_to_string(dir.join("latency.hgrm")).unwrap_or_default();
                let timeline = summary["timeline"]
                    .as_array()
                    .map(|a| a.iter().filter_map(|v| v.as_u64()).collect())
                    .unwrap_or_default();
                let label = summary["label"]
                    .as_str()
                    .map_or_else(|| dir.display().to_string(), str::to_owned);
                series.push(report::Series {
                    label,
                    percentiles: report::parse_hgrm(&hgrm),
                    timeline,
                });
                summaries.push(summary);
            }
            std::fs::create_dir_all(&out)?;
            std::fs::write(
                out.join("report.html"),
                report::html("ringcast-loadgen: merged runs", &summaries, &series),
            )?;
            std::fs::write(
                out.join("summary.json"),
                serde_json::to_string_pretty(&summaries)?,
            )?;
            eprintln!("wrote {}", out.join("report.html").display());
            return Ok(());
        }
    };
    let mut summary = summary;
    summary["label"] = serde_json::json!(t.label);
    summary["threads"] = serde_json::json!(threads);
    println!("{}", serde_json::to_string_pretty(&summary)?);
    if let Some(dir) = &t.out {
        report::write(dir, &summary, &stats, &t.label)?;
        eprintln!("wrote {}", dir.display());
    }
    Ok(())
}
