//! Client protocol v1: the `{type, payload, requestId}` envelope over WebSocket text frames.
//!
//! [`parse`] decodes a client message with simd-json (in place: the engine hands it the
//! unmasked frame payload it owns for the duration of the call). Replies are built by the
//! `*_reply` functions; events are encoded by [`crate::event::Event::to_client_json`].

use crate::error::Code;
use serde_json::json;
use simd_json::prelude::*;
use simd_json::BorrowedValue;

/// A decoded client request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Subscribe to topics and/or event-type prefixes of the customer's own stream.
    Subscribe {
        /// Topics to join.
        topics: Vec<String>,
        /// Event-type prefixes to receive on the customer's own stream.
        events: Vec<String>,
        /// Last known positions, per topic, to recover what was missed (`payload.since`).
        since: Vec<(String, crate::bus::Position)>,
        /// Latest messages to receive on joining (`payload.last`; default: the namespace's).
        last: Option<u32>,
    },
    /// The reverse of `Subscribe`.
    Unsubscribe {
        /// Topics to leave.
        topics: Vec<String>,
        /// Event-type prefixes to stop receiving.
        events: Vec<String>,
    },
    /// Publish an event to a topic (when the token allows it).
    Publish {
        /// Target topic.
        topic: String,
        /// Event type.
        kind: String,
        /// JSON text of the data.
        data: String,
    },
    /// Send an event to another customer.
    SendMessage {
        /// Recipient customer id.
        to: String,
        /// Event type (`message_received` by default, as in the seed portal).
        kind: String,
        /// JSON text of the data.
        data: String,
    },
    /// Confirms persistent events of the customer's stream: by event id, by cursor, or all up
    /// to a cursor (`upTo`). Unconfirmed ones are delivered again on the next connection.
    Ack {
        /// Event ids.
        ids: Vec<String>,
        /// Cursors of single events.
        cursors: Vec<String>,
        /// Everything up to and including this cursor.
        up_to: Option<String>,
        /// `delivered` (default) or `read`: the sender of a client-sent message among `ids`
        /// receives `message_delivered` / `message_read`.
        status: ReceiptStatus,
    },
    /// Sets the customer's presence status (all its connections).
    Presence {
        /// The status.
        status: PresenceStatus,
    },
    /// Stores delivery preferences for the customer (validated; the fields given replace
    /// the stored ones).
    UpdatePreferences(crate::prefs::Preferences),
    /// Typing indicator in a topic the client is a member of; ephemeral.
    Typing {
        /// The topic.
        topic: String,
        /// `start` (true) or `stop`.
        start: bool,
    },
    /// Liveness check; answered with `pong`.
    Ping,
}

/// A decoded client message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientMessage {
    /// What the client asks for.
    pub request: Request,
    /// Echoed in replies.
    pub request_id: Option<String>,
}

/// A client message that could not be served; the engine replies with [`ClientError::to_json`]
/// and keeps the connection open.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ClientError {
    /// Machine-readable code (`bad_json`, `bad_request`, `unknown_type`, `forbidden`, ...).
    pub code: crate::error::Code,
    /// Human-readable message.
    pub message: String,
    /// The `type` the client sent, if any.
    pub received_type: Option<String>,
    /// The `requestId` the client sent, if any.
    pub request_id: Option<String>,
}

impl ClientError {
    /// A new error without type or request id.
    pub fn new(code: crate::error::Code, message: impl Into<String>) -> Self {
        ClientError {
            code,
            message: message.into(),
            received_type: None,
            request_id: None,
        }
    }

    /// The `error` message sent to the client.
    pub fn to_json(&self) -> Vec<u8> {
        let mut v = json!({ "type": "error", "code": self.code, "message": self.message });
        if let Some(t) = &self.received_type {
            v["receivedType"] = json!(t);
        }
        if let Some(r) = &self.request_id {
            v["requestId"] = json!(r);
        }
        v.to_string().into_bytes()
    }
}

