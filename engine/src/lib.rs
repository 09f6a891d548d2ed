//! The ringcast engine: a thread-per-core real-time delivery server on glommio.
//!
//! - [`shard`]: one pinned executor per core; connection registry, topic ownership, fan-out,
//!   the shard mesh and the timer wheel. [`shard::start`] is the entry point.
//! - [`conn`]: a connection's life: request head, routing, authentication, handoff to the owner
//!   shard, then the WebSocket driver or the backend API.
//! - [`config`]: settings from defaults, TOML, environment and flags.
//! - [`metrics`]: per-shard counters and the Prometheus/JSON renderings.
//! - [`limits`]: protection limits (attempts per address, connections per customer, message
//!   rate, connection cap) and the audit log.
//! - [`io`]: the few system calls glommio lacks; all `unsafe` code lives there.
//! - [`cli`]: `ringcast serve` and `ringcast token`.

#![deny(unsafe_code)]

pub mod cli;
pub mod cluster;
pub mod config;
pub mod conn;
pub mod faults;
#[allow(unsafe_code)]
pub mod io;
pub mod limits;
pub mod metrics;
pub mod shard;
