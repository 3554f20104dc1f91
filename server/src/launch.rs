//! Starting a complete server from [`ServeArgs`] on the configured backends:
//! shared by `chatproof-server serve`, the load generator's reference server and
//! the simulator.
//!
//! [`serve_on`] reads the flags and asks a [`Platform`] for what they name: a
//! clock, a store, a registry, a place for images. The binary launches onto the
//! host ([`Host`]); the simulator onto its simulated disk and backend nodes, so
//! the flags, their checks and the order of start-up it runs are the binary's.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::clock::{Clock, SystemClock};
use crate::cluster::fabric::{FabricConfig, RegistryFabric};
use crate::cluster::registry::Registry;
use crate::config::{Backend, ServeArgs};
use crate::limits::Limits;
use crate::media::BlobStore;
use crate::metrics::Metrics;
use crate::push::PushSink;
use crate::service::ServiceBuilder;
use crate::store::embedded::EmbeddedStore;
use crate::store::Store;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// A flag is out of range or inconsistent.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The data directory or database could not be opened.
    #[error("opening the store in {dir}: {why}")]
    Store {
        /// The data directory.
        dir: String,
        /// The underlying error.
        why: String,
    },
    /// A backend service (Scylla/Cassandra, Redis) is unreachable or refused us.
    #[error("{0}")]
    Backend(String),
    /// The listen address could not be bound.
    #[error("binding {addr}: {why}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The underlying error.
        why: String,
    },
}

/// A connected cluster registry and what its client promises about time.
pub struct RegistryLink {
    /// The registry.
    pub registry: Arc<dyn Registry>,
    /// Longest one command waits before its caller gives up on it; the registry
    /// TTL may not be shorter (a lease would lapse on one slow command).
    pub command_timeout: Duration,
    /// Longest a command may still apply after its caller gave up on it (the
    /// client's timeouts and retries), see [`FabricConfig::late_write_max`].
    pub late_write_max: Duration,
}

/// The world a server is launched onto: where its time, storage, registry and
/// images come from. Every method is called at most once per start, in the
/// order [`serve_on`] documents; an error stops the start with that error.
#[async_trait]
pub trait Platform: Send + Sync {
    /// The clock the service reads.
    fn clock(&self) -> Arc<dyn Clock>;
    /// Opens the embedded store of `args` (`--data-dir`).
    fn open_embedded(&self, args: &ServeArgs) -> Result<EmbeddedStore, LaunchError>;
    /// Connects the cluster's shared store (`--scylla-*`), keeping entries for `limits.retention`.
    async fn connect_shared_store(
        &self,
        args: &ServeArgs,
        limits: &Limits,
    ) -> Result<Arc<dyn Store>, LaunchError>;
    /// Connects the cluster's registry (`--redis-url`).
    async fn connect_registry(&self, args: &ServeArgs) -> Result<RegistryLink, LaunchError>;
    /// A name for this start of the server that no other start of any server
    /// shares ([`FabricConfig::incarnation`]).
    fn incarnation(&self) -> String;
    /// Where uploaded images are kept (`--media-dir`); `None` (the default) refuses
    /// uploads.
    fn blobs(&self, _args: &ServeArgs) -> Result<Option<Arc<dyn BlobStore>>, LaunchError> {
        Ok(None)
    }
    /// Where notifications for offline users go (`--push-webhook`); `None` (the
    /// default) logs them.
    fn push_sink(
        &self,
        _args: &ServeArgs,
        _metrics: &Arc<Metrics>,
    ) -> Result<Option<Arc<dyn PushSink>>, LaunchError> {
        Ok(None)
    }
}

/// [`serve_on`] the host: the system clock, the data directory, Scylla and Redis.
pub async fn serve(
    args: &ServeArgs,
    on_ready: impl FnOnce(SocketAddr),
    shutdown: impl Future<Output = ()>,
) -> Result<(), LaunchError> {
    serve_on(&Host, args, on_ready, shutdown).await
}

