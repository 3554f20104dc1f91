//! The simulated disk under a server's embedded store: a redb
//! [`StorageBackend`] that keeps apart what reads see (the page cache) and what
//! survives a power loss (what a successful `sync_data` made durable), and
//! injects, from the seed, the storage faults a server must survive:
//! - **write errors** (`ENOSPC` or `EIO`) for a while: writes fail and change nothing;
//! - **fsync errors** (`EIO`) for a while: the sync fails and the writes it
//!   covered never become durable, though reads still see them (as Linux
//!   drops dirty pages after a failed writeback);
//! - **power loss**: only what was synced survives, plus (as a torn last write)
//!   some of the writes since the last sync, the last one possibly cut short.
//!
//! A process crash (`server_crash`) keeps the page cache, as a real one does.

use std::io;
use std::sync::{Arc, Mutex};

use redb::StorageBackend;

/// A fault the disk is injecting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskFault {
    /// Every write fails with "no space left on device".
    Full,
    /// Every write fails with an I/O error.
    WriteIo,
    /// Every fsync fails with an I/O error.
    SyncIo,
}

/// One change since the last successful sync.
#[derive(Debug, Clone)]
enum Pending {
    Write { offset: usize, data: Vec<u8> },
    SetLen(usize),
}

impl Pending {
    fn apply(&self, image: &mut Vec<u8>) {
        match self {
            Pending::Write { offset, data } => {
                // A length change lost with a failed sync may leave `image` short.
                let end = *offset + data.len();
                if image.len() < end {
                    image.resize(end, 0);
                }
                image[*offset..end].copy_from_slice(data);
            }
            Pending::SetLen(len) => image.resize(*len, 0),
        }
    }
}

/// One file on the disk.
#[derive(Debug, Default)]
struct FileImage {
    /// What reads see.
    cache: Vec<u8>,
    /// What survives a power loss.
    durable: Vec<u8>,
    /// Changes in `cache` not yet in `durable`, in order.
    pending: Vec<Pending>,
}

impl FileImage {
    /// Power loss for this file: see [`SimDisk::power_loss`].
    fn power_loss(&mut self, kept: usize, torn_len: usize) -> usize {
        let pending = std::mem::take(&mut self.pending);
        let mut image = self.durable.clone();
        let kept = kept.min(pending.len());
        for (i, change) in pending.iter().take(kept).enumerate() {
            match change {
                Pending::Write { offset, data } if i + 1 == kept => {
                    let cut = torn_len.min(data.len());
                    let torn = Pending::Write {
                        offset: *offset,
                        data: data[..cut].to_vec(),
                    };
                    torn.apply(&mut image);
                }
                _ => change.apply(&mut image),
            }
        }
        self.cache = image.clone();
        self.durable = image;
        pending.len()
    }
}

#[derive(Debug, Default)]
struct DiskState {
    /// The files, by index; a file exists once a handle to it was taken.
    files: Vec<FileImage>,
    fault: Option<DiskFault>,
}

impl DiskState {
    fn file(&mut self, index: usize) -> &mut FileImage {
        &mut self.files[index]
    }
}

/// One server's disk; outlives the server's crashes and restarts.
#[derive(Debug, Default)]
pub struct SimDisk {
    state: Mutex<DiskState>,
}

impl SimDisk {
    /// A new, empty disk.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Starts (or, with `None`, ends) injecting `fault`.
    pub fn set_fault(&self, fault: Option<DiskFault>) {
        self.state.lock().expect("disk lock").fault = fault;
    }

    /// Power loss: each file keeps what was synced plus the first `kept` changes
    /// since, the last of those cut to `torn_len` bytes if it is a write.
    /// Returns how many changes were pending, over every file.
    pub fn power_loss(&self, kept: usize, torn_len: usize) -> usize {
        let mut s = self.state.lock().expect("disk lock");
        s.files
            .iter_mut()
            .map(|file| file.power_loss(kept, torn_len))
            .sum()
    }

    /// A handle to give redb for file `index` of this disk (created empty the
    /// first time); faults and power loss strike every file.
    pub fn file(self: &Arc<Self>, index: usize) -> impl StorageBackend {
        let mut s = self.state.lock().expect("disk lock");
        if s.files.len() <= index {
            s.files.resize_with(index + 1, FileImage::default);
        }
        DiskHandle(Arc::clone(self), index)
    }
}

fn out_of_range() -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        "offset past the end of the disk",
    )
}

fn injected(fault: DiskFault) -> io::Error {
    match fault {
        DiskFault::Full => io::Error::new(
            io::ErrorKind::StorageFull,
            "no space left on device (simulated)",
        ),
        DiskFault::WriteIo | DiskFault::SyncIo => {
            io::Error::other("input/output error (simulated)")
        }
    }
}

