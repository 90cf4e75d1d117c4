//! The store contract: what a storage backend (SQLite natively, IndexedDB in
//! the browser) must do for the relay and for the app's management calls.
//!
//! Committing the app's own state together with events is backend specific
//! (a rusqlite transaction, an `IDBTransaction`) and lives in each backend;
//! everything after the commit goes through this trait, so the relay and the
//! conformance suite (`tests/conformance`) are written once.
//!
//! # Obligations of an implementation
//!
//! 1. `enqueue` writes all events of one call in one atomic transaction, or none.
//! 2. `seq` is strictly increasing in commit order, across every writer of the
//!    same database (threads, processes, tabs); gaps are allowed.
//! 3. Every event gets a fresh UUIDv7 `id` at enqueue; ids are never reused.
//! 4. An event is validated ([`NewEvent::validate`]) before anything is written.
//! 5. `claim` runs in one transaction: it takes or renews the relay lease for
//!    `owner` (refusing while another owner holds an unexpired lease), then
//!    returns the pending events with the lowest `seq`, in `seq` order,
//!    starting at the oldest pending event (or, with `after`, at the oldest
//!    pending event whose `seq` is greater), up to `max_events` and
//!    `max_bytes` (always at least one event, however large). It writes
//!    nothing to the events: a claim that is never settled (a crash, a closed
//!    tab) leaves no trace on them. A store may keep the lease outside the
//!    database (SQLite: an OS file lock that the kernel drops when the process
//!    dies); where it keeps an expiry time, an expiry further than `lease`
//!    past the later of `now` and the clock as the store reads it is not
//!    believed (it was written under a clock that ran ahead) and counts as
//!    expired ([`ClaimRequest::lease_holds`]; a lease renewed after the
//!    claimant read `now` holds).
//! 6. `claim` returns [`Claim::NotBefore`] when the first event it would take
//!    is not due yet (`next_attempt_at` in the future): later events never
//!    overtake it. A `next_attempt_at` further than `max_wait` past the
//!    later of `now` and the clock as the store reads it is not believed (a
//!    clock that ran ahead, a `Retry-After` from before its ceiling): the
//!    event is due now ([`ClaimRequest::is_due`]).
//! 7. `settle` applies outcomes only to events still pending, and counts one
//!    attempt on each event it settles (`attempts` = attempts that reached an
//!    outcome); a `Sent` event records `sent_at`; a `Dead` one its reason; a
//!    `Retry` one its error and next attempt time. An outcome names its event
//!    by `seq` and `id` as claimed; both identify the same event (a `seq` is
//!    never reused), so a store may find it by either, and an outcome whose
//!    event is gone changes nothing. An event named more than once in one
//!    call (the relay never does it) gets one of those outcomes, not
//!    several. Settling never creates, drops or reorders events.
//! 8. Sent events stay until `prune_sent`; dead events stay until `retry` or
//!    `discard`. `retry` records `retried_at` (the retry policy's max age
//!    counts from it); `retry_now` makes waiting pending events due and
//!    touches nothing else.
//! 9. Nothing a crash interrupts is lost: an event claimed but never settled is
//!    still pending and is claimed again once the lease is free (released,
//!    its holder died, or it expired).
//! 10. `settle_and_claim(outcomes, now, request)` has the effects of
//!     `settle(outcomes, now)` followed by `claim(request)` (the claim sees
//!     what the settle did), and may run both in one transaction. The settle
//!     part applies whoever holds the lease, as `settle` does (the outcomes
//!     are of pushes that happened): under another owner's lease the events
//!     are settled and the claim answers [`Claim::LeaseHeld`]. An outer `Err`
//!     means nothing was recorded, no outcome and no lease (the events stay
//!     pending and are pushed again; the server answers `duplicate`). A
//!     failing claim part either comes back as the inner `Err`, the settle
//!     recorded, or fails the whole call as the outer `Err`, nothing
//!     recorded; a settle is never half applied. With no outcomes it is a
//!     `claim`.

use std::future::Future;
use std::time::Duration;

use crate::error::Result;
use crate::event::{Event, EventId, NewEvent};
use crate::time::Timestamp;

/// `Send` natively, where the relay runs on tokio's multi-threaded runtime;
/// nothing in the browser, where JavaScript handles are not `Send`.
#[cfg(not(web))]
pub trait MaybeSend: Send {}
#[cfg(not(web))]
impl<T: Send + ?Sized> MaybeSend for T {}
/// `Send` natively, where the relay runs on tokio's multi-threaded runtime;
/// nothing in the browser, where JavaScript handles are not `Send`.
#[cfg(web)]
pub trait MaybeSend {}
#[cfg(web)]
impl<T: ?Sized> MaybeSend for T {}

