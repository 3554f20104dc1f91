//! Transports: HTTP routing (WebSocket upgrade, the HTTP API, metrics, health),
//! the WebSocket session loop, the long-polling fallback and image transfer. They parse and frame; the service decides.

pub mod http;
pub mod idle;
pub mod longpoll;
#[cfg(not(madsim))]
pub mod media;
pub mod per_address;
pub mod quiet;
pub mod session;
pub mod stall;
pub mod timer;
