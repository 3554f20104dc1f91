//! Domain rules with no I/O: conversations and membership, cursors and receipts,
//! the per-device stream that turns pushes into an ordered, gap-free sequence, and
//! what a device was shown of receipts.

pub mod conversation;
pub mod cursor;
pub mod receipts;
pub mod stream;

pub use conversation::{direct_conv_id, next_server_time, ConvRecord, GroupChange, Membership};
pub use cursor::{receipt_floor, Cursor};
pub use receipts::{ReceiptView, ReceiptsShown};
pub use stream::{DeviceStream, StreamStep};
