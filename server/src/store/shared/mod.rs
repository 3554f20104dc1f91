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

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use tokio::sync::oneshot;

pub use self::tables::{CursorCell, HeadRow, TableOp, TableReply, Tables, TablesExt};
use crate::domain::{next_server_time, receipt_floor, ConvRecord, Cursor, GroupChange};
use crate::protocol::{Body, ConvKind, Entry, ErrorCode, ProtocolError};
use crate::store::{Appended, ConvState, CursorUpdate, NewMessage, Store, StoreError};

/// Width of a time bucket of the `entries` table: 7 days.
pub const BUCKET_MS: u64 = 7 * 24 * 3600 * 1000;

/// How often a server retries sequencing when other servers keep winning the race.
const SEQUENCE_ATTEMPTS_MAX: usize = 64;

/// The conversation whose head `/healthz` reads: no such conversation can exist.
const HEALTH_PROBE_CONV: &str = "health-probe";

/// Conversations remembered as rolled forward; beyond it the memo starts over.
const ROLLED_MEMO_MAX: usize = 100_000;

/// Most appends sequenced by one conditional write.
const BATCH_LEN_MAX: usize = 64;
/// Most message bytes in one conditional write (a head row must stay small).
const BATCH_BYTES_MAX: usize = 256 * 1024;

/// Entries read per query while paging through buckets.
const READ_PAGE_MAX: u32 = 1000;

/// Most passes of one `read_after` while other servers keep moving the head past
/// entries it had not read yet.
const READ_PASSES_MAX: usize = 8;

/// How one pass of `read_after` ended.
enum ReadPass {
    /// The entries, without a hole that is not expiry.
    Done(Vec<Entry>),
    /// The head moved past entries the pass had not found yet: every seq below
    /// `first` is in the entry tables now; read again.
    HeadMoved { first: u64 },
}

/// The shared [`Store`] over `T`; many servers may use the same tables at once.
pub struct SharedStore<T: ?Sized> {
    /// Conversation → highest seq this process rolled forward (a cache: saves the
    /// roll-forward of a head this server wrote itself).
    rolled: Mutex<HashMap<String, u64>>,
    /// Conversation → the lock its writers on this process take turns on.
    turns: Mutex<HashMap<String, std::sync::Weak<tokio::sync::Mutex<()>>>>,
    /// Conversation → appends waiting to be sequenced (in arrival order).
    queues: Mutex<HashMap<String, VecDeque<Job>>>,
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
    /// The entries the last conditional write added, ending with `last_seq`.
    entries: Vec<Entry>,
    /// The first of `entries` opens a new time bucket.
    new_bucket: bool,
}

/// One write of a roll-forward, not yet awaited.
type PendingWrite<'a> = Pin<Box<dyn Future<Output = Result<(), StoreError>> + Send + 'a>>;

/// A batch's outcome: per job, the new entries, and the recipients.
type BatchOutcome = (Vec<Outcome>, Vec<Arc<Entry>>, Arc<[String]>);

/// An append waiting for its turn; whoever holds the turn sequences it.
struct Job {
    message: NewMessage,
    now_ms: u64,
    reply: oneshot::Sender<Result<Appended, StoreError>>,
}

/// What became of one job of a batch.
enum Outcome {
    Rejected(StoreError),
    Original(Entry),
    New(usize),
    SameAsNew(usize),
}

/// Whether `entry` is the message `m` (same idempotency key).
fn same_message(entry: &Entry, m: &NewMessage) -> bool {
    entry.body.is_message() && entry.sender == m.sender && entry.message_id == m.message_id
}

