//! The registry wire's two implementations agree: every `RegistryOp` the cluster
//! fabric uses gives the same reply from Redis (`RedisRegistry`, the production
//! wire) as from `MemRegistry` (the simulator's router node), so what the
//! simulator proves about the fabric holds over Redis.

use std::time::Duration;

use chatproof_server::cluster::registry::memory::MemRegistry;
use chatproof_server::cluster::registry::redis::RedisRegistry;
use chatproof_server::cluster::registry::{Registry, RegistryOp, RegistryReply};
use futures_util::StreamExt;

/// Replies with set members sorted (neither side promises an order).
fn normalized(replies: Vec<RegistryReply>) -> Vec<RegistryReply> {
    replies
        .into_iter()
        .map(|reply| match reply {
            RegistryReply::Members(mut m) => {
                m.sort();
                RegistryReply::Members(m)
            }
            other => other,
        })
        .collect()
}

/// A script of ops over keys under `p`, in steps run one after another.
fn steps(p: &str) -> Vec<Vec<RegistryOp>> {
    let k = |name: &str| format!("{p}{name}");
    let hset = |field: &str, value: &str| RegistryOp::HashSet {
        key: k("dev:ann"),
        field: field.into(),
        value: value.into(),
    };
    vec![
        vec![
            RegistryOp::Ping,
            RegistryOp::SetExpiringGet {
                key: k("srv:a"),
                value: "1".into(),
                ttl_ms: 60_000,
            },
            RegistryOp::SetExpiringGet {
                key: k("srv:a"),
                value: "2".into(),
                ttl_ms: 300,
            },
            RegistryOp::Get {
                keys: vec![k("srv:a"), k("srv:b")],
            },
        ],
        vec![
            RegistryOp::SetAdd {
                key: k("lives"),
                member: "1@a".into(),
            },
            RegistryOp::SetAdd {
                key: k("lives"),
                member: "2@a".into(),
            },
            RegistryOp::SetAdd {
                key: k("lives"),
                member: "1@b".into(),
            },
            RegistryOp::RemoveCounting {
                set: k("lives"),
                counter: k("deaths"),
                members: vec!["1@a".into(), "9@z".into()],
            },
            RegistryOp::RemoveCounting {
                set: k("lives"),
                counter: k("deaths"),
                members: vec![],
            },
            RegistryOp::SetMembers { key: k("lives") },
            RegistryOp::SetMembers { key: k("nothing") },
        ],
        vec![
            hset("phone@a", "2@a/7"),
            hset("web@b", "1@b/3"),
            RegistryOp::HashDeleteIf {
                key: k("dev:ann"),
                field: "web@b".into(),
                value: "1@b/2".into(),
            },
            RegistryOp::HashDeleteUpTo {
                key: k("dev:ann"),
                field: "phone@a".into(),
                prefix: "2@a".into(),
                serial: 6,
            },
            RegistryOp::HashDeleteUpTo {
                key: k("dev:ann"),
                field: "phone@a".into(),
                prefix: "1@a".into(),
                serial: 9,
            },
            RegistryOp::HashGetAll { key: k("dev:ann") },
            RegistryOp::HashDeleteUpTo {
                key: k("dev:ann"),
                field: "phone@a".into(),
                prefix: "2@a".into(),
                serial: 7,
            },
            RegistryOp::HashDeleteIf {
                key: k("dev:ann"),
                field: "web@b".into(),
                value: "1@b/3".into(),
            },
            RegistryOp::HashGetAll { key: k("dev:ann") },
            RegistryOp::HashDeleteUpTo {
                key: k("dev:nobody"),
                field: "x@a".into(),
                prefix: "2@a".into(),
                serial: 1,
            },
        ],
        vec![
            RegistryOp::SetAdd {
                key: k("watch:bob"),
                member: "ann".into(),
            },
            RegistryOp::Expire {
                key: k("watch:bob"),
                ttl_ms: 300,
            },
            RegistryOp::Expire {
                key: k("watch:nobody"),
                ttl_ms: 300,
            },
            RegistryOp::SetMembers {
                key: k("watch:bob"),
            },
            RegistryOp::SetExpiringGet {
                key: k("srv:b"),
                value: "1".into(),
                ttl_ms: 60_000,
            },
            RegistryOp::DeleteIfThenRemove {
                key: k("srv:b"),
                value: "0".into(),
                set: k("lives"),
                member: "1@b".into(),
            },
            RegistryOp::Get {
                keys: vec![k("srv:b")],
            },
            RegistryOp::DeleteIfThenRemove {
                key: k("srv:b"),
                value: "1".into(),
                set: k("lives"),
                member: "1@b".into(),
            },
            RegistryOp::Get {
                keys: vec![k("srv:b")],
            },
            RegistryOp::SetMembers { key: k("lives") },
            RegistryOp::Publish {
                channel: k("to:nobody"),
                payload: b"lost".to_vec(),
            },
        ],
        // After the 300 ms expiries.
        vec![
            RegistryOp::Get {
                keys: vec![k("srv:a")],
            },
            RegistryOp::SetMembers {
                key: k("watch:bob"),
            },
            RegistryOp::SetExpiringGet {
                key: k("srv:a"),
                value: "3".into(),
                ttl_ms: 60_000,
            },
        ],
    ]
}

#[tokio::test]
async fn redis_and_the_simulators_registry_answer_every_op_alike() {
    let url = std::env::var("CHATPROOF_TEST_REDIS").unwrap_or_default();
    if url.is_empty() {
        assert!(
            std::env::var("CHATPROOF_REQUIRE_SERVICES").as_deref() != Ok("1"),
            "CHATPROOF_TEST_REDIS not set, and CHATPROOF_REQUIRE_SERVICES=1 requires it"
        );
        eprintln!("SKIPPED registry: CHATPROOF_TEST_REDIS not set (scripts/test.sh sets it)");
        return;
    }
    let redis = RedisRegistry::connect(&url).await.expect("Redis answers");
    let memory = MemRegistry::new();
    let prefix = format!("conformance{}:", std::process::id());
    for (i, step) in steps(&prefix).into_iter().enumerate() {
        if i == 4 {
            tokio::time::sleep(Duration::from_millis(400)).await;
        }
        let from_redis = normalized(redis.run(step.clone()).await.expect("Redis runs the step"));
        let from_memory = normalized(memory.run(step.clone()).await.expect("memory runs it"));
        assert_eq!(from_redis, from_memory, "step {i}: {step:?}");
    }

    // Pub/sub: a subscriber gets what is published after it subscribed, in order.
    let channel = format!("{prefix}to:a");
    let mut from_redis = redis.subscribe(&channel).await.expect("subscribed");
    let mut from_memory = memory.subscribe(&channel).await.expect("subscribed");
    let publish = |payload: &[u8]| {
        vec![RegistryOp::Publish {
            channel: channel.clone(),
            payload: payload.to_vec(),
        }]
    };
    for payload in [&b"one"[..], b"two"] {
        let r = redis.run(publish(payload)).await.unwrap();
        let m = memory.run(publish(payload)).await.unwrap();
        assert_eq!(r, m);
        assert_eq!(r, [RegistryReply::Count(1)]);
    }
    for wanted in [&b"one"[..], b"two"] {
        let got = tokio::time::timeout(Duration::from_secs(5), from_redis.next())
            .await
            .expect("Redis delivers within 5 s");
        assert_eq!(got.as_deref(), Some(wanted));
        assert_eq!(from_memory.next().await.as_deref(), Some(wanted));
    }
}
