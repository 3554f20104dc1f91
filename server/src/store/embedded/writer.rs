//! The writer thread: applies write operations in groups inside one redb write
//! transaction and commits them with one fsync (group commit).
//!
//! It owns an in-memory cache of each conversation's record and last seq, so
//! sequencing costs no read; the cache is dropped whenever a commit fails.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use redb::{Database, ReadableTable, Table, WriteTransaction};
use tokio::sync::mpsc;

use super::slot::DatabaseSlot;
use super::tables::{
    CONVS, DEVICE_CURSORS, ENTRIES, LAST_SEEN, MESSAGE_IDS, META, SEQS, USER_CONVS, USER_CURSORS,
};
use super::{backend, decode, GROUP_COMMIT_OPS_MAX};
use crate::domain::{next_server_time, receipt_floor, ConvRecord, Cursor, GroupChange};
use crate::protocol::{Body, ConvKind, Entry, ErrorCode, ProtocolError};
use crate::store::{Appended, ConvState, CursorUpdate, NewMessage, StoreError};

/// Delivers a write's result once its group's commit outcome is known.
pub type Completion = Box<dyn FnOnce(Result<(), StoreError>) + Send>;
/// One write: runs inside the group's transaction and returns its completion.
pub type WriteOp = Box<dyn FnOnce(&mut WriteCtx<'_>) -> Completion + Send>;

struct CachedConv {
    record: ConvRecord,
    last_seq: u64,
    last_time_ms: u64,
    current: Arc<[String]>,
    user_cursors: Option<BTreeMap<String, Cursor>>,
}

impl CachedConv {
    fn new(record: ConvRecord, last_seq: u64, last_time_ms: u64) -> Self {
        let current = record.current_members().into();
        Self {
            record,
            last_seq,
            last_time_ms,
            current,
            user_cursors: None,
        }
    }
}

/// Creates every table so that readers never meet a missing one.
pub fn create_tables(db: &Database) -> Result<(), StoreError> {
    let txn = db.begin_write().map_err(backend)?;
    txn.open_table(ENTRIES).map_err(backend)?;
    txn.open_table(SEQS).map_err(backend)?;
    txn.open_table(CONVS).map_err(backend)?;
    txn.open_table(USER_CONVS).map_err(backend)?;
    txn.open_table(MESSAGE_IDS).map_err(backend)?;
    txn.open_table(DEVICE_CURSORS).map_err(backend)?;
    txn.open_table(USER_CURSORS).map_err(backend)?;
    txn.open_table(LAST_SEEN).map_err(backend)?;
    txn.open_table(META).map_err(backend)?;
    txn.commit().map_err(backend)
}

/// Opens a write transaction that commits in two phases (data pages synced
/// before the header that names them), so that a failed fsync never leaves a
/// visible commit whose pages are not durable.
fn begin(db: &Database) -> Result<WriteTransaction, StoreError> {
    let mut txn = db.begin_write().map_err(backend)?;
    txn.set_two_phase_commit(true);
    Ok(txn)
}

/// Commits a change to the store's bookkeeping with an fsync: after a reopen,
/// the header on disk is then the one every later read builds on.
pub fn commit_marker(db: &Database) -> Result<(), StoreError> {
    let txn = begin(db)?;
    {
        let mut meta = txn.open_table(META).map_err(backend)?;
        let reopened = meta
            .get("reopened")
            .map_err(backend)?
            .map_or(0, |g| g.value());
        meta.insert("reopened", reopened + 1).map_err(backend)?;
    }
    txn.commit().map_err(backend)
}

/// The writer loop on an OS thread: runs until every sender of `ops` is dropped.
#[cfg(not(madsim))]
pub fn run(slot: &DatabaseSlot, mut ops: mpsc::UnboundedReceiver<WriteOp>) {
    let mut cache = HashMap::new();
    while let Some(first) = ops.blocking_recv() {
        commit_group(slot, &mut cache, take_group(first, &mut ops));
    }
}

/// The writer loop as a task (the simulator forbids OS threads).
#[cfg(madsim)]
pub async fn run_task(slot: &DatabaseSlot, mut ops: mpsc::UnboundedReceiver<WriteOp>) {
    let mut cache = HashMap::new();
    while let Some(first) = ops.recv().await {
        let group = take_group(first, &mut ops);
        if crate::mutants::active(crate::mutants::Mutant::AckBeforeDurable) {
            if let Ok(db) = slot.get() {
                commit_group_acking_first(&db, &mut cache, group).await;
            }
            continue;
        }
        commit_group(slot, &mut cache, group);
        // Let the callers run before the next group, as the thread would.
        tokio::task::yield_now().await;
    }
}

/// The `AckBeforeDurable` mutant: acknowledge, give a crash time to strike, then commit.
#[cfg(madsim)]
async fn commit_group_acking_first(
    db: &Database,
    cache: &mut HashMap<String, CachedConv>,
    batch: Vec<WriteOp>,
) {
    let Ok(txn) = begin(db) else { return };
    let (completions, failed) = apply_group(&txn, cache, batch);
    for complete in completions {
        complete(Ok(()));
    }
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    if failed.is_none() {
        let _ = txn.commit();
    }
}

/// Runs every write of `batch` inside `txn`; returns their completions and, if one
/// hit a backend error, why the whole group must be aborted.
fn apply_group(
    txn: &WriteTransaction,
    cache: &mut HashMap<String, CachedConv>,
    batch: Vec<WriteOp>,
) -> (Vec<Completion>, Option<String>) {
    let mut completions = Vec::with_capacity(batch.len());
    let failed = match WriteCtx::open(txn, cache) {
        Ok(mut ctx) => {
            for op in batch {
                completions.push(op(&mut ctx));
            }
            ctx.failed
        }
        Err(e) => Some(e.to_string()),
    };
    (completions, failed)
}

/// `first` plus every write already waiting, up to the group limit.
fn take_group(first: WriteOp, ops: &mut mpsc::UnboundedReceiver<WriteOp>) -> Vec<WriteOp> {
    let mut batch = Vec::with_capacity(16);
    batch.push(first);
    while batch.len() < GROUP_COMMIT_OPS_MAX {
        match ops.try_recv() {
            Ok(op) => batch.push(op),
            Err(_) => break,
        }
    }
    batch
}

/// Commits `batch` in one transaction; each write's completion learns the
/// outcome. A failed commit closes the database (redb refuses everything after
/// an I/O error until reopened); the next group reopens it first, and while it
/// cannot, groups are dropped unrun, which fails each caller: nothing is
/// acknowledged while the store is down.
fn commit_group(slot: &DatabaseSlot, cache: &mut HashMap<String, CachedConv>, batch: Vec<WriteOp>) {
    if !slot.reopen() {
        return;
    }
    let txn = match slot.get().and_then(|db| begin(&db)) {
        Ok(txn) => txn,
        Err(e) => {
            tracing::error!(error = %e, "cannot begin a write transaction");
            slot.close_after(&e.to_string());
            return;
        }
    };
    let (completions, failed) = apply_group(&txn, cache, batch);
    let outcome = match failed {
        Some(why) => {
            let _ = txn.abort();
            Err(StoreError::Backend(why))
        }
        None => txn.commit().map_err(backend),
    };
    if let Err(e) = &outcome {
        tracing::error!(error = %e, "group commit failed; nothing in it was acknowledged");
        cache.clear();
        slot.close_after(&e.to_string());
    }
    let outcome = if crate::mutants::active(crate::mutants::Mutant::AckFailedCommit) {
        Ok(())
    } else {
        outcome
    };
    for complete in completions {
        complete(outcome.clone());
    }
}

/// The open tables of one group's transaction plus the writer's cache.
pub struct WriteCtx<'t> {
    entries: Table<'t, (&'static str, u64), &'static [u8]>,
    seqs: Table<'t, &'static str, (u64, u64)>,
    convs: Table<'t, &'static str, &'static [u8]>,
    user_convs: Table<'t, (&'static str, &'static str), ()>,
    message_ids: Table<'t, (&'static str, &'static str, &'static str), u64>,
    device_cursors: Table<'t, (&'static str, &'static str, &'static str), (u64, u64)>,
    user_cursors: Table<'t, (&'static str, &'static str), (u64, u64)>,
    last_seen: Table<'t, &'static str, u64>,
    cache: &'t mut HashMap<String, CachedConv>,
    /// Set when an operation hit a backend error: the whole group is aborted.
    pub failed: Option<String>,
}

