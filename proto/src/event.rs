//! Events: what backends publish and clients receive, and their one-time JSON encoding.
//!
//! An event is encoded once per publish into the JSON a client sees (and then once into a
//! WebSocket frame), whatever the number of receivers.

use crate::error::Code;
use rkyv::{Archive, Deserialize as RkyvDeserialize, Serialize as RkyvSerialize};
use serde::Deserialize;
use serde_json::value::RawValue;

/// Delivery priority (`low|normal|high|urgent`), carried to clients and used by later features.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Archive, RkyvSerialize, RkyvDeserialize)]
pub enum Priority {
    /// low
    Low,
    /// normal (default)
    #[default]
    Normal,
    /// high
    High,
    /// urgent
    Urgent,
}

impl Priority {
    /// Parses the wire name.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "low" => Priority::Low,
            "normal" => Priority::Normal,
            "high" => Priority::High,
            "urgent" => Priority::Urgent,
            _ => return None,
        })
    }

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Low => "low",
            Priority::Normal => "normal",
            Priority::High => "high",
            Priority::Urgent => "urgent",
        }
    }
}

/// A validated event, ready to route. `data` is JSON text, already validated.
#[derive(Debug, Clone, PartialEq, Eq, Archive, RkyvSerialize, RkyvDeserialize)]
pub struct Event {
    /// Event id (given by the publisher or generated).
    pub id: String,
    /// Event type, e.g. `case_status_update`.
    pub kind: String,
    /// JSON value of `data`.
    pub data: String,
    /// Priority.
    pub priority: Priority,
    /// Queue for offline customers (delivery issue).
    pub persistent: bool,
    /// Time to live in seconds, if any.
    pub ttl: Option<u64>,
    /// RFC 3339 timestamp.
    pub timestamp: String,
    /// The sending customer, for events a client published.
    pub from: Option<String>,
    /// The publisher chose the id: a second publish with the same id inside the dedupe window
    /// is not delivered again (generated ids are unique and skip the check).
    pub idempotent: bool,
}

/// Where an event goes, as it appears on the wire to clients.
#[derive(Debug, Clone, Copy, Default)]
pub struct Via<'a> {
    /// The topic it was published to.
    pub topic: Option<&'a str>,
    /// Its offset in that topic.
    pub offset: Option<u64>,
    /// Its position in the customer's own stream (see [`cursor`]).
    pub cursor: Option<&'a str>,
}

impl Event {
    /// The JSON a client receives:
    /// `{"type","timestamp","data","priority","persistent","id"[,"topic","offset"][,"from"]}`.
    pub fn to_client_json(&self, via: Via<'_>) -> Vec<u8> {
        let mut out = Vec::with_capacity(128 + self.data.len());
        out.extend_from_slice(b"{\"type\":");
        push_json_str(&mut out, &self.kind);
        out.extend_from_slice(b",\"timestamp\":");
        push_json_str(&mut out, &self.timestamp);
        out.extend_from_slice(b",\"data\":");
        out.extend_from_slice(self.data.as_bytes());
        out.extend_from_slice(b",\"priority\":\"");
        out.extend_from_slice(self.priority.as_str().as_bytes());
        out.extend_from_slice(if self.persistent {
            b"\",\"persistent\":true"
        } else {
            b"\",\"persistent\":false"
        });
        out.extend_from_slice(b",\"id\":");
        push_json_str(&mut out, &self.id);
        if let Some(topic) = via.topic {
            out.extend_from_slice(b",\"topic\":");
            push_json_str(&mut out, topic);
        }
        if let Some(offset) = via.offset {
            out.extend_from_slice(b",\"offset\":");
            out.extend_from_slice(offset.to_string().as_bytes());
        }
        if let Some(cursor) = via.cursor {
            out.extend_from_slice(b",\"cursor\":");
            push_json_str(&mut out, cursor);
        }
        if let Some(from) = &self.from {
            out.extend_from_slice(b",\"from\":");
            push_json_str(&mut out, from);
        }
        out.push(b'}');
        out
    }