fn strings(v: Option<&BorrowedValue<'_>>, field: &str) -> Result<Vec<String>, ClientError> {
    match v {
        None => Ok(Vec::new()),
        Some(v) if v.is_null() => Ok(Vec::new()),
        Some(v) => {
            if let Some(s) = v.as_str() {
                return Ok(vec![s.to_owned()]);
            }
            let arr = v.as_array().ok_or_else(|| {
                ClientError::new(
                    Code::BadRequest,
                    format!("payload.{field} must be a list of strings"),
                )
            })?;
            arr.iter()
                .map(|x| {
                    x.as_str().map(str::to_owned).ok_or_else(|| {
                        ClientError::new(
                            Code::BadRequest,
                            format!("payload.{field} must be a list of strings"),
                        )
                    })
                })
                .collect()
        }
    }
}

fn string(payload: Option<&BorrowedValue<'_>>, names: &[&str]) -> Option<String> {
    let p = payload?;
    names
        .iter()
        .find_map(|n| p.get(*n).and_then(|v| v.as_str()).map(str::to_owned))
}

/// `payload.since`: `{"<topic>": {"offset": n, "epoch": "..."}}`.
fn positions(
    v: Option<&BorrowedValue<'_>>,
) -> Result<Vec<(String, crate::bus::Position)>, ClientError> {
    let bad = || {
        ClientError::new(
            Code::BadRequest,
            "payload.since must map topics to {\"offset\": n, \"epoch\": \"...\"}",
        )
    };
    let Some(v) = v.filter(|v| !v.is_null()) else {
        return Ok(Vec::new());
    };
    let obj = v.as_object().ok_or_else(bad)?;
    obj.iter()
        .map(|(topic, pos)| {
            let offset = pos.get("offset").and_then(|o| o.as_u64()).ok_or_else(bad)?;
            let epoch = pos
                .get("epoch")
                .and_then(|e| e.as_str())
                .ok_or_else(bad)?
                .to_owned();
            Ok((topic.to_string(), crate::bus::Position { offset, epoch }))
        })
        .collect()
}

