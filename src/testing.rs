//! Test doubles with fault injection: an in-memory [`Store`] and an in-memory
//! sync server behind a [`Transport`].
//!
//! They exist so the relay core can be tested on any target (natively and in
//! the browser) without SQLite, IndexedDB or a socket, and so an app can test
//! its own relay wiring: make a claim fail, a request time out, a response get
//! lost after the server committed, a token expire, an event be poison.
//! Their futures never wait, so any executor (even a no-op waker) runs them.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::error::{Error, Result};
use crate::event::{Event, EventId, EventStatus, NewEvent};
use crate::protocol::{EventResult, PushRequest, PushResponse, ResultStatus};
use crate::store::{Claim, ClaimRequest, Outcome, Settlement, Stats, Store};
use crate::time::Timestamp;
use crate::transport::{Push, Response, Transport};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking test thread must not hide the state from the others.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[derive(Default)]
struct StoreState {
    events: BTreeMap<i64, Event>,
    by_id: HashMap<EventId, i64>,
    next_seq: i64,
    lease: Option<(String, Timestamp)>,
    fail_claims: u32,
    fail_settles: u32,
    fail_settle_and_claims: u32,
    claims: u64,
    settle_and_claims: u64,
}

/// An in-memory [`Store`] that keeps the store contract, with fault injection.
/// Clones share the same events (like two handles on one database).
#[derive(Clone)]
pub struct MemoryStore {
    client_id: Arc<str>,
    state: Arc<Mutex<StoreState>>,
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore")
            .field("client_id", &self.client_id)
            .finish_non_exhaustive()
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore::new()
    }
}

impl MemoryStore {
    /// An empty store with a random client id.
    pub fn new() -> Self {
        MemoryStore {
            client_id: uuid::Uuid::new_v4().to_string().into(),
            state: Arc::default(),
        }
    }

    /// Make the next `n` claims fail with a storage error.
    pub fn fail_next_claims(&self, n: u32) {
        lock(&self.state).fail_claims = n;
    }

    /// Make the next `n` settles fail with a storage error (nothing is applied).
    pub fn fail_next_settles(&self, n: u32) {
        lock(&self.state).fail_settles = n;
    }

    /// Make the next `n` calls of [`Store::settle_and_claim`] fail as a whole
    /// with a storage error, nothing recorded (as an IndexedDB transaction
    /// that aborts after its settle part was placed).
    pub fn fail_next_settle_and_claims(&self, n: u32) {
        lock(&self.state).fail_settle_and_claims = n;
    }

    /// How many calls of [`Store::settle_and_claim`] were made (its claims
    /// count in [`MemoryStore::claims`] too).
    pub fn settle_and_claims(&self) -> u64 {
        lock(&self.state).settle_and_claims
    }

    /// How many claims were made (including refused ones).
    pub fn claims(&self) -> u64 {
        lock(&self.state).claims
    }

    /// Every event, in `seq` order, whatever its status.
    pub fn all(&self) -> Vec<Event> {
        lock(&self.state).events.values().cloned().collect()
    }

    /// Enqueue an event with a given `created_at` (to test expiry).
    pub fn enqueue_at(&self, event: NewEvent, created_at: Timestamp) -> Event {
        let mut s = lock(&self.state);
        s.next_seq += 1;
        let stored = Event {
            seq: s.next_seq,
            id: EventId::new(),
            event_type: event.event_type,
            key: event.key,
            payload: event.payload,
            headers: event.headers,
            created_at,
            status: EventStatus::Pending,
            attempts: 0,
            next_attempt_at: created_at,
            last_error: None,
            sent_at: None,
            retried_at: None,
        };
        s.by_id.insert(stored.id, stored.seq);
        s.events.insert(stored.seq, stored.clone());
        stored
    }

    fn select(&self, status: EventStatus, limit: usize) -> Vec<Event> {
        lock(&self.state)
            .events
            .values()
            .filter(|e| e.status == status)
            .take(limit)
            .cloned()
            .collect()
    }
}

impl Store for MemoryStore {
    fn client_id(&self) -> &str {
        &self.client_id
    }

    async fn enqueue(&self, events: Vec<NewEvent>) -> Result<Vec<Event>> {
        for e in &events {
            e.validate(crate::DEFAULT_MAX_EVENT_BYTES)?;
        }
        let now = Timestamp::now();
        Ok(events
            .into_iter()
            .map(|e| self.enqueue_at(e, now))
            .collect())
    }

