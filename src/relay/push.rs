//! The pipelined push: claimed events serialized once ([`Wire`]), grouped
//! ([`Group`]), cut into pushes, sent with credentials, matched to their
//! results; and the evidence gathered while bisecting a refused push
//! ([`Trial`]).

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::ops::Range;
use std::pin::pin;
use std::task::Poll;

use super::config::{EXPIRED, RelayConfig};
use crate::error::Result;
use crate::event::{Event, EventId};
use crate::protocol::{EventResult, ResultStatus, write_wire_event};
use crate::store::{ClaimRequest, Outcome, Settlement};
use crate::time::Timestamp;
use crate::trace;
use crate::transport::{Push, RequestSent, Response, Transport};

/// One claimed event, serialized for the wire.
pub(crate) struct Wire {
    pub(crate) seq: i64,
    pub(crate) id: EventId,
    /// [`Event::size`], for the per-push byte limit.
    pub(crate) size: usize,
    /// Pushes that carried it before this one (the backoff grows with them).
    pub(crate) attempts: u32,
    /// Its push JSON, written once; sub-batches (413, 400) are re-joined from it.
    pub(crate) json: Vec<u8>,
}

impl Wire {
    pub(super) fn settlement(&self, outcome: Outcome) -> Settlement {
        Settlement {
            seq: self.seq,
            id: self.id,
            outcome,
        }
    }
}

/// A claimed group of events, ready to push.
pub(super) struct Group {
    /// When it was claimed (its first part, when claimed in parts): the
    /// lease was renewed then.
    pub(super) claimed_at: Timestamp,
    /// The events to send, in seq order (expired ones are not among them).
    pub(super) wire: Vec<Wire>,
    /// Outcomes known before sending (expired events).
    pub(super) outcomes: Vec<Settlement>,
    /// The highest seq claimed: the next group starts after it.
    pub(super) last_seq: i64,
    /// The (last) claim hit its count limit, or came close to its byte
    /// budget: more events are probably pending.
    pub(super) full: bool,
}

impl Group {
    /// Serialize the events `request` claimed (expired ones become outcomes).
    pub(super) fn prepare(
        events: Vec<Event>,
        request: &ClaimRequest<'_>,
        config: &RelayConfig,
    ) -> Group {
        let claimed_at = request.now;
        let last_seq = events.last().map_or(0, |e| e.seq);
        let mut wire = Vec::with_capacity(events.len());
        let mut outcomes = Vec::new();
        let mut bytes = 0;
        // An event was committed no earlier than any event before it in seq
        // order: a created_at below that was written by a clock set back,
        // and is not believed (see `RetryPolicy::is_expired`).
        let mut committed_after = Timestamp::from_millis(i64::MIN);
        for event in &events {
            bytes += event.size();
            committed_after = committed_after.max(event.created_at);
            if config
                .retry
                .is_expired(event.age_base().max(committed_after), claimed_at)
            {
                outcomes.push(Settlement::new(
                    event,
                    Outcome::Dead {
                        reason: EXPIRED.to_owned(),
                    },
                ));
                continue;
            }
            let mut json = Vec::with_capacity(event.payload.len() + 160);
            write_wire_event(&mut json, event);
            wire.push(Wire {
                seq: event.seq,
                id: event.id,
                size: event.size(),
                attempts: event.attempts,
                json,
            });
        }
        Group {
            claimed_at,
            wire,
            outcomes,
            last_seq,
            full: events.len() >= request.max_events || bytes >= request.max_bytes / 2,
        }
    }

    /// Add the next part of a group claimed in parts (`next` follows `self`).
    pub(super) fn append(&mut self, next: Group) {
        self.wire.extend(next.wire);
        self.outcomes.extend(next.outcomes);
        self.last_seq = next.last_seq;
        self.full = next.full;
    }
}

/// Most pushes' worth of events (`max_events` each) held claimed ahead. The
/// relay claims one push's worth beside each push and a group usually goes
/// in one push, so the group ahead holds one; when pushes come out smaller
/// than claims (a batch split after a `413`, a window narrowed by failures),
/// a group takes several pushes and brings one push's worth ahead at each:
/// this bounds what is held in memory.
pub(super) const AHEAD_PUSHES: usize = 4;

/// A claim of one push's worth for `config`'s owner. The first push of a
/// flush leaves as soon as its own events are read and serialized; the
/// following ones are claimed while the one before is on the wire.
pub(super) fn claim_request(
    config: &RelayConfig,
    now: Timestamp,
    after: Option<i64>,
) -> ClaimRequest<'_> {
    ClaimRequest {
        owner: &config.owner,
        lease: config.lease,
        max_events: config.max_events,
        max_bytes: config.max_bytes,
        now,
        after,
        max_wait: config.retry.cap(),
    }
}

