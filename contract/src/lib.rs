//! The delivery contract of `docs/GUARANTEES.md` as code, shared by every checker
//! (the simulator, the load generator and the end-to-end tests) so that each one
//! names a broken promise the same way.
//!
//! # Layout
//! - [`violation`]: [`Violation`], one variant per broken promise, named as the contract names it.
//! - [`tally`]: [`Tally`], counts per violation with a bounded set of examples.
//! - [`order`]: [`OrderCheck`], a streaming check of one device's per-conversation order.

pub mod order;
pub mod tally;
pub mod violation;

pub use order::{OrderCheck, OrderFault};
pub use tally::Tally;
pub use violation::Violation;
