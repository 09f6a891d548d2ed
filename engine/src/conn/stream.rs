//! The HTTP transports of the customer stream: Server-Sent Events (`/v1/events/stream`) and
//! missed events / long poll (`/v1/events/missed`).
//!
//! Both authenticate like the WebSocket (token from `?token=` or `Authorization: Bearer`;
//! a browser's EventSource cannot set headers) and move to the customer's owner shard, where
//! the customer's stored events and live connections are. An SSE stream is a `Conn` like a
//! WebSocket: the same fan-out queues shared records on it and the same flush rounds write
//! them; its task only watches for the client going away and for writability.

use proto::error::Code;
use std::{future::poll_fn, rc::Rc, sync::atomic::Ordering::Relaxed, task::Poll};

use bytes::Bytes;
use futures_lite::AsyncWriteExt;
use glommio::net::TcpStream;
use proto::{
    auth::Claims,
    client::{self, TopicPosition},
    event::{push_json_str, validate_topic},
    http1::{json_error, Head, Method, Response},
    lifecycle::{Lifecycle, Transport},
    placement::owner_shard,
    sse,
};

use super::{
    driver::{self, Step},
    link::Link,
    respond,
    ws::{auth_failure, authenticate, Grants},
};
use crate::shard::{conn_state::Conn, slab::ConnKey, streams::Poller, Joined, Shard};

/// Authenticates (unless another shard did: `verified`) and moves the request to the
/// customer's owner shard. `None`: answered or handed off.
async fn owner_claims(
    shard: &Rc<Shard>,
    mut stream: TcpStream,
    request: super::Request,
    verified: Option<Claims>,
    kind: super::Stream,
) -> Option<(Claims, TcpStream, super::Request)> {
    let claims = match verified {
        Some(claims) => claims,
        None => match authenticate(shard, &request.head) {
            Ok(c) => c,
            Err(e) => {
                respond(&mut stream, &auth_failure(shard, &e, request.client), false).await;
                return None;
            }
        },
    };
    let owner = owner_shard(&claims.sub, shard.shared.n_shards);
    if owner != shard.id {
        super::hand_off(shard, stream, request, claims, kind, owner);
        return None;
    }
    Some((claims, stream, request))
}

