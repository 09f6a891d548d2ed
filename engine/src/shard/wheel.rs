//! The shard's timer wheel: heartbeats, idle timeouts, parking and close deadlines for every
//! connection, driven by one ticker instead of a timer per connection (glommio keeps timers in
//! a BTree and each `TimerActionOnce` spawns a task, which idle connections cannot afford).

use bytes::Bytes;
use proto::lifecycle::{Timeout, Timers};

use super::{conn_state::Conn, slab::ConnKey, Shard};

const SLOTS: usize = 64;

/// A hashed wheel of one-second slots. An entry due more than `SLOTS` seconds ahead waits for
/// later turns of the wheel.
pub struct Wheel {
    slots: Vec<Vec<(ConnKey, u32)>>,
}

impl Default for Wheel {
    fn default() -> Self {
        Wheel {
            slots: (0..SLOTS).map(|_| Vec::new()).collect(),
        }
    }
}

impl Wheel {
    /// Checks `key` at second `at`, unless a check at or before `at` is pending: each
    /// connection has at most one live entry (`Conn::wheel_at`); entries it replaced are
    /// skipped when their slot comes up.
    pub fn schedule(&mut self, key: ConnKey, c: &mut Conn, at: u32) {
        if at < c.wheel_at {
            c.wheel_at = at;
            self.slots[at as usize % SLOTS].push((key, at));
        }
    }

    /// Puts back an entry due on a later turn of the wheel.
    fn keep(&mut self, key: ConnKey, at: u32) {
        self.slots[at as usize % SLOTS].push((key, at));
    }

    /// Gives back the memory of slots that a burst of connections grew (a slot keeps its
    /// buffer from one turn to the next).
    pub fn shrink(&mut self) {
        for slot in &mut self.slots {
            if slot.capacity() > 4 * slot.len().max(64) {
                slot.shrink_to_fit();
            }
        }
    }

    fn take(&mut self, now: u32) -> Vec<(ConnKey, u32)> {
        std::mem::take(&mut self.slots[now as usize % SLOTS])
    }

    fn give_back(&mut self, now: u32, mut buf: Vec<(ConnKey, u32)>) {
        let slot = &mut self.slots[now as usize % SLOTS];
        if slot.is_empty() {
            buf.clear();
            *slot = buf;
        }
    }
}

/// The server's heartbeat: an empty ping, encoded once for all connections.
static PING: [u8; 2] = [0x89, 0x00];

/// The SSE heartbeat: a comment line, which browsers ignore and proxies see as traffic
/// (`proto::sse::comment("ping")`, kept static: one buffer for every stream).
static SSE_PING: &[u8] = b": ping\n\n";

impl Shard {
    /// Runs the checks due at second `now`.
    pub(super) fn run_timers(&self, now: u32) {
        let entries = self.wheel.borrow_mut().take(now);
        let server = &self.shared.config.server;
        let timers = Timers {
            heartbeat: server.heartbeat_secs as u32,
            idle: server.idle_timeout_secs as u32,
        };
        let park = server.park_after_secs as u32;
        let ping = Bytes::from_static(&PING);
        let sse_ping = Bytes::from_static(SSE_PING);
        {
            let mut conns = self.conns.borrow_mut();
            let mut wheel = self.wheel.borrow_mut();
            for &(key, at) in &entries {
                if at > now {
                    wheel.keep(key, at);
                    continue;
                }
                let Some(c) = conns.get_mut(key) else {
                    continue;
                };
                if c.wheel_at != at {
                    continue; // replaced by an earlier check
                }
                c.wheel_at = u32::MAX;
                let silent = c.life.silent(now);
                let next = match c.life.handle_timeout(now, timers) {
                    Timeout::Closed => continue,
                    Timeout::Expired => {
                        c.wake();
                        continue;
                    }
                    Timeout::Idle { next } => {
                        c.wake();
                        wheel.schedule(key, c, next);
                        continue;
                    }
                    Timeout::Heartbeat { next } => {
                        let frame = if c.life.is_sse() { &sse_ping } else { &ping };
                        self.enqueue(&mut conns, key, frame, None);
                        next
                    }
                    Timeout::Wait { next } => next,
                };
                // Parking (`conn::link`) is this engine's, not the connection's: a socket
                // quiet for `park` seconds is parked by its task, woken here to do it.
                let Some(c) = conns.get_mut(key) else {
                    continue;
                };
                let next = if !c.life.is_open() || park == 0 || c.parked {
                    next
                } else if silent >= park {
                    c.wake();
                    next
                } else {
                    next.min(now + (park - silent))
                };
                wheel.schedule(key, c, next);
            }
        }
        self.wheel.borrow_mut().give_back(now, entries);
        self.flush_dirty();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_a_burst_grew_give_their_memory_back() {
        let mut w = Wheel::default();
        let key = |i: u32| ConnKey::from_bits(u64::from(i));
        for i in 0..10_000 {
            w.keep(key(i), 5);
        }
        // The slot comes up: its buffer goes back for the next turn, emptied.
        let due = w.take(5);
        assert_eq!(due.len(), 10_000);
        w.give_back(5, due);
        assert!(w.slots[5].capacity() >= 10_000);
        w.keep(key(1), 69);
        w.shrink();
        assert!(w.slots[5].capacity() <= 256, "{}", w.slots[5].capacity());
        assert_eq!(w.slots[5], [(key(1), 69)], "what is due stays");
    }

    #[test]
    fn the_static_sse_heartbeat_is_protos_comment() {
        assert_eq!(super::SSE_PING, proto::sse::comment("ping"));
    }
}
