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

/// An API error: its HTTP status and the body `{"error": {"code", "message"}}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// The HTTP status it is answered with (not in the body).
    pub status: u16,
    /// The machine-readable code.
    pub code: Code,
    /// What went wrong, for a human.
    pub message: String,
}

impl ApiError {
    /// An error answered with `status`.
    pub fn new(status: u16, code: Code, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }
}

impl Serialize for ApiError {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Detail<'a> {
            code: Code,
            message: &'a str,
        }
        #[derive(Serialize)]
        struct Body<'a> {
            error: Detail<'a>,
        }
        Body {
            error: Detail {
                code: self.code,
                message: &self.message,
            },
        }
        .serialize(s)
    }
}

/// One entry of `POST /v1/publish/batch`'s answer, in request order: the publish's result,
/// or the error it alone got.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum BatchResult {
    /// Published (the body `POST /v1/publish` would have answered).
    Published(PublishOut),
    /// Refused (the error body `POST /v1/publish` would have answered).
    Failed(ApiError),
}

/// Response of `POST /v1/publish/batch`.
#[derive(Debug, Serialize)]
pub struct BatchOut {
    /// One result per event, in request order.
    pub results: Vec<BatchResult>,
}

/// One shard's line in `GET /v1/stats`.
#[derive(Debug, Clone, Copy, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ShardStats {
    /// Shard index.
    pub shard: usize,
    /// Open client connections.
    pub connections: i64,
    /// Messages written.
    pub messages_out: u64,
}

/// Response of `GET /v1/stats`: process totals (docs/operations.md names each).
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
#[allow(missing_docs)] // each field is the Prometheus counter of the same meaning
pub struct StatsOut {
    pub uptime_secs: u64,
    pub connections: i64,
    pub handshakes: u64,
    pub auth_failures: u64,
    pub limit_refusals: u64,
    pub messages_in: u64,
    pub messages_out: u64,
    pub events_out: u64,
    pub bytes_out: u64,
    pub drops: u64,
    pub sse_connections: i64,
    pub polls_waiting: i64,
    pub parked_connections: i64,
    pub events_queued: u64,
    pub stored_lost: u64,
    pub offline_dropped: u64,
    pub duplicates: u64,
    pub acks: u64,
    pub replayed: u64,
    pub slow_consumer_closes: u64,
    pub publishes: u64,
    /// Resident set size, when the platform tells it.
    pub resident_bytes: Option<u64>,
    /// Live heap bytes (builds with the `alloc-stats` feature only).
    pub heap_bytes: Option<i64>,
    /// Per shard.
    pub shards: Vec<ShardStats>,
}

/// One histogram of `GET /v1/stats/histograms`, in microseconds.
#[derive(Debug, Clone, Serialize)]
pub struct HistogramOut {
    /// Recorded values.
    pub count: u64,
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p999: u64,
    /// Largest value.
    pub max: u64,
    /// The whole histogram: HdrHistogram V2 + DEFLATE, base64 (readable by HdrHistogram's
    /// log tools).
    pub histogram: String,
}

/// Response of `GET /v1/stats/histograms`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HistogramsOut {
    /// Always `microseconds`.
    pub unit: &'static str,
    /// How `histogram` is encoded.
    pub encoding: &'static str,
    /// From a publish's arrival to the write that carries it to a subscriber.
    pub publish_to_write: HistogramOut,
    /// WebSocket handshakes, from the first byte of the request to the 101.
    pub handshake: HistogramOut,
    /// `POST /v1/publish` and `/v1/publish/batch`, from the request's head parsed to its
    /// response written: the server's share of a publisher's round trip.
    pub publish_answer: HistogramOut,
}

impl HistogramsOut {
    /// The unit and encoding every answer names.
    pub fn new(
        publish_to_write: HistogramOut,
        handshake: HistogramOut,
        publish_answer: HistogramOut,
    ) -> Self {
        HistogramsOut {
            unit: "microseconds",
            encoding: "HdrHistogram V2 compressed (DEFLATE), base64",
            publish_to_write,
            handshake,
            publish_answer,
        }
    }
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

    #[test]
    fn error_and_batch_bodies() {
        let e = ApiError::new(400, Code::BadJson, "expected value");
        assert_eq!(
            serde_json::to_string(&e).unwrap(),
            r#"{"error":{"code":"bad_json","message":"expected value"}}"#
        );
        let batch = BatchOut {
            results: vec![
                BatchResult::Published(PublishOut {
                    id: "e1".into(),
                    queued: 1,
                    ..PublishOut::default()
                }),
                BatchResult::Failed(e),
            ],
        };
        assert_eq!(
            serde_json::to_string(&batch).unwrap(),
            concat!(
                r#"{"results":[{"id":"e1","delivered":{"websocket":0,"sse":0,"poll":0},"#,
                r#""queued":1,"dropped":0,"duplicates":0,"declined":0},"#,
                r#"{"error":{"code":"bad_json","message":"expected value"}}]}"#
            )
        );
    }

    #[test]
    fn stats_and_histogram_bodies() {
        let stats = StatsOut {
            uptime_secs: 3,
            connections: 2,
            resident_bytes: Some(1024),
            shards: vec![ShardStats {
                shard: 0,
                connections: 2,
                messages_out: 5,
            }],
            ..StatsOut::default()
        };
        let v = serde_json::to_value(&stats).unwrap();
        assert_eq!(v["uptimeSecs"], 3);
        assert_eq!(v["residentBytes"], 1024);
        assert_eq!(v["heapBytes"], serde_json::Value::Null);
        assert_eq!(v["slowConsumerCloses"], 0);
        assert_eq!(
            v["shards"],
            serde_json::json!([{"shard": 0, "connections": 2, "messagesOut": 5}])
        );
        assert_eq!(v.as_object().unwrap().len(), 24);
        let h = HistogramOut {
            count: 1,
            p50: 2,
            p90: 3,
            p99: 4,
            p999: 5,
            max: 6,
            histogram: "SGlz".into(),
        };
        assert_eq!(
            serde_json::to_string(&HistogramsOut::new(h.clone(), h.clone(), h)).unwrap(),
            concat!(
                r#"{"unit":"microseconds","encoding":"HdrHistogram V2 compressed (DEFLATE), base64","#,
                r#""publishToWrite":{"count":1,"p50":2,"p90":3,"p99":4,"p999":5,"max":6,"histogram":"SGlz"},"#,
                r#""handshake":{"count":1,"p50":2,"p90":3,"p99":4,"p999":5,"max":6,"histogram":"SGlz"},"#,
                r#""publishAnswer":{"count":1,"p50":2,"p90":3,"p99":4,"p999":5,"max":6,"histogram":"SGlz"}}"#
            )
        );
    }
}
