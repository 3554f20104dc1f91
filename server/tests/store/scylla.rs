//! The contract against the Scylla backend on a real CQL server, through two
//! store handles (two sessions, as two chat servers would hold), plus the
//! crash window that only a shared store has.

use std::sync::Arc;
use std::time::Duration;

use chatproof_server::store::scylla::{ScyllaConfig, ScyllaStore};
use chatproof_server::store::{Store, StoreError};

use crate::contract::{self, text, NOW_MS};

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

/// A server that dies between the conditional write and the roll-forward leaves
/// its entry only in the head row: readers still see it, a retry finds it, and
/// the next writer (on another server) rolls it forward before moving on.
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
    let (conv, users) = contract::group(&survivor, "crash").await;
    crashing.inject_crash_after_sequencing();
    let died = crashing
        .append(text(&conv, &users[1], "in-flight"), NOW_MS)
        .await
        .unwrap_err();
    assert!(matches!(died, StoreError::Backend(_)), "{died:?}");
    // The entry is durable (seq 2) though never rolled forward.
    let state = survivor.conversation(&conv).await.unwrap().unwrap();
    assert_eq!(state.last_seq, 2);
    let seen = survivor.read_after(&conv, 0, 2, 10).await.unwrap();
    assert_eq!(seen.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 2]);
    assert_eq!(seen[1].message_id, "in-flight");
    let newest = survivor.read_before(&conv, 3, 10).await.unwrap();
    assert_eq!(newest.len(), 2);
    // The client retries on the other server: the original comes back.
    let retry = survivor
        .append(text(&conv, &users[1], "in-flight"), NOW_MS)
        .await
        .unwrap();
    assert!(retry.duplicate);
    assert_eq!(retry.entry.seq, 2);
    // Crash again, then another message moves past the un-rolled head.
    crashing.inject_crash_after_sequencing();
    crashing
        .append(text(&conv, &users[2], "second"), NOW_MS)
        .await
        .unwrap_err();
    let next = survivor
        .append(text(&conv, &users[0], "third"), NOW_MS)
        .await
        .unwrap();
    assert_eq!(next.entry.seq, 4);
    let again = survivor
        .append(text(&conv, &users[2], "second"), NOW_MS)
        .await
        .unwrap();
    assert!(
        again.duplicate,
        "found through the index after roll-forward"
    );
    assert_eq!(again.entry.seq, 3);
    let all = crashing.read_after(&conv, 0, 4, 10).await.unwrap();
    assert_eq!(all.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 2, 3, 4]);
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
