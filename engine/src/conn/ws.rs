//! The WebSocket connection driver: upgrade, then read → `proto` → route → write, until close.
//!
//! The task owns the socket, what the token grants, its subscriptions and, only while a frame is
//! incomplete, a buffer. Outbound frames are queued in the shard's `Conn` and written by the
//! shard's flush rounds; this task writes only when the socket buffer was full.

use std::{
    future::poll_fn, pin::Pin, rc::Rc, sync::atomic::Ordering::Relaxed, task::Poll, time::Instant,
};

use bytes::Bytes;
use futures_lite::{AsyncRead, AsyncWrite, AsyncWriteExt};
use glommio::net::TcpStream;
use proto::{
    api::Publish,
    auth::{AuthError, Claims},
    client::{self, ClientError, ClientMessage, Request, TopicPosition},
    event::{validate_topic, validate_type, Event, Priority},
    http1::{json_error, Head},
    placement::owner_shard,
    ws::{
        self, close, close_frame, handshake, server_frame, Message, OpCode, Receiver, WsError,
        WsLimits,
    },
};

use super::respond;
use crate::{
    metrics::AUTH_REASONS,
    shard::{
        conn_state::{Conn, Flush, Written},
        slab::ConnKey,
        Shard,
    },
};

/// Which WebSocket endpoint.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `/v1/ws`: authenticated client protocol.
    Client,
    /// `/v1/echo`: diagnostic echo, no auth.
    Echo,
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

/// Verifies the request and either hands the socket to its owner shard or upgrades it here.
pub async fn upgrade(
    started: std::time::Instant,
    shard: Rc<Shard>,
    mut stream: TcpStream,
    head: Head,
    buf: Vec<u8>,
    head_len: usize,
    kind: Kind,
) {
    let key = match handshake::validate(&head) {
        Ok(k) => k.to_owned(),
        Err(e) => {
            shard.metrics().bad_requests.fetch_add(1, Relaxed);
            let mut resp = json_error(e.status(), "bad_handshake", &e.to_string());
            if e.status() == 426 {
                resp.headers.push("Sec-WebSocket-Version: 13".into());
            }
            respond(&mut stream, &resp, false).await;
            return;
        }
    };
    let claims = if kind == Kind::Client {
        match authenticate(&shard, &head) {
            Ok(c) => c,
            Err(e) => {
                let reason = e.reason();
                if let Some(i) = AUTH_REASONS.iter().position(|r| *r == reason) {
                    shard.metrics().auth_failures[i].fetch_add(1, Relaxed);
                }
                respond(
                    &mut stream,
                    &json_error(e.status(), reason, &e.to_string()),
                    false,
                )
                .await;
                return;
            }
        }
    } else {
        Claims::default()
    };
    if kind == Kind::Client {
        let owner = owner_shard(&claims.sub, shard.shared.n_shards);
        if owner != shard.id {
            // Every connection of a customer lives on its owner shard: move the socket there
            // with the bytes read so far; the owner replays the handshake from them.
            match crate::io::detach_for_handoff(stream) {
                Ok(fd) => {
                    shard.metrics().handoffs_out.fetch_add(1, Relaxed);
                    shard.send_msg(
                        owner,
                        &proto::bus::ShardMsg::Handoff { fd, initial: buf },
                        None,
                        None,
                    );
                }
                Err(e) => tracing::warn!(error = %e, "handoff failed"),
            }
            return;
        }
    }
    let protocol = handshake::selected_protocol(head.ws_protocol.as_deref());
    if stream
        .write_all(&handshake::response(&key, protocol))
        .await
        .is_err()
    {
        return;
    }
    shard
        .hists
        .borrow_mut()
        .handshake
        .saturating_record((started.elapsed().as_micros() as u64).max(1));
    let _ = stream.set_read_timeout(None);
    shard.metrics().handshakes.fetch_add(1, Relaxed);
    let limits = WsLimits {
        max_message: if kind == Kind::Echo {
            shard.shared.config.diagnostics.echo_max_message
        } else {
            shard.shared.config.limits.max_message
        },
    };
    let customer: Rc<str> = Rc::from(claims.sub.as_str());
    let roles = claims.roles.clone();
    // The echo endpoint sends back messages up to its own (larger) limit.
    let max_backlog = shard
        .shared
        .config
        .limits
        .max_backlog
        .max(limits.max_message + 1024);
    let fd = std::os::fd::AsRawFd::as_raw_fd(&stream);
    let conn_key = shard.register(
        Conn::new(fd, customer.clone(), shard.clock.get(), max_backlog),
        &roles,
    );
    let mut session = Session {
        key: conn_key,
        grants: Grants::from(claims),
        customer: customer.clone(),
        kind,
        rx: Receiver::default(),
        pending: buf[head_len..].to_vec(),
        topics: Vec::new(),
        limits,
        peer_closed: false,
    };
    if kind == Kind::Client {
        let welcome = client::welcome(
            &customer,
            &shard.next_conn_id(),
            &[],
            shard.shared.config.server.heartbeat_secs,
            &now_rfc3339(),
        );
        shard.send_now(conn_key, &server_frame(OpCode::Text, &welcome));
    }
    // The handshake's state (request head, read buffer, this future) is dropped here: the
    // connection lives on in a task that holds only the socket and its session, which is what
    // keeps an idle connection small.
    drop(head);
    drop(buf);
    // The block uses the captured `stream` as is: rebinding a captured variable inside an
    // `async move` block (`let mut stream = stream;`) gives the future a second 120-byte slot.
    glommio::spawn_local(async move {
        // Bytes that arrived with the head (a client that did not wait for the 101).
        let proceed = session.pending.is_empty() || {
            let actions = session.decode(&shard, None);
            Box::pin(session.act(&shard, actions)).await
        };
        if proceed {
            session.run(&shard, &mut stream).await;
        }
        session.finish(&shard);
    })
    .detach();
}

