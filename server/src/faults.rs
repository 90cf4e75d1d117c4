//! Fault injection and the request log: test controls for the relay's tests
//! and the browser end-to-end tests.
//!
//! Everything lives in one [`Faults`] value, shared by the push handler, the
//! in-process API ([`crate::RunningServer::faults`]) and the HTTP endpoints
//! under `/__test/` (mounted only with `--enable-test-controls`):
//!
//! | HTTP                              | body                                               | Rust                                   |
//! |-----------------------------------|----------------------------------------------------|----------------------------------------|
//! | `POST /__test/fail`               | `{"status":503,"count":2,"retry_after":1}`         | [`Faults::fail_next`]                  |
//! | `POST /__test/fail`               | `{"status":500,"for_ms":2000}`                     | [`Faults::fail_for`]                   |
//! | `POST /__test/delay`              | `{"ms":3000}` or `{"ms":3000,"count":1}`           | [`Faults::delay`], [`Faults::delay_next`] |
//! | `POST /__test/drop-after-commit`  | `{"count":1}`                                      | [`Faults::drop_response_after_commit`] |
//! | `POST /__test/malformed`          | `{"count":1}`                                      | [`Faults::malformed_response`]         |
//! | `POST /__test/reject`             | `{"count":2}`                                      | [`Faults::reject_next_events`]         |
//! | `POST /__test/early-413`          | `{"above":65536}` (`{"above":null}` clears)         | [`Faults::early_413_above`]            |
//! | `POST /__test/slow-upload`        | `{"bytes_per_sec":8192}` (`0` clears)              | [`Faults::slow_upload`]                |
//! | `GET /__test/requests`            |                                                    | [`Faults::requests`]                   |
//! | `POST /__test/reset`              |                                                    | [`Faults::reset`]                      |
//!
//! Faults apply to pushes (`POST /v1/events`) whose body was read and parsed;
//! a push that is malformed or too large gets its real answer and consumes
//! no fault. Two act before the body is read, on every push until cleared
//! or reset: early-413 (a proxy's body limit, answered from the head alone)
//! and slow-upload (the body read at a limited rate: a slow uplink, as the
//! client sees it, once the socket buffers between them are full). At most one of fail / malformed / drop-after-commit applies to a
//! push, in that order of precedence; a delay comes on top of any answer.
//! Fail and malformed act before authentication (like a proxy in front of
//! the server would); drop-after-commit counts only pushes that committed.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use edge_outbox::Timestamp;
use serde::{Deserialize, Serialize};

use crate::http::{AppState, error_response};

/// Oldest records are dropped past this many, so a long-running server with
/// test controls on (or an in-process server flushing a million events in a
/// memory benchmark) cannot grow without bound: about 4 MB at most.
const MAX_RECORDS: usize = 20_000;

/// The request log's name of the drop-after-commit fault.
pub(crate) const DROP_AFTER_COMMIT: &str = "drop_after_commit";
/// The request log's name of the early-413 fault.
pub(crate) const EARLY_413: &str = "early_413";
/// The request log's name of the slow-upload fault.
pub(crate) const SLOW_UPLOAD: &str = "slow_upload";

/// An injected failure: the status to answer a push with.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    /// HTTP status, 400..=599 (e.g. 500, 503, 413, 401, 400); anything else is answered as 500.
    pub status: u16,
    /// `Retry-After` header value in seconds (meaningful with 408, 429, 503).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after: Option<u64>,
}

impl Failure {
    /// A failure answering `status`.
    pub fn status(status: u16) -> Self {
        Failure {
            status,
            retry_after: None,
        }
    }

    /// Add a `Retry-After: secs` header.
    pub fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs);
        self
    }
}

/// One push as the server saw it (the request log).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestRecord {
    /// The push's `client_id`; `null` when the body could not be parsed.
    pub client_id: Option<String>,
    /// When the server started handling it, Unix milliseconds (from a
    /// monotonic clock anchored once, so records never go backwards).
    pub started_at: i64,
    /// When the answer was ready (or the push ended without one), same clock.
    pub finished_at: i64,
    /// Number of events in the push (0 when the body could not be parsed).
    pub events: usize,
    /// Status answered; 0 when no answer was sent (the client went away, or
    /// the drop-after-commit fault closed the connection).
    pub status: u16,
    /// The injected fault, if any: `"fail"`, `"malformed"`, `"drop_after_commit"`,
    /// or `"delay"` when a delay was the only one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<String>,
}

#[derive(Clone, Copy, Debug)]
enum Remaining {
    Count(u32),
    Until(Instant),
}

