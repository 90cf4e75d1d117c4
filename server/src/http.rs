//! The HTTP layer: router, push and pull handlers, body reading (who may
//! do what is in `auth`, the push rate limit in `ratelimit`).

// Helpers here return `Result<_, Response>`: the error IS the answer, built
// once on the failure path and returned as is, so boxing it buys nothing.
#![allow(clippy::result_large_err)]

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use bytes::{Bytes, BytesMut};
use edge_outbox::protocol::{
    ErrorBody, EventResult, PROTOCOL_VERSION, PullResponse, PushRequest, PushResponse,
    ResultStatus, WireEvent,
};
use edge_outbox::{MAX_EVENT_TYPE_LEN, Timestamp};
use http_body_util::BodyExt;
use serde::Deserialize;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::decompression::RequestDecompressionLayer;
use tower_http::services::ServeDir;

use crate::auth::{Auth, invalid_client_id};
use crate::faults::{self, BodyPlan, Faults, Plan};
use crate::metrics::{Metrics, PushInfo};
use crate::ratelimit::{Limiter, retry_after_secs};
use crate::store::EventStore;
use crate::{Database, Error, ServerConfig};

/// Longest accepted `client_id`, in bytes.
const MAX_CLIENT_ID_LEN: usize = 256;
/// Default and largest page size of `GET /v1/events`.
const DEFAULT_PULL_LIMIT: usize = 100;
const MAX_PULL_LIMIT: usize = 1000;
/// A pull page ends before the event that would take its events past this
/// many bytes (each event measured as the client's `max_event_bytes` is:
/// type + key + payload + headers; a page always holds at least one event), so
/// a page of big events cannot make the server build an answer of `limit`
/// times the largest event.
pub const PULL_PAGE_BYTES: usize = 4 * 1024 * 1024;
/// Events fetched from the store per query while a pull page fills: what
/// one page may hold in memory beyond [`PULL_PAGE_BYTES`] is this many
/// events (each at most the push body limit).
const PULL_CHUNK: usize = 100;

/// Shared state of one server: its store, auth table, limits and test controls.
/// Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn EventStore>,
    /// The accepted credentials and the rights they carry.
    auth: Auth,
    /// Push rate limit per client; `None`: unlimited.
    limiter: Option<Limiter>,
    body_limit: usize,
    /// Base time a push body may take to arrive (see [`BodyPace`]).
    body_timeout: Duration,
    /// Largest event accepted ([`WireEvent::size`]); larger ones are rejected.
    max_event_bytes: usize,
    /// Faults are consulted (and pushes logged) only when this is set, so a
    /// production server pays nothing and keeps no log.
    faults_active: bool,
    /// The `/__test/` HTTP endpoints are mounted only when this is set.
    test_routes: bool,
    faults: Arc<Faults>,
    static_dir: Option<PathBuf>,
    cors: Option<CorsLayer>,
    /// This instance's own metrics (`GET /metrics`).
    metrics: Metrics,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("auth", &self.inner.auth)
            .field("rate_limited", &self.inner.limiter.is_some())
            .field("body_limit", &self.inner.body_limit)
            .field("test_controls", &self.inner.test_routes)
            .finish_non_exhaustive()
    }
}

impl AppState {
    /// Open the configured SQLite database (or custom store) and build the
    /// state for [`router`]. PostgreSQL connects asynchronously: use
    /// [`open`](Self::open) for it (or for any database).
    pub fn new(config: ServerConfig) -> Result<Self, Error> {
        if matches!(config.database, Database::Postgres { .. }) {
            return Err(Error::Config(
                "a PostgreSQL server state is opened with AppState::open (async)".into(),
            ));
        }
        // SQLite and custom stores open without awaiting anything.
        futures_util::FutureExt::now_or_never(Self::build(config, false))
            .unwrap_or_else(|| Err(Error::Internal("opening the store did not complete".into())))
    }

