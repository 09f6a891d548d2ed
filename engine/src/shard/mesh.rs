//! The shard mesh: rkyv-encoded [`ShardMsg`]s over glommio's channel mesh, with the shared
//! frame `Bytes` travelling beside the message (never inside it, never copied).
//!
//! Sending never blocks the sender: when a peer's bounded channel is full the envelope waits
//! in an overflow queue drained by a per-peer task. Receiving tasks never await a send, so two
//! shards flooding each other cannot deadlock.

use std::{
    cell::RefCell, collections::VecDeque, rc::Rc, sync::atomic::Ordering::Relaxed, time::Instant,
};

use futures_lite::StreamExt as _;
use glommio::{
    channels::channel_mesh::{Full, MeshBuilder, Senders},
    GlommioError, ResourceType,
};
use proto::bus::{self, ArchivedShardMsg, ShardMsg};
use rkyv::util::AlignedVec;

use super::{notify::Notify, Job, Payload, Shard};

/// What crosses between shards.
pub enum Envelope {
    /// An rkyv-encoded [`ShardMsg`] (the same bytes could cross nodes), with the shared
    /// frames of a delivery beside it.
    Bus {
        /// The encoded message.
        msg: AlignedVec,
        /// The encoded frames of a delivery, shared.
        frame: Option<Payload>,
        /// When the publish was accepted (publish-to-write latency).
        published: Option<Instant>,
    },
    /// A connection moving to its owner shard: process-local, never encoded. Its socket is
    /// an `OwnedFd`, closed if the envelope is dropped undelivered.
    Handoff(Box<crate::conn::Handoff>),
    /// A question or answer between shards of this process: never encoded, never sent to
    /// another node.
    Local(LocalMsg),
}

/// Process-local questions between shards (diagnostics, and queries the API answers from
/// the owner's state) and their answers.
pub enum LocalMsg {
    /// Asks a shard for its histograms (`GET /v1/stats/histograms`).
    HistogramsRequest {
        /// Shard awaiting the reply.
        origin: usize,
        /// Request id.
        req: u64,
    },
    /// A shard's histograms.
    HistogramsReply {
        /// Request id.
        req: u64,
        /// A copy of the shard's histograms.
        hists: Box<super::Hists>,
    },
    /// Asks the owner of a customer or topic for what the API shows of it.
    Query {
        /// What is asked.
        query: super::broker::Query,
        /// Customer id or topic name.
        key: String,
        /// Shard awaiting the reply.
        origin: usize,
        /// Request id.
        req: u64,
    },
    /// The answer to a [`LocalMsg::Query`]: the JSON the API returns.
    QueryReply {
        /// Request id.
        req: u64,
        /// Response body.
        json: Vec<u8>,
    },
}

/// This shard's end of the mesh.
pub struct Mesh {
    id: usize,
    senders: Option<Senders<Envelope>>,
    receivers: RefCell<Option<glommio::channels::channel_mesh::Receivers<Envelope>>>,
    overflow: Vec<RefCell<VecDeque<Envelope>>>,
    overflow_notify: Vec<Notify>,
    local: RefCell<VecDeque<Envelope>>,
    local_notify: Notify,
}

impl Mesh {
    /// Gives back the memory a burst grew the local and overflow queues to.
    pub fn shrink(&self) {
        for q in self.overflow.iter().chain([&self.local]) {
            let mut q = q.borrow_mut();
            if q.capacity() > 4 * q.len().max(64) {
                q.shrink_to_fit();
            }
        }
    }

    /// Joins the mesh (waits for every shard).
    pub async fn join(
        builder: MeshBuilder<Envelope, Full>,
        n_shards: usize,
    ) -> anyhow::Result<Mesh> {
        let (id, senders, receivers) = if n_shards > 1 {
            let (s, r) = builder
                .join()
                .await
                .map_err(|e| anyhow::anyhow!("joining the shard mesh: {e}"))?;
            (s.peer_id(), Some(s), Some(r))
        } else {
            (0, None, None)
        };
        Ok(Mesh {
            id,
            senders,
            receivers: RefCell::new(receivers),
            overflow: (0..n_shards).map(|_| RefCell::default()).collect(),
            overflow_notify: (0..n_shards).map(|_| Notify::default()).collect(),
            local: RefCell::default(),
            local_notify: Notify::default(),
        })
    }

    /// This shard's id (its mesh peer id).
    pub fn id(&self) -> usize {
        self.id
    }

