//! The WebSocket connection driver: upgrade, then read → `proto` → route → write, until close.
//!
//! The task owns the socket, what the token grants, its subscriptions and, only while a frame is
//! incomplete, a buffer. Outbound frames are queued in the shard's `Conn` and written by the
//! shard's flush rounds; this task writes only when the socket buffer was full.
//!
//! - this module: the upgrade (handshake, authentication, handoff to the owner shard);
//! - `session`: the driver of an upgraded connection (read, decode, act, close, blocked writes);
//! - `requests`: the client protocol's requests (subscribe, publish, send_message, ping).

mod requests;
mod session;

use std::{net::IpAddr, rc::Rc, sync::atomic::Ordering::Relaxed};

use futures_lite::AsyncWriteExt;
use glommio::net::TcpStream;
use proto::{
    auth::{AuthError, Claims},
    client::{self},
    http1::{json_error, Head},
    placement::owner_shard,
    ws::{handshake, server_frame, OpCode, Receiver},
};

use super::{link::Link, respond};
use crate::{
    metrics::AUTH_REASONS,
    shard::{conn_state::Conn, Shard},
};
pub(super) use session::Grants;
use session::Session;

/// Which WebSocket endpoint.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `/v1/ws`: authenticated client protocol.
    Client,
    /// `/v1/echo`: diagnostic echo, no auth.
    Echo,
}

pub(super) fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

/// Verifies the request and either hands the socket to its owner shard or upgrades it here.
/// `verified`: the claims, when another shard verified the token and handed the socket over.
pub async fn upgrade(
    shard: Rc<Shard>,
    mut stream: TcpStream,
    request: super::Request,
    kind: Kind,
    verified: Option<Claims>,
) {
    let head = &request.head;
    let client = request.client;
    let key = match handshake::validate(head) {
        Ok(k) => k.to_owned(),
        Err(e) => {
            shard.metrics().bad_requests.fetch_add(1, Relaxed);
            let mut resp = json_error(e.status(), proto::error::Code::BadHandshake, &e.to_string());
            if e.status() == 426 {
                resp.headers.push("Sec-WebSocket-Version: 13".into());
            }
            respond(&mut stream, &resp, false).await;
            return;
        }
    };
    let claims = match (kind, verified) {
        (_, Some(claims)) => claims,
        (Kind::Client, None) => match authenticate(&shard, head) {
            Ok(c) => c,
            Err(e) => {
                respond(&mut stream, &auth_failure(&shard, &e, client), false).await;
                return;
            }
        },
        (_, None) => Claims::default(),
    };
    if kind == Kind::Client {
        let owner = owner_shard(&claims.sub, shard.shared.n_shards);
        if owner != shard.id {
            // Every connection of a customer lives on its owner shard: move the socket there
            // with the request and the verified claims; the owner answers the handshake.
            super::hand_off(
                &shard,
                stream,
                request,
                claims,
                super::Stream::WebSocket,
                owner,
            );
            return;
        }
        if let Some(resp) = super::customer_full(&shard, &claims.sub, client) {
            respond(&mut stream, &resp, false).await;
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
        .saturating_record((request.started.elapsed().as_micros() as u64).max(1));
    let _ = stream.set_read_timeout(None);
    shard.metrics().handshakes.fetch_add(1, Relaxed);
    let limits = session::session_limits(&shard, kind);
    let grants = Box::new(Grants::from(claims));
    let customer = grants.customer.clone();
    // The echo endpoint sends back messages up to its own (larger) limit.
    let max_backlog = shard
        .shared
        .config
        .limits
        .max_backlog
        .max(limits.max_message + 1024);
    let fd = std::os::fd::AsRawFd::as_raw_fd(&stream);
    let mut conn = Conn::new(fd, customer.clone(), shard.clock.get(), max_backlog);
    conn.platform = shard
        .presence
        .borrow_mut()
        .platform_index(head.query_param("platform").as_deref());
    let conn_key = shard.register(conn, &grants.roles);
    let mut session = Session {
        key: conn_key,
        grants,
        kind,
        rx: Receiver::default(),
        pending: session::Pending::from_slice(&request.buf[request.head_len..]),
        topics: Vec::new(),
        peer_closed: false,
        discard: false,
    };
    if kind == Kind::Client {
        // Stored events of the customer's stream go out right after the greeting, before
        // anything live (`?since=<cursor>` acknowledges what the client already has).
        let since = head.query_param("since");
        let resume = shard
            .broker
            .resume(&shard, conn_key, &customer, since.as_deref())
            .await;
        let welcome = client::welcome(
            &customer,
            &shard.next_conn_id(),
            &[],
            shard.shared.config.server.heartbeat_secs,
            &now_rfc3339(),
            (&resume.cursor, resume.recovered),
        );
        shard.send_now(conn_key, &server_frame(OpCode::Text, &welcome));
        shard.replay(conn_key, &resume.frames);
    }
    // The handshake's state (request head, read buffer, this future) is dropped here: the
    // connection lives on in a task that holds only the socket and its session, which is what
    // keeps an idle connection small.
    drop(request);
    let link = Link::new(stream);
    glommio::spawn_local(async move {
        // Bytes that arrived with the head (a client that did not wait for the 101).
        let proceed = session.pending.is_empty() || {
            let actions = session.decode(&shard, None);
            Box::pin(session.act(&shard, actions)).await
        };
        if proceed {
            run(shard, WsTask { session, link }).await;
        } else {
            session.finish(&shard);
        }
    })
    .detach();
}

/// What a WebSocket connection's task holds, saved in its slot while it is dormant.
pub struct WsTask {
    session: Session,
    link: Link,
}

impl WsTask {
    pub(in crate::conn) fn key(&self) -> crate::shard::slab::ConnKey {
        self.session.key
    }
}

/// Runs a WebSocket connection until it is finished or goes dormant; a revived connection
/// carries on here where its last task stopped.
pub(in crate::conn) async fn run(shard: Rc<Shard>, mut task: WsTask) {
    match task.session.run(&shard, &mut task.link).await {
        session::Exit::Done => task.session.finish(&shard),
        session::Exit::Dormant => {
            shard.go_dormant(task.key(), Box::new(super::Dormant::Ws(task)));
        }
    }
}

/// Counts a refused authentication, writes its audit line and builds its response (401 with
/// a JSON body).
pub(super) fn auth_failure(shard: &Shard, e: &AuthError, client: IpAddr) -> proto::http1::Response {
    let reason = e.reason();
    if let Some(i) = AUTH_REASONS.iter().position(|r| *r == reason) {
        shard.metrics().auth_failures[i].fetch_add(1, Relaxed);
    }
    crate::limits::audit("auth_failed", Some(client), None, reason.as_str());
    json_error(e.status(), reason, &e.to_string())
}

/// Checks the origin and verifies the token from `?token=`, `Authorization: Bearer` or the
/// `Sec-WebSocket-Protocol` list.
pub(super) fn authenticate(shard: &Shard, head: &Head) -> Result<Claims, AuthError> {
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
    shard.metrics().tokens_verified.fetch_add(1, Relaxed);
    shard
        .shared
        .verifier
        .verify(&token, shard.shared.unix_now())
}
