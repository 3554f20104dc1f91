//! The simulated backends of a multi-server run, each on its own node and reached
//! over the simulated network (madsim RPC), each behind the trait the real backend
//! implements:
//!
//! - the **store** node serves the shared store's [`Tables`] (the stand-in for
//!   Scylla): a call is atomic and durable once applied; a crash of the node
//!   loses only calls in flight (some applied without their reply reaching the
//!   server: the server sees a failure for a write that happened);
//! - the **router** node is the stand-in for Redis: a connection registry with
//!   heartbeats and a TTL, and pub/sub-like fan-out of events to servers. It keeps
//!   everything in memory: a crash loses the registry, as Redis without
//!   persistence does; servers notice (new generation) and recover.
//!
//! Server-side, [`SimTables`] implements [`Tables`] and [`SimFabric`] implements
//! [`Fabric`], so the servers run the same `SharedStore` and session code as
//! production.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chatproof_server::cluster::{
    resync_sessions, Envelope, Fabric, FabricError, Forwarded, Routed,
};
use chatproof_server::hub::Hub;
use chatproof_server::store::shared::memory::MemTables;
use chatproof_server::store::shared::{TableOp, TableReply, Tables};
use chatproof_server::store::StoreError;
use madsim::net::rpc::Request;
use madsim::net::Endpoint;
use serde::{Deserialize, Serialize};

/// Port of the store service on the store node.
pub const STORE_PORT: u16 = 9042;
/// Port of the router on the router node.
pub const ROUTER_PORT: u16 = 6379;
/// Port on which each server receives routed events.
pub const DELIVER_PORT: u16 = 7000;
/// How long a call to a backend may take before the server gives up on it.
const CALL_TIMEOUT: Duration = Duration::from_millis(1_000);
/// A server that has not heartbeated for this long is not routed to.
const ROUTER_TTL: Duration = Duration::from_millis(1_500);
/// How often a server heartbeats the router.
const HEARTBEAT_EVERY: Duration = Duration::from_millis(300);

// ---------------------------------------------------------------- store

/// One [`TableOp`] on its way to the store node.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoreCall(pub TableOp);

impl Request for StoreCall {
    type Response = Result<TableReply, String>;
    const ID: u64 = 0xC0FF_EE01;
}

/// The store node: serves `tables` (which outlive the node's crashes) until killed.
pub async fn serve_store(addr: SocketAddr, tables: Arc<MemTables>) {
    let ep = Endpoint::bind(addr).await.expect("binding the store port");
    ep.add_rpc_handler(move |StoreCall(op)| {
        let tables = Arc::clone(&tables);
        async move {
            // Service time: reads and writes are not free.
            tokio::time::sleep(Duration::from_micros(200)).await;
            tables.call(op).await.map_err(|e| e.to_string())
        }
    });
    std::future::pending::<()>().await;
}

/// [`Tables`] on the simulated store node: forwards each op as it is.
pub struct SimTables {
    ep: Endpoint,
    store: SocketAddr,
}

impl SimTables {
    /// A client of the store at `store`.
    pub async fn connect(store: SocketAddr) -> Self {
        let ep = Endpoint::bind("0.0.0.0:0")
            .await
            .expect("binding a client endpoint");
        Self { ep, store }
    }
}

#[async_trait]
impl Tables for SimTables {
    async fn call(&self, op: TableOp) -> Result<TableReply, StoreError> {
        let call = StoreCall(op);
        match self.ep.call_timeout(self.store, call, CALL_TIMEOUT).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(why)) => Err(StoreError::Backend(why)),
            Err(e) => Err(StoreError::Backend(format!("store unreachable: {e}"))),
        }
    }
}

// ---------------------------------------------------------------- router

/// Calls from a server to the router.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum RouterCall {
    /// Heartbeat of the server receiving events at this address, in this
    /// incarnation (a new one per start).
    Announce(SocketAddr, u64),
    /// `device` of `user` is connected to the server at the address.
    Register(String, String, SocketAddr),
    /// Every `(user, device)` listed is connected to the server at the address.
    RegisterAll(Vec<(String, String)>, SocketAddr),
    /// Forget the device if it is still recorded at the address.
    Forget(String, String, SocketAddr),
    /// Route an envelope's event to the other live servers of its users.
    Route(SocketAddr, Vec<String>, String),
    /// Which of these users have a device on a live server?
    Online(Vec<String>),
    /// The first user watches the presence of the others.
    Watch(String, Vec<String>),
    /// Who watches this user's presence?
    Watchers(String),
}

