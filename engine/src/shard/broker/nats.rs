//! The cluster broker (`broker.kind = "nats"`): what one node's shards do so that any node
//! serves any customer and any topic.
//!
//! - Topics: a publish is written once to the JetStream history stream (through the bus
//!   thread); the API answers once JetStream has it, with its sequence as the topic offset, or
//!   503 when JetStream does not take it. On each node the topic's owner shard (`topic_shard`,
//!   as on one node) holds the node's one subscription to the topic while local shards have
//!   subscribers, and relays what the stream republishes (`Relay`): one NATS message per event
//!   per interested node. Subscriptions with `since` are answered from the owner's recent
//!   events or from the stream, so a client recovers on any node.
//! - Customers: a persistent event goes to the JetStream queue stream (the offline queue,
//!   numbered by it), then to the inboxes of the nodes where the customer is connected (the
//!   presence table the bus keeps says which); a connection on any node reads the queue after
//!   its cursor, and acks remove events from the stream. Non-persistent events go to those
//!   inboxes only.
//! - Roles, broadcast and disconnects go to every node; ephemeral events on the topic's live
//!   subject; a direct message without a grant is checked and delivered on the recipient's
//!   node (a request to its inbox); receipts go to every node, and the one that minted the id
//!   tells its sender. Core NATS, at most once.
//!
//! - Per-customer connection limits count the customer's connections on every node (from
//!   the presence table, ~100 ms behind).
//!
//! - Presence-topic members are replicated with the presence table: member lists show every
//!   node's, and a gone node's members leave (each node tells its own subscribers).
//!
//! Not across nodes yet: chosen presence statuses.

use std::{cell::RefCell, sync::Arc, time::Instant};

use proto::{
    api::{Publish, Wait},
    bus::{encode_node, NodeMsg, ShardMsg, Target, TopicOffset},
    client::PresenceStatus,
    event::{parse_cursor, Via},
    placement::owner_shard,
};

use super::local::Local;
use crate::{
    cluster::{BusCmd, BusIn, BusState, Refused},
    shard::{
        relay::{Action, Relay},
        route::{Interest, Outcome},
        slab::ConnKey,
        streams::{unix_now, Resume},
        topic_owner::History,
        Payload, Shard, Shared,
    },
};

/// How long after a customer connection's first read of its queue the second one runs:
/// longer than the other nodes take to learn that this node has the customer.
const CATCH_UP_AFTER: std::time::Duration = std::time::Duration::from_millis(300);

/// A second read of a customer's queue for a connection that just started (see `resume`).
struct Catchup {
    key: ConnKey,
    customer: String,
    /// Everything stored here up to this offset has been replayed (or acknowledged).
    upto: u64,
    due: Instant,
}

/// The event store did not take a publish: answered 503 (API) or `unavailable` (client).
#[derive(Debug)]
pub struct Unavailable(pub String);

/// The cluster broker's state on one shard.
pub struct Nats {
    /// What stays on this node (see the module documentation).
    pub(super) local: Local,
    relay: RefCell<Relay>,
    bus: Arc<BusState>,
    /// Customer connections waiting for their catch-up read.
    catchups: RefCell<Vec<Catchup>>,
}

impl Nats {
    /// A shard's broker.
    pub fn new(shared: &Arc<Shared>, bus: Arc<BusState>) -> Nats {
        let config = shared.clone();
        let relay = Relay::new(
            move |topic| {
                let (keep, age) = config.config.history_for(topic);
                History { keep, age }
            },
            shared.config.nats.linger_secs,
        );
        Nats {
            local: Local::new(shared),
            relay: RefCell::new(relay),
            bus,
            catchups: RefCell::new(Vec::new()),
        }
    }

