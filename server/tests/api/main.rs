//! Protocol tests: real WebSocket clients against an in-process server on 127.0.0.1:0.

mod harness;

mod authz;
mod cancelled;
mod conversations;
mod errors;
mod limits;
mod longpoll;
mod media;
mod messaging;
mod presence;
mod push;
mod stalled;
mod storage;
mod sync;
