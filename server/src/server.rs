//! `run(listener, service, shutdown)`: the accept loop, connection limit,
//! background expiry, and graceful drain. The library never binds a socket or
//! installs a signal handler itself; the binary, the tests and the simulator do.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};

use crate::cluster::outbox::RETRY_EVERY;
use crate::metrics::ClosedFor;
use crate::service::ChatService;
use crate::transport::http::route;
use crate::transport::idle::{Activity, Watched};
use crate::transport::per_address::{AddressSlot, PerAddress};
use crate::transport::quiet::PollOnWake;
use crate::transport::timer::Timer;

/// Entries deleted per expiry transaction.
const EXPIRY_BATCH_LEN: u32 = 10_000;

/// Held by every connection (and the session it upgrades to): counts against
/// the connection limit and keeps shutdown waiting until it is dropped.
pub struct ConnGuard {
    _permit: OwnedSemaphorePermit,
    _address: AddressSlot,
    _drain: mpsc::Sender<()>,
    /// Admitted beyond the connection limit: only `/healthz` and `/metrics` are served.
    pub health_only: bool,
    /// What the connection is doing, for the keep-alive timeout.
    pub activity: Arc<Activity>,
}

/// Serves `listener` until `shutdown` resolves, then stops accepting, tells
/// every session to close, and waits (up to the drain timeout) for them.
pub async fn run(
    listener: TcpListener,
    service: Arc<ChatService>,
    shutdown: impl Future<Output = ()>,
) {
    let (stop_tx, stop_rx) = watch::channel(false);
    let (drain_tx, mut drain_rx) = mpsc::channel::<()>(1);
    let permits = Arc::new(Semaphore::new(service.limits().connections_max));
    let health_permits = Arc::new(Semaphore::new(service.limits().health_connections_max));
    let per_address = PerAddress::new(service.limits().connections_per_address_max);
    let expiry = tokio::spawn(expire_forever(Arc::clone(&service)));
    let presence = tokio::spawn(publish_presence_forever(Arc::clone(&service)));
    let reroute = tokio::spawn(route_unrouted_forever(Arc::clone(&service)));
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            biased;
            () = &mut shutdown => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let Some(address) = per_address.admit(peer.ip()) else {
            service.metrics().count_closed_for(ClosedFor::AddressLimit);
            tokio::spawn(refuse_overloaded(
                stream,
                "connection limit per address reached",
            ));
            continue;
        };
        let (permit, health_only) = match Arc::clone(&permits).try_acquire_owned() {
            Ok(permit) => (permit, false),
            Err(_) => match Arc::clone(&health_permits).try_acquire_owned() {
                Ok(permit) => (permit, true),
                Err(_) => {
                    service
                        .metrics()
                        .count_closed_for(ClosedFor::ConnectionLimit);
                    tokio::spawn(refuse_overloaded(stream, "connection limit reached"));
                    continue;
                }
            },
        };
        let activity = Activity::new();
        let guard = Arc::new(ConnGuard {
            _permit: permit,
            _address: address,
            _drain: drain_tx.clone(),
            health_only,
            activity: Arc::clone(&activity),
        });
        let service = Arc::clone(&service);
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let stop_for_routes = stop.clone();
            let header_read_timeout = service.limits().header_read_timeout;
            let keep_alive_timeout = service.limits().keep_alive_timeout;
            let metrics = Arc::clone(service.metrics());
            let svc = service_fn(move |req| {
                let serving = guard.activity.request();
                let routed = route(
                    req,
                    Arc::clone(&service),
                    stop_for_routes.clone(),
                    Arc::clone(&guard),
                );
                async move {
                    let response = routed.await;
                    drop(serving);
                    response
                }
            });
            let conn = http1::Builder::new()
                .timer(Timer)
                .header_read_timeout(header_read_timeout)
                .serve_connection(
                    TokioIo::new(Watched::new(stream, Arc::clone(&activity)).of_peer(peer.ip())),
                    svc,
                )
                .with_upgrades();
            tokio::pin!(conn);
            let result = tokio::select! {
                biased;
                result = conn.as_mut() => result,
                _ = stop.changed() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
                // Polled on its own timer only, not on every wake of the connection.
                () = PollOnWake::new(activity.idle_past(keep_alive_timeout)) => {
                    metrics.count_closed_for(ClosedFor::KeepAliveIdle);
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            match result {
                Err(e) if e.is_timeout() => {
                    metrics.count_closed_for(ClosedFor::HeaderTimeout);
                    tracing::debug!(%peer, "request head not received in time; closed");
                }
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "http connection ended with an error")
                }
                Ok(()) => {}
            }
        });
    }
    drop(listener);
    let _ = stop_tx.send(true);
    drop(drain_tx);
    let drain_timeout = service.limits().drain_timeout;
    if tokio::time::timeout(drain_timeout, drain_rx.recv())
        .await
        .is_err()
    {
        tracing::warn!(
            ?drain_timeout,
            "sessions still open after the drain timeout"
        );
    }
    expiry.abort();
    let _ = expiry.await;
    // Long-poll devices end with the server too (their leases end with their last
    // poll); sessions closed during the drain marked their users offline: publish that.
    service.close_mailboxes();
    service.publish_presence().await;
    presence.abort();
    let _ = presence.await;
    reroute.abort();
    let _ = reroute.await;
    // Last chance for events still waiting for the router (bounded: the router may
    // be down for good); what is left is durable, and peers resync when this
    // server's lease lapses.
    let _ = tokio::time::timeout(drain_timeout, service.route_unrouted()).await;
    service.leave_cluster().await;
}

