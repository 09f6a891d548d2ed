//! The process's allocator: mimalloc, except that blocks of [`DIRECT_MIN`] bytes and more get
//! their own anonymous mapping, returned to the kernel when they are freed.
//!
//! Why: mimalloc keeps blocks of 10 KiB to 512 KiB in shared pages of 512 KiB and 4 MiB, and a
//! page goes back to the kernel only when all of its blocks are free. One long-lived block (a
//! histogram, a grown table) in such a page keeps every byte a burst of short-lived large
//! blocks touched there resident after the burst, for as long as the process runs: a minute
//! of abusive clients (ping floods, 60 KB messages, thousands of filters) left the process
//! about a quarter larger once they had gone. A mapping per large block costs an `mmap` and a
//! `munmap` (large blocks are rare: message reassembly, grown tables, parser buffers) and
//! gives all of it back as soon as it is freed.
//!
//! Live mappings are remembered in a fixed table, so that freeing tells them from mimalloc's
//! blocks by address and the number of mappings stays bounded (`vm.max_map_count` is 65,530 by
//! default): once [`MAX_DIRECT`] are live, or when `mmap` fails, large blocks come from
//! mimalloc as before. The table is static memory: the allocator must not allocate.

use std::alloc::{GlobalAlloc, Layout};
use std::sync::Mutex;

/// Blocks of this size and more are mapped directly.
pub const DIRECT_MIN: usize = 32 * 1024;
/// At most this many direct mappings are live at once; the rest come from mimalloc.
pub const MAX_DIRECT: usize = 1 << 14;
/// Slots of the open-addressing table (load factor at most one half).
const SLOTS: usize = 2 * MAX_DIRECT;
const PAGE: usize = 4096;

/// mimalloc, with large blocks in their own mappings (see the module's documentation).
pub struct Allocator;

static MI: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The alignment mimalloc's plain `mi_malloc` gives every block of at least this size (its
/// `MI_MAX_ALIGN_SIZE`; on 64-bit targets small blocks come in multiples of two words).
const MI_PLAIN_ALIGN: usize = 16;

/// Whether `layout` can use mimalloc's plain entry points (the rule of the C allocator, and of
/// Rust's own `System`). They matter for speed: `mi_malloc_aligned`, which `MiMalloc` always
/// calls, takes its fast path only while the page's free list has a block, and otherwise the
/// slow over-allocating path, where `mi_malloc` would first move the blocks freed since
/// (`local_free`) back into the list. A connection's queue, allocated for a frame and freed
/// once written, hit the slow path nearly every time (callgrind: ~250 instructions a round
/// trip, 17% of a shard's user-space instructions in fan-out).
fn plain(layout: &Layout) -> bool {
    layout.align() <= MI_PLAIN_ALIGN && layout.align() <= layout.size()
}
static TABLE: Mutex<Table> = Mutex::new(Table {
    slots: [0; SLOTS],
    live: 0,
});

/// Addresses of live direct mappings; 0 marks a free slot. Linear probing with backward-shift
/// deletion (no tombstones).
struct Table {
    slots: [usize; SLOTS],
    live: usize,
}

impl Table {
    fn home(addr: usize) -> usize {
        // Mappings are page-aligned: hash the page number (Fibonacci hashing).
        (addr / PAGE).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (usize::BITS - SLOTS.ilog2())
    }

    fn find(&self, addr: usize) -> Option<usize> {
        let mut i = Self::home(addr);
        loop {
            match self.slots[i] {
                0 => return None,
                a if a == addr => return Some(i),
                _ => i = (i + 1) % SLOTS,
            }
        }
    }

    /// False when the table is full.
    fn insert(&mut self, addr: usize) -> bool {
        if self.live >= MAX_DIRECT {
            return false;
        }
        let mut i = Self::home(addr);
        while self.slots[i] != 0 {
            i = (i + 1) % SLOTS;
        }
        self.slots[i] = addr;
        self.live += 1;
        true
    }

