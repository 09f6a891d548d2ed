//! The engine's only `unsafe` code: thin wrappers over a few system calls glommio does not
//! offer (vectored non-blocking send, non-blocking receive, fd duplication for handoff and
//! parking, an epoll set for parked sockets, resource limits), and the process's allocator
//! ([`alloc`]).
#![deny(clippy::undocumented_unsafe_blocks, clippy::missing_safety_doc)]

pub mod alloc;

use std::{
    io::{self, IoSlice},
    os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd},
};

use glommio::net::TcpStream;

/// Most slices handed to one `sendmsg`; Linux's `IOV_MAX` is 1024.
pub const MAX_IOV: usize = 64;

/// Sends `bufs` on a socket without blocking and without raising SIGPIPE.
///
/// Returns the bytes written, `WouldBlock` when the socket buffer is full.
pub fn send_vectored(fd: RawFd, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
    let n_iov = bufs.len().min(MAX_IOV);
    // SAFETY: an all-zero msghdr is a valid empty message header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    // IoSlice is ABI-compatible with iovec on Unix (documented by std).
    msg.msg_iov = bufs.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = n_iov as _;
    // SAFETY: msg points at `n_iov` valid iovecs borrowed from `bufs` for the whole call; the
    // kernel only reads them. An invalid fd yields EBADF, not undefined behaviour.
    let n = unsafe { libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Where a connection's queued frames are written: the socket in the engine, a scripted peer
/// in tests (which inject `WouldBlock`, `Interrupted`, `BrokenPipe`, short writes and slow
/// readers without a real socket).
pub trait Sink {
    /// Writes from `bufs` in order, without blocking; returns the bytes taken (possibly fewer
    /// than offered) or the error.
    fn send_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize>;
}

/// A socket, written with [`send_vectored`].
pub struct Socket(pub RawFd);

impl Sink for Socket {
    fn send_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        send_vectored(self.0, bufs)
    }
}

/// Most sends submitted to a [`SendRing`] in one system call.
const RING_BATCH: usize = 256;

/// An io_uring used only to make many non-blocking socket writes in one system call.
///
/// A fan-out round writes to hundreds of sockets, one `sendmsg` each; a system call's entry
/// and exit are a fixed cost per write. Here each write is one submission entry and a round
/// costs one `io_uring_enter` per 256 sockets. Every send carries `MSG_DONTWAIT`, so the
/// kernel completes it during that call (bytes sent, or `EAGAIN` when the socket buffer is
/// full) instead of waiting for the socket: nothing is left in flight, which is what lets
/// callers lend their buffers for the call alone. Glommio's own ring is not used for this:
/// its sends copy into its buffers and complete through its reactor, one task wake-up per
/// write. Without a ring (the kernel refused one, or it failed) each write is a `sendmsg`.
pub struct SendRing {
    ring: Option<io_uring::IoUring>,
    /// Message headers for multi-slice sends, kept alive until their call returns.
    hdrs: Vec<libc::msghdr>,
    /// One chunk's results: bytes sent, or minus the errno.
    res: Vec<i32>,
}

/// A send the ring has not completed yet (in `SendRing::res`).
const PENDING: i32 = i32::MIN;

impl SendRing {
    /// A ring for the calling thread, which alone may use it, and the error that left it
    /// without one (its writes then go out one `sendmsg` each).
    pub fn new() -> (SendRing, Option<io::Error>) {
        // A single issuer lets the kernel skip locking on submission (Linux 6.0+); with
        // SUBMIT_ALL (5.18+) one bad entry does not hold back the rest of a chunk.
        let ring = io_uring::IoUring::builder()
            .setup_single_issuer()
            .setup_submit_all()
            .build(RING_BATCH as u32)
            .or_else(|_| io_uring::IoUring::new(RING_BATCH as u32));
        let (ring, error) = match ring {
            Ok(r) => (Some(r), None),
            Err(e) => (None, Some(e)),
        };
        let ring = SendRing {
            ring,
            hdrs: Vec::with_capacity(RING_BATCH),
            res: Vec::with_capacity(RING_BATCH),
        };
        (ring, error)
    }

    /// Whether writes go through the ring (false: one `sendmsg` each).
    pub fn batched(&self) -> bool {
        self.ring.is_some()
    }

    /// Writes each `(fd, slices)` of `msgs` as [`send_vectored`] would and pushes one result
    /// per message, in order, onto `out`.
    pub fn send_each(
        &mut self,
        msgs: &[(RawFd, &[IoSlice<'_>])],
        out: &mut Vec<io::Result<usize>>,
    ) {
        for chunk in msgs.chunks(RING_BATCH) {
            self.res.clear();
            self.res.resize(chunk.len(), PENDING);
            if self.ring.is_some() {
                self.submit_chunk(chunk);
            }
            for (r, (fd, bufs)) in self.res.iter().zip(chunk) {
                out.push(match *r {
                    // No ring, or it failed before taking this one: the kernel never saw it.
                    PENDING => send_vectored(*fd, bufs),
                    r if r < 0 => Err(io::Error::from_raw_os_error(-r)),
                    r => Ok(r as usize),
                });
            }
        }
    }

    /// Queues one entry per message of `chunk`, submits them and waits for every completion.
    fn submit_chunk(&mut self, chunk: &[(RawFd, &[IoSlice<'_>])]) {
        let Some(ring) = self.ring.as_mut() else {
            return;
        };
        self.hdrs.clear();
        for (_, bufs) in chunk {
            // SAFETY: an all-zero msghdr is a valid empty message header.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            // IoSlice is ABI-compatible with iovec on Unix (documented by std).
            msg.msg_iov = bufs.as_ptr() as *mut libc::iovec;
            msg.msg_iovlen = bufs.len().min(MAX_IOV) as _;
            self.hdrs.push(msg);
        }
        let flags = libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT;
        {
            let mut sq = ring.submission();
            for (i, (fd, bufs)) in chunk.iter().enumerate() {
                let fd = io_uring::types::Fd(*fd);
                let entry = if bufs.len() == 1 {
                    io_uring::opcode::Send::new(fd, bufs[0].as_ptr(), bufs[0].len() as u32)
                        .flags(flags)
                        .build()
                } else {
                    io_uring::opcode::SendMsg::new(fd, &self.hdrs[i])
                        .flags(flags as u32)
                        .build()
                };
                // SAFETY: the entry points at `bufs` (borrowed for this whole call) or at
                // `self.hdrs[i]` (untouched until the next call), whose iovecs are `bufs`.
                // `complete` returns only when every entry has completed, or after closing
                // the ring (the kernel then runs nothing more from it), so the kernel reads
                // none of them afterwards. The queue holds RING_BATCH entries and is empty
                // between calls.
                unsafe {
                    sq.push(&entry.user_data(i as u64))
                        .expect("a chunk fits the submission queue")
                };
            }
        }
        if let Err(e) = self.complete(chunk.len()) {
            // Never seen: close the ring (whatever it holds is dropped unrun) and write
            // directly from now on; the sends it did not take are made by the caller.
            tracing::warn!(error = %e, "the io_uring for batched writes failed; one sendmsg per write from now on");
            self.ring = None;
        }
    }

    /// Submits the queued entries and waits for all `n` of their completions, which land in
    /// `self.res` (bytes sent, or minus the errno). An error: the ring failed.
    fn complete(&mut self, n: usize) -> io::Result<()> {
        let ring = self.ring.as_mut().expect("called with a ring");
        let mut seen = 0;
        let mut cancelled = false;
        let mut first = true;
        while seen < n {
            let submitted = if first {
                first = false;
                ring.submit()
            } else {
                ring.submit_and_wait(1)
            };
            match submitted {
                Err(e) if e.kind() != io::ErrorKind::Interrupted => return Err(e),
                _ => {}
            }
            for cqe in ring.completion() {
                if let Some(r) = self.res.get_mut(cqe.user_data() as usize) {
                    *r = cqe.result();
                    seen += 1;
                }
            }
            if seen < n && !cancelled {
                // A send the kernel did not complete inline (not expected with
                // MSG_DONTWAIT) must not outlive the buffers it reads: cancel what is in
                // flight, then wait for every completion.
                cancelled = true;
                let cancel =
                    io_uring::opcode::AsyncCancel2::new(io_uring::types::CancelBuilder::any())
                        .build()
                        .user_data(u64::MAX);
                // SAFETY: a cancel entry reads no user memory; the queue has room (what was
                // queued before was submitted or is still there, at most RING_BATCH - 1).
                let _ = unsafe { ring.submission().push(&cancel) };
            }
        }
        Ok(())
    }
}

/// Receives into `buf` without blocking: `WouldBlock` when nothing is there, `Ok(0)` at EOF.
pub fn recv(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes for the whole call; an invalid fd
    // yields EBADF, not undefined behaviour.
    let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Duplicates a socket fd as an owned fd (close-on-exec): a parked connection keeps its socket
/// this way after its glommio stream is dropped.
pub fn dup_owned(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC takes an int argument and returns a new fd or -1.
    let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if new < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `new` was just returned by fcntl(F_DUPFD_CLOEXEC): an open fd nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

/// Hands an owned socket back to glommio (a parked connection that becomes busy again).
pub fn adopt_owned(fd: OwnedFd) -> TcpStream {
    // SAFETY: `OwnedFd` is the fd's sole owner; `into_raw_fd` gives that ownership up.
    unsafe { TcpStream::from_raw_fd(fd.into_raw_fd()) }
}

/// An epoll set in one-shot mode, for sockets that have been quiet a while ("parked"): one
/// shared readiness source instead of a glommio read poll (~0.5 KB) per socket.
pub struct Epoll(OwnedFd);

/// One-shot read interest: after an event the socket is disarmed until [`Epoll::rearm`].
const PARKED_EVENTS: u32 = (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLONESHOT) as u32;

impl Epoll {
    /// A new, empty set (close-on-exec).
    pub fn new() -> io::Result<Epoll> {
        // SAFETY: epoll_create1 takes flags and returns a new fd or -1.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh epoll fd owned by nobody else.
        Ok(Epoll(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    fn ctl(&self, op: libc::c_int, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event { events, u64: token };
        // SAFETY: `ev` is a valid epoll_event for the call; the kernel copies it. Bad fds or
        // ops come back as errors.
        if unsafe { libc::epoll_ctl(self.0.as_raw_fd(), op, fd, &mut ev) } < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// Adds `fd` with one-shot read interest; events carry `token`.
    pub fn add(&self, fd: RawFd, token: u64) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_ADD, fd, PARKED_EVENTS, token)
    }

    /// Adds `fd` with persistent read and hang-up interest (the parking thread's own socket).
    pub fn add_level(&self, fd: RawFd, token: u64) -> io::Result<()> {
        self.ctl(
            libc::EPOLL_CTL_ADD,
            fd,
            (libc::EPOLLIN | libc::EPOLLRDHUP) as u32,
            token,
        )
    }

    /// Re-arms a one-shot `fd` after its data was drained (the kernel re-checks readiness, so
    /// bytes that arrived in between are reported).
    pub fn rearm(&self, fd: RawFd, token: u64) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_MOD, fd, PARKED_EVENTS, token)
    }

    /// Removes `fd` (closing the fd removes it too).
    pub fn remove(&self, fd: RawFd) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_DEL, fd, 0, 0)
    }

    /// Waits for events (`timeout_ms` -1: forever); returns the tokens of ready fds in `out`.
    pub fn wait(&self, out: &mut Vec<u64>, timeout_ms: i32) -> io::Result<()> {
        const MAX: usize = 256;
        let mut evs = [libc::epoll_event { events: 0, u64: 0 }; MAX];
        // SAFETY: `evs` has room for MAX events; the kernel writes at most that many.
        let n =
            unsafe { libc::epoll_wait(self.0.as_raw_fd(), evs.as_mut_ptr(), MAX as _, timeout_ms) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        out.clear();
        out.extend(evs[..n as usize].iter().map(|e| e.u64));
        Ok(())
    }
}

/// Detaches a connection from this shard for a handoff: returns a duplicate of its socket
/// that the receiving shard will own (see [`adopt_owned`]), and drops (closes) this shard's
/// copy. As an `OwnedFd`, the socket is closed wherever a handoff is dropped undelivered.
pub fn detach_for_handoff(stream: TcpStream) -> io::Result<OwnedFd> {
    let fd = dup_owned(stream.as_raw_fd())?;
    drop(stream);
    Ok(fd)
}

/// Adopts the shard's end of the parking thread's socket pair into glommio.
///
/// Only call it with a fd taken from a `std::os::unix::net::UnixStream` by `into_raw_fd`.
pub fn adopt_unix(fd: RawFd) -> glommio::net::UnixStream {
    // SAFETY: the caller gave up ownership of `fd` with `into_raw_fd`; nothing else closes it.
    unsafe { glommio::net::UnixStream::from_raw_fd(fd) }
}

/// Raises `RLIMIT_NOFILE`'s soft limit to the hard limit; returns the resulting soft limit.
pub fn raise_nofile_limit() -> io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid out-pointer for getrlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: `lim` is a valid pointer to an initialised rlimit.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(lim.rlim_cur)
}

/// The locked-memory limit in bytes (glommio's rings need it).
pub fn memlock_limit() -> io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid out-pointer for getrlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(lim.rlim_cur)
}

/// Resident set size of this process in bytes, from /proc/self/statm.
pub fn rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

/// A global allocator wrapper that counts live bytes in `metrics::HEAP_BYTES` (the
/// `alloc-stats` feature; memory investigations only: one atomic add per allocation).
pub struct CountingAlloc<A>(pub A);

// SAFETY: every method forwards to the inner allocator unchanged; the counter is bookkeeping.
unsafe impl<A: std::alloc::GlobalAlloc> std::alloc::GlobalAlloc for CountingAlloc<A> {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        crate::metrics::HEAP_BYTES
            .fetch_add(layout.size() as i64, std::sync::atomic::Ordering::Relaxed);
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { self.0.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        crate::metrics::HEAP_BYTES
            .fetch_sub(layout.size() as i64, std::sync::atomic::Ordering::Relaxed);
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { self.0.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        crate::metrics::HEAP_BYTES.fetch_add(
            new_size as i64 - layout.size() as i64,
            std::sync::atomic::Ordering::Relaxed,
        );
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { self.0.realloc(ptr, layout, new_size) }
    }
}

/// Configures mimalloc for a server that holds many idle connections: arenas are committed on
/// demand instead of eagerly (an idle process stays ~8 MB instead of ~30 MB), and freed pages
/// are purged after 100 ms instead of 1 s. Call first thing in `main`.
pub fn tune_allocator() {
    use libmimalloc_sys as mi;
    // SAFETY: mi_option_set takes an option id and a value and only writes mimalloc's option
    // table; the ids are those of the bundled mimalloc (see the constants' test).
    unsafe {
        mi::mi_option_set(MI_OPTION_ARENA_EAGER_COMMIT, 0);
        mi::mi_option_set(MI_OPTION_PURGE_DELAY, 100);
    }
}

// Option ids of the mimalloc v3 bundled by libmimalloc-sys 0.1.49 (`mi_option_e` in
// c_src/mimalloc/v3/include/mimalloc.h); the sys crate does not name these two.
const MI_OPTION_ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Returns this thread's free allocator pages to the OS. mimalloc purges lazily, on later
/// allocations of the same thread, so a shard that goes idle after a burst of connections
/// would otherwise keep the burst's memory resident. The shard ticker calls this; `force`
/// also visits full pages, whose blocks other shards may have freed since (frames, handed-off
/// connections), which a normal collection skips.
pub fn collect_allocator(force: bool) {
    // SAFETY: mi_collect only walks and releases the calling thread's own heap.
    unsafe { libmimalloc_sys::mi_collect(force) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mimalloc_option_ids_match_the_bundled_version() {
        // Defaults documented in mimalloc's options.c: arena_eager_commit 2, purge_delay 1000.
        // SAFETY: mi_option_get only reads the option table.
        let (eager, delay) = unsafe {
            (
                libmimalloc_sys::mi_option_get(MI_OPTION_ARENA_EAGER_COMMIT),
                libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY),
            )
        };
        assert_eq!(
            (eager, delay),
            (2, 1000),
            "mimalloc option ids moved: update the constants"
        );
    }

    fn pair() -> (std::net::TcpStream, std::net::TcpStream) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (server, _) = l.accept().unwrap();
        (server, client)
    }

    fn read_some(peer: &mut std::net::TcpStream) -> Vec<u8> {
        use std::io::Read;
        let mut buf = [0u8; 64];
        let n = peer.read(&mut buf).unwrap();
        buf[..n].to_vec()
    }

    #[test]
    fn send_ring_writes_each_socket_and_reports_each_outcome() {
        let (mut ring, error) = SendRing::new();
        assert!(error.is_none() && ring.batched(), "{error:?}");
        let (a, mut a_peer) = pair();
        let (b, mut b_peer) = pair();
        let (full, _full_peer) = pair();
        let (gone, gone_peer) = pair();
        drop(gone_peer);
        // The closed peer answers the first write with a reset; later writes fail.
        let _ = send_vectored(gone.as_raw_fd(), &[IoSlice::new(b"x")]);
        std::thread::sleep(std::time::Duration::from_millis(50));
        // Fill `full` until the kernel refuses more (after the pause: meanwhile loopback moves
        // queued bytes on to the reader's buffer and frees room).
        let big = vec![7u8; 1 << 20];
        for size in [1 << 20, 1 << 14, 1 << 8, 1] {
            while send_vectored(full.as_raw_fd(), &[IoSlice::new(&big[..size])]).is_ok() {}
        }

        let one = [IoSlice::new(b"hello")];
        let two = [IoSlice::new(b"ab"), IoSlice::new(b"cde")];
        let tiny = [IoSlice::new(b"z")];
        let msgs: Vec<(RawFd, &[IoSlice<'_>])> = vec![
            (a.as_raw_fd(), &one),
            (b.as_raw_fd(), &two),
            (full.as_raw_fd(), &tiny),
            (gone.as_raw_fd(), &tiny),
            (-1, &tiny),
        ];
        let mut out = Vec::new();
        ring.send_each(&msgs, &mut out);
        assert_eq!(out.len(), 5);
        assert_eq!(*out[0].as_ref().unwrap(), 5);
        assert_eq!(*out[1].as_ref().unwrap(), 5);
        assert_eq!(
            out[2].as_ref().unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        assert!(matches!(
            out[3].as_ref().unwrap_err().raw_os_error(),
            Some(libc::EPIPE | libc::ECONNRESET)
        ));
        assert_eq!(
            out[4].as_ref().unwrap_err().raw_os_error(),
            Some(libc::EBADF)
        );
        assert_eq!(read_some(&mut a_peer), b"hello");
        assert_eq!(read_some(&mut b_peer), b"abcde");
    }

    #[test]
    fn send_ring_takes_more_sockets_than_one_submission() {
        let (mut ring, error) = SendRing::new();
        assert!(error.is_none() && ring.batched(), "{error:?}");
        let pairs: Vec<_> = (0..RING_BATCH + 3).map(|_| pair()).collect();
        let bufs: Vec<Vec<u8>> = (0..pairs.len())
            .map(|i| i.to_string().into_bytes())
            .collect();
        let slices: Vec<[IoSlice<'_>; 1]> = bufs.iter().map(|b| [IoSlice::new(b)]).collect();
        let msgs: Vec<(RawFd, &[IoSlice<'_>])> = pairs
            .iter()
            .zip(&slices)
            .map(|((s, _), sl)| (s.as_raw_fd(), &sl[..]))
            .collect();
        let mut out = Vec::new();
        ring.send_each(&msgs, &mut out);
        assert_eq!(out.len(), pairs.len());
        for (i, ((_, mut peer), r)) in pairs.into_iter().zip(out).enumerate() {
            assert_eq!(r.unwrap(), bufs[i].len());
            assert_eq!(read_some(&mut peer), bufs[i]);
        }
    }

    #[test]
    fn send_ring_without_a_ring_writes_each_socket_directly() {
        let mut ring = SendRing {
            ring: None,
            hdrs: Vec::new(),
            res: Vec::new(),
        };
        assert!(!ring.batched());
        let (a, mut a_peer) = pair();
        let two = [IoSlice::new(b"ab"), IoSlice::new(b"cde")];
        let tiny = [IoSlice::new(b"z")];
        let msgs: Vec<(RawFd, &[IoSlice<'_>])> = vec![(a.as_raw_fd(), &two), (-1, &tiny)];
        let mut out = Vec::new();
        ring.send_each(&msgs, &mut out);
        assert_eq!(*out[0].as_ref().unwrap(), 5);
        assert_eq!(
            out[1].as_ref().unwrap_err().raw_os_error(),
            Some(libc::EBADF)
        );
        assert_eq!(read_some(&mut a_peer), b"abcde");
    }
}
