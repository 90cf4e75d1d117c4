//! Conformance checker: runs the obligations of `docs/protocol.md` against a
//! live push endpoint (any backend, any language) and reports, one line per
//! obligation, whether it held and what the server answered.
//!
//! Every check pushes fresh event ids (UUIDv7) and, unless a client id is
//! given (a token bound to one client), a fresh client id, so it can run
//! against a live server again and again. Every request has a 10 s timeout.
//!
//! ```no_run
//! # async fn demo() {
//! let report = edge_outbox_server::check::run("http://127.0.0.1:8080/v1/events", None).await;
//! print!("{report}");
//! assert!(report.passed());
//! # }
//! ```

use std::fmt;
use std::io::Write;
use std::time::Duration;

use edge_outbox::EventId;
use edge_outbox::protocol::{ErrorBody, PushResponse, ResultStatus};
use serde_json::{Value, json};

/// Timeout of every request the checker makes.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

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
    /// A push without credentials answered `401` (when credentials are required).
    pub const UNAUTHENTICATED: &str = "push without credentials answered 401";
    /// Every answer has the shape of docs/schema.
    pub const SHAPE: &str = "answers valid against docs/schema";
}

struct Checker {
    http: reqwest::Client,
    url: String,
    token: Option<String>,
    client_id: Option<String>,
    seq: i64,
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
        write!(f, "{} {}", self.status, body)
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

    async fn send(&mut self, body: Vec<u8>, gzip: bool, auth: bool) -> Result<Answer, String> {
        let mut req = self
            .http
            .post(&self.url)
            .header("content-type", "application/json");
        let body = if gzip {
            let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            enc.write_all(&body).map_err(|e| format!("gzip: {e}"))?;
            req = req.header("content-encoding", "gzip");
            enc.finish().map_err(|e| format!("gzip: {e}"))?
        } else {
            body
        };
        if auth && let Some(t) = &self.token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let resp = req
            .body(body)
            .send()
            .await
            .map_err(|e| format!("request failed: {e}"))?;
        let status = resp.status().as_u16();
        let body = resp
            .text()
            .await
            .map_err(|e| format!("reading the answer failed: {e}"))?;
        Ok(Answer { status, body })
    }

    async fn push(&mut self, body: Value) -> Result<Answer, String> {
        self.send(body.to_string().into_bytes(), false, true).await
    }

    /// A `200` answer as [`PushResponse`], checking the shape on the way.
    fn results(&mut self, answer: &Answer) -> Result<PushResponse, String> {
        if answer.status != 200 {
            return Err(format!("expected 200, got {answer}"));
        }
        self.shape_checked += 1;
        match parse_push_response(&answer.body) {
            Ok(r) => Ok(r),
            Err(e) => {
                self.shape_errors.push(format!("{e} in {answer}"));
                Err(format!("{e} in {answer}"))
            }
        }
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
        self.shape_checked += 1;
        match serde_json::from_str::<ErrorBody>(&a.body) {
            Ok(b) if b.error == "unsupported_protocol" => Ok(a.to_string()),
            Ok(_) => Err(format!(
                "expected \"error\":\"unsupported_protocol\", got {a}"
            )),
            Err(err) => {
                self.shape_errors.push(format!("error body: {err} in {a}"));
                Err(format!("not an error body ({err}): {a}"))
            }
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
                self.shape_checked += 1;
                if let Err(err) = serde_json::from_str::<ErrorBody>(&a.body) {
                    self.shape_errors.push(format!("error body: {err} in {a}"));
                }
                Ok(a.to_string())
            }
            200 => Ok(format!(
                "not applicable: accepts anonymous pushes (no Authorization → {a})"
            )),
            _ => Err(format!("expected 401, got {a}")),
        }
    }
}

/// Checks a `200` push answer against `docs/schema/push-response.schema.json`:
/// deserializes into [`PushResponse`] and checks the members it requires.
fn parse_push_response(body: &str) -> Result<PushResponse, String> {
    let value: Value = serde_json::from_str(body).map_err(|e| format!("not JSON ({e})"))?;
    let results = value
        .get("results")
        .and_then(Value::as_array)
        .ok_or("no \"results\" array")?;
    for r in results {
        for member in ["id", "status"] {
            if r.get(member).is_none() {
                return Err(format!("a result without \"{member}\""));
            }
        }
        if r["status"] == "rejected"
            && r.get("reason")
                .and_then(Value::as_str)
                .is_none_or(str::is_empty)
        {
            return Err("a rejected result without a \"reason\"".to_owned());
        }
    }
    serde_json::from_value(value).map_err(|e| format!("not a push response ({e})"))
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
    let mut report = Report::default();
    let http = match reqwest::Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .connect_timeout(REQUEST_TIMEOUT)
        .build()
    {
        Ok(h) => h,
        Err(e) => {
            report.push("HTTP client", true, Err(e.to_string()));
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
        token: token.map(str::to_owned),
        client_id: client_id.map(str::to_owned),
        seq,
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
    let r = c.unauthenticated().await;
    report.push(UNAUTHENTICATED, true, r);
    let r = if c.shape_errors.is_empty() {
        Ok(format!(
            "{} answers read as push responses / error bodies with their required members",
            c.shape_checked
        ))
    } else {
        Err(c.shape_errors.join("; "))
    };
    report.push(SHAPE, true, r);
    report
}