    fn remove_at(&mut self, mut hole: usize) {
        self.slots[hole] = 0;
        self.live -= 1;
        // Shift back every entry of the probe run that would no longer be found.
        let mut i = (hole + 1) % SLOTS;
        while self.slots[i] != 0 {
            let home = Self::home(self.slots[i]);
            // The entry at i may fill the hole if its home is not cyclically in (hole, i].
            let stays = if hole <= i {
                hole < home && home <= i
            } else {
                hole < home || home <= i
            };
            if !stays {
                self.slots[hole] = self.slots[i];
                self.slots[i] = 0;
                hole = i;
            }
            i = (i + 1) % SLOTS;
        }
    }

    /// Removes `addr` if it is a direct mapping; whether it was.
    fn remove(&mut self, addr: usize) -> bool {
        match self.find(addr) {
            Some(i) => {
                self.remove_at(i);
                true
            }
            None => false,
        }
    }
}

fn table() -> std::sync::MutexGuard<'static, Table> {
    // A panic cannot happen while the lock is held (no allocation, no indexing out of range),
    // but a poisoned table is still consistent: use it.
    TABLE.lock().unwrap_or_else(|e| e.into_inner())
}

fn mapped_len(size: usize) -> usize {
    size.div_ceil(PAGE) * PAGE
}

fn direct(layout: &Layout) -> bool {
    layout.size() >= DIRECT_MIN && layout.align() <= PAGE
}

/// A new direct mapping of `size` bytes (zeroed), or null when the table is full or the kernel
/// refuses.
fn map(size: usize) -> *mut u8 {
    // SAFETY: an anonymous private mapping at an address the kernel chooses touches no
    // existing memory.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            mapped_len(size),
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return std::ptr::null_mut();
    }
    if !table().insert(p as usize) {
        // SAFETY: `p` was mapped just above with this length and is not shared.
        unsafe { libc::munmap(p, mapped_len(size)) };
        return std::ptr::null_mut();
    }
    p.cast()
}

/// Unmaps a direct mapping already removed from the table.
///
/// # Safety
/// `ptr` and `size` are those of a live direct mapping that nothing uses any more.
unsafe fn unmap(ptr: *mut u8, size: usize) {
    // SAFETY: per the function's contract.
    unsafe { libc::munmap(ptr.cast(), mapped_len(size)) };
}

