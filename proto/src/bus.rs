//! Messages between shards (and, later, between nodes), rkyv-encoded.
//!
//! A [`ShardMsg`] is encoded with [`encode`] into an aligned buffer and read on the other side
//! with [`access`] without deserialising. Frame payloads never go through rkyv: the engine sends
//! the shared `Bytes` of an encoded frame beside the message, so a fan-out to N shards copies
//! no payload.

use rkyv::{rancor, util::AlignedVec, Archive, Deserialize, Serialize};

use crate::event::Event;

/// A cross-shard message.
#[derive(Debug, Clone, PartialEq, Eq, Archive, Serialize, Deserialize)]
pub enum ShardMsg {
    /// A connection accepted on another shard belongs here: its socket (the receiver owns the
    /// fd from now on) and the bytes already read from it.
    Handoff {
        /// The socket; ownership moves with the message.
        fd: i32,
        /// Bytes read before the handoff (the request head).
        initial: Vec<u8>,
    },
    /// To a topic's owner: `from` gained its first (`on`) or lost its last local subscriber.
    Interest {
        /// The topic.
        topic: String,
        /// The shard whose interest changed.
        from: u32,
        /// Gained (true) or lost (false).
        on: bool,
        /// Request id for the [`ShardMsg::InterestAck`] (0: no ack wanted).
        req: u64,
    },
    /// From a topic's owner: interest registered; events after `offset` will be delivered.
    InterestAck {
        /// The request id of the `Interest`.
        req: u64,
        /// The topic's last offset.
        offset: u64,
        /// The topic's history epoch.
        epoch: String,
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
    },
    /// Deliver the frame sent beside this message to local receivers.
    Deliver {
        /// Who receives it.
        target: Target,
        /// Event type (for the customer stream's type-prefix filters).
        kind: String,
        /// Shard awaiting the delivery report.
        origin: u32,
        /// Request id of the report.
        req: u64,
    },
    /// Asks a shard for its histograms (for `GET /v1/stats/histograms`).
    HistogramsRequest {
        /// Shard awaiting the reply.
        origin: u32,
        /// Request id.
        req: u64,
    },
    /// A shard's histograms, HdrHistogram V2-serialised (microseconds).
    HistogramsReply {
        /// Request id.
        req: u64,
        /// Publish accepted to frame written.
        publish_to_write: Vec<u8>,
        /// Connection accepted to `101` written.
        handshake: Vec<u8>,
    },
    /// Delivery report to the origin of a publish.
    Report {
        /// Request id.
        req: u64,
        /// Frames queued to WebSocket connections.
        websocket: u64,
        /// Receivers skipped (slow consumers) or targets with no connection.
        dropped: u64,
        /// Further reports the origin must now wait for (a topic owner fanning out).
        more: u32,
    },
}

/// Receivers of a [`ShardMsg::Deliver`].
#[derive(Debug, Clone, PartialEq, Eq, Archive, Serialize, Deserialize)]
pub enum Target {
    /// Local subscribers of a topic.
    Topic(String),
    /// Local connections of these customers.
    Customers(Vec<String>),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Priority;

    #[test]
    fn round_trips() {
        let msgs = [
            ShardMsg::Handoff {
                fd: 42,
                initial: b"GET / HTTP/1.1\r\n\r\n".to_vec(),
            },
            ShardMsg::Interest {
                topic: "conversation:1".into(),
                from: 3,
                on: true,
                req: 9,
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
                },
                origin: 1,
                req: 2,
            },
            ShardMsg::Deliver {
                target: Target::Customers(vec!["a".into(), "b".into()]),
                kind: "k".into(),
                origin: 0,
                req: 1,
            },
            ShardMsg::Report {
                req: 1,
                websocket: 10,
                dropped: 0,
                more: 2,
            },
        ];
        for m in msgs {
            let bytes = encode(&m);
            assert_eq!(to_owned(access(&bytes).unwrap()), m);
        }
        assert!(access(&[1, 2, 3]).is_err());
    }
}