/// Starts a server of `args` on `platform` and serves until `shutdown` resolves
/// (then drains).
///
/// In order: validates the limits; opens the store (embedded: the token key from
/// `--secret` or the data directory; cluster: `--secret` required, then the
/// shared store); media and push; binds `--listen`; on the cluster backend
/// connects the registry and starts the fabric; then calls `on_ready` with the
/// bound address and serves. An unreachable or misconfigured backend stops
/// start-up with an error naming it, before `on_ready`.
pub async fn serve_on(
    platform: &dyn Platform,
    args: &ServeArgs,
    on_ready: impl FnOnce(SocketAddr),
    shutdown: impl Future<Output = ()>,
) -> Result<(), LaunchError> {
    let limits = args.limits().map_err(LaunchError::Config)?;
    let (store, key): (Arc<dyn Store>, _) = match args.backend {
        Backend::Embedded => {
            let key = args.storage.token_key().map_err(LaunchError::Config)?;
            (Arc::new(platform.open_embedded(args)?), key)
        }
        Backend::Cluster => {
            let key = cluster_token_key(args)?;
            (platform.connect_shared_store(args, &limits).await?, key)
        }
    };
    let mut service = ServiceBuilder::new(store, platform.clock(), limits, key);
    if let Some(blobs) = platform.blobs(args)? {
        service = service.media(blobs);
    }
    if let Some(sink) = platform.push_sink(args, service.metrics())? {
        service = service.push(sink);
    }
    let listener = bind_listener(args.listen, args.listen_backlog)
        .await
        .map_err(|e| LaunchError::Bind {
            addr: args.listen,
            why: e.to_string(),
        })?;
    let local = listener.local_addr().map_err(|e| LaunchError::Bind {
        addr: args.listen,
        why: e.to_string(),
    })?;
    if args.backend == Backend::Cluster {
        let link = platform.connect_registry(args).await?;
        let config = fabric_config(args, local, &link, platform.incarnation())?;
        let fabric = RegistryFabric::start(
            config,
            link.registry,
            Arc::clone(service.hub()),
            service.metrics().fabric.clone(),
        )
        .await
        .map_err(|e| LaunchError::Backend(e.to_string()))?;
        service = service.fabric(fabric);
    }
    let service = Arc::new(service.build());
    tracing::info!(listen = %local, backend = ?args.backend, "chatproof-server ready");
    on_ready(local);
    crate::run(listener, service, shutdown).await;
    tracing::info!("chatproof-server stopped");
    Ok(())
}

/// [`serve`] on the embedded backend whatever `args.backend` says (the load
/// generator's reference server).
pub async fn serve_embedded(
    args: &ServeArgs,
    on_ready: impl FnOnce(SocketAddr),
    shutdown: impl Future<Output = ()>,
) -> Result<(), LaunchError> {
    let args = ServeArgs {
        backend: Backend::Embedded,
        ..args.clone()
    };
    serve(&args, on_ready, shutdown).await
}

/// The host the binary runs on: the system clock, `--data-dir` on the local
/// file system, Scylla/Cassandra and Redis over the network, images on local
/// disk, push by webhook. Under the simulator only the embedded store exists
/// (no images, push logged).
pub struct Host;

#[async_trait]
impl Platform for Host {
    fn clock(&self) -> Arc<dyn Clock> {
        Arc::new(SystemClock)
    }

    fn open_embedded(&self, args: &ServeArgs) -> Result<EmbeddedStore, LaunchError> {
        let dir = &args.storage.data_dir;
        EmbeddedStore::open(dir).map_err(|e| LaunchError::Store {
            dir: dir.display().to_string(),
            why: e.to_string(),
        })
    }

