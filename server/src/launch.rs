//! Starting a complete single-node server on embedded storage from [`ServeArgs`]:
//! shared by `chatproof-server serve` and the load generator's reference server.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use crate::clock::SystemClock;
use crate::config::ServeArgs;
use crate::service::ChatService;
use crate::store::embedded::EmbeddedStore;

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
    /// The listen address could not be bound.
    #[error("binding {addr}: {why}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The underlying error.
        why: String,
    },
}

/// Opens the store, binds the listener, calls `on_ready` with the bound address,
/// and serves until `shutdown` resolves (then drains).
pub async fn serve_embedded(
    args: &ServeArgs,
    on_ready: impl FnOnce(SocketAddr),
    shutdown: impl Future<Output = ()>,
) -> Result<(), LaunchError> {
    let limits = args.limits().map_err(LaunchError::Config)?;
    let key = args.storage.token_key().map_err(LaunchError::Config)?;
    let dir = &args.storage.data_dir;
    let store = EmbeddedStore::open(dir).map_err(|e| LaunchError::Store {
        dir: dir.display().to_string(),
        why: e.to_string(),
    })?;
    let service = Arc::new(ChatService::new(
        Arc::new(store),
        Arc::new(SystemClock),
        limits,
        key,
    ));
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| LaunchError::Bind {
            addr: args.listen,
            why: e.to_string(),
        })?;
    let local = listener.local_addr().map_err(|e| LaunchError::Bind {
        addr: args.listen,
        why: e.to_string(),
    })?;
    tracing::info!(listen = %local, data_dir = %dir.display(), "chatproof-server ready");
    on_ready(local);
    crate::run(listener, service, shutdown).await;
    tracing::info!("chatproof-server stopped");
    Ok(())
}
