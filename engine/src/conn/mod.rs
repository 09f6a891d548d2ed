//! Connections from accept to close: read the request head, route it, authenticate, hand the
//! socket to its owner shard if needed, then run the WebSocket driver (`ws`) or the backend
//! API (`api`).

mod api;
mod driver;
mod link;
mod stream;
mod ws;

use proto::error::Code;
use std::{
    future::poll_fn,
    io,
    net::IpAddr,
    pin::Pin,
    rc::Rc,
    sync::atomic::Ordering::Relaxed,
    task::Poll,
    time::{Duration, Instant},
};

use futures_lite::{AsyncRead, AsyncWriteExt};
use glommio::net::TcpStream;
use proto::{
    http1::{json_error, parse_head, route, Response, Route},
    proxy,
};

use crate::{limits::Limit, shard::Shard};

/// Serves a connection accepted on this shard: resolves the client's address, reads the
/// head within one deadline and routes the request.
pub async fn serve(shard: Rc<Shard>, mut stream: TcpStream) {
    let mut buf = Vec::new();
    let started = std::time::Instant::now();
    let _ = stream.set_nodelay(true);
    let config = &shard.shared.config;
    // One deadline for the PROXY header and the whole head, not one per read: a byte every
    // few seconds must not hold the socket (slow-loris).
    let deadline = started + Duration::from_secs(config.server.handshake_timeout_secs);
    let tcp_peer = stream
        .peer_addr()
        .map_or(IpAddr::from([0, 0, 0, 0]), |a| proxy::canonical(a.ip()));
    let Some(_head_slot) = enter_head(&shard, &mut stream, tcp_peer).await else {
        return;
    };
    let ip = if config.server.proxy_protocol && shard.shared.is_trusted(tcp_peer) {
        match read_proxy_header(&shard, &mut stream, &mut buf, deadline).await {
            Ok(Some(source)) => source.unwrap_or(tcp_peer),
            Ok(None) => return,
            Err(resp) => {
                shard.metrics().bad_requests.fetch_add(1, Relaxed);
                crate::limits::audit("bad_proxy_header", Some(tcp_peer), None, "");
                respond(&mut stream, &resp, false).await;
                return;
            }
        }
    } else {
        tcp_peer
    };
    match read_head(&shard, &mut stream, &mut buf, deadline).await {
        Ok(Some((head, head_len))) => {
            drop(_head_slot);
            dispatch(started, shard, stream, head, buf, head_len, ip).await
        }
        Ok(None) => {}
        Err(resp) => refuse_head(&shard, &mut stream, &resp, ip).await,
    }
}

/// Counts a new socket as reading its head, against the process cap (heads alone) and its
/// address's `limits.pending_heads_per_ip`; answers 503 or 429 and returns None when over
/// either.
async fn enter_head<'a>(
    shard: &'a Shard,
    stream: &mut TcpStream,
    tcp_peer: IpAddr,
) -> Option<crate::limits::HeadGuard<'a>> {
    let shared = &shard.shared;
    let limits = &shared.config.limits;
    // Unfinished heads alone may not hold the cap's worth of sockets; open client connections
    // do not count here, so the API, probes and scrapes are still served on a full node.
    if limits.max_connections > 0
        && shared.heads.pending.load(Relaxed) >= limits.max_connections as i64
    {
        shared.refuse(shard.id, Limit::MaxConnections, Some(tcp_peer), None);
        refuse_unread(shard, stream, &server_full()).await;
        return None;
    }
    // A trusted proxy carries many clients; an exempt address is trusted not to abuse.
    let counted =
        !shared.is_trusted(tcp_peer) && !shared.exempt.iter().any(|n| n.contains(tcp_peer));
    match shared
        .heads
        .enter(counted.then_some(tcp_peer), limits.pending_heads_per_ip)
    {
        Ok(guard) => Some(guard),
        Err(_) => {
            shared.refuse(shard.id, Limit::PendingHeads, Some(tcp_peer), None);
            let mut resp = json_error(
                429,
                Code::RateLimited,
                "too many requests from this address still sending their head",
            );
            resp.headers.push("Retry-After: 5".into());
            refuse_unread(shard, stream, &resp).await;
            None
        }
    }
}

