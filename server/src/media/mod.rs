//! Images: what the server keeps of an upload, where the bytes live, and the
//! checks every upload passes.
//!
//! An upload streams to a staging file while it is hashed and counted, so memory
//! does not grow with the size or the number of concurrent uploads. Its type is
//! recognised from the first bytes ([`sniff`]), never from a name or a header.
//! Decoding for the dimensions and the thumbnail happens once the upload is
//! complete, a bounded number at a time, under a pixel and allocation limit.
//! The bytes are kept content-addressed (the id is their SHA-256) by a
//! [`BlobStore`]: on local disk by default ([`disk::DiskBlobStore`]), or any
//! object store implementing the trait.
//!
//! An upload names the conversation it is for; only readers of a conversation
//! it was uploaded to may download it or post it in a message.

#[cfg(not(madsim))]
pub mod disk;
#[cfg(not(madsim))]
pub mod image_info;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::protocol::MediaRef;

/// Largest image accepted, in bytes (10 MiB).
pub const MEDIA_LEN_MAX_BYTES_DEFAULT: u64 = 10 * 1024 * 1024;
/// Largest image decoded for its thumbnail, in pixels.
pub const PIXELS_MAX: u64 = 40_000_000;
/// Longest side of a thumbnail, in pixels.
pub const THUMBNAIL_SIDE_MAX: u32 = 64;

/// What the server keeps about one stored image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MediaMeta {
    /// The reference messages carry.
    pub media: MediaRef,
    /// Conversations it was uploaded to, each with the conversation's last seq when it
    /// was first uploaded there. Current members may download it; a former member only
    /// when it was uploaded before the entry that removed them. (Metadata written before
    /// the seq was recorded lists the conversations only; they read as seq 0.)
    #[serde(deserialize_with = "convs_with_seqs")]
    pub convs: BTreeMap<String, u64>,
}

impl MediaMeta {
    /// Whether a reader of `conv` with `membership` may download it.
    pub fn readable_by(&self, conv: &str, membership: &crate::domain::Membership) -> bool {
        match (self.convs.get(conv), membership.left_seq) {
            (None, _) => false,
            (Some(_), None) => true,
            (Some(&uploaded_at), Some(left_seq)) => uploaded_at < left_seq,
        }
    }

    /// Merges `other`'s conversations in, keeping each one's earliest upload.
    pub fn merge_convs(&mut self, other: BTreeMap<String, u64>) {
        for (conv, seq) in other {
            let at = self.convs.entry(conv).or_insert(seq);
            *at = (*at).min(seq);
        }
    }
}

fn convs_with_seqs<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<BTreeMap<String, u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Convs {
        WithSeqs(BTreeMap<String, u64>),
        Names(BTreeSet<String>),
    }
    Ok(match Convs::deserialize(d)? {
        Convs::WithSeqs(map) => map,
        Convs::Names(names) => names.into_iter().map(|c| (c, 0)).collect(),
    })
}

/// Why an image was refused or could not be served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MediaError {
    /// More bytes than the limit.
    #[error("the image is larger than {limit} bytes")]
    TooLarge {
        /// The limit in bytes.
        limit: u64,
    },
    /// The content is none of JPEG, PNG, WebP, GIF.
    #[error("the content is not a JPEG, PNG, WebP or GIF image")]
    NotAnImage,
    /// Recognised by its signature but not decodable, or beyond the pixel limit.
    #[error("the image cannot be decoded: {0}")]
    Undecodable(String),
    /// The storage failed.
    #[error("media storage failure: {0}")]
    Storage(String),
}

/// Where image bytes and their metadata live.
#[async_trait]
pub trait BlobStore: Send + Sync + 'static {
    /// A fresh path in the staging area (same file system as the store) for an
    /// upload to stream into.
    fn staging_path(&self) -> std::path::PathBuf;

    /// Keeps the complete, checked file at `staged` as `meta.media.id` (the file
    /// is moved or removed). When the id exists already (same bytes), only
    /// `meta.convs` is merged in. Returns the stored metadata. Durable on return.
    async fn put(&self, staged: &Path, meta: MediaMeta) -> Result<MediaMeta, MediaError>;

    /// The metadata of `id`, if stored.
    async fn meta(&self, id: &str) -> Result<Option<MediaMeta>, MediaError>;

    /// The bytes of `id` as a stream, if stored.
    async fn open(
        &self,
        id: &str,
    ) -> Result<Option<Box<dyn tokio::io::AsyncRead + Send + Unpin>>, MediaError>;
}

