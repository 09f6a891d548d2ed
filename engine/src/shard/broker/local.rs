//! The one-process broker: owners are shards of this process and every hop is a mesh message.
//!
//! - A topic's owner (`topic_shard`) holds its `TopicOwner` entry: offsets, history,
//!   publisher-chosen ids, and the set of shards with subscribers. A publish goes to the owner,
//!   which numbers it, encodes it once and forwards the frame to the interested shards.
//! - A customer's owner (`owner_shard`) holds all its connections: customer events, direct
//!   messages and disconnects go there.
//! - Roles and broadcast have no owner: the frame, encoded once, goes to every shard.
//!
//! Everything a topic's owner sends a shard (deliveries, subscription answers, ephemeral
//! events) travels one FIFO channel per shard pair, which is what keeps a topic in order.

use std::{cell::RefCell, sync::atomic::Ordering::Relaxed, time::Instant};

use ahash::AHashMap;
use proto::{
    api::{Publish, Wait},
    bus::{Counts, Position, ShardMsg, Target, TopicOffset},
    client::ReceiptStatus,
    event::{Event, Via},
    placement::{owner_shard, topic_shard},
};

use super::Query;
use crate::shard::{
    chat::minting_shard,
    countdown::Countdown,
    mesh::LocalMsg,
    route::{answer, Interest, Outcome, ReportTo},
    streams::unix_now,
    topic_owner::{History, Since, TopicOwner},
    Payload, Shard, Shared,
};

/// The one-process broker's state on one shard: the topics this shard owns.
pub struct Local {
    owner: RefCell<TopicOwner>,
}

impl Local {
    /// A shard's broker; history settings come from the configuration, per namespace.
    pub fn new(shared: &std::sync::Arc<Shared>) -> Local {
        let config = shared.clone();
        Local {
            owner: RefCell::new(TopicOwner::new(shared.epoch.clone(), move |topic| {
                let (keep, age) = config.config.history_for(topic);
                History { keep, age }
            })),
        }
    }

    pub(super) async fn publish(&self, shard: &Shard, p: &Publish, wait: Option<Wait>) -> Outcome {
        shard.metrics().publishes.fetch_add(1, Relaxed);
        let published = Some(Instant::now());
        let n = shard.shared.n_shards;
        let by_owner = by_owner(&p.customers, n);
        let owners = p.topics.len();
        // Customer owners always report (they store or deliver: that is the acceptance);
        // role and broadcast shards only when the publisher waits for deliveries.
        let deliveries = wait == Some(Wait::Delivered);
        let fanned = (p.roles.len() + usize::from(p.broadcast)) * n;
        let leaves = by_owner.len() + if deliveries { fanned } else { 0 };
        if owners + by_owner.len() + fanned == 0 {
            return Outcome::default();
        }
        let (req, rx) = if wait.is_some() && owners + leaves > 0 {
            let (req, rx) = shard.expect_reports(owners as u32, leaves as u32);
            (req, Some(rx))
        } else {
            (0, None)
        };
        let origin = shard.id as u32;
        for topic in &p.topics {
            let msg = ShardMsg::PublishTopic {
                topic: topic.clone(),
                event: p.event.clone(),
                origin,
                req,
                deliveries,
            };
            shard.send_msg(topic_shard(topic, n), &msg, None, published);
        }
        for (to, customers) in by_owner {
            let msg = ShardMsg::DeliverCustomers {
                customers,
                event: p.event.clone(),
                origin,
                req,
                seq: 0,
            };
            shard.send_msg(to, &msg, None, published);
        }
        if !p.roles.is_empty() || p.broadcast {
            // Encoded once for every role member and broadcast receiver.
            let payload = Payload::of(&p.event, Via::default());
            let mut targets: Vec<Target> =
                p.roles.iter().map(|r| Target::Role(r.clone())).collect();
            if p.broadcast {
                targets.push(Target::Broadcast);
            }
            for target in targets {
                for to in 0..n {
                    let msg = ShardMsg::Deliver {
                        target: target.clone(),
                        kind: p.event.kind.clone(),
                        id: p.event.id.clone(),
                        idempotent: p.event.idempotent,
                        origin,
                        req: if deliveries { req } else { 0 },
                    };
                    shard.send_msg(to, &msg, Some(payload.clone()), published);
                }
            }
        }
        match rx {
            Some(rx) => shard.await_reports(req, rx).await,
            None => Outcome::default(),
        }
    }

