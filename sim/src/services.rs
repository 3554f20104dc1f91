//! The simulated backends of a multi-server run, each on its own node and reached
//! over the simulated network (madsim RPC), each behind the trait the real backend
//! implements:
//!
//! - the **store** node serves the shared store's [`Tables`] (the stand-in for
//!   Scylla): a call is atomic and durable once applied; a crash of the node
//!   loses only calls in flight (some applied without their reply reaching the
//!   server: the server sees a failure for a write that happened);
//! - the **router** node is the stand-in for Redis: a [`MemRegistry`] whose
//!   commands arrive over RPC and whose subscriptions are simulated TCP
//!   connections (in order, delayed by a partition, ended by a crash, as a Redis
//!   pub/sub connection). It keeps everything in memory: a crash loses the
//!   registry, as Redis without persistence does.
//!
//! Server-side, [`SimTables`] implements [`Tables`] and [`SimRegistry`]
//! implements [`Registry`], so the servers run the same `SharedStore` and
//! `RegistryFabric` as production, only the wire swapped.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chatproof_server::cluster::registry::memory::MemRegistry;
use chatproof_server::cluster::registry::{Registry, RegistryOp, RegistryReply, Subscription};
use chatproof_server::cluster::FabricError;
use chatproof_server::store::shared::memory::MemTables;
use chatproof_server::store::shared::{TableOp, TableReply, Tables};
use chatproof_server::store::StoreError;
use chatproof_server::transport::quiet::PollOnWake;
use madsim::net::rpc::Request;
use madsim::net::Endpoint;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Port of the store service on the store node.
pub const STORE_PORT: u16 = 9042;
/// Port of the registry's commands on the router node.
pub const ROUTER_PORT: u16 = 6379;
/// Port of the registry's subscriptions on the router node.
pub const SUBSCRIBE_PORT: u16 = 6380;
/// How long a call to a backend may take before the server gives up on it.
pub const CALL_TIMEOUT: Duration = Duration::from_millis(1_000);
/// Largest frame on a subscription connection.
const FRAME_MAX: usize = 16 << 20;
/// Requests a backend node takes in at once. madsim's RPC server receives one
/// request at a time, and every receive sleeps at least 1 ms of simulated time, so
/// one receiving loop caps a node at 1,000 requests/s: under a burst (24 devices
/// catching up at once) calls queued past their timeout with no fault active.
const RECEIVERS: usize = 64;

/// Serves `handler` on `ep` with [`RECEIVERS`] receiving loops.
fn serve_rpc<R, H, Fut>(ep: &Endpoint, handler: H)
where
    R: Request,
    H: FnMut(R) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = R::Response> + Send + 'static,
{
    for _ in 0..RECEIVERS {
        ep.add_rpc_handler(handler.clone());
    }
}

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
    serve_rpc(&ep, move |StoreCall(op)| {
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
        // Its timeout is polled on its own wakes only (see `PollOnWake`).
        match PollOnWake::new(self.ep.call_timeout(self.store, call, CALL_TIMEOUT)).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(why)) => Err(StoreError::Backend(why)),
            Err(e) => Err(StoreError::Backend(format!("store unreachable: {e}"))),
        }
    }
}

// ---------------------------------------------------------------- router

/// A batch of registry commands on its way to the router node.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RegistryCall(pub Vec<RegistryOp>);

impl Request for RegistryCall {
    type Response = Vec<RegistryReply>;
    const ID: u64 = 0xC0FF_EE02;
}

/// Writes one length-prefixed frame.
async fn write_frame(stream: &mut TcpStream, bytes: &[u8]) -> std::io::Result<()> {
    let len = u32::try_from(bytes.len()).map_err(|_| std::io::ErrorKind::InvalidInput)?;
    stream.write_all(&len.to_be_bytes()).await?;
    stream.write_all(bytes).await?;
    stream.flush().await
}

/// Reads one length-prefixed frame.
async fn read_frame(stream: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > FRAME_MAX {
        return Err(std::io::ErrorKind::InvalidData.into());
    }
    let mut bytes = vec![0; len];
    stream.read_exact(&mut bytes).await?;
    Ok(bytes)
}

/// The router node: a registry in memory (lost on a crash), commands at `commands`,
/// subscriptions at `subscriptions`.
pub async fn serve_router(commands: SocketAddr, subscriptions: SocketAddr) {
    let registry = Arc::new(MemRegistry::new());
    let ep = Endpoint::bind(commands)
        .await
        .expect("binding the router port");
    let served = Arc::clone(&registry);
    serve_rpc(&ep, move |RegistryCall(ops)| {
        let registry = Arc::clone(&served);
        async move { registry.apply(ops) }
    });
    let listener = TcpListener::bind(subscriptions)
        .await
        .expect("binding the subscription port");
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(serve_subscriber(stream, Arc::clone(&registry)));
    }
}

/// One subscription: the channel's name comes in, an empty frame confirms the
/// subscription, then every message published to it goes out in order.
async fn serve_subscriber(mut stream: TcpStream, registry: Arc<MemRegistry>) {
    let Ok(channel) = read_frame(&mut stream).await else {
        return;
    };
    let mut published = registry.subscribe_receiver(&String::from_utf8_lossy(&channel));
    if write_frame(&mut stream, &[]).await.is_err() {
        return;
    }
    while let Some(message) = published.recv().await {
        if write_frame(&mut stream, &message).await.is_err() {
            return;
        }
    }
}

/// [`Registry`] on the simulated router node.
pub struct SimRegistry {
    ep: Endpoint,
    commands: SocketAddr,
    subscriptions: SocketAddr,
}

impl SimRegistry {
    /// A client of the router whose commands and subscriptions are at these addresses.
    pub async fn connect(commands: SocketAddr, subscriptions: SocketAddr) -> Self {
        let ep = Endpoint::bind("0.0.0.0:0")
            .await
            .expect("binding a client endpoint");
        Self {
            ep,
            commands,
            subscriptions,
        }
    }
}

#[async_trait]
impl Registry for SimRegistry {
    async fn run(&self, ops: Vec<RegistryOp>) -> Result<Vec<RegistryReply>, FabricError> {
        let call = RegistryCall(ops);
        PollOnWake::new(self.ep.call_timeout(self.commands, call, CALL_TIMEOUT))
            .await
            .map_err(|e| FabricError(format!("router unreachable: {e}")))
    }

    async fn subscribe(&self, channel: &str) -> Result<Subscription, FabricError> {
        let subscribed = async {
            let mut stream = TcpStream::connect(self.subscriptions).await?;
            write_frame(&mut stream, channel.as_bytes()).await?;
            if !read_frame(&mut stream).await?.is_empty() {
                return Err(std::io::ErrorKind::InvalidData.into());
            }
            Ok::<_, std::io::Error>(stream)
        };
        let stream = tokio::time::timeout(CALL_TIMEOUT, subscribed)
            .await
            .map_err(|_| FabricError("router did not confirm the subscription".into()))?
            .map_err(|e| FabricError(format!("cannot subscribe at the router: {e}")))?;
        Ok(Box::pin(futures_util::stream::unfold(
            stream,
            |mut stream| async move {
                let message = read_frame(&mut stream).await.ok()?;
                Some((message, stream))
            },
        )))
    }
}
