//! The conformance checker (`edge_outbox_server::check`): all PASS against
//! the reference server (anonymous, with a token, with another body limit;
//! on PostgreSQL: server/tests/postgres.rs), and against deliberately broken
//! backends (small axum fixtures below) it fails on exactly the obligations
//! each one breaks.

use std::collections::HashSet;
use std::io::Read;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use edge_outbox_server::ServerConfig;
use edge_outbox_server::check::{self, CheckLine, Options, Report, obligation};
use futures_util::StreamExt;
use serde_json::{Value, json};

const CLIENT: &str = "0192f0c1-7c1e-7000-8000-0000000000c1";
const TOKEN: &str = "check-token";

fn assert_fails_exactly(report: &Report, expected: &[&str]) {
    print!("{report}");
    assert_eq!(report.failed(), expected, "report:\n{report}");
    assert_eq!(report.passed(), expected.is_empty());
    assert_eq!(report.lines.len(), 10);
}

fn line<'a>(report: &'a Report, obligation: &str) -> &'a CheckLine {
    report
        .lines
        .iter()
        .find(|l| l.obligation == obligation)
        .unwrap_or_else(|| panic!("no line {obligation:?} in\n{report}"))
}

#[tokio::test]
async fn reference_server_passes_every_obligation_anonymous() {
    let server = edge_outbox_server::spawn(ServerConfig::in_memory().allow_anonymous(true))
        .await
        .unwrap();
    let report = check::run(&server.events_url(), None).await;
    assert_fails_exactly(&report, &[]);
    let auth = line(&report, obligation::UNAUTHENTICATED);
    assert!(
        auth.evidence
            .starts_with("not applicable: accepts anonymous pushes"),
        "{}",
        auth.evidence
    );
    // Again on the same server: fresh ids, still all PASS.
    assert_fails_exactly(&check::run(&server.events_url(), None).await, &[]);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn reference_server_passes_every_obligation_with_a_token() {
    let server = edge_outbox_server::spawn(ServerConfig::in_memory().token(TOKEN, CLIENT))
        .await
        .unwrap();
    for _ in 0..2 {
        let report = check::run_as(&server.events_url(), Some(TOKEN), Some(CLIENT)).await;
        assert_fails_exactly(&report, &[]);
        let auth = line(&report, obligation::UNAUTHENTICATED);
        assert!(auth.evidence.starts_with("401 "), "{}", auth.evidence);
    }
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_body_limit_checks_follow_the_limit_they_are_given() {
    // A server with a 1 MiB limit: told so, every line passes, and the
    // evidence names the sizes sent; left at the 4 MiB default, the bodies
    // (8 MiB) are still over its limit, so it still passes.
    let server = edge_outbox_server::spawn(
        ServerConfig::in_memory()
            .allow_anonymous(true)
            .body_limit(1 << 20),
    )
    .await
    .unwrap();
    let options = Options {
        body_limit: Some(1 << 20),
        ..Options::default()
    };
    let report = check::run_with(&server.events_url(), &options).await;
    assert_fails_exactly(&report, &[]);
    let gzip = line(&report, obligation::GZIP_LIMIT);
    assert!(
        gzip.evidence.contains("inflating to 2 MiB") && gzip.evidence.contains("413"),
        "{}",
        gzip.evidence
    );
    let drained = line(&report, obligation::DRAINED_413);
    assert!(
        drained.evidence.contains("2 MiB") && drained.evidence.contains("read to the end"),
        "{}",
        drained.evidence
    );
    // A server whose real limit (64 MiB) is above the one the checker is
    // told (4 MiB, the default): the 8 MiB bodies fit and are accepted, so
    // both lines fail, and say the limit may be above the one given.
    let server_big = edge_outbox_server::spawn(
        ServerConfig::in_memory()
            .allow_anonymous(true)
            .body_limit(64 << 20),
    )
    .await
    .unwrap();
    let report = check::run_with(&server_big.events_url(), &Options::default()).await;
    assert_fails_exactly(&report, &[obligation::GZIP_LIMIT, obligation::DRAINED_413]);
    assert!(
        line(&report, obligation::GZIP_LIMIT)
            .evidence
            .contains("--body-limit")
    );
    server.shutdown().await.unwrap();
    server_big.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_wrong_token_fails_the_must_lines() {
    let server = edge_outbox_server::spawn(ServerConfig::in_memory().token(TOKEN, CLIENT))
        .await
        .unwrap();
    let report = check::run(&server.events_url(), Some("wrong")).await;
    print!("{report}");
    assert!(!report.passed());
    server.shutdown().await.unwrap();
}

// ---------- broken backends ----------

#[derive(Clone, Copy, PartialEq)]
enum Broken {
    /// Answers `accepted` for every good event, even a resend.
    IgnoresDedupe,
    /// `400` on any member the protocol does not list.
    RefusesUnknownMembers,
    /// `500` for the whole batch when an event is bad.
    Fails500OnBadEvent,
    /// Applies its body limit to the compressed bytes only: a gzip body
    /// inflates without bound.
    NoLimitAfterInflation,
    /// Answers `413` from `Content-Length` alone, reading none of the body.
    AnswersBeforeReading,
    /// Leaves out the `reason` of a `rejected` result.
    RejectsWithoutReason,
}

/// The fixtures' body limit: the protocol's default, as the checker assumes.
const LIMIT: usize = 4 << 20;

/// Reads a request body as a careful backend does: at most [`LIMIT`] bytes
/// (of the inflated body, unless the fixture is broken that way), and past
/// it reads on and throws the rest away before answering `413`.
async fn read_body(
    broken: Broken,
    gzip: bool,
    body: Body,
) -> Result<Vec<u8>, (StatusCode, String)> {
    let mut raw = Vec::new();
    let mut seen = 0usize;
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|_| error(StatusCode::BAD_REQUEST, "unreadable_body"))?;
        seen += chunk.len();
        if seen <= LIMIT {
            raw.extend_from_slice(&chunk);
        }
    }
    if seen > LIMIT {
        return Err(error(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"));
    }
    if !gzip {
        return Ok(raw);
    }
    let mut out = Vec::new();
    let decoder = flate2::read::GzDecoder::new(&raw[..]);
    let read = if broken == Broken::NoLimitAfterInflation {
        { decoder }.read_to_end(&mut out)
    } else {
        decoder.take(LIMIT as u64 + 1).read_to_end(&mut out)
    };
    if read.is_err() {
        return Err(error(StatusCode::BAD_REQUEST, "malformed_json"));
    }
    if out.len() > LIMIT && broken != Broken::NoLimitAfterInflation {
        return Err(error(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"));
    }
    Ok(out)
}

#[derive(Clone)]
struct Fixture {
    broken: Broken,
    seen: Arc<Mutex<HashSet<(String, String)>>>,
}

fn error(status: StatusCode, code: &str) -> (StatusCode, String) {
    (status, json!({"error": code, "message": code}).to_string())
}

async fn push(State(f): State<Fixture>, headers: HeaderMap, body: Body) -> (StatusCode, String) {
    if f.broken == Broken::AnswersBeforeReading
        && headers
            .get("content-length")
            .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
            .is_some_and(|n| n > LIMIT)
    {
        return error(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large");
    }
    let gzip = headers
        .get("content-encoding")
        .is_some_and(|v| v.as_bytes() == b"gzip");
    let body = match read_body(f.broken, gzip, body).await {
        Ok(body) => body,
        Err(answer) => return answer,
    };
    let Ok(req) = serde_json::from_slice::<Value>(&body) else {
        return error(StatusCode::BAD_REQUEST, "malformed_json");
    };
    if f.broken == Broken::RefusesUnknownMembers {
        let known = |v: &Value, names: &[&str]| {
            v.as_object()
                .is_some_and(|o| o.keys().all(|k| names.contains(&k.as_str())))
        };
        let events_ok = req["events"].as_array().is_some_and(|es| {
            es.iter().all(|e| {
                known(
                    e,
                    &[
                        "id",
                        "seq",
                        "type",
                        "key",
                        "payload",
                        "headers",
                        "created_at",
                    ],
                )
            })
        });
        if !known(&req, &["protocol", "client_id", "events"]) || !events_ok {
            return error(StatusCode::BAD_REQUEST, "invalid_request");
        }
    }
    if req["protocol"] != 1 {
        return error(StatusCode::BAD_REQUEST, "unsupported_protocol");
    }
    let client = req["client_id"].as_str().unwrap_or_default().to_owned();
    let mut seen = f.seen.lock().unwrap();
    let mut results = Vec::new();
    for e in req["events"].as_array().cloned().unwrap_or_default() {
        let id = e["id"].as_str().unwrap_or_default().to_owned();
        if e["type"].as_str().is_none_or(str::is_empty) {
            if f.broken == Broken::Fails500OnBadEvent {
                return error(StatusCode::INTERNAL_SERVER_ERROR, "internal");
            }
            results.push(if f.broken == Broken::RejectsWithoutReason {
                json!({"id": id, "status": "rejected"})
            } else {
                json!({"id": id, "status": "rejected", "reason": "empty type"})
            });
            continue;
        }
        let new = seen.insert((client.clone(), id.clone()));
        let status = if new || f.broken == Broken::IgnoresDedupe {
            "accepted"
        } else {
            "duplicate"
        };
        results.push(json!({"id": id, "status": status}));
    }
    (StatusCode::OK, json!({"results": results}).to_string())
}

async fn check_broken(broken: Broken) -> Report {
    let app = Router::new()
        .route("/v1/events", post(push))
        .layer(DefaultBodyLimit::disable())
        .with_state(Fixture {
            broken,
            seen: Arc::default(),
        });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move { axum::serve(listener, app).await });
    let report = check::run(&format!("http://{addr}/v1/events"), None).await;
    task.abort();
    report
}

#[tokio::test]
async fn a_backend_that_ignores_dedupe_fails_the_dedupe_lines() {
    let report = check_broken(Broken::IgnoresDedupe).await;
    assert_fails_exactly(
        &report,
        &[obligation::RESEND, obligation::DUPLICATE_IN_BATCH],
    );
    assert!(
        line(&report, obligation::RESEND)
            .evidence
            .contains("\"accepted\"")
    );
}

#[tokio::test]
async fn a_backend_that_refuses_unknown_members_fails_that_line() {
    let report = check_broken(Broken::RefusesUnknownMembers).await;
    assert_fails_exactly(&report, &[obligation::UNKNOWN_MEMBERS]);
    assert!(
        line(&report, obligation::UNKNOWN_MEMBERS)
            .evidence
            .contains("400")
    );
}

#[tokio::test]
async fn a_backend_that_answers_500_for_a_bad_event_fails_that_line() {
    let report = check_broken(Broken::Fails500OnBadEvent).await;
    assert_fails_exactly(&report, &[obligation::REJECTED]);
    assert!(line(&report, obligation::REJECTED).evidence.contains("500"));
}

#[tokio::test]
async fn a_backend_that_limits_only_the_compressed_body_fails_the_inflation_line() {
    let report = check_broken(Broken::NoLimitAfterInflation).await;
    assert_fails_exactly(&report, &[obligation::GZIP_LIMIT]);
    let evidence = &line(&report, obligation::GZIP_LIMIT).evidence;
    assert!(
        evidence.contains("inflating to 8 MiB") && evidence.contains("accepted"),
        "{evidence}"
    );
}

#[tokio::test]
async fn a_backend_that_answers_413_without_reading_the_body_fails_the_drain_line() {
    let report = check_broken(Broken::AnswersBeforeReading).await;
    // A SHOULD: the line fails, the report (MUSTs) still passes.
    print!("{report}");
    assert_eq!(report.failed(), [obligation::DRAINED_413], "{report}");
    assert!(report.passed());
    let evidence = &line(&report, obligation::DRAINED_413).evidence;
    assert!(
        evidence.contains("before") || evidence.contains("connection failed"),
        "{evidence}"
    );
}

#[tokio::test]
async fn a_backend_whose_rejections_lack_a_reason_fails_the_schema_line() {
    let report = check_broken(Broken::RejectsWithoutReason).await;
    assert_fails_exactly(&report, &[obligation::SHAPE]);
    let evidence = &line(&report, obligation::SHAPE).evidence;
    assert!(
        evidence.contains("push-response.schema.json") && evidence.contains("reason"),
        "{evidence}"
    );
}

#[tokio::test]
async fn an_endpoint_that_is_down_fails_with_the_error() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let report = check::run(&format!("http://{addr}/v1/events"), None).await;
    print!("{report}");
    assert!(!report.passed());
    assert!(
        line(&report, obligation::RESEND)
            .evidence
            .contains("request failed")
    );
}
