//! [`PushSink`] posting each notification as JSON to an HTTP URL.
//!
//! A bounded queue takes notifications without waiting; a few workers post
//! them, retrying a failed post (connection error, timeout, 5xx, 429) with
//! exponential backoff. A full queue, a post that keeps failing, and a receiver
//! that refuses (other 4xx) each drop the notification and count it in
//! `chatproof_push_dropped{reason="queue_full"|"failed"|"rejected"}`.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::CONTENT_TYPE;
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::sync::mpsc;

use super::{Notification, PushSink};
use crate::metrics::Metrics;

/// Posts running at once.
const WORKERS: usize = 4;
/// Longest one post may take.
const POST_TIMEOUT: Duration = Duration::from_secs(5);

/// How the webhook sink behaves.
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    /// `http://host:port/path` receiving `POST` with a JSON [`Notification`].
    pub url: String,
    /// Notifications waiting at most; more are dropped.
    pub queue_len: usize,
    /// Tries per notification (the first included).
    pub attempts: u32,
    /// Wait before the first retry; doubled for each next one.
    pub backoff: Duration,
}

/// The webhook [`PushSink`].
pub struct WebhookSink {
    queue: mpsc::Sender<Notification>,
    metrics: Arc<Metrics>,
}

enum Outcome {
    Delivered,
    Retry(String),
    Rejected(StatusCode),
}

impl WebhookSink {
    /// Checks the URL and starts the workers.
    pub fn start(config: WebhookConfig, metrics: Arc<Metrics>) -> Result<Arc<Self>, String> {
        let uri: Uri = config
            .url
            .parse()
            .map_err(|e| format!("--push-webhook {:?}: {e}", config.url))?;
        if uri.scheme_str() != Some("http") || uri.host().is_none() {
            return Err(format!(
                "--push-webhook {:?}: only http://HOST[:PORT]/PATH URLs are supported",
                config.url
            ));
        }
        if config.queue_len == 0 || config.attempts == 0 {
            return Err("the push queue length and attempts must be positive".into());
        }
        let (tx, rx) = mpsc::channel(config.queue_len);
        let rx = Arc::new(tokio::sync::Mutex::new(rx));
        let client: Client<HttpConnector, Full<Bytes>> =
            Client::builder(TokioExecutor::new()).build_http();
        for _ in 0..WORKERS {
            let worker = Worker {
                uri: uri.clone(),
                config: config.clone(),
                client: client.clone(),
                metrics: Arc::clone(&metrics),
            };
            tokio::spawn(worker.run(Arc::clone(&rx)));
        }
        Ok(Arc::new(Self { queue: tx, metrics }))
    }
}

impl PushSink for WebhookSink {
    fn notify(&self, notification: Notification) {
        if self.queue.try_send(notification).is_err() {
            self.metrics.count_push_dropped("queue_full");
        }
    }
}

struct Worker {
    uri: Uri,
    config: WebhookConfig,
    client: Client<HttpConnector, Full<Bytes>>,
    metrics: Arc<Metrics>,
}

impl Worker {
    async fn run(self, queue: Arc<tokio::sync::Mutex<mpsc::Receiver<Notification>>>) {
        loop {
            let next = queue.lock().await.recv().await;
            let Some(notification) = next else { return };
            self.deliver(&notification).await;
        }
    }

    async fn deliver(&self, notification: &Notification) {
        let body = Bytes::from(serde_json::to_vec(notification).expect("notifications serialize"));
        let mut wait = self.config.backoff;
        for attempt in 1..=self.config.attempts {
            match self.post(body.clone()).await {
                Outcome::Delivered => {
                    self.metrics.push_sent.inc();
                    return;
                }
                Outcome::Rejected(status) => {
                    tracing::warn!(%status, user = notification.user, "push webhook refused a notification");
                    self.metrics.count_push_dropped("rejected");
                    return;
                }
                Outcome::Retry(why) if attempt < self.config.attempts => {
                    tracing::debug!(attempt, why, "push webhook failed; retrying");
                    self.metrics.push_retries.inc();
                    tokio::time::sleep(wait).await;
                    wait = wait.saturating_mul(2);
                }
                Outcome::Retry(why) => {
                    tracing::warn!(
                        attempts = attempt,
                        why,
                        user = notification.user,
                        "push webhook failed; notification dropped"
                    );
                    self.metrics.count_push_dropped("failed");
                }
            }
        }
    }

    async fn post(&self, body: Bytes) -> Outcome {
        let request = Request::builder()
            .method(Method::POST)
            .uri(self.uri.clone())
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(body))
            .expect("a valid request");
        match tokio::time::timeout(POST_TIMEOUT, self.client.request(request)).await {
            Err(_) => Outcome::Retry(format!("no answer within {POST_TIMEOUT:?}")),
            Ok(Err(e)) => Outcome::Retry(e.to_string()),
            Ok(Ok(response)) => {
                let status = response.status();
                if status.is_success() {
                    Outcome::Delivered
                } else if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
                    Outcome::Retry(format!("status {status}"))
                } else {
                    Outcome::Rejected(status)
                }
            }
        }
    }
}