/// The MIME type of an image recognised from its first bytes (12 suffice).
pub fn sniff(head: &[u8]) -> Option<&'static str> {
    const PNG: &[u8] = &[0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A];
    if head.starts_with(&[0xFF, 0xD8, 0xFF]) {
        Some("image/jpeg")
    } else if head.starts_with(PNG) {
        Some("image/png")
    } else if head.starts_with(b"GIF87a") || head.starts_with(b"GIF89a") {
        Some("image/gif")
    } else if head.len() >= 12 && head.starts_with(b"RIFF") && &head[8..12] == b"WEBP" {
        Some("image/webp")
    } else {
        None
    }
}

/// Whether `id` has the form of a media id: 64 lowercase hex digits.
pub fn is_media_id(id: &str) -> bool {
    id.len() == 64 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Types come from signatures, whatever else the bytes say.
    #[test]
    fn sniffs_signatures() {
        assert_eq!(sniff(&[0xFF, 0xD8, 0xFF, 0xE0, 0, 0]), Some("image/jpeg"));
        assert_eq!(
            sniff(&[0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A, 0]),
            Some("image/png")
        );
        assert_eq!(sniff(b"GIF89a\x01\x00"), Some("image/gif"));
        assert_eq!(sniff(b"RIFF\x10\x00\x00\x00WEBPVP8 "), Some("image/webp"));
        assert_eq!(sniff(b"RIFF\x10\x00\x00\x00WAVEfmt "), None);
        assert_eq!(sniff(b"<html>"), None);
        assert_eq!(sniff(b""), None);
        assert_eq!(sniff(&[0xFF, 0xD8]), None, "too short to be sure");
    }

    /// Metadata written before upload seqs were kept still reads (as seq 0); a former
    /// member may read only what was uploaded before the entry that removed them.
    #[test]
    fn former_members_read_what_came_before_their_removal() {
        let old = r#"{"media": {"id": "ab", "size": 1, "content_type": "image/png", "width": 1,
                      "height": 1, "thumbnail": ""}, "convs": ["g:a", "g:b"]}"#;
        let mut meta: MediaMeta = serde_json::from_str(old).unwrap();
        assert_eq!(
            meta.convs,
            BTreeMap::from([("g:a".into(), 0), ("g:b".into(), 0)])
        );
        meta.merge_convs(BTreeMap::from([("g:a".into(), 9), ("g:c".into(), 7)]));
        assert_eq!(meta.convs["g:a"], 0, "the earliest upload counts");
        assert_eq!(meta.convs["g:c"], 7);
        let round_trip: MediaMeta =
            serde_json::from_str(&serde_json::to_string(&meta).unwrap()).unwrap();
        assert_eq!(round_trip, meta);
        let member = crate::domain::Membership {
            joined_seq: 1,
            left_seq: None,
        };
        let left_at = |seq| crate::domain::Membership {
            joined_seq: 1,
            left_seq: Some(seq),
        };
        assert!(meta.readable_by("g:c", &member));
        assert!(
            meta.readable_by("g:c", &left_at(8)),
            "uploaded at 7, removed at 8"
        );
        assert!(
            !meta.readable_by("g:c", &left_at(7)),
            "uploaded after the removal"
        );
        assert!(!meta.readable_by("g:z", &member), "never uploaded there");
    }

    /// Media ids are SHA-256 hex digests.
    #[test]
    fn media_id_form() {
        assert!(is_media_id(&"ab".repeat(32)));
        assert!(!is_media_id(&"AB".repeat(32)));
        assert!(!is_media_id("../../etc/passwd"));
        assert!(!is_media_id(&"a".repeat(63)));
    }
}
