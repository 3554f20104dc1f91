//! A streaming check of one device's order in each conversation (guarantee 4:
//! every entry after all lower seqs, never twice, no skipped number).

use std::borrow::Borrow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::Hash;

use crate::Violation;

/// A skip wider than this is counted but its seqs are not remembered one by one,
/// so a wildly wrong seq cannot make the checker hold billions of numbers.
pub const SKIP_TRACK_MAX: u64 = 10_000;

/// What was wrong with one observed entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OrderFault {
    /// [`Violation::Gap`], [`Violation::Reorder`] or [`Violation::Duplicate`].
    pub violation: Violation,
    /// The seq the device should have received next.
    pub expected: u64,
}

impl OrderFault {
    /// What happened, for a report: `device` got `seq` of `conv`.
    pub fn describe(&self, device: &str, conv: &str, seq: u64) -> String {
        match self.violation {
            Violation::Gap => format!(
                "{device} expected {conv} seq {} and received seq {seq}",
                self.expected
            ),
            Violation::Reorder => {
                format!("{device} received {conv} seq {seq} after a higher seq")
            }
            _ => format!("{device} received {conv} seq {seq} twice"),
        }
    }
}

#[derive(Debug)]
struct ConvOrder {
    first_seq: u64,
    next_seq: u64,
    skipped: BTreeSet<u64>,
}

/// One device's view of each conversation's order, fed one entry at a time.
///
/// An entry above the next expected seq is a `gap` (the skipped seqs are
/// remembered); a skipped seq arriving later is a `reorder`; anything else at
/// or below the expected seq is a `duplicate`.
///
/// Conversations are keyed by `K`: their protocol id by default, or anything
/// that names them one to one (the load generator keys by an index, so a
/// device's check holds no copy of the ids).
#[derive(Debug)]
pub struct OrderCheck<K = String> {
    convs: HashMap<K, ConvOrder>,
}

impl<K> Default for OrderCheck<K> {
    fn default() -> Self {
        Self {
            convs: HashMap::new(),
        }
    }
}

impl<K: Hash + Eq> OrderCheck<K> {
    /// Checks entry `seq` of `conv`, for a device that sees `conv` from seq 1.
    pub fn observe<Q>(&mut self, conv: &Q, seq: u64) -> Result<(), OrderFault>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        self.observe_from(conv, seq, 1)
    }

    /// Checks entry `seq` of `conv`; `first_seq` is the first seq the device
    /// may see (a member added later starts at the entry that added them) and
    /// counts only the first time `conv` is observed.
    pub fn observe_from<Q>(&mut self, conv: &Q, seq: u64, first_seq: u64) -> Result<(), OrderFault>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        assert!(first_seq >= 1, "seqs start at 1");
        let c = match self.convs.get_mut(conv) {
            Some(c) => c,
            None => self.convs.entry(conv.to_owned()).or_insert(ConvOrder {
                first_seq,
                next_seq: first_seq,
                skipped: BTreeSet::new(),
            }),
        };
        let expected = c.next_seq;
        if seq == expected {
            c.next_seq += 1;
            return Ok(());
        }
        let violation = if seq < expected {
            if c.skipped.remove(&seq) {
                Violation::Reorder
            } else {
                Violation::Duplicate
            }
        } else {
            if seq - expected <= SKIP_TRACK_MAX {
                c.skipped.extend(expected..seq);
            }
            c.next_seq = seq + 1;
            Violation::Gap
        };
        Err(OrderFault {
            violation,
            expected,
        })
    }

    /// The highest seq held without a hole, per conversation observed: the
    /// cursors a reconnecting device presents.
    pub fn cursors(&self) -> BTreeMap<K, u64>
    where
        K: Ord + Clone,
    {
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
    pub fn holds<Q>(&self, conv: &Q, seq: u64) -> bool
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.convs
            .get(conv)
            .is_some_and(|c| (c.first_seq..c.next_seq).contains(&seq) && !c.skipped.contains(&seq))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn faults(check: &mut OrderCheck, conv: &str, seqs: &[u64]) -> Vec<(Violation, u64)> {
        seqs.iter()
            .filter_map(|s| check.observe(conv, *s).err())
            .map(|f| (f.violation, f.expected))
            .collect()
    }

    /// Each kind of bad sequence is named as the contract names it.
    #[test]
    fn classifies_order_faults() {
        let mut check = OrderCheck::default();
        assert_eq!(
            faults(&mut check, "c", &[1, 2, 4, 3, 4]),
            vec![
                (Violation::Gap, 3),
                (Violation::Reorder, 5),
                (Violation::Duplicate, 5)
            ]
        );
        assert!(check.holds("c", 3) && check.holds("c", 4) && !check.holds("c", 5));
        assert_eq!(check.cursors()["c"], 4);
        let mut clean = OrderCheck::default();
        assert!(faults(&mut clean, "c", &(1..=100).collect::<Vec<_>>()).is_empty());
        assert_eq!(clean.cursors()["c"], 100);
    }

    /// A device that joined later starts at its first visible seq; a hole keeps
    /// its cursor below the hole.
    #[test]
    fn later_members_and_cursors() {
        let mut check = OrderCheck::default();
        assert_eq!(check.observe_from("g", 7, 7), Ok(()));
        assert_eq!(
            check.observe_from("g", 8, 1),
            Ok(()),
            "first_seq counts once"
        );
        assert_eq!(
            check.observe("g", 11).unwrap_err().violation,
            Violation::Gap
        );
        assert_eq!(check.cursors()["g"], 8);
        assert!(!check.holds("g", 9) && check.holds("g", 11) && !check.holds("g", 6));
        assert_eq!(
            check.observe("g", 3).unwrap_err().violation,
            Violation::Duplicate,
            "below the first visible seq is not a reorder"
        );
    }

    /// Keyed by an index instead of the id, the check classifies and remembers
    /// exactly as it does by id.
    #[test]
    fn an_index_keyed_check_matches_the_id_keyed_one() {
        let seqs = [1, 2, 5, 3, 3, 6, 4, 9];
        let mut by_id = OrderCheck::default();
        let mut by_index: OrderCheck<u32> = OrderCheck::default();
        for &seq in &seqs {
            assert_eq!(
                by_id.observe("g", seq),
                by_index.observe(&7, seq),
                "seq {seq}"
            );
        }
        assert_eq!(by_index.cursors()[&7], by_id.cursors()["g"]);
        for seq in 0..=10 {
            assert_eq!(by_index.holds(&7, seq), by_id.holds("g", seq), "seq {seq}");
        }
        assert!(!by_index.holds(&8, 1), "another conversation holds nothing");
    }
}
