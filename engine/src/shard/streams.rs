//! Customer streams: what a shard keeps for the customers it owns so that nothing promised is
//! lost across a reconnect.
//!
//! Invariants (all on the customer's owner shard, so no cross-shard race exists):
//! - every event addressed to a customer gets an offset from the shard's one counter, so a
//!   customer's offsets increase (with gaps: other customers share the counter). A cursor is
//!   `<shard epoch>-<offset>`; the epoch changes at restart, when stored events are lost.
//! - a persistent event is stored until acknowledged, its time to live passes, or the queue
//!   (`delivery.offline_queue`) overflows; the last two count as lost and mark `lost_upto`, so
//!   a cursor from before a loss is answered `recovered: false`.
//! - storing, delivering live, and replaying at connect all happen in the fan-out task's order
//!   or synchronously at registration: a connection sees each event once, stored ones first.
//! - a cursor a client sends back (resume, long-poll `since`) acknowledges everything up to it.

use std::{
    cell::RefCell,
    collections::VecDeque,
    rc::Rc,
    sync::atomic::Ordering::Relaxed,
    time::{Instant, SystemTime},
};

use ahash::AHashMap;
use bytes::Bytes;
use proto::{
    bus::Counts,
    event::{cursor, parse_cursor, Event, Via},
    ws::{server_frame, OpCode},
};

use super::{conn_state::accepts, notify::Notify, slab::ConnKey, Shard};

/// A stored persistent event.
pub struct Stored {
    /// Offset in the customer's stream.
    pub offset: u64,
    /// Event id (acks by id).
    pub id: Box<str>,
    /// Event type (stream filters).
    pub kind: Box<str>,
    /// Client JSON (with its cursor): WebSocket frames and long-poll bodies are made from it.
    pub json: Bytes,
    /// The SSE record.
    pub sse: Bytes,
    /// Unix seconds after which it is dropped.
    pub expires: u64,
}

/// One customer's stored events.
#[derive(Default)]
pub struct CustomerStream {
    /// Unacknowledged persistent events, by offset.
    pub log: VecDeque<Stored>,
    /// Highest offset of a persistent event lost unacknowledged.
    pub lost_upto: u64,
    /// Unix seconds of the last loss (an empty stream is kept a while to remember it).
    pub lost_at: u64,
    /// Highest offset stored (cluster mode: an event the queue stream republishes after a
    /// resume already read it is not delivered twice).
    pub seen_upto: u64,
}

impl CustomerStream {
    /// Drops expired events; returns how many.
    fn expire(&mut self, now: u64) -> u64 {
        let before = self.log.len();
        let mut lost = self.lost_upto;
        self.log.retain(|s| {
            let keep = s.expires > now;
            if !keep {
                lost = lost.max(s.offset);
            }
            keep
        });
        let n = (before - self.log.len()) as u64;
        if n > 0 {
            self.lost_upto = lost;
            self.lost_at = now;
        }
        n
    }

    /// Acknowledges every event up to `offset` of the types the client takes (a client
    /// filtering on `case_` has not seen the `message_` events below its cursor); returns how
    /// many.
    fn ack_upto(&mut self, offset: u64, accepts: impl Fn(&str) -> bool) -> u64 {
        let before = self.log.len();
        self.log.retain(|s| s.offset > offset || !accepts(&s.kind));
        (before - self.log.len()) as u64
    }
}

/// The customer streams a shard owns: one offset counter for all of them, the epoch that
/// makes their cursors, and each customer's stored events. A plain struct: the shard's glue
/// (live delivery, metrics, configuration) calls it, and the simulation drives it directly.
pub struct Streams {
    /// `<process epoch>.<shard>`: cursors from another epoch cannot be interpreted here.
    epoch: String,
    /// Last offset handed out.
    offset: u64,
    by_customer: AHashMap<Rc<str>, CustomerStream>,
    /// Cluster mode: offsets of persistent events are given by the cluster's queue stream
    /// (its sequences, under its epoch), not by this counter.
    external: bool,
}

