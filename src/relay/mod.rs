//! The relay core: claim a batch, send it, settle the answer. Target independent.
//!
//! [`Relay`] owns a [`Store`] and a [`Transport`] and runs one delivery cycle
//! per [`Relay::step`]:
//!
//! 1. **claim** (one store transaction): take or renew the relay lease and the
//!    oldest pending events, up to `max_events` and `max_bytes`;
//! 2. **send** (no store transaction open: an IndexedDB transaction must never
//!    span a `fetch`, and a SQLite write lock must not wait on the network);
//! 3. **settle**: record what the server said, in the store call of the next
//!    claim ([`Store::settle_and_claim`]: one transaction where the store can,
//!    as IndexedDB does) or, with nothing to claim, on its own.
//!
//! The answer is interpreted as sync protocol v1 says (`docs/protocol.md`);
//! the policy itself, what each answer does to the batch and to the next
//! attempt, lives in [`crate::policy`] (`classify`, [`PushWindow`]). Only
//! evidence against one event dead-letters it; a failure that may be the
//! channel's leaves every event pending:
//!
//! | answer | what happens |
//! |---|---|
//! | 200, event `accepted` / `duplicate` | sent |
//! | 200, event `rejected` | dead, with the server's reason |
//! | 200, event not named | stays pending (retried) |
//! | network error, timeout, 5xx, unreadable 200 body | retry with backoff (full jitter); twice in a row (not 503): the next pushes are halved, down to one event |
//! | 408, 429, 503 | retry, no sooner than `Retry-After`, up to the backoff cap |
//! | 401, 403 | ask the credentials provider for fresh ones, resend once, then back off; never dead |
//! | 413 | split in halves (later pushes too); a lone event -> dead once others pass |
//! | 400, 422 with the protocol's error body blaming the content | bisect; a lone event -> dead once others pass; refused alike 3 times with nothing passing: channel failure |
//! | any other 400, 422 (no protocol error body, `unsupported_protocol`, …) | channel failure: retry with backoff, no bisection |
//! | older than the policy's max age | dead ("expired"), not sent |
//!
//! `attempts` counts the pushes that carried an event: events claimed but
//! never pushed (behind a failure, or claimed ahead) are left as they were,
//! and the backoff after a failure follows the attempts of the events that
//! failed.
//!
//! # Pipelining
//!
//! Pushes go out one at a time, each after the previous answer (that is what
//! keeps `seq` order at the server), but the relay's local work overlaps the
//! network. Every claim takes one push's worth of events, so the first push
//! of a flush leaves as soon as its own events are read. While push *k* is
//! on the wire, from the moment the transport says its request has left
//! ([`RequestSent`]), the relay settles the answer to push *k − 1* and, when
//! the last claim was full, claims and serializes one more push's worth of
//! events past the last claimed `seq`
//! ([`ClaimRequest::after`](crate::store::ClaimRequest::after)) into the
//! group *ahead*, both in one store call ([`Store::settle_and_claim`]).
//! Inside a flush, a group's last answer is settled beside the next group's
//! first push, or with the next claim when nothing is ahead. A failed settle
//! records nothing (obligation 10 of [`crate::store`]): those events stay
//! pending and are pushed again.
//! Anything that leaves an event of a group pending (a failure, an event the
//! answer did not name, a lease running short) drops the group claimed
//! ahead, so nothing overtakes that event; and [`Relay::step`] /
//! [`Relay::flush`] return only once everything they learnt is settled.
//!
//! The core never sleeps and never spawns: the driver (tokio natively, the
//! browser's event loop on wasm) decides when to call [`Relay::step`] or
//! [`Relay::flush`] again, using [`RelayStatus::next_attempt`]. That keeps
//! this module free of any runtime, so the same code runs on both targets.

mod config;
pub(crate) mod push;

use std::ops::Range;
use std::time::Duration;

pub use config::{
    DEFAULT_LEASE, DEFAULT_MAX_BYTES, DEFAULT_MAX_EVENTS, EXPIRED, FlushReport, MIN_COUNT_INTERVAL,
    RelayConfig, RelayStatus, StatusObserver, Step,
};
use push::{
    AHEAD_PUSHES, Group, Pushes, Trial, Wire, claim_request, join, match_results,
    next_attempt_number, push_body, send_with_auth, tally,
};

use crate::error::Result;
use crate::policy::{Jitter, PushWindow, Verdict, classify, network_failure};
use crate::protocol::{PROTOCOL_VERSION, ResultStatus};
use crate::store::{Claim, Outcome, Settlement, Store};
use crate::time::Timestamp;
use crate::trace;
use crate::transport::{RequestSent, Transport};

/// The flush loop core over a store and a transport. See the module docs.
pub struct Relay<S, T> {
    store: S,
    transport: T,
    config: RelayConfig,
    jitter: Jitter,
    /// True after a 401/403, until an answer that is neither: every push asks
    /// the credentials provider for fresh ones meanwhile.
    refresh_credentials: bool,
    /// Most events in the next push: narrowed by repeated channel failures.
    window: PushWindow,
    status: RelayStatus,
    observer: Option<Box<dyn StatusObserver>>,
    /// `{"protocol":1,"client_id":"…","events":[`, built once.
    body_prefix: Vec<u8>,
    /// When the store may be counted again (see `count`).
    count_due: Option<Timestamp>,
    /// The next group, claimed while the last one was on the wire.
    ahead: Option<Group>,
    /// Outcomes of a group's last push, when the next group is `ahead`:
    /// inside [`Relay::flush`] they are settled beside the next group's
    /// first push instead of between the two groups.
    carried: Vec<Settlement>,
}

impl<S: std::fmt::Debug, T: std::fmt::Debug> std::fmt::Debug for Relay<S, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("store", &self.store)
            .field("transport", &self.transport)
            .field("config", &self.config)
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
}

