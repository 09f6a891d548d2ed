//! `--procs N`: connections spread over child processes (one process is capped by its
//! open-files limit, 20,000 here). `connect`: the parent measures the server while all children
//! hold. `fanout`/`unicast`: the children hold the subscribers, the parent publishes.

use std::sync::atomic::Ordering::Relaxed;

use crate::{
    report,
    scenario::{self, Target},
    stats, TargetArgs,
};

/// This binary as a child process with the parent's target options (one thread).
fn child_command(exe: &std::path::Path, t: &TargetArgs, target: &Target) -> std::process::Command {
    let mut cmd = std::process::Command::new(exe);
    cmd.args(["--url", &t.url, "--sources", &t.sources, "--threads", "1"]);
    cmd.args(["--transport", &t.transport]);
    if let Some(secret) = &target.secret {
        cmd.args(["--secret", secret]);
    }
    if t.generic {
        cmd.arg("--generic");
    }
    if let Some(f) = &t.subscribe_frame {
        cmd.args(["--subscribe-frame", f]);
    }
    if let Some(m) = &t.ready_match {
        cmd.args(["--ready-match", m]);
    }
    cmd
}

/// Tells the parent this child has ramped: `READY <connected> <errors>`.
pub fn report_ready(shared: &stats::Shared) {
    println!(
        "READY {} {}",
        shared.connected.load(Relaxed),
        shared.connect_errors.load(Relaxed)
    );
    let _ = std::io::Write::flush(&mut std::io::stdout());
}

/// A `connect` run spread over processes.
pub struct ConnectPlan {
    pub conns: usize,
    pub rate: f64,
    pub hold: f64,
    pub topic: String,
    pub server_pid: Vec<u32>,
    pub procs: usize,
}

/// Runs `connect` in `procs` child processes holding disjoint connection ranges, measures the
/// server while all of them hold, and merges their results.
pub fn connect_procs(
    t: &TargetArgs,
    target: &Target,
    plan: ConnectPlan,
) -> anyhow::Result<(serde_json::Value, stats::ThreadStats)> {
    use std::io::{BufRead, BufReader, Read};
    use std::process::Stdio;
    let exe = std::env::current_exe()?;
    let rss_before = scenario::connect::rss_sum_kib(&plan.server_pid);
    let start = std::time::Instant::now();
    let per = plan.conns.div_ceil(plan.procs);
    let mut children = Vec::new();
    for p in 0..plan.procs {
        let first = p * per;
        let n = per.min(plan.conns.saturating_sub(first));
        if n == 0 {
            break;
        }
        let mut cmd = child_command(&exe, t, target);
        cmd.args([
            "connect",
            "--child",
            "--conns",
            &n.to_string(),
            "--first",
            &first.to_string(),
        ]);
        cmd.args([
            "--rate",
            &(plan.rate / plan.procs as f64).to_string(),
            "--topic",
            &plan.topic,
        ]);
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        children.push(cmd.spawn()?);
    }
    let mut readers = Vec::new();
    for c in &mut children {
        let mut out = BufReader::new(c.stdout.take().expect("piped"));
        let mut line = String::new();
        out.read_line(&mut line)?;
        anyhow::ensure!(
            line.starts_with("READY"),
            "a child failed before it was ready: {line:?}"
        );
        readers.push(out);
    }
    let ramp_secs = start.elapsed().as_secs_f64();
    std::thread::sleep(std::time::Duration::from_secs_f64(plan.hold));
    let rss_after = scenario::connect::rss_sum_kib(&plan.server_pid);
    for c in &mut children {
        drop(c.stdin.take()); // releases the child's connections
    }
    let mut merged = stats::ThreadStats::default();
    let (mut connected, mut errors, mut open) = (0u64, 0u64, 0u64);
    for (c, mut out) in children.iter_mut().zip(readers) {
        let mut text = String::new();
        out.read_to_string(&mut text)?;
        c.wait()?;
        let v: serde_json::Value = serde_json::from_str(&text)?;
        connected += v["connections"]["connected"].as_u64().unwrap_or(0);
        errors += v["connections"]["errors"].as_u64().unwrap_or(0);
        open += v["connections"]["open_at_end_of_hold"]
            .as_u64()
            .unwrap_or(0);
        if let Some(h) = v["handshake_histogram"]
            .as_str()
            .and_then(report::histogram_from_base64)
        {
            merged
                .handshake
                .add(&h)
                .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        }
    }
    let per_conn = match (rss_before, rss_after) {
        (Some(b), Some(a)) if connected > 0 => {
            Some(((a as f64 - b as f64) * 1024.0 / connected as f64 * 10.0).round() / 10.0)
        }
        _ => None,
    };
    let summary = serde_json::json!({
        "scenario": "connect",
        "processes": plan.procs,
        "connections": {"requested": plan.conns, "connected": connected, "errors": errors, "open_at_end_of_hold": open},
        "ramp_seconds": (ramp_secs * 100.0).round() / 100.0,
        "connects_per_second": (connected as f64 / ramp_secs.max(0.001)).round(),
        "handshake": stats::Percentiles::from(&merged.handshake),
        "server_rss_kib": {"before": rss_before, "after": rss_after},
                "server_bytes_per_connection": per_conn,
        "capacity": scenario::connect::capacity(rss_before, per_conn),
    });
    Ok((summary, merged))
}

