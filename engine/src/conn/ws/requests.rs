//! The client protocol's requests on an upgraded connection.

use proto::error::Code;
use std::rc::Rc;

use proto::{
    api::Publish,
    client::{self, ClientError, ClientMessage, Request, TopicPosition},
    event::{validate_topic, validate_type, Event, Priority},
};

use super::{
    now_rfc3339,
    session::{Grants, Session},
};
use crate::shard::{chat::SentTo, Joined, Shard};

/// Where a client-sent event goes.
enum ClientTarget {
    Topic(String),
    Customer(String),
}

impl Session {
    pub(super) async fn handle_request(&mut self, shard: &Rc<Shard>, msg: ClientMessage) {
        let rid = msg.request_id.as_deref();
        let error = |code: proto::error::Code, message: String, kind: &str| ClientError {
            code,
            message,
            received_type: Some(kind.to_owned()),
            request_id: msg.request_id.clone(),
        };
        match msg.request {
            Request::Ping => self.reply(shard, &client::Reply::Pong.encode(rid, &now_rfc3339())),
            Request::Subscribe {
                topics,
                events,
                since,
                last,
            } => {
                if let Some(e) = topics.iter().find_map(|t| validate_topic(t).err()) {
                    return self.reply(shard, &error(e.code, e.message, "subscribe").to_json());
                }
                let config = &shard.shared.config;
                if let Some(why) = topics
                    .iter()
                    .find_map(|t| self.grants.subscribe_refusal(config, t))
                {
                    return self.reply(shard, &error(Code::Forbidden, why, "subscribe").to_json());
                }
                // Per-connection bounds, checked before anything changes (all or nothing).
                let topic_cap = config.limits.topics_per_connection;
                let held: ahash::AHashSet<&str> = self.topics.iter().map(|t| &**t).collect();
                let new_topics: ahash::AHashSet<&str> = topics
                    .iter()
                    .map(String::as_str)
                    .filter(|t| !held.contains(t))
                    .collect();
                if topic_cap > 0 && held.len() + new_topics.len() > topic_cap {
                    let why = format!("a connection may subscribe to at most {topic_cap} topics");
                    return self.reply(
                        shard,
                        &error(Code::TooManyTopics, why, "subscribe").to_json(),
                    );
                }
                let filters_now = shard
                    .conns
                    .borrow()
                    .get(self.key)
                    .map(|c| merge_filters(&c.filters, &events));
                let filter_cap = config.limits.filters_per_connection;
                if filters_now
                    .as_ref()
                    .is_some_and(|f| filter_cap > 0 && f.len() > filter_cap)
                {
                    let why =
                        format!("a connection may filter on at most {filter_cap} event types");
                    return self.reply(
                        shard,
                        &error(Code::TooManyFilters, why, "subscribe").to_json(),
                    );
                }
                let mut positions = Vec::with_capacity(topics.len());
                let mut timed_out = Vec::new();
                let mut full = Vec::new();
                // Topics already held answer at once; the others are asked of their owners
                // together (one wait, not one per owner), with the connection's frames held
                // so the confirmation precedes every live event.
                let mut joining: Vec<(&str, Option<_>, u32)> = Vec::new();
                let mut already = Vec::with_capacity(topics.len());
                for (i, topic) in topics.iter().enumerate() {
                    // A topic held, or named twice in this request: nothing more to ask.
                    let known =
                        self.topics.iter().any(|t| **t == **topic) || topics[..i].contains(topic);
                    already.push(known);
                    if known {
                        continue;
                    }
                    let from = since
                        .iter()
                        .find(|(t, _)| t == topic)
                        .map(|(_, p)| p.clone());
                    let last = last.unwrap_or_else(|| {
                        shard.shared.config.namespace(topic).join_history as u32
                    });
                    joining.push((topic.as_str(), from, last));
                }
                let holding = !joining.is_empty();
                if holding {
                    shard.hold(self.key);
                }
                let mut answers = shard
                    .subscribe_topics(self.key, &joining, &self.grants.customer)
                    .await
                    .into_iter();
                drop(joining);
                for (topic, known) in topics.into_iter().zip(already) {
                    if known {
                        // Already subscribed: nothing to replay, the live stream continues.
                        positions.push(TopicPosition {
                            topic,
                            offset: 0,
                            epoch: shard.shared.epoch.clone(),
                            recovered: true,
                        });
                        continue;
                    }
                    let (name, joined) = answers.next().expect("one answer per topic asked");
                    if joined == Joined::Full {
                        full.push(topic);
                        continue;
                    }
                    // Exact growth: most connections hold one or two topics. Kept even when
                    // the owner was slow: the subscription completes when it answers.
                    self.topics.reserve_exact(1);
                    self.topics.push(name);
                    shard.membership(&topic, &self.grants.customer, true);
                    match joined {
                        Joined::Yes(offset, epoch, recovered) => positions.push(TopicPosition {
                            topic,
                            offset,
                            epoch,
                            recovered,
                        }),
                        _ => timed_out.push(topic),
                    }
                }
                if !full.is_empty() {
                    let e = error(
                        Code::TopicFull,
                        format!("{} has its maximum of subscribers", full.join(", ")),
                        "subscribe",
                    );
                    self.reply(shard, &e.to_json());
                }
                if !timed_out.is_empty() {
                    let e = error(
                        Code::Timeout,
                        format!(
                            "the owner of {} did not answer in time; the subscription \
                             completes when it does",
                            timed_out.join(", ")
                        ),
                        "subscribe",
                    );
                    self.reply(shard, &e.to_json());
                }
                let mut filters = Vec::new();
                if let (Some(c), Some(merged)) =
                    (shard.conns.borrow_mut().get_mut(self.key), filters_now)
                {
                    c.filters = merged;
                    filters = c
                        .filters
                        .iter()
                        .map(|f| {
                            if f.is_empty() {
                                "all".to_owned()
                            } else {
                                f.to_string()
                            }
                        })
                        .collect();
                }
                let confirmed =
                    client::subscription_reply("subscription_confirmed", &positions, &filters, rid);
                if holding {
                    let frame = proto::ws::server_frame(proto::ws::OpCode::Text, &confirmed);
                    shard.confirm(self.key, &frame);
                } else {
                    self.reply(shard, &confirmed);
                }
            }
            Request::Unsubscribe { topics, events } => {
                for topic in &topics {
                    if let Some(i) = self.topics.iter().position(|t| **t == **topic) {
                        let t = self.topics.swap_remove(i);
                        shard.membership(&t, &self.grants.customer, false);
                        shard.remove_subscriber(&t, self.key);
                    }
                }
                let mut filters = Vec::new();
                if let Some(c) = shard.conns.borrow_mut().get_mut(self.key) {
                    let mut v = std::mem::take(&mut c.filters).into_vec();
                    v.retain(|f| {
                        !events
                            .iter()
                            .any(|e| **f == **e || (f.is_empty() && e == "all"))
                    });
                    c.filters = v.into_boxed_slice();
                    filters = c.filters.iter().map(|f| f.to_string()).collect();
                }
                let remaining: Vec<TopicPosition> = self
                    .topics
                    .iter()
                    .map(|t| TopicPosition {
                        topic: t.to_string(),
                        offset: 0,
                        epoch: shard.shared.epoch.clone(),
                        recovered: true,
                    })
                    .collect();
                self.reply(
                    shard,
                    &client::subscription_reply("unsubscribed", &remaining, &filters, rid),
                );
            }
            Request::Publish { topic, kind, data } => {
                if let Err(e) = validate_topic(&topic).and_then(|_| validate_type(&kind)) {
                    return self.reply(shard, &error(e.code, e.message, "publish").to_json());
                }
                let ns = shard.shared.config.namespace(&topic);
                if !ns.client_publish {
                    let why = format!("clients may not publish to topics under {:?}", ns.prefix);
                    return self.reply(shard, &error(Code::Forbidden, why, "publish").to_json());
                }
                if !Grants::may(&self.grants.publish, &topic) {
                    return self.reply(
                        shard,
                        &error(
                            Code::Forbidden,
                            format!("token does not allow publishing to {topic}"),
                            "publish",
                        )
                        .to_json(),
                    );
                }
                self.publish_from_client(shard, kind, data, ClientTarget::Topic(topic), rid)
                    .await;
            }
            Request::SendMessage { to, kind, data } => {
                if let Err(e) = validate_type(&kind) {
                    return self.reply(shard, &error(e.code, e.message, "send_message").to_json());
                }
                if to.is_empty() || *to == *self.grants.customer {
                    let e = error(
                        Code::BadRequest,
                        "send_message needs another customer in payload.to".into(),
                        "send_message",
                    );
                    return self.reply(shard, &e.to_json());
                }
                if Grants::may(&self.grants.message, &to) {
                    self.publish_from_client(shard, kind, data, ClientTarget::Customer(to), rid)
                        .await;
                    return;
                }
                // No grant: allowed only between members of a common topic, which the
                // recipient's owner shard checks.
                let forbidden = || {
                    error(
                        Code::Forbidden,
                        format!("token does not allow messaging {to}, and you share no topic"),
                        "send_message",
                    )
                    .to_json()
                };
                if self.topics.is_empty() {
                    shard
                        .metrics()
                        .direct_forbidden
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    return self.reply(shard, &forbidden());
                }
                let event = self.client_event(shard, kind, data);
                let id = event.id.clone();
                let topics = self.topics.iter().map(|t| t.to_string()).collect();
                let counts = shard.broker.direct(shard, &to, topics, event).await;
                if counts.forbidden > 0 {
                    shard
                        .metrics()
                        .direct_forbidden
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    return self.reply(shard, &forbidden());
                }
                shard.record_sent(
                    &id,
                    self.grants.customer.clone(),
                    SentTo::Customer(to.clone()),
                );
                self.reply(
                    shard,
                    &client::Reply::Sent { id: &id, to: &to }.encode(rid, &now_rfc3339()),
                );
            }
            Request::UpdatePreferences(update) => {
                let reply = {
                    let mut all = shard.preferences.borrow_mut();
                    let p = all.update(&self.grants.customer, update);
                    client::Reply::PreferencesUpdated(p).encode(rid, &now_rfc3339())
                };
                self.reply(shard, &reply);
            }
            Request::Presence { status } => {
                shard.broker.status(shard, &self.grants.customer, status);
                if rid.is_some() {
                    self.reply(
                        shard,
                        &client::Reply::PresenceSet(status).encode(rid, &now_rfc3339()),
                    );
                }
            }
            Request::Typing { topic, start } => {
                if let Err(e) = validate_topic(&topic) {
                    return self.reply(shard, &error(e.code, e.message, "typing").to_json());
                }
                if !self.topics.iter().any(|t| **t == *topic) {
                    let e = error(
                        Code::NotMember,
                        format!("subscribe to {topic} before typing in it"),
                        "typing",
                    );
                    return self.reply(shard, &e.to_json());
                }
                // Ephemeral: no reply unless asked for one (a requestId).
                let sent = shard.send_typing(self.key, &self.grants.customer, &topic, start);
                if rid.is_some() {
                    self.reply(
                        shard,
                        &client::Reply::TypingSent {
                            topic: &topic,
                            throttled: !sent,
                        }
                        .encode(rid, &now_rfc3339()),
                    );
                }
            }
            Request::Ack {
                ids,
                cursors,
                up_to,
                status,
            } => {
                if !ids.is_empty() {
                    // Receipts for client-sent messages among the ids (other ids are the
                    // customer's stored events, acknowledged below).
                    let topics = self.topics.iter().map(|t| t.to_string()).collect();
                    shard
                        .broker
                        .receipts(shard, &ids, &self.grants.customer, status, topics);
                }
                let customer = &self.grants.customer;
                let acked = (shard.broker)
                    .ack(shard, customer, &ids, &cursors, up_to.as_deref())
                    .await;
                if rid.is_some() {
                    self.reply(
                        shard,
                        &client::Reply::Acked(acked).encode(rid, &now_rfc3339()),
                    );
                }
            }
        }
    }

