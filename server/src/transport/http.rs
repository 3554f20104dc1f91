//! HTTP/1.1 routing on one port: `/v1/ws` (WebSocket upgrade), the HTTP API
//! (`/v1/rpc`, `/v1/poll`: the long-polling fallback; `/v1/media`: images),
//! `/metrics`, `/healthz`. Errors are JSON `{"code", "message"}` with the
//! status [`status_of`] gives the code.
//!
//! Uses hyper's connection API over any stream, so the simulator can drive it
//! over simulated TCP.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{
    HeaderValue, AUTHORIZATION, CONNECTION, CONTENT_TYPE, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY,
    SEC_WEBSOCKET_VERSION, UPGRADE,
};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::WebSocketStream;

use crate::protocol::{
    decode_request, encode, validate_conv_id, validate_device_id, ErrorBody, ErrorCode,
    PollRequest, ProtocolError, ServerFrame,
};
use crate::server::ConnGuard;
use crate::service::{Caller, ChatService};
use crate::transport::session;

/// A WebSocket connection's read buffer, allocated with the connection and kept
/// for its life. A client's request frame (a send of a short text is about 250
/// bytes) fits in one read; a longer frame grows the buffer to its length. 4 KiB
/// cost idle connections 3 KiB more each (`scenarios/bench/idle-19k.toml`).
pub const READ_BUFFER_BYTES: usize = 1024;

/// Per-connection WebSocket buffers: small, so idle connections stay cheap.
pub fn websocket_config(frame_len_max_bytes: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER_BYTES)
        .write_buffer_size(0)
        .max_write_buffer_size(16 * 1024 * 1024)
        .max_message_size(Some(frame_len_max_bytes))
        .max_frame_size(Some(frame_len_max_bytes))
}

/// Every response body: a whole buffer or a stream (downloads).
pub type HttpBody = UnsyncBoxBody<Bytes, std::io::Error>;
/// Every response.
pub type HttpResponse = Response<HttpBody>;

/// A request refused with a protocol error code, and the HTTP status for it.
#[derive(Debug)]
pub struct ApiError {
    /// The code and message.
    pub error: ProtocolError,
}

impl ApiError {
    /// An error with `code` and `message`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            error: ProtocolError::new(code, message),
        }
    }

    fn response(&self, service: &ChatService) -> HttpResponse {
        service.metrics().count_error(self.error.code);
        let mut response = json_body(status_of(self.error.code), &ErrorBody::from(&self.error));
        if let Some(ms) = self.error.retry_after_ms {
            set_retry_after(&mut response, ms);
        }
        response
    }
}

impl From<ProtocolError> for ApiError {
    fn from(error: ProtocolError) -> Self {
        Self { error }
    }
}

/// The HTTP status that goes with an error code.
pub fn status_of(code: ErrorCode) -> StatusCode {
    use ErrorCode as C;
    match code {
        C::Unauthorized | C::TokenExpired => StatusCode::UNAUTHORIZED,
        C::NotMember | C::Forbidden => StatusCode::FORBIDDEN,
        C::UnknownConversation | C::UnknownMedia | C::NotFound => StatusCode::NOT_FOUND,
        C::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
        C::ConversationExists
        | C::CursorAhead
        | C::Replaced
        | C::SlowConsumer
        | C::TooManyDevices => StatusCode::CONFLICT,
        C::FrameTooLarge | C::TextTooLarge | C::MediaTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        C::UnsupportedMedia => StatusCode::UNSUPPORTED_MEDIA_TYPE,
        C::Overloaded | C::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
        C::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        C::HelloTimeout => StatusCode::REQUEST_TIMEOUT,
        C::RateLimited => StatusCode::TOO_MANY_REQUESTS,
        C::BadFrame
        | C::UnknownOp
        | C::BadRequest
        | C::HelloRequired
        | C::AlreadyAuthenticated
        | C::UnsupportedVersion
        | C::InvalidId
        | C::NotGroup
        | C::TooManyMembers
        | C::DuplicateMember
        | C::WebsocketRequired => StatusCode::BAD_REQUEST,
    }
}

