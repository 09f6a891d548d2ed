//! Protection: connection attempts per client address, connections per customer, client
//! messages per connection, the process-wide connection cap; and the audit log of the
//! security events they raise.
//!
//! Everything here is O(1) per check and allocation-free on the hot path. The only
//! cross-shard state is the attempt table: a fixed array of atomics (no lock, no map that
//! grows with the number of attacking addresses).

use std::{
    hash::{BuildHasher, Hash},
    net::IpAddr,
    sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering::Relaxed},
};

/// What a refusal was for; the label of `ringcast_limit_refusals_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// `limits.connect_attempts_per_ip` (429).
    IpAttempts,
    /// `limits.connections_per_customer` (429).
    CustomerConnections,
    /// `limits.client_messages_per_minute` (close 4029).
    MessageRate,
    /// `limits.max_connections` (503).
    MaxConnections,
    /// `limits.pending_heads_per_ip` (429 at accept).
    PendingHeads,
    /// `server.handshake_timeout_secs` / `server.body_timeout_secs` (408).
    SlowRequest,
}

/// Metric labels, in the order of [`Limit`]'s variants.
pub const LIMIT_LABELS: [&str; 6] = [
    "ip_attempts",
    "customer_connections",
    "message_rate",
    "max_connections",
    "pending_heads",
    "slow_request",
];

impl Limit {
    /// Index into [`LIMIT_LABELS`] and the metric array.
    pub fn index(self) -> usize {
        self as usize
    }

    /// The metric label.
    pub fn label(self) -> &'static str {
        LIMIT_LABELS[self.index()]
    }
}

/// Slots per row of the attempt table. Two rows, 64 Ki slots each: 1 MiB for the process.
const SLOTS: usize = 1 << 16;

/// Connection attempts per client address in the current minute, approximately: a count-min
/// sketch of two rows of `(minute << 32 | count)` atomics, each address hashed into one slot
/// per row with independent keys. An address is over the limit only when both its slots are,
/// so an innocent address is refused only if it collides in both rows with addresses that
/// are over the limit together; attackers cannot grow the table.
pub struct AttemptTable {
    rows: Rows<AtomicU64>,
}

/// Two rows of [`SLOTS`] counters; an address is hashed into one slot per row with
/// independent keys (the count-min sketch of [`AttemptTable`] and [`HeadTable`]).
struct Rows<T> {
    rows: [Box<[T]>; 2],
    keys: [ahash::RandomState; 2],
}

impl<T: Default> Rows<T> {
    fn new() -> Self {
        let row = || (0..SLOTS).map(|_| T::default()).collect();
        Rows {
            rows: [row(), row()],
            keys: [ahash::RandomState::new(), ahash::RandomState::new()],
        }
    }
}

impl<T> Rows<T> {
    /// The address's slot in each row.
    fn slots(&self, ip: IpAddr) -> [&T; 2] {
        let slot = |i: usize| {
            let mut h = self.keys[i].build_hasher();
            ip.hash(&mut h);
            &self.rows[i][std::hash::Hasher::finish(&h) as usize % SLOTS]
        };
        [slot(0), slot(1)]
    }
}

impl Default for AttemptTable {
    fn default() -> Self {
        AttemptTable { rows: Rows::new() }
    }
}

impl AttemptTable {
    /// Counts an attempt by `ip` in minute `minute`; false if that makes more than `limit`.
    pub fn admit(&self, ip: IpAddr, minute: u32, limit: u32) -> bool {
        let mut lowest = u32::MAX;
        for slot in self.rows.slots(ip) {
            let prev = slot
                .fetch_update(Relaxed, Relaxed, |v| {
                    let (m, n) = ((v >> 32) as u32, v as u32);
                    let n = if m == minute { n.saturating_add(1) } else { 1 };
                    Some(u64::from(minute) << 32 | u64::from(n))
                })
                .expect("the closure always returns Some");
            let n = if (prev >> 32) as u32 == minute {
                (prev as u32).saturating_add(1)
            } else {
                1
            };
            lowest = lowest.min(n);
        }
        lowest <= limit
    }
}

/// Sockets still sending their request head: in all (they count against
/// `limits.max_connections`) and per client address, approximately (a count-min sketch like
/// [`AttemptTable`], incremented at accept and decremented when the head is complete or the
/// socket is gone). Counts only ever over-estimate, so an address is never let past its limit.
pub struct HeadTable {
    rows: Rows<AtomicU32>,
    /// Sockets reading a head, all shards.
    pub pending: AtomicI64,
}

impl Default for HeadTable {
    fn default() -> Self {
        HeadTable {
            rows: Rows::new(),
            pending: AtomicI64::new(0),
        }
    }
}

impl HeadTable {
    /// Counts a socket from `ip` (`None`: not counted per address) that starts reading its
    /// head. `Err(true)`: the address is over `per_ip`. The returned guard uncounts it.
    pub fn enter(&self, ip: Option<IpAddr>, per_ip: u32) -> Result<HeadGuard<'_>, bool> {
        let slots = ip.map(|ip| self.rows.slots(ip));
        if let Some(slots) = slots {
            let n = slots.map(|s| s.fetch_add(1, Relaxed).saturating_add(1));
            if per_ip > 0 && n[0].min(n[1]) > per_ip {
                for s in slots {
                    s.fetch_sub(1, Relaxed);
                }
                return Err(true);
            }
        }
        self.pending.fetch_add(1, Relaxed);
        Ok(HeadGuard { table: self, slots })
    }
}

