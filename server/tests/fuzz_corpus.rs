//! Replays every committed fuzz input (`fuzz/corpus/TARGET/`, the seeds and the
//! crashes found and fixed) through what its fuzz target drives, on stable, so a
//! fixed crash stays fixed without the nightly fuzzing build. `scripts/fuzz.sh`
//! runs the fuzzers themselves.

use std::path::PathBuf;

use chatproof_server::auth::TokenKey;
use chatproof_server::media::image_info::inspect_bytes;
use chatproof_server::media::{is_media_id, sniff, PIXELS_MAX};
use chatproof_server::protocol::{decode_request, validate_conv_id, validate_user_id};

/// Every input committed for `target`.
fn inputs(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut found: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .map(|p| {
            let bytes = std::fs::read(&p).unwrap();
            (p, bytes)
        })
        .collect();
    found.sort();
    assert!(!found.is_empty(), "no inputs in {}", dir.display());
    found
}

#[test]
fn frame_decoder_inputs() {
    let mut decoded = 0;
    for (path, bytes) in inputs("frame_decoder") {
        let Ok(text) = std::str::from_utf8(&bytes) else {
            continue;
        };
        match decode_request(text) {
            Ok((rid, _)) => {
                assert!(!rid.is_empty(), "{}", path.display());
                decoded += 1;
            }
            Err((_, err)) => assert!(!err.message.is_empty(), "{}", path.display()),
        }
    }
    assert!(decoded > 0, "the seeds include valid requests");
}

#[test]
fn token_inputs() {
    let key = TokenKey::new(b"fuzz-secret-0123456789abcdef").unwrap();
    for (_, bytes) in inputs("token") {
        let text = String::from_utf8_lossy(&bytes);
        let _ = key.verify(&text, 1_764_000_000);
        if validate_user_id(&text).is_ok() {
            let token = key.mint(&text, 1_764_000_060);
            assert_eq!(key.verify(&token, 1_764_000_000).unwrap().sub, text);
        }
    }
}

#[test]
fn request_inputs() {
    for (_, bytes) in inputs("request_inputs") {
        let text = String::from_utf8_lossy(&bytes);
        let mut parts = text.split('\0');
        let media = parts.next().unwrap_or_default();
        let _ = is_media_id(media);
        for (_, value) in form_urlencoded::parse(parts.next().unwrap_or_default().as_bytes()) {
            let _ = validate_conv_id(&value);
        }
    }
}

#[test]
fn image_sniff_inputs() {
    let mut read = 0;
    for (path, bytes) in inputs("image_sniff") {
        let Some(content_type) = sniff(&bytes) else {
            continue;
        };
        if let Ok((w, h, thumbnail)) = inspect_bytes(&bytes, content_type) {
            let pixels = u64::from(w) * u64::from(h);
            assert!(pixels > 0 && pixels <= PIXELS_MAX, "{}", path.display());
            assert!(thumbnail.starts_with("data:image/jpeg;base64,"));
            read += 1;
        }
    }
    assert!(read > 0, "the seeds include readable images");
}
