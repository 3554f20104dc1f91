//! The tables a [`super::SharedStore`] keeps, as the operations it needs of them.
//!
//! Each operation is declared once, as a variant of [`TableOp`] with owned
//! arguments, answered by a [`TableReply`]. A backend implements one method,
//! [`Tables::call`]: the Scylla/Cassandra backend in CQL (`store/scylla/`), the
//! in-memory backend ([`super::memory::MemTables`]) with the same semantics for
//! tests, and the simulator forwards the op unchanged over its network. Callers
//! use the typed methods of [`TablesExt`], written once for every backend, which
//! turn a reply of the wrong kind into a [`StoreError`].
//!
//! Adding an operation: its variant here (and its reply, if new), its typed
//! method in [`TablesExt`], and one match arm in each backend.
//!
//! Every write is idempotent except the two conditional writes on the head.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::domain::Cursor;
use crate::store::StoreError;

/// A conversation's row: membership, the sequencer, and the newest entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CursorCell {
    /// Delivered-up-to.
    Delivered,
    /// Read-up-to.
    Read,
}

/// One operation of the shared tables; the reply each expects is named in its doc.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TableOp {
    /// The head row of `conv` ([`TableReply::Head`]).
    Head { conv: String },
    /// Conditional write: creates the head row unless one exists; applied if it
    /// did ([`TableReply::Applied`]).
    InsertHead { conv: String, row: HeadRow },
    /// Conditional write: replaces the head row if its `last_seq` is
    /// `expected_last_seq`; applied if it did ([`TableReply::Applied`]).
    AdvanceHead {
        conv: String,
        expected_last_seq: u64,
        row: HeadRow,
    },
    /// Upserts an entry (JSON) at `(conv, bucket, seq)` ([`TableReply::Done`]).
    PutEntry {
        conv: String,
        bucket: i32,
        seq: u64,
        entry: String,
    },
    /// Upserts a conversation's bucket with its first seq ([`TableReply::Done`]).
    PutBucket {
        conv: String,
        bucket: i32,
        first_seq: u64,
    },
    /// Upserts the idempotency index row of a message ([`TableReply::Done`]).
    PutMessageId {
        conv: String,
        sender: String,
        message_id: String,
        seq: u64,
    },
    /// Upserts "`user` is or was in `conv`" ([`TableReply::Done`]).
    PutUserConv { user: String, conv: String },
    /// The buckets of `conv` as `(bucket, first_seq)`, ascending ([`TableReply::Buckets`]).
    Buckets { conv: String },
    /// Entries (JSON) of one bucket with `after < seq <= until`, ascending, at
    /// most `limit` ([`TableReply::Entries`]).
    EntriesAfter {
        conv: String,
        bucket: i32,
        after: u64,
        until: u64,
        limit: u32,
    },
    /// Entries (JSON) of one bucket with `seq < before`, descending, at most
    /// `limit` ([`TableReply::Entries`]).
    EntriesBefore {
        conv: String,
        bucket: i32,
        before: u64,
        limit: u32,
    },
    /// The seq a message id was given ([`TableReply::Seq`]).
    MessageId {
        conv: String,
        sender: String,
        message_id: String,
    },
    /// The conversations `user` is or was in ([`TableReply::Convs`]).
    UserConvs { user: String },
    /// A device's cursor in `conv`, if it ever acked ([`TableReply::DeviceCursor`]).
    DeviceCursor {
        user: String,
        device: String,
        conv: String,
    },
    /// Max-register write of one cell of a device's cursor: it never decreases
    /// ([`TableReply::Done`]).
    RaiseDeviceCursor {
        user: String,
        device: String,
        conv: String,
        cell: CursorCell,
        value: u64,
    },
    /// A user's cursor (maximum over devices) in `conv`; zero if never raised
    /// ([`TableReply::UserCursor`]).
    UserCursor { conv: String, user: String },
    /// Every user cursor of `conv` ([`TableReply::UserCursors`]).
    UserCursors { conv: String },
    /// Max-register write of one cell of a user's cursor: it never decreases
    /// ([`TableReply::Done`]).
    RaiseUserCursor {
        conv: String,
        user: String,
        cell: CursorCell,
        value: u64,
    },
    /// Max-register write of a user's last-seen time (ms) ([`TableReply::Done`]).
    RaiseLastSeen { user: String, at_ms: u64 },
    /// A user's last-seen time (ms), if ever recorded ([`TableReply::LastSeen`]).
    LastSeen { user: String },
}

/// The answer to a [`TableOp`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TableReply {
    /// An unconditional write (upsert or max-register) is durable.
    Done,
    /// The head row, if the conversation exists.
    Head(Option<HeadRow>),
    /// Whether a conditional write applied.
    Applied(bool),
    /// A conversation's buckets as `(bucket, first_seq)`, ascending.
    Buckets(Vec<(i32, u64)>),
    /// Entries (JSON), in the order the op asked.
    Entries(Vec<String>),
    /// The seq a message id was given, if any.
    Seq(Option<u64>),
    /// A user's conversations.
    Convs(Vec<String>),
    /// A device's cursor, if it ever acked.
    DeviceCursor(Option<Cursor>),
    /// A user's cursor.
    UserCursor(Cursor),
    /// Every user cursor of a conversation.
    UserCursors(Vec<(String, Cursor)>),
    /// A user's last-seen time (ms), if ever recorded.
    LastSeen(Option<u64>),
}

