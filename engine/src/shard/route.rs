//! Routing: publishes go to topic owners (offset, encode once) and on to the interested
//! shards, or straight to the owner shards of customers, or to every shard for roles and
//! broadcast. Each shard then fans the shared frame out to its local connections, in arrival
//! order, from one task.

use std::{rc::Rc, sync::atomic::Ordering::Relaxed, time::Instant};

use ahash::AHashMap;
use futures_channel::oneshot;
use proto::{
    api::Publish,
    bus::{ShardMsg, Target},
    event::{Event, Via},
    placement::{owner_shard, topic_shard},
    ws::{server_frame, OpCode},
};

use super::{slab::ConnKey, Frame, Shard};

/// A delivery waiting for the shard's fan-out task.
pub struct DeliverJob {
    /// Receivers.
    pub target: Target,
    /// Event type (customer-stream filters).
    pub kind: String,
    /// The shared frame.
    pub frame: Frame,
    /// Shard awaiting the report.
    pub origin: usize,
    /// Report request id (0: no report).
    pub req: u64,
    /// When the publish was accepted.
    pub published: Option<Instant>,
}

/// A publish waiting for its delivery reports.
pub(super) struct PendingReport {
    remaining: u32,
    websocket: u64,
    dropped: u64,
    tx: Option<oneshot::Sender<(u64, u64)>>,
}

/// A `/v1/stats/histograms` gather waiting for every shard's reply.
pub(super) struct HistGather {
    remaining: usize,
    merged: super::Hists,
    tx: Option<oneshot::Sender<super::Hists>>,
}

/// Connections visited between checks for preemption during a fan-out.
const CHUNK: usize = 256;

fn set_bit(bits: &mut Vec<u64>, i: usize, on: bool) {
    if bits.len() <= i / 64 {
        bits.resize(i / 64 + 1, 0);
    }
    if on {
        bits[i / 64] |= 1 << (i % 64);
    } else {
        bits[i / 64] &= !(1 << (i % 64));
    }
}

fn ones(bits: &[u64]) -> impl Iterator<Item = usize> + '_ {
    bits.iter().enumerate().flat_map(|(w, &word)| {
        (0..64)
            .filter(move |b| word & (1 << b) != 0)
            .map(move |b| w * 64 + b)
    })
}

impl Shard {
    /// Routes a publish. With `wait`, resolves to `(delivered, dropped)` once every shard has
    /// reported (or after 5 s, with what was reported by then); without, returns at once.
    pub async fn publish(self: &Rc<Self>, p: &Publish, wait: bool) -> (u64, u64) {
        self.metrics().publishes.fetch_add(1, Relaxed);
        let published = Some(Instant::now());
        let n = self.shared.n_shards;
        let mut by_owner: AHashMap<usize, Vec<String>> = AHashMap::new();
        for c in &p.customers {
            by_owner
                .entry(owner_shard(c, n))
                .or_default()
                .push(c.clone());
        }
        let expected =
            p.topics.len() + by_owner.len() + (p.roles.len() + usize::from(p.broadcast)) * n;
        if expected == 0 {
            return (0, 0);
        }
        let (req, rx) = if wait {
            let req = self.next_req();
            let (tx, rx) = oneshot::channel();
            self.reports.borrow_mut().insert(
                req,
                PendingReport {
                    remaining: expected as u32,
                    websocket: 0,
                    dropped: 0,
                    tx: Some(tx),
                },
            );
            (req, Some(rx))
        } else {
            (0, None)
        };
        for topic in &p.topics {
            let msg = ShardMsg::PublishTopic {
                topic: topic.clone(),
                event: p.event.clone(),
                origin: self.id as u32,
                req,
            };
            self.send_msg(topic_shard(topic, n), &msg, None, published);
        }
        if !by_owner.is_empty() || !p.roles.is_empty() || p.broadcast {
            // Encoded once for every customer, role member and broadcast receiver.
            let frame = server_frame(OpCode::Text, &p.event.to_client_json(Via::default()));
            let kind = &p.event.kind;
            let origin = self.id as u32;
            for (shard, ids) in by_owner {
                let msg = ShardMsg::Deliver {
                    target: Target::Customers(ids),
                    kind: kind.clone(),
                    origin,
                    req,
                };
                self.send_msg(shard, &msg, Some(frame.clone()), published);
            }
            let mut targets: Vec<Target> =
                p.roles.iter().map(|r| Target::Role(r.clone())).collect();
            if p.broadcast {
                targets.push(Target::Broadcast);
            }
            for target in targets {
                for shard in 0..n {
                    let msg = ShardMsg::Deliver {
                        target: target.clone(),
                        kind: kind.clone(),
                        origin,
                        req,
                    };
                    self.send_msg(shard, &msg, Some(frame.clone()), published);
                }
            }
        }
        let Some(rx) = rx else { return (0, 0) };
        let timeout = async {
            glommio::timer::sleep(std::time::Duration::from_secs(5)).await;
            Err(oneshot::Canceled)
        };
        match futures_lite::future::or(rx, timeout).await {
            Ok(counts) => counts,
            Err(_) => {
                let pending = self.reports.borrow_mut().remove(&req);
                tracing::warn!(shard = self.id, "publish report timed out");
                pending.map_or((0, 0), |p| (p.websocket, p.dropped))
            }
        }
    }