    async fn claim(&self, request: ClaimRequest<'_>) -> Result<Claim> {
        let mut s = lock(&self.state);
        s.claims += 1;
        if s.fail_claims > 0 {
            s.fail_claims -= 1;
            return Err(Error::storage("injected claim failure", None));
        }
        if let Some((owner, until)) = &s.lease
            && owner != request.owner
            && request.lease_holds(*until)
        {
            return Ok(Claim::LeaseHeld { until: *until });
        }
        s.lease = Some((request.owner.to_owned(), request.now.add(request.lease)));
        let mut batch = Vec::new();
        let mut bytes = 0;
        let first = request
            .after
            .map_or(i64::MIN, |after| after.saturating_add(1));
        for e in s.events.range(first..).map(|(_, e)| e) {
            if e.status != EventStatus::Pending {
                continue;
            }
            if batch.is_empty() && !request.is_due(e.next_attempt_at) {
                return Ok(Claim::NotBefore(e.next_attempt_at));
            }
            if !batch.is_empty()
                && (batch.len() >= request.max_events || bytes + e.size() > request.max_bytes)
            {
                break;
            }
            bytes += e.size();
            batch.push(e.clone());
        }
        Ok(if batch.is_empty() {
            Claim::Empty
        } else {
            Claim::Batch(batch)
        })
    }

    async fn settle(&self, outcomes: Vec<Settlement>, now: Timestamp) -> Result<()> {
        let mut s = lock(&self.state);
        if s.fail_settles > 0 {
            s.fail_settles -= 1;
            return Err(Error::storage("injected settle failure", None));
        }
        let mut outcomes = outcomes;
        Settlement::keep_first_of_each(&mut outcomes);
        for Settlement { seq, id, outcome } in outcomes {
            let Some(e) = s.events.get_mut(&seq) else {
                continue;
            };
            // The strictest reading of the contract: both must name the event.
            if e.id != id || e.status != EventStatus::Pending {
                continue;
            }
            // The attempt is counted when it reaches an outcome (store.rs, 7).
            e.attempts += 1;
            match outcome {
                Outcome::Sent => {
                    e.status = EventStatus::Sent;
                    e.sent_at = Some(now);
                }
                Outcome::Dead { reason } => {
                    e.status = EventStatus::Dead;
                    e.last_error = Some(reason);
                }
                Outcome::Retry { at, error } => {
                    e.next_attempt_at = at;
                    e.last_error = Some(error);
                }
            }
        }
        Ok(())
    }

    async fn settle_and_claim(
        &self,
        outcomes: Vec<Settlement>,
        now: Timestamp,
        request: ClaimRequest<'_>,
    ) -> Result<Result<Claim>> {
        {
            let mut s = lock(&self.state);
            s.settle_and_claims += 1;
            if s.fail_settle_and_claims > 0 {
                s.fail_settle_and_claims -= 1;
                return Err(Error::storage("injected settle-and-claim failure", None));
            }
        }
        crate::store::settle_then_claim(self, outcomes, now, request).await
    }

    async fn release_lease(&self, owner: &str) -> Result<()> {
        let mut s = lock(&self.state);
        if s.lease.as_ref().is_some_and(|(o, _)| o == owner) {
            s.lease = None;
        }
        Ok(())
    }

    async fn stats(&self) -> Result<Stats> {
        let s = lock(&self.state);
        let mut stats = Stats::default();
        for e in s.events.values() {
            match e.status {
                EventStatus::Pending => {
                    stats.pending += 1;
                    if stats.oldest_pending_at.is_none() {
                        stats.oldest_pending_at = Some(e.created_at);
                    }
                }
                EventStatus::Sent => stats.sent += 1,
                EventStatus::Dead => stats.dead += 1,
            }
        }
        Ok(stats)
    }

    async fn pending(&self, limit: usize) -> Result<Vec<Event>> {
        Ok(self.select(EventStatus::Pending, limit))
    }

    async fn dead_letters(&self, limit: usize) -> Result<Vec<Event>> {
        Ok(self.select(EventStatus::Dead, limit))
    }

    async fn get(&self, id: EventId) -> Result<Option<Event>> {
        let s = lock(&self.state);
        Ok(s.by_id.get(&id).and_then(|seq| s.events.get(seq)).cloned())
    }

