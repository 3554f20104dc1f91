//! Token verification on any text (the `hello` token and the HTTP bearer token):
//! refused with a code, never a panic; and a token minted for a valid user id
//! verifies as that user until it expires, and not after.
#![no_main]

use chatproof_server::auth::TokenKey;
use chatproof_server::protocol::validate_user_id;
use libfuzzer_sys::fuzz_target;

const NOW: u64 = 1_764_000_000;

fuzz_target!(|data: &[u8]| {
    let key = TokenKey::new(b"fuzz-secret-0123456789abcdef").expect("a valid secret");
    let text = String::from_utf8_lossy(data);
    if let Err(err) = key.verify(&text, NOW) {
        assert!(!err.message.is_empty());
    }
    if validate_user_id(&text).is_ok() {
        let token = key.mint(&text, NOW + 60);
        let claims = key.verify(&token, NOW).expect("a minted token verifies");
        assert_eq!(claims.sub, text);
        assert!(
            key.verify(&token, NOW + 61).is_err(),
            "an expired token is refused"
        );
    }
});
