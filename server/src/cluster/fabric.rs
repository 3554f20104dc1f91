//! The [`Fabric`] over any [`Registry`]: a connection registry in hashes, server
//! liveness by heartbeat keys with a TTL, and routing over pub/sub. The same
//! logic runs on Redis in production and on the simulator's registry node.
//!
//! Keys (all under the configured prefix, default `cp:`):
//! - `dev:{user}`: hash, one field per connection `{device}@{server}` → the
//!   registration `{incarnation}@{server}/{serial}`. A device may be connected to
//!   two servers for a while (a long-poll mailbox outlives its device's move to
//!   another server); each server sets and deletes only its own fields, so
//!   re-registering after an outage never takes a device's newer connection
//!   elsewhere off the routes. A registration counts only while its
//!   incarnation is the one alive under `srv:{server}`: what a crashed process
//!   registered stops counting the moment its server restarts (or its lease
//!   lapses), and whoever reads it deletes it (only if it still holds the value
//!   read). A server deletes its own only if the value is still the one it set
//!   (the serial tells a reconnection from the connection it replaced), and
//!   retries a delete that failed until it lands. Re-registering after an outage
//!   gives every connection a new serial, so a peer that read the old value while
//!   this server's lease had lapsed cannot delete the new one with it.
//! - `srv:{server}`: exists while the server is alive; set every TTL/3 with
//!   expiry TTL, so a crashed server's entries stop being routed to within TTL.
//!   It holds the server's incarnation (a new one per start).
//! - `lives`: set of `{incarnation}@{server}`, one per running server process.
//!   A member whose `srv:` key lapsed or names another incarnation died; the
//!   server that notices removes it and counts it in `peer_deaths`.
//! - `peer_deaths`: how many server processes died; every server re-reads its
//!   sessions when it grows, since the dead one may have held events for them
//!   that its router outbox never handed over (see [`super::outbox`]). After the
//!   registry forgot a server (restarted empty, or its lease lapsed), the server
//!   also re-reads when a peer process it knew does not show in `lives` again
//!   within a TTL: one that died before announcing itself again leaves nothing
//!   to count.
//! - `counted:{server}`: set of that server id's processes counted dead, kept
//!   [`COUNTED_KEEP`] after its last addition. A process counted dead may still
//!   be alive, cut off from the registry (its lease lapsed, it went on taking
//!   sends into its outbox), and die later with events queued after the count
//!   that resynced everyone. So a server that starts counts each earlier process
//!   of its own id found here once more (and removes it), and every server
//!   resyncs again: a crash and restart costs one or two more resyncs than it
//!   would. Gaps left, where devices' conversations catch up only at the next
//!   entry, resync or reconnection: a counted process that lived on and whose
//!   id never starts again; one still alive and cut off when its id starts
//!   again; and the sets lost with a registry that restarts empty.
//! - channel `to:{server}`: events for devices on that server ([`Envelope`] JSON).
//! - `watch:{user}`: set of users subscribed to `user`'s presence changes,
//!   expiring [`WATCH_TTL`] after the last subscription.
//!
//! Why pub/sub rather than streams: the store is the source of truth and every
//! device stream fills gaps from it, so routing needs no backlog, no consumer
//! groups and no trimming, only the lowest latency. Pub/sub loses messages
//! only when a subscriber's connection drops; this server then resubscribes,
//! re-registers its devices and tells every local session to re-read its
//! conversations, so what was lost is delivered from the store. It does the
//! same when its heartbeat finds that the registry had forgotten it (lease
//! lapsed, or the registry restarted empty).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;

use super::registry::{Registry, RegistryOp, RegistryReply};
use super::{Envelope, Fabric, FabricError, Forwarded, LateSweep, Routed, WATCH_TTL};
use crate::hub::Hub;
use crate::metrics::FabricCounters;

/// Longest a send waits for the registry to take its event.
const FORWARD_WAIT_MAX: Duration = Duration::from_secs(1);

/// Most deletes of this server's registrations retrying at once (the registry
/// unreachable); past it, a delete that fails is given up and its registration
/// counts until this process ends.
const PENDING_FORGETS_MAX: usize = 100_000;

/// Longest wait between two tries of a delete.
const FORGET_BACKOFF_MAX: Duration = Duration::from_secs(2);

/// How long a server id's set of processes counted dead is kept after its last
/// addition (that id starting again later than that counts nothing).
pub const COUNTED_KEEP: Duration = Duration::from_secs(7 * 24 * 3600);

/// Who this server is in the cluster.
#[derive(Debug, Clone)]
pub struct FabricConfig {
    /// This server's id: unique among live servers.
    pub server_id: String,
    /// This start of the server: no other start of any server shares it
    /// ([`new_incarnation`] in production; from the seed under the simulator).
    /// It must not contain `@`.
    pub incarnation: String,
    /// How long a silent server stays routable.
    pub ttl: Duration,
    /// Longest a registry command may take to apply after its caller gave up on
    /// it (timeouts and retries of the client): how long after forgetting a
    /// connection a late write of it is looked for.
    pub late_write_max: Duration,
    /// Prefix of every key and channel.
    pub prefix: String,
}

