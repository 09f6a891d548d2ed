//! The backend API and operational endpoints on keep-alive HTTP/1.1 connections.

use proto::error::Code;
use std::{
    rc::Rc,
    sync::atomic::Ordering::Relaxed,
    time::{Duration, Instant},
};

use glommio::net::TcpStream;
use proto::{
    api::{
        ApiError, BatchOut, BatchResult, Delivered, HistogramOut, HistogramsOut, PublishIn,
        PublishOut,
    },
    http1::{json_error, parse_head, route, Head, Response, Route},
};

use super::{read_more_by, respond};
use crate::{metrics, shard::Shard};

/// A keep-alive connection whose next request opens a client stream (a browser reusing the
/// connection that fetched its page for an EventSource, say): the socket, that request's head,
/// the bytes from the head on, and the head's length.
pub type Upgrade = (TcpStream, Head, Vec<u8>, usize);

/// Serves requests until the client closes, asks to close, idles out, or the server drains;
/// or until the next request is for a client stream, which is returned to the caller.
pub async fn serve(
    shard: Rc<Shard>,
    mut stream: TcpStream,
    mut head: Head,
    mut buf: Vec<u8>,
    mut head_len: usize,
    client: std::net::IpAddr,
) -> Option<Upgrade> {
    let m = shard.metrics();
    m.api_connections.fetch_add(1, Relaxed);
    let idle = Duration::from_secs(shard.shared.config.server.api_idle_secs);
    loop {
        // The head was just parsed (here or by the caller, for the first request).
        let started = Instant::now();
        let publish = matches!(route(&head), Route::Publish | Route::PublishBatch);
        let (resp, keep_alive) =
            match read_body(&shard, &mut stream, &head, &mut buf, head_len, client).await {
                Ok(body_len) => {
                    let body = buf[head_len..head_len + body_len].to_vec();
                    buf.drain(..head_len + body_len);
                    let resp = handle(&shard, &head, body).await;
                    (resp, !head.close && !shard.draining())
                }
                Err(Some(resp)) => (resp, false),
                Err(None) => break,
            };
        let sent = respond(&mut stream, &resp, keep_alive).await;
        if publish && sent {
            let us = started.elapsed().as_micros() as u64;
            shard
                .hists
                .borrow_mut()
                .publish_answer
                .saturating_record(us.max(1));
        }
        if !sent || !keep_alive {
            break;
        }
        // The next request on this connection: its first byte within `api_idle_secs` (or
        // before the server drains), then the whole head within `handshake_timeout_secs`.
        if buf.is_empty() && !next_request_starts(&shard, &mut stream, &mut buf, idle).await {
            break;
        }
        let deadline =
            Instant::now() + Duration::from_secs(shard.shared.config.server.handshake_timeout_secs);
        loop {
            match parse_head(&buf) {
                Ok(Some((h, n))) => {
                    if route(&h).is_client_stream() {
                        m.api_connections.fetch_sub(1, Relaxed);
                        return Some((stream, h, buf, n));
                    }
                    head = h;
                    head_len = n;
                    break;
                }
                Ok(None) => match read_more_by(&shard, &mut stream, &mut buf, deadline).await {
                    Ok(n) if n > 0 => {}
                    Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                        super::slow_request(&shard, client);
                        respond(&mut stream, &super::head_timeout(), false).await;
                        m.api_connections.fetch_sub(1, Relaxed);
                        return None;
                    }
                    _ => {
                        m.api_connections.fetch_sub(1, Relaxed);
                        return None;
                    }
                },
                Err(e) => {
                    respond(
                        &mut stream,
                        &json_error(e.status(), Code::BadRequest, &e.to_string()),
                        false,
                    )
                    .await;
                    m.api_connections.fetch_sub(1, Relaxed);
                    return None;
                }
            }
        }
    }
    m.api_connections.fetch_sub(1, Relaxed);
    None
}

/// Waits for the first byte of the next request on an idle keep-alive connection. False:
/// the client closed, it idled out, or the server started to drain (an idle connection must
/// not hold the drain to its timeout; a client retries on a new connection elsewhere).
async fn next_request_starts(
    shard: &Shard,
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    idle: Duration,
) -> bool {
    // Wait with a peek: glommio sends socket receives through its latency ring, which a busy
    // shard checks between fan-out chunks (`Shard::pause_if_needed`), while a plain read's
    // readiness poll would only be seen when the shard next polls its main ring (up to a
    // whole flush round later).
    let arrived = async {
        let mut first = [0u8; 1];
        matches!(stream.peek(&mut first).await, Ok(n) if n > 0)
    };
    let idle_or_drain = async {
        let until = Instant::now() + idle;
        while !shard.draining() && Instant::now() < until {
            glommio::timer::sleep(Duration::from_millis(100).min(idle)).await;
        }
        false
    };
    if !futures_lite::future::or(arrived, idle_or_drain).await {
        return false;
    }
    let deadline =
        Instant::now() + Duration::from_secs(shard.shared.config.server.handshake_timeout_secs);
    matches!(read_more_by(shard, stream, buf, deadline).await, Ok(n) if n > 0)
}

