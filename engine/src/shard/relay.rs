//! The cluster topic role (`broker.kind = "nats"`). On every node, a topic's owner shard
//! (`placement::topic_shard`) holds the node's one NATS subscription to the topic while any
//! local shard has subscribers, and relays what arrives on it to those shards. Offsets are
//! JetStream stream sequences: the history stream numbers every topic event once for the whole
//! cluster, and republishes it with its sequence and the sequence of the topic's previous
//! event, so a relay knows at once when it missed one (a gap) and fetches it before going on.
//!
//! A plain struct, like `TopicOwner`: no executor, no channel, no clock inside. Each method
//! takes what happened (a subscription, an event from the bus, a fetch's answer) and `now`,
//! and returns the [`Action`]s the shard carries out in order: bus commands, deliveries to
//! shards, subscription answers. The order of those actions is what the invariants rest on:
//! - a shard gets a topic's events in offset order, each once;
//! - a subscription's answer (replay, then position) goes out after every event at or below
//!   its position and before every event above it;
//! - an answer says `recovered: true` only when the replay holds every event after `since`.

use std::{collections::VecDeque, rc::Rc};

use ahash::AHashMap;
use proto::{
    event::{Event, Via},
    ws::{server_frame, OpCode},
};

use super::{
    route::Payload,
    topic_owner::{ones, set_bit, History, Joined},
    Frame,
};

/// A topic event as the bus hands it over.
#[derive(Debug, Clone)]
pub struct Live {
    /// Its stream sequence: the topic offset.
    pub seq: u64,
    /// The sequence of the topic's previous event (0: none).
    pub prev: u64,
    /// Unix seconds when the stream stored it.
    pub stored: u64,
    /// The event.
    pub event: Event,
}

/// What a fetch from the history stream found.
#[derive(Debug, Default)]
pub struct Fetched {
    /// Nothing after the fetch's `after` was removed from the stream (so the events are all
    /// the topic's events in the range, up to `max`).
    pub complete: bool,
    /// The topic's events after `after`, in order, at most the fetch's `max`.
    pub events: Vec<Live>,
    /// The read finished and every message in its range was readable: what it did not bring
    /// back (below its bound) is not in the stream. False when it failed (then `events` is
    /// empty and says nothing).
    pub whole: bool,
}

/// What the shard must do, in order.
#[derive(Debug)]
pub enum Action {
    /// Subscribe this node to the topic's live subject, then report its position.
    Watch(Rc<str>),
    /// Drop this node's subscription to the topic.
    Unwatch(Rc<str>),
    /// Deliver an event to the shards with subscribers.
    Forward {
        /// The topic.
        topic: Rc<str>,
        /// Its type and id (the delivery message carries them).
        kind: String,
        /// Its id.
        id: String,
        /// Encoded once, with topic and offset.
        payload: Payload,
        /// The shards with subscribers.
        shards: Vec<usize>,
    },
    /// Answer subscription `req` of shard `to`.
    Answer {
        /// The subscriber's shard.
        to: usize,
        /// Its request id.
        req: u64,
        /// Position, replay, and whether the replay is complete.
        joined: Joined,
    },
    /// Read the topic's stored events after `after` (at most `max`) and hand them back with
    /// fetch `id`.
    Fetch {
        /// The topic.
        topic: Rc<str>,
        /// Fetch id, echoed in the answer.
        id: u64,
        /// The last sequence not wanted.
        after: u64,
        /// At most this many events.
        max: usize,
    },
}

/// A subscription waiting for its answer.
#[derive(Debug)]
struct Waiting {
    from: usize,
    req: u64,
    /// The last offset the subscriber saw, when it gave one of this epoch.
    since: Option<u64>,
    /// It gave a `since` of another epoch: nothing can be recovered.
    foreign: bool,
    last: u32,
    /// The fetch it waits for.
    fetch: Option<(u64, u64)>,
}

