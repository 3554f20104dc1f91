//! The long-polling fallback: `POST /v1/poll` holds a request until something
//! arrives for the device, or the timeout.
//!
//! A polling device's [`DeviceFeed`] lives in its mailbox between polls. Each poll
//! restarts the feed at the cursors the device presents (or its acknowledged
//! cursors for conversations it does not list), so entries come in seq order per
//! conversation and a response lost on the way is simply asked for again with the
//! same cursors: nothing is lost, and a device that advances its cursors from what
//! it received sees nothing twice. Receipts and presence changes wait in the feed
//! for the next poll.

use std::sync::Arc;
use std::time::Duration;

use crate::mailbox::Mailbox;
use crate::protocol::{Entry, PollReply, PollRequest, PresenceState, ProtocolError, Receipt};
use crate::service::{Caller, ChatService, DeviceFeed, Out};

/// How long a poll waits when the request names no timeout.
pub const POLL_TIMEOUT_DEFAULT: Duration = Duration::from_secs(25);

/// What one poll answers.
#[derive(Default)]
struct Collected {
    entries: Vec<Arc<Entry>>,
    has_more: bool,
    receipts: Vec<Receipt>,
    presence: Vec<PresenceState>,
}

impl Collected {
    fn response(self, server_time_ms: u64) -> PollReply {
        PollReply {
            entries: self.entries,
            has_more: self.has_more,
            receipts: self.receipts,
            presence: self.presence,
            server_time_ms,
        }
    }

    /// Takes what the feed gave out: entries, and receipts and presence changes
    /// when `with_presence`.
    fn take(&mut self, feed: &mut DeviceFeed, with_presence: bool) {
        for out in feed.drain_out() {
            if let Out::Entry(entry, _) = out {
                self.entries.push(entry);
            }
        }
        self.receipts
            .extend(feed.take_receipts().into_iter().map(|(receipt, _)| receipt));
        if with_presence {
            self.presence = feed.take_presence();
        }
        self.has_more = feed.is_behind();
    }
}

/// Serves one poll of `caller`'s device.
pub async fn poll(
    svc: &Arc<ChatService>,
    caller: &Caller,
    req: PollRequest,
) -> Result<PollReply, ProtocolError> {
    let timeout = req
        .timeout_ms
        .map_or(POLL_TIMEOUT_DEFAULT, Duration::from_millis)
        .min(svc.limits().poll_timeout_max);
    let limit = svc.limits().page_len(req.limit)? as usize;
    let mailbox = svc.mailbox(caller).await?;
    // Ended below, or dropped with this future (the client went away).
    let in_flight = mailbox.begin_poll(svc.monotonic_ms());
    let generation = in_flight.generation();
    let result = poll_in(svc, &mailbox, generation, &req, timeout, limit).await;
    in_flight.end(svc.monotonic_ms());
    let mut collected = result?;
    collected.presence = current_presence(svc, std::mem::take(&mut collected.presence)).await;
    Ok(collected.response(svc.clock().now_ms()))
}

/// The changes a poll answers, re-read as they are now: a mailbox keeps changes
/// between polls, and its device may have been shown newer ones meanwhile (a
/// `presence` reply, or a WebSocket on another server while this mailbox waited
/// to idle out), so a change as it was published could show a last-seen time
/// older than the device already saw. On a read failure the changes go as they
/// were published.
async fn current_presence(svc: &ChatService, changes: Vec<PresenceState>) -> Vec<PresenceState> {
    if changes.is_empty() {
        return changes;
    }
    let users: Vec<String> = changes.iter().map(|c| c.user.clone()).collect();
    match svc.presence_of(&users).await {
        Ok(now) => now,
        Err(e) => {
            crate::warn_throttled!(error = %e, "presence not re-read for a poll; sent as published");
            changes
        }
    }
}

async fn poll_in(
    svc: &Arc<ChatService>,
    mailbox: &Mailbox<DeviceFeed>,
    generation: u64,
    req: &PollRequest,
    timeout: Duration,
    limit: usize,
) -> Result<Collected, ProtocolError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut feed = mailbox.content.lock().await;
    let mut got = Collected::default();
    if mailbox.is_superseded(generation) || mailbox.is_closed() {
        return Ok(got);
    }
    feed.connect().await?;
    let mutant = crate::mutants::Mutant::PollResumesWhereItLeft;
    if crate::mutants::active(mutant) && generation > 1 {
        feed.resume_without_cursors(limit);
    } else {
        let states = feed.start(&req.cursors, limit).await?;
        if mailbox.reopened() && generation == 1 {
            // The mailbox before this one ended without its device knowing (a poll
            // just answers): the receipts it had queued are read again from the store.
            feed.resync().await;
        } else if req.receipts
            && !crate::mutants::active(crate::mutants::Mutant::ReconnectForgetsReceipts)
        {
            // On any poll that asks (the first of a device's session, or the first
            // after a lost response): a receipt a lost response carried is gone from
            // the mailbox, and only the store still has it.
            feed.show_stored_receipts_again(&states).await;
        }
    }
    loop {
        feed.take_queued(svc.limits().device_queue_len_max).await;
        while feed.catch_up_ready() {
            feed.catch_up_step().await;
        }
        let now = tokio::time::Instant::now();
        if feed.ended().is_some() {
            // Replaced by a WebSocket, or too far behind: the next poll opens another.
            mailbox.close();
            got.take(&mut feed, true);
            return Ok(got);
        }
        got.take(&mut feed, false);
        if !got.entries.is_empty() || !got.receipts.is_empty() || now >= deadline {
            got.take(&mut feed, true);
            return Ok(got);
        }
        // Presence alone is answered at most once per presence interval.
        if feed.presence_due().is_some_and(|due| now >= due) {
            got.take(&mut feed, true);
            return Ok(got);
        }
        let wake_at = [feed.presence_due(), feed.work_due()]
            .into_iter()
            .flatten()
            .fold(deadline, std::cmp::Ord::min);
        let superseded = mailbox.superseded();
        if mailbox.is_superseded(generation) {
            return Ok(got);
        }
        tokio::select! {
            biased;
            () = superseded => return Ok(got),
            push = feed.recv() => feed.on_push(push).await,
            () = tokio::time::sleep_until(wake_at) => feed.work().await,
        }
    }
}
