//! Messages between shards (and, later, between nodes), rkyv-encoded.
//!
//! A [`ShardMsg`] is encoded with [`encode`] into an aligned buffer and read on the other side
//! with [`access`] without deserialising. Frame payloads never go through rkyv: the engine sends
//! the shared `Bytes` of an encoded frame beside the message, so a fan-out to N shards copies
//! no payload.

use rkyv::{rancor, util::AlignedVec, Archive, Deserialize, Serialize};

use crate::event::Event;

/// A cross-shard message. (A connection moving to its owner shard is process-local and
/// never encoded: see the engine's `Envelope::Handoff`.)
#[derive(Debug, Clone, PartialEq, Eq, Archive, Serialize, Deserialize)]
pub enum ShardMsg {
    /// To a topic's owner: `from` gained (`on`) or lost its last (`!on`) local subscriber.
    /// A subscription (`on` with `req`) is answered with [`ShardMsg::InterestAck`].
    Interest {
        /// The topic.
        topic: String,
        /// The shard whose interest changed.
        from: u32,
        /// Gained (true) or lost (false).
        on: bool,
        /// Request id for the [`ShardMsg::InterestAck`] (0: no ack wanted).
        req: u64,
        /// The subscriber's last known position, to replay what it missed.
        since: Option<Position>,
        /// Without `since`: replay this many of the latest kept events ("last messages on
        /// join").
        last: u32,
        /// The subscribing customer, for topics whose owner counts members (presence or a
        /// subscriber cap); empty otherwise.
        member: String,
    },
    /// From a topic's owner: interest registered; events after `offset` will be delivered.
    /// Travels the same channel as the owner's deliveries, so the subscriber shard processes
    /// it exactly between the events it must not see live and those it must.
    InterestAck {
        /// The request id of the `Interest`.
        req: u64,
        /// The topic's last offset.
        offset: u64,
        /// The topic's history epoch.
        epoch: String,
        /// Whether every event after `since` could be replayed.
        recovered: bool,
        /// The missed events, in order, as client JSON (recovery only; rare).
        replay: Vec<Vec<u8>>,
        /// Refused: the topic has its namespace's `max_subscribers`.
        full: bool,
    },
    /// To a topic's owner: publish `event`; the owner assigns the offset, encodes the frame once
    /// and forwards it to the interested shards.
    PublishTopic {
        /// The topic.
        topic: String,
        /// The event.
        event: Event,
        /// Shard awaiting the delivery report.
        origin: u32,
        /// Request id of the report.
        req: u64,
        /// The origin waits for the deliveries' reports too (`wait: delivered`), not only
        /// for the owner's.
        deliveries: bool,
    },
    /// To a customer's owner shard: the event for these customers' own streams. The owner
    /// assigns each customer's offset and encodes the event once per customer (the cursor
    /// differs), keeps persistent events until acknowledged.
    DeliverCustomers {
        /// Customers owned by the receiving shard.
        customers: Vec<String>,
        /// The event.
        event: Event,
        /// Shard awaiting the delivery report.
        origin: u32,
        /// Request id of the report.
        req: u64,
        /// Cluster mode: the event's sequence in the offline-queue stream (its offset in
        /// the customer's stream); 0 when it has none (one process, or not persistent).
        seq: u64,
    },
    /// Deliver the frames sent beside this message to local receivers.
    Deliver {
        /// Who receives it.
        target: Target,
        /// Event type (for the customer stream's type-prefix filters).
        kind: String,
        /// Event id (deduplication of publisher-chosen ids).
        id: String,
        /// The publisher chose the id.
        idempotent: bool,
        /// Shard awaiting the delivery report.
        origin: u32,
        /// Request id of the report.
        req: u64,
    },
    /// Close these customers' connections (backend `POST /v1/disconnect`).
    Disconnect {
        /// Customers owned by the receiving shard.
        customers: Vec<String>,
        /// WebSocket close code.
        code: u16,
        /// Shard awaiting the report.
        origin: u32,
        /// Request id of the report (`counts.dropped` carries connections closed).
        req: u64,
    },
    /// To the recipient's owner shard: a message a client sent another customer without a
    /// token grant for it; delivered only if the recipient is subscribed to one of `topics`
    /// (the sender's), else reported back as `forbidden`.
    Direct {
        /// The recipient (owned by the receiving shard).
        to: String,
        /// The sender's topics.
        topics: Vec<String>,
        /// The event (with `from`).
        event: Event,
        /// Shard awaiting the report.
        origin: u32,
        /// Request id of the report.
        req: u64,
    },
    /// An ephemeral event for `topic` (typing, presence: never stored, no offset), its frame
    /// sent beside this message. To the topic's owner (`forward`): pass it on to the shards
    /// with subscribers, none if there are none. To those shards: deliver it to the local
    /// subscribers, except the connections of customer `except`.
    Ephemeral {
        /// The topic.
        topic: String,
        /// The sender, who does not get its own event.
        except: String,
        /// Sent to the topic's owner, which forwards it.
        forward: bool,
    },
    /// To the shard that minted the ids (the senders' owner): `by` received or read these
    /// client-sent messages; it tells their senders.
    Receipts {
        /// Ids of client-sent events (`<epoch>-<shard>-<n>`).
        ids: Vec<String>,
        /// The customer who acknowledged them.
        by: String,
        /// Delivered or read.
        status: crate::client::ReceiptStatus,
        /// The acknowledging connection's topics (a topic message's receipt must come from a
        /// member).
        topics: Vec<String>,
    },
    /// To a presence topic's owner: `customer` opened (`joined`) or closed a subscription.
    Membership {
        /// The topic.
        topic: String,
        /// The member.
        customer: String,
        /// Subscribed (true) or gone (false).
        joined: bool,
    },
    /// Delivery report to the origin of a publish.
    Report {
        /// Request id.
        req: u64,
        /// What this shard did.
        counts: Counts,
        /// `Some(n)`: a topic owner's report; it forwarded the event to `n` shards, whose own
        /// reports the origin must now wait for. `None`: a shard that delivered.
        forwarded: Option<u32>,
        /// A topic owner's report: the offset it gave the event.
        offset: Option<TopicOffset>,
    },
}

