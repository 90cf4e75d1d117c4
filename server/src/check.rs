//! Conformance checker: runs the obligations of `docs/protocol.md` against a
//! live push endpoint (any backend, any language) and reports, one line per
//! obligation, whether it held and what the server answered.
//!
//! Every check pushes fresh event ids (UUIDv7) and, unless a client id is
//! given (a token bound to one client), a fresh client id, so it can run
//! against a live server again and again. Every request has a 10 s timeout.
//! The two body-limit checks send twice the limit the server is said to
//! have ([`Options::body_limit`], the protocol's default 4 MiB unless told):
//! a gzip body that inflates to that size, and a plain one.
//!
//! ```no_run
//! # async fn demo() {
//! let report = edge_outbox_server::check::run("http://127.0.0.1:8080/v1/events", None).await;
//! print!("{report}");
//! assert!(report.passed());
//! # }
//! ```

use std::convert::Infallible;
use std::fmt;
use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use edge_outbox::EventId;
use edge_outbox::protocol::{ErrorBody, PushResponse, ResultStatus};
use http_body::Frame;
use serde_json::{Value, json};

/// Timeout of every request the checker makes.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The body limit assumed when none is given: the protocol's default, 4 MiB.
pub const DEFAULT_BODY_LIMIT: usize = crate::DEFAULT_BODY_LIMIT;

/// What the checker needs to know about the endpoint besides its URL.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Bearer token sent with every push but the unauthenticated one.
    pub token: Option<String>,
    /// The client id to push for (a token bound to one client needs it);
    /// `None`: a fresh random client id per check.
    pub client_id: Option<String>,
    /// The endpoint's body limit in bytes, after gzip inflation; `None`:
    /// [`DEFAULT_BODY_LIMIT`]. The body-limit checks send twice this.
    pub body_limit: Option<usize>,
}

/// One obligation and how the server did on it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckLine {
    /// The obligation, in a few words, e.g. `"resend answered duplicate"`.
    pub obligation: String,
    /// A MUST of the protocol (a failure makes the report fail).
    pub must: bool,
    /// Whether the server met it.
    pub passed: bool,
    /// What the server answered (or why the check does not apply).
    pub evidence: String,
}

/// The result of [`run`]: one line per obligation, in a fixed order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// The lines, in the order they were checked.
    pub lines: Vec<CheckLine>,
}

impl Report {
    /// True when no MUST failed.
    pub fn passed(&self) -> bool {
        self.lines.iter().all(|l| l.passed || !l.must)
    }

    /// The obligations that failed.
    pub fn failed(&self) -> Vec<&str> {
        self.lines
            .iter()
            .filter(|l| !l.passed)
            .map(|l| l.obligation.as_str())
            .collect()
    }

    fn push(&mut self, obligation: &str, must: bool, result: Result<String, String>) {
        let (passed, evidence) = match result {
            Ok(e) => (true, e),
            Err(e) => (false, e),
        };
        self.lines.push(CheckLine {
            obligation: obligation.to_owned(),
            must,
            passed,
            evidence,
        });
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for l in &self.lines {
            let verdict = if l.passed { "PASS" } else { "FAIL" };
            let kind = if l.must { "MUST" } else { "SHOULD" };
            writeln!(f, "{verdict} [{kind}] {}: {}", l.obligation, l.evidence)?;
        }
        let failed = self.lines.iter().filter(|l| !l.passed).count();
        writeln!(
            f,
            "{} of {} obligations passed{}",
            self.lines.len() - failed,
            self.lines.len(),
            if self.passed() { "" } else { "; a MUST failed" }
        )
    }
}

/// Obligation names, in report order.
pub mod obligation {
    /// Accepted, then `duplicate` when the same event is pushed again.
    pub const RESEND: &str = "resend of an event answered duplicate";
    /// The second copy of an event inside one batch answered `duplicate`.
    pub const DUPLICATE_IN_BATCH: &str = "duplicate inside one batch answered duplicate";
    /// A bad event (empty `type`) `rejected` with a reason, the rest accepted.
    pub const REJECTED: &str = "bad event rejected, the rest of the batch accepted";
    /// Unknown members of the request and of events ignored.
    pub const UNKNOWN_MEMBERS: &str = "unknown members ignored (request, event)";
    /// Protocol 2 answered `400` `unsupported_protocol`.
    pub const UNSUPPORTED_PROTOCOL: &str = "protocol 2 answered 400 unsupported_protocol";
    /// A gzip body accepted.
    pub const GZIP: &str = "gzip body accepted";
    /// A small gzip body that inflates past the body limit answered `413`.
    pub const GZIP_LIMIT: &str = "body limit applied after gzip inflation (413)";
    /// A plain body past the limit answered `413` only after it was read to
    /// the end (a SHOULD: otherwise clients see a reset, not the `413`).
    pub const DRAINED_413: &str = "oversized body read to the end, then answered 413";
    /// A push without credentials answered `401` (when credentials are required).
    pub const UNAUTHENTICATED: &str = "push without credentials answered 401";
    /// Every answer valid against the JSON Schemas in docs/schema.
    pub const SHAPE: &str = "answers valid against docs/schema";
}