/// An incarnation no other start of any server shares: process id and start time.
pub fn new_incarnation() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{}-{nanos:x}", std::process::id())
}

/// Most presence subscriptions made through this server that it remembers to
/// make again after the registry lost them; past it, new ones are made but not
/// remembered (they last until the registry loses them).
const WATCHES_KEPT_MAX: usize = 1_000_000;

/// What this server put in the registry and must put back if the registry loses
/// it (a Redis restart without persistence).
#[derive(Default)]
struct Registrations {
    /// Connection (user, device) → serial of its registration.
    current: BTreeMap<(String, String), u64>,
    /// Presence subscriptions (target, watcher) made here → when they lapse.
    watches: BTreeMap<(String, String), tokio::time::Instant>,
}

/// A registration read back: which process of which server holds a connection.
struct Registration<'v> {
    incarnation: &'v str,
    server: &'v str,
}

impl<'v> Registration<'v> {
    fn parse(value: &'v str) -> Option<Self> {
        let (member, _serial) = value.rsplit_once('/')?;
        let (incarnation, server) = member.split_once('@')?;
        Some(Self {
            incarnation,
            server,
        })
    }
}

/// Most peer processes a server remembers (see [`RegistryFabric::peers_vanished`]).
const PEERS_KNOWN_MAX: usize = 1_024;

/// What a server saw of a peer process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PeerSeen {
    /// In `lives` at the last look.
    Alive,
    /// Missing from `lives` since then; `armed` while it must show again within a
    /// TTL or be reported.
    Missing {
        since: tokio::time::Instant,
        armed: bool,
    },
}

/// The [`Fabric`] over a [`Registry`].
pub struct RegistryFabric {
    config: FabricConfig,
    registry: Arc<dyn Registry>,
    /// The death counter as last read; `None` before the first read.
    deaths_seen: Mutex<Option<i64>>,
    /// Peer processes (`lives` members) this server saw alive, and what it saw
    /// of them since (see [`RegistryFabric::peers_vanished`]).
    peers_known: Mutex<BTreeMap<String, PeerSeen>>,
    registrations: Mutex<Registrations>,
    serials: AtomicU64,
    /// Deletes retrying now.
    pending_forgets: std::sync::atomic::AtomicUsize,
    /// Tells the subscriber to drop its subscription and subscribe again.
    resubscribe: tokio::sync::Notify,
    counters: FabricCounters,
}

/// The registry's view of some users' connections: per user, field → value, and
/// which processes are alive (server → its live incarnation).
struct Placements {
    connections: Vec<BTreeMap<String, String>>,
    alive: BTreeMap<String, Option<String>>,
}

impl Placements {
    /// Whether `value` registers a connection of a live process.
    fn counts(&self, value: &str) -> bool {
        Registration::parse(value).is_some_and(|r| {
            self.alive.get(r.server).is_some_and(|live| {
                if crate::mutants::active(crate::mutants::Mutant::RegistryIgnoresIncarnation) {
                    return live.is_some();
                }
                live.as_deref() == Some(r.incarnation)
            })
        })
    }
}