    /// Open the configured database, whichever it is, and build the state for [`router`].
    pub async fn open(config: ServerConfig) -> Result<Self, Error> {
        Self::build(config, false).await
    }

    /// `in_process`: the fault controls are reachable from Rust (a
    /// [`crate::RunningServer`]), so they are active even without the HTTP endpoints.
    pub(crate) async fn build(config: ServerConfig, in_process: bool) -> Result<Self, Error> {
        let cors = cors_layer(&config.cors_origins)?;
        let store = crate::store::open(config.database, config.inbox, config.pg_inbox).await?;
        Ok(AppState {
            inner: Arc::new(Inner {
                store,
                auth: Auth::new(
                    config.tokens.into_iter().collect(),
                    config.reader_tokens,
                    config.jwt,
                    config.allow_anonymous,
                ),
                limiter: config.rate_limit.map(Limiter::new),
                body_limit: config.body_limit,
                body_timeout: config.body_timeout,
                max_event_bytes: config.max_event_bytes,
                faults_active: in_process || config.test_controls,
                test_routes: config.test_controls,
                faults: Arc::new(Faults::new()),
                static_dir: config.static_dir,
                cors,
                metrics: Metrics::new(),
            }),
        })
    }

    /// The event store.
    pub fn store(&self) -> &Arc<dyn EventStore> {
        &self.inner.store
    }

    /// The fault controls and request log (inert unless test controls are on
    /// or the server runs in-process).
    pub fn faults(&self) -> &Arc<Faults> {
        &self.inner.faults
    }

    pub(crate) fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    pub(crate) fn auth(&self) -> &Auth {
        &self.inner.auth
    }
}

/// The server's routes: `POST`/`GET /v1/events`, `GET /healthz`,
/// `GET /metrics` (Prometheus, no token), the `/__test/` controls when
/// enabled, and the static directory as fallback. Every request is counted
/// and logged (`tracing`, target `edge_outbox_server::request`).
pub fn router(state: AppState) -> Router {
    let mut api = Router::new()
        .route("/v1/events", post(push).get(pull))
        .route("/healthz", get(|| async { "ok" }))
        .route("/metrics", get(crate::metrics::get_metrics));
    if state.inner.test_routes {
        api = api
            .route("/__test/fail", post(faults::post_fail))
            .route("/__test/delay", post(faults::post_delay))
            .route(
                "/__test/drop-after-commit",
                post(faults::post_drop_after_commit),
            )
            .route("/__test/malformed", post(faults::post_malformed))
            .route("/__test/reject", post(faults::post_reject))
            .route("/__test/early-413", post(faults::post_early_413))
            .route("/__test/slow-upload", post(faults::post_slow_upload))
            .route("/__test/requests", get(faults::get_requests))
            .route("/__test/reset", post(faults::post_reset))
            .route("/__test/token", post(crate::auth::post_token));
    }
    // Gzip (and only gzip) request bodies are inflated before the handlers
    // see them; another Content-Encoding is answered 415.
    let mut app = api.layer(RequestDecompressionLayer::new());
    if state.inner.faults_active {
        // Outside decompression, which drops a gzip body's Content-Length:
        // a proxy's body limit sees the bytes on the wire.
        app = app.layer(axum::middleware::from_fn_with_state(
            state.clone(),
            early_413,
        ));
    }
    if let Some(cors) = &state.inner.cors {
        // Outermost, so preflights are answered before anything else runs.
        app = app.layer(cors.clone());
    }
    if let Some(dir) = &state.inner.static_dir {
        app = app.fallback_service(ServeDir::new(dir));
    }
    // Outermost: every answer is counted and logged, preflights and early 413s too.
    app = app.layer(axum::middleware::from_fn_with_state(
        state.clone(),
        crate::metrics::observe,
    ));
    app.with_state(state)
}