/// Parses a client text message. `buf` is used as simd-json's scratch space and is clobbered.
pub fn parse(buf: &mut [u8]) -> Result<ClientMessage, ClientError> {
    // Before the parser: it, dropping its value and re-encoding `data` all recurse per level.
    crate::json::check_depth(buf, crate::json::MAX_CLIENT_DEPTH)
        .map_err(|e| ClientError::new(Code::BadJson, e.to_string()))?;
    let value = simd_json::to_borrowed_value(buf)
        .map_err(|e| ClientError::new(Code::BadJson, format!("invalid JSON: {e}")))?;
    let request_id = value.get("requestId").and_then(|v| {
        v.as_str()
            .map(str::to_owned)
            .or_else(|| v.as_i64().map(|n| n.to_string()))
    });
    let Some(kind) = value.get("type").and_then(|v| v.as_str()) else {
        return Err(ClientError {
            request_id,
            ..ClientError::new(Code::BadRequest, "message needs a string \"type\"")
        });
    };
    let kind = kind.to_owned();
    let payload = value.get("payload");
    let fail = |code: crate::error::Code, message: String| ClientError {
        code,
        message,
        received_type: Some(kind.clone()),
        request_id: request_id.clone(),
    };
    let with_ctx = |e: ClientError| ClientError {
        received_type: Some(kind.clone()),
        request_id: request_id.clone(),
        ..e
    };
    let request = match kind.as_str() {
        "subscribe" | "unsubscribe" => {
            let mut topics =
                strings(payload.and_then(|p| p.get("topics")), "topics").map_err(with_ctx)?;
            topics.extend(string(payload, &["topic"]));
            let events =
                strings(payload.and_then(|p| p.get("events")), "events").map_err(with_ctx)?;
            if let Some(e) = events
                .iter()
                .find_map(|e| crate::event::validate_type(e).err())
            {
                return Err(fail(e.code, format!("payload.events: {}", e.message)));
            }
            if topics.is_empty() && events.is_empty() {
                return Err(fail(
                    Code::BadRequest,
                    format!("{kind} needs payload.topics or payload.events"),
                ));
            }
            if kind == "subscribe" {
                let since = positions(payload.and_then(|p| p.get("since"))).map_err(with_ctx)?;
                let last = match payload.and_then(|p| p.get("last")) {
                    None => None,
                    Some(v) => Some(v.as_u64().filter(|n| *n <= 100_000).ok_or_else(|| {
                        fail(Code::BadRequest, "payload.last must be a count".into())
                    })? as u32),
                };
                Request::Subscribe {
                    topics,
                    events,
                    since,
                    last,
                }
            } else {
                Request::Unsubscribe { topics, events }
            }
        }
        "publish" => {
            let topic = string(payload, &["topic"])
                .ok_or_else(|| fail(Code::BadRequest, "publish needs payload.topic".into()))?;
            let event_kind = string(payload, &["type", "event"])
                .ok_or_else(|| fail(Code::BadRequest, "publish needs payload.type".into()))?;
            let data = payload
                .and_then(|p| p.get("data"))
                .map_or_else(|| "{}".to_owned(), |d| d.encode());
            Request::Publish {
                topic,
                kind: event_kind,
                data,
            }
        }
        "send_message" => {
            let to = string(payload, &["to", "recipientId"])
                .ok_or_else(|| fail(Code::BadRequest, "send_message needs payload.to".into()))?;
            crate::event::validate_customer(&to).map_err(|e| fail(e.code, e.message))?;
            let event_kind =
                string(payload, &["type"]).unwrap_or_else(|| "message_received".to_owned());
            // The seed portal sends `{recipientId, message, ...}` without `data`: the whole
            // payload becomes the data then.
            let data = match payload.and_then(|p| p.get("data")) {
                Some(d) => d.encode(),
                None => payload.map_or_else(|| "{}".to_owned(), |p| p.encode()),
            };
            Request::SendMessage {
                to,
                kind: event_kind,
                data,
            }
        }
        "ping" => Request::Ping,
        "ack" => {
            let ids = strings(payload.and_then(|p| p.get("ids")), "ids").map_err(with_ctx)?;
            let cursors =
                strings(payload.and_then(|p| p.get("cursors")), "cursors").map_err(with_ctx)?;
            let up_to = string(payload, &["upTo", "up_to"]);
            let status = match string(payload, &["status"]).as_deref() {
                None | Some("delivered") => ReceiptStatus::Delivered,
                Some("read") => ReceiptStatus::Read,
                Some(_) => {
                    return Err(fail(
                        Code::BadRequest,
                        "ack status must be delivered or read".into(),
                    ))
                }
            };
            if ids.is_empty() && cursors.is_empty() && up_to.is_none() {
                return Err(fail(
                    Code::BadRequest,
                    "ack needs payload.ids, payload.cursors or payload.upTo".into(),
                ));
            }
            Request::Ack {
                ids,
                cursors,
                up_to,
                status,
            }
        }
        "typing" => {
            let topic = string(payload, &["topic", "conversationId"])
                .ok_or_else(|| fail(Code::BadRequest, "typing needs payload.topic".into()))?;
            let start = match string(payload, &["state"]).as_deref() {
                None | Some("start") => true,
                Some("stop") => false,
                Some(_) => {
                    return Err(fail(
                        Code::BadRequest,
                        "typing state must be start or stop".into(),
                    ))
                }
            };
            Request::Typing { topic, start }
        }
        "presence" => {
            let status = string(payload, &["status"])
                .ok_or_else(|| fail(Code::BadRequest, "presence needs payload.status".into()))?;
            let status = match status.as_str() {
                "online" => PresenceStatus::Online,
                "away" => PresenceStatus::Away,
                "busy" => PresenceStatus::Busy,
                _ => {
                    return Err(fail(
                        Code::BadRequest,
                        "presence status must be online, away or busy".into(),
                    ))
                }
            };
            Request::Presence { status }
        }
        "update_preferences" => {
            let json = payload.map_or_else(|| "{}".to_owned(), |p| p.encode());
            Request::UpdatePreferences(
                crate::prefs::Preferences::parse(&json).map_err(|e| fail(Code::BadRequest, e))?,
            )
        }
        other => {
            return Err(fail(
                Code::UnknownType,
                format!("unknown message type {other:?}"),
            ))
        }
    };
    Ok(ClientMessage {
        request,
        request_id,
    })
}

/// What an `ack` confirms about client-sent messages: their sender is told
/// `message_delivered` or `message_read`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum ReceiptStatus {
    /// Received (the default).
    Delivered,
    /// Read by the recipient.
    Read,
}

