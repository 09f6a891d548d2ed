//! The topic-owner role. For every topic a shard owns (`placement::topic_shard`): its last
//! offset, its kept history, the shards with subscribers, and the publisher-chosen ids seen
//! recently. A plain struct with no executor, no channel and no clock inside: each method is a
//! function of its inputs and `now`, and the shard turns the answers into mesh messages.

use std::{cmp::Reverse, collections::BinaryHeap, collections::VecDeque, rc::Rc};

use ahash::AHashMap;
use proto::{
    event::{Event, Via},
    ws::{server_frame, OpCode},
};

use super::{
    route::{Payload, ReportTo},
    streams::{Dedupe, Scope},
    Frame,
};

/// A topic's history settings: events kept, and seconds each is kept (`[history]`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct History {
    /// Events kept (0: none).
    pub keep: usize,
    /// Seconds an event is kept at most.
    pub age: u64,
}

/// What a publish to an owned topic did.
pub enum Published {
    /// A publisher-chosen id already seen inside the dedupe window: nothing happened.
    Duplicate,
    /// The event got the next offset; deliver `payload` to the `interested` shards.
    Event {
        /// Encoded once, with topic and offset.
        payload: Payload,
        /// Shards with subscribers.
        interested: Vec<usize>,
        /// The offset the event got.
        offset: u64,
    },
}

/// What a topic's owner sends for one publish ([`TopicOwner::plan_publish`]). The broker
/// carries it out over the mesh; the simulation over its simulated one, so both run the same
/// decisions.
pub struct PublishPlan {
    /// A repeated publisher-chosen id: nothing else happened.
    pub duplicate: bool,
    /// The report to the origin, when it waits.
    pub report: Option<OwnerReport>,
    /// The event to send the interested shards (none for a duplicate).
    pub deliver: Option<OwnerDeliver>,
}

/// The owner's report of a publish to the shard that took it.
#[derive(Debug, PartialEq, Eq)]
pub struct OwnerReport {
    /// The shard that took the publish.
    pub origin: usize,
    /// Its request id.
    pub req: u64,
    /// How many shards' reports follow this one (the origin's countdown): the interested
    /// shards when the origin waits for deliveries, else none.
    pub forwarded: u32,
    /// The offset the event got (none for a duplicate).
    pub offset: Option<u64>,
}

/// The event as the interested shards get it.
pub struct OwnerDeliver {
    /// Encoded once, for every shard and transport.
    pub payload: Payload,
    /// Shards with subscribers.
    pub shards: Vec<usize>,
    /// The request id the deliveries report under (0: nobody waits for them).
    pub req: u64,
}

/// The owner's answer to a subscription.
#[derive(Debug, PartialEq, Eq)]
pub struct Joined {
    /// The topic's last offset: live events for the subscriber start after it.
    pub offset: u64,
    /// Every event after the subscriber's `since` is in `replay` (or no `since` was given).
    pub recovered: bool,
    /// Kept events to send before the live ones (client JSON), in order.
    pub replay: Vec<Vec<u8>>,
}

/// Where a subscriber says it stopped: the last offset it saw, in an epoch.
#[derive(Debug, Clone, Copy)]
pub struct Since<'a> {
    /// The last offset seen.
    pub offset: u64,
    /// The epoch that offset belongs to.
    pub epoch: &'a str,
}

/// One owned topic.
#[derive(Default)]
struct Topic {
    /// Offset of the last event.
    offset: u64,
    /// Shards with at least one subscriber, as a bitset.
    interest: Vec<u64>,
    /// The last events, for recovery.
    history: VecDeque<Kept>,
    /// Its history settings, fixed when the topic is first used.
    settings: History,
    /// Waiting in the idle heap (nobody follows it; its history has yet to expire).
    idle_queued: bool,
}

/// An event kept in a topic's history.
struct Kept {
    offset: u64,
    /// Unix seconds after which it is dropped (history age or the event's ttl).
    expires: u64,
    /// Client JSON (with topic and offset).
    json: Frame,
}