impl<T: Tables + ?Sized> SharedStore<T> {
    /// The store over `tables` (which other stores, other servers, may share).
    pub fn new(tables: Arc<T>) -> Self {
        Self {
            rolled: Mutex::new(HashMap::new()),
            turns: Mutex::new(HashMap::new()),
            queues: Mutex::new(HashMap::new()),
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
            entries: decode(&row.entries)?,
            new_bucket: row.new_bucket,
        };
        let seqs: Vec<u64> = head.entries.iter().map(|e| e.seq).collect();
        assert!(
            seqs.last() == Some(&head.last_seq) && seqs.windows(2).all(|w| w[1] == w[0] + 1),
            "{conv}: head entries {seqs:?} must run up to last_seq {}",
            head.last_seq
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

    /// Copies `entries` (one conditional write's, consecutive) into the tables
    /// readers use; idempotent. The writes are independent and run concurrently;
    /// the entries count as rolled forward only once all of them succeeded.
    async fn roll_forward(&self, entries: &[Entry], new_bucket: bool) -> Result<(), StoreError> {
        let Some(last) = entries.last() else {
            return Ok(());
        };
        let conv = last.conv.as_str();
        let jsons: Vec<String> = entries.iter().map(encode).collect();
        let mut writes: Vec<PendingWrite<'_>> = Vec::new();
        for (i, (entry, json)) in entries.iter().zip(&jsons).enumerate() {
            let bucket = bucket_of(entry.server_time_ms);
            writes.push(Box::pin(
                self.tables.put_entry(conv, bucket, entry.seq, json),
            ));
            if new_bucket && i == 0 {
                writes.push(Box::pin(self.tables.put_bucket(conv, bucket, entry.seq)));
            }
            match &entry.body {
                Body::Text { .. } | Body::Image { .. } => {
                    writes.push(Box::pin(self.tables.put_message_id(
                        conv,
                        &entry.sender,
                        &entry.message_id,
                        entry.seq,
                    )));
                }
                Body::Members { users, .. } => {
                    for user in users {
                        writes.push(Box::pin(self.tables.put_user_conv(user, conv)));
                    }
                }
            }
        }
        futures_util::future::try_join_all(writes).await?;
        self.note_rolled(conv, last.seq);
        Ok(())
    }

    /// Waits until no other task of this process is sequencing in `conv`.
    ///
    /// Conditional writes resolve races between servers; within one server,
    /// taking turns keeps its writers from racing each other, so a hot
    /// conversation has at most one contender per server.
    async fn sequencing_turn(&self, conv: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = {
            let mut turns = self.turns.lock().expect("turns lock");
            if turns.len() >= ROLLED_MEMO_MAX {
                turns.retain(|_, lock| lock.strong_count() > 0);
            }
            let existing = turns.get(conv).and_then(std::sync::Weak::upgrade);
            existing.unwrap_or_else(|| {
                let lock = Arc::new(tokio::sync::Mutex::new(()));
                turns.insert(conv.to_owned(), Arc::downgrade(&lock));
                lock
            })
        };
        lock.lock_owned().await
    }

    /// One read of [`Store::read_after`]: the entry tables, then the head for what
    /// they lacked. Every seq below `rolled_below` was in the entry tables before
    /// this pass read them, so one missing there has expired.
    async fn read_after_pass(
        &self,
        conv: &str,
        after: u64,
        until: u64,
        limit: u32,
        rolled_below: u64,
    ) -> Result<ReadPass, StoreError> {
        // Streams of current members read "until forever" (u64::MAX).
        let until = until.min(i64::MAX as u64);
        if after >= until || limit == 0 {
            return Ok(ReadPass::Done(Vec::new()));
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
        // Only the head's entries may be missing (not rolled forward yet, or only
        // partly: their writes run concurrently). Keep the gap-free prefix and take
        // the rest of the head's range from its row.
        // A missing first entry is either expired (TTL: nothing to do) or part of
        // the head's range (taken from the head row below).
        let hole = if out.first().is_some_and(|e| e.seq != after + 1) {
            Some(0)
        } else {
            out.windows(2)
                .position(|w| w[1].seq != w[0].seq + 1)
                .map(|i| i + 1)
        };
        let short = out.last().map_or(after, |e| e.seq) < until && out.len() < limit as usize;
        if hole.is_some() || short {
            let whole = std::mem::take(&mut out);
            out.extend(whole.iter().take(hole.unwrap_or(whole.len())).cloned());
            let reached = out.last().map_or(after, |e| e.seq);
            let head = self.head(conv).await?;
            if let Some(head) = head {
                let first = head.entries[0].seq;
                if first <= reached + 1 && reached < head.last_seq {
                    self.ensure_rolled(&head).await?;
                    out.extend(
                        head.entries
                            .into_iter()
                            .filter(|e| e.seq > reached && e.seq <= until),
                    );
                } else if first > reached + 1 && reached + 1 >= rolled_below {
                    // Seqs `reached + 1 .. first` exist, and below the head everything
                    // is rolled forward now; but the entry tables were read before the
                    // head, while a roll-forward of those seqs may still have been
                    // landing (its writes go concurrently). Read them again.
                    return Ok(ReadPass::HeadMoved { first });
                } else {
                    // What is missing below the head was in the tables before they
                    // were read: it expired, at the start of the range; keep what was read.
                    debug_assert!(
                        hole.is_none_or(|i| i == 0),
                        "{conv}: a hole below the head's entries (first {first}, after {reached})"
                    );
                    out = whole;
                }
            }
        }
        debug_assert!(out.windows(2).all(|w| w[0].seq < w[1].seq));
        out.truncate(limit as usize);
        Ok(ReadPass::Done(out))
    }

    /// Remembers that this process rolled `conv` forward through `seq`.
    fn note_rolled(&self, conv: &str, seq: u64) {
        let mut rolled = self.rolled.lock().expect("rolled lock");
        if rolled.len() >= ROLLED_MEMO_MAX && !rolled.contains_key(conv) {
            rolled.clear();
        }
        let through = rolled.entry(conv.to_owned()).or_default();
        *through = (*through).max(seq);
    }

    /// Rolls the head forward unless this process already did (a seq names one
    /// entry forever, so having rolled forward that seq is enough).
    async fn ensure_rolled(&self, head: &Head) -> Result<(), StoreError> {
        let conv = head.record.id.as_str();
        let through = self.rolled.lock().expect("rolled lock").get(conv).copied();
        if through.is_some_and(|t| t >= head.last_seq) {
            return Ok(());
        }
        self.roll_forward(&head.entries, head.new_bucket).await
    }

    /// Makes `entries` (seqs `head.last_seq + 1 ..`, one server time) the new
    /// head unless another server moved the head first; true if it did. On
    /// success the entries are rolled forward.
    async fn try_advance(
        &self,
        head: &Head,
        record: &ConvRecord,
        entries: &[Entry],
    ) -> Result<bool, StoreError> {
        let conv = head.record.id.as_str();
        let first = entries.first().expect("something to sequence");
        let last = entries.last().expect("something to sequence");
        assert_eq!(first.seq, head.last_seq + 1, "{conv}: next seq");
        assert!(
            entries.windows(2).all(|w| w[1].seq == w[0].seq + 1),
            "{conv}: consecutive seqs"
        );
        assert!(first.server_time_ms >= head.last_time_ms, "{conv}: time");
        assert!(
            entries
                .iter()
                .all(|e| e.server_time_ms == first.server_time_ms),
            "{conv}: one write, one time"
        );
        // Everything below the new head must be readable before it exists.
        self.ensure_rolled(head).await?;
        let new_bucket = bucket_of(first.server_time_ms) != bucket_of(head.last_time_ms);
        let row = HeadRow {
            record: encode(record),
            last_seq: last.seq,
            last_time_ms: last.server_time_ms,
            entries: encode(&entries),
            new_bucket,
        };
        let applied = self.tables.advance_head(conv, head.last_seq, &row).await?;
        if applied {
            if self.crash_after_sequencing.swap(false, Ordering::SeqCst) {
                return Err(backend(
                    "injected crash between sequencing and roll-forward",
                ));
            }
            self.roll_forward(entries, new_bucket).await?;
        }
        Ok(applied)
    }

    /// The entry a message id was given, if it was sequenced before the head
    /// (every such entry is rolled forward and indexed) or by the head's write.
    async fn find_message(&self, head: &Head, m: &NewMessage) -> Result<Option<Entry>, StoreError> {
        if let Some(entry) = head.entries.iter().find(|e| same_message(e, m)) {
            return Ok(Some(entry.clone()));
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

    /// Takes the jobs waiting in `conv`, oldest first, up to the batch limits.
    fn take_batch(&self, conv: &str) -> Vec<Job> {
        let mut queues = self.queues.lock().expect("queues lock");
        let Some(queue) = queues.get_mut(conv) else {
            return Vec::new();
        };
        let mut batch = Vec::new();
        let mut bytes = 0;
        while let Some(job) = queue.front() {
            let size = job.message.body.payload_len();
            if !batch.is_empty() && (batch.len() >= BATCH_LEN_MAX || bytes + size > BATCH_BYTES_MAX)
            {
                break;
            }
            bytes += size;
            batch.push(queue.pop_front().expect("front exists"));
        }
        if queue.is_empty() {
            queues.remove(conv);
        }
        batch
    }

    /// Sequences a batch of appends with as few conditional writes as the races
    /// allow (one, without contention) and answers every job.
    async fn sequence_batch(&self, conv: &str, jobs: Vec<Job>) {
        let outcome = self.try_sequence_batch(conv, &jobs).await;
        for (i, job) in jobs.into_iter().enumerate() {
            let reply = match &outcome {
                Err(e) => Err(e.clone()),
                Ok((outcomes, entries, recipients)) => match &outcomes[i] {
                    Outcome::Rejected(e) => Err(e.clone()),
                    Outcome::Original(entry) => Ok(Appended {
                        entry: Arc::new(entry.clone()),
                        duplicate: true,
                        recipients: Arc::clone(recipients),
                    }),
                    Outcome::New(k) | Outcome::SameAsNew(k) => Ok(Appended {
                        entry: Arc::clone(&entries[*k]),
                        duplicate: matches!(outcomes[i], Outcome::SameAsNew(_)),
                        recipients: Arc::clone(recipients),
                    }),
                },
            };
            let _ = job.reply.send(reply);
        }
    }

    async fn try_sequence_batch(
        &self,
        conv: &str,
        jobs: &[Job],
    ) -> Result<BatchOutcome, StoreError> {
        for _ in 0..SEQUENCE_ATTEMPTS_MAX {
            // Read the head first: the index then covers every seq below it.
            let head = self.require_head(conv).await?;
            let recipients: Arc<[String]> = head.record.current_members().into();
            let lookups = jobs.iter().map(|j| self.find_message(&head, &j.message));
            let found = futures_util::future::try_join_all(lookups).await?;
            let now_ms = jobs.iter().map(|j| j.now_ms).max().unwrap_or(0);
            let server_time_ms = next_server_time(now_ms, head.last_time_ms);
            let mut outcomes = Vec::with_capacity(jobs.len());
            let mut entries: Vec<Entry> = Vec::new();
            let mut in_batch: HashMap<(&str, &str), usize> = HashMap::new();
            for (job, found) in jobs.iter().zip(found) {
                let m = &job.message;
                if let Err(e) = head.record.require_member(&m.sender) {
                    outcomes.push(Outcome::Rejected(e.into()));
                } else if let Some(original) = found {
                    outcomes.push(Outcome::Original(original));
                } else if let Some(k) = in_batch.get(&(m.sender.as_str(), m.message_id.as_str())) {
                    outcomes.push(Outcome::SameAsNew(*k));
                } else {
                    in_batch.insert((m.sender.as_str(), m.message_id.as_str()), entries.len());
                    outcomes.push(Outcome::New(entries.len()));
                    let seq = head.last_seq + 1 + entries.len() as u64;
                    entries.push(m.entry_at(seq, server_time_ms));
                }
            }
            if entries.is_empty() || self.try_advance(&head, &head.record, &entries).await? {
                let entries = entries.into_iter().map(Arc::new).collect();
                return Ok((outcomes, entries, recipients));
            }
        }
        Err(Self::lost_races(conv))
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
        let entry = record.create_entry(device, now_ms);
        let row = HeadRow {
            record: encode(&record),
            last_seq: 1,
            last_time_ms: now_ms,
            entries: encode(&[&entry]),
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
            // The creator may have crashed before rolling its entry forward.
            self.ensure_rolled(&existing).await?;
            let state = ConvState {
                record: existing.record,
                last_seq: existing.last_seq,
            };
            return Ok((state, None));
        }
        self.roll_forward(std::slice::from_ref(&entry), true)
            .await?;
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
        let _turn = self.sequencing_turn(conv).await;
        for _ in 0..SEQUENCE_ATTEMPTS_MAX {
            let head = self.require_head(conv).await?;
            let mut record = head.record.clone();
            let seq = head.last_seq + 1;
            let server_time_ms = next_server_time(now_ms, head.last_time_ms);
            let (entry, recipients) =
                record.change_entry(by, device, &change, seq, members_max, server_time_ms)?;
            if self
                .try_advance(&head, &record, std::slice::from_ref(&entry))
                .await?
            {
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
        let conv = m.conv.clone();
        let (reply, mut answer) = oneshot::channel();
        self.queues
            .lock()
            .expect("queues lock")
            .entry(conv.clone())
            .or_default()
            .push_back(Job {
                message: m,
                now_ms,
                reply,
            });
        // Group commit per conversation: whoever gets the turn sequences
        // everything waiting, usually with one conditional write.
        loop {
            let turn = self.sequencing_turn(&conv).await;
            match answer.try_recv() {
                Ok(result) => return result,
                Err(oneshot::error::TryRecvError::Closed) => {
                    return Err(backend("the append was abandoned while queued; retry"))
                }
                Err(oneshot::error::TryRecvError::Empty) => {}
            }
            let batch = self.take_batch(&conv);
            if !batch.is_empty() {
                self.sequence_batch(&conv, batch).await;
            }
            drop(turn);
        }
    }

    async fn ack(
        &self,
        conv: &str,
        user: &str,
        device: &str,
        delivered: Option<u64>,
        read: Option<u64>,
    ) -> Result<CursorUpdate, StoreError> {
        // Independent reads at once; then the two max-register writes at once.
        let (head, old, user_before, members) = futures_util::future::try_join4(
            self.require_head(conv),
            self.tables.device_cursor(user, device, conv),
            self.tables.user_cursor(conv, user),
            self.tables.user_cursors(conv),
        )
        .await?;
        let membership = head.record.require_reader(user)?;
        let visible_max = head.last_seq.min(membership.visible_until());
        let old = old.unwrap_or_default();
        let new = old.advance(delivered, read, visible_max)?;
        let user_after = user_before.max(new);
        // The device's cursor first, then the user's: an ack that failed between
        // the two moves the user's cursor when retried, so its receipts go out
        // then (see `ChatService::ack`).
        self.raise_cursor(old, new, (user, device, Some(conv)))
            .await?;
        self.raise_cursor(user_before, user_after, (conv, user, None))
            .await?;
        // Only a group's floor reads the members' cursors.
        let group = head.record.kind == ConvKind::Group;
        let cursors: Option<HashMap<String, Cursor>> = group.then(|| members.into_iter().collect());
        let all_members = receipt_floor(
            head.record.kind,
            &head.record.current_members(),
            user,
            user_after,
            |u| cursors.as_ref()?.get(u).copied(),
        );
        Ok(CursorUpdate {
            device_before: old,
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

    async fn conversation_ids_of(&self, user: &str) -> Result<Vec<String>, StoreError> {
        self.tables.user_convs(user).await
    }

    async fn conversations_of(&self, user: &str) -> Result<Vec<ConvState>, StoreError> {
        let ids = self.tables.user_convs(user).await?;
        // One head read per conversation, 64 at a time (a hello's first round trips).
        let mut out = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(64) {
            let heads = chunk.iter().map(|id| self.conversation(id));
            out.extend(
                futures_util::future::try_join_all(heads)
                    .await?
                    .into_iter()
                    .flatten(),
            );
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
        let mut rolled_below = 0;
        for _ in 0..READ_PASSES_MAX {
            match self
                .read_after_pass(conv, after, until, limit, rolled_below)
                .await?
            {
                ReadPass::Done(entries) => return Ok(entries),
                ReadPass::HeadMoved { first } => rolled_below = first,
            }
        }
        Err(StoreError::Backend(format!(
            "{conv}: reading after {after}: the head moved past unread entries {READ_PASSES_MAX} times"
        )))
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
            if head.entries[0].seq < before {
                // The head's entries may not be rolled forward yet: take them from its row.
                self.ensure_rolled(&head).await?;
                newest_first.extend(head.entries.into_iter().rev().filter(|e| e.seq < before));
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

    async fn device_cursor(
        &self,
        user: &str,
        device: &str,
        conv: &str,
    ) -> Result<Option<Cursor>, StoreError> {
        self.tables.device_cursor(user, device, conv).await
    }

    async fn user_cursor(&self, conv: &str, user: &str) -> Result<Cursor, StoreError> {
        self.tables.user_cursor(conv, user).await
    }

    async fn user_cursors(&self, conv: &str) -> Result<Vec<(String, Cursor)>, StoreError> {
        self.tables.user_cursors(conv).await
    }

    async fn record_last_seen(&self, user: &str, at_ms: u64) -> Result<(), StoreError> {
        self.tables.raise_last_seen(user, at_ms).await
    }

    async fn last_seen(&self, users: &[String]) -> Result<Vec<Option<u64>>, StoreError> {
        let reads = users.iter().map(|u| self.tables.last_seen(u));
        futures_util::future::try_join_all(reads).await
    }

    /// One read of a conversation head no client can create (conversation ids
    /// start with `d:` or `g:`): healthy while the store answers reads.
    async fn health(&self) -> Result<(), String> {
        match self.tables.head(HEALTH_PROBE_CONV).await {
            Ok(_) => Ok(()),
            Err(e) => Err(e.to_string()),
        }
    }

    async fn expire_before(&self, _cutoff_ms: u64, _budget: u32) -> Result<u64, StoreError> {
        Ok(0) // Entries carry a TTL; the backend deletes them.
    }
}
