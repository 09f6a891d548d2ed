//! The per-connection state that fan-out touches: the outbound queue of shared frames and the
//! flags that tell the connection's task what to do. Everything else about a connection (its
//! claims, subscriptions, partial input) lives in that task.

use std::{
    collections::VecDeque,
    io::{self, IoSlice},
    os::fd::RawFd,
    rc::Rc,
    task::Waker,
    time::Instant,
};

use bytes::Bytes;
use proto::lifecycle::{Lifecycle, Transport};

use crate::{
    io::{Sink, Socket, MAX_IOV},
    metrics::Histogram,
};

/// A queued frame: a handle to a shared buffer, plus when its event was published (for the
/// publish-to-write histogram). Never a copy of the payload.
pub struct OutFrame {
    /// The encoded frame.
    pub bytes: Bytes,
    /// When the publish was accepted, for events.
    pub published: Option<Instant>,
}

/// First byte of an unfragmented pong frame (FIN + opcode 0xA).
const PONG_FIRST_BYTE: u8 = 0x8A;

/// Pongs that may wait unsent in a row before a newer one replaces the last.
pub const MAX_PENDING_PONGS: usize = 16;

/// A connection as the shard sees it.
pub struct Conn {
    /// The socket (owned by the connection's task; used here for direct vectored sends).
    pub fd: RawFd,
    /// The customer (empty for the diagnostic echo).
    pub customer: Rc<str>,
    /// Open, closing or closed; heartbeats and the idle timeout (`proto::lifecycle`), and
    /// whether this is an SSE stream (records, comment pings, no close frames).
    pub life: Lifecycle,
    /// Event-type prefixes accepted on the customer's own stream; empty = all.
    pub filters: Box<[Box<str>]>,
    /// Frames waiting to be written.
    pub out: VecDeque<OutFrame>,
    /// Bytes in `out`, minus `sent`. (u32 like the two below: a backlog is bounded by
    /// `max_backlog`, and every byte of the slot counts with 100k connections.)
    pub out_bytes: u32,
    /// Backlog above which the connection is closed as a slow consumer (4008).
    pub max_backlog: u32,
    /// Bytes of `out.front()` already written.
    pub sent: u32,
    /// What drives the connection: its task (by its waker) or, while it is dormant, nothing
    /// but its saved state.
    pub driver: Driver,
    /// The socket buffer is full; the task waits for writability.
    pub write_blocked: bool,
    /// Queued in the shard's dirty list for the next flush round.
    pub dirty: bool,
    /// Joining topics: fanned-out frames wait in the shard's held list (`Shard::hold`).
    pub holding: bool,
    /// Cluster mode: reading the customer's stored events from the queue stream at connect;
    /// customer events meanwhile are stored, not queued (the replay brings them in order).
    pub resuming: bool,
    /// Shard clock of this connection's pending timer-wheel check (`u32::MAX`: none).
    pub wheel_at: u32,
    /// Client requests this connection may still send (`limits.client_messages_per_minute`).
    pub bucket: crate::limits::MessageBucket,
    /// Platform (`?platform=`), an index into the shard's presence platform names.
    pub platform: u8,
    /// The socket is parked in the shard's epoll set instead of glommio (see `shard::park`).
    pub parked: bool,
    /// The parking thread reported the parked socket readable.
    pub readable: bool,
}

/// What drives a connection. Two variants, so that the enum is as small as a waker: every
/// slot pays for it.
pub enum Driver {
    /// Its task, by the waker of its last poll (a no-op waker until the first poll of a newly
    /// spawned task, which is about to run anyway).
    Task(Waker),
    /// No task: a parked connection with nothing to read, its task's state saved here until
    /// something wakes it (see `shard::dormant`).
    Dormant(Box<crate::conn::Dormant>),
}

impl Driver {
    /// A task spawned and not polled yet.
    pub fn starting() -> Driver {
        Driver::Task(Waker::noop().clone())
    }

    /// The saved state of a dormant connection, leaving a task about to be spawned.
    pub fn take_dormant(&mut self) -> Option<Box<crate::conn::Dormant>> {
        match self {
            Driver::Dormant(_) => match std::mem::replace(self, Driver::starting()) {
                Driver::Dormant(state) => Some(state),
                Driver::Task(_) => None,
            },
            Driver::Task(_) => None,
        }
    }

