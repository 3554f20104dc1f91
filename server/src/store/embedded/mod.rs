//! Embedded storage on redb: the single-node default, no external service.
//!
//! Writes go to one writer thread that applies them in groups: a group's changes
//! are appended to a write-ahead journal (`chatproof.journal`) and made durable
//! with one fsync for every write waiting at that moment; the caller's future
//! resolves only after that. The tables are committed without an fsync and
//! checkpointed now and then ([`journal`] says why and how a crash is survived).
//! Reads use redb's MVCC read transactions on the tables and see only writes
//! whose journal record is durable.
//!
//! Under madsim (`--cfg madsim`) the writer is a task instead of an OS thread and the
//! simulator hands in databases on its simulated disk, which outlives node crashes
//! and loses unsynced writes on a power loss: a crash loses exactly the writes
//! whose journal record was not yet durable, none of which was acknowledged.

mod journal;
mod redo;
mod slot;
mod tables;
mod writer;

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use redb::{Database, ReadableDatabase};
use tokio::sync::{mpsc, oneshot};

use self::slot::DatabaseSlot;
pub use self::slot::Opener;
use self::tables::{CONVS, DEVICE_CURSORS, ENTRIES, LAST_SEEN, SEQS, USER_CONVS, USER_CURSORS};
use self::writer::{WriteCtx, WriteOp};
use super::{Appended, ConvState, CursorUpdate, NewMessage, Store, StoreError};
use crate::domain::{ConvRecord, Cursor, GroupChange};
use crate::protocol::Entry;

/// The database file of the tables in the data directory.
pub const FILE_NAME: &str = "chatproof.redb";
/// The write-ahead journal's file in the data directory.
pub const JOURNAL_FILE_NAME: &str = "chatproof.journal";

/// Said after an error caused by a full disk.
const FULL_HINT: &str =
    "; the disk is full: free space (or move the data directory) and start again";

/// What to do about an I/O error met while opening the store, if it says.
pub(crate) fn io_hint(e: &std::io::Error) -> &'static str {
    match e.kind() {
        std::io::ErrorKind::StorageFull => FULL_HINT,
        std::io::ErrorKind::PermissionDenied => {
            "; permission denied: run the server as the directory's owner"
        }
        std::io::ErrorKind::ReadOnlyFilesystem => "; the file system is read-only",
        _ => "",
    }
}

/// A message for a failure to open the database file at `path`: names the file,
/// says what is wrong and what to do.
pub fn describe_open_error(path: &Path, e: redb::DatabaseError) -> String {
    let file = path.display();
    match e {
        redb::DatabaseError::Storage(redb::StorageError::Corrupted(why)) => format!(
            "{file} is corrupted ({why}); the server will not start on it: restore the file \
             from a backup, or move it aside to start with an empty store"
        ),
        redb::DatabaseError::Storage(redb::StorageError::Io(io)) => {
            let hint = match io.kind() {
                // Shorter than its header, or no redb header: cut short, overwritten,
                // or another file in its place.
                std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::InvalidData => {
                    "; the file is corrupted, truncated or not a chatproof store: restore it \
                     from a backup, or move it aside to start with an empty store"
                }
                _ => io_hint(&io),
            };
            format!("{file}: {io}{hint}")
        }
        redb::DatabaseError::DatabaseAlreadyOpen => format!(
            "{file} is already open in another process (another chatproof-server on the \
             same --data-dir?)"
        ),
        redb::DatabaseError::UpgradeRequired(version) => format!(
            "{file} is in an older file format (version {version}) that this build cannot open"
        ),
        other => format!("{file}: {other}"),
    }
}

/// Opens (or creates) the journal file at `path`, locked against other processes.
fn open_journal_file(path: &Path) -> Result<Box<dyn redb::StorageBackend>, StoreError> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| backend(format!("{}: {e}{}", path.display(), io_hint(&e))))?;
    let locked = redb::backends::FileBackend::new(file)
        .map_err(|e| backend(describe_open_error(path, e)))?;
    Ok(Box::new(locked))
}

/// Most write requests committed together in one transaction.
pub const GROUP_COMMIT_OPS_MAX: usize = 1024;

pub(crate) fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

pub(crate) fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| backend(format!("corrupt record: {e}")))
}

/// The redb-backed [`Store`].
pub struct EmbeddedStore {
    db: Arc<DatabaseSlot>,
    ops: Option<mpsc::UnboundedSender<WriteOp>>,
    #[cfg(not(madsim))]
    writer: Option<std::thread::JoinHandle<()>>,
}

