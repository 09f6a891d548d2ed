//! Presence: customers (status, connections, platforms, last seen; kept on the customer's
//! owner shard, where all its connections are) and topics (members, kept on the topic's owner,
//! for namespaces with `presence = true`).
//!
//! Bounded traffic is the point. A topic's joins and leaves are gathered for
//! `presence.coalesce_ms` and go to its members as one `presence_diff` per window; a leave and
//! a join of the same customer inside one window cancel out, so a room whose members all
//! reconnect within a window produces nothing, and one that straddles two windows produces at
//! most two diffs per member. A diff names at most `presence.max_diff_names` customers.

use std::{rc::Rc, time::Instant};

use ahash::AHashMap;
use proto::client::PresenceStatus;

use super::{broker::Query, Shard};

/// A presence topic's members, on its owner.
#[derive(Default)]
struct TopicMembers {
    /// Customer -> open subscriptions (connections) to the topic.
    count: AHashMap<Rc<str>, u32>,
    /// Sum of `count`.
    total: u32,
    /// Net changes since the last diff: joined (true) or left (false).
    pending: AHashMap<Rc<str>, bool>,
    /// A flush is scheduled: opened by the first change after the last diff.
    window: bool,
}

/// The members of the topics a shard owns that count them (presence, or a subscriber cap),
/// and their pending diffs. A plain struct: the shard's glue schedules the windows and sends
/// the diffs; the simulation drives it directly.
#[derive(Default)]
pub struct Members {
    topics: AHashMap<Rc<str>, TopicMembers>,
}

/// One window's net change of a topic's members.
pub struct Diff {
    /// Customers who became members.
    pub joined: Vec<String>,
    /// Customers who stopped being members.
    pub left: Vec<String>,
    /// Members after the change.
    pub members: usize,
    /// More changed than a diff names (`presence.max_diff_names`).
    pub truncated: bool,
}

impl Members {
    /// Open subscriptions to `topic`, all members together.
    pub fn total(&self, topic: &str) -> u32 {
        self.topics.get(topic).map_or(0, |m| m.total)
    }

    /// One subscription more (`joined`) or less of `customer`. With `diffs` (a presence
    /// topic), a customer's first subscription or last leave is a pending change, and a
    /// change and its opposite inside one window cancel out. Returns true when this change
    /// opened the topic's window: the caller schedules one [`Members::take_diff`] for it.
    pub fn change(&mut self, topic: &str, customer: &str, joined: bool, diffs: bool) -> bool {
        let m = match self.topics.get_mut(topic) {
            Some(m) => m,
            None => self.topics.entry(Rc::from(topic)).or_default(),
        };
        if joined {
            m.total += 1;
        } else if m.count.contains_key(customer) {
            m.total -= 1;
        }
        let transition = match m.count.get_mut(customer) {
            Some(n) if joined => {
                *n += 1;
                false
            }
            Some(n) => {
                *n -= 1;
                if *n == 0 {
                    m.count.remove(customer);
                    true
                } else {
                    false
                }
            }
            None if joined => {
                m.count.insert(Rc::from(customer), 1);
                true
            }
            None => false,
        };
        let opened = if transition && diffs {
            // Net change inside the window: the opposite pending change cancels out.
            match m.pending.get(customer) {
                Some(&was) if was != joined => {
                    m.pending.remove(customer);
                }
                _ => {
                    m.pending.insert(Rc::from(customer), joined);
                }
            }
            // One flush per window, however the pending changes come and cancel.
            !std::mem::replace(&mut m.window, true)
        } else {
            false
        };
        if m.count.is_empty() && m.pending.is_empty() && !m.window {
            self.topics.remove(topic);
        }
        opened
    }