fn authenticate(shard: &Shard, head: &Head) -> Result<Claims, AuthError> {
    let allowed = &shard.shared.config.auth.allowed_origins;
    if !allowed.is_empty()
        && !head
            .origin
            .as_deref()
            .is_some_and(|o| allowed.iter().any(|a| a == o))
    {
        return Err(AuthError::OriginRefused);
    }
    let token = head
        .query_param("token")
        .map(|t| t.into_owned())
        .or_else(|| head.bearer().map(str::to_owned))
        .or_else(|| {
            head.ws_protocol
                .as_deref()
                .and_then(handshake::token_from_protocols)
                .map(str::to_owned)
        })
        .ok_or(AuthError::Missing)?;
    shard
        .shared
        .verifier
        .verify(&token, shard.shared.unix_now())
}

/// Where a client-sent event goes.
enum ClientTarget {
    Topic(String),
    Customer(String),
}

/// What one read asks the task to do.
enum Action {
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
}

/// What a token allows, kept compact for the connection's lifetime (the full `Claims` are
/// dropped after the handshake).
struct Grants {
    roles: Box<[String]>,
    channels: Box<[Box<str>]>,
    publish: Box<[Box<str>]>,
    message: Box<[Box<str>]>,
}

impl From<Claims> for Grants {
    fn from(c: Claims) -> Self {
        let compact = |v: Vec<String>| v.into_iter().map(String::into_boxed_str).collect();
        Grants {
            roles: c.roles.into_boxed_slice(),
            channels: compact(c.channels),
            publish: compact(c.publish),
            message: compact(c.message),
        }
    }
}

impl Grants {
    fn may(patterns: &[Box<str>], name: &str) -> bool {
        patterns.iter().any(|p| proto::auth::glob_match(p, name))
    }
}

struct Session {
    key: ConnKey,
    grants: Grants,
    customer: Rc<str>,
    kind: Kind,
    rx: Receiver,
    /// Input bytes of an incomplete frame (empty, and unallocated, most of the time).
    pending: Vec<u8>,
    topics: Vec<Rc<str>>,
    limits: WsLimits,
    /// The peer sent its close frame, or the connection failed: stop once our queue is out.
    peer_closed: bool,
}

