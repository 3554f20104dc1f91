//! The storage contract, checked against every backend: the embedded store and
//! the shared store over in-memory tables always, and the Scylla backend against the real CQL server that
//! `scripts/test.sh` starts (`CHATPROOF_TEST_CQL=host:port`).
//!
//! Without `CHATPROOF_TEST_CQL` the Scylla cases print `SKIPPED` and return,
//! unless `CHATPROOF_REQUIRE_SERVICES=1` (set by `scripts/test.sh`), where a
//! missing server fails them. `CHATPROOF_TEST_CQL=unavailable:WHY` (set by
//! `scripts/test.sh` when Cassandra could not be fetched or started) skips them
//! loudly with that reason.

mod contract;
mod scylla;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use chatproof_server::store::embedded::EmbeddedStore;
use chatproof_server::store::shared::memory::MemTables;
use chatproof_server::store::shared::{SharedStore, TableOp, TableReply, Tables};
use chatproof_server::store::{Store, StoreError};

fn embedded() -> (tempfile::TempDir, Arc<dyn Store>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = EmbeddedStore::open(dir.path()).expect("open embedded store");
    (dir, Arc::new(store))
}

macro_rules! embedded_case {
    ($name:ident) => {
        #[tokio::test]
        async fn $name() {
            let (_dir, store) = embedded();
            contract::$name(&[store]).await;
        }
    };
}

/// Two stores (two "servers") over one in-memory table set.
fn shared_in_memory() -> Vec<Arc<dyn Store>> {
    let tables = Arc::new(MemTables::default());
    (0..2)
        .map(|_| Arc::new(SharedStore::new(Arc::clone(&tables))) as Arc<dyn Store>)
        .collect()
}

macro_rules! shared_memory_case {
    ($name:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            contract::$name(&shared_in_memory()).await;
        }
    };
}

mod shared_in_memory {
    use super::*;
    shared_memory_case!(sequences_without_holes_and_reads_both_ways);
    shared_memory_case!(retries_return_the_original);
    shared_memory_case!(concurrent_appends_get_distinct_gap_free_seqs);
    shared_memory_case!(concurrent_retries_create_one_message);
    shared_memory_case!(membership_changes_are_entries);
    shared_memory_case!(cursors_never_move_back);
    shared_memory_case!(last_seen_only_rises);
}

/// The crash window of the shared store, over in-memory tables.
#[tokio::test]
async fn shared_in_memory_crash_between_sequencing_and_roll_forward_loses_nothing() {
    let tables = Arc::new(MemTables::default());
    let crashing = SharedStore::new(Arc::clone(&tables));
    let survivor = SharedStore::new(tables);
    contract::crash_between_sequencing_and_roll_forward(&crashing, &survivor).await;
}

/// Tables whose entry-table reads miss the entry `seq` while `hidden` says so: as
/// if the read ran before that entry's roll-forward write landed (or, when it stays
/// hidden, after it expired).
struct LateRollForward {
    inner: MemTables,
    seq: u64,
    /// Reads still to miss it.
    hidden: std::sync::atomic::AtomicU32,
}

#[async_trait::async_trait]
impl Tables for LateRollForward {
    async fn call(&self, op: TableOp) -> Result<TableReply, StoreError> {
        let entries_read = matches!(op, TableOp::EntriesAfter { .. });
        let reply = self.inner.call(op).await?;
        let hide = entries_read
            && self
                .hidden
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                .is_ok();
        Ok(match reply {
            TableReply::Entries(rows) if hide => TableReply::Entries(
                rows.into_iter()
                    .filter(|row| {
                        let entry: serde_json::Value =
                            serde_json::from_str(row).expect("entry json");
                        entry["seq"].as_u64() != Some(self.seq)
                    })
                    .collect(),
            ),
            other => other,
        })
    }
}

/// `read_after` over `LateRollForward` tables, seqs 1 (the group's creation) to 5,
/// seq 3 missed by the first `misses` entry-table reads: what it returns.
async fn read_with_a_late_roll_forward(misses: u32) -> Vec<u64> {
    let tables = Arc::new(LateRollForward {
        inner: MemTables::default(),
        seq: 3,
        hidden: std::sync::atomic::AtomicU32::new(0),
    });
    let store = SharedStore::new(Arc::clone(&tables));
    let (conv, users) = contract::group(&store, "late").await;
    for i in 0..4 {
        let m = contract::text(&conv, &users[i % 3], &format!("m{i}"));
        store.append(m, contract::NOW_MS).await.expect("append");
    }
    tables.hidden.store(misses, Ordering::Relaxed);
    let seqs = store
        .read_after(&conv, 2, u64::MAX, 100)
        .await
        .expect("read");
    seqs.iter().map(|e| e.seq).collect()
}

/// The shared store reads the entry tables, then the head; an entry whose
/// roll-forward landed between the two, under a head that moved past it, is read
/// again rather than left out (a device shown seq 4 with no seq 3).
#[tokio::test]
async fn shared_reads_an_entry_rolled_forward_while_reading() {
    assert_eq!(read_with_a_late_roll_forward(1).await, [3, 4, 5]);
}

/// An entry still missing from the entry tables when they are read again, after
/// the head was seen past it, has expired: the read leaves it out, returns the rest.
#[tokio::test]
async fn shared_read_leaves_out_an_expired_entry() {
    assert_eq!(read_with_a_late_roll_forward(u32::MAX).await, [4, 5]);
}

mod embedded_store {
    use super::*;
    embedded_case!(sequences_without_holes_and_reads_both_ways);
    embedded_case!(retries_return_the_original);
    embedded_case!(concurrent_appends_get_distinct_gap_free_seqs);
    embedded_case!(concurrent_retries_create_one_message);
    embedded_case!(membership_changes_are_entries);
    embedded_case!(cursors_never_move_back);
    embedded_case!(last_seen_only_rises);
}
