//! The driver of an upgraded connection: read into the shard's scratch buffer, decode with
//! `proto`, act, and write when the socket buffer was full; the close handshake.

use proto::error::Code;
use std::{future::poll_fn, rc::Rc, sync::atomic::Ordering::Relaxed, task::Poll};

use proto::{
    auth::Claims,
    client::{self, ClientError, ClientMessage},
    ws::{self, close, close_frame, server_frame, Message, OpCode, Receiver, WsError, WsLimits},
};

use super::Kind;
use crate::conn::{
    driver::{self, Step},
    link::Link,
};
use crate::shard::{slab::ConnKey, Shard};

/// What one read asks the task to do.
pub(super) enum Action {
    Request(Result<ClientMessage, ClientError>),
    Echo(OpCode, Vec<u8>),
    Pong(Vec<u8>),
    PeerClose(Option<u16>),
    Fail(WsError),
    Unsupported(&'static str),
}

/// What woke the task.
enum Wake {
    Read(usize),
    Close(u16),
    Gone,
    /// Parked with nothing to read: the task may end (see `shard::dormant`).
    Dormant,
}

/// How a connection's task stops.
pub(super) enum Exit {
    /// The connection is finished: it leaves its shard's lists.
    Done,
    /// Parked and quiet: its state can wait in the slot without a task.
    Dormant,
}

/// What a token allows, kept compact for the connection's lifetime (the full `Claims` are
/// dropped after the handshake).
pub(in crate::conn) struct Grants {
    /// The token's subject (shared with the connection's slot).
    pub(in crate::conn) customer: Rc<str>,
    pub(in crate::conn) roles: Box<[String]>,
    pub(in crate::conn) channels: Box<[Box<str>]>,
    pub(super) publish: Box<[Box<str>]>,
    pub(super) message: Box<[Box<str>]>,
}

impl From<Claims> for Grants {
    fn from(c: Claims) -> Self {
        let compact = |v: Vec<String>| v.into_iter().map(String::into_boxed_str).collect();
        Grants {
            customer: Rc::from(c.sub.as_str()),
            roles: c.roles.into_boxed_slice(),
            channels: compact(c.channels),
            publish: compact(c.publish),
            message: compact(c.message),
        }
    }
}

impl Grants {
    pub(in crate::conn) fn may(patterns: &[Box<str>], name: &str) -> bool {
        patterns.iter().any(|p| proto::auth::glob_match(p, name))
    }

    /// Why this token may not subscribe to `topic`, if it may not: its `channels` patterns,
    /// then the roles the topic's namespace requires.
    pub(in crate::conn) fn subscribe_refusal(
        &self,
        config: &crate::config::Config,
        topic: &str,
    ) -> Option<String> {
        if !Grants::may(&self.channels, topic) {
            return Some(format!("token does not allow subscribing to {topic}"));
        }
        let ns = config.namespace(topic);
        if !ns.roles.is_empty() && !self.roles.iter().any(|r| ns.roles.contains(r)) {
            return Some(format!(
                "topics under {:?} need one of the roles {}",
                ns.prefix,
                ns.roles.join(", ")
            ));
        }
        None
    }
}

pub(super) struct Session {
    pub(super) key: ConnKey,
    /// Boxed: one small allocation instead of 64 bytes in every connection's task.
    pub(super) grants: Box<Grants>,
    pub(super) kind: Kind,
    pub(super) rx: Receiver,
    /// Input bytes of an incomplete frame (none, and unallocated, most of the time).
    pub(super) pending: Pending,
    pub(super) topics: Vec<Rc<str>>,
    /// The peer sent its close frame, or the connection failed: stop once our queue is out.
    pub(super) peer_closed: bool,
    /// Closed for its message rate: what it still sends is read and dropped undecoded until
    /// it closes or the close deadline passes. (Not reading at all would leave bytes in the
    /// socket, and closing a socket with unread bytes sends a reset, which can make the
    /// client lose our close frame and its code.)
    pub(super) discard: bool,
}

/// Input bytes of an incomplete frame: one pointer, and no allocation, while there are none
/// (a `Vec` would be three words in every idle connection's saved state).
#[derive(Default)]
// The extra allocation is the point: it exists only while a frame is incomplete.
#[allow(clippy::box_collection)]
pub(super) struct Pending(Option<Box<Vec<u8>>>);

impl Pending {
    pub(super) fn from_slice(bytes: &[u8]) -> Pending {
        Pending((!bytes.is_empty()).then(|| Box::new(bytes.to_vec())))
    }

