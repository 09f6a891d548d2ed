//! Who is connected to a shard: each customer's connections (all on its owner shard) and the
//! connections holding each role. A plain struct: the shard registers and unregisters through
//! it, and deliveries to a customer or a role read it.

use std::rc::Rc;

use ahash::AHashMap;

use super::{slab::ConnKey, Subscribers};

/// The shard's indexes of connections by customer and by role.
#[derive(Default)]
pub struct Registry {
    /// Customer -> its connections, in the order they came.
    customers: AHashMap<Rc<str>, Vec<ConnKey>>,
    /// Role -> connections whose token holds it. Copy-on-write, so a fan-out iterates a
    /// snapshot across yields while connections come and go.
    roles: AHashMap<Rc<str>, Subscribers>,
}

impl Registry {
    /// Adds connection `key` of `customer`, holding `roles`; returns how many connections
    /// the customer has now.
    pub fn add(&mut self, key: ConnKey, customer: &Rc<str>, roles: &[String]) -> usize {
        let list = self.customers.entry(customer.clone()).or_default();
        // Exact growth: most customers have one connection.
        list.reserve_exact(1);
        list.push(key);
        let open = list.len();
        for role in roles {
            Rc::make_mut(self.roles.entry(Rc::from(role.as_str())).or_default()).push(key);
        }
        open
    }

    /// Removes connection `key` of `customer`, holding `roles`; returns how many connections
    /// the customer has left.
    pub fn remove(&mut self, key: ConnKey, customer: &str, roles: &[String]) -> usize {
        let mut open = 0;
        if let Some(list) = self.customers.get_mut(customer) {
            list.retain(|k| *k != key);
            open = list.len();
            if list.is_empty() {
                self.customers.remove(customer);
            }
        }
        for role in roles {
            if let Some(list) = self.roles.get_mut(role.as_str()) {
                Rc::make_mut(list).retain(|k| *k != key);
                if list.is_empty() {
                    self.roles.remove(role.as_str());
                }
            }
        }
        open
    }

    /// The connections of `customer` (none if it has none here).
    pub fn of_customer(&self, customer: &str) -> &[ConnKey] {
        self.customers.get(customer).map_or(&[], Vec::as_slice)
    }

    /// Whether `customer` has a connection here.
    pub fn is_connected(&self, customer: &str) -> bool {
        self.customers.contains_key(customer)
    }

    /// A snapshot of the connections holding `role`.
    pub fn role(&self, role: &str) -> Option<Subscribers> {
        self.roles.get(role).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indexes_follow_connections_and_forget_the_empty() {
        let (a1, a2, b) = (
            ConnKey::from_bits(1),
            ConnKey::from_bits(2),
            ConnKey::from_bits(3),
        );
        let (alice, bob): (Rc<str>, Rc<str>) = ("alice".into(), "bob".into());
        let nurse = vec!["nurse".to_string()];
        let mut r = Registry::default();
        assert_eq!(r.add(a1, &alice, &nurse), 1);
        assert_eq!(r.add(a2, &alice, &[]), 2);
        assert_eq!(r.add(b, &bob, &nurse), 1);
        assert_eq!(r.of_customer("alice"), &[a1, a2]);
        let snapshot = r.role("nurse").expect("two nurses");
        assert_eq!(*snapshot, vec![a1, b]);
        assert_eq!(r.remove(a1, "alice", &nurse), 1);
        // A snapshot taken before is not changed under its reader.
        assert_eq!(*snapshot, vec![a1, b]);
        assert_eq!(*r.role("nurse").unwrap(), vec![b]);
        assert_eq!(r.remove(b, "bob", &nurse), 0);
        assert!(r.role("nurse").is_none(), "an empty role is forgotten");
        assert!(
            !r.is_connected("bob"),
            "a customer with no connection is forgotten"
        );
        assert!(r.is_connected("alice"));
        assert_eq!(r.remove(a2, "alice", &[]), 0);
        assert_eq!(r.of_customer("alice"), &[] as &[ConnKey]);
        // Removing what is not there changes nothing.
        assert_eq!(r.remove(a2, "alice", &nurse), 0);
    }
}
