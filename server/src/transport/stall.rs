//! Write stalls the simulator injects. A peer that stops reading fills its TCP
//! window, so the server's writes to it block until it reads again; that is how a
//! device's queue fills and the device gets `slow_consumer`. madsim's TCP has no
//! window (a write always completes at once), so the simulator's reader-stall fault
//! names the peer here and [`super::idle::Watched`] holds its writes. Outside
//! simulation builds nothing is ever stalled and [`holds`] is a constant `false`.

use std::net::IpAddr;
use std::task::Context;

#[cfg(madsim)]
thread_local! {
    // One run per thread (the simulator runs each seed on a fresh one): the stalled
    // peers, each with the writes waiting for it to read again.
    static STALLED: std::cell::RefCell<std::collections::BTreeMap<IpAddr, Vec<std::task::Waker>>> =
        const { std::cell::RefCell::new(std::collections::BTreeMap::new()) };
}

/// Holds every write to `peer` until [`resume`] (simulation builds only).
pub fn stall(peer: IpAddr) {
    #[cfg(madsim)]
    STALLED.with(|s| {
        s.borrow_mut().entry(peer).or_default();
    });
    #[cfg(not(madsim))]
    let _ = peer;
}

/// Lets writes to `peer` go again, waking every write it held.
pub fn resume(peer: IpAddr) {
    #[cfg(madsim)]
    {
        let waiting = STALLED.with(|s| s.borrow_mut().remove(&peer));
        for waker in waiting.into_iter().flatten() {
            waker.wake();
        }
    }
    #[cfg(not(madsim))]
    let _ = peer;
}

/// Whether a write to `peer` must wait; if so, `cx` is woken when it may go.
#[inline]
pub fn holds(peer: Option<IpAddr>, cx: &Context<'_>) -> bool {
    #[cfg(madsim)]
    {
        let Some(peer) = peer else { return false };
        STALLED.with(|s| match s.borrow_mut().get_mut(&peer) {
            Some(waiting) => {
                if !waiting.iter().any(|w| w.will_wake(cx.waker())) {
                    waiting.push(cx.waker().clone());
                }
                true
            }
            None => false,
        })
    }
    #[cfg(not(madsim))]
    {
        let _ = (peer, cx);
        false
    }
}
