//! Every acknowledged message of a run, kept per conversation as ranges of seqs: what
//! the end of a run checks each member device against ("lost"). The seqs a server
//! acknowledges in one conversation are nearly contiguous whichever device sent
//! them, so the memory this takes is bounded by the gaps (acks in flight, refused
//! sends), not by the messages a run sends.

use std::sync::Mutex;

/// A set of seqs as sorted, disjoint, non-adjacent half-open ranges.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SeqSet {
    ranges: Vec<(u64, u64)>,
    len: u64,
}

impl SeqSet {
    /// Adds `seq`; false if it was already there.
    pub fn insert(&mut self, seq: u64) -> bool {
        assert!(seq < u64::MAX, "seq {seq} out of range");
        // The first range starting after `seq`; the one before it may hold or touch it.
        let i = self.ranges.partition_point(|r| r.0 <= seq);
        if i > 0 && self.ranges[i - 1].1 > seq {
            return false;
        }
        let joins_before = i > 0 && self.ranges[i - 1].1 == seq;
        let joins_after = i < self.ranges.len() && self.ranges[i].0 == seq + 1;
        match (joins_before, joins_after) {
            (true, true) => {
                self.ranges[i - 1].1 = self.ranges[i].1;
                self.ranges.remove(i);
            }
            (true, false) => self.ranges[i - 1].1 += 1,
            (false, true) => self.ranges[i].0 = seq,
            (false, false) => self.ranges.insert(i, (seq, seq + 1)),
        }
        self.len += 1;
        debug_assert!(self
            .ranges
            .windows(2)
            .all(|w| w[0].0 < w[0].1 && w[0].1 < w[1].0));
        true
    }

    /// How many seqs it holds.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Every seq, ascending.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.ranges.iter().flat_map(|&(from, until)| from..until)
    }

    /// The ranges it is kept as (what it costs in memory).
    #[cfg(test)]
    fn ranges(&self) -> usize {
        self.ranges.len()
    }
}

/// The acknowledged seqs of the conversations a process checks, by each
/// conversation's index in the run's world; one lock per conversation. Sized by the
/// conversations given, not by the world: a worker of a 200,000-user run keeps its
/// share only.
pub struct Acked {
    /// World indexes, ascending, without repeats; `seqs[i]` belongs to `indexes[i]`.
    indexes: Vec<u32>,
    seqs: Vec<Mutex<SeqSet>>,
}

impl Acked {
    /// Nothing acknowledged yet in the conversations `convs` (world indexes, in any
    /// order, repeats allowed).
    pub fn new(convs: impl IntoIterator<Item = u32>) -> Self {
        let mut indexes: Vec<u32> = convs.into_iter().collect();
        indexes.sort_unstable();
        indexes.dedup();
        indexes.shrink_to_fit();
        let seqs = indexes.iter().map(|_| Mutex::default()).collect();
        Self { indexes, seqs }
    }

    /// Records the ack of `seq` in conversation `conv`; false if that seq was already
    /// acknowledged (a retried send the server recognised).
    ///
    /// Panics if `conv` is not one of the conversations this was made for: a device
    /// records acks of its own conversations only.
    pub fn record(&self, conv: u32, seq: u64) -> bool {
        let slot = self
            .indexes
            .binary_search(&conv)
            .unwrap_or_else(|_| panic!("conversation {conv} is not checked by this process"));
        self.seqs[slot].lock().expect("acked seqs").insert(seq)
    }

    /// Acknowledged messages in all.
    pub fn count(&self) -> u64 {
        self.seqs
            .iter()
            .map(|c| c.lock().expect("acked seqs").len())
            .sum()
    }

    /// Each conversation's world index with a copy of its acknowledged seqs.
    pub fn by_conv(&self) -> impl Iterator<Item = (u32, SeqSet)> + '_ {
        self.indexes
            .iter()
            .zip(&self.seqs)
            .map(|(&i, c)| (i, c.lock().expect("acked seqs").clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// Seqs inserted in any order give the set a `BTreeSet` holds, in few ranges.
    #[test]
    fn holds_what_was_inserted_in_any_order() {
        let mut x: u64 = 0x2545_F491_4F6C_DD1D;
        let mut set = SeqSet::default();
        let mut reference = BTreeSet::new();
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let seq = 1 + x % 5_000;
            assert_eq!(set.insert(seq), reference.insert(seq), "seq {seq}");
        }
        assert_eq!(
            set.iter().collect::<Vec<_>>(),
            reference.iter().copied().collect::<Vec<_>>()
        );
        assert_eq!(set.len(), reference.len() as u64);
        let runs = reference
            .iter()
            .zip(reference.iter().skip(1))
            .filter(|(a, b)| **b != **a + 1)
            .count()
            + 1;
        assert_eq!(set.ranges(), runs, "adjacent seqs share a range");
    }

    /// Acks of one conversation from several devices, slightly out of order, take
    /// one range whatever their number.
    #[test]
    fn a_conversations_acks_take_one_range() {
        let acked = Acked::new([9, 1, 9]);
        for seq in (2..100_000u64).step_by(2) {
            assert!(acked.record(1, seq + 1));
            assert!(acked.record(1, seq));
        }
        assert!(
            !acked.record(1, 7),
            "a second ack of a seq is not a second message"
        );
        assert_eq!(acked.count(), 99_998);
        let (index, set) = acked.by_conv().next().unwrap();
        assert_eq!(index, 1);
        assert_eq!(set.ranges(), 1);
        assert_eq!(set.iter().next(), Some(2));
        assert_eq!(
            acked.by_conv().map(|(i, _)| i).collect::<Vec<_>>(),
            vec![1, 9],
            "one entry per conversation, ascending"
        );
    }

    /// A conversation the process does not check is a bug in the caller.
    #[test]
    #[should_panic(expected = "not checked by this process")]
    fn an_unknown_conversation_is_refused() {
        Acked::new([3]).record(4, 1);
    }
}
