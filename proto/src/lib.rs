//! Sans-IO protocol logic for ringcast.
//!
//! This crate decides every byte ringcast reads or writes and does nothing else: no sockets, no
//! clock, no executor. The engine feeds it bytes and the current time and acts on what it
//! returns.
//!
//! - [`http1`]: request heads ([`http1::parse_head`]), the routing decision ([`http1::route`])
//!   and responses.
//! - [`ws`]: WebSocket handshake, frame codec, masking and the receive state machine
//!   ([`ws::Receiver`]).
//! - [`client`]: the client JSON protocol (`{type, payload, requestId}`), parsed with simd-json.
//! - [`event`]: events and their one-time JSON encoding; [`api`]: the backend API bodies.
//! - [`json`]: the nesting bound every untrusted JSON document passes first.
//! - [`lifecycle`]: one connection's life (heartbeats, idle timeout, close with a deadline),
//!   the same for WebSocket and SSE.
//! - [`auth`]: JWT verification with a pinned algorithm, and topic permission globs.
//! - [`bus`]: rkyv-encoded messages between shards.
//! - [`fuzz`]: one entry point per parser of untrusted bytes, for fuzzers and corpus replay.
//! - [`placement`]: which shard owns a customer or a topic (jump consistent hash).
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod api;
pub mod auth;
// rkyv derives `Archived*` twins of the documented types without docs of their own.
#[allow(missing_docs)]
pub mod bus;
pub mod client;
pub mod error;
#[allow(missing_docs)]
pub mod event;
pub mod fuzz;
pub mod http1;
pub mod json;
pub mod lifecycle;
pub mod placement;
pub mod prefs;
pub mod proxy;
pub mod sse;
pub mod ws;
