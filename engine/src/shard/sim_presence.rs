//! A deterministic simulation of topic presence: coalesced `presence_diff`s.
//!
//! Customers on three shards subscribe to and leave one presence topic, several connections
//! each; their joins and leaves travel to the topic's owner over one FIFO channel per shard,
//! where [`Members`] counts them and coalesces the changes of a window into one diff, which
//! travels back to an observer on every shard. Which channel delivers next, what clients do
//! and how the clock moves are chosen by a seeded generator. The glue (schedule a flush when
//! `change` asks for one, send what `take_diff` returns) mirrors `Shard::handle_membership`
//! and `Shard::flush_presence`.
//!
//! Invariants checked for every seed:
//! - a diff is a true transition of what the observer knew: it names each customer once, a
//!   joiner who was not a member and a leaver who was, and leaves the observer with as many
//!   members as the owner counts;
//! - a diff goes out no sooner than one window after the first change it carries (changes are
//!   coalesced, never sent early);
//! - once everything has arrived, every observer and the owner agree with the truth: the
//!   customers with at least one open subscription.

use std::collections::{BTreeSet, VecDeque};

use super::{
    presence::{Diff, Members},
    sim::{for_seeds, Rng},
};

const SHARDS: usize = 3;
const CUSTOMERS: usize = 5;
const TOPIC: &str = "room:1";
/// `presence.coalesce_ms`, in simulated ticks.
const WINDOW: u64 = 10;
/// `presence.max_diff_names`, above the number of customers: no diff is truncated here.
const CAP: usize = 100;

fn name(c: usize) -> String {
    format!("cust-{c}")
}

struct Sim {
    rng: Rng,
    now: u64,
    /// The owner's state (on shard 0).
    members: Members,
    /// Flushes the owner scheduled, by due time.
    due: VecDeque<u64>,
    /// When the first change the next diff carries reached the owner.
    window_start: Option<u64>,
    /// Open subscriptions per customer as the owner has counted them.
    counted: Vec<u32>,
    /// Subscriber shard -> owner: (customer, joined).
    up: Vec<VecDeque<(usize, bool)>>,
    /// Owner -> each shard's observer.
    down: Vec<VecDeque<Diff>>,
    /// Open subscriptions per customer, on its own shard.
    open: Vec<u32>,
    /// Members as each shard's observer knows them from the diffs.
    observers: Vec<BTreeSet<String>>,
    diffs: u64,
}

impl Sim {
    fn new(seed: u64) -> Self {
        Sim {
            rng: Rng(seed),
            now: 0,
            members: Members::default(),
            due: VecDeque::new(),
            window_start: None,
            counted: vec![0; CUSTOMERS],
            up: (0..SHARDS).map(|_| VecDeque::new()).collect(),
            down: (0..SHARDS).map(|_| VecDeque::new()).collect(),
            open: vec![0; CUSTOMERS],
            observers: (0..SHARDS).map(|_| BTreeSet::new()).collect(),
            diffs: 0,
        }
    }

    fn step(&mut self) {
        match self.rng.below(8) {
            0..=1 => {
                let c = self.rng.below(CUSTOMERS);
                let joined = self.open[c] == 0 || self.rng.below(2) == 0;
                if joined {
                    self.open[c] += 1;
                } else {
                    self.open[c] -= 1;
                }
                self.up[c % SHARDS].push_back((c, joined));
            }
            2..=3 => {
                if let Some(s) = self.pick(|sim, s| !sim.up[s].is_empty()) {
                    let (c, joined) = self.up[s].pop_front().expect("picked");
                    self.arrive(c, joined);
                }
            }
            4..=5 => {
                if let Some(s) = self.pick(|sim, s| !sim.down[s].is_empty()) {
                    let diff = self.down[s].pop_front().expect("picked");
                    self.observe(s, &diff);
                }
            }
            _ => {
                self.now += self.rng.below(6) as u64;
                self.flush();
            }
        }
    }

    fn pick(&mut self, ready: impl Fn(&Sim, usize) -> bool) -> Option<usize> {
        let ready: Vec<usize> = (0..SHARDS).filter(|&s| ready(self, s)).collect();
        (!ready.is_empty()).then(|| ready[self.rng.below(ready.len())])
    }

    /// On the owner: one subscription more or less.
    fn arrive(&mut self, c: usize, joined: bool) {
        let before = self.counted[c];
        self.counted[c] = if joined { before + 1 } else { before - 1 };
        if (before == 0) != (self.counted[c] == 0) && self.window_start.is_none() {
            self.window_start = Some(self.now);
        }
        if self.members.change(TOPIC, &name(c), joined, true) {
            self.due.push_back(self.now + WINDOW);
        }
    }

    /// On the owner: the diffs whose window is over.
    fn flush(&mut self) {
        while self.due.front().is_some_and(|&at| at <= self.now) {
            self.due.pop_front();
            let Some(diff) = self.members.take_diff(TOPIC, CAP) else {
                self.window_start = None;
                continue;
            };
            let start = self.window_start.take().expect("a diff carries a change");
            assert!(
                self.now >= start + WINDOW,
                "a diff at {} carries a change of {start}, inside its window of {WINDOW}",
                self.now
            );
            assert!(!diff.truncated);
            self.diffs += 1;
            for s in 0..SHARDS {
                self.down[s].push_back(Diff {
                    joined: diff.joined.clone(),
                    left: diff.left.clone(),
                    members: diff.members,
                    truncated: diff.truncated,
                });
            }
        }
    }

    /// On a shard: an observer applies a diff.
    fn observe(&mut self, s: usize, diff: &Diff) {
        let seen = &mut self.observers[s];
        let mut named = BTreeSet::new();
        for c in diff.joined.iter().chain(&diff.left) {
            assert!(named.insert(c.clone()), "{c} named twice in one diff");
        }
        for c in &diff.joined {
            assert!(seen.insert(c.clone()), "{c} joined, but was a member");
        }
        for c in &diff.left {
            assert!(seen.remove(c), "{c} left, but was not a member");
        }
        assert_eq!(seen.len(), diff.members, "members after the diff");
    }

    /// Everything in flight arrives and every window closes.
    fn settle(&mut self) {
        for s in 0..SHARDS {
            while let Some((c, joined)) = self.up[s].pop_front() {
                self.arrive(c, joined);
            }
        }
        self.now += WINDOW;
        self.flush();
        for s in 0..SHARDS {
            while let Some(diff) = self.down[s].pop_front() {
                self.observe(s, &diff);
            }
        }
        let truth: BTreeSet<String> = (0..CUSTOMERS)
            .filter(|&c| self.open[c] > 0)
            .map(name)
            .collect();
        let listed: BTreeSet<String> = self
            .members
            .list(TOPIC)
            .into_iter()
            .map(|(c, _)| c.to_string())
            .collect();
        assert_eq!(listed, truth, "the owner's members");
        for (s, seen) in self.observers.iter().enumerate() {
            assert_eq!(seen, &truth, "shard {s}'s view");
        }
    }
}

/// One schedule; returns how many diffs it sent.
fn run_seed(seed: u64) -> u64 {
    let mut sim = Sim::new(seed);
    for _ in 0..300 {
        sim.step();
    }
    sim.settle();
    sim.diffs
}

#[test]
fn presence_diffs_are_coalesced_true_transitions_that_converge() {
    let mut diffs = 0;
    let seeds = for_seeds(|seed| diffs += run_seed(seed));
    if std::env::var_os("RINGCAST_SIM_SEED").is_none() {
        assert!(diffs > seeds * 3, "{diffs} diffs over {seeds} seeds");
    }
}
