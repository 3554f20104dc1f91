//! The chat service: every operation a transport offers, on top of the store and
//! the hub. Transports parse frames and call this; it knows no socket.
//!
//! # Layout
//! - this file: [`ChatService`] (built by [`ServiceBuilder`]), [`Caller`], and `dispatch`.
//! - `fanout`: an appended entry to devices here and on other servers; push for offline users.
//! - `conversations`: direct chats, groups, membership, what a caller may read.
//! - `messages`: send, ack and receipts, `sync`, `history`.
//! - `devices`: one device life cycle ([`DeviceLease`]), where a device starts, long-poll mailboxes.
//! - `feed`: one device's delivery whatever its transport ([`DeviceFeed`]).
//! - `presence`: last seen, `presence` requests, publishing changes.

mod conversations;
mod devices;
mod fanout;
mod feed;
mod messages;
mod presence;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use sha2::{Digest, Sha256};
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::auth::TokenKey;
use crate::clock::Clock;
use crate::cluster::outbox::{Outbox, Routing};
use crate::cluster::{Fabric, Forwarded, Routed};
use crate::domain::{Cursor, GroupChange};
use crate::hub::{Framed, Hub, Push};
use crate::limits::Limits;
use crate::media::BlobStore;
use crate::metrics::{LimitHit, Metrics};
use crate::presence::Presence;
use crate::protocol::{
    validate_conv_id, validate_message_id, validate_user_id, AckRequest, Body, ConvSummary, Entry,
    ErrorCode, HistoryRequest, PresenceRequest, PresenceState, ProtocolError, Receipt, Reply,
    Request, SendRequest, ServerFrame, SyncRequest,
};
use crate::push::{LogSink, Notification, PushSink};
use crate::rate::RateLimiter;
use crate::store::{Appended, ConvState, CursorUpdate, NewMessage, Store, StoreError};

pub use devices::DeviceLease;
pub use feed::{DeviceFeed, Out, RECEIPT_BATCH_WINDOW};

/// Presence changes published at once (each reads the store, and Redis in a cluster).
const PRESENCE_PUBLISH_CONCURRENCY: usize = 32;

/// Last-seen writes in flight at once (every user of a server is due at shutdown).
const LAST_SEEN_WRITES_CONCURRENCY: usize = 64;

/// Acks wider than this notify every member instead of scanning for senders.
const RECEIPT_SCAN_LEN_MAX: u64 = 1000;

/// An authenticated device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The user id from the token.
    pub user: String,
    /// The device id from `hello`.
    pub device: String,
}

/// Shared services of one server process; built by [`ServiceBuilder`] and
/// entered through its methods.
pub struct ChatService {
    /// Durable storage.
    store: Arc<dyn Store>,
    /// Connected devices.
    hub: Arc<Hub>,
    /// Wall time.
    clock: Arc<dyn Clock>,
    /// When the service was built, on the monotonic clock (idle timeouts count
    /// on it, so a wall clock stepped back or forth never stretches them).
    started: tokio::time::Instant,
    /// Limits.
    limits: Limits,
    /// Metrics.
    metrics: Arc<Metrics>,
    /// Token verification.
    tokens: TokenKey,
    /// Registry and routing to other servers (cluster mode); `None` on one node.
    fabric: Option<Arc<dyn Fabric>>,
    /// Events for other servers that the fabric could not take yet (cluster mode).
    outbox: Option<Arc<Outbox>>,
    /// Presence changes waiting for publication, and local presence subscriptions.
    presence: Presence,
    /// Devices on the long-polling fallback.
    mailboxes: crate::mailbox::Mailboxes<DeviceFeed>,
    /// Where notifications for users with no connected device go.
    push: Arc<dyn PushSink>,
    /// Image storage; `None` where images are not served (the simulator).
    media: Option<Arc<dyn BlobStore>>,
    /// Sends per user.
    send_rate: RateLimiter,
    /// Group creations and membership changes per user.
    group_change_rate: RateLimiter,
    /// Places for image uploads in progress.
    uploads: Arc<tokio::sync::Semaphore>,
    group_ids_minted: AtomicU64,
    boot_ms: u64,
}

/// Builds a [`ChatService`]: the parts every server has first (store, clock,
/// limits, tokens), then the optional ones (cluster fabric, media, push sink).
/// The hub and metrics exist from the start, for the parts that need them.
pub struct ServiceBuilder {
    service: ChatService,
}