/// What one reading of a customer's stored events found (see [`Streams::stored_after`]).
pub struct After<T> {
    /// The accepted events after the cursor, mapped, in offset order.
    pub items: Vec<T>,
    /// Offset of the first of them.
    pub first: Option<u64>,
    /// Everything after the cursor was still stored.
    pub recovered: bool,
    /// Events the cursor acknowledged.
    pub acked: u64,
    /// Events dropped because their time to live passed (lost).
    pub expired: u64,
}

impl Streams {
    /// Empty streams under `epoch`.
    pub fn new(epoch: String) -> Self {
        Streams {
            epoch,
            offset: 0,
            by_customer: AHashMap::default(),
            external: false,
        }
    }

    /// Cluster mode: from now on offsets are the queue stream's sequences, under `epoch`.
    /// What was stored under the process epoch is kept (its cursors stop resolving).
    pub fn adopt(&mut self, epoch: &str) {
        if !self.external || self.epoch != epoch {
            self.epoch = epoch.to_owned();
            self.external = true;
        }
    }

    /// Whether offsets come from the cluster's queue stream.
    pub fn is_external(&self) -> bool {
        self.external
    }

    /// Cluster mode: the offset (and cursor) of an event the queue stream numbered `seq`.
    pub fn observe(&mut self, seq: u64) -> (u64, String) {
        self.offset = self.offset.max(seq);
        (seq, cursor(&self.epoch, seq))
    }

    /// The stored events of `customer` after `offset`, in order.
    pub fn log_after(&self, customer: &str, offset: u64) -> impl Iterator<Item = &Stored> {
        self.by_customer
            .get(customer)
            .into_iter()
            .flat_map(|s| s.log.iter())
            .filter(move |s| s.offset > offset)
    }

    /// Highest offset ever stored for `customer` (0: none).
    pub fn seen_upto(&self, customer: &str) -> u64 {
        self.by_customer.get(customer).map_or(0, |s| s.seen_upto)
    }

    /// The offsets of the stored events of `customer` with these ids.
    pub fn offsets_of(&self, customer: &str, ids: &[String]) -> Vec<u64> {
        self.by_customer.get(customer).map_or_else(Vec::new, |s| {
            s.log
                .iter()
                .filter(|e| ids.iter().any(|i| **i == *e.id))
                .map(|e| e.offset)
                .collect()
        })
    }

    /// The epoch of this shard's cursors.
    pub fn epoch(&self) -> &str {
        &self.epoch
    }

    /// The cursor of the latest offset handed out.
    pub fn current_cursor(&self) -> String {
        cursor(&self.epoch, self.offset)
    }

    /// Hands out the next offset, with its cursor.
    pub fn next_offset(&mut self) -> (u64, String) {
        self.offset += 1;
        (self.offset, cursor(&self.epoch, self.offset))
    }

    /// Resolves a cursor a client sent: `Some(offset)` when it is from this epoch and not
    /// ahead of it, `None` when it cannot be interpreted here (older epoch, garbage).
    pub fn cursor_offset(&self, c: &str) -> Option<u64> {
        let (epoch, offset) = parse_cursor(c)?;
        // In a cluster another node may have handed out offsets this shard has not seen.
        (epoch == self.epoch && (offset <= self.offset || self.external)).then_some(offset)
    }

    /// Stores a persistent event for `customer` (its offset from [`Streams::next_offset`]); beyond
    /// `cap` stored events the oldest is dropped and remembered as lost. Returns how many.
    pub fn store(&mut self, customer: &str, event: Stored, cap: usize, now: u64) -> u64 {
        let stream = match self.by_customer.get_mut(customer) {
            Some(s) => s,
            None => self.by_customer.entry(Rc::from(customer)).or_default(),
        };
        stream.seen_upto = stream.seen_upto.max(event.offset);
        // Offsets arrive in order, except (cluster mode) events read back from the queue
        // stream at a resume, which may also be here already.
        match stream.log.back() {
            Some(last) if last.offset >= event.offset => {
                let at = stream.log.partition_point(|s| s.offset < event.offset);
                if stream.log.get(at).is_none_or(|s| s.offset != event.offset) {
                    stream.log.insert(at, event);
                }
            }
            _ => stream.log.push_back(event),
        }
        let mut lost = 0;
        while stream.log.len() > cap {
            let gone = stream.log.pop_front().expect("over cap");
            stream.lost_upto = stream.lost_upto.max(gone.offset);
            stream.lost_at = now;
            lost += 1;
        }
        lost
    }

