//! Bounds on untrusted JSON before any parser sees it.
//!
//! simd-json's borrowed values, serde_json's `Value` and re-encoding both recurse once per
//! nesting level, and a shard thread's stack holds a few thousand levels: one 17 KB message of
//! `[[[[...]]]]` would abort the process. [`check_depth`] counts nesting in a single pass without
//! recursion, so every parser behind it sees at most `max` levels.

/// Nesting allowed in a client message: the envelope (1), `payload` (2), `data` (3) leaves the
/// application 29 levels of its own, far more than any event needs.
pub const MAX_CLIENT_DEPTH: usize = 32;

/// Nesting allowed in a backend API body: a batch (1), its events (2), `event` (3), `data` (4)
/// leaves the backend 60 levels.
pub const MAX_API_DEPTH: usize = 64;

/// JSON nested deeper than allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("JSON nested deeper than {max} levels")]
pub struct TooDeep {
    /// The limit that was exceeded.
    pub max: usize,
}

/// Checks that `bytes` never opens more than `max` arrays or objects at once. Brackets inside
/// strings do not count. Malformed JSON passes (the parser that follows reports it); this only
/// guarantees the depth that parser will see.
pub fn check_depth(bytes: &[u8], max: usize) -> Result<(), TooDeep> {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &b in bytes {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return Err(TooDeep { max });
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_nesting_outside_strings() {
        assert!(check_depth(br#"{"a":[1,{"b":[]}]}"#, 4).is_ok());
        assert_eq!(
            check_depth(br#"{"a":[1,{"b":[]}]}"#, 3),
            Err(TooDeep { max: 3 })
        );
        // Brackets and escaped quotes inside strings are text.
        assert!(check_depth(br#"{"a":"[[[[\"[[[["}"#, 1).is_ok());
        let deep = format!("{}{}", "[".repeat(8750), "]".repeat(8750));
        assert!(check_depth(deep.as_bytes(), MAX_CLIENT_DEPTH).is_err());
        let ok = format!("{}{}", "[".repeat(32), "]".repeat(32));
        assert!(check_depth(ok.as_bytes(), MAX_CLIENT_DEPTH).is_ok());
    }
}
