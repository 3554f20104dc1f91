//! The wire under the cluster fabric: a key-value server with hashes, sets,
//! expiring keys and pub/sub (Redis, or its stand-in under the simulator).
//!
//! [`super::fabric::RegistryFabric`] holds every decision (what to register,
//! who is alive, what was lost, when to resync); a [`Registry`] only runs
//! [`RegistryOp`]s, each atomic, so the same fabric logic runs over Redis in
//! production ([`redis::RedisRegistry`]) and over [`memory::MemRegistry`] on a
//! simulated node, the way `SharedStore` runs over any `Tables`.

pub mod memory;
#[cfg(not(madsim))]
pub mod redis;

use std::collections::BTreeMap;
use std::pin::Pin;

use async_trait::async_trait;
use futures_util::Stream;
use serde::{Deserialize, Serialize};

use super::FabricError;

/// One registry command; each is atomic on its own (a batch is not).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RegistryOp {
    /// Answers if the server is up (`PING`).
    Ping,
    /// Sets `key` to `value`, expiring after `ttl_ms`; answers the value it
    /// replaced if that had not expired (`SET key value PX ttl GET`).
    SetExpiringGet {
        /// The key.
        key: String,
        /// Its new value.
        value: String,
        /// Milliseconds until it expires.
        ttl_ms: u64,
    },
    /// The values of `keys`, `None` where absent or expired (`MGET`).
    Get {
        /// The keys, in the order answered.
        keys: Vec<String>,
    },
    /// Adds `member` to the set at `key` (`SADD`).
    SetAdd {
        /// The set.
        key: String,
        /// The member added.
        member: String,
    },
    /// Every member of the set at `key` (`SMEMBERS`), in no particular order.
    SetMembers {
        /// The set.
        key: String,
    },
    /// Makes `key` expire after `ttl_ms` (`PEXPIRE`).
    Expire {
        /// The key.
        key: String,
        /// Milliseconds until it expires.
        ttl_ms: u64,
    },
    /// Sets `field` of the hash at `key` (`HSET`).
    HashSet {
        /// The hash.
        key: String,
        /// The field.
        field: String,
        /// Its value.
        value: String,
    },
    /// Deletes `field` of the hash at `key` if its value is still `value`; a
    /// field set again since (with another value) stays.
    HashDeleteIf {
        /// The hash.
        key: String,
        /// The field.
        field: String,
        /// The value it must still hold.
        value: String,
    },
    /// Deletes `field` of the hash at `key` if its value is `{prefix}/{n}` with
    /// `n <= serial`: a value of the same writer set later (a higher `n`) stays.
    /// Answers 1 if it deleted the field, else 0.
    HashDeleteUpTo {
        /// The hash.
        key: String,
        /// The field.
        field: String,
        /// What the value must hold before its last `/`.
        prefix: String,
        /// The highest number after it that is deleted.
        serial: u64,
    },
    /// Every field of the hash at `key` (`HGETALL`).
    HashGetAll {
        /// The hash.
        key: String,
    },
    /// Sends `payload` to the subscribers of `channel` now (`PUBLISH`); answers
    /// how many there were. Nothing is kept for a subscriber not connected.
    Publish {
        /// The channel.
        channel: String,
        /// The message.
        payload: Vec<u8>,
    },
    /// Removes `members` from the set at `set` and adds the number removed to
    /// the counter at `counter`; answers the counter (0 if never set).
    RemoveCounting {
        /// The set.
        set: String,
        /// The counter.
        counter: String,
        /// The members to remove.
        members: Vec<String>,
    },
    /// Deletes `key` if its value is `value`, then removes `member` from the
    /// set at `set`.
    DeleteIfThenRemove {
        /// The key.
        key: String,
        /// The value it must hold to be deleted.
        value: String,
        /// The set.
        set: String,
        /// The member removed from it.
        member: String,
    },
}

/// The answer to one [`RegistryOp`], in the shape each op gives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RegistryReply {
    /// `SetExpiringGet`: the value replaced.
    Previous(Option<String>),
    /// `Get`: a value per key.
    Values(Vec<Option<String>>),
    /// `SetMembers`.
    Members(Vec<String>),
    /// `HashGetAll`.
    Fields(BTreeMap<String, String>),
    /// `Publish` (subscribers reached), `RemoveCounting` (the counter),
    /// `HashDeleteUpTo` (fields deleted).
    Count(i64),
    /// Everything else.
    Done,
}

impl RegistryReply {
    fn mismatch(self, wanted: &str) -> FabricError {
        FabricError(format!("registry answered {self:?} where {wanted} was due"))
    }

    /// The value a `SetExpiringGet` replaced.
    pub fn previous(self) -> Result<Option<String>, FabricError> {
        match self {
            Self::Previous(v) => Ok(v),
            other => Err(other.mismatch("a previous value")),
        }
    }

    /// The values of a `Get`.
    pub fn values(self) -> Result<Vec<Option<String>>, FabricError> {
        match self {
            Self::Values(v) => Ok(v),
            other => Err(other.mismatch("values")),
        }
    }

    /// The members of a `SetMembers`.
    pub fn members(self) -> Result<Vec<String>, FabricError> {
        match self {
            Self::Members(v) => Ok(v),
            other => Err(other.mismatch("set members")),
        }
    }

    /// The fields of a `HashGetAll`.
    pub fn fields(self) -> Result<BTreeMap<String, String>, FabricError> {
        match self {
            Self::Fields(v) => Ok(v),
            other => Err(other.mismatch("hash fields")),
        }
    }

    /// The count of a `Publish` or `RemoveCounting`.
    pub fn count(self) -> Result<i64, FabricError> {
        match self {
            Self::Count(v) => Ok(v),
            other => Err(other.mismatch("a count")),
        }
    }
}

/// Messages published to one channel, in order, while the subscription holds.
/// The stream ends when the subscription is lost (connection dropped, server
/// restarted): what was published meanwhile is gone, and the subscriber must
/// subscribe again and assume it missed something.
pub type Subscription = Pin<Box<dyn Stream<Item = Vec<u8>> + Send>>;

/// A registry server: runs ops and serves subscriptions.
#[async_trait]
pub trait Registry: Send + Sync + 'static {
    /// Runs `ops` in order (pipelined), one reply per op in the same order; an
    /// error means any prefix of them may have run.
    async fn run(&self, ops: Vec<RegistryOp>) -> Result<Vec<RegistryReply>, FabricError>;

    /// Subscribes to `channel`; returns once subscribed, so that everything
    /// published from then on arrives until the stream ends.
    async fn subscribe(&self, channel: &str) -> Result<Subscription, FabricError>;

    /// Runs one op.
    async fn run_one(&self, op: RegistryOp) -> Result<RegistryReply, FabricError> {
        let mut replies = self.run(vec![op]).await?;
        match (replies.pop(), replies.is_empty()) {
            (Some(reply), true) => Ok(reply),
            _ => Err(FabricError(
                "registry answered a single op with other than one reply".into(),
            )),
        }
    }
}
