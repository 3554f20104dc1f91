//! The write-ahead journal: what makes a group of writes durable without
//! flushing the store's B-trees.
//!
//! Every change a group makes to the tables is also written as a
//! [`Redo`](super::redo::Redo) record; the group's records are appended to the
//! journal file as one frame under the group's log sequence number (LSN), and
//! that append plus one `fdatasync` is what acknowledges the group. The tables
//! themselves are committed without an fsync (redb keeps their pages in memory)
//! and flushed only at a checkpoint, which records the last LSN it covers in the
//! main database's `meta` table. Random keys (a conversation's latest entry, an
//! idempotency key) then cost one page write per checkpoint rather than one per
//! message, and a group costs one small write and one sync.
//!
//! A frame is `[payload length u32][crc32 u32][lsn u64][payload]`, little-endian,
//! the CRC over the LSN and the payload. After a checkpoint the next frame is
//! written at offset 0 again, so the file stays as small as the writes between
//! two checkpoints. Reading at open stops at the first frame that is cut short,
//! fails its CRC or does not carry the next LSN: a torn last write, or a frame
//! left from before the last restart (whose LSN is older, and covered by the
//! checkpoint). [`recover`] applies every frame after the last checkpoint to the
//! tables, checkpoints them, and starts the file over.

use redb::{Database, ReadableDatabase, StorageBackend};

use super::backend;
use super::redo::decode_all;
use super::tables::{Tables, META};
use crate::store::StoreError;

/// The `meta` key holding the last LSN a checkpoint made durable in the tables.
pub const APPLIED_KEY: &str = "journal_applied";

/// Bytes before a frame's payload.
const FRAME_HEADER: usize = 16;

/// The file grows by at least this much at a time.
const GROW_MIN: u64 = 4 << 20;

/// The journal file, open for appending.
pub struct Journal {
    file: Box<dyn StorageBackend>,
    /// Where the next frame goes.
    end: u64,
    /// The file's length.
    len: u64,
    /// The next frame's LSN.
    next_lsn: u64,
}

fn io(e: std::io::Error) -> StoreError {
    backend(format!("journal: {e}"))
}

fn crc(lsn: u64, payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&lsn.to_le_bytes());
    hasher.update(payload);
    hasher.finalize()
}

/// One frame read back: its LSN and payload.
type Frame = (u64, Vec<u8>);

/// The frames of `file` from offset 0, in order, up to the first that is not
/// whole, not intact or not the next LSN; and where that is.
fn scan(file: &dyn StorageBackend) -> Result<(Vec<Frame>, u64), StoreError> {
    let len = file.len().map_err(io)?;
    let mut frames: Vec<Frame> = Vec::new();
    let mut at = 0u64;
    let mut header = [0u8; FRAME_HEADER];
    while at + FRAME_HEADER as u64 <= len {
        file.read(at, &mut header).map_err(io)?;
        let size = u64::from(u32::from_le_bytes(header[0..4].try_into().expect("4")));
        let sum = u32::from_le_bytes(header[4..8].try_into().expect("4"));
        let lsn = u64::from_le_bytes(header[8..16].try_into().expect("8"));
        let start = at + FRAME_HEADER as u64;
        if size == 0 || start + size > len {
            break;
        }
        if frames.last().is_some_and(|(last, _)| lsn != last + 1) {
            break;
        }
        let mut payload = vec![0u8; size as usize];
        file.read(start, &mut payload).map_err(io)?;
        if crc(lsn, &payload) != sum {
            break;
        }
        frames.push((lsn, payload));
        at = start + size;
    }
    Ok((frames, at))
}

impl Journal {
    /// Appends one group's records as the next LSN and syncs the file; the group
    /// is durable when this returns. Fails (and the store must be reopened) if
    /// the write or the sync fails.
    pub fn append(&mut self, payload: &[u8]) -> Result<u64, StoreError> {
        assert!(
            !payload.is_empty(),
            "a journal frame holds at least one change"
        );
        let lsn = self.next_lsn;
        let size = u32::try_from(payload.len()).expect("a group's records under 4 GiB");
        let mut frame = Vec::with_capacity(FRAME_HEADER + payload.len());
        frame.extend_from_slice(&size.to_le_bytes());
        frame.extend_from_slice(&crc(lsn, payload).to_le_bytes());
        frame.extend_from_slice(&lsn.to_le_bytes());
        frame.extend_from_slice(payload);
        let end = self.end + frame.len() as u64;
        if end > self.len {
            let len = end.max(self.len * 2).max(GROW_MIN);
            self.file.set_len(len).map_err(io)?;
            self.len = len;
        }
        self.file.write(self.end, &frame).map_err(io)?;
        self.file.sync_data().map_err(io)?;
        self.end = end;
        self.next_lsn += 1;
        Ok(lsn)
    }

    /// Starts the file over after a durable checkpoint covering every frame in it.
    pub fn restart(&mut self) {
        self.end = 0;
    }
}

