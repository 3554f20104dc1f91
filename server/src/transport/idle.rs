//! Idle HTTP connections: a stream wrapper that notes when bytes last arrived,
//! and the count of requests in flight, so the accept loop can close a
//! connection that holds a slot while doing nothing (keep-alive idle, or never
//! sending a byte) without touching one that is slowly sending or being served.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::quiet::QuietIo;

/// How often a busy connection is looked at again.
const BUSY_RECHECK: Duration = Duration::from_secs(1);

/// What one connection has been doing; shared by its stream and its handler.
#[derive(Debug)]
pub struct Activity {
    started: tokio::time::Instant,
    /// Milliseconds after `started` that bytes last arrived or a request ended.
    last_active_ms: AtomicU64,
    in_flight: AtomicUsize,
}

impl Activity {
    /// A connection that starts now.
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            started: tokio::time::Instant::now(),
            last_active_ms: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
        })
    }

    fn elapsed_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Counts a request as being served until the returned guard is dropped.
    pub fn request(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(Arc::clone(self))
    }

    /// Notes activity now.
    fn touch(&self) {
        self.last_active_ms
            .store(self.elapsed_ms(), Ordering::SeqCst);
    }

    /// How long the connection has been idle: no request in flight and no byte
    /// read, since the later of the last byte and the end of the last request.
    /// `None` while a request is being served.
    pub fn idle_for(&self) -> Option<Duration> {
        if self.in_flight.load(Ordering::SeqCst) > 0 {
            return None;
        }
        let last = self.last_active_ms.load(Ordering::SeqCst);
        Some(Duration::from_millis(
            self.elapsed_ms().saturating_sub(last),
        ))
    }

    /// Resolves once the connection has been idle for `limit`.
    pub async fn idle_past(&self, limit: Duration) {
        loop {
            let wait = match self.idle_for() {
                Some(idle) if idle >= limit => return,
                Some(idle) => limit - idle,
                // Busy (a poll may be held for a long while): look again soon, so
                // the bound holds from when it ends.
                None => limit.min(BUSY_RECHECK),
            };
            tokio::time::sleep(wait.max(Duration::from_millis(10))).await;
        }
    }
}

/// A request being served; see [`Activity::request`].
#[derive(Debug)]
pub struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.touch();
        let before = self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
        assert!(before > 0, "request count went below zero");
    }
}

/// A stream that records in its [`Activity`] when bytes arrive; its reads are
/// polled only once the read side woke ([`QuietIo`]).
#[derive(Debug)]
pub struct Watched<S> {
    inner: QuietIo<S>,
    activity: Arc<Activity>,
    /// The peer, whose reads the simulator may stall ([`super::stall`]).
    peer: Option<std::net::IpAddr>,
}

impl<S> Watched<S> {
    /// Wraps `inner`.
    pub fn new(inner: S, activity: Arc<Activity>) -> Self {
        Self {
            inner: QuietIo::new(inner),
            activity,
            peer: None,
        }
    }

    /// The same, its writes held while the simulator stalls `peer`'s reads.
    pub fn of_peer(mut self, peer: std::net::IpAddr) -> Self {
        self.peer = Some(peer);
        self
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.touch();
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if super::stall::holds(self.peer, cx) {
            return Poll::Pending;
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        if super::stall::holds(self.peer, cx) {
            return Poll::Pending;
        }
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Idle time counts from the last byte read, and not while a request is served.
    #[tokio::test]
    async fn idle_counts_from_the_last_read() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let activity = Activity::new();
        let (mut client, server) = tokio::io::duplex(64);
        let mut watched = Watched::new(server, Arc::clone(&activity));
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(activity.idle_for().unwrap() >= Duration::from_millis(150));
        client.write_all(b"GET").await.unwrap();
        let mut buf = [0u8; 8];
        assert_eq!(watched.read(&mut buf).await.unwrap(), 3);
        assert!(activity.idle_for().unwrap() < Duration::from_millis(150));
        let serving = activity.request();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(activity.idle_for(), None, "a request is in flight");
        drop(serving);
        assert!(
            activity.idle_for().unwrap() < Duration::from_millis(150),
            "idle from the end of the request, not from its last byte"
        );
        activity.idle_past(Duration::from_millis(100)).await;
    }
}