/// One watched topic.
struct Topic {
    /// Shards with subscribers, as a bitset.
    interest: Vec<u64>,
    /// The offset of the last event forwarded (None: the subscription's position is not
    /// known yet).
    last: Option<u64>,
    /// Events that arrived before the position was known or while a gap is filled.
    held: Vec<Live>,
    /// The fetch that fills a gap, in flight.
    gap: Option<u64>,
    /// Subscriptions waiting for the position, a gap or their own fetch.
    waiting: Vec<Waiting>,
    /// The latest events forwarded, for replay: a chain (each one's `prev` is the one
    /// before), so it shows by itself whether it covers a subscriber's `since`.
    cache: VecDeque<Cached>,
    settings: History,
    /// Unix seconds since nobody here follows it (dropped after the linger).
    idle_since: Option<u64>,
}

struct Cached {
    seq: u64,
    prev: u64,
    expires: u64,
    json: Frame,
}

/// The topics this shard relays for its node.
pub struct Relay {
    topics: AHashMap<Rc<str>, Topic>,
    history: Box<dyn Fn(&str) -> History>,
    /// Seconds a topic's subscription is kept after its last subscriber left, so a topic
    /// that people leave and rejoin does not churn NATS subscriptions.
    linger: u64,
    next_fetch: u64,
    /// Gaps found on live subjects (events that NATS did not bring and were fetched).
    gaps: u64,
}

impl Relay {
    /// No topics; `history` gives a topic's history settings, `linger` is in seconds.
    pub fn new(history: impl Fn(&str) -> History + 'static, linger: u64) -> Relay {
        Relay {
            topics: AHashMap::new(),
            history: Box::new(history),
            linger,
            next_fetch: 0,
            gaps: 0,
        }
    }

    /// Topics watched now.
    pub fn len(&self) -> usize {
        self.topics.len()
    }

    /// Gaps found so far.
    pub fn gaps(&self) -> u64 {
        self.gaps
    }

    /// The shards with subscribers of `topic` (None: not watched here).
    pub fn interested(&self, topic: &str) -> Option<Vec<usize>> {
        self.topics.get(topic).map(|t| ones(&t.interest).collect())
    }

    /// Shard `from` gained (`on`) or lost its last (`!on`) subscriber of `topic`; a
    /// subscription (`req` != 0) gets an answer: at once when the position is known and the
    /// replay is at hand, else after the position or a fetch comes back. `since` is the
    /// subscriber's last offset and whether it is of this cluster's epoch.
    #[allow(clippy::too_many_arguments)]
    pub fn interest(
        &mut self,
        topic: &str,
        from: usize,
        on: bool,
        req: u64,
        since: Option<(u64, bool)>,
        last: u32,
        now: u64,
    ) -> Vec<Action> {
        let mut out = Vec::new();
        if !on && !self.topics.contains_key(topic) {
            return out;
        }
        let name = self.ensure(topic, &mut out);
        let t = self.topics.get_mut(&name).expect("just ensured");
        set_bit(&mut t.interest, from, on);
        t.idle_since = if t.interest.iter().any(|w| *w != 0) {
            None
        } else {
            Some(now)
        };
        if req == 0 {
            return out;
        }
        let w = Waiting {
            from,
            req,
            since: since.filter(|s| s.1).map(|s| s.0),
            foreign: since.is_some_and(|s| !s.1),
            last,
            fetch: None,
        };
        if t.last.is_none() || t.gap.is_some() {
            t.waiting.push(w);
        } else {
            let next = &mut self.next_fetch;
            answer(&name, t, w, now, next, &mut out);
        }
        out
    }

    /// The bus subscribed to `topic` and read the stream's last sequence then: every event
    /// above it arrives live. Answers the subscriptions that waited for it.
    pub fn synced(&mut self, topic: &str, position: u64, now: u64) -> Vec<Action> {
        let mut out = Vec::new();
        let Some(name) = self.name(topic) else {
            return out;
        };
        let t = self.topics.get_mut(&name).expect("named");
        if t.last.is_some() {
            return out;
        }
        t.last = Some(position);
        self.resume(&name, now, &mut out);
        out
    }