/// Reads the request body into `buf` after the head, within `server.body_timeout_secs`.
/// `Err(Some)`: answer and close.
async fn read_body(
    shard: &Shard,
    stream: &mut TcpStream,
    head: &Head,
    buf: &mut Vec<u8>,
    head_len: usize,
    client: std::net::IpAddr,
) -> Result<usize, Option<Response>> {
    if head.chunked {
        return Err(Some(json_error(
            501,
            Code::ChunkedNotSupported,
            "send the body with Content-Length",
        )));
    }
    let len = head.content_length.unwrap_or(0) as usize;
    let deadline =
        Instant::now() + Duration::from_secs(shard.shared.config.server.body_timeout_secs);
    if len > shard.shared.config.limits.max_body {
        return Err(Some(json_error(
            413,
            Code::BodyTooLarge,
            &format!(
                "bodies are limited to {} bytes",
                shard.shared.config.limits.max_body
            ),
        )));
    }
    while buf.len() < head_len + len {
        match read_more_by(shard, stream, buf, deadline).await {
            Ok(n) if n > 0 => {}
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                super::slow_request(shard, client);
                return Err(Some(json_error(
                    408,
                    Code::Timeout,
                    "request body not received in time",
                )));
            }
            _ => return Err(None),
        }
    }
    Ok(len)
}

fn authorized(shard: &Shard, head: &Head) -> bool {
    bearer_is(head, shard.shared.config.api_key())
}

/// Operational endpoints: open unless `auth.metrics_key` is set.
fn metrics_authorized(shard: &Shard, head: &Head) -> bool {
    let key = &shard.shared.config.auth.metrics_key;
    key.is_empty() || bearer_is(head, key)
}

