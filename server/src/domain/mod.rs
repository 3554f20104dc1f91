//! Domain rules with no I/O: conversations and membership, cursors and receipts,
//! and the per-device stream that turns pushes into an ordered, gap-free sequence.

pub mod conversation;
pub mod cursor;
pub mod stream;

pub use conversation::{direct_conv_id, ConvRecord, GroupChange, Membership};
pub use cursor::Cursor;
pub use stream::{DeviceStream, StreamStep};