    /// An event from the topic's live subject.
    pub fn live(&mut self, topic: &str, live: Live, now: u64) -> Vec<Action> {
        let mut out = Vec::new();
        self.take_live(topic, live, now, &mut out);
        out
    }

    /// A fetch came back.
    pub fn fetched(&mut self, topic: &str, id: u64, fetched: Fetched, now: u64) -> Vec<Action> {
        let mut out = Vec::new();
        let Some(name) = self.name(topic) else {
            return out;
        };
        let t = self.topics.get_mut(&name).expect("named");
        if t.gap == Some(id) {
            // A gap: forward what was missed, then what was held behind it.
            t.gap = None;
            let last = t.last.unwrap_or(0);
            for live in fetched.events.into_iter().filter(|l| l.seq > last) {
                forward(&name, t, live, now, &mut out);
            }
            // What the fetch could not bring is lost to this node's subscribers (counted as
            // a gap); the held events go on from there rather than fetch again and again.
            let last = t.last.unwrap_or(0);
            if let Some(first) = t.held.first().filter(|f| f.prev > last) {
                t.last = Some(first.prev);
                t.cache.clear();
            }
            self.resume(&name, now, &mut out);
            return out;
        }
        let Some(i) = t
            .waiting
            .iter()
            .position(|w| w.fetch.is_some_and(|f| f.0 == id))
        else {
            return out;
        };
        let w = t.waiting.remove(i);
        let upto = w.fetch.expect("matched").1;
        let position = t.last.unwrap_or(0);
        let keep = t.settings.keep;
        // The stored events in (since, upto], then the cached ones above `upto`: the cache
        // has everything forwarded since the fetch was asked for, unless it overflowed.
        let mut replay: Vec<Vec<u8>> = Vec::new();
        let mut complete = fetched.complete && fetched.events.len() <= keep;
        for l in fetched.events.iter().filter(|l| l.seq <= upto) {
            if expired(&t.settings, l, now) {
                complete = false;
            }
            replay.push(client_json(&name, &l.event, l.seq));
        }
        let tail: Vec<&Cached> = t.cache.iter().filter(|c| c.seq > upto).collect();
        if let Some(first) = tail.first() {
            complete &= first.prev <= upto;
        }
        replay.extend(tail.iter().map(|c| c.json.to_vec()));
        complete &= replay.len() <= keep;
        out.push(Action::Answer {
            to: w.from,
            req: w.req,
            joined: if complete {
                Joined {
                    offset: position,
                    recovered: true,
                    replay,
                }
            } else {
                Joined {
                    offset: position,
                    recovered: false,
                    replay: Vec::new(),
                }
            },
        });
        out
    }

    /// Drops the topics nobody here has followed for the linger, and their subscriptions.
    pub fn sweep(&mut self, now: u64, budget: usize) -> Vec<Action> {
        let linger = self.linger;
        let gone: Vec<Rc<str>> = self
            .topics
            .iter()
            .filter(|(_, t)| {
                t.waiting.is_empty()
                    && t.idle_since
                        .is_some_and(|s| s.saturating_add(linger) <= now)
            })
            .map(|(name, _)| name.clone())
            .take(budget)
            .collect();
        let mut out = Vec::with_capacity(gone.len());
        for name in gone {
            self.topics.remove(&name);
            out.push(Action::Unwatch(name));
        }
        if self.topics.capacity() > 64 && self.topics.capacity() > 4 * self.topics.len() {
            self.topics.shrink_to_fit();
        }
        out
    }

    /// The topic's name as kept, its entry created (with a `Watch`) when it is new.
    fn ensure(&mut self, topic: &str, out: &mut Vec<Action>) -> Rc<str> {
        if let Some((name, _)) = self.topics.get_key_value(topic) {
            return name.clone();
        }
        {
            let name: Rc<str> = Rc::from(topic);
            out.push(Action::Watch(name.clone()));
            let t = Topic {
                interest: Vec::new(),
                last: None,
                held: Vec::new(),
                gap: None,
                waiting: Vec::new(),
                cache: VecDeque::new(),
                settings: (self.history)(topic),
                idle_since: None,
            };
            self.topics.insert(name.clone(), t);
            name
        }
    }

