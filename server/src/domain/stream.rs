//! One device's view of each conversation's order: turns pushes that may arrive
//! late, twice or out of order into one gap-free, duplicate-free sequence.
//!
//! The session keeps a `DeviceStream`; every push goes through [`DeviceStream::on_push`],
//! and the session obeys the step it returns. Storage stays the source of truth:
//! a gap is filled by reading the store, never by waiting.

use std::collections::HashMap;

/// What the session must do with a pushed entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamStep {
    /// Deliver it now: it is the next seq.
    Deliver,
    /// Drop it: the device already has it.
    Duplicate,
    /// Read `from..=to` from the store and deliver those first (`to` is the pushed seq).
    Fill {
        /// First missing seq.
        from: u64,
        /// The pushed seq.
        to: u64,
    },
    /// Drop it: past the point where the user left the conversation.
    NotVisible,
    /// The conversation is not started on this stream; look up where it starts.
    Unknown,
}

#[derive(Debug, Clone, Copy)]
struct Position {
    next_seq: u64,
    visible_until: u64,
}

/// Per-conversation "next seq to deliver" for one device.
#[derive(Debug, Default)]
pub struct DeviceStream {
    positions: HashMap<String, Position>,
}

impl DeviceStream {
    /// Starts (or restarts) `conv` so that the next entry delivered is `next_seq`.
    ///
    /// `visible_until` is the highest seq the user may see (the seq that removed them).
    pub fn start(&mut self, conv: &str, next_seq: u64, visible_until: u64) {
        assert!(next_seq >= 1, "seqs start at 1");
        self.positions.insert(
            conv.to_owned(),
            Position {
                next_seq,
                visible_until,
            },
        );
    }

    /// Next seq `conv` expects, if started.
    pub fn next_seq(&self, conv: &str) -> Option<u64> {
        self.positions.get(conv).map(|p| p.next_seq)
    }

    /// Highest seq visible in `conv`, if started.
    pub fn visible_until(&self, conv: &str) -> Option<u64> {
        self.positions.get(conv).map(|p| p.visible_until)
    }

    /// Classifies a push of `seq` in `conv`.
    pub fn on_push(&self, conv: &str, seq: u64) -> StreamStep {
        let Some(p) = self.positions.get(conv) else {
            return StreamStep::Unknown;
        };
        if seq > p.visible_until {
            StreamStep::NotVisible
        } else if seq < p.next_seq {
            StreamStep::Duplicate
        } else if seq == p.next_seq {
            StreamStep::Deliver
        } else {
            StreamStep::Fill {
                from: p.next_seq,
                to: seq,
            }
        }
    }

    /// Records that `seq` was written to the device (or is known lost to expiry).
    ///
    /// Panics if `seq` is below the next expected seq: that would be a duplicate.
    pub fn delivered(&mut self, conv: &str, seq: u64) {
        let p = self
            .positions
            .get_mut(conv)
            .expect("delivered on a started conversation");
        assert!(
            seq >= p.next_seq,
            "{conv}: seq {seq} delivered twice (next {})",
            p.next_seq
        );
        p.next_seq = seq + 1;
    }

    /// Restricts visibility after the user was removed at `left_seq`.
    pub fn close_at(&mut self, conv: &str, left_seq: u64) {
        if let Some(p) = self.positions.get_mut(conv) {
            p.visible_until = p.visible_until.min(left_seq);
        }
    }

    /// Conversations where the store may hold entries beyond what was delivered, given each one's last seq.
    pub fn behind<'a>(
        &'a self,
        last_seqs: &'a [(String, u64)],
    ) -> impl Iterator<Item = &'a str> + 'a {
        last_seqs.iter().filter_map(|(conv, last)| {
            let p = self.positions.get(conv)?;
            (p.next_seq <= (*last).min(p.visible_until)).then_some(conv.as_str())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pushes classify by position: next, old, ahead, invisible, unknown.
    #[test]
    fn classify_pushes() {
        let mut s = DeviceStream::default();
        assert_eq!(s.on_push("c", 1), StreamStep::Unknown);
        s.start("c", 3, u64::MAX);
        assert_eq!(s.on_push("c", 2), StreamStep::Duplicate);
        assert_eq!(s.on_push("c", 3), StreamStep::Deliver);
        assert_eq!(s.on_push("c", 6), StreamStep::Fill { from: 3, to: 6 });
        s.delivered("c", 3);
        assert_eq!(s.on_push("c", 3), StreamStep::Duplicate);
        s.close_at("c", 5);
        assert_eq!(s.on_push("c", 6), StreamStep::NotVisible);
        assert_eq!(s.next_seq("c"), Some(4));
    }

    /// Delivering an old seq again is a programming error, caught by an assertion.
    #[test]
    #[should_panic(expected = "delivered twice")]
    fn double_delivery_panics() {
        let mut s = DeviceStream::default();
        s.start("c", 1, u64::MAX);
        s.delivered("c", 1);
        s.delivered("c", 1);
    }
}