/// A backend of the shared tables: runs one operation.
#[async_trait]
pub trait Tables: Send + Sync + 'static {
    /// Runs `op` and answers with the reply its doc names; a conditional write
    /// that did not apply is `Applied(false)`, not an error.
    async fn call(&self, op: TableOp) -> Result<TableReply, StoreError>;
}

/// The name of a reply variant, from its `Debug` text or its pattern's.
fn variant_name(text: &str) -> String {
    let text: String = text.split_whitespace().collect();
    let text = text.strip_prefix("TableReply::").unwrap_or(&text);
    text.split(['(', '{']).next().unwrap_or_default().to_owned()
}

/// The error for a reply of the wrong kind (a backend bug, or a confused peer).
fn unexpected(expected_pattern: &str, got: &TableReply) -> StoreError {
    let (got, expected) = (
        variant_name(&format!("{got:?}")),
        variant_name(expected_pattern),
    );
    StoreError::Backend(format!(
        "the tables answered {got} where {expected} was due"
    ))
}

/// Runs an op on `$tables` and takes the reply matching `$reply`, or fails.
macro_rules! call {
    ($tables:expr, $op:expr, $reply:pat => $out:expr) => {
        match $tables.call($op).await? {
            $reply => Ok($out),
            other => Err(unexpected(stringify!($reply), &other)),
        }
    };
}

/// The typed operations of every [`Tables`], each one [`TableOp`] (whose doc
/// says what it guarantees).
#[async_trait]
pub trait TablesExt: Tables {
    /// [`TableOp::Head`].
    async fn head(&self, conv: &str) -> Result<Option<HeadRow>, StoreError> {
        let op = TableOp::Head { conv: conv.into() };
        call!(self, op, TableReply::Head(row) => row)
    }

    /// [`TableOp::InsertHead`]: true if the row was created.
    async fn insert_head(&self, conv: &str, row: &HeadRow) -> Result<bool, StoreError> {
        let op = TableOp::InsertHead {
            conv: conv.into(),
            row: row.clone(),
        };
        call!(self, op, TableReply::Applied(applied) => applied)
    }

    /// [`TableOp::AdvanceHead`]: true if the row was replaced.
    async fn advance_head(
        &self,
        conv: &str,
        expected_last_seq: u64,
        row: &HeadRow,
    ) -> Result<bool, StoreError> {
        let op = TableOp::AdvanceHead {
            conv: conv.into(),
            expected_last_seq,
            row: row.clone(),
        };
        call!(self, op, TableReply::Applied(applied) => applied)
    }

    /// [`TableOp::PutEntry`].
    async fn put_entry(
        &self,
        conv: &str,
        bucket: i32,
        seq: u64,
        entry: &str,
    ) -> Result<(), StoreError> {
        let op = TableOp::PutEntry {
            conv: conv.into(),
            bucket,
            seq,
            entry: entry.into(),
        };
        call!(self, op, TableReply::Done => ())
    }

    /// [`TableOp::PutBucket`].
    async fn put_bucket(&self, conv: &str, bucket: i32, first_seq: u64) -> Result<(), StoreError> {
        let op = TableOp::PutBucket {
            conv: conv.into(),
            bucket,
            first_seq,
        };
        call!(self, op, TableReply::Done => ())
    }

    /// [`TableOp::PutMessageId`].
    async fn put_message_id(
        &self,
        conv: &str,
        sender: &str,
        message_id: &str,
        seq: u64,
    ) -> Result<(), StoreError> {
        let op = TableOp::PutMessageId {
            conv: conv.into(),
            sender: sender.into(),
            message_id: message_id.into(),
            seq,
        };
        call!(self, op, TableReply::Done => ())
    }

    /// [`TableOp::PutUserConv`].
    async fn put_user_conv(&self, user: &str, conv: &str) -> Result<(), StoreError> {
        let op = TableOp::PutUserConv {
            user: user.into(),
            conv: conv.into(),
        };
        call!(self, op, TableReply::Done => ())
    }

    /// [`TableOp::Buckets`].
    async fn buckets(&self, conv: &str) -> Result<Vec<(i32, u64)>, StoreError> {
        let op = TableOp::Buckets { conv: conv.into() };
        call!(self, op, TableReply::Buckets(buckets) => buckets)
    }

    /// [`TableOp::EntriesAfter`].
    async fn entries_after(
        &self,
        conv: &str,
        bucket: i32,
        after: u64,
        until: u64,
        limit: u32,
    ) -> Result<Vec<String>, StoreError> {
        let op = TableOp::EntriesAfter {
            conv: conv.into(),
            bucket,
            after,
            until,
            limit,
        };
        call!(self, op, TableReply::Entries(entries) => entries)
    }

