//! The ScyllaDB / Cassandra backend of [`Store`]: what lets several stateless chat
//! servers share one order per conversation.
//!
//! Sequencing across servers uses store-side conditional writes. Each
//! conversation has one `conversations` row holding its membership record, its
//! `last_seq` and its newest entry (`head_entry`). A server sequences entry
//! `N + 1` with a lightweight transaction (Paxos) `... IF last_seq = N` that
//! writes the new head; of two servers racing for the same seq exactly one wins
//! and the other re-reads and retries. The winner then copies the head into the
//! `entries` table ("roll-forward") before acknowledging. Should it crash in
//! between, the entry is still durable in the head row: any server rolls the
//! head forward before it sequences the next entry, and readers take a head
//! that is not yet in `entries` from the head row. So:
//!
//! - a seq exists only once its entry is durable (it is written by the LWT);
//! - every seq below `last_seq` is in `entries` (rolled forward before the CAS
//!   that moved past it), so what readers see has no holes;
//! - a retried message id finds its seq either in `message_ids` (rolled
//!   forward) or as the head, so a retry never creates a second message.
//!
//! Cursors are max-registers (each cell written `USING TIMESTAMP` = its value),
//! so acks arriving through different servers in any order never move one back.
//!
//! Expiry is by TTL (`--retention-secs`); `expire_before` has nothing to do.

mod statements;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use scylla::client::execution_profile::ExecutionProfile;
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::statement::prepared::PreparedStatement;
use scylla::statement::{Consistency, SerialConsistency};
use scylla::value::{CqlValue, Row};

use self::statements::Statements;
use crate::domain::{ConvRecord, Cursor, GroupChange};
use crate::protocol::{Body, ConvKind, Entry, ErrorCode, MemberAction, ProtocolError};
use crate::store::{Appended, ConvState, CursorUpdate, NewMessage, Store, StoreError};

/// The schema, applied at start-up (every statement is `IF NOT EXISTS`).
pub const SCHEMA_CQL: &str = include_str!("../../../schema/scylla.cql");

/// Width of a time bucket of the `entries` table: 7 days.
pub const BUCKET_MS: u64 = 7 * 24 * 3600 * 1000;

/// How often a server retries sequencing when other servers keep winning the race.
const SEQUENCE_ATTEMPTS_MAX: usize = 64;

/// Entries read per query while paging through buckets.
const READ_PAGE_MAX: u32 = 1000;

/// How to reach the cluster and lay out the keyspace.
#[derive(Debug, Clone)]
pub struct ScyllaConfig {
    /// Contact points, `host:port` (the driver discovers the rest of the cluster).
    pub nodes: Vec<String>,
    /// The keyspace (created if missing).
    pub keyspace: String,
    /// The keyspace's replication, as CQL, e.g.
    /// `{'class': 'NetworkTopologyStrategy', 'replication_factor': 3}`.
    pub replication: String,
    /// How long entries are kept (TTL).
    pub retention: Duration,
    /// Per-request timeout.
    pub request_timeout: Duration,
}

impl ScyllaConfig {
    /// A single-node development layout of `keyspace` on `nodes`.
    pub fn single_node(nodes: Vec<String>, keyspace: &str, retention: Duration) -> Self {
        Self {
            nodes,
            keyspace: keyspace.to_owned(),
            replication: "{'class': 'SimpleStrategy', 'replication_factor': 1}".to_owned(),
            retention,
            request_timeout: Duration::from_secs(10),
        }
    }
}

/// The Scylla/Cassandra-backed [`Store`]; many servers may share one keyspace.
pub struct ScyllaStore {
    session: Session,
    st: Statements,
    ttl_secs: i32,
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

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).expect("seqs and times fit in bigint")
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).expect("stored seqs and times are not negative")
}

