//! Protocol tests: real WebSocket clients against an in-process server on 127.0.0.1:0.

mod harness;

mod conversations;
mod errors;
mod messaging;
mod sync;
