//! `--procs N`: connections spread over child processes (one process is capped by its
//! open-files limit, 20,000 here). `connect`: the parent measures the server while all children
//! hold. `fanout`/`unicast`: the children hold the subscribers, the parent publishes.

use std::sync::atomic::Ordering::Relaxed;

use crate::{
    report,
    scenario::{self, Target},
    stats, TargetArgs,
};

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
    use std::process::{Command, Stdio};
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
        let mut cmd = Command::new(&exe);
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

impl Children {
    /// Starts `procs` children for `subscribers` subscribers of scenario `scenario`
    /// (`fanout` or `unicast`) and waits until each has ramped.
    pub fn start(
        t: &TargetArgs,
        target: &Target,
        scenario: &str,
        subscribers: usize,
        connect_rate: f64,
        topic: &str,
        procs: usize,
    ) -> anyhow::Result<Children> {
        use std::io::BufRead;
        use std::process::{Command, Stdio};
        let exe = std::env::current_exe()?;
        let per = subscribers.div_ceil(procs);
        let mut children = Vec::new();
        for p in 0..procs {
            let first = p * per;
            let n = per.min(subscribers.saturating_sub(first));
            if n == 0 {
                break;
            }
            let mut cmd = Command::new(&exe);
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

    /// Publishing is over (`published` events): tells each child what it should have, waits
    /// for its counts and adds them (and its histograms) to `shared` and `merged`.
    pub fn finish(
        &mut self,
        published: u64,
        unicast: bool,
        shared: &stats::Shared,
        merged: &mut stats::ThreadStats,
    ) -> anyhow::Result<()> {
        use std::io::{BufRead, Write};
        for c in &mut self.procs {
            let expected = if unicast {
                // Event `seq` (1..=published) goes to customer `seq % total`.
                (1..=published)
                    .filter(|s| {
                        (c.first..c.first + c.n).contains(&((s % self.total as u64) as usize))
                    })
                    .count() as u64
            } else {
                published * c.connected
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
            ] {
                if let Some(x) = v[key].as_str().and_then(report::histogram_from_base64) {
                    h.add(&x).map_err(|e| anyhow::anyhow!("{e:?}"))?;
                }
            }
        }
        Ok(())
    }
}

/// Reads the parent's `DONE <expected>` line on a thread; `u64::MAX` until it arrives.
pub fn watch_done() -> std::sync::Arc<std::sync::atomic::AtomicU64> {
    let expected = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(u64::MAX));
    let e = expected.clone();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::BufRead::read_line(&mut std::io::stdin().lock(), &mut line);
        // No number (the parent went away): stop at once.
        let n = line
            .split_whitespace()
            .nth(1)
            .and_then(|w| w.parse().ok())
            .unwrap_or(0);
        e.store(n, Relaxed);
    });
    expected
}

/// The child's report line for [`Children::finish`].
pub fn child_report(summary: &serde_json::Value, stats: &stats::ThreadStats) -> String {
    serde_json::json!({
        "received": summary["received"],
        "duplicates": summary["duplicates"],
        "reorders": summary["reorders"],
        "gaps": summary["gaps"],
        "closed": summary["subscribers"]["closed_by_server"],
        "timeline": summary["timeline"],
        "latency_histogram": report::histogram_base64(&stats.latency),
        "handshake_histogram": report::histogram_base64(&stats.handshake),
    })
    .to_string()
}