/// The protocol's JSON Schemas (docs/schema), compiled once per run.
struct Schemas {
    push_response: jsonschema::Validator,
    error: jsonschema::Validator,
}

impl Schemas {
    fn new() -> Result<Self, String> {
        fn compile(name: &str, text: &str) -> Result<jsonschema::Validator, String> {
            let value: Value =
                serde_json::from_str(text).map_err(|e| format!("docs/schema/{name}: {e}"))?;
            jsonschema::draft202012::new(&value).map_err(|e| format!("docs/schema/{name}: {e}"))
        }
        Ok(Schemas {
            push_response: compile(
                "push-response.schema.json",
                include_str!("../../docs/schema/push-response.schema.json"),
            )?,
            error: compile(
                "error.schema.json",
                include_str!("../../docs/schema/error.schema.json"),
            )?,
        })
    }
}

struct Checker {
    http: reqwest::Client,
    url: String,
    token: Option<String>,
    client_id: Option<String>,
    body_limit: usize,
    seq: i64,
    schemas: Schemas,
    /// Problems with the shape of answers seen by any check.
    shape_errors: Vec<String>,
    shape_checked: usize,
}

struct Answer {
    status: u16,
    body: String,
}

impl fmt::Display for Answer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut body = self.body.trim().to_owned();
        if body.len() > 300 {
            let mut cut = 300;
            while !body.is_char_boundary(cut) {
                cut -= 1;
            }
            body.truncate(cut);
            body.push('…');
        }
        // The backend under test wrote it: no escapes into the terminal.
        write!(f, "{} {}", self.status, crate::text::printable(&body))
    }
}

impl Checker {
    fn client_id(&self) -> String {
        self.client_id
            .clone()
            .unwrap_or_else(|| EventId::new().to_string())
    }

    fn event(&mut self, event_type: &str) -> Value {
        self.seq += 1;
        json!({
            "id": EventId::new().to_string(),
            "seq": self.seq,
            "type": event_type,
            "key": "conformance",
            "payload": {"check": true},
            "headers": {"schema": "1"},
            "created_at": edge_outbox::Timestamp::now().to_rfc3339(),
        })
    }

    /// POSTs `body` (compressed here when `gzip`), with the token unless
    /// `auth` is false.
    async fn send(&mut self, body: Vec<u8>, gzip: bool, auth: bool) -> Result<Answer, String> {
        let body = if gzip { gzip_bytes(&body)? } else { body };
        self.request(body, gzip, auth, None).await
    }

    /// POSTs `body` as it is (`gzipped`: it is gzip already) with the token;
    /// `taken` counts the bytes of it the HTTP client has taken to send.
    async fn post(
        &mut self,
        body: Vec<u8>,
        gzipped: bool,
        taken: Option<Arc<AtomicUsize>>,
    ) -> Result<Answer, String> {
        self.request(body, gzipped, true, taken).await
    }

    async fn request(
        &self,
        body: Vec<u8>,
        gzipped: bool,
        auth: bool,
        taken: Option<Arc<AtomicUsize>>,
    ) -> Result<Answer, String> {
        let mut req = self
            .http
            .post(&self.url)
            .header("content-type", "application/json");
        if gzipped {
            req = req.header("content-encoding", "gzip");
        }
        if auth && let Some(t) = &self.token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let body = match taken {
            Some(taken) => reqwest::Body::wrap(CountedBody::new(body, taken)),
            None => body.into(),
        };
        let resp = req
            .body(body)
            .send()
            .await
            .map_err(|e| format!("request failed: {}", error_chain(&e)))?;
        let status = resp.status().as_u16();
        let body = resp
            .text()
            .await
            .map_err(|e| format!("reading the answer failed: {}", error_chain(&e)))?;
        Ok(Answer { status, body })
    }

    async fn push(&mut self, body: Value) -> Result<Answer, String> {
        self.send(body.to_string().into_bytes(), false, true).await
    }

