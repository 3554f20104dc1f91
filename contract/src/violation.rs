//! The contract's violation names (`docs/GUARANTEES.md`, "Violations, by name").

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// One kind of broken promise. The `Display` form, the serde form and
/// [`Violation::name`] are exactly the contract's names (`receipt-regress`, …).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Violation {
    /// Acknowledged, never received by a device that should have it (guarantees 1 and 4).
    Lost,
    /// Shown twice, or one `message_id` under two `seq`s (guarantees 2 and 4).
    Duplicate,
    /// Received out of `seq` order (guarantee 4).
    Reorder,
    /// A device's sequence skips a number that exists (guarantees 3 and 4).
    Gap,
    /// Two messages under one `seq` (guarantee 3).
    Conflict,
    /// Received but never sent, or from a conversation the user was not in (guarantee 5).
    Phantom,
    /// A receipt went back (guarantee 6).
    ReceiptRegress,
    /// A receipt claimed more than the user's devices held or read, or a group
    /// summary more than a member's (guarantee 6).
    ReceiptOverclaim,
    /// An accepted ack moved a cursor past a sender's entry, and that sender's
    /// device, connected with no fault active, was never shown it (guarantee 6).
    ReceiptMissing,
    /// Outside fault windows, a delivery above the latency bound (guarantee 7).
    Slow,
    /// An entry's `server_time_ms` is below that of an earlier entry of its
    /// conversation (guarantee 3).
    TimeRegress,
    /// A user's last device went away, and a healthy device of a contact or
    /// watcher still did not show them offline (with a last-seen time that never
    /// went back) after the idle timeout plus the bound (guarantee 8).
    PresenceStale,
    /// One connection got two `presence` events within one presence interval
    /// (guarantee 8: changes are coalesced).
    PresenceFlood,
}

impl Violation {
    /// Every violation, in the contract's order.
    pub const ALL: [Violation; 13] = [
        Violation::Lost,
        Violation::Duplicate,
        Violation::Reorder,
        Violation::Gap,
        Violation::Conflict,
        Violation::Phantom,
        Violation::ReceiptRegress,
        Violation::ReceiptOverclaim,
        Violation::ReceiptMissing,
        Violation::Slow,
        Violation::TimeRegress,
        Violation::PresenceStale,
        Violation::PresenceFlood,
    ];

    /// The contract's name.
    pub const fn name(self) -> &'static str {
        match self {
            Violation::Lost => "lost",
            Violation::Duplicate => "duplicate",
            Violation::Reorder => "reorder",
            Violation::Gap => "gap",
            Violation::Conflict => "conflict",
            Violation::Phantom => "phantom",
            Violation::ReceiptRegress => "receipt-regress",
            Violation::ReceiptOverclaim => "receipt-overclaim",
            Violation::ReceiptMissing => "receipt-missing",
            Violation::Slow => "slow",
            Violation::TimeRegress => "time-regress",
            Violation::PresenceStale => "presence-stale",
            Violation::PresenceFlood => "presence-flood",
        }
    }

    /// The contract's one-line meaning.
    pub const fn meaning(self) -> &'static str {
        match self {
            Violation::Lost => "acknowledged, never received by a device that should have it",
            Violation::Duplicate => "shown twice, or one message_id under two seqs",
            Violation::Reorder => "received out of seq order",
            Violation::Gap => "a device's sequence skips a number that exists",
            Violation::Conflict => "two messages under one seq",
            Violation::Phantom => {
                "received but never sent, or from a conversation the user was not in"
            }
            Violation::ReceiptRegress => "a delivered or read receipt went back",
            Violation::ReceiptOverclaim => {
                "a receipt claimed more than the user's devices held or read"
            }
            Violation::ReceiptMissing => {
                "a cursor moved past a sender's entry and the sender's connected device never saw it"
            }
            Violation::Slow => "delivered above the latency bound with no fault active",
            Violation::TimeRegress => {
                "an entry's server time is below an earlier entry's of its conversation"
            }
            Violation::PresenceStale => {
                "a user gone away still not shown offline to a healthy contact after the bound"
            }
            Violation::PresenceFlood => "two presence events within one interval on one connection",
        }
    }

    /// Position in [`Violation::ALL`].
    pub const fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A name that is not one of the contract's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownViolation(pub String);

impl fmt::Display for UnknownViolation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = Violation::ALL.iter().map(|v| v.name()).collect();
        write!(
            f,
            "unknown violation {:?} (the contract names: {})",
            self.0,
            names.join(", ")
        )
    }
}

impl std::error::Error for UnknownViolation {}

impl FromStr for Violation {
    type Err = UnknownViolation;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        Violation::ALL
            .into_iter()
            .find(|v| v.name() == name)
            .ok_or_else(|| UnknownViolation(name.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Names, indexes, parsing and serde agree for every violation.
    #[test]
    fn names_round_trip() {
        for (i, v) in Violation::ALL.into_iter().enumerate() {
            assert_eq!(v.index(), i);
            assert_eq!(v.name().parse::<Violation>(), Ok(v));
            assert_eq!(v.to_string(), v.name());
            let json = serde_json::to_string(&v).unwrap();
            assert_eq!(json, format!("\"{}\"", v.name()));
            assert_eq!(serde_json::from_str::<Violation>(&json).unwrap(), v);
            assert!(!v.meaning().is_empty());
        }
        assert!("lose".parse::<Violation>().is_err());
        assert_eq!(Violation::ReceiptRegress.name(), "receipt-regress");
    }
}
