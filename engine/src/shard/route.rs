//! The receiving half of routing: subscriptions waiting for their owner's answer, delivery
//! reports, and the fan-out task, which runs every delivery that reaches this shard (from
//! whichever broker) in arrival order and queues the shared frames on local connections.

use std::{future::Future as _, rc::Rc, sync::atomic::Ordering::Relaxed, time::Instant};

use futures_channel::oneshot;
use proto::{
    bus::{Counts, Position, ShardMsg, Target, TopicOffset},
    event::{Event, Via},
    ws::{server_frame, OpCode},
};

use super::{
    countdown::Countdown,
    slab::ConnKey,
    streams::{unix_now, Scope},
    Frame, Shard,
};

/// Frames of one event, encoded once per transport.
#[derive(Clone, Debug)]
pub struct Payload {
    /// The WebSocket text frame.
    pub ws: Frame,
    /// The SSE record.
    pub sse: Frame,
}

impl Payload {
    /// Encodes an event for both transports.
    pub fn of(event: &Event, via: Via<'_>) -> Payload {
        Payload {
            ws: server_frame(OpCode::Text, &event.to_client_json(via)),
            sse: Frame::from(event.to_sse(None)),
        }
    }
}

/// A delivery to topic subscribers, role members or everyone, waiting for the fan-out task.
pub struct DeliverJob {
    /// Receivers.
    pub target: Target,
    /// Event type (customer-stream filters).
    pub kind: String,
    /// Event id.
    pub id: String,
    /// The publisher chose the id (deduplicate).
    pub idempotent: bool,
    /// The shared frames.
    pub payload: Payload,
    /// Shard awaiting the report.
    pub origin: usize,
    /// Report request id (0: no report).
    pub req: u64,
    /// When the publish was accepted.
    pub published: Option<Instant>,
}

/// Work for the fan-out task, run strictly in arrival order: that order is what makes
/// per-topic order, and the exact switch from replay to live at a subscription.
pub enum Job {
    /// Topic, role or broadcast delivery.
    Deliver(DeliverJob),
    /// Events for customers owned here.
    Customers {
        /// Customers.
        customers: Vec<String>,
        /// The event.
        event: Event,
        /// Shard awaiting the report.
        origin: usize,
        /// Report request id.
        req: u64,
        /// When the publish was accepted.
        published: Option<Instant>,
        /// Its offset in the customers' streams when the cluster's queue gave it one (0:
        /// this shard numbers it).
        seq: u64,
    },
    /// A topic owner's answer to a subscription: replay, then add the subscriber.
    Subscribed {
        /// The subscription's request id.
        req: u64,
        /// The topic's last offset.
        offset: u64,
        /// The topic's epoch.
        epoch: String,
        /// Whether the replay is complete.
        recovered: bool,
        /// Missed events (client JSON).
        replay: Vec<Vec<u8>>,
        /// Refused: the topic is full.
        full: bool,
    },
    /// An ephemeral event (typing, presence diff) for the local subscribers of a topic. It
    /// waits in the same queue as topic events, so it never overtakes one that arrived
    /// before it.
    Ephemeral {
        /// The topic.
        topic: String,
        /// The customer whose own connections do not get it (the sender).
        except: String,
        /// The encoded frames.
        payload: Payload,
    },
    /// Receipts for events sent by customers owned here (see `Shard::handle_receipts`).
    Receipts {
        /// Event ids.
        ids: Vec<String>,
        /// The customer confirming.
        by: String,
        /// Delivered or read.
        status: proto::client::ReceiptStatus,
        /// Topics the confirming customer is a member of.
        topics: Vec<String>,
    },
    /// Close customers' connections.
    Disconnect {
        /// Customers.
        customers: Vec<String>,
        /// Close code.
        code: u16,
        /// Shard awaiting the report.
        origin: usize,
        /// Report request id.
        req: u64,
    },
}

/// What the shards reported about a request: the summed counts and, for a publish, the
/// offsets its topics' owners gave the event.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Summed counts.
    pub counts: Counts,
    /// One per topic whose owner numbered the event.
    pub offsets: Vec<TopicOffset>,
}

/// Whom a topic's owner reports a publish to.
#[derive(Debug, Clone, Copy)]
pub struct ReportTo {
    /// The shard that took the publish.
    pub origin: usize,
    /// Its request id (0: nobody waits).
    pub req: u64,
    /// The origin waits for the deliveries too: forwarded events carry the request id.
    pub deliveries: bool,
}