fn rejected(code: ErrorCode, message: String) -> StoreError {
    StoreError::Rejected(ProtocolError::new(code, message))
}

fn encode<T: serde::Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("records serialize")
}

impl<'t> WriteCtx<'t> {
    fn open(
        txn: &'t WriteTransaction,
        cache: &'t mut HashMap<String, CachedConv>,
    ) -> Result<Self, StoreError> {
        Ok(Self {
            entries: txn.open_table(ENTRIES).map_err(backend)?,
            seqs: txn.open_table(SEQS).map_err(backend)?,
            convs: txn.open_table(CONVS).map_err(backend)?,
            user_convs: txn.open_table(USER_CONVS).map_err(backend)?,
            message_ids: txn.open_table(MESSAGE_IDS).map_err(backend)?,
            device_cursors: txn.open_table(DEVICE_CURSORS).map_err(backend)?,
            user_cursors: txn.open_table(USER_CURSORS).map_err(backend)?,
            last_seen: txn.open_table(LAST_SEEN).map_err(backend)?,
            cache,
            failed: None,
        })
    }

    /// Raises `user`'s last-seen time to `at_ms`; a lower value changes nothing.
    pub fn raise_last_seen(&mut self, user: &str, at_ms: u64) -> Result<(), StoreError> {
        let current = self
            .last_seen
            .get(user)
            .map_err(backend)?
            .map(|g| g.value());
        if current.is_none_or(|c| c < at_ms) {
            self.last_seen.insert(user, at_ms).map_err(backend)?;
        }
        Ok(())
    }

