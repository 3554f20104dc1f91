//! Quiet I/O: futures and reads polled only after they woke, flushes passed on
//! only after a write.
//!
//! A future that returned `Pending` has promised to wake its waker once it can
//! make progress, so polling it again before that is wasted work, and a flush
//! with nothing written since the last one has nothing to do. Neither is free: a
//! task waking for one of its branches (a connection for a write, a `select!` for
//! another arm) polls every other branch too, and hyper flushes its connection
//! on every wake. Under the simulator both cost most of a run: each poll of a
//! pending sleep registers another timer (madsim keeps every one until its
//! deadline), and each flush of a simulated TCP stream sends a packet, empty or
//! not, whose arrival wakes the peer's connection, which flushes back: two idle
//! HTTP connections exchanged empty packets at the network's latency for as long
//! as they lived (3.2 million in one 60-second cluster seed).
//!
//! [`OwnWakes`] lets a poll through only when the inner waker fired since the
//! last `Pending`; [`PollOnWake`] applies it to a future, [`QuietIo`] to the
//! reads of a stream, whose flushes it also drops when nothing was written.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Whether the inner waker fired, and whom to wake when it does.
#[derive(Debug, Default)]
struct Flag {
    woken: AtomicBool,
    outer: AtomicWaker,
}

impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.outer.wake();
    }
}

/// Lets polls of one inner future (or one direction of a stream) through only
/// after the waker it was given fired; the caller's latest waker is woken then.
#[derive(Debug)]
pub struct OwnWakes {
    flag: Arc<Flag>,
    waker: Waker,
}

impl Default for OwnWakes {
    fn default() -> Self {
        let flag = Arc::new(Flag {
            // Never polled yet: the first poll goes through.
            woken: AtomicBool::new(true),
            outer: AtomicWaker::new(),
        });
        let waker = Waker::from(Arc::clone(&flag));
        Self { flag, waker }
    }
}

impl OwnWakes {
    /// Runs `poll` with this tracker's waker if the inner woke since it last
    /// returned `Pending` (or was never polled, or last returned `Ready`);
    /// otherwise answers `Pending` and keeps `cx`'s waker to wake with the inner.
    pub fn poll<T>(
        &self,
        cx: &mut Context<'_>,
        poll: impl FnOnce(&mut Context<'_>) -> Poll<T>,
    ) -> Poll<T> {
        self.flag.outer.register(cx.waker());
        if !self.flag.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        let polled = poll(&mut Context::from_waker(&self.waker));
        if polled.is_ready() {
            // Ready says nothing about the next poll (a reader may have more).
            self.flag.woken.store(true, Ordering::Release);
        }
        polled
    }
}

/// A future polled only after it woke (see the module doc).
#[derive(Debug)]
pub struct PollOnWake<F> {
    inner: Pin<Box<F>>,
    wakes: OwnWakes,
}

impl<F: Future> PollOnWake<F> {
    /// Wraps `inner`.
    pub fn new(inner: F) -> Self {
        Self {
            inner: Box::pin(inner),
            wakes: OwnWakes::default(),
        }
    }
}

impl<F: Future> Future for PollOnWake<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.get_mut();
        let inner = &mut this.inner;
        this.wakes.poll(cx, |cx| inner.as_mut().poll(cx))
    }
}

/// A stream whose reads are polled only after the read side woke, and whose
/// flushes reach the inner stream only when something was written since the
/// last flush that completed; writes pass straight through.
#[derive(Debug)]
pub struct QuietIo<S> {
    inner: S,
    reads: OwnWakes,
    /// Written since the last completed flush.
    unflushed: bool,
}

impl<S> QuietIo<S> {
    /// Wraps `inner`.
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            reads: OwnWakes::default(),
            unflushed: false,
        }
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for QuietIo<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let inner = &mut this.inner;
        this.reads.poll(cx, |cx| Pin::new(inner).poll_read(cx, buf))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for QuietIo<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let written = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(written, Poll::Ready(Ok(n)) if n > 0) {
            self.unflushed = true;
        }
        written
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if !self.unflushed {
            return Poll::Ready(Ok(()));
        }
        let flushed = Pin::new(&mut self.inner).poll_flush(cx);
        if flushed.is_ready() {
            self.unflushed = false;
        }
        flushed
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        // Shutting down flushes what is unflushed.
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let written = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(written, Poll::Ready(Ok(n)) if n > 0) {
            self.unflushed = true;
        }
        written
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Counts its polls; pending until `ready`, waking through the waker it holds.
    #[derive(Default)]
    struct Probe {
        polls: AtomicUsize,
        ready: AtomicBool,
        waker: std::sync::Mutex<Option<Waker>>,
    }

    impl Probe {
        fn poll(&self, cx: &mut Context<'_>) -> Poll<()> {
            self.polls.fetch_add(1, Ordering::SeqCst);
            if self.ready.load(Ordering::SeqCst) {
                return Poll::Ready(());
            }
            *self.waker.lock().unwrap() = Some(cx.waker().clone());
            Poll::Pending
        }

        fn wake(&self) {
            self.ready.store(true, Ordering::SeqCst);
            if let Some(w) = self.waker.lock().unwrap().take() {
                w.wake();
            }
        }
    }

    /// Counts the outer wakes.
    #[derive(Default)]
    struct Outer(AtomicUsize);

    impl Wake for Outer {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Polls between wakes do not reach the inner; its wake reaches the caller
    /// and lets the next poll through; after Ready, polls go through again.
    #[test]
    fn polls_reach_the_inner_only_after_it_woke() {
        let probe = Probe::default();
        let outer = Arc::new(Outer::default());
        let waker = Waker::from(Arc::clone(&outer));
        let mut cx = Context::from_waker(&waker);
        let wakes = OwnWakes::default();
        assert!(wakes.poll(&mut cx, |cx| probe.poll(cx)).is_pending());
        for _ in 0..5 {
            assert!(wakes.poll(&mut cx, |cx| probe.poll(cx)).is_pending());
        }
        assert_eq!(
            probe.polls.load(Ordering::SeqCst),
            1,
            "only the first poll got through"
        );
        probe.wake();
        assert_eq!(outer.0.load(Ordering::SeqCst), 1, "the caller was woken");
        assert!(wakes.poll(&mut cx, |cx| probe.poll(cx)).is_ready());
        assert!(wakes.poll(&mut cx, |cx| probe.poll(cx)).is_ready());
        assert_eq!(probe.polls.load(Ordering::SeqCst), 3);
    }

    /// Counts the flushes that reach it.
    #[derive(Default)]
    struct Flushes(usize);

    impl AsyncWrite for Flushes {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            Poll::Ready(Ok(buf.len()))
        }

        fn poll_flush(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            self.0 += 1;
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// A flush reaches the stream once per write, however often it is asked for.
    #[test]
    fn flushes_pass_only_after_a_write() {
        let waker = Waker::from(Arc::new(Outer::default()));
        let mut cx = Context::from_waker(&waker);
        let mut io = QuietIo::new(Flushes::default());
        for _ in 0..3 {
            assert!(Pin::new(&mut io).poll_flush(&mut cx).is_ready());
        }
        assert_eq!(io.get_ref().0, 0, "nothing written, nothing flushed");
        assert!(Pin::new(&mut io).poll_write(&mut cx, b"x").is_ready());
        for _ in 0..3 {
            assert!(Pin::new(&mut io).poll_flush(&mut cx).is_ready());
        }
        assert_eq!(io.get_ref().0, 1);
    }
}