impl ReceiptStatus {
    /// The type of the receipt the sender gets.
    pub fn receipt_type(self) -> &'static str {
        match self {
            ReceiptStatus::Delivered => "message_delivered",
            ReceiptStatus::Read => "message_read",
        }
    }
}

/// A customer's presence status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum PresenceStatus {
    /// Online (the default of a connected customer).
    #[default]
    Online,
    /// Away.
    Away,
    /// Busy.
    Busy,
}

impl PresenceStatus {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            PresenceStatus::Online => "online",
            PresenceStatus::Away => "away",
            PresenceStatus::Busy => "busy",
        }
    }
}

/// The `welcome` message sent after the upgrade. `stream` is the customer stream's position
/// before any replayed event (a safe `since` for the next connection) and whether the
/// connection's own `since` could be honoured completely.
pub fn welcome(
    customer: &str,
    connection_id: &str,
    subscriptions: &[String],
    heartbeat_secs: u64,
    timestamp: &str,
    stream: (&str, bool),
) -> Vec<u8> {
    json!({
        "type": "welcome",
        "timestamp": timestamp,
        "data": {
            "customerId": customer,
            "connectionId": connection_id,
            "subscriptions": subscriptions,
            "heartbeat": heartbeat_secs,
            "protocol": 1,
            "cursor": stream.0,
            "recovered": stream.1,
        }
    })
    .to_string()
    .into_bytes()
}

/// One topic's position, as reported in `subscription_confirmed`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicPosition {
    /// Topic name.
    pub topic: String,
    /// Offset of the last event published to it (0 if none).
    pub offset: u64,
    /// Epoch of the topic's history.
    pub epoch: String,
    /// Whether everything after the client's `since` was replayed (true without `since`).
    pub recovered: bool,
}

/// The `subscription_confirmed` reply (also used, with `type` `unsubscribed`, for unsubscribe).
pub fn subscription_reply(
    kind: &str,
    topics: &[TopicPosition],
    events: &[String],
    request_id: Option<&str>,
) -> Vec<u8> {
    let mut per_topic = serde_json::Map::new();
    for t in topics {
        per_topic.insert(
            t.topic.clone(),
            json!({ "offset": t.offset, "epoch": t.epoch, "recovered": t.recovered }),
        );
    }
    let mut v = json!({
        "type": kind,
        "data": { "topics": per_topic, "events": events },
        "subscriptions": topics.iter().map(|t| t.topic.as_str()).chain(events.iter().map(String::as_str)).collect::<Vec<_>>(),
    });
    if let Some(r) = request_id {
        v["requestId"] = json!(r);
    }
    v.to_string().into_bytes()
}

/// A reply to a client request: `{"type", "timestamp", "data", "requestId"}`.
#[derive(Debug, Clone, Copy)]
pub enum Reply<'a> {
    /// `pong` to a JSON `ping`.
    Pong,
    /// `published`: a client-sent event went to a topic.
    Published {
        /// The event id.
        id: &'a str,
        /// The topic.
        topic: &'a str,
    },
    /// `sent`: a client-sent event went to a customer.
    Sent {
        /// The event id.
        id: &'a str,
        /// The recipient.
        to: &'a str,
    },
    /// `presence_set`.
    PresenceSet(PresenceStatus),
    /// `typing_sent` (`throttled`: dropped inside the typing interval).
    TypingSent {
        /// The topic.
        topic: &'a str,
        /// Whether the indicator was dropped as too frequent.
        throttled: bool,
    },
    /// `acked`: how many stored events the `ack` confirmed.
    Acked(u64),
    /// `preferences_updated`, with everything stored.
    PreferencesUpdated(&'a crate::prefs::Preferences),
}