/// `fanout`/`unicast --procs N`: child processes hold the subscribers (disjoint customer
/// ranges), this process publishes and merges their counts and histograms.
///
/// Protocol over the children's pipes: a child ramps, prints `READY <connected> <errors>`,
/// receives until it reads `DONE <expected>` on stdin and has received that many (or the
/// drain window passes), then prints one JSON line with its counters and raw histograms.
pub struct Children {
    procs: Vec<TrafficChild>,
    /// Subscribers over all children (unicast addresses customer `seq % total`).
    total: usize,
}

struct TrafficChild {
    proc: std::process::Child,
    out: std::io::BufReader<std::process::ChildStdout>,
    first: usize,
    n: usize,
    connected: u64,
    errors: u64,
}

/// A traffic run spread over processes.
pub struct TrafficPlan<'a> {
    /// `fanout`, `unicast`, `storm` or `chat`.
    pub scenario: &'a str,
    pub subscribers: usize,
    pub connect_rate: f64,
    pub topic: &'a str,
    pub procs: usize,
    /// Chat: members per room (a child holds whole rooms).
    pub room_size: Option<usize>,
    /// Scenario options the children need as well (`--rate` for chat members, `--at`, ...).
    pub extra: Vec<String>,
}

impl Children {
    /// Starts the children of `plan` and waits until each has ramped.
    pub fn start(
        t: &TargetArgs,
        target: &Target,
        plan: TrafficPlan<'_>,
    ) -> anyhow::Result<Children> {
        use std::io::BufRead;
        use std::process::Stdio;
        let TrafficPlan {
            scenario,
            subscribers,
            connect_rate,
            topic,
            procs,
            room_size,
            extra,
        } = plan;
        let exe = std::env::current_exe()?;
        let room = room_size.unwrap_or(1).max(1);
        let per = subscribers.div_ceil(procs).div_ceil(room) * room;
        let mut children = Vec::new();
        for p in 0..procs {
            let first = p * per;
            let n = per.min(subscribers.saturating_sub(first));
            if n == 0 {
                break;
            }
            let mut cmd = child_command(&exe, t, target);
            cmd.args([
                scenario,
                "--child",
                "--first",
                &first.to_string(),
                "--subscribers",
                &n.to_string(),
                "--connect-rate",
                &(connect_rate / procs as f64).to_string(),
                "--topic",
                topic,
                "--publishers",
                "0",
            ]);
            cmd.args(&extra);
            cmd.stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::null());
            let mut proc = cmd.spawn()?;
            let out = std::io::BufReader::new(proc.stdout.take().expect("piped"));
            children.push(TrafficChild {
                proc,
                out,
                first,
                n,
                connected: 0,
                errors: 0,
            });
        }
        for c in &mut children {
            let mut line = String::new();
            c.out.read_line(&mut line)?;
            let mut words = line.split_whitespace();
            anyhow::ensure!(
                words.next() == Some("READY"),
                "a child failed before it was ready: {line:?}"
            );
            c.connected = words.next().and_then(|w| w.parse().ok()).unwrap_or(0);
            c.errors = words.next().and_then(|w| w.parse().ok()).unwrap_or(0);
        }
        Ok(Children {
            procs: children,
            total: subscribers,
        })
    }

    /// Subscribers connected and failed, over all children.
    pub fn ramped(&self) -> (u64, u64) {
        self.procs
            .iter()
            .fold((0, 0), |(c, e), p| (c + p.connected, e + p.errors))
    }

    /// Publishing starts (chat members send, the storm clock starts).
    pub fn go(&mut self) -> anyhow::Result<()> {
        use std::io::Write;
        for c in &mut self.procs {
            let stdin = c.proc.stdin.as_mut().expect("piped");
            writeln!(stdin, "GO")?;
            stdin.flush()?;
        }
        Ok(())
    }

    /// Publishing is over (`published` events by this process): tells each child what it
    /// should have, waits for its counts and adds them (and its histograms) to `shared` and
    /// `merged`. Returns the children's storm reports (reconnected, last reconnect µs).
    pub fn finish(
        &mut self,
        published: u64,
        mode: &str,
        shared: &stats::Shared,
        merged: &mut stats::ThreadStats,
    ) -> anyhow::Result<Vec<serde_json::Value>> {
        use std::io::{BufRead, Write};
        let mut storms = Vec::new();
        for c in &mut self.procs {
            let expected = if mode == "chat" {
                // Rooms never span children: each knows its own publishes.
                "self".to_owned()
            } else if mode == "unicast" {
                // Event `seq` (1..=published) goes to customer `seq % total`.
                (1..=published)
                    .filter(|s| {
                        (c.first..c.first + c.n).contains(&((s % self.total as u64) as usize))
                    })
                    .count()
                    .to_string()
            } else {
                (published * c.connected).to_string()
            };
            let mut stdin = c.proc.stdin.take().expect("piped");
            writeln!(stdin, "DONE {expected}")?;
        }
        for c in &mut self.procs {
            let mut line = String::new();
            c.out.read_line(&mut line)?;
            c.proc.wait()?;
            let v: serde_json::Value = serde_json::from_str(&line)
                .map_err(|e| anyhow::anyhow!("a child's report: {e}: {line:?}"))?;
            let n = |k: &str| v[k].as_u64().unwrap_or(0);
            shared.published.fetch_add(n("published"), Relaxed);
            shared
                .publish_errors
                .fetch_add(n("publish_errors"), Relaxed);
            if !v["storm"].is_null() {
                storms.push(v["storm"].clone());
            }
            shared.received.fetch_add(n("received"), Relaxed);
            shared.duplicates.fetch_add(n("duplicates"), Relaxed);
            shared.reorders.fetch_add(n("reorders"), Relaxed);
            shared.gaps.fetch_add(n("gaps"), Relaxed);
            shared.closed.fetch_add(n("closed"), Relaxed);
            if let Some(tl) = v["timeline"].as_array() {
                for (i, x) in tl.iter().enumerate().take(stats::MAX_SECONDS) {
                    shared.timeline[i].fetch_add(x.as_u64().unwrap_or(0), Relaxed);
                }
            }
            for (key, h) in [
                ("latency_histogram", &mut merged.latency),
                ("handshake_histogram", &mut merged.handshake),
                ("reconnect_histogram", &mut merged.reconnect),
                ("cross_node_histogram", &mut merged.cross_node),
            ] {
                if let Some(x) = v[key].as_str().and_then(report::histogram_from_base64) {
                    h.add(&x).map_err(|e| anyhow::anyhow!("{e:?}"))?;
                }
            }
        }
        Ok(storms)
    }
}

