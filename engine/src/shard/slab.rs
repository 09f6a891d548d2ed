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

impl ConnKey {
    /// The key as one number (the parking thread's epoll tokens).
    pub fn to_bits(self) -> u64 {
        (self.gen as u64) << 32 | self.idx as u64
    }

    /// The key from [`ConnKey::to_bits`].
    pub fn from_bits(bits: u64) -> ConnKey {
        ConnKey {
            idx: bits as u32,
            gen: (bits >> 32) as u32,
        }
    }
}

#[derive(Default)]
struct Slot {
    gen: u32,
    conn: Option<Conn>,
}

/// Slots per chunk. Chunks of fixed size (rather than one doubling `Vec`) keep the unused
/// capacity under one chunk: at 10k connections a doubling vector would carry ~60% empty slots.
const CHUNK: usize = 1024;

/// The shard's connections.
#[derive(Default)]
pub struct Slab {
    chunks: Vec<Box<[Slot]>>,
    n_slots: usize,
    free: Vec<u32>,
    len: usize,
}

impl Slab {
    /// Stores a connection and returns its key.
    pub fn insert(&mut self, conn: Conn) -> ConnKey {
        self.len += 1;
        if let Some(idx) = self.free.pop() {
            let slot = self.slot_mut(idx as usize).expect("free slots exist");
            slot.gen = slot.gen.wrapping_add(1);
            slot.conn = Some(conn);
            return ConnKey { idx, gen: slot.gen };
        }
        if self.n_slots == self.chunks.len() * CHUNK {
            self.chunks
                .push((0..CHUNK).map(|_| Slot::default()).collect());
        }
        let idx = self.n_slots;
        self.n_slots += 1;
        self.slot_mut(idx).expect("just allocated").conn = Some(conn);
        ConnKey {
            idx: idx as u32,
            gen: 0,
        }
    }

    fn slot(&self, idx: usize) -> Option<&Slot> {
        if idx >= self.n_slots {
            return None;
        }
        self.chunks.get(idx / CHUNK).map(|c| &c[idx % CHUNK])
    }

    fn slot_mut(&mut self, idx: usize) -> Option<&mut Slot> {
        if idx >= self.n_slots {
            return None;
        }
        self.chunks
            .get_mut(idx / CHUNK)
            .map(|c| &mut c[idx % CHUNK])
    }

    /// Removes a connection.
    pub fn remove(&mut self, key: ConnKey) -> Option<Conn> {
        let slot = self.slot_mut(key.idx as usize)?;
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
        let slot = self.slot_mut(key.idx as usize)?;
        if slot.gen == key.gen {
            slot.conn.as_mut()
        } else {
            None
        }
    }

    /// The connection behind `key`, if it is still there (read-only).
    pub fn get(&self, key: ConnKey) -> Option<&Conn> {
        let idx = key.idx as usize;
        if idx >= self.n_slots {
            return None;
        }
        let slot = &self.chunks.get(idx / CHUNK)?[idx % CHUNK];
        if slot.gen == key.gen {
            slot.conn.as_ref()
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
        self.n_slots
    }

    /// The key of the connection in slot `idx`, if occupied (broadcast walks slots by index so it
    /// can yield between chunks).
    pub fn key_at(&self, idx: usize) -> Option<ConnKey> {
        let slot = self.slot(idx)?;
        slot.conn.as_ref().map(|_| ConnKey {
            idx: idx as u32,
            gen: slot.gen,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(fd: i32) -> Conn {
        Conn::new(fd, "c".into(), 0, 1024)
    }

    #[test]
    fn keys_are_generation_checked_across_chunks() {
        let mut slab = Slab::default();
        let keys: Vec<ConnKey> = (0..(CHUNK as i32 + 10))
            .map(|i| slab.insert(conn(i)))
            .collect();
        assert_eq!(slab.len(), CHUNK + 10);
        assert_eq!(slab.get_mut(keys[CHUNK + 5]).unwrap().fd, CHUNK as i32 + 5);
        let old = keys[3];
        assert_eq!(slab.remove(old).unwrap().fd, 3);
        assert!(slab.get_mut(old).is_none());
        let new = slab.insert(conn(99));
        assert_eq!(new.idx, old.idx, "slot reused");
        assert!(
            slab.get_mut(old).is_none(),
            "stale key does not reach the new connection"
        );
        assert_eq!(slab.get_mut(new).unwrap().fd, 99);
        assert!(slab.key_at(CHUNK + 10).is_none());
        assert_eq!(slab.key_at(3), Some(new));
    }
}