/// `Sync` natively, nothing in the browser (see [`MaybeSend`]).
#[cfg(not(web))]
pub trait MaybeSync: Sync {}
#[cfg(not(web))]
impl<T: Sync + ?Sized> MaybeSync for T {}
/// `Sync` natively, nothing in the browser (see [`MaybeSend`]).
#[cfg(web)]
pub trait MaybeSync {}
#[cfg(web)]
impl<T: ?Sized> MaybeSync for T {}

/// What the relay asks of [`Store::claim`].
#[derive(Clone, Debug)]
pub struct ClaimRequest<'a> {
    /// Identifies the relay instance holding the lease.
    pub owner: &'a str,
    /// How long the lease lasts unless renewed by the next claim.
    pub lease: Duration,
    /// Most events in one batch.
    pub max_events: usize,
    /// Most bytes ([`Event::size`]) in one batch; the first event is always taken.
    pub max_bytes: usize,
    /// The current time.
    pub now: Timestamp,
    /// Take only events whose `seq` is greater than this: the relay claims
    /// the next batches while its previous ones are still on the wire and
    /// unsettled (still pending). `None` starts at the oldest pending event.
    pub after: Option<i64>,
    /// The longest wait a retry time can legitimately ask for (the retry
    /// policy's [`cap`](crate::RetryPolicy::cap), which also bounds
    /// `Retry-After`): a `next_attempt_at` further than this past `now` is
    /// not believed and the event is due (obligation 6).
    pub max_wait: Duration,
}

impl ClaimRequest<'_> {
    /// Obligation 5, the one copy of the rule every store uses: does a lease
    /// of another owner, stored as expiring at `until`, still hold? Not once
    /// it has expired, and not when it claims to last longer than a lease can
    /// (written under a clock that ran ahead, then corrected).
    ///
    /// "Longer than a lease can" is judged from the clock as the store reads
    /// the lease, not from `now` alone: `now` was read when the request was
    /// made, before the store took its lock or transaction, and the holder
    /// may have renewed its lease since (a browser tab's claim waits for the
    /// sending tab's IndexedDB transaction). Judged from `now`, that renewal
    /// would look like a clock that ran ahead, and a second sender would
    /// take over.
    pub fn lease_holds(&self, until: Timestamp) -> bool {
        until > self.now && until <= self.latest().add(self.lease)
    }

    /// Obligation 6, the one copy of the rule every store uses: is an event
    /// whose stored retry time is `next_attempt_at` due now? Yes once that
    /// time has come, and also when it lies further ahead than `max_wait`
    /// (such a time is not believed). "Further ahead" is judged as in
    /// [`ClaimRequest::lease_holds`]: another sender may have written the
    /// retry time after this request read `now`.
    pub fn is_due(&self, next_attempt_at: Timestamp) -> bool {
        next_attempt_at <= self.now || next_attempt_at > self.latest().add(self.max_wait)
    }

    /// The later of `now` and the clock as the store reads: what a time
    /// written meanwhile by another sender can be measured against.
    fn latest(&self) -> Timestamp {
        self.now.max(Timestamp::now())
    }
}

/// The answer of [`Store::claim`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Claim {
    /// Events to send, in `seq` order (their `attempts` do not count this one yet).
    Batch(Vec<Event>),
    /// Nothing is pending.
    Empty,
    /// The oldest pending event waits for its retry time.
    NotBefore(Timestamp),
    /// Another relay holds the lease until the given time.
    LeaseHeld {
        /// When that lease expires unless renewed.
        until: Timestamp,
    },
}

/// What happened to one claimed event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The server has it (accepted, or a duplicate of one it had).
    Sent,
    /// Give up on it, with a reason (rejected, expired, too large).
    Dead {
        /// Why.
        reason: String,
    },
    /// Try again no sooner than `at`.
    Retry {
        /// Earliest next attempt.
        at: Timestamp,
        /// What went wrong this time.
        error: String,
    },
}

/// What happened to one claimed event, as handed to [`Store::settle`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settlement {
    /// The event's `seq`, as claimed.
    pub seq: i64,
    /// The event's id, as claimed (the same event as `seq`).
    pub id: EventId,
    /// What happened.
    pub outcome: Outcome,
}

impl Settlement {
    /// The outcome of a claimed `event`.
    pub fn new(event: &Event, outcome: Outcome) -> Self {
        Settlement {
            seq: event.seq,
            id: event.id,
            outcome,
        }
    }
}

impl Settlement {
    /// Obligation 7's rule for an event named more than once in one call:
    /// its first outcome counts and the later ones are dropped, order kept.
    /// The relay names each event once, in `seq` order, which is checked in
    /// one pass; anything else is searched linearly (a hash set would cost
    /// the browser package more than the few hundred outcomes of a call
    /// cost to search).
    pub fn keep_first_of_each(outcomes: &mut Vec<Settlement>) {
        if outcomes.windows(2).all(|w| w[0].seq < w[1].seq) {
            return;
        }
        let mut named: Vec<i64> = Vec::with_capacity(outcomes.len());
        outcomes.retain(|o| {
            let first = !named.contains(&o.seq);
            named.push(o.seq);
            first
        });
    }
}

