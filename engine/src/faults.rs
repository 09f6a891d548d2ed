//! Faults the integration tests inject into a debug build, for behaviour that only a failing
//! peer shows: `RINGCAST_FAULTS=<name>,<name>` in the server's environment. Release builds
//! compile them out: there [`active`] is a constant `false` and the variable is ignored.
//!
//! - `mute_topic_owners`: a topic's owner never answers a subscription (an owner that is
//!   stalled or, in a cluster, a node that is gone), so the subscriber waits until its
//!   deadline or until the connection is asked to close.
//! - `stall_fanout=<ms>`: every fan-out round waits this long before it writes (a shard
//!   that cannot keep up), so the publish API's bound on the fan-out's lag can be seen.

/// The injected faults, as written in `RINGCAST_FAULTS`.
#[cfg(debug_assertions)]
fn faults() -> &'static [String] {
    static FAULTS: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    FAULTS.get_or_init(|| {
        std::env::var("RINGCAST_FAULTS")
            .unwrap_or_default()
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect()
    })
}

/// Whether the fault `name` is injected.
#[cfg(debug_assertions)]
pub fn active(name: &str) -> bool {
    faults().iter().any(|f| f == name)
}

/// The number given to the fault `name` (`name=<n>`), if it is injected.
#[cfg(debug_assertions)]
pub fn value(name: &str) -> Option<u64> {
    faults()
        .iter()
        .find_map(|f| f.strip_prefix(name)?.strip_prefix('=')?.parse().ok())
}

/// Whether the fault `name` is injected: never, in a release build.
#[cfg(not(debug_assertions))]
#[inline(always)]
pub fn active(_name: &str) -> bool {
    false
}

/// The number given to the fault `name`: never injected in a release build.
#[cfg(not(debug_assertions))]
#[inline(always)]
pub fn value(_name: &str) -> Option<u64> {
    None
}
