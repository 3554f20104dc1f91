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

use std::sync::Arc;

use chatproof_server::store::embedded::EmbeddedStore;
use chatproof_server::store::shared::memory::MemTables;
use chatproof_server::store::shared::SharedStore;
use chatproof_server::store::Store;

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