    /// On a topic's owner: assign the next offset, encode once, fan out to interested shards.
    pub(super) fn publish_owned_topic(
        &self,
        topic: &str,
        event: &Event,
        origin: usize,
        req: u64,
        published: Option<Instant>,
    ) {
        let (offset, shards) = {
            let mut owned = self.owned.borrow_mut();
            let t = match owned.get_mut(topic) {
                Some(t) => t,
                None => owned.entry(Rc::from(topic)).or_default(),
            };
            t.offset += 1;
            (t.offset, ones(&t.interest).collect::<Vec<_>>())
        };
        if req != 0 {
            self.report(origin, req, 0, 0, shards.len() as u32);
        }
        if shards.is_empty() {
            return;
        }
        let frame = server_frame(
            OpCode::Text,
            &event.to_client_json(Via {
                topic: Some(topic),
                offset: Some(offset),
            }),
        );
        for shard in shards {
            let msg = ShardMsg::Deliver {
                target: Target::Topic(topic.to_owned()),
                kind: event.kind.clone(),
                origin: origin as u32,
                req,
            };
            self.send_msg(shard, &msg, Some(frame.clone()), published);
        }
    }

    /// On a topic's owner: a shard gained or lost its subscribers.
    pub(super) fn handle_interest(&self, topic: &str, from: usize, on: bool, req: u64) {
        let offset = {
            let mut owned = self.owned.borrow_mut();
            let t = match owned.get_mut(topic) {
                Some(t) => t,
                None => owned.entry(Rc::from(topic)).or_default(),
            };
            set_bit(&mut t.interest, from, on);
            t.offset
        };
        if req != 0 {
            self.send_msg(
                from,
                &ShardMsg::InterestAck {
                    req,
                    offset,
                    epoch: self.shared.epoch.clone(),
                },
                None,
                None,
            );
        }
    }

    /// Adds a local subscriber and registers interest with the topic's owner; resolves to the
    /// topic's `(offset, epoch)` once the owner has it (events after that offset will come).
    ///
    /// Also returns the shard's interned name of the topic, which the connection keeps instead
    /// of a copy of its own.
    pub async fn subscribe_topic(
        &self,
        key: ConnKey,
        topic: &str,
    ) -> (Rc<str>, Option<(u64, String)>) {
        let name = {
            let mut topics = self.topics.borrow_mut();
            match topics.get_key_value(topic).map(|(name, _)| name.clone()) {
                Some(name) => {
                    Rc::make_mut(topics.get_mut(topic).expect("just found")).push(key);
                    name
                }
                None => {
                    let name: Rc<str> = Rc::from(topic);
                    topics.insert(name.clone(), Rc::new(vec![key]));
                    name
                }
            }
        };
        let req = self.next_req();
        let (tx, rx) = oneshot::channel();
        self.interest_waiters.borrow_mut().insert(req, tx);
        let owner = topic_shard(topic, self.shared.n_shards);
        self.send_msg(
            owner,
            &ShardMsg::Interest {
                topic: topic.to_owned(),
                from: self.id as u32,
                on: true,
                req,
            },
            None,
            None,
        );
        let timeout = async {
            glommio::timer::sleep(std::time::Duration::from_secs(5)).await;
            Err(oneshot::Canceled)
        };
        let got = futures_lite::future::or(rx, timeout).await.ok();
        if got.is_none() {
            self.interest_waiters.borrow_mut().remove(&req);
        }
        (name, got)
    }