    pub(super) async fn publish(
        &self,
        shard: &Shard,
        p: &Publish,
        wait: Option<Wait>,
    ) -> Result<Outcome, Unavailable> {
        let mut out = Outcome::default();
        // JetStream deduplicates by message id across a whole stream, and one publish may
        // name several topics or customers: the id is made per subject.
        let msg_id = |subject: &str| {
            p.event
                .idempotent
                .then(|| format!("{subject} {}", p.event.id))
        };
        let mut pending = Vec::with_capacity(p.topics.len());
        for topic in &p.topics {
            let body = encode_node(&NodeMsg::TopicEvent {
                topic: topic.clone(),
                event: p.event.clone(),
            });
            let (reply, rx) = tokio::sync::oneshot::channel();
            let subject = self.bus.subject("h", Some(topic));
            self.bus.send(BusCmd::Publish {
                msg_id: msg_id(&subject),
                subject,
                body,
                reply,
            });
            pending.push((topic, rx));
        }
        // Persistent customer events: into each customer's queue first; once stored (numbered
        // by the queue stream) they go to the nodes where the customer is connected.
        let mut stored = Vec::new();
        if p.event.persistent {
            for c in &p.customers {
                let body = encode_node(&NodeMsg::Customer {
                    origin: self.bus.node_id.clone(),
                    customer: c.clone(),
                    event: p.event.clone(),
                    seq: 0,
                });
                let (reply, rx) = tokio::sync::oneshot::channel();
                let subject = self.bus.subject("q", Some(c));
                self.bus.send(BusCmd::Publish {
                    msg_id: msg_id(&subject),
                    subject,
                    body,
                    reply,
                });
                stored.push((c, rx));
            }
        }
        // Roles and broadcast: every other node delivers to its own clients.
        let mut targets: Vec<Target> = p.roles.iter().map(|r| Target::Role(r.clone())).collect();
        if p.broadcast {
            targets.push(Target::Broadcast);
        }
        if !targets.is_empty() {
            let msg = NodeMsg::Fanout {
                origin: self.bus.node_id.clone(),
                targets,
                event: p.event.clone(),
            };
            self.bus.send(BusCmd::Core {
                subject: self.bus.subject("all", None),
                body: encode_node(&msg),
            });
        }
        // Not persistent: to the nodes where the customer is connected, and here.
        let mut local_customers = Vec::with_capacity(p.customers.len());
        let live_customers = if p.event.persistent {
            &[][..]
        } else {
            &p.customers[..]
        };
        for c in live_customers {
            let elsewhere = self.send_to_nodes(c, &p.event, 0);
            if !elsewhere || self.bus.online_here(c) {
                local_customers.push(c.clone());
            }
        }
        let rest = local_customers.len() + p.roles.len() + usize::from(p.broadcast);
        if rest == 0 {
            shard
                .metrics()
                .publishes
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        } else {
            let rest = Publish {
                topics: Vec::new(),
                customers: local_customers,
                ..p.clone()
            };
            out = self.local.publish(shard, &rest, wait).await;
        }
        for (topic, rx) in pending {
            match rx.await {
                Ok(Ok(a)) if a.duplicate => out.counts.duplicates += 1,
                Ok(Ok(a)) => out.offsets.push(TopicOffset {
                    topic: topic.clone(),
                    offset: a.seq,
                }),
                Ok(Err(Refused::Unavailable(e))) => return Err(Unavailable(e)),
                Ok(Err(Refused::Full)) => out.counts.dropped += 1,
                Err(_) => return Err(Unavailable("the bus thread is gone".into())),
            }
        }
        for (c, rx) in stored {
            match rx.await {
                // A repeat of a publisher-chosen id: sent again with the first one's sequence
                // (its first sending may have been lost with the node that took it); nodes
                // that have it skip it.
                Ok(Ok(a)) if a.duplicate => {
                    out.counts.duplicates += 1;
                    self.deliver_stored(shard, c, &p.event, a.seq);
                }
                Ok(Ok(a)) => {
                    out.counts.queued += 1;
                    self.deliver_stored(shard, c, &p.event, a.seq);
                }
                // The customer's queue is full: this event is refused, none is pushed out.
                Ok(Err(Refused::Full)) => out.counts.dropped += 1,
                Ok(Err(Refused::Unavailable(e))) => return Err(Unavailable(e)),
                Err(_) => return Err(Unavailable("the bus thread is gone".into())),
            }
        }
        Ok(out)
    }

