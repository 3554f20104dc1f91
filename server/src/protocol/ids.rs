//! Id rules shared by users, devices, conversations and messages.

use super::{ErrorCode, ProtocolError};

/// Longest id of any kind, in bytes.
pub const ID_LEN_MAX_BYTES: usize = 64;

fn check(kind: &str, id: &str, extra_allowed: &[u8]) -> Result<(), ProtocolError> {
    let ok_char =
        |b: &u8| b.is_ascii_alphanumeric() || b"_-.".contains(b) || extra_allowed.contains(b);
    if id.is_empty() || id.len() > ID_LEN_MAX_BYTES || !id.as_bytes().iter().all(ok_char) {
        return Err(ProtocolError::new(
            ErrorCode::InvalidId,
            format!(
                "{kind} id {id:?} must be 1-{ID_LEN_MAX_BYTES} characters of A-Z a-z 0-9 _ - ."
            ),
        ));
    }
    Ok(())
}

/// Users: 1-64 of `A-Z a-z 0-9 _ - .`.
pub fn validate_user_id(id: &str) -> Result<(), ProtocolError> {
    check("user", id, b"")
}

/// Devices: same rule as users.
pub fn validate_device_id(id: &str) -> Result<(), ProtocolError> {
    check("device", id, b"")
}

/// Messages (chosen by the client): same characters plus `:`.
pub fn validate_message_id(id: &str) -> Result<(), ProtocolError> {
    check("message", id, b":")
}

/// Conversations: `d:` + two user ids joined by `:` (server-made), or `g:` + a group name.
pub fn validate_conv_id(id: &str) -> Result<(), ProtocolError> {
    let bad = || {
        ProtocolError::new(
            ErrorCode::InvalidId,
            format!("conversation id {id:?} must be \"d:USER:USER\" or \"g:NAME\""),
        )
    };
    if id.len() > 2 * ID_LEN_MAX_BYTES + 3 {
        return Err(bad());
    }
    if let Some(rest) = id.strip_prefix("d:") {
        let (a, b) = rest.split_once(':').ok_or_else(bad)?;
        validate_user_id(a).map_err(|_| bad())?;
        validate_user_id(b).map_err(|_| bad())?;
        if a >= b {
            return Err(bad());
        }
        return Ok(());
    }
    if let Some(name) = id.strip_prefix("g:") {
        return check("group", name, b"");
    }
    Err(bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ids outside the rules are refused with `invalid_id`; valid ones pass.
    #[test]
    fn id_rules() {
        assert!(validate_user_id("alice_1").is_ok());
        assert!(validate_user_id("").is_err());
        assert!(validate_user_id("a b").is_err());
        assert!(validate_user_id(&"x".repeat(65)).is_err());
        assert!(validate_message_id("m:1").is_ok());
        assert!(validate_conv_id("d:alice:bob").is_ok());
        assert!(
            validate_conv_id("d:bob:alice").is_err(),
            "direct ids are ordered"
        );
        assert!(validate_conv_id("d:alice:alice").is_err());
        assert!(validate_conv_id("g:team-1").is_ok());
        assert!(validate_conv_id("x:1").is_err());
        assert_eq!(
            validate_conv_id("g:").unwrap_err().code,
            ErrorCode::InvalidId
        );
    }
}
