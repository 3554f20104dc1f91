//! Deliberate bugs the simulator can switch on to prove its checker catches them.
//!
//! They exist only in simulation builds (`--cfg madsim`); in every other build
//! [`active`] is a constant `false` and the compiler removes the buggy paths.

/// One deliberate bug, each breaking one guarantee of the delivery contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Mutant {
    /// Durable: the writer acknowledges a group before committing it.
    AckBeforeDurable = 1,
    /// Idempotent: a retry with a known message id is sequenced again.
    SkipIdempotency = 2,
    /// One order: after a restart the writer forgets the last seq and hands it out again.
    SeqReuseAfterRestart = 3,
    /// Complete, in order: pushes are written as they come, without the per-device stream.
    FanoutOutOfOrder = 4,
    /// Complete: a reconnecting device's cursor is ignored; it resumes at the newest entry.
    ForgetCursorOnReconnect = 5,
    /// Receipts: a device's lower ack moves its cursor (and the receipt) backwards.
    ReceiptRegress = 6,
    /// Complete (several servers): when a server loses its link to the router, the
    /// events pending for its devices are dropped and its sessions never resync.
    DropPendingOnRouterLoss = 7,
    /// Durable: a group whose commit failed (a write or fsync error) is acknowledged anyway.
    AckFailedCommit = 8,
    /// Recovery: after a failed commit the embedded store stays closed for good
    /// (every later write fails until the process restarts).
    StayDownAfterIoError = 9,
    /// One order: an entry's server time is the clock's reading, not at least the
    /// previous entry's (so a clock set back makes a conversation's times go back).
    ServerTimeFromRawClock = 10,
    /// Complete: `sync` pages stop one entry short of the newest the caller may see,
    /// and say nothing more is left.
    SyncStopsShort = 11,
    /// Receipts: an ack's receipt goes only to the senders of entries its read
    /// cursor passed, so a sender whose message was delivered but not read is never told.
    ReceiptWaitsForRead = 12,
    /// Receipts: a group's `all_delivered` / `all_read` are the acking member's own
    /// cursor, not the minimum over the current members.
    SummaryFromAcker = 13,
    /// Presence: a user counts as gone only when the devices left here drop to
    /// one rather than none (the leaving device counted as still connected), so
    /// the last device's departure is never published.
    OfflineOffByOne = 14,
    /// Presence (several servers): a connection registered by a server counts as
    /// long as a server of that id is alive, whichever process registered it, so
    /// what a crashed server held still counts online after its restart.
    RegistryIgnoresIncarnation = 15,
    /// Presence (several servers): after the registry lost everything (a restart
    /// without persistence), servers register their connections again but not
    /// the presence subscriptions made through them.
    WatchesNotRestored = 16,
    /// Complete (long-poll): a poll on an open mailbox goes on from where the
    /// previous response left the device's feed, not from the cursors the device
    /// presents, so the entries of a response lost on the way are never given again.
    PollResumesWhereItLeft = 17,
    /// Durable (retention): the expiry sweep reads the retention in seconds where it
    /// wants milliseconds, so entries expire a thousand times too early.
    ExpiryCutoffInSeconds = 18,
    /// Complete (slow consumer): a device whose queue is full is taken off the
    /// routes, but its connection is never told: it stays open and receives no more
    /// live events, instead of ending with `slow_consumer` so the device reconnects
    /// and catches up from its cursor.
    SlowConsumerLeftOpen = 19,
    /// Receipts: a new connection that asks for the receipts that moved while its
    /// device was away (`hello` or a mailbox's first poll with `receipts`) is not
    /// given them, so a sender offline when its message was read never learns it.
    ReconnectForgetsReceipts = 20,
}

impl Mutant {
    /// Every mutant, in order.
    pub const ALL: [Mutant; 20] = [
        Mutant::AckBeforeDurable,
        Mutant::SkipIdempotency,
        Mutant::SeqReuseAfterRestart,
        Mutant::FanoutOutOfOrder,
        Mutant::ForgetCursorOnReconnect,
        Mutant::ReceiptRegress,
        Mutant::DropPendingOnRouterLoss,
        Mutant::AckFailedCommit,
        Mutant::StayDownAfterIoError,
        Mutant::ServerTimeFromRawClock,
        Mutant::SyncStopsShort,
        Mutant::ReceiptWaitsForRead,
        Mutant::SummaryFromAcker,
        Mutant::OfflineOffByOne,
        Mutant::RegistryIgnoresIncarnation,
        Mutant::WatchesNotRestored,
        Mutant::PollResumesWhereItLeft,
        Mutant::ExpiryCutoffInSeconds,
        Mutant::SlowConsumerLeftOpen,
        Mutant::ReconnectForgetsReceipts,
    ];

    /// A stable kebab-case name.
    pub fn name(self) -> &'static str {
        match self {
            Mutant::AckBeforeDurable => "ack-before-durable",
            Mutant::SkipIdempotency => "skip-idempotency",
            Mutant::SeqReuseAfterRestart => "seq-reuse-after-restart",
            Mutant::FanoutOutOfOrder => "fanout-out-of-order",
            Mutant::ForgetCursorOnReconnect => "forget-cursor-on-reconnect",
            Mutant::ReceiptRegress => "receipt-regress",
            Mutant::DropPendingOnRouterLoss => "drop-pending-on-router-loss",
            Mutant::AckFailedCommit => "ack-failed-commit",
            Mutant::StayDownAfterIoError => "stay-down-after-io-error",
            Mutant::ServerTimeFromRawClock => "server-time-from-raw-clock",
            Mutant::SyncStopsShort => "sync-stops-short",
            Mutant::ReceiptWaitsForRead => "receipt-waits-for-read",
            Mutant::SummaryFromAcker => "summary-from-acker",
            Mutant::OfflineOffByOne => "offline-off-by-one",
            Mutant::RegistryIgnoresIncarnation => "registry-ignores-incarnation",
            Mutant::WatchesNotRestored => "watches-not-restored",
            Mutant::PollResumesWhereItLeft => "poll-resumes-where-it-left",
            Mutant::ExpiryCutoffInSeconds => "expiry-cutoff-in-seconds",
            Mutant::SlowConsumerLeftOpen => "slow-consumer-left-open",
            Mutant::ReconnectForgetsReceipts => "reconnect-forgets-receipts",
        }
    }
}

#[cfg(madsim)]
static ACTIVE: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// Switches `mutant` on (or all off with `None`); simulation builds only.
#[cfg(madsim)]
pub fn set(mutant: Option<Mutant>) {
    ACTIVE.store(
        mutant.map_or(0, |m| m as u8),
        std::sync::atomic::Ordering::SeqCst,
    );
}

/// True when `mutant` is switched on (always false outside simulation builds).
#[inline]
pub fn active(mutant: Mutant) -> bool {
    #[cfg(madsim)]
    {
        ACTIVE.load(std::sync::atomic::Ordering::SeqCst) == mutant as u8
    }
    #[cfg(not(madsim))]
    {
        let _ = mutant;
        false
    }
}