fn full(bytes: impl Into<Bytes>) -> HttpBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> HttpResponse {
    let mut response = Response::new(full(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// A JSON response with one protocol body, encoded in the protocol's one place.
pub fn json_body(status: StatusCode, body: &impl serde::Serialize) -> HttpResponse {
    text(status, "application/json", encode(body))
}

/// A streamed response of `frames`.
pub fn stream_body<S>(frames: S) -> HttpResponse
where
    S: futures_util::Stream<Item = Result<Frame<Bytes>, std::io::Error>> + Send + 'static,
{
    Response::new(BodyExt::boxed_unsync(StreamBody::new(frames)))
}

/// Header naming the device of an HTTP request (`/v1/rpc`, `/v1/poll`).
pub const DEVICE_HEADER: &str = "x-chatproof-device";

/// The caller of an HTTP request: `Authorization: Bearer TOKEN`, and (when
/// `device_needed`) the `X-Chatproof-Device` header.
fn authenticate(
    req: &Request<Incoming>,
    service: &ChatService,
    device_needed: bool,
) -> Result<Caller, ApiError> {
    let token = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| {
            ApiError::new(
                ErrorCode::Unauthorized,
                "send \"Authorization: Bearer TOKEN\" with a token from chatproof-server token",
            )
        })?;
    let claims = service
        .tokens()
        .verify(token.trim(), service.clock().now_ms() / 1000)?;
    let device = match req.headers().get(DEVICE_HEADER) {
        Some(v) => {
            let device = v.to_str().unwrap_or_default().to_owned();
            validate_device_id(&device)?;
            device
        }
        None if device_needed => {
            return Err(ApiError::new(
                ErrorCode::BadRequest,
                "send \"X-Chatproof-Device: DEVICE\" naming the device",
            ))
        }
        None => String::new(),
    };
    Ok(Caller {
        user: claims.sub,
        device,
    })
}

/// Reads a JSON request body of at most the frame limit.
async fn read_json(req: Request<Incoming>, limit: usize) -> Result<Bytes, ApiError> {
    match Limited::new(req.into_body(), limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => Err(ApiError::new(
            ErrorCode::FrameTooLarge,
            format!("the request body exceeds {limit} bytes"),
        )),
        Err(e) => Err(ApiError::new(
            ErrorCode::BadRequest,
            format!("reading the request body: {e}"),
        )),
    }
}

/// The value of query parameter `name` (form-urlencoded).
fn query_param(req: &Request<Incoming>, name: &str) -> Option<String> {
    let query = req.uri().query()?;
    form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

/// Routes one HTTP request.
pub async fn route(
    req: Request<Incoming>,
    service: Arc<ChatService>,
    shutdown: watch::Receiver<bool>,
    guard: Arc<ConnGuard>,
) -> Result<HttpResponse, Infallible> {
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    if guard.health_only && !matches!(path.as_str(), "/healthz" | "/readyz" | "/metrics") {
        let refused = ApiError::new(
            ErrorCode::Overloaded,
            "connection limit reached; only /healthz, /readyz and /metrics are served beyond it",
        );
        return Ok(refused.response(&service));
    }
    let result = match (&method, path.as_str()) {
        (&Method::GET, "/v1/ws") => Ok(upgrade(req, Arc::clone(&service), shutdown, guard)),
        (&Method::POST, "/v1/rpc") => rpc(req, &service).await,
        (&Method::POST, "/v1/poll") => poll(req, &service).await,
        (&Method::POST, "/v1/media") => upload(req, &service).await,
        (&Method::GET, p) if p.starts_with("/v1/media/") => {
            let id = p.trim_start_matches("/v1/media/").to_owned();
            download(req, &service, &id).await
        }
        (&Method::GET, "/metrics") => Ok(text(
            StatusCode::OK,
            "text/plain; version=0.0.4",
            service.metrics().render(),
        )),
        (&Method::GET, "/healthz") => Ok(health(&service, None).await),
        (&Method::GET, "/readyz") => Ok(health(&service, Some(&shutdown)).await),
        (_, "/v1/ws" | "/metrics" | "/healthz" | "/readyz") => {
            Err(ApiError::new(ErrorCode::MethodNotAllowed, "use GET"))
        }
        (_, "/v1/rpc" | "/v1/poll" | "/v1/media") => {
            Err(ApiError::new(ErrorCode::MethodNotAllowed, "use POST"))
        }
        (_, p) if p.starts_with("/v1/media/") => {
            Err(ApiError::new(ErrorCode::MethodNotAllowed, "use GET"))
        }
        _ => Err(ApiError::new(ErrorCode::NotFound, "no such endpoint")),
    };
    Ok(result.unwrap_or_else(|e| e.response(&service)))
}

/// `GET /healthz` (`shutdown` absent) and `GET /readyz`.
///
/// `/healthz`: `200 ok` while the store takes writes (in a cluster: the CQL nodes
/// answer) and, in a cluster, Redis answers; otherwise `503` naming what is
/// unhealthy. `/readyz`, for load balancers: `200 ok` while the store takes writes
/// and the server is not shutting down. It does not depend on Redis: sends are
/// acknowledged without it (their routing waits).
async fn health(service: &ChatService, shutdown: Option<&watch::Receiver<bool>>) -> HttpResponse {
    let readiness = shutdown.is_some();
    if shutdown.is_some_and(|stop| *stop.borrow()) {
        let down = ProtocolError::new(ErrorCode::ShuttingDown, "server shutting down");
        return json_body(StatusCode::SERVICE_UNAVAILABLE, &ErrorBody::from(&down));
    }
    let mut unhealthy = Vec::new();
    if let Err(why) = service.store().health().await {
        unhealthy.push(format!("store unhealthy: {why}"));
    }
    if !readiness {
        if let Some(fabric) = service.fabric() {
            if let Err(why) = fabric.health().await {
                unhealthy.push(format!("router unhealthy: {why}"));
            }
        }
    }
    if unhealthy.is_empty() {
        return text(StatusCode::OK, "text/plain", "ok\n".into());
    }
    let sick = ProtocolError::new(ErrorCode::Internal, unhealthy.join("; "));
    json_body(StatusCode::SERVICE_UNAVAILABLE, &ErrorBody::from(&sick))
}

/// `POST /v1/rpc`: one request frame (any op but `hello`), its reply frame back.
async fn rpc(req: Request<Incoming>, service: &Arc<ChatService>) -> Result<HttpResponse, ApiError> {
    let caller = authenticate(&req, service, true)?;
    let body = read_json(req, service.limits().frame_len_max_bytes).await?;
    let text = std::str::from_utf8(&body)
        .map_err(|_| ApiError::new(ErrorCode::BadFrame, "the body is not UTF-8"))?;
    let (frame, status) = match decode_request(text) {
        Err((rid, err)) => (ServerFrame::error(rid, err.clone()), status_of(err.code)),
        Ok((rid, request)) => match Arc::clone(service).dispatch(&caller, request).await {
            Ok(result) => (ServerFrame::Ok { rid, result }, StatusCode::OK),
            Err(err) => (
                ServerFrame::error(Some(rid), err.clone()),
                status_of(err.code),
            ),
        },
    };
    let retry_after_ms = match &frame {
        ServerFrame::Error {
            code,
            retry_after_ms,
            ..
        } => {
            service.metrics().count_error(*code);
            *retry_after_ms
        }
        _ => None,
    };
    let mut response = text_frame(status, frame.to_json());
    if let Some(ms) = retry_after_ms {
        set_retry_after(&mut response, ms);
    }
    Ok(response)
}

/// Adds `Retry-After` (whole seconds, at least 1) for a wait of `ms`.
fn set_retry_after(response: &mut HttpResponse, ms: u64) {
    let secs = HeaderValue::from(ms.div_ceil(1000).max(1));
    response
        .headers_mut()
        .insert(hyper::header::RETRY_AFTER, secs);
}

fn text_frame(status: StatusCode, json: String) -> HttpResponse {
    text(status, "application/json", json)
}

/// `POST /v1/poll`: see [`super::longpoll`].
async fn poll(
    req: Request<Incoming>,
    service: &Arc<ChatService>,
) -> Result<HttpResponse, ApiError> {
    let caller = authenticate(&req, service, true)?;
    let body = read_json(req, service.limits().frame_len_max_bytes).await?;
    let request: PollRequest = if body.iter().all(u8::is_ascii_whitespace) {
        PollRequest::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::new(ErrorCode::BadRequest, format!("poll: {e}")))?
    };
    let result = super::longpoll::poll(service, &caller, request).await?;
    Ok(json_body(StatusCode::OK, &result))
}

async fn upload(
    req: Request<Incoming>,
    service: &Arc<ChatService>,
) -> Result<HttpResponse, ApiError> {
    let caller = authenticate(&req, service, false)?;
    let conv = query_param(&req, "conv").ok_or_else(|| {
        ApiError::new(
            ErrorCode::BadRequest,
            "name the conversation: POST /v1/media?conv=CONV",
        )
    })?;
    validate_conv_id(&conv)?;
    #[cfg(not(madsim))]
    return super::media::upload(service, &caller, &conv, req.into_body()).await;
    #[cfg(madsim)]
    Err(no_media_under_simulation(&caller))
}

async fn download(
    req: Request<Incoming>,
    service: &Arc<ChatService>,
    id: &str,
) -> Result<HttpResponse, ApiError> {
    let caller = authenticate(&req, service, false)?;
    #[cfg(not(madsim))]
    return super::media::download(service, &caller, id).await;
    #[cfg(madsim)]
    Err(no_media_under_simulation(&(caller, id)))
}

#[cfg(madsim)]
fn no_media_under_simulation<T>(_: &T) -> ApiError {
    ApiError::new(
        ErrorCode::NotFound,
        "images are not served under the simulator",
    )
}

fn upgrade(
    mut req: Request<Incoming>,
    service: Arc<ChatService>,
    shutdown: watch::Receiver<bool>,
    guard: Arc<ConnGuard>,
) -> HttpResponse {
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
        return ApiError::new(
            ErrorCode::WebsocketRequired,
            "/v1/ws needs a WebSocket upgrade (Upgrade: websocket, Sec-WebSocket-Version: 13)",
        )
        .response(&service);
    };
    let accept = derive_accept_key(key.as_bytes());
    let config = websocket_config(service.limits().frame_len_max_bytes);
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
    let mut response = Response::new(full(Bytes::new()));
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