/// The router's answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum RouterReply {
    /// To `Announce`: the router's generation and how many events it sent this server.
    Alive {
        /// Changes whenever the router restarts (its registry is then empty).
        generation: u64,
        /// Events sent to this server in this generation.
        sent: u64,
        /// The server's previous heartbeat had expired: the router treated it as
        /// dead and skipped it when routing, without counting anything as sent.
        lapsed: bool,
        /// Server processes found dead in this generation (lease lapsed, or
        /// announced again under a new incarnation).
        deaths: u64,
    },
    /// To `Route` (the users with no device on a live server) and `Watchers`.
    Users(Vec<String>),
    /// To `Online`, in the order asked.
    Online(Vec<bool>),
    /// Anything else.
    Done,
}

impl Request for RouterCall {
    type Response = RouterReply;
    const ID: u64 = 0xC0FF_EE02;
}

/// An event from the router to a server.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Deliver {
    /// The router's generation.
    pub generation: u64,
    /// 1, 2, 3, ... per (generation, server): a gap means a lost event.
    pub seq: u64,
    /// [`Envelope`] JSON.
    pub envelope: String,
}

impl Request for Deliver {
    type Response = ();
    const ID: u64 = 0xC0FF_EE03;
}

#[derive(Default)]
struct RouterState {
    /// Per user, every (device, server) connection registered: a device can be
    /// connected to two servers for a while (a long-poll mailbox outlives its
    /// device's move), and each server registers and forgets only its own.
    devices: BTreeMap<String, BTreeSet<(String, SocketAddr)>>,
    alive_until: BTreeMap<SocketAddr, tokio::time::Instant>,
    /// Running server processes: incarnation and lease, by address.
    lives: BTreeMap<SocketAddr, (u64, tokio::time::Instant)>,
    deaths: u64,
    sent: BTreeMap<SocketAddr, u64>,
    watchers: BTreeMap<String, BTreeSet<String>>,
}

impl RouterState {
    fn live_servers_of<'s>(
        &'s self,
        user: &str,
        now: tokio::time::Instant,
    ) -> impl Iterator<Item = SocketAddr> + 's {
        let servers = self.devices.get(user).into_iter().flatten();
        servers
            .map(|(_, server)| server)
            .filter(move |s| self.alive_until.get(*s).is_some_and(|t| *t > now))
            .copied()
    }
}

/// The router node: registry and fan-out, all in memory (lost on a crash).
pub async fn serve_router(addr: SocketAddr, generation: u64) {
    let ep = Endpoint::bind(addr).await.expect("binding the router port");
    let state = Arc::new(Mutex::new(RouterState::default()));
    let sender = ep.clone();
    ep.add_rpc_handler(move |call: RouterCall| {
        let (state, ep) = (Arc::clone(&state), sender.clone());
        async move { route_call(&state, &ep, generation, call) }
    });
    std::future::pending::<()>().await;
}

