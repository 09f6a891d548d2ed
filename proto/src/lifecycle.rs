//! The life of one client connection, WebSocket or SSE alike, without sockets or a clock:
//! when a heartbeat is due, when a silent client is let go, and the close with its deadline.
//!
//! States: **open** → **close requested** (something decided the connection ends: a slow
//! consumer, an idle client, a drain, a backend's disconnect; nothing more is queued for it)
//! → **closing** (the driver has queued the close frame, or for SSE stopped adding records;
//! what is queued drains until the deadline) → **closed** (drop the socket). A connection may
//! also go from any state to closed at once (its socket failed).
//!
//! The engine drives it in the style of a sans-IO state machine: [`Lifecycle::handle_input`]
//! on every read, [`Lifecycle::close`] when it decides to end it, [`Lifecycle::begin_close`]
//! when its task writes the close, and [`Lifecycle::handle_timeout`] when its timer wheel
//! reaches the time the previous call asked for. Times are whole seconds of the shard's clock:
//! heartbeats and timeouts are tens of seconds, and a `u32` per connection is what 100k idle
//! connections can afford.

use crate::ws::close;

/// Seconds between our close and dropping the socket when the peer never answers.
pub const CLOSE_GRACE_SECS: u32 = 2;

/// The transport a connection speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// RFC 6455: heartbeats are pings sent when the client has been silent; a client silent for
    /// the idle timeout is closed with 1001.
    WebSocket,
    /// Server-Sent Events: the client never speaks, so there is no idle timeout; a comment
    /// line goes out every heartbeat interval (proxies see traffic, browsers ignore it), and a
    /// write that fails ends the stream.
    Sse,
}

/// The configured intervals, in seconds (`server.heartbeat_secs`, `server.idle_timeout_secs`;
/// the configuration guarantees `0 < heartbeat < idle`).
#[derive(Clone, Copy, Debug)]
pub struct Timers {
    /// Silence after which a heartbeat goes out.
    pub heartbeat: u32,
    /// Silence after which a WebSocket client is closed.
    pub idle: u32,
}

/// Where a connection is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Frames flow both ways.
    Open,
    /// The connection is to close with this code; no frame is queued any more, and the
    /// driver has not written the close yet.
    CloseRequested(u16),
    /// The close is written (or, for SSE, records stopped); what is queued drains until
    /// `deadline`.
    Closing {
        /// The close code.
        code: u16,
        /// When the socket is dropped whatever the peer did.
        deadline: u32,
    },
    /// Done: the driver drops the socket.
    Closed,
}

/// What a timer check asks of the driver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Timeout {
    /// Nothing due; check again at `next`.
    Wait {
        /// The next check.
        next: u32,
    },
    /// Send one heartbeat (a WebSocket ping, an SSE comment); check again at `next`.
    Heartbeat {
        /// The next check.
        next: u32,
    },
    /// The client was silent for the idle timeout: a 1001 close is now requested; wake the
    /// driver to write it and check again at `next`.
    Idle {
        /// The next check.
        next: u32,
    },
    /// The close deadline passed: the connection is now closed; wake the driver to drop it.
    Expired,
    /// Already closed: nothing more to check.
    Closed,
}

/// One connection's life (16 bytes: it sits in every connection's slot).
#[derive(Clone, Copy, Debug)]
pub struct Lifecycle {
    state: State,
    /// Clock of the last frame from the client (for SSE: of the connect).
    last_rx: u32,
    transport: Transport,
}

impl Lifecycle {
    /// An open connection that has just spoken (its handshake) at `now`.
    pub fn new(transport: Transport, now: u32) -> Self {
        Lifecycle {
            state: State::Open,
            last_rx: now,
            transport,
        }
    }

    /// The transport.
    pub fn transport(&self) -> Transport {
        self.transport
    }

    /// Whether this is an SSE stream.
    pub fn is_sse(&self) -> bool {
        self.transport == Transport::Sse
    }

    /// The current state.
    pub fn state(&self) -> State {
        self.state
    }

    /// Frames may be queued: the connection is open.
    pub fn is_open(&self) -> bool {
        self.state == State::Open
    }

    /// The close is written (or the SSE stream stopped): nothing at all may follow it.
    pub fn is_closing(&self) -> bool {
        matches!(self.state, State::Closing { .. })
    }

    /// The driver must drop the socket.
    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    /// Control frames (pongs) may still be queued: our close is not written yet.
    pub fn may_send_control(&self) -> bool {
        matches!(self.state, State::Open | State::CloseRequested(_))
    }

