//! [`Registry`] in memory: the semantics of the Redis commands the fabric uses,
//! with expiry on the tokio clock (simulated time under the simulator). It keeps
//! nothing across a restart, as Redis without persistence.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use async_trait::async_trait;
use tokio::sync::mpsc;
use tokio::time::{Duration, Instant};

use super::{Registry, RegistryOp, RegistryReply, Subscription};
use crate::cluster::FabricError;

#[derive(Debug)]
enum Value {
    Text(String),
    Set(BTreeSet<String>),
    Hash(BTreeMap<String, String>),
}

#[derive(Default)]
struct State {
    values: BTreeMap<String, Value>,
    expiry: BTreeMap<String, Instant>,
    subscribers: BTreeMap<String, Vec<mpsc::UnboundedSender<Vec<u8>>>>,
}

impl State {
    /// Drops `key` if it has expired by `now`.
    fn expire(&mut self, key: &str, now: Instant) {
        if self.expiry.get(key).is_some_and(|at| *at <= now) {
            self.expiry.remove(key);
            self.values.remove(key);
        }
    }

    fn live(&mut self, key: &str, now: Instant) -> Option<&mut Value> {
        self.expire(key, now);
        self.values.get_mut(key)
    }

    fn text(&mut self, key: &str, now: Instant) -> Option<String> {
        match self.live(key, now) {
            Some(Value::Text(v)) => Some(v.clone()),
            _ => None,
        }
    }

    fn set(&mut self, key: &str, now: Instant) -> &mut BTreeSet<String> {
        self.expire(key, now);
        let value = self
            .values
            .entry(key.to_owned())
            .or_insert_with(|| Value::Set(BTreeSet::new()));
        if !matches!(value, Value::Set(_)) {
            *value = Value::Set(BTreeSet::new());
        }
        let Value::Set(set) = value else {
            unreachable!("just made a set")
        };
        set
    }

    fn hash(&mut self, key: &str, now: Instant) -> &mut BTreeMap<String, String> {
        self.expire(key, now);
        let value = self
            .values
            .entry(key.to_owned())
            .or_insert_with(|| Value::Hash(BTreeMap::new()));
        if !matches!(value, Value::Hash(_)) {
            *value = Value::Hash(BTreeMap::new());
        }
        let Value::Hash(hash) = value else {
            unreachable!("just made a hash")
        };
        hash
    }

    /// Removes `key` if it is an empty set or hash, as Redis does.
    fn drop_if_empty(&mut self, key: &str) {
        let empty = match self.values.get(key) {
            Some(Value::Set(s)) => s.is_empty(),
            Some(Value::Hash(h)) => h.is_empty(),
            _ => false,
        };
        if empty {
            self.values.remove(key);
            self.expiry.remove(key);
        }
    }

