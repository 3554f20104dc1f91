//! What an HTTP request carries besides its body, split from the input at NUL
//! bytes: a media path segment, a query string (form-urlencoded, as `?conv=` is
//! read), a device header and a user id. Every validator answers without a panic,
//! and what it accepts stays within the id rules the protocol states.
#![no_main]

use chatproof_server::media::is_media_id;
use chatproof_server::protocol::{
    validate_conv_id, validate_device_id, validate_message_id, validate_user_id,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.split('\0');
    let (media, query, device, user) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    if is_media_id(media) {
        assert!(media.len() == 64 && media.bytes().all(|b| b.is_ascii_hexdigit()));
    }
    for (name, value) in form_urlencoded::parse(query.as_bytes()) {
        if name == "conv" && validate_conv_id(&value).is_ok() {
            assert!(
                value.starts_with("d:") || value.starts_with("g:"),
                "{value:?}"
            );
        }
    }
    // PROTOCOL.md: 1-64 of A-Z a-z 0-9 _ - . (message ids also `:`).
    let within = |id: &str, extra: &[u8]| {
        !id.is_empty()
            && id.len() <= 64
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b) || extra.contains(&b))
    };
    for id in [device, user] {
        assert_eq!(validate_device_id(id).is_ok(), within(id, b""), "{id:?}");
        assert_eq!(validate_user_id(id).is_ok(), within(id, b""), "{id:?}");
        assert_eq!(validate_message_id(id).is_ok(), within(id, b":"), "{id:?}");
    }
});