/// A decoded `ShardMsg::Interest`.
pub(super) struct Interest<'a> {
    pub topic: &'a str,
    pub from: usize,
    pub on: bool,
    pub req: u64,
    pub since: Option<(u64, &'a str)>,
    pub last: u32,
    pub member: &'a str,
}

/// How a subscription ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Joined {
    /// Subscribed: the topic's offset and epoch, and whether the replay was complete.
    Yes(u64, String, bool),
    /// Refused: the topic has its namespace's `max_subscribers`.
    Full,
    /// The owner did not answer in time (the subscription completes when it does).
    Timeout,
}

/// Connections visited between checks for preemption during a fan-out.
const CHUNK: usize = 256;

/// Subscription requests a connection has in flight at once (see `subscribe_topics`).
const SUBSCRIBE_WINDOW: usize = 8;

/// How long a shard waits for another shard's answer before going on with what it has.
const ANSWER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Another shard's answer, or None after [`ANSWER_TIMEOUT`].
pub(super) async fn answer<T>(rx: oneshot::Receiver<T>) -> Option<T> {
    let timeout = async {
        glommio::timer::sleep(ANSWER_TIMEOUT).await;
        Err(oneshot::Canceled)
    };
    futures_lite::future::or(rx, timeout).await.ok()
}

impl Shard {
    /// Registers a request sent to `owners` topic owners (each reports how many shards it
    /// forwarded to) and to `leaves` shards that report directly.
    pub(super) fn expect_reports(
        &self,
        owners: u32,
        leaves: u32,
    ) -> (u64, oneshot::Receiver<Outcome>) {
        let req = self.next_req();
        let left = Countdown::new(owners, leaves);
        let rx = self
            .reports
            .borrow_mut()
            .open(req, left, Outcome::default());
        (req, rx)
    }

    /// Waits for the reports of `req` (5 s at most; then what was reported).
    pub(super) async fn await_reports(&self, req: u64, rx: oneshot::Receiver<Outcome>) -> Outcome {
        match answer(rx).await {
            Some(outcome) => outcome,
            None => {
                tracing::warn!(shard = self.id, "delivery report timed out");
                self.reports.borrow_mut().give_up(req).unwrap_or_default()
            }
        }
    }

    /// Subscribes a connection to topics: asks every owner at once for its topic's position
    /// (and the events after `since`); the fan-out task, at each owner's answer, queues the
    /// replay and adds the subscriber, so each live stream starts exactly after its replay.
    /// Resolves, in request order, to each topic's interned name and `(offset, epoch,
    /// recovered)`, or [`Joined::Timeout`] for owners that did not answer within 5 s, or
    /// before the connection was asked to close (those subscriptions complete whenever the
    /// owners answer). Pair with [`Shard::hold`] and
    /// [`Shard::confirm`] so the confirmation goes out before any live event.
    pub async fn subscribe_topics(
        &self,
        key: ConnKey,
        requests: &[(&str, Option<Position>, u32)],
        member: &str,
    ) -> Vec<(Rc<str>, Joined)> {
        let deadline = Instant::now() + ANSWER_TIMEOUT;
        let mut out = Vec::with_capacity(requests.len());
        // A window of owners asked at once: a connection naming many topics does not hold
        // a subscription's worth of state for each of them at the same moment.
        for window in requests.chunks(SUBSCRIBE_WINDOW) {
            out.extend(self.subscribe_window(key, window, member, deadline).await);
        }
        out
    }