fn route_call(
    state: &Mutex<RouterState>,
    ep: &Endpoint,
    generation: u64,
    call: RouterCall,
) -> RouterReply {
    let now = tokio::time::Instant::now();
    let mut s = state.lock().expect("router state");
    match call {
        RouterCall::Announce(server, incarnation) => {
            let previous = s.alive_until.insert(server, now + ROUTER_TTL);
            let lapsed = previous.is_none_or(|until| until <= now);
            let before = s.lives.len();
            s.lives.retain(|_, (_, until)| *until > now);
            let mut died = (before - s.lives.len()) as u64;
            let life = s.lives.insert(server, (incarnation, now + ROUTER_TTL));
            died += u64::from(life.is_some_and(|(earlier, _)| earlier != incarnation));
            s.deaths += died;
            let sent = s.sent.get(&server).copied().unwrap_or(0);
            return RouterReply::Alive {
                generation,
                sent,
                lapsed,
                deaths: s.deaths,
            };
        }
        RouterCall::RegisterAll(devices, server) => {
            for (user, device) in devices {
                s.devices.entry(user).or_default().insert((device, server));
            }
        }
        RouterCall::Register(user, device, server) => {
            s.devices.entry(user).or_default().insert((device, server));
        }
        RouterCall::Forget(user, device, server) => {
            if let Some(devices) = s.devices.get_mut(&user) {
                devices.remove(&(device, server));
                if devices.is_empty() {
                    s.devices.remove(&user);
                }
            }
        }
        RouterCall::Online(users) => {
            let online = users
                .iter()
                .map(|u| s.live_servers_of(u, now).next().is_some())
                .collect();
            return RouterReply::Online(online);
        }
        RouterCall::Watch(watcher, targets) => {
            for target in targets {
                s.watchers
                    .entry(target)
                    .or_default()
                    .insert(watcher.clone());
            }
        }
        RouterCall::Watchers(target) => {
            let watchers = s.watchers.get(&target).into_iter().flatten().cloned();
            return RouterReply::Users(watchers.collect());
        }
        RouterCall::Route(from, users, event) => {
            let mut by_server: BTreeMap<SocketAddr, BTreeSet<String>> = BTreeMap::new();
            let mut unplaced = Vec::new();
            for user in users {
                let mut placed = false;
                for server in s.live_servers_of(&user, now) {
                    placed = true;
                    if server != from {
                        by_server.entry(server).or_default().insert(user.clone());
                    }
                }
                if !placed {
                    unplaced.push(user);
                }
            }
            let event: Envelope = serde_json::from_str(&event).expect("envelopes decode");
            for (server, users) in by_server {
                let seq = {
                    let sent = s.sent.entry(server).or_default();
                    *sent += 1;
                    *sent
                };
                let envelope = Envelope {
                    users: users.into_iter().collect(),
                    entry: event.entry.clone(),
                    receipt: event.receipt.clone(),
                    presence: event.presence.clone(),
                };
                let deliver = Deliver {
                    generation,
                    seq,
                    envelope: serde_json::to_string(&envelope).expect("envelopes encode"),
                };
                let ep = ep.clone();
                // Pub/sub: fire and forget; a lost delivery shows up as a gap.
                tokio::spawn(async move {
                    let target = SocketAddr::new(server.ip(), DELIVER_PORT);
                    let _ = ep.call_timeout(target, deliver, CALL_TIMEOUT).await;
                });
            }
            return RouterReply::Users(unplaced);
        }
    }
    RouterReply::Done
}

/// What a server knows of its link to the router.
#[derive(Default)]
struct Link {
    generation: Option<u64>,
    received: u64,
    /// The router's count of dead server processes, as last heard.
    deaths: u64,
    /// Events may have been lost since the last recovery.
    suspect: bool,
}

/// [`Fabric`] on the simulated router.
pub struct SimFabric {
    ep: Endpoint,
    router: SocketAddr,
    me: SocketAddr,
    id: String,
    /// This start of the server (the router tells a restart from a heartbeat).
    incarnation: u64,
    link: Arc<Mutex<Link>>,
    recoveries: AtomicU64,
}

impl SimFabric {
    /// Joins the router at `router` as the server whose events arrive at
    /// `me` (port [`DELIVER_PORT`]); starts the heartbeat and the event handler.
    pub async fn start(router: SocketAddr, me: SocketAddr, hub: Arc<Hub>) -> Arc<Self> {
        let ep = Endpoint::bind(me).await.expect("binding the deliver port");
        let fabric = Arc::new(Self {
            ep,
            router,
            me,
            id: me.to_string(),
            incarnation: madsim::rand::random(),
            link: Arc::new(Mutex::new(Link::default())),
            recoveries: AtomicU64::new(0),
        });
        let (link, events_hub) = (Arc::clone(&fabric.link), Arc::clone(&hub));
        fabric.ep.add_rpc_handler(move |d: Deliver| {
            let (link, hub) = (Arc::clone(&link), Arc::clone(&events_hub));
            async move {
                {
                    let mut l = link.lock().expect("link");
                    if l.generation != Some(d.generation) || d.seq != l.received + 1 {
                        l.suspect = true;
                    }
                    l.received = l.received.max(d.seq);
                }
                if let Ok(envelope) = serde_json::from_str::<Envelope>(&d.envelope) {
                    envelope.deliver(&hub);
                }
            }
        });
        tokio::spawn(Arc::clone(&fabric).heartbeat_loop(hub));
        fabric
    }