    pub(super) fn is_empty(&self) -> bool {
        self.0.as_ref().is_none_or(|v| v.is_empty())
    }

    fn extend(&mut self, bytes: &[u8]) {
        self.0.get_or_insert_default().extend_from_slice(bytes);
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        self.0.as_deref_mut().map_or(&mut [], |v| &mut v[..])
    }

    /// Drops the first `n` bytes (decoded), and the buffer once it is empty.
    fn consume(&mut self, n: usize) {
        if let Some(v) = &mut self.0 {
            v.drain(..n);
            if v.is_empty() {
                self.0 = None;
            }
        }
    }
}

impl Session {
    pub(super) async fn run(&mut self, shard: &Rc<Shard>, link: &mut Link) -> Exit {
        loop {
            let wake = poll_fn(|cx| self.poll(shard, link, cx)).await;
            match wake {
                Wake::Read(n) => {
                    shard.metrics().bytes_in.fetch_add(n as u64, Relaxed);
                    let actions = self.decode(shard, Some(n));
                    // Boxed: request handling has large, rarely live states that would
                    // otherwise sit in every idle connection's future.
                    if !Box::pin(self.act(shard, actions)).await {
                        return Exit::Done;
                    }
                    // glommio never preempts a task: a client that keeps its socket readable
                    // (a flood of pings, say) would otherwise hold the shard between reads.
                    // One read, then the other tasks' turn (not when the peer closed: the
                    // connection should leave its shard's lists at once).
                    if !self.peer_closed {
                        futures_lite::future::yield_now().await;
                    }
                }
                Wake::Close(code) => self.start_close(shard, code, ""),
                Wake::Gone => return Exit::Done,
                Wake::Dormant => return Exit::Dormant,
            }
        }
    }

