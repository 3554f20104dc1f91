//! [`BlobStore`] on local disk: `ROOT/ab/abcd…` holds the bytes of id `abcd…`
//! and `ROOT/ab/abcd….json` its [`MediaMeta`]; uploads stage in
//! `ROOT/staging/PROCESS`, one directory per server process, so servers may
//! share `ROOT`.
//!
//! Files are written, synced, then renamed into place, so a crash leaves either
//! the old state or the new one, never a partial file under an id.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;

use super::{is_media_id, BlobStore, MediaError, MediaMeta};

/// Content-addressed images under one directory.
pub struct DiskBlobStore {
    root: PathBuf,
    staging: PathBuf,
    next_staging: AtomicU64,
    /// Serialises metadata read-modify-writes (merging conversations).
    meta_lock: tokio::sync::Mutex<()>,
}

fn storage(what: &str, path: &Path, e: impl std::fmt::Display) -> MediaError {
    MediaError::Storage(format!("{what} {}: {e}", path.display()))
}

impl DiskBlobStore {
    /// Opens (creating) the store under `root`. Staging directories of other
    /// processes untouched for [`STAGING_ABANDONED_AFTER`] (their server died
    /// mid-upload) are removed.
    pub fn open(root: &Path) -> Result<Self, MediaError> {
        let all_staging = root.join("staging");
        std::fs::create_dir_all(&all_staging).map_err(|e| storage("creating", &all_staging, e))?;
        remove_abandoned(&all_staging);
        let boot = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let staging = all_staging.join(format!("{}-{boot:x}", std::process::id()));
        std::fs::create_dir_all(&staging).map_err(|e| storage("creating", &staging, e))?;
        Ok(Self {
            root: root.to_owned(),
            staging,
            next_staging: AtomicU64::new(0),
            meta_lock: tokio::sync::Mutex::new(()),
        })
    }

    fn blob_path(&self, id: &str) -> PathBuf {
        assert!(is_media_id(id), "media ids are checked before use");
        self.root.join(&id[..2]).join(id)
    }

    fn meta_path(&self, id: &str) -> PathBuf {
        self.blob_path(id).with_extension("json")
    }

    async fn read_meta(&self, id: &str) -> Result<Option<MediaMeta>, MediaError> {
        let path = self.meta_path(id);
        match tokio::fs::read(&path).await {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| storage("decoding", &path, e)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(storage("reading", &path, e)),
        }
    }

    async fn write_meta(&self, meta: &MediaMeta) -> Result<(), MediaError> {
        let path = self.meta_path(&meta.media.id);
        let tmp = self.staging_path();
        let json = serde_json::to_vec(meta).expect("metadata serializes");
        write_synced(&tmp, &json).await?;
        tokio::fs::rename(&tmp, &path)
            .await
            .map_err(|e| storage("renaming into", &path, e))
    }
}

/// A staging directory untouched this long belongs to a server that is gone.
pub const STAGING_ABANDONED_AFTER: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

fn remove_abandoned(all_staging: &Path) {
    let Ok(entries) = std::fs::read_dir(all_staging) else {
        return;
    };
    for entry in entries.flatten() {
        let idle = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok());
        if idle.is_some_and(|idle| idle > STAGING_ABANDONED_AFTER) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

async fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), MediaError> {
    use tokio::io::AsyncWriteExt;
    let mut file = tokio::fs::File::create(path)
        .await
        .map_err(|e| storage("creating", path, e))?;
    file.write_all(bytes)
        .await
        .map_err(|e| storage("writing", path, e))?;
    file.sync_all()
        .await
        .map_err(|e| storage("syncing", path, e))
}

#[async_trait]
impl BlobStore for DiskBlobStore {
    fn staging_path(&self) -> PathBuf {
        let n = self.next_staging.fetch_add(1, Ordering::Relaxed);
        self.staging.join(format!("upload-{n}"))
    }

    async fn put(&self, staged: &Path, meta: MediaMeta) -> Result<MediaMeta, MediaError> {
        let id = meta.media.id.clone();
        let blob = self.blob_path(&id);
        let dir = blob.parent().expect("blobs live in a fan-out directory");
        tokio::fs::create_dir_all(dir)
            .await
            .map_err(|e| storage("creating", dir, e))?;
        let _guard = self.meta_lock.lock().await;
        let existing = self.read_meta(&id).await?;
        if existing.is_some() && tokio::fs::metadata(&blob).await.is_ok() {
            let _ = tokio::fs::remove_file(staged).await; // Same bytes: keep one copy.
        } else {
            tokio::fs::rename(staged, &blob)
                .await
                .map_err(|e| storage("renaming into", &blob, e))?;
        }
        let merged = match existing {
            Some(mut old) => {
                old.merge_convs(meta.convs);
                old
            }
            None => meta,
        };
        self.write_meta(&merged).await?;
        Ok(merged)
    }

    async fn meta(&self, id: &str) -> Result<Option<MediaMeta>, MediaError> {
        if !is_media_id(id) {
            return Ok(None);
        }
        self.read_meta(id).await
    }

    async fn open(
        &self,
        id: &str,
    ) -> Result<Option<Box<dyn tokio::io::AsyncRead + Send + Unpin>>, MediaError> {
        if !is_media_id(id) {
            return Ok(None);
        }
        let path = self.blob_path(id);
        match tokio::fs::File::open(&path).await {
            Ok(file) => Ok(Some(Box::new(file))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(storage("opening", &path, e)),
        }
    }
}
