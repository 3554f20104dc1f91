//! Correctness while loading: what each device receives is checked against the
//! delivery contract, with the contract's violation names.

use std::collections::{BTreeSet, HashMap};

use serde::Serialize;

/// Most example descriptions kept per run.
const EXAMPLES_MAX: usize = 20;
/// A gap wider than this is counted but its seqs are not remembered one by one.
const GAP_TRACK_MAX: u64 = 10_000;

/// Violation counts, named as in the delivery contract.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Violations {
    /// Acknowledged, never received by a member device that was online.
    pub lost: u64,
    /// Shown twice.
    pub duplicate: u64,
    /// Received after a higher seq.
    pub reorder: u64,
    /// A device's sequence skipped seqs (counted when it happened).
    pub gap: u64,
    /// Received but never sent, or from a conversation the user is not in.
    pub phantom: u64,
    /// The first few violations, described.
    pub examples: Vec<String>,
}

impl Violations {
    /// Total of all counts.
    pub fn total(&self) -> u64 {
        self.lost + self.duplicate + self.reorder + self.gap + self.phantom
    }

    /// Adds `other` into `self`.
    pub fn absorb(&mut self, other: &Self) {
        self.lost += other.lost;
        self.duplicate += other.duplicate;
        self.reorder += other.reorder;
        self.gap += other.gap;
        self.phantom += other.phantom;
        for e in &other.examples {
            self.note(e.clone());
        }
    }

    /// Keeps an example description (bounded).
    pub fn note(&mut self, example: String) {
        if self.examples.len() < EXAMPLES_MAX {
            self.examples.push(example);
        }
    }
}

#[derive(Debug)]
struct ConvOrder {
    next_seq: u64,
    skipped: BTreeSet<u64>,
}

/// One device's view of each conversation's order.
#[derive(Debug, Default)]
pub struct OrderCheck {
    convs: HashMap<String, ConvOrder>,
}

impl OrderCheck {
    /// Checks one received entry; `member` says whether the device's user belongs to `conv`.
    pub fn on_msg(&mut self, device: &str, conv: &str, seq: u64, member: bool, v: &mut Violations) {
        if !member {
            v.phantom += 1;
            v.note(format!(
                "phantom: {device} received {conv} seq {seq} without being a member"
            ));
            return;
        }
        let c = self.convs.entry(conv.to_owned()).or_insert(ConvOrder {
            next_seq: 1,
            skipped: BTreeSet::new(),
        });
        if seq == c.next_seq {
            c.next_seq += 1;
        } else if seq < c.next_seq {
            if c.skipped.remove(&seq) {
                v.reorder += 1;
                v.note(format!(
                    "reorder: {device} received {conv} seq {seq} after a higher seq"
                ));
            } else {
                v.duplicate += 1;
                v.note(format!(
                    "duplicate: {device} received {conv} seq {seq} twice"
                ));
            }
        } else {
            v.gap += 1;
            v.note(format!(
                "gap: {device} expected {conv} seq {} and received {seq}",
                c.next_seq
            ));
            if seq - c.next_seq <= GAP_TRACK_MAX {
                c.skipped.extend(c.next_seq..seq);
            }
            c.next_seq = seq + 1;
        }
    }

    /// The highest seq held without a hole, per conversation: the cursors a
    /// reconnecting device presents.
    pub fn cursors(&self) -> std::collections::BTreeMap<String, u64> {
        self.convs
            .iter()
            .map(|(conv, c)| {
                let contiguous = c
                    .skipped
                    .iter()
                    .next()
                    .map_or(c.next_seq - 1, |first| first - 1);
                (conv.clone(), contiguous)
            })
            .collect()
    }

    /// True if the device holds `seq` of `conv`.
    pub fn holds(&self, conv: &str, seq: u64) -> bool {
        self.convs
            .get(conv)
            .is_some_and(|c| seq < c.next_seq && !c.skipped.contains(&seq))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each kind of bad sequence is classified under its contract name.
    #[test]
    fn classifies_violations() {
        let mut check = OrderCheck::default();
        let mut v = Violations::default();
        for seq in [1, 2, 4, 3, 4] {
            check.on_msg("d", "c", seq, true, &mut v);
        }
        check.on_msg("d", "other", 1, false, &mut v);
        assert_eq!(
            (v.gap, v.reorder, v.duplicate, v.phantom, v.lost),
            (1, 1, 1, 1, 0)
        );
        assert!(check.holds("c", 3) && check.holds("c", 4) && !check.holds("c", 5));
        let mut clean = OrderCheck::default();
        let mut none = Violations::default();
        for seq in 1..=100 {
            clean.on_msg("d", "c", seq, true, &mut none);
        }
        assert_eq!(none.total(), 0);
    }
}
