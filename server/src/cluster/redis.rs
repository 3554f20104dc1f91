//! The [`Fabric`] on Redis: a connection registry in hashes, server liveness by
//! heartbeat keys with a TTL, and routing over pub/sub.
//!
//! Keys (all under the configured prefix, default `cp:`):
//! - `dev:{user}`: hash, one field per connection `{device}@{server}` → id of the
//!   server holding it. A device may be connected to two servers for a while (a
//!   long-poll mailbox outlives its device's move to another server); each server
//!   sets and deletes only its own fields, so re-registering after an outage never
//!   takes a device's newer connection elsewhere off the routes.
//! - `srv:{server}`: exists while the server is alive; set every TTL/3 with
//!   expiry TTL, so a crashed server's entries stop being routed to within TTL.
//!   It holds the server's incarnation (a new one per start).
//! - `lives`: set of `{incarnation}@{server}`, one per running server process.
//!   A member whose `srv:` key lapsed or names another incarnation died; the
//!   server that notices removes it and counts it in `peer_deaths`.
//! - `peer_deaths`: how many server processes died; every server re-reads its
//!   sessions when it grows, since the dead one may have held events for them
//!   that its router outbox never handed over (see [`super::outbox`]).
//! - channel `to:{server}`: events for devices on that server ([`Envelope`] JSON).
//! - `watch:{user}`: set of users subscribed to `user`'s presence changes,
//!   expiring [`WATCH_TTL`] after the last subscription.
//!
//! Why pub/sub rather than streams: the store is the source of truth and every
//! device stream fills gaps from it, so routing needs no backlog, no consumer
//! groups and no trimming, only the lowest latency. Pub/sub loses messages
//! only when a subscriber's connection drops; this server then resubscribes,
//! re-registers its devices and tells every local session to re-read its
//! conversations, so what was lost is delivered from the store.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;
use redis::aio::ConnectionManager;
use redis::AsyncCommands;

use super::{Envelope, Fabric, FabricError, Forwarded, Routed, WATCH_TTL};
use crate::hub::Hub;
use crate::metrics::FabricCounters;

/// Longest a send waits for Redis to take its event.
const FORWARD_WAIT_MAX: Duration = Duration::from_secs(1);

/// Removes the dead members given (ARGV) from the set of lives (KEYS[1]) and
/// counts those it removed in the death counter (KEYS[2]); returns the counter.
const BURY_LUA: &str = r"
local n = 0
for _, member in ipairs(ARGV) do
  n = n + redis.call('SREM', KEYS[1], member)
end
if n > 0 then
  return redis.call('INCRBY', KEYS[2], n)
end
return tonumber(redis.call('GET', KEYS[2]) or '0')";

/// Ends this incarnation (ARGV[1]: incarnation, ARGV[2]: its member of lives):
/// deletes the liveness key (KEYS[1]) if it is still this incarnation's and leaves
/// the set of lives (KEYS[2]).
const LEAVE_LUA: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
end
return redis.call('SREM', KEYS[2], ARGV[2])";

/// How to reach Redis and name this server.
#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// `redis://host:port/db`.
    pub url: String,
    /// This server's id: unique among live servers.
    pub server_id: String,
    /// How long a silent server stays routable.
    pub ttl: Duration,
    /// Prefix of every key and channel.
    pub prefix: String,
}

/// The Redis-backed [`Fabric`]; clones share connections and counters.
#[derive(Clone)]
pub struct RedisFabric {
    config: RedisConfig,
    conn: ConnectionManager,
    bury: redis::Script,
    /// This process's incarnation: `srv:{id}` holds it while it runs.
    incarnation: String,
    /// The death counter as last read; `None` before the first read.
    deaths_seen: Arc<std::sync::Mutex<Option<i64>>>,
    counters: FabricCounters,
}

/// A string no other start of any server shares: process id and start time.
fn new_incarnation() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{}-{nanos:x}", std::process::id())
}