    /// The one reading of a customer's stored events, for connections and long polls: drops
    /// expired ones, acknowledges what `since` covers (of the types `filters` take), and maps
    /// the accepted events after it.
    pub fn stored_after<T>(
        &mut self,
        customer: &str,
        since: Option<&str>,
        filters: &[Box<str>],
        now: u64,
        map: impl Fn(&Stored) -> T,
    ) -> After<T> {
        let since = since.map(|c| self.cursor_offset(c));
        let Some(stream) = self.by_customer.get_mut(customer) else {
            // Nothing stored: complete unless the cursor is not ours.
            return After {
                items: Vec::new(),
                first: None,
                recovered: !matches!(since, Some(None)),
                acked: 0,
                expired: 0,
            };
        };
        let expired = stream.expire(now);
        let mut acked = 0;
        let (from, recovered) = match since {
            None => (0, true),
            Some(Some(offset)) => {
                acked = stream.ack_upto(offset, |k| accepts(filters, k));
                (offset, offset >= stream.lost_upto)
            }
            Some(None) => (0, false),
        };
        let mut first = None;
        let items = stream
            .log
            .iter()
            .filter(|s| s.offset > from && accepts(filters, &s.kind))
            .map(|s| {
                first.get_or_insert(s.offset);
                map(s)
            })
            .collect();
        After {
            items,
            first,
            recovered,
            acked,
            expired,
        }
    }

    /// Cluster mode: drops stored events of `customer` the queue stream no longer has
    /// (acknowledged on another node, or expired there): not a loss here, the cluster's store
    /// decided. Returns how many.
    pub fn forget(&mut self, customer: &str, offsets: &[u64]) -> u64 {
        let Some(stream) = self.by_customer.get_mut(customer) else {
            return 0;
        };
        let before = stream.log.len();
        stream.log.retain(|s| !offsets.contains(&s.offset));
        (before - stream.log.len()) as u64
    }

    /// Acknowledges stored events of `customer` by id, by cursor, or up to a cursor; returns
    /// how many.
    pub fn ack(
        &mut self,
        customer: &str,
        ids: &[String],
        cursors: &[String],
        up_to: Option<&str>,
    ) -> u64 {
        let up_to = up_to.and_then(|c| self.cursor_offset(c));
        let offsets: Vec<u64> = cursors
            .iter()
            .filter_map(|c| self.cursor_offset(c))
            .collect();
        let Some(stream) = self.by_customer.get_mut(customer) else {
            return 0;
        };
        let mut acked = 0;
        if let Some(offset) = up_to {
            acked += stream.ack_upto(offset, |_| true);
        }
        let before = stream.log.len();
        stream
            .log
            .retain(|s| !offsets.contains(&s.offset) && !ids.iter().any(|i| **i == *s.id));
        acked + (before - stream.log.len()) as u64
    }

    /// Drops expired events, and the streams left empty of customers `connected` does not
    /// name (an empty stream is kept `keep_loss` seconds after a loss, while a cursor from
    /// before it can still come back). Returns how many events expired.
    pub fn sweep(&mut self, now: u64, keep_loss: u64, connected: impl Fn(&str) -> bool) -> u64 {
        let mut expired = 0;
        self.by_customer.retain(|id, s| {
            expired += s.expire(now);
            !s.log.is_empty()
                || connected(id)
                || (s.lost_upto > 0 && s.lost_at.saturating_add(keep_loss) > now)
        });
        expired
    }
}

/// A parked long-poll request.
#[derive(Default)]
pub struct Poller {
    /// Event-type prefixes it accepts; empty = all.
    pub filters: Vec<Box<str>>,
    /// Client JSON of the events handed to it.
    pub got: RefCell<Vec<Bytes>>,
    /// Woken on the first event (or a disconnect).
    pub notify: Notify,
}

impl Poller {
    fn accepts(&self, kind: &str) -> bool {
        accepts(&self.filters, kind)
    }
}