#[derive(Default)]
struct State_ {
    fail: Option<(Failure, Remaining)>,
    /// Delay, and how many more pushes it applies to (`None`: all).
    delay: Option<(Duration, Option<u32>)>,
    drop_after_commit: u32,
    malformed: u32,
    early_413_above: Option<usize>,
    slow_upload: Option<u64>,
    /// Events still to answer `rejected` (a per-event refusal).
    reject_events: u32,
}

/// The faults that act before a push's body is read.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct BodyPlan {
    /// Answer 413 at once when the declared Content-Length is over this.
    pub early_413_above: Option<usize>,
    /// Read the body at most this many bytes per second.
    pub slow_upload: Option<u64>,
}

/// What to do with one push, decided once when it has been parsed.
#[derive(Debug, Default)]
pub(crate) struct Plan {
    pub fail: Option<Failure>,
    pub malformed: bool,
    pub delay: Duration,
}

/// Fault injection controls and the request log of one server.
pub struct Faults {
    state: Mutex<State_>,
    log: Mutex<VecDeque<RequestRecord>>,
    epoch: Instant,
    epoch_unix_ms: i64,
}

impl std::fmt::Debug for Faults {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Faults").finish_non_exhaustive()
    }
}

impl Default for Faults {
    fn default() -> Self {
        Self::new()
    }
}

