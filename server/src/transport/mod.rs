//! Transports: HTTP routing (WebSocket upgrade, metrics, health) and the
//! WebSocket session loop. They parse and frame; the service decides.

pub mod http;
pub mod session;