/// What a publisher-chosen id is unique within: the same id sent to topic `a`, customer `a`
/// and role `a` names three events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope<'a> {
    /// A topic (deduplicated once, on its owner).
    Topic(&'a str),
    /// A customer's own stream (on its owner).
    Customer(&'a str),
    /// A role (on every shard).
    Role(&'a str),
    /// Everyone (on every shard).
    Broadcast,
}

/// Publisher-chosen event ids seen recently, per target scope.
#[derive(Default)]
pub struct Dedupe {
    seen: AHashMap<Box<str>, u64>,
    order: VecDeque<(Box<str>, u64)>,
}

/// Most ids remembered per shard; beyond it the oldest are forgotten early.
const DEDUPE_CAP: usize = 200_000;

impl Dedupe {
    /// Records `(scope, id)`; false if it was seen inside the window.
    pub fn first(&mut self, scope: Scope<'_>, id: &str, now: u64, window: u64) -> bool {
        while let Some((k, at)) = self.order.front() {
            if *at + window > now && self.order.len() < DEDUPE_CAP {
                break;
            }
            if self.seen.get(k) == Some(at) {
                self.seen.remove(k);
            }
            self.order.pop_front();
        }
        // The kind's letter, then the name (no NUL: ids and names are validated text).
        let key: Box<str> = match scope {
            Scope::Topic(t) => format!("t{t}\u{0}{id}"),
            Scope::Customer(c) => format!("c{c}\u{0}{id}"),
            Scope::Role(r) => format!("r{r}\u{0}{id}"),
            Scope::Broadcast => format!("*\u{0}{id}"),
        }
        .into();
        if self.seen.get(&key).is_some_and(|at| at + window > now) {
            return false;
        }
        self.seen.insert(key.clone(), now);
        self.order.push_back((key, now));
        true
    }
}

/// Unix time in seconds.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// What a resume (connect with or without a cursor) found.
pub struct Resume {
    /// Everything after the cursor could be replayed.
    pub recovered: bool,
    /// The stored events to replay, encoded for the connection's transport.
    pub frames: Vec<Bytes>,
    /// The position before the first replayed event (a safe cursor for the client to keep).
    pub cursor: String,
}

/// The answer to `/v1/events/missed`.
pub struct Missed {
    /// Client JSON of the events, in order.
    pub events: Vec<Bytes>,
    /// The cursor to send as the next `since`.
    pub cursor: String,
    /// Everything after the given cursor was still stored.
    pub recovered: bool,
}

impl Shard {
    /// The cursor of the shard's latest customer-stream offset.
    pub fn current_cursor(&self) -> String {
        self.streams.borrow().current_cursor()
    }

    /// Whether `customer`'s stored preferences let events of type `kind` through (on its
    /// owner, where they are stored).
    pub(super) fn wants(&self, customer: &str, kind: &str) -> bool {
        self.preferences.borrow().wants(customer, kind)
    }

    /// On the owner: delivers an event to customers' own streams (live connections, parked
    /// long polls) and stores it if persistent. Runs in the fan-out task's order.
    pub(super) fn deliver_customers(
        &self,
        customers: &[String],
        event: &Event,
        published: Option<Instant>,
        seq: u64,
    ) -> Counts {
        let mut counts = Counts::default();
        let m = self.metrics();
        let now = unix_now();
        let window = self.shared.config.delivery.dedupe_window_secs;
        for id in customers {
            if event.idempotent
                && !self
                    .dedupe
                    .borrow_mut()
                    .first(Scope::Customer(id), &event.id, now, window)
            {
                counts.duplicates += 1;
                m.duplicates.fetch_add(1, Relaxed);
                continue;
            }
            if seq != 0 && seq <= self.streams.borrow().seen_upto(id) {
                // Cluster mode: read from the queue stream by a resume already (replayed).
                continue;
            }
            if !self.wants(id, &event.kind) {
                // Neither delivered nor stored: the customer switched this type off.
                counts.declined += 1;
                continue;
            }
            let keys: Vec<ConnKey> = {
                let conns = self.conns.borrow();
                self.registry
                    .borrow()
                    .of_customer(id)
                    .iter()
                    .copied()
                    // A connection still reading its stored events (cluster resume) gets a
                    // persistent one from the store, after them (others wait, held).
                    .filter(|k| {
                        conns.get(*k).is_some_and(|c| {
                            c.accepts(&event.kind) && !(c.resuming && event.persistent)
                        })
                    })
                    .collect()
            };
            let pollers: Vec<Rc<Poller>> = self
                .pollers
                .borrow()
                .get(id.as_str())
                .map(|l| {
                    l.iter()
                        .filter(|p| p.accepts(&event.kind))
                        .cloned()
                        .collect()
                })
                .unwrap_or_default();
            if keys.is_empty() && pollers.is_empty() && !event.persistent {
                counts.dropped += 1;
                m.offline_dropped.fetch_add(1, Relaxed);
                m.drops.fetch_add(1, Relaxed);
                continue;
            }
            let (offset, cur) = {
                let mut streams = self.streams.borrow_mut();
                if seq != 0 {
                    streams.observe(seq)
                } else if streams.is_external() {
                    // Not stored, not numbered: it carries the stream's position.
                    (streams.offset, streams.current_cursor())
                } else {
                    streams.next_offset()
                }
            };
            let json = Bytes::from(event.to_client_json(Via {
                cursor: Some(&cur),
                ..Via::default()
            }));
            let ws = server_frame(OpCode::Text, &json);
            let any_sse = {
                let conns = self.conns.borrow();
                keys.iter()
                    .any(|k| conns.get(*k).is_some_and(|c| c.life.is_sse()))
            };
            let sse = if any_sse || event.persistent {
                Bytes::from(event.to_sse(Some(&cur)))
            } else {
                Bytes::new()
            };
            let mut handed = false;
            {
                let mut conns = self.conns.borrow_mut();
                for key in keys {
                    let is_sse = conns.get(key).is_some_and(|c| c.life.is_sse());
                    let frame = if is_sse { &sse } else { &ws };
                    if self.enqueue(&mut conns, key, frame, published) {
                        handed = true;
                        counts.connection(is_sse);
                    } else {
                        counts.dropped += 1;
                    }
                }
            }
            for p in pollers {
                p.got.borrow_mut().push(json.clone());
                p.notify.notify();
                counts.poll += 1;
                handed = true;
                m.events_out.fetch_add(1, Relaxed);
            }
            if event.persistent {
                if !handed {
                    counts.queued += 1;
                    m.events_queued.fetch_add(1, Relaxed);
                }
                let ttl = event
                    .ttl
                    .unwrap_or(u64::MAX)
                    .min(self.shared.config.delivery.offline_ttl_secs);
                let stored = Stored {
                    offset,
                    id: event.id.as_str().into(),
                    kind: event.kind.as_str().into(),
                    json,
                    sse,
                    expires: now.saturating_add(ttl),
                };
                let cap = self.shared.config.delivery.offline_queue;
                let lost = self.streams.borrow_mut().store(id, stored, cap, now);
                m.stored_lost.fetch_add(lost, Relaxed);
            }
        }
        counts
    }

    /// Cluster mode, after a read of `customer`'s queue (`read_max` events at most) that
    /// began when this shard held `held` (its stored offsets after the read's start): what
    /// the read did not bring back is gone from the cluster's queue (acknowledged on another
    /// node, or expired) and is dropped here too; then the read's events are stored. Events
    /// that arrived during the read are not in `held` and stay.
    pub fn sync_fetched(
        &self,
        customer: &str,
        held: &[u64],
        fetched: &crate::shard::relay::Fetched,
        read_max: usize,
    ) {
        let events = &fetched.events;
        // A failed read says nothing; one cut short by its bound, nothing beyond its end.
        let bound = match events.last() {
            _ if !fetched.whole => 0,
            Some(last) if events.len() >= read_max => last.seq,
            _ => u64::MAX,
        };
        let gone: Vec<u64> = held
            .iter()
            .copied()
            .filter(|o| *o <= bound && !events.iter().any(|e| e.seq == *o))
            .collect();
        if !gone.is_empty() {
            self.streams.borrow_mut().forget(customer, &gone);
        }
        self.store_fetched(customer, events);
    }

    /// The offsets of `customer`'s stored events after `after` (see [`Shard::sync_fetched`]).
    pub fn held_after(&self, customer: &str, after: u64) -> Vec<u64> {
        self.streams
            .borrow()
            .log_after(customer, after)
            .map(|s| s.offset)
            .collect()
    }

    /// Cluster mode: keeps events read back from the queue stream (numbered by it) in the
    /// customer's store, beside those already here, so a resume replays them in order.
    pub fn store_fetched(&self, customer: &str, events: &[crate::shard::relay::Live]) {
        let now = unix_now();
        let cap = self.shared.config.delivery.offline_queue;
        let max_ttl = self.shared.config.delivery.offline_ttl_secs;
        for live in events {
            let e = &live.event;
            if !e.persistent || !self.wants(customer, &e.kind) {
                continue;
            }
            let (offset, cur) = self.streams.borrow_mut().observe(live.seq);
            let ttl = e.ttl.unwrap_or(u64::MAX).min(max_ttl);
            let stored = Stored {
                offset,
                id: e.id.as_str().into(),
                kind: e.kind.as_str().into(),
                json: Bytes::from(e.to_client_json(Via {
                    cursor: Some(&cur),
                    ..Via::default()
                })),
                sse: Bytes::from(e.to_sse(Some(&cur))),
                expires: live.stored.saturating_add(ttl),
            };
            if stored.expires > now {
                self.streams.borrow_mut().store(customer, stored, cap, now);
            }
        }
    }

    /// At registration of a customer's connection: acknowledges what the client's cursor
    /// covers (if any) and returns the stored events after it that the connection accepts, in
    /// order, to be queued right after the greeting. Synchronous with registration, so no live
    /// event can slip between the replay and the live stream.
    pub fn resume_customer(&self, key: ConnKey, customer: &str, since: Option<&str>) -> Resume {
        let conns = self.conns.borrow();
        let Some(c) = conns.get(key) else {
            return Resume {
                recovered: false,
                frames: Vec::new(),
                cursor: self.current_cursor(),
            };
        };
        let found = self.stored_after(customer, since, &c.filters, |s| {
            if c.life.is_sse() {
                s.sse.clone()
            } else {
                server_frame(OpCode::Text, &s.json)
            }
        });
        self.metrics()
            .replayed
            .fetch_add(found.items.len() as u64, Relaxed);
        let streams = self.streams.borrow();
        Resume {
            recovered: found.recovered,
            frames: found.items,
            cursor: match found.first {
                Some(f) => cursor(streams.epoch(), f - 1),
                None => streams.current_cursor(),
            },
        }
    }

    /// [`Streams::stored_after`] at the current time, counting what it acknowledged and
    /// what had expired.
    fn stored_after<T>(
        &self,
        customer: &str,
        since: Option<&str>,
        filters: &[Box<str>],
        map: impl Fn(&Stored) -> T,
    ) -> After<T> {
        let found =
            self.streams
                .borrow_mut()
                .stored_after(customer, since, filters, unix_now(), map);
        let m = self.metrics();
        m.stored_lost.fetch_add(found.expired, Relaxed);
        m.acks.fetch_add(found.acked, Relaxed);
        found
    }

    /// The stored events of `customer` after `offset` that connection `key` takes, encoded
    /// for its transport (nothing is acknowledged).
    pub fn stored_frames_after(&self, key: ConnKey, customer: &str, offset: u64) -> Vec<Bytes> {
        let conns = self.conns.borrow();
        let Some(c) = conns.get(key) else {
            return Vec::new();
        };
        self.streams
            .borrow()
            .log_after(customer, offset)
            .filter(|s| accepts(&c.filters, &s.kind))
            .map(|s| {
                if c.life.is_sse() {
                    s.sse.clone()
                } else {
                    server_frame(OpCode::Text, &s.json)
                }
            })
            .collect()
    }

    /// Queues frames on one connection (a replay: never held behind live frames) and
    /// flushes it.
    pub fn replay(&self, key: ConnKey, frames: &[Bytes]) {
        let mut conns = self.conns.borrow_mut();
        for f in frames {
            self.enqueue_to(&mut conns, key, f, None, false);
        }
        if let Some(c) = conns.get_mut(key) {
            self.flush_conn(c);
        }
    }

    /// Acknowledges stored events of `customer` by id, by cursor, or up to a cursor.
    pub fn ack(
        &self,
        customer: &str,
        ids: &[String],
        cursors: &[String],
        up_to: Option<&str>,
    ) -> u64 {
        let acked = self.streams.borrow_mut().ack(customer, ids, cursors, up_to);
        self.metrics().acks.fetch_add(acked, Relaxed);
        acked
    }

    /// `/v1/events/missed`: stored events after `since` (all stored ones without), accepted by
    /// `filters`; `since` acknowledges everything up to it.
    pub fn missed(&self, customer: &str, since: Option<&str>, filters: &[Box<str>]) -> Missed {
        let found = self.stored_after(customer, since, filters, |s| s.json.clone());
        Missed {
            events: found.items,
            cursor: self.current_cursor(),
            recovered: found.recovered,
        }
    }

    /// Drops expired stored events and empty streams of customers with no connection.
    pub(super) fn sweep_streams(&self) {
        let registry = self.registry.borrow();
        let expired = self.streams.borrow_mut().sweep(
            unix_now(),
            self.shared.config.delivery.offline_ttl_secs,
            |id| registry.is_connected(id),
        );
        self.metrics().stored_lost.fetch_add(expired, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::{Dedupe, Scope, Stored, Streams};

    fn stored(offset: u64) -> Stored {
        Stored {
            offset,
            id: format!("e{offset}").into(),
            kind: "t".into(),
            json: bytes::Bytes::new(),
            sse: bytes::Bytes::new(),
            expires: u64::MAX,
        }
    }

    #[test]
    fn forgetting_what_the_cluster_no_longer_holds_is_not_a_loss() {
        let mut s = Streams::new("e".into());
        s.adopt("jq1");
        for o in [3, 5, 9] {
            s.store("gus", stored(o), 10, 0);
        }
        assert_eq!(s.forget("gus", &[5, 7]), 1);
        assert_eq!(s.forget("nobody", &[3]), 0);
        let left: Vec<u64> = s.log_after("gus", 0).map(|e| e.offset).collect();
        assert_eq!(left, [3, 9]);
        // A cursor from before still resumes complete: nothing was lost.
        let after = s.stored_after("gus", Some("jq1-2"), &[], 100, |e: &Stored| e.offset);
        assert!(after.recovered);
        assert_eq!(after.items, [3, 9]);
    }

    #[test]
    fn cluster_offsets_come_from_the_queue_and_reads_merge_in_order_once() {
        let mut s = Streams::new("p.0".into());
        s.adopt("jq1");
        assert!(s.is_external());
        // Live events, then a resume's read that overlaps and precedes them.
        for seq in [10, 14] {
            let (offset, cursor) = s.observe(seq);
            assert_eq!(cursor, format!("jq1-{seq}"));
            s.store("c", stored(offset), 50, 0);
        }
        for seq in [3, 10, 12] {
            s.store("c", stored(seq), 50, 0);
        }
        let after = s.stored_after("c", None, &[], 0, |e| e.offset);
        assert_eq!(after.items, [3, 10, 12, 14]);
        assert_eq!(s.seen_upto("c"), 14);
        // Another node may have numbered further than this shard has seen: still ours.
        assert_eq!(s.cursor_offset("jq1-99"), Some(99));
        assert_eq!(s.cursor_offset("p.0-1"), None);
        assert_eq!(s.offsets_of("c", &["e12".into(), "e7".into()]), [12]);
    }

    #[test]
    fn an_id_is_unique_within_its_kind_of_target_and_name() {
        let mut d = Dedupe::default();
        let scopes = [
            Scope::Topic("a"),
            Scope::Customer("a"),
            Scope::Role("a"),
            Scope::Broadcast,
            Scope::Topic("b"),
        ];
        for s in scopes {
            assert!(d.first(s, "evt-1", 100, 60), "{s:?}: first time");
        }
        for s in scopes {
            assert!(!d.first(s, "evt-1", 110, 60), "{s:?}: a repeat");
        }
        assert!(
            d.first(Scope::Topic("a"), "evt-1", 161, 60),
            "after the window"
        );
    }
}
