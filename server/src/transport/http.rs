//! HTTP/1.1 routing on one port: `/v1/ws` (WebSocket upgrade), `/metrics`, `/healthz`.
//!
//! Uses hyper's connection API over any stream, so the simulator can drive it
//! over simulated TCP.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{
    HeaderValue, CONNECTION, CONTENT_TYPE, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY,
    SEC_WEBSOCKET_VERSION, UPGRADE,
};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::WebSocketStream;

use crate::server::ConnGuard;
use crate::service::ChatService;
use crate::transport::session;

/// Per-connection WebSocket buffers: small, so idle connections stay cheap.
pub fn websocket_config(frame_len_max_bytes: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
        .max_write_buffer_size(16 * 1024 * 1024)
        .max_message_size(Some(frame_len_max_bytes))
        .max_frame_size(Some(frame_len_max_bytes))
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

fn json_error(status: StatusCode, code: &str, message: &str) -> Response<Full<Bytes>> {
    let body = serde_json::json!({ "code": code, "message": message }).to_string();
    text(status, "application/json", body)
}

/// Routes one HTTP request.
pub async fn route(
    req: Request<Incoming>,
    service: Arc<ChatService>,
    shutdown: watch::Receiver<bool>,
    guard: Arc<ConnGuard>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let response = match (req.method(), req.uri().path()) {
        (&Method::GET, "/v1/ws") => upgrade(req, service, shutdown, guard),
        (&Method::GET, "/metrics") => text(
            StatusCode::OK,
            "text/plain; version=0.0.4",
            service.metrics.render(),
        ),
        (&Method::GET, "/healthz") => text(StatusCode::OK, "text/plain", "ok\n".into()),
        (_, "/v1/ws" | "/metrics" | "/healthz") => json_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "use GET",
        ),
        _ => json_error(StatusCode::NOT_FOUND, "not_found", "no such endpoint"),
    };
    Ok(response)
}

fn upgrade(
    mut req: Request<Incoming>,
    service: Arc<ChatService>,
    shutdown: watch::Receiver<bool>,
    guard: Arc<ConnGuard>,
) -> Response<Full<Bytes>> {
    let headers = req.headers();
    let is_upgrade = headers
        .get(UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let version_ok = headers
        .get(SEC_WEBSOCKET_VERSION)
        .is_some_and(|v| v == "13");
    let Some(key) = headers
        .get(SEC_WEBSOCKET_KEY)
        .filter(|_| is_upgrade && version_ok)
    else {
        return json_error(
            StatusCode::BAD_REQUEST,
            "websocket_required",
            "/v1/ws needs a WebSocket upgrade (Upgrade: websocket, Sec-WebSocket-Version: 13)",
        );
    };
    let accept = derive_accept_key(key.as_bytes());
    let config = websocket_config(service.limits.frame_len_max_bytes);
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let _guard = guard; // Held for the session's life: connection limit and drain.
        match on_upgrade.await {
            Ok(upgraded) => {
                let ws = WebSocketStream::from_raw_socket(
                    TokioIo::new(upgraded),
                    Role::Server,
                    Some(config),
                )
                .await;
                session::run(ws, service, shutdown).await;
            }
            Err(e) => tracing::debug!(error = %e, "websocket upgrade failed"),
        }
    });
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = response.headers_mut();
    h.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(
        SEC_WEBSOCKET_ACCEPT,
        HeaderValue::from_str(&accept).expect("base64 is a valid header"),
    );
    response
}
