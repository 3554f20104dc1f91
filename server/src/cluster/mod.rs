//! Scale-out: what one chat server tells the others, and learns from them.
//!
//! A [`Fabric`] keeps the connection registry (which server holds which
//! device) and carries live events to the servers holding their recipients.
//! It is an accelerator, never the source of truth: an event it loses only
//! delays delivery, because every device stream fills gaps from the store, and
//! after any interruption of the fabric each local session re-reads its
//! conversations (see [`crate::hub::Push::Resync`]).

#[cfg(not(madsim))]
pub mod redis;

use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::hub::{Hub, Push};
use crate::protocol::{Entry, ServerFrame};

/// Why the fabric could not do something.
#[derive(Debug, Clone, thiserror::Error)]
#[error("cluster fabric: {0}")]
pub struct FabricError(pub String);

/// A live event for devices on other servers.
#[derive(Debug, Clone)]
pub enum Routed {
    /// A newly sequenced (or re-sent) entry.
    Entry(Arc<Entry>),
    /// Any other server frame (receipts), already serialized.
    Frame(Utf8Bytes),
}

/// The connection registry and cross-server routing.
#[async_trait]
pub trait Fabric: Send + Sync + 'static {
    /// This server's id in the registry.
    fn server_id(&self) -> &str;

    /// Records that `device` of `user` is connected here. Returns once other
    /// servers will route to it, so a session registers before it reads the store.
    async fn device_connected(&self, user: &str, device: &str) -> Result<(), FabricError>;

    /// Forgets the device (only if it is still recorded as connected here); best effort.
    fn device_disconnected(&self, user: &str, device: &str);

    /// Sends `event` to the devices of `users` connected to other servers and
    /// returns once it is handed over (or given up on, after a bounded wait).
    /// Best effort: a lost event is filled from the store later.
    async fn forward(&self, users: Arc<[String]>, event: Routed);
}

/// What travels between servers: the recipients on the receiving server and the event.
#[derive(Debug, Serialize, Deserialize)]
pub struct Envelope {
    /// Users whose devices on the receiving server get the event.
    pub users: Vec<String>,
    /// An entry, for `msg` frames.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entry: Option<Entry>,
    /// A pre-serialized frame, for everything else.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frame: Option<String>,
}

impl Envelope {
    /// Wraps `event` for `users`.
    pub fn new(users: Vec<String>, event: &Routed) -> Self {
        match event {
            Routed::Entry(entry) => Self {
                users,
                entry: Some(Entry::clone(entry)),
                frame: None,
            },
            Routed::Frame(frame) => Self {
                users,
                entry: None,
                frame: Some(frame.as_str().to_owned()),
            },
        }
    }

    /// Hands the event to the local devices of its users; returns how many got it.
    pub fn deliver(self, hub: &Hub) -> usize {
        let push = match (self.entry, self.frame) {
            (Some(entry), _) => {
                let entry = Arc::new(entry);
                let frame = Utf8Bytes::from(ServerFrame::Msg(Arc::clone(&entry)).to_json());
                Push::Entry(entry, frame)
            }
            (None, Some(frame)) => Push::Frame(Utf8Bytes::from(frame)),
            (None, None) => return 0,
        };
        hub.publish(&self.users, &push)
    }
}