    /// Sends a customer event to the inboxes of the other nodes where the customer is
    /// connected; whether there were any.
    fn send_to_nodes(&self, customer: &str, event: &proto::event::Event, seq: u64) -> bool {
        let nodes = self.bus.nodes_of(customer);
        if nodes.is_empty() {
            return false;
        }
        let body = encode_node(&NodeMsg::Customer {
            origin: self.bus.node_id.clone(),
            customer: customer.to_owned(),
            event: event.clone(),
            seq,
        });
        for node in nodes {
            self.bus.send(BusCmd::Core {
                subject: self.bus.inbox(&node),
                body: body.clone(),
            });
        }
        true
    }

    /// A customer event the queue stream has stored as `seq`: to the nodes where the customer
    /// is connected, this one included.
    fn deliver_stored(&self, shard: &Shard, customer: &str, event: &proto::event::Event, seq: u64) {
        self.send_to_nodes(customer, event, seq);
        if self.bus.online_here(customer) {
            self.adopt_queue_epoch(shard);
            let msg = ShardMsg::DeliverCustomers {
                customers: vec![customer.to_owned()],
                event: event.clone(),
                origin: shard.id as u32,
                req: 0,
                seq,
            };
            let owner = owner_shard(customer, shard.shared.n_shards);
            shard.send_msg(owner, &msg, None, Some(Instant::now()));
        }
    }

    pub(super) fn on_interest(&self, shard: &Shard, i: Interest<'_>) {
        if i.on && i.req != 0 && !i.member.is_empty() && !shard.admit_member(i.topic, i.member) {
            let msg = ShardMsg::InterestAck {
                req: i.req,
                offset: 0,
                epoch: self.bus.epoch().to_owned(),
                recovered: false,
                replay: Vec::new(),
                full: true,
            };
            shard.send_msg(i.from, &msg, None, None);
            return;
        }
        let epoch = self.bus.epoch();
        let since = i
            .since
            .map(|(offset, e)| (offset, !epoch.is_empty() && e == epoch));
        let actions = self.relay.borrow_mut().interest(
            i.topic,
            i.from,
            i.on,
            i.req,
            since,
            i.last,
            unix_now(),
        );
        self.run(shard, actions);
    }

    /// What the bus brought for topics this shard owns.
    pub fn on_bus(&self, shard: &Shard, msg: BusIn) {
        let now = unix_now();
        let actions = {
            let mut relay = self.relay.borrow_mut();
            match msg {
                BusIn::Synced { topic, position } => relay.synced(&topic, position, now),
                BusIn::Live { topic, live } => relay.live(&topic, live, now),
                BusIn::Fetched { topic, id, fetched } => relay.fetched(&topic, id, fetched, now),
                BusIn::Node(msg) => {
                    drop(relay);
                    return self.on_node(shard, msg);
                }
                BusIn::Ephemeral {
                    topic,
                    except,
                    frames: (ws, sse),
                } => {
                    drop(relay);
                    let payload = Payload {
                        ws: ws.into(),
                        sse: sse.into(),
                    };
                    return self.on_ephemeral(shard, &topic, &except, payload);
                }
                BusIn::MembersGone { topic, customers } => {
                    drop(relay);
                    let elsewhere = self.bus.remote_members(&topic);
                    shard.members_gone(&topic, &customers, &elsewhere);
                    return;
                }
                BusIn::Direct {
                    to,
                    topics,
                    event,
                    reply,
                } => {
                    drop(relay);
                    // Here, on `to`'s owner shard: the check the local broker makes.
                    let allowed = shard.follows_any(&to, &topics);
                    if allowed {
                        let msg = ShardMsg::DeliverCustomers {
                            customers: vec![to],
                            event,
                            origin: shard.id as u32,
                            req: 0,
                            seq: 0,
                        };
                        shard.send_msg(shard.id, &msg, None, Some(Instant::now()));
                    }
                    self.bus.send(BusCmd::Core {
                        subject: reply,
                        body: encode_node(&NodeMsg::DirectAnswer { allowed }),
                    });
                    return;
                }
                BusIn::Customer {
                    customer,
                    event,
                    seq,
                } => {
                    drop(relay);
                    // Delivered on its owner shard as if published here (not counted back).
                    if seq != 0 {
                        self.adopt_queue_epoch(shard);
                    }
                    let msg = ShardMsg::DeliverCustomers {
                        customers: vec![customer.clone()],
                        event,
                        origin: shard.id as u32,
                        req: 0,
                        seq,
                    };
                    let owner = owner_shard(&customer, shard.shared.n_shards);
                    shard.send_msg(owner, &msg, None, Some(Instant::now()));
                    return;
                }
            }
        };
        self.run(shard, actions);
    }

