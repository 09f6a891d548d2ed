//! `connect --procs N`: the connections spread over child processes (one process is capped by
//! its open-files limit); the parent measures the server while all children hold.

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