    /// Records the waker of the task polling now (a clone only when it changed).
    pub fn register(&mut self, waker: &Waker) {
        if !matches!(self, Driver::Task(w) if w.will_wake(waker)) {
            *self = Driver::Task(waker.clone());
        }
    }
}

/// Whether event-type prefix `filters` let an event of type `kind` through (none: everything).
/// Shared by connections, parked long polls and `/v1/events/missed`.
pub fn accepts(filters: &[Box<str>], kind: &str) -> bool {
    filters.is_empty() || filters.iter().any(|f| kind.starts_with(&**f))
}

/// What [`Conn::queue`] did with a frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Queued {
    /// The frame handle is queued.
    Yes,
    /// The connection is closing or dead: nothing more goes out.
    Closing,
    /// The frame would push the backlog over the limit: the connection is now asked to close
    /// with 4008 (the caller wakes its task).
    OverBacklog,
}

/// What a flush achieved.
#[derive(Debug, PartialEq, Eq)]
pub enum Flush {
    /// Everything queued was written.
    Done,
    /// The socket buffer filled up; the rest waits for writability.
    Blocked,
    /// The socket failed.
    Failed,
}

/// What a flush wrote, for metrics.
pub struct Written<'a> {
    /// Bytes written.
    pub bytes: u64,
    /// Publish-to-write latency of completed event frames (Prometheus buckets).
    pub latency: &'a Histogram,
    /// The same latencies at full resolution, for `/v1/stats/histograms`.
    pub hdr: Option<&'a mut hdrhistogram::Histogram<u64>>,
}

impl Conn {
    /// A new connection with nothing queued.
    pub fn new(fd: RawFd, customer: Rc<str>, now: u32, max_backlog: usize) -> Self {
        Conn {
            fd,
            customer,
            life: Lifecycle::new(Transport::WebSocket, now),
            filters: Box::default(),
            out: VecDeque::new(),
            out_bytes: 0,
            max_backlog: u32::try_from(max_backlog).unwrap_or(u32::MAX),
            sent: 0,
            driver: Driver::starting(),
            write_blocked: false,
            dirty: false,
            holding: false,
            resuming: false,
            wheel_at: u32::MAX,
            // Full: the first take caps it at the configured size.
            bucket: crate::limits::MessageBucket::full(u32::MAX, 0),
            platform: 0,
            parked: false,
            readable: false,
        }
    }

    /// Queues a handle to a shared frame: a reference-count increment, never a copy of the
    /// payload. Enforces the backlog limit.
    pub fn queue(&mut self, frame: &Bytes, published: Option<Instant>) -> Queued {
        if !self.life.is_open() {
            return Queued::Closing;
        }
        if self.out_bytes as usize + frame.len() > self.max_backlog as usize {
            self.life.close(proto::ws::close::SLOW_CONSUMER);
            return Queued::OverBacklog;
        }
        self.out.push_back(OutFrame {
            bytes: frame.clone(),
            published,
        });
        self.out_bytes += frame.len() as u32;
        Queued::Yes
    }

    /// Queues a pong, in order with everything else. Every ping is answered (Autobahn 2.10
    /// expects it), but at most [`MAX_PENDING_PONGS`] wait unsent in a row: beyond, the newest
    /// replaces the last (RFC 6455 §5.5.3 allows answering only the latest ping), so a client
    /// that sends pings and never reads cannot grow the queue. Nothing is queued after our
    /// close frame. Pongs count against the backlog like any frame.
    pub fn queue_pong(&mut self, frame: &Bytes) -> Queued {
        if !self.life.may_send_control() {
            return Queued::Closing;
        }
        let unsent = self.out.len() - usize::from(self.sent > 0);
        let trailing = self
            .out
            .iter()
            .rev()
            .take(unsent.min(MAX_PENDING_PONGS))
            .take_while(|f| f.published.is_none() && f.bytes.first() == Some(&PONG_FIRST_BYTE))
            .count();
        if trailing == MAX_PENDING_PONGS {
            let back = self.out.back_mut().expect("trailing pongs exist");
            self.out_bytes = self.out_bytes - back.bytes.len() as u32 + frame.len() as u32;
            back.bytes = frame.clone();
            return Queued::Yes;
        }
        if self.out_bytes as usize + frame.len() > self.max_backlog as usize {
            self.life.close(proto::ws::close::SLOW_CONSUMER);
            return Queued::OverBacklog;
        }
        self.out.push_back(OutFrame {
            bytes: frame.clone(),
            published: None,
        });
        self.out_bytes += frame.len() as u32;
        Queued::Yes
    }