impl Reply<'_> {
    /// The reply's JSON text.
    pub fn encode(&self, request_id: Option<&str>, timestamp: &str) -> Vec<u8> {
        let (kind, data) = match *self {
            Reply::Pong => ("pong", json!({})),
            Reply::Published { id, topic } => ("published", json!({ "id": id, "topic": topic })),
            Reply::Sent { id, to } => ("sent", json!({ "id": id, "to": to })),
            Reply::PresenceSet(s) => ("presence_set", json!({ "status": s.as_str() })),
            Reply::TypingSent { topic, throttled } => (
                "typing_sent",
                json!({ "topic": topic, "throttled": throttled }),
            ),
            Reply::Acked(n) => ("acked", json!({ "acked": n })),
            Reply::PreferencesUpdated(p) => (
                "preferences_updated",
                serde_json::to_value(p).expect("preferences serialise"),
            ),
        };
        let mut v = json!({ "type": kind, "timestamp": timestamp, "data": data });
        if let Some(r) = request_id {
            v["requestId"] = json!(r);
        }
        v.to_string().into_bytes()
    }
}

/// An event the server pushes about a topic without storing it (`typing`,
/// `presence_diff`, presence announcements): the WebSocket message
/// `{"type": kind, "topic", "data"}` and the SSE record `event: kind` with the data.
pub fn ephemeral(kind: &str, topic: &str, data: &serde_json::Value) -> (Vec<u8>, Vec<u8>) {
    let ws = json!({ "type": kind, "topic": topic, "data": data })
        .to_string()
        .into_bytes();
    (ws, crate::sse::record(Some(kind), &data.to_string(), None))
}

/// The data of a `typing` event.
pub fn typing(customer: &str, start: bool) -> serde_json::Value {
    json!({ "customerId": customer, "state": if start { "start" } else { "stop" } })
}

/// A receipt for the sender of a client-sent event: `message_delivered` or `message_read`
/// with the event id, who confirmed it and, for a topic message, the topic.
pub fn receipt(
    status: ReceiptStatus,
    id: &str,
    by: &str,
    topic: Option<&str>,
    timestamp: &str,
) -> Vec<u8> {
    let mut data = json!({ "id": id, "by": by });
    if let Some(t) = topic {
        data["topic"] = json!(t);
    }
    json!({ "type": status.receipt_type(), "timestamp": timestamp, "data": data })
        .to_string()
        .into_bytes()
}

/// The data of a `presence_diff`: who joined and left a presence topic in the last window
/// (at most the configured number of names each; `truncated` says some were left out).
pub fn presence_diff(
    joined: &[String],
    left: &[String],
    members: usize,
    truncated: bool,
) -> serde_json::Value {
    json!({ "joined": joined, "left": left, "members": members, "truncated": truncated })
}

/// A customer's presence: the data of `presence` events and the body of
/// `GET /v1/presence/customers/{id}`. `status` is `offline` when it has no connection.
pub fn customer_presence(
    customer: &str,
    status: &str,
    connections: usize,
    platforms: &[&str],
    last_seen: Option<u64>,
) -> serde_json::Value {
    json!({
        "customerId": customer,
        "status": status,
        "connections": connections,
        "platforms": platforms,
        "lastSeen": last_seen,
    })
}

/// The members of a presence topic with their connection counts (`GET
/// /v1/presence/topics/{topic}`).
pub fn topic_members(topic: &str, members: &[(&str, u32)]) -> serde_json::Value {
    let list: Vec<serde_json::Value> = members
        .iter()
        .map(|(c, n)| json!({ "customerId": c, "connections": n }))
        .collect();
    json!({ "topic": topic, "count": list.len(), "members": list })
}

/// The SSE stream's greeting, `connection_established` (no `id:`, so the browser's
/// Last-Event-ID stays the customer stream's).
pub struct SseHello<'a> {
    /// The customer.
    pub customer: &'a str,
    /// This connection's id.
    pub connection_id: &'a str,
    /// Event-type filters (`["all"]` without any).
    pub subscriptions: &'a [String],
    /// Topics the stream asked for.
    pub topics: &'a [String],
    /// The customer stream's position before any replayed event.
    pub cursor: &'a str,
    /// Whether the stream's `since` could be honoured completely.
    pub recovered: bool,
    /// Seconds between the server's heartbeats.
    pub heartbeat_secs: u64,
}

impl SseHello<'_> {
    /// The SSE record.
    pub fn encode(&self) -> Vec<u8> {
        let data = json!({
            "customerId": self.customer,
            "connectionId": self.connection_id,
            "subscriptions": self.subscriptions,
            "topics": self.topics,
            "cursor": self.cursor,
            "recovered": self.recovered,
            "heartbeat": self.heartbeat_secs,
        });
        crate::sse::record(Some("connection_established"), &data.to_string(), None)
    }
}