fn bearer_is(head: &Head, key: &str) -> bool {
    let expected = key.as_bytes();
    let given = head.bearer().unwrap_or("").as_bytes();
    // Constant-time comparison: the key must not leak through response timing.
    given.len() == expected.len()
        && given
            .iter()
            .zip(expected)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

async fn handle(shard: &Rc<Shard>, head: &Head, body: Vec<u8>) -> Response {
    let shared = &shard.shared;
    match route(head) {
        Route::Health => Response::json(200, r#"{"status":"ok"}"#),
        Route::Ready => {
            if shard.draining() {
                Response::json(503, r#"{"status":"draining"}"#)
            } else if shared
                .bus
                .as_ref()
                .is_some_and(|b| !b.connected.load(std::sync::atomic::Ordering::Relaxed))
            {
                // A cluster node that cannot reach NATS would serve its clients without the
                // rest of the cluster: the load balancer should send them elsewhere.
                Response::json(503, r#"{"status":"nats unreachable"}"#)
            } else if shared.bus.as_ref().is_some_and(|b| {
                !b.stream_ready.load(std::sync::atomic::Ordering::Relaxed)
                    || b.queue_epoch.get().is_none()
            }) {
                // Until its JetStream streams exist, a node answers persistent publishes with
                // 503 (`no stream found`): it is not ready for the load balancer's traffic yet.
                Response::json(503, r#"{"status":"streams not ready"}"#)
            } else {
                Response::json(200, r#"{"status":"ready"}"#)
            }
        }
        Route::Metrics | Route::Stats | Route::Histograms if !metrics_authorized(shard, head) => {
            json_error(
                401,
                Code::Unauthorized,
                "Authorization: Bearer <auth.metrics_key> required",
            )
        }
        Route::Metrics => Response::text(
            200,
            "text/plain; version=0.0.4",
            metrics::render_prometheus(
                &shared.metrics,
                crate::io::rss_bytes(),
                shared.bus.as_deref(),
            ),
        ),
        Route::Stats => {
            let out = metrics::stats(
                &shared.metrics,
                crate::io::rss_bytes(),
                shared.started.elapsed().as_secs(),
            );
            Response::json(200, serde_json::to_vec(&out).expect("serialisable"))
        }
        Route::Histograms => match shard.gather_histograms().await {
            Some(h) => Response::json(
                200,
                serde_json::to_vec(&histograms_out(&h)).expect("serialisable"),
            ),
            None => json_error(503, Code::ShardTimeout, "a shard did not answer in time"),
        },
        Route::Publish
        | Route::PublishBatch
        | Route::Disconnect
        | Route::PresenceCustomer
        | Route::PresenceTopic
        | Route::Preferences
            if !authorized(shard, head) =>
        {
            json_error(
                401,
                Code::Unauthorized,
                "Authorization: Bearer <api key> required",
            )
        }
        r @ (Route::PresenceCustomer | Route::PresenceTopic | Route::Preferences) => {
            let topic = r == Route::PresenceTopic;
            use crate::shard::broker::Query;
            let (prefix, query) = match r {
                Route::PresenceTopic => ("/v1/presence/topics/", Query::TopicMembers),
                Route::Preferences => ("/v1/preferences/customers/", Query::Preferences),
                _ => ("/v1/presence/customers/", Query::CustomerPresence),
            };
            let raw = head.path.strip_prefix(prefix).unwrap_or("");
            let key = proto::http1::percent_decode(raw);
            if key.is_empty() {
                return json_error(
                    400,
                    Code::BadRequest,
                    "name a customer or topic in the path",
                );
            }
            if topic && !shared.config.namespace(&key).presence {
                return json_error(
                    404,
                    Code::PresenceOff,
                    &format!("presence is off for {key} (namespace presence = false)"),
                );
            }
            match shard.broker.query(shard, query, &key).await {
                Some(json) => Response::json(200, json),
                None => json_error(503, Code::ShardTimeout, "a shard did not answer in time"),
            }
        }
        Route::Disconnect => match proto::api::parse_body::<DisconnectIn>(&body) {
            Ok(d) => {
                let code = d.code.unwrap_or(proto::ws::close::NORMAL);
                if !DISCONNECT_CODES.contains(&code) {
                    return json_error(
                        400,
                        Code::InvalidCode,
                        &format!("code must be one of {DISCONNECT_CODES:?}"),
                    );
                }
                if d.customers.is_empty() || d.customers.len() > proto::api::MAX_TARGETS {
                    return json_error(400, Code::NoTarget, "give 1-10000 customers");
                }
                let c = shard.broker.disconnect(shard, &d.customers, code).await;
                let out = proto::api::DisconnectOut {
                    closed: Delivered {
                        websocket: c.websocket,
                        sse: c.sse,
                        poll: c.poll,
                    },
                };
                Response::json(200, serde_json::to_vec(&out).expect("serialisable"))
            }
            Err(e) => json_error(400, Code::BadJson, &e),
        },
        Route::Publish => match proto::api::parse_body::<PublishIn>(&body) {
            Ok(p) => match publish_one(shard, p).await {
                Ok(out) => Response::json(200, serde_json::to_vec(&out).expect("serialisable")),
                Err(e) => proto::http1::api_error(&e),
            },
            Err(e) => json_error(400, Code::BadJson, &e),
        },
        Route::PublishBatch => match proto::api::parse_body::<Vec<PublishIn>>(&body) {
            Ok(list) => {
                let mut results = Vec::with_capacity(list.len());
                for p in list {
                    results.push(match publish_one(shard, p).await {
                        Ok(out) => BatchResult::Published(out),
                        Err(e) => BatchResult::Failed(e),
                    });
                }
                let out = BatchOut { results };
                Response::json(200, serde_json::to_vec(&out).expect("serialisable"))
            }
            Err(e) => json_error(400, Code::BadJson, &e),
        },
        _ => json_error(404, Code::NotFound, "no such endpoint"),
    }
}

/// Body of `POST /v1/disconnect`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct DisconnectIn {
    customers: Vec<String>,
    #[serde(default)]
    code: Option<u16>,
}

/// Close codes a backend may ask for: normal, policy, try again later, token expired,
/// forbidden.
const DISCONNECT_CODES: [u16; 5] = [1000, 1008, 1013, 4001, 4003];

async fn publish_one(shard: &Rc<Shard>, p: PublishIn) -> Result<PublishOut, ApiError> {
    let now = || humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
    let wait = p.wait;
    let p = p
        .validate(|| shard.next_conn_id(), now)
        .map_err(|e| ApiError::new(400, e.code, e.message))?;
    if !shard.room_to_publish().await {
        return Err(ApiError::new(
            503,
            Code::Overloaded,
            "not published: delivery is behind; send it again later".to_string(),
        ));
    }
    let outcome = shard
        .broker
        .publish(shard, &p, Some(wait))
        .await
        .map_err(|e| ApiError::new(503, Code::Unavailable, format!("not published: {}", e.0)))?;
    let c = outcome.counts;
    Ok(PublishOut {
        id: p.event.id,
        delivered: Delivered {
            websocket: c.websocket,
            sse: c.sse,
            poll: c.poll,
        },
        queued: c.queued,
        dropped: c.dropped,
        duplicates: c.duplicates,
        declined: c.declined,
        offsets: outcome
            .offsets
            .into_iter()
            .map(|o| (o.topic, o.offset))
            .collect(),
    })
}

/// The `/v1/stats/histograms` body: each histogram as HdrHistogram V2 + DEFLATE, base64 (the
/// encoding of HdrHistogram's `HistogramLogWriter`, readable by its tools), with percentiles.
fn histograms_out(h: &crate::shard::Hists) -> HistogramsOut {
    use base64::Engine as _;
    use hdrhistogram::serialization::{Serializer as _, V2DeflateSerializer};
    let one = |h: &hdrhistogram::Histogram<u64>| {
        let mut bytes = Vec::new();
        V2DeflateSerializer::new()
            .serialize(h, &mut bytes)
            .expect("serialising to a Vec cannot fail");
        HistogramOut {
            count: h.len(),
            p50: h.value_at_quantile(0.5),
            p90: h.value_at_quantile(0.9),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
            histogram: base64::engine::general_purpose::STANDARD.encode(bytes),
        }
    };
    HistogramsOut::new(
        one(&h.publish_to_write),
        one(&h.handshake),
        one(&h.publish_answer),
    )
}