/// What a child hears from its parent on stdin: `GO` (publishing starts: chat members send,
/// the storm clock starts) and `DONE <expected>` or `DONE self` (publishing is over; receive
/// that many, or as many as this child's own publishes imply).
pub struct ParentSignals {
    /// `GO` arrived.
    pub go: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// `u64::MAX` until `DONE`; `SELF` for `DONE self`.
    pub expected: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

/// `DONE self`: the child computes its expected deliveries from its own publishes (chat).
pub const SELF: u64 = u64::MAX - 1;

/// Reads the parent's lines on a thread.
pub fn watch_parent() -> ParentSignals {
    use std::sync::{
        atomic::{AtomicBool, AtomicU64},
        Arc,
    };
    let signals = ParentSignals {
        go: Arc::new(AtomicBool::new(false)),
        expected: Arc::new(AtomicU64::new(u64::MAX)),
    };
    let (go, expected) = (signals.go.clone(), signals.expected.clone());
    std::thread::spawn(move || {
        let stdin = std::io::stdin();
        let mut line = String::new();
        loop {
            line.clear();
            let n = std::io::BufRead::read_line(&mut stdin.lock(), &mut line).unwrap_or(0);
            let mut words = line.split_whitespace();
            match (n, words.next()) {
                (_, Some("GO")) => go.store(true, Relaxed),
                (_, Some("DONE")) => {
                    let e = match words.next() {
                        Some("self") => SELF,
                        w => w.and_then(|w| w.parse().ok()).unwrap_or(0),
                    };
                    expected.store(e, Relaxed);
                    return;
                }
                // The parent went away: stop at once.
                (0, _) => {
                    expected.store(0, Relaxed);
                    return;
                }
                _ => {}
            }
        }
    });
    signals
}

/// The child's report line for [`Children::finish`].
pub fn child_report(summary: &serde_json::Value, stats: &stats::ThreadStats) -> String {
    serde_json::json!({
        "published": summary["published"],
        "publish_errors": summary["publish_errors"],
        "storm": summary["storm"],
        "received": summary["received"],
        "duplicates": summary["duplicates"],
        "reorders": summary["reorders"],
        "gaps": summary["gaps"],
        "closed": summary["subscribers"]["closed_by_server"],
        "timeline": summary["timeline"],
        "latency_histogram": report::histogram_base64(&stats.latency),
        "handshake_histogram": report::histogram_base64(&stats.handshake),
        "reconnect_histogram": report::histogram_base64(&stats.reconnect),
        "cross_node_histogram": report::histogram_base64(&stats.cross_node),
    })
    .to_string()
}