/// Answers a socket whose request was never read, then reads (and drops) what the client
/// sent for a moment before closing: closing with unread input would reset the connection
/// and could destroy the answer before the client reads it.
async fn refuse_unread(shard: &Shard, stream: &mut TcpStream, resp: &Response) {
    if respond(stream, resp, false).await {
        let _ = stream.shutdown(std::net::Shutdown::Write).await;
        let deadline = Instant::now() + Duration::from_millis(500);
        let mut sink = Vec::new();
        while matches!(
            read_more_by(shard, stream, &mut sink, deadline).await,
            Ok(1..)
        ) {
            sink.clear();
        }
    }
}

/// Answers a head that was malformed or too slow. A slow one (408) also counts as a
/// connection attempt of its address, so slow sockets cannot be cycled without end.
async fn refuse_head(shard: &Shard, stream: &mut TcpStream, resp: &Response, ip: IpAddr) {
    shard.metrics().bad_requests.fetch_add(1, Relaxed);
    if resp.status == 408 {
        slow_request(shard, ip);
    }
    respond(stream, resp, false).await;
}

/// Counts a request whose head or body missed its deadline (audit line, metric, attempt).
fn slow_request(shard: &Shard, ip: IpAddr) {
    let shared = &shard.shared;
    shared.refuse(shard.id, Limit::SlowRequest, Some(ip), None);
    if !shared.exempt.iter().any(|n| n.contains(ip)) {
        let minute = (shared.unix_now() / 60) as u32;
        let _ = shared.attempts.admit(ip, minute, u32::MAX);
    }
}

fn server_full() -> Response {
    let mut resp = json_error(
        503,
        Code::ServerFull,
        "too many connections; try again later",
    );
    resp.headers.push("Retry-After: 5".into());
    resp
}

/// The client of a request: a trusted proxy's `X-Forwarded-For` refines the peer.
pub(crate) fn client_ip(shard: &Shard, peer_ip: IpAddr, head: &proto::http1::Head) -> IpAddr {
    proxy::forwarded_client(peer_ip, head.forwarded_for.as_deref(), |ip| {
        shard.shared.is_trusted(ip)
    })
}

/// Admission of a client stream (WebSocket, SSE, long poll) before anything else is done
/// for it: the process-wide connection cap and the attempts of its address this minute.
fn admit(shard: &Shard, client: IpAddr) -> Option<Response> {
    let limits = &shard.shared.config.limits;
    // Sockets still sending a head count too: a crowd of slow sockets leaves room for fewer
    // clients rather than taking the open files the admitted ones need.
    if limits.max_connections > 0
        && shard.shared.open_connections() + shard.shared.heads.pending.load(Relaxed)
            >= limits.max_connections as i64
    {
        shard
            .shared
            .refuse(shard.id, Limit::MaxConnections, Some(client), None);
        return Some(server_full());
    }
    let per_ip = limits.connect_attempts_per_ip;
    if per_ip > 0 && !shard.shared.exempt.iter().any(|n| n.contains(client)) {
        let minute = (shard.shared.unix_now() / 60) as u32;
        if !shard.shared.attempts.admit(client, minute, per_ip) {
            shard
                .shared
                .refuse(shard.id, Limit::IpAttempts, Some(client), None);
            let mut resp = json_error(
                429,
                Code::RateLimited,
                &format!("more than {per_ip} connection attempts from this address in a minute"),
            );
            resp.headers.push("Retry-After: 60".into());
            return Some(resp);
        }
    }
    None
}

/// The per-customer connection limit, checked on the customer's owner shard before the
/// connection is accepted (WebSocket 101, SSE 200).
pub(crate) fn customer_full(shard: &Shard, customer: &str, client: IpAddr) -> Option<Response> {
    let limit = shard.shared.config.limits.connections_per_customer;
    // In a cluster, with the customer's connections on the other nodes as they last said.
    let elsewhere = shard
        .broker
        .cluster()
        .map_or(0, |c| c.connections_elsewhere(customer));
    let open = shard.registry.borrow().of_customer(customer).len() + elsewhere;
    if limit == 0 || open < limit {
        return None;
    }
    shard.shared.refuse(
        shard.id,
        Limit::CustomerConnections,
        Some(client),
        Some(customer),
    );
    let mut resp = json_error(
        429,
        Code::TooManyConnections,
        &format!("{customer} already has {open} open connections (limit {limit})"),
    );
    resp.headers.push("Retry-After: 5".into());
    Some(resp)
}