/// The offset a topic's owner gave an event.
#[derive(Debug, Clone, PartialEq, Eq, Archive, Serialize, Deserialize)]
pub struct TopicOffset {
    /// The topic.
    pub topic: String,
    /// The event's offset in it.
    pub offset: u64,
}

/// A position in a topic: the last offset seen in an epoch.
#[derive(Debug, Clone, PartialEq, Eq, Archive, Serialize, Deserialize)]
pub struct Position {
    /// Last offset received.
    pub offset: u64,
    /// The epoch it belongs to.
    pub epoch: String,
}

/// What the receivers of a publish got, summed over shards into the API's response.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Archive, Serialize, Deserialize)]
pub struct Counts {
    /// Frames queued to WebSocket connections.
    pub websocket: u64,
    /// Records queued to SSE streams.
    pub sse: u64,
    /// Events handed to waiting long-poll requests.
    pub poll: u64,
    /// Persistent events stored for customers with no connection that takes them.
    pub queued: u64,
    /// Receivers skipped (slow consumers), offline customers of non-persistent events, expired.
    pub dropped: u64,
    /// Targets that had already received this publisher-chosen id inside the dedupe window.
    pub duplicates: u64,
    /// Direct messages refused by policy (the sender shares no topic with the recipient).
    pub forbidden: u64,
    /// Customers whose preferences switch this event type off (`update_preferences`).
    pub declined: u64,
}

impl Counts {
    /// Counts one connection of either transport.
    pub fn connection(&mut self, sse: bool) {
        if sse {
            self.sse += 1;
        } else {
            self.websocket += 1;
        }
    }