fn fail(what: &str, e: impl std::fmt::Display) -> FabricError {
    FabricError(format!("{what}: {e}"))
}

impl RedisFabric {
    /// Connects, announces this server, and starts the heartbeat and the subscriber.
    ///
    /// Fails with a message naming the URL when Redis cannot be reached.
    pub async fn start(
        config: RedisConfig,
        hub: Arc<Hub>,
        counters: FabricCounters,
    ) -> Result<Arc<Self>, FabricError> {
        assert!(
            config.ttl >= Duration::from_secs(1),
            "registry TTL below 1 s"
        );
        let url = config.url.clone();
        let client = redis::Client::open(url.as_str())
            .map_err(|e| fail(&format!("invalid Redis URL {url:?}"), e))?;
        let manager_config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(3)))
            .set_response_timeout(Some(Duration::from_secs(3)))
            .set_number_of_retries(2);
        let mut conn = client
            .get_connection_manager_with_config(manager_config)
            .await
            .map_err(|e| fail(&format!("cannot connect to Redis at {url}"), e))?;
        let _: String = redis::cmd("PING")
            .query_async(&mut conn)
            .await
            .map_err(|e| fail(&format!("Redis at {url} does not answer PING"), e))?;
        let fabric = Arc::new(Self {
            config,
            conn,
            bury: redis::Script::new(BURY_LUA),
            incarnation: new_incarnation(),
            deaths_seen: Arc::new(std::sync::Mutex::new(None)),
            counters,
        });
        fabric.heartbeat_once().await?;
        let (subscribed_tx, subscribed_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(Arc::clone(&fabric).heartbeat_loop(Arc::clone(&hub)));
        tokio::spawn(Arc::clone(&fabric).subscriber_loop(client, hub, subscribed_tx));
        let _ = tokio::time::timeout(Duration::from_secs(5), subscribed_rx).await;
        tracing::info!(
            server_id = fabric.config.server_id,
            redis = url,
            "joined the cluster"
        );
        Ok(fabric)
    }

    fn device_key(&self, user: &str) -> String {
        format!("{}dev:{user}", self.config.prefix)
    }

    /// The field of `dev:{user}` registering `device`'s connection to `server`.
    fn connection_field(device: &str, server: &str) -> String {
        format!("{device}@{server}")
    }

    fn alive_key(&self, server: &str) -> String {
        format!("{}srv:{server}", self.config.prefix)
    }

    fn watch_key(&self, user: &str) -> String {
        format!("{}watch:{user}", self.config.prefix)
    }

    fn channel(&self, server: &str) -> String {
        format!("{}to:{server}", self.config.prefix)
    }

    /// Announces this server for another TTL; true if its previous announcement
    /// had expired (other servers then treated it as dead and routed nothing here).
    async fn heartbeat_once(&self) -> Result<bool, FabricError> {
        let ttl_ms = u64::try_from(self.config.ttl.as_millis()).unwrap_or(u64::MAX);
        let key = self.alive_key(&self.config.server_id);
        let mut conn = self.conn.clone();
        let (previous,): (Option<String>,) = redis::pipe()
            .cmd("SET")
            .arg(&key)
            .arg(&self.incarnation)
            .arg("PX")
            .arg(ttl_ms)
            .arg("GET")
            .sadd(self.lives_key(), self.member())
            .ignore()
            .query_async(&mut conn)
            .await
            .map_err(|e| fail("heartbeat", e))?;
        Ok(previous.is_none())
    }

    fn lives_key(&self) -> String {
        format!("{}lives", self.config.prefix)
    }

    fn deaths_key(&self) -> String {
        format!("{}peer_deaths", self.config.prefix)
    }

    /// This process in the set of lives.
    fn member(&self) -> String {
        format!("{}@{}", self.incarnation, self.config.server_id)
    }

    /// Finds server processes that died (lease lapsed, or restarted under the
    /// same id), records their deaths, and returns how many deaths any server saw
    /// since this one last looked: events the dead owed local devices may never
    /// have been routed, so the caller resyncs the sessions when it is not 0.
    async fn peers_died(&self) -> Result<u64, FabricError> {
        let mut conn = self.conn.clone();
        let members: Vec<String> = conn
            .smembers(self.lives_key())
            .await
            .map_err(|e| fail("listing servers", e))?;
        let me = self.member();
        let peers: Vec<(&str, &str, &String)> = members
            .iter()
            .filter(|m| **m != me)
            .filter_map(|m| m.split_once('@').map(|(inc, id)| (inc, id, m)))
            .collect();
        let mut dead = Vec::new();
        if !peers.is_empty() {
            let keys: Vec<String> = peers.iter().map(|(_, id, _)| self.alive_key(id)).collect();
            let found: Vec<Option<String>> = conn
                .mget(&keys)
                .await
                .map_err(|e| fail("liveness lookup", e))?;
            for ((incarnation, _, member), found) in peers.iter().zip(found) {
                if found.as_deref() != Some(*incarnation) {
                    dead.push((*member).clone());
                }
            }
        }
        let mut invocation = self.bury.prepare_invoke();
        invocation.key(self.lives_key()).key(self.deaths_key());
        for member in &dead {
            invocation.arg(member);
        }
        let deaths: i64 = invocation
            .invoke_async(&mut conn)
            .await
            .map_err(|e| fail("recording server deaths", e))?;
        let mut seen = self.deaths_seen.lock().expect("deaths seen");
        // (A smaller counter means Redis restarted empty: recovery resyncs then.)
        let grew = seen.map_or(0, |before| deaths.saturating_sub(before).max(0));
        *seen = Some(deaths);
        Ok(u64::try_from(grew).unwrap_or(0))
    }

    async fn heartbeat_loop(self: Arc<Self>, hub: Arc<Hub>) {
        let mut every = tokio::time::interval(self.config.ttl / 3);
        loop {
            every.tick().await;
            match self.heartbeat_once().await {
                // Treated as dead for a while: events for local devices were not routed.
                Ok(true) => self.recover(&hub).await,
                Ok(false) => {}
                Err(e) => {
                    crate::warn_throttled!(error = %e, "registry heartbeat failed; retrying");
                    continue;
                }
            }
            match self.peers_died().await {
                Ok(0) => {}
                Ok(died) => {
                    self.counters.peers_lost.inc_by(died);
                    let told = super::resync_sessions(&hub);
                    self.counters.resyncs.inc();
                    tracing::info!(
                        died,
                        told,
                        "a peer server died; sessions re-read their conversations"
                    );
                }
                Err(e) => {
                    crate::warn_throttled!(error = %e, "checking peer servers failed; retrying")
                }
            }
        }
    }

    /// Receives events for this server; after every (re)subscription but the
    /// first, re-registers local devices and tells every session to resync.
    async fn subscriber_loop(
        self: Arc<Self>,
        client: redis::Client,
        hub: Arc<Hub>,
        subscribed: tokio::sync::oneshot::Sender<()>,
    ) {
        let channel = self.channel(&self.config.server_id);
        let mut subscribed = Some(subscribed);
        let mut backoff = Duration::from_millis(100);
        loop {
            let pubsub = async {
                let mut pubsub = client.get_async_pubsub().await?;
                pubsub.subscribe(&channel).await?;
                Ok::<_, redis::RedisError>(pubsub)
            };
            let mut pubsub = match pubsub.await {
                Ok(pubsub) => pubsub,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot subscribe to {channel}; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    continue;
                }
            };
            backoff = Duration::from_millis(100);
            if let Some(first) = subscribed.take() {
                let _ = first.send(());
            } else {
                self.recover(&hub).await;
            }
            let mut messages = pubsub.on_message();
            while let Some(msg) = messages.next().await {
                let Ok(payload) = msg.get_payload::<Vec<u8>>() else {
                    continue;
                };
                match serde_json::from_slice::<Envelope>(&payload) {
                    Ok(envelope) => {
                        self.counters.received.inc();
                        envelope.deliver(&hub);
                    }
                    Err(e) => tracing::error!(error = %e, "undecodable event on {channel}"),
                }
            }
            tracing::warn!("lost the subscription to {channel}; resubscribing");
        }
    }

    /// After an interruption: announce this server again, re-register every local
    /// device (Redis may have restarted empty), then make every session re-read.
    async fn recover(&self, hub: &Hub) {
        if let Err(e) = self.heartbeat_once().await {
            tracing::warn!(error = %e, "heartbeat after resubscribing failed");
        }
        let devices = hub.devices();
        if !devices.is_empty() {
            // (Redis refuses an empty pipeline.)
            let mut pipe = redis::pipe();
            let me = &self.config.server_id;
            for (user, device) in &devices {
                pipe.hset(
                    self.device_key(user),
                    Self::connection_field(device, me),
                    me,
                )
                .ignore();
            }
            let mut conn = self.conn.clone();
            if let Err(e) = pipe.query_async::<()>(&mut conn).await {
                tracing::warn!(error = %e, "re-registering devices failed");
            }
        }
        let told = super::resync_sessions(hub);
        self.counters.resyncs.inc();
        tracing::info!(
            devices = devices.len(),
            told,
            "fabric recovered; sessions re-read their conversations"
        );
    }

    /// Where the devices of `users` are registered (connection field → server), and which
    /// of those servers other than this one are alive.
    async fn placements(
        &self,
        users: &[String],
    ) -> Result<(Vec<HashMap<String, String>>, HashMap<String, bool>), FabricError> {
        let mut conn = self.conn.clone();
        let mut pipe = redis::pipe();
        for user in users {
            pipe.hgetall(self.device_key(user));
        }
        let placements: Vec<HashMap<String, String>> = pipe
            .query_async(&mut conn)
            .await
            .map_err(|e| fail("registry lookup", e))?;
        let mut servers: Vec<&str> = placements
            .iter()
            .flat_map(|p| p.values().map(String::as_str))
            .filter(|s| *s != self.config.server_id)
            .collect();
        servers.sort_unstable();
        servers.dedup();
        let mut alive = HashMap::new();
        if !servers.is_empty() {
            let keys: Vec<String> = servers.iter().map(|s| self.alive_key(s)).collect();
            let found: Vec<Option<String>> = conn
                .mget(&keys)
                .await
                .map_err(|e| fail("liveness lookup", e))?;
            for (server, found) in servers.iter().zip(found) {
                alive.insert((*server).to_owned(), found.is_some());
            }
        }
        alive.insert(self.config.server_id.clone(), true);
        Ok((placements, alive))
    }

    /// Looks up where `users` are connected and publishes `event` to those servers.
    async fn route(&self, users: &[String], event: &Routed) -> Result<Forwarded, FabricError> {
        let (placements, alive) = self.placements(users).await?;
        let mut conn = self.conn.clone();
        let unplaced = users
            .iter()
            .zip(&placements)
            .filter(|(_, devices)| !devices.values().any(|s| alive[s]))
            .map(|(user, _)| user.clone())
            .collect();
        let mut by_server: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        let mut fields_of: BTreeMap<&str, Vec<(&str, &str)>> = BTreeMap::new();
        for (user, connections) in users.iter().zip(&placements) {
            for (field, server) in connections {
                if *server == self.config.server_id {
                    continue;
                }
                let listed = by_server.entry(server).or_default();
                if listed.last() != Some(user) {
                    listed.push(user.clone());
                }
                fields_of.entry(server).or_default().push((user, field));
            }
        }
        if by_server.is_empty() {
            return Ok(Forwarded { unplaced });
        }
        let mut pipe = redis::pipe();
        for server in by_server.keys() {
            if alive[*server] {
                let envelope = Envelope::new(by_server[server].clone(), event);
                let payload = serde_json::to_vec(&envelope).expect("envelopes serialize");
                pipe.publish(self.channel(server), payload).ignore();
                self.counters.forwarded.inc();
            } else {
                // A dead server's registrations: forget them so nobody routes there.
                for (user, field) in &fields_of[server] {
                    pipe.hdel(self.device_key(user), *field).ignore();
                }
            }
        }
        pipe.query_async::<()>(&mut conn)
            .await
            .map_err(|e| fail("publish", e))?;
        Ok(Forwarded { unplaced })
    }
}