fn bucket_of(server_time_ms: u64) -> i32 {
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

impl ScyllaStore {
    /// Connects, applies the schema and prepares every statement.
    ///
    /// Fails with a message naming the nodes when the cluster is unreachable.
    pub async fn connect(config: &ScyllaConfig) -> Result<Self, StoreError> {
        validate_keyspace(&config.keyspace)?;
        let profile = ExecutionProfile::builder()
            .consistency(Consistency::LocalQuorum)
            .serial_consistency(Some(SerialConsistency::LocalSerial))
            .request_timeout(Some(config.request_timeout))
            .build();
        let session = SessionBuilder::new()
            .known_nodes(&config.nodes)
            .connection_timeout(Duration::from_secs(5))
            .default_execution_profile_handle(profile.into_handle())
            .build()
            .await
            .map_err(|e| {
                backend(format!(
                    "cannot connect to Scylla/Cassandra at {}: {e}",
                    config.nodes.join(",")
                ))
            })?;
        apply_schema(&session, config).await?;
        let st = Statements::prepare(&session, &config.keyspace)
            .await
            .map_err(|e| backend(format!("preparing statements: {e}")))?;
        let ttl_secs = i32::try_from(config.retention.as_secs().max(1))
            .map_err(|_| backend("retention is too long for a CQL TTL (at most 68 years)"))?;
        Ok(Self {
            session,
            st,
            ttl_secs,
            crash_after_sequencing: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Fault injection for tests: the next entry this store sequences is left
    /// only in its head row, as if the server crashed right after the
    /// conditional write, and the call fails with `Backend`.
    pub fn inject_crash_after_sequencing(&self) {
        self.crash_after_sequencing.store(true, Ordering::SeqCst);
    }

    async fn rows(
        &self,
        statement: &PreparedStatement,
        values: impl scylla::serialize::row::SerializeRow,
    ) -> Result<scylla::response::query_result::QueryRowsResult, StoreError> {
        self.session
            .execute_unpaged(statement, values)
            .await
            .map_err(backend)?
            .into_rows_result()
            .map_err(backend)
    }

    async fn write(
        &self,
        statement: &PreparedStatement,
        values: impl scylla::serialize::row::SerializeRow,
    ) -> Result<(), StoreError> {
        self.session
            .execute_unpaged(statement, values)
            .await
            .map_err(backend)?;
        Ok(())
    }

    /// Runs a lightweight transaction; true if it applied.
    async fn lwt(
        &self,
        statement: &PreparedStatement,
        values: impl scylla::serialize::row::SerializeRow,
    ) -> Result<bool, StoreError> {
        let rows = self.rows(statement, values).await?;
        let row: Row = rows
            .maybe_first_row()
            .map_err(backend)?
            .ok_or_else(|| backend("a conditional write returned no [applied] row"))?;
        match row.columns.first() {
            Some(Some(CqlValue::Boolean(applied))) => Ok(*applied),
            other => Err(backend(format!(
                "a conditional write returned {other:?} for [applied]"
            ))),
        }
    }

    async fn head(&self, conv: &str) -> Result<Option<Head>, StoreError> {
        type HeadRow = (
            Option<String>,
            Option<i64>,
            Option<i64>,
            Option<String>,
            Option<bool>,
        );
        let rows = self.rows(&self.st.select_head, (conv,)).await?;
        let Some((record, last_seq, last_time_ms, entry, new_bucket)) =
            rows.maybe_first_row::<HeadRow>().map_err(backend)?
        else {
            return Ok(None);
        };
        let (Some(record), Some(last_seq), Some(entry)) = (record, last_seq, entry) else {
            return Err(backend(format!("{conv}: incomplete conversations row")));
        };
        let head = Head {
            record: decode(&record)?,
            last_seq: to_u64(last_seq),
            last_time_ms: to_u64(last_time_ms.unwrap_or(0)),
            entry: decode(&entry)?,
            new_bucket: new_bucket.unwrap_or(false),
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
        let seq = to_i64(entry.seq);
        let bucket = bucket_of(entry.server_time_ms);
        if new_bucket {
            let bucket_ttl = self.ttl_secs.saturating_add(2 * (BUCKET_MS / 1000) as i32);
            self.write(&self.st.insert_bucket, (conv, bucket, seq, bucket_ttl))
                .await?;
        }
        match &entry.body {
            Body::Text { .. } => {
                let ids = &self.st.insert_message_id;
                let key = (conv, entry.sender.as_str(), entry.message_id.as_str());
                self.write(ids, (key.0, key.1, key.2, seq, self.ttl_secs))
                    .await?;
            }
            Body::Members { users, .. } => {
                for user in users {
                    self.write(&self.st.insert_user_conv, (user.as_str(), conv))
                        .await?;
                }
            }
        }
        let json = encode(entry);
        self.write(
            &self.st.insert_entry,
            (conv, bucket, seq, json.as_str(), self.ttl_secs),
        )
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
        let applied = self
            .lwt(
                &self.st.advance_head,
                (
                    encode(record),
                    to_i64(entry.seq),
                    to_i64(entry.server_time_ms),
                    encode(entry),
                    new_bucket,
                    conv,
                    to_i64(head.last_seq),
                ),
            )
            .await?;
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
        let key = (m.conv.as_str(), m.sender.as_str(), m.message_id.as_str());
        let rows = self.rows(&self.st.select_message_id, key).await?;
        let Some((seq,)) = rows.maybe_first_row::<(i64,)>().map_err(backend)? else {
            return Ok(None);
        };
        let seq = to_u64(seq);
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
        let applied = self
            .lwt(
                &self.st.insert_conv,
                (
                    conv.as_str(),
                    encode(&record),
                    1_i64,
                    to_i64(now_ms),
                    encode(&entry),
                    true,
                ),
            )
            .await?;
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

    /// The buckets of `conv` as `(bucket, first_seq)`, ascending.
    async fn buckets(&self, conv: &str) -> Result<Vec<(i32, u64)>, StoreError> {
        let rows = self.rows(&self.st.select_buckets, (conv,)).await?;
        let mut out = Vec::new();
        for row in rows.rows::<(i32, i64)>().map_err(backend)? {
            let (bucket, first_seq) = row.map_err(backend)?;
            out.push((bucket, to_u64(first_seq)));
        }
        debug_assert!(out.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 < w[1].1));
        Ok(out)
    }

    async fn entry_rows(
        &self,
        statement: &PreparedStatement,
        values: impl scylla::serialize::row::SerializeRow,
    ) -> Result<Vec<Entry>, StoreError> {
        let rows = self.rows(statement, values).await?;
        let mut out = Vec::new();
        for row in rows.rows::<(String,)>().map_err(backend)? {
            out.push(decode(&row.map_err(backend)?.0)?);
        }
        Ok(out)
    }

    async fn user_cursor(&self, conv: &str, user: &str) -> Result<Cursor, StoreError> {
        let rows = self.rows(&self.st.select_user_cursor, (conv, user)).await?;
        let row = rows
            .maybe_first_row::<(Option<i64>, Option<i64>)>()
            .map_err(backend)?;
        Ok(cursor_of(row))
    }

    /// Max-register writes of the cells of `new` that moved past `old`.
    async fn write_cursor(
        &self,
        [delivered_st, read_st]: [&PreparedStatement; 2],
        old: Cursor,
        new: Cursor,
        key: (&str, &str, Option<&str>),
    ) -> Result<(), StoreError> {
        for (statement, before, after) in [
            (delivered_st, old.delivered, new.delivered),
            (read_st, old.read, new.read),
        ] {
            if after <= before {
                continue;
            }
            let v = to_i64(after);
            match key {
                (a, b, Some(c)) => self.write(statement, (v, v, a, b, c)).await?,
                (a, b, None) => self.write(statement, (v, v, a, b)).await?,
            }
        }
        Ok(())
    }
}

fn cursor_of(row: Option<(Option<i64>, Option<i64>)>) -> Cursor {
    let (delivered, read) = row.unwrap_or((None, None));
    Cursor {
        delivered: to_u64(delivered.unwrap_or(0)),
        read: to_u64(read.unwrap_or(0)),
    }
}

fn validate_keyspace(keyspace: &str) -> Result<(), StoreError> {
    let ok = !keyspace.is_empty()
        && keyspace.len() <= 48
        && keyspace.starts_with(|c: char| c.is_ascii_alphabetic())
        && keyspace
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(backend(format!(
            "invalid keyspace name {keyspace:?}: letters, digits and _, starting with a letter, at most 48"
        )))
    }
}

/// Runs every statement of [`SCHEMA_CQL`] with the configuration filled in.
async fn apply_schema(session: &Session, config: &ScyllaConfig) -> Result<(), StoreError> {
    let ttl = config.retention.as_secs().max(1);
    let cql = SCHEMA_CQL
        .replace("{keyspace}", &config.keyspace)
        .replace("{replication}", &config.replication)
        .replace("{ttl_secs}", &ttl.to_string())
        .replace(
            "{bucket_ttl_secs}",
            &(ttl + 2 * BUCKET_MS / 1000).to_string(),
        );
    let without_comments: String = cql
        .lines()
        .map(|line| line.split("--").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n");
    for statement in without_comments.split(';') {
        let statement = statement.trim();
        if statement.is_empty() {
            continue;
        }
        session
            .query_unpaged(statement, ())
            .await
            .map_err(|e| backend(format!("applying the schema ({statement:.60}...): {e}")))?;
    }
    session
        .await_schema_agreement()
        .await
        .map_err(|e| backend(format!("waiting for schema agreement: {e}")))?;
    Ok(())
}

#[async_trait]
impl Store for ScyllaStore {
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
        let old = {
            let rows = self
                .rows(&self.st.select_device_cursor, (user, device, conv))
                .await?;
            cursor_of(rows.maybe_first_row().map_err(backend)?)
        };
        let new = old.advance(delivered, read, visible_max)?;
        let device_statements = [&self.st.write_device_delivered, &self.st.write_device_read];
        self.write_cursor(device_statements, old, new, (user, device, Some(conv)))
            .await?;
        let user_before = self.user_cursor(conv, user).await?;
        let user_after = user_before.max(new);
        let user_statements = [&self.st.write_user_delivered, &self.st.write_user_read];
        self.write_cursor(user_statements, user_before, user_after, (conv, user, None))
            .await?;
        let all_members = if head.record.kind == ConvKind::Group {
            let rows = self.rows(&self.st.select_user_cursors, (conv,)).await?;
            let mut cursors = std::collections::HashMap::new();
            for row in rows
                .rows::<(String, Option<i64>, Option<i64>)>()
                .map_err(backend)?
            {
                let (u, d, r) = row.map_err(backend)?;
                cursors.insert(u, cursor_of(Some((d, r))));
            }
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
        let rows = self.rows(&self.st.select_user_convs, (user,)).await?;
        let mut ids = Vec::new();
        for row in rows.rows::<(String,)>().map_err(backend)? {
            ids.push(row.map_err(backend)?.0);
        }
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
        let buckets = self.buckets(conv).await?;
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
            let values = (conv, *bucket, to_i64(from), to_i64(until), want as i32);
            out.extend(
                self.entry_rows(&self.st.select_entries_after, values)
                    .await?,
            );
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
        let buckets = self.buckets(conv).await?;
        for (bucket, first) in buckets.iter().rev() {
            if newest_first.len() >= limit as usize {
                break;
            }
            let below = newest_first.last().map_or(before, |e| e.seq);
            if *first >= below {
                continue;
            }
            let want = (limit - newest_first.len() as u32).min(READ_PAGE_MAX);
            let values = (conv, *bucket, to_i64(below), want as i32);
            newest_first.extend(
                self.entry_rows(&self.st.select_entries_before, values)
                    .await?,
            );
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
        let rows = self
            .rows(&self.st.select_device_cursor, (user, device, conv))
            .await?;
        let row = rows
            .maybe_first_row::<(Option<i64>, Option<i64>)>()
            .map_err(backend)?;
        Ok(row.map(|r| cursor_of(Some(r))))
    }

    async fn expire_before(&self, _cutoff_ms: u64, _budget: u32) -> Result<u64, StoreError> {
        Ok(0) // Entries carry a TTL; the cluster deletes them.
    }
}