/// Reads a trusted proxy's PROXY header (v1 or v2) and removes it from `buf`. `Ok(None)`:
/// the peer went away.
async fn read_proxy_header(
    shard: &Shard,
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    deadline: Instant,
) -> Result<Option<Option<IpAddr>>, Response> {
    loop {
        match proxy::parse(buf) {
            Ok(proxy::Parsed::Header { source, len }) => {
                buf.drain(..len);
                return Ok(Some(source));
            }
            Ok(proxy::Parsed::NeedMore) => {}
            Err(e) => return Err(json_error(400, Code::BadRequest, &e.to_string())),
        }
        match read_more_by(shard, stream, buf, deadline).await {
            Ok(0) => return Ok(None),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::TimedOut => return Err(head_timeout()),
            Err(_) => return Ok(None),
        }
    }
}

/// Serves one request by its route; an API connection may come back with a client stream.
async fn dispatch(
    started: std::time::Instant,
    shard: Rc<Shard>,
    stream: TcpStream,
    head: proto::http1::Head,
    buf: Vec<u8>,
    head_len: usize,
    peer_ip: IpAddr,
) {
    let mut next = Some((stream, head, buf, head_len));
    while let Some((mut stream, head, buf, head_len)) = next.take() {
        let client = client_ip(&shard, peer_ip, &head);
        let r = route(&head);
        if matches!(r, Route::WebSocket | Route::Sse | Route::Missed) {
            if let Some(resp) = admit(&shard, client) {
                respond(&mut stream, &resp, false).await;
                return;
            }
        }
        // A client stream's handler takes the request whole.
        let request = move |head, buf| Request {
            started,
            head,
            buf,
            head_len,
            client,
        };
        match r {
            Route::WebSocket | Route::Echo
                if r == Route::WebSocket || shard.shared.config.diagnostics.echo =>
            {
                let kind = if r == Route::WebSocket {
                    ws::Kind::Client
                } else {
                    ws::Kind::Echo
                };
                ws::upgrade(shard.clone(), stream, request(head, buf), kind, None).await
            }
            Route::Sse => stream::sse(shard.clone(), stream, request(head, buf), None).await,
            Route::Missed => stream::missed(shard.clone(), stream, request(head, buf), None).await,
            Route::NotFound | Route::Echo => {
                let resp = json_error(404, Code::NotFound, "no such endpoint");
                respond(&mut stream, &resp, false).await;
            }
            Route::MethodNotAllowed => {
                let resp = json_error(
                    405,
                    Code::MethodNotAllowed,
                    "wrong method for this endpoint",
                );
                respond(&mut stream, &resp, false).await;
            }
            _ => next = api::serve(shard.clone(), stream, head, buf, head_len, client).await,
        }
    }
}

/// A client stream's request, read and routed: what its handler needs.
pub struct Request {
    /// When the socket was accepted (handshake latency).
    pub started: Instant,
    /// The parsed head.
    pub head: proto::http1::Head,
    /// Bytes read so far: the head, then perhaps the first frames.
    pub buf: Vec<u8>,
    /// Length of the head in `buf`.
    pub head_len: usize,
    /// The client's address (after PROXY and trusted `X-Forwarded-For`), its attempt counted.
    pub client: IpAddr,
}

/// Which handler a handed-off connection resumes in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// `GET /v1/ws`.
    WebSocket,
    /// `GET /v1/events/stream`.
    Sse,
    /// `GET /v1/events/missed` (long poll).
    Missed,
}

/// A client connection moving to its customer's owner shard, with everything the accepting
/// shard learned: the parsed request and the verified claims. The owner resumes it where it
/// left off: no second parse, no second signature check. Process-local (never encoded); the
/// socket closes if the handoff is dropped undelivered.
pub struct Handoff {
    /// The socket.
    pub fd: std::os::fd::OwnedFd,
    /// The request.
    pub request: Request,
    /// The token's verified claims.
    pub claims: proto::auth::Claims,
    /// The handler to resume in.
    pub stream: Stream,
}