    fn name(&self, topic: &str) -> Option<Rc<str>> {
        self.topics.get_key_value(topic).map(|(n, _)| n.clone())
    }

    fn take_live(&mut self, topic: &str, live: Live, now: u64, out: &mut Vec<Action>) {
        let Some(name) = self.name(topic) else {
            return;
        };
        let t = self.topics.get_mut(&name).expect("named");
        let Some(last) = t.last else {
            t.held.push(live);
            return;
        };
        if t.gap.is_some() {
            t.held.push(live);
            return;
        }
        if live.seq <= last {
            return; // at or below the position: seen already, or before it subscribed
        }
        if live.prev > last {
            // NATS did not bring an event (a reconnect, a slow consumer): fetch it first.
            let id = self.next_fetch + 1;
            self.next_fetch = id;
            self.gaps += 1;
            t.gap = Some(id);
            t.held.push(live);
            out.push(Action::Fetch {
                topic: name.clone(),
                id,
                after: last,
                max: 10_000,
            });
            return;
        }
        forward(&name, t, live, now, out);
    }

    /// After the position became known or a gap was filled: the held events in order (which
    /// may find another gap), then the waiting subscriptions.
    fn resume(&mut self, name: &Rc<str>, now: u64, out: &mut Vec<Action>) {
        let Some(t) = self.topics.get_mut(name) else {
            return;
        };
        // Answered before the held events go out: those are above the position they get.
        if t.gap.is_none() {
            let waiting: Vec<Waiting> = std::mem::take(&mut t.waiting);
            for w in waiting {
                if w.fetch.is_some() {
                    t.waiting.push(w);
                } else {
                    answer(name, t, w, now, &mut self.next_fetch, out);
                }
            }
        }
        let held = std::mem::take(&mut self.topics.get_mut(name).expect("present").held);
        for live in held {
            self.take_live(name, live, now, out);
        }
        // A gap found among the held events leaves later subscriptions waiting for it.
    }
}

/// Answers a subscription from the position and the cache, or asks for a fetch.
fn answer(
    name: &Rc<str>,
    t: &mut Topic,
    mut w: Waiting,
    now: u64,
    next_fetch: &mut u64,
    out: &mut Vec<Action>,
) {
    let position = t.last.expect("answered once the position is known");
    while t.cache.front().is_some_and(|c| c.expires <= now) {
        t.cache.pop_front();
    }
    let joined = match (w.since, w.foreign) {
        (_, true) => Joined {
            offset: position,
            recovered: false,
            replay: Vec::new(),
        },
        (None, false) => {
            let from = t.cache.len().saturating_sub(w.last as usize);
            Joined {
                offset: position,
                recovered: true,
                replay: t.cache.range(from..).map(|c| c.json.to_vec()).collect(),
            }
        }
        (Some(since), false) if since >= position => Joined {
            offset: position,
            // Nothing after it, when it is this position; an offset from the future is not
            // one this cluster gave.
            recovered: since == position,
            replay: Vec::new(),
        },
        (Some(since), false) => {
            let i = t.cache.partition_point(|c| c.seq <= since);
            if t.cache.get(i).is_some_and(|c| c.prev <= since) {
                let replay: Vec<Vec<u8>> = t.cache.range(i..).map(|c| c.json.to_vec()).collect();
                Joined {
                    offset: position,
                    recovered: replay.len() <= t.settings.keep,
                    replay: if replay.len() <= t.settings.keep {
                        replay
                    } else {
                        Vec::new()
                    },
                }
            } else if t.settings.keep == 0 {
                Joined {
                    offset: position,
                    recovered: false,
                    replay: Vec::new(),
                }
            } else {
                // Older than what this node has seen: from the stream, up to here; what
                // arrives meanwhile is cached.
                let id = *next_fetch + 1;
                *next_fetch = id;
                w.fetch = Some((id, position));
                out.push(Action::Fetch {
                    topic: name.clone(),
                    id,
                    after: since,
                    max: t.settings.keep + 1,
                });
                t.waiting.push(w);
                return;
            }
        }
    };
    out.push(Action::Answer {
        to: w.from,
        req: w.req,
        joined,
    });
}

