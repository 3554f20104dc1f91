//! [`Registry`] on Redis: each [`RegistryOp`] is one command (or a short Lua
//! script where it must be atomic), a batch is one pipeline.

use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;
use redis::aio::ConnectionManager;
use redis::{FromRedisValue, Value};

use super::{Registry, RegistryOp, RegistryReply, Subscription};
use crate::cluster::FabricError;

/// Longest one Redis command (or connecting) waits before it fails; a failed
/// command is retried twice.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(3);

/// `HashDeleteIf`: KEYS[1] hash, ARGV[1] field, ARGV[2] the value it must hold.
const HASH_DELETE_IF_LUA: &str = r"
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  return redis.call('HDEL', KEYS[1], ARGV[1])
end
return 0";

/// `HashDeleteUpTo`: KEYS[1] hash, ARGV[1] field, ARGV[2] prefix, ARGV[3] serial.
const HASH_DELETE_UP_TO_LUA: &str = r"
local v = redis.call('HGET', KEYS[1], ARGV[1])
if not v then
  return 0
end
local prefix, n = string.match(v, '^(.*)/(%d+)$')
if prefix == ARGV[2] and tonumber(n) <= tonumber(ARGV[3]) then
  return redis.call('HDEL', KEYS[1], ARGV[1])
end
return 0";

/// `RemoveCounting`: KEYS[1] set, KEYS[2] counter, ARGV the members.
const REMOVE_COUNTING_LUA: &str = r"
local n = 0
for _, member in ipairs(ARGV) do
  n = n + redis.call('SREM', KEYS[1], member)
end
if n > 0 then
  return redis.call('INCRBY', KEYS[2], n)
end
return tonumber(redis.call('GET', KEYS[2]) or '0')";

/// `DeleteIfThenRemove`: KEYS[1] key, KEYS[2] set, ARGV[1] value, ARGV[2] member.
const DELETE_IF_THEN_REMOVE_LUA: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
end
return redis.call('SREM', KEYS[2], ARGV[2])";

fn fail(what: &str, e: impl std::fmt::Display) -> FabricError {
    FabricError(format!("{what}: {e}"))
}

/// A Redis server as the registry; clones share one multiplexed connection.
#[derive(Clone)]
pub struct RedisRegistry {
    url: String,
    client: redis::Client,
    conn: ConnectionManager,
}

impl RedisRegistry {
    /// Connects to `url` (`redis://host:port/db`) and checks that it answers;
    /// the error names the URL.
    pub async fn connect(url: &str) -> Result<Self, FabricError> {
        let client =
            redis::Client::open(url).map_err(|e| fail(&format!("invalid Redis URL {url:?}"), e))?;
        let manager_config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(COMMAND_TIMEOUT))
            .set_response_timeout(Some(COMMAND_TIMEOUT))
            .set_number_of_retries(2);
        let mut conn = client
            .get_connection_manager_with_config(manager_config)
            .await
            .map_err(|e| fail(&format!("cannot connect to Redis at {url}"), e))?;
        let _: String = redis::cmd("PING")
            .query_async(&mut conn)
            .await
            .map_err(|e| fail(&format!("Redis at {url} does not answer PING"), e))?;
        Ok(Self {
            url: url.to_owned(),
            client,
            conn,
        })
    }

    /// The URL connected to.
    pub fn url(&self) -> &str {
        &self.url
    }
}

fn eval(script: &str, keys: &[&str], args: &[&str]) -> redis::Cmd {
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(script).arg(keys.len());
    for key in keys {
        cmd.arg(*key);
    }
    for arg in args {
        cmd.arg(*arg);
    }
    cmd
}