    async fn call(&self, call: RouterCall) -> Result<RouterReply, FabricError> {
        self.ep
            .call_timeout(self.router, call, CALL_TIMEOUT)
            .await
            .map_err(|e| FabricError(format!("router unreachable: {e}")))
    }

    /// Heartbeats; after anything that may have lost events (no answer, a new
    /// generation, fewer events received than sent, a peer's death: it may have
    /// died with events for local devices still in its outbox) re-registers the
    /// local devices and makes every session resync.
    async fn heartbeat_loop(self: Arc<Self>, hub: Arc<Hub>) {
        loop {
            let reply = self
                .call(RouterCall::Announce(self.me, self.incarnation))
                .await;
            let recover = {
                let mut l = self.link.lock().expect("link");
                match reply {
                    Ok(RouterReply::Alive {
                        generation,
                        sent,
                        lapsed,
                        deaths,
                    }) => {
                        if l.generation != Some(generation) {
                            l.suspect |= l.generation.is_some();
                            l.generation = Some(generation);
                            l.received = 0;
                            l.deaths = deaths;
                        }
                        if deaths > l.deaths {
                            l.suspect = true;
                            l.deaths = deaths;
                        }
                        // Skipped as dead for a while: events for its devices were dropped.
                        l.suspect |= lapsed;
                        if sent > l.received {
                            l.suspect = true;
                            l.received = sent;
                        }
                        std::mem::take(&mut l.suspect)
                    }
                    _ => {
                        l.suspect = true;
                        false
                    }
                }
            };
            if recover {
                self.recover(&hub).await;
            }
            tokio::time::sleep(HEARTBEAT_EVERY).await;
        }
    }

    async fn recover(&self, hub: &Hub) {
        let devices = hub.devices();
        if self
            .call(RouterCall::RegisterAll(devices, self.me))
            .await
            .is_err()
        {
            self.link.lock().expect("link").suspect = true;
            return; // The next heartbeat tries again.
        }
        self.recoveries.fetch_add(1, Ordering::Relaxed);
        resync_sessions(hub);
    }
}

#[async_trait]
impl Fabric for SimFabric {
    fn server_id(&self) -> &str {
        &self.id
    }

    async fn device_connected(&self, user: &str, device: &str) -> Result<(), FabricError> {
        let call = RouterCall::Register(user.into(), device.into(), self.me);
        self.call(call).await.map(|_| ())
    }

    fn device_disconnected(&self, user: &str, device: &str) {
        let call = RouterCall::Forget(user.into(), device.into(), self.me);
        let (ep, router) = (self.ep.clone(), self.router);
        tokio::spawn(async move {
            let _ = ep.call_timeout(router, call, CALL_TIMEOUT).await;
        });
    }

    async fn forward(&self, users: Arc<[String]>, event: Routed) -> Result<Forwarded, FabricError> {
        let envelope = Envelope::new(users.to_vec(), &event);
        let json = serde_json::to_string(&envelope).expect("envelopes encode");
        let routed = self
            .call(RouterCall::Route(self.me, users.to_vec(), json))
            .await;
        match routed {
            Ok(RouterReply::Users(unplaced)) => Ok(Forwarded { unplaced }),
            Ok(other) => Err(FabricError(format!("unexpected router reply {other:?}"))),
            Err(e) => {
                // This server's own link may have dropped events too.
                self.link.lock().expect("link").suspect = true;
                Err(e)
            }
        }
    }

    async fn online_users(&self, users: &[String]) -> Result<Vec<bool>, FabricError> {
        match self.call(RouterCall::Online(users.to_vec())).await? {
            RouterReply::Online(online) => Ok(online),
            other => Err(FabricError(format!("unexpected router reply {other:?}"))),
        }
    }

    async fn watch(&self, watcher: &str, targets: &[String]) -> Result<(), FabricError> {
        let call = RouterCall::Watch(watcher.into(), targets.to_vec());
        self.call(call).await.map(|_| ())
    }

    async fn watchers(&self, target: &str) -> Result<Vec<String>, FabricError> {
        match self.call(RouterCall::Watchers(target.into())).await? {
            RouterReply::Users(users) => Ok(users),
            other => Err(FabricError(format!("unexpected router reply {other:?}"))),
        }
    }
}