    /// Starts the receive tasks and the overflow senders.
    pub fn spawn_receivers(&self, shard: &Rc<Shard>) {
        if let Some(mut receivers) = self.receivers.borrow_mut().take() {
            for (peer, mut stream) in receivers.streams() {
                let shard = shard.clone();
                glommio::spawn_local(async move {
                    while let Some(env) = stream.next().await {
                        shard.handle_envelope(env);
                    }
                    tracing::debug!(shard = shard.id, peer, "mesh channel closed");
                })
                .detach();
            }
            for peer in 0..self.overflow.len() {
                if peer == self.id {
                    continue;
                }
                let shard = shard.clone();
                glommio::spawn_local(async move {
                    let mesh = &shard.mesh;
                    loop {
                        mesh.overflow_notify[peer].wait().await;
                        loop {
                            let Some(env) = mesh.overflow[peer].borrow_mut().pop_front() else {
                                break;
                            };
                            let senders = mesh.senders.as_ref().expect("peers imply senders");
                            if senders.send_to(peer, env).await.is_err() {
                                return;
                            }
                        }
                    }
                })
                .detach();
            }
        }
        let shard = shard.clone();
        glommio::spawn_local(async move {
            loop {
                shard.mesh.local_notify.wait().await;
                loop {
                    let Some(env) = shard.mesh.local.borrow_mut().pop_front() else {
                        break;
                    };
                    shard.handle_envelope(env);
                }
            }
        })
        .detach();
    }

    /// Sends an envelope to shard `to` (possibly this one), without waiting.
    pub fn send(&self, to: usize, env: Envelope) {
        if to == self.id {
            self.local.borrow_mut().push_back(env);
            self.local_notify.notify();
            return;
        }
        let senders = self.senders.as_ref().expect("another shard implies a mesh");
        let queue = &self.overflow[to];
        if queue.borrow().is_empty() {
            match senders.try_send_to(to, env) {
                Ok(()) => return,
                Err(GlommioError::WouldBlock(ResourceType::Channel(env))) => {
                    queue.borrow_mut().push_back(env)
                }
                Err(e) => {
                    tracing::error!(to, error = %e, "mesh send failed");
                    return;
                }
            }
        } else {
            queue.borrow_mut().push_back(env);
        }
        self.overflow_notify[to].notify();
    }
}

impl Shard {
    /// Encodes and sends a message to shard `to`.
    pub fn send_msg(
        &self,
        to: usize,
        msg: &ShardMsg,
        frame: Option<Payload>,
        published: Option<Instant>,
    ) {
        if to != self.id {
            self.metrics().mesh_out.fetch_add(1, Relaxed);
        }
        self.mesh.send(
            to,
            Envelope::Bus {
                msg: bus::encode(msg),
                frame,
                published,
            },
        );
    }

    /// Sends a process-local question or answer to shard `to`.
    pub(super) fn send_local(&self, to: usize, msg: LocalMsg) {
        self.mesh.send(to, Envelope::Local(msg));
    }

    /// Moves a connection to shard `to` (see [`crate::conn::Handoff`]).
    pub fn send_handoff(&self, to: usize, handoff: crate::conn::Handoff) {
        self.metrics().handoffs_out.fetch_add(1, Relaxed);
        self.mesh.send(to, Envelope::Handoff(Box::new(handoff)));
    }

