//! Parking: quiet sockets leave glommio for one shared epoll set.
//!
//! glommio keeps a read-readiness `Source` (~0.5 KB: it inlines a `msghdr` and a
//! `sockaddr_storage`) for every stream with a pending read, which is most of what an idle
//! connection costs. A connection that has not sent anything for `server.park_after_secs`
//! gives its glommio stream up and registers its socket (a duplicate fd) in its shard's epoll
//! set in one-shot mode. A small thread per shard blocks in `epoll_wait` and writes the
//! ready connections' keys to a socket pair whose other end the shard reads through glommio:
//! one readiness source per shard instead of one per socket. Writes never depend on this
//! (they are direct `sendmsg` calls on the fd either way).
//!
//! A parked connection reads directly (non-blocking `recv`) when its key comes back, and
//! re-arms the set once the socket is drained. It returns to glommio when it must wait for
//! writability or talks again within `park_after_secs` of its last message (a busy client
//! should not pay the thread hop on every message).

use std::{
    io::{self, Write},
    os::{
        fd::{AsRawFd, IntoRawFd, RawFd},
        unix::net::UnixStream as StdUnixStream,
    },
    rc::Rc,
    sync::Arc,
};

use futures_lite::AsyncReadExt;
use glommio::net::UnixStream;

use super::{slab::ConnKey, Shard};
use crate::io::Epoll;

/// Token of the parking thread's own socket: it hangs up when the shard is gone.
const STOP: u64 = u64::MAX;

/// A shard's epoll set for parked sockets.
pub struct Parking {
    epoll: Arc<Epoll>,
}

impl Parking {
    /// Creates the set and its thread; returns the shard's end of the key stream.
    pub fn start(shard: usize) -> io::Result<(Parking, UnixStream)> {
        let epoll = Arc::new(Epoll::new()?);
        let (ours, theirs) = StdUnixStream::pair()?;
        ours.set_nonblocking(true)?;
        // The thread's end is watched too: when the shard drops its end, the hang-up ends
        // the thread.
        epoll.add_level(theirs.as_raw_fd(), STOP)?;
        let set = epoll.clone();
        std::thread::Builder::new()
            .name(format!("ringcast-park-{shard}"))
            .spawn(move || watch(&set, theirs))?;
        let stream = crate::io::adopt_unix(ours.into_raw_fd());
        Ok((Parking { epoll }, stream))
    }

    /// Watches a parked socket; readiness comes back as `key`.
    pub fn add(&self, fd: RawFd, key: ConnKey) -> io::Result<()> {
        self.epoll.add(fd, key.to_bits())
    }

    /// Watches a parked socket again after its data was read.
    pub fn rearm(&self, fd: RawFd, key: ConnKey) -> io::Result<()> {
        self.epoll.rearm(fd, key.to_bits())
    }

    /// Stops watching a socket that returns to glommio.
    pub fn remove(&self, fd: RawFd) {
        let _ = self.epoll.remove(fd);
    }
}

/// The parking thread: forwards ready keys to the shard, 8 bytes each.
fn watch(epoll: &Epoll, mut to_shard: StdUnixStream) {
    let mut ready = Vec::new();
    let mut bytes = Vec::new();
    loop {
        match epoll.wait(&mut ready, -1) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::error!(error = %e, "parking: epoll_wait failed; parked sockets stay parked");
                return;
            }
        }
        if ready.contains(&STOP) {
            return;
        }
        bytes.clear();
        for key in &ready {
            bytes.extend_from_slice(&key.to_le_bytes());
        }
        if to_shard.write_all(&bytes).is_err() {
            return;
        }
    }
}

impl Shard {
    /// Reads ready keys from the parking thread and wakes their connections.
    pub(super) async fn parking_task(self: Rc<Self>, mut from_thread: UnixStream) {
        let mut buf = vec![0u8; 8 * 512];
        let mut have = 0;
        loop {
            match from_thread.read(&mut buf[have..]).await {
                Ok(0) | Err(_) => return,
                Ok(n) => have += n,
            }
            let whole = have - have % 8;
            {
                let mut conns = self.conns.borrow_mut();
                for chunk in buf[..whole].chunks_exact(8) {
                    let bits = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
                    if let Some(c) = conns.get_mut(ConnKey::from_bits(bits)) {
                        c.readable = true;
                        c.wake();
                    }
                }
            }
            buf.copy_within(whole..have, 0);
            have -= whole;
        }
    }
}
