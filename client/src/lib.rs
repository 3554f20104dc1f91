//! The protocol-v1 client: the one implementation of the client side of
//! `docs/PROTOCOL.md`, used by the server's tests, the end-to-end tests, the simulator
//! and the load generator.
//!
//! It shares no types with the server, so it also checks that `docs/PROTOCOL.md` is
//! enough to write a client.
//!
//! # Layout
//! - [`request`]: typed requests, each written to the wire by [`Request::encode`].
//! - [`event`]: server frames (replies and events) parsed into [`ServerFrame`], borrowing
//!   from the text.
//! - [`connection`]: [`Client`], one WebSocket connection over any byte stream, with
//!   `hello`, request/reply matching and the events in arrival order.

pub mod connection;
pub mod event;
pub mod request;

pub use connection::{Client, ClientError, ErrorReply, REPLY_TIMEOUT};
pub use event::{
    Body, Entry, EntryPage, FrameKind, MediaRef, ParseError, PresenceReply, PresenceState,
    SendResult, ServerFrame,
};
pub use request::{Request, VERSIONS};
