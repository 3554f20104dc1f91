//! hyper's timer on the workspace's tokio, so HTTP timeouts (request headers)
//! run on simulated time under madsim as they run on real time otherwise.
//! (`hyper_util::rt::TokioTimer` names real tokio, which has no reactor inside
//! a simulated node.)

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use super::quiet::PollOnWake;

/// A [`hyper::rt::Timer`] backed by `tokio::time`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Timer;

/// One pending sleep of [`Timer`], polled only when its timer fired (hyper polls
/// it with every read of the connection).
struct Sleep(PollOnWake<tokio::time::Sleep>);

impl Future for Sleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        Pin::new(&mut self.0).poll(cx)
    }
}

impl hyper::rt::Sleep for Sleep {}

impl hyper::rt::Timer for Timer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(Sleep(PollOnWake::new(tokio::time::sleep(duration))))
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        // hyper's deadlines come from `Instant::now()` (simulated under madsim), so
        // the distance to them is on the same clock as tokio's sleeps.
        self.sleep(deadline.saturating_duration_since(Instant::now()))
    }
}
