//! Chat semantics between clients: typing indicators (ephemeral, throttled, never echoed),
//! direct messages under a policy (a token grant, or a topic both customers are in), and
//! delivered/read receipts routed back to the sender of a client-sent message.
//!
//! Receipts work without asking the client who sent what: every client-sent event gets its id
//! from the sender's owner shard (`<epoch>-<shard>-<n>`), which remembers the sender and the
//! target in a bounded log. An `ack` with `status` names ids; each id says which shard to ask.

use std::{collections::VecDeque, rc::Rc, sync::atomic::Ordering::Relaxed, time::Instant};

use ahash::AHashMap;
use bytes::Bytes;
use proto::{
    bus::Counts,
    client::{receipt, ReceiptStatus},
    event::Event,
    ws::{server_frame, OpCode},
};

use super::{route::Payload, slab::ConnKey, Job, Shard};

/// Whom a client-sent event went to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SentTo {
    /// A customer (`send_message`).
    Customer(String),
    /// A topic (`publish`).
    Topic(String),
}

/// Client-sent events of senders owned by this shard, newest last, at most `cap`.
pub struct SentLog {
    order: VecDeque<String>,
    by_id: AHashMap<String, (Rc<str>, SentTo)>,
    cap: usize,
}

impl SentLog {
    /// An empty log keeping at most `cap` events.
    pub fn new(cap: usize) -> Self {
        SentLog {
            order: VecDeque::new(),
            by_id: AHashMap::new(),
            cap,
        }
    }

    /// Remembers that `from` sent event `id` to `to`.
    pub fn record(&mut self, id: &str, from: Rc<str>, to: SentTo) {
        if self.cap == 0 {
            return;
        }
        if self.order.len() >= self.cap {
            if let Some(old) = self.order.pop_front() {
                self.by_id.remove(&old);
            }
        }
        self.order.push_back(id.to_owned());
        self.by_id.insert(id.to_owned(), (from, to));
    }

    /// The sender and target of `id`, if still remembered.
    pub fn get(&self, id: &str) -> Option<&(Rc<str>, SentTo)> {
        self.by_id.get(id)
    }
}

/// The shard that minted a client-sent event id `<epoch>-<shard>-<n>`.
pub fn minting_shard(id: &str, n_shards: usize) -> Option<usize> {
    let mut parts = id.split('-');
    let (_epoch, shard, _n) = (parts.next()?, parts.next()?, parts.next()?);
    let shard: usize = shard.parse().ok()?;
    (parts.next().is_none() && shard < n_shards).then_some(shard)
}

/// Typing indicators a connection may send per topic: one `start` per this many
/// milliseconds (a `stop` always goes through, and so does a change of state).
const TYPING_INTERVAL_MS: u32 = 1_000;

impl Shard {
    /// Remembers a client-sent event for receipts.
    pub fn record_sent(&self, id: &str, from: Rc<str>, to: SentTo) {
        self.sent.borrow_mut().record(id, from, to);
    }

    /// A typing indicator from connection `key` of `customer` in `topic`: sent to every
    /// shard's subscribers of the topic but the customer's own connections. Returns false
    /// when throttled (nothing sent).
    pub fn send_typing(&self, key: ConnKey, customer: &str, topic: &str, start: bool) -> bool {
        let now_ms = self.shared.started.elapsed().as_millis() as u32;
        {
            let mut seen = self.typing_seen.borrow_mut();
            let k = (key, ahash_str(topic));
            if let Some(&(was_start, at)) = seen.get(&k) {
                if start && was_start && now_ms.wrapping_sub(at) < TYPING_INTERVAL_MS {
                    self.metrics().typing_throttled.fetch_add(1, Relaxed);
                    return false;
                }
            }
            if seen.len() >= 4096 {
                // Bounded: forget indicators older than the interval.
                seen.retain(|_, (_, at)| now_ms.wrapping_sub(*at) < TYPING_INTERVAL_MS);
            }
            seen.insert(k, (start, now_ms));
        }
        self.ephemeral(
            topic,
            customer,
            "typing",
            &proto::client::typing(customer, start),
        );
        true
    }

    /// Sends an ephemeral event (`{"type": kind, "topic", "data"}`, SSE `event: kind`) to
    /// the subscribers of `topic`, except the connections of `except`: through the topic's
    /// owner, which knows the shards with subscribers (so an event nobody follows, such as
    /// most `presence:<customer>` announcements, costs one message), in order with the
    /// topic's other events.
    pub(super) fn ephemeral(
        &self,
        topic: &str,
        except: &str,
        kind: &str,
        data: &serde_json::Value,
    ) {
        let (ws, sse) = proto::client::ephemeral(kind, topic, data);
        let payload = Payload {
            ws: server_frame(OpCode::Text, &ws),
            sse: Bytes::from(sse),
        };
        self.broker.ephemeral(self, topic, except, payload);
    }