impl Drop for EmbeddedStore {
    /// Lets the writer finish every queued group, then waits for it, so the
    /// database file is closed (and can be reopened) once the store is gone.
    fn drop(&mut self) {
        drop(self.ops.take());
        #[cfg(not(madsim))]
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

impl EmbeddedStore {
    /// Opens (or creates) the database file `dir/chatproof.redb` (the tables) and
    /// the journal `dir/chatproof.journal`, replays the journal into the tables,
    /// and starts the writer thread.
    ///
    /// Fails with a message naming the file and what to do when it is corrupted,
    /// open in another process, or on a full disk.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| backend(format!("{}: {e}{}", dir.display(), io_hint(&e))))?;
        let path = dir.join(FILE_NAME);
        let opened = Self::with_opener(Opener {
            main: Box::new({
                let path = path.clone();
                move || Database::create(&path).map_err(|e| backend(describe_open_error(&path, e)))
            }),
            journal: Box::new({
                let path = dir.join(JOURNAL_FILE_NAME);
                move || open_journal_file(&path)
            }),
        });
        // Creating the tables of a new file writes too: a full disk shows there.
        opened.map_err(|e| match e {
            StoreError::Backend(why)
                if why.contains("No space left") && !why.contains(FULL_HINT) =>
            {
                backend(format!("{}: {why}{FULL_HINT}", path.display()))
            }
            other => other,
        })
    }

    /// Opens the databases with `opener`, and again with it after an I/O error
    /// (the simulator passes one over its simulated disk).
    pub fn with_opener(opener: Opener) -> Result<Self, StoreError> {
        let db = Arc::new(DatabaseSlot::open(opener)?);
        let (ops, rx) = mpsc::unbounded_channel();
        let writer_db = Arc::clone(&db);
        #[cfg(not(madsim))]
        let writer = std::thread::Builder::new()
            .name("chatproof-store-writer".into())
            .spawn(move || writer::run(&writer_db, rx))
            .map_err(backend)?;
        #[cfg(madsim)]
        tokio::spawn(async move { writer::run_task(&writer_db, rx).await });
        Ok(Self {
            db,
            ops: Some(ops),
            #[cfg(not(madsim))]
            writer: Some(writer),
        })
    }

    async fn write<T: Send + 'static>(
        &self,
        op: impl FnOnce(&mut WriteCtx<'_>) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (tx, rx) = oneshot::channel();
        let op: WriteOp = Box::new(move |ctx| {
            let result = op(ctx);
            if let Err(StoreError::Backend(why)) = &result {
                ctx.failed.get_or_insert_with(|| why.clone());
            }
            Box::new(move |committed: Result<(), StoreError>| {
                let _ = tx.send(committed.and(result));
            })
        });
        let ops = self.ops.as_ref().expect("open until dropped");
        let not_committed = || {
            let why = self
                .db
                .last_error()
                .unwrap_or_else(|| "store writer stopped".into());
            backend(format!("not committed: storage unavailable ({why})"))
        };
        ops.send(op).map_err(|_| not_committed())?;
        rx.await.map_err(|_| not_committed())?
    }

    fn read_conv(&self, conv: &str) -> Result<Option<ConvState>, StoreError> {
        let txn = self.db.get()?.main.begin_read().map_err(backend)?;
        let convs = txn.open_table(CONVS).map_err(backend)?;
        let Some(raw) = convs.get(conv).map_err(backend)? else {
            return Ok(None);
        };
        let record: ConvRecord = decode(raw.value())?;
        let seqs = txn.open_table(SEQS).map_err(backend)?;
        let last_seq = seqs.get(conv).map_err(backend)?.map_or(0, |g| g.value().0);
        Ok(Some(ConvState { record, last_seq }))
    }

    fn read_entries(
        &self,
        conv: &str,
        range: std::ops::RangeInclusive<u64>,
        limit: u32,
        newest_first: bool,
    ) -> Result<Vec<Entry>, StoreError> {
        let txn = self.db.get()?.main.begin_read().map_err(backend)?;
        let entries = txn.open_table(ENTRIES).map_err(backend)?;
        let (lo, hi) = range.into_inner();
        if lo > hi {
            return Ok(Vec::new());
        }
        let iter = entries.range((conv, lo)..=(conv, hi)).map_err(backend)?;
        let decode_row = |row: Result<_, redb::StorageError>| -> Result<Entry, StoreError> {
            let (_, v): (
                redb::AccessGuard<'_, (&str, u64)>,
                redb::AccessGuard<'_, &[u8]>,
            ) = row.map_err(backend)?;
            decode(v.value())
        };
        let limit = limit as usize;
        let mut out: Vec<Entry> = if newest_first {
            iter.rev()
                .take(limit)
                .map(decode_row)
                .collect::<Result<_, _>>()?
        } else {
            iter.take(limit).map(decode_row).collect::<Result<_, _>>()?
        };
        if newest_first {
            out.reverse();
        }
        debug_assert!(out.windows(2).all(|w| w[0].seq < w[1].seq));
        Ok(out)
    }
}

#[async_trait]
impl Store for EmbeddedStore {
    /// Whether the last commit succeeded; otherwise why not. Probes a closed
    /// store with an empty write, which reopens it if the disk takes writes again.
    async fn health(&self) -> Result<(), String> {
        if self.db.healthy() {
            return Ok(());
        }
        let _ = self.write(|_| Ok(())).await;
        match self.db.healthy() {
            true => Ok(()),
            false => Err(self.db.last_error().unwrap_or_else(|| "unhealthy".into())),
        }
    }

