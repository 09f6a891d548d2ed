//! Connections from accept to close: read the request head, route it, authenticate, hand the
//! socket to its owner shard if needed, then run the WebSocket driver (`ws`) or the backend
//! API (`api`).

mod api;
mod link;
mod stream;
mod ws;

use std::{
    future::poll_fn, io, pin::Pin, rc::Rc, sync::atomic::Ordering::Relaxed, task::Poll,
    time::Duration,
};

use futures_lite::{AsyncRead, AsyncWriteExt};
use glommio::net::TcpStream;
use proto::http1::{json_error, parse_head, route, Response, Route};

use crate::shard::Shard;

/// Serves a new connection (accepted here, or handed over with the bytes read so far).
pub async fn serve(shard: Rc<Shard>, mut stream: TcpStream, mut buf: Vec<u8>) {
    let started = std::time::Instant::now();
    let _ = stream.set_nodelay(true);
    let timeout = Duration::from_secs(shard.shared.config.server.handshake_timeout_secs);
    let _ = stream.set_read_timeout(Some(timeout));
    let (head, head_len) = match read_head(&shard, &mut stream, &mut buf).await {
        Ok(Some(h)) => h,
        Ok(None) => return,
        Err(resp) => {
            shard.metrics().bad_requests.fetch_add(1, Relaxed);
            respond(&mut stream, &resp, false).await;
            return;
        }
    };
    dispatch(started, shard, stream, head, buf, head_len).await;
}

/// Serves one request by its route; an API connection may come back with a client stream.
async fn dispatch(
    started: std::time::Instant,
    shard: Rc<Shard>,
    stream: TcpStream,
    head: proto::http1::Head,
    buf: Vec<u8>,
    head_len: usize,
) {
    let mut next = Some((stream, head, buf, head_len));
    while let Some((mut stream, head, buf, head_len)) = next.take() {
        match route(&head) {
            Route::WebSocket => {
                ws::upgrade(
                    started,
                    shard.clone(),
                    stream,
                    head,
                    buf,
                    head_len,
                    ws::Kind::Client,
                )
                .await
            }
            Route::Echo if shard.shared.config.diagnostics.echo => {
                let kind = ws::Kind::Echo;
                ws::upgrade(started, shard.clone(), stream, head, buf, head_len, kind).await
            }
            Route::Sse => stream::sse(shard.clone(), stream, head, buf).await,
            Route::Missed => stream::missed(shard.clone(), stream, head, buf).await,
            Route::NotFound | Route::Echo => {
                let resp = json_error(404, "not_found", "no such endpoint");
                respond(&mut stream, &resp, false).await;
            }
            Route::MethodNotAllowed => {
                let resp = json_error(405, "method_not_allowed", "wrong method for this endpoint");
                respond(&mut stream, &resp, false).await;
            }
            _ => next = api::serve(shard.clone(), stream, head, buf, head_len).await,
        }
    }
}

/// Moves a customer's connection to its owner shard with the bytes read so far; the owner
/// serves it from the start (it replays the request head).
pub(crate) fn hand_off(shard: &Shard, stream: TcpStream, buf: Vec<u8>, owner: usize) {
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
}

/// Reads until `buf` holds a complete request head. `Ok(None)`: the peer went away quietly.
async fn read_head(
    shard: &Shard,
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
) -> Result<Option<(proto::http1::Head, usize)>, Response> {
    loop {
        match parse_head(buf) {
            Ok(Some(h)) => return Ok(Some(h)),
            Ok(None) => {}
            Err(e) => return Err(json_error(e.status(), "bad_request", &e.to_string())),
        }
        match read_more(shard, stream, buf).await {
            Ok(0) => return Ok(None),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                return if buf.is_empty() {
                    Ok(None)
                } else {
                    Err(json_error(
                        408,
                        "timeout",
                        "request head not received in time",
                    ))
                };
            }
            Err(_) => return Ok(None),
        }
    }
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
