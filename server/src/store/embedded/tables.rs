//! redb table layout of the embedded store.

use redb::{Table, TableDefinition, WriteTransaction};

use super::backend;
use crate::store::StoreError;

/// `(conv, seq)` → JSON of the [`crate::protocol::Entry`].
pub const ENTRIES: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("entries");
/// `conv` → `(last_seq, last_server_time_ms)`.
pub const SEQS: TableDefinition<&str, (u64, u64)> = TableDefinition::new("seqs");
/// `conv` → JSON of the [`crate::domain::ConvRecord`].
pub const CONVS: TableDefinition<&str, &[u8]> = TableDefinition::new("convs");
/// `(user, conv)` → `()`: the conversations a user is or was in.
pub const USER_CONVS: TableDefinition<(&str, &str), ()> = TableDefinition::new("user_convs");
/// `(conv, sender, message_id)` → seq: the idempotency index.
pub const MESSAGE_IDS: TableDefinition<(&str, &str, &str), u64> =
    TableDefinition::new("message_ids");
/// `(user, device, conv)` → `(delivered, read)`.
pub const DEVICE_CURSORS: TableDefinition<(&str, &str, &str), (u64, u64)> =
    TableDefinition::new("device_cursors");
/// `user` → last seen, ms since the Unix epoch (only ever raised).
pub const LAST_SEEN: TableDefinition<&str, u64> = TableDefinition::new("last_seen");
/// `(conv, user)` → `(delivered, read)`: the maximum over the user's devices.
pub const USER_CURSORS: TableDefinition<(&str, &str), (u64, u64)> =
    TableDefinition::new("user_cursors");
/// Store bookkeeping: `"reopened"` → how many times the store reopened after an I/O
/// error; `"journal_applied"` → the last journal LSN the tables hold durably.
pub const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// The main database's tables, open in one write transaction: what a
/// [`super::journal::Redo`] record changes.
pub struct Tables<'t> {
    /// See [`ENTRIES`].
    pub entries: Table<'t, (&'static str, u64), &'static [u8]>,
    /// See [`SEQS`].
    pub seqs: Table<'t, &'static str, (u64, u64)>,
    /// See [`CONVS`].
    pub convs: Table<'t, &'static str, &'static [u8]>,
    /// See [`USER_CONVS`].
    pub user_convs: Table<'t, (&'static str, &'static str), ()>,
    /// See [`MESSAGE_IDS`].
    pub message_ids: Table<'t, (&'static str, &'static str, &'static str), u64>,
    /// See [`DEVICE_CURSORS`].
    pub device_cursors: Table<'t, (&'static str, &'static str, &'static str), (u64, u64)>,
    /// See [`USER_CURSORS`].
    pub user_cursors: Table<'t, (&'static str, &'static str), (u64, u64)>,
    /// See [`LAST_SEEN`].
    pub last_seen: Table<'t, &'static str, u64>,
}

impl<'t> Tables<'t> {
    /// Opens every table in `txn`.
    pub fn open(txn: &'t WriteTransaction) -> Result<Self, StoreError> {
        Ok(Self {
            entries: txn.open_table(ENTRIES).map_err(backend)?,
            seqs: txn.open_table(SEQS).map_err(backend)?,
            convs: txn.open_table(CONVS).map_err(backend)?,
            user_convs: txn.open_table(USER_CONVS).map_err(backend)?,
            message_ids: txn.open_table(MESSAGE_IDS).map_err(backend)?,
            device_cursors: txn.open_table(DEVICE_CURSORS).map_err(backend)?,
            user_cursors: txn.open_table(USER_CURSORS).map_err(backend)?,
            last_seen: txn.open_table(LAST_SEEN).map_err(backend)?,
        })
    }
}
