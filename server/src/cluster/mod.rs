//! Scale-out: what one chat server tells the others, and learns from them.
//!
//! A [`Fabric`] keeps the connection registry (which server holds which
//! device) and carries live events to the servers holding their recipients.
//! It is an accelerator, never the source of truth: an event it loses only
//! delays delivery, because every device stream fills gaps from the store, and
//! after any interruption of the fabric each local session re-reads its
//! conversations (see [`crate::hub::Push::Resync`]).

pub mod fabric;
pub mod outbox;
pub mod registry;

use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::hub::{Framed, Hub, Push};
use crate::protocol::{Entry, PresenceState, Receipt, ServerFrame};

/// Why the fabric could not do something.
#[derive(Debug, Clone, thiserror::Error)]
#[error("cluster fabric: {0}")]
pub struct FabricError(pub String);

/// A live event for devices on other servers.
#[derive(Debug, Clone)]
pub enum Routed {
    /// A newly sequenced (or re-sent) entry.
    Entry(Arc<Entry>),
    /// A receipt.
    Receipt(Arc<Receipt>),
    /// A user's presence changed.
    Presence(Arc<PresenceState>),
}

/// What [`Fabric::forward`] learned while routing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Forwarded {
    /// Users among the recipients with no device connected to any live server
    /// (this one included): candidates for a push notification.
    pub unplaced: Vec<String>,
}

/// The connection registry and cross-server routing.
#[async_trait]
pub trait Fabric: Send + Sync + 'static {
    /// This server's id in the registry.
    fn server_id(&self) -> &str;

    /// Records that `device` of `user` is connected here, beside any connection it
    /// still has to another server (both are routed to until each is forgotten).
    /// Returns once other servers will route to it, so a session registers before
    /// it reads the store. After an error the registration may still have
    /// landed: call [`Fabric::device_disconnected`] all the same.
    async fn device_connected(&self, user: &str, device: &str) -> Result<(), FabricError>;

    /// Forgets the device's connection to this server (never one it has to another
    /// server meanwhile, nor a later connection to this one); returns once the
    /// registry no longer lists it, retrying while the registry is unreachable
    /// (within a bound, past which the entry stays until this process ends).
    /// Await the [`LateSweep`] it returns afterwards.
    async fn device_disconnected(&self, user: &str, device: &str) -> LateSweep;

    /// Sends `event` to the devices of `users` connected to other servers;
    /// returns once the router accepted it, or an error after a bounded wait.
    ///
    /// Once accepted, a receiving server either gets the event or notices that
    /// it may have missed events and resyncs its sessions.
    async fn forward(&self, users: Arc<[String]>, event: Routed) -> Result<Forwarded, FabricError>;

    /// For each of `users` (same order): has it a device connected to a live server?
    async fn online_users(&self, users: &[String]) -> Result<Vec<bool>, FabricError>;

    /// Subscribes `watcher` to the presence changes of `targets` (for a day,
    /// renewed by every call).
    async fn watch(&self, watcher: &str, targets: &[String]) -> Result<(), FabricError>;

    /// The users subscribed to the presence changes of `target`.
    async fn watchers(&self, target: &str) -> Result<Vec<String>, FabricError>;

    /// Whether the router answers now (for `/healthz`); by default it does.
    async fn health(&self) -> Result<(), FabricError> {
        Ok(())
    }

    /// Leaves the cluster at a clean shutdown with nothing left unrouted, so that
    /// peers do not count this process as dead (and resync). Best effort; by
    /// default a no-op (the lease then lapses like a crash).
    async fn leave(&self) {}
}

/// The second half of forgetting a connection: a while after the delete, deletes
/// again what a registration write of that connection left if it reached the
/// registry late (a delayed or retried command applied after the delete).
/// Resolves to true if it deleted something: the user's presence must then be
/// published again.
pub type LateSweep = std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send>>;

/// How long an explicit presence subscription lasts unless renewed.
pub const WATCH_TTL: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// After the fabric may have lost events for this server's devices (its link to
/// the router dropped, or the router restarted): tells every local session to
/// re-read its conversations. Returns how many sessions were told.
///
/// Call it only once the device registrations are restored, so that what is
/// routed from then on arrives and what was lost before is in the store.
pub fn resync_sessions(hub: &Hub) -> usize {
    if crate::mutants::active(crate::mutants::Mutant::DropPendingOnRouterLoss) {
        return 0;
    }
    hub.publish_everyone(&Push::Resync)
}

/// What travels between servers: the recipients on the receiving server and the event.
#[derive(Debug, Serialize, Deserialize)]
pub struct Envelope {
    /// Users whose devices on the receiving server get the event.
    pub users: Vec<String>,
    /// An entry, for `msg` frames.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entry: Option<Entry>,
    /// A receipt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub receipt: Option<Receipt>,
    /// A presence change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub presence: Option<PresenceState>,
}

impl Envelope {
    /// Wraps `event` for `users`.
    pub fn new(users: Vec<String>, event: &Routed) -> Self {
        let mut envelope = Self {
            users,
            entry: None,
            receipt: None,
            presence: None,
        };
        match event {
            Routed::Entry(entry) => envelope.entry = Some(Entry::clone(entry)),
            Routed::Receipt(receipt) => envelope.receipt = Some(Receipt::clone(receipt)),
            Routed::Presence(state) => envelope.presence = Some(PresenceState::clone(state)),
        }
        envelope
    }

    /// Hands the event to the local devices of its users; returns how many got it.
    pub fn deliver(self, hub: &Hub) -> usize {
        let push = match (self.entry, self.receipt, self.presence) {
            (Some(entry), _, _) => {
                let entry = Arc::new(entry);
                let frame = Utf8Bytes::from(ServerFrame::Msg(Arc::clone(&entry)).to_json());
                Push::Entry(Framed::new(entry, frame))
            }
            (None, Some(receipt), _) => {
                let frame = Utf8Bytes::from(ServerFrame::Receipt(receipt.clone()).to_json());
                Push::Receipt(Framed::new(Arc::new(receipt), frame))
            }
            (None, None, Some(state)) => {
                let admitted = hub.admit_presence(&[Arc::new(state)]);
                if admitted.is_empty() {
                    return 0;
                }
                Push::Presence(admitted.into())
            }
            (None, None, None) => return 0,
        };
        hub.publish(&self.users, &push)
    }
}