/// The topics one shard owns.
pub struct TopicOwner {
    topics: AHashMap<Rc<str>, Topic>,
    /// Highest offset of a forgotten topic; a topic (re)created starts above it, so an offset
    /// from an earlier life of a name can never be taken as recovered.
    floor: u64,
    /// Topics nobody follows, soonest history expiry first.
    idle: BinaryHeap<Reverse<(u64, Rc<str>)>>,
    /// Publisher-chosen ids seen recently, per topic.
    dedupe: Dedupe,
    /// The epoch offsets belong to (a restarted process starts a new one).
    epoch: String,
    /// Topics forgotten so far.
    forgotten: u64,
    /// A topic's history settings (from configuration), read when the topic is created.
    history: Box<dyn Fn(&str) -> History>,
}

impl TopicOwner {
    /// No topics yet; offsets of this life belong to `epoch`; `history` gives a topic's
    /// history settings.
    pub fn new(epoch: String, history: impl Fn(&str) -> History + 'static) -> Self {
        TopicOwner {
            history: Box::new(history),
            topics: AHashMap::new(),
            floor: 0,
            idle: BinaryHeap::new(),
            dedupe: Dedupe::default(),
            epoch,
            forgotten: 0,
        }
    }

    /// Topics owned now.
    pub fn len(&self) -> usize {
        self.topics.len()
    }

    /// Topics forgotten since the start.
    pub fn forgotten(&self) -> u64 {
        self.forgotten
    }

    fn topic(&mut self, name: &str) -> &mut Topic {
        if !self.topics.contains_key(name) {
            let topic = Topic {
                offset: self.floor,
                settings: (self.history)(name),
                ..Topic::default()
            };
            self.topics.insert(Rc::from(name), topic);
        }
        self.topics.get_mut(name).expect("just ensured")
    }

    /// Publishes `event` on `topic`: drops a repeated publisher-chosen id (inside
    /// `dedupe_window` seconds), else assigns the next offset, keeps the event in the history
    /// and encodes it once for every transport.
    pub fn publish(
        &mut self,
        topic: &str,
        event: &Event,
        now: u64,
        dedupe_window: u64,
    ) -> Published {
        if event.idempotent
            && !self
                .dedupe
                .first(Scope::Topic(topic), &event.id, now, dedupe_window)
        {
            return Published::Duplicate;
        }
        let t = self.topic(topic);
        t.offset += 1;
        let offset = t.offset;
        let json = event.to_client_json(Via {
            topic: Some(topic),
            offset: Some(offset),
            cursor: None,
        });
        let payload = Payload {
            ws: server_frame(OpCode::Text, &json),
            sse: Frame::from(event.to_sse(None)),
        };
        let settings = t.settings;
        if settings.keep > 0 {
            let expires = now.saturating_add(event.ttl.unwrap_or(u64::MAX).min(settings.age));
            t.history.push_back(Kept {
                offset,
                expires,
                json: Frame::from(json),
            });
            while t.history.len() > settings.keep {
                t.history.pop_front();
            }
        }
        let interested: Vec<usize> = ones(&t.interest).collect();
        if interested.is_empty() {
            self.settle(topic, now);
        }
        Published::Event {
            payload,
            interested,
            offset,
        }
    }

    /// [`TopicOwner::publish`], and what to send for it: a report to the origin when it
    /// waits (its countdown expects the interested shards' reports only when it waits for
    /// deliveries), and the event to each interested shard.
    pub fn plan_publish(
        &mut self,
        topic: &str,
        event: &Event,
        now: u64,
        dedupe_window: u64,
        to: ReportTo,
    ) -> PublishPlan {
        let waits = to.req != 0;
        match self.publish(topic, event, now, dedupe_window) {
            Published::Duplicate => PublishPlan {
                duplicate: true,
                report: waits.then_some(OwnerReport {
                    origin: to.origin,
                    req: to.req,
                    forwarded: 0,
                    offset: None,
                }),
                deliver: None,
            },
            Published::Event {
                payload,
                interested,
                offset,
            } => PublishPlan {
                duplicate: false,
                report: waits.then_some(OwnerReport {
                    origin: to.origin,
                    req: to.req,
                    forwarded: if to.deliveries {
                        interested.len() as u32
                    } else {
                        0
                    },
                    offset: Some(offset),
                }),
                deliver: Some(OwnerDeliver {
                    payload,
                    shards: interested,
                    req: if to.deliveries { to.req } else { 0 },
                }),
            },
        }
    }