/// The push body for `wire`: `prefix` (`{"protocol":1,"client_id":"…","events":[`),
/// the events' JSON joined by commas, and `]}`.
pub(super) fn push_body(prefix: &[u8], wire: &[Wire]) -> Vec<u8> {
    let len = prefix.len() + 2 + wire.iter().map(|w| w.json.len() + 1).sum::<usize>();
    let mut body = Vec::with_capacity(len);
    body.extend_from_slice(prefix);
    for (i, w) in wire.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(&w.json);
    }
    body.extend_from_slice(b"]}");
    body
}

/// Send a push; after a 401/403, ask for fresh credentials and resend once at
/// once (an expired token is the common case, and not worth a backoff).
/// `refresh` stays set while answers are 401/403.
pub(super) async fn send_with_auth<T: Transport>(
    transport: &T,
    body: impl Fn() -> Vec<u8>,
    events: usize,
    refresh: &mut bool,
    sent: &RequestSent,
) -> Result<Response> {
    let push = |body, refresh_credentials| Push {
        body,
        events,
        refresh_credentials,
        sent: sent.clone(),
    };
    let mut answer = transport.send(push(body(), *refresh)).await;
    if matches!(&answer, Ok(r) if is_auth(r.status)) && !*refresh {
        *refresh = true;
        // Built again rather than kept: this is rare, the copy would not be.
        answer = transport.send(push(body(), true)).await;
    }
    if let Ok(response) = &answer {
        *refresh = is_auth(response.status);
    }
    answer
}

/// Poll two futures to completion concurrently, `a` first (no runtime needed).
pub(super) async fn join<A: Future, B: Future>(a: A, b: B) -> (A::Output, B::Output) {
    let mut a = pin!(a);
    let mut b = pin!(b);
    let (mut ra, mut rb) = (None, None);
    std::future::poll_fn(move |cx| {
        if ra.is_none()
            && let Poll::Ready(v) = a.as_mut().poll(cx)
        {
            ra = Some(v);
        }
        if rb.is_none()
            && let Poll::Ready(v) = b.as_mut().poll(cx)
        {
            rb = Some(v);
        }
        if ra.is_some() && rb.is_some() {
            Poll::Ready((ra.take().expect("set"), rb.take().expect("set")))
        } else {
            Poll::Pending
        }
    })
    .await
}

/// Each event's result, in the order of `part` (`None`: not named). A server
/// usually answers in request order, so the results are first matched by
/// position; only when that fails are they looked up by id.
pub(crate) fn match_results(
    part: &[Wire],
    results: Vec<EventResult>,
) -> Vec<Option<(ResultStatus, Option<String>)>> {
    let in_order =
        results.len() == part.len() && results.iter().zip(part).all(|(r, w)| r.id == w.id);
    if in_order {
        return results
            .into_iter()
            .map(|r| Some((r.status, r.reason)))
            .collect();
    }
    let mut by_id: HashMap<EventId, (ResultStatus, Option<String>)> = results
        .into_iter()
        .map(|r| (r.id, (r.status, r.reason)))
        .collect();
    part.iter().map(|w| by_id.remove(&w.id)).collect()
}

/// Count outcomes by kind. Every outcome of a claim passes here exactly
/// once, so this is also where a dead-lettering is traced.
#[cfg_attr(web, allow(unused_variables))] // no telemetry on the web
pub(super) fn tally(outcomes: &[Settlement], counts: &mut [usize; 3]) {
    for settlement in outcomes {
        counts[match &settlement.outcome {
            Outcome::Sent => 0,
            Outcome::Dead { reason } => {
                trace::warning!(
                    seq = settlement.seq,
                    id = %settlement.id,
                    reason = %reason,
                    "dead-lettered"
                );
                1
            }
            Outcome::Retry { .. } => 2,
        }] += 1;
    }
}

/// A short name of a push's verdict, for telemetry.
#[cfg(native)]
pub(super) fn verdict_name(verdict: &crate::policy::Verdict) -> &'static str {
    use crate::policy::Verdict;
    match verdict {
        Verdict::Results(_) => "results",
        Verdict::Refused {
            too_large: true, ..
        } => "refused: too large",
        Verdict::Refused { .. } => "refused: content",
        Verdict::Channel { .. } => "channel failure",
    }
}

pub(super) fn is_auth(status: u16) -> bool {
    status == 401 || status == 403
}

/// The pushes of one group, cut as they are taken: a push holds up to the
/// [`PushWindow`](crate::policy::PushWindow)'s size *at the time it goes*
/// (so a window that widens again after a failure widens the rest of the
/// group too) and up to `max_bytes` (the first event of a push always goes,
/// however large: the server's 413 decides). Ranges put back (the halves of
/// a split, a push deferred) go first.
pub(super) struct Pushes {
    /// Ranges put back, in order, before the uncut rest.
    queue: VecDeque<Range<usize>>,
    /// The uncut rest of the group: `next..end`.
    next: usize,
    end: usize,
}

