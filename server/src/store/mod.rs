//! The storage trait every backend implements (embedded redb now; Scylla and the
//! simulator's crash-modelling store later), and the values it trades in.
//!
//! A backend is the source of truth for order: it assigns each conversation's
//! seqs atomically with the write, so a seq exists only if its entry is durable.

pub mod embedded;
#[cfg(not(madsim))]
pub mod scylla;
pub mod shared;

use std::sync::Arc;

use async_trait::async_trait;

use crate::domain::{ConvRecord, Cursor, GroupChange};
use crate::protocol::{Body, Entry, ProtocolError};

/// Why a store call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The request breaks a rule; nothing was written.
    #[error(transparent)]
    Rejected(#[from] ProtocolError),
    /// The backend failed; nothing was acknowledged, and the write may or may not be durable.
    #[error("storage failure: {0}")]
    Backend(String),
}

/// A message to sequence.
#[derive(Debug, Clone)]
pub struct NewMessage {
    /// The conversation.
    pub conv: String,
    /// The sending user (must be a current member).
    pub sender: String,
    /// The sending device.
    pub sender_device: String,
    /// Client-chosen id; with `conv` and `sender` the idempotency key.
    pub message_id: String,
    /// The content.
    pub body: Body,
}

impl NewMessage {
    /// The message as the entry at `seq`, sequenced at `server_time_ms`.
    pub fn entry_at(&self, seq: u64, server_time_ms: u64) -> Entry {
        Entry {
            conv: self.conv.clone(),
            seq,
            message_id: self.message_id.clone(),
            sender: self.sender.clone(),
            sender_device: self.sender_device.clone(),
            server_time_ms,
            body: self.body.clone(),
        }
    }
}

/// The outcome of sequencing an entry.
#[derive(Debug, Clone)]
pub struct Appended {
    /// The durable entry.
    pub entry: Arc<Entry>,
    /// True when `message_id` was seen before: `entry` is the original, nothing new was written.
    pub duplicate: bool,
    /// Users whose devices must receive the entry.
    pub recipients: Arc<[String]>,
}

/// A conversation with its current last seq.
#[derive(Debug, Clone)]
pub struct ConvState {
    /// Membership and ownership.
    pub record: ConvRecord,
    /// Highest seq sequenced.
    pub last_seq: u64,
}

/// The result of an ack.
#[derive(Debug, Clone)]
pub struct CursorUpdate {
    /// The acking device's cursor before the ack.
    pub device_before: Cursor,
    /// The acking device's cursor after the ack.
    pub device: Cursor,
    /// The user's cursor (over all devices) before the ack.
    pub user_before: Cursor,
    /// The user's cursor after the ack.
    pub user_after: Cursor,
    /// Groups: the minimum cursor over current members.
    pub all_members: Option<Cursor>,
}

/// Durable storage of conversations, entries and cursors.
///
/// Every write method returns only after its effect is durable; a failed call
/// has no visible effect unless it reports `Backend`.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Finds or creates the direct conversation between `opener` and `peer`.
    /// A creation also sequences the `create` entry (seq 1), returned as `Some`.
    async fn open_direct(
        &self,
        opener: &str,
        device: &str,
        peer: &str,
        now_ms: u64,
    ) -> Result<(ConvState, Option<Appended>), StoreError>;

    /// Creates group `conv` (or returns it if `owner` already created it).
    async fn create_group(
        &self,
        conv: &str,
        owner: &str,
        device: &str,
        members: Vec<String>,
        members_max: usize,
        now_ms: u64,
    ) -> Result<(ConvState, Option<Appended>), StoreError>;

    /// Applies a membership change as the next entry of `conv`.
    async fn change_members(
        &self,
        conv: &str,
        by: &str,
        device: &str,
        change: GroupChange,
        members_max: usize,
        now_ms: u64,
    ) -> Result<Appended, StoreError>;

    /// Sequences a message, or returns the original for a repeated `message_id`.
    async fn append(&self, message: NewMessage, now_ms: u64) -> Result<Appended, StoreError>;

    /// Advances a device's cursor (and so its user's) in `conv`.
    async fn ack(
        &self,
        conv: &str,
        user: &str,
        device: &str,
        delivered: Option<u64>,
        read: Option<u64>,
    ) -> Result<CursorUpdate, StoreError>;

    /// One conversation, if it exists.
    async fn conversation(&self, conv: &str) -> Result<Option<ConvState>, StoreError>;

    /// Every conversation `user` is or was a member of.
    async fn conversations_of(&self, user: &str) -> Result<Vec<ConvState>, StoreError>;

    /// The ids of the conversations `user` is or was a member of, as
    /// [`Store::conversations_of`] lists them, without reading the conversations.
    async fn conversation_ids_of(&self, user: &str) -> Result<Vec<String>, StoreError>;

    /// Up to `limit` entries with `after < seq <= until`, ascending.
    async fn read_after(
        &self,
        conv: &str,
        after: u64,
        until: u64,
        limit: u32,
    ) -> Result<Vec<Entry>, StoreError>;

    /// Up to `limit` entries with `seq < before`, the newest of them, ascending.
    async fn read_before(
        &self,
        conv: &str,
        before: u64,
        limit: u32,
    ) -> Result<Vec<Entry>, StoreError>;

    /// Senders of the entries with `after < seq <= until`, at most `limit` entries scanned.
    async fn senders_between(
        &self,
        conv: &str,
        after: u64,
        until: u64,
        limit: u32,
    ) -> Result<Vec<String>, StoreError> {
        let entries = self.read_after(conv, after, until, limit).await?;
        let mut senders: Vec<String> = entries.into_iter().map(|e| e.sender).collect();
        senders.sort();
        senders.dedup();
        Ok(senders)
    }

    /// The cursor a device last acknowledged in `conv`.
    async fn device_cursor(
        &self,
        user: &str,
        device: &str,
        conv: &str,
    ) -> Result<Option<Cursor>, StoreError>;

    /// `user`'s cursor over all devices in `conv` (zero if never acknowledged): at least
    /// every receipt published for it before the call.
    async fn user_cursor(&self, conv: &str, user: &str) -> Result<Cursor, StoreError>;

    /// Every user's cursor in `conv` (users who never acknowledged are left out), in
    /// no particular order: at least every receipt published before the call.
    async fn user_cursors(&self, conv: &str) -> Result<Vec<(String, Cursor)>, StoreError>;

    /// Raises `user`'s last-seen time to `at_ms` (never lowers it); durable on return.
    async fn record_last_seen(&self, user: &str, at_ms: u64) -> Result<(), StoreError>;

    /// The last-seen time of each of `users`, in the same order; `None` if never seen.
    async fn last_seen(&self, users: &[String]) -> Result<Vec<Option<u64>>, StoreError>;

    /// Whether the store can take writes now (`Err` says why not). A store that
    /// can recover by itself may use the call to try.
    async fn health(&self) -> Result<(), String> {
        Ok(())
    }

    /// Deletes up to `budget` entries older than `cutoff_ms`; returns how many.
    async fn expire_before(&self, cutoff_ms: u64, budget: u32) -> Result<u64, StoreError>;
}