    fn handle_envelope(self: &Rc<Self>, env: Envelope) {
        let (msg, frame, published) = match env {
            Envelope::Handoff(handoff) => {
                self.metrics().handoffs_in.fetch_add(1, Relaxed);
                glommio::spawn_local(crate::conn::resume(self.clone(), *handoff)).detach();
                return;
            }
            Envelope::Local(msg) => return self.handle_local(msg),
            Envelope::Bus {
                msg,
                frame,
                published,
            } => (msg, frame, published),
        };
        let msg = match bus::access(&msg) {
            Ok(m) => m,
            Err(e) => {
                tracing::error!(shard = self.id, error = %e, "undecodable mesh message");
                return;
            }
        };
        match msg {
            ArchivedShardMsg::Interest {
                topic,
                from,
                on,
                req,
                since,
                last,
                member,
            } => {
                let since = since
                    .as_ref()
                    .map(|p| (p.offset.to_native(), p.epoch.as_str()));
                self.broker.on_interest(
                    self,
                    super::route::Interest {
                        topic: topic.as_str(),
                        from: from.to_native() as usize,
                        on: *on,
                        req: req.to_native(),
                        since,
                        last: last.to_native(),
                        member: member.as_str(),
                    },
                );
            }
            ArchivedShardMsg::InterestAck { .. } => {
                // Queued behind the deliveries that arrived before it: see `Job::Subscribed`.
                let ShardMsg::InterestAck {
                    req,
                    offset,
                    epoch,
                    recovered,
                    replay,
                    full,
                } = bus::to_owned(msg)
                else {
                    unreachable!()
                };
                self.queue_job(Job::Subscribed {
                    req,
                    offset,
                    epoch,
                    recovered,
                    replay,
                    full,
                });
            }
            ArchivedShardMsg::PublishTopic {
                topic,
                event,
                origin,
                req,
                deliveries,
            } => {
                let event = rkyv::deserialize::<proto::event::Event, rkyv::rancor::Error>(event)
                    .expect("a validated archive deserialises");
                let to = super::route::ReportTo {
                    origin: origin.to_native() as usize,
                    req: req.to_native(),
                    deliveries: *deliveries,
                };
                self.broker
                    .on_publish(self, topic.as_str(), &event, to, published);
            }
            ArchivedShardMsg::DeliverCustomers { .. } => {
                let ShardMsg::DeliverCustomers {
                    customers,
                    event,
                    origin,
                    req,
                    seq,
                } = bus::to_owned(msg)
                else {
                    unreachable!()
                };
                self.queue_job(Job::Customers {
                    customers,
                    event,
                    origin: origin as usize,
                    req,
                    published,
                    seq,
                });
            }
            ArchivedShardMsg::Deliver { .. } => {
                let ShardMsg::Deliver {
                    target,
                    kind,
                    id,
                    idempotent,
                    origin,
                    req,
                } = bus::to_owned(msg)
                else {
                    unreachable!()
                };
                let Some(payload) = frame else {
                    tracing::error!(shard = self.id, "delivery without a frame");
                    return;
                };
                self.queue_job(Job::Deliver(super::DeliverJob {
                    target,
                    kind,
                    id,
                    idempotent,
                    payload,
                    origin: origin as usize,
                    req,
                    published,
                }));
            }
            ArchivedShardMsg::Disconnect {
                customers,
                code,
                origin,
                req,
            } => {
                self.queue_job(Job::Disconnect {
                    customers: customers.iter().map(|c| c.as_str().to_owned()).collect(),
                    code: code.to_native(),
                    origin: origin.to_native() as usize,
                    req: req.to_native(),
                });
            }
            ArchivedShardMsg::Direct { .. } => {
                let ShardMsg::Direct {
                    to,
                    topics,
                    event,
                    origin,
                    req,
                } = bus::to_owned(msg)
                else {
                    unreachable!()
                };
                self.handle_direct(to, &topics, event, origin as usize, req, published);
            }
            ArchivedShardMsg::Ephemeral {
                topic,
                except,
                forward,
            } => {
                let Some(payload) = frame else {
                    tracing::error!(shard = self.id, "ephemeral delivery without a frame");
                    return;
                };
                if *forward {
                    self.broker
                        .on_ephemeral(self, topic.as_str(), except.as_str(), payload);
                } else {
                    // Behind the deliveries that arrived before it.
                    self.queue_job(Job::Ephemeral {
                        topic: topic.as_str().to_owned(),
                        except: except.as_str().to_owned(),
                        payload,
                    });
                }
            }
            ArchivedShardMsg::Receipts {
                ids,
                by,
                status,
                topics,
            } => self.queue_job(Job::Receipts {
                ids: ids.iter().map(|s| s.as_str().to_owned()).collect(),
                by: by.as_str().to_owned(),
                status: rkyv::deserialize::<proto::client::ReceiptStatus, rkyv::rancor::Error>(
                    status,
                )
                .expect("a validated archive deserialises"),
                topics: topics.iter().map(|s| s.as_str().to_owned()).collect(),
            }),
            ArchivedShardMsg::Membership {
                topic,
                customer,
                joined,
            } => self.handle_membership(topic.as_str(), customer.as_str(), *joined),
            ArchivedShardMsg::Report {
                req,
                counts,
                forwarded,
                offset,
            } => {
                let counts = rkyv::deserialize::<proto::bus::Counts, rkyv::rancor::Error>(counts)
                    .expect("a validated archive deserialises");
                let forwarded = forwarded.as_ref().map(|n| n.to_native());
                let offset = offset.as_ref().map(|o| proto::bus::TopicOffset {
                    topic: o.topic.as_str().to_owned(),
                    offset: o.offset.to_native(),
                });
                self.handle_report(req.to_native(), &counts, forwarded, offset);
            }
        }
    }

    fn handle_local(&self, msg: LocalMsg) {
        match msg {
            LocalMsg::HistogramsRequest { origin, req } => {
                let hists = Box::new(self.hists.borrow().clone());
                self.send_local(origin, LocalMsg::HistogramsReply { req, hists });
            }
            LocalMsg::HistogramsReply { req, hists } => self.merge_histograms(req, &hists),
            LocalMsg::Query {
                query,
                key,
                origin,
                req,
            } => {
                let json = self.answer_query(query, &key);
                self.send_local(origin, LocalMsg::QueryReply { req, json });
            }
            LocalMsg::QueryReply { req, json } => {
                self.queries
                    .borrow_mut()
                    .answer(req, None, |body| *body = json);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{io::Read, os::unix::net::UnixStream, time::Instant};

    use super::Envelope;
    use crate::conn::{Handoff, Request, Stream};

    /// A handoff that never reaches its shard (the peer's channel is gone at shutdown, say)
    /// is dropped, and dropping it closes the socket: no descriptor leaks.
    #[test]
    fn dropping_an_undelivered_handoff_closes_its_socket() {
        let (ours, mut peer) = UnixStream::pair().unwrap();
        let env = Envelope::Handoff(Box::new(Handoff {
            fd: ours.into(),
            request: Request {
                started: Instant::now(),
                head: proto::http1::Head::default(),
                buf: Vec::new(),
                head_len: 0,
                client: std::net::Ipv4Addr::LOCALHOST.into(),
            },
            claims: proto::auth::Claims::default(),
            stream: Stream::WebSocket,
        }));
        drop(env);
        let mut byte = [0u8; 1];
        assert_eq!(peer.read(&mut byte).unwrap(), 0, "the other end sees EOF");
    }
}
