//! Dimensions and thumbnails of a complete upload, with the `image` crate.
//!
//! Decoding is the one step whose memory grows with the image, so it runs on a
//! blocking thread under a process-wide limit of concurrent decodes, and refuses
//! images beyond [`super::PIXELS_MAX`] before decoding them.

use std::io::Cursor;
use std::path::Path;

use base64::Engine;
use image::{ImageFormat, ImageReader};

use super::{MediaError, PIXELS_MAX, THUMBNAIL_SIDE_MAX};

/// Decodes at most this many images at once.
pub const DECODES_MAX: usize = 1;

static DECODES: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(DECODES_MAX);

/// The decoder format for a content type [`super::sniff`] returns.
fn format_of(content_type: &str) -> ImageFormat {
    match content_type {
        "image/jpeg" => ImageFormat::Jpeg,
        "image/png" => ImageFormat::Png,
        "image/gif" => ImageFormat::Gif,
        "image/webp" => ImageFormat::WebP,
        other => unreachable!("sniff returned {other}"),
    }
}

/// Width, height and a `data:image/jpeg;base64,…` thumbnail of the image at `path`.
pub async fn inspect(path: &Path, content_type: &str) -> Result<(u32, u32, String), MediaError> {
    let format = format_of(content_type);
    let _permit = DECODES.acquire().await.expect("never closed");
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || inspect_blocking(&path, format))
        .await
        .map_err(|e| MediaError::Storage(format!("decoder task: {e}")))?
}

/// What [`inspect`] finds in `bytes` of `content_type` (one of [`super::sniff`]'s),
/// on this thread: for tests and fuzzing.
pub fn inspect_bytes(bytes: &[u8], content_type: &str) -> Result<(u32, u32, String), MediaError> {
    let format = format_of(content_type);
    decode(|| {
        let mut reader = ImageReader::new(Cursor::new(bytes));
        reader.set_format(format);
        Ok(reader)
    })
}

fn undecodable(e: impl std::fmt::Display) -> MediaError {
    MediaError::Undecodable(e.to_string())
}

fn inspect_blocking(path: &Path, format: ImageFormat) -> Result<(u32, u32, String), MediaError> {
    decode(|| {
        let mut reader = ImageReader::open(path)
            .map_err(|e| MediaError::Storage(format!("{}: {e}", path.display())))?;
        reader.set_format(format);
        Ok(reader)
    })
}

/// Reads the dimensions, refuses images beyond [`PIXELS_MAX`] before decoding,
/// then decodes (with an allocation limit) and makes the thumbnail.
fn decode<R: std::io::BufRead + std::io::Seek>(
    open: impl Fn() -> Result<ImageReader<R>, MediaError>,
) -> Result<(u32, u32, String), MediaError> {
    let (width, height) = open()?.into_dimensions().map_err(undecodable)?;
    let pixels = u64::from(width) * u64::from(height);
    if pixels == 0 || pixels > PIXELS_MAX {
        return Err(MediaError::Undecodable(format!(
            "{width}x{height} pixels; at most {PIXELS_MAX} pixels are accepted"
        )));
    }
    let mut reader = open()?;
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(PIXELS_MAX * 4 + 64 * 1024 * 1024);
    reader.limits(limits);
    let image = reader.decode().map_err(undecodable)?;
    let thumbnail = image
        .thumbnail(THUMBNAIL_SIDE_MAX, THUMBNAIL_SIDE_MAX)
        .to_rgb8();
    let mut jpeg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut Cursor::new(&mut jpeg), 70)
        .encode_image(&thumbnail)
        .map_err(undecodable)?;
    let data = base64::engine::general_purpose::STANDARD.encode(&jpeg);
    Ok((width, height, format!("data:image/jpeg;base64,{data}")))
}