    /// Adds another report.
    pub fn add(&mut self, o: &Counts) {
        self.websocket += o.websocket;
        self.sse += o.sse;
        self.poll += o.poll;
        self.queued += o.queued;
        self.dropped += o.dropped;
        self.duplicates += o.duplicates;
        self.forbidden += o.forbidden;
        self.declined += o.declined;
    }
}

/// Receivers of a [`ShardMsg::Deliver`].
#[derive(Debug, Clone, PartialEq, Eq, Archive, Serialize, Deserialize)]
pub enum Target {
    /// Local subscribers of a topic.
    Topic(String),
    /// Local connections whose token has this role.
    Role(String),
    /// Every local connection.
    Broadcast,
}

/// Encodes a message.
pub fn encode(msg: &ShardMsg) -> AlignedVec {
    rkyv::to_bytes::<rancor::Error>(msg)
        .expect("serialising owned strings and integers cannot fail")
}

/// Validates and accesses an encoded message in place.
pub fn access(bytes: &[u8]) -> Result<&ArchivedShardMsg, rancor::Error> {
    rkyv::access::<ArchivedShardMsg, rancor::Error>(bytes)
}

/// Deserialises an archived message (for the rare messages that are kept).
pub fn to_owned(archived: &ArchivedShardMsg) -> ShardMsg {
    rkyv::deserialize::<ShardMsg, rancor::Error>(archived)
        .expect("a validated archive deserialises")
}

/// A message between nodes (over NATS in cluster mode).
#[derive(Debug, Clone, PartialEq, Eq, Archive, Serialize, Deserialize)]
pub enum NodeMsg {
    /// A node is alive (sent every `nats.heartbeat_ms`); a node not heard from for
    /// `nats.node_timeout_ms` is taken as gone.
    Heartbeat {
        /// The sender's `broker.node_id`.
        node: String,
        /// The sender is draining: it is leaving and takes no new connections.
        draining: bool,
    },
    /// A node leaves now (a drain's end): forget it without waiting for the timeout.
    Leaving {
        /// The sender's `broker.node_id`.
        node: String,
    },
    /// A shard message routed to another node.
    Shard(ShardMsg),
    /// An event published to a topic: what a node writes to the topic's history subject
    /// (`<prefix>.h.<topic>`), and what every node serving the topic receives, republished
    /// with its stream sequence (the topic offset), on `<prefix>.t.<topic>`.
    TopicEvent {
        /// The topic.
        topic: String,
        /// The event.
        event: Event,
    },
    /// An event for role members or everyone, to every node (`<prefix>.all`).
    Fanout {
        /// The node that took the publish (it has delivered to its own clients).
        origin: String,
        /// Roles and/or broadcast.
        targets: Vec<Target>,
        /// The event.
        event: Event,
    },
    /// An event for a customer: stored in the queue stream (`<prefix>.q.<customer>`), and
    /// sent to the inbox (`<prefix>.n.<node>`) of each node where the customer is connected.
    Customer {
        /// The node that took the publish.
        origin: String,
        /// The customer.
        customer: String,
        /// The event.
        event: Event,
        /// Its sequence in the queue stream (0: not persistent, not stored).
        seq: u64,
    },
    /// Close every connection of `customers` (`POST /v1/disconnect`), to every node.
    Disconnect {
        /// The node that took the request.
        origin: String,
        /// The customers.
        customers: Vec<String>,
        /// The close code.
        code: u16,
    },
    /// An ephemeral event (typing, presence) for a topic's subscribers on other nodes, on the
    /// topic's live subject (without a stream sequence: never stored).
    Ephemeral {
        /// The node it comes from (its own subscribers have it).
        origin: String,
        /// The topic.
        topic: String,
        /// The customer whose connections skip it (the typist).
        except: String,
        /// The WebSocket frame.
        ws: Vec<u8>,
        /// The SSE record.
        sse: Vec<u8>,
    },
    /// A client's message to `to` allowed only if `to` follows one of `topics` (no token
    /// grant): a request to the inbox of a node where `to` is connected, answered by it.
    Direct {
        /// The recipient.
        to: String,
        /// The sender's topics.
        topics: Vec<String>,
        /// The event.
        event: Event,
    },
    /// The answer to a [`NodeMsg::Direct`].
    DirectAnswer {
        /// The recipient follows one of the topics: the message was delivered.
        allowed: bool,
    },
    /// Receipts for client-sent events, to every node (`<prefix>.all`): the node that minted
    /// an id (its epoch starts the id) tells the sender.
    Receipts {
        /// The node that took the receipt.
        origin: String,
        /// Event ids.
        ids: Vec<String>,
        /// The customer acknowledging.
        by: String,
        /// Delivered or read.
        status: crate::client::ReceiptStatus,
        /// The topics the acknowledging connection follows.
        topics: Vec<String>,
    },
    /// How many connections customers have on `node` (`<prefix>.presence`): changes, or the
    /// whole table (`full`) when the node sees another node for the first time.
    Presence {
        /// The node.
        node: String,
        /// The whole table: forget what was known of the node before.
        full: bool,
        /// The sender does not know the receivers' tables (it just started, or came back):
        /// each answers with its whole table.
        ask: bool,
        /// Customers and their connection counts there now (0: none left).
        counts: Vec<(String, u32)>,
        /// Members of presence topics there: (topic, customer, member now).
        members: Vec<(String, String, bool)>,
    },
    /// Presence statuses chosen by customers connected to `node` (`<prefix>.presence`, after
    /// the `Presence` message of the same moment): changes, or the whole set (`full`). A
    /// customer's latest choice on any node is its status on every node; a node's choice is
    /// forgotten with the customer's last connection there (count 0 in `Presence`). Added
    /// after wire version 2 shipped, at the end and smaller than the largest variant, so the
    /// archives of version 2 still read the same; a node without it refuses it as invalid.
    Statuses {
        /// The node.
        node: String,
        /// The whole set: forget what was known of the node's statuses before.
        full: bool,
        /// (customer, status name, unix ms of the choice by the node's clock).
        statuses: Vec<(String, String, u64)>,
    },
}