    async fn retry(&self, id: EventId, now: Timestamp) -> Result<bool> {
        let mut s = lock(&self.state);
        let Some(seq) = s.by_id.get(&id).copied() else {
            return Ok(false);
        };
        match s.events.get_mut(&seq) {
            Some(e) if e.status == EventStatus::Dead => {
                e.status = EventStatus::Pending;
                e.attempts = 0;
                e.next_attempt_at = now;
                e.retried_at = Some(now);
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn retry_now(&self, now: Timestamp) -> Result<u64> {
        let mut s = lock(&self.state);
        let mut waiting = 0;
        for e in s.events.values_mut() {
            if e.status == EventStatus::Pending && e.next_attempt_at > now {
                e.next_attempt_at = now;
                waiting += 1;
            }
        }
        Ok(waiting)
    }

    async fn discard(&self, id: EventId) -> Result<bool> {
        let mut s = lock(&self.state);
        let Some(seq) = s.by_id.get(&id).copied() else {
            return Ok(false);
        };
        if s.events
            .get(&seq)
            .is_some_and(|e| e.status == EventStatus::Dead)
        {
            s.events.remove(&seq);
            s.by_id.remove(&id);
            return Ok(true);
        }
        Ok(false)
    }

    async fn prune_sent(&self, before: Timestamp) -> Result<u64> {
        let mut s = lock(&self.state);
        let doomed: Vec<(i64, EventId)> = s
            .events
            .values()
            .filter(|e| e.status == EventStatus::Sent && e.sent_at.is_some_and(|t| t < before))
            .map(|e| (e.seq, e.id))
            .collect();
        for (seq, id) in &doomed {
            s.events.remove(seq);
            s.by_id.remove(id);
        }
        Ok(doomed.len() as u64)
    }
}

/// A fault the [`MemoryServer`] plays for the next request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Answer as usual (queued before another fault to aim it at a later request).
    None,
    /// No answer at all (connection refused, timeout): `Error::Network`.
    Network,
    /// Answer with this status, optional `Retry-After` and body; nothing is stored.
    Status {
        /// HTTP status.
        status: u16,
        /// `Retry-After` to report.
        retry_after: Option<Duration>,
        /// Response body.
        body: String,
    },
    /// Store the events, then lose the answer (`Error::Network`).
    CommitThenDrop,
    /// Store the events, then answer 200 with a body that is not JSON.
    Malformed,
    /// Store all but the last event and answer 200 without naming it.
    SkipLast,
}

#[derive(Default)]
struct ServerState {
    seen: HashSet<(String, EventId)>,
    stored: Vec<(String, EventId, i64, String)>,
    faults: VecDeque<Fault>,
    reject_types: HashSet<String>,
    poison_types: HashSet<String>,
    max_body: Option<usize>,
    always: Option<Fault>,
    fail_types: HashMap<String, u16>,
    stale_credentials: bool,
    requests: Vec<(usize, bool)>,
}

/// An in-memory sync server behind the [`Transport`] trait: it parses each
/// push, dedupes on (client_id, id) and answers as protocol v1 says, or plays
/// the queued [`Fault`]s first. Clones share the same state.
#[derive(Clone, Default)]
pub struct MemoryServer {
    state: Arc<Mutex<ServerState>>,
}

impl std::fmt::Debug for MemoryServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MemoryServer")
    }
}

impl MemoryServer {
    /// A server that accepts everything.
    pub fn new() -> Self {
        Self::default()
    }

    /// Play `fault` for the next request (faults queue up, one per request).
    pub fn push_fault(&self, fault: Fault) {
        lock(&self.state).faults.push_back(fault);
    }

    /// Answer `rejected` for events of this type (a per-event refusal).
    pub fn reject_type(&self, event_type: &str) {
        lock(&self.state).reject_types.insert(event_type.to_owned());
    }

    /// Answer 422 to any request holding an event of this type (a poison event).
    pub fn poison_type(&self, event_type: &str) {
        lock(&self.state).poison_types.insert(event_type.to_owned());
    }

    /// Play `fault` for every request from now on (`None`: stop): a fault
    /// that persists, like a proxy that refuses every push. Queued faults
    /// ([`MemoryServer::push_fault`]) go first.
    pub fn fail_always(&self, fault: Option<Fault>) {
        lock(&self.state).always = fault;
    }