    /// The Server-Sent Events record: `event: <type>`, one `data:` line per line of the JSON
    /// data (a publisher's pretty-printed JSON stays one event; CR, LF and CRLF all end a line,
    /// as they do for EventSource, and can only be whitespace between JSON tokens, so blank
    /// pieces are dropped), and `id: <cursor>` when the
    /// event is on the customer's stream. Records without `id` leave the browser's
    /// Last-Event-ID as it was, so a resume always refers to the customer stream.
    pub fn to_sse(&self, id: Option<&str>) -> Vec<u8> {
        crate::sse::record(Some(&self.kind), &self.data, id)
    }

    /// Whether the event's time to live has passed `secs` seconds after it was accepted.
    pub fn expired_after(&self, secs: u64) -> bool {
        self.ttl.is_some_and(|ttl| secs >= ttl)
    }
}

/// The opaque position in a customer's stream: `<epoch>-<offset>`. The epoch changes when the
/// stream's stored events are lost (restart), so an old cursor is recognised as such.
pub fn cursor(epoch: &str, offset: u64) -> String {
    format!("{epoch}-{offset}")
}

/// Splits a cursor into `(epoch, offset)`; `None` when it is not one of ours.
pub fn parse_cursor(s: &str) -> Option<(&str, u64)> {
    let (epoch, offset) = s.rsplit_once('-')?;
    if epoch.is_empty() || epoch.contains(|c: char| c.is_whitespace() || c.is_control()) {
        return None;
    }
    Some((epoch, offset.parse().ok()?))
}

/// Appends `s` as a JSON string literal.
pub fn push_json_str(out: &mut Vec<u8>, s: &str) {
    serde_json::to_writer(&mut *out, s).expect("writing a str to a Vec cannot fail");
}

/// An event as backends send it in `POST /v1/publish`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventIn {
    /// Event type.
    #[serde(rename = "type")]
    pub kind: String,
    /// Any JSON value (default `{}`).
    #[serde(default)]
    pub data: Option<Box<RawValue>>,
    /// `low|normal|high|urgent`.
    #[serde(default)]
    pub priority: Option<String>,
    /// Queue for offline customers.
    #[serde(default)]
    pub persistent: bool,
    /// Seconds to live.
    #[serde(default)]
    pub ttl: Option<u64>,
    /// Idempotency id.
    #[serde(default)]
    pub id: Option<String>,
    /// Publisher's timestamp (RFC 3339); the server's time when absent.
    #[serde(default)]
    pub timestamp: Option<String>,
}

/// Why a publish request was refused (HTTP 400 with this code).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct InvalidEvent {
    /// Machine-readable code.
    pub code: crate::error::Code,
    /// Human-readable reason.
    pub message: String,
}

fn invalid(code: crate::error::Code, message: impl Into<String>) -> InvalidEvent {
    InvalidEvent {
        code,
        message: message.into(),
    }
}

/// Largest event type name; keeps frames and metrics labels bounded.
pub const MAX_TYPE_LEN: usize = 128;

impl EventIn {
    /// Validates and completes the event. `id` and `now` come from the engine when the publisher
    /// gave none.
    pub fn into_event(
        self,
        id: impl FnOnce() -> String,
        now: impl FnOnce() -> String,
    ) -> Result<Event, InvalidEvent> {
        validate_type(&self.kind)?;
        let priority = match self.priority.as_deref() {
            None => Priority::Normal,
            Some(p) => Priority::parse(p)
                .ok_or_else(|| invalid(Code::InvalidPriority, format!("unknown priority {p:?}")))?,
        };
        let given = self.id.filter(|s| !s.is_empty());
        if given.as_ref().is_some_and(|s| s.len() > 256) {
            return Err(invalid(Code::InvalidId, "event ids are at most 256 bytes"));
        }
        if self.ttl == Some(0) {
            return Err(invalid(Code::InvalidTtl, "ttl must be at least 1 second"));
        }
        Ok(Event {
            idempotent: given.is_some(),
            id: given.unwrap_or_else(id),
            kind: self.kind,
            data: self
                .data
                .map_or_else(|| "{}".to_owned(), |d| d.get().to_owned()),
            priority,
            persistent: self.persistent,
            ttl: self.ttl,
            timestamp: self.timestamp.unwrap_or_else(now),
            from: None,
        })
    }
}