    fn apply(&mut self, op: RegistryOp, now: Instant) -> RegistryReply {
        match op {
            RegistryOp::Ping => RegistryReply::Done,
            RegistryOp::SetExpiringGet { key, value, ttl_ms } => {
                let previous = self.text(&key, now);
                self.values.insert(key.clone(), Value::Text(value));
                self.expiry.insert(key, now + Duration::from_millis(ttl_ms));
                RegistryReply::Previous(previous)
            }
            RegistryOp::Get { keys } => {
                RegistryReply::Values(keys.iter().map(|k| self.text(k, now)).collect())
            }
            RegistryOp::SetAdd { key, member } => {
                self.set(&key, now).insert(member);
                RegistryReply::Done
            }
            RegistryOp::SetMembers { key } => match self.live(&key, now) {
                Some(Value::Set(set)) => RegistryReply::Members(set.iter().cloned().collect()),
                _ => RegistryReply::Members(Vec::new()),
            },
            RegistryOp::Expire { key, ttl_ms } => {
                if self.live(&key, now).is_some() {
                    self.expiry.insert(key, now + Duration::from_millis(ttl_ms));
                }
                RegistryReply::Done
            }
            RegistryOp::HashSet { key, field, value } => {
                self.hash(&key, now).insert(field, value);
                RegistryReply::Done
            }
            RegistryOp::HashDeleteIf { key, field, value } => {
                if let Some(Value::Hash(hash)) = self.live(&key, now) {
                    if hash.get(&field) == Some(&value) {
                        hash.remove(&field);
                    }
                }
                self.drop_if_empty(&key);
                RegistryReply::Done
            }
            RegistryOp::HashDeleteUpTo {
                key,
                field,
                prefix,
                serial,
            } => {
                let mut deleted = 0;
                if let Some(Value::Hash(hash)) = self.live(&key, now) {
                    let older = hash.get(&field).is_some_and(|v| {
                        v.rsplit_once('/').is_some_and(|(p, n)| {
                            p == prefix && n.parse::<u64>().is_ok_and(|n| n <= serial)
                        })
                    });
                    if older {
                        hash.remove(&field);
                        deleted = 1;
                    }
                }
                self.drop_if_empty(&key);
                RegistryReply::Count(deleted)
            }
            RegistryOp::HashGetAll { key } => match self.live(&key, now) {
                Some(Value::Hash(hash)) => RegistryReply::Fields(hash.clone()),
                _ => RegistryReply::Fields(BTreeMap::new()),
            },
            RegistryOp::Publish { channel, payload } => {
                let mut reached = 0;
                if let Some(subscribers) = self.subscribers.get_mut(&channel) {
                    subscribers.retain(|s| s.send(payload.clone()).is_ok());
                    reached = subscribers.len();
                }
                RegistryReply::Count(i64::try_from(reached).unwrap_or(i64::MAX))
            }
            RegistryOp::RemoveCounting {
                set,
                counter,
                members,
            } => {
                let mut removed = 0;
                if let Some(Value::Set(s)) = self.live(&set, now) {
                    removed = members.iter().filter(|m| s.remove(*m)).count();
                }
                self.drop_if_empty(&set);
                let before = self
                    .text(&counter, now)
                    .and_then(|c| c.parse::<i64>().ok())
                    .unwrap_or(0);
                let after = before + i64::try_from(removed).unwrap_or(i64::MAX);
                if removed > 0 {
                    self.values.insert(counter, Value::Text(after.to_string()));
                }
                RegistryReply::Count(after)
            }
            RegistryOp::DeleteIfThenRemove {
                key,
                value,
                set,
                member,
            } => {
                if self.text(&key, now).as_deref() == Some(value.as_str()) {
                    self.values.remove(&key);
                    self.expiry.remove(&key);
                }
                if let Some(Value::Set(s)) = self.live(&set, now) {
                    s.remove(&member);
                }
                self.drop_if_empty(&set);
                RegistryReply::Done
            }
        }
    }
}

/// An in-memory registry server; starts empty.
#[derive(Default)]
pub struct MemRegistry {
    state: Mutex<State>,
}

impl MemRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Runs `ops` in order, each atomically, as one caller.
    pub fn apply(&self, ops: Vec<RegistryOp>) -> Vec<RegistryReply> {
        let now = Instant::now();
        let mut state = self.state.lock().expect("registry state");
        ops.into_iter().map(|op| state.apply(op, now)).collect()
    }

    /// A receiver of everything published to `channel` from now on; it ends when
    /// the registry is dropped.
    pub fn subscribe_receiver(&self, channel: &str) -> mpsc::UnboundedReceiver<Vec<u8>> {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut state = self.state.lock().expect("registry state");
        state
            .subscribers
            .entry(channel.to_owned())
            .or_default()
            .push(tx);
        rx
    }
}

#[async_trait]
impl Registry for MemRegistry {
    async fn run(&self, ops: Vec<RegistryOp>) -> Result<Vec<RegistryReply>, FabricError> {
        Ok(self.apply(ops))
    }

    async fn subscribe(&self, channel: &str) -> Result<Subscription, FabricError> {
        let rx = self.subscribe_receiver(channel);
        Ok(Box::pin(futures_util::stream::unfold(rx, |mut rx| async {
            rx.recv().await.map(|m| (m, rx))
        })))
    }
}

#[cfg(all(test, not(madsim)))]
mod tests {
    use super::*;
    use futures_util::StreamExt;

    fn one(r: &MemRegistry, op: RegistryOp) -> RegistryReply {
        r.apply(vec![op]).pop().expect("one reply")
    }