    /// A close that is requested and not yet begun: the driver should begin it.
    pub fn close_requested(&self) -> Option<u16> {
        match self.state {
            State::CloseRequested(code) => Some(code),
            _ => None,
        }
    }

    /// Seconds since the client last spoke.
    pub fn silent(&self, now: u32) -> u32 {
        now.saturating_sub(self.last_rx)
    }

    /// Input arrived from the client at `now`.
    pub fn handle_input(&mut self, now: u32) {
        self.last_rx = now;
    }

    /// Requests a close with `code`. Only an open connection changes: the first reason to
    /// close is the one the client is told. Returns whether this call requested it.
    pub fn close(&mut self, code: u16) -> bool {
        if self.state != State::Open {
            return false;
        }
        self.state = State::CloseRequested(code);
        true
    }

    /// The driver writes the close now: from open (with `code`) or from a requested close
    /// (with the requested code, the first reason), the connection is closing until
    /// `now + CLOSE_GRACE_SECS`. Returns the code to write, or `None` when the close was
    /// already begun or the connection is closed.
    pub fn begin_close(&mut self, now: u32, code: u16) -> Option<u16> {
        let code = match self.state {
            State::Open => code,
            State::CloseRequested(requested) => requested,
            State::Closing { .. } | State::Closed => return None,
        };
        self.state = State::Closing {
            code,
            deadline: now.saturating_add(CLOSE_GRACE_SECS),
        };
        Some(code)
    }

    /// The socket failed or the connection is done: closed at once.
    pub fn kill(&mut self) {
        self.state = State::Closed;
    }

