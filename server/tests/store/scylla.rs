//! The contract against the Scylla backend on a real CQL server, through two
//! store handles (two sessions, as two chat servers would hold), plus the
//! crash window that only a shared store has.

use std::sync::Arc;
use std::time::Duration;

use chatproof_server::store::scylla::{ScyllaConfig, ScyllaStore};
use chatproof_server::store::Store;

use crate::contract;

/// The CQL server to test against, or why the cases are skipped.
fn cql_nodes() -> Result<Vec<String>, String> {
    match std::env::var("CHATPROOF_TEST_CQL") {
        Ok(v) if v.starts_with("unavailable:") => Err(v["unavailable:".len()..].to_owned()),
        Ok(v) if !v.trim().is_empty() => Ok(v.split(',').map(|s| s.trim().to_owned()).collect()),
        _ => {
            let why =
                "CHATPROOF_TEST_CQL is not set (scripts/test.sh starts Cassandra and sets it)";
            assert!(
                std::env::var("CHATPROOF_REQUIRE_SERVICES").as_deref() != Ok("1"),
                "{why}, and CHATPROOF_REQUIRE_SERVICES=1 requires it"
            );
            Err(why.to_owned())
        }
    }
}

fn config(nodes: Vec<String>) -> ScyllaConfig {
    let keyspace = format!("chatproof_test_{}", std::process::id());
    ScyllaConfig::single_node(nodes, &keyspace, Duration::from_secs(366 * 24 * 3600))
}

/// Two handles on one keyspace, or `None` (after printing SKIPPED and why).
async fn stores(case: &str) -> Option<Vec<Arc<dyn Store>>> {
    let nodes = match cql_nodes() {
        Ok(nodes) => nodes,
        Err(why) => {
            eprintln!("SKIPPED scylla::{case}: {why}");
            return None;
        }
    };
    let config = config(nodes);
    let mut out: Vec<Arc<dyn Store>> = Vec::new();
    for _ in 0..2 {
        let store = ScyllaStore::connect(&config)
            .await
            .unwrap_or_else(|e| panic!("connect to {:?}: {e}", config.nodes));
        out.push(Arc::new(store));
    }
    Some(out)
}

macro_rules! scylla_case {
    ($name:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            if let Some(stores) = stores(stringify!($name)).await {
                contract::$name(&stores).await;
            }
        }
    };
}

scylla_case!(sequences_without_holes_and_reads_both_ways);
scylla_case!(retries_return_the_original);
scylla_case!(concurrent_appends_get_distinct_gap_free_seqs);
scylla_case!(concurrent_retries_create_one_message);
scylla_case!(membership_changes_are_entries);
scylla_case!(cursors_never_move_back);
scylla_case!(last_seen_only_rises);

/// The crash window between the conditional write and the roll-forward.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_between_sequencing_and_roll_forward_loses_nothing() {
    let Some(nodes) = cql_nodes()
        .map_err(|why| {
            eprintln!(
                "SKIPPED scylla::crash_between_sequencing_and_roll_forward_loses_nothing: {why}"
            )
        })
        .ok()
    else {
        return;
    };
    let config = config(nodes);
    let crashing = ScyllaStore::connect(&config).await.expect("connect");
    let survivor = ScyllaStore::connect(&config).await.expect("connect");
    contract::crash_between_sequencing_and_roll_forward(&crashing, &survivor).await;
}

/// A backend that cannot be reached fails with a message naming it.
#[tokio::test]
async fn unreachable_cluster_is_a_clear_error() {
    let unreachable = ScyllaConfig {
        request_timeout: Duration::from_secs(2),
        ..config(vec!["127.0.0.1:1".to_owned()])
    };
    let err = match ScyllaStore::connect(&unreachable).await {
        Ok(_) => panic!("nothing listens on port 1"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("127.0.0.1:1"), "{err}");
    let bad = ScyllaConfig {
        keyspace: "drop table; --".to_owned(),
        ..config(vec!["127.0.0.1:1".to_owned()])
    };
    let err = ScyllaStore::connect(&bad).await.err().expect("refused");
    assert!(err.to_string().contains("invalid keyspace"), "{err}");
}