/// Forwards an event to the shards with subscribers and keeps it in the cache.
fn forward(name: &Rc<str>, t: &mut Topic, live: Live, now: u64, out: &mut Vec<Action>) {
    t.last = Some(live.seq);
    let json = client_json(name, &live.event, live.seq);
    let payload = Payload {
        ws: server_frame(OpCode::Text, &json),
        sse: Frame::from(live.event.to_sse(None)),
    };
    if t.settings.keep > 0 && !expired(&t.settings, &live, now) {
        let age = live.event.ttl.unwrap_or(u64::MAX).min(t.settings.age);
        t.cache.push_back(Cached {
            seq: live.seq,
            prev: live.prev,
            expires: live.stored.saturating_add(age),
            json: Frame::from(json),
        });
        while t.cache.len() > t.settings.keep {
            t.cache.pop_front();
        }
    } else {
        // Nothing kept: the chain starts again at the next event.
        t.cache.clear();
    }
    let shards: Vec<usize> = ones(&t.interest).collect();
    if !shards.is_empty() {
        out.push(Action::Forward {
            topic: name.clone(),
            kind: live.event.kind,
            id: live.event.id,
            payload,
            shards,
        });
    }
}

fn expired(settings: &History, live: &Live, now: u64) -> bool {
    let age = live.event.ttl.unwrap_or(u64::MAX).min(settings.age);
    live.stored.saturating_add(age) <= now
}