/// One file of a [`SimDisk`] as redb sees it.
#[derive(Debug)]
struct DiskHandle(Arc<SimDisk>, usize);

impl StorageBackend for DiskHandle {
    fn len(&self) -> Result<u64, io::Error> {
        let mut s = self.0.state.lock().expect("disk lock");
        Ok(s.file(self.1).cache.len() as u64)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), io::Error> {
        let mut s = self.0.state.lock().expect("disk lock");
        let offset = usize::try_from(offset).map_err(|_| out_of_range())?;
        let source = s
            .file(self.1)
            .cache
            .get(offset..offset + out.len())
            .ok_or_else(out_of_range)?;
        out.copy_from_slice(source);
        Ok(())
    }

    fn set_len(&self, len: u64) -> Result<(), io::Error> {
        let mut s = self.0.state.lock().expect("disk lock");
        if let Some(fault @ (DiskFault::Full | DiskFault::WriteIo)) = s.fault {
            return Err(injected(fault));
        }
        let len = usize::try_from(len).map_err(|_| out_of_range())?;
        let change = Pending::SetLen(len);
        let file = s.file(self.1);
        change.apply(&mut file.cache);
        file.pending.push(change);
        Ok(())
    }

    fn sync_data(&self) -> Result<(), io::Error> {
        let mut s = self.0.state.lock().expect("disk lock");
        let fault = s.fault;
        let file = s.file(self.1);
        let pending = std::mem::take(&mut file.pending);
        if fault == Some(DiskFault::SyncIo) {
            // The writeback failed: those changes stay in the cache, never on disk.
            return Err(injected(DiskFault::SyncIo));
        }
        for change in &pending {
            change.apply(&mut file.durable);
        }
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), io::Error> {
        let mut s = self.0.state.lock().expect("disk lock");
        if let Some(fault @ (DiskFault::Full | DiskFault::WriteIo)) = s.fault {
            return Err(injected(fault));
        }
        let offset = usize::try_from(offset).map_err(|_| out_of_range())?;
        let file = s.file(self.1);
        if offset + data.len() > file.cache.len() {
            return Err(out_of_range());
        }
        let change = Pending::Write {
            offset,
            data: data.to_vec(),
        };
        change.apply(&mut file.cache);
        file.pending.push(change);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The files of one disk keep their own bytes; a power loss strikes each,
    /// and a fault every one.
    #[test]
    fn every_file_of_a_disk_loses_power_together() {
        let disk = SimDisk::new();
        let (a, b) = (disk.file(0), disk.file(1));
        a.set_len(4).unwrap();
        b.set_len(4).unwrap();
        a.write(0, b"aaaa").unwrap();
        a.sync_data().unwrap();
        b.write(0, b"bbbb").unwrap();
        assert_eq!(
            disk.power_loss(0, 0),
            2,
            "a's write was synced; b's length and write were not"
        );
        let mut out = [0u8; 4];
        a.read(0, &mut out).unwrap();
        assert_eq!(&out, b"aaaa");
        assert_eq!(b.len().unwrap(), 0, "b's unsynced length is gone too");
        disk.set_fault(Some(DiskFault::WriteIo));
        assert!(b.set_len(4).is_err());
        assert!(a.write(0, b"x").is_err());
    }

    /// Synced data survives power loss, unsynced does not (but for a torn
    /// prefix), and a failed sync leaves its writes readable yet not durable.
    #[test]
    fn durability_model() {
        let disk = SimDisk::new();
        let b = disk.file(0);
        b.set_len(8).unwrap();
        b.write(0, b"aaaa").unwrap();
        b.sync_data().unwrap();
        b.write(4, b"bbbb").unwrap();
        assert_eq!(disk.power_loss(0, 0), 1);
        let mut out = [0u8; 8];
        b.read(0, &mut out).unwrap();
        assert_eq!(&out, b"aaaa\0\0\0\0");
        b.write(4, b"cccc").unwrap();
        disk.power_loss(1, 2);
        b.read(0, &mut out).unwrap();
        assert_eq!(&out, b"aaaacc\0\0", "a torn write keeps its prefix");
        disk.set_fault(Some(DiskFault::SyncIo));
        b.write(0, b"dddd").unwrap();
        assert!(b.sync_data().is_err());
        b.read(0, &mut out).unwrap();
        assert_eq!(&out[..4], b"dddd", "still readable from the cache");
        disk.set_fault(None);
        b.sync_data().unwrap();
        disk.power_loss(0, 0);
        b.read(0, &mut out).unwrap();
        assert_eq!(
            &out[..4],
            b"aaaa",
            "a failed sync's writes never became durable"
        );
        disk.set_fault(Some(DiskFault::Full));
        assert_eq!(
            b.write(0, b"x").unwrap_err().kind(),
            io::ErrorKind::StorageFull
        );
    }
}