    fn poll(
        &mut self,
        shard: &Shard,
        link: &mut Link,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<Wake> {
        match driver::before_read(shard, self.key, link, cx, self.peer_closed) {
            Step::Gone => return Poll::Ready(Wake::Gone),
            Step::Close(code) => return Poll::Ready(Wake::Close(code)),
            Step::Read => {}
        }
        if self.discard {
            return self.poll_discard(shard, link, cx);
        }
        if self.peer_closed {
            return Poll::Pending;
        }
        let mut scratch = shard.scratch.borrow_mut();
        match link.poll_read(shard, self.key, cx, &mut scratch[..]) {
            Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => Poll::Ready(Wake::Gone),
            Poll::Ready(Ok(n)) => Poll::Ready(Wake::Read(n)),
            // A parked socket is pending only until the parking thread reports it readable,
            // which wakes the slot's waker whether or not a task is behind it.
            Poll::Pending if link.is_parked() => Poll::Ready(Wake::Dormant),
            Poll::Pending => Poll::Pending,
        }
    }

    /// Reads and drops input (see `discard`), a bounded number of reads per poll so a
    /// flooder cannot hold the shard.
    fn poll_discard(
        &mut self,
        shard: &Shard,
        link: &mut Link,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<Wake> {
        let mut scratch = shard.scratch.borrow_mut();
        for _ in 0..8 {
            match link.poll_read(shard, self.key, cx, &mut scratch[..]) {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(Wake::Gone),
                Poll::Ready(Ok(_)) => {}
                Poll::Pending => return Poll::Pending,
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Decodes the bytes just read (`Some(n)`: in the scratch buffer) or pending bytes (`None`).
    pub(super) fn decode(&mut self, shard: &Shard, read: Option<usize>) -> Vec<Action> {
        if let Some(c) = shard.conns.borrow_mut().get_mut(self.key) {
            c.life.handle_input(shard.clock.get());
        }
        let mut scratch = shard.scratch.borrow_mut();
        let from_scratch = match read {
            Some(n) if self.pending.is_empty() => Some(n),
            Some(n) => {
                self.pending.extend(&scratch[..n]);
                None
            }
            None => None,
        };
        let limits = &session_limits(shard, self.kind);
        let Session {
            rx, pending, kind, ..
        } = self;
        let data: &mut [u8] = match from_scratch {
            Some(n) => &mut scratch[..n],
            None => pending.bytes_mut(),
        };
        let mut actions = Vec::new();
        let mut pos = 0;
        loop {
            match rx.decode(&mut data[pos..], limits) {
                Ok(ws::conn::Decoded::NeedMore) => break,
                Ok(ws::conn::Decoded::Absorbed(n)) => pos += n,
                Ok(ws::conn::Decoded::Message(msg, n)) => {
                    pos += n;
                    shard.metrics().messages_in.fetch_add(1, Relaxed);
                    let action = match (msg, *kind) {
                        (Message::Text(t), Kind::Echo) => Action::Echo(OpCode::Text, t.to_vec()),
                        (Message::Binary(b), Kind::Echo) => {
                            Action::Echo(OpCode::Binary, b.to_vec())
                        }
                        (Message::Text(t), Kind::Client) => {
                            Action::Request(client::parse(&mut t.to_vec()))
                        }
                        (Message::Binary(_), Kind::Client) => Action::Unsupported(
                            "binary messages are not part of protocol v1; send JSON text",
                        ),
                        (Message::Ping(p), _) => Action::Pong(p.to_vec()),
                        (Message::Pong(_), _) => continue,
                        (Message::Close(c), _) => {
                            actions.push(Action::PeerClose(c.map(|(code, _)| code)));
                            pos = data.len();
                            break;
                        }
                    };
                    actions.push(action);
                }
                Err(e) => {
                    actions.push(Action::Fail(e));
                    pos = data.len();
                    break;
                }
            }
        }
        match from_scratch {
            Some(_) => {
                *pending = Pending::from_slice(&data[pos..]);
            }
            None => pending.consume(pos),
        }
        actions
    }

    /// Carries out decoded actions. Returns false when the connection is finished.
    pub(super) async fn act(&mut self, shard: &Rc<Shard>, actions: Vec<Action>) -> bool {
        // Pongs are queued in order and written once per read, however many pings it held.
        let mut pongs = false;
        for action in actions {
            match action {
                Action::Request(Ok(msg)) => {
                    let cost = match msg.request {
                        client::Request::Ack { .. } => 0.0,
                        client::Request::Ping => crate::limits::PING_COST,
                        _ => 1.0,
                    };
                    if !self.within_rate(shard, cost) {
                        // Close 4029; whatever else this read held is not acted on.
                        return true;
                    }
                    self.handle_request(shard, msg).await
                }
                // A message that cannot be served costs the allowance like any other: parsing
                // it was work, and errors must not be a way around the limit.
                Action::Request(Err(e)) => {
                    if !self.within_rate(shard, 1.0) {
                        return true;
                    }
                    self.reply(shard, &e.to_json())
                }
                Action::Unsupported(why) => {
                    if !self.within_rate(shard, 1.0) {
                        return true;
                    }
                    self.reply(shard, &ClientError::new(Code::Unsupported, why).to_json())
                }
                Action::Echo(op, payload) => {
                    shard.send_now(self.key, &server_frame(op, &payload));
                }
                Action::Pong(p) => {
                    if self.kind == Kind::Client
                        && !self.within_rate(shard, crate::limits::PING_COST)
                    {
                        return true;
                    }
                    shard.queue_pong(self.key, &server_frame(OpCode::Pong, &p));
                    pongs = true;
                }
                Action::PeerClose(code) => {
                    let closing = shard
                        .conns
                        .borrow_mut()
                        .get_mut(self.key)
                        .is_some_and(|c| c.life.is_closing());
                    self.peer_closed = true;
                    if closing {
                        return false; // our close was answered
                    }
                    let code = code.unwrap_or(close::NORMAL);
                    self.start_close(
                        shard,
                        if close::is_valid_on_wire(code) {
                            code
                        } else {
                            close::NORMAL
                        },
                        "",
                    );
                }
                Action::Fail(e) => {
                    self.peer_closed = true;
                    self.start_close(shard, e.close_code(), &e.to_string());
                }
            }
        }
        if pongs {
            shard.flush_key(self.key);
        }
        true
    }

    /// Takes `cost` from the connection's allowance (a request 1, a ping
    /// [`crate::limits::PING_COST`], an `ack` nothing); over
    /// it, starts a 4029 close, counts the refusal and writes the audit line. A connection
    /// already closing takes no more requests, and one closed for its rate is not read further.
    fn within_rate(&mut self, shard: &Shard, cost: f32) -> bool {
        let per_minute = shard.shared.config.limits.client_messages_per_minute;
        let now_ms = shard.shared.started.elapsed().as_millis() as u32;
        let allowed = {
            let mut conns = shard.conns.borrow_mut();
            let Some(c) = conns.get_mut(self.key) else {
                return false;
            };
            if !c.life.is_open() {
                return false;
            }
            per_minute == 0 || cost == 0.0 || c.bucket.take_cost(per_minute, now_ms, cost)
        };
        if !allowed {
            shard.shared.refuse(
                shard.id,
                crate::limits::Limit::MessageRate,
                None,
                Some(&self.grants.customer),
            );
            self.start_close(shard, close::RATE_LIMITED, "rate limited");
            // Nothing more is decoded: a flooder would otherwise keep the shard decoding its
            // frames until the close deadline. It ends once the close frame is out and the
            // peer closes, or at the deadline.
            self.discard = true;
        }
        allowed
    }

    /// Queues a close frame; the connection ends when the peer answers, fails, or after 2 s.
    fn start_close(&mut self, shard: &Shard, code: u16, reason: &str) {
        if !driver::begin_close(shard, self.key, code) {
            return;
        }
        let hint;
        let reason = match code {
            close::SLOW_CONSUMER => "slow consumer",
            close::GOING_AWAY if shard.draining() => {
                // A reconnect hint, jittered per connection, so that the connections closed
                // in one batch do not all come back in the same instant.
                hint = format!(
                    "server shutting down; reconnect in {} ms",
                    reconnect_hint_ms()
                );
                &hint
            }
            close::GOING_AWAY => "idle timeout",
            _ => reason,
        };
        shard.send_control(self.key, &close_frame(code, reason));
    }

    pub(super) fn reply(&self, shard: &Shard, json: &[u8]) {
        shard.send_now(self.key, &server_frame(OpCode::Text, json));
    }

    pub(super) fn finish(&mut self, shard: &Shard) {
        shard.unregister(self.key, &self.grants.roles, &self.topics);
    }
}

/// Frame limits of an endpoint (derived, not stored: every byte of an idle session counts).
pub(super) fn session_limits(shard: &Shard, kind: Kind) -> WsLimits {
    WsLimits {
        max_message: if kind == Kind::Echo {
            shard.shared.config.diagnostics.echo_max_message
        } else {
            shard.shared.config.limits.max_message
        },
    }
}

/// A reconnect delay in [100, 1100) ms, different for each call (the hint in a drain's close
/// reason).
fn reconnect_hint_ms() -> u64 {
    use std::hash::{BuildHasher as _, Hasher as _};
    let mut h = ahash::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    100 + h.finish() % 1000
}