fn command(op: &RegistryOp) -> redis::Cmd {
    match op {
        RegistryOp::Ping => redis::cmd("PING"),
        RegistryOp::SetExpiringGet { key, value, ttl_ms } => {
            let mut cmd = redis::cmd("SET");
            cmd.arg(key).arg(value).arg("PX").arg(*ttl_ms).arg("GET");
            cmd
        }
        RegistryOp::Get { keys } => {
            let mut cmd = redis::cmd("MGET");
            cmd.arg(keys);
            cmd
        }
        RegistryOp::SetAdd { key, member } => {
            let mut cmd = redis::cmd("SADD");
            cmd.arg(key).arg(member);
            cmd
        }
        RegistryOp::SetMembers { key } => {
            let mut cmd = redis::cmd("SMEMBERS");
            cmd.arg(key);
            cmd
        }
        RegistryOp::Expire { key, ttl_ms } => {
            let mut cmd = redis::cmd("PEXPIRE");
            cmd.arg(key).arg(*ttl_ms);
            cmd
        }
        RegistryOp::HashSet { key, field, value } => {
            let mut cmd = redis::cmd("HSET");
            cmd.arg(key).arg(field).arg(value);
            cmd
        }
        RegistryOp::HashDeleteIf { key, field, value } => {
            eval(HASH_DELETE_IF_LUA, &[key], &[field, value])
        }
        RegistryOp::HashDeleteUpTo {
            key,
            field,
            prefix,
            serial,
        } => eval(
            HASH_DELETE_UP_TO_LUA,
            &[key],
            &[field, prefix, &serial.to_string()],
        ),
        RegistryOp::HashGetAll { key } => {
            let mut cmd = redis::cmd("HGETALL");
            cmd.arg(key);
            cmd
        }
        RegistryOp::Publish { channel, payload } => {
            let mut cmd = redis::cmd("PUBLISH");
            cmd.arg(channel).arg(payload.as_slice());
            cmd
        }
        RegistryOp::RemoveCounting {
            set,
            counter,
            members,
        } => {
            let args: Vec<&str> = members.iter().map(String::as_str).collect();
            eval(REMOVE_COUNTING_LUA, &[set, counter], &args)
        }
        RegistryOp::DeleteIfThenRemove {
            key,
            value,
            set,
            member,
        } => eval(DELETE_IF_THEN_REMOVE_LUA, &[key, set], &[value, member]),
    }
}

fn parse<T: FromRedisValue>(value: Value) -> Result<T, FabricError> {
    redis::from_redis_value(value).map_err(|e| fail("unexpected Redis reply", e))
}

fn reply(op: &RegistryOp, value: Value) -> Result<RegistryReply, FabricError> {
    Ok(match op {
        RegistryOp::SetExpiringGet { .. } => RegistryReply::Previous(parse(value)?),
        RegistryOp::Get { .. } => RegistryReply::Values(parse(value)?),
        RegistryOp::SetMembers { .. } => RegistryReply::Members(parse(value)?),
        RegistryOp::HashGetAll { .. } => RegistryReply::Fields(parse(value)?),
        RegistryOp::Publish { .. }
        | RegistryOp::RemoveCounting { .. }
        | RegistryOp::HashDeleteUpTo { .. } => RegistryReply::Count(parse(value)?),
        RegistryOp::Ping
        | RegistryOp::SetAdd { .. }
        | RegistryOp::Expire { .. }
        | RegistryOp::HashSet { .. }
        | RegistryOp::HashDeleteIf { .. }
        | RegistryOp::DeleteIfThenRemove { .. } => RegistryReply::Done,
    })
}

#[async_trait]
impl Registry for RedisRegistry {
    async fn run(&self, ops: Vec<RegistryOp>) -> Result<Vec<RegistryReply>, FabricError> {
        if ops.is_empty() {
            return Ok(Vec::new()); // (Redis refuses an empty pipeline.)
        }
        let mut pipe = redis::pipe();
        for op in &ops {
            pipe.add_command(command(op));
        }
        let mut conn = self.conn.clone();
        let values: Vec<Value> = pipe
            .query_async(&mut conn)
            .await
            .map_err(|e| fail("Redis", e))?;
        if values.len() != ops.len() {
            return Err(FabricError(format!(
                "Redis answered {} replies to {} commands",
                values.len(),
                ops.len()
            )));
        }
        ops.iter().zip(values).map(|(op, v)| reply(op, v)).collect()
    }

    async fn subscribe(&self, channel: &str) -> Result<Subscription, FabricError> {
        let mut pubsub = self
            .client
            .get_async_pubsub()
            .await
            .map_err(|e| fail(&format!("cannot subscribe to {channel}"), e))?;
        pubsub
            .subscribe(channel)
            .await
            .map_err(|e| fail(&format!("cannot subscribe to {channel}"), e))?;
        // The stream owns the pubsub connection, and ends when it drops.
        Ok(Box::pin(futures_util::stream::unfold(
            pubsub,
            |mut pubsub| async move {
                let msg = pubsub.on_message().next().await?;
                Some((msg.get_payload_bytes().to_vec(), pubsub))
            },
        )))
    }
}
