//! The subscriber side of topics on one shard: which local connections follow each topic, and
//! the subscriptions waiting for their topic owner's answer. A plain struct with no executor
//! inside; the shard sends the mesh messages its answers call for.
//!
//! A shard is interested in a topic (the owner sends it the topic's events) while the topic has
//! a live subscriber here or a subscription waiting for the owner: the interest is announced
//! by every subscription request and withdrawn when the last of both is gone.

use std::rc::Rc;

use ahash::AHashMap;

use super::{slab::ConnKey, Subscribers};

/// The local subscribers of one topic.
#[derive(Default)]
struct Topic {
    /// Subscribers receiving live events (copy-on-write: a fan-out iterates a snapshot).
    subs: Subscribers,
    /// Subscriptions waiting for the owner's answer.
    pending: u32,
}

/// A subscription waiting for its owner's answer, with what the asker waits on.
pub struct Waiting<T> {
    /// The connection subscribing.
    pub key: ConnKey,
    /// The topic (interned).
    pub topic: Rc<str>,
    /// Whatever the asker is told the answer through.
    pub reply: T,
}

/// The topics followed on one shard. `T` is how an asker is told its answer (a oneshot
/// sender in the engine, anything in a test).
pub struct LocalTopics<T> {
    topics: AHashMap<Rc<str>, Topic>,
    waiting: AHashMap<u64, Waiting<T>>,
}

impl<T> Default for LocalTopics<T> {
    fn default() -> Self {
        LocalTopics {
            topics: AHashMap::new(),
            waiting: AHashMap::new(),
        }
    }
}

impl<T> LocalTopics<T> {
    /// Records subscription `req` of `key` to `topic`, now waiting for the owner; returns the
    /// interned topic name.
    pub fn request(&mut self, req: u64, key: ConnKey, topic: &str, reply: T) -> Rc<str> {
        let name = match self.topics.get_key_value(topic) {
            Some((name, _)) => name.clone(),
            None => {
                let name: Rc<str> = Rc::from(topic);
                self.topics.insert(name.clone(), Topic::default());
                name
            }
        };
        self.topics.get_mut(topic).expect("just ensured").pending += 1;
        self.waiting.insert(
            req,
            Waiting {
                key,
                topic: name.clone(),
                reply,
            },
        );
        name
    }

    /// The owner answered `req`: the waiting subscription, if it is still known.
    pub fn answered(&mut self, req: u64) -> Option<Waiting<T>> {
        self.waiting.remove(&req)
    }

    /// Ends an answered subscription: `join` adds the connection to the live list (it is
    /// alive and the owner admitted it). True when the shard must now withdraw its interest
    /// (nothing follows the topic here any more).
    pub fn settle(&mut self, topic: &str, key: ConnKey, join: bool) -> bool {
        let Some(t) = self.topics.get_mut(topic) else {
            return false;
        };
        t.pending -= 1;
        if join {
            Rc::make_mut(&mut t.subs).push(key);
        }
        self.forget_if_unfollowed(topic)
    }

    /// Removes a live subscriber. True when the shard must now withdraw its interest.
    pub fn leave(&mut self, topic: &str, key: ConnKey) -> bool {
        let Some(t) = self.topics.get_mut(topic) else {
            return false;
        };
        Rc::make_mut(&mut t.subs).retain(|k| *k != key);
        self.forget_if_unfollowed(topic)
    }

    fn forget_if_unfollowed(&mut self, topic: &str) -> bool {
        let unfollowed = self
            .topics
            .get(topic)
            .is_some_and(|t| t.subs.is_empty() && t.pending == 0);
        if unfollowed {
            self.topics.remove(topic);
        }
        unfollowed
    }

    /// A snapshot of the live subscribers of `topic`.
    pub fn subscribers(&self, topic: &str) -> Option<Subscribers> {
        self.topics.get(topic).map(|t| t.subs.clone())
    }

    /// Gives back the table's memory after a burst of made-up names.
    pub fn shrink(&mut self) {
        if self.topics.capacity() > 64 && self.topics.capacity() > 4 * self.topics.len() {
            self.topics.shrink_to_fit();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: u32) -> ConnKey {
        ConnKey::from_bits(u64::from(i))
    }

    #[test]
    fn interest_lasts_while_a_subscriber_or_a_pending_subscription_remains() {
        let mut l: LocalTopics<()> = LocalTopics::default();
        l.request(1, key(1), "t", ());
        l.request(2, key(2), "t", ());
        let w = l.answered(1).unwrap();
        assert!(!l.settle(&w.topic, w.key, true), "one live, one pending");
        assert_eq!(l.subscribers("t").unwrap().as_slice(), [key(1)]);
        assert!(!l.leave("t", key(1)), "request 2 still pending");
        let w = l.answered(2).unwrap();
        assert!(
            l.settle(&w.topic, w.key, false),
            "refused (full or gone): withdraw"
        );
        assert!(l.subscribers("t").is_none());
        assert!(l.answered(2).is_none(), "answered once");
    }

    #[test]
    fn the_last_subscriber_leaving_withdraws() {
        let mut l: LocalTopics<()> = LocalTopics::default();
        for (req, k) in [(1, 1), (2, 2)] {
            l.request(req, key(k), "t", ());
            let w = l.answered(req).unwrap();
            assert!(!l.settle(&w.topic, w.key, true));
        }
        assert!(!l.leave("t", key(1)));
        assert!(!l.leave("u", key(1)), "unknown topic: nothing to withdraw");
        assert!(l.leave("t", key(2)));
        assert!(!l.leave("t", key(2)), "withdrawn once");
    }

    #[test]
    fn a_snapshot_is_unaffected_by_later_changes() {
        let mut l: LocalTopics<()> = LocalTopics::default();
        l.request(1, key(1), "t", ());
        let w = l.answered(1).unwrap();
        l.settle(&w.topic, w.key, true);
        let snap = l.subscribers("t").unwrap();
        l.request(2, key(2), "t", ());
        let w = l.answered(2).unwrap();
        l.settle(&w.topic, w.key, true);
        assert_eq!(snap.as_slice(), [key(1)]);
        assert_eq!(l.subscribers("t").unwrap().as_slice(), [key(1), key(2)]);
    }
}