/// A socket counted in a [`HeadTable`] until this is dropped.
pub struct HeadGuard<'a> {
    table: &'a HeadTable,
    slots: Option<[&'a AtomicU32; 2]>,
}

impl Drop for HeadGuard<'_> {
    fn drop(&mut self) {
        self.table.pending.fetch_sub(1, Relaxed);
        for s in self.slots.iter().flatten() {
            s.fetch_sub(1, Relaxed);
        }
    }
}

/// What a ping (a WebSocket ping frame or a JSON `ping`) takes from a connection's allowance:
/// an eighth of a request, so keep-alive pings every few seconds never matter while a flood
/// (thousands in one read, each answered) meets the limit.
pub const PING_COST: f32 = 0.125;

/// A connection's client-message allowance: a token bucket of `per_minute` tokens refilled
/// evenly, kept in the connection's slot (8 bytes).
#[derive(Debug, Clone, Copy)]
pub struct MessageBucket {
    tokens: f32,
    /// Shard clock (milliseconds, wrapping) of the last refill.
    at_ms: u32,
}

impl MessageBucket {
    /// A full bucket.
    pub fn full(per_minute: u32, now_ms: u32) -> Self {
        MessageBucket {
            tokens: per_minute as f32,
            at_ms: now_ms,
        }
    }

    /// Takes one token; false when the bucket is empty (the connection is over its rate).
    pub fn take(&mut self, per_minute: u32, now_ms: u32) -> bool {
        self.take_cost(per_minute, now_ms, 1.0)
    }

    /// Takes `cost` tokens (a ping costs a fraction of a request); false when fewer are left.
    pub fn take_cost(&mut self, per_minute: u32, now_ms: u32, cost: f32) -> bool {
        let elapsed = now_ms.wrapping_sub(self.at_ms) as f32;
        self.at_ms = now_ms;
        let cap = per_minute as f32;
        self.tokens = (self.tokens + elapsed * cap / 60_000.0).min(cap);
        if self.tokens >= cost {
            self.tokens -= cost;
            true
        } else {
            false
        }
    }
}

/// Writes one audit line: a JSON object with the event, the client address and what else
/// identifies it, under the `ringcast::audit` log target (one line per security event, so a
/// log pipeline can route them on the target or on `"audit":`).
pub fn audit(event: &str, ip: Option<IpAddr>, customer: Option<&str>, detail: &str) {
    let line = serde_json::json!({
        "audit": event,
        "ip": ip.map(|i| i.to_string()),
        "customer": customer,
        "detail": detail,
        "ts": humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
    });
    tracing::warn!(target: "ringcast::audit", "{line}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attempts_are_counted_per_address_and_minute() {
        let t = AttemptTable::default();
        let a: IpAddr = "203.0.113.7".parse().unwrap();
        let b: IpAddr = "198.51.100.9".parse().unwrap();
        assert!((0..3).all(|_| t.admit(a, 100, 3)));
        assert!(!t.admit(a, 100, 3));
        assert!(t.admit(b, 100, 3), "another address is not affected");
        assert!(t.admit(a, 101, 3), "a new minute starts from zero");
    }

    #[test]
    fn pending_heads_are_counted_per_address_until_done() {
        let t = HeadTable::default();
        let a: IpAddr = "203.0.113.7".parse().unwrap();
        let b: IpAddr = "198.51.100.9".parse().unwrap();
        let held: Vec<_> = (0..3).map(|_| t.enter(Some(a), 3).unwrap()).collect();
        assert!(matches!(t.enter(Some(a), 3), Err(true)));
        assert!(
            t.enter(Some(b), 3).is_ok(),
            "another address is not affected"
        );
        assert!(t.enter(None, 3).is_ok(), "uncounted addresses pass");
        assert_eq!(
            t.pending.load(Relaxed),
            3,
            "refused and finished sockets are not pending"
        );
        drop(held);
        assert_eq!(t.pending.load(Relaxed), 0);
        assert!(
            t.enter(Some(a), 3).is_ok(),
            "finished heads free their address's places"
        );
    }

    #[test]
    fn pings_cost_an_eighth_of_a_request() {
        let mut b = MessageBucket::full(30, 0);
        let n = (0..1000)
            .take_while(|_| b.take_cost(30, 0, PING_COST))
            .count();
        assert_eq!(n, 240);
    }

    #[test]
    fn bucket_refills_evenly() {
        let mut b = MessageBucket::full(30, 0);
        assert!((0..30).all(|_| b.take(30, 0)));
        assert!(!b.take(30, 0));
        assert!(!b.take(30, 1_000), "half a token after one second");
        assert!(b.take(30, 2_000), "one token after two seconds");
        assert!(!b.take(30, 2_000));
        // A long pause refills to the bucket size, not beyond.
        let mut n = 0;
        while b.take(30, 3_600_000) {
            n += 1;
        }
        assert_eq!(n, 30);
    }
}