    /// Closes the topic's window: its net change since the last diff, naming at most `cap`
    /// customers, or `None` when everything cancelled out.
    pub fn take_diff(&mut self, topic: &str, cap: usize) -> Option<Diff> {
        let m = self.topics.get_mut(topic)?;
        m.window = false;
        let pending = std::mem::take(&mut m.pending);
        let members = m.count.len();
        if members == 0 {
            self.topics.remove(topic);
        }
        if pending.is_empty() {
            return None;
        }
        let truncated = pending.len() > cap;
        let (mut joined, mut left) = (Vec::new(), Vec::new());
        for (c, j) in pending.into_iter().take(cap) {
            if j {
                joined.push(c.to_string());
            } else {
                left.push(c.to_string());
            }
        }
        Some(Diff {
            joined,
            left,
            members,
            truncated,
        })
    }

    /// Whether `customer` is a member of `topic` (has a subscription to it) here.
    pub fn has(&self, topic: &str, customer: &str) -> bool {
        self.topics
            .get(topic)
            .is_some_and(|m| m.count.contains_key(customer))
    }

    /// A topic's members and their subscription counts, by name.
    pub fn list(&self, topic: &str) -> Vec<(&str, u32)> {
        let mut list: Vec<(&str, u32)> = self
            .topics
            .get(topic)
            .map(|m| m.count.iter().map(|(c, n)| (&**c, *n)).collect())
            .unwrap_or_default();
        list.sort_unstable_by(|a, b| a.0.cmp(b.0));
        list
    }
}

/// Customers' presence, on their owner shard. Nothing here costs a connected customer that
/// keeps the default status and joins no presence topic: the connection count and platforms
/// come from its connections, `online` is the default.
#[derive(Default)]
pub struct CustomerPresence {
    /// Statuses other than `online` chosen by connected customers.
    status: AHashMap<Rc<str>, PresenceStatus>,
    /// Unix seconds of the last disconnect of customers now offline (the oldest forgotten
    /// beyond `LAST_SEEN_KEPT`).
    last_seen: AHashMap<Rc<str>, u64>,
    /// Disconnects in order, to forget the oldest; an entry whose customer came back (or
    /// left again later) no longer matches `last_seen` and is skipped.
    last_seen_order: std::collections::VecDeque<(Rc<str>, u64)>,
    /// Presence topics of customers in any, with subscription counts.
    topics: AHashMap<Rc<str>, Vec<(Rc<str>, u32)>>,
    /// Platform names (`?platform=`); a connection keeps an index into this list.
    pub platforms: Vec<Rc<str>>,
}

/// Offline customers whose last-seen time a shard remembers.
const LAST_SEEN_KEPT: usize = 100_000;

/// Distinct platform names a shard tells apart (beyond: `other`).
const PLATFORMS: usize = 32;

impl CustomerPresence {
    /// Remembers when `customer` went offline; the oldest beyond `LAST_SEEN_KEPT` is
    /// forgotten.
    fn went_offline(&mut self, customer: &Rc<str>, now: u64) {
        if self.last_seen_order.len() >= LAST_SEEN_KEPT {
            if let Some((old, at)) = self.last_seen_order.pop_front() {
                if self.last_seen.get(&old) == Some(&at) {
                    self.last_seen.remove(&old);
                }
            }
        }
        self.last_seen.insert(customer.clone(), now);
        self.last_seen_order.push_back((customer.clone(), now));
        self.compact_last_seen();
    }

    /// Drops the order entries of customers who came back or left again since: without it,
    /// every connect-disconnect cycle would keep its customer name alive until 100,000
    /// disconnects later (and scatter those small allocations over the heap). Runs when stale
    /// entries outnumber live ones, so its cost is amortised O(1) per disconnect.
    fn compact_last_seen(&mut self) {
        if self.last_seen_order.len() <= 2 * self.last_seen.len() + 1024 {
            return;
        }
        let seen = &self.last_seen;
        self.last_seen_order
            .retain(|(c, at)| seen.get(c) == Some(at));
        if self.last_seen_order.capacity() > 4 * self.last_seen_order.len() + 1024 {
            self.last_seen_order.shrink_to_fit();
        }
    }

