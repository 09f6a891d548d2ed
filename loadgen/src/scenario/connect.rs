//! `connect`: ramp to N connections at R per second, hold them, measure handshakes and the
//! server's resident memory per connection.

use std::{
    cell::RefCell,
    rc::Rc,
    sync::{
        atomic::{AtomicBool, Ordering::Relaxed},
        Arc,
    },
    time::Duration,
};

use serde_json::json;

use super::{ramp, run_threads, Ramp, Target};
use crate::{
    net::Incoming,
    stats::{Percentiles, Shared, ThreadStats},
};

/// Parameters of `connect`.
pub struct Args {
    /// The server.
    pub target: Target,
    /// Connections to open.
    pub conns: usize,
    /// Connections per second (total).
    pub rate: f64,
    /// Seconds to hold them once all are open.
    pub hold: f64,
    /// Executor threads.
    pub threads: usize,
    /// Topic to subscribe to (with the target's subscribe frame), if any.
    pub topic: String,
    /// Server processes to read RSS from (summed: e.g. nginx workers).
    pub server_pid: Vec<u32>,
    /// First connection index (disjoint ranges per process).
    pub first: usize,
    /// Child of a `--procs` run: print `READY` once ramped and hold until stdin closes.
    pub child: bool,
}

/// Summed resident set size of processes, KiB (None if there are none or one is gone).
pub fn rss_sum_kib(pids: &[u32]) -> Option<u64> {
    if pids.is_empty() {
        return None;
    }
    pids.iter().map(|&p| rss_kib(p)).sum()
}

/// Resident set size of a process in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Runs the scenario; returns the JSON summary and the merged histograms.
pub fn run(args: Args) -> anyhow::Result<(serde_json::Value, ThreadStats)> {
    let shared = Arc::new(Shared::new());
    let stop = Arc::new(AtomicBool::new(false));
    let rss_before = rss_sum_kib(&args.server_pid);
    let first = args.first;
    let child = args.child;
    let released = Arc::new(AtomicBool::new(false));
    if child {
        // The parent closes our stdin to release the connections.
        let released = released.clone();
        std::thread::spawn(move || {
            let mut sink = Vec::new();
            let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
            released.store(true, Relaxed);
        });
    }
    let (target, conns, rate, threads, topic) = (
        args.target.clone(),
        args.conns,
        args.rate,
        args.threads,
        args.topic.clone(),
    );
    let worker = {
        let (shared, stop) = (shared.clone(), stop.clone());
        std::thread::spawn(move || {
            run_threads(threads, move |t| {
                let (target, shared, stop, topic) =
                    (target.clone(), shared.clone(), stop.clone(), topic.clone());
                async move {
                    let stats = Rc::new(RefCell::new(ThreadStats::default()));
                    let keep = |_i: usize, mut client: crate::net::Client| {
                        let shared = shared.clone();
                        glommio::spawn_local(async move {
                            loop {
                                match client.fill().await {
                                    Ok(true) => {}
                                    _ => {
                                        shared.closed.fetch_add(1, Relaxed);
                                        return;
                                    }
                                }
                                let mut pongs = Vec::new();
                                let _ = client.drain(|m| {
                                    if let Incoming::Ping(p) = m {
                                        pongs.push(p.to_vec());
                                    }
                                });
                                for p in pongs {
                                    let _ = client.send(proto::ws::OpCode::Pong, &p).await;
                                }
                            }
                        })
                        .detach();
                    };
                    ramp(
                        &target,
                        &shared,
                        &stats,
                        Ramp {
                            n: conns,
                            rate,
                            topic: &topic,
                            thread: (t, threads),
                            room_size: None,
                            topics: 1,
                            first,
                        },
                        keep,
                    )
                    .await;
                    while !stop.load(Relaxed) {
                        glommio::timer::sleep(Duration::from_millis(100)).await;
                    }
                    let snapshot = stats.borrow().snapshot();
                    snapshot
                }
            })
        })
    };
    let mut ramp_secs = 0.0;
    let hold = Duration::from_secs_f64(args.hold);
    let mut rss_after = None;
    let mut held_since = None;
    let mut ready_sent = false;
    crate::stats::progress(&shared, "connect", || {
        let attempted = shared.connected.load(Relaxed) + shared.connect_errors.load(Relaxed);
        if attempted as usize >= conns && held_since.is_none() {
            ramp_secs = shared.start.elapsed().as_secs_f64();
            held_since = Some(std::time::Instant::now());
        }
        match held_since {
            Some(_) if child => {
                if !ready_sent {
                    ready_sent = true;
                    crate::procs::report_ready(&shared);
                }
                released.load(Relaxed)
            }
            Some(t) if t.elapsed() >= hold => {
                rss_after = rss_sum_kib(&args.server_pid);
                true
            }
            _ => false,
        }
    });
    let still_open = shared.connected.load(Relaxed) - shared.closed.load(Relaxed);
    stop.store(true, Relaxed);
    let stats = worker
        .join()
        .map_err(|_| anyhow::anyhow!("worker thread panicked"))??;
    let connected = shared.connected.load(Relaxed);
    let per_conn = match (rss_before, rss_after) {
        (Some(b), Some(a)) if connected > 0 => {
            Some(((a as f64 - b as f64) * 1024.0 / connected as f64 * 10.0).round() / 10.0)
        }
        _ => None,
    };
    let summary = json!({
        "scenario": "connect",
        "connections": {"requested": conns, "connected": connected, "errors": shared.connect_errors.load(Relaxed), "open_at_end_of_hold": still_open},
        "ramp_seconds": (ramp_secs * 100.0f64).round() / 100.0,
        "connects_per_second": if ramp_secs > 0.0 { (connected as f64 / ramp_secs).round() } else { 0.0 },
        "handshake": Percentiles::from(&stats.handshake),
        "server_rss_kib": {"before": rss_before, "after": rss_after},
                "server_bytes_per_connection": per_conn,
                "capacity": capacity(rss_before, per_conn),
    });
    let mut summary = summary;
    if child {
        // For the parent's merge: the raw histogram, not just its percentiles.
        summary["handshake_histogram"] = json!(crate::report::histogram_base64(&stats.handshake));
    }
    Ok((summary, stats))
}

/// What a host needs for 100k and 1M sockets at the measured memory per connection (the
/// server's RSS before the ramp is the fixed part, per process).
pub fn capacity(rss_before_kib: Option<u64>, per_conn: Option<f64>) -> serde_json::Value {
    let (Some(base), Some(per)) = (rss_before_kib, per_conn) else {
        return serde_json::Value::Null;
    };
    let base = base as f64 * 1024.0;
    let fds = fd_limit().unwrap_or(0);
    let per_process = fds.saturating_sub(64);
    let plan = |n: f64| {
        let procs = if per_process > 0 {
            (n / per_process as f64).ceil()
        } else {
            1.0
        };
        json!({
            "memory_mib": ((base * procs + n * per) / (1024.0 * 1024.0)).round(),
            "processes_at_this_fd_limit": procs,
        })
    };
    json!({
        "bytes_per_connection": per,
        "fixed_bytes_per_process": base.round(),
        "open_files_limit_here": fds,
        "sockets_100k": plan(100_000.0),
        "sockets_1m": plan(1_000_000.0),
        "note": "the server process's resident memory only: the kernel's per-socket memory (TCP 'mem' in /proc/net/sockstat) comes on top, and CPU for the traffic is in a fanout run's capacity section",
    })
}

/// This process's open-files limit (the server's is raised to the same hard limit).
fn fd_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(4)?.parse().ok()
}
