//! The broker seam: every decision about how an event, a subscription or a query reaches the
//! shards (and, in a cluster, the nodes) that serve its receivers is made here, and nowhere
//! else. The connection code, the API and the fan-out call the [`Broker`]; they never pick a
//! shard or send a mesh message themselves.
//!
//! What stays outside, the same under every broker: the subscriber side of topics
//! (`LocalTopics`: which local connections follow a topic, which subscriptions wait for an
//! answer), the fan-out queue and its jobs, the connections, and the owner shard's own
//! customer state. A broker's answers come back into that machinery as fan-out jobs (a
//! delivery, `Job::Subscribed`), in the order the broker produced them.
//!
//! [`local::Local`] is the one-process broker: each topic has an owner shard
//! (`topic_shard`) that numbers its events, keeps their history and knows which shards want
//! them; each customer has an owner shard (`owner_shard`) where all its connections live.
//! A clustered broker keeps that shape: the owner shard on each node is still where a topic's
//! or a customer's traffic enters the node, and it is the owner's half of the broker that
//! talks to the other nodes.

pub mod local;
pub mod nats;

use std::{rc::Rc, time::Instant};

use proto::{
    api::{Publish, Wait},
    bus::{Counts, Position},
    client::{PresenceStatus, ReceiptStatus},
    event::Event,
};

use super::{
    route::{Interest, Outcome, ReportTo},
    slab::ConnKey,
    streams::{Missed, Resume},
    Payload, Shard,
};

/// What the API asks of a customer's or a topic's owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Query {
    /// A customer's presence (`GET /v1/presence/customers/{id}`).
    CustomerPresence,
    /// A presence topic's members (`GET /v1/presence/topics/{topic}`).
    TopicMembers,
    /// A customer's delivery preferences (`GET /v1/preferences/customers/{id}`).
    Preferences,
}

/// How events reach the shards that serve their receivers (see the module documentation).
pub enum Broker {
    /// One process: owners are shards of this process, reached over the mesh.
    Local(local::Local),
    /// A cluster: topics through NATS and JetStream, the rest as `Local` for now.
    Nats(nats::Nats),
}

impl Broker {
    // ---- origin side: called where a request enters the shard ----

    /// Routes a publish to the owners of its targets. Resolves, after what `wait` asks for
    /// (or after 5 s, with what was reported by then), to the reported counts and topic
    /// offsets; without `wait`, at once, once the event is handed on. In a cluster, topic
    /// events are first taken by the event store, which can refuse ([`nats::Unavailable`]).
    pub async fn publish(
        &self,
        shard: &Shard,
        p: &Publish,
        wait: Option<Wait>,
    ) -> Result<Outcome, nats::Unavailable> {
        match self {
            Broker::Local(l) => Ok(l.publish(shard, p, wait).await),
            Broker::Nats(n) => n.publish(shard, p, wait).await,
        }
    }

    /// The cluster broker, if this is one.
    pub fn cluster(&self) -> Option<&nats::Nats> {
        match self {
            Broker::Local(_) => None,
            Broker::Nats(n) => Some(n),
        }
    }

    /// The one-process half (all of the local broker; what the cluster broker keeps local).
    fn local(&self) -> &local::Local {
        match self {
            Broker::Local(l) => l,
            Broker::Nats(n) => &n.local,
        }
    }

    /// Closes every connection of `customers` with `code`, wherever they are; resolves to the
    /// connections closed.
    pub async fn disconnect(&self, shard: &Shard, customers: &[String], code: u16) -> Counts {
        match self {
            Broker::Local(l) => l.disconnect(shard, customers, code).await.counts,
            Broker::Nats(n) => n.disconnect(shard, customers, code).await,
        }
    }

    /// Asks the owner of `topic` to count this shard's interest and answer subscription `req`
    /// (registered in `LocalTopics`) with the topic's position and the replay after `since`
    /// (or the `last` latest events). The answer arrives as `Job::Subscribed`, after every
    /// event the subscriber must not see live and before every one it must.
    pub fn subscribe(
        &self,
        shard: &Shard,
        req: u64,
        topic: &str,
        since: Option<Position>,
        last: u32,
        member: &str,
    ) {
        self.local()
            .subscribe(shard, req, topic, since, last, member)
    }

    /// This shard's last subscriber of `topic` left.
    pub fn unsubscribe(&self, shard: &Shard, topic: &str) {
        self.local().unsubscribe(shard, topic)
    }

    /// A member of a presence topic left it (joins are counted when the owner admits them).
    pub fn left(&self, shard: &Shard, topic: &str, customer: &str) {
        self.local().left(shard, topic, customer)
    }

    /// An ephemeral event (typing, presence) for the subscribers of `topic` but the
    /// connections of `except`, in order with the topic's events.
    pub fn ephemeral(&self, shard: &Shard, topic: &str, except: &str, payload: Payload) {
        match self {
            Broker::Local(l) => l.ephemeral(shard, topic, except, payload),
            Broker::Nats(n) => n.ephemeral(shard, topic, except, payload),
        }
    }

    /// An ephemeral event for this node's subscribers of `topic` only (something every node
    /// learns and tells its own subscribers, such as a gone node's members).
    pub fn ephemeral_here(&self, shard: &Shard, topic: &str, payload: Payload) {
        self.local().ephemeral(shard, topic, "", payload)
    }

