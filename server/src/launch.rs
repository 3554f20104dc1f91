//! Starting a complete server from [`ServeArgs`] on the configured backends:
//! shared by `chatproof-server serve` and the load generator's reference server.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use crate::clock::SystemClock;
#[cfg(not(madsim))]
use crate::cluster::fabric::{new_incarnation, FabricConfig, RegistryFabric};
#[cfg(not(madsim))]
use crate::cluster::registry::redis::RedisRegistry;
use crate::config::{Backend, ServeArgs};
use crate::service::ServiceBuilder;
use crate::store::embedded::EmbeddedStore;
#[cfg(not(madsim))]
use crate::store::scylla::{ScyllaConfig, ScyllaStore};
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

/// Opens the configured backends, binds the listener, calls `on_ready` with the
/// bound address, and serves until `shutdown` resolves (then drains).
///
/// An unreachable or misconfigured backend stops start-up with an error naming it.
pub async fn serve(
    args: &ServeArgs,
    on_ready: impl FnOnce(SocketAddr),
    shutdown: impl Future<Output = ()>,
) -> Result<(), LaunchError> {
    let limits = args.limits().map_err(LaunchError::Config)?;
    let (store, key): (Arc<dyn Store>, _) = match args.backend {
        Backend::Embedded => {
            let key = args.storage.token_key().map_err(LaunchError::Config)?;
            let dir = &args.storage.data_dir;
            let store = EmbeddedStore::open(dir).map_err(|e| LaunchError::Store {
                dir: dir.display().to_string(),
                why: e.to_string(),
            })?;
            (Arc::new(store), key)
        }
        #[cfg(not(madsim))]
        Backend::Cluster => {
            let key = cluster_token_key(args)?;
            let config = scylla_config(args, &limits)?;
            let store = ScyllaStore::connect(&config)
                .await
                .map_err(|e| LaunchError::Backend(e.to_string()))?;
            (Arc::new(store), key)
        }
        #[cfg(madsim)]
        Backend::Cluster => {
            return Err(LaunchError::Config(
                "the cluster backend does not run under the simulator".into(),
            ))
        }
    };
    #[cfg_attr(madsim, allow(unused_mut))]
    let mut service = ServiceBuilder::new(store, Arc::new(SystemClock), limits, key);
    #[cfg(not(madsim))]
    {
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
        service = service.media(Arc::new(blobs));
        if let Some(url) = &args.push_webhook {
            let config = crate::push::webhook::WebhookConfig {
                url: url.clone(),
                queue_len: args.push_queue_len,
                attempts: args.push_attempts,
                backoff: std::time::Duration::from_millis(args.push_backoff_ms),
            };
            let sink =
                crate::push::webhook::WebhookSink::start(config, Arc::clone(service.metrics()))
                    .map_err(LaunchError::Config)?;
            service = service.push(sink);
        }
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
    #[cfg(not(madsim))]
    if args.backend == Backend::Cluster {
        let (url, config) = fabric_config(args, local)?;
        let registry = RedisRegistry::connect(&url)
            .await
            .map_err(|e| LaunchError::Backend(e.to_string()))?;
        let fabric = RegistryFabric::start(
            config,
            Arc::new(registry),
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

#[cfg(not(madsim))]
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
) -> Result<ScyllaConfig, LaunchError> {
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
    let mut config =
        ScyllaConfig::single_node(c.scylla_nodes.clone(), &c.scylla_keyspace, limits.retention);
    config.replication = format!(
        "{{'class': 'NetworkTopologyStrategy', 'replication_factor': {}}}",
        c.scylla_replication_factor
    );
    Ok(config)
}

#[cfg(not(madsim))]
/// The Redis URL and this server's place in the cluster, from the arguments.
fn fabric_config(
    args: &ServeArgs,
    local: SocketAddr,
) -> Result<(String, FabricConfig), LaunchError> {
    let c = &args.cluster;
    let Some(url) = c.redis_url.clone() else {
        return Err(LaunchError::Config(
            "--backend cluster needs --redis-url (CHATPROOF_REDIS_URL), e.g. redis://127.0.0.1:6379/".into(),
        ));
    };
    if c.registry_ttl_secs < 3 {
        return Err(LaunchError::Config(
            "--registry-ttl-secs must be at least 3".into(),
        ));
    }
    let server_id = c
        .server_id
        .clone()
        .unwrap_or_else(|| format!("{local}-{}", std::process::id()));
    let config = FabricConfig {
        server_id,
        incarnation: new_incarnation(),
        ttl: std::time::Duration::from_secs(c.registry_ttl_secs),
        // Redis commands time out after 3 s and are retried twice.
        late_write_max: std::time::Duration::from_secs(15),
        prefix: "cp:".into(),
    };
    Ok((url, config))
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