/// The SSE record that says a stream's topics are live: `subscription_confirmed` with each
/// topic's position.
pub fn sse_subscription_confirmed(topics: &[TopicPosition]) -> Vec<u8> {
    let mut per_topic = serde_json::Map::new();
    for t in topics {
        per_topic.insert(
            t.topic.clone(),
            json!({ "offset": t.offset, "epoch": t.epoch, "recovered": t.recovered }),
        );
    }
    let data = json!({ "topics": per_topic }).to_string();
    crate::sse::record(Some("subscription_confirmed"), &data, None)
}

/// The SSE record refusing a topic that has its maximum of subscribers.
pub fn sse_topic_full(topic: &str) -> Vec<u8> {
    let data = json!({ "code": "topic_full", "topic": topic }).to_string();
    crate::sse::record(Some("error"), &data, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<ClientMessage, ClientError> {
        parse(&mut s.as_bytes().to_vec())
    }

    #[test]
    fn replies_golden() {
        let ts = "2026-12-01T00:00:00.000Z";
        let prefs = crate::prefs::Preferences::parse(r#"{"urgentOverride":true}"#).unwrap();
        let cases = [
            (
                Reply::Pong,
                r#"{"data":{},"requestId":"r","timestamp":"T","type":"pong"}"#,
            ),
            (
                Reply::Published {
                    id: "e-0-1",
                    topic: "conversation:1",
                },
                r#"{"data":{"id":"e-0-1","topic":"conversation:1"},"requestId":"r","timestamp":"T","type":"published"}"#,
            ),
            (
                Reply::Sent {
                    id: "e-0-2",
                    to: "bob",
                },
                r#"{"data":{"id":"e-0-2","to":"bob"},"requestId":"r","timestamp":"T","type":"sent"}"#,
            ),
            (
                Reply::PresenceSet(PresenceStatus::Away),
                r#"{"data":{"status":"away"},"requestId":"r","timestamp":"T","type":"presence_set"}"#,
            ),
            (
                Reply::TypingSent {
                    topic: "conversation:1",
                    throttled: true,
                },
                r#"{"data":{"throttled":true,"topic":"conversation:1"},"requestId":"r","timestamp":"T","type":"typing_sent"}"#,
            ),
            (
                Reply::Acked(3),
                r#"{"data":{"acked":3},"requestId":"r","timestamp":"T","type":"acked"}"#,
            ),
            (
                Reply::PreferencesUpdated(&prefs),
                r#"{"data":{"urgentOverride":true},"requestId":"r","timestamp":"T","type":"preferences_updated"}"#,
            ),
        ];
        for (reply, want) in cases {
            let got = String::from_utf8(reply.encode(Some("r"), ts)).unwrap();
            assert_eq!(
                got,
                want.replace("\"T\"", &format!("\"{ts}\"")),
                "{reply:?}"
            );
        }
        let bare = String::from_utf8(Reply::Pong.encode(None, "T")).unwrap();
        assert!(!bare.contains("requestId"), "{bare}");
    }

    #[test]
    fn pushed_events_golden() {
        let (ws, sse) = ephemeral("typing", "conversation:7", &typing("anna", true));
        assert_eq!(
            String::from_utf8(ws).unwrap(),
            r#"{"data":{"customerId":"anna","state":"start"},"topic":"conversation:7","type":"typing"}"#
        );
        assert_eq!(
            String::from_utf8(sse).unwrap(),
            "event: typing\ndata: {\"customerId\":\"anna\",\"state\":\"start\"}\n\n"
        );
        let r = receipt(
            ReceiptStatus::Read,
            "e-0-1",
            "bob",
            Some("conversation:7"),
            "T",
        );
        assert_eq!(
            String::from_utf8(r).unwrap(),
            r#"{"data":{"by":"bob","id":"e-0-1","topic":"conversation:7"},"timestamp":"T","type":"message_read"}"#
        );
        let r = receipt(ReceiptStatus::Delivered, "e-0-2", "bob", None, "T");
        assert_eq!(
            String::from_utf8(r).unwrap(),
            r#"{"data":{"by":"bob","id":"e-0-2"},"timestamp":"T","type":"message_delivered"}"#
        );
    }

    #[test]
    fn sse_messages_and_presence_diff_golden() {
        let hello = SseHello {
            customer: "anna",
            connection_id: "e-0-1",
            subscriptions: &["all".into()],
            topics: &["news".into()],
            cursor: "e.0-0",
            recovered: true,
            heartbeat_secs: 25,
        };
        assert_eq!(
            String::from_utf8(hello.encode()).unwrap(),
            "event: connection_established\ndata: {\"connectionId\":\"e-0-1\",\"cursor\":\"e.0-0\",\
             \"customerId\":\"anna\",\"heartbeat\":25,\"recovered\":true,\"subscriptions\":[\"all\"],\
             \"topics\":[\"news\"]}\n\n"
        );
        let pos = TopicPosition {
            topic: "news".into(),
            offset: 4,
            epoch: "e".into(),
            recovered: true,
        };
        assert_eq!(
            String::from_utf8(sse_subscription_confirmed(&[pos])).unwrap(),
            "event: subscription_confirmed\ndata: {\"topics\":{\"news\":{\"epoch\":\"e\",\"offset\":4,\
             \"recovered\":true}}}\n\n"
        );
        assert_eq!(
            String::from_utf8(sse_topic_full("news")).unwrap(),
            "event: error\ndata: {\"code\":\"topic_full\",\"topic\":\"news\"}\n\n"
        );
        assert_eq!(
            presence_diff(&["a".into()], &[], 3, false).to_string(),
            r#"{"joined":["a"],"left":[],"members":3,"truncated":false}"#
        );
        assert_eq!(
            customer_presence("anna", "away", 2, &["ios", "web"], None).to_string(),
            r#"{"connections":2,"customerId":"anna","lastSeen":null,"platforms":["ios","web"],"status":"away"}"#
        );
        assert_eq!(
            topic_members("room", &[("anna", 2), ("bob", 1)]).to_string(),
            r#"{"count":2,"members":[{"connections":2,"customerId":"anna"},{"connections":1,"customerId":"bob"}],"topic":"room"}"#
        );
    }

    #[test]
    fn parses_the_envelope() {
        let m = p(r#"{"type":"subscribe","payload":{"topics":["conversation:1"],"events":["case_"]},"requestId":"r1"}"#).unwrap();
        assert_eq!(m.request_id.as_deref(), Some("r1"));
        assert_eq!(
            m.request,
            Request::Subscribe {
                topics: vec!["conversation:1".into()],
                events: vec!["case_".into()],
                since: vec![],
                last: None,
            }
        );
        let m = p(r#"{"type":"subscribe","payload":{"topics":["t"],"last":5}}"#).unwrap();
        assert!(matches!(
            m.request,
            Request::Subscribe { last: Some(5), .. }
        ));
        assert!(p(r#"{"type":"subscribe","payload":{"topics":["t"],"last":-1}}"#).is_err());
        let m = p(r#"{"type":"subscribe","payload":{"topics":["t"],"since":{"t":{"offset":3,"epoch":"e1"}}}}"#).unwrap();
        let Request::Subscribe { since, .. } = m.request else {
            panic!("wrong request")
        };
        assert_eq!(
            since,
            [(
                "t".to_owned(),
                crate::bus::Position {
                    offset: 3,
                    epoch: "e1".into()
                }
            )]
        );
        assert_eq!(
            p(r#"{"type":"subscribe","payload":{"topics":["t"],"since":{"t":{"offset":"x"}}}}"#)
                .unwrap_err()
                .code,
            "bad_request"
        );
        let m = p(r#"{"type":"ack","payload":{"ids":["a","b"],"status":"read"}}"#).unwrap();
        assert_eq!(
            m.request,
            Request::Ack {
                ids: vec!["a".into(), "b".into()],
                cursors: vec![],
                up_to: None,
                status: ReceiptStatus::Read
            }
        );
        assert_eq!(
            p(r#"{"type":"ack","payload":{}}"#).unwrap_err().code,
            "bad_request"
        );
        let m =
            p(r#"{"type":"publish","payload":{"topic":"t","type":"chat","data":{"text":"hi"}}}"#)
                .unwrap();
        assert_eq!(
            m.request,
            Request::Publish {
                topic: "t".into(),
                kind: "chat".into(),
                data: r#"{"text":"hi"}"#.into()
            }
        );
        let m = p(r#"{"type":"send_message","payload":{"recipientId":"bob","message":"hello"}}"#)
            .unwrap();
        let Request::SendMessage { to, kind, data } = m.request else {
            panic!("wrong request")
        };
        assert_eq!((to.as_str(), kind.as_str()), ("bob", "message_received"));
        assert!(data.contains("\"message\":\"hello\""));
        assert_eq!(
            p(r#"{"type":"ping","requestId":7}"#)
                .unwrap()
                .request_id
                .as_deref(),
            Some("7")
        );
    }

    #[test]
    fn refuses_deep_json_and_oversized_ids() {
        // Before the depth bound this message overflowed a shard thread's stack.
        let deep = format!("{}{}", "[".repeat(8750), "]".repeat(8750));
        assert_eq!(p(&deep).unwrap_err().code, "bad_json");
        let nested_data = format!(
            r#"{{"type":"publish","payload":{{"topic":"t","type":"x","data":{}1{}}}}}"#,
            "[".repeat(40),
            "]".repeat(40)
        );
        assert_eq!(p(&nested_data).unwrap_err().code, "bad_json");
        let ok_data = format!(
            r#"{{"type":"publish","payload":{{"topic":"t","type":"x","data":{}1{}}}}}"#,
            "[".repeat(20),
            "]".repeat(20)
        );
        assert!(p(&ok_data).is_ok());
        let long_to = format!(
            r#"{{"type":"send_message","requestId":"r","payload":{{"to":"{}"}}}}"#,
            "a".repeat(257)
        );
        let e = p(&long_to).unwrap_err();
        assert_eq!(
            (e.code.as_str(), e.request_id.as_deref()),
            ("invalid_customer", Some("r"))
        );
        let long_filter = format!(
            r#"{{"type":"subscribe","payload":{{"events":["{}"]}}}}"#,
            "a".repeat(200)
        );
        assert_eq!(p(&long_filter).unwrap_err().code, "invalid_type");
    }

    #[test]
    fn parses_typing() {
        let m =
            p(r#"{"type":"typing","payload":{"topic":"conversation:7","state":"stop"}}"#).unwrap();
        assert_eq!(
            m.request,
            Request::Typing {
                topic: "conversation:7".into(),
                start: false
            }
        );
        // The seed's `user:typing` shape names the conversation; start is the default.
        let m = p(r#"{"type":"typing","payload":{"conversationId":"conversation:7"}}"#).unwrap();
        assert!(matches!(m.request, Request::Typing { start: true, .. }));
        assert_eq!(
            p(r#"{"type":"typing","payload":{}}"#).unwrap_err().code,
            "bad_request"
        );
        let bad = p(r#"{"type":"typing","payload":{"topic":"t","state":"maybe"}}"#);
        assert_eq!(bad.unwrap_err().code, "bad_request");
    }

    #[test]
    fn errors_carry_type_and_request_id() {
        let e = p("{not json").unwrap_err();
        assert_eq!(e.code, "bad_json");
        let e = p(r#"{"type":"dance","requestId":"r9"}"#).unwrap_err();
        assert_eq!(
            (
                e.code.as_str(),
                e.received_type.as_deref(),
                e.request_id.as_deref()
            ),
            ("unknown_type", Some("dance"), Some("r9"))
        );
        let v: serde_json::Value = serde_json::from_slice(&e.to_json()).unwrap();
        assert_eq!(v["type"], "error");
        assert_eq!(v["receivedType"], "dance");
        assert_eq!(v["requestId"], "r9");
        assert_eq!(
            p(r#"{"type":"subscribe","payload":{"topics":[1]}}"#)
                .unwrap_err()
                .code,
            "bad_request"
        );
        assert_eq!(
            p(r#"{"type":"subscribe"}"#).unwrap_err().code,
            "bad_request"
        );
        assert_eq!(p(r#"[1,2]"#).unwrap_err().code, "bad_request");
    }
}