    async fn open_direct(
        &self,
        opener: &str,
        device: &str,
        peer: &str,
        now_ms: u64,
    ) -> Result<(ConvState, Option<Appended>), StoreError> {
        let record = ConvRecord::new_direct(opener, peer)?;
        if let Some(state) = self.read_conv(&record.id)? {
            return Ok((state, None));
        }
        let device = device.to_owned();
        self.write(move |ctx| ctx.create(record, &device, now_ms, true))
            .await
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
        let device = device.to_owned();
        self.write(move |ctx| ctx.create(record, &device, now_ms, false))
            .await
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
        let (conv, by, device) = (conv.to_owned(), by.to_owned(), device.to_owned());
        self.write(move |ctx| ctx.change_members(&conv, &by, &device, &change, members_max, now_ms))
            .await
    }

    async fn append(&self, message: NewMessage, now_ms: u64) -> Result<Appended, StoreError> {
        self.write(move |ctx| ctx.append(&message, now_ms)).await
    }

    async fn ack(
        &self,
        conv: &str,
        user: &str,
        device: &str,
        delivered: Option<u64>,
        read: Option<u64>,
    ) -> Result<CursorUpdate, StoreError> {
        let (conv, user, device) = (conv.to_owned(), user.to_owned(), device.to_owned());
        self.write(move |ctx| ctx.ack(&conv, &user, &device, delivered, read))
            .await
    }

    async fn conversation(&self, conv: &str) -> Result<Option<ConvState>, StoreError> {
        self.read_conv(conv)
    }

    async fn conversation_ids_of(&self, user: &str) -> Result<Vec<String>, StoreError> {
        let txn = self.db.get()?.main.begin_read().map_err(backend)?;
        let index = txn.open_table(USER_CONVS).map_err(backend)?;
        let mut ids = Vec::new();
        for row in index.range((user, "")..).map_err(backend)? {
            let (key, _) = row.map_err(backend)?;
            let (u, conv) = key.value();
            if u != user {
                break;
            }
            ids.push(conv.to_owned());
        }
        Ok(ids)
    }

    async fn conversations_of(&self, user: &str) -> Result<Vec<ConvState>, StoreError> {
        let ids = self.conversation_ids_of(user).await?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            out.extend(self.read_conv(&id)?);
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
        self.read_entries(conv, after.saturating_add(1)..=until, limit, false)
    }

    async fn read_before(
        &self,
        conv: &str,
        before: u64,
        limit: u32,
    ) -> Result<Vec<Entry>, StoreError> {
        if before <= 1 {
            return Ok(Vec::new());
        }
        self.read_entries(conv, 1..=before - 1, limit, true)
    }

    async fn user_cursor(&self, conv: &str, user: &str) -> Result<Cursor, StoreError> {
        let txn = self.db.get()?.main.begin_read().map_err(backend)?;
        let cursors = txn.open_table(USER_CURSORS).map_err(backend)?;
        let found = cursors.get((conv, user)).map_err(backend)?;
        Ok(found.map_or_else(Cursor::default, |g| {
            let (delivered, read) = g.value();
            Cursor { delivered, read }
        }))
    }