    /// Loads `conv` into the cache; false if it does not exist.
    fn load(&mut self, conv: &str) -> Result<bool, StoreError> {
        if self.cache.contains_key(conv) {
            return Ok(true);
        }
        let Some(raw) = self.convs.get(conv).map_err(backend)? else {
            return Ok(false);
        };
        let record: ConvRecord = decode(raw.value())?;
        drop(raw);
        let (mut last_seq, last_time_ms) = self
            .seqs
            .get(conv)
            .map_err(backend)?
            .map_or((0, 0), |g| g.value());
        if crate::mutants::active(crate::mutants::Mutant::SeqReuseAfterRestart) {
            last_seq = last_seq.saturating_sub(1);
        }
        self.cache.insert(
            conv.to_owned(),
            CachedConv::new(record, last_seq, last_time_ms),
        );
        Ok(true)
    }

    fn require(&mut self, conv: &str) -> Result<&mut CachedConv, StoreError> {
        if !self.load(conv)? {
            return Err(rejected(
                ErrorCode::UnknownConversation,
                format!("no conversation {conv:?}"),
            ));
        }
        Ok(self.cache.get_mut(conv).expect("loaded"))
    }

    /// The seq and server time of the next entry of `conv` (loaded).
    fn next_slot(&self, conv: &str, now_ms: u64) -> (u64, u64) {
        let cached = &self.cache[conv];
        let server_time_ms =
            if crate::mutants::active(crate::mutants::Mutant::ServerTimeFromRawClock) {
                now_ms
            } else {
                next_server_time(now_ms, cached.last_time_ms)
            };
        (cached.last_seq + 1, server_time_ms)
    }

    /// Writes `entry` as the next entry of its conversation (loaded; seq and time
    /// from [`Self::next_slot`]) and returns it.
    fn write_next(&mut self, entry: Entry) -> Result<Arc<Entry>, StoreError> {
        let (conv, seq) = (entry.conv.as_str(), entry.seq);
        let cached = self
            .cache
            .get_mut(conv)
            .expect("sequence on a loaded conversation");
        assert_eq!(seq, cached.last_seq + 1, "{conv}: the next seq");
        let prior = self
            .entries
            .insert((conv, seq), encode(&entry).as_slice())
            .map_err(backend)?;
        let reuse_allowed = crate::mutants::active(crate::mutants::Mutant::SeqReuseAfterRestart);
        assert!(
            prior.is_none() || reuse_allowed,
            "{conv}: seq {seq} allocated twice"
        );
        drop(prior);
        self.seqs
            .insert(conv, (seq, entry.server_time_ms))
            .map_err(backend)?;
        cached.last_seq = seq;
        cached.last_time_ms = entry.server_time_ms;
        Ok(Arc::new(entry))
    }