impl ServiceBuilder {
    /// A service on `store` with no fabric (one node), no media, and push
    /// notifications logged.
    pub fn new(
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        limits: Limits,
        tokens: TokenKey,
    ) -> Self {
        let boot_ms = clock.now_ms();
        let metrics = Arc::new(Metrics::default());
        let send_rate = RateLimiter::new(limits.send_rate);
        let group_change_rate = RateLimiter::new(limits.group_change_rate);
        let uploads = Arc::new(tokio::sync::Semaphore::new(limits.uploads_max));
        Self {
            service: ChatService {
                push: LogSink::new(Arc::clone(&metrics)),
                media: None,
                store,
                hub: Arc::new(Hub::default()),
                clock,
                started: tokio::time::Instant::now(),
                limits,
                metrics,
                tokens,
                fabric: None,
                outbox: None,
                presence: Presence::default(),
                mailboxes: crate::mailbox::Mailboxes::default(),
                send_rate,
                group_change_rate,
                uploads,
                group_ids_minted: AtomicU64::new(0),
                boot_ms,
            },
        }
    }

    /// The hub the service will fan out through (a fabric delivers into it).
    pub fn hub(&self) -> &Arc<Hub> {
        &self.service.hub
    }

    /// The metrics the service will count in (sinks and fabrics count there too).
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.service.metrics
    }

    /// Routes to other servers through `fabric` (cluster mode).
    /// Events the fabric cannot take at once wait in an outbox of at most
    /// `limits.unrouted_slots_max` slots (see [`crate::cluster::outbox`]).
    pub fn fabric(mut self, fabric: Arc<dyn Fabric>) -> Self {
        let outbox = Outbox::new(
            Arc::clone(&fabric),
            self.service.limits.unrouted_slots_max,
            self.service.metrics.fabric.clone(),
        );
        self.service.outbox = Some(Arc::new(outbox));
        self.service.fabric = Some(fabric);
        self
    }

    /// Serves images from `media`.
    pub fn media(mut self, media: Arc<dyn BlobStore>) -> Self {
        self.service.media = Some(media);
        self
    }

    /// Sends notifications for users with no connected device to `push`.
    pub fn push(mut self, push: Arc<dyn PushSink>) -> Self {
        self.service.push = push;
        self
    }

    /// The service.
    pub fn build(self) -> ChatService {
        self.service
    }
}

/// The answer when the cluster registry (Redis) could not be reached.
pub fn registry_unavailable() -> ProtocolError {
    ProtocolError::new(
        ErrorCode::Internal,
        "the cluster registry is unavailable; retry",
    )
}

impl ChatService {
    /// Takes one of `user`'s tokens for `limit`, or refuses with `rate_limited`
    /// and how long until the next token (nothing was done).
    fn within_rate(&self, kind: Rated, user: &str) -> Result<(), ProtocolError> {
        let (limiter, what, rate, limit) = match kind {
            Rated::Send => (
                &self.send_rate,
                "sends",
                self.limits.send_rate,
                LimitHit::SendRate,
            ),
            Rated::GroupChange => (
                &self.group_change_rate,
                "group changes",
                self.limits.group_change_rate,
                LimitHit::GroupChangeRate,
            ),
        };
        limiter.take(user, self.clock.now_ms()).map_err(|wait_ms| {
            self.metrics.count_limit_hit(limit);
            ProtocolError::new(
                ErrorCode::RateLimited,
                format!(
                    "too many {what}: at most {} per second ({} at once); nothing was done, retry in {wait_ms} ms",
                    rate.per_sec, rate.burst
                ),
            )
            .retry_after(wait_ms)
        })
    }
}

/// What a per-user rate limit applies to.
#[derive(Debug, Clone, Copy)]
enum Rated {
    /// `send`.
    Send,
    /// `create_group`, `add_members`, `remove_members`, `leave`.
    GroupChange,
}

/// How long an upload refused for want of a place is told to wait.
pub const UPLOADS_FULL_RETRY_MS: u64 = 1_000;