/// Test controls must keep working after a panic elsewhere, so a poisoned
/// lock is taken over (the guarded data is plain counters and records).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Faults {
    /// No faults, an empty log.
    pub fn new() -> Self {
        Faults {
            state: Mutex::new(State_::default()),
            log: Mutex::new(VecDeque::new()),
            epoch: Instant::now(),
            epoch_unix_ms: Timestamp::now().as_millis(),
        }
    }

    /// Answer the next `n` pushes with `failure`, storing nothing.
    pub fn fail_next(&self, n: u32, failure: Failure) {
        lock(&self.state).fail = (n > 0).then_some((failure, Remaining::Count(n)));
    }

    /// Answer every push with `failure` for `duration` from now, storing nothing.
    pub fn fail_for(&self, duration: Duration, failure: Failure) {
        lock(&self.state).fail = Some((failure, Remaining::Until(Instant::now() + duration)));
    }

    /// Delay the answer of every push by `d` until reset (`Duration::ZERO`
    /// clears it). The events are committed BEFORE the delay, so a client
    /// that times out has in fact delivered them: its resend is a duplicate.
    pub fn delay(&self, d: Duration) {
        lock(&self.state).delay = (!d.is_zero()).then_some((d, None));
    }

    /// Delay the answers of the next `n` pushes by `d` (see [`Faults::delay`]).
    pub fn delay_next(&self, n: u32, d: Duration) {
        lock(&self.state).delay = (n > 0 && !d.is_zero()).then_some((d, Some(n)));
    }

    /// For the next `n` pushes that commit: commit the events, then break the answer (a
    /// `200` head whose body fails, so the connection is cut before a body
    /// could be read). The client cannot know its events arrived; the resend
    /// must come back `duplicate`.
    pub fn drop_response_after_commit(&self, n: u32) {
        lock(&self.state).drop_after_commit = n;
    }

    /// Answer the next `n` pushes with `200` and a body that is not a valid
    /// push response, WITHOUT storing the events (think of a captive portal
    /// or a broken proxy answering in the server's place).
    pub fn malformed_response(&self, n: u32) {
        lock(&self.state).malformed = n;
    }

    /// Until cleared (`None`) or reset, answer every push whose declared
    /// `Content-Length` is over `bytes` at once, from its head alone, with
    /// `413 payload_too_large` and `Connection: close`, WITHOUT reading its
    /// body, and close the connection: what a proxy or CDN with a body limit
    /// does. A client still uploading usually sees a reset connection rather
    /// than the 413. Nothing is stored; the log shows fault `early_413`.
    /// Acts before authentication, like a proxy in front of the server.
    pub fn early_413_above(&self, bytes: Option<usize>) {
        lock(&self.state).early_413_above = bytes;
    }

    /// Until cleared (`None` or 0) or reset, read push bodies at most
    /// `bytes_per_sec` (in the frames they arrive in, each followed by a
    /// sleep as long as it takes at that rate): a slow uplink, as the client
    /// sees it once the socket buffers between them are full (on loopback
    /// they hold a few hundred KiB to a few MiB, so use bodies larger than
    /// that, or count on the push's total time rather than the upload's).
    /// The log shows fault `slow_upload`.
    pub fn slow_upload(&self, bytes_per_sec: Option<u64>) {
        lock(&self.state).slow_upload = bytes_per_sec.filter(|&r| r > 0);
    }

    /// The request log: one record per push, oldest first.
    pub fn requests(&self) -> Vec<RequestRecord> {
        lock(&self.log).iter().cloned().collect()
    }

    /// Clear every fault and the request log.
    pub fn reset(&self) {
        *lock(&self.state) = State_::default();
        lock(&self.log).clear();
    }

    /// Answer the next `n` valid events (counted across pushes, in request
    /// order) `rejected` in a `200`, storing nothing of them: the per-event
    /// verdict of a backend that refuses an event for good. The rest of each
    /// push is handled as usual.
    pub fn reject_next_events(&self, n: u32) {
        lock(&self.state).reject_events = n;
    }

    /// Whether the next valid event is to be rejected (consumes a count).
    pub(crate) fn take_event_rejection(&self) -> bool {
        let mut s = lock(&self.state);
        let reject = s.reject_events > 0;
        s.reject_events = s.reject_events.saturating_sub(1);
        reject
    }

    /// Unix milliseconds on this server's monotonic clock.
    pub(crate) fn now_ms(&self) -> i64 {
        self.epoch_unix_ms
            .saturating_add(i64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(i64::MAX))
    }

    /// The faults that act before a push's body is read.
    pub(crate) fn body_plan(&self) -> BodyPlan {
        let s = lock(&self.state);
        BodyPlan {
            early_413_above: s.early_413_above,
            slow_upload: s.slow_upload,
        }
    }

    /// Decide the faults of one push, consuming counts.
    pub(crate) fn plan(&self) -> Plan {
        let mut s = lock(&self.state);
        let mut plan = Plan::default();
        if let Some((d, remaining)) = s.delay {
            plan.delay = d;
            s.delay = match remaining {
                Some(n) if n <= 1 => None,
                Some(n) => Some((d, Some(n - 1))),
                None => Some((d, None)),
            };
        }
        if let Some((failure, remaining)) = s.fail.clone() {
            match remaining {
                Remaining::Count(n) => {
                    plan.fail = Some(failure.clone());
                    s.fail = (n > 1).then_some((failure, Remaining::Count(n - 1)));
                }
                Remaining::Until(t) if Instant::now() < t => plan.fail = Some(failure),
                Remaining::Until(_) => s.fail = None,
            }
        }
        if plan.fail.is_some() {
            return plan;
        }
        if s.malformed > 0 {
            s.malformed -= 1;
            plan.malformed = true;
        }
        plan
    }

    /// After a push committed: should its answer be dropped? Consumes a
    /// count, so pushes refused earlier (auth, validation) do not use one up.
    pub(crate) fn take_drop_after_commit(&self) -> bool {
        let mut s = lock(&self.state);
        let drop = s.drop_after_commit > 0;
        s.drop_after_commit = s.drop_after_commit.saturating_sub(1);
        drop
    }

    /// Start a request record; it is logged when the returned guard finishes
    /// or is dropped (status 0: no answer).
    pub(crate) fn start(self: &Arc<Self>) -> RecordGuard {
        RecordGuard {
            faults: Arc::clone(self),
            record: RequestRecord {
                client_id: None,
                started_at: self.now_ms(),
                finished_at: 0,
                events: 0,
                status: 0,
                fault: None,
            },
            done: false,
        }
    }

    fn push_record(&self, record: RequestRecord) {
        let mut log = lock(&self.log);
        if log.len() >= MAX_RECORDS {
            log.pop_front();
        }
        log.push_back(record);
    }
}

/// An in-progress [`RequestRecord`]; logging it on drop covers the pushes
/// whose handler future is dropped because the client went away.
pub(crate) struct RecordGuard {
    faults: Arc<Faults>,
    record: RequestRecord,
    done: bool,
}

impl RecordGuard {
    /// Note who pushed and how many events.
    pub fn describe(&mut self, client_id: &str, events: usize) {
        self.record.client_id = Some(client_id.to_owned());
        self.record.events = events;
    }

    /// Note the injected fault (the first one noted wins: a delay on top of
    /// a failure is logged as the failure).
    pub fn fault(&mut self, name: &str) {
        self.record.fault.get_or_insert_with(|| name.to_owned());
    }

    /// Log the record with the answered status; a deliberately broken
    /// answer (drop-after-commit) is logged as 0, "no answer".
    pub fn finish(mut self, status: u16) {
        let dropped = self.record.fault.as_deref() == Some(DROP_AFTER_COMMIT);
        self.record.status = if dropped { 0 } else { status };
        self.log();
    }

    fn log(&mut self) {
        if !self.done {
            self.done = true;
            self.record.finished_at = self.faults.now_ms();
            self.faults.push_record(self.record.clone());
        }
    }
}

