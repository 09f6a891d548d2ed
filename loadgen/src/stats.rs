//! Measurements: shared counters (atomics, read live by the progress line), per-thread
//! HdrHistograms (merged at the end) and a per-second delivery timeline.

use std::{
    sync::atomic::{AtomicU64, Ordering::Relaxed},
    time::{Duration, Instant},
};

use hdrhistogram::Histogram;
use serde::Serialize;

/// Longest timeline kept, in seconds.
pub const MAX_SECONDS: usize = 3600;

/// Counters shared by all threads of one run.
pub struct Shared {
    /// Run start.
    pub start: Instant,
    /// Connections established (handshake done, subscribed when asked).
    pub connected: AtomicU64,
    /// Connection attempts that failed.
    pub connect_errors: AtomicU64,
    /// Connections the server closed (or reset) during the run.
    pub closed: AtomicU64,
    /// Events received by all subscribers.
    pub received: AtomicU64,
    /// Events published successfully (HTTP 200).
    pub published: AtomicU64,
    /// Publish requests that failed.
    pub publish_errors: AtomicU64,
    /// Publishing tasks still running (the drain waits for them).
    pub publishers_active: AtomicU64,
    /// Events whose offset repeated one already seen by that subscriber.
    pub duplicates: AtomicU64,
    /// Events whose offset went backwards.
    pub reorders: AtomicU64,
    /// Offsets skipped (gaps) as seen by subscribers.
    pub gaps: AtomicU64,
    /// Deliveries per elapsed second.
    pub timeline: Vec<AtomicU64>,
    /// Rolling p99 of the last progress interval, microseconds (max over threads).
    pub recent_p99_us: AtomicU64,
}

impl Shared {
    /// New counters, clock started now.
    pub fn new() -> Self {
        Shared {
            start: Instant::now(),
            connected: AtomicU64::new(0),
            connect_errors: AtomicU64::new(0),
            closed: AtomicU64::new(0),
            received: AtomicU64::new(0),
            published: AtomicU64::new(0),
            publish_errors: AtomicU64::new(0),
            publishers_active: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            reorders: AtomicU64::new(0),
            gaps: AtomicU64::new(0),
            timeline: (0..MAX_SECONDS).map(|_| AtomicU64::new(0)).collect(),
            recent_p99_us: AtomicU64::new(0),
        }
    }

    /// Counts `n` deliveries in the timeline.
    pub fn tick_n(&self, n: u64) {
        let s = (self.start.elapsed().as_secs() as usize).min(MAX_SECONDS - 1);
        self.timeline[s].fetch_add(n, Relaxed);
    }
}

impl Default for Shared {
    fn default() -> Self {
        Shared::new()
    }
}

/// A latency histogram in microseconds, 1 µs to 100 s, 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 100_000_000, 3).expect("static bounds are valid")
}

/// One thread's histograms.
pub struct ThreadStats {
    /// End-to-end delivery latency (publish send timestamp to receipt).
    pub latency: Histogram<u64>,
    /// WebSocket handshake time.
    pub handshake: Histogram<u64>,
    /// Publish request round trip.
    pub publish: Histogram<u64>,
    /// Drop to subscribed again, in a reconnect storm.
    pub reconnect: Histogram<u64>,
    /// The part of `latency` measured on subscribers of other cluster nodes than the one
    /// that took the publishes (`--url` with several nodes).
    pub cross_node: Histogram<u64>,
}

impl Default for ThreadStats {
    fn default() -> Self {
        ThreadStats {
            latency: histogram(),
            handshake: histogram(),
            publish: histogram(),
            reconnect: histogram(),
            cross_node: histogram(),
        }
    }
}

impl ThreadStats {
    /// A copy of the histograms (tasks that still hold the shared cell keep theirs).
    pub fn snapshot(&self) -> ThreadStats {
        ThreadStats {
            latency: self.latency.clone(),
            handshake: self.handshake.clone(),
            publish: self.publish.clone(),
            reconnect: self.reconnect.clone(),
            cross_node: self.cross_node.clone(),
        }
    }

    /// Adds another thread's histograms.
    pub fn merge(&mut self, other: &ThreadStats) {
        self.latency.add(&other.latency).expect("same bounds");
        self.handshake.add(&other.handshake).expect("same bounds");
        self.publish.add(&other.publish).expect("same bounds");
        self.reconnect.add(&other.reconnect).expect("same bounds");
        self.cross_node.add(&other.cross_node).expect("same bounds");
    }
}

/// Percentiles of a histogram, for the JSON summary.
#[derive(Debug, Clone, Serialize)]
pub struct Percentiles {
    /// Samples.
    pub count: u64,
    /// Microseconds.
    pub p50_us: u64,
    /// Microseconds.
    pub p90_us: u64,
    /// Microseconds.
    pub p99_us: u64,
    /// Microseconds.
    pub p999_us: u64,
    /// Microseconds.
    pub max_us: u64,
    /// Microseconds.
    pub mean_us: f64,
}

impl From<&Histogram<u64>> for Percentiles {
    fn from(h: &Histogram<u64>) -> Self {
        Percentiles {
            count: h.len(),
            p50_us: h.value_at_quantile(0.5),
            p90_us: h.value_at_quantile(0.9),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
            mean_us: (h.mean() * 10.0).round() / 10.0,
        }
    }
}

/// Microseconds since the Unix epoch (event timestamps; client and server share the host).
pub fn unix_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// Prints a progress line every second until `done` returns true.
pub fn progress(shared: &Shared, label: &str, mut done: impl FnMut() -> bool) {
    let mut last_rx = 0;
    let mut last = Instant::now();
    while !done() {
        std::thread::sleep(Duration::from_millis(250));
        if last.elapsed() < Duration::from_secs(1) {
            continue;
        }
        let rx = shared.received.load(Relaxed);
        let rate = (rx - last_rx) as f64 / last.elapsed().as_secs_f64();
        last_rx = rx;
        last = Instant::now();
        eprintln!(
            "[{label} {:>5.1}s] conns {} (errors {}, closed {}) | published {} | received {} ({:.0}/s) | p99 {:.2} ms",
            shared.start.elapsed().as_secs_f64(),
            shared.connected.load(Relaxed),
            shared.connect_errors.load(Relaxed),
            shared.closed.load(Relaxed),
            shared.published.load(Relaxed),
            rx,
            rate,
            shared.recent_p99_us.load(Relaxed) as f64 / 1000.0,
        );
    }
}
