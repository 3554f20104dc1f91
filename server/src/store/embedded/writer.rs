//! The writer thread: applies write operations in groups inside one redb write
//! transaction and makes each group durable with one fsync of its journal record
//! (group commit; see [`super::journal`]), checkpointing the tables now and then.
//!
//! It owns an in-memory cache of each conversation's record and last seq, so
//! sequencing costs no read; the cache is dropped whenever a commit fails.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use redb::{Database, Durability, ReadableTable, WriteTransaction};
use tokio::sync::mpsc;

use super::journal;
use super::redo::Redo;
use super::slot::{DatabaseSlot, StoreFiles};
use super::tables::{Tables, META};
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
    drop(Tables::open(&txn)?);
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

/// When the writer checkpoints: after this many journal groups since the last
/// checkpoint, or this many journal bytes, whichever comes first. A checkpoint
/// flushes every table page dirtied since the one before with an fsync; between
/// checkpoints the journal alone is synced. The simulator checkpoints every few
/// groups, so that its faults strike checkpoints, restarts and replays alike.
pub const CHECKPOINT_GROUPS: u32 = if cfg!(madsim) { 8 } else { 256 };
/// See [`CHECKPOINT_GROUPS`].
pub const CHECKPOINT_BYTES: usize = 8 << 20;

/// The writer's state between groups.
#[derive(Default)]
pub struct Writer {
    cache: HashMap<String, CachedConv>,
    groups_since_checkpoint: u32,
    bytes_since_checkpoint: usize,
}

/// The writer loop on an OS thread: runs until every sender of `ops` is dropped.
#[cfg(not(madsim))]
pub fn run(slot: &DatabaseSlot, mut ops: mpsc::UnboundedReceiver<WriteOp>) {
    let mut writer = Writer::default();
    while let Some(first) = ops.blocking_recv() {
        writer.commit_group(slot, take_group(first, &mut ops));
    }
}

/// The writer loop as a task (the simulator forbids OS threads).
#[cfg(madsim)]
pub async fn run_task(slot: &DatabaseSlot, mut ops: mpsc::UnboundedReceiver<WriteOp>) {
    let mut writer = Writer::default();
    while let Some(first) = ops.recv().await {
        let group = take_group(first, &mut ops);
        if crate::mutants::active(crate::mutants::Mutant::AckBeforeDurable) {
            writer.commit_group_acking_first(slot, group).await;
            continue;
        }
        writer.commit_group(slot, group);
        // Let the callers run before the next group, as the thread would.
        tokio::task::yield_now().await;
    }
}

