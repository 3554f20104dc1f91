//! chatproof reference chat server.
//!
//! # Layout
//! - [`protocol`]: wire frames, error codes and id rules (no I/O).
//! - [`domain`]: conversations, membership, cursors, and the per-device ordered stream (no I/O).
//! - [`store`]: the storage trait and its embedded (redb) backend.
//! - [`hub`]: connected devices on this server and fan-out to them.
//! - [`mailbox`]: long-poll mailboxes, the server side of a device on the HTTP fallback.
//! - [`presence`]: online / last seen, its audience, and the coalescing of changes.
//! - [`media`]: image uploads: type sniffing, thumbnails, content-addressed blob storage.
//! - [`push`]: notifications for users with no connected device (log or webhook sink).
//! - [`service`]: every operation, on top of store and hub; knows no transport.
//! - [`transport`]: HTTP routing and the WebSocket session loop.
//! - [`server`]: `run(listener, service, shutdown)`.
//! - [`mutants`]: deliberate bugs for the simulator (simulation builds only).
//! - [`launch`]: a complete single-node server from its flags (binary and load generator).
//! - [`auth`], [`clock`], [`limits`], [`metrics`], [`config`]: the edges and knobs.

pub mod auth;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod domain;
pub mod hub;
pub mod launch;
pub mod limits;
pub mod log_throttle;
pub mod mailbox;
pub mod media;
pub mod metrics;
pub mod mutants;
pub mod presence;
pub mod protocol;
pub mod push;
pub mod rate;
pub mod server;
pub mod service;
pub mod store;
pub mod transport;

pub use server::run;
