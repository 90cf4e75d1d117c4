//! The relay's configuration, and what it reports: its status, a step's
//! result and a flush's report.

use std::time::Duration;

use crate::policy::RetryPolicy;
use crate::store::{MaybeSend, MaybeSync};
use crate::time::Timestamp;

/// Default most events in one push.
pub const DEFAULT_MAX_EVENTS: usize = 100;
/// Default most event bytes ([`Event::size`](crate::Event::size)) in one push: 512 KiB.
pub const DEFAULT_MAX_BYTES: usize = 512 * 1024;
/// Default relay lease: another relay may take over this long after the last claim.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);

/// Shortest interval between two full counts of the store (see [`RelayStatus`]).
pub const MIN_COUNT_INTERVAL: Duration = Duration::from_secs(1);

/// The reason recorded on events dead-lettered for their age.
pub const EXPIRED: &str = "expired";

/// How a relay batches, leases and retries.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct RelayConfig {
    /// Most events in one push (default 100).
    pub max_events: usize,
    /// Most event bytes in one push (default 512 KiB); a larger single event
    /// is still sent alone.
    pub max_bytes: usize,
    /// How long the lease taken at each claim lasts (default 30 s). Keep it
    /// longer than the transport's total timeout.
    pub lease: Duration,
    /// Backoff, `Retry-After` handling and max age.
    pub retry: RetryPolicy,
    /// The lease owner's name; unique per relay instance (a random one by default).
    pub owner: String,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            max_events: DEFAULT_MAX_EVENTS,
            max_bytes: DEFAULT_MAX_BYTES,
            lease: DEFAULT_LEASE,
            retry: RetryPolicy::new(),
            owner: format!("relay-{}", uuid::Uuid::new_v4()),
        }
    }
}

impl RelayConfig {
    /// The defaults: 100 events, 512 KiB, 30 s lease, default retry policy, random owner.
    pub fn new() -> Self {
        Self::default()
    }

    /// Set the most events in one push.
    pub fn with_max_events(mut self, n: usize) -> Self {
        self.max_events = n.max(1);
        self
    }

    /// Set the most event bytes in one push.
    pub fn with_max_bytes(mut self, n: usize) -> Self {
        self.max_bytes = n.max(1);
        self
    }

    /// Set the lease duration.
    pub fn with_lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// Set the retry policy.
    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// Set the lease owner's name.
    pub fn with_owner(mut self, owner: impl Into<String>) -> Self {
        self.owner = owner.into();
        self
    }
}

/// What the app can show about delivery: a snapshot, published after every
/// change (see [`StatusObserver`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RelayStatus {
    /// Events not yet acknowledged. Counted in the store at most once per
    /// [`MIN_COUNT_INTERVAL`] and kept up to date by the relay in between, so
    /// commits of the last second may not show yet; 0 is exact (the last
    /// claim found nothing).
    pub pending: u64,
    /// Events acknowledged and not yet pruned. Counted like `pending`, and
    /// raised as soon as the server acknowledges: during a flush the store
    /// records the last push's answers beside the next push, a moment later
    /// (if that fails, the events are pushed again and may count twice until
    /// the next count in the store).
    pub sent: u64,
    /// Events given up on.
    pub dead: u64,
    /// Events in the request on the wire now (0 when idle).
    pub in_flight: usize,
    /// The last delivery failure; cleared by the next fully successful batch.
    pub last_error: Option<String>,
    /// When the oldest pending event may be tried again, when it is waiting.
    pub next_attempt: Option<Timestamp>,
    /// Set while another relay (process, tab) holds the lease: until when.
    pub lease_held_until: Option<Timestamp>,
}

/// Receives every new [`RelayStatus`]. Closures `Fn(&RelayStatus)` implement it.
pub trait StatusObserver: MaybeSend + MaybeSync {
    /// Called with the new status after each change.
    fn status_changed(&self, status: &RelayStatus);
}

impl<F: Fn(&RelayStatus) + MaybeSend + MaybeSync> StatusObserver for F {
    fn status_changed(&self, status: &RelayStatus) {
        self(status)
    }
}

/// What one [`Relay::step`](super::Relay::step) did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// A batch was claimed, sent (or not, when all expired) and settled.
    Batch {
        /// Events now sent.
        sent: usize,
        /// Events now dead.
        dead: usize,
        /// Events left pending.
        retry: usize,
        /// True when the batch met a failure (network, status, auth): the
        /// driver should wait for [`RelayStatus::next_attempt`] before stepping again.
        failed: bool,
    },
    /// Nothing is pending.
    Idle,
    /// The oldest pending event waits for its retry time.
    NotBefore(Timestamp),
    /// Another relay holds the lease until the given time.
    LeaseHeld {
        /// When that lease expires unless renewed.
        until: Timestamp,
    },
}

/// What a [`Relay::flush`](super::Relay::flush) achieved.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FlushReport {
    /// Events acknowledged by the server during this flush.
    pub sent: u64,
    /// Events dead-lettered during this flush.
    pub dead: u64,
    /// Events still pending afterwards.
    pub pending: u64,
    /// When the next attempt is due, if events wait for a retry time.
    pub next_attempt: Option<Timestamp>,
    /// The last failure seen, if the flush stopped on one.
    pub last_error: Option<String>,
    /// Set when another relay holds the lease, until when.
    pub lease_held_until: Option<Timestamp>,
}

impl FlushReport {
    /// Add one step's counts.
    pub(super) fn add(&mut self, step: &Step) {
        if let Step::Batch { sent, dead, .. } = step {
            self.sent += *sent as u64;
            self.dead += *dead as u64;
        }
    }
}