    /// Validates `answer`'s body against `schema` (`push_response` or
    /// `error`), recording what does not hold for the shape line. `None`
    /// when the body is not JSON at all.
    fn check_shape(&mut self, answer: &Answer, error_body: bool) -> Option<Value> {
        self.shape_checked += 1;
        let (schema, name) = if error_body {
            (&self.schemas.error, "error")
        } else {
            (&self.schemas.push_response, "push-response")
        };
        let value: Value = match serde_json::from_str(&answer.body) {
            Ok(v) => v,
            Err(e) => {
                self.shape_errors.push(format!("not JSON ({e}): {answer}"));
                return None;
            }
        };
        let errors: Vec<String> = schema
            .iter_errors(&value)
            .map(|e| format!("{e} at \"{}\"", e.instance_path()))
            .collect();
        if !errors.is_empty() {
            self.shape_errors.push(format!(
                "{name}.schema.json: {} in {answer}",
                errors.join(", ")
            ));
        }
        Some(value)
    }

    /// A `200` answer as [`PushResponse`]; its shape is checked against
    /// push-response.schema.json on the way (a failure there is the shape
    /// line's, not this check's, as long as the statuses can be read).
    fn results(&mut self, answer: &Answer) -> Result<PushResponse, String> {
        if answer.status != 200 {
            return Err(format!("expected 200, got {answer}"));
        }
        let value = self
            .check_shape(answer, false)
            .ok_or_else(|| format!("not JSON: {answer}"))?;
        serde_json::from_value(value).map_err(|e| format!("not a push response ({e}): {answer}"))
    }

    /// An error answer's body as [`ErrorBody`], its shape checked against
    /// error.schema.json on the way.
    fn error_body(&mut self, answer: &Answer) -> Option<ErrorBody> {
        let value = self.check_shape(answer, true)?;
        serde_json::from_value(value).ok()
    }

    /// A push of one event padded with whitespace (valid JSON) to twice the
    /// body limit: what a server without a limit would accept.
    fn oversized_body(&mut self) -> Vec<u8> {
        let client = self.client_id();
        let e = self.event("ConformanceChecked");
        let mut body = json!({"protocol": 1, "client_id": client, "events": [e]})
            .to_string()
            .into_bytes();
        body.resize(self.body_limit.saturating_mul(2), b' ');
        body
    }

    fn statuses(resp: &PushResponse, ids: &[&Value]) -> Vec<Option<ResultStatus>> {
        ids.iter()
            .map(|id| {
                resp.results
                    .iter()
                    .find(|r| Some(r.id.to_string().as_str()) == id.as_str())
                    .map(|r| r.status)
            })
            .collect()
    }

    async fn resend(&mut self) -> Result<String, String> {
        let client = self.client_id();
        let e = self.event("ConformanceChecked");
        let body = json!({"protocol": 1, "client_id": client, "events": [e]});
        let first = self.push(body.clone()).await?;
        let r = self.results(&first)?;
        if Self::statuses(&r, &[&e["id"]]) != [Some(ResultStatus::Accepted)] {
            return Err(format!("first push: expected accepted, got {first}"));
        }
        let second = self.push(body).await?;
        let r = self.results(&second)?;
        if Self::statuses(&r, &[&e["id"]]) != [Some(ResultStatus::Duplicate)] {
            return Err(format!("resend: expected duplicate, got {second}"));
        }
        Ok(format!("accepted, then {second}"))
    }

    async fn duplicate_in_batch(&mut self) -> Result<String, String> {
        let client = self.client_id();
        let e = self.event("ConformanceChecked");
        let body = json!({"protocol": 1, "client_id": client, "events": [e, e]});
        let a = self.push(body).await?;
        let r = self.results(&a)?;
        let got: Vec<_> = r.results.iter().map(|r| r.status).collect();
        if got != [ResultStatus::Accepted, ResultStatus::Duplicate] {
            return Err(format!("expected [accepted, duplicate], got {a}"));
        }
        Ok(a.to_string())
    }

    async fn rejected(&mut self) -> Result<String, String> {
        let client = self.client_id();
        let good1 = self.event("ConformanceChecked");
        let bad = self.event("");
        let good2 = self.event("ConformanceChecked");
        let body = json!({"protocol": 1, "client_id": client, "events": [good1, bad, good2]});
        let a = self.push(body).await?;
        let r = self.results(&a)?;
        let got = Self::statuses(&r, &[&good1["id"], &bad["id"], &good2["id"]]);
        use ResultStatus::*;
        if got != [Some(Accepted), Some(Rejected), Some(Accepted)] {
            return Err(format!(
                "expected accepted, rejected (empty type), accepted; got {a}"
            ));
        }
        Ok(a.to_string())
    }