    /// Whether the customer's stream filters let an event of type `kind` through.
    pub fn accepts(&self, kind: &str) -> bool {
        accepts(&self.filters, kind)
    }

    /// Wakes the connection's task, or has a dormant connection's task spawned again.
    pub fn wake(&self) {
        match &self.driver {
            Driver::Task(w) => w.wake_by_ref(),
            Driver::Dormant(state) => super::dormant::woken(state.key()),
        }
    }

    /// Writes as much of the queue as the socket takes, in vectored sends of up to
    /// [`MAX_IOV`] frames: one system call per flush for a connection with a short queue.
    pub fn flush(&mut self, written: &mut Written<'_>) -> Flush {
        self.flush_to(&mut Socket(self.fd), written)
    }

    /// [`Conn::flush`] into any [`Sink`].
    pub fn flush_to(&mut self, sink: &mut impl Sink, written: &mut Written<'_>) -> Flush {
        let now = Instant::now();
        while !self.out.is_empty() {
            let mut iov: [IoSlice<'_>; MAX_IOV] = [IoSlice::new(&[]); MAX_IOV];
            let mut n_iov = 0;
            for (i, f) in self.out.iter().take(MAX_IOV).enumerate() {
                let skip = if i == 0 { self.sent as usize } else { 0 };
                iov[n_iov] = IoSlice::new(&f.bytes[skip..]);
                n_iov += 1;
            }
            match sink.send_vectored(&iov[..n_iov]) {
                Ok(n) => {
                    written.bytes += n as u64;
                    self.advance(n, now, written);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Flush::Blocked,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return Flush::Failed,
            }
        }
        Flush::Done
    }

    /// Appends what one vectored send of the queue would write (at most [`MAX_IOV`] frames)
    /// to `iov`, for a send made together with other connections' ([`Conn::sent_batched`]).
    pub fn unsent<'a>(&'a self, iov: &mut Vec<IoSlice<'a>>) {
        for (i, f) in self.out.iter().take(MAX_IOV).enumerate() {
            let skip = if i == 0 { self.sent as usize } else { 0 };
            iov.push(IoSlice::new(&f.bytes[skip..]));
        }
    }

    /// Accounts for the result of a send of [`Conn::unsent`] made in a batch, then writes
    /// what is left (a short write, more than [`MAX_IOV`] frames) with [`Conn::flush`].
    pub fn sent_batched(
        &mut self,
        result: io::Result<usize>,
        now: Instant,
        written: &mut Written<'_>,
    ) -> Flush {
        match result {
            Ok(n) => {
                written.bytes += n as u64;
                self.advance(n, now, written);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Flush::Blocked,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Flush::Failed,
        }
        if self.out.is_empty() {
            Flush::Done
        } else {
            self.flush(written)
        }
    }

    /// Accounts for `n` bytes written from the front of the queue.
    pub fn advance(&mut self, mut n: usize, now: Instant, written: &mut Written<'_>) {
        self.out_bytes -= n as u32;
        while n > 0 {
            let front = self
                .out
                .front()
                .expect("the kernel wrote no more than was queued");
            let left = front.bytes.len() - self.sent as usize;
            if n < left {
                self.sent += n as u32;
                return;
            }
            n -= left;
            self.sent = 0;
            let f = self.out.pop_front().expect("front exists");
            if let Some(t) = f.published {
                let us = now.saturating_duration_since(t).as_micros() as u64;
                written.latency.record_us(us);
                if let Some(h) = written.hdr.as_deref_mut() {
                    h.saturating_record(us.max(1));
                }
            }
        }
        if self.out.is_empty() {
            // An idle connection holds no queue buffer (4 frames' worth would be 192 B per
            // connection); a busy one pays one small allocation per idle-to-busy transition.
            self.out = VecDeque::new();
        }
    }

    /// Drops queued frames that have not started to go out (before a slow-consumer close);
    /// a partly written frame stays so the stream remains well-framed. Returns frames dropped.
    pub fn drop_unsent(&mut self) -> usize {
        let keep = usize::from(self.sent > 0);
        let dropped = self.out.len().saturating_sub(keep);
        self.out.truncate(keep);
        self.out_bytes = self
            .out
            .front()
            .map_or(0, |f| (f.bytes.len() - self.sent as usize) as u32);
        dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slot_pays_for_a_waker_and_nothing_more_to_hold_a_dormant_connection() {
        // The saved state hides in the waker's niche; a third variant or an extra field
        // would cost every connection 8 more bytes.
        assert_eq!(std::mem::size_of::<Driver>(), std::mem::size_of::<Waker>());
        // And the saved state is one small allocation (mimalloc's 96-byte class).
        assert!(std::mem::size_of::<crate::conn::Dormant>() <= 96);
        struct Count(std::sync::atomic::AtomicU32);
        impl std::task::Wake for Count {
            fn wake(self: std::sync::Arc<Self>) {
                self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
        let count = std::sync::Arc::new(Count(Default::default()));
        let waker = Waker::from(count.clone());
        let mut c = Conn::new(-1, Rc::from("c"), 0, 1024);
        c.wake(); // spawned, not polled yet: nothing to wake
        c.driver.register(&waker);
        c.wake();
        assert_eq!(count.0.load(std::sync::atomic::Ordering::Relaxed), 1);
    }

    #[test]
    fn fan_out_queues_handles_to_one_buffer() {
        let frame = proto::ws::server_frame(proto::ws::OpCode::Text, &[b'x'; 100]);
        let mut conns: Vec<Conn> = (0..1000)
            .map(|i| Conn::new(i, "c".into(), 0, 4096))
            .collect();
        for c in &mut conns {
            assert_eq!(c.queue(&frame, None), Queued::Yes);
        }
        // Every queued frame is the same allocation: no per-subscriber copy of the payload.
        assert!(conns
            .iter()
            .all(|c| c.out[0].bytes.as_ptr() == frame.as_ptr()));
    }

    #[test]
    fn backlog_limit_and_closing() {
        let frame = Bytes::from(vec![0u8; 1000]);
        let mut c = Conn::new(0, "c".into(), 0, 2500);
        assert_eq!(c.queue(&frame, None), Queued::Yes);
        assert_eq!(c.queue(&frame, None), Queued::Yes);
        assert_eq!(c.queue(&frame, None), Queued::OverBacklog);
        assert_eq!(c.life.close_requested(), Some(4008));
        assert_eq!(c.queue(&frame, None), Queued::Closing);
        assert_eq!((c.out.len(), c.out_bytes), (2, 2000));
    }

    #[test]
    fn pending_pongs_are_bounded_and_none_follow_close() {
        let pong = |n: u8| proto::ws::server_frame(proto::ws::OpCode::Pong, &[n]);
        let mut c = Conn::new(0, "c".into(), 0, 10_000);
        for i in 0..10u8 {
            assert_eq!(c.queue_pong(&pong(i)), Queued::Yes);
        }
        assert_eq!(c.out.len(), 10, "a few pings are each answered");
        for i in 0..100_000u32 {
            assert_eq!(c.queue_pong(&pong(i as u8)), Queued::Yes);
        }
        assert_eq!(
            (c.out.len(), c.out_bytes as usize),
            (MAX_PENDING_PONGS, 3 * MAX_PENDING_PONGS),
            "a flood leaves a bounded queue"
        );
        assert_eq!(
            c.out.back().unwrap().bytes[2],
            (99_999u32 % 256) as u8,
            "the latest wins"
        );
        // Behind an event, pongs queue again (bounded by the backlog).
        c.queue(&Bytes::from(vec![0u8; 10]), Some(Instant::now()));
        c.queue_pong(&pong(2));
        assert_eq!(c.out.len(), MAX_PENDING_PONGS + 2);
        c.life.begin_close(0, proto::ws::close::NORMAL);
        assert_eq!(c.queue_pong(&pong(4)), Queued::Closing);
        assert_eq!(
            c.out.len(),
            MAX_PENDING_PONGS + 2,
            "nothing follows our close frame"
        );
    }

    #[test]
    fn advance_across_frames_and_drop_unsent() {
        let h = Histogram::default();
        let mut w = Written {
            bytes: 0,
            latency: &h,
            hdr: None,
        };
        let mut c = Conn::new(0, "c".into(), 0, 10_000);
        for n in [10usize, 20, 30] {
            c.queue(&Bytes::from(vec![0u8; n]), Some(Instant::now()));
        }
        c.advance(15, Instant::now(), &mut w);
        assert_eq!((c.out.len(), c.sent, c.out_bytes), (2, 5, 45));
        // The partly written frame stays so the stream remains well-framed.
        assert_eq!(c.drop_unsent(), 1);
        assert_eq!((c.out.len(), c.out_bytes), (1, 15));
    }

    /// A peer scripted by a seed: each send fails with `WouldBlock`, `Interrupted` or (once
    /// `fail_after` bytes are in) `BrokenPipe`, or takes a random short prefix of what is
    /// offered, as a slow reader's socket does.
    struct ScriptedPeer {
        seed: u64,
        got: Vec<u8>,
        fail_after: Option<usize>,
    }

    impl ScriptedPeer {
        fn next(&mut self) -> u64 {
            // splitmix64
            self.seed = self.seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.seed;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }
    }

    impl Sink for ScriptedPeer {
        fn send_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
            if self.fail_after.is_some_and(|n| self.got.len() >= n) {
                return Err(io::ErrorKind::BrokenPipe.into());
            }
            match self.next() % 8 {
                0 => return Err(io::ErrorKind::WouldBlock.into()),
                1 => return Err(io::ErrorKind::Interrupted.into()),
                _ => {}
            }
            let offered: usize = bufs.iter().map(|b| b.len()).sum();
            let take = if self.next().is_multiple_of(2) {
                offered
            } else {
                (self.next() as usize) % (offered + 1)
            };
            let mut left = take;
            for b in bufs {
                let n = left.min(b.len());
                self.got.extend_from_slice(&b[..n]);
                left -= n;
            }
            Ok(take)
        }
    }

    /// Whatever the peer does (would-block, interrupted, short writes, a slow reader), the
    /// bytes that reach it are exactly the queued frames, in order, with none lost, repeated
    /// or torn; the byte counts agree; a broken pipe fails the flush and nothing written after
    /// it is claimed.
    #[test]
    fn flushing_into_a_faulty_peer_loses_repeats_and_tears_nothing() {
        let h = Histogram::default();
        for seed in 0..2_000u64 {
            let mut peer = ScriptedPeer {
                seed,
                got: Vec::new(),
                fail_after: seed.is_multiple_of(5).then_some(300 + seed as usize % 700),
            };
            let mut c = Conn::new(-1, "c".into(), 0, 1 << 20);
            let mut expected = Vec::new();
            let mut w = Written {
                bytes: 0,
                latency: &h,
                hdr: None,
            };
            let mut failed = false;
            for round in 0..40u64 {
                // A burst of frames of assorted sizes (more than MAX_IOV at times), each
                // numbered so a repeat or a tear would show.
                let n = (peer.next() % 90) as usize;
                for k in 0..n {
                    let len = 1 + (peer.next() % 200) as usize;
                    let tag = (round * 1000 + k as u64) as u8;
                    let frame = Bytes::from(vec![tag; len]);
                    expected.extend_from_slice(&frame);
                    assert_eq!(c.queue(&frame, Some(Instant::now())), Queued::Yes);
                }
                match c.flush_to(&mut peer, &mut w) {
                    Flush::Failed => {
                        failed = true;
                        break;
                    }
                    Flush::Done | Flush::Blocked => {}
                }
                assert_eq!(
                    peer.got.len() + c.out_bytes as usize,
                    expected.len(),
                    "seed {seed}: written + queued = offered"
                );
            }
            if !failed {
                // The reader catches up: everything arrives.
                while !c.out.is_empty() {
                    if c.flush_to(&mut peer, &mut w) == Flush::Failed {
                        failed = true;
                        break;
                    }
                }
            }
            assert_eq!(
                w.bytes as usize,
                peer.got.len(),
                "seed {seed}: bytes counted"
            );
            assert_eq!(
                peer.got[..],
                expected[..peer.got.len()],
                "seed {seed}: the stream is a prefix of the frames, in order"
            );
            if failed {
                assert!(
                    peer.fail_after.is_some(),
                    "seed {seed}: only a broken pipe fails"
                );
            } else {
                assert_eq!(peer.got, expected, "seed {seed}: nothing lost");
                assert_eq!((c.out.len(), c.out_bytes, c.sent), (0, 0, 0));
            }
        }
    }
}