    /// A role, broadcast or disconnect message another node took.
    fn on_node(&self, shard: &Shard, msg: NodeMsg) {
        let n = shard.shared.n_shards;
        match msg {
            NodeMsg::Fanout { targets, event, .. } => {
                // Encoded once here for every role member and broadcast receiver.
                let payload = Payload::of(&event, Via::default());
                let arrived = Some(Instant::now());
                for target in targets {
                    for to in 0..n {
                        let msg = ShardMsg::Deliver {
                            target: target.clone(),
                            kind: event.kind.clone(),
                            id: event.id.clone(),
                            idempotent: event.idempotent,
                            origin: shard.id as u32,
                            req: 0,
                        };
                        shard.send_msg(to, &msg, Some(payload.clone()), arrived);
                    }
                }
            }
            NodeMsg::Receipts {
                ids,
                by,
                status,
                topics,
                ..
            } => {
                // Only the ids this process minted: their senders are here.
                let mine = format!("{}-", shard.shared.epoch);
                let ids: Vec<String> = ids.into_iter().filter(|i| i.starts_with(&mine)).collect();
                if !ids.is_empty() {
                    self.local.receipts(shard, &ids, &by, status, topics);
                }
            }
            NodeMsg::Disconnect {
                customers, code, ..
            } => {
                let mut by_owner: std::collections::BTreeMap<usize, Vec<String>> =
                    Default::default();
                for c in customers {
                    by_owner.entry(owner_shard(&c, n)).or_default().push(c);
                }
                for (to, customers) in by_owner {
                    let msg = ShardMsg::Disconnect {
                        customers,
                        code,
                        origin: shard.id as u32,
                        req: 0,
                    };
                    shard.send_msg(to, &msg, None, None);
                }
            }
            _ => {}
        }
    }

    /// Closes `customers`' connections here and on the other nodes (theirs are not counted).
    pub(super) async fn disconnect(
        &self,
        shard: &Shard,
        customers: &[String],
        code: u16,
    ) -> proto::bus::Counts {
        let msg = NodeMsg::Disconnect {
            origin: self.bus.node_id.clone(),
            customers: customers.to_vec(),
            code,
        };
        self.bus.send(BusCmd::Core {
            subject: self.bus.subject("all", None),
            body: encode_node(&msg),
        });
        self.local.disconnect(shard, customers, code).await.counts
    }

    /// `customer` now has `open` connections on this node (its owner shard says so at each
    /// change): the other nodes route its events here while it has any, and count them
    /// against its limit.
    pub fn customer_count(&self, customer: &str, open: usize) {
        self.bus.set_here(customer, open > 0);
        if open == 0 {
            self.bus.forget_status(customer);
        }
        self.bus.send(BusCmd::Here {
            customer: customer.to_owned(),
            open: open as u32,
        });
    }

    /// `customer`, connected here, chose `status`: the other nodes are told, and the latest
    /// choice on any node is its status everywhere.
    pub fn status(&self, customer: &str, status: PresenceStatus) {
        let at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        self.bus.choose_status(customer, status.as_str(), at);
    }

    /// The status `customer` chose last on any node where it is connected.
    pub fn latest_status(&self, customer: &str) -> Option<String> {
        self.bus.latest_status(customer)
    }

    /// `customer` became (`joined`) or stopped being a member of presence topic `topic` on
    /// this node.
    pub fn member(&self, topic: &str, customer: &str, joined: bool) {
        self.bus.send(BusCmd::Member {
            topic: topic.to_owned(),
            customer: customer.to_owned(),
            joined,
        });
    }

    /// The members of presence topic `topic` on the other nodes (sorted).
    pub fn remote_members(&self, topic: &str) -> Vec<String> {
        self.bus.remote_members(topic)
    }