    /// Delivers an ephemeral frame to local subscribers of `topic` but `except`'s connections
    /// (run by the fan-out task, which flushes after it).
    pub(super) fn handle_ephemeral(&self, topic: &str, except: &str, payload: &Payload) {
        let Some(subs) = self.local.borrow().subscribers(topic) else {
            return;
        };
        {
            let mut conns = self.conns.borrow_mut();
            for &key in subs.iter() {
                let Some(c) = conns.get(key) else { continue };
                if &*c.customer == except {
                    continue;
                }
                let frame = if c.life.is_sse() {
                    &payload.sse
                } else {
                    &payload.ws
                };
                if self.enqueue(&mut conns, key, frame, None) {
                    self.metrics().ephemeral_out.fetch_add(1, Relaxed);
                }
            }
        }
    }

    /// The recipient's side of a direct message (see `Broker::direct`): delivered if the
    /// recipient follows one of the sender's `topics`, else reported `forbidden`.
    pub(super) fn handle_direct(
        &self,
        to: String,
        topics: &[String],
        event: Event,
        origin: usize,
        req: u64,
        published: Option<Instant>,
    ) {
        if self.follows_any(&to, topics) {
            self.queue_job(Job::Customers {
                seq: 0,
                customers: vec![to],
                event,
                origin,
                req,
                published,
            });
        } else {
            let counts = Counts {
                forbidden: 1,
                ..Counts::default()
            };
            self.report(origin, req, counts, None);
        }
    }

    /// Whether a connection of `customer` (owned here) follows one of `topics`.
    pub(crate) fn follows_any(&self, customer: &str, topics: &[String]) -> bool {
        let conns = self.conns.borrow();
        let local = self.local.borrow();
        topics.iter().any(|t| {
            local.subscribers(t).is_some_and(|subs| {
                subs.iter()
                    .any(|k| conns.get(*k).is_some_and(|c| *c.customer == *customer))
            })
        })
    }

    /// Tells the senders: `message_delivered` / `message_read` with `{id, by}` (and the topic
    /// for a topic message). Only a recipient's receipt counts: the customer a direct message
    /// went to, or a member of the topic; receipts for forgotten ids are dropped.
    pub(super) fn handle_receipts(
        &self,
        ids: &[String],
        by: &str,
        status: ReceiptStatus,
        topics: &[String],
    ) {
        let mut out: Vec<(Rc<str>, Bytes)> = Vec::new();
        {
            let sent = self.sent.borrow();
            for id in ids {
                let Some((from, to)) = sent.get(id) else {
                    continue;
                };
                if **from == *by {
                    continue;
                }
                let topic = match to {
                    SentTo::Customer(c) if c == by => None,
                    SentTo::Topic(t) if topics.iter().any(|m| m == t) => Some(t.as_str()),
                    _ => continue,
                };
                let now = humantime::format_rfc3339_millis(std::time::SystemTime::now());
                let json = receipt(status, id, by, topic, &now.to_string());
                out.push((from.clone(), server_frame(OpCode::Text, &json)));
            }
        }
        if out.is_empty() {
            return;
        }
        self.metrics().receipts.fetch_add(out.len() as u64, Relaxed);
        {
            let mut conns = self.conns.borrow_mut();
            let registry = self.registry.borrow();
            for (from, frame) in &out {
                for &key in registry.of_customer(from) {
                    if conns.get(key).is_some_and(|c| !c.life.is_sse()) {
                        self.enqueue(&mut conns, key, frame, None);
                    }
                }
            }
        }
    }
}

fn ahash_str(s: &str) -> u64 {
    ahash::RandomState::with_seeds(1, 2, 3, 4).hash_one(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_name_their_minting_shard() {
        assert_eq!(minting_shard("1a2b3c-1-42", 2), Some(1));
        assert_eq!(minting_shard("1a2b3c-2-42", 2), None);
        assert_eq!(minting_shard("publisher-chosen", 2), None);
        assert_eq!(minting_shard("a-0-1-2", 2), None);
    }

    #[test]
    fn the_log_is_bounded() {
        let mut log = SentLog::new(2);
        for i in 0..3 {
            log.record(
                &format!("e-0-{i}"),
                Rc::from("a"),
                SentTo::Topic("t".into()),
            );
        }
        assert!(log.get("e-0-0").is_none());
        assert!(log.get("e-0-2").is_some());
    }
}
