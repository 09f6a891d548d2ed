//! `fanout`: N subscribers on one topic; publishers post events of S bytes at R per second
//! through an HTTP publish endpoint; every event carries a sequence number and its send time.
//! Measures end-to-end latency, deliveries per second, losses, duplicates and reorderings.

use std::{
    cell::RefCell,
    net::SocketAddr,
    rc::Rc,
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering::Relaxed},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::bail;
use serde_json::json;

use super::{ramp, run_threads, Ramp, Target};
use crate::{
    net::Incoming,
    stats::{unix_us, Percentiles, Shared, ThreadStats},
};

/// How events are published.
#[derive(Clone, Debug)]
pub struct Publisher {
    /// Address of the HTTP publish endpoint.
    pub addr: SocketAddr,
    /// `Host` header.
    pub host: String,
    /// Path, e.g. `/v1/publish`.
    pub path: String,
    /// Extra header lines (`Authorization: Bearer ...`).
    pub headers: Vec<String>,
    /// Body template: `{topic}`, `{seq}`, `{ts}` (µs since the epoch) and `{pad}` are replaced.
    pub body: String,
}

/// Parameters of `fanout`.
pub struct Args {
    /// The server.
    pub target: Target,
    /// The publish endpoint.
    pub publisher: Publisher,
    /// Subscribers.
    pub subscribers: usize,
    /// Connections opened per second while ramping.
    pub connect_rate: f64,
    /// Events per second (total, open loop).
    pub rate: f64,
    /// Size in bytes of the event's data object (`{"seq":..,"ts":..,"pad":".."}`).
    pub size: usize,
    /// Seconds of publishing.
    pub duration: f64,
    /// Concurrent publishing connections.
    pub publishers: usize,
    /// Executor threads.
    pub threads: usize,
    /// Topic (the room prefix in chat mode).
    pub topic: String,
    /// Who publishes to whom.
    pub mode: Mode,
    /// Server processes whose CPU time is measured over the publishing phase.
    pub server_pid: Vec<u32>,
    /// Index of this process's first subscriber (customer `c-<first>`).
    pub first: usize,
    /// `--procs`: child processes hold the subscribers; this process publishes.
    pub children: Option<crate::procs::Children>,
    /// Child of a `--procs` run: report `READY` once ramped, receive until the parent's
    /// `DONE <expected>` is met (see `procs::Children`).
    pub child: bool,
}

/// What a traffic run publishes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Mode {
    /// `fanout`: HTTP publishes to topics the subscribers joined: with `topics` = 1 one topic
    /// every subscriber joined; with N, subscriber i joins topic `i mod N` and event n goes to
    /// topic `n mod N`.
    Topic {
        /// Topics the subscribers are spread over.
        topics: usize,
    },
    /// `unicast`: HTTP publishes to one customer each (`{cust}` in the body: `seq % N`).
    Unicast,
    /// `storm`: like `Topic`, and `at` seconds into publishing every subscriber drops its
    /// connection at once and reconnects immediately.
    Storm {
        /// Seconds into the publishing phase.
        at: f64,
    },
    /// `chat`: rooms of `room_size` members; every member publishes to its room over its own
    /// WebSocket at `per_member_rate` events per second.
    Chat {
        /// Members per room.
        room_size: usize,
        /// Events per second per member.
        per_member_rate: f64,
    },
}

impl Mode {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Mode::Topic { .. } => "fanout",
            Mode::Storm { .. } => "storm",
            Mode::Unicast => "unicast",
            Mode::Chat { .. } => "chat",
        }
    }

    /// Topics the subscribers are spread over (1 for every mode but `fanout --topics N`).
    pub(crate) fn topics(self) -> usize {
        match self {
            Mode::Topic { topics } => topics,
            _ => 1,
        }
    }
}

/// The reconnect storm's shared state.
#[derive(Default)]
struct Storm {
    /// Set when every subscriber must drop and reconnect.
    go: AtomicBool,
    /// When `go` was set (µs since the epoch).
    started_us: AtomicU64,
    /// Subscribers connected again.
    reconnected: AtomicU64,
    /// When the last one finished (µs since the epoch).
    last_reconnect_us: AtomicU64,
}

/// How a subscriber reconnects in a storm.
struct Redial {
    target: Target,
    index: usize,
    topic: String,
    storm: Arc<Storm>,
}

/// A member's publishing plan in chat mode.
#[derive(Clone)]
struct ChatPlan {
    rate: f64,
    size: usize,
    duration: f64,
    phase: Arc<AtomicU8>,
    seq: Arc<AtomicU64>,
}

