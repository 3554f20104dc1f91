//! The store many chat servers share: the sequencing algorithm over [`Tables`],
//! whatever implements them (Scylla/Cassandra in production, an in-memory
//! service behind the simulated network in the simulator).
//!
//! Sequencing across servers uses store-side conditional writes. Each
//! conversation has one head row holding its membership record, its
//! `last_seq` and its newest entry. A server sequences entry `N + 1` with a
//! conditional write (a lightweight transaction on Scylla) `... IF last_seq = N`
//! that writes the new head; of two servers racing for the same seq exactly one
//! wins and the other re-reads and retries. The winner then copies the head
//! into the entry tables ("roll-forward") before acknowledging. Should it crash
//! in between, the entry is still durable in the head row: any server rolls the
//! head forward before it sequences the next entry, and readers take a head
//! that is not yet in the entry tables from the head row. So:
//!
//! - a seq exists only once its entry is durable (the conditional write stores it);
//! - every seq below `last_seq` is in the entry tables (rolled forward before the
//!   write that moved past it), so what readers see has no holes;
//! - a retried message id finds its seq either in the index (rolled forward) or
//!   as the head, so a retry never creates a second message.
//!
//! Cursors are max-registers, so acks arriving through different servers in any
//! order never move one back. Expiry is the backend's (TTL); `expire_before`
//! has nothing to do.

pub mod memory;
pub mod tables;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use async_trait::async_trait;

pub use self::tables::{CursorCell, HeadRow, Tables};
use crate::domain::{ConvRecord, Cursor, GroupChange};
use crate::protocol::{Body, ConvKind, Entry, ErrorCode, MemberAction, ProtocolError};
use crate::store::{Appended, ConvState, CursorUpdate, NewMessage, Store, StoreError};

/// Width of a time bucket of the `entries` table: 7 days.
pub const BUCKET_MS: u64 = 7 * 24 * 3600 * 1000;

/// How often a server retries sequencing when other servers keep winning the race.
const SEQUENCE_ATTEMPTS_MAX: usize = 64;

/// Entries read per query while paging through buckets.
const READ_PAGE_MAX: u32 = 1000;

/// The shared [`Store`] over `T`; many servers may use the same tables at once.
pub struct SharedStore<T: ?Sized> {
    tables: Arc<T>,
    /// Fault seam for tests: the next successful sequencing "crashes" before roll-forward.
    crash_after_sequencing: std::sync::atomic::AtomicBool,
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

fn rejected(code: ErrorCode, message: String) -> StoreError {
    StoreError::Rejected(ProtocolError::new(code, message))
}

fn encode<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).expect("records serialize")
}

fn decode<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, StoreError> {
    serde_json::from_str(text).map_err(|e| backend(format!("corrupt record: {e}")))
}

/// The time bucket of an entry sequenced at `server_time_ms`.
pub fn bucket_of(server_time_ms: u64) -> i32 {
    i32::try_from(server_time_ms / BUCKET_MS).expect("bucket fits in int")
}

/// The `conversations` row of one conversation.
#[derive(Debug, Clone)]
struct Head {
    record: ConvRecord,
    last_seq: u64,
    last_time_ms: u64,
    entry: Entry,
    new_bucket: bool,
}

/// Whether `entry` is the message `m` (same idempotency key).
fn same_message(entry: &Entry, m: &NewMessage) -> bool {
    matches!(entry.body, Body::Text { .. })
        && entry.sender == m.sender
        && entry.message_id == m.message_id
}