    /// The index of a platform name (0: `unknown`).
    pub fn platform_index(&mut self, name: Option<&str>) -> u8 {
        if self.platforms.is_empty() {
            self.platforms.push(Rc::from("unknown"));
            self.platforms.push(Rc::from("other"));
        }
        let Some(name) = name.filter(|n| !n.is_empty() && n.len() <= 32) else {
            return 0;
        };
        if let Some(i) = self.platforms.iter().position(|p| &**p == name) {
            return i as u8;
        }
        if self.platforms.len() >= PLATFORMS {
            return 1;
        }
        self.platforms.push(Rc::from(name));
        (self.platforms.len() - 1) as u8
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn bump(list: &mut Vec<(Rc<str>, u32)>, name: &str, up: bool) {
    match list.iter().position(|(n, _)| &**n == name) {
        Some(i) if up => list[i].1 += 1,
        Some(i) => {
            list[i].1 -= 1;
            if list[i].1 == 0 {
                list.swap_remove(i);
            }
        }
        None if up => list.push((Rc::from(name), 1)),
        None => {}
    }
}

impl Shard {
    fn presence_on(&self, topic: &str) -> bool {
        self.shared.config.namespace(topic).presence
    }

    /// Whether the topic's owner counts its members (presence, or a subscriber cap).
    pub fn tracks_members(&self, topic: &str) -> bool {
        let ns = self.shared.config.namespace(topic);
        ns.presence || ns.max_subscribers > 0
    }

    /// On the topic's owner: admits one more subscription of `member` unless the topic has
    /// its namespace's `max_subscribers` (then refused and counted).
    pub(super) fn admit_member(&self, topic: &str, member: &str) -> bool {
        let max = self.shared.config.namespace(topic).max_subscribers;
        if max > 0 {
            let total = self.members.borrow().total(topic);
            if total as usize >= max {
                self.metrics()
                    .topic_full
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return false;
            }
        }
        self.handle_membership(topic, member, true);
        true
    }

    /// A connection of `customer` (owned here) was registered (`up`) or is gone; `open` is
    /// how many it has now.
    pub fn customer_connection(&self, customer: &Rc<str>, open: usize, up: bool) {
        let announce = {
            let mut p = self.presence.borrow_mut();
            if up && open == 1 {
                p.last_seen.remove(customer);
                true
            } else if !up && open == 0 {
                p.status.remove(customer);
                p.went_offline(customer, unix_now());
                true
            } else {
                false
            }
        };
        if let Some(cluster) = self.broker.cluster() {
            cluster.customer_count(customer, open);
        }
        if announce {
            self.announce_status(customer, false);
        }
    }

    /// The `presence` op: sets the customer's status and tells those who may see it.
    /// With `changed_elsewhere` (a cluster where another node's choice was the latest), it is
    /// announced even if this node's own choice was already `status`.
    pub fn set_status(&self, customer: &Rc<str>, status: PresenceStatus, changed_elsewhere: bool) {
        let before = {
            let mut p = self.presence.borrow_mut();
            if status == PresenceStatus::Online {
                p.status.remove(customer)
            } else {
                p.status.insert(customer.clone(), status)
            }
        };
        if changed_elsewhere || before.unwrap_or_default() != status {
            self.announce_status(customer, true);
        }
    }

    fn customer_json(&self, customer: &str) -> serde_json::Value {
        let conns = self.conns.borrow();
        let keys = self.registry.borrow().of_customer(customer).to_vec();
        let p = self.presence.borrow();
        let mut platforms: Vec<&str> = keys
            .iter()
            .filter_map(|k| conns.get(*k))
            .map(|c| {
                p.platforms
                    .get(usize::from(c.platform))
                    .map_or("unknown", |n| &**n)
            })
            .collect();
        platforms.sort_unstable();
        platforms.dedup();
        // In a cluster the customer may be connected to another node only: online, with
        // what this node knows of it (its connections and platforms here).
        let elsewhere = keys.is_empty()
            && self
                .broker
                .cluster()
                .is_some_and(|c| c.online_elsewhere(customer));
        // In a cluster, the status the customer chose last on any node it is connected to.
        let chosen = self
            .broker
            .cluster()
            .and_then(|c| c.latest_status(customer));
        let status = if keys.is_empty() && !elsewhere {
            "offline"
        } else if let Some(chosen) = chosen.as_deref() {
            chosen
        } else {
            p.status.get(customer).copied().unwrap_or_default().as_str()
        };
        proto::client::customer_presence(
            customer,
            status,
            keys.len(),
            &platforms,
            p.last_seen.get(customer).copied().filter(|_| !elsewhere),
        )
    }

    /// Sends a customer's presence to subscribers of `presence:<customer>` and, for a status
    /// the customer chose (`to_rooms`), to the members of its presence topics (they learn
    /// online and offline from the topics' joins and leaves).
    fn announce_status(&self, customer: &Rc<str>, to_rooms: bool) {
        let data = self.customer_json(customer);
        let mut topics = vec![format!("presence:{customer}")];
        if to_rooms {
            if let Some(list) = self.presence.borrow().topics.get(customer) {
                topics.extend(list.iter().map(|(t, _)| t.to_string()));
            }
        }
        for topic in topics {
            self.ephemeral(&topic, customer, "presence", &data);
        }
    }

    /// A connection of `customer` (owned here) subscribed to or left `topic`. The owner
    /// counted the join when it admitted the subscription; a leave is sent to it.
    pub fn membership(&self, topic: &str, customer: &Rc<str>, joined: bool) {
        if !self.tracks_members(topic) {
            return;
        }
        {
            let mut p = self.presence.borrow_mut();
            let list = p.topics.entry(customer.clone()).or_default();
            bump(list, topic, joined);
            if list.is_empty() {
                p.topics.remove(customer);
            }
        }
        if joined {
            return;
        }
        self.broker.left(self, topic, customer);
    }

    /// On the topic's owner: one subscription more or less; a change that opens the topic's
    /// window schedules its diff `presence.coalesce_ms` later.
    pub(super) fn handle_membership(&self, topic: &str, customer: &str, joined: bool) {
        let diffs = self.presence_on(topic);
        let (was, opened, now) = {
            let mut members = self.members.borrow_mut();
            let was = members.has(topic, customer);
            let opened = members.change(topic, customer, joined, diffs);
            (was, opened, members.has(topic, customer))
        };
        if diffs && was != now {
            if let Some(cluster) = self.broker.cluster() {
                cluster.member(topic, customer, now);
            }
        }
        if opened {
            let due = Instant::now()
                + std::time::Duration::from_millis(self.shared.config.presence.coalesce_ms);
            self.presence_due.borrow_mut().push((Rc::from(topic), due));
        }
    }

    /// Sends the diffs whose window is over (the shard's ticker calls this).
    pub(super) fn flush_presence(&self) {
        let now = Instant::now();
        let due: Vec<Rc<str>> = {
            let mut list = self.presence_due.borrow_mut();
            if list.is_empty() {
                return; // the common case, every tick
            }
            let (ready, waiting): (Vec<_>, Vec<_>) = list.drain(..).partition(|(_, at)| *at <= now);
            *list = waiting;
            ready.into_iter().map(|(t, _)| t).collect()
        };
        let cap = self.shared.config.presence.max_diff_names;
        for topic in due {
            let Some(mut diff) = self.members.borrow_mut().take_diff(&topic, cap) else {
                continue; // everything cancelled out
            };
            if let Some(cluster) = self.broker.cluster() {
                // The diff goes to the topic's subscribers on every node, so it speaks for the
                // cluster: members on other nodes count, and a customer still a member on
                // another node neither joined nor left.
                let remote = cluster.remote_members(&topic);
                let elsewhere = |c: &String| remote.binary_search(c).is_ok();
                let members = self.members.borrow();
                diff.members += remote.iter().filter(|c| !members.has(&topic, c)).count();
                diff.joined.retain(|c| !elsewhere(c));
                diff.left.retain(|c| !elsewhere(c));
                if diff.joined.is_empty() && diff.left.is_empty() && !diff.truncated {
                    continue;
                }
            }
            self.metrics()
                .presence_diffs
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let data = proto::client::presence_diff(
                &diff.joined,
                &diff.left,
                diff.members,
                diff.truncated,
            );
            self.ephemeral(&topic, "", "presence_diff", &data);
        }
    }

    /// Cluster mode, on the topic's owner: members of `topic` that were on a node now gone;
    /// those not here nor on another node left, and this node's subscribers are told (each
    /// node tells its own, so the diff does not cross nodes).
    pub(super) fn members_gone(&self, topic: &str, customers: &[String], elsewhere: &[String]) {
        let left: Vec<String> = {
            let members = self.members.borrow();
            customers
                .iter()
                .filter(|c| !members.has(topic, c) && elsewhere.binary_search(c).is_err())
                .cloned()
                .collect()
        };
        if left.is_empty() || !self.presence_on(topic) {
            return;
        }
        let count = {
            let members = self.members.borrow();
            members.list(topic).len() + elsewhere.iter().filter(|c| !members.has(topic, c)).count()
        };
        let data = proto::client::presence_diff(&[], &left, count, false);
        let (ws, sse) = proto::client::ephemeral("presence_diff", topic, &data);
        let payload = crate::shard::Payload {
            ws: proto::ws::server_frame(proto::ws::OpCode::Text, &ws),
            sse: bytes::Bytes::from(sse),
        };
        self.metrics()
            .presence_diffs
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.broker.ephemeral_here(self, topic, payload);
    }

    /// On the owner: the JSON body the API returns for a query.
    pub(super) fn answer_query(&self, query: Query, key: &str) -> Vec<u8> {
        let body = match query {
            Query::Preferences => {
                let none = proto::prefs::Preferences::default();
                let all = self.preferences.borrow();
                let out = proto::api::PreferencesOut {
                    customer_id: key,
                    preferences: all.get(key).unwrap_or(&none),
                };
                return serde_json::to_vec(&out).expect("serialisable");
            }
            Query::TopicMembers => {
                let members = self.members.borrow();
                let mut list = members.list(key);
                // In a cluster, the members on the other nodes too (their counts are theirs:
                // each is listed with one here).
                let remote = self
                    .broker
                    .cluster()
                    .map(|c| c.remote_members(key))
                    .unwrap_or_default();
                for r in &remote {
                    if !list.iter().any(|(n, _)| *n == r.as_str()) {
                        list.push((r.as_str(), 1));
                    }
                }
                list.sort_unstable_by(|a, b| a.0.cmp(b.0));
                proto::client::topic_members(key, &list)
            }
            Query::CustomerPresence => self.customer_json(key),
        };
        body.to_string().into_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnect_churn_keeps_no_stale_last_seen_entries() {
        let mut p = CustomerPresence::default();
        for i in 0..50_000u64 {
            // A fresh name allocation per connection, as the engine makes one.
            let c: Rc<str> = Rc::from(format!("churner-{}", i % 8).as_str());
            p.went_offline(&c, i);
            p.last_seen.remove(&c); // it comes back
        }
        assert!(
            p.last_seen_order.len() <= 1024 + 2,
            "{} order entries kept for 8 customers",
            p.last_seen_order.len()
        );
        let gone: Rc<str> = Rc::from("gone");
        p.went_offline(&gone, 7);
        assert_eq!(p.last_seen.get(&gone), Some(&7));
    }
}