    pub(super) async fn disconnect(
        &self,
        shard: &Shard,
        customers: &[String],
        code: u16,
    ) -> Outcome {
        let by_owner = by_owner(customers, shard.shared.n_shards);
        if by_owner.is_empty() {
            return Outcome::default();
        }
        let (req, rx) = shard.expect_reports(0, by_owner.len() as u32);
        for (to, customers) in by_owner {
            let msg = ShardMsg::Disconnect {
                customers,
                code,
                origin: shard.id as u32,
                req,
            };
            shard.send_msg(to, &msg, None, None);
        }
        shard.await_reports(req, rx).await
    }

    pub(super) fn subscribe(
        &self,
        shard: &Shard,
        req: u64,
        topic: &str,
        since: Option<Position>,
        last: u32,
        member: &str,
    ) {
        let msg = ShardMsg::Interest {
            topic: topic.to_owned(),
            from: shard.id as u32,
            on: true,
            req,
            since,
            last,
            member: if shard.tracks_members(topic) {
                member.to_owned()
            } else {
                String::new()
            },
        };
        shard.send_msg(topic_shard(topic, shard.shared.n_shards), &msg, None, None);
    }

    pub(super) fn unsubscribe(&self, shard: &Shard, topic: &str) {
        let msg = ShardMsg::Interest {
            topic: topic.to_owned(),
            from: shard.id as u32,
            on: false,
            req: 0,
            since: None,
            last: 0,
            member: String::new(),
        };
        shard.send_msg(topic_shard(topic, shard.shared.n_shards), &msg, None, None);
    }

    pub(super) fn left(&self, shard: &Shard, topic: &str, customer: &str) {
        let msg = ShardMsg::Membership {
            topic: topic.to_owned(),
            customer: customer.to_owned(),
            joined: false,
        };
        shard.send_msg(topic_shard(topic, shard.shared.n_shards), &msg, None, None);
    }

    /// Through the topic's owner, which knows the shards with subscribers (so an event nobody
    /// follows, such as most `presence:<customer>` announcements, costs one message).
    pub(super) fn ephemeral(&self, shard: &Shard, topic: &str, except: &str, payload: Payload) {
        let msg = ShardMsg::Ephemeral {
            topic: topic.to_owned(),
            except: except.to_owned(),
            forward: true,
        };
        let owner = topic_shard(topic, shard.shared.n_shards);
        shard.send_msg(owner, &msg, Some(payload), None);
    }

    pub(super) async fn direct(
        &self,
        shard: &Shard,
        to: &str,
        topics: Vec<String>,
        event: Event,
    ) -> Outcome {
        let (req, rx) = shard.expect_reports(0, 1);
        let msg = ShardMsg::Direct {
            to: to.to_owned(),
            topics,
            event,
            origin: shard.id as u32,
            req,
        };
        let owner = owner_shard(to, shard.shared.n_shards);
        shard.send_msg(owner, &msg, None, Some(Instant::now()));
        shard.await_reports(req, rx).await
    }

    pub(super) fn receipts(
        &self,
        shard: &Shard,
        ids: &[String],
        by: &str,
        status: ReceiptStatus,
        topics: Vec<String>,
    ) {
        let n = shard.shared.n_shards;
        let mut per_shard: AHashMap<usize, Vec<String>> = AHashMap::new();
        for id in ids {
            if let Some(s) = minting_shard(id, n) {
                per_shard.entry(s).or_default().push(id.clone());
            }
        }
        for (to, ids) in per_shard {
            let msg = ShardMsg::Receipts {
                ids,
                by: by.to_owned(),
                status,
                topics: topics.clone(),
            };
            shard.send_msg(to, &msg, None, None);
        }
    }

    /// Process-local: in a cluster, presence is replicated to every node and each node's
    /// owner shard answers from its copy.
    pub(super) async fn query(&self, shard: &Shard, query: Query, key: &str) -> Option<Vec<u8>> {
        let n = shard.shared.n_shards;
        let owner = match query {
            Query::TopicMembers => topic_shard(key, n),
            Query::CustomerPresence | Query::Preferences => owner_shard(key, n),
        };
        let req = shard.next_req();
        let rx = shard
            .queries
            .borrow_mut()
            .open(req, Countdown::new(0, 1), Vec::new());
        let msg = LocalMsg::Query {
            query,
            key: key.to_owned(),
            origin: shard.id,
            req,
        };
        shard.send_local(owner, msg);
        let got = answer(rx).await;
        shard.queries.borrow_mut().give_up(req);
        got
    }