    #[cfg(not(madsim))]
    async fn connect_shared_store(
        &self,
        args: &ServeArgs,
        limits: &Limits,
    ) -> Result<Arc<dyn Store>, LaunchError> {
        let config = scylla_config(args, limits)?;
        let store = crate::store::scylla::ScyllaStore::connect(&config)
            .await
            .map_err(|e| LaunchError::Backend(e.to_string()))?;
        Ok(Arc::new(store))
    }

    #[cfg(madsim)]
    async fn connect_shared_store(
        &self,
        _args: &ServeArgs,
        _limits: &Limits,
    ) -> Result<Arc<dyn Store>, LaunchError> {
        Err(LaunchError::Config(
            "the host's cluster backend does not run under the simulator".into(),
        ))
    }

    #[cfg(not(madsim))]
    async fn connect_registry(&self, args: &ServeArgs) -> Result<RegistryLink, LaunchError> {
        let Some(url) = args.cluster.redis_url.clone() else {
            return Err(LaunchError::Config(
                "--backend cluster needs --redis-url (CHATPROOF_REDIS_URL), e.g. redis://127.0.0.1:6379/".into(),
            ));
        };
        let registry = crate::cluster::registry::redis::RedisRegistry::connect(&url)
            .await
            .map_err(|e| LaunchError::Backend(e.to_string()))?;
        Ok(RegistryLink {
            registry: Arc::new(registry),
            command_timeout: crate::cluster::registry::redis::COMMAND_TIMEOUT,
            // Redis commands time out after 3 s and are retried twice.
            late_write_max: Duration::from_secs(15),
        })
    }

    #[cfg(madsim)]
    async fn connect_registry(&self, _args: &ServeArgs) -> Result<RegistryLink, LaunchError> {
        Err(LaunchError::Config(
            "the host's cluster backend does not run under the simulator".into(),
        ))
    }

    fn incarnation(&self) -> String {
        crate::cluster::fabric::new_incarnation()
    }

    #[cfg(not(madsim))]
    fn blobs(&self, args: &ServeArgs) -> Result<Option<Arc<dyn BlobStore>>, LaunchError> {
        let media_dir = args
            .media_dir
            .clone()
            .unwrap_or_else(|| args.storage.data_dir.join("media"));
        let blobs = crate::media::disk::DiskBlobStore::open(&media_dir).map_err(|e| {
            LaunchError::Store {
                dir: media_dir.display().to_string(),
                why: e.to_string(),
            }
        })?;
        Ok(Some(Arc::new(blobs)))
    }

    #[cfg(not(madsim))]
    fn push_sink(
        &self,
        args: &ServeArgs,
        metrics: &Arc<Metrics>,
    ) -> Result<Option<Arc<dyn PushSink>>, LaunchError> {
        let Some(url) = &args.push_webhook else {
            return Ok(None);
        };
        let config = crate::push::webhook::WebhookConfig {
            url: url.clone(),
            queue_len: args.push_queue_len,
            attempts: args.push_attempts,
            backoff: Duration::from_millis(args.push_backoff_ms),
        };
        let sink = crate::push::webhook::WebhookSink::start(config, Arc::clone(metrics))
            .map_err(LaunchError::Config)?;
        Ok(Some(sink))
    }
}

