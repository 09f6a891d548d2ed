//! The shard's timer wheel: heartbeats, idle timeouts, parking and close deadlines for every
//! connection, driven by one ticker instead of a timer per connection (glommio keeps timers in
//! a BTree and each `TimerActionOnce` spawns a task, which idle connections cannot afford).

use bytes::Bytes;

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
        let hb = self.shared.config.server.heartbeat_secs as u32;
        let idle = self.shared.config.server.idle_timeout_secs as u32;
        let park = self.shared.config.server.park_after_secs as u32;
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
                if c.closing || c.close_request.is_some() {
                    if now >= c.close_deadline {
                        c.dead = true;
                        c.wake();
                    } else {
                        wheel.schedule(key, c, c.close_deadline.min(now + 2));
                    }
                    continue;
                }
                let silent = now.saturating_sub(c.last_rx);
                let parked = c.parked;
                if park > 0 && !parked && silent >= park {
                    // Its task parks the socket (`conn::link`) when it runs.
                    c.wake();
                }
                if c.sse {
                    // An SSE client never speaks: no idle timeout; a failed write ends it.
                    let next = if parked || park == 0 || silent >= park {
                        now + hb
                    } else {
                        now + hb.min(park - silent)
                    };
                    wheel.schedule(key, c, next);
                    self.enqueue(&mut conns, key, &sse_ping, None);
                    continue;
                }
                if silent >= idle {
                    c.close_request = Some(proto::ws::close::GOING_AWAY);
                    c.wake();
                    wheel.schedule(key, c, now + 1);
                    continue;
                }
                let mut next = if silent >= hb {
                    now + hb.min(idle - silent)
                } else {
                    now + (hb - silent).min(idle - silent)
                };
                if park > 0 && !parked && silent < park {
                    next = next.min(now + (park - silent));
                }
                wheel.schedule(key, c, next);
                if silent >= hb {
                    self.enqueue(&mut conns, key, &ping, None);
                }
            }
        }
        self.wheel.borrow_mut().give_back(now, entries);
        self.flush_dirty();
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_static_sse_heartbeat_is_protos_comment() {
        assert_eq!(super::SSE_PING, proto::sse::comment("ping"));
    }
}
