//! Cursors: how far a device (or user) has received and read a conversation.

use serde::{Deserialize, Serialize};

use crate::protocol::{ErrorCode, ProtocolError};

/// Delivered-up-to and read-up-to seqs; `read <= delivered` always.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    /// Every seq up to this was received.
    pub delivered: u64,
    /// The user read up to this.
    pub read: u64,
}

impl Cursor {
    /// Moves forward by an ack, never backwards; reading implies receiving.
    ///
    /// Refuses (`cursor_ahead`) seqs above `visible_max`, the highest seq the user may hold.
    pub fn advance(
        self,
        delivered: Option<u64>,
        read: Option<u64>,
        visible_max: u64,
    ) -> Result<Self, ProtocolError> {
        for (name, value) in [("delivered", delivered), ("read", read)] {
            if let Some(v) = value.filter(|v| *v > visible_max) {
                return Err(ProtocolError::new(
                    ErrorCode::CursorAhead,
                    format!("{name} {v} is beyond the last entry you may hold ({visible_max})"),
                ));
            }
        }
        let read = self.read.max(read.unwrap_or(0));
        let next = Self {
            delivered: self.delivered.max(delivered.unwrap_or(0)).max(read),
            read,
        };
        debug_assert!(next.read <= next.delivered);
        debug_assert!(next.delivered >= self.delivered && next.read >= self.read);
        Ok(next)
    }

    /// The larger of two cursors, field by field.
    pub fn max(self, other: Self) -> Self {
        Self {
            delivered: self.delivered.max(other.delivered),
            read: self.read.max(other.read),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Cursors never regress, read pulls delivered along, and overclaims are refused.
    #[test]
    fn advance_is_monotonic() {
        let c = Cursor::default().advance(Some(5), None, 10).unwrap();
        assert_eq!(
            c,
            Cursor {
                delivered: 5,
                read: 0
            }
        );
        let c = c.advance(Some(3), Some(7), 10).unwrap();
        assert_eq!(
            c,
            Cursor {
                delivered: 7,
                read: 7
            }
        );
        assert_eq!(
            c.advance(Some(11), None, 10).unwrap_err().code,
            ErrorCode::CursorAhead
        );
    }
}