/// The CORS layer for `origins` (`None` when empty: same-origin only).
fn cors_layer(origins: &[String]) -> Result<Option<CorsLayer>, Error> {
    if origins.is_empty() {
        return Ok(None);
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        let values = origins
            .iter()
            .map(|o| {
                HeaderValue::from_str(o.trim_end_matches('/'))
                    .map_err(|_| Error::Config(format!("CORS origin {o:?} is not a header value")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        AllowOrigin::list(values)
    };
    Ok(Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([Method::GET, Method::POST])
            .allow_headers([
                header::AUTHORIZATION,
                header::CONTENT_TYPE,
                header::CONTENT_ENCODING,
            ])
            .expose_headers([header::RETRY_AFTER, header::WWW_AUTHENTICATE])
            .max_age(Duration::from_secs(600)),
    ))
}

/// A JSON [`ErrorBody`] answer.
pub(crate) fn error_response(
    status: StatusCode,
    code: &str,
    message: impl Into<String>,
) -> Response {
    let mut response = (status, Json(ErrorBody::new(code, message))).into_response();
    if status == StatusCode::UNAUTHORIZED {
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"edge-outbox\""),
        );
    }
    response
}

// ---- body ----

pub(crate) enum BodyError {
    TooLarge,
    Unreadable(String),
}

/// Read a request body of at most `limit` bytes (after gzip inflation).
///
/// Past the limit the rest of the body is still read and thrown away (up to a
/// cap): a server that answers 413 and closes while the client is still
/// writing makes most clients report a reset connection instead of the 413,
/// and the relay would retry the same batch forever instead of splitting it.
///
/// `rate` (the slow-upload test control): read at most that many bytes per
/// second, sleeping after each frame as long as it takes at that rate.
pub(crate) async fn read_body(
    headers: &HeaderMap,
    mut body: Body,
    limit: usize,
    rate: Option<u64>,
) -> Result<Bytes, BodyError> {
    let drain_cap = limit.saturating_mul(4).max(16 << 20);
    if declared_over(headers, drain_cap) {
        return Err(BodyError::TooLarge);
    }
    let mut buf = BytesMut::with_capacity(declared_length(headers).unwrap_or(0).min(limit));
    let mut seen: usize = 0;
    while let Some(frame) = body.frame().await {
        let frame = match frame {
            Ok(frame) => frame,
            Err(_) if seen > limit => break,
            Err(e) => {
                return Err(BodyError::Unreadable(format!(
                    "cannot read the request body: {e}"
                )));
            }
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        seen = seen.saturating_add(data.len());
        if let Some(rate) = rate {
            let secs = data.len() as f64 / rate.max(1) as f64;
            tokio::time::sleep(Duration::from_secs_f64(secs)).await;
        }
        if seen > limit {
            buf = BytesMut::new();
            if seen > drain_cap {
                break;
            }
            continue;
        }
        buf.extend_from_slice(&data);
    }
    if seen > limit {
        Err(BodyError::TooLarge)
    } else {
        Ok(buf.freeze())
    }
}

/// True when the body says by itself that it is over `cap` bytes: only a
/// body sent as is (no `Content-Encoding`) has a `Content-Length` that gives
/// its real size.
fn declared_over(headers: &HeaderMap, cap: usize) -> bool {
    let compressed = headers.contains_key(header::CONTENT_ENCODING);
    declared_length(headers).is_some_and(|n| !compressed && n > cap)
}

/// The request's `Content-Length`, if it has a readable one.
fn declared_length(headers: &HeaderMap) -> Option<usize> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
}

/// Parse a push body, telling a wrong protocol version, malformed JSON and
/// a well-formed body of the wrong shape apart.
pub(crate) fn parse_push(bytes: &[u8]) -> Result<PushRequest, Response> {
    fn unsupported(version: &serde_json::Value) -> Response {
        let mut body = ErrorBody::new(
            "unsupported_protocol",
            format!(
                "protocol {version} is not supported; this server speaks protocol {PROTOCOL_VERSION}"
            ),
        );
        body.supported_protocols = Some(vec![PROTOCOL_VERSION]);
        (StatusCode::BAD_REQUEST, Json(body)).into_response()
    }
    match serde_json::from_slice::<PushRequest>(bytes) {
        Ok(req) if req.protocol == PROTOCOL_VERSION => Ok(req),
        Ok(req) => Err(unsupported(&req.protocol.into())),
        Err(e) => {
            // A body of another version may have another shape: look at its
            // `protocol` field alone before blaming the shape.
            #[derive(Deserialize)]
            struct Probe {
                protocol: Option<serde_json::Value>,
            }
            if let Ok(Probe {
                protocol: Some(version),
            }) = serde_json::from_slice::<Probe>(bytes)
                && version != PROTOCOL_VERSION
            {
                return Err(unsupported(&version));
            }
            let code = if e.is_syntax() || e.is_eof() {
                "malformed_json"
            } else {
                "invalid_request"
            };
            Err(error_response(
                StatusCode::BAD_REQUEST,
                code,
                format!("the push body is not a valid protocol {PROTOCOL_VERSION} request: {e}"),
            ))
        }
    }
}

/// Why one event is rejected, if it is. These are permanent: resending the
/// same event can never succeed, so the client may dead-letter it.
pub(crate) fn invalid_event(e: &WireEvent) -> Option<String> {
    if e.event_type.is_empty() {
        return Some("type must not be empty".into());
    }
    if e.event_type.len() > MAX_EVENT_TYPE_LEN {
        return Some(format!("type is longer than {MAX_EVENT_TYPE_LEN} bytes"));
    }
    if e.seq < 0 {
        return Some("seq must not be negative".into());
    }
    if Timestamp::parse_rfc3339(&e.created_at).is_none() {
        return Some(format!(
            "created_at {:?} is not an RFC 3339 time",
            e.created_at
        ));
    }
    if e.headers.keys().any(|k| k.is_empty()) {
        return Some("header names must not be empty".into());
    }
    if let Err(err) = edge_outbox::protocol::check_well_formed_strings(e.payload.get()) {
        return Some(format!("the payload is not well-formed: {err}"));
    }
    None
}

// ---- handlers ----

/// `POST /v1/events`.
async fn push(State(state): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    let mut record = state
        .inner
        .faults_active
        .then(|| state.inner.faults.start());
    let body_plan = if state.inner.faults_active {
        state.inner.faults.body_plan()
    } else {
        BodyPlan::default()
    };
    let mut info = PushInfo::default();
    let (mut response, plan) = push_inner(
        &state,
        &headers,
        body,
        body_plan.slow_upload,
        record.as_mut(),
        &mut info,
    )
    .await;
    response.extensions_mut().insert(info);
    if !plan.delay.is_zero() {
        if let Some(r) = record.as_mut() {
            r.fault("delay");
        }
        tokio::time::sleep(plan.delay).await;
    }
    if let Some(mut r) = record {
        if body_plan.slow_upload.is_some() {
            // Noted last: a fault that shaped the answer shows first.
            r.fault(faults::SLOW_UPLOAD);
        }
        r.finish(response.status().as_u16());
    }
    response
}

/// The early-413 test control ([`Faults::early_413_above`]): a push whose
/// declared `Content-Length` is over the limit is answered from its head,
/// its body never read; hyper then closes the connection with the body
/// unread (a reset, for a client still sending).
async fn early_413(
    State(state): State<AppState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let above = state.inner.faults.body_plan().early_413_above;
    let is_push = request.method() == Method::POST && request.uri().path() == "/v1/events";
    let declared = declared_length(request.headers());
    let Some(above) = above.filter(|&above| is_push && declared.is_some_and(|n| n > above)) else {
        return next.run(request).await;
    };
    drop(request);
    let mut response = error_response(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        format!("the request body is larger than {above} bytes (early 413, a test control)"),
    );
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    let mut record = state.inner.faults.start();
    record.fault(faults::EARLY_413);
    record.finish(response.status().as_u16());
    response
}

async fn push_inner(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
    upload_rate: Option<u64>,
    mut record: Option<&mut faults::RecordGuard>,
    info: &mut PushInfo,
) -> (Response, Plan) {
    let none = Plan::default();
    let limit = state.inner.body_limit;
    // Who is pushing, from the head alone, before the body is read: a
    // request without the right to push costs no parsing and can hold a
    // connection no longer than it takes to drain what it sent.
    let access = match state.inner.auth.authenticate(headers) {
        Ok(access) => access,
        Err(response) => return (refuse_unread(state, headers, body, response).await, none),
    };
    let known_key = match access.push_rate_key() {
        Ok(key) => key,
        Err(response) => return (refuse_unread(state, headers, body, response).await, none),
    };
    // A credential's budget is spent before its body is read; after
    // authentication, so a flood of bad tokens spends no client's budget.
    if let Some(key) = &known_key
        && let Err(response) = state.rate_check(key)
    {
        return (refuse_unread(state, headers, body, response).await, none);
    }
    // The slow-upload test control throttles the reading itself: no pace then.
    let pace = upload_rate
        .is_none()
        .then(|| BodyPace::new(state.inner.body_timeout));
    let body = match &pace {
        Some(pace) => pace.wrap(body),
        None => body,
    };
    let read = read_body(headers, body, limit, upload_rate).await;
    if pace.as_ref().is_some_and(BodyPace::timed_out) {
        return (body_timed_out(state.inner.body_timeout), none);
    }
    let bytes = match read {
        Ok(b) => b,
        Err(BodyError::TooLarge) => {
            let msg =
                format!("the request body is larger than {limit} bytes (after decompression)");
            return (
                error_response(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", msg),
                none,
            );
        }
        Err(BodyError::Unreadable(msg)) => {
            return (
                error_response(StatusCode::BAD_REQUEST, "unreadable_body", msg),
                none,
            );
        }
    };
    info.body_bytes = bytes.len();
    let req = match parse_push(&bytes) {
        Ok(req) => req,
        Err(response) => return (response, none),
    };
    // The log line names the client only once its id is known to be safe to
    // print (below): a refused id may hold terminal escapes or bidi controls.
    info.events = req.events.len();
    if let Some(r) = record.as_deref_mut() {
        r.describe(&req.client_id, req.events.len());
    }
    let plan = if state.inner.faults_active {
        state.inner.faults.plan()
    } else {
        none
    };
    if let Some(failure) = &plan.fail {
        if let Some(r) = record.as_deref_mut() {
            r.fault("fail");
        }
        return (injected_failure(failure.status, failure.retry_after), plan);
    }
    if plan.malformed {
        if let Some(r) = record.as_deref_mut() {
            r.fault("malformed");
        }
        let response = (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            // Cut mid-value: the kind of body a proxy or a crash leaves behind.
            r#"{"results":[{"id":"#,
        )
            .into_response();
        return (response, plan);
    }
    if let Some(msg) = invalid_client_id(&req.client_id, MAX_CLIENT_ID_LEN) {
        return (
            error_response(StatusCode::BAD_REQUEST, "invalid_request", msg),
            plan,
        );
    }
    info.client_id = Some(req.client_id.clone());
    if let Err(response) = access.check_push(&req.client_id) {
        return (response, plan);
    }
    // Anonymous: the pushed client id is the key, known only now; before
    // the store, which is what the limit protects.
    if known_key.is_none()
        && let Err(response) = state.rate_check(&crate::auth::rate_key(&req.client_id))
    {
        return (response, plan);
    }

    let max_event = state.inner.max_event_bytes;
    let mut verdicts: Vec<Option<String>> = req
        .events
        .iter()
        .map(|e| {
            invalid_event(e).or_else(|| {
                let size = e.size();
                (size > max_event).then(|| {
                    format!(
                        "the event is {size} bytes (type + key + payload + headers), over this server's limit of {max_event} bytes"
                    )
                })
            })
        })
        .collect();
    if state.inner.faults_active {
        for verdict in verdicts.iter_mut().filter(|v| v.is_none()) {
            if state.inner.faults.take_event_rejection() {
                *verdict = Some("injected: rejected by the test control".into());
            }
        }
    }
    let store = Arc::clone(&state.inner.store);
    // SQLite blocks; it runs on the blocking pool. Once started, the batch
    // commits even if the client goes away meanwhile (that is the "lost
    // response" case the protocol's dedupe exists for).
    let stored = tokio::task::spawn_blocking(move || {
        let valid: Vec<&WireEvent> = req
            .events
            .iter()
            .zip(&verdicts)
            .filter(|(_, v)| v.is_none())
            .map(|(e, _)| e)
            .collect();
        let mut stored = store.push(&req.client_id, &valid)?.into_iter();
        // Merge the store's answers with the validation rejections, in request order.
        let mut results = Vec::with_capacity(req.events.len());
        for (event, verdict) in req.events.iter().zip(verdicts) {
            match verdict {
                Some(reason) => results.push(EventResult {
                    id: event.id,
                    status: ResultStatus::Rejected,
                    reason: Some(reason),
                }),
                None => results.extend(stored.next()),
            }
        }
        Ok::<_, Error>(results)
    })
    .await;
    let results = match stored {
        Ok(Ok(results)) => results,
        Ok(Err(e)) => {
            let code = if matches!(e, Error::Inbox(_)) {
                "inbox_error"
            } else {
                "storage_error"
            };
            tracing::error!(error = %e, "push failed, nothing stored");
            let msg = format!("nothing of this batch was stored, retry later: {e}");
            return (
                error_response(StatusCode::INTERNAL_SERVER_ERROR, code, msg),
                plan,
            );
        }
        Err(join) => {
            tracing::error!(error = %join, "push task failed");
            let msg = "nothing of this batch was stored, retry later";
            return (
                error_response(StatusCode::INTERNAL_SERVER_ERROR, "internal_error", msg),
                plan,
            );
        }
    };
    if state.inner.faults_active && state.inner.faults.take_drop_after_commit() {
        if let Some(r) = record {
            r.fault(faults::DROP_AFTER_COMMIT);
        }
        return (broken_response(), plan);
    }
    for r in &results {
        match r.status {
            ResultStatus::Accepted => info.accepted += 1,
            ResultStatus::Duplicate => info.duplicate += 1,
            ResultStatus::Rejected => info.rejected += 1,
        }
    }
    (Json(PushResponse { results }).into_response(), plan)
}

/// The answer of an injected failure.
fn injected_failure(status: u16, retry_after: Option<u64>) -> Response {
    let status = StatusCode::from_u16(status)
        .ok()
        .filter(|s| s.is_client_error() || s.is_server_error())
        .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = error_response(
        status,
        "injected_fault",
        "failure injected by the server's test controls",
    );
    if let Some(secs) = retry_after {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    response
}

impl AppState {
    /// Count one push under rate-limit `key`: the `429` answer when it is
    /// over the budget.
    fn rate_check(&self, key: &str) -> Result<(), Response> {
        match &self.inner.limiter {
            Some(limiter) => limiter.check(key).map_err(rate_limited),
            None => Ok(()),
        }
    }
}

/// Answer `response` to a push refused from its head, its body unread:
/// the body is first read and thrown away (up to `limit` bytes, paced like
/// any body), because a client still writing to a connection that is
/// closed under it usually reports a reset, not the answer (a relay would
/// then back off instead of refreshing its token). A body larger than that,
/// or too slow, is not waited for: the answer then closes the connection.
/// A client that sent `Expect: 100-continue` has sent no body yet and is
/// told not to.
async fn refuse_unread(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
    mut response: Response,
) -> Response {
    let limit = state.inner.body_limit;
    let expects = headers
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    let drained = !expects && {
        if declared_over(headers, limit) {
            false
        } else {
            let pace = BodyPace::new(state.inner.body_timeout.min(DRAIN_TIMEOUT));
            let mut body = pace.wrap(body);
            let mut seen = 0usize;
            loop {
                match body.frame().await {
                    None => break true,
                    Some(Err(_)) => break false,
                    Some(Ok(frame)) => {
                        seen = seen.saturating_add(frame.data_ref().map_or(0, Bytes::len));
                        if seen > limit {
                            break false;
                        }
                    }
                }
            }
        }
    };
    if !drained {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// The `408` of a push whose body did not arrive in time; the connection
/// closes with it.
fn body_timed_out(base: Duration) -> Response {
    let mut response = error_response(
        StatusCode::REQUEST_TIMEOUT,
        "request_timeout",
        format!(
            "the request body came too slowly: a push body may take {} s plus 1 s per {} bytes",
            base.as_secs(),
            BODY_MIN_RATE
        ),
    );
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// Default base time a push body may take (the body must arrive within it
/// plus 1 s per [`BODY_MIN_RATE`] bytes received): 30 s, three
/// times the reference relay's base push timeout, so a client on a slow
/// link gives up first.
pub const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// The slowest a push body may arrive on average, in bytes per second
/// (after gzip inflation), beyond its base time: 1 KiB/s, half the rate the
/// reference relay allows for (2 KiB/s).
pub const BODY_MIN_RATE: u64 = 1024;
/// Longest wait for the body of a push refused from its head: it is only
/// drained, so a slow one is not worth a connection for long.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// The pace a request body must keep: all of it read within `base +
/// bytes / BODY_MIN_RATE`, counting the bytes received so far (not the
/// declared length, which a client could inflate). A body dribbled a byte a
/// second is cut after about `base`; one sent at [`BODY_MIN_RATE`] or faster
/// is never cut (the body limit bounds its length). The connection's head
/// and idle timeouts do not apply while a request is answered, so this is
/// what frees a connection held by a slow body.
struct BodyPace {
    base: Duration,
    timed_out: Arc<std::sync::atomic::AtomicBool>,
}

impl BodyPace {
    fn new(base: Duration) -> Self {
        BodyPace {
            base,
            timed_out: Arc::default(),
        }
    }

    /// `body`, failing with an error once it falls behind the pace.
    fn wrap(&self, body: Body) -> Body {
        let start = tokio::time::Instant::now();
        Body::new(PacedBody {
            inner: body,
            start,
            base: self.base,
            seen: 0,
            sleep: Box::pin(tokio::time::sleep_until(start + self.base)),
            timed_out: Arc::clone(&self.timed_out),
        })
    }

    /// Did the body fall behind?
    fn timed_out(&self) -> bool {
        self.timed_out.load(std::sync::atomic::Ordering::Relaxed)
    }
}

struct PacedBody {
    inner: Body,
    start: tokio::time::Instant,
    base: Duration,
    seen: u64,
    sleep: std::pin::Pin<Box<tokio::time::Sleep>>,
    timed_out: Arc<std::sync::atomic::AtomicBool>,
}

impl axum::body::HttpBody for PacedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, axum::Error>>> {
        use std::task::Poll;
        let this = &mut *self;
        match std::pin::Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.seen = this.seen.saturating_add(data.len() as u64);
                    let earned = Duration::from_secs_f64(this.seen as f64 / BODY_MIN_RATE as f64);
                    let deadline = this.start + this.base + earned;
                    this.sleep.as_mut().reset(deadline);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Pending => match this.sleep.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    this.timed_out
                        .store(true, std::sync::atomic::Ordering::Relaxed);
                    Poll::Ready(Some(Err(axum::Error::new(
                        "the request body came too slowly",
                    ))))
                }
                Poll::Pending => Poll::Pending,
            },
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// The `429` of a push over its client's rate limit.
fn rate_limited(wait: Duration) -> Response {
    let secs = retry_after_secs(wait);
    let mut response = error_response(
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limited",
        format!("too many pushes from this client; retry in {secs} s"),
    );
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    response
}

/// A `200` whose body fails at once: hyper cuts the connection, so the
/// client sees a network error after the events were committed.
fn broken_response() -> Response {
    let stream = futures_util::stream::once(async {
        Err::<Bytes, std::io::Error>(std::io::Error::other(
            "response dropped on purpose by the server's test controls",
        ))
    });
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        Body::from_stream(stream),
    )
        .into_response()
}

/// Query of `GET /v1/events`.
#[derive(Deserialize)]
struct PullParams {
    #[serde(default)]
    after: Option<i64>,
    #[serde(default)]
    limit: Option<usize>,
    #[serde(default)]
    client_id: Option<String>,
}

/// `GET /v1/events?after=CURSOR&limit=N&client_id=ID`.
async fn pull(
    State(state): State<AppState>,
    headers: HeaderMap,
    query: Result<Query<PullParams>, QueryRejection>,
) -> Response {
    let access = match state.inner.auth.authenticate(&headers) {
        Ok(access) => access,
        Err(response) => return response,
    };
    let Query(params) = match query {
        Ok(q) => q,
        Err(e) => return error_response(StatusCode::BAD_REQUEST, "invalid_request", e.body_text()),
    };
    if let Some(msg) = params
        .client_id
        .as_deref()
        .and_then(|c| invalid_client_id(c, MAX_CLIENT_ID_LEN))
    {
        return error_response(StatusCode::BAD_REQUEST, "invalid_request", msg);
    }
    let stream = match access.check_read(params.client_id.as_deref()) {
        Ok(stream) => stream,
        Err(response) => return response,
    };
    let after = params.after.unwrap_or(0).max(0);
    let limit = params
        .limit
        .unwrap_or(DEFAULT_PULL_LIMIT)
        .clamp(1, MAX_PULL_LIMIT);
    let store = Arc::clone(&state.inner.store);
    let pulled = tokio::task::spawn_blocking(move || {
        pull_page(store.as_ref(), after, limit, stream.as_deref())
    })
    .await;
    match pulled {
        Ok(Ok(events)) => {
            let next_cursor = events.last().map(|e| e.cursor);
            Json(PullResponse {
                events,
                next_cursor,
            })
            .into_response()
        }
        Ok(Err(e)) => {
            tracing::error!(error = %e, "pull failed");
            error_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                "storage_error",
                e.to_string(),
            )
        }
        Err(join) => {
            tracing::error!(error = %join, "pull task failed");
            error_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_error",
                "pull failed",
            )
        }
    }
}

/// One pull page: up to `limit` events after `after`, fetched
/// [`PULL_CHUNK`] at a time, ending before the event that would take the
/// page past [`PULL_PAGE_BYTES`] (the first event always goes in). A short
/// page is not the end of the stream: only an empty one is.
fn pull_page(
    store: &dyn EventStore,
    mut after: i64,
    limit: usize,
    client_id: Option<&str>,
) -> Result<Vec<edge_outbox::protocol::ReceivedEvent>, Error> {
    let mut page = Vec::new();
    let mut bytes = 0usize;
    while page.len() < limit {
        let want = (limit - page.len()).min(PULL_CHUNK);
        let chunk = store.pull(after, want, client_id)?;
        let last_chunk = chunk.len() < want;
        for event in chunk {
            let size = event.event.size();
            if !page.is_empty() && bytes.saturating_add(size) > PULL_PAGE_BYTES {
                return Ok(page);
            }
            bytes = bytes.saturating_add(size);
            after = event.cursor;
            page.push(event);
        }
        if last_chunk {
            break;
        }
    }
    Ok(page)
}

/// How long [`crate::RunningServer::shutdown`] waits for in-flight requests.
pub(crate) const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
