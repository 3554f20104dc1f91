//! The open database, and opening it again after an I/O error.
//!
//! redb refuses every operation after a failed write or fsync ("previous I/O
//! error") until the database is closed and opened again. The slot holds the
//! open [`Database`] and how to open it; after a failed commit the writer
//! closes it and, on the next write or health probe, reopens it (redb repairs
//! it to its last durable commit) and commits a marker with an fsync before
//! taking writes again. Every open first brings the tables up to date with the
//! journal ([`super::journal::recover`]). Until then reads and writes fail with a backend error:
//! nothing is acknowledged while the store is down, and the store comes back by
//! itself once the disk takes writes again.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use redb::{Database, StorageBackend};

use super::backend;
use super::journal::Journal;
use crate::store::StoreError;

/// How to open the store's two files (again): real files, or the simulator's disk.
pub struct Opener {
    /// Opens the main database (the tables).
    pub main: Box<dyn Fn() -> Result<Database, StoreError> + Send + Sync>,
    /// Opens the journal file.
    pub journal: Box<dyn Fn() -> Result<Box<dyn StorageBackend>, StoreError> + Send + Sync>,
}

/// The store's open files.
pub struct StoreFiles {
    /// The tables.
    pub main: Database,
    /// The journal; only the writer appends.
    pub journal: Mutex<Journal>,
}

impl StoreFiles {
    /// Opens both files with `opener`, creates missing tables and replays the
    /// journal into the tables.
    fn open(opener: &Opener) -> Result<Self, StoreError> {
        let main = (opener.main)()?;
        super::writer::create_tables(&main)?;
        let (journal, replayed) = super::journal::recover(&main, (opener.journal)()?)?;
        if replayed > 0 {
            tracing::info!(groups = replayed, "journal replayed into the tables");
        }
        Ok(Self {
            main,
            journal: Mutex::new(journal),
        })
    }
}

/// The open databases (if any) and how to reopen them.
pub struct DatabaseSlot {
    open: RwLock<Option<Arc<StoreFiles>>>,
    opener: Opener,
    healthy: AtomicBool,
    last_error: Mutex<Option<String>>,
}

impl DatabaseSlot {
    /// Opens the databases with `opener`, prepares their tables and replays the journal.
    pub fn open(opener: Opener) -> Result<Self, StoreError> {
        let files = StoreFiles::open(&opener)?;
        Ok(Self {
            open: RwLock::new(Some(Arc::new(files))),
            opener,
            healthy: AtomicBool::new(true),
            last_error: Mutex::new(None),
        })
    }

    /// The open databases, or an error while they are closed after an I/O failure.
    pub fn get(&self) -> Result<Arc<StoreFiles>, StoreError> {
        self.open
            .read()
            .expect("database slot lock")
            .clone()
            .ok_or_else(|| {
                let why = self.last_error().unwrap_or_default();
                backend(format!(
                    "storage unavailable after an I/O error ({why}); reopening"
                ))
            })
    }

    /// Whether the last commit (or reopen) succeeded.
    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::SeqCst)
    }

    /// Why the store is unhealthy, if it is.
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().expect("database slot lock").clone()
    }

    /// Closes the database after a failed commit: every later operation fails
    /// until [`DatabaseSlot::reopen`] succeeds.
    pub fn close_after(&self, why: &str) {
        *self.last_error.lock().expect("database slot lock") = Some(why.to_owned());
        self.healthy.store(false, Ordering::SeqCst);
        let closed = self.open.write().expect("database slot lock").take();
        if let Some(db) = closed {
            wait_for_readers(db);
        }
    }

    /// Opens the database again if it is closed; true when it is open and took
    /// a durable marker commit.
    pub fn reopen(&self) -> bool {
        if self.open.read().expect("database slot lock").is_some() {
            return true;
        }
        if crate::mutants::active(crate::mutants::Mutant::StayDownAfterIoError) {
            return false;
        }
        match StoreFiles::open(&self.opener).and_then(|files| {
            super::writer::commit_marker(&files.main)?;
            Ok(files)
        }) {
            Ok(db) => {
                *self.open.write().expect("database slot lock") = Some(Arc::new(db));
                *self.last_error.lock().expect("database slot lock") = None;
                self.healthy.store(true, Ordering::SeqCst);
                tracing::warn!("storage reopened after an I/O error; taking writes again");
                true
            }
            Err(e) => {
                *self.last_error.lock().expect("database slot lock") = Some(e.to_string());
                false
            }
        }
    }
}

/// Drops the last handle of `db` once readers holding a clone let go (reads
/// are short and synchronous), so the files can be opened again.
fn wait_for_readers(db: Arc<StoreFiles>) {
    let mut db = db;
    for _ in 0..1000 {
        match Arc::try_unwrap(db) {
            Ok(db) => {
                drop(db);
                return;
            }
            Err(shared) => {
                db = shared;
                #[cfg(not(madsim))]
                std::thread::sleep(std::time::Duration::from_millis(1));
                #[cfg(madsim)]
                std::hint::spin_loop();
            }
        }
    }
    tracing::error!("readers still hold the failed database; it closes when they finish");
}
