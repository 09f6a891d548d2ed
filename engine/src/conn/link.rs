//! Where an upgraded connection's socket is read from: glommio while the client talks, the
//! shard's epoll set once it has been quiet (see `shard::park` for why).

use std::{
    io,
    os::fd::{AsRawFd, OwnedFd},
    pin::Pin,
    sync::atomic::Ordering::Relaxed,
    task::{Context, Poll},
};

use futures_lite::AsyncRead;
use glommio::net::TcpStream;

use crate::{
    io::{adopt_owned, dup_owned, recv},
    shard::{conn_state::Conn, slab::ConnKey, Shard},
};

/// The socket of an upgraded connection (WebSocket or SSE).
pub(in crate::conn) enum Link {
    /// Read through glommio (io_uring). Boxed: a parked connection frees the stream's bytes
    /// instead of carrying them in its task's future.
    Active(Box<TcpStream>),
    /// In the shard's epoll set; `ready` once the parking thread reported it, until a read
    /// finds it drained.
    Parked { fd: OwnedFd, ready: bool },
    /// Only inside `unpark`, while the socket moves back to glommio.
    Moving,
}

impl Link {
    pub(in crate::conn) fn new(stream: TcpStream) -> Link {
        Link::Active(Box::new(stream))
    }

    /// Called by the connection's task with its slot borrowed, before it reads or writes:
    /// takes readiness reported by the parking thread, parks a socket quiet for
    /// `server.park_after_secs`, and brings one back to glommio when it must wait for
    /// writability or talks again soon after its last message.
    pub(in crate::conn) fn settle(&mut self, shard: &Shard, key: ConnKey, c: &mut Conn) {
        let park_after = shard.shared.config.server.park_after_secs as u32;
        let quiet = c.life.silent(shard.clock.get());
        match self {
            Link::Parked { ready, .. } => {
                *ready |= std::mem::take(&mut c.readable);
                if c.write_blocked || (*ready && quiet < park_after) {
                    self.unpark(shard, c);
                    // The wheel checks parked sockets only for heartbeats: ask it to look
                    // again when this one may be quiet enough to park.
                    shard.schedule(key, c, shard.clock.get() + park_after.max(1));
                }
            }
            Link::Active(_)
                if park_after > 0
                    && quiet >= park_after
                    && !c.write_blocked
                    && c.life.is_open() =>
            {
                self.park(shard, key, c);
            }
            Link::Active(_) | Link::Moving => {}
        }
    }

    fn park(&mut self, shard: &Shard, key: ConnKey, c: &mut Conn) {
        let Link::Active(stream) = self else { return };
        // The duplicate keeps the socket open when glommio's stream (and its pending read)
        // is dropped; sends use whichever fd the slot names.
        let fd = match dup_owned(stream.as_raw_fd()) {
            Ok(fd) => fd,
            Err(_) => return,
        };
        if shard.parking.add(fd.as_raw_fd(), key).is_err() {
            return;
        }
        c.fd = fd.as_raw_fd();
        c.parked = true;
        c.readable = false;
        shard.metrics().parked.fetch_add(1, Relaxed);
        *self = Link::Parked { fd, ready: false };
    }

    fn unpark(&mut self, shard: &Shard, c: &mut Conn) {
        let Link::Parked { fd, .. } = std::mem::replace(self, Link::Moving) else {
            unreachable!("unpark is only called on a parked link");
        };
        shard.parking.remove(fd.as_raw_fd());
        c.parked = false;
        shard.metrics().parked.fetch_sub(1, Relaxed);
        *self = Link::new(adopt_owned(fd));
    }

    /// Whether the socket is in the shard's epoll set.
    pub(in crate::conn) fn is_parked(&self) -> bool {
        matches!(self, Link::Parked { .. })
    }

    /// The glommio stream, to wait for writability (`settle` has unparked a blocked socket).
    pub(in crate::conn) fn stream(&mut self) -> Option<&mut TcpStream> {
        match self {
            Link::Active(s) => Some(s),
            Link::Parked { .. } | Link::Moving => None,
        }
    }

    /// Reads into `buf`. Parked: a direct non-blocking `recv` once the socket was reported
    /// readable; drained, it is re-armed in the epoll set and the task waits for its key.
    pub(in crate::conn) fn poll_read(
        &mut self,
        shard: &Shard,
        key: ConnKey,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        match self {
            Link::Active(s) => Pin::new(&mut **s).poll_read(cx, buf),
            Link::Parked { fd, ready } => loop {
                if !*ready {
                    return Poll::Pending;
                }
                match recv(fd.as_raw_fd(), buf) {
                    Ok(n) => return Poll::Ready(Ok(n)),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        *ready = false;
                        if let Err(e) = shard.parking.rearm(fd.as_raw_fd(), key) {
                            return Poll::Ready(Err(e));
                        }
                    }
                    Err(e) => return Poll::Ready(Err(e)),
                }
            },
            Link::Moving => Poll::Ready(Ok(0)),
        }
    }
}