    /// The customer's connections on the other nodes (up to ~100 ms behind).
    pub fn connections_elsewhere(&self, customer: &str) -> usize {
        self.bus.connections_elsewhere(customer)
    }

    /// Cursors are the queue stream's from the moment it is known.
    fn adopt_queue_epoch(&self, shard: &Shard) {
        let epoch = self.bus.queue_epoch();
        if !epoch.is_empty() {
            shard.streams.borrow_mut().adopt(epoch);
        }
    }

    /// A customer connection's start: reads the customer's stored events after `since` from
    /// the queue stream (the connection takes no live customer event meanwhile; those are
    /// stored and come in the replay), merges them into the shard's store, and resumes from
    /// there as one process does. Complete only when the stream dropped nothing after
    /// `since` (an expired event is a loss).
    pub(super) async fn resume(
        &self,
        shard: &Shard,
        key: ConnKey,
        customer: &str,
        since: Option<&str>,
    ) -> Resume {
        self.adopt_queue_epoch(shard);
        let epoch = self.bus.queue_epoch().to_owned();
        if epoch.is_empty() {
            return shard.resume_customer(key, customer, since);
        }
        let after = since
            .and_then(parse_cursor)
            .filter(|(e, _)| *e == epoch)
            .map(|(_, o)| o);
        if let Some(c) = shard.conns.borrow_mut().get_mut(key) {
            c.resuming = true;
        }
        shard.hold(key);
        let fetched = self
            .start_queue_read(shard, customer, after.unwrap_or(0))
            .finish(shard)
            .await;
        let mut resume = shard.resume_customer(key, customer, since);
        // The other nodes learn that this one has the customer one NATS hop after it opened
        // (an arrival is told at once); an event stored meanwhile is not sent here. The
        // connection stays `resuming` (live persistent customer events stored, not queued;
        // other frames held) until a second read of the queue, a little later, has brought
        // those; they go out in order, then the held frames.
        let upto = shard.streams.borrow().seen_upto(customer);
        self.catchups.borrow_mut().push(Catchup {
            key,
            customer: customer.to_owned(),
            upto,
            due: Instant::now() + CATCH_UP_AFTER,
        });
        if after.is_some() {
            resume.recovered &= fetched.complete;
            // The cursor acknowledges everything up to it, on every node.
            self.bus.send(BusCmd::AckQueue {
                customer: customer.to_owned(),
                seqs: Vec::new(),
                up_to: after,
                done: None,
            });
        }
        resume
    }

    /// Runs the catch-up reads that are due (from the shard's ticker, every 100 ms).
    pub fn tick(&self, shard: &std::rc::Rc<Shard>) {
        let now = Instant::now();
        let due: Vec<Catchup> = {
            let mut all = self.catchups.borrow_mut();
            if all.iter().all(|c| c.due > now) {
                return;
            }
            let (due, later) = std::mem::take(&mut *all)
                .into_iter()
                .partition(|c| c.due <= now);
            *all = later;
            due
        };
        for c in due {
            let read = self.start_queue_read(shard, &c.customer, c.upto);
            let shard = shard.clone();
            glommio::spawn_local(async move {
                read.finish(&shard).await;
                let frames = shard.stored_frames_after(c.key, &c.customer, c.upto);
                if let Some(conn) = shard.conns.borrow_mut().get_mut(c.key) {
                    conn.resuming = false;
                }
                // The stored events it missed, then what was held meanwhile (not stored).
                shard.release(c.key, &frames);
            })
            .detach();
        }
    }

    /// A long poll's read: the customer's stored events after `since` from the queue stream
    /// into the shard's store (the poll then answers from it as one process does).
    pub(super) async fn read_queue(&self, shard: &Shard, customer: &str, since: Option<&str>) {
        self.adopt_queue_epoch(shard);
        let epoch = self.bus.queue_epoch().to_owned();
        if epoch.is_empty() {
            return;
        }
        let after = since
            .and_then(parse_cursor)
            .filter(|(e, _)| *e == epoch)
            .map_or(0, |(_, o)| o);
        self.start_queue_read(shard, customer, after)
            .finish(shard)
            .await;
    }