    /// The timer check due at `now`. Checks come at the `next` the previous one returned (or
    /// earlier, when the driver has reasons of its own): every decision depends only on the
    /// state, the last input and `now`.
    pub fn handle_timeout(&mut self, now: u32, timers: Timers) -> Timeout {
        match self.state {
            State::Closed => Timeout::Closed,
            // The driver has been woken to begin the close; look again within the grace.
            State::CloseRequested(_) => Timeout::Wait {
                next: now + CLOSE_GRACE_SECS,
            },
            State::Closing { deadline, .. } if now >= deadline => {
                self.state = State::Closed;
                Timeout::Expired
            }
            State::Closing { deadline, .. } => Timeout::Wait {
                next: deadline.min(now + CLOSE_GRACE_SECS),
            },
            State::Open => {
                let hb = timers.heartbeat.max(1);
                if self.transport == Transport::Sse {
                    return Timeout::Heartbeat { next: now + hb };
                }
                let idle = timers.idle.max(hb + 1);
                let silent = self.silent(now);
                if silent >= idle {
                    self.state = State::CloseRequested(close::GOING_AWAY);
                    return Timeout::Idle { next: now + 1 };
                }
                let to_idle = idle - silent;
                if silent >= hb {
                    Timeout::Heartbeat {
                        next: now + hb.min(to_idle),
                    }
                } else {
                    Timeout::Wait {
                        next: now + (hb - silent).min(to_idle),
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Timers = Timers {
        heartbeat: 25,
        idle: 60,
    };

    /// Runs the checks a wheel would run from `from` to `to`, recording what each returned.
    fn run(l: &mut Lifecycle, from: u32, to: u32) -> Vec<(u32, Timeout)> {
        let mut at = from;
        let mut seen = Vec::new();
        while at <= to {
            let t = l.handle_timeout(at, T);
            seen.push((at, t));
            at = match t {
                Timeout::Wait { next } | Timeout::Heartbeat { next } | Timeout::Idle { next } => {
                    assert!(next > at, "a check must move time forward");
                    next
                }
                Timeout::Expired | Timeout::Closed => break,
            };
        }
        seen
    }

    #[test]
    fn a_silent_websocket_gets_pinged_then_closed_with_1001_then_dropped() {
        let mut l = Lifecycle::new(Transport::WebSocket, 0);
        let seen = run(&mut l, 1, 63);
        assert_eq!(
            seen,
            vec![
                (1, Timeout::Wait { next: 25 }),
                (25, Timeout::Heartbeat { next: 50 }),
                (50, Timeout::Heartbeat { next: 60 }),
                (60, Timeout::Idle { next: 61 }),
                (61, Timeout::Wait { next: 63 }),
                (63, Timeout::Wait { next: 65 }),
            ],
            "until the driver begins the close, the wheel keeps looking"
        );
        assert_eq!(l.close_requested(), Some(close::GOING_AWAY));
        assert_eq!(l.begin_close(64, close::NORMAL), Some(close::GOING_AWAY));
        assert_eq!(l.handle_timeout(65, T), Timeout::Wait { next: 66 });
        assert_eq!(l.handle_timeout(66, T), Timeout::Expired);
        assert!(l.is_closed());
        assert_eq!(l.handle_timeout(67, T), Timeout::Closed);
    }

    #[test]
    fn input_postpones_heartbeats_and_the_idle_close() {
        let mut l = Lifecycle::new(Transport::WebSocket, 0);
        assert_eq!(l.handle_timeout(25, T), Timeout::Heartbeat { next: 50 });
        l.handle_input(40);
        assert_eq!(l.handle_timeout(50, T), Timeout::Wait { next: 65 });
        assert_eq!(l.handle_timeout(65, T), Timeout::Heartbeat { next: 90 });
        assert_eq!(l.handle_timeout(90, T), Timeout::Heartbeat { next: 100 });
        assert_eq!(l.handle_timeout(100, T), Timeout::Idle { next: 101 });
    }

    #[test]
    fn sse_streams_get_a_heartbeat_every_interval_and_no_idle_close() {
        let mut l = Lifecycle::new(Transport::Sse, 0);
        let seen = run(&mut l, 25, 1000);
        assert_eq!(seen.len(), 40);
        assert!(seen
            .iter()
            .all(|(at, t)| *t == Timeout::Heartbeat { next: at + 25 }));
        assert!(l.is_open());
    }

    #[test]
    fn the_first_reason_to_close_wins_and_nothing_reopens() {
        let mut l = Lifecycle::new(Transport::WebSocket, 0);
        assert!(l.is_open() && l.may_send_control());
        assert!(l.close(close::SLOW_CONSUMER));
        assert!(!l.close(close::GOING_AWAY));
        assert!(!l.is_open() && l.may_send_control());
        assert_eq!(l.close_requested(), Some(close::SLOW_CONSUMER));
        // The driver writes the requested code, whatever it was about to say itself.
        assert_eq!(
            l.begin_close(10, close::PROTOCOL),
            Some(close::SLOW_CONSUMER)
        );
        assert_eq!(
            l.state(),
            State::Closing {
                code: close::SLOW_CONSUMER,
                deadline: 12
            }
        );
        assert!(l.is_closing() && !l.may_send_control());
        assert_eq!(l.begin_close(11, close::NORMAL), None, "begun once");
        assert!(!l.close(close::NORMAL));
        l.kill();
        assert!(l.is_closed());
        assert_eq!(l.begin_close(12, close::NORMAL), None);
        assert!(!l.close(close::NORMAL));
    }

    #[test]
    fn a_close_begun_from_open_uses_the_drivers_code_and_its_deadline_holds() {
        let mut l = Lifecycle::new(Transport::WebSocket, 0);
        assert_eq!(l.begin_close(7, close::PROTOCOL), Some(close::PROTOCOL));
        assert_eq!(l.close_requested(), None);
        assert_eq!(l.handle_timeout(8, T), Timeout::Wait { next: 9 });
        assert_eq!(l.handle_timeout(9, T), Timeout::Expired);
        // Input after the close (the peer's own close frame, say) does not reopen it.
        l.handle_input(9);
        assert!(l.is_closed());
    }

    #[test]
    fn it_stays_small() {
        // One per connection, 100k connections: the slot's budget.
        assert!(std::mem::size_of::<Lifecycle>() <= 16);
    }

    #[test]
    fn checks_from_any_state_always_move_forward() {
        // Every (state, silence) pair: a returned `next` is in the future, so a wheel driven
        // by it never spins on one second.
        for transport in [Transport::WebSocket, Transport::Sse] {
            for silent in 0..130 {
                for setup in 0..3 {
                    let mut l = Lifecycle::new(transport, 1000);
                    match setup {
                        1 => {
                            l.close(close::NORMAL);
                        }
                        2 => {
                            l.begin_close(1000 + silent, close::NORMAL);
                        }
                        _ => {}
                    }
                    let now = 1000 + silent;
                    match l.handle_timeout(now, T) {
                        Timeout::Wait { next }
                        | Timeout::Heartbeat { next }
                        | Timeout::Idle { next } => assert!(next > now),
                        Timeout::Expired | Timeout::Closed => assert!(l.is_closed()),
                    }
                }
            }
        }
    }
}
