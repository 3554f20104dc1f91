//! The tables a [`super::SharedStore`] keeps, as the operations it needs of them.
//!
//! The Scylla/Cassandra backend implements them with CQL (`store/scylla/`); the
//! in-memory backend ([`super::memory::MemTables`]) implements the same
//! semantics for tests and, behind a simulated network, for the simulator.
//! Every write is idempotent except the two conditional writes on the head.

use async_trait::async_trait;

use crate::domain::Cursor;
use crate::store::StoreError;

/// A conversation's row: membership, the sequencer, and the newest entry.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HeadRow {
    /// JSON of the [`crate::domain::ConvRecord`].
    pub record: String,
    /// Highest seq sequenced.
    pub last_seq: u64,
    /// Server time of `last_seq`, ms.
    pub last_time_ms: u64,
    /// JSON array of the entries the last conditional write added (one or
    /// more, consecutive, ending with `last_seq`).
    pub entries: String,
    /// The first of `entries` opens a new time bucket.
    pub new_bucket: bool,
}

/// Which cell of a cursor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum CursorCell {
    /// Delivered-up-to.
    Delivered,
    /// Read-up-to.
    Read,
}

/// The operations of the shared tables.
#[async_trait]
pub trait Tables: Send + Sync + 'static {
    /// The head row of `conv`.
    async fn head(&self, conv: &str) -> Result<Option<HeadRow>, StoreError>;

    /// Conditional write: creates the head row unless one exists; true if it did.
    async fn insert_head(&self, conv: &str, row: &HeadRow) -> Result<bool, StoreError>;

    /// Conditional write: replaces the head row if its `last_seq` is
    /// `expected_last_seq`; true if it did.
    async fn advance_head(
        &self,
        conv: &str,
        expected_last_seq: u64,
        row: &HeadRow,
    ) -> Result<bool, StoreError>;

    /// Upserts an entry (JSON) at `(conv, bucket, seq)`.
    async fn put_entry(
        &self,
        conv: &str,
        bucket: i32,
        seq: u64,
        entry: &str,
    ) -> Result<(), StoreError>;

    /// Upserts a conversation's bucket with its first seq.
    async fn put_bucket(&self, conv: &str, bucket: i32, first_seq: u64) -> Result<(), StoreError>;

    /// Upserts the idempotency index row of a message.
    async fn put_message_id(
        &self,
        conv: &str,
        sender: &str,
        message_id: &str,
        seq: u64,
    ) -> Result<(), StoreError>;

    /// Upserts "`user` is or was in `conv`".
    async fn put_user_conv(&self, user: &str, conv: &str) -> Result<(), StoreError>;

    /// The buckets of `conv` as `(bucket, first_seq)`, ascending.
    async fn buckets(&self, conv: &str) -> Result<Vec<(i32, u64)>, StoreError>;

    /// Entries (JSON) of one bucket with `after < seq <= until`, ascending, at most `limit`.
    async fn entries_after(
        &self,
        conv: &str,
        bucket: i32,
        after: u64,
        until: u64,
        limit: u32,
    ) -> Result<Vec<String>, StoreError>;

    /// Entries (JSON) of one bucket with `seq < before`, descending, at most `limit`.
    async fn entries_before(
        &self,
        conv: &str,
        bucket: i32,
        before: u64,
        limit: u32,
    ) -> Result<Vec<String>, StoreError>;

    /// The seq a message id was given.
    async fn message_id(
        &self,
        conv: &str,
        sender: &str,
        message_id: &str,
    ) -> Result<Option<u64>, StoreError>;

    /// The conversations `user` is or was in.
    async fn user_convs(&self, user: &str) -> Result<Vec<String>, StoreError>;

    /// A device's cursor in `conv`, if it ever acked.
    async fn device_cursor(
        &self,
        user: &str,
        device: &str,
        conv: &str,
    ) -> Result<Option<Cursor>, StoreError>;

    /// Max-register write of one cell of a device's cursor: it never decreases.
    async fn raise_device_cursor(
        &self,
        user: &str,
        device: &str,
        conv: &str,
        cell: CursorCell,
        value: u64,
    ) -> Result<(), StoreError>;

    /// A user's cursor (maximum over devices) in `conv`.
    async fn user_cursor(&self, conv: &str, user: &str) -> Result<Cursor, StoreError>;

    /// Every user cursor of `conv`.
    async fn user_cursors(&self, conv: &str) -> Result<Vec<(String, Cursor)>, StoreError>;

    /// Max-register write of one cell of a user's cursor.
    async fn raise_user_cursor(
        &self,
        conv: &str,
        user: &str,
        cell: CursorCell,
        value: u64,
    ) -> Result<(), StoreError>;

    /// Max-register write of a user's last-seen time (ms).
    async fn raise_last_seen(&self, user: &str, at_ms: u64) -> Result<(), StoreError>;

    /// A user's last-seen time (ms), if ever recorded.
    async fn last_seen(&self, user: &str) -> Result<Option<u64>, StoreError>;
}
