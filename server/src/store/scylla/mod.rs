//! The Scylla/Cassandra backend: [`Tables`] over CQL, for [`SharedStore`]: each
//! [`TableOp`] runs one prepared statement.
//!
//! Schema: `server/schema/scylla.cql`, applied at start-up. Every statement is
//! prepared (so the driver routes it to a replica owning its partition:
//! token-aware routing) and every plain write is idempotent (so the driver may
//! retry it). The head row's conditional writes are lightweight transactions
//! (Paxos, serial consistency LOCAL_SERIAL); everything else runs at
//! LOCAL_QUORUM. Cursor cells are max-registers: each is written
//! `USING TIMESTAMP` equal to its value, so the highest value wins whatever the
//! order writes arrive in.

mod statements;

use std::time::Duration;

use async_trait::async_trait;
use scylla::client::execution_profile::ExecutionProfile;
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::serialize::row::SerializeRow;
use scylla::statement::prepared::PreparedStatement;
use scylla::statement::{Consistency, SerialConsistency};
use scylla::value::{CqlValue, Row};

use self::statements::Statements;
use crate::domain::Cursor;
use crate::store::shared::{
    CursorCell, HeadRow, SharedStore, TableOp, TableReply, Tables, BUCKET_MS,
};
use crate::store::StoreError;

/// The schema, applied at start-up (every statement is `IF NOT EXISTS`).
pub const SCHEMA_CQL: &str = include_str!("../../../schema/scylla.cql");

/// The shared store on Scylla/Cassandra.
pub type ScyllaStore = SharedStore<CqlTables>;

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

/// [`Tables`] on a Scylla/Cassandra session.
pub struct CqlTables {
    session: Session,
    st: Statements,
    ttl_secs: i32,
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).expect("seqs and times fit in bigint")
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).expect("stored seqs and times are not negative")
}

/// The `delivered_seq, read_seq` columns of a cursor row.
type CursorColumns = (Option<i64>, Option<i64>);

fn cursor_of(row: Option<CursorColumns>) -> Cursor {
    let (delivered, read) = row.unwrap_or((None, None));
    Cursor {
        delivered: to_u64(delivered.unwrap_or(0)),
        read: to_u64(read.unwrap_or(0)),
    }
}

impl SharedStore<CqlTables> {
    /// Connects, applies the schema and prepares every statement.
    ///
    /// Fails with a message naming the nodes when the cluster is unreachable.
    pub async fn connect(config: &ScyllaConfig) -> Result<Self, StoreError> {
        Ok(Self::new(std::sync::Arc::new(
            CqlTables::connect(config).await?,
        )))
    }
}

impl CqlTables {
    /// Connects, applies the schema and prepares every statement.
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
        })
    }

    async fn rows(
        &self,
        statement: &PreparedStatement,
        values: impl SerializeRow,
    ) -> Result<scylla::response::query_result::QueryRowsResult, StoreError> {
        self.session
            .execute_unpaged(statement, values)
            .await
            .map_err(backend)?
            .into_rows_result()
            .map_err(backend)
    }

    /// Runs an unconditional write; `Done` once the replicas took it.
    async fn write(
        &self,
        statement: &PreparedStatement,
        values: impl SerializeRow,
    ) -> Result<TableReply, StoreError> {
        self.session
            .execute_unpaged(statement, values)
            .await
            .map_err(backend)?;
        Ok(TableReply::Done)
    }

    /// Runs a lightweight transaction; true if it applied.
    async fn lwt(
        &self,
        statement: &PreparedStatement,
        values: impl SerializeRow,
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

    async fn strings(
        &self,
        statement: &PreparedStatement,
        values: impl SerializeRow,
    ) -> Result<Vec<String>, StoreError> {
        let rows = self.rows(statement, values).await?;
        let mut out = Vec::new();
        for row in rows.rows::<(String,)>().map_err(backend)? {
            out.push(row.map_err(backend)?.0);
        }
        Ok(out)
    }

    async fn head(&self, conv: &str) -> Result<Option<HeadRow>, StoreError> {
        type Columns = (
            Option<String>,
            Option<i64>,
            Option<i64>,
            Option<String>,
            Option<bool>,
        );
        let rows = self.rows(&self.st.select_head, (conv,)).await?;
        let Some((record, last_seq, last_time_ms, entries, new_bucket)) =
            rows.maybe_first_row::<Columns>().map_err(backend)?
        else {
            return Ok(None);
        };
        let (Some(record), Some(last_seq), Some(entries)) = (record, last_seq, entries) else {
            return Err(backend(format!("{conv}: incomplete conversations row")));
        };
        Ok(Some(HeadRow {
            record,
            last_seq: to_u64(last_seq),
            last_time_ms: to_u64(last_time_ms.unwrap_or(0)),
            entries,
            new_bucket: new_bucket.unwrap_or(false),
        }))
    }

    async fn buckets(&self, conv: &str) -> Result<Vec<(i32, u64)>, StoreError> {
        let rows = self.rows(&self.st.select_buckets, (conv,)).await?;
        let mut out = Vec::new();
        for row in rows.rows::<(i32, i64)>().map_err(backend)? {
            let (bucket, first_seq) = row.map_err(backend)?;
            out.push((bucket, to_u64(first_seq)));
        }
        Ok(out)
    }

    async fn user_cursors(&self, conv: &str) -> Result<Vec<(String, Cursor)>, StoreError> {
        let rows = self.rows(&self.st.select_user_cursors, (conv,)).await?;
        let mut out = Vec::new();
        for row in rows
            .rows::<(String, Option<i64>, Option<i64>)>()
            .map_err(backend)?
        {
            let (user, delivered, read) = row.map_err(backend)?;
            out.push((user, cursor_of(Some((delivered, read)))));
        }
        Ok(out)
    }
}

