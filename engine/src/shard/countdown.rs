//! Counting the delivery reports a request waits for, in whatever order they arrive.

/// The reports a publish (or a disconnect, or a direct message) still waits for.
///
/// A publish to a topic gets one report from the topic's owner, which says how many shards it
/// forwarded the event to, and then one report from each of those shards. The owner's report
/// and the forwarded shards' reports travel on different channels, so a forwarded shard's
/// report can arrive first: the count of outstanding shard reports may dip below zero until
/// the owner's report announces them. The request is complete when every owner has reported
/// and the shard reports balance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Countdown {
    /// Topic owners yet to report.
    owners: u32,
    /// Shard reports announced (or expected from the start) minus those received.
    leaves: i64,
}

impl Countdown {
    /// A request sent to `owners` topic owners and `leaves` shards that report directly.
    pub fn new(owners: u32, leaves: u32) -> Self {
        Countdown {
            owners,
            leaves: i64::from(leaves),
        }
    }

    /// Counts a report: `Some(n)` from a topic owner that forwarded to `n` shards, `None` from
    /// a shard that delivered.
    pub fn report(&mut self, forwarded: Option<u32>) {
        match forwarded {
            Some(n) => {
                self.owners = self.owners.saturating_sub(1);
                self.leaves += i64::from(n);
            }
            None => self.leaves -= 1,
        }
    }

    /// Every report is in.
    pub fn done(&self) -> bool {
        self.owners == 0 && self.leaves == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_first_then_forwarded_shards() {
        let mut c = Countdown::new(1, 0);
        c.report(Some(2));
        assert!(!c.done());
        c.report(None);
        assert!(!c.done());
        c.report(None);
        assert!(c.done());
    }

    /// With three or more shards, a shard the owner forwarded to can report before the owner's
    /// own report reaches the origin. Counting `remaining - 1 + more` ended the count at that
    /// first report and undercounted `delivered`.
    #[test]
    fn a_forwarded_shard_reporting_before_its_owner_does_not_end_the_count() {
        let mut c = Countdown::new(1, 0);
        c.report(None);
        assert!(!c.done(), "the owner has not reported yet");
        c.report(Some(2));
        assert!(!c.done(), "one forwarded shard is still out");
        c.report(None);
        assert!(c.done());
    }

    #[test]
    fn every_order_of_two_owners_and_their_shards_completes_exactly_at_the_last_report() {
        // Owner A forwards to 2 shards, owner B to 1, plus 1 direct (customer) report.
        let reports = [Some(2), Some(1), None, None, None, None];
        let mut order: Vec<usize> = (0..reports.len()).collect();
        let mut checked = 0;
        permute(&mut order, 0, &mut |o| {
            let mut c = Countdown::new(2, 1);
            for (i, &r) in o.iter().enumerate() {
                assert!(!c.done(), "done early in order {o:?}");
                c.report(reports[r]);
                assert_eq!(c.done(), i == o.len() - 1, "order {o:?}");
            }
            checked += 1;
        });
        assert_eq!(checked, 720);
    }

    #[test]
    fn an_owner_that_forwards_to_nobody_completes_at_once() {
        let mut c = Countdown::new(1, 0);
        c.report(Some(0));
        assert!(c.done());
    }

    fn permute(v: &mut Vec<usize>, k: usize, f: &mut impl FnMut(&[usize])) {
        if k == v.len() {
            return f(v);
        }
        for i in k..v.len() {
            v.swap(k, i);
            permute(v, k + 1, f);
            v.swap(k, i);
        }
    }
}
