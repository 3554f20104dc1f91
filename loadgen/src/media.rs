//! Images for media-mix scenarios: generated once per size, made unique per
//! upload, uploaded and downloaded over the server's HTTP API.
//!
//! Each size is one JPEG of noise (noise does not compress, so the size is
//! honest) padded after its end marker to the exact size. Every upload appends
//! a unique 16-byte tail after the end marker, which decoders ignore, so no two
//! uploads share a content address and the server stores and decodes each one.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use sha2::{Digest, Sha256};

use crate::world::mix;

/// The server's image limit.
pub const IMAGE_LEN_MAX_BYTES: usize = 10 * 1024 * 1024;
/// Bytes appended to make an upload unique.
const UNIQUE_TAIL_LEN: usize = 16;

/// One JPEG per configured size.
pub struct ImageSet {
    images: Vec<Vec<u8>>,
}

impl ImageSet {
    /// Generates an image of each size in `sizes_kib` (deterministic for `seed`).
    pub fn generate(sizes_kib: &[u32], seed: u64) -> anyhow::Result<Self> {
        let images = sizes_kib
            .iter()
            .map(|kib| {
                noise_jpeg(
                    *kib as usize * 1024 - UNIQUE_TAIL_LEN,
                    seed ^ u64::from(*kib),
                )
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(Self { images })
    }

    /// The image chosen by `pick`, made unique by `unique`.
    pub fn unique(&self, pick: u64, unique: u64) -> Vec<u8> {
        let base = &self.images[(pick % self.images.len() as u64) as usize];
        let mut bytes = Vec::with_capacity(base.len() + UNIQUE_TAIL_LEN);
        bytes.extend_from_slice(base);
        bytes.extend_from_slice(&unique.to_be_bytes());
        bytes.extend_from_slice(&mix(unique).to_be_bytes());
        assert!(bytes.len() <= IMAGE_LEN_MAX_BYTES, "sizes are validated");
        bytes
    }

    /// Mean image size in bytes.
    pub fn mean_len(&self) -> f64 {
        self.images.iter().map(Vec::len).sum::<usize>() as f64 / self.images.len() as f64
    }
}

/// A JPEG of noise of exactly `len` bytes (padded after its end marker).
fn noise_jpeg(len: usize, seed: u64) -> anyhow::Result<Vec<u8>> {
    // Noise at quality 80 takes about 2 bytes per pixel; aim below and pad.
    let side = ((len as f64 / 2.6).sqrt() as u32).max(8);
    loop_encode(len, side, seed)
}

fn loop_encode(len: usize, mut side: u32, seed: u64) -> anyhow::Result<Vec<u8>> {
    for _ in 0..8 {
        let image = image::RgbImage::from_fn(side, side, |x, y| {
            let h = mix(seed ^ (u64::from(y) << 32) ^ u64::from(x));
            image::Rgb([h as u8, (h >> 8) as u8, (h >> 16) as u8])
        });
        let mut jpeg = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 80)
            .encode_image(&image)
            .context("encoding a test image")?;
        if jpeg.len() <= len {
            jpeg.resize(len, 0);
            return Ok(jpeg);
        }
        side = (f64::from(side) * 0.8) as u32;
    }
    bail!("cannot make a {len}-byte JPEG")
}

/// Uploads and downloads over `POST /v1/media` and `GET /v1/media/{id}`.
pub struct MediaHttp {
    client: Client<HttpConnector, Full<Bytes>>,
    base: String,
}

impl MediaHttp {
    /// A client of the server at `http://addr`.
    pub fn new(addr: std::net::SocketAddr) -> Self {
        Self {
            client: Client::builder(TokioExecutor::new()).build_http(),
            base: format!("http://{addr}"),
        }
    }

    /// Uploads `bytes` to `conv` as `token`'s user; returns the media id (checked
    /// against the bytes' SHA-256) and how long the upload took.
    pub async fn upload(
        &self,
        token: &str,
        conv: &str,
        bytes: Vec<u8>,
    ) -> anyhow::Result<(String, Duration)> {
        let expected: String = Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let request = hyper::Request::post(format!("{}/v1/media?conv={conv}", self.base))
            .header("authorization", format!("Bearer {token}"))
            .body(Full::new(Bytes::from(bytes)))?;
        let started = Instant::now();
        let response = self.client.request(request).await.context("upload")?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        let took = started.elapsed();
        if status != hyper::StatusCode::CREATED {
            bail!(
                "upload answered {status}: {}",
                String::from_utf8_lossy(&body)
            );
        }
        let reply: serde_json::Value = serde_json::from_slice(&body)?;
        let id = reply["media"]["id"]
            .as_str()
            .ok_or_else(|| anyhow!("upload reply without media.id: {reply}"))?;
        if id != expected {
            bail!("upload stored as {id}, expected the content address {expected}");
        }
        Ok((id.to_owned(), took))
    }

    /// Downloads `id` as `token`'s user and checks its length; returns how long it took.
    pub async fn download(&self, token: &str, id: &str, len: u64) -> anyhow::Result<Duration> {
        let request = hyper::Request::get(format!("{}/v1/media/{id}", self.base))
            .header("authorization", format!("Bearer {token}"))
            .body(Full::new(Bytes::new()))?;
        let started = Instant::now();
        let response = self.client.request(request).await.context("download")?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        let took = started.elapsed();
        if status != hyper::StatusCode::OK || body.len() as u64 != len {
            bail!(
                "download of {id} answered {status} with {} bytes, expected {len}",
                body.len()
            );
        }
        Ok(took)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every upload is a distinct, exactly sized JPEG that still decodes (the
    /// unique tail after the end marker is ignored by the server's decoder).
    #[test]
    fn unique_images_decode() {
        let set = ImageSet::generate(&[8, 64], 7).unwrap();
        let a = set.unique(0, 1);
        let b = set.unique(0, 2);
        let big = set.unique(1, 1);
        assert_eq!((a.len(), big.len()), (8 * 1024, 64 * 1024));
        assert_ne!(a, b, "distinct content addresses");
        assert_eq!(a[..a.len() - 16], b[..b.len() - 16]);
        for bytes in [&a, &big] {
            let decoded = image::load_from_memory_with_format(bytes, image::ImageFormat::Jpeg)
                .expect("decodes despite the tail");
            assert!(decoded.width() >= 8);
        }
    }
}