/// Binds the listening socket with an accept queue of `backlog` connections (the kernel
/// caps it at net.core.somaxconn). The standard library's default of 128 overflows when
/// a few hundred devices reconnect at once: the kernel drops their SYNs and the clients
/// retry only after a second.
#[cfg(not(madsim))]
async fn bind_listener(addr: SocketAddr, backlog: u32) -> std::io::Result<tokio::net::TcpListener> {
    assert!(backlog > 0, "listen backlog of 0");
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // As the standard library does: a restarted server may bind while old connections
    // of its predecessor linger in TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

/// The simulator's network has no accept queue to size.
#[cfg(madsim)]
async fn bind_listener(
    addr: SocketAddr,
    _backlog: u32,
) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

fn cluster_token_key(args: &ServeArgs) -> Result<crate::auth::TokenKey, LaunchError> {
    match &args.storage.secret {
        Some(secret) => crate::auth::TokenKey::new(secret.as_bytes()).map_err(LaunchError::Config),
        None => Err(LaunchError::Config(
            "--backend cluster needs --secret (CHATPROOF_SECRET), the same on every server, so a token minted for one is accepted by all".into(),
        )),
    }
}

#[cfg(not(madsim))]
fn scylla_config(
    args: &ServeArgs,
    limits: &crate::limits::Limits,
) -> Result<crate::store::scylla::ScyllaConfig, LaunchError> {
    let c = &args.cluster;
    if c.scylla_nodes.iter().all(|n| n.trim().is_empty()) {
        return Err(LaunchError::Config(
            "--backend cluster needs --scylla-nodes (CHATPROOF_SCYLLA_NODES), e.g. 127.0.0.1:9042"
                .into(),
        ));
    }
    if c.scylla_replication_factor == 0 {
        return Err(LaunchError::Config(
            "--scylla-replication-factor must be at least 1".into(),
        ));
    }
    let mut config = crate::store::scylla::ScyllaConfig::single_node(
        c.scylla_nodes.clone(),
        &c.scylla_keyspace,
        limits.retention,
    );
    config.replication = format!(
        "{{'class': 'NetworkTopologyStrategy', 'replication_factor': {}}}",
        c.scylla_replication_factor
    );
    Ok(config)
}

/// This server's place in the cluster, from the arguments and the registry's link.
fn fabric_config(
    args: &ServeArgs,
    local: SocketAddr,
    link: &RegistryLink,
    incarnation: String,
) -> Result<FabricConfig, LaunchError> {
    let c = &args.cluster;
    let floor = link.command_timeout.as_secs_f64();
    if !c.registry_ttl_secs.is_finite() || c.registry_ttl_secs < floor {
        return Err(LaunchError::Config(format!(
            "--registry-ttl-secs must be at least {floor} (the registry's command timeout)"
        )));
    }
    let server_id = c
        .server_id
        .clone()
        .unwrap_or_else(|| format!("{local}-{}", std::process::id()));
    Ok(FabricConfig {
        server_id,
        incarnation,
        ttl: Duration::from_secs_f64(c.registry_ttl_secs),
        late_write_max: link.late_write_max,
        prefix: "cp:".into(),
    })
}

#[cfg(all(test, not(madsim)))]
mod tests {
    use std::time::Duration;

    /// Connections that the kernel completes into `listener`'s accept queue (nobody
    /// accepts), out of `attempts`, each given `wait` to complete.
    async fn queued(addr: std::net::SocketAddr, attempts: usize, wait: Duration) -> usize {
        let mut open = Vec::new();
        for _ in 0..attempts {
            if let Ok(Ok(stream)) =
                tokio::time::timeout(wait, tokio::net::TcpStream::connect(addr)).await
            {
                open.push(stream);
            }
        }
        open.len()
    }

    /// The accept queue has the configured size: 300 devices connecting at once while
    /// the server accepts none all complete with a backlog of 512 (the old default of 128
    /// dropped the rest, whose clients retried a second later); with a backlog of 8 most
    /// wait.
    #[tokio::test]
    async fn listen_backlog_is_the_configured_one() {
        let addr: std::net::SocketAddr = "127.0.0.1:0".parse().unwrap();
        let roomy = super::bind_listener(addr, 512).await.unwrap();
        let roomy_addr = roomy.local_addr().unwrap();
        assert_eq!(
            queued(roomy_addr, 300, Duration::from_millis(500)).await,
            300
        );
        let tight = super::bind_listener(addr, 8).await.unwrap();
        let tight_addr = tight.local_addr().unwrap();
        let n = queued(tight_addr, 30, Duration::from_millis(50)).await;
        assert!(n <= 12, "{n} connections queued with a backlog of 8");
    }
}
