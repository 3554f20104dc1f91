//! Storage benchmarks.
//!
//! - `engine/{redb,fjall}/group=K`: K appends made durable by one commit + fsync: the
//!   cost of group commit in each candidate engine (throughput = appends/s).
//! - `embedded_store/append/concurrent=C`: the server's real durable append path
//!   (writer thread, group commit, idempotency index) with C concurrent senders.
//!
//! Run: `cargo bench -p chatproof-bench --bench storage`.

use std::sync::Arc;

use chatproof_server::protocol::Body;
use chatproof_server::store::embedded::EmbeddedStore;
use chatproof_server::store::{NewMessage, Store};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

const BODY_LEN_BYTES: usize = 200;
const GROUPS: [u64; 3] = [1, 16, 256];

fn redb_engine(c: &mut Criterion) {
    const TABLE: redb::TableDefinition<(&str, u64), &[u8]> = redb::TableDefinition::new("entries");
    let dir = tempfile::tempdir().unwrap();
    let db = redb::Database::create(dir.path().join("bench.redb")).unwrap();
    let body = vec![7u8; BODY_LEN_BYTES];
    let mut seq = 0u64;
    let mut group = c.benchmark_group("engine/redb");
    for k in GROUPS {
        group.throughput(Throughput::Elements(k));
        group.bench_with_input(BenchmarkId::new("group", k), &k, |b, &k| {
            b.iter(|| {
                let txn = db.begin_write().unwrap();
                {
                    let mut table = txn.open_table(TABLE).unwrap();
                    for _ in 0..k {
                        seq += 1;
                        table.insert(("g:bench", seq), body.as_slice()).unwrap();
                    }
                }
                txn.commit().unwrap(); // Durability::Immediate (the default): fsync.
            });
        });
    }
    group.finish();
}

fn fjall_engine(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let db = fjall::Database::builder(dir.path()).open().unwrap();
    let entries = db
        .keyspace("entries", fjall::KeyspaceCreateOptions::default)
        .unwrap();
    let body = vec![7u8; BODY_LEN_BYTES];
    let mut seq = 0u64;
    let mut group = c.benchmark_group("engine/fjall");
    for k in GROUPS {
        group.throughput(Throughput::Elements(k));
        group.bench_with_input(BenchmarkId::new("group", k), &k, |b, &k| {
            b.iter(|| {
                let mut batch = db.batch();
                for _ in 0..k {
                    seq += 1;
                    let mut key = b"g:bench/".to_vec();
                    key.extend_from_slice(&seq.to_be_bytes());
                    batch.insert(&entries, key, body.as_slice());
                }
                batch.commit().unwrap();
                db.persist(fjall::PersistMode::SyncAll).unwrap();
            });
        });
    }
    group.finish();
}

fn embedded_store_append(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(EmbeddedStore::open(dir.path()).unwrap());
    runtime
        .block_on(store.create_group("g:bench", "owner", "d", vec![], 500, 0))
        .unwrap();
    let text = "x".repeat(BODY_LEN_BYTES);
    let mut next_id = 0u64;
    let mut group = c.benchmark_group("embedded_store/append");
    for concurrent in [1u64, 64, 512] {
        group.throughput(Throughput::Elements(concurrent));
        group.bench_with_input(
            BenchmarkId::new("concurrent", concurrent),
            &concurrent,
            |b, &n| {
                b.iter(|| {
                    runtime.block_on(async {
                        let mut tasks = Vec::with_capacity(n as usize);
                        for _ in 0..n {
                            next_id += 1;
                            let store = Arc::clone(&store);
                            let message = NewMessage {
                                conv: "g:bench".into(),
                                sender: "owner".into(),
                                sender_device: "d".into(),
                                message_id: format!("m{next_id}"),
                                body: Body::Text { text: text.clone() },
                            };
                            tasks.push(tokio::spawn(async move {
                                store.append(message, 1).await.unwrap()
                            }));
                        }
                        for task in tasks {
                            task.await.unwrap();
                        }
                    });
                });
            },
        );
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).measurement_time(std::time::Duration::from_secs(4));
    targets = redb_engine, fjall_engine, embedded_store_append
}
criterion_main!(benches);
