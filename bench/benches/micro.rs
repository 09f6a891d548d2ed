//! Micro-benchmarks of the protocol and mesh primitives (issue 3 §6). Run:
//! `cargo bench -p ringcast-bench --bench micro`.
//!
//! - WebSocket frame encode (server, unmasked) and decode (client, masked) at 100 B and 16 KiB.
//! - Client message parsing: simd-json (what the engine uses) against serde_json.
//! - rkyv: encode and validated access of a mesh delivery message.
//! - Placement: `owner_shard` of a customer id.
//! - Cross-shard hop: streaming mesh envelopes (rkyv bytes + a shared frame) from one glommio
//!   executor to another over a glommio shared channel.

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use proto::{
    bus::{self, ShardMsg, Target},
    ws::{frame::encode_client_frame, server_frame, OpCode, Receiver, WsLimits},
};

fn frames(c: &mut Criterion) {
    let mut g = c.benchmark_group("ws_frame");
    for size in [100usize, 16 * 1024] {
        let payload = vec![b'x'; size];
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_with_input(BenchmarkId::new("encode_server", size), &payload, |b, p| {
            b.iter(|| server_frame(OpCode::Text, black_box(p)))
        });
        let mut wire = BytesMut::new();
        encode_client_frame(OpCode::Text, true, &payload, [1, 2, 3, 4], &mut wire);
        let wire = wire.to_vec();
        g.bench_with_input(BenchmarkId::new("decode_client", size), &wire, |b, w| {
            let mut rx = Receiver::default();
            let limits = WsLimits::default();
            let mut buf = w.clone();
            b.iter(|| {
                buf.copy_from_slice(w);
                black_box(rx.decode(&mut buf, &limits).is_ok())
            })
        });
    }
    g.finish();
}

fn client_json(c: &mut Criterion) {
    let msg = br#"{"type":"subscribe","payload":{"topics":["conversation:1","product:9"],"events":["case_"]},"requestId":"r-123"}"#;
    let mut g = c.benchmark_group("client_message");
    g.bench_function("simd_json_proto_parse", |b| {
        let mut buf = msg.to_vec();
        b.iter(|| {
            buf.copy_from_slice(msg);
            black_box(proto::client::parse(&mut buf).is_ok())
        })
    });
    g.bench_function("serde_json_value", |b| {
        b.iter(|| black_box(serde_json::from_slice::<serde_json::Value>(black_box(msg)).is_ok()))
    });
    // Like for like: both parse into a DOM and nothing else.
    g.bench_function("simd_json_borrowed_value", |b| {
        let mut buf = msg.to_vec();
        b.iter(|| {
            buf.copy_from_slice(msg);
            black_box(simd_json::to_borrowed_value(&mut buf).is_ok())
        })
    });
    g.finish();
}

fn rkyv_mesh(c: &mut Criterion) {
    let msg = ShardMsg::Deliver {
        target: Target::Topic("conversation:42".into()),
        kind: "message_received".into(),
        id: "ev-1".into(),
        idempotent: false,
        origin: 1,
        req: 77,
    };
    let bytes = bus::encode(&msg);
    let mut g = c.benchmark_group("rkyv_mesh");
    g.bench_function("encode_deliver", |b| {
        b.iter(|| bus::encode(black_box(&msg)))
    });
    g.bench_function("access_deliver", |b| {
        b.iter(|| black_box(bus::access(black_box(&bytes)).is_ok()))
    });
    g.finish();
}

fn placement(c: &mut Criterion) {
    c.bench_function("placement/owner_shard", |b| {
        b.iter(|| proto::placement::owner_shard(black_box("customer-1234567"), black_box(16)))
    });
}

/// Streams `n` envelopes from one executor to another; returns the elapsed time.
fn hop(n: u64) -> Duration {
    use glommio::{channels::shared_channel, LocalExecutorBuilder, Placement};
    let (tx, rx) = shared_channel::new_bounded::<(rkyv::util::AlignedVec, Option<Bytes>)>(4096);
    let frame = server_frame(OpCode::Text, &[b'x'; 100]);
    let msg = bus::encode(&ShardMsg::Deliver {
        target: Target::Topic("t".into()),
        kind: "k".into(),
        id: "e".into(),
        idempotent: false,
        origin: 0,
        req: 1,
    });
    let consumer = LocalExecutorBuilder::new(Placement::Unbound)
        .spawn(move || async move {
            let rx = rx.connect().await;
            let start = Instant::now();
            for _ in 0..n {
                let (bytes, frame) = rx.recv().await.expect("sender alive");
                black_box(bus::access(&bytes).is_ok());
                black_box(frame);
            }
            start.elapsed()
        })
        .expect("executor");
    let producer = LocalExecutorBuilder::new(Placement::Unbound)
        .spawn(move || async move {
            let tx = tx.connect().await;
            for _ in 0..n {
                tx.send((msg.clone(), Some(frame.clone())))
                    .await
                    .expect("receiver alive");
            }
        })
        .expect("executor");
    producer.join().expect("producer");
    consumer.join().expect("consumer")
}

fn cross_shard(c: &mut Criterion) {
    let mut g = c.benchmark_group("cross_shard_hop");
    g.throughput(Throughput::Elements(1));
    g.sample_size(10);
    g.bench_function("stream_envelope", |b| {
        b.iter_custom(|iters| {
            let n = iters.max(10_000);
            let elapsed = hop(n);
            elapsed.mul_f64(iters as f64 / n as f64)
        })
    });
    g.finish();
}

criterion_group!(
    benches,
    frames,
    client_json,
    rkyv_mesh,
    placement,
    cross_shard
);
criterion_main!(benches);