    /// Answer `status` (say 500), storing nothing, to any push holding an
    /// event of this type: a backend that cannot apply one event and fails
    /// the whole batch for it.
    pub fn fail_type(&self, event_type: &str, status: u16) {
        lock(&self.state)
            .fail_types
            .insert(event_type.to_owned(), status);
    }

    /// Answer 413 to bodies larger than `bytes`.
    pub fn max_body(&self, bytes: usize) {
        lock(&self.state).max_body = Some(bytes);
    }

    /// Answer 401 until a push asks for fresh credentials (an expired token).
    pub fn expire_credentials(&self) {
        lock(&self.state).stale_credentials = true;
    }

    /// Every stored event as (client_id, id, seq, type), in arrival order.
    pub fn stored(&self) -> Vec<(String, EventId, i64, String)> {
        lock(&self.state).stored.clone()
    }

    /// Every request as (events in it, refresh_credentials flag).
    pub fn requests(&self) -> Vec<(usize, bool)> {
        lock(&self.state).requests.clone()
    }

    fn handle(&self, push: Push) -> Result<Response> {
        // In memory, the request is "on the wire" at once.
        push.sent.notify();
        let mut s = lock(&self.state);
        s.requests.push((push.events, push.refresh_credentials));
        let network = |m: &str| Error::Network {
            message: m.to_owned(),
            source: None,
        };
        let respond = |status: u16, body: String| Response {
            status,
            retry_after: None,
            body: body.into_bytes(),
        };
        let fault = s.faults.pop_front().or_else(|| s.always.clone());
        match &fault {
            Some(Fault::Network) => return Err(network("injected: connection refused")),
            Some(Fault::Status {
                status,
                retry_after,
                body,
            }) => {
                return Ok(Response {
                    status: *status,
                    retry_after: *retry_after,
                    body: body.clone().into_bytes(),
                });
            }
            _ => {}
        }
        if s.stale_credentials {
            if push.refresh_credentials {
                s.stale_credentials = false;
            } else {
                return Ok(respond(
                    401,
                    r#"{"error":"unauthorized","message":"token expired"}"#.into(),
                ));
            }
        }
        if s.max_body.is_some_and(|max| push.body.len() > max) {
            return Ok(respond(
                413,
                r#"{"error":"payload_too_large","message":"too large"}"#.into(),
            ));
        }
        let request: PushRequest = match serde_json::from_slice(&push.body) {
            Ok(r) => r,
            Err(e) => {
                return Ok(respond(
                    400,
                    format!(r#"{{"error":"bad_request","message":"{e}"}}"#),
                ));
            }
        };
        if request
            .events
            .iter()
            .any(|e| s.poison_types.contains(&e.event_type))
        {
            return Ok(respond(
                422,
                r#"{"error":"invalid_event","message":"poison"}"#.into(),
            ));
        }
        if let Some(status) = request
            .events
            .iter()
            .find_map(|e| s.fail_types.get(&e.event_type).copied())
        {
            return Ok(respond(
                status,
                r#"{"error":"inbox_error","message":"cannot apply"}"#.into(),
            ));
        }
        let mut events = request.events;
        if fault == Some(Fault::SkipLast) {
            events.pop();
        }
        let mut results = Vec::new();
        for e in events {
            let status = if s.reject_types.contains(&e.event_type) {
                ResultStatus::Rejected
            } else if s.seen.insert((request.client_id.clone(), e.id)) {
                s.stored
                    .push((request.client_id.clone(), e.id, e.seq, e.event_type.clone()));
                ResultStatus::Accepted
            } else {
                ResultStatus::Duplicate
            };
            results.push(EventResult {
                id: e.id,
                status,
                reason: (status == ResultStatus::Rejected).then(|| "refused by type".to_owned()),
            });
        }
        match fault {
            Some(Fault::CommitThenDrop) => Err(network("injected: response lost after commit")),
            Some(Fault::Malformed) => Ok(respond(200, "{\"results\": [oops".into())),
            _ => Ok(respond(
                200,
                serde_json::to_string(&PushResponse { results }).expect("serializable"),
            )),
        }
    }
}

impl Transport for MemoryServer {
    async fn send(&self, push: Push) -> Result<Response> {
        self.handle(push)
    }
}
