//! Connections without a task. A connection (WebSocket or SSE) whose socket is parked in the
//! shard's epoll set (`shard::park`) and has nothing to read needs nothing from the executor:
//! its task ends, and what the task held (the session and the socket) waits in the
//! connection's slot (`Conn::dormant`). That is most of an idle connection's memory: a task is
//! glommio's header plus a future sized for the largest state the connection's code can be in,
//! where the saved state is only what an idle connection has.
//!
//! Whatever would have woken the task (the parking thread reporting the socket readable, the
//! timer wheel, a close, a full backlog) calls `Conn::wake`, which for a dormant connection
//! queues its key (kept in the saved state) with [`woken`] instead. The shard's revive task takes the saved state out of
//! the slot and spawns the connection's task again, which carries on where the old one
//! stopped. Writes never need the task (fan-out sends directly on the socket), so delivering
//! to a dormant connection wakes nothing.

use std::{
    cell::{Cell, RefCell},
    future::poll_fn,
    rc::Rc,
    task::{Poll, Waker},
};

use super::{conn_state::Driver, slab::ConnKey, Shard};

thread_local! {
    /// Keys of dormant connections woken since the revive task last ran (this shard's thread).
    static WOKEN: RefCell<Vec<u64>> = const { RefCell::new(Vec::new()) };
    /// The revive task's waker while it waits.
    static REVIVER: Cell<Option<Waker>> = const { Cell::new(None) };
}

/// Queues a dormant connection's key for the revive task (`Conn::wake`). Only the shard that
/// owns a connection wakes it, so the key lands in that shard's queue.
pub(crate) fn woken(key: ConnKey) {
    WOKEN.with(|w| w.borrow_mut().push(key.to_bits()));
    if let Some(w) = REVIVER.take() {
        w.wake();
    }
}

/// Waits until keys were woken, then swaps them into `into` (emptied first).
async fn next_woken(into: &mut Vec<u64>) {
    into.clear();
    poll_fn(|cx| {
        WOKEN.with(|w| std::mem::swap(&mut *w.borrow_mut(), into));
        if into.is_empty() {
            REVIVER.set(Some(cx.waker().clone()));
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await
}

impl Shard {
    /// Ends a connection's task: its state waits in the slot until something wakes it. Only
    /// the task itself removes its slot (`unregister`, as it finishes), so the slot is there;
    /// were it not, the connection would already be finished and the state is dropped.
    pub(crate) fn go_dormant(&self, key: ConnKey, state: Box<crate::conn::Dormant>) {
        if let Some(c) = self.conns.borrow_mut().get_mut(key) {
            c.driver = Driver::Dormant(state);
            self.metrics()
                .dormant
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Gives woken dormant connections a task again. A key may be woken several times before
    /// this runs, or after its connection got a task back: only the first finds saved state.
    pub(super) async fn revive_task(self: Rc<Self>) {
        let mut keys = Vec::new();
        loop {
            next_woken(&mut keys).await;
            for &bits in &keys {
                let state = self
                    .conns
                    .borrow_mut()
                    .get_mut(ConnKey::from_bits(bits))
                    .and_then(|c| c.driver.take_dormant());
                if let Some(state) = state {
                    self.metrics()
                        .dormant
                        .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                    glommio::spawn_local(crate::conn::revive(self.clone(), state)).detach();
                }
            }
        }
    }
}
