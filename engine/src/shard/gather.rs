//! Requests a shard sent to other shards and the answers it is gathering: one helper for
//! publish reports, histogram gathers and presence queries. A plain struct: the caller waits
//! on the returned receiver with one timeout ([`super::route::answer`]) and takes what was
//! gathered if it runs out.

use ahash::AHashMap;
use futures_channel::oneshot;

use super::countdown::Countdown;

struct Open<T> {
    left: Countdown,
    acc: T,
    tx: oneshot::Sender<T>,
}

/// Open requests by id, each with its accumulated answer of type `T`.
pub struct Gather<T> {
    open: AHashMap<u64, Open<T>>,
}

impl<T> Default for Gather<T> {
    fn default() -> Self {
        Gather {
            open: AHashMap::new(),
        }
    }
}

impl<T> Gather<T> {
    /// Opens request `req`, expecting the answers `left` counts, starting from `acc`; the
    /// receiver gets the accumulated answer once the last one is in.
    pub fn open(&mut self, req: u64, left: Countdown, acc: T) -> oneshot::Receiver<T> {
        let (tx, rx) = oneshot::channel();
        self.open.insert(req, Open { left, acc, tx });
        rx
    }

    /// Folds one answer to `req` into its accumulator (`forwarded`: see [`Countdown::report`]);
    /// completes the request when it was the last. Answers to unknown or timed-out requests
    /// are dropped.
    pub fn answer(&mut self, req: u64, forwarded: Option<u32>, fold: impl FnOnce(&mut T)) {
        let Some(o) = self.open.get_mut(&req) else {
            return;
        };
        fold(&mut o.acc);
        o.left.report(forwarded);
        if o.left.done() {
            let o = self.open.remove(&req).expect("present");
            let _ = o.tx.send(o.acc);
        }
    }

    /// Gives up on `req` (its wait timed out): what was gathered so far, if it was still open.
    pub fn give_up(&mut self, req: u64) -> Option<T> {
        self.open.remove(&req).map(|o| o.acc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_fold_until_the_last_then_the_request_completes_once() {
        let mut g: Gather<u32> = Gather::default();
        let mut rx = g.open(7, Countdown::new(1, 1), 0);
        g.answer(7, None, |a| *a += 1);
        assert_eq!(rx.try_recv().unwrap(), None, "the owner has not answered");
        g.answer(7, Some(1), |a| *a += 10);
        g.answer(7, None, |a| *a += 100);
        assert_eq!(rx.try_recv().unwrap(), Some(111));
        g.answer(7, None, |a| *a += 1000);
        assert!(g.give_up(7).is_none(), "completed requests are gone");
    }

    #[test]
    fn giving_up_returns_what_was_gathered() {
        let mut g: Gather<Vec<u8>> = Gather::default();
        let _rx = g.open(1, Countdown::new(0, 3), Vec::new());
        g.answer(1, None, |a| a.push(1));
        assert_eq!(g.give_up(1), Some(vec![1]));
        g.answer(1, None, |a| a.push(2));
        assert!(g.give_up(1).is_none());
    }
}
