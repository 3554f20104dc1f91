//! Image uploads: the format sniffing of the first bytes, then the decoder with
//! its pixel and allocation limits, on any bytes: refused as undecodable or read
//! with dimensions inside the limit and a JPEG thumbnail, never a panic.
#![no_main]

use chatproof_server::media::image_info::inspect_bytes;
use chatproof_server::media::{sniff, PIXELS_MAX};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some(content_type) = sniff(data) else {
        return;
    };
    if let Ok((width, height, thumbnail)) = inspect_bytes(data, content_type) {
        let pixels = u64::from(width) * u64::from(height);
        assert!(pixels > 0 && pixels <= PIXELS_MAX, "{width}x{height}");
        assert!(thumbnail.starts_with("data:image/jpeg;base64,"));
    }
});