/// Values of a repeatable, comma-separated query parameter.
fn list_param(head: &Head, name: &str) -> Vec<String> {
    proto::http1::query_params(&head.query)
        .filter(|(k, _)| k == name)
        .flat_map(|(_, v)| {
            v.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// `?events=` prefixes as stream filters (`all` or none: everything).
fn filters(head: &Head) -> Vec<Box<str>> {
    let events = list_param(head, "events");
    if events.iter().any(|e| e == "all" || e == "*") {
        return Vec::new();
    }
    let mut events: Vec<Box<str>> = events.into_iter().map(String::into_boxed_str).collect();
    events.sort_unstable();
    events.dedup();
    events
}

/// The client's cursor: `Last-Event-ID` (what a browser sends when it reconnects) or
/// `?last_event_id=` / `?since=`.
fn cursor_param(head: &Head) -> Option<String> {
    head.last_event_id
        .clone()
        .filter(|s| !s.is_empty())
        .or_else(|| head.query_param("last_event_id").map(|s| s.into_owned()))
        .or_else(|| head.query_param("since").map(|s| s.into_owned()))
}

/// `Access-Control-Allow-Origin` for browser clients: the request's origin when an allow list
/// admitted it, any origin otherwise (the token, not a cookie, authenticates).
fn cors(shard: &Shard, head: &Head) -> String {
    match (
        &head.origin,
        shard.shared.config.auth.allowed_origins.is_empty(),
    ) {
        (Some(o), false) => format!("Access-Control-Allow-Origin: {o}\r\nVary: Origin"),
        _ => "Access-Control-Allow-Origin: *".to_owned(),
    }
}

/// `GET /v1/events/stream`.
pub async fn sse(
    shard: Rc<Shard>,
    stream: TcpStream,
    request: super::Request,
    verified: Option<Claims>,
) {
    let Some((claims, mut stream, request)) =
        owner_claims(&shard, stream, request, verified, super::Stream::Sse).await
    else {
        return;
    };
    let (head, client) = (request.head, request.client);
    if let Some(resp) = super::customer_full(&shard, &claims.sub, client) {
        respond(&mut stream, &resp, false).await;
        return;
    }
    let mut topics = list_param(&head, "topics");
    topics.sort_unstable();
    topics.dedup();
    if let Some(e) = topics.iter().find_map(|t| validate_topic(t).err()) {
        respond(&mut stream, &json_error(400, e.code, &e.message), false).await;
        return;
    }
    let limits = &shard.shared.config.limits;
    let filters = filters(&head);
    let over = if limits.topics_per_connection > 0 && topics.len() > limits.topics_per_connection {
        Some((Code::TooManyTopics, "topics", limits.topics_per_connection))
    } else if limits.filters_per_connection > 0 && filters.len() > limits.filters_per_connection {
        Some((
            Code::TooManyFilters,
            "event types",
            limits.filters_per_connection,
        ))
    } else {
        None
    };
    if let Some((code, what, cap)) = over {
        let msg = format!("a stream may name at most {cap} {what}");
        respond(&mut stream, &json_error(400, code, &msg), false).await;
        return;
    }
    let grants = Grants::from(claims);
    let customer = grants.customer.clone();
    let config = &shard.shared.config;
    if let Some(msg) = topics
        .iter()
        .find_map(|t| grants.subscribe_refusal(config, t))
    {
        respond(&mut stream, &json_error(403, Code::Forbidden, &msg), false).await;
        return;
    }
    let since = cursor_param(&head);
    let mut head_bytes = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n\
         Connection: keep-alive\r\nX-Accel-Buffering: no\r\n{}\r\n\r\n",
        cors(&shard, &head),
    )
    .into_bytes();
    head_bytes.extend(sse::retry(shard.shared.config.delivery.sse_retry_ms));
    if stream.write_all(&head_bytes).await.is_err() || head.method == Some(Method::Head) {
        return;
    }
    let _ = stream.set_read_timeout(None);
    let fd = std::os::fd::AsRawFd::as_raw_fd(&stream);
    let mut conn = Conn::new(
        fd,
        customer.clone(),
        shard.clock.get(),
        shard.shared.config.limits.max_backlog,
    );
    conn.life = Lifecycle::new(Transport::Sse, shard.clock.get());
    conn.platform = shard
        .presence
        .borrow_mut()
        .platform_index(head.query_param("platform").as_deref());
    conn.filters = filters.clone().into_boxed_slice();
    let key = shard.register(conn, &grants.roles);
    let resume = shard
        .broker
        .resume(&shard, key, &customer, since.as_deref())
        .await;
    // The greeting has no `id:`, so the browser's Last-Event-ID stays the stream's.
    let subscriptions: Vec<String> = if filters.is_empty() {
        vec!["all".to_owned()]
    } else {
        filters.iter().map(|f| f.to_string()).collect()
    };
    let hello = client::SseHello {
        customer: &customer,
        connection_id: &shard.next_conn_id(),
        subscriptions: &subscriptions,
        topics: &topics,
        cursor: &resume.cursor,
        recovered: resume.recovered,
        heartbeat_secs: shard.shared.config.server.heartbeat_secs,
    }
    .encode();
    shard.send_now(key, &Bytes::from(hello));
    shard.replay(key, &resume.frames);
    let mut names = Vec::with_capacity(topics.len());
    let mut positions = Vec::with_capacity(topics.len());
    let mut unique: Vec<&String> = Vec::with_capacity(topics.len());
    for t in &topics {
        if !unique.contains(&t) {
            unique.push(t);
        }
    }
    // Live only on SSE (topic events carry no id): no join history.
    let joining: Vec<_> = unique.iter().map(|t| (t.as_str(), None, 0)).collect();
    if !joining.is_empty() {
        shard.hold(key);
    }
    let answers = shard.subscribe_topics(key, &joining, &customer).await;
    for (topic, (name, joined)) in unique.into_iter().zip(answers) {
        let (offset, epoch, recovered) = match joined {
            Joined::Yes(offset, epoch, recovered) => (offset, epoch, recovered),
            // A slow owner still completes the subscription when it answers.
            Joined::Timeout => (0, String::new(), false),
            Joined::Full => {
                shard.send_now(key, &Bytes::from(client::sse_topic_full(topic)));
                continue;
            }
        };
        shard.membership(topic, &customer, true);
        names.push(name);
        positions.push(TopicPosition {
            topic: topic.clone(),
            offset,
            epoch,
            recovered,
        });
    }
    if !joining.is_empty() {
        // The greeting goes out before the topics are joined; this record says they are live
        // (what a client or a load generator waits for before counting on topic events).
        let rec = client::sse_subscription_confirmed(&positions);
        shard.confirm(key, &Bytes::from(rec));
    }
    // The stream lives on in a small task of its own: the request's state (head, buffers,
    // this function's future) is freed here, which is what keeps an idle stream small.
    let task = SseTask {
        key,
        link: Link::new(stream),
        roles: grants.roles,
        names,
    };
    glommio::spawn_local(run(shard, task)).detach();
}

/// What an SSE stream's task holds; saved in its slot while it is dormant.
pub struct SseTask {
    pub(super) key: ConnKey,
    link: Link,
    roles: Box<[String]>,
    names: Vec<Rc<str>>,
}

/// Runs an SSE stream until it ends (then leaves its shard's lists) or goes dormant.
pub(super) async fn run(shard: Rc<Shard>, mut task: SseTask) {
    if drive(&shard, task.key, &mut task.link).await {
        shard.go_dormant(task.key, Box::new(super::Dormant::Sse(task)));
    } else {
        shard.unregister(task.key, &task.roles, &task.names);
    }
}

/// Watches an SSE stream: ends when the client goes away, the socket fails, or the shard asks
/// it to close (drain, slow consumer, disconnect) and what was queued is out. True when the
/// stream is parked with nothing to read instead: its task may end (`shard::dormant`).
async fn drive(shard: &Shard, key: ConnKey, link: &mut Link) -> bool {
    poll_fn(|cx| loop {
        match driver::before_read(shard, key, link, cx, true) {
            Step::Gone => return Poll::Ready(false),
            Step::Close(code) => {
                // SSE has no close frame: stop adding, let what is queued go out (bounded
                // by the close deadline), then close the socket.
                driver::begin_close(shard, key, code);
                continue;
            }
            Step::Read => {}
        }
        let mut scratch = shard.scratch.borrow_mut();
        match link.poll_read(shard, key, cx, &mut scratch[..]) {
            Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(false),
            // A client has nothing to say on an SSE stream; whatever it sends is ignored.
            Poll::Ready(Ok(_)) => continue,
            Poll::Pending if link.is_parked() => return Poll::Ready(true),
            Poll::Pending => return Poll::Pending,
        }
    })
    .await
}

/// `GET /v1/events/missed?since=<cursor>[&wait=SECS][&events=prefix]`.
pub async fn missed(
    shard: Rc<Shard>,
    stream: TcpStream,
    request: super::Request,
    verified: Option<Claims>,
) {
    let Some((claims, mut stream, request)) =
        owner_claims(&shard, stream, request, verified, super::Stream::Missed).await
    else {
        return;
    };
    let (head, client) = (request.head, request.client);
    let wait = match head.query_param("wait").map(|w| w.parse::<u64>()) {
        None => 0,
        Some(Ok(w)) => w.min(shard.shared.config.delivery.max_poll_wait_secs),
        Some(Err(_)) => {
            let resp = json_error(400, Code::BadRequest, "wait must be a number of seconds");
            respond(&mut stream, &resp, false).await;
            return;
        }
    };
    let since = cursor_param(&head);
    let filters = filters(&head);
    let customer: Rc<str> = Rc::from(claims.sub.as_str());
    let mut found = shard
        .broker
        .missed(&shard, &customer, since.as_deref(), &filters)
        .await;
    if found.events.is_empty() && wait > 0 && !shard.draining() {
        // Parked polls hold a socket each: the per-customer connection limit bounds them too.
        let limit = shard.shared.config.limits.connections_per_customer;
        let parked = shard.pollers.borrow().get(&customer).map_or(0, Vec::len);
        if limit > 0 && parked >= limit {
            shard.shared.refuse(
                shard.id,
                crate::limits::Limit::CustomerConnections,
                Some(client),
                Some(&customer),
            );
            let mut resp = json_error(
                429,
                Code::TooManyConnections,
                &format!("{customer} already has {parked} waiting long polls (limit {limit})"),
            );
            resp.headers.push("Retry-After: 5".into());
            respond(&mut stream, &resp, false).await;
            return;
        }
        let poller = Rc::new(Poller {
            filters,
            ..Poller::default()
        });
        shard
            .pollers
            .borrow_mut()
            .entry(customer.clone())
            .or_default()
            .push(poller.clone());
        shard.metrics().polls_waiting.fetch_add(1, Relaxed);
        let timeout = glommio::timer::sleep(std::time::Duration::from_secs(wait));
        futures_lite::future::or(poller.notify.wait(), async {
            timeout.await;
        })
        .await;
        {
            let mut pollers = shard.pollers.borrow_mut();
            if let Some(list) = pollers.get_mut(&customer) {
                list.retain(|p| !Rc::ptr_eq(p, &poller));
                if list.is_empty() {
                    pollers.remove(&customer);
                }
            }
        }
        shard.metrics().polls_waiting.fetch_sub(1, Relaxed);
        found.events = poller.got.take();
        found.cursor = shard.current_cursor();
    }
    let mut body = Vec::with_capacity(64 + found.events.iter().map(Bytes::len).sum::<usize>());
    body.extend_from_slice(b"{\"events\":[");
    for (i, e) in found.events.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(e);
    }
    body.extend_from_slice(b"],\"cursor\":");
    push_json_str(&mut body, &found.cursor);
    body.extend_from_slice(if found.recovered {
        b",\"recovered\":true}"
    } else {
        b",\"recovered\":false}"
    });
    let mut resp = Response::json(200, body);
    resp.headers.push(cors(&shard, &head));
    resp.headers.push("Cache-Control: no-store".into());
    respond(&mut stream, &resp, false).await;
}