    /// [`TableOp::EntriesBefore`].
    async fn entries_before(
        &self,
        conv: &str,
        bucket: i32,
        before: u64,
        limit: u32,
    ) -> Result<Vec<String>, StoreError> {
        let op = TableOp::EntriesBefore {
            conv: conv.into(),
            bucket,
            before,
            limit,
        };
        call!(self, op, TableReply::Entries(entries) => entries)
    }

    /// [`TableOp::MessageId`].
    async fn message_id(
        &self,
        conv: &str,
        sender: &str,
        message_id: &str,
    ) -> Result<Option<u64>, StoreError> {
        let op = TableOp::MessageId {
            conv: conv.into(),
            sender: sender.into(),
            message_id: message_id.into(),
        };
        call!(self, op, TableReply::Seq(seq) => seq)
    }

    /// [`TableOp::UserConvs`].
    async fn user_convs(&self, user: &str) -> Result<Vec<String>, StoreError> {
        let op = TableOp::UserConvs { user: user.into() };
        call!(self, op, TableReply::Convs(convs) => convs)
    }

    /// [`TableOp::DeviceCursor`].
    async fn device_cursor(
        &self,
        user: &str,
        device: &str,
        conv: &str,
    ) -> Result<Option<Cursor>, StoreError> {
        let op = TableOp::DeviceCursor {
            user: user.into(),
            device: device.into(),
            conv: conv.into(),
        };
        call!(self, op, TableReply::DeviceCursor(cursor) => cursor)
    }

    /// [`TableOp::RaiseDeviceCursor`].
    async fn raise_device_cursor(
        &self,
        user: &str,
        device: &str,
        conv: &str,
        cell: CursorCell,
        value: u64,
    ) -> Result<(), StoreError> {
        let op = TableOp::RaiseDeviceCursor {
            user: user.into(),
            device: device.into(),
            conv: conv.into(),
            cell,
            value,
        };
        call!(self, op, TableReply::Done => ())
    }

    /// [`TableOp::UserCursor`].
    async fn user_cursor(&self, conv: &str, user: &str) -> Result<Cursor, StoreError> {
        let op = TableOp::UserCursor {
            conv: conv.into(),
            user: user.into(),
        };
        call!(self, op, TableReply::UserCursor(cursor) => cursor)
    }

    /// [`TableOp::UserCursors`].
    async fn user_cursors(&self, conv: &str) -> Result<Vec<(String, Cursor)>, StoreError> {
        let op = TableOp::UserCursors { conv: conv.into() };
        call!(self, op, TableReply::UserCursors(cursors) => cursors)
    }

    /// [`TableOp::RaiseUserCursor`].
    async fn raise_user_cursor(
        &self,
        conv: &str,
        user: &str,
        cell: CursorCell,
        value: u64,
    ) -> Result<(), StoreError> {
        let op = TableOp::RaiseUserCursor {
            conv: conv.into(),
            user: user.into(),
            cell,
            value,
        };
        call!(self, op, TableReply::Done => ())
    }

    /// [`TableOp::RaiseLastSeen`].
    async fn raise_last_seen(&self, user: &str, at_ms: u64) -> Result<(), StoreError> {
        let op = TableOp::RaiseLastSeen {
            user: user.into(),
            at_ms,
        };
        call!(self, op, TableReply::Done => ())
    }

    /// [`TableOp::LastSeen`].
    async fn last_seen(&self, user: &str) -> Result<Option<u64>, StoreError> {
        let op = TableOp::LastSeen { user: user.into() };
        call!(self, op, TableReply::LastSeen(seen) => seen)
    }
}

impl<T: Tables + ?Sized> TablesExt for T {}

#[cfg(test)]
mod tests {
    use super::*;

    /// Answers every op with the same reply, right or wrong.
    struct Answers(TableReply);

    #[async_trait]
    impl Tables for Answers {
        async fn call(&self, _op: TableOp) -> Result<TableReply, StoreError> {
            Ok(self.0.clone())
        }
    }

    /// A reply of the wrong kind is a backend error naming both kinds, not a panic.
    #[tokio::test]
    async fn a_wrong_reply_is_an_error() {
        let tables = Answers(TableReply::Applied(true));
        let Err(StoreError::Backend(why)) = tables.head("g:x").await else {
            panic!("a wrong reply must fail");
        };
        assert_eq!(why, "the tables answered Applied where Head was due");
        assert!(tables.insert_head("g:x", &row()).await.unwrap());
    }

    /// The typed methods send the op they are named after.
    #[tokio::test]
    async fn typed_methods_send_their_op() {
        struct Expect(TableOp);
        #[async_trait]
        impl Tables for Expect {
            async fn call(&self, op: TableOp) -> Result<TableReply, StoreError> {
                assert_eq!(op, self.0);
                Ok(TableReply::Applied(true))
            }
        }
        let op = TableOp::AdvanceHead {
            conv: "g:x".into(),
            expected_last_seq: 4,
            row: row(),
        };
        assert!(Expect(op).advance_head("g:x", 4, &row()).await.unwrap());
    }

    fn row() -> HeadRow {
        HeadRow {
            record: "{}".into(),
            last_seq: 5,
            last_time_ms: 9,
            entries: "[]".into(),
            new_bucket: false,
        }
    }
}
