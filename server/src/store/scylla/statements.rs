//! Every CQL statement the Scylla backend runs, prepared once per session.
//!
//! Prepared statements let the driver route each request to a replica that owns
//! its partition (token-aware routing). Plain reads and upserts are marked
//! idempotent so the driver may retry them; the lightweight transactions are not.

use scylla::client::session::Session;
use scylla::errors::PrepareError;
use scylla::statement::prepared::PreparedStatement;

/// The prepared statements of one keyspace.
pub struct Statements {
    /// `conversations` row by conv.
    pub select_head: PreparedStatement,
    /// LWT: a new conversation with its `create` entry as the head.
    pub insert_conv: PreparedStatement,
    /// LWT: the next entry as the head (`IF last_seq = ?`).
    pub advance_head: PreparedStatement,
    /// Roll-forward: the entry into its bucket.
    pub insert_entry: PreparedStatement,
    /// Roll-forward: a conversation's new bucket.
    pub insert_bucket: PreparedStatement,
    /// Roll-forward: the idempotency index of a text entry.
    pub insert_message_id: PreparedStatement,
    /// Roll-forward: a member's conversation list.
    pub insert_user_conv: PreparedStatement,
    /// The buckets of a conversation, ascending.
    pub select_buckets: PreparedStatement,
    /// Entries of one bucket with `after < seq <= until`, ascending.
    pub select_entries_after: PreparedStatement,
    /// Entries of one bucket with `seq < before`, descending.
    pub select_entries_before: PreparedStatement,
    /// The seq a message id was given.
    pub select_message_id: PreparedStatement,
    /// The conversations of a user.
    pub select_user_convs: PreparedStatement,
    /// A device's cursor in one conversation.
    pub select_device_cursor: PreparedStatement,
    /// Max-register write of a device's delivered cursor.
    pub write_device_delivered: PreparedStatement,
    /// Max-register write of a device's read cursor.
    pub write_device_read: PreparedStatement,
    /// A user's cursor in one conversation.
    pub select_user_cursor: PreparedStatement,
    /// Every user cursor of a conversation.
    pub select_user_cursors: PreparedStatement,
    /// Max-register write of a user's delivered cursor.
    pub write_user_delivered: PreparedStatement,
    /// Max-register write of a user's read cursor.
    pub write_user_read: PreparedStatement,
    /// A user's last-seen time.
    pub select_last_seen: PreparedStatement,
    /// Max-register write of a user's last-seen time.
    pub write_last_seen: PreparedStatement,
}

impl Statements {
    /// Prepares every statement against `keyspace`.
    pub async fn prepare(session: &Session, keyspace: &str) -> Result<Self, PrepareError> {
        let ks = keyspace;
        let idempotent = |mut s: PreparedStatement| {
            s.set_is_idempotent(true);
            s
        };
        macro_rules! prep {
            ($cql:expr) => {
                idempotent(session.prepare(format!($cql)).await?)
            };
            (lwt $cql:expr) => {
                session.prepare(format!($cql)).await?
            };
        }
        Ok(Self {
            select_head: prep!("SELECT record, last_seq, last_time_ms, head_entries, head_new_bucket FROM {ks}.conversations WHERE conv = ?"),
            insert_conv: prep!(lwt "INSERT INTO {ks}.conversations (conv, record, last_seq, last_time_ms, head_entries, head_new_bucket) VALUES (?, ?, ?, ?, ?, ?) IF NOT EXISTS"),
            advance_head: prep!(lwt "UPDATE {ks}.conversations SET record = ?, last_seq = ?, last_time_ms = ?, head_entries = ?, head_new_bucket = ? WHERE conv = ? IF last_seq = ?"),
            insert_entry: prep!("INSERT INTO {ks}.conv_entries (conv, bucket, seq, entry) VALUES (?, ?, ?, ?) USING TTL ?"),
            insert_bucket: prep!("INSERT INTO {ks}.conv_buckets (conv, bucket, first_seq) VALUES (?, ?, ?) USING TTL ?"),
            insert_message_id: prep!("INSERT INTO {ks}.message_ids (conv, sender, message_id, seq) VALUES (?, ?, ?, ?) USING TTL ?"),
            insert_user_conv: prep!("INSERT INTO {ks}.user_convs (user_id, conv) VALUES (?, ?)"),
            select_buckets: prep!("SELECT bucket, first_seq FROM {ks}.conv_buckets WHERE conv = ?"),
            select_entries_after: prep!("SELECT entry FROM {ks}.conv_entries WHERE conv = ? AND bucket = ? AND seq > ? AND seq <= ? LIMIT ?"),
            select_entries_before: prep!("SELECT entry FROM {ks}.conv_entries WHERE conv = ? AND bucket = ? AND seq < ? ORDER BY seq DESC LIMIT ?"),
            select_message_id: prep!("SELECT seq FROM {ks}.message_ids WHERE conv = ? AND sender = ? AND message_id = ?"),
            select_user_convs: prep!("SELECT conv FROM {ks}.user_convs WHERE user_id = ?"),
            select_device_cursor: prep!("SELECT delivered_seq, read_seq FROM {ks}.device_cursors WHERE user_id = ? AND device = ? AND conv = ?"),
            write_device_delivered: prep!("UPDATE {ks}.device_cursors USING TIMESTAMP ? SET delivered_seq = ? WHERE user_id = ? AND device = ? AND conv = ?"),
            write_device_read: prep!("UPDATE {ks}.device_cursors USING TIMESTAMP ? SET read_seq = ? WHERE user_id = ? AND device = ? AND conv = ?"),
            select_user_cursor: prep!("SELECT delivered_seq, read_seq FROM {ks}.user_cursors WHERE conv = ? AND user_id = ?"),
            select_user_cursors: prep!("SELECT user_id, delivered_seq, read_seq FROM {ks}.user_cursors WHERE conv = ?"),
            write_user_delivered: prep!("UPDATE {ks}.user_cursors USING TIMESTAMP ? SET delivered_seq = ? WHERE conv = ? AND user_id = ?"),
            write_user_read: prep!("UPDATE {ks}.user_cursors USING TIMESTAMP ? SET read_seq = ? WHERE conv = ? AND user_id = ?"),
            select_last_seen: prep!("SELECT seen_ms FROM {ks}.last_seen WHERE user_id = ?"),
            write_last_seen: prep!("UPDATE {ks}.last_seen USING TIMESTAMP ? SET seen_ms = ? WHERE user_id = ?"),
        })
    }
}