fn client_json(topic: &str, event: &Event, seq: u64) -> Vec<u8> {
    event.to_client_json(Via {
        topic: Some(topic),
        offset: Some(seq),
        cursor: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEEP: History = History { keep: 3, age: 60 };

    fn relay() -> Relay {
        Relay::new(|_| KEEP, 30)
    }

    fn live(seq: u64, prev: u64) -> Live {
        Live {
            seq,
            prev,
            stored: 1000,
            event: Event {
                id: format!("e{seq}"),
                kind: "t".into(),
                data: "{}".into(),
                priority: proto::event::Priority::Normal,
                persistent: true,
                ttl: None,
                timestamp: "ts".into(),
                from: None,
                idempotent: false,
            },
        }
    }

    /// What the actions say, compactly: `W t`, `U t`, `F seq->shards`, `A shard/req offset
    /// recovered [replayed seqs]`, `G id after max`.
    fn show(actions: &[Action]) -> Vec<String> {
        actions
            .iter()
            .map(|a| match a {
                Action::Watch(t) => format!("W {t}"),
                Action::Unwatch(t) => format!("U {t}"),
                Action::Forward { id, shards, .. } => format!("F {}->{shards:?}", &id[1..]),
                Action::Answer { to, req, joined } => format!(
                    "A {to}/{req} {} {} {:?}",
                    joined.offset,
                    joined.recovered,
                    joined
                        .replay
                        .iter()
                        .map(|j| {
                            let s = String::from_utf8_lossy(j);
                            let at = s.find("\"offset\":").expect("offset") + 9;
                            s[at..].split([',', '}']).next().unwrap().to_owned()
                        })
                        .collect::<Vec<_>>()
                ),
                Action::Fetch { id, after, max, .. } => format!("G {id} {after} {max}"),
            })
            .collect()
    }

    #[test]
    fn the_first_subscriber_watches_and_is_answered_at_the_position_then_gets_what_follows() {
        let mut r = relay();
        assert_eq!(show(&r.interest("t", 1, true, 7, None, 0, 1000)), ["W t"]);
        // Arrives before the position: held; at or below it: dropped.
        assert!(r.live("t", live(40, 30), 1000).is_empty());
        assert!(r.live("t", live(52, 40), 1000).is_empty());
        assert_eq!(
            show(&r.synced("t", 50, 1000)),
            ["A 1/7 50 true []", "F 52->[1]"]
        );
        assert_eq!(show(&r.live("t", live(60, 52), 1000)), ["F 60->[1]"]);
        // Seen again (a resubscription's overlap): dropped.
        assert!(r.live("t", live(60, 52), 1000).is_empty());
        // A second shard joins with `last`: answered at once from the cache.
        assert_eq!(
            show(&r.interest("t", 0, true, 8, None, 5, 1000)),
            ["A 0/8 60 true [\"52\", \"60\"]"]
        );
        assert_eq!(show(&r.live("t", live(61, 60), 1000)), ["F 61->[0, 1]"]);
    }

    #[test]
    fn a_gap_is_fetched_and_filled_before_later_events() {
        let mut r = relay();
        r.interest("t", 0, true, 1, None, 0, 1000);
        r.synced("t", 10, 1000);
        assert_eq!(show(&r.live("t", live(12, 10), 1000)), ["F 12->[0]"]);
        // 15 says the topic's previous event is 14, which never came.
        assert_eq!(show(&r.live("t", live(15, 14), 1000)), ["G 1 12 10000"]);
        assert!(r.live("t", live(16, 15), 1000).is_empty());
        // A subscription meanwhile waits for the gap.
        assert!(r.interest("t", 1, true, 2, None, 0, 1000).is_empty());
        let fetched = Fetched {
            whole: true,
            complete: true,
            events: vec![live(13, 12), live(14, 13), live(15, 14), live(16, 15)],
        };
        assert_eq!(
            show(&r.fetched("t", 1, fetched, 1000)),
            [
                "F 13->[0, 1]",
                "F 14->[0, 1]",
                "F 15->[0, 1]",
                "F 16->[0, 1]",
                "A 1/2 16 true []"
            ]
        );
        // (Shard 1 gets them for its subscribers already live; the waiting one is answered
        // at 16, after them, so it starts above them.)
        // The held 15 and 16 were delivered by the fetch already: not twice.
        assert_eq!(show(&r.live("t", live(17, 16), 1000)), ["F 17->[0, 1]"]);
        assert_eq!(r.gaps(), 1);
        // A fetch that fails (NATS down): the held events go on, the gap stays a gap.
        assert_eq!(show(&r.live("t", live(30, 25), 1000)), ["G 2 17 10000"]);
        assert_eq!(
            show(&r.fetched("t", 2, Fetched::default(), 1000)),
            ["F 30->[0, 1]"]
        );
        assert_eq!(show(&r.live("t", live(31, 30), 1000)), ["F 31->[0, 1]"]);
    }

    #[test]
    fn since_is_replayed_from_the_cache_when_its_chain_covers_it_else_fetched() {
        let mut r = relay();
        r.interest("t", 0, true, 1, None, 0, 1000);
        r.synced("t", 10, 1000);
        for (s, p) in [(12, 5), (14, 12), (20, 14)] {
            r.live("t", live(s, p), 1000);
        }
        // 12's previous event is 5: anything from 5 on is in the cache.
        assert_eq!(
            show(&r.interest("t", 1, true, 2, Some((12, true)), 0, 1000)),
            ["A 1/2 20 true [\"14\", \"20\"]"]
        );
        assert_eq!(
            show(&r.interest("t", 1, true, 3, Some((7, true)), 0, 1000)),
            ["A 1/3 20 true [\"12\", \"14\", \"20\"]"]
        );
        assert_eq!(
            show(&r.interest("t", 1, true, 4, Some((20, true)), 0, 1000)),
            ["A 1/4 20 true []"]
        );
        // Another epoch, or an offset never given: not recovered.
        assert_eq!(
            show(&r.interest("t", 1, true, 5, Some((12, false)), 0, 1000)),
            ["A 1/5 20 false []"]
        );
        assert_eq!(
            show(&r.interest("t", 1, true, 6, Some((99, true)), 0, 1000)),
            ["A 1/6 20 false []"]
        );
        // Before the cache: fetched up to the position, then the events that came meanwhile.
        assert_eq!(
            show(&r.interest("t", 1, true, 7, Some((3, true)), 0, 1000)),
            ["G 1 3 4"]
        );
        assert_eq!(show(&r.live("t", live(21, 20), 1000)), ["F 21->[0, 1]"]);
        let fetched = Fetched {
            whole: true,
            complete: true,
            events: vec![live(5, 3), live(12, 5), live(14, 12), live(20, 14)],
        };
        // Four events after 3 (the fetch's `keep + 1`), and 21 since: more than the topic
        // keeps, so not recovered (as on one node, where they would be gone).
        assert_eq!(
            show(&r.fetched("t", 1, fetched, 1000)),
            ["A 1/7 21 false []"]
        );
    }

    #[test]
    fn a_fetch_joined_with_the_cache_recovers_exactly_what_was_missed() {
        let mut r = Relay::new(|_| History { keep: 10, age: 60 }, 30);
        r.interest("t", 0, true, 1, None, 0, 1000);
        r.synced("t", 10, 1000);
        r.live("t", live(12, 9), 1000);
        assert_eq!(
            show(&r.interest("t", 1, true, 2, Some((4, true)), 0, 1000)),
            ["G 1 4 11"]
        );
        r.live("t", live(13, 12), 1000);
        let fetched = Fetched {
            whole: true,
            complete: true,
            events: vec![live(9, 4), live(12, 9), live(13, 12)],
        };
        // The fetch ran to 12 (the position when asked); 13 comes from the cache, once.
        assert_eq!(
            show(&r.fetched("t", 1, fetched, 1000)),
            ["A 1/2 13 true [\"9\", \"12\", \"13\"]"]
        );
        // Something removed from the stream after `since`: not recovered.
        r.interest("t", 1, true, 3, Some((2, true)), 0, 1000);
        let fetched = Fetched {
            whole: true,
            complete: false,
            events: vec![live(9, 4)],
        };
        assert_eq!(
            show(&r.fetched("t", 2, fetched, 1000)),
            ["A 1/3 13 false []"]
        );
        // Expired by the topic's age: not recovered.
        r.interest("t", 1, true, 4, Some((2, true)), 0, 1000);
        let mut old = live(9, 2);
        old.stored = 900;
        let fetched = Fetched {
            whole: true,
            complete: true,
            events: vec![old, live(12, 9)],
        };
        assert_eq!(
            show(&r.fetched("t", 3, fetched, 1000)),
            ["A 1/4 13 false []"]
        );
    }

    #[test]
    fn a_topic_nobody_follows_is_unwatched_after_the_linger_unless_someone_comes_back() {
        let mut r = relay();
        r.interest("t", 0, true, 1, None, 0, 1000);
        r.synced("t", 1, 1000);
        assert!(r.interest("t", 0, false, 0, None, 0, 1000).is_empty());
        assert!(r.sweep(1029, 100).is_empty());
        // Back before the linger: kept, no second watch.
        assert!(show(&r.interest("t", 0, true, 2, None, 0, 1010))
            .iter()
            .all(|a| !a.starts_with('W')));
        assert!(r.sweep(1100, 100).is_empty());
        r.interest("t", 0, false, 0, None, 0, 1100);
        assert_eq!(show(&r.sweep(1130, 100)), ["U t"]);
        assert_eq!(r.len(), 0);
        // An event of a topic no longer watched (still in the channel): ignored.
        assert!(r.live("t", live(5, 1), 1130).is_empty());
        // Losing interest in a topic never watched changes nothing.
        assert!(r.interest("u", 0, false, 0, None, 0, 1130).is_empty());
        assert_eq!(r.len(), 0);
    }
}
