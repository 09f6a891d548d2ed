//! The fan-out queue: every delivery that reaches a shard enters it (topic events, customer
//! events, subscription answers, ephemeral events, receipts, disconnects) and runs strictly in
//! arrival order. That one order is what keeps a topic's events in order, keeps typing and
//! presence diffs behind the events published before them, and makes the switch from a
//! subscription's replay to live exact.
//!
//! It also decides when a round runs: a shard that flushed moments ago lets deliveries gather
//! for the rest of `server.flush_window_us`, so several publishes' frames leave in one write
//! per socket; a quiet shard runs at once. Plain data: the task that runs it (`route.rs`) owns
//! the waiting and the executor.
//!
//! And it knows how far behind the shard is: the arrival of the oldest job whose frames are not
//! written yet, and how many deliveries wait for the next round. The publish API holds new
//! publishes while the first is too long ago (`server.max_fanout_lag_ms`) or the second too
//! large (`server.max_fanout_backlog`): a publish is answered once accepted, so without these
//! bounds publishers faster than delivery would grow the queue without limit, and the backlog
//! bound keeps each round (and so each delivery's wait) short under overload.

use std::{
    collections::VecDeque,
    time::{Duration, Instant},
};

/// Jobs in arrival order and the time of the last flush.
pub struct FanoutQueue<J> {
    /// Arrival, deliveries (weight) and the job.
    jobs: VecDeque<(Instant, usize, J)>,
    /// The sum of the queued jobs' weights.
    waiting: usize,
    window: Duration,
    last_flush: Option<Instant>,
    /// Arrival of the oldest job not flushed yet (queued, or taken by the running round).
    unwritten_since: Option<Instant>,
}

impl<J> FanoutQueue<J> {
    /// An empty queue whose rounds are at least `window` apart while busy.
    pub fn new(window: Duration) -> Self {
        FanoutQueue {
            jobs: VecDeque::new(),
            waiting: 0,
            window,
            last_flush: None,
            unwritten_since: None,
        }
    }

    /// Gives back the memory a burst of deliveries grew the queue to.
    pub fn shrink(&mut self) {
        if self.jobs.capacity() > 4 * self.jobs.len().max(64) {
            self.jobs.shrink_to_fit();
        }
    }

    /// Adds a job of about `deliveries` deliveries, arrived at `now`, behind every job that
    /// arrived before it.
    pub fn push(&mut self, job: J, deliveries: usize, now: Instant) {
        self.unwritten_since.get_or_insert(now);
        self.waiting += deliveries;
        self.jobs.push_back((now, deliveries, job));
    }

    /// The oldest job.
    pub fn pop(&mut self) -> Option<J> {
        let (_, deliveries, job) = self.jobs.pop_front()?;
        self.waiting -= deliveries;
        Some(job)
    }

    /// The deliveries of the jobs that wait for a round.
    pub fn waiting(&self) -> usize {
        self.waiting
    }

    /// When the oldest job whose frames are not written yet arrived; `None` when the shard
    /// has caught up.
    pub fn unwritten_since(&self) -> Option<Instant> {
        self.unwritten_since
    }

    /// Whether no job waits (the simulation picks among shards with work).
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty()
    }

    /// How many jobs wait: a round takes these and leaves later arrivals to the next.
    #[allow(
        clippy::len_without_is_empty,
        reason = "is_empty is only for the simulation"
    )]
    pub fn len(&self) -> usize {
        self.jobs.len()
    }

    /// How long a round about to start at `now` should let deliveries gather first: the rest
    /// of the window since the last flush, or nothing when the shard has been quiet.
    pub fn gather_for(&self, now: Instant) -> Option<Duration> {
        let since = now.saturating_duration_since(self.last_flush?);
        (since < self.window).then(|| self.window - since)
    }

    /// A round ended with a flush at `now`: every job it took is written; what waits is
    /// what arrived meanwhile.
    pub fn flushed(&mut self, now: Instant) {
        self.last_flush = Some(now);
        self.unwritten_since = self.jobs.front().map(|(at, _, _)| *at);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_run_in_arrival_order_across_rounds() {
        let now = Instant::now();
        let mut q = FanoutQueue::new(Duration::ZERO);
        q.push(1, 1, now);
        q.push(2, 1, now);
        assert_eq!(q.pop(), Some(1));
        q.push(3, 1, now);
        assert_eq!((q.pop(), q.pop(), q.pop()), (Some(2), Some(3), None));
        assert!(q.is_empty());
    }

    #[test]
    fn a_busy_shard_gathers_for_the_rest_of_the_window_and_a_quiet_one_not_at_all() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut q: FanoutQueue<()> = FanoutQueue::new(ms(2));
        assert_eq!(q.gather_for(t0), None, "never flushed: run at once");
        q.flushed(t0);
        assert_eq!(q.gather_for(t0), Some(ms(2)));
        assert_eq!(q.gather_for(t0 + ms(1)), Some(ms(1)));
        assert_eq!(
            q.gather_for(t0 + ms(2)),
            None,
            "quiet for a window: at once"
        );
        assert_eq!(q.gather_for(t0 + ms(50)), None);
    }

    #[test]
    fn the_lag_runs_from_the_oldest_job_not_written_until_a_round_catches_up() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut q = FanoutQueue::new(Duration::ZERO);
        assert_eq!(q.unwritten_since(), None);
        q.push(1, 1, t0);
        q.push(2, 1, t0 + ms(5));
        assert_eq!(q.unwritten_since(), Some(t0));
        // A round takes both; until it has flushed they are still not written.
        while q.pop().is_some() {}
        assert_eq!(q.unwritten_since(), Some(t0));
        // One arrives while the round writes: it is what the shard is behind by next.
        q.push(3, 1, t0 + ms(20));
        q.flushed(t0 + ms(30));
        assert_eq!(q.unwritten_since(), Some(t0 + ms(20)));
        q.pop();
        q.flushed(t0 + ms(40));
        assert_eq!(q.unwritten_since(), None, "caught up");
    }

    #[test]
    fn the_backlog_counts_the_deliveries_of_the_jobs_not_taken_yet() {
        let now = Instant::now();
        let mut q = FanoutQueue::new(Duration::ZERO);
        q.push('a', 5_000, now);
        q.push('b', 15, now);
        assert_eq!(q.waiting(), 5_015);
        assert_eq!(q.pop(), Some('a'));
        assert_eq!(q.waiting(), 15);
        q.pop();
        assert_eq!((q.waiting(), q.pop()), (0, None));
    }

    #[test]
    fn a_zero_window_never_waits() {
        let t0 = Instant::now();
        let mut q: FanoutQueue<()> = FanoutQueue::new(Duration::ZERO);
        q.flushed(t0);
        assert_eq!(q.gather_for(t0), None);
    }

    #[test]
    fn a_queue_a_burst_grew_gives_its_memory_back_once_drained() {
        let mut q = FanoutQueue::new(Duration::ZERO);
        let now = Instant::now();
        for i in 0..10_000 {
            q.push(i, 1, now);
        }
        q.shrink();
        assert!(q.jobs.capacity() >= 10_000, "not while it holds the burst");
        while q.pop().is_some() {}
        q.shrink();
        assert!(q.jobs.capacity() <= 256, "{}", q.jobs.capacity());
    }
}