    async fn subscribe_window(
        &self,
        key: ConnKey,
        requests: &[(&str, Option<Position>, u32)],
        member: &str,
        deadline: Instant,
    ) -> Vec<(Rc<str>, Joined)> {
        let waiting: Vec<_> = requests
            .iter()
            .map(|(topic, since, last)| {
                self.request_subscription(key, topic, since.clone(), *last, member)
            })
            .collect();
        let (names, mut pending): (Vec<_>, Vec<_>) = waiting.into_iter().unzip();
        let mut answers: Vec<Option<Joined>> = vec![None; names.len()];
        let mut timeout = std::pin::pin!(glommio::timer::sleep(
            deadline.saturating_duration_since(Instant::now())
        ));
        // Every answer, the deadline, or the connection closing (a close request or a dead
        // socket wakes this task): whichever comes first.
        std::future::poll_fn(|cx| {
            let closing = self
                .conns
                .borrow()
                .get(key)
                .is_none_or(|c| !c.life.is_open());
            let mut all = true;
            for (answer, rx) in answers.iter_mut().zip(&mut pending) {
                if answer.is_none() {
                    match std::pin::Pin::new(rx).poll(cx) {
                        std::task::Poll::Ready(got) => {
                            *answer = Some(got.unwrap_or(Joined::Timeout))
                        }
                        std::task::Poll::Pending => all = false,
                    }
                }
            }
            if all || closing || timeout.as_mut().poll(cx).is_ready() {
                std::task::Poll::Ready(())
            } else {
                std::task::Poll::Pending
            }
        })
        .await;
        names
            .into_iter()
            .zip(answers)
            .map(|(name, a)| (name, a.unwrap_or(Joined::Timeout)))
            .collect()
    }

    /// Registers one subscription and asks the broker for the topic's position.
    fn request_subscription(
        &self,
        key: ConnKey,
        topic: &str,
        since: Option<Position>,
        last: u32,
        member: &str,
    ) -> (Rc<str>, oneshot::Receiver<Joined>) {
        let req = self.next_req();
        let (tx, rx) = oneshot::channel();
        let name = self.local.borrow_mut().request(req, key, topic, tx);
        self.broker.subscribe(self, req, topic, since, last, member);
        (name, rx)
    }

    /// The fan-out task's half of a subscription: replay, then join the live list.
    fn complete_subscription(
        &self,
        req: u64,
        offset: u64,
        epoch: String,
        recovered: bool,
        replay: &[Vec<u8>],
        full: bool,
    ) {
        let Some(w) = self.local.borrow_mut().answered(req) else {
            return;
        };
        let alive = {
            let mut conns = self.conns.borrow_mut();
            let alive = !full && conns.get(w.key).is_some_and(|c| !c.life.is_closed());
            if alive {
                for json in replay {
                    // Ahead of live frames held while the connection joins.
                    let frame = server_frame(OpCode::Text, json);
                    self.enqueue_to(&mut conns, w.key, &frame, None, false);
                }
                self.metrics()
                    .replayed
                    .fetch_add(replay.len() as u64, Relaxed);
            }
            alive
        };
        if self.local.borrow_mut().settle(&w.topic, w.key, alive) {
            self.withdraw_interest(&w.topic);
        }
        let _ = w.reply.send(if full {
            Joined::Full
        } else {
            Joined::Yes(offset, epoch, recovered)
        });
    }

    /// Removes a local subscriber; the last one withdraws the shard's interest.
    pub fn remove_subscriber(&self, topic: &str, key: ConnKey) {
        if self.local.borrow_mut().leave(topic, key) {
            self.withdraw_interest(topic);
        }
    }

    /// Gives back the memory that a burst (of connections, made-up topic names, deliveries)
    /// grew the shard's tables and queues to: containers keep their capacity when emptied,
    /// and a grown one also pins the allocator page it sits in.
    pub(super) fn shrink_tables(&self) {
        self.local.borrow_mut().shrink();
        self.wheel.borrow_mut().shrink();
        self.fanout.borrow_mut().shrink();
        self.mesh.shrink();
    }

    fn withdraw_interest(&self, topic: &str) {
        self.broker.unsubscribe(self, topic);
    }

    /// Reports to the origin of `req`: `forwarded` is `Some(n)` from a topic owner that
    /// forwarded to `n` shards (see [`Countdown`]).
    pub(super) fn report(&self, origin: usize, req: u64, counts: Counts, forwarded: Option<u32>) {
        self.report_offset(origin, req, counts, forwarded, None);
    }

    /// [`Shard::report`] from a topic's owner, with the offset it gave the event.
    pub(super) fn report_offset(
        &self,
        origin: usize,
        req: u64,
        counts: Counts,
        forwarded: Option<u32>,
        offset: Option<TopicOffset>,
    ) {
        if origin == self.id {
            self.handle_report(req, &counts, forwarded, offset);
        } else {
            let msg = ShardMsg::Report {
                req,
                counts,
                forwarded,
                offset,
            };
            self.send_msg(origin, &msg, None, None);
        }
    }

