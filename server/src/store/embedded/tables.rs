//! redb table layout of the embedded store.

use redb::TableDefinition;

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
/// Store bookkeeping: `"reopened"` → how many times the store reopened after an I/O error.
pub const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
