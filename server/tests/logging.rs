//! The request log as JSON lines, captured. A test binary of its own: a
//! `tracing` callsite that another test's thread registers while this test
//! installs its subscriber can cache "never" and stay silent (tracing-core
//! computes a callsite's interest once), so no other test runs beside it.

use std::io::Write;
use std::sync::{Arc, Mutex};

use edge_outbox::protocol::{PROTOCOL_VERSION, PushRequest};
use edge_outbox::{EventId, Timestamp};
use edge_outbox_server::ServerConfig;
use edge_outbox_server::logging::{LogFormat, subscriber};
use serde_json::{Value, json};

const CLIENT_A: &str = "0192f0c1-7c1e-7000-8000-00000000000a";
const TOKEN_A: &str = "token-a";

/// A `MakeWriter` that keeps what is written, for reading back.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Captured {
        self.clone()
    }
}

// One thread (the default flavor): the server's tasks run where the
// subscriber is installed (set_default is per thread).
#[tokio::test]
async fn each_request_is_logged_as_a_json_line() {
    let out = Captured::default();
    let _guard =
        tracing::subscriber::set_default(subscriber(LogFormat::Json, "info", false, out.clone()));
    let dir = tempfile::tempdir().unwrap();
    let server = edge_outbox_server::spawn(
        ServerConfig::new(dir.path().join("s.db")).token(TOKEN_A, CLIENT_A),
    )
    .await
    .unwrap();
    let events: Vec<Value> = (1..3)
        .map(|seq| {
            json!({"id": EventId::new(), "seq": seq, "type": "OrderCreated",
                   "payload": {"order_id": seq}, "headers": {},
                   "created_at": Timestamp::now().to_rfc3339()})
        })
        .collect();
    let body = json!({"protocol": PROTOCOL_VERSION, "client_id": CLIENT_A, "events": events});
    // The body is a valid push request.
    serde_json::from_value::<PushRequest>(body.clone()).unwrap();
    let resp = reqwest::Client::new()
        .post(server.events_url())
        .header("authorization", format!("Bearer {TOKEN_A}"))
        .header("content-type", "application/json")
        .body(serde_json::to_vec(&body).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    // A refused client id never reaches the log: it may hold terminal
    // escapes or bidi controls.
    let hostile = "\u{1b}]0;owned\u{7}\u{1b}[2J\u{202E}evil";
    let mut refused = body.clone();
    refused["client_id"] = json!(hostile);
    let resp = reqwest::Client::new()
        .post(server.events_url())
        .header("authorization", format!("Bearer {TOKEN_A}"))
        .header("content-type", "application/json")
        .body(serde_json::to_vec(&refused).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    server.shutdown().await.unwrap();

    let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
    let line = text
        .lines()
        .find(|l| l.contains("\"path\":\"/v1/events\""))
        .unwrap_or_else(|| panic!("no request line in:\n{text}"));
    let v: Value = serde_json::from_str(line).expect("a JSON log line");
    assert_eq!(v["level"], "INFO");
    assert_eq!(v["target"], "edge_outbox_server::request");
    assert_eq!(v["message"], "request");
    assert_eq!(v["method"], "POST");
    assert_eq!(v["path"], "/v1/events");
    assert_eq!(v["status"], 200);
    assert_eq!(v["client_id"], CLIENT_A);
    assert_eq!(v["events"], 2);
    assert!(v["duration_ms"].as_f64().unwrap() > 0.0);
    assert!(v["timestamp"].is_string());
    let refused_line = text
        .lines()
        .find(|l| l.contains("\"status\":400"))
        .unwrap_or_else(|| panic!("no line for the refused push in:\n{text}"));
    let v: Value = serde_json::from_str(refused_line).unwrap();
    assert_eq!(v["client_id"], "", "{refused_line}");
    assert!(
        !text.contains("owned") && !text.contains('\u{202E}'),
        "{text}"
    );
    // The text format, for contrast: one line, the same fields.
    let text_out = Captured::default();
    let sub = subscriber(LogFormat::Text, "info", false, text_out.clone());
    tracing::subscriber::with_default(sub, || {
        tracing::info!(target: "edge_outbox_server::request", status = 200u16, "request");
    });
    let text = String::from_utf8(text_out.0.lock().unwrap().clone()).unwrap();
    assert!(
        text.contains("INFO") && text.contains("status=200"),
        "{text}"
    );
}