impl Drop for RecordGuard {
    fn drop(&mut self) {
        self.log();
    }
}

// ---- HTTP endpoints under /__test/ ----

/// Body of `POST /__test/fail`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FailBody {
    status: u16,
    #[serde(default)]
    retry_after: Option<u64>,
    #[serde(default)]
    count: Option<u32>,
    #[serde(default)]
    for_ms: Option<u64>,
}

/// Body of `POST /__test/delay`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DelayBody {
    ms: u64,
    #[serde(default)]
    count: Option<u32>,
}

/// Body of `POST /__test/early-413`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Early413Body {
    above: Option<usize>,
}

/// Body of `POST /__test/slow-upload`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SlowUploadBody {
    bytes_per_sec: Option<u64>,
}

/// Body of `POST /__test/drop-after-commit` and `POST /__test/malformed`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CountBody {
    count: u32,
}

type JsonResult<T> = Result<Json<T>, axum::extract::rejection::JsonRejection>;

fn bad_request(message: String) -> Response {
    error_response(StatusCode::BAD_REQUEST, "invalid_request", message)
}

fn faults_of(state: &AppState) -> &Arc<Faults> {
    state.faults()
}

pub(crate) async fn post_fail(
    State(state): State<AppState>,
    body: JsonResult<FailBody>,
) -> Response {
    let body = match body {
        Ok(Json(b)) => b,
        Err(e) => return bad_request(e.body_text()),
    };
    if !(400..=599).contains(&body.status) {
        return bad_request(format!("status must be 400..=599, not {}", body.status));
    }
    let failure = Failure {
        status: body.status,
        retry_after: body.retry_after,
    };
    match (body.count, body.for_ms) {
        (Some(n), None) => faults_of(&state).fail_next(n, failure),
        (None, Some(ms)) => faults_of(&state).fail_for(Duration::from_millis(ms), failure),
        _ => return bad_request("give exactly one of \"count\" and \"for_ms\"".into()),
    }
    StatusCode::NO_CONTENT.into_response()
}

pub(crate) async fn post_delay(
    State(state): State<AppState>,
    body: JsonResult<DelayBody>,
) -> Response {
    let body = match body {
        Ok(Json(b)) => b,
        Err(e) => return bad_request(e.body_text()),
    };
    let d = Duration::from_millis(body.ms);
    match body.count {
        Some(n) => faults_of(&state).delay_next(n, d),
        None => faults_of(&state).delay(d),
    }
    StatusCode::NO_CONTENT.into_response()
}

pub(crate) async fn post_drop_after_commit(
    State(state): State<AppState>,
    body: JsonResult<CountBody>,
) -> Response {
    match body {
        Ok(Json(b)) => faults_of(&state).drop_response_after_commit(b.count),
        Err(e) => return bad_request(e.body_text()),
    }
    StatusCode::NO_CONTENT.into_response()
}

pub(crate) async fn post_malformed(
    State(state): State<AppState>,
    body: JsonResult<CountBody>,
) -> Response {
    match body {
        Ok(Json(b)) => faults_of(&state).malformed_response(b.count),
        Err(e) => return bad_request(e.body_text()),
    }
    StatusCode::NO_CONTENT.into_response()
}

pub(crate) async fn post_reject(
    State(state): State<AppState>,
    body: JsonResult<CountBody>,
) -> Response {
    match body {
        Ok(Json(b)) => faults_of(&state).reject_next_events(b.count),
        Err(e) => return bad_request(e.body_text()),
    }
    StatusCode::NO_CONTENT.into_response()
}

pub(crate) async fn post_early_413(
    State(state): State<AppState>,
    body: JsonResult<Early413Body>,
) -> Response {
    match body {
        Ok(Json(b)) => faults_of(&state).early_413_above(b.above),
        Err(e) => return bad_request(e.body_text()),
    }
    StatusCode::NO_CONTENT.into_response()
}

pub(crate) async fn post_slow_upload(
    State(state): State<AppState>,
    body: JsonResult<SlowUploadBody>,
) -> Response {
    match body {
        Ok(Json(b)) => faults_of(&state).slow_upload(b.bytes_per_sec),
        Err(e) => return bad_request(e.body_text()),
    }
    StatusCode::NO_CONTENT.into_response()
}

pub(crate) async fn get_requests(State(state): State<AppState>) -> Json<Vec<RequestRecord>> {
    Json(faults_of(&state).requests())
}

pub(crate) async fn post_reset(State(state): State<AppState>) -> StatusCode {
    faults_of(&state).reset();
    StatusCode::NO_CONTENT
}