impl ChatService {
    /// A place for one image upload, held until the returned permit drops; refused
    /// with `overloaded` and a wait when `--uploads-max` are in progress.
    pub fn upload_place(&self) -> Result<tokio::sync::OwnedSemaphorePermit, ProtocolError> {
        Arc::clone(&self.uploads).try_acquire_owned().map_err(|_| {
            self.metrics.count_limit_hit(LimitHit::Uploads);
            ProtocolError::new(
                ErrorCode::Overloaded,
                format!(
                    "{} image uploads are in progress, the most this server takes at once \
                     (--uploads-max); nothing was kept, retry",
                    self.limits.uploads_max
                ),
            )
            .retry_after(UPLOADS_FULL_RETRY_MS)
        })
    }
}

fn reject(err: StoreError) -> ProtocolError {
    match err {
        StoreError::Rejected(e) => e,
        StoreError::Backend(why) => {
            // One line per interval: during an outage every send and retry fails alike.
            crate::error_throttled!(%why, "store failure");
            ProtocolError::new(
                ErrorCode::Internal,
                "storage failure; nothing was acknowledged, retry",
            )
        }
    }
}

impl ChatService {
    /// Limits.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Wall time.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// Milliseconds since the service was built, on the monotonic clock: what
    /// timeouts count on.
    pub fn monotonic_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Durable storage.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Devices connected to this server.
    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    /// Token verification.
    pub fn tokens(&self) -> &TokenKey {
        &self.tokens
    }

    /// Registry and routing to other servers; `None` on one node.
    pub fn fabric(&self) -> Option<&Arc<dyn Fabric>> {
        self.fabric.as_ref()
    }

    /// Devices on the long-polling fallback.
    pub fn mailboxes(&self) -> &crate::mailbox::Mailboxes<DeviceFeed> {
        &self.mailboxes
    }

    /// Image storage; `None` where images are not served.
    pub fn media(&self) -> Option<&Arc<dyn BlobStore>> {
        self.media.as_ref()
    }

    /// Runs one request of an authenticated device (any but `hello`), for every transport.
    ///
    /// A request that changes state runs to its end even when the caller stops
    /// waiting for it (an HTTP connection closed mid-request, a session ended): what
    /// it committed is always followed by what it publishes (fan-out, receipts,
    /// membership events). Without this, an ack whose cursor was stored but whose
    /// receipt was never sent could not be repaired by retrying it (the retry moves
    /// nothing, so sends nothing).
    pub async fn dispatch(
        self: Arc<Self>,
        caller: &Caller,
        request: Request,
    ) -> Result<Reply, ProtocolError> {
        if !request.changes_state() {
            return self.run(caller, request).await;
        }
        let caller = caller.clone();
        match tokio::spawn(async move { self.run(&caller, request).await }).await {
            Ok(reply) => reply,
            Err(e) => {
                assert!(!e.is_panic(), "a request panicked: {e}");
                Err(ProtocolError::new(
                    ErrorCode::Internal,
                    "the request was cut short by the server shutting down; retry",
                ))
            }
        }
    }

    /// [`ChatService::dispatch`], cancelled with its caller.
    async fn run(
        self: Arc<Self>,
        caller: &Caller,
        request: Request,
    ) -> Result<Reply, ProtocolError> {
        match request {
            Request::Hello(_) => Err(ProtocolError::new(
                ErrorCode::BadRequest,
                "hello opens a WebSocket session; HTTP requests authenticate with a bearer token",
            )),
            Request::OpenDirect(r) => self.open_direct(caller, &r.peer).await,
            Request::CreateGroup(r) => self.create_group(caller, r.conv, r.members).await,
            Request::AddMembers(r) => {
                self.change_members(caller, &r.conv, GroupChange::Add(r.users))
                    .await
            }
            Request::RemoveMembers(r) => {
                self.change_members(caller, &r.conv, GroupChange::Remove(r.users))
                    .await
            }
            Request::Leave(r) => {
                self.change_members(caller, &r.conv, GroupChange::Leave)
                    .await
            }
            Request::Send(r) => self.send(caller, r).await,
            Request::Ack(r) => self.ack(caller, r).await,
            Request::Sync(r) => self.sync(caller, r).await,
            Request::History(r) => self.history(caller, r).await,
            Request::Presence(r) => self.presence_request(caller, r).await,
            Request::Conversations(_) => {
                let states = self.conversations(caller).await?;
                Ok(Reply::Conversations {
                    conversations: Self::summaries(caller, &states),
                })
            }
            Request::Ping => Ok(Reply::Pong {
                server_time_ms: self.clock.now_ms(),
            }),
        }
    }
}