/// The wire-format version of [`NodeMsg`] between nodes. rkyv archives have no schema
/// evolution: a node must not read another version's bytes as its own. Bump it whenever
/// `ShardMsg` or anything it contains changes shape.
pub const WIRE_VERSION: u8 = 2;

/// The first bytes of every node-to-node message: `rc`, then [`WIRE_VERSION`].
const MAGIC: [u8; 2] = *b"rc";

/// The envelope header's length: magic (2), version (1), reserved (1), then the archive.
const HEADER: usize = 4;

/// Why a node-to-node message was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeError {
    /// Shorter than the envelope header.
    #[error("message of {0} bytes is shorter than its header")]
    Short(usize),
    /// Not a ringcast message.
    #[error("not a ringcast node message")]
    BadMagic,
    /// Written by a node with another wire-format version (a rolling deploy): counted and
    /// refused, never read.
    #[error("wire-format version {0}, this node reads {WIRE_VERSION}")]
    UnknownVersion(u8),
    /// The archive failed rkyv's validation.
    #[error("invalid archive: {0}")]
    Invalid(String),
}

/// Encodes a message for another node: the envelope header, then the archive.
pub fn encode_node(msg: &NodeMsg) -> Vec<u8> {
    let archive = rkyv::to_bytes::<rancor::Error>(msg)
        .expect("serialising owned strings and integers cannot fail");
    let mut out = Vec::with_capacity(HEADER + archive.len());
    out.extend_from_slice(&MAGIC);
    out.push(WIRE_VERSION);
    out.push(0);
    out.extend_from_slice(&archive);
    out
}