/// Moves a customer's connection to its owner shard.
pub(crate) fn hand_off(
    shard: &Shard,
    stream: TcpStream,
    request: Request,
    claims: proto::auth::Claims,
    kind: Stream,
    owner: usize,
) {
    match crate::io::detach_for_handoff(stream) {
        Ok(fd) => shard.send_handoff(
            owner,
            Handoff {
                fd,
                request,
                claims,
                stream: kind,
            },
        ),
        Err(e) => tracing::warn!(error = %e, "handoff failed"),
    }
}

/// What a connection's task held, saved in its slot while the connection is dormant (parked
/// with nothing to read: see `shard::dormant`).
pub enum Dormant {
    /// A WebSocket connection.
    Ws(ws::WsTask),
    /// An SSE stream.
    Sse(stream::SseTask),
}

impl Dormant {
    /// The connection's key.
    pub(crate) fn key(&self) -> crate::shard::slab::ConnKey {
        match self {
            Dormant::Ws(t) => t.key(),
            Dormant::Sse(t) => t.key,
        }
    }
}

/// Gives a dormant connection a task again.
pub(crate) async fn revive(shard: Rc<Shard>, state: Box<Dormant>) {
    match *state {
        Dormant::Ws(t) => ws::run(shard, t).await,
        Dormant::Sse(t) => stream::run(shard, t).await,
    }
}

/// Resumes a connection handed over by another shard.
pub async fn resume(shard: Rc<Shard>, h: Handoff) {
    let stream = crate::io::adopt_owned(h.fd);
    match h.stream {
        Stream::WebSocket => {
            ws::upgrade(shard, stream, h.request, ws::Kind::Client, Some(h.claims)).await
        }
        Stream::Sse => stream::sse(shard, stream, h.request, Some(h.claims)).await,
        Stream::Missed => stream::missed(shard, stream, h.request, Some(h.claims)).await,
    }
}

/// Reads until `buf` holds a complete request head. `Ok(None)`: the peer went away quietly.
pub(crate) async fn read_head(
    shard: &Shard,
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    deadline: Instant,
) -> Result<Option<(proto::http1::Head, usize)>, Response> {
    loop {
        match parse_head(buf) {
            Ok(Some(h)) => return Ok(Some(h)),
            Ok(None) => {}
            Err(e) => return Err(json_error(e.status(), Code::BadRequest, &e.to_string())),
        }
        match read_more_by(shard, stream, buf, deadline).await {
            Ok(0) => return Ok(None),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::TimedOut => return Err(head_timeout()),
            Err(_) => return Ok(None),
        }
    }
}

fn head_timeout() -> Response {
    json_error(408, Code::Timeout, "request head not received in time")
}

/// [`read_more`] that fails with `TimedOut` at `deadline`, however the bytes trickle in.
pub(crate) async fn read_more_by(
    shard: &Shard,
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    deadline: Instant,
) -> io::Result<usize> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left < Duration::from_millis(1) {
        return Err(io::ErrorKind::TimedOut.into());
    }
    stream.set_read_timeout(Some(left))?;
    read_more(shard, stream, buf).await
}

/// Reads once into the shard's scratch buffer and appends what came to `buf`.
pub(crate) async fn read_more(
    shard: &Shard,
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
) -> io::Result<usize> {
    poll_fn(|cx| {
        let mut scratch = shard.scratch.borrow_mut();
        match Pin::new(&mut *stream).poll_read(cx, &mut scratch[..]) {
            Poll::Ready(Ok(n)) => {
                buf.extend_from_slice(&scratch[..n]);
                Poll::Ready(Ok(n))
            }
            other => other,
        }
    })
    .await
}

/// Writes a response; the caller closes the connection unless `keep_alive`.
pub(crate) async fn respond(stream: &mut TcpStream, resp: &Response, keep_alive: bool) -> bool {
    stream.write_all(&resp.encode(keep_alive)).await.is_ok()
}