/// Checks an event type name: non-empty, at most [`MAX_TYPE_LEN`] bytes, no control characters.
pub fn validate_type(kind: &str) -> Result<(), InvalidEvent> {
    if kind.is_empty() || kind.len() > MAX_TYPE_LEN || kind.chars().any(char::is_control) {
        return Err(invalid(
            Code::InvalidType,
            "event type must be 1-128 printable characters",
        ));
    }
    Ok(())
}

/// Checks a customer id (a token's `sub`, a publish target, a `send_message` recipient):
/// 1-256 bytes, no control characters. The same bound on every path: an id is stored
/// (receipts, presence, offline queues) and must not carry a message's worth of bytes.
pub fn validate_customer(id: &str) -> Result<(), InvalidEvent> {
    if id.is_empty() || id.len() > 256 || id.chars().any(char::is_control) {
        return Err(invalid(
            Code::InvalidCustomer,
            "customer ids are 1-256 bytes without control characters",
        ));
    }
    Ok(())
}

/// Checks a topic name: 1-256 bytes, no whitespace or control characters.
pub fn validate_topic(topic: &str) -> Result<(), InvalidEvent> {
    if topic.is_empty()
        || topic.len() > 256
        || topic.chars().any(|c| c.is_control() || c.is_whitespace())
    {
        return Err(invalid(
            Code::InvalidTopic,
            format!("invalid topic name {topic:?}"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_json_shape() {
        let ev: EventIn = serde_json::from_str(
            r#"{"type":"case_status_update","data":{"caseId":"C-1","s":"x\"y"},"priority":"high"}"#,
        )
        .unwrap();
        let ev = ev
            .into_event(|| "e1".into(), || "2026-01-01T00:00:00Z".into())
            .unwrap();
        let json = ev.to_client_json(Via {
            topic: Some("conversation:1"),
            offset: Some(7),
            cursor: None,
        });
        let v: serde_json::Value = serde_json::from_slice(&json).unwrap();
        assert_eq!(v["type"], "case_status_update");
        assert_eq!(v["data"]["s"], "x\"y");
        assert_eq!(v["priority"], "high");
        assert_eq!(v["persistent"], false);
        assert_eq!(v["id"], "e1");
        assert_eq!(v["topic"], "conversation:1");
        assert_eq!(v["offset"], 7);
        assert!(v.get("from").is_none());
        assert!(!ev.idempotent);
    }

    #[test]
    fn sse_records_and_cursors() {
        let ev: EventIn =
            serde_json::from_str(r#"{"type":"case_status_update","id":"x","data":{"a":1}}"#)
                .unwrap();
        let mut ev = ev.into_event(|| "g".into(), || "t".into()).unwrap();
        assert!(ev.idempotent);
        assert_eq!(
            ev.to_sse(Some("e.0.1-4")),
            b"event: case_status_update\ndata: {\"a\":1}\nid: e.0.1-4\n\n"
        );
        ev.data = "{\n  \"a\": 1\r\n}".into();
        assert_eq!(
            ev.to_sse(None),
            b"event: case_status_update\ndata: {\ndata:   \"a\": 1\ndata: }\n\n"
        );
        // A bare CR ends a line for EventSource too: it must never reach a data line.
        ev.data = "{\"a\":\r1}".into();
        assert_eq!(
            ev.to_sse(None),
            b"event: case_status_update\ndata: {\"a\":\ndata: 1}\n\n"
        );
        let c = cursor("19a.0.3", 42);
        assert_eq!(parse_cursor(&c), Some(("19a.0.3", 42)));
        assert_eq!(parse_cursor("nope"), None);
        assert_eq!(parse_cursor("-5"), None);
        assert_eq!(parse_cursor("a-b"), None);
    }

    #[test]
    fn rejects_bad_events() {
        let bad = |s: &str| {
            serde_json::from_str::<EventIn>(s)
                .map_err(|_| ())
                .and_then(|e| e.into_event(|| "i".into(), || "t".into()).map_err(|_| ()))
        };
        assert!(bad(r#"{"type":""}"#).is_err());
        assert!(bad(r#"{"type":"a","priority":"meh"}"#).is_err());
        assert!(bad(r#"{"type":"a","extra":1}"#).is_err());
        assert!(bad(r#"{"type":"a"}"#).is_ok());
        assert!(validate_topic("conversation:1").is_ok());
        assert!(validate_topic("a b").is_err());
    }
}
