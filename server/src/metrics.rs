//! Prometheus metrics, served as text at `/metrics`.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// The server's metrics; cheap to update from any task.
pub struct Metrics {
    registry: Registry,
    /// Open WebSocket sessions.
    pub connections: Gauge,
    /// Messages accepted (new, not retries).
    pub messages_in: Counter,
    /// Retries answered with the original ack.
    pub messages_duplicate: Counter,
    /// Entries written to devices.
    pub messages_out: Counter,
    /// Error replies by code.
    pub errors: Family<Vec<(String, String)>, Counter>,
    /// Sequencing time to device write, seconds.
    pub delivery_latency: Histogram,
    /// Durable append time (group commit included), seconds.
    pub store_append_latency: Histogram,
    /// Cross-server routing (cluster mode only).
    pub fabric: FabricCounters,
    /// Presence changes published (one per changed user per interval).
    pub presence_published: Counter,
    /// Long-poll mailboxes open (devices on the HTTP fallback).
    pub polls_open: Gauge,
    /// Push notifications delivered to the sink.
    pub push_sent: Counter,
    /// Push notifications given up, by reason (`queue_full`, `failed`).
    pub push_dropped: Family<Vec<(String, String)>, Counter>,
    /// Push notification attempts that failed and were retried.
    pub push_retries: Counter,
    /// Images stored (new or already present).
    pub media_uploads: Counter,
    /// Bytes of image uploads received.
    pub media_bytes_in: Counter,
    /// Connections the server closed or refused because a limit was hit, by reason.
    pub closed_for: Family<Vec<(String, String)>, Counter>,
    /// Requests refused because a limit was hit, by limit (see [`Metrics::count_limit_hit`]).
    pub limit_hits: Family<Vec<(String, String)>, Counter>,
}

/// A limit on what users may do, counted when it refuses a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitHit {
    /// A user's sends came faster than `--user-send-rate` allows.
    SendRate,
    /// A user's group creations and membership changes came faster than allowed.
    GroupChangeRate,
    /// A user already had `--devices-per-user-max` devices connected here.
    DevicesPerUser,
    /// `--poll-mailboxes-max` long-poll mailboxes were open already.
    PollMailboxes,
    /// `--uploads-max` image uploads were in progress already.
    Uploads,
}

impl LimitHit {
    /// The `limit` label.
    pub const fn label(self) -> &'static str {
        match self {
            LimitHit::SendRate => "send_rate",
            LimitHit::GroupChangeRate => "group_change_rate",
            LimitHit::DevicesPerUser => "devices_per_user",
            LimitHit::PollMailboxes => "poll_mailboxes",
            LimitHit::Uploads => "uploads",
        }
    }
}

/// Why the server closed or refused a connection on its own (see [`Metrics::count_closed_for`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClosedFor {
    /// The connection limit was reached (answered 503 `overloaded`).
    ConnectionLimit,
    /// The source address held `--max-connections-per-address` already (answered 503 `overloaded`).
    AddressLimit,
    /// An HTTP request head did not arrive within the header-read timeout.
    HeaderTimeout,
    /// An HTTP connection was idle (no request, no byte) past the keep-alive timeout.
    KeepAliveIdle,
    /// A WebSocket sent no successful `hello` within the hello timeout.
    HelloTimeout,
}

impl ClosedFor {
    /// The `reason` label.
    pub const fn label(self) -> &'static str {
        match self {
            ClosedFor::ConnectionLimit => "connection_limit",
            ClosedFor::AddressLimit => "address_limit",
            ClosedFor::HeaderTimeout => "header_timeout",
            ClosedFor::KeepAliveIdle => "keep_alive_idle",
            ClosedFor::HelloTimeout => "hello_timeout",
        }
    }
}

