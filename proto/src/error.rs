//! The machine-readable error codes ringcast sends: in a client `error` message
//! (`{"type": "error", "code", ...}`) and in an API error body (`{"error": {"code", ...}}`).
//! One enum, so a code cannot be misspelt at a call site and the documented list
//! (docs/protocol.md) can be checked against it.

use std::fmt;

macro_rules! codes {
    ($($(#[doc = $doc:literal])* $name:ident = $text:literal,)*) => {
        /// An error code.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum Code {
            $($(#[doc = $doc])* $name,)*
        }

        impl Code {
            /// Every code, in declaration order.
            pub const ALL: &'static [Code] = &[$(Code::$name,)*];

            /// The code as it appears on the wire.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Code::$name => $text,)*
                }
            }
        }
    };
}

codes! {
    /// Not JSON, or nested too deeply.
    BadJson = "bad_json",
    /// A required field is missing or has the wrong shape.
    BadRequest = "bad_request",
    /// A client message `type` the protocol does not have.
    UnknownType = "unknown_type",
    /// Binary WebSocket frames.
    Unsupported = "unsupported",
    /// A topic name that is empty, too long or has control characters.
    InvalidTopic = "invalid_topic",
    /// An event type name that is empty, too long or has control characters.
    InvalidType = "invalid_type",
    /// A customer id that is empty, over 256 bytes or has control characters.
    InvalidCustomer = "invalid_customer",
    /// An event id over 256 bytes.
    InvalidId = "invalid_id",
    /// A priority other than low, normal, high, urgent.
    InvalidPriority = "invalid_priority",
    /// A ttl under one second.
    InvalidTtl = "invalid_ttl",
    /// A disconnect close code ringcast does not send.
    InvalidCode = "invalid_code",
    /// The subscription would pass `limits.topics_per_connection`.
    TooManyTopics = "too_many_topics",
    /// The subscription would pass `limits.filters_per_connection`.
    TooManyFilters = "too_many_filters",
    /// The token or key does not allow it.
    Forbidden = "forbidden",
    /// Typing in a topic the connection is not subscribed to.
    NotMember = "not_member",
    /// The topic has its namespace's `max_subscribers`.
    TopicFull = "topic_full",
    /// The request did not complete in time.
    Timeout = "timeout",
    /// A publish without any target.
    NoTarget = "no_target",
    /// A publish naming more targets than allowed.
    TooManyTargets = "too_many_targets",
    /// A WebSocket upgrade request that is not a valid handshake.
    BadHandshake = "bad_handshake",
    /// A request body over the limit.
    BodyTooLarge = "body_too_large",
    /// `Transfer-Encoding: chunked` request bodies.
    ChunkedNotSupported = "chunked_not_supported",
    /// A path ringcast does not serve.
    NotFound = "not_found",
    /// A method the path does not take.
    MethodNotAllowed = "method_not_allowed",
    /// Presence is switched off for the topic's namespace.
    PresenceOff = "presence_off",
    /// Too many requests or connections from one address.
    RateLimited = "rate_limited",
    /// The process has `limits.max_connections`.
    ServerFull = "server_full",
    /// Another shard did not answer in time.
    ShardTimeout = "shard_timeout",
    /// A publish held while delivery was behind (`server.max_fanout_lag_ms`) for 5 s and not
    /// accepted: nothing of it was stored or delivered; send it again later.
    Overloaded = "overloaded",
    /// Cluster mode: the event store (JetStream) did not take the event, so it was not
    /// published (or, with several topics, not to all of them). Retrying with a
    /// publisher-chosen id is safe.
    Unavailable = "unavailable",
    /// The customer has its `limits.connections_per_customer`.
    TooManyConnections = "too_many_connections",
    /// A missing or wrong API key.
    Unauthorized = "unauthorized",
    /// No token in the request.
    MissingToken = "missing_token",
    /// A token that does not verify (signature, algorithm, shape, `nbf`).
    InvalidToken = "invalid_token",
    /// A token past its `exp`.
    TokenExpired = "token_expired",
    /// A token for another issuer or audience.
    WrongIssuerOrAudience = "wrong_issuer_or_audience",
    /// A browser `Origin` not in `auth.allowed_origins`.
    OriginRefused = "origin_refused",
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Compares with the wire form, as tests and logs read it.
impl PartialEq<&str> for Code {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl serde::Serialize for Code {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::Code;

    /// docs/protocol.md is the contract: every code ringcast can send is explained there.
    #[test]
    fn every_code_is_documented() {
        let doc = include_str!("../../docs/protocol.md");
        let missing: Vec<&str> = Code::ALL
            .iter()
            .map(|c| c.as_str())
            .filter(|c| !doc.contains(&format!("`{c}`")))
            .collect();
        assert!(missing.is_empty(), "not in docs/protocol.md: {missing:?}");
    }
}