    async fn user_cursors(&self, conv: &str) -> Result<Vec<(String, Cursor)>, StoreError> {
        let txn = self.db.get()?.main.begin_read().map_err(backend)?;
        let cursors = txn.open_table(USER_CURSORS).map_err(backend)?;
        let mut found = Vec::new();
        for row in cursors.range((conv, "")..).map_err(backend)? {
            let (key, value) = row.map_err(backend)?;
            let (row_conv, user) = key.value();
            if row_conv != conv {
                break;
            }
            let (delivered, read) = value.value();
            found.push((user.to_owned(), Cursor { delivered, read }));
        }
        Ok(found)
    }

    async fn device_cursor(
        &self,
        user: &str,
        device: &str,
        conv: &str,
    ) -> Result<Option<Cursor>, StoreError> {
        let txn = self.db.get()?.main.begin_read().map_err(backend)?;
        let cursors = txn.open_table(DEVICE_CURSORS).map_err(backend)?;
        let found = cursors.get((user, device, conv)).map_err(backend)?;
        Ok(found.map(|g| {
            let (delivered, read) = g.value();
            Cursor { delivered, read }
        }))
    }

    async fn record_last_seen(&self, user: &str, at_ms: u64) -> Result<(), StoreError> {
        let user = user.to_owned();
        self.write(move |ctx| ctx.raise_last_seen(&user, at_ms))
            .await
    }

    async fn last_seen(&self, users: &[String]) -> Result<Vec<Option<u64>>, StoreError> {
        let txn = self.db.get()?.main.begin_read().map_err(backend)?;
        let table = txn.open_table(LAST_SEEN).map_err(backend)?;
        users
            .iter()
            .map(|u| Ok(table.get(u.as_str()).map_err(backend)?.map(|g| g.value())))
            .collect()
    }

    async fn expire_before(&self, cutoff_ms: u64, budget: u32) -> Result<u64, StoreError> {
        self.write(move |ctx| ctx.expire_before(cutoff_ms, budget))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open_error(dir: &Path) -> String {
        match EmbeddedStore::open(dir) {
            Ok(_) => panic!("opened a store that should not open"),
            Err(StoreError::Backend(why)) => why,
            Err(other) => panic!("unexpected error {other:?}"),
        }
    }

    /// A file that is not a store (garbage, or cut short) stops the open with a
    /// message naming the file and what to do.
    #[test]
    fn a_damaged_store_file_is_named_at_open() {
        for (what, bytes) in [
            ("garbage", vec![0xAB_u8; 64 * 1024]),
            ("cut short", b"redb".to_vec()),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join(FILE_NAME);
            std::fs::write(&path, &bytes).unwrap();
            let why = open_error(dir.path());
            assert!(why.contains(&path.display().to_string()), "{what}: {why}");
            assert!(
                why.contains("corrupted") || why.contains("truncated"),
                "{what}: {why}"
            );
            assert!(why.contains("move it aside"), "{what}: {why}");
            assert_eq!(
                std::fs::read(&path).unwrap(),
                bytes,
                "{what}: the damaged file is left as it was"
            );
        }
    }

    /// A store file already open elsewhere, a full disk and a corrupted file each
    /// get their own explanation.
    #[test]
    fn open_errors_say_what_to_do() {
        let path = Path::new("/data/chatproof.redb");
        let full = std::io::Error::from_raw_os_error(28);
        let why = describe_open_error(
            path,
            redb::DatabaseError::Storage(redb::StorageError::Io(full)),
        );
        assert!(why.starts_with("/data/chatproof.redb: "), "{why}");
        assert!(why.contains("the disk is full"), "{why}");
        let why = describe_open_error(path, redb::DatabaseError::DatabaseAlreadyOpen);
        assert!(why.contains("already open in another process"), "{why}");
        let corrupted = redb::StorageError::Corrupted("bad checksum".into());
        let why = describe_open_error(path, redb::DatabaseError::Storage(corrupted));
        assert!(why.contains("is corrupted (bad checksum)"), "{why}");
    }

    /// A disk that keeps unsynced writes apart, to lose them as a crash would.
    #[derive(Debug, Default)]
    struct LossyDisk {
        cache: std::sync::Mutex<Vec<u8>>,
        durable: std::sync::Mutex<Vec<u8>>,
    }

    impl LossyDisk {
        /// What a power loss now would leave.
        fn synced(&self) -> Vec<u8> {
            self.durable.lock().unwrap().clone()
        }

        /// The disk after a power loss that left `image`.
        fn restore(&self, image: Vec<u8>) {
            *self.cache.lock().unwrap() = image.clone();
            *self.durable.lock().unwrap() = image;
        }
    }

    #[derive(Debug)]
    struct LossyHandle(Arc<LossyDisk>);

    impl redb::StorageBackend for LossyHandle {
        fn len(&self) -> std::io::Result<u64> {
            Ok(self.0.cache.lock().unwrap().len() as u64)
        }
        fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
            let at = offset as usize;
            out.copy_from_slice(&self.0.cache.lock().unwrap()[at..at + out.len()]);
            Ok(())
        }
        fn set_len(&self, len: u64) -> std::io::Result<()> {
            self.0.cache.lock().unwrap().resize(len as usize, 0);
            Ok(())
        }
        fn sync_data(&self) -> std::io::Result<()> {
            let cache = self.0.cache.lock().unwrap().clone();
            *self.0.durable.lock().unwrap() = cache;
            Ok(())
        }
        fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
            let at = offset as usize;
            self.0.cache.lock().unwrap()[at..at + data.len()].copy_from_slice(data);
            Ok(())
        }
    }

