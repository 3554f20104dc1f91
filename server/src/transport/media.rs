//! `POST /v1/media?conv=CONV` (upload an image) and `GET /v1/media/{id}` (download).
//!
//! Uploads stream to a staging file in chunks as they arrive, hashed and
//! counted on the way; nothing but the current chunk is held in memory. An
//! upload over the limit, or whose first bytes are not an image signature, is
//! read to its end (up to a bound) and discarded, then refused; nothing is kept.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::http::{json_body, stream_body, ApiError, HttpResponse};
use crate::media::{image_info, sniff, BlobStore, MediaError, MediaMeta};
use crate::protocol::{ErrorCode, MediaRef, MediaStored, ProtocolError};
use crate::service::{Caller, ChatService};

/// Bytes read and thrown away after an upload went over the limit, so the
/// client can finish sending and read the 413; beyond this the connection closes.
const DISCARD_LEN_MAX: u64 = 64 * 1024 * 1024;
/// Size of the chunks a download is streamed in.
const DOWNLOAD_CHUNK_LEN: usize = 64 * 1024;

/// Removes the staging file unless it was handed to the blob store.
struct Staged(PathBuf);

impl Drop for Staged {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn store_of(svc: &ChatService) -> Result<&Arc<dyn BlobStore>, ApiError> {
    svc.media()
        .ok_or_else(|| ApiError::new(ErrorCode::NotFound, "this server does not store images"))
}

fn storage_failure(e: &MediaError) -> ApiError {
    tracing::error!(error = %e, "media storage failure");
    ApiError::new(ErrorCode::Internal, "media storage failure; retry")
}

/// Handles an upload by `caller` for `conv`.
pub async fn upload(
    svc: &Arc<ChatService>,
    caller: &Caller,
    conv: &str,
    mut body: Incoming,
) -> Result<HttpResponse, ApiError> {
    let blobs = store_of(svc)?;
    let (state, membership) = svc.readable(caller, conv).await?;
    if membership.left_seq.is_some() {
        return Err(ProtocolError::new(
            ErrorCode::NotMember,
            format!("{} is no longer a member of {conv}", caller.user),
        )
        .into());
    }
    let _place = svc.upload_place()?;
    let limit = svc.limits().media_len_max_bytes;
    let staged = Staged(blobs.staging_path());
    let mut file = tokio::fs::File::create(&staged.0)
        .await
        .map_err(|e| storage_failure(&MediaError::Storage(e.to_string())))?;
    let (mut hasher, mut size, mut head) = (Sha256::new(), 0u64, Vec::with_capacity(16));
    let mut refused: Option<ApiError> = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            ApiError::new(ErrorCode::BadRequest, format!("upload interrupted: {e}"))
        })?;
        let Ok(chunk) = frame.into_data() else {
            continue; // Trailers.
        };
        size += chunk.len() as u64;
        if refused.is_some() {
            if size > limit + DISCARD_LEN_MAX {
                break;
            }
            continue;
        }
        if size > limit {
            refused = Some(ApiError::new(
                ErrorCode::MediaTooLarge,
                format!("images are limited to {limit} bytes; nothing was kept"),
            ));
            continue;
        }
        if head.len() < 12 {
            let take = (12 - head.len()).min(chunk.len());
            head.extend_from_slice(&chunk[..take]);
            if head.len() == 12 && sniff(&head).is_none() {
                refused = Some(not_an_image());
                continue;
            }
        }
        hasher.update(&chunk);
        file.write_all(&chunk)
            .await
            .map_err(|e| storage_failure(&MediaError::Storage(e.to_string())))?;
    }
    svc.metrics().media_bytes_in.inc_by(size);
    if let Some(refused) = refused {
        return Err(refused);
    }
    let Some(content_type) = sniff(&head) else {
        return Err(not_an_image());
    };
    file.sync_all()
        .await
        .map_err(|e| storage_failure(&MediaError::Storage(e.to_string())))?;
    drop(file);
    let (width, height, thumbnail) =
        image_info::inspect(&staged.0, content_type)
            .await
            .map_err(|e| match e {
                MediaError::Storage(_) => storage_failure(&e),
                other => ApiError::new(ErrorCode::UnsupportedMedia, other.to_string()),
            })?;
    let id: String = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let meta = MediaMeta {
        media: MediaRef {
            id,
            size,
            content_type: content_type.to_owned(),
            width,
            height,
            thumbnail,
        },
        convs: BTreeMap::from([(conv.to_owned(), state.last_seq)]),
    };
    let stored = blobs
        .put(&staged.0, meta)
        .await
        .map_err(|e| storage_failure(&e))?;
    svc.metrics().media_uploads.inc();
    Ok(json_body(
        hyper::StatusCode::CREATED,
        &MediaStored {
            media: stored.media,
        },
    ))
}

fn not_an_image() -> ApiError {
    ApiError::new(
        ErrorCode::UnsupportedMedia,
        "the content is not a JPEG, PNG, WebP or GIF image (recognised by its bytes, not its name); nothing was kept",
    )
}

/// Streams image `id` to `caller`, a reader of a conversation it was uploaded to.
pub async fn download(
    svc: &Arc<ChatService>,
    caller: &Caller,
    id: &str,
) -> Result<HttpResponse, ApiError> {
    let blobs = store_of(svc)?;
    let unknown = || ApiError::new(ErrorCode::UnknownMedia, format!("no image {id:?}"));
    let meta = blobs
        .meta(id)
        .await
        .map_err(|e| storage_failure(&e))?
        .ok_or_else(unknown)?;
    // A former member may fetch only what was uploaded before their removal.
    let mut allowed = false;
    for conv in meta.convs.keys() {
        if let Ok((_, membership)) = svc.readable(caller, conv).await {
            if meta.readable_by(conv, &membership) {
                allowed = true;
                break;
            }
        }
    }
    if !allowed {
        return Err(ApiError::new(
            ErrorCode::NotMember,
            "only members of a conversation this image was posted to may download it",
        ));
    }
    let reader = blobs
        .open(id)
        .await
        .map_err(|e| storage_failure(&e))?
        .ok_or_else(unknown)?;
    let chunks = futures_util::stream::unfold(reader, |mut reader| async move {
        let mut buf = BytesMut::with_capacity(DOWNLOAD_CHUNK_LEN);
        match reader.read_buf(&mut buf).await {
            Ok(0) => None,
            Ok(_) => Some((Ok(Frame::data(Bytes::from(buf))), reader)),
            Err(e) => Some((Err(e), reader)),
        }
    });
    let mut response = stream_body(chunks);
    let headers = response.headers_mut();
    let media = &meta.media;
    let value = |s: &str| hyper::header::HeaderValue::from_str(s).expect("ascii header");
    headers.insert(hyper::header::CONTENT_TYPE, value(&media.content_type));
    headers.insert(
        hyper::header::CONTENT_LENGTH,
        value(&media.size.to_string()),
    );
    headers.insert(hyper::header::ETAG, value(&format!("\"{}\"", media.id)));
    headers.insert(
        hyper::header::CACHE_CONTROL,
        value("private, max-age=31536000, immutable"),
    );
    Ok(response)
}