    /// Asks the bus for `customer`'s queued events after `after`, noting first which of them
    /// this shard holds copies of (the order matters: a copy made after the read was sent may
    /// be newer than what the read sees, and must not be dropped).
    fn start_queue_read(&self, shard: &Shard, customer: &str, after: u64) -> QueueRead {
        let max = shard.shared.config.delivery.offline_queue;
        let held = shard.held_after(customer, after);
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.bus.send(BusCmd::FetchQueue {
            customer: customer.to_owned(),
            after,
            max,
            reply,
        });
        QueueRead {
            customer: customer.to_owned(),
            held,
            max,
            rx,
        }
    }

    /// Acknowledges stored events here and in the queue stream; resolves to how many were
    /// removed here.
    pub(super) async fn ack(
        &self,
        shard: &Shard,
        customer: &str,
        ids: &[String],
        cursors: &[String],
        up_to: Option<&str>,
    ) -> u64 {
        let epoch = self.bus.queue_epoch().to_owned();
        let ours = |c: &str| {
            parse_cursor(c)
                .filter(|(e, _)| !epoch.is_empty() && *e == epoch)
                .map(|(_, o)| o)
        };
        let mut seqs = shard.streams.borrow().offsets_of(customer, ids);
        seqs.extend(cursors.iter().filter_map(|c| ours(c)));
        let up_to_seq = up_to.and_then(ours);
        let acked = shard.ack(customer, ids, cursors, up_to);
        if !seqs.is_empty() || up_to_seq.is_some() {
            // Answered once the stream has removed them: a connection that starts on another
            // node after the client saw `acked` does not get them again.
            let (done, removed) = tokio::sync::oneshot::channel();
            self.bus.send(BusCmd::AckQueue {
                customer: customer.to_owned(),
                seqs,
                up_to: up_to_seq,
                done: Some(done),
            });
            let _ = removed.await;
        }
        acked
    }

    /// A message to `to` allowed only if `to` follows one of `topics`: checked where `to` is
    /// connected, here or (by a request) on another node.
    pub(super) async fn direct(
        &self,
        shard: &Shard,
        to: &str,
        topics: Vec<String>,
        event: proto::event::Event,
    ) -> proto::bus::Counts {
        if self.bus.online_here(to) || !self.bus.online_elsewhere(to) {
            return self.local.direct(shard, to, topics, event).await.counts;
        }
        let Some(node) = self.bus.nodes_of(to).into_iter().next() else {
            return proto::bus::Counts {
                forbidden: 1,
                ..Default::default()
            };
        };
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.bus.send(BusCmd::Request {
            subject: self.bus.inbox(&node),
            body: encode_node(&NodeMsg::Direct {
                to: to.to_owned(),
                topics,
                event,
            }),
            reply,
        });
        let answer = rx.await.ok().flatten().map(|b| proto::bus::decode_node(&b));
        match answer {
            Some(Ok(NodeMsg::DirectAnswer { allowed: true })) => proto::bus::Counts {
                websocket: 1,
                ..Default::default()
            },
            // Refused, or no node answered (it left): not delivered.
            _ => proto::bus::Counts {
                forbidden: 1,
                ..Default::default()
            },
        }
    }

    /// Receipts: to the shards here that minted the ids, and to every other node for the
    /// ids minted elsewhere.
    pub(super) fn receipts(
        &self,
        shard: &Shard,
        ids: &[String],
        by: &str,
        status: proto::client::ReceiptStatus,
        topics: Vec<String>,
    ) {
        let mine = format!("{}-", shard.shared.epoch);
        let (here, elsewhere): (Vec<String>, Vec<String>) =
            ids.iter().cloned().partition(|i| i.starts_with(&mine));
        if !elsewhere.is_empty() {
            let msg = NodeMsg::Receipts {
                origin: self.bus.node_id.clone(),
                ids: elsewhere,
                by: by.to_owned(),
                status,
                topics: topics.clone(),
            };
            self.bus.send(BusCmd::Core {
                subject: self.bus.subject("all", None),
                body: encode_node(&msg),
            });
        }
        if !here.is_empty() {
            self.local.receipts(shard, &here, by, status, topics);
        }
    }

