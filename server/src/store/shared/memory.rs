//! [`Tables`] in memory, with the semantics of the CQL tables: conditional
//! writes on the head row, idempotent upserts, max-register cursors.
//!
//! Used by the storage contract tests and, behind a simulated network, as the
//! simulator's shared store. Every call is atomic and durable once it returns
//! (a simulated store node that crashes loses only calls still in flight).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use async_trait::async_trait;

use super::tables::{CursorCell, HeadRow, Tables};
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

impl MemTables {
    fn with<R>(&self, f: impl FnOnce(&mut State) -> R) -> Result<R, StoreError> {
        Ok(f(&mut self.state.lock().expect("tables lock")))
    }
}

#[async_trait]
impl Tables for MemTables {
    async fn head(&self, conv: &str) -> Result<Option<HeadRow>, StoreError> {
        self.with(|s| s.heads.get(conv).cloned())
    }

    async fn insert_head(&self, conv: &str, row: &HeadRow) -> Result<bool, StoreError> {
        self.with(|s| {
            if s.heads.contains_key(conv) {
                return false;
            }
            s.heads.insert(conv.to_owned(), row.clone());
            true
        })
    }

    async fn advance_head(
        &self,
        conv: &str,
        expected_last_seq: u64,
        row: &HeadRow,
    ) -> Result<bool, StoreError> {
        self.with(|s| match s.heads.get_mut(conv) {
            Some(head) if head.last_seq == expected_last_seq => {
                *head = row.clone();
                true
            }
            _ => false,
        })
    }

    async fn put_entry(
        &self,
        conv: &str,
        bucket: i32,
        seq: u64,
        entry: &str,
    ) -> Result<(), StoreError> {
        self.with(|s| {
            let rows = s.entries.entry((conv.to_owned(), bucket)).or_default();
            rows.insert(seq, entry.to_owned());
        })
    }

    async fn put_bucket(&self, conv: &str, bucket: i32, first_seq: u64) -> Result<(), StoreError> {
        self.with(|s| {
            s.buckets
                .entry(conv.to_owned())
                .or_default()
                .insert(bucket, first_seq);
        })
    }

    async fn put_message_id(
        &self,
        conv: &str,
        sender: &str,
        message_id: &str,
        seq: u64,
    ) -> Result<(), StoreError> {
        self.with(|s| {
            let key = (conv.to_owned(), sender.to_owned(), message_id.to_owned());
            s.message_ids.insert(key, seq);
        })
    }

    async fn put_user_conv(&self, user: &str, conv: &str) -> Result<(), StoreError> {
        self.with(|s| {
            s.user_convs
                .entry(user.to_owned())
                .or_default()
                .insert(conv.to_owned());
        })
    }

    async fn buckets(&self, conv: &str) -> Result<Vec<(i32, u64)>, StoreError> {
        self.with(|s| {
            s.buckets
                .get(conv)
                .map(|b| b.iter().map(|(k, v)| (*k, *v)).collect())
                .unwrap_or_default()
        })
    }

    async fn entries_after(
        &self,
        conv: &str,
        bucket: i32,
        after: u64,
        until: u64,
        limit: u32,
    ) -> Result<Vec<String>, StoreError> {
        if after >= until {
            return Ok(Vec::new());
        }
        self.with(|s| {
            s.entries
                .get(&(conv.to_owned(), bucket))
                .map(|rows| {
                    rows.range(after + 1..=until)
                        .take(limit as usize)
                        .map(|(_, e)| e.clone())
                        .collect()
                })
                .unwrap_or_default()
        })
    }

    async fn entries_before(
        &self,
        conv: &str,
        bucket: i32,
        before: u64,
        limit: u32,
    ) -> Result<Vec<String>, StoreError> {
        self.with(|s| {
            s.entries
                .get(&(conv.to_owned(), bucket))
                .map(|rows| {
                    rows.range(..before)
                        .rev()
                        .take(limit as usize)
                        .map(|(_, e)| e.clone())
                        .collect()
                })
                .unwrap_or_default()
        })
    }

    async fn message_id(
        &self,
        conv: &str,
        sender: &str,
        message_id: &str,
    ) -> Result<Option<u64>, StoreError> {
        let key = (conv.to_owned(), sender.to_owned(), message_id.to_owned());
        self.with(|s| s.message_ids.get(&key).copied())
    }

    async fn user_convs(&self, user: &str) -> Result<Vec<String>, StoreError> {
        self.with(|s| {
            s.user_convs
                .get(user)
                .map(|c| c.iter().cloned().collect())
                .unwrap_or_default()
        })
    }

    async fn device_cursor(
        &self,
        user: &str,
        device: &str,
        conv: &str,
    ) -> Result<Option<Cursor>, StoreError> {
        let key = (user.to_owned(), device.to_owned(), conv.to_owned());
        self.with(|s| s.device_cursors.get(&key).copied())
    }

    async fn raise_device_cursor(
        &self,
        user: &str,
        device: &str,
        conv: &str,
        cell: CursorCell,
        value: u64,
    ) -> Result<(), StoreError> {
        let key = (user.to_owned(), device.to_owned(), conv.to_owned());
        self.with(|s| raise(s.device_cursors.entry(key).or_default(), cell, value))
    }

    async fn user_cursor(&self, conv: &str, user: &str) -> Result<Cursor, StoreError> {
        self.with(|s| {
            s.user_cursors
                .get(conv)
                .and_then(|users| users.get(user).copied())
                .unwrap_or_default()
        })
    }

    async fn user_cursors(&self, conv: &str) -> Result<Vec<(String, Cursor)>, StoreError> {
        self.with(|s| {
            s.user_cursors
                .get(conv)
                .map(|users| users.iter().map(|(u, c)| (u.clone(), *c)).collect())
                .unwrap_or_default()
        })
    }

    async fn raise_user_cursor(
        &self,
        conv: &str,
        user: &str,
        cell: CursorCell,
        value: u64,
    ) -> Result<(), StoreError> {
        self.with(|s| {
            let users = s.user_cursors.entry(conv.to_owned()).or_default();
            raise(users.entry(user.to_owned()).or_default(), cell, value);
        })
    }

    async fn raise_last_seen(&self, user: &str, at_ms: u64) -> Result<(), StoreError> {
        self.with(|s| {
            let seen = s.last_seen.entry(user.to_owned()).or_default();
            *seen = (*seen).max(at_ms);
        })
    }

    async fn last_seen(&self, user: &str) -> Result<Option<u64>, StoreError> {
        self.with(|s| s.last_seen.get(user).copied())
    }
}