    /// Removes a local subscriber; the last one withdraws the shard's interest.
    pub fn remove_subscriber(&self, topic: &str, key: ConnKey) {
        let mut topics = self.topics.borrow_mut();
        let Some(list) = topics.get_mut(topic) else {
            return;
        };
        Rc::make_mut(list).retain(|k| *k != key);
        if list.is_empty() {
            topics.remove(topic);
            drop(topics);
            let owner = topic_shard(topic, self.shared.n_shards);
            self.send_msg(
                owner,
                &ShardMsg::Interest {
                    topic: topic.to_owned(),
                    from: self.id as u32,
                    on: false,
                    req: 0,
                },
                None,
                None,
            );
        }
    }

    fn report(&self, origin: usize, req: u64, websocket: u64, dropped: u64, more: u32) {
        if origin == self.id {
            self.handle_report(req, websocket, dropped, more);
        } else {
            self.send_msg(
                origin,
                &ShardMsg::Report {
                    req,
                    websocket,
                    dropped,
                    more,
                },
                None,
                None,
            );
        }
    }

    pub(super) fn handle_report(&self, req: u64, websocket: u64, dropped: u64, more: u32) {
        let mut reports = self.reports.borrow_mut();
        let Some(p) = reports.get_mut(&req) else {
            return;
        };
        p.websocket += websocket;
        p.dropped += dropped;
        p.remaining = p.remaining - 1 + more;
        if p.remaining == 0 {
            let p = reports.remove(&req).expect("present");
            if let Some(tx) = p.tx {
                let _ = tx.send((p.websocket, p.dropped));
            }
        }
    }

    /// Gathers and merges every shard's histograms (None if a shard does not answer in 5 s).
    pub async fn gather_histograms(&self) -> Option<super::Hists> {
        let req = self.next_req();
        let (tx, rx) = oneshot::channel();
        let n = self.shared.n_shards;
        self.hist_waiters.borrow_mut().insert(
            req,
            HistGather {
                remaining: n,
                merged: super::Hists::default(),
                tx: Some(tx),
            },
        );
        for shard in 0..n {
            self.send_msg(
                shard,
                &ShardMsg::HistogramsRequest {
                    origin: self.id as u32,
                    req,
                },
                None,
                None,
            );
        }
        let timeout = async {
            glommio::timer::sleep(std::time::Duration::from_secs(5)).await;
            Err(oneshot::Canceled)
        };
        let got = futures_lite::future::or(rx, timeout).await.ok();
        self.hist_waiters.borrow_mut().remove(&req);
        got
    }

    /// Answers a histogram request with this shard's histograms, V2-serialised.
    pub(super) fn handle_histograms_request(&self, origin: usize, req: u64) {
        use hdrhistogram::serialization::{Serializer as _, V2Serializer};
        let hists = self.hists.borrow();
        let mut ser = V2Serializer::new();
        let (mut p2w, mut hs) = (Vec::new(), Vec::new());
        ser.serialize(&hists.publish_to_write, &mut p2w)
            .expect("serialising to a Vec cannot fail");
        ser.serialize(&hists.handshake, &mut hs)
            .expect("serialising to a Vec cannot fail");
        drop(hists);
        self.send_msg(
            origin,
            &ShardMsg::HistogramsReply {
                req,
                publish_to_write: p2w,
                handshake: hs,
            },
            None,
            None,
        );
    }