/// Counts over the outbox.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Events not yet acknowledged.
    pub pending: u64,
    /// Events acknowledged and not yet pruned.
    pub sent: u64,
    /// Events given up on.
    pub dead: u64,
    /// When the oldest pending event was enqueued.
    pub oldest_pending_at: Option<Timestamp>,
}

impl Stats {
    /// Age of the oldest pending event at `now`.
    pub fn oldest_pending_age(&self, now: Timestamp) -> Option<Duration> {
        self.oldest_pending_at.map(|t| now.since(t))
    }
}

/// A storage backend for the outbox. See the module docs for the obligations.
pub trait Store: MaybeSend + MaybeSync {
    /// The client id made at first open (a UUID), the stream name at the server.
    fn client_id(&self) -> &str;

    /// Append events in one transaction with nothing else (apps that have no
    /// state of their own to commit). Returns the stored events, in order.
    fn enqueue(
        &self,
        events: Vec<NewEvent>,
    ) -> impl Future<Output = Result<Vec<Event>>> + MaybeSend;

    /// Take (or renew) the lease and claim the next batch (obligations 5, 6).
    fn claim(&self, request: ClaimRequest<'_>) -> impl Future<Output = Result<Claim>> + MaybeSend;

    /// Record what happened to claimed events (obligation 7).
    fn settle(
        &self,
        outcomes: Vec<Settlement>,
        now: Timestamp,
    ) -> impl Future<Output = Result<()>> + MaybeSend;

    /// Record `outcomes` at `now` and then take (or renew) the lease and claim
    /// the next batch with `request` (obligation 10): the relay's work while
    /// a push is on the wire, in one store transaction where the backend can
    /// (IndexedDB: a transaction costs more than the records it writes).
    ///
    /// `Err`: nothing was recorded. `Ok(Err(_))`: the outcomes were recorded
    /// and the claim failed. `Ok(Ok(claim))`: both were done. The default is
    /// [`settle_then_claim`] (two transactions).
    fn settle_and_claim(
        &self,
        outcomes: Vec<Settlement>,
        now: Timestamp,
        request: ClaimRequest<'_>,
    ) -> impl Future<Output = Result<Result<Claim>>> + MaybeSend {
        settle_then_claim(self, outcomes, now, request)
    }

    /// Give up the lease if `owner` holds it, so another relay may start at once.
    fn release_lease(&self, owner: &str) -> impl Future<Output = Result<()>> + MaybeSend;

    /// Counts of pending, sent and dead events.
    fn stats(&self) -> impl Future<Output = Result<Stats>> + MaybeSend;

    /// Up to `limit` pending events in `seq` order.
    fn pending(&self, limit: usize) -> impl Future<Output = Result<Vec<Event>>> + MaybeSend;

    /// Up to `limit` dead events in `seq` order.
    fn dead_letters(&self, limit: usize) -> impl Future<Output = Result<Vec<Event>>> + MaybeSend;

    /// One event by id, whatever its status.
    fn get(&self, id: EventId) -> impl Future<Output = Result<Option<Event>>> + MaybeSend;

    /// Make a dead event pending again (attempts reset, due now, `retried_at`
    /// set to `now`). Returns false when no dead event has this id.
    fn retry(&self, id: EventId, now: Timestamp) -> impl Future<Output = Result<bool>> + MaybeSend;

    /// The app's "try now": every pending event whose `next_attempt_at` is
    /// after `now` becomes due at `now` (attempts, errors and order are kept).
    /// Returns how many events were waiting.
    fn retry_now(&self, now: Timestamp) -> impl Future<Output = Result<u64>> + MaybeSend;

    /// Delete a dead event for good. Returns false when no dead event has this
    /// id (pending events cannot be discarded: that would lose them).
    fn discard(&self, id: EventId) -> impl Future<Output = Result<bool>> + MaybeSend;

    /// Delete sent events acknowledged before `before`. Returns how many.
    fn prune_sent(&self, before: Timestamp) -> impl Future<Output = Result<u64>> + MaybeSend;
}

/// [`Store::settle_and_claim`] in two transactions: [`Store::settle`] (skipped
/// when there are no outcomes), then [`Store::claim`]. A failing settle is the
/// outer `Err` (nothing recorded); a failing claim is the inner one, the
/// settle stays recorded. The trait's default; a store that overrides the
/// method only to observe it (as `testing::MemoryStore` does) calls this.
pub async fn settle_then_claim<S: Store + ?Sized>(
    store: &S,
    outcomes: Vec<Settlement>,
    now: Timestamp,
    request: ClaimRequest<'_>,
) -> Result<Result<Claim>> {
    if !outcomes.is_empty() {
        store.settle(outcomes, now).await?;
    }
    Ok(store.claim(request).await)
}
