//! Customers' delivery preferences, kept on each customer's owner shard (where all its
//! connections and parked polls are, so every delivery to it can consult them without a hop).
//! The value and its rules (`wants`, `merge`, validation) are `proto::prefs`; this is the
//! store.

use std::rc::Rc;

use ahash::AHashMap;
use proto::prefs::Preferences;

/// Preferences by customer; a customer that never set any wants everything.
#[derive(Default)]
pub struct PrefStore {
    by_customer: AHashMap<Rc<str>, Preferences>,
}

impl PrefStore {
    /// Applies `update` to `customer`'s preferences (the fields it names replace the stored
    /// ones) and returns the result.
    pub fn update(&mut self, customer: &Rc<str>, update: Preferences) -> &Preferences {
        let p = self.by_customer.entry(customer.clone()).or_default();
        p.merge(update);
        p
    }

    /// `customer`'s stored preferences, if it set any.
    pub fn get(&self, customer: &str) -> Option<&Preferences> {
        self.by_customer.get(customer)
    }

    /// Whether `customer` wants events of type `kind`.
    pub fn wants(&self, customer: &str, kind: &str) -> bool {
        self.get(customer).is_none_or(|p| p.wants(kind))
    }

    /// No customer here has set preferences (delivery skips the lookups).
    pub fn is_empty(&self) -> bool {
        self.by_customer.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn update(json: &str) -> Preferences {
        Preferences::parse(json).unwrap()
    }

    #[test]
    fn each_customer_gets_what_it_asked_for_and_others_everything() {
        let mut s = PrefStore::default();
        assert!(s.is_empty() && s.wants("alice", "marketing_x"));
        let alice: Rc<str> = "alice".into();
        s.update(&alice, update(r#"{"eventTypes":{"marketing_":false}}"#));
        assert!(!s.is_empty());
        assert!(!s.wants("alice", "marketing_x"));
        assert!(s.wants("alice", "case_opened"));
        assert!(s.wants("bob", "marketing_x"), "bob set nothing");
    }

    #[test]
    fn an_update_replaces_only_the_fields_it_names() {
        let mut s = PrefStore::default();
        let alice: Rc<str> = "alice".into();
        s.update(&alice, update(r#"{"eventTypes":{"marketing_":false}}"#));
        let p = s.update(&alice, update(r#"{"urgentOverride":true}"#));
        assert_eq!(p.urgent_override, Some(true));
        assert!(!s.wants("alice", "marketing_x"), "event types kept");
        s.update(&alice, update(r#"{"eventTypes":{}}"#));
        assert!(s.wants("alice", "marketing_x"), "replaced by an empty map");
        assert_eq!(s.get("alice").unwrap().urgent_override, Some(true));
    }
}