impl<S: Store, T: Transport> Relay<S, T> {
    /// A relay over `store` and `transport`.
    pub fn new(store: S, transport: T, config: RelayConfig) -> Self {
        let mut body_prefix = br#"{"protocol":"#.to_vec();
        body_prefix.extend_from_slice(PROTOCOL_VERSION.to_string().as_bytes());
        body_prefix.extend_from_slice(br#","client_id":"#);
        // A client id is a UUID, but serialize it properly anyway.
        crate::protocol::write_json_string(&mut body_prefix, store.client_id());
        body_prefix.extend_from_slice(br#","events":["#);
        Relay {
            store,
            transport,
            jitter: Jitter::from_entropy(),
            refresh_credentials: false,
            window: PushWindow::new(config.max_events),
            config,
            status: RelayStatus::default(),
            observer: None,
            body_prefix,
            count_due: None,
            ahead: None,
            carried: Vec::new(),
        }
    }

    /// Use a fixed jitter source (deterministic tests).
    pub fn with_jitter(mut self, jitter: Jitter) -> Self {
        self.jitter = jitter;
        self
    }

    /// Publish every status change to `observer` (replacing any previous one).
    pub fn set_observer(&mut self, observer: impl StatusObserver + 'static) {
        self.observer = Some(Box::new(observer));
        self.publish();
    }

    /// The store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// The transport.
    pub fn transport(&self) -> &T {
        &self.transport
    }

    /// The configuration.
    pub fn config(&self) -> &RelayConfig {
        &self.config
    }

    /// The latest status.
    pub fn status(&self) -> &RelayStatus {
        &self.status
    }

    fn publish(&self) {
        if let Some(observer) = &self.observer {
            observer.status_changed(&self.status);
        }
    }

    /// Re-read the counts from the store (events committed since the last
    /// count become visible) and publish them.
    pub async fn refresh_status(&mut self) -> Result<()> {
        self.count(true).await
    }

    /// Count pending/sent/dead in the store, unless `force` is false and the
    /// last count was recent. A count may cost time proportional to the
    /// events it counts (IndexedDB counts each status on an index; SQLite
    /// walks the pending and dead events, and keeps the sent count in its
    /// meta table), so between counts the relay keeps the numbers itself
    /// (from what it settles) and counts at most once per
    /// [`MIN_COUNT_INTERVAL`], or less often when a count is slow (at most ~5%
    /// of the time goes to counting).
    async fn count(&mut self, force: bool) -> Result<()> {
        let started = Timestamp::now();
        if !force && self.count_due.is_some_and(|due| started < due) {
            return Ok(());
        }
        let stats = self.store.stats().await?;
        let done = Timestamp::now();
        let interval = (done.since(started) * 20).max(MIN_COUNT_INTERVAL);
        self.count_due = Some(done.add(interval));
        self.status.pending = stats.pending;
        self.status.sent = stats.sent;
        self.status.dead = stats.dead;
        self.publish();
        Ok(())
    }

    /// The app's "try now": every pending event waiting for a retry time
    /// (backoff, `Retry-After`) becomes due, and the next step or flush sends
    /// it. Returns how many events were waiting. Attempts and order are kept.
    pub async fn retry_now(&mut self) -> Result<u64> {
        let waiting = self.store.retry_now(Timestamp::now()).await?;
        self.status.next_attempt = None;
        self.publish();
        Ok(waiting)
    }

    /// Give up the lease so another relay can start at once (at shutdown).
    pub async fn release_lease(&mut self) -> Result<()> {
        // Claimed under the lease given up here: claim again after it.
        self.ahead = None;
        self.store.release_lease(&self.config.owner).await
    }

    /// Deliver what is due now: step until nothing is pending, the oldest
    /// event waits for a retry time, another relay holds the lease, or a batch
    /// fails (the driver waits for [`RelayStatus::next_attempt`] then).
    pub async fn flush(&mut self) -> Result<FlushReport> {
        self.flush_while(|| true).await
    }

    /// [`Relay::flush`], asking `go_on` before each batch and stopping early
    /// when it says no. Drivers use it to take a shutdown request between
    /// batches, never in the middle of one.
    pub async fn flush_while(&mut self, go_on: impl FnMut() -> bool) -> Result<FlushReport> {
        trace::in_span!(self.flush_in_span(go_on), "flush").await
    }

    async fn flush_in_span(&mut self, go_on: impl FnMut() -> bool) -> Result<FlushReport> {
        let stepped = self.steps_while(go_on).await;
        // Whatever happened, record what the server already acknowledged.
        let settled = self.settle_carried().await;
        let (mut report, idle) = stepped?;
        settled?;
        if !idle {
            self.count(true).await?;
        }
        report.pending = self.status.pending;
        report.next_attempt = self.status.next_attempt;
        report.last_error = self.status.last_error.clone();
        trace::debug!(
            sent = report.sent,
            dead = report.dead,
            pending = report.pending,
            "flush done"
        );
        Ok(report)
    }

    /// The loop of [`Relay::flush_while`]; also says whether it ended on an
    /// empty claim (then the pending count is exact). May leave outcomes in
    /// `carried`.
    async fn steps_while(
        &mut self,
        mut go_on: impl FnMut() -> bool,
    ) -> Result<(FlushReport, bool)> {
        self.count(false).await?;
        let mut report = FlushReport::default();
        let mut idle = false;
        while go_on() {
            let step = self.step_carrying().await?;
            report.add(&step);
            match step {
                Step::Batch { failed: false, .. } => continue,
                Step::LeaseHeld { until } => {
                    report.lease_held_until = Some(until);
                    break;
                }
                Step::Idle => {
                    // The claim found nothing pending: the count is exact.
                    idle = true;
                    break;
                }
                Step::Batch { failed: true, .. } | Step::NotBefore(_) => break,
            }
        }
        Ok((report, idle))
    }

    /// Settle the outcomes carried over from the last step, if any.
    async fn settle_carried(&mut self) -> Result<()> {
        if self.carried.is_empty() {
            return Ok(());
        }
        let carried = std::mem::take(&mut self.carried);
        let settled = self.store.settle(carried, Timestamp::now()).await;
        settled.inspect_err(|e| self.store_failed("settle", e))
    }

    /// A store call failed; `what` ("settle", "claim") names it in the
    /// status. Nothing is lost: unsettled events stay pending and are resent
    /// (the server answers `duplicate`), and the group claimed ahead is
    /// dropped so that it cannot overtake them.
    fn store_failed(&mut self, what: &str, e: &crate::Error) {
        trace::warning!(error = %e, call = what, "store call failed; the events stay pending");
        self.ahead = None;
        self.status.last_error = Some(format!("{what} failed: {e}"));
        self.publish();
    }

    /// One claim -> send -> settle cycle (or the reason there was none).
    /// Everything it learnt is settled in the store when it returns.
    pub async fn step(&mut self) -> Result<Step> {
        let step = self.step_carrying().await;
        let settled = self.settle_carried().await;
        let step = step?;
        settled?;
        Ok(step)
    }

    /// [`Relay::step`], possibly leaving the last push's outcomes in `carried`.
    async fn step_carrying(&mut self) -> Result<Step> {
        let now = Timestamp::now();
        if let Some(group) = self.ahead.take()
            && now < group.claimed_at.add(self.config.lease / 2)
        {
            // Claimed while the previous batch was on the wire (see
            // `deliver`), recently enough that the lease taken then holds.
            self.status.lease_held_until = None;
            return self.deliver(group).await;
        }
        let request = claim_request(&self.config, now, None);
        // What the last group's last push learnt goes first, in the same
        // store transaction where the store can (obligation 10).
        let carried = std::mem::take(&mut self.carried);
        let settling = !carried.is_empty();
        let claim = match self
            .store
            .settle_and_claim(carried, now, request.clone())
            .await
        {
            Ok(Ok(claim)) => claim,
            Err(e) if settling => {
                self.store_failed("settle", &e);
                return Err(e);
            }
            Err(e) | Ok(Err(e)) => {
                self.store_failed("claim", &e);
                return Err(e);
            }
        };
        match claim {
            Claim::Empty => {
                trace::debug!("claim: nothing pending");
                self.status.pending = 0;
                self.status.next_attempt = None;
                self.status.lease_held_until = None;
                self.publish();
                Ok(Step::Idle)
            }
            Claim::NotBefore(at) => {
                trace::debug!(next_attempt = %at.to_rfc3339(), "claim: nothing due yet");
                self.status.next_attempt = Some(at);
                self.status.lease_held_until = None;
                self.publish();
                Ok(Step::NotBefore(at))
            }
            Claim::LeaseHeld { until } => {
                trace::info!(
                    until = %until.to_rfc3339(),
                    "claim: another relay holds the lease"
                );
                self.status.lease_held_until = Some(until);
                self.publish();
                Ok(Step::LeaseHeld { until })
            }
            Claim::Batch(events) => {
                trace::debug!(
                    events = events.len(),
                    first_seq = events.first().map(|e| e.seq),
                    last_seq = events.last().map(|e| e.seq),
                    "claimed"
                );
                self.status.lease_held_until = None;
                let group = Group::prepare(events, &request, &self.config);
                self.deliver(group).await
            }
        }
    }

    /// Send a claimed group push by push and settle the answers.
    async fn deliver(&mut self, group: Group) -> Result<Step> {
        let Group {
            claimed_at: now,
            wire,
            mut outcomes,
            last_seq,
            full,
        } = group;
        let mut failed = false;
        let mut queue = Pushes::new(&wire);
        // When this claim was full, more is probably pending: while each push
        // is on the wire, claim and serialize one more push's worth into
        // `self.ahead`, so the next step starts pushing at once and the local
        // work per push stays small beside the push itself.
        let mut prefetch_after = full.then_some(last_seq);
        let mut counts = [0usize; 3];
        // Events of this group never pushed: left as they are (pending, not
        // counted as attempted); the first event left pending blocks them.
        let mut unsent = 0;
        let mut pushes = 0;
        let mut trial = Trial::default();
        while let Some(range) = queue.pop(&wire, self.window.limit(), self.config.max_bytes) {
            if pushes > 0 && Timestamp::now() >= now.add(self.config.lease / 2) {
                // The lease was renewed at the claim; pushing on past half of
                // it risks another relay taking over in the middle of this
                // claim. The rest goes with the next claim, which renews it.
                queue.push_front(range);
                break;
            }
            pushes += 1;
            // Settle what is known so far while this push is on the wire
            // (with what the previous group's last push carried over).
            let mut known = std::mem::take(&mut outcomes);
            tally(&known, &mut counts);
            known.append(&mut self.carried);
            let verdict = self
                .send_range(&wire, range.clone(), known, &mut prefetch_after)
                .await?;
            trace::debug!(
                events = range.len(),
                answer = push::verdict_name(&verdict),
                "pushed"
            );
            match verdict {
                Verdict::Results(response) => {
                    self.window.passed();
                    // The channel carries pushes: lone refusals were the events'.
                    trial.convict(&wire, &mut outcomes);
                    let part = &wire[range.clone()];
                    let mut unnamed = Vec::new();
                    for (w, result) in part.iter().zip(match_results(part, response.results)) {
                        match result {
                            Some((ResultStatus::Accepted | ResultStatus::Duplicate, _)) => {
                                outcomes.push(w.settlement(Outcome::Sent))
                            }
                            Some((ResultStatus::Rejected, reason)) => outcomes.push(
                                w.settlement(Outcome::Dead {
                                    reason: reason
                                        .unwrap_or_else(|| "rejected by the server".to_owned()),
                                }),
                            ),
                            None => unnamed.push(w),
                        }
                    }
                    if !unnamed.is_empty() {
                        // The server skipped these: they stay pending. If it made
                        // progress on others, come back at once; otherwise back off
                        // so a server that never names an event is not hammered.
                        let progressed = unnamed.len() < range.len();
                        let error = "the server's answer did not name this event".to_owned();
                        let at = if progressed {
                            now
                        } else {
                            failed = true;
                            self.status.last_error = Some(error.clone());
                            let attempts = next_attempt_number(unnamed.iter().copied());
                            self.config
                                .retry
                                .next_attempt(now, attempts, None, &mut self.jitter)
                        };
                        trace::warning!(
                            events = unnamed.len(),
                            retry_at = %at.to_rfc3339(),
                            reason = %error,
                            "events the answer did not name stay pending"
                        );
                        for w in unnamed {
                            outcomes.push(w.settlement(Outcome::Retry {
                                at,
                                error: error.clone(),
                            }));
                        }
                        // Later pushes must not overtake the skipped events.
                        unsent += queue.drain();
                    }
                }
                Verdict::Refused { too_large, .. } if range.len() > 1 => {
                    if too_large {
                        self.window.too_large(range.len());
                    }
                    queue.split_front(range)
                }
                Verdict::Refused { reason, .. } => {
                    trial.refused(range.start, reason, &wire, &mut outcomes);
                    if !trial.is_empty() && (trial.is_channel() || queue.is_empty()) {
                        // Refused alike, part after part, and nothing passed:
                        // the channel's doing (a proxy, a WAF, a gateway), not
                        // the events'. They all stay pending.
                        let (error, suspects) = trial.acquit();
                        failed = true;
                        unsent += queue.drain();
                        self.channel_failure(&wire, suspects, None, error, &mut outcomes);
                    }
                }
                Verdict::Channel {
                    retry_after,
                    error,
                    narrows,
                } => {
                    failed = true;
                    self.window.failed(range.len(), narrows);
                    // This push's events (and any lone refusal still unproven)
                    // were carried and stay pending; the rest were not pushed.
                    let (_, suspects) = trial.acquit();
                    let carried: Vec<usize> = suspects.into_iter().chain(range).collect();
                    unsent += queue.drain();
                    self.channel_failure(&wire, carried, retry_after, error, &mut outcomes);
                }
            }
        }
        unsent += queue.drain();
        if !trial.is_empty() {
            // Stopped (lease renewal) with lone refusals unproven: pending.
            let (error, suspects) = trial.acquit();
            failed = true;
            self.channel_failure(&wire, suspects, None, error, &mut outcomes);
        }

        tally(&outcomes, &mut counts);
        let [sent, dead, retry] = counts;
        trace::info!(
            sent,
            dead,
            pending = retry + unsent,
            failed,
            "batch settled"
        );
        if retry + unsent > 0 {
            // Events of this group stay pending: the next group must not
            // overtake them, so it is claimed again after them.
            self.ahead = None;
        }
        // With the next group ahead, the next step pushes at once: these are
        // settled beside its first push (or when the flush ends), so no
        // store transaction sits between two pushes. Without, they are
        // settled now, before the counts below are published.
        self.carried.append(&mut outcomes);
        if self.ahead.is_none() {
            self.settle_carried().await?;
        }
        self.status.pending = self.status.pending.saturating_sub((sent + dead) as u64);
        self.status.sent += sent as u64;
        self.status.dead += dead as u64;
        if !failed {
            self.status.last_error = None;
            self.status.next_attempt = None;
        }
        self.publish();
        Ok(Step::Batch {
            sent,
            dead,
            retry: retry + unsent,
            failed,
        })
    }

    /// A failure of the channel: the events at `carried` (pushed, no verdict)
    /// are retried after the policy's backoff for the attempt they were on
    /// (and no sooner than `retry_after`, up to the cap); the status says why.
    fn channel_failure(
        &mut self,
        wire: &[Wire],
        carried: Vec<usize>,
        retry_after: Option<Duration>,
        error: String,
        outcomes: &mut Vec<Settlement>,
    ) {
        let attempts = next_attempt_number(carried.iter().map(|&i| &wire[i]));
        // Retry-After counts from the answer.
        let at = self.config.retry.next_attempt(
            Timestamp::now(),
            attempts,
            retry_after,
            &mut self.jitter,
        );
        trace::warning!(
            events = carried.len(),
            attempt = attempts,
            retry_at = %at.to_rfc3339(),
            retry_after_secs = retry_after.map(|d| d.as_secs_f64()),
            reason = %error,
            "channel failure: backing off"
        );
        for i in carried {
            outcomes.push(wire[i].settlement(Outcome::Retry {
                at,
                error: error.clone(),
            }));
        }
        self.status.last_error = Some(error);
        self.status.next_attempt = Some(at);
    }

    /// Send one push and, at the same time, settle `settle` (outcomes of
    /// earlier pushes of this group) and, with `prefetch_after`, claim (in
    /// the same store call) and serialize one more push's worth of events
    /// past it into `self.ahead` (`prefetch_after` then moves past them, or
    /// becomes `None` when no more are pending). Only a settle failure is an
    /// `Err`; a failed prefetch only means the next step claims itself.
    async fn send_range(
        &mut self,
        wire: &[Wire],
        range: Range<usize>,
        settle: Vec<Settlement>,
        prefetch_after: &mut Option<i64>,
    ) -> Result<Verdict> {
        let ahead_len = self.ahead.as_ref().map_or(0, |g| g.wire.len());
        let ahead_cap = self.config.max_events.saturating_mul(AHEAD_PUSHES);
        let prefetch = prefetch_after.take().filter(|_| ahead_len < ahead_cap);
        let part = &wire[range];
        self.status.in_flight = part.len();
        self.publish();
        let (store, config) = (&self.store, &self.config);
        let sent = RequestSent::new();
        let local = async {
            // Only once the request is on its way: on a busy machine this
            // work must fill the time the push spends at the server, not
            // hold up the push (see `RequestSent`).
            sent.wait().await;
            let now = Timestamp::now();
            let Some(after) = prefetch else {
                if !settle.is_empty() {
                    store.settle(settle, now).await?;
                }
                return Ok(None);
            };
            let request = claim_request(config, now, Some(after));
            // One store transaction where the store can (obligation 10): an
            // outer `Err` recorded nothing, so the events stay pending.
            let claimed = store.settle_and_claim(settle, now, request.clone()).await?;
            Ok(match claimed {
                Ok(Claim::Batch(events)) => Some(Group::prepare(events, &request, config)),
                // Nothing more, not due, or a failure: the next step's own
                // claim finds out again and reports it.
                Ok(_) | Err(_) => None,
            })
        };
        let refresh = &mut self.refresh_credentials;
        let (transport, prefix) = (&self.transport, &self.body_prefix);
        let sending = async {
            let body = || push_body(prefix, part);
            let answer = send_with_auth(transport, body, part.len(), refresh, &sent).await;
            // A transport that never said: the local work goes now.
            sent.notify();
            answer
        };
        let (answer, local) = join(sending, local).await;
        self.status.in_flight = 0;
        match local {
            Ok(Some(piece)) => {
                *prefetch_after = piece.full.then_some(piece.last_seq);
                match &mut self.ahead {
                    Some(ahead) => ahead.append(piece),
                    None => self.ahead = Some(piece),
                }
            }
            Ok(None) => {}
            Err(e) => {
                self.store_failed("settle", &e);
                return Err(e);
            }
        }
        Ok(match answer {
            Ok(response) => classify(response),
            Err(e) => network_failure(&e),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::pin::pin;
    use std::sync::{Arc, Mutex};
    use std::task::{Context, Poll, Waker};

    use super::*;
    use crate::event::{EventId, EventStatus, NewEvent};
    use crate::policy::RetryPolicy;
    use crate::protocol::EventResult;
    use crate::testing::{Fault, MemoryServer, MemoryStore};

    /// The test doubles never wait, so a no-op waker runs them to completion.
    fn block_on<F: Future>(f: F) -> F::Output {
        let mut f = pin!(f);
        let mut cx = Context::from_waker(Waker::noop());
        loop {
            if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
                return v;
            }
        }
    }

    fn setup(n: usize) -> (Relay<MemoryStore, MemoryServer>, MemoryStore, MemoryServer) {
        let store = MemoryStore::new();
        let server = MemoryServer::new();
        let events = (0..n)
            .map(|i| NewEvent::json("OrderCreated", &i).unwrap())
            .collect();
        block_on(store.enqueue(events)).unwrap();
        let config = RelayConfig::new()
            .with_max_events(10)
            .with_retry(RetryPolicy::new().with_base(Duration::from_secs(1)));
        let relay =
            Relay::new(store.clone(), server.clone(), config).with_jitter(Jitter::seeded(3));
        (relay, store, server)
    }

    fn seqs(server: &MemoryServer) -> Vec<i64> {
        server.stored().iter().map(|s| s.2).collect()
    }

    /// The seqs of the group claimed ahead.
    fn ahead_seqs(relay: &Relay<MemoryStore, MemoryServer>) -> Vec<i64> {
        relay
            .ahead
            .iter()
            .flat_map(|g| g.wire.iter().map(|w| w.seq))
            .collect()
    }

    fn count(store: &MemoryStore, status: EventStatus) -> usize {
        store.all().iter().filter(|e| e.status == status).count()
    }

    /// Make every pending event due now (skip the backoff without sleeping).
    fn make_due(store: &MemoryStore) {
        let now = Timestamp::now().sub(Duration::from_millis(1));
        let retry = Outcome::Retry {
            at: now,
            error: "test".into(),
        };
        let settlements = store
            .all()
            .iter()
            .map(|e| Settlement::new(e, retry.clone()))
            .collect();
        block_on(store.settle(settlements, now)).unwrap();
    }

    #[test]
    fn flush_delivers_everything_in_order_in_batches() {
        let (mut relay, _store, server) = setup(35);
        let report = block_on(relay.flush()).unwrap();
        assert_eq!((report.sent, report.dead, report.pending), (35, 0, 0));
        assert_eq!(seqs(&server), (1..=35).collect::<Vec<_>>());
        assert_eq!(
            server.requests().iter().map(|r| r.0).collect::<Vec<_>>(),
            [10, 10, 10, 5]
        );
        assert_eq!(relay.status().sent, 35);
        assert_eq!(relay.status().pending, 0);
        assert_eq!(block_on(relay.flush()).unwrap(), FlushReport::default());
    }

    #[test]
    fn results_are_matched_by_id_whatever_their_order() {
        let wire: Vec<Wire> = (1..=3)
            .map(|seq| Wire {
                seq,
                id: EventId::new(),
                size: 0,
                attempts: 0,
                json: Vec::new(),
            })
            .collect();
        let result = |w: &Wire, status| EventResult {
            id: w.id,
            status,
            reason: None,
        };
        let statuses = |results| -> Vec<Option<ResultStatus>> {
            match_results(&wire, results)
                .into_iter()
                .map(|r| r.map(|(status, _)| status))
                .collect()
        };
        // In request order (the usual case).
        let in_order = vec![
            result(&wire[0], ResultStatus::Accepted),
            result(&wire[1], ResultStatus::Duplicate),
            result(&wire[2], ResultStatus::Rejected),
        ];
        assert_eq!(
            statuses(in_order),
            [
                Some(ResultStatus::Accepted),
                Some(ResultStatus::Duplicate),
                Some(ResultStatus::Rejected)
            ]
        );
        // Shuffled, one missing, one the request never had.
        let shuffled = vec![
            result(&wire[2], ResultStatus::Rejected),
            EventResult {
                id: EventId::new(),
                status: ResultStatus::Accepted,
                reason: None,
            },
            result(&wire[0], ResultStatus::Accepted),
        ];
        assert_eq!(
            statuses(shuffled),
            [
                Some(ResultStatus::Accepted),
                None,
                Some(ResultStatus::Rejected)
            ]
        );
    }

    #[test]
    fn body_is_a_valid_push_request() {
        let (relay, store, _) = setup(3);
        let request = claim_request(relay.config(), Timestamp::now(), None);
        let group = Group::prepare(store.all(), &request, relay.config());
        let body = push_body(&relay.body_prefix, &group.wire);
        let parsed: crate::protocol::PushRequest = serde_json::from_slice(&body).unwrap();
        assert_eq!(parsed.protocol, PROTOCOL_VERSION);
        assert_eq!(parsed.client_id, store.client_id());
        assert_eq!(parsed.events.len(), 3);
    }

    #[test]
    fn network_error_backs_off_and_keeps_events_pending() {
        let (mut relay, store, server) = setup(5);
        server.push_fault(Fault::Network);
        let before = Timestamp::now();
        let report = block_on(relay.flush()).unwrap();
        assert_eq!((report.sent, report.pending), (0, 5));
        let at = report.next_attempt.expect("a retry time");
        assert!(at >= before && at <= Timestamp::now().add(Duration::from_secs(1)));
        assert!(report.last_error.unwrap().contains("connection refused"));
        assert!(
            store
                .all()
                .iter()
                .all(|e| e.attempts == 1 && e.status == EventStatus::Pending)
        );
        make_due(&store);
        let report = block_on(relay.flush()).unwrap();
        assert_eq!(
            (report.sent, report.pending, report.last_error),
            (5, 0, None)
        );
        assert_eq!(seqs(&server), [1, 2, 3, 4, 5]);
    }

    #[test]
    fn retry_after_is_honoured() {
        let (mut relay, _store, server) = setup(2);
        for status in [503, 429, 408] {
            server.push_fault(Fault::Status {
                status,
                retry_after: Some(Duration::from_secs(60)),
                body: String::new(),
            });
            let before = Timestamp::now();
            let report = block_on(relay.flush()).unwrap();
            assert!(report.next_attempt.unwrap() >= before.add(Duration::from_secs(60)));
            assert!(report.last_error.unwrap().contains(&status.to_string()));
            make_due(&_store);
        }
    }

    #[test]
    fn server_errors_and_unreadable_bodies_are_retried_not_dead() {
        let (mut relay, store, server) = setup(4);
        server.push_fault(Fault::Status {
            status: 500,
            retry_after: None,
            body: "boom".into(),
        });
        assert_eq!(block_on(relay.flush()).unwrap().sent, 0);
        make_due(&store);
        server.push_fault(Fault::Malformed);
        let report = block_on(relay.flush()).unwrap();
        assert!(report.last_error.unwrap().contains("unreadable"));
        assert_eq!(count(&store, EventStatus::Pending), 4);
        make_due(&store);
        // The malformed answer came after a commit: the resend is all duplicates.
        let report = block_on(relay.flush()).unwrap();
        assert_eq!(report.sent, 4);
        assert_eq!(seqs(&server), [1, 2, 3, 4]);
    }

    #[test]
    fn lost_response_resend_changes_nothing() {
        let (mut relay, store, server) = setup(3);
        server.push_fault(Fault::CommitThenDrop);
        block_on(relay.flush()).unwrap();
        make_due(&store);
        assert_eq!(block_on(relay.flush()).unwrap().sent, 3);
        assert_eq!(seqs(&server), [1, 2, 3]);
    }

    #[test]
    fn auth_failure_refreshes_credentials_and_resends_at_once() {
        let (mut relay, _store, server) = setup(3);
        server.expire_credentials();
        let report = block_on(relay.flush()).unwrap();
        assert_eq!(report.sent, 3);
        assert_eq!(server.requests(), [(3, false), (3, true)]);
        // Back to cached credentials afterwards.
        block_on(_store.enqueue(vec![NewEvent::json("T", &1).unwrap()])).unwrap();
        block_on(relay.flush()).unwrap();
        assert_eq!(server.requests().last(), Some(&(1, false)));
    }

    #[test]
    fn persistent_auth_failure_is_never_dead() {
        let (mut relay, store, server) = setup(2);
        for _ in 0..2 {
            server.push_fault(Fault::Status {
                status: 403,
                retry_after: None,
                body: String::new(),
            });
        }
        let report = block_on(relay.flush()).unwrap();
        assert_eq!((report.sent, report.dead, report.pending), (0, 0, 2));
        assert!(report.last_error.unwrap().contains("403"));
        make_due(&store);
        // The next attempt asks for fresh credentials straight away.
        assert_eq!(block_on(relay.flush()).unwrap().sent, 2);
        assert_eq!(server.requests(), [(2, false), (2, true), (2, true)]);
    }

    #[test]
    fn too_large_splits_and_dead_letters_only_a_single_oversized_event() {
        let (mut relay, store, server) = setup(0);
        let mut events: Vec<_> = (0..7)
            .map(|i| NewEvent::json("Small", &i).unwrap())
            .collect();
        events.insert(3, NewEvent::json("Big", &"x".repeat(2_000)).unwrap());
        block_on(store.enqueue(events)).unwrap();
        server.max_body(1_000);
        let report = block_on(relay.flush()).unwrap();
        assert_eq!((report.sent, report.dead, report.pending), (7, 1, 0));
        let dead = block_on(store.dead_letters(10)).unwrap();
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].event_type, "Big");
        assert!(dead[0].last_error.as_ref().unwrap().contains("413"));
        assert_eq!(seqs(&server), [1, 2, 3, 5, 6, 7, 8]);
    }

    #[test]
    fn poison_event_is_isolated_by_bisection() {
        let (mut relay, store, server) = setup(0);
        let mut events: Vec<_> = (0..9)
            .map(|i| NewEvent::json("Good", &i).unwrap())
            .collect();
        events.insert(6, NewEvent::json("Poison", &0).unwrap());
        block_on(store.enqueue(events)).unwrap();
        server.poison_type("Poison");
        let report = block_on(relay.flush()).unwrap();
        assert_eq!((report.sent, report.dead, report.pending), (9, 1, 0));
        let dead = block_on(store.dead_letters(10)).unwrap();
        assert_eq!(dead[0].seq, 7);
        assert!(dead[0].last_error.as_ref().unwrap().contains("422"));
        assert_eq!(seqs(&server), [1, 2, 3, 4, 5, 6, 8, 9, 10]);
    }

    #[test]
    fn unsupported_protocol_is_retried_never_dead() {
        let (mut relay, _store, server) = setup(4);
        server.push_fault(Fault::Status {
            status: 400,
            retry_after: None,
            body: r#"{"error":"unsupported_protocol","message":"speaks 2"}"#.into(),
        });
        let report = block_on(relay.flush()).unwrap();
        assert_eq!((report.sent, report.dead, report.pending), (0, 0, 4));
        assert!(
            report
                .last_error
                .unwrap()
                .contains("does not speak protocol 1")
        );
        assert_eq!(server.requests().len(), 1, "no bisection");
    }

    #[test]
    fn rejected_events_are_dead_with_the_reason() {
        let (mut relay, store, server) = setup(2);
        block_on(store.enqueue(vec![NewEvent::json("Nope", &1).unwrap()])).unwrap();
        server.reject_type("Nope");
        let report = block_on(relay.flush()).unwrap();
        assert_eq!((report.sent, report.dead), (2, 1));
        let dead = block_on(store.dead_letters(10)).unwrap();
        assert_eq!(dead[0].last_error.as_deref(), Some("refused by type"));
    }

    #[test]
    fn unnamed_events_stay_pending_and_are_sent_next() {
        let (mut relay, store, server) = setup(25);
        server.push_fault(Fault::SkipLast);
        let report = block_on(relay.flush()).unwrap();
        // Progress was made, so the skipped event is due at once and the
        // flush goes on; the server saw it again with the next batch.
        assert_eq!((report.sent, report.pending), (25, 0));
        assert_eq!(seqs(&server), (1..=25).collect::<Vec<_>>());
        let skipped = &store.all()[9];
        assert_eq!(skipped.attempts, 2);
    }

    #[test]
    fn expired_events_are_dead_and_not_sent() {
        let (mut relay, store, server) = setup(0);
        let old = Timestamp::now().sub(Duration::from_secs(3600));
        store.enqueue_at(NewEvent::json("Old", &1).unwrap(), old);
        block_on(store.enqueue(vec![NewEvent::json("New", &2).unwrap()])).unwrap();
        relay.config.retry = RetryPolicy::new().with_max_age(Some(Duration::from_secs(60)));
        let report = block_on(relay.flush()).unwrap();
        assert_eq!((report.sent, report.dead), (1, 1));
        assert_eq!(
            block_on(store.dead_letters(1)).unwrap()[0]
                .last_error
                .as_deref(),
            Some(EXPIRED)
        );
        assert_eq!(seqs(&server), [2]);
    }

    #[test]
    fn store_failures_lose_nothing() {
        let (mut relay, store, server) = setup(3);
        store.fail_next_claims(1);
        assert!(block_on(relay.flush()).is_err());
        store.fail_next_settles(1);
        assert!(block_on(relay.flush()).is_err());
        assert!(
            relay
                .status()
                .last_error
                .as_ref()
                .unwrap()
                .contains("settle")
        );
        assert_eq!(count(&store, EventStatus::Pending), 3);
        let report = block_on(relay.flush()).unwrap();
        assert_eq!(report.sent, 3);
        assert_eq!(seqs(&server), [1, 2, 3]);
    }

    #[test]
    fn a_settle_failure_while_pipelining_loses_nothing() {
        let (mut relay, store, server) = setup(35);
        // The first settle runs while the second push is on the wire.
        store.fail_next_settles(1);
        assert!(block_on(relay.flush()).is_err());
        assert_eq!(server.requests().len(), 2);
        assert_eq!(count(&store, EventStatus::Pending), 35);
        let report = block_on(relay.flush()).unwrap();
        assert_eq!((report.sent, report.pending), (35, 0));
        // The resent events were duplicates: each stored once, in order.
        assert_eq!(seqs(&server), (1..=35).collect::<Vec<_>>());
    }

    #[test]
    fn outcomes_carried_to_the_next_group_are_not_lost_when_their_settle_fails() {
        let (mut relay, store, server) = setup(100);
        // A group whose successor is ahead leaves its last push's outcomes
        // to be settled beside the next push.
        block_on(relay.step_carrying()).unwrap();
        assert_eq!(relay.carried.len(), 10);
        assert_eq!(count(&store, EventStatus::Sent), 0);
        store.fail_next_settles(1);
        assert!(block_on(relay.flush()).is_err());
        assert_eq!(count(&store, EventStatus::Pending), 100);
        let report = block_on(relay.flush()).unwrap();
        assert_eq!((report.sent, report.pending), (100, 0));
        assert_eq!(seqs(&server), (1..=100).collect::<Vec<_>>());
    }

    #[test]
    fn a_failed_settle_and_claim_loses_nothing() {
        let (mut relay, store, server) = setup(100);
        block_on(relay.step_carrying()).unwrap();
        assert_eq!(relay.carried.len(), 10);
        // The next push carries the first group's last outcomes into the
        // store call that also claims ahead; it fails as a whole (as an
        // aborted IndexedDB transaction): nothing of it is recorded.
        let calls = store.settle_and_claims();
        store.fail_next_settle_and_claims(1);
        assert!(block_on(relay.flush()).is_err());
        assert_eq!(store.settle_and_claims(), calls + 1);
        assert!(
            relay
                .status()
                .last_error
                .as_ref()
                .unwrap()
                .contains("settle")
        );
        assert!(relay.ahead.is_none());
        assert_eq!(count(&store, EventStatus::Sent), 0);
        assert_eq!(count(&store, EventStatus::Pending), 100);
        let report = block_on(relay.flush()).unwrap();
        assert_eq!((report.sent, report.pending), (100, 0));
        // Resent events were duplicates: each stored once, in order.
        assert_eq!(seqs(&server), (1..=100).collect::<Vec<_>>());
        assert!(store.all().iter().all(|e| e.attempts == 1));
    }

    #[test]
    fn a_failed_claim_after_its_settle_keeps_the_settle_and_resends_nothing() {
        let (mut relay, store, server) = setup(100);
        block_on(relay.step_carrying()).unwrap();
        // The default settle_and_claim settles, then claims: the claim fails,
        // the settle stays; the relay claims for itself later.
        store.fail_next_claims(1);
        let report = block_on(relay.flush()).unwrap();
        // The 10 carried over were counted by the first step.
        assert_eq!((report.sent, report.pending), (90, 0));
        assert_eq!(count(&store, EventStatus::Sent), 100);
        assert_eq!(seqs(&server), (1..=100).collect::<Vec<_>>());
        assert_eq!(server.requests().len(), 10, "no push was sent twice");
        assert!(store.all().iter().all(|e| e.attempts == 1));
    }

    #[test]
    fn while_a_push_is_out_the_last_answer_is_settled_in_the_claim_ahead() {
        let (mut relay, store, server) = setup(100);
        block_on(relay.flush()).unwrap();
        assert_eq!(server.requests().len(), 10);
        // 10 per claim and per push. The first claim, then each push claims
        // the next push's worth ahead (the last finds nothing past 100), then
        // the last (empty) claim: every claim is a settle_and_claim that also
        // settles the answers known by then, so no store transaction of its
        // own sits between two pushes.
        assert_eq!(store.claims(), 12);
        assert_eq!(store.settle_and_claims(), 12);
        assert_eq!(count(&store, EventStatus::Sent), 100);
    }

    #[test]
    fn outcomes_carried_past_a_stale_group_ahead_are_settled_before_its_claim() {
        let (mut relay, store, server) = setup(100);
        block_on(relay.step_carrying()).unwrap();
        assert_eq!(relay.carried.len(), 10);
        // The group ahead goes stale (its lease may have run out): the next
        // step claims again, and the claim must not take the 10 events whose
        // answers are carried, or they are pushed twice.
        relay.config.lease = Duration::ZERO;
        block_on(relay.step_carrying()).unwrap();
        // The 10 carried were settled in the claim; this push's 10 are
        // carried in turn (its successor was claimed ahead).
        assert_eq!(count(&store, EventStatus::Sent), 10);
        assert_eq!(relay.carried.len(), 10);
        relay.config.lease = DEFAULT_LEASE;
        block_on(relay.flush()).unwrap();
        let pushed: usize = server.requests().iter().map(|r| r.0).sum();
        assert_eq!(pushed, 100, "no event was pushed twice");
        assert_eq!(seqs(&server), (1..=100).collect::<Vec<_>>());
    }

    #[test]
    fn a_failed_settle_with_the_next_claim_loses_nothing() {
        let (mut relay, store, server) = setup(100);
        block_on(relay.step_carrying()).unwrap();
        relay.config.lease = Duration::ZERO;
        store.fail_next_settle_and_claims(1);
        assert!(block_on(relay.step_carrying()).is_err());
        assert!(
            relay
                .status()
                .last_error
                .as_ref()
                .unwrap()
                .contains("settle")
        );
        assert_eq!(count(&store, EventStatus::Pending), 100);
        relay.config.lease = DEFAULT_LEASE;
        let report = block_on(relay.flush()).unwrap();
        assert_eq!((report.sent, report.pending), (100, 0));
        assert_eq!(seqs(&server), (1..=100).collect::<Vec<_>>());
    }

    #[test]
    fn a_claim_takes_one_push_worth_and_the_next_comes_while_it_is_out() {
        let (mut relay, store, server) = setup(35);
        block_on(relay.flush()).unwrap();
        // 35 events, 10 per push: the first push leaves once its own 10 are
        // read; each full claim brings the next push's worth while its push
        // is out (3), and the last claim finds nothing.
        let sizes: Vec<usize> = server.requests().iter().map(|r| r.0).collect();
        assert_eq!(sizes, [10, 10, 10, 5]);
        assert_eq!(store.claims(), 5);
        assert_eq!(seqs(&server), (1..=35).collect::<Vec<_>>());
        assert!(store.all().iter().all(|e| e.attempts == 1));
    }

    #[test]
    fn a_full_claim_brings_the_next_group_while_its_pushes_are_out() {
        let (mut relay, store, server) = setup(100);
        // 10 events per claim and per push: the first claim is full, so its
        // push brings the next push's worth (claimed and serialized while
        // the push is on the wire).
        let step = block_on(relay.step()).unwrap();
        assert!(matches!(step, Step::Batch { sent: 10, .. }), "{step:?}");
        assert_eq!(ahead_seqs(&relay), (11..=20).collect::<Vec<_>>());
        assert_eq!(store.claims(), 2);
        // A step leaves nothing unsettled behind it (only a flush carries a
        // group's last outcomes over to the next group's first push).
        assert_eq!(count(&store, EventStatus::Sent), 10);
        // The next steps push them without a claim first, each bringing the
        // next push's worth.
        for first in (11..=81).step_by(10) {
            block_on(relay.step()).unwrap();
            assert_eq!(
                ahead_seqs(&relay),
                (first + 10..=first + 19).collect::<Vec<_>>()
            );
        }
        assert!(matches!(
            block_on(relay.step()).unwrap(),
            Step::Batch { sent: 10, .. }
        ));
        assert!(relay.ahead.is_none());
        assert_eq!(block_on(relay.step()).unwrap(), Step::Idle);
        assert_eq!(store.claims(), 12);
        assert_eq!(seqs(&server), (1..=100).collect::<Vec<_>>());
        assert!(store.all().iter().all(|e| e.attempts == 1));
    }

    #[test]
    fn what_is_claimed_ahead_stays_bounded_when_pushes_are_smaller_than_claims() {
        let (mut relay, store, server) = setup(100);
        // Pushes of one event (a 413 for two), claims of 10: each of the
        // first group's 10 pushes would bring 10 more ahead.
        relay.window.too_large(2);
        let step = block_on(relay.step()).unwrap();
        assert!(matches!(step, Step::Batch { sent: 10, .. }), "{step:?}");
        assert_eq!(server.requests().len(), 10);
        let ahead = (11..=10 + 10 * AHEAD_PUSHES as i64).collect::<Vec<_>>();
        assert_eq!(ahead_seqs(&relay), ahead);
        block_on(relay.flush()).unwrap();
        assert_eq!(seqs(&server), (1..=100).collect::<Vec<_>>());
        assert!(store.all().iter().all(|e| e.attempts == 1));
    }

    #[test]
    fn a_claim_that_is_not_full_brings_nothing_ahead() {
        // A trickle of commits costs one claim per batch, not two.
        let (mut relay, store, _server) = setup(5);
        block_on(relay.step()).unwrap();
        assert!(relay.ahead.is_none());
        assert_eq!(store.claims(), 1);
    }

    #[test]
    fn a_failure_after_the_next_group_was_claimed_keeps_the_order() {
        let (mut relay, store, server) = setup(100);
        // The first push goes through (the next group is claimed meanwhile),
        // the second fails: the group claimed ahead must not overtake it.
        server.push_fault(Fault::None);
        server.push_fault(Fault::Network);
        let report = block_on(relay.flush()).unwrap();
        assert_eq!((report.sent, report.pending), (10, 90));
        assert!(relay.ahead.is_none());
        make_due(&store);
        assert_eq!(block_on(relay.flush()).unwrap().sent, 90);
        assert_eq!(seqs(&server), (1..=100).collect::<Vec<_>>());
    }

    #[test]
    fn an_event_left_pending_is_not_overtaken_by_the_group_claimed_ahead() {
        let (mut relay, _store, server) = setup(100);
        // The server skips event 10 in the first push: it stays pending and
        // goes first in the next push, before anything claimed ahead.
        server.push_fault(Fault::SkipLast);
        let report = block_on(relay.flush()).unwrap();
        assert_eq!((report.sent, report.pending), (100, 0));
        assert_eq!(seqs(&server), (1..=100).collect::<Vec<_>>());
    }

    #[test]
    fn a_claim_stops_pushing_at_half_its_lease() {
        let (mut relay, store, server) = setup(35);
        // Pushes narrowed below the claim size (after a 413), so a claim
        // takes several pushes; a zero lease: every push after a claim's
        // first waits for a new claim, which renews the lease.
        relay.window.too_large(10);
        relay.config.lease = Duration::ZERO;
        let report = block_on(relay.flush()).unwrap();
        assert_eq!((report.sent, report.pending), (35, 0));
        let sizes: Vec<usize> = server.requests().iter().map(|r| r.0).collect();
        // Each claim's first push only (the window widens to 9, below the
        // size that was too large): the rest waits for the next claim.
        assert_eq!(sizes, [5, 9, 9, 9, 3]);
        // A claim before each push, one ahead beside each full one (dropped:
        // events of its group stayed behind), and the last, empty one.
        assert_eq!(store.claims(), 5 + 4 + 1);
        assert_eq!(seqs(&server), (1..=35).collect::<Vec<_>>());
        // Events claimed but left for the next claim were not attempted.
        assert!(store.all().iter().all(|e| e.attempts == 1));
    }

    #[test]
    fn a_second_relay_waits_for_the_lease() {
        let (mut a, store, server) = setup(3);
        let mut b = Relay::new(store.clone(), server.clone(), RelayConfig::new());
        store.fail_next_settles(1);
        // `a` claims (takes the lease) and crashes before settling.
        assert!(block_on(a.flush()).is_err());
        let report = block_on(b.flush()).unwrap();
        assert!(report.lease_held_until.is_some());
        assert_eq!(report.sent, 0);
        block_on(a.release_lease()).unwrap();
        assert_eq!(block_on(b.flush()).unwrap().sent, 3);
        assert_eq!(seqs(&server), [1, 2, 3]);
    }

    /// A proxy's or WAF's 400 page, for every push.
    fn proxy_400() -> Fault {
        Fault::Status {
            status: 400,
            retry_after: None,
            body: "<html><body>400 Request Header Or Cookie Too Large</body></html>".into(),
        }
    }

    #[test]
    fn a_400_without_the_protocol_error_body_is_the_channel_and_dead_letters_nothing() {
        let (mut relay, store, server) = setup(250);
        server.fail_always(Some(proxy_400()));
        let report = block_on(relay.flush()).unwrap();
        assert_eq!((report.sent, report.dead, report.pending), (0, 0, 250));
        let error = report
            .last_error
            .expect("the flush report names the failure");
        assert!(error.contains("no protocol error body"), "{error}");
        assert!(report.next_attempt.is_some(), "backs off");
        assert_eq!(
            server.requests().len(),
            1,
            "no bisection of a channel failure"
        );
        assert_eq!(relay.status().last_error.as_deref(), Some(error.as_str()));
        // Only the pushed events count an attempt.
        assert_eq!(
            store.all().iter().filter(|e| e.attempts == 1).count(),
            10,
            "one push of 10 carried events"
        );
        server.fail_always(None);
        make_due(&store);
        assert_eq!(block_on(relay.flush()).unwrap().sent, 250);
        assert_eq!(seqs(&server), (1..=250).collect::<Vec<_>>());
    }

    #[test]
    fn a_content_400_that_every_split_gets_alike_is_the_channel_too() {
        // A gateway that answers with our own error body, to every push.
        let (mut relay, store, server) = setup(250);
        server.fail_always(Some(Fault::Status {
            status: 400,
            retry_after: None,
            body: r#"{"error":"invalid_request","message":"header too large"}"#.into(),
        }));
        let report = block_on(relay.flush()).unwrap();
        assert_eq!((report.sent, report.dead, report.pending), (0, 0, 250));
        assert!(report.last_error.unwrap().contains("refused alike"));
        // Bisection down to MAX_SUSPECTS lone events, not one request per event.
        let requests = server.requests().len();
        assert!(requests <= 12, "{requests} requests");
        assert_eq!(count(&store, EventStatus::Dead), 0);
        server.fail_always(None);
        make_due(&store);
        assert_eq!(block_on(relay.flush()).unwrap().sent, 250);
        assert_eq!(seqs(&server), (1..=250).collect::<Vec<_>>());
    }

    #[test]
    fn a_poison_event_at_the_tail_goes_dead_alone_and_the_flush_is_not_a_failure() {
        let (mut relay, store, server) = setup(0);
        let mut events: Vec<_> = (0..9)
            .map(|i| NewEvent::json("Good", &i).unwrap())
            .collect();
        events.push(NewEvent::json("Poison", &0).unwrap());
        block_on(store.enqueue(events)).unwrap();
        server.poison_type("Poison");
        let report = block_on(relay.flush()).unwrap();
        assert_eq!((report.sent, report.dead, report.pending), (9, 1, 0));
        assert_eq!(report.last_error, None);
        assert_eq!(report.next_attempt, None);
        assert_eq!(block_on(store.dead_letters(10)).unwrap()[0].seq, 10);
    }

    #[test]
    fn a_poison_event_at_the_head_is_convicted_by_its_neighbours_passing() {
        let (mut relay, store, server) = setup(0);
        let mut events: Vec<_> = (0..9)
            .map(|i| NewEvent::json("Good", &i).unwrap())
            .collect();
        events.insert(0, NewEvent::json("Poison", &0).unwrap());
        block_on(store.enqueue(events)).unwrap();
        server.poison_type("Poison");
        let report = block_on(relay.flush()).unwrap();
        assert_eq!((report.sent, report.dead, report.pending), (9, 1, 0));
        assert_eq!(block_on(store.dead_letters(10)).unwrap()[0].seq, 1);
        assert_eq!(seqs(&server), (2..=10).collect::<Vec<_>>());
    }

    #[test]
    fn a_lone_too_large_event_with_nothing_else_passing_stays_pending() {
        // A proxy refusing every body as too large looks like this too.
        let (mut relay, store, server) = setup(3);
        server.max_body(10);
        let report = block_on(relay.flush()).unwrap();
        assert_eq!((report.dead, report.pending), (0, 3));
        assert!(report.last_error.unwrap().contains("413"));
        assert_eq!(count(&store, EventStatus::Dead), 0);
    }

    #[test]
    fn retry_after_is_honoured_up_to_the_cap() {
        let (mut relay, store, server) = setup(2);
        server.push_fault(Fault::Status {
            status: 503,
            retry_after: Some(Duration::from_secs(315_360_000)),
            body: String::new(),
        });
        let report = block_on(relay.flush()).unwrap();
        let cap = relay.config().retry.cap();
        let at = report.next_attempt.unwrap();
        assert!(at <= Timestamp::now().add(cap), "{at:?}");
        assert!(store.all().iter().all(|e| e.next_attempt_at <= at));
    }

    #[test]
    fn a_stored_retry_time_beyond_the_cap_is_not_believed() {
        // Written under a clock a day ahead, or by a version without a ceiling.
        let (mut relay, store, server) = setup(3);
        let far = Timestamp::now().add(Duration::from_secs(86_400));
        let settlements = store
            .all()
            .iter()
            .map(|e| {
                Settlement::new(
                    e,
                    Outcome::Retry {
                        at: far,
                        error: "old".into(),
                    },
                )
            })
            .collect();
        block_on(store.settle(settlements, Timestamp::now())).unwrap();
        assert_eq!(block_on(relay.flush()).unwrap().sent, 3);
        assert_eq!(seqs(&server), [1, 2, 3]);
    }

    #[test]
    fn retry_now_sends_events_waiting_for_a_retry_time() {
        let (mut relay, _store, server) = setup(4);
        server.push_fault(Fault::Status {
            status: 503,
            retry_after: Some(Duration::from_secs(120)),
            body: String::new(),
        });
        let report = block_on(relay.flush()).unwrap();
        assert_eq!(report.pending, 4);
        assert!(matches!(
            block_on(relay.step()).unwrap(),
            Step::NotBefore(_)
        ));
        assert_eq!(block_on(relay.retry_now()).unwrap(), 4);
        assert_eq!(relay.status().next_attempt, None);
        assert_eq!(block_on(relay.flush()).unwrap().sent, 4);
        assert_eq!(seqs(&server), [1, 2, 3, 4]);
    }

    #[test]
    fn a_retried_expired_dead_letter_is_sent() {
        let (mut relay, store, server) = setup(0);
        let old = Timestamp::now().sub(Duration::from_secs(3600));
        let event = store.enqueue_at(NewEvent::json("Old", &1).unwrap(), old);
        relay.config.retry = RetryPolicy::new().with_max_age(Some(Duration::from_secs(60)));
        assert_eq!(block_on(relay.flush()).unwrap().dead, 1);
        assert!(block_on(store.retry(event.id, Timestamp::now())).unwrap());
        let report = block_on(relay.flush()).unwrap();
        assert_eq!((report.sent, report.dead), (1, 0));
        assert_eq!(seqs(&server), [1]);
    }

    #[test]
    fn a_clock_that_was_wrong_at_commit_expires_nothing() {
        let (mut relay, store, server) = setup(0);
        relay.config.retry = RetryPolicy::new().with_max_age(Some(Duration::from_secs(7 * 86_400)));
        let now = Timestamp::now();
        // A clock reset to 2000-01-01 (a dead RTC battery), later corrected.
        let y2000 = Timestamp::from_millis(946_684_800_000);
        store.enqueue_at(NewEvent::json("Reset", &1).unwrap(), y2000);
        // A clock set back 30 days between two commits, later corrected:
        // the second cannot be older than the first.
        store.enqueue_at(NewEvent::json("Right", &2).unwrap(), now);
        store.enqueue_at(
            NewEvent::json("SetBack", &3).unwrap(),
            now.sub(Duration::from_secs(30 * 86_400)),
        );
        let report = block_on(relay.flush()).unwrap();
        assert_eq!((report.sent, report.dead), (3, 0));
        assert_eq!(seqs(&server), [1, 2, 3]);
    }

    #[test]
    fn attempts_count_only_pushes_that_carried_the_event() {
        let (mut relay, store, server) = setup(100);
        server.push_fault(Fault::None);
        server.push_fault(Fault::Network);
        block_on(relay.flush()).unwrap();
        let attempts: Vec<u32> = store.all().iter().map(|e| e.attempts).collect();
        // Push 1 (sent) and push 2 (failed) carried 10 each; the other 80
        // (claimed ahead, or after the failure) were never pushed.
        assert!(attempts[..20].iter().all(|&a| a == 1), "{attempts:?}");
        assert!(attempts[20..].iter().all(|&a| a == 0), "{attempts:?}");
        // The backoff is the policy's first: within base (1 s).
        let at = relay.status().next_attempt.unwrap();
        assert!(at <= Timestamp::now().add(Duration::from_secs(1)));
    }

    #[test]
    fn a_backend_failing_on_one_event_narrows_pushes_until_the_ones_before_it_pass() {
        let (mut relay, store, server) = setup(0);
        let mut events: Vec<_> = (0..30)
            .map(|i| NewEvent::json("Good", &i).unwrap())
            .collect();
        events.insert(17, NewEvent::json("Unappliable", &0).unwrap());
        block_on(store.enqueue(events)).unwrap();
        server.fail_type("Unappliable", 500);
        for _ in 0..20 {
            block_on(relay.flush()).unwrap();
            make_due(&store);
        }
        // Everything before it is delivered, in order; it and what follows
        // wait (order), nothing is dead.
        assert_eq!(seqs(&server), (1..=17).collect::<Vec<_>>());
        assert_eq!(count(&store, EventStatus::Dead), 0);
        assert_eq!(count(&store, EventStatus::Pending), 14);
        assert_eq!(relay.window.limit(), 1);
        let last = server.requests().last().copied().unwrap();
        assert_eq!(last.0, 1, "the failing event is pushed alone");
    }

    #[test]
    fn pushes_widen_again_within_the_group_that_follows_an_outage() {
        let (mut relay, _store, server) = setup(40);
        // An outage narrowed the window down to single events (a single
        // event failing too: the size was not the cause).
        while relay.window.limit() > 1 {
            let events = relay.window.limit();
            relay.window.failed(events, true);
        }
        relay.window.failed(1, true);
        block_on(relay.flush()).unwrap();
        // Each push is cut when it goes, at the window of that moment:
        // 1, 2, 4, then the 3 left of the first claim, then 10 per push
        // (the configured most) for the 30 claimed ahead meanwhile.
        let sizes: Vec<usize> = server.requests().iter().map(|r| r.0).collect();
        assert_eq!(sizes, [1, 2, 4, 3, 10, 10, 10]);
        assert_eq!(seqs(&server), (1..=40).collect::<Vec<_>>());
    }

    #[test]
    fn observer_sees_status_changes() {
        let (mut relay, _store, server) = setup(3);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        relay.set_observer(move |s: &RelayStatus| sink.lock().unwrap().push(s.clone()));
        server.push_fault(Fault::Network);
        block_on(relay.flush()).unwrap();
        let seen = seen.lock().unwrap();
        assert!(seen.iter().any(|s| s.in_flight == 3));
        let last = seen.last().unwrap();
        assert_eq!((last.pending, last.in_flight), (3, 0));
        assert!(last.last_error.is_some() && last.next_attempt.is_some());
    }
}