    fn lossy_store(main: &Arc<LossyDisk>, journal: &Arc<LossyDisk>) -> EmbeddedStore {
        let (main, journal) = (Arc::clone(main), Arc::clone(journal));
        EmbeddedStore::with_opener(Opener {
            main: Box::new(move || {
                redb::Builder::new()
                    .create_with_backend(LossyHandle(Arc::clone(&main)))
                    .map_err(backend)
            }),
            journal: Box::new(move || Ok(Box::new(LossyHandle(Arc::clone(&journal))))),
        })
        .unwrap()
    }

    fn text(conv: &str, id: &str) -> NewMessage {
        NewMessage {
            conv: conv.into(),
            sender: "alice".into(),
            sender_device: "phone".into(),
            message_id: id.into(),
            body: crate::protocol::Body::Text { text: id.into() },
        }
    }

    /// Every acknowledged write survives losing all that was not synced, on both
    /// files, whether or not a checkpoint covered it: the journal is replayed into
    /// the tables at the next open, seqs continue where they were, and a retried
    /// send is still recognised.
    #[tokio::test]
    async fn acknowledged_writes_survive_losing_unsynced_pages() {
        let (main, journal) = (
            Arc::new(LossyDisk::default()),
            Arc::new(LossyDisk::default()),
        );
        let sent = writer::CHECKPOINT_GROUPS as u64 + 40;
        let conv = {
            let store = lossy_store(&main, &journal);
            let (state, _) = store.open_direct("alice", "phone", "bob", 1).await.unwrap();
            let conv = state.record.id;
            for i in 0..sent {
                let appended = store
                    .append(text(&conv, &format!("m{i}")), 2 + i)
                    .await
                    .unwrap();
                assert_eq!(appended.entry.seq, i + 2);
            }
            store
                .ack(&conv, "bob", "tablet", Some(sent + 1), None)
                .await
                .unwrap();
            // The power fails here; closing the store afterwards would flush the tables.
            let images = (main.synced(), journal.synced());
            drop(store);
            main.restore(images.0);
            journal.restore(images.1);
            conv
        };
        let store = lossy_store(&main, &journal);
        let entries = store.read_after(&conv, 0, u64::MAX, 10_000).await.unwrap();
        let seqs: Vec<u64> = entries.iter().map(|e| e.seq).collect();
        assert_eq!(
            seqs,
            (1..=sent + 1).collect::<Vec<_>>(),
            "every acknowledged entry"
        );
        let cursor = store.device_cursor("bob", "tablet", &conv).await.unwrap();
        assert_eq!(
            cursor.map(|c| c.delivered),
            Some(sent + 1),
            "the acknowledged cursor"
        );
        let retried = store.append(text(&conv, "m7"), 9_999).await.unwrap();
        assert!(
            retried.duplicate,
            "a retried send is recognised after replay"
        );
        assert_eq!(retried.entry.seq, 9);
        let next = store.append(text(&conv, "new"), 10_000).await.unwrap();
        assert_eq!(
            next.entry.seq,
            sent + 2,
            "the next seq follows the last acknowledged one"
        );
    }

    /// The data directory cannot be created (a file stands in its place): the
    /// error names it.
    #[test]
    fn an_unusable_data_directory_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("data");
        std::fs::write(&blocker, b"not a directory").unwrap();
        let why = open_error(&blocker);
        assert!(why.contains(&blocker.display().to_string()), "{why}");
    }
}