#[async_trait]
impl Fabric for RedisFabric {
    fn server_id(&self) -> &str {
        &self.config.server_id
    }

    async fn device_connected(&self, user: &str, device: &str) -> Result<(), FabricError> {
        let mut conn = self.conn.clone();
        let me = &self.config.server_id;
        let _: i64 = conn
            .hset(
                self.device_key(user),
                Self::connection_field(device, me),
                me,
            )
            .await
            .map_err(|e| fail("registering the device", e))?;
        Ok(())
    }

    fn device_disconnected(&self, user: &str, device: &str) {
        let key = self.device_key(user);
        let field = Self::connection_field(device, &self.config.server_id);
        let mut conn = self.conn.clone();
        tokio::spawn(async move {
            let forgotten = conn.hdel::<_, _, i64>(key, field).await;
            if let Err(e) = forgotten {
                tracing::debug!(error = %e, "unregistering a device failed; its entry goes stale");
            }
        });
    }

    async fn forward(&self, users: Arc<[String]>, event: Routed) -> Result<Forwarded, FabricError> {
        match tokio::time::timeout(FORWARD_WAIT_MAX, self.route(&users, &event)).await {
            Ok(routed) => routed,
            Err(_) => Err(FabricError(format!(
                "no answer from Redis within {FORWARD_WAIT_MAX:?}"
            ))),
        }
    }

