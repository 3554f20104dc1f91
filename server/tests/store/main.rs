//! The storage contract, checked against every backend: the embedded store
//! always, and the Scylla backend against the real CQL server that
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

mod embedded_store {
    use super::*;
    embedded_case!(sequences_without_holes_and_reads_both_ways);
    embedded_case!(retries_return_the_original);
    embedded_case!(concurrent_appends_get_distinct_gap_free_seqs);
    embedded_case!(concurrent_retries_create_one_message);
    embedded_case!(membership_changes_are_entries);
    embedded_case!(cursors_never_move_back);
}