    /// Whether `customer` has connections on another node.
    pub fn online_elsewhere(&self, customer: &str) -> bool {
        self.bus.online_elsewhere(customer)
    }

    pub(super) fn sweep(&self, shard: &Shard, budget: usize, shrink: bool) {
        self.local.sweep(shard, budget, shrink);
        let actions = self.relay.borrow_mut().sweep(unix_now(), budget);
        self.run(shard, actions);
    }

    fn run(&self, shard: &Shard, actions: Vec<Action>) {
        for action in actions {
            match action {
                Action::Watch(topic) => self.bus.send(BusCmd::Watch {
                    topic: topic.to_string(),
                    shard: shard.id,
                }),
                Action::Unwatch(topic) => self.bus.send(BusCmd::Unwatch {
                    topic: topic.to_string(),
                }),
                Action::Fetch {
                    topic,
                    id,
                    after,
                    max,
                } => self.bus.send(BusCmd::Fetch {
                    topic: topic.to_string(),
                    shard: shard.id,
                    id,
                    after,
                    max,
                }),
                Action::Forward {
                    topic,
                    kind,
                    id,
                    payload,
                    shards,
                } => {
                    let arrived = Some(Instant::now());
                    for to in shards {
                        let msg = ShardMsg::Deliver {
                            target: Target::Topic(topic.to_string()),
                            kind: kind.clone(),
                            id: id.clone(),
                            idempotent: false,
                            origin: shard.id as u32,
                            req: 0,
                        };
                        shard.send_msg(to, &msg, Some(payload.clone()), arrived);
                    }
                }
                Action::Answer { to, req, joined } => {
                    let msg = ShardMsg::InterestAck {
                        req,
                        offset: joined.offset,
                        epoch: self.bus.epoch().to_owned(),
                        recovered: joined.recovered,
                        replay: joined.replay,
                        full: false,
                    };
                    shard.send_msg(to, &msg, None, None);
                }
            }
        }
        let m = shard.metrics();
        let relay = self.relay.borrow();
        m.topics_owned
            .store(relay.len() as i64, std::sync::atomic::Ordering::Relaxed);
        m.cluster_gaps
            .store(relay.gaps(), std::sync::atomic::Ordering::Relaxed);
    }

    /// An ephemeral event: to this node's subscribers through the topic's owner here, and to
    /// the other nodes' on the topic's live subject (at most once; not ordered against the
    /// topic's stored events, which come through the stream).
    pub(super) fn ephemeral(&self, shard: &Shard, topic: &str, except: &str, payload: Payload) {
        let msg = NodeMsg::Ephemeral {
            origin: self.bus.node_id.clone(),
            topic: topic.to_owned(),
            except: except.to_owned(),
            ws: payload.ws.to_vec(),
            sse: payload.sse.to_vec(),
        };
        self.bus.send(BusCmd::Core {
            subject: self.bus.subject("t", Some(topic)),
            body: encode_node(&msg),
        });
        self.local.ephemeral(shard, topic, except, payload);
    }

    /// An ephemeral event reaches this node's subscribers.
    pub(super) fn on_ephemeral(
        &self,
        shard: &Shard,
        topic: &str,
        except: &str,
        payload: crate::shard::Payload,
    ) {
        let shards = self.relay.borrow().interested(topic);
        super::local::pass_ephemeral(shard, shards, topic, except, payload);
    }
}

/// A read of a customer's queue stream in flight ([`Nats::start_queue_read`]).
struct QueueRead {
    customer: String,
    held: Vec<u64>,
    max: usize,
    rx: tokio::sync::oneshot::Receiver<crate::shard::relay::Fetched>,
}

impl QueueRead {
    /// Waits for the events and brings the shard's copies in line with them
    /// (`Shard::sync_fetched`): a failed read comes back empty and changes nothing.
    async fn finish(self, shard: &Shard) -> crate::shard::relay::Fetched {
        let fetched = self.rx.await.unwrap_or_default();
        shard.sync_fetched(&self.customer, &self.held, &fetched, self.max);
        fetched
    }
}