impl<T: Tables + ?Sized> SharedStore<T> {
    /// The store over `tables` (which other stores, other servers, may share).
    pub fn new(tables: Arc<T>) -> Self {
        Self {
            tables,
            crash_after_sequencing: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The tables.
    pub fn tables(&self) -> &Arc<T> {
        &self.tables
    }

    /// Fault injection for tests: the next entry this store sequences is left
    /// only in its head row, as if the server crashed right after the
    /// conditional write, and the call fails with `Backend`.
    pub fn inject_crash_after_sequencing(&self) {
        self.crash_after_sequencing.store(true, Ordering::SeqCst);
    }

    async fn head(&self, conv: &str) -> Result<Option<Head>, StoreError> {
        let Some(row) = self.tables.head(conv).await? else {
            return Ok(None);
        };
        let head = Head {
            record: decode(&row.record)?,
            last_seq: row.last_seq,
            last_time_ms: row.last_time_ms,
            entry: decode(&row.entry)?,
            new_bucket: row.new_bucket,
        };
        assert_eq!(
            head.entry.seq, head.last_seq,
            "{conv}: the head entry is entry last_seq"
        );
        Ok(Some(head))
    }

    async fn require_head(&self, conv: &str) -> Result<Head, StoreError> {
        self.head(conv).await?.ok_or_else(|| {
            rejected(
                ErrorCode::UnknownConversation,
                format!("no conversation {conv:?}"),
            )
        })
    }

    /// Copies the head entry into the tables readers use (idempotent).
    async fn roll_forward(&self, entry: &Entry, new_bucket: bool) -> Result<(), StoreError> {
        let conv = entry.conv.as_str();
        let bucket = bucket_of(entry.server_time_ms);
        if new_bucket {
            self.tables.put_bucket(conv, bucket, entry.seq).await?;
        }
        match &entry.body {
            Body::Text { .. } => {
                self.tables
                    .put_message_id(conv, &entry.sender, &entry.message_id, entry.seq)
                    .await?;
            }
            Body::Members { users, .. } => {
                for user in users {
                    self.tables.put_user_conv(user, conv).await?;
                }
            }
        }
        self.tables
            .put_entry(conv, bucket, entry.seq, &encode(entry))
            .await
    }

    /// Makes `entry` (seq `head.last_seq + 1`) the new head unless another server
    /// moved the head first; true if it did. On success the entry is rolled forward.
    async fn try_advance(
        &self,
        head: &Head,
        record: &ConvRecord,
        entry: &Entry,
    ) -> Result<bool, StoreError> {
        let conv = entry.conv.as_str();
        assert_eq!(entry.seq, head.last_seq + 1, "{conv}: next seq");
        assert!(entry.server_time_ms >= head.last_time_ms, "{conv}: time");
        // Everything below the new head must be readable before it exists.
        self.roll_forward(&head.entry, head.new_bucket).await?;
        let new_bucket = bucket_of(entry.server_time_ms) != bucket_of(head.last_time_ms);
        let row = HeadRow {
            record: encode(record),
            last_seq: entry.seq,
            last_time_ms: entry.server_time_ms,
            entry: encode(entry),
            new_bucket,
        };
        let applied = self.tables.advance_head(conv, head.last_seq, &row).await?;
        if applied {
            if self.crash_after_sequencing.swap(false, Ordering::SeqCst) {
                return Err(backend(
                    "injected crash between sequencing and roll-forward",
                ));
            }
            self.roll_forward(entry, new_bucket).await?;
        }
        Ok(applied)
    }

    /// The entry a message id was given, if it was sequenced before `head`
    /// (every such entry is rolled forward and indexed) or is `head` itself.
    async fn find_message(&self, head: &Head, m: &NewMessage) -> Result<Option<Entry>, StoreError> {
        if same_message(&head.entry, m) {
            return Ok(Some(head.entry.clone()));
        }
        let found = self
            .tables
            .message_id(&m.conv, &m.sender, &m.message_id)
            .await?;
        let Some(seq) = found else {
            return Ok(None);
        };
        let entry = self.entry_at(&m.conv, seq).await?;
        entry
            .map(Some)
            .ok_or_else(|| backend(format!("{}: seq {seq} indexed but missing", m.conv)))
    }

    fn lost_races(conv: &str) -> StoreError {
        backend(format!(
            "{conv}: other servers won the race for the next seq {SEQUENCE_ATTEMPTS_MAX} times; retry"
        ))
    }

    /// Creates `record` with its `create` entry, or returns the existing conversation.
    async fn create(
        &self,
        record: ConvRecord,
        device: &str,
        now_ms: u64,
        direct: bool,
    ) -> Result<(ConvState, Option<Appended>), StoreError> {
        let conv = record.id.clone();
        let users = record.current_members();
        let entry = Entry {
            conv: conv.clone(),
            seq: 1,
            message_id: "member-1".to_owned(),
            sender: record.owner.clone(),
            sender_device: device.to_owned(),
            server_time_ms: now_ms,
            body: Body::Members {
                action: MemberAction::Create,
                users: users.clone(),
            },
        };
        let row = HeadRow {
            record: encode(&record),
            last_seq: 1,
            last_time_ms: now_ms,
            entry: encode(&entry),
            new_bucket: true,
        };
        let applied = self.tables.insert_head(&conv, &row).await?;
        if !applied {
            let existing = self.require_head(&conv).await?;
            let owners_retry =
                existing.record.owner == record.owner && existing.record.kind == ConvKind::Group;
            if !(direct || owners_retry) {
                return Err(rejected(
                    ErrorCode::ConversationExists,
                    format!("{conv} already exists"),
                ));
            }
            if existing.last_seq == 1 {
                // The creator may have crashed before rolling its entry forward.
                self.roll_forward(&existing.entry, existing.new_bucket)
                    .await?;
            }
            let state = ConvState {
                record: existing.record,
                last_seq: existing.last_seq,
            };
            return Ok((state, None));
        }
        self.roll_forward(&entry, true).await?;
        let appended = Appended {
            entry: Arc::new(entry),
            duplicate: false,
            recipients: users.into(),
        };
        Ok((
            ConvState {
                record,
                last_seq: 1,
            },
            Some(appended),
        ))
    }

    async fn entry_at(&self, conv: &str, seq: u64) -> Result<Option<Entry>, StoreError> {
        let found = self.read_after(conv, seq - 1, seq, 1).await?;
        Ok(found.into_iter().next().filter(|e| e.seq == seq))
    }

    fn decode_entries(rows: Vec<String>) -> Result<Vec<Entry>, StoreError> {
        rows.iter().map(|row| decode(row)).collect()
    }

    /// Max-register writes of the cells of `new` that moved past `old`.
    async fn raise_cursor(
        &self,
        old: Cursor,
        new: Cursor,
        key: (&str, &str, Option<&str>),
    ) -> Result<(), StoreError> {
        for (cell, before, after) in [
            (CursorCell::Delivered, old.delivered, new.delivered),
            (CursorCell::Read, old.read, new.read),
        ] {
            if after <= before {
                continue;
            }
            match key {
                (user, device, Some(conv)) => {
                    self.tables
                        .raise_device_cursor(user, device, conv, cell, after)
                        .await?;
                }
                (conv, user, None) => {
                    self.tables
                        .raise_user_cursor(conv, user, cell, after)
                        .await?;
                }
            }
        }
        Ok(())
    }
}

#[async_trait]
impl<T: Tables + ?Sized> Store for SharedStore<T> {
    async fn open_direct(
        &self,
        opener: &str,
        device: &str,
        peer: &str,
        now_ms: u64,
    ) -> Result<(ConvState, Option<Appended>), StoreError> {
        let record = ConvRecord::new_direct(opener, peer)?;
        if let Some(state) = self.conversation(&record.id).await? {
            return Ok((state, None));
        }
        self.create(record, device, now_ms, true).await
    }

    async fn create_group(
        &self,
        conv: &str,
        owner: &str,
        device: &str,
        members: Vec<String>,
        members_max: usize,
        now_ms: u64,
    ) -> Result<(ConvState, Option<Appended>), StoreError> {
        let record = ConvRecord::new_group(conv.to_owned(), owner, &members, members_max)?;
        self.create(record, device, now_ms, false).await
    }

    async fn change_members(
        &self,
        conv: &str,
        by: &str,
        device: &str,
        change: GroupChange,
        members_max: usize,
        now_ms: u64,
    ) -> Result<Appended, StoreError> {
        for _ in 0..SEQUENCE_ATTEMPTS_MAX {
            let head = self.require_head(conv).await?;
            let mut record = head.record.clone();
            let seq = head.last_seq + 1;
            let (action, users, recipients) = record.apply_change(by, &change, seq, members_max)?;
            let entry = Entry {
                conv: conv.to_owned(),
                seq,
                message_id: format!("member-{seq}"),
                sender: by.to_owned(),
                sender_device: device.to_owned(),
                server_time_ms: now_ms.max(head.last_time_ms),
                body: Body::Members { action, users },
            };
            if self.try_advance(&head, &record, &entry).await? {
                return Ok(Appended {
                    entry: Arc::new(entry),
                    duplicate: false,
                    recipients: recipients.into(),
                });
            }
        }
        Err(Self::lost_races(conv))
    }

    async fn append(&self, m: NewMessage, now_ms: u64) -> Result<Appended, StoreError> {
        for _ in 0..SEQUENCE_ATTEMPTS_MAX {
            // Read the head first: the index then covers every seq below it.
            let head = self.require_head(&m.conv).await?;
            head.record.require_member(&m.sender)?;
            let recipients: Arc<[String]> = head.record.current_members().into();
            if let Some(original) = self.find_message(&head, &m).await? {
                return Ok(Appended {
                    entry: Arc::new(original),
                    duplicate: true,
                    recipients,
                });
            }
            let entry = Entry {
                conv: m.conv.clone(),
                seq: head.last_seq + 1,
                message_id: m.message_id.clone(),
                sender: m.sender.clone(),
                sender_device: m.sender_device.clone(),
                server_time_ms: now_ms.max(head.last_time_ms),
                body: m.body.clone(),
            };
            if self.try_advance(&head, &head.record, &entry).await? {
                return Ok(Appended {
                    entry: Arc::new(entry),
                    duplicate: false,
                    recipients,
                });
            }
        }
        Err(Self::lost_races(&m.conv))
    }

    async fn ack(
        &self,
        conv: &str,
        user: &str,
        device: &str,
        delivered: Option<u64>,
        read: Option<u64>,
    ) -> Result<CursorUpdate, StoreError> {
        let head = self.require_head(conv).await?;
        let membership = head.record.require_reader(user)?;
        let visible_max = head.last_seq.min(membership.visible_until());
        let old = self
            .tables
            .device_cursor(user, device, conv)
            .await?
            .unwrap_or_default();
        let new = old.advance(delivered, read, visible_max)?;
        self.raise_cursor(old, new, (user, device, Some(conv)))
            .await?;
        let user_before = self.tables.user_cursor(conv, user).await?;
        let user_after = user_before.max(new);
        self.raise_cursor(user_before, user_after, (conv, user, None))
            .await?;
        let all_members = if head.record.kind == ConvKind::Group {
            let mut cursors: std::collections::HashMap<String, Cursor> =
                self.tables.user_cursors(conv).await?.into_iter().collect();
            cursors.insert(user.to_owned(), user_after);
            let current = head.record.current_members();
            let of = |u: &String| cursors.get(u).copied().unwrap_or_default();
            Some(Cursor {
                delivered: current.iter().map(|u| of(u).delivered).min().unwrap_or(0),
                read: current.iter().map(|u| of(u).read).min().unwrap_or(0),
            })
        } else {
            None
        };
        Ok(CursorUpdate {
            device: new,
            user_before,
            user_after,
            all_members,
        })
    }

    async fn conversation(&self, conv: &str) -> Result<Option<ConvState>, StoreError> {
        Ok(self.head(conv).await?.map(|h| ConvState {
            record: h.record,
            last_seq: h.last_seq,
        }))
    }

    async fn conversations_of(&self, user: &str) -> Result<Vec<ConvState>, StoreError> {
        let ids = self.tables.user_convs(user).await?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            out.extend(self.conversation(&id).await?);
        }
        Ok(out)
    }

    async fn read_after(
        &self,
        conv: &str,
        after: u64,
        until: u64,
        limit: u32,
    ) -> Result<Vec<Entry>, StoreError> {
        // Streams of current members read "until forever" (u64::MAX).
        let until = until.min(i64::MAX as u64);
        if after >= until || limit == 0 {
            return Ok(Vec::new());
        }
        let buckets = self.tables.buckets(conv).await?;
        // The last bucket starting at or before `after + 1` holds it (or it expired).
        let start = buckets
            .iter()
            .rposition(|(_, first)| *first <= after + 1)
            .unwrap_or(0);
        let mut out: Vec<Entry> = Vec::new();
        for (bucket, first) in buckets.iter().skip(start) {
            if *first > until || out.len() >= limit as usize {
                break;
            }
            let from = out.last().map_or(after, |e| e.seq);
            let want = (limit - out.len() as u32).min(READ_PAGE_MAX);
            let rows = self
                .tables
                .entries_after(conv, *bucket, from, until, want)
                .await?;
            out.extend(Self::decode_entries(rows)?);
        }
        let reached = out.last().map_or(after, |e| e.seq);
        if reached < until && out.len() < limit as usize {
            // Only the head may be missing (not yet rolled forward): take it from its row.
            if let Some(head) = self.head(conv).await? {
                if head.last_seq == reached + 1 && head.last_seq <= until {
                    self.roll_forward(&head.entry, head.new_bucket).await?;
                    out.push(head.entry);
                }
            }
        }
        debug_assert!(out.windows(2).all(|w| w[0].seq < w[1].seq));
        out.truncate(limit as usize);
        Ok(out)
    }

    async fn read_before(
        &self,
        conv: &str,
        before: u64,
        limit: u32,
    ) -> Result<Vec<Entry>, StoreError> {
        let before = before.min(i64::MAX as u64);
        if before <= 1 || limit == 0 {
            return Ok(Vec::new());
        }
        let mut newest_first: Vec<Entry> = Vec::new();
        if let Some(head) = self.head(conv).await? {
            if head.last_seq < before {
                // The head may not be rolled forward yet: take it from its row.
                self.roll_forward(&head.entry, head.new_bucket).await?;
                newest_first.push(head.entry);
            }
        }
        let buckets = self.tables.buckets(conv).await?;
        for (bucket, first) in buckets.iter().rev() {
            if newest_first.len() >= limit as usize {
                break;
            }
            let below = newest_first.last().map_or(before, |e| e.seq);
            if *first >= below {
                continue;
            }
            let want = (limit - newest_first.len() as u32).min(READ_PAGE_MAX);
            let rows = self
                .tables
                .entries_before(conv, *bucket, below, want)
                .await?;
            newest_first.extend(Self::decode_entries(rows)?);
        }
        newest_first.truncate(limit as usize);
        newest_first.reverse();
        debug_assert!(newest_first.windows(2).all(|w| w[0].seq < w[1].seq));
        Ok(newest_first)
    }

    async fn senders_between(
        &self,
        conv: &str,
        after: u64,
        until: u64,
        limit: u32,
    ) -> Result<Vec<String>, StoreError> {
        let mut senders: Vec<String> = self
            .read_after(conv, after, until, limit)
            .await?
            .into_iter()
            .map(|e| e.sender)
            .collect();
        senders.sort();
        senders.dedup();
        Ok(senders)
    }

    async fn device_cursor(
        &self,
        user: &str,
        device: &str,
        conv: &str,
    ) -> Result<Option<Cursor>, StoreError> {
        self.tables.device_cursor(user, device, conv).await
    }

    async fn expire_before(&self, _cutoff_ms: u64, _budget: u32) -> Result<u64, StoreError> {
        Ok(0) // Entries carry a TTL; the backend deletes them.
    }
}