impl Session {
    async fn run(&mut self, shard: &Rc<Shard>, stream: &mut TcpStream) {
        loop {
            let wake = poll_fn(|cx| self.poll(shard, stream, cx)).await;
            match wake {
                Wake::Read(n) => {
                    shard.metrics().bytes_in.fetch_add(n as u64, Relaxed);
                    let actions = self.decode(shard, Some(n));
                    // Boxed: request handling has large, rarely live states that would
                    // otherwise sit in every idle connection's future.
                    if !Box::pin(self.act(shard, actions)).await {
                        return;
                    }
                }
                Wake::Close(code) => self.start_close(shard, code, ""),
                Wake::Gone => return,
            }
        }
    }

    fn poll(
        &mut self,
        shard: &Shard,
        stream: &mut TcpStream,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<Wake> {
        {
            let mut conns = shard.conns.borrow_mut();
            let Some(c) = conns.get_mut(self.key) else {
                return Poll::Ready(Wake::Gone);
            };
            if !c.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                c.waker = Some(cx.waker().clone());
            }
            if c.dead {
                return Poll::Ready(Wake::Gone);
            }
            if let (Some(code), false) = (c.close_request, c.closing) {
                return Poll::Ready(Wake::Close(code));
            }
            if c.write_blocked && !write_blocked(shard, c, stream, cx) {
                return Poll::Ready(Wake::Gone);
            }
            if c.closing && self.peer_closed && c.out.is_empty() {
                return Poll::Ready(Wake::Gone);
            }
        }
        if self.peer_closed {
            return Poll::Pending;
        }
        let mut scratch = shard.scratch.borrow_mut();
        match Pin::new(&mut *stream).poll_read(cx, &mut scratch[..]) {
            Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => Poll::Ready(Wake::Gone),
            Poll::Ready(Ok(n)) => Poll::Ready(Wake::Read(n)),
            Poll::Pending => Poll::Pending,
        }
    }