    /// Shard `from` gained (`on`) or lost its last (`!on`) subscriber of `topic`. Answers with
    /// the topic's position and what to replay: after `since` if given (complete only when
    /// every later event is still kept and `since` is of this epoch), else the newest `last`
    /// kept events.
    pub fn interest(
        &mut self,
        topic: &str,
        from: usize,
        on: bool,
        since: Option<Since<'_>>,
        last: u32,
        now: u64,
    ) -> Joined {
        let epoch_matches = since.is_none_or(|s| s.epoch == self.epoch);
        let t = self.topic(topic);
        set_bit(&mut t.interest, from, on);
        while t.history.front().is_some_and(|k| k.expires <= now) {
            t.history.pop_front();
        }
        let offset = t.offset;
        // The kept events to replay: the newest `last` on a plain join; everything after
        // `since` when every later offset is still kept (else nothing, and not recovered).
        let from = match since {
            None => Some(t.history.len().saturating_sub(last as usize)),
            Some(s) => {
                let first_kept = t.history.front().map_or(offset + 1, |k| k.offset);
                (epoch_matches && s.offset <= offset && s.offset + 1 >= first_kept)
                    .then(|| t.history.partition_point(|k| k.offset <= s.offset))
            }
        };
        let joined = Joined {
            offset,
            recovered: from.is_some(),
            replay: from.map_or_else(Vec::new, |i| {
                t.history.range(i..).map(|k| k.json.to_vec()).collect()
            }),
        };
        if !on {
            self.settle(topic, now);
        }
        joined
    }

    /// The shards with subscribers of `topic` (None: not owned here).
    pub fn interested(&self, topic: &str) -> Option<Vec<usize>> {
        self.topics.get(topic).map(|t| ones(&t.interest).collect())
    }

    /// After a topic lost its last interested shard or got an event nobody follows: forgets
    /// it at once when it keeps nothing, or queues it to check again when its history
    /// expires. Names are made up by clients and backends and each costs memory until
    /// forgotten; doing it as topics go idle (never by scanning them all) cannot stall a
    /// shard.
    fn settle(&mut self, topic: &str, now: u64) {
        let Some((name, t)) = self.topics.get_key_value(topic) else {
            return;
        };
        if t.interest.iter().any(|w| *w != 0) || t.idle_queued {
            return;
        }
        let name = name.clone();
        let t = self.topics.get_mut(topic).expect("just found");
        while t.history.front().is_some_and(|k| k.expires <= now) {
            t.history.pop_front();
        }
        match t.history.iter().map(|k| k.expires).max() {
            None => {
                let t = self.topics.remove(topic).expect("just found");
                self.floor = self.floor.max(t.offset);
                self.forgotten += 1;
            }
            Some(due) => {
                t.idle_queued = true;
                self.idle.push(Reverse((due, name)));
            }
        }
    }

    /// Checks the idle topics whose history has expired by `now`, at most `budget` of them
    /// (a burst is spread over several ticks).
    pub fn expire_idle(&mut self, now: u64, budget: usize) {
        for _ in 0..budget {
            match self.idle.peek() {
                Some(Reverse((due, _))) if *due <= now => {}
                _ => break,
            }
            let Reverse((_, name)) = self.idle.pop().expect("just peeked");
            if let Some(t) = self.topics.get_mut(&name) {
                t.idle_queued = false;
            }
            self.settle(&name, now);
        }
        if self.idle.capacity() > 64 && self.idle.capacity() > 4 * self.idle.len() {
            self.idle.shrink_to_fit();
        }
    }

    /// Gives back the table's memory after a burst of made-up names.
    pub fn shrink(&mut self) {
        if self.topics.capacity() > 64 && self.topics.capacity() > 4 * self.topics.len() {
            self.topics.shrink_to_fit();
        }
    }
}

pub(super) fn set_bit(bits: &mut Vec<u64>, i: usize, on: bool) {
    if bits.len() <= i / 64 {
        bits.resize(i / 64 + 1, 0);
    }
    if on {
        bits[i / 64] |= 1 << (i % 64);
    } else {
        bits[i / 64] &= !(1 << (i % 64));
    }
}