/// Reads a message from another node: checks the envelope and the version, copies the archive
/// into an aligned buffer (bytes from a network client come at any alignment), validates it
/// and deserialises it.
pub fn decode_node(bytes: &[u8]) -> Result<NodeMsg, NodeError> {
    if bytes.len() < HEADER {
        return Err(NodeError::Short(bytes.len()));
    }
    if bytes[..2] != MAGIC {
        return Err(NodeError::BadMagic);
    }
    if bytes[2] != WIRE_VERSION {
        return Err(NodeError::UnknownVersion(bytes[2]));
    }
    let mut aligned = AlignedVec::<16>::with_capacity(bytes.len() - HEADER);
    aligned.extend_from_slice(&bytes[HEADER..]);
    let archived = rkyv::access::<ArchivedNodeMsg, rancor::Error>(&aligned)
        .map_err(|e| NodeError::Invalid(e.to_string()))?;
    Ok(rkyv::deserialize::<NodeMsg, rancor::Error>(archived)
        .expect("a validated archive deserialises"))
}

/// A topic or customer id as one NATS subject token. Ids may hold any character, and a subject
/// token may not hold `.`, `*`, `>` or whitespace, so every byte outside `[A-Za-z0-9_:-]`
/// becomes `=` and two upper-case hex digits (`=` itself included, so two ids never share a
/// token). The empty id is `=`.
pub fn subject_token(id: &str) -> String {
    if id.is_empty() {
        return "=".into();
    }
    let mut out = String::with_capacity(id.len());
    for b in id.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'_' | b':' | b'-') {
            out.push(b as char);
        } else {
            out.push('=');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 15)]));
        }
    }
    out
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

#[cfg(test)]
mod tests {
    use super::*;

    /// Stored events (topic history, customer queues) are `NodeMsg` archives: a variant added
    /// later must not change the archived enum's size, or every stored archive of this wire
    /// version would stop validating. (A change that must is a new `WIRE_VERSION`.)
    #[test]
    fn the_archived_message_keeps_its_size() {
        assert_eq!(std::mem::size_of::<ArchivedNodeMsg>(), 120);
        assert_eq!(std::mem::align_of::<ArchivedNodeMsg>(), 8);
    }
    use crate::event::Priority;

    #[test]
    fn subject_tokens_are_single_safe_tokens_and_never_collide() {
        assert_eq!(subject_token("conversation:42"), "conversation:42");
        assert_eq!(subject_token("a.b c*>"), "a=2Eb=20c=2A=3E");
        assert_eq!(subject_token("a=2E"), "a=3D2E");
        assert_eq!(subject_token("é"), "=C3=A9");
        assert_eq!(subject_token(""), "=");
        let ids = ["a.b", "a=2Eb", "a_b", "a:b", "ab", "", "=", "=3D"];
        let tokens: std::collections::HashSet<String> =
            ids.iter().map(|i| subject_token(i)).collect();
        assert_eq!(tokens.len(), ids.len());
        for t in &tokens {
            assert!(
                !t.is_empty()
                    && t.bytes()
                        .all(|b| b.is_ascii_graphic() && !b".*>".contains(&b))
            );
        }
    }