    async fn online_users(&self, users: &[String]) -> Result<Vec<bool>, FabricError> {
        let (placements, alive) = self.placements(users).await?;
        Ok(placements
            .iter()
            .map(|devices| devices.values().any(|s| alive[s]))
            .collect())
    }

    async fn watch(&self, watcher: &str, targets: &[String]) -> Result<(), FabricError> {
        let ttl_secs = i64::try_from(WATCH_TTL.as_secs()).unwrap_or(i64::MAX);
        let mut pipe = redis::pipe();
        for target in targets {
            let key = self.watch_key(target);
            pipe.sadd(&key, watcher).ignore();
            pipe.expire(&key, ttl_secs).ignore();
        }
        let mut conn = self.conn.clone();
        pipe.query_async::<()>(&mut conn)
            .await
            .map_err(|e| fail("presence subscription", e))
    }

    async fn watchers(&self, target: &str) -> Result<Vec<String>, FabricError> {
        let mut conn = self.conn.clone();
        conn.smembers(self.watch_key(target))
            .await
            .map_err(|e| fail("presence subscribers", e))
    }

    async fn health(&self) -> Result<(), FabricError> {
        let mut conn = self.conn.clone();
        let cmd = redis::cmd("PING");
        let ping = cmd.query_async::<String>(&mut conn);
        match tokio::time::timeout(FORWARD_WAIT_MAX, ping).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(fail("Redis PING", e)),
            Err(_) => Err(FabricError(format!(
                "Redis did not answer PING within {FORWARD_WAIT_MAX:?}"
            ))),
        }
    }

    async fn leave(&self) {
        let mut conn = self.conn.clone();
        let left = redis::Script::new(LEAVE_LUA)
            .key(self.alive_key(&self.config.server_id))
            .key(self.lives_key())
            .arg(&self.incarnation)
            .arg(self.member())
            .invoke_async::<i64>(&mut conn)
            .await;
        match left {
            Ok(_) => tracing::info!("left the cluster"),
            Err(e) => {
                tracing::warn!(error = %e, "leaving the cluster failed; peers will resync once the lease lapses")
            }
        }
    }
}
