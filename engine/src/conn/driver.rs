//! The one driver step both transports share. A WebSocket session and an SSE stream differ
//! in what they read (frames and requests, or nothing) and in how they close (a close frame,
//! or the end of the stream); everything else a connection's task does before it reads is
//! here: the slot's waker, the lifecycle's decisions (`proto::lifecycle`), parking, and
//! writing out a backlog the socket could not take at once.

use std::{pin::Pin, sync::atomic::Ordering::Relaxed, task::Poll, time::Instant};

use bytes::Bytes;
use futures_lite::AsyncWrite;
use proto::ws::close;

use crate::conn::link::Link;
use crate::shard::{
    conn_state::{Conn, Flush},
    slab::ConnKey,
    Shard,
};

/// What a connection's task does next.
pub(in crate::conn) enum Step {
    /// Drop the connection: it is closed, gone from the slab, its socket failed, or its close
    /// is done.
    Gone,
    /// Begin the close that was requested, with this code.
    Close(u16),
    /// Read from the client.
    Read,
}

/// Runs on every poll of a connection's task, with the slot borrowed: registers the waker,
/// follows the lifecycle, settles the link (parks a quiet socket, brings back one that must
/// wait for writability) and writes a blocked backlog. A closing connection is done once its
/// queue is out and, for a WebSocket, `peer_done` (the peer answered our close or failed).
pub(in crate::conn) fn before_read(
    shard: &Shard,
    key: ConnKey,
    link: &mut Link,
    cx: &mut std::task::Context<'_>,
    peer_done: bool,
) -> Step {
    let mut conns = shard.conns.borrow_mut();
    let Some(c) = conns.get_mut(key) else {
        return Step::Gone;
    };
    c.driver.register(cx.waker());
    if c.life.is_closed() {
        return Step::Gone;
    }
    if let Some(code) = c.life.close_requested() {
        return Step::Close(code);
    }
    link.settle(shard, key, c);
    if c.write_blocked && !write_blocked(shard, c, link, cx) {
        return Step::Gone;
    }
    if c.life.is_closing() && peer_done && c.out.is_empty() {
        return Step::Gone;
    }
    Step::Read
}

/// Begins the close: nothing more is queued, a slow consumer's unsent frames are dropped
/// (they are what it could not take), and the wheel checks the close deadline. Returns false
/// when the close was already begun or the connection is gone. The caller then writes its
/// close (a WebSocket close frame; an SSE stream just ends once its queue is out).
pub(in crate::conn) fn begin_close(shard: &Shard, key: ConnKey, code: u16) -> bool {
    let mut conns = shard.conns.borrow_mut();
    let Some(c) = conns.get_mut(key) else {
        return false;
    };
    let now = shard.clock.get();
    if c.life.begin_close(now, code).is_none() {
        return false;
    }
    if code == close::SLOW_CONSUMER {
        let n = c.drop_unsent();
        shard.metrics().drops.fetch_add(n as u64, Relaxed);
    }
    shard.schedule(key, c, now + 1);
    true
}

/// Drives a connection whose socket buffer was full: waits for writability through glommio,
/// then resumes vectored flushing. Returns false if the socket failed.
fn write_blocked(
    shard: &Shard,
    c: &mut Conn,
    link: &mut Link,
    cx: &mut std::task::Context<'_>,
) -> bool {
    let Some(stream) = link.stream() else {
        // `Link::settle` brings a blocked socket back to glommio first; without a stream
        // there is nothing to wait on.
        c.life.kill();
        return false;
    };
    let ok = shard.writing(|written| loop {
        let Some(front) = c.out.front() else {
            c.write_blocked = false;
            break true;
        };
        let chunk: Bytes = front.bytes.slice(c.sent as usize..);
        match Pin::new(&mut *stream).poll_write(cx, &chunk) {
            Poll::Ready(Ok(n)) => {
                written.bytes += n as u64;
                c.advance(n, Instant::now(), written);
                match c.flush(written) {
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
    });
    if !ok {
        c.life.kill();
    }
    ok
}