// SAFETY: every block comes either from mimalloc (and goes back to it) or from its own mapping
// recorded in the table (and is unmapped); the table tells them apart on free, since a live
// mapping's address is never also a live mimalloc block.
unsafe impl GlobalAlloc for Allocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if direct(&layout) {
            let p = map(layout.size());
            if !p.is_null() {
                return p;
            }
        }
        if plain(&layout) {
            // SAFETY: `layout.size()` is non-zero (the caller's contract); `plain` checked that
            // mi_malloc's alignment covers the layout's.
            return unsafe { libmimalloc_sys::mi_malloc(layout.size()) }.cast();
        }
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { MI.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if direct(&layout) {
            let p = map(layout.size()); // anonymous mappings are zeroed
            if !p.is_null() {
                return p;
            }
        }
        if plain(&layout) {
            // SAFETY: as in `alloc`.
            return unsafe { libmimalloc_sys::mi_zalloc(layout.size()) }.cast();
        }
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { MI.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if direct(&layout) && table().remove(ptr as usize) {
            // SAFETY: `ptr` was a live direct mapping of this size; the caller gives it up.
            unsafe { unmap(ptr, layout.size()) };
            return;
        }
        // SAFETY: not a direct mapping, so it came from mimalloc.
        unsafe { MI.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller guarantees `new_size`, rounded to `layout.align()`, fits isize.
        let new = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        let was_direct = direct(&layout) && table().find(ptr as usize).is_some();
        if was_direct && direct(&new) {
            // The table stays locked across the move: once mremap has released the old
            // address, another thread's mmap may get it, and its entry must not be the one
            // removed here.
            let mut t = table();
            // SAFETY: `ptr` is a live direct mapping of `layout.size()` bytes; MREMAP_MAYMOVE
            // either moves it whole or leaves it untouched on failure.
            let p = unsafe {
                libc::mremap(
                    ptr.cast(),
                    mapped_len(layout.size()),
                    mapped_len(new_size),
                    libc::MREMAP_MAYMOVE,
                )
            };
            if p == libc::MAP_FAILED {
                return std::ptr::null_mut();
            }
            if p.cast() != ptr {
                t.remove(ptr as usize);
                // One address out, one in: the count is unchanged, so this cannot fail.
                t.insert(p as usize);
            }
            return p.cast();
        }
        if !was_direct && !direct(&new) {
            if plain(&new) {
                // SAFETY: a live mimalloc block, resized by mimalloc; the caller gives it up.
                return unsafe { libmimalloc_sys::mi_realloc(ptr.cast(), new_size) }.cast();
            }
            // SAFETY: a mimalloc block, resized by mimalloc.
            return unsafe { MI.realloc(ptr, layout, new_size) };
        }
        // Between a mapping and mimalloc: a new block, a copy, the old block freed.
        // SAFETY: `new` is a valid non-zero layout (new_size > 0 per the caller's contract).
        let p = unsafe { self.alloc(new) };
        if !p.is_null() {
            // SAFETY: both blocks are live and distinct; the copy stays inside both.
            unsafe {
                std::ptr::copy_nonoverlapping(ptr, p, layout.size().min(new_size));
                self.dealloc(ptr, layout);
            }
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_finds_what_it_holds_after_removals_anywhere_in_a_probe_run() {
        let mut t = Table {
            slots: [0; SLOTS],
            live: 0,
        };
        // Addresses that collide in a few homes, so probe runs form and wrap.
        let addrs: Vec<usize> = (1..=3000).map(|i| i * PAGE * SLOTS).collect();
        for &a in &addrs {
            assert!(t.insert(a));
        }
        for (k, &a) in addrs.iter().enumerate() {
            if k % 3 == 0 {
                assert!(t.remove(a));
            }
        }
        for (k, &a) in addrs.iter().enumerate() {
            assert_eq!(t.find(a).is_some(), k % 3 != 0, "address {k}");
        }
        assert_eq!(t.live, 2000);
    }

    #[test]
    fn the_table_refuses_beyond_its_bound() {
        let mut t = Table {
            slots: [0; SLOTS],
            live: 0,
        };
        for i in 1..=MAX_DIRECT {
            assert!(t.insert(i * PAGE));
        }
        assert!(!t.insert((MAX_DIRECT + 1) * PAGE));
        assert!(t.remove(PAGE));
        assert!(t.insert((MAX_DIRECT + 1) * PAGE));
    }

    #[test]
    fn blocks_move_between_mappings_and_mimalloc_intact() {
        let a = Allocator;
        let small = Layout::from_size_align(1000, 8).unwrap();
        // SAFETY: layouts are valid; every block is freed with the layout it has.
        unsafe {
            let p = a.alloc(small);
            p.write_bytes(7, 1000);
            let p = a.realloc(p, small, 100_000); // mimalloc -> mapping
            assert!(table().find(p as usize).is_some());
            assert!((0..1000).all(|i| *p.add(i) == 7));
            p.add(99_999).write(9);
            let big = Layout::from_size_align(100_000, 8).unwrap();
            let p = a.realloc(p, big, 300_000); // mapping -> mapping
            assert!(table().find(p as usize).is_some());
            assert_eq!((*p, *p.add(99_999)), (7, 9));
            let bigger = Layout::from_size_align(300_000, 8).unwrap();
            let p = a.realloc(p, bigger, 500); // mapping -> mimalloc
            assert!(table().find(p as usize).is_none());
            assert!((0..500).all(|i| *p.add(i) == 7));
            a.dealloc(p, Layout::from_size_align(500, 8).unwrap());
            let z = a.alloc_zeroed(big);
            assert!((0..100_000).all(|i| *z.add(i) == 0));
            a.dealloc(z, big);
        }
    }
}