    /// A message to `to` allowed only if `to` follows one of `topics`: decided by `to`'s
    /// owner; `forbidden` counts a refusal.
    pub async fn direct(
        &self,
        shard: &Shard,
        to: &str,
        topics: Vec<String>,
        event: Event,
    ) -> Counts {
        match self {
            Broker::Local(l) => l.direct(shard, to, topics, event).await.counts,
            Broker::Nats(n) => n.direct(shard, to, topics, event).await,
        }
    }

    /// Receipts from `by` for client-sent events, to the shards that minted their ids.
    pub fn receipts(
        &self,
        shard: &Shard,
        ids: &[String],
        by: &str,
        status: ReceiptStatus,
        topics: Vec<String>,
    ) {
        match self {
            Broker::Local(l) => l.receipts(shard, ids, by, status, topics),
            Broker::Nats(n) => n.receipts(shard, ids, by, status, topics),
        }
    }

    /// Asks the owner of a customer or topic what the API shows of it; the JSON body, or
    /// None after 5 s.
    pub async fn query(&self, shard: &Shard, query: Query, key: &str) -> Option<Vec<u8>> {
        self.local().query(shard, query, key).await
    }

    // ---- customers: called on the customer's owner shard, where its connections are ----

    /// At a customer connection's registration: acknowledges what the client's cursor covers
    /// and returns the stored events after it, to queue right after the greeting. The local
    /// broker resolves without yielding, so no live event can come between the replay and
    /// the live stream; a broker that must wait holds the connection's frames meanwhile
    /// (`Shard::hold`).
    pub async fn resume(
        &self,
        shard: &Shard,
        key: ConnKey,
        customer: &str,
        since: Option<&str>,
    ) -> Resume {
        match self {
            Broker::Local(_) => shard.resume_customer(key, customer, since),
            Broker::Nats(n) => n.resume(shard, key, customer, since).await,
        }
    }

    /// Acknowledges stored events of `customer` by id, by cursor, or up to a cursor;
    /// resolves to how many were removed.
    pub async fn ack(
        &self,
        shard: &Shard,
        customer: &str,
        ids: &[String],
        cursors: &[String],
        up_to: Option<&str>,
    ) -> u64 {
        match self {
            Broker::Local(_) => shard.ack(customer, ids, cursors, up_to),
            Broker::Nats(n) => n.ack(shard, customer, ids, cursors, up_to).await,
        }
    }

    /// The stored events a long poll gets: after `since`, of the types `filters` take.
    pub async fn missed(
        &self,
        shard: &Shard,
        customer: &str,
        since: Option<&str>,
        filters: &[Box<str>],
    ) -> Missed {
        if let Broker::Nats(n) = self {
            n.read_queue(shard, customer, since).await;
        }
        shard.missed(customer, since, filters)
    }

    /// A customer chose a presence status; announced to those who follow it.
    pub fn status(&self, shard: &Shard, customer: &Rc<str>, status: PresenceStatus) {
        // Customers live on their owner shard under both brokers. In a cluster the choice is
        // recorded for the other nodes first: the announcement below reads it back. The
        // status followers know is the latest choice on any node, so a choice is announced
        // when it changes that, even if it repeats this node's own last choice.
        let mut changed_elsewhere = false;
        if let Some(cluster) = self.cluster() {
            let before = cluster.latest_status(customer);
            changed_elsewhere = before.as_deref().unwrap_or("online") != status.as_str();
            cluster.status(customer, status);
        }
        shard.set_status(customer, status, changed_elsewhere);
    }

    // ---- owner side: messages that reach a topic's owner shard ----

    /// A publish to a topic this shard owns.
    pub(super) fn on_publish(
        &self,
        shard: &Shard,
        topic: &str,
        event: &Event,
        to: ReportTo,
        published: Option<Instant>,
    ) {
        self.local().on_publish(shard, topic, event, to, published)
    }

    /// A shard gained or lost interest in a topic this shard owns.
    pub(super) fn on_interest(&self, shard: &Shard, i: Interest<'_>) {
        if i.on && i.req != 0 && crate::faults::active("mute_topic_owners") {
            return;
        }
        match self {
            Broker::Local(l) => l.on_interest(shard, i),
            Broker::Nats(n) => n.on_interest(shard, i),
        }
    }

    /// An ephemeral event for a topic this shard owns.
    pub(super) fn on_ephemeral(&self, shard: &Shard, topic: &str, except: &str, payload: Payload) {
        match self {
            Broker::Local(l) => l.on_ephemeral(shard, topic, except, payload),
            Broker::Nats(n) => n.on_ephemeral(shard, topic, except, payload),
        }
    }

    /// Housekeeping (from the ticker): forgets idle owned topics, at most `budget` per call,
    /// and with `shrink` gives back the tables' spare capacity.
    pub(super) fn sweep(&self, shard: &Shard, budget: usize, shrink: bool) {
        match self {
            Broker::Local(l) => l.sweep(shard, budget, shrink),
            Broker::Nats(n) => n.sweep(shard, budget, shrink),
        }
    }
}