    async fn unknown_members(&mut self) -> Result<String, String> {
        let client = self.client_id();
        let mut e = self.event("ConformanceChecked");
        e["x_conformance_unknown"] = json!({"nested": [1, 2]});
        let body = json!({
            "protocol": 1,
            "client_id": client,
            "events": [e],
            "x_conformance_unknown": "ignored",
        });
        let a = self.push(body).await?;
        let r = self.results(&a)?;
        if Self::statuses(&r, &[&e["id"]]) != [Some(ResultStatus::Accepted)] {
            return Err(format!("expected accepted, got {a}"));
        }
        Ok(a.to_string())
    }

    async fn unsupported_protocol(&mut self) -> Result<String, String> {
        let client = self.client_id();
        let e = self.event("ConformanceChecked");
        let a = self
            .push(json!({"protocol": 2, "client_id": client, "events": [e]}))
            .await?;
        if a.status != 400 {
            return Err(format!("expected 400, got {a}"));
        }
        match self.error_body(&a) {
            Some(b) if b.error == "unsupported_protocol" => Ok(a.to_string()),
            Some(_) => Err(format!(
                "expected \"error\":\"unsupported_protocol\", got {a}"
            )),
            None => Err(format!("not an error body: {a}")),
        }
    }

    async fn gzip(&mut self) -> Result<String, String> {
        let client = self.client_id();
        let e = self.event("ConformanceChecked");
        let body = json!({"protocol": 1, "client_id": client, "events": [e]});
        let a = self.send(body.to_string().into_bytes(), true, true).await?;
        let r = self.results(&a)?;
        if Self::statuses(&r, &[&e["id"]]) != [Some(ResultStatus::Accepted)] {
            return Err(format!("expected accepted, got {a}"));
        }
        Ok(format!("Content-Encoding: gzip → {a}"))
    }

    async fn gzip_limit(&mut self) -> Result<String, String> {
        let body = self.oversized_body();
        let inflated = body.len();
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(&body).map_err(|e| format!("gzip: {e}"))?;
        let body = enc.finish().map_err(|e| format!("gzip: {e}"))?;
        let sent = body.len();
        let a = self.post(body, true, None).await?;
        let what = format!(
            "{} gzip inflating to {} (twice the body limit {})",
            size(sent),
            size(inflated),
            size(self.body_limit)
        );
        match a.status {
            413 => {
                self.error_body(&a);
                Ok(format!("{what} → {a}"))
            }
            200 => Err(format!(
                "{what} accepted: no limit after inflation (or a limit above the one given \
                 with --body-limit) → {a}"
            )),
            _ => Err(format!("{what}: expected 413, got {a}")),
        }
    }

    async fn drained_413(&mut self) -> Result<String, String> {
        let body = self.oversized_body();
        let total = body.len();
        let taken = Arc::new(AtomicUsize::new(0));
        let answer = self.post(body, false, Some(taken.clone())).await;
        let taken = taken.load(Ordering::SeqCst);
        let what = format!(
            "a plain body of {} (twice the body limit {})",
            size(total),
            size(self.body_limit)
        );
        match answer {
            Ok(a) if a.status == 413 && taken == total => {
                self.error_body(&a);
                Ok(format!("{what}, read to the end → {a}"))
            }
            Ok(a) if a.status == 413 => Err(format!(
                "{what}: answered before {} of it was read: a client still writing would see \
                 a reset instead → {a}",
                size(total - taken)
            )),
            Ok(a) if a.status == 200 => Err(format!(
                "{what} accepted: no body limit (or one above --body-limit) → {a}"
            )),
            Ok(a) => Err(format!("{what}: expected 413, got {a}")),
            Err(e) => Err(format!(
                "{what}: the connection failed after {} of it was sent, so the 413 (if any) \
                 was lost: {e}",
                size(taken)
            )),
        }
    }

    /// `Ok((passed, evidence))`.
    async fn unauthenticated(&mut self) -> Result<String, String> {
        let client = self.client_id();
        let e = self.event("ConformanceChecked");
        let body = json!({"protocol": 1, "client_id": client, "events": [e]});
        let a = self
            .send(body.to_string().into_bytes(), false, false)
            .await?;
        match a.status {
            401 => {
                self.error_body(&a);
                Ok(a.to_string())
            }
            200 => Ok(format!(
                "not applicable: accepts anonymous pushes (no Authorization → {a})"
            )),
            _ => Err(format!("expected 401, got {a}")),
        }
    }
}

fn gzip_bytes(body: &[u8]) -> Result<Vec<u8>, String> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(body).map_err(|e| format!("gzip: {e}"))?;
    enc.finish().map_err(|e| format!("gzip: {e}"))
}