#[async_trait]
impl Tables for CqlTables {
    async fn call(&self, op: TableOp) -> Result<TableReply, StoreError> {
        use TableOp as Op;
        use TableReply as R;
        let st = &self.st;
        let ttl = self.ttl_secs;
        Ok(match op {
            Op::Head { conv } => R::Head(self.head(&conv).await?),
            Op::InsertHead { conv, row } => {
                let HeadRow {
                    record,
                    last_seq,
                    last_time_ms,
                    entries,
                    new_bucket,
                } = row;
                let values = (
                    conv,
                    record,
                    to_i64(last_seq),
                    to_i64(last_time_ms),
                    entries,
                    new_bucket,
                );
                R::Applied(self.lwt(&st.insert_conv, values).await?)
            }
            Op::AdvanceHead {
                conv,
                expected_last_seq,
                row,
            } => {
                let values = (
                    row.record,
                    to_i64(row.last_seq),
                    to_i64(row.last_time_ms),
                    row.entries,
                    row.new_bucket,
                    conv,
                    to_i64(expected_last_seq),
                );
                R::Applied(self.lwt(&st.advance_head, values).await?)
            }
            Op::PutEntry {
                conv,
                bucket,
                seq,
                entry,
            } => {
                let values = (conv, bucket, to_i64(seq), entry, ttl);
                self.write(&st.insert_entry, values).await?
            }
            Op::PutBucket {
                conv,
                bucket,
                first_seq,
            } => {
                // A bucket outlives its entries: readers find the bucket of any live entry.
                let bucket_ttl = ttl.saturating_add(2 * (BUCKET_MS / 1000) as i32);
                let values = (conv, bucket, to_i64(first_seq), bucket_ttl);
                self.write(&st.insert_bucket, values).await?
            }
            Op::PutMessageId {
                conv,
                sender,
                message_id,
                seq,
            } => {
                let values = (conv, sender, message_id, to_i64(seq), ttl);
                self.write(&st.insert_message_id, values).await?
            }
            Op::PutUserConv { user, conv } => {
                self.write(&st.insert_user_conv, (user, conv)).await?
            }
            Op::Buckets { conv } => R::Buckets(self.buckets(&conv).await?),
            Op::EntriesAfter {
                conv,
                bucket,
                after,
                until,
                limit,
            } => {
                let limit = i32::try_from(limit).unwrap_or(i32::MAX);
                let values = (conv, bucket, to_i64(after), to_i64(until), limit);
                R::Entries(self.strings(&st.select_entries_after, values).await?)
            }
            Op::EntriesBefore {
                conv,
                bucket,
                before,
                limit,
            } => {
                let limit = i32::try_from(limit).unwrap_or(i32::MAX);
                let values = (conv, bucket, to_i64(before), limit);
                R::Entries(self.strings(&st.select_entries_before, values).await?)
            }
            Op::MessageId {
                conv,
                sender,
                message_id,
            } => {
                let values = (conv, sender, message_id);
                let rows = self.rows(&st.select_message_id, values).await?;
                let row = rows.maybe_first_row::<(i64,)>().map_err(backend)?;
                R::Seq(row.map(|(seq,)| to_u64(seq)))
            }
            Op::UserConvs { user } => R::Convs(self.strings(&st.select_user_convs, (user,)).await?),
            Op::DeviceCursor { user, device, conv } => {
                let values = (user, device, conv);
                let rows = self.rows(&st.select_device_cursor, values).await?;
                let row = rows.maybe_first_row::<CursorColumns>().map_err(backend)?;
                R::DeviceCursor(row.map(|r| cursor_of(Some(r))))
            }
            Op::RaiseDeviceCursor {
                user,
                device,
                conv,
                cell,
                value,
            } => {
                let statement = match cell {
                    CursorCell::Delivered => &st.write_device_delivered,
                    CursorCell::Read => &st.write_device_read,
                };
                let v = to_i64(value);
                self.write(statement, (v, v, user, device, conv)).await?
            }
            Op::UserCursor { conv, user } => {
                let rows = self.rows(&st.select_user_cursor, (conv, user)).await?;
                let row = rows.maybe_first_row::<CursorColumns>().map_err(backend)?;
                R::UserCursor(cursor_of(row))
            }
            Op::UserCursors { conv } => R::UserCursors(self.user_cursors(&conv).await?),
            Op::RaiseUserCursor {
                conv,
                user,
                cell,
                value,
            } => {
                let statement = match cell {
                    CursorCell::Delivered => &st.write_user_delivered,
                    CursorCell::Read => &st.write_user_read,
                };
                let v = to_i64(value);
                self.write(statement, (v, v, conv, user)).await?
            }
            Op::RaiseLastSeen { user, at_ms } => {
                let v = to_i64(at_ms);
                self.write(&st.write_last_seen, (v, v, user)).await?
            }
            Op::LastSeen { user } => {
                let rows = self.rows(&st.select_last_seen, (user,)).await?;
                let row = rows.maybe_first_row::<(Option<i64>,)>().map_err(backend)?;
                R::LastSeen(row.and_then(|(seen,)| seen).map(to_u64))
            }
        })
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
