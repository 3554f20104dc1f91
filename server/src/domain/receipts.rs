//! What one device has been shown of each (conversation, user)'s receipt: a
//! receipt it is given never takes back what an earlier one showed.
//!
//! Receipts computed on different servers, or from reads that raced a concurrent
//! ack, can arrive out of order; cursors only grow, so the device is shown the
//! field-by-field maximum of everything it was given ([`Receipt::merged`]).

use std::collections::HashMap;

use crate::protocol::Receipt;

/// The receipts one device was shown, by (conversation, user).
#[derive(Debug, Default)]
pub struct ReceiptsShown {
    shown: HashMap<(String, String), Receipt>,
}

/// What [`ReceiptsShown::show`] decided for an arriving receipt.
#[derive(Debug, PartialEq, Eq)]
pub enum ReceiptView {
    /// Show the arriving receipt as it is (it is new, or it only raises what was shown).
    AsArrived,
    /// Show this merge of the arriving receipt with what was shown.
    Merged(Receipt),
    /// Show nothing: it adds nothing to what was shown.
    Nothing,
}

impl ReceiptsShown {
    /// Whether anything was shown for `conv` and `user` yet.
    pub fn knows(&self, conv: &str, user: &str) -> bool {
        // Allocation-free lookup would need a borrowed key type; receipts are rare
        // next to entries, so the two small strings are cheap enough.
        self.shown.contains_key(&(conv.to_owned(), user.to_owned()))
    }

    /// What was shown for `conv` and `user`, if anything.
    pub fn shown(&self, conv: &str, user: &str) -> Option<&Receipt> {
        self.shown.get(&(conv.to_owned(), user.to_owned()))
    }

    /// Records `receipt` as shown (merged with what was) and returns that merge,
    /// to be shown even if it adds nothing: for a device that may have lost what
    /// it was shown (a long-poll response lost on the way).
    pub fn show_again(&mut self, receipt: &Receipt) -> Receipt {
        let key = (receipt.conv.clone(), receipt.user.clone());
        let shown = self
            .shown
            .entry(key)
            .and_modify(|shown| *shown = shown.merged(receipt))
            .or_insert_with(|| receipt.clone());
        shown.clone()
    }

    /// Records `receipt` as shown (merged with what was) and says what to show.
    pub fn show(&mut self, receipt: &Receipt) -> ReceiptView {
        let key = (receipt.conv.clone(), receipt.user.clone());
        let Some(shown) = self.shown.get_mut(&key) else {
            self.shown.insert(key, receipt.clone());
            return ReceiptView::AsArrived;
        };
        let merged = shown.merged(receipt);
        if merged == *shown {
            return ReceiptView::Nothing;
        }
        debug_assert!(merged.delivered >= shown.delivered && merged.read >= shown.read);
        *shown = merged.clone();
        if merged == *receipt {
            ReceiptView::AsArrived
        } else {
            ReceiptView::Merged(merged)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn receipt(delivered: u64, read: u64) -> Receipt {
        Receipt {
            conv: "c".into(),
            user: "u".into(),
            delivered,
            read,
            all_delivered: None,
            all_read: None,
        }
    }

    /// Shown again, a receipt is never below what was shown before.
    #[test]
    fn a_receipt_shown_again_never_goes_back() {
        let mut shown = ReceiptsShown::default();
        assert_eq!(
            shown.show_again(&receipt(5, 3)),
            receipt(5, 3),
            "new: as it is"
        );
        assert_eq!(shown.show_again(&receipt(4, 4)), receipt(5, 4), "merged up");
        assert_eq!(shown.show(&receipt(5, 4)), ReceiptView::Nothing);
    }

    /// A receipt that goes back is merged up or dropped; one that raises shows as it came.
    #[test]
    fn receipts_never_go_back() {
        let mut shown = ReceiptsShown::default();
        assert!(!shown.knows("c", "u"));
        assert_eq!(shown.show(&receipt(5, 3)), ReceiptView::AsArrived);
        assert!(shown.knows("c", "u"));
        assert_eq!(shown.show(&receipt(4, 2)), ReceiptView::Nothing);
        assert_eq!(shown.show(&receipt(5, 3)), ReceiptView::Nothing);
        assert_eq!(
            shown.show(&receipt(4, 4)),
            ReceiptView::Merged(receipt(5, 4)),
            "read raised, delivered kept"
        );
        assert_eq!(shown.show(&receipt(7, 5)), ReceiptView::AsArrived);
        assert!(!shown.knows("c", "v"));
    }
}