    /// Assigns the next offset, keeps the event in the history, encodes it once and forwards
    /// it to the interested shards (see `TopicOwner::publish`).
    pub(super) fn on_publish(
        &self,
        shard: &Shard,
        topic: &str,
        event: &Event,
        to: ReportTo,
        published: Option<Instant>,
    ) {
        let window = shard.shared.config.delivery.dedupe_window_secs;
        let origin = to.origin as u32;
        let plan = self
            .owner
            .borrow_mut()
            .plan_publish(topic, event, unix_now(), window, to);
        self.gauges(shard);
        if plan.duplicate {
            shard.metrics().duplicates.fetch_add(1, Relaxed);
        }
        if let Some(r) = plan.report {
            let counts = Counts {
                duplicates: u64::from(plan.duplicate),
                ..Counts::default()
            };
            let offset = r.offset.map(|offset| TopicOffset {
                topic: topic.to_owned(),
                offset,
            });
            shard.report_offset(r.origin, r.req, counts, Some(r.forwarded), offset);
        }
        let Some(d) = plan.deliver else {
            return;
        };
        for to in d.shards {
            let msg = ShardMsg::Deliver {
                target: Target::Topic(topic.to_owned()),
                kind: event.kind.clone(),
                id: event.id.clone(),
                // Deduplicated here, once for the topic.
                idempotent: false,
                origin,
                req: d.req,
            };
            shard.send_msg(to, &msg, Some(d.payload.clone()), published);
        }
    }

    /// A shard gained or lost its subscribers. A subscription is answered with the topic's
    /// position and, when the subscriber gave one, what it missed.
    pub(super) fn on_interest(&self, shard: &Shard, i: Interest<'_>) {
        let Interest {
            topic,
            from,
            on,
            req,
            since,
            last,
            member,
        } = i;
        let full = on && req != 0 && !member.is_empty() && !shard.admit_member(topic, member);
        let joined = if full {
            None
        } else {
            let since = since.map(|(offset, epoch)| Since { offset, epoch });
            let joined = self
                .owner
                .borrow_mut()
                .interest(topic, from, on, since, last, unix_now());
            self.gauges(shard);
            Some(joined)
        };
        if req == 0 {
            return;
        }
        let msg = match joined {
            None => ShardMsg::InterestAck {
                req,
                offset: 0,
                epoch: shard.shared.epoch.clone(),
                recovered: false,
                replay: Vec::new(),
                full: true,
            },
            Some(joined) => ShardMsg::InterestAck {
                req,
                offset: joined.offset,
                epoch: shard.shared.epoch.clone(),
                recovered: joined.recovered,
                replay: joined.replay,
                full: false,
            },
        };
        shard.send_msg(from, &msg, None, None);
    }

    /// Passes an ephemeral event on to the shards with subscribers, behind the topic's events.
    pub(super) fn on_ephemeral(&self, shard: &Shard, topic: &str, except: &str, payload: Payload) {
        let shards = self.owner.borrow().interested(topic);
        pass_ephemeral(shard, shards, topic, except, payload);
    }

    pub(super) fn sweep(&self, shard: &Shard, budget: usize, shrink: bool) {
        let mut owner = self.owner.borrow_mut();
        owner.expire_idle(unix_now(), budget);
        if shrink {
            owner.shrink();
        }
        drop(owner);
        self.gauges(shard);
    }

    /// Publishes the topic owner's gauges.
    fn gauges(&self, shard: &Shard) {
        let owner = self.owner.borrow();
        let m = shard.metrics();
        m.topics_owned.store(owner.len() as i64, Relaxed);
        m.topics_forgotten.store(owner.forgotten(), Relaxed);
    }
}

/// Customers grouped by their owner shard.
fn by_owner(customers: &[String], n: usize) -> AHashMap<usize, Vec<String>> {
    let mut out: AHashMap<usize, Vec<String>> = AHashMap::new();
    for c in customers {
        out.entry(owner_shard(c, n)).or_default().push(c.clone());
    }
    out
}

/// Passes an ephemeral event on to `shards` (those with subscribers of `topic`), behind the
/// topic's events on the same channels.
pub(super) fn pass_ephemeral(
    shard: &Shard,
    shards: Option<Vec<usize>>,
    topic: &str,
    except: &str,
    payload: Payload,
) {
    let Some(shards) = shards else {
        return;
    };
    for to in shards {
        let msg = ShardMsg::Ephemeral {
            topic: topic.to_owned(),
            except: except.to_owned(),
            forward: false,
        };
        shard.send_msg(to, &msg, Some(payload.clone()), None);
    }
}
