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

use std::{
    collections::VecDeque,
    time::{Duration, Instant},
};

/// Jobs in arrival order and the time of the last flush.
pub struct FanoutQueue<J> {
    jobs: VecDeque<J>,
    window: Duration,
    last_flush: Option<Instant>,
}

impl<J> FanoutQueue<J> {
    /// An empty queue whose rounds are at least `window` apart while busy.
    pub fn new(window: Duration) -> Self {
        FanoutQueue {
            jobs: VecDeque::new(),
            window,
            last_flush: None,
        }
    }

    /// Gives back the memory a burst of deliveries grew the queue to.
    pub fn shrink(&mut self) {
        if self.jobs.capacity() > 4 * self.jobs.len().max(64) {
            self.jobs.shrink_to_fit();
        }
    }

    /// Adds a job behind every job that arrived before it.
    pub fn push(&mut self, job: J) {
        self.jobs.push_back(job);
    }

    /// The oldest job.
    pub fn pop(&mut self) -> Option<J> {
        self.jobs.pop_front()
    }

    /// Whether no job waits (the simulation picks among shards with work).
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty()
    }

    /// How long a round about to start at `now` should let deliveries gather first: the rest
    /// of the window since the last flush, or nothing when the shard has been quiet.
    pub fn gather_for(&self, now: Instant) -> Option<Duration> {
        let since = now.saturating_duration_since(self.last_flush?);
        (since < self.window).then(|| self.window - since)
    }

    /// A round ended with a flush at `now`.
    pub fn flushed(&mut self, now: Instant) {
        self.last_flush = Some(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_run_in_arrival_order_across_rounds() {
        let mut q = FanoutQueue::new(Duration::ZERO);
        q.push(1);
        q.push(2);
        assert_eq!(q.pop(), Some(1));
        q.push(3);
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
    fn a_zero_window_never_waits() {
        let t0 = Instant::now();
        let mut q: FanoutQueue<()> = FanoutQueue::new(Duration::ZERO);
        q.flushed(t0);
        assert_eq!(q.gather_for(t0), None);
    }

    #[test]
    fn a_queue_a_burst_grew_gives_its_memory_back_once_drained() {
        let mut q = FanoutQueue::new(Duration::ZERO);
        for i in 0..10_000 {
            q.push(i);
        }
        q.shrink();
        assert!(q.jobs.capacity() >= 10_000, "not while it holds the burst");
        while q.pop().is_some() {}
        q.shrink();
        assert!(q.jobs.capacity() <= 256, "{}", q.jobs.capacity());
    }
}