pub(super) fn ones(bits: &[u64]) -> impl Iterator<Item = usize> + '_ {
    bits.iter().enumerate().flat_map(|(w, &word)| {
        (0..64)
            .filter(move |b| word & (1 << b) != 0)
            .map(move |b| w * 64 + b)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEEP: History = History { keep: 3, age: 60 };

    /// Topic `a` keeps nothing, every other topic keeps [`KEEP`].
    fn owner() -> TopicOwner {
        TopicOwner::new("e1".into(), |t| {
            if t == "a" {
                History::default()
            } else {
                KEEP
            }
        })
    }

    fn event(id: &str, idempotent: bool) -> Event {
        Event {
            id: id.into(),
            kind: "t".into(),
            data: "{}".into(),
            priority: proto::event::Priority::Normal,
            persistent: false,
            ttl: None,
            timestamp: "ts".into(),
            from: None,
            idempotent,
        }
    }

    /// The offset in a published event's WebSocket frame (a short unmasked text frame).
    fn offset_of(p: &Published) -> u64 {
        let Published::Event { payload, .. } = p else {
            panic!("a duplicate has no offset")
        };
        let head = if payload.ws[1] < 126 { 2 } else { 4 };
        let v: serde_json::Value = serde_json::from_slice(&payload.ws[head..]).unwrap();
        v["offset"].as_u64().unwrap()
    }

    fn publish(o: &mut TopicOwner, topic: &str, now: u64) -> (u64, Vec<usize>) {
        let p = o.publish(topic, &event("e", false), now, 60);
        let offset = offset_of(&p);
        let Published::Event { interested, .. } = p else {
            unreachable!()
        };
        (offset, interested)
    }

    fn offsets(replay: &[Vec<u8>]) -> Vec<u64> {
        replay
            .iter()
            .map(|j| {
                serde_json::from_slice::<serde_json::Value>(j).unwrap()["offset"]
                    .as_u64()
                    .unwrap()
            })
            .collect()
    }

    #[test]
    fn offsets_count_up_and_reach_the_interested_shards() {
        let mut o = owner();
        o.interest("t", 1, true, None, 0, 100);
        o.interest("t", 3, true, None, 0, 100);
        assert_eq!(publish(&mut o, "t", 100), (1, vec![1, 3]));
        assert_eq!(publish(&mut o, "t", 100), (2, vec![1, 3]));
        o.interest("t", 1, false, None, 0, 100);
        assert_eq!(publish(&mut o, "t", 100), (3, vec![3]));
    }

    #[test]
    fn the_publish_plan_reports_and_forwards_as_the_origin_waits() {
        let mut o = owner();
        o.interest("t", 1, true, None, 0, 100);
        o.interest("t", 2, true, None, 0, 100);
        let to = |req, deliveries| ReportTo {
            origin: 0,
            req,
            deliveries,
        };
        // Waiting for deliveries: the countdown expects both shards, which report under req.
        let p = o.plan_publish("t", &event("a", true), 100, 60, to(7, true));
        let report = |forwarded, offset| OwnerReport {
            origin: 0,
            req: 7,
            forwarded,
            offset,
        };
        assert!(!p.duplicate);
        assert_eq!(p.report, Some(report(2, Some(1))));
        let d = p.deliver.unwrap();
        assert_eq!((d.shards, d.req), (vec![1, 2], 7));
        // Answered on acceptance: the owner's report is the last; deliveries report to nobody.
        let p = o.plan_publish("t", &event("b", false), 100, 60, to(7, false));
        assert_eq!(p.report, Some(report(0, Some(2))));
        assert_eq!(p.deliver.unwrap().req, 0);
        // Nobody waits: no report at all.
        let p = o.plan_publish("t", &event("c", false), 100, 60, to(0, false));
        assert!(p.report.is_none() && p.deliver.is_some());
        // A repeated id: a report (when one waits) that ends the count, nothing delivered.
        let p = o.plan_publish("t", &event("a", true), 100, 60, to(7, true));
        assert!(p.duplicate && p.deliver.is_none());
        assert_eq!(p.report, Some(report(0, None)));
    }

    #[test]
    fn since_replays_what_was_missed_or_says_it_cannot() {
        let mut o = owner();
        o.interest("t", 0, true, None, 0, 100);
        for _ in 0..5 {
            publish(&mut o, "t", 100);
        }
        // Kept: 3, 4, 5.
        let s = |offset| {
            Some(Since {
                offset,
                epoch: "e1",
            })
        };
        let j = o.interest("t", 1, true, s(3), 0, 100);
        assert_eq!(
            (j.offset, j.recovered, offsets(&j.replay)),
            (5, true, vec![4, 5])
        );
        let j = o.interest("t", 1, true, s(2), 0, 100);
        assert_eq!((j.recovered, offsets(&j.replay)), (true, vec![3, 4, 5]));
        let j = o.interest("t", 1, true, s(1), 0, 100);
        assert_eq!(
            (j.recovered, j.replay.len()),
            (false, 0),
            "offset 2 is gone"
        );
        let j = o.interest("t", 1, true, s(9), 0, 100);
        assert!(!j.recovered, "an offset the topic never reached");
        let other = Some(Since {
            offset: 4,
            epoch: "e0",
        });
        assert!(
            !o.interest("t", 1, true, other, 0, 100).recovered,
            "another epoch"
        );
        let j = o.interest("t", 2, true, None, 2, 100);
        assert_eq!(offsets(&j.replay), vec![4, 5], "the last 2 on join");
    }

    #[test]
    fn history_expires_by_age() {
        let mut o = owner();
        o.interest("t", 0, true, None, 0, 100);
        publish(&mut o, "t", 100);
        publish(&mut o, "t", 130);
        let j = o.interest("t", 1, true, None, 10, 161);
        assert_eq!(offsets(&j.replay), vec![2], "offset 1 expired at 160");
    }

    #[test]
    fn a_repeated_id_is_dropped_inside_the_window() {
        let mut o = owner();
        let e = event("evt-1", true);
        assert_eq!(offset_of(&o.publish("t", &e, 100, 60)), 1);
        assert!(matches!(o.publish("t", &e, 110, 60), Published::Duplicate));
        assert!(
            matches!(o.publish("u", &e, 110, 60), Published::Event { .. }),
            "per topic"
        );
        assert_eq!(
            offset_of(&o.publish("t", &e, 161, 60)),
            2,
            "after the window"
        );
    }

    #[test]
    fn an_idle_topic_is_forgotten_and_its_name_restarts_above_the_old_offsets() {
        let mut o = owner();
        // Nobody follows it and it keeps nothing: forgotten at once.
        publish(&mut o, "a", 100);
        assert_eq!((o.len(), o.forgotten()), (0, 1));
        // Followed, then left, with history: kept until the history expires.
        o.interest("b", 0, true, None, 0, 100);
        for _ in 0..4 {
            publish(&mut o, "b", 100);
        }
        o.interest("b", 0, false, None, 0, 100);
        assert_eq!(o.len(), 1);
        o.expire_idle(159, 10);
        assert_eq!(o.len(), 1, "history not yet expired");
        o.expire_idle(160, 10);
        assert_eq!((o.len(), o.forgotten()), (0, 2));
        // The name comes back: offsets continue above everything forgotten on this shard
        // ("a" reached 1, so "b" ran 2..=5), and a client holding an offset of the old life
        // is told it recovered only when nothing after it existed.
        let j = o.interest(
            "b",
            0,
            true,
            Some(Since {
                offset: 5,
                epoch: "e1",
            }),
            0,
            200,
        );
        assert_eq!(
            (j.offset, j.recovered),
            (5, true),
            "nothing newer than 5 was published"
        );
        assert_eq!(publish(&mut o, "b", 200).0, 6);
        let j = o.interest(
            "b",
            1,
            true,
            Some(Since {
                offset: 3,
                epoch: "e1",
            }),
            0,
            200,
        );
        assert!(!j.recovered, "offsets 4 and 5 of the old life are gone");
    }

    #[test]
    fn expiry_respects_its_budget() {
        let mut o = owner();
        for i in 0..5 {
            let t = format!("t{i}");
            o.interest(&t, 0, true, None, 0, 100);
            publish(&mut o, &t, 100);
            o.interest(&t, 0, false, None, 0, 100);
        }
        o.expire_idle(200, 2);
        assert_eq!(o.len(), 3);
        o.expire_idle(200, 10);
        assert_eq!(o.len(), 0);
    }
}
