//! Micro-benchmarks of the server's hot path: what every message costs in CPU
//! before and after the store.
//!
//! - `frame/decode_send`: `protocol::decode_request` on a `send` frame with an
//!   80-byte text, as a client writes it.
//! - `frame/encode_msg`: one `msg` frame serialized the way the delivery path does
//!   it (`ServerFrame::Msg(..).to_json()` into the shared `Utf8Bytes`).
//! - `sequencing/device_stream`: a device's `DeviceStream` classifying the next
//!   entry of one of its 50 conversations and recording it delivered.
//! - `fanout/500`: one pre-serialized entry published through the real `Hub` to 500
//!   connected devices, and their 500 queues drained (throughput = deliveries/s).
//!
//! The durable append (group commit) is `embedded_store/append` in `storage.rs`.
//!
//! Run: `cargo bench -p chatproof-bench --bench hotpath`
//! (`-- --test` runs each benchmark once, as a smoke test).

use std::hint::black_box;
use std::sync::Arc;

use chatproof_server::domain::{DeviceStream, StreamStep};
use chatproof_server::hub::{DeviceQueue, Framed, Hub, Push};
use chatproof_server::limits::Limits;
use chatproof_server::protocol::{decode_request, Body, Entry, Request, ServerFrame};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use tokio_tungstenite::tungstenite::Utf8Bytes;

/// Text body of the benchmarked message, as the load scenarios send it.
const TEXT_LEN_BYTES: usize = 80;
/// Conversations a benchmarked device follows.
const DEVICE_CONVS: usize = 50;
/// Devices one message fans out to.
const FANOUT_DEVICES: usize = 500;

fn text_body() -> String {
    "x".repeat(TEXT_LEN_BYTES)
}

/// A group message as the server sequences it.
fn group_entry() -> Entry {
    Entry {
        conv: "g:bench-team".into(),
        seq: 1_042,
        message_id: "m-user-0042-000017".into(),
        sender: "user-0042".into(),
        sender_device: "phone".into(),
        server_time_ms: 1_764_340_000_123,
        body: Body::Text { text: text_body() },
    }
}

fn decode_send(c: &mut Criterion) {
    let frame = format!(
        r#"{{"rid":"s17","op":"send","conv":"g:bench-team","message_id":"m-user-0042-000017","text":"{}"}}"#,
        text_body()
    );
    let mut group = c.benchmark_group("frame");
    group.throughput(Throughput::Bytes(frame.len() as u64));
    group.bench_function("decode_send", |b| {
        b.iter(|| {
            let (rid, request) = decode_request(black_box(&frame)).expect("a valid send frame");
            assert!(matches!(request, Request::Send(_)));
            rid
        });
    });
    group.finish();
}

fn encode_msg(c: &mut Criterion) {
    let entry = Arc::new(group_entry());
    let mut group = c.benchmark_group("frame");
    group.bench_function("encode_msg", |b| {
        b.iter(|| Utf8Bytes::from(ServerFrame::Msg(Arc::clone(black_box(&entry))).to_json()));
    });
    group.finish();
}

fn sequencing(c: &mut Criterion) {
    let mut stream = DeviceStream::default();
    let convs: Vec<String> = (0..DEVICE_CONVS).map(|i| format!("g:bench-{i}")).collect();
    for conv in &convs {
        stream.start(conv, 1, u64::MAX);
    }
    let mut group = c.benchmark_group("sequencing");
    let mut next = 0usize;
    group.bench_function("device_stream", |b| {
        b.iter(|| {
            let conv = &convs[next % DEVICE_CONVS];
            next += 1;
            let seq = stream.next_seq(conv).expect("started");
            assert_eq!(stream.on_push(black_box(conv), seq), StreamStep::Deliver);
            stream.delivered(conv, seq);
        });
    });
    group.finish();
}

fn fanout(c: &mut Criterion) {
    let hub = Hub::default();
    let limits = Limits::default();
    let users: Vec<String> = (0..FANOUT_DEVICES)
        .map(|i| format!("user-{i:04}"))
        .collect();
    let mut queues: Vec<DeviceQueue> = users
        .iter()
        .map(|user| hub.register(user, "phone", &limits).expect("room").1)
        .collect();
    let entry = Arc::new(group_entry());
    let frame = Utf8Bytes::from(ServerFrame::Msg(Arc::clone(&entry)).to_json());
    let push = Push::Entry(Framed::new(entry, frame));
    let mut group = c.benchmark_group("fanout");
    group.throughput(Throughput::Elements(FANOUT_DEVICES as u64));
    group.bench_with_input(
        BenchmarkId::from_parameter(FANOUT_DEVICES),
        &push,
        |b, push| {
            b.iter(|| {
                assert_eq!(hub.publish(&users, push), FANOUT_DEVICES);
                for queue in &mut queues {
                    black_box(queue.try_recv().expect("one push queued"));
                }
            });
        },
    );
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20);
    targets = decode_send, encode_msg, sequencing, fanout
}
criterion_main!(benches);
