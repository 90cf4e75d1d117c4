//! The conformance checker (`edge_outbox_server::check`): all PASS against
//! the reference server (anonymous and with a token), and against three
//! deliberately broken backends (small axum fixtures below) it fails on
//! exactly the obligations each one breaks.

use std::collections::HashSet;
use std::io::Read;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use edge_outbox_server::ServerConfig;
use edge_outbox_server::check::{self, Report, obligation};
use serde_json::{Value, json};

const CLIENT: &str = "0192f0c1-7c1e-7000-8000-0000000000c1";
const TOKEN: &str = "check-token";

fn assert_fails_exactly(report: &Report, expected: &[&str]) {
    print!("{report}");
    assert_eq!(report.failed(), expected, "report:\n{report}");
    assert_eq!(report.passed(), expected.is_empty());
    assert_eq!(report.lines.len(), 8);
}

#[tokio::test]
async fn reference_server_passes_every_obligation_anonymous() {
    let server = edge_outbox_server::spawn(ServerConfig::in_memory().allow_anonymous(true))
        .await
        .unwrap();
    let report = check::run(&server.events_url(), None).await;
    assert_fails_exactly(&report, &[]);
    let auth = &report.lines[6];
    assert_eq!(auth.obligation, obligation::UNAUTHENTICATED);
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
        let auth = &report.lines[6];
        assert!(auth.evidence.starts_with("401 "), "{}", auth.evidence);
    }
    server.shutdown().await.unwrap();
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
}

#[derive(Clone)]
struct Fixture {
    broken: Broken,
    seen: Arc<Mutex<HashSet<(String, String)>>>,
}

fn error(status: StatusCode, code: &str) -> (StatusCode, String) {
    (status, json!({"error": code, "message": code}).to_string())
}

async fn push(State(f): State<Fixture>, headers: HeaderMap, body: Bytes) -> (StatusCode, String) {
    let body = if headers
        .get("content-encoding")
        .is_some_and(|v| v.as_bytes() == b"gzip")
    {
        let mut out = Vec::new();
        if flate2::read::GzDecoder::new(&body[..])
            .read_to_end(&mut out)
            .is_err()
        {
            return error(StatusCode::BAD_REQUEST, "malformed_json");
        }
        out
    } else {
        body.to_vec()
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
            results.push(json!({"id": id, "status": "rejected", "reason": "empty type"}));
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
    assert!(report.lines[0].evidence.contains("\"accepted\""));
}

#[tokio::test]
async fn a_backend_that_refuses_unknown_members_fails_that_line() {
    let report = check_broken(Broken::RefusesUnknownMembers).await;
    assert_fails_exactly(&report, &[obligation::UNKNOWN_MEMBERS]);
    assert!(report.lines[3].evidence.contains("400"));
}

#[tokio::test]
async fn a_backend_that_answers_500_for_a_bad_event_fails_that_line() {
    let report = check_broken(Broken::Fails500OnBadEvent).await;
    assert_fails_exactly(&report, &[obligation::REJECTED]);
    assert!(report.lines[2].evidence.contains("500"));
}

#[tokio::test]
async fn an_endpoint_that_is_down_fails_with_the_error() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let report = check::run(&format!("http://{addr}/v1/events"), None).await;
    print!("{report}");
    assert!(!report.passed());
    assert!(report.lines[0].evidence.contains("request failed"));
}
