//! A customer's delivery preferences (`update_preferences`): which event types it wants,
//! quiet hours in its time zone, and whether urgent events break through them. Validated
//! here. The engine applies the event types to everything sent to the customer itself
//! ([`Preferences::wants`]); quiet hours concern notifications (the push fallback), not an app
//! the customer has open.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Preferences; every field optional, an update replaces the fields it names.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Preferences {
    /// Event-type prefixes switched on (true) or off (false), e.g. `{"marketing_": false}`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event_types: Option<BTreeMap<String, bool>>,
    /// No notifications between `start` and `end` in `timeZone`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quiet_hours: Option<QuietHours>,
    /// Urgent events are delivered during quiet hours.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub urgent_override: Option<bool>,
}

/// A daily quiet period (it may wrap midnight: 22:00-07:00).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct QuietHours {
    /// `HH:MM`.
    pub start: String,
    /// `HH:MM`.
    pub end: String,
    /// An IANA zone name (`Asia/Kuala_Lumpur`, `UTC`) or a fixed offset (`+08:00`).
    pub time_zone: String,
}

fn hh_mm(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 5
        && b[2] == b':'
        && s[..2].parse::<u8>().is_ok_and(|h| h < 24)
        && s[3..].parse::<u8>().is_ok_and(|m| m < 60)
        && b[..2].iter().chain(&b[3..]).all(u8::is_ascii_digit)
}

fn zone(s: &str) -> bool {
    let offset = |s: &str| {
        let b = s.as_bytes();
        b.len() == 6 && (b[0] == b'+' || b[0] == b'-') && hh_mm(&s[1..])
    };
    // IANA names: `Area/Location[/More]` of letters, digits, `_`, `-`, `+`; or UTC/GMT.
    let iana = |s: &str| {
        matches!(s, "UTC" | "GMT")
            || (s.contains('/')
                && s.len() <= 64
                && s.split('/').all(|p| {
                    !p.is_empty()
                        && p.chars()
                            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '+'))
                }))
    };
    offset(s) || iana(s)
}

impl Preferences {
    /// Parses and validates an update (the `payload` of `update_preferences`).
    pub fn parse(json: &str) -> Result<Preferences, String> {
        let p: Preferences = serde_json::from_str(json).map_err(|e| e.to_string())?;
        if let Some(q) = &p.quiet_hours {
            if !hh_mm(&q.start) || !hh_mm(&q.end) {
                return Err("quietHours start and end are HH:MM".into());
            }
            if !zone(&q.time_zone) {
                return Err(format!(
                    "quietHours.timeZone {:?} is not an IANA zone or +HH:MM offset",
                    q.time_zone
                ));
            }
        }
        if p.event_types.as_ref().is_some_and(|m| m.len() > 100) {
            return Err("at most 100 eventTypes".into());
        }
        Ok(p)
    }

    /// Whether the customer wants events of type `kind`: the longest `eventTypes` prefix that
    /// matches decides (`{"case_": false, "case_urgent": true}` keeps `case_urgent_x`); a type
    /// no prefix matches is wanted.
    pub fn wants(&self, kind: &str) -> bool {
        let Some(types) = &self.event_types else {
            return true;
        };
        types
            .iter()
            .filter(|(prefix, _)| kind.starts_with(prefix.as_str()))
            .max_by_key(|(prefix, _)| prefix.len())
            .is_none_or(|(_, on)| *on)
    }

    /// Applies an update: the fields it names replace these.
    pub fn merge(&mut self, update: Preferences) {
        if update.event_types.is_some() {
            self.event_types = update.event_types;
        }
        if update.quiet_hours.is_some() {
            self.quiet_hours = update.quiet_hours;
        }
        if update.urgent_override.is_some() {
            self.urgent_override = update.urgent_override;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_matching_event_type_prefix_decides() {
        let p = Preferences::parse(
            r#"{"eventTypes":{"marketing_":false,"case_":false,"case_urgent":true}}"#,
        )
        .unwrap();
        assert!(!p.wants("marketing_promo"));
        assert!(!p.wants("case_status_update"));
        assert!(p.wants("case_urgent_escalation"));
        assert!(p.wants("chat_message"), "no prefix matches");
        assert!(
            Preferences::default().wants("marketing_promo"),
            "nothing stored"
        );
    }

    #[test]
    fn validates_and_merges() {
        let mut p = Preferences::parse(
            r#"{"eventTypes":{"marketing_":false},"quietHours":{"start":"22:00","end":"07:00","timeZone":"Asia/Kuala_Lumpur"},"urgentOverride":true}"#,
        )
        .unwrap();
        p.merge(Preferences::parse(r#"{"urgentOverride":false}"#).unwrap());
        assert_eq!(p.urgent_override, Some(false));
        assert_eq!(p.quiet_hours.as_ref().unwrap().end, "07:00");
        assert!(Preferences::parse(
            r#"{"quietHours":{"start":"25:00","end":"07:00","timeZone":"UTC"}}"#
        )
        .is_err());
        assert!(Preferences::parse(
            r#"{"quietHours":{"start":"22:00","end":"07:00","timeZone":"Mars Time"}}"#
        )
        .is_err());
        assert!(Preferences::parse(
            r#"{"quietHours":{"start":"22:00","end":"07:00","timeZone":"+08:00"}}"#
        )
        .is_ok());
        assert!(
            Preferences::parse(r#"{"colour":"blue"}"#).is_err(),
            "unknown fields are refused"
        );
    }
}