/// An error and its sources, `: `-joined (reqwest's own message hides the
/// cause, e.g. "connection reset by peer").
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// `n` bytes, for the evidence: "8 MiB", "12.3 KiB", "512 B".
fn size(n: usize) -> String {
    const KIB: usize = 1024;
    const MIB: usize = 1024 * KIB;
    if n >= MIB && n.is_multiple_of(MIB) {
        format!("{} MiB", n / MIB)
    } else if n >= MIB {
        format!("{:.1} MiB", n as f64 / MIB as f64)
    } else if n >= KIB {
        format!("{:.1} KiB", n as f64 / KIB as f64)
    } else {
        format!("{n} B")
    }
}

/// A request body handed to the HTTP client 64 KiB at a time, counting what
/// it has taken: the client takes more only as the server reads, so a count
/// short of the length means the server stopped reading. Its exact size is
/// known, so the request has a `Content-Length`.
struct CountedBody {
    data: Bytes,
    taken: Arc<AtomicUsize>,
}

impl CountedBody {
    const CHUNK: usize = 64 * 1024;

    fn new(data: Vec<u8>, taken: Arc<AtomicUsize>) -> Self {
        CountedBody {
            data: Bytes::from(data),
            taken,
        }
    }
}

impl http_body::Body for CountedBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.data.is_empty() {
            return std::task::Poll::Ready(None);
        }
        let n = self.data.len().min(Self::CHUNK);
        let chunk = self.data.split_to(n);
        self.taken.fetch_add(n, Ordering::SeqCst);
        std::task::Poll::Ready(Some(Ok(Frame::data(chunk))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_empty()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.data.len() as u64)
    }
}

/// Runs every obligation against the push endpoint `url` (e.g.
/// `http://127.0.0.1:8080/v1/events`), with `token` as the bearer token if
/// given. Each check uses a fresh random client id.
pub async fn run(url: &str, token: Option<&str>) -> Report {
    run_as(url, token, None).await
}

/// [`run`], pushing for `client_id` when given (a server that binds each
/// token to one client id needs it) instead of a fresh client id per check.
pub async fn run_as(url: &str, token: Option<&str>, client_id: Option<&str>) -> Report {
    let options = Options {
        token: token.map(str::to_owned),
        client_id: client_id.map(str::to_owned),
        body_limit: None,
    };
    run_with(url, &options).await
}

/// Runs every obligation against the push endpoint `url` with `options`;
/// one line per obligation, in [`obligation`]'s order.
pub async fn run_with(url: &str, options: &Options) -> Report {
    let mut report = Report::default();
    let http = reqwest::Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .connect_timeout(REQUEST_TIMEOUT)
        .build()
        .map_err(|e| e.to_string());
    let (http, schemas) = match (http, Schemas::new()) {
        (Ok(h), Ok(s)) => (h, s),
        (Err(e), _) | (_, Err(e)) => {
            report.push("checker setup", true, Err(e));
            return report;
        }
    };
    // Seqs increase across runs too (a client id may be reused with a token).
    let seq = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64 * 1000)
        .unwrap_or(0);
    let mut c = Checker {
        http,
        url: url.to_owned(),
        token: options.token.clone(),
        client_id: options.client_id.clone(),
        body_limit: options.body_limit.unwrap_or(DEFAULT_BODY_LIMIT),
        seq,
        schemas,
        shape_errors: Vec::new(),
        shape_checked: 0,
    };
    use obligation::*;
    let r = c.resend().await;
    report.push(RESEND, true, r);
    let r = c.duplicate_in_batch().await;
    report.push(DUPLICATE_IN_BATCH, true, r);
    let r = c.rejected().await;
    report.push(REJECTED, true, r);
    let r = c.unknown_members().await;
    report.push(UNKNOWN_MEMBERS, true, r);
    let r = c.unsupported_protocol().await;
    report.push(UNSUPPORTED_PROTOCOL, true, r);
    let r = c.gzip().await;
    report.push(GZIP, true, r);
    let r = c.gzip_limit().await;
    report.push(GZIP_LIMIT, true, r);
    let r = c.drained_413().await;
    report.push(DRAINED_413, false, r);
    let r = c.unauthenticated().await;
    report.push(UNAUTHENTICATED, true, r);
    let r = if c.shape_errors.is_empty() {
        Ok(format!(
            "{} answers valid against push-response.schema.json / error.schema.json",
            c.shape_checked
        ))
    } else {
        Err(c.shape_errors.join("; "))
    };
    report.push(SHAPE, true, r);
    report
}