    #[test]
    fn round_trips() {
        let msgs = [
            ShardMsg::Interest {
                topic: "conversation:1".into(),
                from: 3,
                on: true,
                req: 9,
                last: 0,
                member: String::new(),
                since: Some(Position {
                    offset: 4,
                    epoch: "e".into(),
                }),
            },
            ShardMsg::InterestAck {
                req: 9,
                offset: 7,
                epoch: "e".into(),
                recovered: true,
                replay: vec![b"{}".to_vec()],
                full: false,
            },
            ShardMsg::PublishTopic {
                topic: "t".into(),
                event: Event {
                    id: "e".into(),
                    kind: "k".into(),
                    data: "{}".into(),
                    priority: Priority::Urgent,
                    persistent: true,
                    ttl: Some(5),
                    timestamp: "ts".into(),
                    from: None,
                    idempotent: true,
                },
                origin: 1,
                req: 2,
                deliveries: true,
            },
            ShardMsg::Deliver {
                target: Target::Role("admin".into()),
                kind: "k".into(),
                id: "i".into(),
                idempotent: false,
                origin: 0,
                req: 1,
            },
            ShardMsg::Disconnect {
                customers: vec!["a".into(), "b".into()],
                code: 4003,
                origin: 0,
                req: 0,
            },
            ShardMsg::Report {
                req: 1,
                counts: Counts {
                    websocket: 10,
                    queued: 1,
                    ..Counts::default()
                },
                forwarded: Some(2),
                offset: Some(TopicOffset {
                    topic: "t".into(),
                    offset: 7,
                }),
            },
        ];
        for m in msgs {
            let bytes = encode(&m);
            assert_eq!(to_owned(access(&bytes).unwrap()), m);
        }
        assert!(access(&[1, 2, 3]).is_err());
    }

    #[test]
    fn node_messages_carry_their_version_and_refuse_others() {
        let msg = NodeMsg::Shard(ShardMsg::Interest {
            topic: "room:1".into(),
            from: 2,
            on: true,
            req: 7,
            since: None,
            last: 3,
            member: "alice".into(),
        });
        let bytes = encode_node(&msg);
        assert_eq!(&bytes[..3], &[b'r', b'c', WIRE_VERSION]);
        assert_eq!(decode_node(&bytes), Ok(msg.clone()));
        // At any alignment: the archive is copied before it is read.
        let mut shifted = vec![0u8];
        shifted.extend_from_slice(&bytes);
        assert_eq!(decode_node(&shifted[1..]), Ok(msg));
        let hb = NodeMsg::Heartbeat {
            node: "n1".into(),
            draining: true,
        };
        assert_eq!(decode_node(&encode_node(&hb)), Ok(hb));
        let ev = NodeMsg::TopicEvent {
            topic: "conversation:1".into(),
            event: Event {
                id: "i".into(),
                kind: "k".into(),
                data: "[1]".into(),
                priority: Priority::Normal,
                persistent: true,
                ttl: None,
                timestamp: "ts".into(),
                from: Some("c".into()),
                idempotent: false,
            },
        };
        assert_eq!(decode_node(&encode_node(&ev)), Ok(ev));
        let presence = NodeMsg::Presence {
            node: "n1".into(),
            full: true,
            ask: true,
            counts: vec![("a".into(), 2), ("b".into(), 0)],
            members: vec![("room:1".into(), "a".into(), true)],
        };
        assert_eq!(decode_node(&encode_node(&presence)), Ok(presence));
        let statuses = NodeMsg::Statuses {
            node: "n1".into(),
            full: false,
            statuses: vec![("a".into(), "away".into(), 1_765_000_000_000)],
        };
        assert_eq!(decode_node(&encode_node(&statuses)), Ok(statuses));
        let gone = NodeMsg::Disconnect {
            origin: "n2".into(),
            customers: vec!["a".into()],
            code: 4003,
        };
        assert_eq!(decode_node(&encode_node(&gone)), Ok(gone));
        let mut other = bytes.clone();
        other[2] = WIRE_VERSION + 1;
        assert_eq!(
            decode_node(&other),
            Err(NodeError::UnknownVersion(WIRE_VERSION + 1))
        );
        assert_eq!(decode_node(b"rc"), Err(NodeError::Short(2)));
        assert_eq!(decode_node(b"xx\x01\x00"), Err(NodeError::BadMagic));
        let mut torn = bytes.clone();
        torn.truncate(bytes.len() - 3);
        assert!(matches!(decode_node(&torn), Err(NodeError::Invalid(_))));
    }
}
