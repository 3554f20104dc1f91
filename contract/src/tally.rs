//! Counts of each violation, with a bounded set of described examples.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::Violation;

/// Examples kept beyond the first of each violation.
pub const EXAMPLES_MAX: usize = 20;

/// How many times each violation was seen, and examples of them.
///
/// The first example of every violation is always kept; beyond those at most
/// [`EXAMPLES_MAX`] are. Serialized as one field per violation name (every
/// name, zeros included) plus `examples`; a missing name reads as 0, so older
/// summaries that counted fewer kinds still load.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "TallyFields", into = "TallyFields")]
pub struct Tally {
    counts: [u64; Violation::ALL.len()],
    examples: Vec<String>,
}

impl Tally {
    /// Counts one `violation`; `detail` says what exactly (conversation, seq,
    /// device) and is kept as an example `"<name>: <detail>"` when there is room.
    pub fn record(&mut self, violation: Violation, detail: impl FnOnce() -> String) {
        let first = self.counts[violation.index()] == 0;
        self.counts[violation.index()] += 1;
        if first || self.examples.len() < EXAMPLES_MAX {
            self.examples.push(format!("{violation}: {}", detail()));
        }
    }

    /// How many times `violation` was seen.
    pub fn count(&self, violation: Violation) -> u64 {
        self.counts[violation.index()]
    }

    /// Every violation seen at least once, with its count, in the contract's order.
    pub fn seen(&self) -> impl Iterator<Item = (Violation, u64)> + '_ {
        Violation::ALL
            .into_iter()
            .map(|v| (v, self.count(v)))
            .filter(|(_, n)| *n > 0)
    }

    /// Total over every violation.
    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Whether nothing was seen.
    pub fn is_clean(&self) -> bool {
        self.total() == 0
    }

    /// The kept examples, in the order they were recorded (merged tallies append).
    pub fn examples(&self) -> &[String] {
        &self.examples
    }

    /// The first kept example of `violation`.
    pub fn first_example(&self, violation: Violation) -> Option<&str> {
        let prefix = format!("{violation}: ");
        self.examples
            .iter()
            .find(|e| e.starts_with(&prefix))
            .map(String::as_str)
    }

    /// Adds `other` into `self`, keeping examples within the same bounds.
    pub fn absorb(&mut self, other: &Tally) {
        for v in Violation::ALL {
            let first = self.counts[v.index()] == 0 && other.counts[v.index()] > 0;
            self.counts[v.index()] += other.counts[v.index()];
            if first {
                if let Some(e) = other.first_example(v) {
                    self.examples.push(e.to_owned());
                }
            }
        }
        for e in &other.examples {
            if self.examples.len() >= EXAMPLES_MAX {
                break;
            }
            if !self.examples.contains(e) {
                self.examples.push(e.clone());
            }
        }
    }

    /// One line: `lost 0 · duplicate 0 · …` over every violation.
    pub fn line(&self) -> String {
        Violation::ALL
            .iter()
            .map(|v| format!("{v} {}", self.count(*v)))
            .collect::<Vec<_>>()
            .join(" · ")
    }
}

/// The serialized form of a [`Tally`].
#[derive(Serialize, Deserialize)]
struct TallyFields {
    #[serde(flatten)]
    counts: BTreeMap<Violation, u64>,
    #[serde(default)]
    examples: Vec<String>,
}

impl From<TallyFields> for Tally {
    fn from(fields: TallyFields) -> Self {
        let mut counts = [0; Violation::ALL.len()];
        for (v, n) in fields.counts {
            counts[v.index()] = n;
        }
        Tally {
            counts,
            examples: fields.examples,
        }
    }
}

impl From<Tally> for TallyFields {
    fn from(tally: Tally) -> Self {
        TallyFields {
            counts: Violation::ALL
                .into_iter()
                .map(|v| (v, tally.count(v)))
                .collect(),
            examples: tally.examples,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts add up, the first example of each kind survives the bound, and
    /// merging keeps both.
    #[test]
    fn counts_and_examples() {
        let mut tally = Tally::default();
        assert!(tally.is_clean());
        for i in 0..100 {
            tally.record(Violation::Gap, || format!("gap number {i}"));
        }
        tally.record(Violation::Lost, || "m1 never reached d0".into());
        assert_eq!(tally.count(Violation::Gap), 100);
        assert_eq!(tally.total(), 101);
        assert_eq!(tally.examples().len(), EXAMPLES_MAX + 1);
        assert_eq!(
            tally.first_example(Violation::Lost),
            Some("lost: m1 never reached d0")
        );
        let mut merged = Tally::default();
        let mut other = Tally::default();
        other.record(Violation::Slow, || "took 900 ms".into());
        merged.absorb(&tally);
        merged.absorb(&other);
        assert_eq!(merged.total(), 102);
        assert!(merged.first_example(Violation::Slow).is_some());
        assert!(merged.first_example(Violation::Lost).is_some());
        assert_eq!(
            merged.seen().collect::<Vec<_>>(),
            vec![
                (Violation::Lost, 1),
                (Violation::Gap, 100),
                (Violation::Slow, 1)
            ]
        );
    }

    /// Every name is written; a summary written before some kinds existed still loads.
    #[test]
    fn serde_form() {
        let mut tally = Tally::default();
        tally.record(Violation::ReceiptRegress, || "2 then 1".into());
        let json = serde_json::to_value(&tally).unwrap();
        assert_eq!(json["receipt-regress"], 1);
        assert_eq!(json["lost"], 0);
        assert_eq!(json["examples"][0], "receipt-regress: 2 then 1");
        let back: Tally = serde_json::from_value(json).unwrap();
        assert_eq!(back, tally);
        let old = r#"{"lost":2,"duplicate":0,"reorder":0,"gap":1,"phantom":0,"examples":[]}"#;
        let old: Tally = serde_json::from_str(old).unwrap();
        assert_eq!((old.count(Violation::Lost), old.total()), (2, 3));
    }
}