/// Opens the journal in `file` and brings the tables of `main` up to date with
/// it: applies every frame after the last checkpoint in LSN order, checkpoints
/// the result with an fsync, and starts the file over. Returns the journal and
/// how many groups were applied.
pub fn recover(
    main: &Database,
    file: Box<dyn StorageBackend>,
) -> Result<(Journal, u64), StoreError> {
    let applied = {
        let txn = main.begin_read().map_err(backend)?;
        let meta = txn.open_table(META).map_err(backend)?;
        let applied = meta.get(APPLIED_KEY).map_err(backend)?.map(|g| g.value());
        applied.unwrap_or(0)
    };
    let (frames, end) = scan(file.as_ref())?;
    let last = frames.last().map_or(0, |(lsn, _)| *lsn);
    let pending: Vec<&Frame> = frames.iter().filter(|(lsn, _)| *lsn > applied).collect();
    if let Some((first, _)) = pending.first() {
        if *first != applied + 1 {
            return Err(backend(format!(
                "the journal resumes at LSN {first} but the tables hold LSN {applied} at most: \
                 groups in between are missing (damaged journal file)"
            )));
        }
    }
    let len = file.len().map_err(io)?;
    let mut journal = Journal {
        file,
        end,
        len,
        next_lsn: last.max(applied) + 1,
    };
    if pending.is_empty() {
        if last <= applied {
            journal.restart(); // Everything in the file is covered by the checkpoint.
        }
        return Ok((journal, 0));
    }
    let mut txn = main.begin_write().map_err(backend)?;
    txn.set_two_phase_commit(true);
    {
        let mut tables = Tables::open(&txn)?;
        for (lsn, payload) in &pending {
            for redo in decode_all(payload) {
                let redo = redo.map_err(|e| backend(format!("journal LSN {lsn}: {e}")))?;
                redo.apply(&mut tables)?;
            }
        }
        let mut meta = txn.open_table(META).map_err(backend)?;
        meta.insert(APPLIED_KEY, last).map_err(backend)?;
    }
    txn.commit().map_err(backend)?;
    journal.restart();
    Ok((journal, pending.len() as u64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A file in memory.
    #[derive(Debug, Default, Clone)]
    struct MemFile(Arc<Mutex<Vec<u8>>>);

    impl StorageBackend for MemFile {
        fn len(&self) -> std::io::Result<u64> {
            Ok(self.0.lock().unwrap().len() as u64)
        }
        fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
            let at = offset as usize;
            out.copy_from_slice(&self.0.lock().unwrap()[at..at + out.len()]);
            Ok(())
        }
        fn set_len(&self, len: u64) -> std::io::Result<()> {
            self.0.lock().unwrap().resize(len as usize, 0);
            Ok(())
        }
        fn sync_data(&self) -> std::io::Result<()> {
            Ok(())
        }
        fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
            let at = offset as usize;
            self.0.lock().unwrap()[at..at + data.len()].copy_from_slice(data);
            Ok(())
        }
    }

    fn journal(file: &MemFile, next_lsn: u64) -> Journal {
        Journal {
            file: Box::new(file.clone()),
            end: 0,
            len: file.len().unwrap(),
            next_lsn,
        }
    }

    /// Frames read back in order; a torn last frame, a flipped bit and a frame
    /// left from before a restart each end the journal there.
    #[test]
    fn scan_stops_at_the_first_frame_that_does_not_follow() {
        let file = MemFile::default();
        let mut j = journal(&file, 1);
        for payload in [&b"one"[..], b"two", b"three"] {
            j.append(payload).unwrap();
        }
        let (frames, end) = scan(&file).unwrap();
        let lsns: Vec<u64> = frames.iter().map(|(l, _)| *l).collect();
        assert_eq!(lsns, [1, 2, 3]);
        assert_eq!(frames[2].1, b"three");
        assert_eq!(end, j.end);

        // Torn: the last frame is cut short.
        let whole = file.0.lock().unwrap().clone();
        file.0.lock().unwrap()[(end - 2) as usize..end as usize].fill(0);
        assert_eq!(scan(&file).unwrap().0.len(), 2, "a torn frame is not read");
        *file.0.lock().unwrap() = whole.clone();

        // A flipped bit in the second frame's payload ends the journal before it.
        let second = FRAME_HEADER + 3 + FRAME_HEADER;
        file.0.lock().unwrap()[second] ^= 1;
        assert_eq!(
            scan(&file).unwrap().0.len(),
            1,
            "a damaged frame is not read"
        );
        *file.0.lock().unwrap() = whole;

        // After a restart, a shorter new frame at offset 0 is followed by old frames.
        j.restart();
        j.append(b"4").unwrap();
        let (frames, _) = scan(&file).unwrap();
        let lsns: Vec<u64> = frames.iter().map(|(l, _)| *l).collect();
        assert_eq!(lsns, [4], "old frames after the new tail are not read");
    }
}
