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
}