impl Pushes {
    /// The pushes of `wire`, none cut yet.
    pub(super) fn new(wire: &[Wire]) -> Self {
        Pushes {
            queue: VecDeque::new(),
            next: 0,
            end: wire.len(),
        }
    }

    /// The next push: a range put back, or the next cut of the rest.
    pub(super) fn pop(
        &mut self,
        wire: &[Wire],
        max_events: usize,
        max_bytes: usize,
    ) -> Option<Range<usize>> {
        if let Some(range) = self.queue.pop_front() {
            return Some(range);
        }
        let start = self.next;
        if start >= self.end {
            return None;
        }
        let mut end = start + 1;
        let mut bytes = wire[start].size;
        while end < self.end && end - start < max_events && bytes + wire[end].size <= max_bytes {
            bytes += wire[end].size;
            end += 1;
        }
        self.next = end;
        Some(start..end)
    }

    /// Put `range` back to go next.
    pub(super) fn push_front(&mut self, range: Range<usize>) {
        self.queue.push_front(range);
    }

    /// Put `range` back as its two halves, in order.
    pub(super) fn split_front(&mut self, range: Range<usize>) {
        let mid = range.start + range.len() / 2;
        self.queue.push_front(mid..range.end);
        self.queue.push_front(range.start..mid);
    }

    /// Nothing is left to push.
    pub(super) fn is_empty(&self) -> bool {
        self.queue.is_empty() && self.next >= self.end
    }

    /// Drop everything left; how many events it held (never pushed).
    pub(super) fn drain(&mut self) -> usize {
        let put_back: usize = self.queue.drain(..).map(|r| r.len()).sum();
        let rest = self.end.saturating_sub(self.next);
        self.next = self.end;
        put_back + rest
    }
}

/// The evidence gathered while bisecting a refused push (400/422 with the
/// protocol's error body, or 413): which lone events were refused, and
/// whether anything passed on the same channel since.
///
/// A lone refused event is guilty only when other events pass: then the
/// server reads pushes and refuses that one. Until then it is a *suspect*,
/// and the relay goes on with the events after it (they were never
/// delivered before it, and it is either dead or they are refused too, so
/// order holds). [`MAX_SUSPECTS`] lone refusals with no pass between them
/// mean every part of the batch is refused alike: a channel failure.
#[derive(Default)]
pub(super) struct Trial {
    /// A push of this group passed (a 200).
    pub(super) passed: bool,
    /// Lone refused events awaiting a verdict: index in the group, reason.
    pub(super) suspects: Vec<(usize, String)>,
}

/// Lone refusals in a row, with nothing passing, that make a refusal the
/// channel's, not the events'. Three adjacent poison events with nothing
/// passing before them are then held as a channel failure (pending, with
/// backoff) rather than dead-lettered: a stall that shows in the status,
/// never a loss.
pub(super) const MAX_SUSPECTS: usize = 3;

impl Trial {
    /// A lone event was refused: guilty at once if the channel was seen to
    /// work, a suspect otherwise.
    pub(super) fn refused(
        &mut self,
        i: usize,
        reason: String,
        wire: &[Wire],
        out: &mut Vec<Settlement>,
    ) {
        if self.passed {
            out.push(wire[i].settlement(Outcome::Dead { reason }));
        } else {
            self.suspects.push((i, reason));
        }
    }

    /// Something passed: the suspects were guilty.
    pub(super) fn convict(&mut self, wire: &[Wire], out: &mut Vec<Settlement>) {
        self.passed = true;
        for (i, reason) in self.suspects.drain(..) {
            out.push(wire[i].settlement(Outcome::Dead { reason }));
        }
    }

    /// Enough refusals alike to blame the channel.
    pub(super) fn is_channel(&self) -> bool {
        self.suspects.len() >= MAX_SUSPECTS
    }

    pub(super) fn is_empty(&self) -> bool {
        self.suspects.is_empty()
    }

    /// Release the suspects (they stay pending): the error to show, and
    /// their indexes.
    pub(super) fn acquit(&mut self) -> (String, Vec<usize>) {
        let error = match self.suspects.last() {
            Some((_, reason)) => format!(
                "every part of the batch was refused alike, down to single events, \
                 and nothing passed: kept pending as a failure of the channel \
                 (a proxy, gateway or server refusing every push), not of the events; \
                 last answer: {reason}"
            ),
            None => String::new(),
        };
        (error, self.suspects.drain(..).map(|(i, _)| i).collect())
    }
}

/// The attempt number that a push of `carried` was: one more than the most
/// attempts any of them had before (the backoff grows with it).
pub(super) fn next_attempt_number<'a>(carried: impl Iterator<Item = &'a Wire>) -> u32 {
    carried.map(|w| w.attempts).max().unwrap_or(0) + 1
}
