//! Stateless bearer tokens: `base64url(claims JSON) "." base64url(HMAC-SHA256(secret, claims))`.
//!
//! The server keeps no session table: any server holding the secret verifies any token.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::protocol::{validate_user_id, ErrorCode, ProtocolError};

type HmacSha256 = Hmac<Sha256>;

/// Shortest secret accepted, in bytes.
pub const SECRET_LEN_MIN_BYTES: usize = 16;

/// What a token asserts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The user id.
    pub sub: String,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
}

/// Mints and verifies tokens with one server secret.
#[derive(Clone)]
pub struct TokenKey {
    secret: Vec<u8>,
}

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenKey(..)")
    }
}

impl TokenKey {
    /// A key from a secret of at least [`SECRET_LEN_MIN_BYTES`].
    pub fn new(secret: &[u8]) -> Result<Self, String> {
        if secret.len() < SECRET_LEN_MIN_BYTES {
            return Err(format!(
                "the secret must be at least {SECRET_LEN_MIN_BYTES} bytes"
            ));
        }
        Ok(Self {
            secret: secret.to_vec(),
        })
    }

    fn mac(&self, payload: &[u8]) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.secret).expect("HMAC takes any key length");
        mac.update(payload);
        mac
    }

    /// Mints a token for `user` that expires at `exp_unix_s`.
    pub fn mint(&self, user: &str, exp_unix_s: u64) -> String {
        let claims = serde_json::to_vec(&Claims {
            sub: user.to_owned(),
            exp: exp_unix_s,
        })
        .expect("claims serialize");
        let signature = self.mac(&claims).finalize().into_bytes();
        format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(&claims),
            URL_SAFE_NO_PAD.encode(signature)
        )
    }

    /// Verifies signature and expiry at `now_unix_s`; returns the claims.
    pub fn verify(&self, token: &str, now_unix_s: u64) -> Result<Claims, ProtocolError> {
        let unauthorized = |why: &str| ProtocolError::new(ErrorCode::Unauthorized, why.to_owned());
        let (payload, signature) = token
            .split_once('.')
            .ok_or_else(|| unauthorized("malformed token"))?;
        let payload = URL_SAFE_NO_PAD
            .decode(payload)
            .map_err(|_| unauthorized("malformed token"))?;
        let signature = URL_SAFE_NO_PAD
            .decode(signature)
            .map_err(|_| unauthorized("malformed token"))?;
        self.mac(&payload)
            .verify_slice(&signature)
            .map_err(|_| unauthorized("token signature does not match"))?;
        let claims: Claims =
            serde_json::from_slice(&payload).map_err(|_| unauthorized("malformed token claims"))?;
        validate_user_id(&claims.sub)
            .map_err(|_| unauthorized("token names an invalid user id"))?;
        if claims.exp <= now_unix_s {
            return Err(ProtocolError::new(ErrorCode::TokenExpired, "token expired"));
        }
        Ok(claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Good tokens verify; forged, tampered, foreign-key and expired ones do not.
    #[test]
    fn verify_rejects_bad_tokens() {
        let key = TokenKey::new(b"0123456789abcdef0123").unwrap();
        let token = key.mint("alice", 1_000);
        assert_eq!(key.verify(&token, 999).unwrap().sub, "alice");
        assert_eq!(
            key.verify(&token, 1_000).unwrap_err().code,
            ErrorCode::TokenExpired
        );
        let other = TokenKey::new(b"another-secret-of-16").unwrap();
        assert_eq!(
            other.verify(&token, 0).unwrap_err().code,
            ErrorCode::Unauthorized
        );
        let forged = key.mint("mallory", 1_000);
        let spliced = format!(
            "{}.{}",
            forged.split('.').next().unwrap(),
            token.split('.').nth(1).unwrap()
        );
        assert_eq!(
            key.verify(&spliced, 0).unwrap_err().code,
            ErrorCode::Unauthorized
        );
        assert_eq!(
            key.verify("nonsense", 0).unwrap_err().code,
            ErrorCode::Unauthorized
        );
        assert!(TokenKey::new(b"short").is_err());
    }
}