impl RegistryFabric {
    /// Announces this server, subscribes to its channel, and starts the
    /// heartbeat. Fails when the registry does not answer.
    pub async fn start(
        config: FabricConfig,
        registry: Arc<dyn Registry>,
        hub: Arc<Hub>,
        counters: FabricCounters,
    ) -> Result<Arc<Self>, FabricError> {
        assert!(
            config.ttl >= Duration::from_secs(1),
            "registry TTL below 1 s"
        );
        assert!(
            !config.incarnation.contains('@'),
            "an incarnation has no '@'"
        );
        let fabric = Arc::new(Self {
            config,
            registry,
            deaths_seen: Mutex::new(None),
            peers_known: Mutex::new(BTreeMap::new()),
            registrations: Mutex::new(Registrations::default()),
            pending_forgets: std::sync::atomic::AtomicUsize::new(0),
            serials: AtomicU64::new(0),
            resubscribe: tokio::sync::Notify::new(),
            counters,
        });
        fabric.heartbeat_once().await?;
        fabric.count_earlier_lives().await?;
        let (subscribed_tx, subscribed_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(Arc::clone(&fabric).heartbeat_loop(Arc::clone(&hub)));
        tokio::spawn(Arc::clone(&fabric).subscriber_loop(hub, subscribed_tx));
        let _ = tokio::time::timeout(Duration::from_secs(5), subscribed_rx).await;
        tracing::info!(
            server_id = fabric.config.server_id,
            incarnation = fabric.config.incarnation,
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

    /// The value of this process's registration number `serial`.
    fn registration(&self, serial: u64) -> String {
        format!("{}/{serial}", self.member())
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

    fn lives_key(&self) -> String {
        format!("{}lives", self.config.prefix)
    }

    fn deaths_key(&self) -> String {
        format!("{}peer_deaths", self.config.prefix)
    }

    fn counted_key(&self, server: &str) -> String {
        format!("{}counted:{server}", self.config.prefix)
    }

    /// This process in the set of lives.
    fn member(&self) -> String {
        format!("{}@{}", self.config.incarnation, self.config.server_id)
    }

    fn ttl_ms(&self) -> u64 {
        u64::try_from(self.config.ttl.as_millis()).unwrap_or(u64::MAX)
    }

    /// Announces this server for another TTL; true if its previous announcement
    /// had expired (other servers then treated it as dead and routed nothing here).
    async fn heartbeat_once(&self) -> Result<bool, FabricError> {
        let ops = vec![
            RegistryOp::SetExpiringGet {
                key: self.alive_key(&self.config.server_id),
                value: self.config.incarnation.clone(),
                ttl_ms: self.ttl_ms(),
            },
            RegistryOp::SetAdd {
                key: self.lives_key(),
                member: self.member(),
            },
        ];
        let mut replies = self.registry.run(ops).await?.into_iter();
        let previous = replies.next().map(RegistryReply::previous).transpose()?;
        Ok(previous.flatten().is_none())
    }

    /// Finds server processes that died (lease lapsed, or restarted under the
    /// same id), records their deaths, and returns how many deaths any server saw
    /// since this one last looked: events the dead owed local devices may never
    /// have been routed, so the caller resyncs the sessions when it is not 0.
    async fn peers_died(&self) -> Result<u64, FabricError> {
        let members = self
            .registry
            .run_one(RegistryOp::SetMembers {
                key: self.lives_key(),
            })
            .await?
            .members()?;
        let me = self.member();
        let peers: Vec<(&str, &str, &String)> = members
            .iter()
            .filter(|m| **m != me)
            .filter_map(|m| m.split_once('@').map(|(inc, id)| (inc, id, m)))
            .collect();
        let vanished = self.peers_vanished(
            peers.iter().map(|(_, _, m)| m.as_str()),
            tokio::time::Instant::now(),
        );
        let mut dead = Vec::new();
        if !peers.is_empty() {
            let keys = peers.iter().map(|(_, id, _)| self.alive_key(id)).collect();
            let found = self
                .registry
                .run_one(RegistryOp::Get { keys })
                .await?
                .values()?;
            for ((incarnation, _, member), found) in peers.iter().zip(found) {
                if found.as_deref() != Some(*incarnation) {
                    dead.push((*member).clone());
                }
            }
        }
        // Remembered as counted first (see `counted` in the module doc): should
        // this caller fail in between, the process is counted again later, never
        // forgotten.
        let keep_ms = u64::try_from(COUNTED_KEEP.as_millis()).unwrap_or(u64::MAX);
        let mut ops: Vec<RegistryOp> = Vec::with_capacity(dead.len() * 2 + 1);
        for member in &dead {
            let server = member.split_once('@').map_or("", |(_, id)| id);
            let key = self.counted_key(server);
            ops.push(RegistryOp::SetAdd {
                key: key.clone(),
                member: member.clone(),
            });
            ops.push(RegistryOp::Expire {
                key,
                ttl_ms: keep_ms,
            });
        }
        ops.push(RegistryOp::RemoveCounting {
            set: self.lives_key(),
            counter: self.deaths_key(),
            members: dead,
        });
        let deaths = self
            .registry
            .run(ops)
            .await?
            .pop()
            .ok_or_else(|| FabricError("no answer to counting deaths".into()))?
            .count()?;
        let mut seen = self.deaths_seen.lock().expect("deaths seen");
        // (A smaller counter means the registry restarted empty: recovery resyncs then.)
        let grew = seen.map_or(0, |before| deaths.saturating_sub(before).max(0));
        *seen = Some(deaths);
        Ok(u64::try_from(grew).unwrap_or(0) + vanished)
    }

    /// At start: counts once more each earlier process of this server id that was
    /// counted dead (see `counted` in the module doc), so that every peer
    /// resyncs: it may have lived on after its count and died with events
    /// queued. Returns how many it counted.
    async fn count_earlier_lives(&self) -> Result<usize, FabricError> {
        let counted = self
            .registry
            .run_one(RegistryOp::SetMembers {
                key: self.counted_key(&self.config.server_id),
            })
            .await?
            .members()?;
        let mine: Vec<String> = counted
            .into_iter()
            .filter(|m| {
                m.split_once('@').is_some_and(|(inc, id)| {
                    id == self.config.server_id && inc != self.config.incarnation
                })
            })
            .collect();
        if mine.is_empty() {
            return Ok(0);
        }
        let earlier = mine.len();
        self.registry
            .run_one(RegistryOp::RemoveCounting {
                set: self.counted_key(&self.config.server_id),
                counter: self.deaths_key(),
                members: mine,
            })
            .await?;
        tracing::info!(
            earlier,
            "an earlier process of this server was counted dead and may have lived on; peers re-read their sessions"
        );
        Ok(earlier)
    }

    /// Peer processes that must be taken as dead although nobody counted them:
    /// after this server was forgotten by the registry (it restarted empty, or this
    /// server's lease lapsed, see [`RegistryFabric::peers_rearm`]), every peer it
    /// knew must show in `lives` again within a TTL (a live peer announces itself
    /// every third of one). One that does not, or that shows under another
    /// incarnation (restarted), may have died before announcing itself again,
    /// leaving no lease to lapse and no member to count, with events for local
    /// devices in its outbox. Outside that, a peer missing from `lives` left
    /// cleanly or was counted dead by whoever removed it, and is not reported.
    fn peers_vanished<'m>(
        &self,
        alive: impl Iterator<Item = &'m str>,
        now: tokio::time::Instant,
    ) -> u64 {
        let alive: BTreeSet<&str> = alive.collect();
        let alive_ids: BTreeSet<&str> = alive
            .iter()
            .filter_map(|m| m.split_once('@').map(|(_, id)| id))
            .collect();
        let mut known = self.peers_known.lock().expect("peers known");
        for member in &alive {
            known.insert((*member).to_owned(), PeerSeen::Alive);
        }
        let mut vanished = 0;
        known.retain(|member, seen| {
            if alive.contains(member.as_str()) {
                return true;
            }
            let restarted = member
                .split_once('@')
                .is_some_and(|(_, id)| alive_ids.contains(id));
            match seen {
                PeerSeen::Alive if restarted => false,
                PeerSeen::Alive => {
                    *seen = PeerSeen::Missing {
                        since: now,
                        armed: false,
                    };
                    true
                }
                PeerSeen::Missing { armed, .. } if restarted => {
                    vanished += u64::from(*armed);
                    false
                }
                PeerSeen::Missing {
                    since,
                    armed: armed @ true,
                } if now.saturating_duration_since(*since) >= self.config.ttl => {
                    *armed = false;
                    vanished += 1;
                    true
                }
                PeerSeen::Missing { .. } => true,
            }
        });
        while known.len() > PEERS_KNOWN_MAX {
            // Forget the peer missing longest (or, failing that, any).
            let oldest = known
                .iter()
                .filter_map(|(m, seen)| match seen {
                    PeerSeen::Missing { since, .. } => Some((*since, m.clone())),
                    PeerSeen::Alive => None,
                })
                .min()
                .map(|(_, m)| m)
                .or_else(|| known.keys().next().cloned());
            if let Some(member) = oldest {
                known.remove(&member);
            }
        }
        vanished
    }

    /// This server was forgotten by the registry (it restarted empty, or this
    /// server's lease lapsed): whatever it saw of its peers since may have missed
    /// a peer coming back and dying, so every known peer must show again within a
    /// TTL or be reported again.
    fn peers_rearm(&self, now: tokio::time::Instant) {
        let mut known = self.peers_known.lock().expect("peers known");
        for seen in known.values_mut() {
            *seen = PeerSeen::Missing {
                since: now,
                armed: true,
            };
        }
    }

    /// Deletes a registration of this server, retrying with backoff while the
    /// registry fails (up to [`PENDING_FORGETS_MAX`] deletes at once).
    async fn forget(&self, delete: RegistryOp) {
        let mut backoff = Duration::from_millis(100);
        let mut pending = false;
        loop {
            match self.registry.run_one(delete.clone()).await {
                Ok(_) => break,
                Err(e) if !pending => {
                    let before = self.pending_forgets.fetch_add(1, Ordering::Relaxed);
                    if before >= PENDING_FORGETS_MAX {
                        self.pending_forgets.fetch_sub(1, Ordering::Relaxed);
                        crate::warn_throttled!(
                            error = %e,
                            "too many registry deletes waiting; a registration stays until this process ends"
                        );
                        return;
                    }
                    pending = true;
                }
                Err(_) => {}
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(FORGET_BACKOFF_MAX);
        }
        if pending {
            self.pending_forgets.fetch_sub(1, Ordering::Relaxed);
        }
    }

    async fn heartbeat_loop(self: Arc<Self>, hub: Arc<Hub>) {
        // `start` announced this server already: the first beat is a third of a TTL
        // on. (An immediate one, run late, could announce a process that a restart
        // of the same server id had already replaced.)
        let period = self.config.ttl / 3;
        let mut every = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        loop {
            every.tick().await;
            match self.heartbeat_once().await {
                // Treated as dead for a while, or the registry restarted empty:
                // events for local devices were not routed, and the subscription
                // may be gone without this server having noticed. The subscriber
                // subscribes again and then recovers (once, after it is listening,
                // so no event falls between the recovery and the subscription).
                Ok(true) => {
                    self.peers_rearm(tokio::time::Instant::now());
                    self.resubscribe.notify_one();
                }
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
        hub: Arc<Hub>,
        subscribed: tokio::sync::oneshot::Sender<()>,
    ) {
        let channel = self.channel(&self.config.server_id);
        let mut subscribed = Some(subscribed);
        let mut backoff = Duration::from_millis(100);
        loop {
            let mut messages = match self.registry.subscribe(&channel).await {
                Ok(messages) => messages,
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
            loop {
                let payload = tokio::select! {
                    payload = messages.next() => payload,
                    () = self.resubscribe.notified() => None,
                };
                let Some(payload) = payload else { break };
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
    /// connection and presence subscription made here (the registry may have
    /// restarted empty), then make every session re-read.
    async fn recover(&self, hub: &Hub) {
        match self.heartbeat_once().await {
            Ok(true) => self.peers_rearm(tokio::time::Instant::now()),
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "heartbeat after resubscribing failed"),
        }
        let me = &self.config.server_id;
        let now = tokio::time::Instant::now();
        let (ops, devices) = {
            let mut r = self.registrations.lock().expect("registrations");
            // Each under a new serial: a peer that read a registration while this
            // server's lease had lapsed may delete that value any moment (it only
            // deletes what it read), and must not take the fresh one with it.
            let mut ops: Vec<RegistryOp> = r
                .current
                .iter_mut()
                .map(|((user, device), serial)| {
                    *serial = self.serials.fetch_add(1, Ordering::Relaxed) + 1;
                    RegistryOp::HashSet {
                        key: self.device_key(user),
                        field: Self::connection_field(device, me),
                        value: self.registration(*serial),
                    }
                })
                .collect();
            let devices = ops.len();
            r.watches.retain(|_, until| *until > now);
            // Each target's set lasts as long as its latest subscription.
            let mut lapses: BTreeMap<&str, tokio::time::Instant> = BTreeMap::new();
            let restore = !crate::mutants::active(crate::mutants::Mutant::WatchesNotRestored);
            for ((target, watcher), until) in r.watches.iter().filter(|_| restore) {
                ops.push(RegistryOp::SetAdd {
                    key: self.watch_key(target),
                    member: watcher.clone(),
                });
                let lapse = lapses.entry(target).or_insert(*until);
                *lapse = (*lapse).max(*until);
            }
            for (target, until) in lapses {
                let left = until.saturating_duration_since(now);
                let ttl_ms = u64::try_from(left.as_millis()).unwrap_or(u64::MAX).max(1);
                ops.push(RegistryOp::Expire {
                    key: self.watch_key(target),
                    ttl_ms,
                });
            }
            (ops, devices)
        };
        if let Err(e) = self.registry.run(ops).await {
            tracing::warn!(error = %e, "re-registering devices failed");
        }
        let told = super::resync_sessions(hub);
        self.counters.resyncs.inc();
        tracing::info!(
            devices,
            told,
            "fabric recovered; sessions re-read their conversations"
        );
    }

    /// Where the devices of `users` are registered, and which processes are alive.
    async fn placements(&self, users: &[String]) -> Result<Placements, FabricError> {
        let ops = users
            .iter()
            .map(|user| RegistryOp::HashGetAll {
                key: self.device_key(user),
            })
            .collect();
        let connections = self
            .registry
            .run(ops)
            .await?
            .into_iter()
            .map(RegistryReply::fields)
            .collect::<Result<Vec<_>, _>>()?;
        let servers: BTreeSet<&str> = connections
            .iter()
            .flat_map(|c| c.values())
            .filter_map(|v| Registration::parse(v))
            .map(|r| r.server)
            .filter(|s| *s != self.config.server_id)
            .collect();
        let mut alive = BTreeMap::new();
        if !servers.is_empty() {
            let keys = servers.iter().map(|s| self.alive_key(s)).collect();
            let found = self
                .registry
                .run_one(RegistryOp::Get { keys })
                .await?
                .values()?;
            for (server, found) in servers.into_iter().zip(found) {
                alive.insert(server.to_owned(), found);
            }
        }
        alive.insert(
            self.config.server_id.clone(),
            Some(self.config.incarnation.clone()),
        );
        Ok(Placements { connections, alive })
    }

    /// Deletes of the registrations among `placements` that count no more (their
    /// process died), each only if it still holds what was read.
    fn prune_ops(&self, users: &[String], placements: &Placements) -> Vec<RegistryOp> {
        let mut ops = Vec::new();
        for (user, connections) in users.iter().zip(&placements.connections) {
            for (field, value) in connections {
                if !placements.counts(value) {
                    ops.push(RegistryOp::HashDeleteIf {
                        key: self.device_key(user),
                        field: field.clone(),
                        value: value.clone(),
                    });
                }
            }
        }
        ops
    }

    /// Looks up where `users` are connected and publishes `event` to those servers.
    async fn route(&self, users: &[String], event: &Routed) -> Result<Forwarded, FabricError> {
        let placements = self.placements(users).await?;
        let unplaced = users
            .iter()
            .zip(&placements.connections)
            .filter(|(_, c)| !c.values().any(|v| placements.counts(v)))
            .map(|(user, _)| user.clone())
            .collect();
        let mut by_server: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for (user, connections) in users.iter().zip(&placements.connections) {
            for value in connections.values() {
                let Some(r) = Registration::parse(value) else {
                    continue;
                };
                if r.server == self.config.server_id || !placements.counts(value) {
                    continue;
                }
                let listed = by_server.entry(r.server).or_default();
                if listed.last() != Some(user) {
                    listed.push(user.clone());
                }
            }
        }
        // A dead process's registrations: forget them so nobody routes there.
        let mut ops = self.prune_ops(users, &placements);
        for (server, users) in by_server {
            let envelope = Envelope::new(users, event);
            let payload = serde_json::to_vec(&envelope).expect("envelopes serialize");
            ops.push(RegistryOp::Publish {
                channel: self.channel(server),
                payload,
            });
            self.counters.forwarded.inc();
        }
        self.registry.run(ops).await?;
        Ok(Forwarded { unplaced })
    }
}

#[async_trait]
impl Fabric for RegistryFabric {
    fn server_id(&self) -> &str {
        &self.config.server_id
    }

    async fn device_connected(&self, user: &str, device: &str) -> Result<(), FabricError> {
        let serial = self.serials.fetch_add(1, Ordering::Relaxed) + 1;
        let connection = (user.to_owned(), device.to_owned());
        self.registrations
            .lock()
            .expect("registrations")
            .current
            .insert(connection.clone(), serial);
        let set = RegistryOp::HashSet {
            key: self.device_key(user),
            field: Self::connection_field(device, &self.config.server_id),
            value: self.registration(serial),
        };
        // (On failure it may have landed: the lease still forgets it when dropped.)
        self.registry
            .run_one(set)
            .await
            .map(|_| ())
            .map_err(|e| FabricError(format!("registering the device: {e}")))
    }

    async fn device_disconnected(&self, user: &str, device: &str) -> LateSweep {
        let connection = (user.to_owned(), device.to_owned());
        let Some(serial) = self
            .registrations
            .lock()
            .expect("registrations")
            .current
            .remove(&connection)
        else {
            return Box::pin(async { false });
        };
        // This process's registrations of the connection up to this one: never a
        // later one of the same device (its serial is higher).
        let delete = RegistryOp::HashDeleteUpTo {
            key: self.device_key(user),
            field: Self::connection_field(device, &self.config.server_id),
            prefix: self.member(),
            serial,
        };
        self.forget(delete.clone()).await;
        let (registry, wait) = (Arc::clone(&self.registry), self.config.late_write_max);
        Box::pin(async move {
            tokio::time::sleep(wait).await;
            let swept = registry
                .run_one(delete)
                .await
                .and_then(RegistryReply::count);
            matches!(swept, Ok(n) if n > 0)
        })
    }

    async fn forward(&self, users: Arc<[String]>, event: Routed) -> Result<Forwarded, FabricError> {
        match tokio::time::timeout(FORWARD_WAIT_MAX, self.route(&users, &event)).await {
            Ok(routed) => routed,
            Err(_) => Err(FabricError(format!(
                "no answer from the registry within {FORWARD_WAIT_MAX:?}"
            ))),
        }
    }

    async fn online_users(&self, users: &[String]) -> Result<Vec<bool>, FabricError> {
        let placements = self.placements(users).await?;
        let prune = self.prune_ops(users, &placements);
        if !prune.is_empty() {
            // Best effort: the next reader prunes what this one could not.
            let _ = self.registry.run(prune).await;
        }
        Ok(placements
            .connections
            .iter()
            .map(|c| c.values().any(|v| placements.counts(v)))
            .collect())
    }

    async fn watch(&self, watcher: &str, targets: &[String]) -> Result<(), FabricError> {
        let ttl_ms = u64::try_from(WATCH_TTL.as_millis()).unwrap_or(u64::MAX);
        {
            let until = tokio::time::Instant::now() + WATCH_TTL;
            let mut r = self.registrations.lock().expect("registrations");
            for target in targets {
                let watch = (target.clone(), watcher.to_owned());
                if r.watches.len() < WATCHES_KEPT_MAX || r.watches.contains_key(&watch) {
                    r.watches.insert(watch, until);
                }
            }
        }
        let mut ops = Vec::with_capacity(targets.len() * 2);
        for target in targets {
            let key = self.watch_key(target);
            ops.push(RegistryOp::SetAdd {
                key: key.clone(),
                member: watcher.to_owned(),
            });
            ops.push(RegistryOp::Expire { key, ttl_ms });
        }
        self.registry.run(ops).await.map(|_| ())
    }

    async fn watchers(&self, target: &str) -> Result<Vec<String>, FabricError> {
        let key = self.watch_key(target);
        self.registry
            .run_one(RegistryOp::SetMembers { key })
            .await?
            .members()
    }

    async fn health(&self) -> Result<(), FabricError> {
        match tokio::time::timeout(FORWARD_WAIT_MAX, self.registry.run_one(RegistryOp::Ping)).await
        {
            Ok(answered) => answered.map(|_| ()),
            Err(_) => Err(FabricError(format!(
                "the registry did not answer within {FORWARD_WAIT_MAX:?}"
            ))),
        }
    }

    async fn leave(&self) {
        let left = self
            .registry
            .run_one(RegistryOp::DeleteIfThenRemove {
                key: self.alive_key(&self.config.server_id),
                value: self.config.incarnation.clone(),
                set: self.lives_key(),
                member: self.member(),
            })
            .await;
        match left {
            Ok(_) => tracing::info!("left the cluster"),
            Err(e) => {
                tracing::warn!(error = %e, "leaving the cluster failed; peers will resync once the lease lapses")
            }
        }
    }
}

#[cfg(all(test, not(madsim)))]
mod tests {
    use super::*;
    use crate::cluster::registry::memory::MemRegistry;
    use crate::cluster::registry::Subscription;

    /// A registry server that can be restarted empty.
    #[derive(Default)]
    struct Restartable(Mutex<Arc<MemRegistry>>);

    impl Restartable {
        fn restart(&self) {
            *self.0.lock().unwrap() = Arc::new(MemRegistry::new());
        }
        fn now(&self) -> Arc<MemRegistry> {
            Arc::clone(&self.0.lock().unwrap())
        }
    }

    #[async_trait]
    impl Registry for Restartable {
        async fn run(&self, ops: Vec<RegistryOp>) -> Result<Vec<RegistryReply>, FabricError> {
            self.now().run(ops).await
        }
        async fn subscribe(&self, channel: &str) -> Result<Subscription, FabricError> {
            self.now().subscribe(channel).await
        }
    }

    async fn server(
        registry: &Arc<Restartable>,
        id: &str,
        incarnation: &str,
    ) -> Arc<RegistryFabric> {
        let config = FabricConfig {
            server_id: id.into(),
            incarnation: incarnation.into(),
            // Heartbeats every 10 s: none but the first during a test.
            ttl: Duration::from_secs(30),
            late_write_max: Duration::from_millis(100),
            prefix: "t:".into(),
        };
        let registry: Arc<dyn Registry> = Arc::clone(registry) as _;
        RegistryFabric::start(
            config,
            registry,
            Arc::new(Hub::default()),
            FabricCounters::default(),
        )
        .await
        .expect("the fabric starts")
    }

    #[tokio::test]
    async fn a_crashed_processes_registrations_stop_counting_once_its_server_restarts() {
        let registry = Arc::new(Restartable::default());
        let first = server(&registry, "a", "1").await;
        let peer = server(&registry, "b", "1").await;
        first.device_connected("ann", "phone").await.unwrap();
        let ann = ["ann".to_owned()];
        assert_eq!(peer.online_users(&ann).await.unwrap(), [true]);
        // Server "a" crashes (its process stops announcing) and starts again.
        let _restarted = server(&registry, "a", "2").await;
        assert_eq!(peer.online_users(&ann).await.unwrap(), [false]);
        let fields = registry
            .now()
            .apply(vec![RegistryOp::HashGetAll {
                key: "t:dev:ann".into(),
            }])
            .pop()
            .unwrap()
            .fields()
            .unwrap();
        assert!(
            fields.is_empty(),
            "the reader deleted the dead registration: {fields:?}"
        );
        drop(first);
    }

    #[tokio::test]
    async fn a_reconnection_survives_the_delete_of_the_connection_it_replaced() {
        let registry = Arc::new(Restartable::default());
        let here = server(&registry, "a", "1").await;
        let peer = server(&registry, "b", "1").await;
        let ann = ["ann".to_owned()];
        here.device_connected("ann", "phone").await.unwrap();
        // The device reconnects before the first connection's delete lands.
        here.device_connected("ann", "phone").await.unwrap();
        let late_delete = RegistryOp::HashDeleteIf {
            key: here.device_key("ann"),
            field: RegistryFabric::connection_field("phone", "a"),
            value: here.registration(1),
        };
        here.forget(late_delete).await;
        assert_eq!(peer.online_users(&ann).await.unwrap(), [true]);
        let late = here.device_disconnected("ann", "phone").await;
        assert_eq!(peer.online_users(&ann).await.unwrap(), [false]);
        // A write of the forgotten connection that lands late is swept.
        let late_write = RegistryOp::HashSet {
            key: here.device_key("ann"),
            field: RegistryFabric::connection_field("phone", "a"),
            value: here.registration(1),
        };
        here.registry.run_one(late_write).await.unwrap();
        assert_eq!(peer.online_users(&ann).await.unwrap(), [true]);
        assert!(late.await, "the late write was swept");
        assert_eq!(peer.online_users(&ann).await.unwrap(), [false]);
    }

    #[tokio::test]
    async fn connections_and_presence_subscriptions_come_back_after_the_registry_loses_them() {
        let registry = Arc::new(Restartable::default());
        let here = server(&registry, "a", "1").await;
        let peer = server(&registry, "b", "1").await;
        here.device_connected("ann", "phone").await.unwrap();
        here.watch("ann", &["bob".to_owned()]).await.unwrap();
        registry.restart();
        let ann = ["ann".to_owned()];
        // The old subscriptions end with the old registry: each server
        // resubscribes and recovers (bounded wait: 100 tries of 50 ms).
        let mut restored = false;
        for _ in 0..100 {
            let online = peer.online_users(&ann).await.unwrap() == [true];
            let watched = peer.watchers("bob").await.unwrap() == ["ann"];
            if online && watched {
                restored = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            restored,
            "the registration and the subscription are made again"
        );
        drop(here);
    }

    /// After the registry forgot this server, a peer process seen before that
    /// never announces itself again is reported once, a TTL after; one that
    /// announces itself again within the TTL is not, nor is one that leaves
    /// `lives` otherwise (a clean leave, or a death someone counted); one that
    /// restarted is reported at once.
    #[tokio::test]
    async fn a_peer_that_died_before_announcing_itself_again_is_reported_once() {
        let registry = Arc::new(Restartable::default());
        let here = server(&registry, "a", "1").await;
        let peer = server(&registry, "b", "1").await;
        let _slow = server(&registry, "c", "1").await;
        assert_eq!(here.peers_died().await.unwrap(), 0);
        drop(peer);
        registry.restart();
        assert!(here.heartbeat_once().await.unwrap(), "forgotten");
        let t0 = tokio::time::Instant::now();
        let ttl = here.config.ttl;
        here.peers_rearm(t0);
        // "c" is alive but has not announced itself yet; "b" never will.
        assert_eq!(here.peers_vanished(std::iter::empty(), t0), 0);
        assert_eq!(here.peers_vanished(["1@c"].into_iter(), t0 + ttl / 2), 0);
        let later = t0 + ttl;
        assert_eq!(
            here.peers_vanished(["1@c"].into_iter(), later),
            1,
            "\"b\" went missing a TTL ago"
        );
        assert_eq!(
            here.peers_vanished(["1@c"].into_iter(), later + ttl),
            0,
            "reported once"
        );
        // "c" leaves with nothing forgotten here: not reported, however long.
        assert_eq!(here.peers_vanished(std::iter::empty(), later + ttl), 0);
        assert_eq!(here.peers_vanished(std::iter::empty(), later + ttl * 5), 0);
        // Forgotten again: both must show within a TTL.
        let again = later + ttl * 6;
        here.peers_rearm(again);
        assert_eq!(here.peers_vanished(std::iter::empty(), again + ttl), 2);
        // A peer that restarted while this server was forgotten is gone at once.
        here.peers_rearm(again + ttl * 2);
        assert_eq!(here.peers_vanished(["2@c"].into_iter(), again + ttl * 2), 1);
    }

    /// A process counted dead while it was alive (cut off from the registry, its
    /// lease lapsed) may have queued events after that count and then died: when
    /// its server starts again, that earlier process is counted once more, so
    /// every peer resyncs; one that only left cleanly is not.
    #[tokio::test]
    async fn a_process_counted_dead_is_counted_again_when_its_server_starts_again() {
        let registry = Arc::new(Restartable::default());
        let here = server(&registry, "a", "1").await;
        let cut_off = server(&registry, "b", "1").await;
        assert_eq!(here.peers_died().await.unwrap(), 0);
        // "b"'s lease lapses while its process lives on: "a" counts it dead.
        registry.now().apply(vec![RegistryOp::DeleteIfThenRemove {
            key: cut_off.alive_key("b"),
            value: "1".into(),
            set: "none".into(),
            member: "none".into(),
        }]);
        assert_eq!(here.peers_died().await.unwrap(), 1, "the lapse is a death");
        assert_eq!(here.peers_died().await.unwrap(), 0);
        // "b" dies unseen and starts again: its earlier life is counted again.
        drop(cut_off);
        let restarted = server(&registry, "b", "2").await;
        assert_eq!(
            here.peers_died().await.unwrap(),
            1,
            "the restart of a process counted dead is a death again"
        );
        // Counted once: it starting yet again after a clean leave counts nothing.
        restarted.leave().await;
        let _third = server(&registry, "b", "3").await;
        assert_eq!(here.peers_died().await.unwrap(), 0, "counted once");
    }

    /// A peer reads a registration while this server's lease has lapsed and
    /// deletes it (it counts no more) only after this server re-registered: the
    /// re-registration is a new value, so the late delete leaves it.
    #[tokio::test]
    async fn a_registration_made_again_survives_a_peers_late_prune_of_the_old_one() {
        let registry = Arc::new(Restartable::default());
        let here = server(&registry, "a", "1").await;
        let peer = server(&registry, "b", "1").await;
        let ann = ["ann".to_owned()];
        here.device_connected("ann", "phone").await.unwrap();
        // The lease lapses: the peer finds the registration of a dead process.
        let lapse = RegistryOp::DeleteIfThenRemove {
            key: here.alive_key("a"),
            value: "1".into(),
            set: here.lives_key(),
            member: here.member(),
        };
        here.registry.run_one(lapse).await.unwrap();
        let users = ["ann".to_owned()];
        let placements = peer.placements(&users).await.unwrap();
        let prune = peer.prune_ops(&users, &placements);
        assert_eq!(
            prune.len(),
            1,
            "the peer would prune the registration it read"
        );
        // This server recovers (its heartbeat found itself forgotten) before the
        // peer's delete lands.
        here.recover(&Hub::default()).await;
        assert_eq!(peer.online_users(&ann).await.unwrap(), [true]);
        peer.registry.run(prune).await.unwrap();
        assert_eq!(
            peer.online_users(&ann).await.unwrap(),
            [true],
            "the late prune took the registration made again"
        );
    }
}