    /// Creates `record` with its `create` entry, or returns the existing conversation.
    pub fn create(
        &mut self,
        record: ConvRecord,
        device: &str,
        now_ms: u64,
        direct: bool,
    ) -> Result<(ConvState, Option<Appended>), StoreError> {
        let conv = record.id.clone();
        if self.load(&conv)? {
            let cached = &self.cache[&conv];
            let owners_retry =
                cached.record.owner == record.owner && cached.record.kind == ConvKind::Group;
            if !(direct || owners_retry) {
                return Err(rejected(
                    ErrorCode::ConversationExists,
                    format!("{conv} already exists"),
                ));
            }
            let state = ConvState {
                record: cached.record.clone(),
                last_seq: cached.last_seq,
            };
            return Ok((state, None));
        }
        self.convs
            .insert(conv.as_str(), encode(&record).as_slice())
            .map_err(backend)?;
        for user in record.members.keys() {
            self.user_convs
                .insert((user.as_str(), conv.as_str()), ())
                .map_err(backend)?;
        }
        let users = record.current_members();
        self.cache
            .insert(conv.clone(), CachedConv::new(record.clone(), 0, 0));
        let (seq, server_time_ms) = self.next_slot(&conv, now_ms);
        assert_eq!(seq, 1, "a new conversation starts at seq 1");
        let entry = self.write_next(record.create_entry(device, server_time_ms))?;
        let appended = Appended {
            entry,
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

    /// Applies a membership change as the next entry.
    pub fn change_members(
        &mut self,
        conv: &str,
        by: &str,
        device: &str,
        change: &GroupChange,
        members_max: usize,
        now_ms: u64,
    ) -> Result<Appended, StoreError> {
        let mut record = self.require(conv)?.record.clone();
        let (seq, server_time_ms) = self.next_slot(conv, now_ms);
        let (entry, recipients) =
            record.change_entry(by, device, change, seq, members_max, server_time_ms)?;
        self.convs
            .insert(conv, encode(&record).as_slice())
            .map_err(backend)?;
        // The users the change names list the conversation (added ones newly).
        if let Body::Members { users, .. } = &entry.body {
            for user in users {
                self.user_convs
                    .insert((user.as_str(), conv), ())
                    .map_err(backend)?;
            }
        }
        let entry = self.write_next(entry)?;
        let cached = self.cache.get_mut(conv).expect("loaded");
        cached.current = record.current_members().into();
        cached.record = record;
        Ok(Appended {
            entry,
            duplicate: false,
            recipients: recipients.into(),
        })
    }

    /// Sequences a message unless its id was seen before.
    pub fn append(&mut self, m: &NewMessage, now_ms: u64) -> Result<Appended, StoreError> {
        let cached = self.require(&m.conv)?;
        cached.record.require_member(&m.sender)?;
        let recipients = Arc::clone(&cached.current);
        let key = (m.conv.as_str(), m.sender.as_str(), m.message_id.as_str());
        let seen = self
            .message_ids
            .get(key)
            .map_err(backend)?
            .map(|g| g.value())
            .filter(|_| !crate::mutants::active(crate::mutants::Mutant::SkipIdempotency));
        if let Some(seq) = seen {
            let raw = self.entries.get((m.conv.as_str(), seq)).map_err(backend)?;
            let raw =
                raw.ok_or_else(|| backend(format!("{}: seq {seq} indexed but missing", m.conv)))?;
            let entry: Entry = decode(raw.value())?;
            return Ok(Appended {
                entry: Arc::new(entry),
                duplicate: true,
                recipients,
            });
        }
        let (seq, server_time_ms) = self.next_slot(&m.conv, now_ms);
        let entry = self.write_next(m.entry_at(seq, server_time_ms))?;
        self.message_ids.insert(key, entry.seq).map_err(backend)?;
        Ok(Appended {
            entry,
            duplicate: false,
            recipients,
        })
    }

    fn user_cursor_map(&mut self, conv: &str) -> Result<&mut BTreeMap<String, Cursor>, StoreError> {
        let loaded = self.cache[conv].user_cursors.is_some();
        if !loaded {
            let mut map = BTreeMap::new();
            for row in self.user_cursors.range((conv, "")..).map_err(backend)? {
                let (k, v) = row.map_err(backend)?;
                let (c, user) = k.value();
                if c != conv {
                    break;
                }
                let (delivered, read) = v.value();
                map.insert(user.to_owned(), Cursor { delivered, read });
            }
            self.cache.get_mut(conv).expect("loaded").user_cursors = Some(map);
        }
        Ok(self
            .cache
            .get_mut(conv)
            .expect("loaded")
            .user_cursors
            .as_mut()
            .expect("loaded"))
    }

    /// Advances a device cursor and the user's cursor.
    pub fn ack(
        &mut self,
        conv: &str,
        user: &str,
        device: &str,
        delivered: Option<u64>,
        read: Option<u64>,
    ) -> Result<CursorUpdate, StoreError> {
        let cached = self.require(conv)?;
        let membership = cached.record.require_reader(user)?;
        let visible_max = cached.last_seq.min(membership.visible_until());
        let kind = cached.record.kind;
        let current = Arc::clone(&cached.current);
        let old = self
            .device_cursors
            .get((user, device, conv))
            .map_err(backend)?
            .map_or(Cursor::default(), |g| {
                let (delivered, read) = g.value();
                Cursor { delivered, read }
            });
        let mut new = old.advance(delivered, read, visible_max)?;
        if crate::mutants::active(crate::mutants::Mutant::ReceiptRegress) {
            new.delivered = delivered.unwrap_or(new.delivered).max(read.unwrap_or(0));
        }
        if new != old {
            self.device_cursors
                .insert((user, device, conv), (new.delivered, new.read))
                .map_err(backend)?;
        }
        let users = self.user_cursor_map(conv)?;
        let user_before = users.get(user).copied().unwrap_or_default();
        let mut user_after = user_before.max(new);
        if crate::mutants::active(crate::mutants::Mutant::ReceiptRegress) {
            user_after.delivered = new.delivered;
        }
        if user_after != user_before {
            users.insert(user.to_owned(), user_after);
            self.user_cursors
                .insert((conv, user), (user_after.delivered, user_after.read))
                .map_err(backend)?;
        }
        let users = self.cache[conv].user_cursors.as_ref().expect("loaded");
        let all_members =
            receipt_floor(kind, &current, user, user_after, |u| users.get(u).copied());
        Ok(CursorUpdate {
            device_before: old,
            device: new,
            user_before,
            user_after,
            all_members,
        })
    }

    /// Deletes up to `budget` entries older than `cutoff_ms`, oldest first per conversation.
    pub fn expire_before(&mut self, cutoff_ms: u64, budget: u32) -> Result<u64, StoreError> {
        let mut convs = Vec::new();
        for row in self.convs.iter().map_err(backend)? {
            convs.push(row.map_err(backend)?.0.value().to_owned());
        }
        let mut removed = 0u64;
        for conv in convs {
            let mut doomed = Vec::new();
            for row in self
                .entries
                .range((conv.as_str(), 0)..=(conv.as_str(), u64::MAX))
                .map_err(backend)?
            {
                if removed + doomed.len() as u64 >= u64::from(budget) {
                    break;
                }
                let (_, v) = row.map_err(backend)?;
                let entry: Entry = decode(v.value())?;
                if entry.server_time_ms >= cutoff_ms {
                    break; // Times never decrease within a conversation.
                }
                doomed.push(entry);
            }
            for entry in &doomed {
                self.entries
                    .remove((conv.as_str(), entry.seq))
                    .map_err(backend)?;
                if entry.body.is_message() {
                    let key = (
                        conv.as_str(),
                        entry.sender.as_str(),
                        entry.message_id.as_str(),
                    );
                    self.message_ids.remove(key).map_err(backend)?;
                }
            }
            removed += doomed.len() as u64;
            if removed >= u64::from(budget) {
                break;
            }
        }
        Ok(removed)
    }
}
