//! Command-line and environment configuration (`clap`); every flag has a
//! `CHATPROOF_*` environment variable.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, ValueEnum};

use crate::auth::TokenKey;
use crate::limits::Limits;

/// Where the server keeps its data and how it is reached.
#[derive(Debug, Clone, Args)]
pub struct StorageArgs {
    /// Directory for the embedded database and the generated secret.
    #[arg(long, env = "CHATPROOF_DATA_DIR", default_value = "chatproof-data")]
    pub data_dir: PathBuf,
    /// Token signing secret (at least 16 bytes). Default: `DATA_DIR/secret`, created on first use.
    #[arg(long, env = "CHATPROOF_SECRET", hide_env_values = true)]
    pub secret: Option<String>,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Where conversations are stored and how servers find each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Backend {
    /// One server, embedded storage in the data directory; no service needed.
    Embedded,
    /// Many stateless servers sharing Scylla/Cassandra (storage) and Redis (registry, routing).
    Cluster,
}

/// Flags of the cluster backend (`--backend cluster`).
#[derive(Debug, Clone, Args)]
pub struct ClusterArgs {
    /// Scylla/Cassandra contact points, comma-separated `host:port`.
    #[arg(long, env = "CHATPROOF_SCYLLA_NODES", value_delimiter = ',')]
    pub scylla_nodes: Vec<String>,
    /// Keyspace (created with the schema if missing).
    #[arg(long, env = "CHATPROOF_SCYLLA_KEYSPACE", default_value = "chatproof")]
    pub scylla_keyspace: String,
    /// Replication factor of a keyspace this server creates (NetworkTopologyStrategy; use 3 in production).
    #[arg(long, env = "CHATPROOF_SCYLLA_REPLICATION_FACTOR", default_value_t = 1)]
    pub scylla_replication_factor: u32,
    /// Redis URL of the connection registry and routing, e.g. `redis://127.0.0.1:6379/`.
    #[arg(long, env = "CHATPROOF_REDIS_URL")]
    pub redis_url: Option<String>,
    /// This server's id in the registry; unique among live servers. Default: `HOST:PORT-PID` of --listen.
    #[arg(long, env = "CHATPROOF_SERVER_ID")]
    pub server_id: Option<String>,
    /// Seconds a server that stopped heartbeating stays routable (it heartbeats every third of it); fractions allowed, at least the registry's command timeout (3 s for Redis).
    #[arg(long, env = "CHATPROOF_REGISTRY_TTL_SECS", default_value_t = 10.0)]
    pub registry_ttl_secs: f64,
}

/// Flags of `chatproof-server serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address to listen on (HTTP: /v1/ws, /metrics, /healthz).
    #[arg(long, env = "CHATPROOF_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Connections the kernel queues before the server accepts them (capped by the
    /// kernel's net.core.somaxconn). A reconnect storm larger than the queue has its
    /// connection attempts dropped and retried by the clients only after a second.
    #[arg(long, env = "CHATPROOF_LISTEN_BACKLOG", default_value_t = crate::limits::LISTEN_BACKLOG_DEFAULT, value_parser = clap::value_parser!(u32).range(1..))]
    pub listen_backlog: u32,
    #[command(flatten)]
    pub storage: StorageArgs,
    /// Storage and routing: `embedded` (one node) or `cluster` (Scylla + Redis; needs --secret shared by all servers).
    #[arg(long, env = "CHATPROOF_BACKEND", value_enum, default_value_t = Backend::Embedded)]
    pub backend: Backend,
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// Largest text message, in bytes.
    #[arg(long, env = "CHATPROOF_TEXT_MAX_BYTES", default_value_t = crate::limits::TEXT_LEN_MAX_BYTES_DEFAULT)]
    pub text_max_bytes: usize,
    /// Largest WebSocket frame, in bytes; larger frames close the connection.
    #[arg(long, env = "CHATPROOF_FRAME_MAX_BYTES", default_value_t = crate::limits::FRAME_LEN_MAX_BYTES_DEFAULT)]
    pub frame_max_bytes: usize,
    /// Most members in a group, the owner included.
    #[arg(long, env = "CHATPROOF_GROUP_MAX_MEMBERS", default_value_t = crate::limits::GROUP_MEMBERS_MAX_DEFAULT)]
    pub group_max_members: usize,
    /// Most concurrent connections.
    #[arg(long, env = "CHATPROOF_MAX_CONNECTIONS", default_value_t = 100_000)]
    pub max_connections: usize,
    /// How long messages are kept, in seconds (default 366 days).
    #[arg(long, env = "CHATPROOF_RETENTION_SECS", default_value_t = crate::limits::RETENTION_DEFAULT.as_secs())]
    pub retention_secs: u64,
    /// How often expired messages are deleted, in seconds.
    #[arg(long, env = "CHATPROOF_EXPIRY_SWEEP_SECS", default_value_t = 600)]
    pub expiry_sweep_secs: u64,
    /// Connections beyond --max-connections that may still reach /healthz and /metrics (nothing else).
    #[arg(long, env = "CHATPROOF_HEALTH_CONNECTIONS", default_value_t = 16)]
    pub health_connections: usize,
    /// Seconds an HTTP connection may take to send a request head (from connect, or from its previous response).
    #[arg(long, env = "CHATPROOF_HEADER_READ_TIMEOUT_SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    pub header_read_timeout_secs: u64,
    /// Seconds an HTTP connection may stay open with no request in flight and no byte arriving.
    #[arg(long, env = "CHATPROOF_KEEP_ALIVE_TIMEOUT_SECS", default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..))]
    pub keep_alive_timeout_secs: u64,
    /// Seconds a WebSocket may stay open without a successful hello (closed with hello_timeout).
    #[arg(long, env = "CHATPROOF_HELLO_TIMEOUT_SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    pub hello_timeout_secs: u64,
    /// Close connections silent for this long, in seconds (the server pings at a third of it).
    #[arg(long, env = "CHATPROOF_IDLE_TIMEOUT_SECS", default_value_t = 90)]
    pub idle_timeout_secs: u64,
    /// Longest a long-poll request (POST /v1/poll) is held, in seconds.
    #[arg(long, env = "CHATPROOF_POLL_TIMEOUT_MAX_SECS", default_value_t = 30)]
    pub poll_timeout_max_secs: u64,
    /// Directory of uploaded images (content-addressed). Default: DATA_DIR/media. In a cluster, shared by every server.
    #[arg(long, env = "CHATPROOF_MEDIA_DIR")]
    pub media_dir: Option<PathBuf>,
    /// Largest image upload, in bytes (larger ones get 413).
    #[arg(long, env = "CHATPROOF_MEDIA_MAX_BYTES", default_value_t = crate::media::MEDIA_LEN_MAX_BYTES_DEFAULT)]
    pub media_max_bytes: u64,
    /// Push notifications for users with no connected device: POST JSON to this http:// URL. Default: log them.
    #[arg(long, env = "CHATPROOF_PUSH_WEBHOOK")]
    pub push_webhook: Option<String>,
    /// Notifications queued for the webhook at most; more are dropped (counted in chatproof_push_dropped).
    #[arg(long, env = "CHATPROOF_PUSH_QUEUE_LEN", default_value_t = 10_000)]
    pub push_queue_len: usize,
    /// Tries per notification before it is dropped.
    #[arg(long, env = "CHATPROOF_PUSH_ATTEMPTS", default_value_t = 5)]
    pub push_attempts: u32,
    /// Wait before the first webhook retry, in ms; doubled for each next one.
    #[arg(long, env = "CHATPROOF_PUSH_BACKOFF_MS", default_value_t = 200)]
    pub push_backoff_ms: u64,
    /// Presence changes are published, and written to each connection, at most once per this many ms.
    #[arg(long, env = "CHATPROOF_PRESENCE_INTERVAL_MS", default_value_t = 1000)]
    pub presence_interval_ms: u64,
    /// Cluster mode: while Redis takes no events, at most this many wait to be routed (one per conversation, reader or user with something unrouted); past it a send answers internal (stored, retry).
    #[arg(long, env = "CHATPROOF_UNROUTED_MAX", default_value_t = crate::cluster::outbox::CAPACITY_DEFAULT)]
    pub unrouted_max: usize,
    /// Sends per second one user may make (all devices together); more get rate_limited with retry_after_ms.
    #[arg(long, env = "CHATPROOF_USER_SEND_RATE", default_value_t = crate::limits::SEND_RATE_DEFAULT.per_sec)]
    pub user_send_rate: f64,
    /// Sends one user may make at once after a quiet spell.
    #[arg(long, env = "CHATPROOF_USER_SEND_BURST", default_value_t = crate::limits::SEND_RATE_DEFAULT.burst)]
    pub user_send_burst: u32,
    /// Group creations and membership changes per second one user may make; more get rate_limited.
    #[arg(long, env = "CHATPROOF_USER_GROUP_CHANGE_RATE", default_value_t = crate::limits::GROUP_CHANGE_RATE_DEFAULT.per_sec)]
    pub user_group_change_rate: f64,
    /// Group creations and membership changes one user may make at once.
    #[arg(long, env = "CHATPROOF_USER_GROUP_CHANGE_BURST", default_value_t = crate::limits::GROUP_CHANGE_RATE_DEFAULT.burst)]
    pub user_group_change_burst: u32,
    /// Connections open at once from one source address; more get 503 overloaded (behind a proxy, raise it and limit in the proxy).
    #[arg(long, env = "CHATPROOF_MAX_CONNECTIONS_PER_ADDRESS", default_value_t = crate::limits::CONNECTIONS_PER_ADDRESS_DEFAULT)]
    pub max_connections_per_address: usize,
    /// Bytes of live events queued for one device that is not reading; past it the device gets slow_consumer and is closed.
    #[arg(long, env = "CHATPROOF_DEVICE_QUEUE_MAX_BYTES", default_value_t = 8 * 1024 * 1024)]
    pub device_queue_max_bytes: usize,
    /// Live events queued for one device that is not reading; past it the device gets slow_consumer and is closed.
    #[arg(long, env = "CHATPROOF_DEVICE_QUEUE_MAX_EVENTS", default_value_t = crate::limits::DEVICE_QUEUE_LEN_MAX_DEFAULT, value_parser = clap::value_parser!(u64).range(1..))]
    pub device_queue_max_events: u64,
    /// Most entries in one page of sync or history, and in one catch-up read.
    #[arg(long, env = "CHATPROOF_PAGE_MAX_ENTRIES", default_value_t = crate::limits::PAGE_LEN_MAX_DEFAULT, value_parser = clap::value_parser!(u32).range(1..))]
    pub page_max_entries: u32,
    /// Devices of one user connected to this server at once; another gets too_many_devices.
    #[arg(long, env = "CHATPROOF_DEVICES_PER_USER_MAX", default_value_t = 32)]
    pub devices_per_user_max: usize,
    /// Long-poll mailboxes (devices on the HTTP fallback) open at once; another poll gets 503 overloaded.
    #[arg(long, env = "CHATPROOF_POLL_MAILBOXES_MAX", default_value_t = 100_000)]
    pub poll_mailboxes_max: usize,
    /// Image uploads in progress at once; another gets 503 overloaded with retry_after_ms.
    #[arg(long, env = "CHATPROOF_UPLOADS_MAX", default_value_t = 64)]
    pub uploads_max: usize,
    /// Log format.
    #[arg(long, env = "CHATPROOF_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

impl ServeArgs {
    /// The limits these flags describe, validated.
    pub fn limits(&self) -> Result<Limits, String> {
        let limits = Limits {
            text_len_max_bytes: self.text_max_bytes,
            frame_len_max_bytes: self.frame_max_bytes,
            group_members_max: self.group_max_members,
            connections_max: self.max_connections,
            health_connections_max: self.health_connections,
            header_read_timeout: Duration::from_secs(self.header_read_timeout_secs),
            keep_alive_timeout: Duration::from_secs(self.keep_alive_timeout_secs),
            hello_timeout: Duration::from_secs(self.hello_timeout_secs),
            retention: Duration::from_secs(self.retention_secs),
            expiry_sweep_interval: Duration::from_secs(self.expiry_sweep_secs.max(1)),
            idle_timeout: Duration::from_secs(self.idle_timeout_secs.max(3)),
            presence_interval: Duration::from_millis(self.presence_interval_ms),
            poll_timeout_max: Duration::from_secs(self.poll_timeout_max_secs.max(1)),
            media_len_max_bytes: self.media_max_bytes,
            unrouted_slots_max: self.unrouted_max,
            devices_per_user_max: self.devices_per_user_max,
            connections_per_address_max: self.max_connections_per_address,
            device_queue_bytes_max: self.device_queue_max_bytes,
            device_queue_len_max: usize::try_from(self.device_queue_max_events)
                .map_err(|_| "--device-queue-max-events is too large".to_owned())?,
            page_len_max: self.page_max_entries,
            poll_mailboxes_max: self.poll_mailboxes_max,
            uploads_max: self.uploads_max,
            send_rate: crate::rate::Rate {
                per_sec: self.user_send_rate,
                burst: self.user_send_burst,
            },
            group_change_rate: crate::rate::Rate {
                per_sec: self.user_group_change_rate,
                burst: self.user_group_change_burst,
            },
            ..Limits::default()
        };
        limits.validate()?;
        Ok(limits)
    }
}

impl StorageArgs {
    /// The token key: `--secret`, or the secret file in the data directory (created if absent).
    pub fn token_key(&self) -> Result<TokenKey, String> {
        match &self.secret {
            Some(secret) => TokenKey::new(secret.as_bytes()),
            None => TokenKey::new(load_or_create_secret(&self.data_dir)?.as_bytes()),
        }
    }
}

fn load_or_create_secret(dir: &Path) -> Result<String, String> {
    let path = dir.join("secret");
    if let Ok(secret) = std::fs::read_to_string(&path) {
        let secret = secret.trim().to_owned();
        if secret.len() < crate::auth::SECRET_LEN_MIN_BYTES {
            return Err(format!(
                "{} holds no usable secret ({} bytes); delete it to have a new one generated \
                 (tokens signed with the old one stop working)",
                path.display(),
                secret.len()
            ));
        }
        return Ok(secret);
    }
    let hint = crate::store::embedded::io_hint;
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}{}", dir.display(), hint(&e)))?;
    let mut bytes = [0u8; 32];
    let mut urandom =
        std::fs::File::open("/dev/urandom").map_err(|e| format!("/dev/urandom: {e}"))?;
    std::io::Read::read_exact(&mut urandom, &mut bytes)
        .map_err(|e| format!("/dev/urandom: {e}"))?;
    let secret: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    // Readable by the owner only: anyone who reads it can mint tokens for every user.
    let mut file = std::fs::OpenOptions::new();
    file.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut file, 0o600);
    let written = file
        .open(&path)
        .and_then(|mut f| std::io::Write::write_all(&mut f, secret.as_bytes()));
    match written {
        Ok(()) => Ok(secret),
        // Another process created it first: use theirs.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => std::fs::read_to_string(&path)
            .map(|s| s.trim().to_owned())
            .map_err(|e| format!("{}: {e}", path.display())),
        Err(e) => {
            // Created but not written (a full disk): leave nothing half-made behind.
            let _ = std::fs::remove_file(&path);
            Err(format!("{}: {e}{}", path.display(), hint(&e)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A secret file left empty (a start on a full disk, a bad copy) is refused
    /// with a message naming it and what to do, not used as a weak key.
    #[test]
    fn an_empty_secret_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("secret"), b"\n").unwrap();
        let why = load_or_create_secret(dir.path()).unwrap_err();
        assert!(why.contains("secret holds no usable secret"), "{why}");
        assert!(why.contains("delete it"), "{why}");
    }

    /// The secret is created once, kept, and readable by its owner only.
    #[test]
    fn secret_file_is_private_and_stable() {
        let dir = tempfile::tempdir().unwrap();
        let first = load_or_create_secret(dir.path()).unwrap();
        assert_eq!(first.len(), 64);
        assert_eq!(load_or_create_secret(dir.path()).unwrap(), first);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join("secret"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "mode {mode:o}");
        }
    }
}