    /// Merges one shard's reply into the gather.
    pub(super) fn handle_histograms_reply(
        &self,
        req: u64,
        publish_to_write: &[u8],
        handshake: &[u8],
    ) {
        use hdrhistogram::serialization::Deserializer;
        let mut waiters = self.hist_waiters.borrow_mut();
        let Some(g) = waiters.get_mut(&req) else {
            return;
        };
        let mut de = Deserializer::new();
        for (bytes, into) in [
            (publish_to_write, &mut g.merged.publish_to_write),
            (handshake, &mut g.merged.handshake),
        ] {
            match de.deserialize::<u64, _>(&mut std::io::Cursor::new(bytes)) {
                Ok(h) => {
                    let _ = into.add(&h);
                }
                Err(e) => tracing::error!(error = %e, "undecodable histogram from a shard"),
            }
        }
        g.remaining -= 1;
        if g.remaining == 0 {
            let g = waiters.remove(&req).expect("present");
            if let Some(tx) = g.tx {
                let _ = tx.send(g.merged);
            }
        }
    }

    pub(super) fn queue_delivery(&self, job: DeliverJob) {
        self.deliveries.borrow_mut().push_back(job);
        self.deliver_notify.notify();
    }

    /// Runs deliveries in arrival order, then flushes every touched connection once.
    pub(super) async fn fanout_task(self: Rc<Self>) {
        loop {
            self.deliver_notify.wait().await;
            loop {
                let Some(job) = self.deliveries.borrow_mut().pop_front() else {
                    break;
                };
                let (delivered, dropped) = self.deliver(&job).await;
                if job.req != 0 {
                    self.report(job.origin, job.req, delivered, dropped, 0);
                }
            }
            self.flush_dirty();
        }
    }

    /// Queues a job's frame on every local receiver; returns `(delivered, dropped)`.
    async fn deliver(&self, job: &DeliverJob) -> (u64, u64) {
        let (mut delivered, mut dropped) = (0u64, 0u64);
        let list = match &job.target {
            Target::Topic(topic) => self.topics.borrow().get(topic.as_str()).cloned(),
            Target::Role(role) => self.roles.borrow().get(role.as_str()).cloned(),
            Target::Customers(ids) => {
                let customers = self.customers.borrow();
                let mut conns = self.conns.borrow_mut();
                for id in ids {
                    let keys = customers.get(id.as_str()).map_or(&[][..], Vec::as_slice);
                    let mut any = false;
                    for &key in keys {
                        if conns.get_mut(key).is_some_and(|c| c.accepts(&job.kind)) {
                            any = true;
                            if self.enqueue(&mut conns, key, &job.frame, job.published) {
                                delivered += 1;
                            } else {
                                dropped += 1;
                            }
                        }
                    }
                    // Offline (or filtered out everywhere): a non-persistent event is dropped.
                    if !any {
                        dropped += 1;
                    }
                }
                return (delivered, dropped);
            }
            Target::Broadcast => None,
        };
        let filter = !matches!(job.target, Target::Topic(_));
        let total = match (&list, &job.target) {
            (Some(l), _) => l.len(),
            (None, Target::Broadcast) => self.conns.borrow().capacity(),
            (None, _) => 0,
        };
        let mut start = 0;
        while start < total {
            let end = (start + CHUNK).min(total);
            {
                let mut conns = self.conns.borrow_mut();
                for i in start..end {
                    let key = match &list {
                        Some(l) => l[i],
                        None => match conns.key_at(i) {
                            Some(k) => k,
                            None => continue,
                        },
                    };
                    let Some(c) = conns.get_mut(key) else {
                        continue;
                    };
                    if filter && (c.customer.is_empty() || !c.accepts(&job.kind)) {
                        continue;
                    }
                    if self.enqueue(&mut conns, key, &job.frame, job.published) {
                        delivered += 1;
                    } else {
                        dropped += 1;
                    }
                }
            }
            start = end;
            if start < total && glommio::executor().need_preempt() {
                // Put what is queued on the wire before giving the executor away.
                self.flush_dirty();
                glommio::yield_if_needed().await;
            }
        }
        (delivered, dropped)
    }
}