    #[tokio::test]
    async fn expiring_keys_answer_what_they_replaced_until_they_expire() {
        let r = MemRegistry::new();
        let set = |v: &str| RegistryOp::SetExpiringGet {
            key: "k".into(),
            value: v.into(),
            ttl_ms: 50,
        };
        assert_eq!(one(&r, set("a")), RegistryReply::Previous(None));
        assert_eq!(one(&r, set("b")), RegistryReply::Previous(Some("a".into())));
        tokio::time::sleep(Duration::from_millis(60)).await;
        let get = RegistryOp::Get {
            keys: vec!["k".into(), "other".into()],
        };
        assert_eq!(one(&r, get), RegistryReply::Values(vec![None, None]));
        assert_eq!(one(&r, set("c")), RegistryReply::Previous(None));
    }

    #[tokio::test]
    async fn a_conditional_hash_delete_keeps_a_field_set_again() {
        let r = MemRegistry::new();
        let hset = |v: &str| RegistryOp::HashSet {
            key: "h".into(),
            field: "f".into(),
            value: v.into(),
        };
        let delete_if = |v: &str| RegistryOp::HashDeleteIf {
            key: "h".into(),
            field: "f".into(),
            value: v.into(),
        };
        let all = || RegistryOp::HashGetAll { key: "h".into() };
        one(&r, hset("old"));
        one(&r, hset("new"));
        one(&r, delete_if("old"));
        let fields = one(&r, all()).fields().expect("fields");
        assert_eq!(fields.get("f").map(String::as_str), Some("new"));
        one(&r, delete_if("new"));
        assert!(one(&r, all()).fields().expect("fields").is_empty());
    }

    #[tokio::test]
    async fn a_delete_up_to_a_serial_keeps_later_values_and_other_writers() {
        let r = MemRegistry::new();
        let hset = |v: &str| RegistryOp::HashSet {
            key: "h".into(),
            field: "f".into(),
            value: v.into(),
        };
        let up_to = |prefix: &str, serial| RegistryOp::HashDeleteUpTo {
            key: "h".into(),
            field: "f".into(),
            prefix: prefix.into(),
            serial,
        };
        one(&r, hset("w@a/7"));
        assert_eq!(one(&r, up_to("w@a", 6)), RegistryReply::Count(0));
        assert_eq!(one(&r, up_to("x@a", 9)), RegistryReply::Count(0));
        assert_eq!(one(&r, up_to("w@a", 7)), RegistryReply::Count(1));
        one(&r, hset("w@a/3"));
        assert_eq!(one(&r, up_to("w@a", 7)), RegistryReply::Count(1));
        assert_eq!(one(&r, up_to("w@a", 7)), RegistryReply::Count(0));
    }

    #[tokio::test]
    async fn removing_members_counts_only_those_present() {
        let r = MemRegistry::new();
        for m in ["a", "b"] {
            one(
                &r,
                RegistryOp::SetAdd {
                    key: "s".into(),
                    member: m.into(),
                },
            );
        }
        let remove = |members: &[&str]| RegistryOp::RemoveCounting {
            set: "s".into(),
            counter: "n".into(),
            members: members.iter().map(|m| (*m).to_owned()).collect(),
        };
        assert_eq!(one(&r, remove(&["a", "x"])), RegistryReply::Count(1));
        assert_eq!(one(&r, remove(&["a"])), RegistryReply::Count(1));
        assert_eq!(one(&r, remove(&["b"])), RegistryReply::Count(2));
        let members = one(&r, RegistryOp::SetMembers { key: "s".into() });
        assert_eq!(members, RegistryReply::Members(vec![]));
    }

    #[tokio::test]
    async fn publish_reaches_current_subscribers_only() {
        let r = MemRegistry::new();
        let publish = |p: &[u8]| RegistryOp::Publish {
            channel: "c".into(),
            payload: p.to_vec(),
        };
        assert_eq!(one(&r, publish(b"lost")), RegistryReply::Count(0));
        let mut sub = r.subscribe("c").await.expect("subscribed");
        assert_eq!(one(&r, publish(b"one")), RegistryReply::Count(1));
        assert_eq!(sub.next().await.as_deref(), Some(&b"one"[..]));
        drop(sub);
        assert_eq!(one(&r, publish(b"two")), RegistryReply::Count(0));
    }
}