/// Counters of the cluster fabric; clones share their values.
#[derive(Debug, Clone, Default)]
pub struct FabricCounters {
    /// Events published to other servers (one per receiving server).
    pub forwarded: Counter,
    /// Events given up because the outbox was full (a send then answers `internal`).
    pub dropped: Counter,
    /// Events the router did not take at once, queued in the outbox to retry.
    pub queued: Counter,
    /// Queued events the router took on a retry.
    pub retried: Counter,
    /// Outbox slots waiting for the router now.
    pub waiting: Gauge,
    /// Peer servers found dead (their lease lapsed), each followed by a resync.
    pub peers_lost: Counter,
    /// Events received from other servers.
    pub received: Counter,
    /// Times every local session was told to re-read its conversations.
    pub resyncs: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("chatproof");
        let connections = Gauge::default();
        let messages_in = Counter::default();
        let messages_duplicate = Counter::default();
        let messages_out = Counter::default();
        let errors = Family::<Vec<(String, String)>, Counter>::default();
        let delivery_latency = Histogram::new(exponential_buckets(0.000_5, 2.0, 16));
        let store_append_latency = Histogram::new(exponential_buckets(0.000_05, 2.0, 18));
        registry.register(
            "connections",
            "Open WebSocket sessions",
            connections.clone(),
        );
        registry.register(
            "messages_in",
            "Messages accepted and sequenced",
            messages_in.clone(),
        );
        registry.register(
            "messages_duplicate",
            "Send retries answered with the original ack",
            messages_duplicate.clone(),
        );
        registry.register(
            "messages_out",
            "Entries written to devices",
            messages_out.clone(),
        );
        registry.register("errors", "Error replies by code", errors.clone());
        registry.register(
            "delivery_latency_seconds",
            "From sequencing to the write to a device",
            delivery_latency.clone(),
        );
        registry.register(
            "store_append_latency_seconds",
            "Durable append, group commit included",
            store_append_latency.clone(),
        );
        let fabric = FabricCounters::default();
        registry.register(
            "fabric_forwarded",
            "Events published to other servers",
            fabric.forwarded.clone(),
        );
        registry.register(
            "fabric_dropped",
            "Events given up because the outbox of unrouted events was full",
            fabric.dropped.clone(),
        );
        registry.register(
            "fabric_queued",
            "Events the router did not take at once, queued to retry",
            fabric.queued.clone(),
        );
        registry.register(
            "fabric_retried",
            "Queued events the router took on a retry",
            fabric.retried.clone(),
        );
        registry.register(
            "fabric_waiting",
            "Outbox slots (conversations, readers, users) waiting for the router",
            fabric.waiting.clone(),
        );
        registry.register(
            "fabric_peers_lost",
            "Peer servers found dead (lease lapsed); each is followed by a resync",
            fabric.peers_lost.clone(),
        );
        registry.register(
            "fabric_received",
            "Events received from other servers",
            fabric.received.clone(),
        );
        registry.register(
            "fabric_resyncs",
            "Times every local session re-read its conversations after a fabric interruption",
            fabric.resyncs.clone(),
        );
        let presence_published = Counter::default();
        registry.register(
            "presence_published",
            "Presence changes published (one per changed user per interval)",
            presence_published.clone(),
        );
        let polls_open = Gauge::default();
        registry.register(
            "polls_open",
            "Long-poll mailboxes open (devices on the HTTP fallback)",
            polls_open.clone(),
        );
        let push_sent = Counter::default();
        registry.register(
            "push_sent",
            "Push notifications delivered to the sink",
            push_sent.clone(),
        );
        let push_dropped = Family::<Vec<(String, String)>, Counter>::default();
        registry.register(
            "push_dropped",
            "Push notifications given up, by reason",
            push_dropped.clone(),
        );
        let push_retries = Counter::default();
        registry.register(
            "push_retries",
            "Push notification attempts that failed and were retried",
            push_retries.clone(),
        );
        let closed_for = Family::<Vec<(String, String)>, Counter>::default();
        registry.register(
            "connections_closed_for",
            "Connections the server closed or refused because a limit was hit, by reason",
            closed_for.clone(),
        );
        let limit_hits = Family::<Vec<(String, String)>, Counter>::default();
        registry.register(
            "limit_hits",
            "Requests refused because a per-user or server limit was hit, by limit",
            limit_hits.clone(),
        );
        let media_uploads = Counter::default();
        registry.register(
            "media_uploads",
            "Images stored (new or already present)",
            media_uploads.clone(),
        );
        let media_bytes_in = Counter::default();
        registry.register(
            "media_bytes_in",
            "Bytes of image uploads received",
            media_bytes_in.clone(),
        );
        Self {
            fabric,
            presence_published,
            polls_open,
            push_sent,
            push_dropped,
            push_retries,
            closed_for,
            limit_hits,
            media_uploads,
            media_bytes_in,
            registry,
            connections,
            messages_in,
            messages_duplicate,
            messages_out,
            errors,
            delivery_latency,
            store_append_latency,
        }
    }
}

impl Metrics {
    /// Counts an error reply.
    pub fn count_error(&self, code: crate::protocol::ErrorCode) {
        let code = serde_json::to_value(code)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        self.errors
            .get_or_create(&vec![("code".to_owned(), code)])
            .inc();
    }

    /// Counts a connection closed or refused because of the limit `reason`.
    pub fn count_closed_for(&self, reason: ClosedFor) {
        self.closed_for
            .get_or_create(&vec![("reason".to_owned(), reason.label().to_owned())])
            .inc();
    }

    /// Counts a request refused by `limit`.
    pub fn count_limit_hit(&self, limit: LimitHit) {
        self.limit_hits
            .get_or_create(&vec![("limit".to_owned(), limit.label().to_owned())])
            .inc();
    }

    /// Counts a push notification given up for `reason`.
    pub fn count_push_dropped(&self, reason: &str) {
        self.push_dropped
            .get_or_create(&vec![("reason".to_owned(), reason.to_owned())])
            .inc();
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}
