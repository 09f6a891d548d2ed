//! Connection storage: a slab with generation-checked keys.
//!
//! Fan-out holds [`ConnKey`]s, not references; a key whose connection has gone (and whose slot
//! may have been reused) simply fails to resolve.

use super::conn_state::Conn;

/// Index and generation of a connection slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnKey {
    idx: u32,
    gen: u32,
}

#[derive(Default)]
struct Slot {
    gen: u32,
    conn: Option<Conn>,
}

/// The shard's connections.
#[derive(Default)]
pub struct Slab {
    slots: Vec<Slot>,
    free: Vec<u32>,
    len: usize,
}

impl Slab {
    /// Stores a connection and returns its key.
    pub fn insert(&mut self, conn: Conn) -> ConnKey {
        self.len += 1;
        if let Some(idx) = self.free.pop() {
            let slot = &mut self.slots[idx as usize];
            slot.gen = slot.gen.wrapping_add(1);
            slot.conn = Some(conn);
            ConnKey { idx, gen: slot.gen }
        } else {
            self.slots.push(Slot {
                gen: 0,
                conn: Some(conn),
            });
            ConnKey {
                idx: (self.slots.len() - 1) as u32,
                gen: 0,
            }
        }
    }

    /// Removes a connection.
    pub fn remove(&mut self, key: ConnKey) -> Option<Conn> {
        let slot = self.slots.get_mut(key.idx as usize)?;
        if slot.gen != key.gen {
            return None;
        }
        let conn = slot.conn.take()?;
        self.free.push(key.idx);
        self.len -= 1;
        Some(conn)
    }

    /// The connection behind `key`, if it is still there.
    pub fn get_mut(&mut self, key: ConnKey) -> Option<&mut Conn> {
        let slot = self.slots.get_mut(key.idx as usize)?;
        if slot.gen == key.gen {
            slot.conn.as_mut()
        } else {
            None
        }
    }

    /// Number of connections.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are no connections.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of slots (an upper bound for [`Slab::key_at`]).
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// The key of the connection in slot `idx`, if occupied (broadcast walks slots by index so it
    /// can yield between chunks).
    pub fn key_at(&self, idx: usize) -> Option<ConnKey> {
        let slot = self.slots.get(idx)?;
        slot.conn.as_ref().map(|_| ConnKey {
            idx: idx as u32,
            gen: slot.gen,
        })
    }
}
