//! Events: what backends publish and clients receive, and their one-time JSON encoding.
//!
//! An event is encoded once per publish into the JSON a client sees (and then once into a
//! WebSocket frame), whatever the number of receivers.

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
}

/// Where an event goes, as it appears on the wire to clients.
#[derive(Debug, Clone, Copy, Default)]
pub struct Via<'a> {
    /// The topic it was published to.
    pub topic: Option<&'a str>,
    /// Its offset in that topic.
    pub offset: Option<u64>,
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
        if let Some(from) = &self.from {
            out.extend_from_slice(b",\"from\":");
            push_json_str(&mut out, from);
        }
        out.push(b'}');
        out
    }
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
    pub code: &'static str,
    /// Human-readable reason.
    pub message: String,
}

fn invalid(code: &'static str, message: impl Into<String>) -> InvalidEvent {
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
                .ok_or_else(|| invalid("invalid_priority", format!("unknown priority {p:?}")))?,
        };
        Ok(Event {
            id: self.id.filter(|s| !s.is_empty()).unwrap_or_else(id),
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
            "invalid_type",
            "event type must be 1-128 printable characters",
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
            "invalid_topic",
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