/// Longest wait, after publishing ends, for deliveries still in flight.
const DRAIN_SECS: u64 = 15;

const WAITING: u8 = 0;
const PUBLISHING: u8 = 1;
const DONE: u8 = 2;

/// Runs the scenario.
pub fn run(mut args: Args) -> anyhow::Result<(serde_json::Value, ThreadStats)> {
    let shared = Arc::new(Shared::new());
    let mut children = args.children.take();
    if let Some(ch) = &children {
        let (connected, errors) = ch.ramped();
        shared.connected.fetch_add(connected, Relaxed);
        shared.connect_errors.fetch_add(errors, Relaxed);
    }
    // With children, they hold the subscribers: this process only publishes.
    let local_subs = if children.is_some() {
        0
    } else {
        args.subscribers
    };
    let first = args.first;
    let phase = Arc::new(AtomicU8::new(WAITING));
    let stop = Arc::new(AtomicBool::new(false));
    let seq = Arc::new(AtomicU64::new(0));
    let publish_started_us = Arc::new(AtomicU64::new(0));
    let storm = Arc::new(Storm::default());
    let threads = args.threads;
    // Subscribers that only read leave glommio after their handshake for a `mio` loop on
    // their thread (see `receive_plain`); chat members send and storm subscribers redial, so
    // they stay tasks.
    let plain = matches!(args.mode, Mode::Topic { .. } | Mode::Unicast);
    args.target.keep_dup = plain;
    let worker = {
        let (shared, phase, stop, seq) = (shared.clone(), phase.clone(), stop.clone(), seq.clone());
        let storm = storm.clone();
        let (target, topic) = (args.target.clone(), args.topic.clone());
        let mode = args.mode;
        let (subs, connect_rate, size, duration) =
            (local_subs, args.connect_rate, args.size, args.duration);
        std::thread::spawn(move || {
            run_threads(threads, move |t| {
                let (shared, phase, stop, seq) =
                    (shared.clone(), phase.clone(), stop.clone(), seq.clone());
                let (target, topic) = (target.clone(), topic.clone());
                let storm = storm.clone();
                async move {
                    let stats = Rc::new(RefCell::new(ThreadStats::default()));
                    glommio::spawn_local(count_task(shared.clone(), stats.clone(), stop.clone()))
                        .detach();
                    let chat = match mode {
                        Mode::Chat {
                            per_member_rate, ..
                        } => Some(ChatPlan {
                            rate: per_member_rate,
                            size,
                            duration,
                            phase: phase.clone(),
                            seq: seq.clone(),
                        }),
                        _ => None,
                    };
                    let plains = RefCell::new(Vec::new());
                    let receive = |i: usize, client: crate::net::Client| {
                        if plain {
                            match client.into_plain() {
                                Ok(p) => plains.borrow_mut().push(p),
                                Err(e) => {
                                    if shared.connect_errors.fetch_add(1, Relaxed) < 5 {
                                        eprintln!("subscriber {i}: {e:#}");
                                    }
                                }
                            }
                            return;
                        }
                        let room = match mode {
                            Mode::Chat { room_size, .. } => {
                                format!("{topic}:{}", i / room_size.max(1))
                            }
                            _ => topic.clone(),
                        };
                        let redial = matches!(mode, Mode::Storm { .. }).then(|| Redial {
                            target: target.clone(),
                            index: i,
                            topic: room.clone(),
                            storm: storm.clone(),
                        });
                        glommio::spawn_local(receiver(
                            client,
                            shared.clone(),
                            stats.clone(),
                            stop.clone(),
                            chat.clone().map(|c| (c, room, i)),
                            redial,
                        ))
                        .detach();
                    };
                    ramp(
                        &target,
                        &shared,
                        &stats,
                        Ramp {
                            n: subs,
                            rate: connect_rate,
                            topic: &topic,
                            thread: (t, threads),
                            room_size: match mode {
                                Mode::Chat { room_size, .. } => Some(room_size),
                                _ => None,
                            },
                            topics: mode.topics(),
                            first,
                        },
                        receive,
                    )
                    .await;
                    let plains = plains.into_inner();
                    if !plains.is_empty() {
                        // Blocks this executor: nothing else runs on it from here on.
                        receive_plain(plains, &shared, &stats, &stop);
                    }
                    while !stop.load(Relaxed) {
                        glommio::timer::sleep(Duration::from_millis(50)).await;
                    }
                    count(&shared);
                    let snapshot = stats.borrow().snapshot();
                    snapshot
                }
            })
        })
    };
    // Publishers: one OS thread each, with blocking I/O, off the executors that read the
    // subscribers. On an executor, a publisher's timer and its response waited behind bursts
    // of deliveries, which made the POST round trip (and with it the publish rate of a
    // closed-loop publisher) depend on how busy the receiving side was.
    let publishers = if matches!(args.mode, Mode::Chat { .. }) {
        0
    } else {
        args.publishers
    };
    let publisher_threads: Vec<_> = (0..publishers)
        .map(|index| {
            let per_publisher = args.rate / publishers as f64;
            // Publisher `index` starts `index/publishers` of an interval late, so events
            // arrive evenly rather than in bursts.
            let offset = Duration::from_secs_f64(
                index as f64 / publishers as f64 / per_publisher.max(0.001),
            );
            let plan = PublishPlan {
                offset,
                publisher: args.publisher.clone(),
                topic: args.topic.clone(),
                topics: args.mode.topics(),
                rate: per_publisher,
                customers: args.subscribers,
                size: args.size,
                duration: args.duration,
            };
            let (shared, phase, seq) = (shared.clone(), phase.clone(), seq.clone());
            std::thread::Builder::new()
                .name(format!("publisher-{index}"))
                .spawn(move || publish_loop(plan, &shared, &phase, &seq))
        })
        .collect::<Result<_, _>>()?;
    // Main thread: wait for every subscriber, publish for the duration, then drain.
    let mut child_stats = ThreadStats::default();
    let mut child_error = None;
    let parent = args.child.then(crate::procs::watch_parent);
    let mut child_storms = Vec::new();
    let mut ready_sent = false;
    let mut publishing_since: Option<Instant> = None;
    let mut drain_since: Option<Instant> = None;
    let mut ramp_secs = 0.0;
    let mut cpu_start = None;
    crate::stats::progress(&shared, "fanout", || {
        let attempted =
            (shared.connected.load(Relaxed) + shared.connect_errors.load(Relaxed)) as usize;
        if args.child {
            // A child holds subscribers only: ready, then receive until the parent's count.
            if !ready_sent && attempted >= args.subscribers {
                ready_sent = true;
                crate::procs::report_ready(&shared);
            }
            let signals = parent.as_ref().expect("set for children");
            if publishing_since.is_none() && signals.go.load(Relaxed) {
                // Chat members start sending; the storm clock starts.
                publishing_since = Some(Instant::now());
                phase.store(PUBLISHING, Relaxed);
            }
            if let (Some(p), Mode::Storm { at }) = (publishing_since, args.mode) {
                if !storm.go.load(Relaxed) && p.elapsed().as_secs_f64() >= at {
                    storm.started_us.store(unix_us(), Relaxed);
                    storm.go.store(true, Relaxed);
                }
            }
            let expected = match signals.expected.load(Relaxed) {
                u64::MAX => return false,
                crate::procs::SELF => {
                    shared.published.load(Relaxed)
                        * fanout_of(args.mode, shared.connected.load(Relaxed))
                }
                n => n,
            };
            let d = *drain_since.get_or_insert_with(|| {
                phase.store(DONE, Relaxed);
                Instant::now()
            });
            let storm_done = !matches!(args.mode, Mode::Storm { .. })
                || storm.reconnected.load(Relaxed) >= shared.connected.load(Relaxed);
            return (shared.received.load(Relaxed) >= expected && storm_done)
                || d.elapsed() > Duration::from_secs(DRAIN_SECS);
        }
        if publishing_since.is_none() && attempted >= args.subscribers {
            ramp_secs = shared.start.elapsed().as_secs_f64();
            publish_started_us.store(unix_us(), Relaxed);
            publishing_since = Some(Instant::now());
            cpu_start = cpu_ticks(&args.server_pid);
            phase.store(PUBLISHING, Relaxed);
            if let Some(ch) = children.as_mut() {
                if let Err(e) = ch.go() {
                    child_error = Some(e);
                    return true;
                }
            }
        }
        if let (Some(p), Mode::Storm { at }) = (publishing_since, args.mode) {
            if !storm.go.load(Relaxed) && p.elapsed().as_secs_f64() >= at {
                storm.started_us.store(unix_us(), Relaxed);
                storm.go.store(true, Relaxed);
            }
        }
        if let Some(p) = publishing_since {
            if drain_since.is_none() && p.elapsed().as_secs_f64() >= args.duration + 0.05 {
                phase.store(DONE, Relaxed);
                drain_since = Some(Instant::now());
            }
        }
        if let (Some(_), Some(ch)) = (drain_since, children.as_mut()) {
            if shared.publishers_active.load(Relaxed) > 0 {
                return false;
            }
            // The children drain themselves (bounded by the same window) and report.
            match ch.finish(
                shared.published.load(Relaxed),
                args.mode.name(),
                &shared,
                &mut child_stats,
            ) {
                Ok(storms) => child_storms = storms,
                Err(e) => child_error = Some(e),
            }
            return true;
        }
        if let Some(d) = drain_since {
            let expected = shared.published.load(Relaxed)
                * fanout_of(args.mode, shared.connected.load(Relaxed));
            let storm_done = !matches!(args.mode, Mode::Storm { .. })
                || storm.reconnected.load(Relaxed) >= shared.connected.load(Relaxed);
            // Publishes still in flight may add deliveries: the drain waits for them.
            let publishing = shared.publishers_active.load(Relaxed) > 0;
            return (!publishing && shared.received.load(Relaxed) >= expected && storm_done)
                || d.elapsed() > Duration::from_secs(DRAIN_SECS);
        }
        false
    });
    let publish_secs = publishing_since.map_or(0.0, |p| p.elapsed().as_secs_f64());
    // Server CPU over publishing and drain: the efficiency figure that stays fair when client
    // and server share the machine (deliveries per second of server CPU).
    let server_cpu = match (cpu_start, cpu_ticks(&args.server_pid)) {
        (Some(a), Some(b)) => Some((b - a) as f64 / CLOCK_TICKS),
        _ => None,
    };
    stop.store(true, Relaxed);
    let mut stats = worker
        .join()
        .map_err(|_| anyhow::anyhow!("worker thread panicked"))??;
    for t in publisher_threads {
        let publish = t
            .join()
            .map_err(|_| anyhow::anyhow!("publisher thread panicked"))?;
        stats.merge(&publish);
    }
    if let Some(e) = child_error {
        return Err(e.context("collecting the child processes' counts"));
    }
    stats.merge(&child_stats);
    let published = shared.published.load(Relaxed);
    let connected = shared.connected.load(Relaxed);
    let received = shared.received.load(Relaxed);
    let expected = published * fanout_of(args.mode, connected);
    let active = args.duration.max(0.001);
    let summary = json!({
                "scenario": args.mode.name(),
        "topics": args.mode.topics(),
        "subscribers": {"requested": args.subscribers, "connected": connected, "errors": shared.connect_errors.load(Relaxed), "closed_by_server": shared.closed.load(Relaxed)},
        "ramp_seconds": (ramp_secs * 100.0f64).round() / 100.0,
        "offered_events_per_second": args.rate,
        "event_data_bytes": args.size,
        "published": published,
        "publish_errors": shared.publish_errors.load(Relaxed),
        "published_per_second": (published as f64 / active).round(),
        "expected_deliveries": expected,
        "received": received,
                // Not received by the end of the drain window: dropped, or still in flight (for ringcast,
        // `server_check` tells which).
        "missing": expected.saturating_sub(received),
        "duplicates": shared.duplicates.load(Relaxed),
        "reorders": shared.reorders.load(Relaxed),
        "gaps": shared.gaps.load(Relaxed),
                "deliveries_per_second": (received as f64 / active).round(),
        "server_cpu_seconds": server_cpu.map(|c| (c * 100.0).round() / 100.0),
                "deliveries_per_server_cpu_second": server_cpu.filter(|c| *c > 0.0).map(|c| (received as f64 / c).round()),
        // CPU a host needs for a delivery rate, at this run's efficiency and event size.
        "capacity": server_cpu.filter(|c| *c > 0.0 && received > 0).map(|c| {
            let per_cpu_second = received as f64 / c;
            json!({
                "deliveries_per_server_cpu_second": per_cpu_second.round(),
                "cores_for_100k_deliveries_per_second": (100_000.0 / per_cpu_second * 100.0).round() / 100.0,
                "cores_for_1m_deliveries_per_second": (1_000_000.0 / per_cpu_second * 100.0).round() / 100.0,
                "at_p99_ms": (stats.latency.value_at_quantile(0.99) as f64 / 10.0).round() / 100.0,
            })
        }),
        "wall_seconds_publish_and_drain": (publish_secs * 100.0).round() / 100.0,
        "latency": Percentiles::from(&stats.latency),
        // Subscribers on other cluster nodes than the publishers' (several --url).
        "cross_node_latency": (!stats.cross_node.is_empty()).then(|| Percentiles::from(&stats.cross_node)),
        "publish_round_trip": Percentiles::from(&stats.publish),
        "handshake": Percentiles::from(&stats.handshake),
        "timeline": timeline(&shared),
    });
    let mut summary = summary;
    if matches!(args.mode, Mode::Storm { .. }) {
        let (started, last) = (
            storm.started_us.load(Relaxed),
            storm.last_reconnect_us.load(Relaxed),
        );
        summary["storm"] = json!({
            "reconnected": storm.reconnected.load(Relaxed),
            "of": connected,
            "seconds_to_reconnect_all": if last > started { ((last - started) as f64 / 1e4).round() / 100.0 } else { 0.0 },
            "reconnect": Percentiles::from(&stats.reconnect),
            // No recovery yet (the reliable-delivery release): what a client missed while away.
            "missed_events": expected.saturating_sub(received),
            "missed_per_connection": if connected > 0 { ((expected.saturating_sub(received)) as f64 / connected as f64 * 100.0).round() / 100.0 } else { 0.0 },
        });
        if !child_storms.is_empty() {
            // The children dropped and reconnected the subscribers, each on its own clock.
            let sum = |k: &str| {
                child_storms
                    .iter()
                    .filter_map(|s| s[k].as_u64())
                    .sum::<u64>()
            };
            let slowest = child_storms
                .iter()
                .filter_map(|s| s["seconds_to_reconnect_all"].as_f64())
                .fold(0.0, f64::max);
            summary["storm"]["reconnected"] = json!(sum("reconnected"));
            summary["storm"]["seconds_to_reconnect_all"] = json!(slowest);
        }
    }
    Ok((summary, stats))
}