    pub(super) fn handle_report(
        &self,
        req: u64,
        counts: &Counts,
        forwarded: Option<u32>,
        offset: Option<TopicOffset>,
    ) {
        self.reports.borrow_mut().answer(req, forwarded, |o| {
            o.counts.add(counts);
            o.offsets.extend(offset);
        });
    }

    /// Gathers and merges every shard's histograms (None if a shard does not answer in 5 s).
    pub async fn gather_histograms(&self) -> Option<super::Hists> {
        let req = self.next_req();
        let n = self.shared.n_shards;
        let left = Countdown::new(0, n as u32);
        let rx = self
            .hist_waiters
            .borrow_mut()
            .open(req, left, super::Hists::default());
        for shard in 0..n {
            let origin = self.id;
            self.send_local(
                shard,
                super::mesh::LocalMsg::HistogramsRequest { origin, req },
            );
        }
        let got = answer(rx).await;
        self.hist_waiters.borrow_mut().give_up(req);
        got
    }

    /// Merges one shard's histograms into the gather.
    pub(super) fn merge_histograms(&self, req: u64, hists: &super::Hists) {
        self.hist_waiters.borrow_mut().answer(req, None, |merged| {
            // Same bounds on every shard: adding cannot fail.
            let _ = merged.publish_to_write.add(&hists.publish_to_write);
            let _ = merged.handshake.add(&hists.handshake);
            let _ = merged.publish_answer.add(&hists.publish_answer);
        });
    }

    pub(super) fn queue_job(&self, job: Job) {
        let deliveries = self.deliveries_of(&job);
        let mut fanout = self.fanout.borrow_mut();
        fanout.push(job, deliveries, Instant::now());
        self.report_fanout(&fanout);
        drop(fanout);
        self.deliver_notify.notify();
    }

    /// About how many deliveries `job` makes here: its receivers for a topic, role or
    /// broadcast (as they are now), one for anything else.
    fn deliveries_of(&self, job: &Job) -> usize {
        let Job::Deliver(d) = job else {
            return 1;
        };
        match &d.target {
            Target::Topic(t) => self
                .local
                .borrow()
                .subscribers(t.as_str())
                .map_or(1, |s| s.len()),
            Target::Role(r) => self.registry.borrow().role(r).map_or(1, |s| s.len()),
            Target::Broadcast => self.conns.borrow().len(),
        }
    }

    /// Tells the publish API (any shard's) how far behind this shard's fan-out is: called
    /// after every change to the queue.
    fn report_fanout(&self, fanout: &super::fanout::FanoutQueue<Job>) {
        let since = fanout.unwritten_since().map_or(0, |at| {
            at.saturating_duration_since(self.shared.started)
                .as_micros() as u64
                + 1
        });
        let m = self.metrics();
        m.fanout_unwritten_since.store(since, Relaxed);
        m.fanout_waiting.store(fanout.waiting() as u64, Relaxed);
    }

    /// Runs jobs in arrival order, then flushes every touched connection once.
    pub(super) async fn fanout_task(self: Rc<Self>) {
        loop {
            self.deliver_notify.wait().await;
            // Busy: let deliveries gather (see `FanoutQueue::gather_for`).
            let gather = self.fanout.borrow().gather_for(Instant::now());
            if let Some(wait) = gather {
                glommio::timer::sleep(wait).await;
            }
            // The jobs queued now; what arrives while this round runs (the round steps aside
            // now and then) waits for the next one. Otherwise a round would take every publish
            // accepted during its pauses and grow without bound under load, and its first
            // deliveries would wait for all of them.
            let round = self.fanout.borrow().len();
            for _ in 0..round {
                let Some(job) = self.fanout.borrow_mut().pop() else {
                    break;
                };
                self.report_fanout(&self.fanout.borrow());
                match job {
                    Job::Deliver(job) => {
                        let counts = self.deliver(&job).await;
                        if job.req != 0 {
                            self.report(job.origin, job.req, counts, None);
                        }
                    }
                    Job::Customers {
                        customers,
                        event,
                        origin,
                        req,
                        published,
                        seq,
                    } => {
                        let counts = self.deliver_customers(&customers, &event, published, seq);
                        if req != 0 {
                            self.report(origin, req, counts, None);
                        }
                    }
                    Job::Subscribed {
                        req,
                        offset,
                        epoch,
                        recovered,
                        replay,
                        full,
                    } => self.complete_subscription(req, offset, epoch, recovered, &replay, full),
                    Job::Ephemeral {
                        topic,
                        except,
                        payload,
                    } => self.handle_ephemeral(&topic, &except, &payload),
                    Job::Receipts {
                        ids,
                        by,
                        status,
                        topics,
                    } => self.handle_receipts(&ids, &by, status, &topics),
                    Job::Disconnect {
                        customers,
                        code,
                        origin,
                        req,
                    } => {
                        let counts = self.close_customers(&customers, code);
                        if req != 0 {
                            self.report(origin, req, counts, None);
                        }
                    }
                }
            }
            if let Some(ms) = crate::faults::value("stall_fanout") {
                glommio::timer::sleep(std::time::Duration::from_millis(ms)).await;
            }
            self.flush_round().await;
            let mut fanout = self.fanout.borrow_mut();
            fanout.flushed(Instant::now());
            self.report_fanout(&fanout);
        }
    }

