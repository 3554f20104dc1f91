//! Cursors: how far a device (or user) has received and read a conversation.

use serde::{Deserialize, Serialize};

use crate::protocol::{ConvKind, ErrorCode, ProtocolError};

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

/// The group receipt floor of an ack (`all_members`): what every current member
/// has received and read. Per cell, the minimum over `members` (the current ones)
/// of their user cursors, where `user` counts with `user_after` (the ack just
/// raised it), a member `cursor_of` knows nothing of counts as 0, and no members
/// at all give 0. `None` for a direct conversation, which reports no floor.
pub fn receipt_floor(
    kind: ConvKind,
    members: &[String],
    user: &str,
    user_after: Cursor,
    cursor_of: impl Fn(&str) -> Option<Cursor>,
) -> Option<Cursor> {
    if kind != ConvKind::Group {
        return None;
    }
    let of = |member: &String| {
        if member == user {
            user_after
        } else {
            cursor_of(member).unwrap_or_default()
        }
    };
    Some(Cursor {
        delivered: members.iter().map(|m| of(m).delivered).min().unwrap_or(0),
        read: members.iter().map(|m| of(m).read).min().unwrap_or(0),
    })
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

    fn at(delivered: u64, read: u64) -> Cursor {
        Cursor { delivered, read }
    }

    /// The floor is the per-cell minimum over current members, counting the acking
    /// user's new cursor and members without a cursor as 0.
    #[test]
    fn receipt_floor_is_the_slowest_member() {
        let members = ["a".to_owned(), "b".to_owned(), "c".to_owned()];
        let stored = |u: &str| match u {
            "a" => Some(at(3, 1)), // Stale: the ack below raised it.
            "b" => Some(at(5, 4)),
            "c" => Some(at(9, 2)),
            _ => Some(at(0, 0)),
        };
        let floor = receipt_floor(ConvKind::Group, &members, "a", at(8, 6), stored);
        assert_eq!(floor, Some(at(5, 2)));
        let floor = receipt_floor(ConvKind::Group, &members, "a", at(8, 6), |u: &str| {
            (u != "c").then_some(at(7, 7))
        });
        assert_eq!(
            floor,
            Some(at(0, 0)),
            "a member who never acked holds it at 0"
        );
    }

    /// Direct conversations have no floor; an empty group's is 0.
    #[test]
    fn receipt_floor_of_direct_and_empty() {
        let members = ["a".to_owned(), "b".to_owned()];
        let none = receipt_floor(ConvKind::Direct, &members, "a", at(4, 4), |_: &str| None);
        assert_eq!(none, None);
        let empty = receipt_floor(ConvKind::Group, &[], "a", at(4, 4), |_: &str| None);
        assert_eq!(empty, Some(at(0, 0)));
    }
}