    /// Routes an event a client sent (its token allowed it) and acknowledges it with the
    /// event id: `published` for a topic, `sent` for a customer. Fire and forget: the client is
    /// not made to wait for the fan-out.
    async fn publish_from_client(
        &self,
        shard: &Rc<Shard>,
        kind: String,
        data: String,
        target: ClientTarget,
        rid: Option<&str>,
    ) {
        let event = self.client_event(shard, kind, data);
        let id = event.id.clone();
        let (customers, topics) = match &target {
            ClientTarget::Topic(t) => (vec![], vec![t.clone()]),
            ClientTarget::Customer(c) => (vec![c.clone()], vec![]),
        };
        let p = Publish {
            customers,
            topics,
            roles: vec![],
            broadcast: false,
            event,
        };
        shard.record_sent(
            &id,
            self.grants.customer.clone(),
            match &target {
                ClientTarget::Topic(t) => SentTo::Topic(t.clone()),
                ClientTarget::Customer(c) => SentTo::Customer(c.clone()),
            },
        );
        if let Err(e) = shard.broker.publish(shard, &p, None).await {
            let op = match &target {
                ClientTarget::Topic(_) => "publish",
                ClientTarget::Customer(_) => "send_message",
            };
            let e = ClientError {
                code: Code::Unavailable,
                message: format!("not published: {}", e.0),
                received_type: Some(op.to_owned()),
                request_id: rid.map(str::to_owned),
            };
            return self.reply(shard, &e.to_json());
        }
        let reply = match &target {
            ClientTarget::Topic(topic) => client::Reply::Published { id: &id, topic },
            ClientTarget::Customer(to) => client::Reply::Sent { id: &id, to },
        };
        self.reply(shard, &reply.encode(rid, &now_rfc3339()));
    }

    fn client_event(&self, shard: &Shard, kind: String, data: String) -> Event {
        Event {
            id: shard.next_conn_id(),
            kind,
            data,
            priority: Priority::Normal,
            persistent: false,
            ttl: None,
            timestamp: now_rfc3339(),
            from: Some(self.grants.customer.to_string()),
            idempotent: false,
        }
    }
}

/// A connection's event-type filters with `events` added (`all` and `*` as the empty
/// prefix), each once, in order: linear in their number (a set, not a scan per prefix).
fn merge_filters(current: &[Box<str>], events: &[String]) -> Box<[Box<str>]> {
    let mut seen: ahash::AHashSet<&str> = current.iter().map(|f| &**f).collect();
    let mut out: Vec<Box<str>> = current.to_vec();
    for e in events {
        let prefix = if e == "all" || e == "*" {
            ""
        } else {
            e.as_str()
        };
        if seen.insert(prefix) {
            out.push(prefix.into());
        }
    }
    out.into_boxed_slice()
}