    /// Asks every connection of `customers` to close with `code`; parked long polls return.
    fn close_customers(&self, customers: &[String], code: u16) -> Counts {
        let mut counts = Counts::default();
        let registry = self.registry.borrow();
        let mut conns = self.conns.borrow_mut();
        for id in customers {
            for &key in registry.of_customer(id) {
                if let Some(c) = conns.get_mut(key) {
                    if c.life.close(code) {
                        counts.connection(c.life.is_sse());
                        c.wake();
                    }
                }
            }
            if let Some(pollers) = self.pollers.borrow().get(id.as_str()) {
                for p in pollers {
                    p.notify.notify();
                    counts.poll += 1;
                }
            }
        }
        counts
    }

    /// Queues a job's frame on every local receiver.
    async fn deliver(&self, job: &DeliverJob) -> Counts {
        let mut counts = Counts::default();
        if job.idempotent {
            let scope = match &job.target {
                Target::Topic(t) => Scope::Topic(t),
                Target::Role(r) => Scope::Role(r),
                Target::Broadcast => Scope::Broadcast,
            };
            let window = self.shared.config.delivery.dedupe_window_secs;
            if !self
                .dedupe
                .borrow_mut()
                .first(scope, &job.id, unix_now(), window)
            {
                self.metrics().duplicates.fetch_add(1, Relaxed);
                // Every shard sees the repeat; one of them counts it for the publisher.
                counts.duplicates = u64::from(self.id == 0);
                return counts;
            }
        }
        let list = match &job.target {
            Target::Topic(topic) => self.local.borrow().subscribers(topic.as_str()),
            Target::Role(role) => self.registry.borrow().role(role),
            Target::Broadcast => None,
        };
        let filter = !matches!(job.target, Target::Topic(_));
        let total = match (&list, &job.target) {
            (Some(l), _) => l.len(),
            (None, Target::Broadcast) => self.conns.borrow().capacity(),
            (None, _) => 0,
        };
        let mut start = 0;
        while start < total {
            let end = (start + CHUNK).min(total);
            {
                let mut conns = self.conns.borrow_mut();
                // Every connection of a customer lives on its owner shard, where its
                // preferences are. (Borrowed per chunk: never across the yield below.)
                let prefs = self.preferences.borrow();
                let check_prefs = filter && !prefs.is_empty();
                for i in start..end {
                    let key = match &list {
                        Some(l) => l[i],
                        None => match conns.key_at(i) {
                            Some(k) => k,
                            None => continue,
                        },
                    };
                    let Some(c) = conns.get_mut(key) else {
                        continue;
                    };
                    if filter && (c.customer.is_empty() || !c.accepts(&job.kind)) {
                        continue;
                    }
                    if check_prefs && !prefs.wants(&c.customer, &job.kind) {
                        continue;
                    }
                    let sse = c.life.is_sse();
                    let frame = if sse {
                        &job.payload.sse
                    } else {
                        &job.payload.ws
                    };
                    if self.enqueue(&mut conns, key, frame, job.published) {
                        counts.connection(sse);
                    } else {
                        counts.dropped += 1;
                    }
                }
            }
            start = end;
            if start < total {
                // What is queued waits for the round's flush: flushing here would split
                // the round's frames over two writes per socket.
                self.pause_if_needed().await;
            }
        }
        counts
    }
}