    /// Decodes the bytes just read (`Some(n)`: in the scratch buffer) or pending bytes (`None`).
    fn decode(&mut self, shard: &Shard, read: Option<usize>) -> Vec<Action> {
        if let Some(c) = shard.conns.borrow_mut().get_mut(self.key) {
            c.last_rx = shard.clock.get();
        }
        let mut scratch = shard.scratch.borrow_mut();
        let from_scratch = match read {
            Some(n) if self.pending.is_empty() => Some(n),
            Some(n) => {
                self.pending.extend_from_slice(&scratch[..n]);
                None
            }
            None => None,
        };
        let Session {
            rx,
            pending,
            limits,
            kind,
            ..
        } = self;
        let data: &mut [u8] = match from_scratch {
            Some(n) => &mut scratch[..n],
            None => &mut pending[..],
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
                if pos < data.len() {
                    *pending = data[pos..].to_vec();
                }
            }
            None => {
                pending.drain(..pos);
                if pending.is_empty() {
                    *pending = Vec::new();
                }
            }
        }
        actions
    }

    /// Carries out decoded actions. Returns false when the connection is finished.
    async fn act(&mut self, shard: &Rc<Shard>, actions: Vec<Action>) -> bool {
        for action in actions {
            match action {
                Action::Request(Ok(msg)) => self.handle_request(shard, msg).await,
                Action::Request(Err(e)) => self.reply(shard, &e.to_json()),
                Action::Unsupported(why) => {
                    self.reply(shard, &ClientError::new("unsupported", why).to_json())
                }
                Action::Echo(op, payload) => {
                    shard.send_now(self.key, &server_frame(op, &payload));
                }
                Action::Pong(p) => shard.send_control(self.key, &server_frame(OpCode::Pong, &p)),
                Action::PeerClose(code) => {
                    let closing = shard
                        .conns
                        .borrow_mut()
                        .get_mut(self.key)
                        .is_some_and(|c| c.closing);
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
        true
    }

    /// Queues a close frame; the connection ends when the peer answers, fails, or after 2 s.
    fn start_close(&mut self, shard: &Shard, code: u16, reason: &str) {
        {
            let mut conns = shard.conns.borrow_mut();
            let Some(c) = conns.get_mut(self.key) else {
                return;
            };
            if c.closing {
                return;
            }
            if code == close::SLOW_CONSUMER {
                let n = c.drop_unsent();
                shard.metrics().drops.fetch_add(n as u64, Relaxed);
            }
            c.closing = true;
            c.close_request.get_or_insert(code);
            c.close_deadline = shard.clock.get() + 2;
        }
        shard.schedule(self.key, shard.clock.get() + 1);
        let reason = match code {
            close::SLOW_CONSUMER => "slow consumer",
            close::GOING_AWAY if shard.draining() => "server shutting down",
            close::GOING_AWAY => "idle timeout",
            _ => reason,
        };
        shard.send_control(self.key, &close_frame(code, reason));
    }

    fn reply(&self, shard: &Shard, json: &[u8]) {
        shard.send_now(self.key, &server_frame(OpCode::Text, json));
    }

    async fn handle_request(&mut self, shard: &Rc<Shard>, msg: ClientMessage) {
        let rid = msg.request_id.as_deref();
        let error = |code: &'static str, message: String, kind: &str| ClientError {
            code,
            message,
            received_type: Some(kind.to_owned()),
            request_id: msg.request_id.clone(),
        };
        match msg.request {
            Request::Ping => self.reply(
                shard,
                &client::ack_reply("pong", rid, serde_json::json!({}), &now_rfc3339()),
            ),
            Request::Subscribe { topics, events } => {
                if let Some(e) = topics.iter().find_map(|t| validate_topic(t).err()) {
                    return self.reply(shard, &error(e.code, e.message, "subscribe").to_json());
                }
                let refused: Vec<&str> = topics
                    .iter()
                    .filter(|t| !Grants::may(&self.grants.channels, t))
                    .map(String::as_str)
                    .collect();
                if !refused.is_empty() {
                    let e = error(
                        "forbidden",
                        format!("token does not allow subscribing to {}", refused.join(", ")),
                        "subscribe",
                    );
                    return self.reply(shard, &e.to_json());
                }
                let mut positions = Vec::with_capacity(topics.len());
                for topic in topics {
                    let new = !self.topics.iter().any(|t| **t == *topic);
                    let position = if new {
                        let (name, position) = shard.subscribe_topic(self.key, &topic).await;
                        // Exact growth: most connections hold one or two topics.
                        self.topics.reserve_exact(1);
                        self.topics.push(name);
                        position
                    } else {
                        None
                    };
                    let (offset, epoch) = position.unwrap_or((0, shard.shared.epoch.clone()));
                    positions.push(TopicPosition {
                        topic,
                        offset,
                        epoch,
                    });
                }
                let mut filters = Vec::new();
                if let Some(c) = shard.conns.borrow_mut().get_mut(self.key) {
                    for e in &events {
                        let prefix: Box<str> = if e == "all" || e == "*" {
                            "".into()
                        } else {
                            e.as_str().into()
                        };
                        if !c.filters.contains(&prefix) {
                            c.filters.push(prefix);
                        }
                    }
                    filters = c
                        .filters
                        .iter()
                        .map(|f| {
                            if f.is_empty() {
                                "all".to_owned()
                            } else {
                                f.to_string()
                            }
                        })
                        .collect();
                }
                self.reply(
                    shard,
                    &client::subscription_reply(
                        "subscription_confirmed",
                        &positions,
                        &filters,
                        rid,
                    ),
                );
            }
            Request::Unsubscribe { topics, events } => {
                for topic in &topics {
                    if let Some(i) = self.topics.iter().position(|t| **t == **topic) {
                        let t = self.topics.swap_remove(i);
                        shard.remove_subscriber(&t, self.key);
                    }
                }
                let mut filters = Vec::new();
                if let Some(c) = shard.conns.borrow_mut().get_mut(self.key) {
                    c.filters.retain(|f| {
                        !events
                            .iter()
                            .any(|e| **f == **e || (f.is_empty() && e == "all"))
                    });
                    filters = c.filters.iter().map(|f| f.to_string()).collect();
                }
                let remaining: Vec<TopicPosition> = self
                    .topics
                    .iter()
                    .map(|t| TopicPosition {
                        topic: t.to_string(),
                        offset: 0,
                        epoch: shard.shared.epoch.clone(),
                    })
                    .collect();
                self.reply(
                    shard,
                    &client::subscription_reply("unsubscribed", &remaining, &filters, rid),
                );
            }
            Request::Publish { topic, kind, data } => {
                if let Err(e) = validate_topic(&topic).and_then(|_| validate_type(&kind)) {
                    return self.reply(shard, &error(e.code, e.message, "publish").to_json());
                }
                if !Grants::may(&self.grants.publish, &topic) {
                    return self.reply(
                        shard,
                        &error(
                            "forbidden",
                            format!("token does not allow publishing to {topic}"),
                            "publish",
                        )
                        .to_json(),
                    );
                }
                self.publish_from_client(shard, kind, data, ClientTarget::Topic(topic), rid)
                    .await;
            }
            Request::SendMessage { to, kind, data } => {
                if let Err(e) = validate_type(&kind) {
                    return self.reply(shard, &error(e.code, e.message, "send_message").to_json());
                }
                if !Grants::may(&self.grants.message, &to) {
                    return self.reply(
                        shard,
                        &error(
                            "forbidden",
                            format!("token does not allow messaging {to}"),
                            "send_message",
                        )
                        .to_json(),
                    );
                }
                self.publish_from_client(shard, kind, data, ClientTarget::Customer(to), rid)
                    .await;
            }
            Request::NotYetSupported(kind) => {
                let e = error(
                    "unsupported_type",
                    format!("{kind} is not supported by this server yet"),
                    &kind,
                );
                self.reply(shard, &e.to_json());
            }
        }
    }

    /// Routes an event a client sent (its token allowed it) and acknowledges it with the
    /// event id: `published` for a topic, `sent` for a customer. Fire and forget: the client is
    /// not made to wait for the fan-out.
    async fn publish_from_client(
        &self,
        shard: &Rc<Shard>,
        kind: String,
        data: String,
        target: ClientTarget,
        rid: Option<&str>,
    ) {
        let event = self.client_event(shard, kind, data);
        let id = event.id.clone();
        let (customers, topics, reply) = match &target {
            ClientTarget::Topic(t) => (
                vec![],
                vec![t.clone()],
                serde_json::json!({ "id": id, "topic": t }),
            ),
            ClientTarget::Customer(c) => (
                vec![c.clone()],
                vec![],
                serde_json::json!({ "id": id, "to": c }),
            ),
        };
        let p = Publish {
            customers,
            topics,
            roles: vec![],
            broadcast: false,
            event,
        };
        shard.publish(&p, false).await;
        let kind = if matches!(target, ClientTarget::Topic(_)) {
            "published"
        } else {
            "sent"
        };
        self.reply(shard, &client::ack_reply(kind, rid, reply, &now_rfc3339()));
    }

    fn client_event(&self, shard: &Shard, kind: String, data: String) -> Event {
        Event {
            id: shard.next_conn_id(),
            kind,
            data,
            priority: Priority::Normal,
            persistent: false,
            ttl: None,
            timestamp: now_rfc3339(),
            from: Some(self.customer.to_string()),
        }
    }

    fn finish(&mut self, shard: &Shard) {
        shard.unregister(self.key, &self.grants.roles, &self.topics);
    }
}

/// Drives a connection whose socket buffer was full: waits for writability through glommio,
/// then resumes vectored flushing. Returns false if the socket failed.
fn write_blocked(
    shard: &Shard,
    c: &mut Conn,
    stream: &mut TcpStream,
    cx: &mut std::task::Context<'_>,
) -> bool {
    let m = shard.metrics();
    let mut hists = shard.hists.borrow_mut();
    let mut written = Written {
        bytes: 0,
        latency: &m.latency,
        hdr: Some(&mut hists.publish_to_write),
    };
    let ok = loop {
        let Some(front) = c.out.front() else {
            c.write_blocked = false;
            break true;
        };
        let chunk: Bytes = front.bytes.slice(c.sent..);
        match Pin::new(&mut *stream).poll_write(cx, &chunk) {
            Poll::Ready(Ok(n)) => {
                written.bytes += n as u64;
                c.advance(n, Instant::now(), &mut written);
                match c.flush(&mut written) {
                    Flush::Done => {
                        c.write_blocked = false;
                        break true;
                    }
                    Flush::Blocked => continue,
                    Flush::Failed => break false,
                }
            }
            Poll::Ready(Err(_)) => break false,
            Poll::Pending => break true,
        }
    };
    m.bytes_out.fetch_add(written.bytes, Relaxed);
    if !ok {
        c.dead = true;
    }
    ok
}
