//! The fan-out enqueue path: one encoded frame queued on 10,000 connections.
//!
//! `shared_frame` is what the engine does (a `Bytes` handle per connection, via
//! `Conn::queue`); `copy_per_subscriber` is the naive alternative (a copy of the payload per
//! connection), as a baseline. Run: `cargo bench -p ringcast-bench --bench fanout`.

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use engine::shard::{
    conn_state::{Conn, Queued},
    slab::{ConnKey, Slab},
};
use proto::ws::{server_frame, OpCode};

const N: usize = 10_000;

fn population() -> (Slab, Vec<ConnKey>) {
    let mut slab = Slab::default();
    let keys = (0..N)
        .map(|i| slab.insert(Conn::new(i as i32, "c".into(), 0, 1 << 20)))
        .collect();
    (slab, keys)
}

fn fanout(c: &mut Criterion) {
    let mut group = c.benchmark_group("fanout_enqueue_10k");
    group.throughput(Throughput::Elements(N as u64));
    let event = br#"{"type":"bcast","timestamp":"2026-11-22T00:00:00.000Z","data":{"p":"xxxxxxxxxxxxxxxx"}}"#;
    let frame = server_frame(OpCode::Text, &event[..event.len().min(100)]);
    group.bench_function("shared_frame", |b| {
        b.iter_batched_ref(
            population,
            |(slab, keys)| {
                for &k in keys.iter() {
                    let c = slab.get_mut(k).expect("live");
                    assert_eq!(c.queue(&frame, None), Queued::Yes);
                }
            },
            BatchSize::LargeInput,
        )
    });
    group.bench_function("copy_per_subscriber", |b| {
        b.iter_batched_ref(
            population,
            |(slab, keys)| {
                for &k in keys.iter() {
                    let c = slab.get_mut(k).expect("live");
                    let copy = Bytes::copy_from_slice(&frame);
                    assert_eq!(c.queue(&copy, None), Queued::Yes);
                }
            },
            BatchSize::LargeInput,
        )
    });
    group.finish();
}

criterion_group!(benches, fanout);
criterion_main!(benches);