/// `sysconf(_SC_CLK_TCK)` on Linux, the unit of `/proc/<pid>/stat` times.
const CLOCK_TICKS: f64 = 100.0;

/// User + system CPU ticks of processes (None if none given or one is gone).
fn cpu_ticks(pids: &[u32]) -> Option<u64> {
    if pids.is_empty() {
        return None;
    }
    pids.iter()
        .map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // Fields after the parenthesised command name: utime and stime are the 12th and 13th.
            let rest = &stat[stat.rfind(')')? + 2..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .sum()
}

/// Receivers per published event.
fn fanout_of(mode: Mode, connected: u64) -> u64 {
    match mode {
        Mode::Topic { topics } => connected / topics.max(1) as u64,
        Mode::Storm { .. } => connected,
        Mode::Unicast => 1,
        Mode::Chat { room_size, .. } => room_size as u64,
    }
}

/// Deliveries per second of the run, trimmed of trailing zeros.
fn timeline(shared: &Shared) -> Vec<u64> {
    let mut v: Vec<u64> = shared.timeline.iter().map(|a| a.load(Relaxed)).collect();
    while v.last() == Some(&0) {
        v.pop();
    }
    v
}

thread_local! {
    /// Deliveries read on this thread and not yet added to `Shared::received`.
    static UNCOUNTED: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Adds this thread's uncounted deliveries to the shared counters.
fn count(shared: &Shared) {
    let n = UNCOUNTED.replace(0);
    if n > 0 {
        shared.received.fetch_add(n, Relaxed);
        shared.tick_n(n);
    }
}

/// Per thread: folds the receivers' counts into the shared ones every 2 ms and publishes the
/// thread's p99 once a second (for the progress line), until `stop`.
async fn count_task(shared: Arc<Shared>, stats: Rc<RefCell<ThreadStats>>, stop: Arc<AtomicBool>) {
    let mut p99_at = Instant::now();
    while !stop.load(Relaxed) {
        glommio::timer::sleep(Duration::from_millis(2)).await;
        count(&shared);
        if p99_at.elapsed() >= Duration::from_secs(1) {
            p99_at = Instant::now();
            let p99 = stats.borrow().latency.value_at_quantile(0.99);
            shared.recent_p99_us.store(p99, Relaxed);
        }
    }
}

async fn receiver(
    mut client: crate::net::Client,
    shared: Arc<Shared>,
    stats: Rc<RefCell<ThreadStats>>,
    stop: Arc<AtomicBool>,
    chat: Option<(ChatPlan, String, usize)>,
    mut redial: Option<Redial>,
) {
    // Chat: this member's publishing schedule (open loop), started with the publishing phase.
    let mut sending: Option<(Instant, u32)> = None;
    let pad = chat
        .as_ref()
        .map(|(c, _, _)| {
            "x".repeat(
                c.size
                    .saturating_sub(r#"{"seq":1000000,"ts":1700000000000000,"pad":""}"#.len()),
            )
        })
        .unwrap_or_default();
    let mut last_offset: Option<u64> = None;
    let fields = crate::net::Fields::new();
    while !stop.load(Relaxed) {
        let mut due = None;
        if let Some((plan, room, member)) = &chat {
            match (plan.phase.load(Relaxed), sending) {
                (PUBLISHING, None) => {
                    // Members are spread over the interval (golden-ratio offsets), not in step.
                    let offset = (*member as f64 * 0.618_033_988_7).fract() / plan.rate.max(0.001);
                    sending = Some((Instant::now() + Duration::from_secs_f64(offset), 0));
                    continue;
                }
                (PUBLISHING, Some((start, k)))
                    if f64::from(k) / plan.rate.max(0.001) < plan.duration =>
                {
                    let at = start + Duration::from_secs_f64(f64::from(k) / plan.rate.max(0.001));
                    if at <= Instant::now() {
                        let n = plan.seq.fetch_add(1, Relaxed) + 1;
                        let frame = format!(
                            r#"{{"type":"publish","payload":{{"topic":"{room}","type":"chat","data":{{"seq":{n},"ts":{},"pad":"{pad}"}}}}}}"#,
                            unix_us()
                        );
                        if client
                            .send(proto::ws::OpCode::Text, frame.as_bytes())
                            .await
                            .is_ok()
                        {
                            shared.published.fetch_add(1, Relaxed);
                        } else {
                            shared.publish_errors.fetch_add(1, Relaxed);
                        }
                        sending = Some((start, k + 1));
                        continue;
                    }
                    due = Some(at);
                }
                (WAITING, _) => due = Some(Instant::now() + Duration::from_millis(20)),
                _ => {}
            }
        }
        if let Some(r) = &redial {
            if r.storm.go.load(Relaxed) {
                let r = redial.take().expect("checked");
                let began = Instant::now();
                drop(client);
                match r.target.open(r.index, &r.topic, &stats).await {
                    Ok(c) => {
                        client = c;
                        let us = (began.elapsed().as_micros() as u64).max(1);
                        let _ = stats.borrow_mut().reconnect.record(us);
                        r.storm.reconnected.fetch_add(1, Relaxed);
                        r.storm.last_reconnect_us.fetch_max(unix_us(), Relaxed);
                        continue;
                    }
                    Err(e) => {
                        if shared.connect_errors.fetch_add(1, Relaxed) < 5 {
                            eprintln!("reconnect {}: {e:#}", r.index);
                        }
                        return;
                    }
                }
            }
            // Wake up regularly to notice the storm.
            due = Some(
                due.map_or(Instant::now() + Duration::from_millis(20), |d: Instant| {
                    d.min(Instant::now() + Duration::from_millis(20))
                }),
            );
        }
        let filled = match due {
            // Wait for data or for the next send, whichever comes first.
            Some(at) => {
                futures_lite::future::or(async { Some(client.fill().await) }, async {
                    glommio::timer::sleep(at.saturating_duration_since(Instant::now())).await;
                    None
                })
                .await
            }
            None => Some(client.fill().await),
        };
        match filled {
            None => continue,
            Some(Ok(true)) => {}
            Some(_) => {
                shared.closed.fetch_add(1, Relaxed);
                return;
            }
        }
        let now = unix_us();
        let mut batch = Batch::default();
        let res = {
            let mut st = stats.borrow_mut();
            let remote = client.remote;
            client
                .drain(|m| batch.take(m, now, &fields, &mut st, &shared, &mut last_offset, remote))
        };
        let (pongs, close_code) = (batch.pongs, batch.close);
        if let Some(code) = close_code {
            if shared.closed.fetch_add(1, Relaxed) < 5 {
                eprintln!("server closed a subscriber with {code}");
            }
            return;
        }
        if res.is_err() {
            shared.closed.fetch_add(1, Relaxed);
            return;
        }
        for p in pongs {
            let _ = client.send(proto::ws::OpCode::Pong, &p).await;
        }
    }
}

/// The receive loop of subscribers that only read: one `mio` poll set per thread, each ready
/// socket read until it would block, every event timed as its bytes come in. Counts go to the
/// shared counters every 2 ms (this loop blocks the executor, so `count_task` cannot run).
fn receive_plain(
    mut conns: Vec<crate::net::Plain>,
    shared: &Shared,
    stats: &RefCell<ThreadStats>,
    stop: &AtomicBool,
) {
    use mio::{Events, Interest, Poll, Token};
    let mut poll = match Poll::new() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("mio poll: {e}");
            return;
        }
    };
    for (i, c) in conns.iter_mut().enumerate() {
        if let Err(e) = poll
            .registry()
            .register(&mut c.stream, Token(i), Interest::READABLE)
        {
            eprintln!("mio register: {e}");
            return;
        }
    }
    let fields = crate::net::Fields::new();
    let mut last_offset: Vec<Option<u64>> = vec![None; conns.len()];
    let mut open = vec![true; conns.len()];
    let mut events = Events::with_capacity(1024);
    let mut counted_at = Instant::now();
    let mut p99_at = Instant::now();
    let mut mask: u32 = 0x9E37_79B9;
    // Bytes the server sent before the loop started (greeting, confirmation) are decoded
    // first; a socket with more already waiting is reported ready by the first poll.
    let mut ready: Vec<usize> = (0..conns.len()).collect();
    while !stop.load(Relaxed) {
        for &i in &ready {
            if !open[i] {
                continue;
            }
            let c = &mut conns[i];
            let mut ended = false;
            loop {
                let done = match c.read_some() {
                    Ok(0) => {
                        ended = true;
                        true
                    }
                    Ok(_) => false,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => true,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(_) => {
                        ended = true;
                        true
                    }
                };
                let now = unix_us();
                let mut batch = Batch::default();
                let last = &mut last_offset[i];
                let remote = c.remote;
                let res = {
                    let mut st = stats.borrow_mut();
                    c.drain(|m| batch.take(m, now, &fields, &mut st, shared, last, remote))
                };
                let (pongs, close_code) = (batch.pongs, batch.close);
                for p in pongs {
                    mask ^= mask << 13;
                    mask ^= mask >> 17;
                    mask ^= mask << 5;
                    c.pong(&p, mask.to_le_bytes());
                }
                if let Some(code) = close_code {
                    if shared.closed.fetch_add(1, Relaxed) < 5 {
                        eprintln!("server closed a subscriber with {code}");
                    }
                    open[i] = false;
                    break;
                }
                if res.is_err() || ended {
                    shared.closed.fetch_add(1, Relaxed);
                    open[i] = false;
                    break;
                }
                if done {
                    break;
                }
            }
            if !open[i] {
                let _ = poll.registry().deregister(&mut c.stream);
            }
        }
        if counted_at.elapsed() >= Duration::from_millis(2) {
            counted_at = Instant::now();
            count(shared);
            if p99_at.elapsed() >= Duration::from_secs(1) {
                p99_at = Instant::now();
                let p99 = stats.borrow().latency.value_at_quantile(0.99);
                shared.recent_p99_us.store(p99, Relaxed);
            }
        }
        if let Err(e) = poll.poll(&mut events, Some(Duration::from_millis(2))) {
            if e.kind() != std::io::ErrorKind::Interrupted {
                eprintln!("mio poll: {e}");
                return;
            }
        }
        ready.clear();
        ready.extend(events.iter().map(|e| e.token().0));
    }
    count(shared);
}

/// What one read of a subscriber held, besides the events it timed.
#[derive(Default)]
struct Batch {
    /// Pings to answer.
    pongs: Vec<Vec<u8>>,
    /// The server closed with this code.
    close: Option<u16>,
}

impl Batch {
    /// One decoded message: an event is timed (arrival `now`, µs) and order-checked, and
    /// counted on this thread (`count` adds the thread's counts to the shared ones every few
    /// milliseconds, so threads do not contend for one cache line per read).
    #[allow(clippy::too_many_arguments)]
    fn take(
        &mut self,
        m: Incoming<'_>,
        now: u64,
        fields: &crate::net::Fields,
        st: &mut ThreadStats,
        shared: &Shared,
        last: &mut Option<u64>,
        remote: bool,
    ) {
        match m {
            Incoming::Text(t) => {
                let Some(ts) = fields.ts(t) else { return };
                let us = now.saturating_sub(ts).max(1);
                let _ = st.latency.record(us);
                if remote {
                    let _ = st.cross_node.record(us);
                }
                UNCOUNTED.set(UNCOUNTED.get() + 1);
                // Servers that number a topic's events (ringcast's `offset`) are checked for
                // order: each subscriber must see offsets rise by exactly one.
                if let Some(off) = fields.offset(t) {
                    check_order(shared, last, off);
                }
            }
            Incoming::Ping(p) => self.pongs.push(p.to_vec()),
            Incoming::Close(code) => self.close = Some(code),
            Incoming::Other => {}
        }
    }
}

/// Checks a ringcast topic offset against the subscriber's last one: each must rise by exactly
/// one.
fn check_order(shared: &Shared, last: &mut Option<u64>, off: u64) {
    match *last {
        Some(prev) if off == prev => {
            shared.duplicates.fetch_add(1, Relaxed);
        }
        Some(prev) if off < prev => {
            shared.reorders.fetch_add(1, Relaxed);
        }
        Some(prev) if off > prev + 1 => {
            shared.gaps.fetch_add(off - prev - 1, Relaxed);
        }
        _ => {}
    }
    *last = Some(last.map_or(off, |p| p.max(off)));
}

/// One publisher's schedule.
struct PublishPlan {
    offset: Duration,
    publisher: Publisher,
    topic: String,
    /// Event n goes to `<topic>:<n mod topics>` when there are several.
    topics: usize,
    /// Publishes per second of this publisher.
    rate: f64,
    customers: usize,
    size: usize,
    duration: f64,
}

/// A publisher (its own OS thread): POSTs at its planned times over one keep-alive
/// connection, each after the previous response (a closed loop per connection, as most HTTP
/// clients publish). A publish that is late leaves at once; the send time in the body is read
/// just before the request is written. Returns its POST round-trip histogram.
fn publish_loop(
    plan: PublishPlan,
    shared: &Shared,
    phase: &AtomicU8,
    seq: &AtomicU64,
) -> ThreadStats {
    let mut stats = ThreadStats::default();
    while phase.load(Relaxed) == WAITING {
        std::thread::sleep(Duration::from_millis(2));
    }
    let p = &plan.publisher;
    let mut conn: Option<std::net::TcpStream> = None;
    let start = Instant::now() + plan.offset;
    let interval = Duration::from_secs_f64(1.0 / plan.rate.max(0.001));
    let mut k: u32 = 0;
    // `{"seq":N,"ts":T,"pad":"…"}` sized to `size` bytes with typical N and T widths.
    let pad_len = plan
        .size
        .saturating_sub(r#"{"seq":1000000,"ts":1700000000000000,"pad":""}"#.len());
    let pad = "x".repeat(pad_len);
    let mut buf = vec![0u8; 8192];
    shared.publishers_active.fetch_add(1, Relaxed);
    loop {
        let due = start + interval * k;
        k += 1;
        // Every send is scheduled inside the publishing window; none starts after it.
        if (due - start).as_secs_f64() >= plan.duration || phase.load(Relaxed) != PUBLISHING {
            break;
        }
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        if phase.load(Relaxed) != PUBLISHING {
            break;
        }
        let n = seq.fetch_add(1, Relaxed) + 1;
        let topic = if plan.topics > 1 {
            format!("{}:{}", plan.topic, n % plan.topics as u64)
        } else {
            plan.topic.clone()
        };
        let body = p
            .body
            .replace("{topic}", &topic)
            .replace("{seq}", &n.to_string())
            .replace("{cust}", &(n % plan.customers.max(1) as u64).to_string())
            .replace("{pad}", &pad);
        let body = body.replace("{ts}", &unix_us().to_string());
        let t0 = Instant::now();
        match publish_once(p, &mut conn, &body, &mut buf) {
            Ok(()) => {
                shared.published.fetch_add(1, Relaxed);
                let _ = stats
                    .publish
                    .record((t0.elapsed().as_micros() as u64).max(1));
            }
            Err(e) => {
                conn = None;
                if shared.publish_errors.fetch_add(1, Relaxed) < 5 {
                    eprintln!("publish: {e:#}");
                }
            }
        }
    }
    shared.publishers_active.fetch_sub(1, Relaxed);
    stats
}

/// One request on a keep-alive connection; reconnects when needed. Only 2xx counts.
fn publish_once(
    p: &Publisher,
    conn: &mut Option<std::net::TcpStream>,
    body: &str,
    buf: &mut [u8],
) -> anyhow::Result<()> {
    use std::io::{Read as _, Write as _};
    if conn.is_none() {
        let s = std::net::TcpStream::connect_timeout(&p.addr, Duration::from_secs(10))
            .map_err(|e| anyhow::anyhow!("connecting to the publish endpoint: {e}"))?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        *conn = Some(s);
    }
    let stream = conn.as_mut().expect("just set");
    let mut req = format!(
        "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        p.path,
        p.host,
        body.len()
    );
    for h in &p.headers {
        req.push_str(h);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    req.push_str(body);
    stream.write_all(req.as_bytes())?;
    let mut got = Vec::new();
    loop {
        let n = stream.read(buf)?;
        if n == 0 {
            bail!("publish connection closed");
        }
        got.extend_from_slice(&buf[..n]);
        if let Some(i) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&got[..i]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if got.len() >= i + 4 + len {
                let status = head.split_whitespace().nth(1).unwrap_or("");
                if !status.starts_with('2') {
                    bail!(
                        "publish answered {status}: {}",
                        String::from_utf8_lossy(&got[i + 4..])
                    );
                }
                if head.contains("connection: close") {
                    *conn = None;
                }
                return Ok(());
            }
        }
    }
}
