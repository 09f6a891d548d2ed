//! The backend API's request and response bodies (`POST /v1/publish`, `/v1/publish/batch`).

use crate::error::Code;
use serde::{Deserialize, Serialize};

use crate::event::{validate_customer, validate_topic, Event, EventIn, InvalidEvent};

/// Body of `POST /v1/publish`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishIn {
    /// Customer ids: each receives the event on its own stream.
    #[serde(default)]
    pub customers: Vec<String>,
    /// Topics.
    #[serde(default)]
    pub topics: Vec<String>,
    /// Roles (`physician` or `role:physician`).
    #[serde(default)]
    pub roles: Vec<String>,
    /// Every connected customer.
    #[serde(default)]
    pub broadcast: bool,
    /// The event.
    pub event: EventIn,
    /// What the answer waits for (default: `accepted`).
    #[serde(default)]
    pub wait: Wait,
}

/// What a publish waits for before the API answers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Wait {
    /// The event is ordered and stored where it must be: every topic's owner has numbered
    /// it (and kept it in the history), every target customer's owner has stored or
    /// delivered it. Deliveries to topic subscribers, roles and broadcast go on after the
    /// answer, so the publisher is not held for the time a large fan-out takes.
    #[default]
    Accepted,
    /// Every shard has queued the event on its receivers: the delivery counts are complete.
    Delivered,
}

/// A validated publish: targets and the event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    /// Customer targets.
    pub customers: Vec<String>,
    /// Topic targets.
    pub topics: Vec<String>,
    /// Role names, without the `role:` prefix.
    pub roles: Vec<String>,
    /// Broadcast to everyone.
    pub broadcast: bool,
    /// The event.
    pub event: Event,
}

/// Parses a backend API body: the nesting bound first ([`crate::json::MAX_API_DEPTH`]),
/// then serde. The error is the message of a 400 `bad_json`.
pub fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, String> {
    crate::json::check_depth(body, crate::json::MAX_API_DEPTH).map_err(|e| e.to_string())?;
    serde_json::from_slice(body).map_err(|e| e.to_string())
}

/// Most targets in one publish: bounds the work one request can cause.
pub const MAX_TARGETS: usize = 10_000;

impl PublishIn {
    /// Validates the request.
    pub fn validate(
        self,
        id: impl FnOnce() -> String,
        now: impl FnOnce() -> String,
    ) -> Result<Publish, InvalidEvent> {
        let n = self.customers.len() + self.topics.len() + self.roles.len();
        if n == 0 && !self.broadcast {
            return Err(InvalidEvent {
                code: Code::NoTarget,
                message: "give customers, topics, roles or broadcast".into(),
            });
        }
        if n > MAX_TARGETS {
            return Err(InvalidEvent {
                code: Code::TooManyTargets,
                message: format!("at most {MAX_TARGETS} targets per publish"),
            });
        }
        for t in &self.topics {
            validate_topic(t)?;
        }
        for c in &self.customers {
            validate_customer(c)?;
        }
        let roles = self
            .roles
            .into_iter()
            .map(|r| r.strip_prefix("role:").map(str::to_owned).unwrap_or(r))
            .collect();
        Ok(Publish {
            customers: self.customers,
            topics: self.topics,
            roles,
            broadcast: self.broadcast,
            event: self.event.into_event(id, now)?,
        })
    }
}

/// Response of `POST /v1/disconnect`: connections closed per transport (`poll`: parked long
/// polls returned).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct DisconnectOut {
    /// Closed connections.
    pub closed: Delivered,
}

/// Response of `GET /v1/preferences/customers/{id}`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PreferencesOut<'a> {
    /// The customer.
    pub customer_id: &'a str,
    /// Its stored preferences (all fields empty when it stored none).
    pub preferences: &'a crate::prefs::Preferences,
}

/// Per-transport delivery counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivered {
    /// Frames queued to WebSocket connections.
    pub websocket: u64,
    /// Records queued to SSE streams.
    pub sse: u64,
    /// Events handed to long-poll requests.
    pub poll: u64,
}

/// Response of `POST /v1/publish`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishOut {
    /// The event id.
    pub id: String,
    /// Deliveries per transport.
    pub delivered: Delivered,
    /// Persistent events queued for offline customers.
    pub queued: u64,
    /// Events dropped (offline customers, non-persistent; slow consumers).
    pub dropped: u64,
    /// Targets that already had this publisher-chosen id inside the dedupe window.
    #[serde(default)]
    pub duplicates: u64,
    /// Customer targets whose preferences switch this event type off.
    #[serde(default)]
    pub declined: u64,
    /// Each target topic's offset for this event (absent for a repeated id).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub offsets: std::collections::BTreeMap<String, u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disconnect_and_preferences_bodies() {
        let d = DisconnectOut {
            closed: Delivered {
                websocket: 2,
                sse: 1,
                poll: 0,
            },
        };
        assert_eq!(
            serde_json::to_string(&d).unwrap(),
            r#"{"closed":{"websocket":2,"sse":1,"poll":0}}"#
        );
        let prefs = crate::prefs::Preferences::default();
        let body = serde_json::to_value(PreferencesOut {
            customer_id: "alice",
            preferences: &prefs,
        })
        .unwrap();
        assert_eq!(
            body,
            serde_json::json!({"customerId": "alice", "preferences": serde_json::to_value(&prefs).unwrap()})
        );
    }
}
