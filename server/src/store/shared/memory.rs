//! [`Tables`] in memory, with the semantics of the CQL tables: conditional
//! writes on the head row, idempotent upserts, max-register cursors.
//!
//! Used by the storage contract tests and, behind a simulated network, as the
//! simulator's shared store. Every call is atomic and durable once it returns
//! (a simulated store node that crashes loses only calls still in flight).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use async_trait::async_trait;

use super::tables::{CursorCell, HeadRow, TableOp, TableReply, Tables};
use crate::domain::Cursor;
use crate::store::StoreError;

#[derive(Default)]
struct State {
    heads: BTreeMap<String, HeadRow>,
    entries: BTreeMap<(String, i32), BTreeMap<u64, String>>,
    buckets: BTreeMap<String, BTreeMap<i32, u64>>,
    message_ids: BTreeMap<(String, String, String), u64>,
    user_convs: BTreeMap<String, BTreeSet<String>>,
    device_cursors: BTreeMap<(String, String, String), Cursor>,
    user_cursors: BTreeMap<String, BTreeMap<String, Cursor>>,
    last_seen: BTreeMap<String, u64>,
}

/// In-memory [`Tables`].
#[derive(Default)]
pub struct MemTables {
    state: Mutex<State>,
}

fn raise(cursor: &mut Cursor, cell: CursorCell, value: u64) {
    let slot = match cell {
        CursorCell::Delivered => &mut cursor.delivered,
        CursorCell::Read => &mut cursor.read,
    };
    *slot = (*slot).max(value);
}

impl State {
    /// Applies one op atomically (the caller holds the lock).
    fn apply(&mut self, op: TableOp) -> TableReply {
        use TableOp as Op;
        use TableReply as R;
        match op {
            Op::Head { conv } => R::Head(self.heads.get(&conv).cloned()),
            Op::InsertHead { conv, row } => {
                let absent = !self.heads.contains_key(&conv);
                if absent {
                    self.heads.insert(conv, row);
                }
                R::Applied(absent)
            }
            Op::AdvanceHead {
                conv,
                expected_last_seq,
                row,
            } => R::Applied(match self.heads.get_mut(&conv) {
                Some(head) if head.last_seq == expected_last_seq => {
                    *head = row;
                    true
                }
                _ => false,
            }),
            Op::PutEntry {
                conv,
                bucket,
                seq,
                entry,
            } => {
                self.entries
                    .entry((conv, bucket))
                    .or_default()
                    .insert(seq, entry);
                R::Done
            }
            Op::PutBucket {
                conv,
                bucket,
                first_seq,
            } => {
                self.buckets
                    .entry(conv)
                    .or_default()
                    .insert(bucket, first_seq);
                R::Done
            }
            Op::PutMessageId {
                conv,
                sender,
                message_id,
                seq,
            } => {
                self.message_ids.insert((conv, sender, message_id), seq);
                R::Done
            }
            Op::PutUserConv { user, conv } => {
                self.user_convs.entry(user).or_default().insert(conv);
                R::Done
            }
            Op::Buckets { conv } => R::Buckets(
                self.buckets
                    .get(&conv)
                    .map(|b| b.iter().map(|(k, v)| (*k, *v)).collect())
                    .unwrap_or_default(),
            ),
            Op::EntriesAfter {
                conv,
                bucket,
                after,
                until,
                limit,
            } => R::Entries(match self.entries.get(&(conv, bucket)) {
                Some(rows) if after < until => rows
                    .range(after + 1..=until)
                    .take(limit as usize)
                    .map(|(_, e)| e.clone())
                    .collect(),
                _ => Vec::new(),
            }),
            Op::EntriesBefore {
                conv,
                bucket,
                before,
                limit,
            } => R::Entries(
                self.entries
                    .get(&(conv, bucket))
                    .map(|rows| {
                        rows.range(..before)
                            .rev()
                            .take(limit as usize)
                            .map(|(_, e)| e.clone())
                            .collect()
                    })
                    .unwrap_or_default(),
            ),
            Op::MessageId {
                conv,
                sender,
                message_id,
            } => R::Seq(self.message_ids.get(&(conv, sender, message_id)).copied()),
            Op::UserConvs { user } => R::Convs(
                self.user_convs
                    .get(&user)
                    .map(|c| c.iter().cloned().collect())
                    .unwrap_or_default(),
            ),
            Op::DeviceCursor { user, device, conv } => {
                R::DeviceCursor(self.device_cursors.get(&(user, device, conv)).copied())
            }
            Op::RaiseDeviceCursor {
                user,
                device,
                conv,
                cell,
                value,
            } => {
                let cursor = self.device_cursors.entry((user, device, conv));
                raise(cursor.or_default(), cell, value);
                R::Done
            }
            Op::UserCursor { conv, user } => R::UserCursor(
                self.user_cursors
                    .get(&conv)
                    .and_then(|users| users.get(&user).copied())
                    .unwrap_or_default(),
            ),
            Op::UserCursors { conv } => R::UserCursors(
                self.user_cursors
                    .get(&conv)
                    .map(|users| users.iter().map(|(u, c)| (u.clone(), *c)).collect())
                    .unwrap_or_default(),
            ),
            Op::RaiseUserCursor {
                conv,
                user,
                cell,
                value,
            } => {
                let users = self.user_cursors.entry(conv).or_default();
                raise(users.entry(user).or_default(), cell, value);
                R::Done
            }
            Op::RaiseLastSeen { user, at_ms } => {
                let seen = self.last_seen.entry(user).or_default();
                *seen = (*seen).max(at_ms);
                R::Done
            }
            Op::LastSeen { user } => R::LastSeen(self.last_seen.get(&user).copied()),
        }
    }
}

#[async_trait]
impl Tables for MemTables {
    async fn call(&self, op: TableOp) -> Result<TableReply, StoreError> {
        Ok(self.state.lock().expect("tables lock").apply(op))
    }
}