/// Runs every write of `batch` inside `txn`; returns their completions, the
/// group's redo records and, if one hit a backend error, why the whole group
/// must be aborted.
fn apply_group(
    txn: &WriteTransaction,
    cache: &mut HashMap<String, CachedConv>,
    batch: Vec<WriteOp>,
) -> (Vec<Completion>, Vec<u8>, Option<String>) {
    let mut completions = Vec::with_capacity(batch.len());
    match WriteCtx::open(txn, cache) {
        Ok(mut ctx) => {
            for op in batch {
                completions.push(op(&mut ctx));
            }
            (completions, ctx.redo, ctx.failed)
        }
        Err(e) => (completions, Vec::new(), Some(e.to_string())),
    }
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

impl Writer {
    /// Commits `batch` as one group; each write's completion learns the outcome.
    /// The group is durable once its journal record is (see [`super::journal`]);
    /// the tables' transaction commits after that, so readers never see a write
    /// a crash could take back. A failed commit closes the database (redb
    /// refuses everything after an I/O error until reopened); the next group
    /// reopens it first, which replays the journal, and while it cannot, groups
    /// are dropped unrun, which fails each caller: nothing is acknowledged while
    /// the store is down.
    fn commit_group(&mut self, slot: &DatabaseSlot, batch: Vec<WriteOp>) {
        if !slot.reopen() {
            return;
        }
        let files = match slot.get() {
            Ok(files) => files,
            Err(e) => {
                tracing::error!(error = %e, "the store is closed");
                return;
            }
        };
        let txn = match begin(&files.main) {
            Ok(txn) => txn,
            Err(e) => {
                tracing::error!(error = %e, "cannot begin a write transaction");
                slot.close_after(&e.to_string());
                return;
            }
        };
        let (completions, redo, failed) = apply_group(&txn, &mut self.cache, batch);
        let outcome = match failed {
            Some(why) => {
                let _ = txn.abort();
                Err(StoreError::Backend(why))
            }
            None => self.commit(&files, txn, &redo),
        };
        drop(files);
        if let Err(e) = &outcome {
            tracing::error!(error = %e, "group commit failed; nothing in it was acknowledged");
            self.forget();
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

    /// The `AckBeforeDurable` mutant: acknowledge, give a crash time to strike, then commit.
    #[cfg(madsim)]
    async fn commit_group_acking_first(&mut self, slot: &DatabaseSlot, batch: Vec<WriteOp>) {
        if !slot.reopen() {
            return;
        }
        let Ok(files) = slot.get() else { return };
        let Ok(txn) = begin(&files.main) else { return };
        let (completions, redo, failed) = apply_group(&txn, &mut self.cache, batch);
        for complete in completions {
            complete(Ok(()));
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        if failed.is_some() || self.commit(&files, txn, &redo).is_err() {
            self.forget();
        }
    }

    /// Makes `redo` durable in the journal, then commits `txn` (the same changes
    /// to the tables): without an fsync, or as a checkpoint when one is due.
    fn commit(
        &mut self,
        files: &StoreFiles,
        mut txn: WriteTransaction,
        redo: &[u8],
    ) -> Result<(), StoreError> {
        if redo.is_empty() {
            // Nothing changed (reads, duplicates, refusals): nothing to make durable.
            return txn.abort().map_err(backend);
        }
        let mut journal = files.journal.lock().expect("journal lock");
        let lsn = journal.append(redo)?;
        self.groups_since_checkpoint += 1;
        self.bytes_since_checkpoint += redo.len();
        let checkpoint = self.groups_since_checkpoint >= CHECKPOINT_GROUPS
            || self.bytes_since_checkpoint >= CHECKPOINT_BYTES;
        if checkpoint {
            let mut meta = txn.open_table(META).map_err(backend)?;
            meta.insert(journal::APPLIED_KEY, lsn).map_err(backend)?;
        } else {
            txn.set_durability(Durability::None).map_err(backend)?;
        }
        txn.commit().map_err(backend)?;
        if checkpoint {
            journal.restart();
            self.groups_since_checkpoint = 0;
            self.bytes_since_checkpoint = 0;
        }
        Ok(())
    }

    /// Drops what the writer remembers of the tables: after a failure they are
    /// read again from the store once it reopens.
    fn forget(&mut self) {
        self.cache.clear();
        self.groups_since_checkpoint = 0;
        self.bytes_since_checkpoint = 0;
    }
}

/// The open tables of one group's transaction, the group's redo records so far,
/// and the writer's cache.
pub struct WriteCtx<'t> {
    tables: Tables<'t>,
    /// Every change made to `tables`, as journal records.
    redo: Vec<u8>,
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
            tables: Tables::open(txn)?,
            redo: Vec::new(),
            cache,
            failed: None,
        })
    }

    /// Makes one change to the tables and journals it; true when it replaced a value.
    fn put(&mut self, change: Redo<'_>) -> Result<bool, StoreError> {
        let replaced = change.apply(&mut self.tables)?;
        change.encode(&mut self.redo);
        Ok(replaced)
    }

    /// Raises `user`'s last-seen time to `at_ms`; a lower value changes nothing.
    pub fn raise_last_seen(&mut self, user: &str, at_ms: u64) -> Result<(), StoreError> {
        let current = self
            .tables
            .last_seen
            .get(user)
            .map_err(backend)?
            .map(|g| g.value());
        if current.is_none_or(|c| c < at_ms) {
            self.put(Redo::LastSeen { user, at_ms })?;
        }
        Ok(())
    }

    /// Loads `conv` into the cache; false if it does not exist.
    fn load(&mut self, conv: &str) -> Result<bool, StoreError> {
        if self.cache.contains_key(conv) {
            return Ok(true);
        }
        let Some(raw) = self.tables.convs.get(conv).map_err(backend)? else {
            return Ok(false);
        };
        let record: ConvRecord = decode(raw.value())?;
        drop(raw);
        let (mut last_seq, last_time_ms) = self
            .tables
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
        let last_seq = self
            .cache
            .get(conv)
            .expect("sequence on a loaded conversation")
            .last_seq;
        assert_eq!(seq, last_seq + 1, "{conv}: the next seq");
        let bytes = encode(&entry);
        let prior = self.put(Redo::Entry {
            conv,
            seq,
            bytes: &bytes,
        })?;
        let reuse_allowed = crate::mutants::active(crate::mutants::Mutant::SeqReuseAfterRestart);
        assert!(!prior || reuse_allowed, "{conv}: seq {seq} allocated twice");
        let time_ms = entry.server_time_ms;
        self.put(Redo::Seq { conv, seq, time_ms })?;
        let cached = self.cache.get_mut(conv).expect("loaded");
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
        self.put(Redo::Conv {
            conv: &conv,
            bytes: &encode(&record),
        })?;
        for user in record.members.keys() {
            self.put(Redo::UserConv { user, conv: &conv })?;
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
        self.put(Redo::Conv {
            conv,
            bytes: &encode(&record),
        })?;
        // The users the change names list the conversation (added ones newly).
        if let Body::Members { users, .. } = &entry.body {
            for user in users {
                self.put(Redo::UserConv { user, conv })?;
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
            .tables
            .message_ids
            .get(key)
            .map_err(backend)?
            .map(|g| g.value())
            .filter(|_| !crate::mutants::active(crate::mutants::Mutant::SkipIdempotency));
        if let Some(seq) = seen {
            let raw = self
                .tables
                .entries
                .get((m.conv.as_str(), seq))
                .map_err(backend)?;
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
        self.put(Redo::MessageId {
            conv: &m.conv,
            sender: &m.sender,
            id: &m.message_id,
            seq: entry.seq,
        })?;
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
            for row in self
                .tables
                .user_cursors
                .range((conv, "")..)
                .map_err(backend)?
            {
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
            .tables
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
            self.put(Redo::DeviceCursor {
                user,
                device,
                conv,
                cursor: (new.delivered, new.read),
            })?;
        }
        let users = self.user_cursor_map(conv)?;
        let user_before = users.get(user).copied().unwrap_or_default();
        let mut user_after = user_before.max(new);
        if crate::mutants::active(crate::mutants::Mutant::ReceiptRegress) {
            user_after.delivered = new.delivered;
        }
        if user_after != user_before {
            users.insert(user.to_owned(), user_after);
            self.put(Redo::UserCursor {
                conv,
                user,
                cursor: (user_after.delivered, user_after.read),
            })?;
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
        for row in self.tables.convs.iter().map_err(backend)? {
            convs.push(row.map_err(backend)?.0.value().to_owned());
        }
        let mut removed = 0u64;
        for conv in convs {
            let mut doomed = Vec::new();
            for row in self
                .tables
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
                self.put(Redo::RemoveEntry {
                    conv: &conv,
                    seq: entry.seq,
                })?;
                if entry.body.is_message() {
                    self.put(Redo::RemoveMessageId {
                        conv: &conv,
                        sender: &entry.sender,
                        id: &entry.message_id,
                    })?;
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