/// Offers the events waiting for the router again, every [`RETRY_EVERY`].
async fn route_unrouted_forever(service: Arc<ChatService>) {
    let mut every = tokio::time::interval(RETRY_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        service.route_unrouted().await;
    }
}

/// Answers a connection over every limit with 503 `overloaded` and closes it.
async fn refuse_overloaded(mut stream: tokio::net::TcpStream, why: &'static str) {
    let body = crate::protocol::encode(&crate::protocol::ErrorBody::from(
        &crate::protocol::ProtocolError::new(crate::protocol::ErrorCode::Overloaded, why),
    ));
    let reply = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(reply.as_bytes()).await;
    // Close politely: a socket closed with unread request bytes sends a
    // reset, and the client would lose the reply.
    let _ = stream.shutdown().await;
    let mut sink = [0u8; 4096];
    let _ = tokio::time::timeout(Duration::from_millis(200), stream.read(&mut sink)).await;
}

/// Once per presence interval: closes idle long-poll mailboxes, then publishes
/// the coalesced presence changes.
async fn publish_presence_forever(service: Arc<ChatService>) {
    let mut every = tokio::time::interval(service.limits().presence_interval);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        service.expire_mailboxes();
        service.publish_presence().await;
    }
}

/// Deletes expired entries every sweep interval, in bounded batches.
async fn expire_forever(service: Arc<ChatService>) {
    let mut every = tokio::time::interval(service.limits().expiry_sweep_interval);
    loop {
        every.tick().await;
        let retention_ms = if crate::mutants::active(crate::mutants::Mutant::ExpiryCutoffInSeconds)
        {
            service.limits().retention.as_secs()
        } else {
            u64::try_from(service.limits().retention.as_millis()).unwrap_or(u64::MAX)
        };
        let cutoff_ms = service.clock().now_ms().saturating_sub(retention_ms);
        loop {
            match service
                .store()
                .expire_before(cutoff_ms, EXPIRY_BATCH_LEN)
                .await
            {
                Ok(n) if n == u64::from(EXPIRY_BATCH_LEN) => continue,
                Ok(n) => {
                    if n > 0 {
                        tracing::info!(expired = n, "expired entries past retention");
                    }
                    break;
                }
                Err(e) => {
                    tracing::error!(error = %e, "expiry sweep failed");
                    break;
                }
            }
        }
    }
}
