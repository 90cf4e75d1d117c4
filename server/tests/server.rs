//! Integration tests of the reference server: a real server on 127.0.0.1,
//! real SQLite files in temp dirs, reqwest as the client. Also checks the
//! JSON Schemas under docs/schema against real serialized values and against
//! the examples of docs/protocol.md.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use edge_outbox::protocol::{
    ErrorBody, EventResult, PROTOCOL_VERSION, PullResponse, PushRequest, PushResponse,
    ResultStatus, WireEvent,
};
use edge_outbox::{EventId, Timestamp};
use edge_outbox_server::{
    Applied, BoxError, Failure, Inbox, RequestRecord, RunningServer, ServerConfig,
};
use reqwest::StatusCode;
use serde_json::value::RawValue;
use serde_json::{Value, json};
use tempfile::TempDir;

const CLIENT_A: &str = "0192f0c1-7c1e-7000-8000-00000000000a";
const CLIENT_B: &str = "0192f0c1-7c1e-7000-8000-00000000000b";
const TOKEN_A: &str = "token-a";
const TOKEN_B: &str = "token-b";
/// A backend's token: reads every stream, pushes for no one.
const READER: &str = "reader-token";

// ---------- helpers ----------

/// A server on a fresh SQLite file with tokens for clients A and B and a reader token.
async fn start(configure: impl FnOnce(ServerConfig) -> ServerConfig) -> (RunningServer, TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = ServerConfig::new(dir.path().join("server.db"))
        .token(TOKEN_A, CLIENT_A)
        .token(TOKEN_B, CLIENT_B)
        .reader_token(READER);
    let server = edge_outbox_server::spawn(configure(config))
        .await
        .expect("server starts");
    (server, dir)
}

fn event(seq: i64, event_type: &str) -> WireEvent {
    WireEvent {
        id: EventId::new(),
        seq,
        event_type: event_type.to_owned(),
        key: Some(format!("order-{seq}")),
        payload: RawValue::from_string(format!(r#"{{"order_id":{seq},"amount":250}}"#)).unwrap(),
        headers: BTreeMap::from([("schema".to_owned(), "1".to_owned())]),
        created_at: Timestamp::now().to_rfc3339(),
    }
}

fn events(seqs: std::ops::Range<i64>) -> Vec<WireEvent> {
    seqs.map(|s| event(s, "OrderCreated")).collect()
}

fn body(client_id: &str, events: &[WireEvent]) -> Vec<u8> {
    serde_json::to_vec(&PushRequest {
        protocol: PROTOCOL_VERSION,
        client_id: client_id.to_owned(),
        events: events.to_vec(),
    })
    .unwrap()
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

struct Answer {
    status: StatusCode,
    headers: reqwest::header::HeaderMap,
    body: Vec<u8>,
}

impl Answer {
    fn results(&self) -> Vec<EventResult> {
        let r: PushResponse = serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "not a push response ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        });
        r.results
    }
    fn statuses(&self) -> Vec<ResultStatus> {
        self.results().iter().map(|r| r.status).collect()
    }
    fn error(&self) -> ErrorBody {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "not an error body ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

async fn post_raw(
    server: &RunningServer,
    token: Option<&str>,
    body: Vec<u8>,
    gzip: bool,
) -> Result<Answer, reqwest::Error> {
    let mut req = client()
        .post(server.events_url())
        .header("content-type", "application/json");
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    if gzip {
        req = req.header("content-encoding", "gzip");
    }
    let resp = req.body(body).send().await?;
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.bytes().await?.to_vec();
    Ok(Answer {
        status,
        headers,
        body,
    })
}

async fn push(server: &RunningServer, token: &str, client_id: &str, evs: &[WireEvent]) -> Answer {
    post_raw(server, Some(token), body(client_id, evs), false)
        .await
        .expect("push answered")
}

async fn get(url: String, token: Option<&str>) -> Answer {
    let mut req = client().get(url);
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let resp = req.send().await.expect("get answered");
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.bytes().await.unwrap().to_vec();
    Answer {
        status,
        headers,
        body,
    }
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

fn ids(evs: &[WireEvent]) -> Vec<EventId> {
    evs.iter().map(|e| e.id).collect()
}

// ---------- push, dedupe, order ----------

#[tokio::test]
async fn push_then_resend_is_duplicate_and_stored_once() {
    let (server, _dir) = start(|c| c).await;
    let batch = events(1..4);
    let first = push(&server, TOKEN_A, CLIENT_A, &batch).await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(first.statuses(), vec![ResultStatus::Accepted; 3]);
    assert_eq!(
        first.results().iter().map(|r| r.id).collect::<Vec<_>>(),
        ids(&batch)
    );

    let again = push(&server, TOKEN_A, CLIENT_A, &batch).await;
    assert_eq!(again.status, StatusCode::OK);
    assert_eq!(again.statuses(), vec![ResultStatus::Duplicate; 3]);

    // The same id twice within one batch: the second is a duplicate.
    let e = event(4, "OrderCreated");
    let twice = push(&server, TOKEN_A, CLIENT_A, &[e.clone(), e]).await;
    assert_eq!(
        twice.statuses(),
        vec![ResultStatus::Accepted, ResultStatus::Duplicate]
    );

    let stored = server.events(CLIENT_A).unwrap();
    assert_eq!(stored.len(), 4);
    assert_eq!(server.count(None).unwrap(), 4);
    // Stored exactly as sent.
    assert_eq!(stored[0].event.payload.get(), batch[0].payload.get());
    assert_eq!(stored[0].event.headers, batch[0].headers);
    assert_eq!(stored[0].event.key, batch[0].key);
    assert_eq!(stored[0].event.created_at, batch[0].created_at);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_resends_store_each_event_once() {
    let (server, _dir) = start(|c| c).await;
    let batch = events(1..21);
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let raw = body(CLIENT_A, &batch);
        let url = server.events_url();
        tasks.push(tokio::spawn(async move {
            let resp = client()
                .post(url)
                .header("authorization", format!("Bearer {TOKEN_A}"))
                .body(raw)
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), StatusCode::OK);
            let r: PushResponse = serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap();
            r.results
        }));
    }
    let mut accepted = 0;
    for t in tasks {
        let results = t.await.unwrap();
        assert_eq!(results.len(), 20);
        accepted += results
            .iter()
            .filter(|r| r.status == ResultStatus::Accepted)
            .count();
    }
    assert_eq!(accepted, 20, "each event accepted exactly once");
    assert_eq!(server.count(None).unwrap(), 20);
}

#[tokio::test]
async fn dedupe_is_per_client() {
    let (server, _dir) = start(|c| c).await;
    let batch = events(1..3);
    assert_eq!(
        push(&server, TOKEN_A, CLIENT_A, &batch).await.statuses(),
        vec![ResultStatus::Accepted; 2]
    );
    // The same ids from another client are other events.
    assert_eq!(
        push(&server, TOKEN_B, CLIENT_B, &batch).await.statuses(),
        vec![ResultStatus::Accepted; 2]
    );
    assert_eq!(server.count(Some(CLIENT_A)).unwrap(), 2);
    assert_eq!(server.count(Some(CLIENT_B)).unwrap(), 2);
}

#[tokio::test]
async fn events_are_kept_in_arrival_order() {
    let (server, _dir) = start(|c| c).await;
    push(&server, TOKEN_A, CLIENT_A, &events(1..3)).await;
    push(&server, TOKEN_B, CLIENT_B, &events(1..3)).await;
    push(&server, TOKEN_A, CLIENT_A, &events(3..5)).await;
    let all = server.all_events().unwrap();
    let order: Vec<(&str, i64)> = all
        .iter()
        .map(|e| (e.client_id.as_str(), e.event.seq))
        .collect();
    assert_eq!(
        order,
        vec![
            (CLIENT_A, 1),
            (CLIENT_A, 2),
            (CLIENT_B, 1),
            (CLIENT_B, 2),
            (CLIENT_A, 3),
            (CLIENT_A, 4)
        ]
    );
    assert!(all.windows(2).all(|w| w[0].cursor < w[1].cursor));
    let stats = server.stats().unwrap();
    assert_eq!(stats.len(), 2);
    assert!(stats.iter().all(|s| s.out_of_order == 0));
    assert_eq!(stats[0].events, 4);
    assert_eq!(stats[0].seq_range, (1, 4));

    // A retried dead letter arriving late is stored, and counted as out of order.
    push(&server, TOKEN_B, CLIENT_B, &events(0..1)).await;
    let b = server
        .stats()
        .unwrap()
        .into_iter()
        .find(|s| s.client_id == CLIENT_B)
        .unwrap();
    assert_eq!(b.out_of_order, 1);
}

#[tokio::test]
async fn events_survive_a_restart_and_dedupe_still_holds() {
    let dir = tempfile::tempdir().unwrap();
    let config = ServerConfig::new(dir.path().join("server.db")).token(TOKEN_A, CLIENT_A);
    let server = edge_outbox_server::spawn(config.clone()).await.unwrap();
    let batch = events(1..3);
    push(&server, TOKEN_A, CLIENT_A, &batch).await;
    let addr = server.addr();
    server.shutdown().await.unwrap();
    // Same database, same port: what a relay sees when its server restarts.
    let server = edge_outbox_server::spawn(config.listen(addr))
        .await
        .unwrap();
    assert_eq!(server.addr(), addr);
    assert_eq!(
        push(&server, TOKEN_A, CLIENT_A, &batch).await.statuses(),
        vec![ResultStatus::Duplicate; 2]
    );
    assert_eq!(server.count(None).unwrap(), 2);
}

#[tokio::test]
async fn in_memory_server_works_too() {
    let server = edge_outbox_server::spawn(ServerConfig::in_memory().allow_anonymous(true))
        .await
        .unwrap();
    let batch = events(1..4);
    let a = post_raw(&server, None, body(CLIENT_A, &batch), false)
        .await
        .unwrap();
    assert_eq!(a.statuses(), vec![ResultStatus::Accepted; 3]);
    let pulled = get(server.events_url(), None).await;
    let page: PullResponse = serde_json::from_slice(&pulled.body).unwrap();
    assert_eq!(page.events.len(), 3);
    assert_eq!(server.events(CLIENT_A).unwrap().len(), 3);
    server.shutdown().await.unwrap();
}

// ---------- auth ----------

#[tokio::test]
async fn auth_401_403_and_anonymous() {
    let (server, _dir) = start(|c| c).await;
    let batch = events(1..2);

    let missing = post_raw(&server, None, body(CLIENT_A, &batch), false)
        .await
        .unwrap();
    assert_eq!(missing.status, StatusCode::UNAUTHORIZED);
    assert!(
        missing.headers["www-authenticate"]
            .to_str()
            .unwrap()
            .starts_with("Bearer")
    );
    assert_eq!(missing.error().error, "unauthorized");

    let unknown = push(&server, "nope", CLIENT_A, &batch).await;
    assert_eq!(unknown.status, StatusCode::UNAUTHORIZED);
    assert!(unknown.headers.contains_key("www-authenticate"));
    // Only the whole token: a prefix of it, or more than it, is unknown.
    for near in [&TOKEN_A[..TOKEN_A.len() - 1], &format!("{TOKEN_A}x")] {
        let answer = push(&server, near, CLIENT_A, &batch).await;
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED, "{near}");
    }

    let wrong_scheme = client()
        .post(server.events_url())
        .header("authorization", format!("Basic {TOKEN_A}"))
        .body(body(CLIENT_A, &batch))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong_scheme.status(), StatusCode::UNAUTHORIZED);

    let other_client = push(&server, TOKEN_B, CLIENT_A, &batch).await;
    assert_eq!(other_client.status, StatusCode::FORBIDDEN);
    assert_eq!(other_client.error().error, "forbidden");
    assert_eq!(
        server.count(None).unwrap(),
        0,
        "refused pushes store nothing"
    );

    assert_eq!(
        push(&server, TOKEN_A, CLIENT_A, &batch).await.status,
        StatusCode::OK
    );

    // Reads need a valid token too (what each may read: a_client_reads_only_its_own_stream).
    assert_eq!(
        get(server.events_url(), None).await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        get(server.events_url(), Some("nope")).await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        get(server.events_url(), Some(TOKEN_B)).await.status,
        StatusCode::OK
    );
    server.shutdown().await.unwrap();

    let (anon, _dir2) = start(|c| c.allow_anonymous(true)).await;
    let ok = post_raw(&anon, None, body("any-client", &batch), false)
        .await
        .unwrap();
    assert_eq!(ok.status, StatusCode::OK);
    assert_eq!(ok.statuses(), vec![ResultStatus::Accepted]);
    assert_eq!(get(anon.events_url(), None).await.status, StatusCode::OK);
    // A presented token must still be valid and bound.
    assert_eq!(
        push(&anon, "nope", CLIENT_A, &batch).await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        push(&anon, TOKEN_B, CLIENT_A, &batch).await.status,
        StatusCode::FORBIDDEN
    );
}

// ---------- body: limit, gzip, malformed, version ----------

#[tokio::test]
async fn body_over_the_limit_is_413() {
    let (server, _dir) = start(|c| c.body_limit(64 * 1024)).await;
    let mut big = event(1, "Big");
    big.payload = RawValue::from_string(format!("\"{}\"", "x".repeat(200 * 1024))).unwrap();
    let raw = body(CLIENT_A, std::slice::from_ref(&big));

    let plain = post_raw(&server, Some(TOKEN_A), raw.clone(), false)
        .await
        .unwrap();
    assert_eq!(plain.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(plain.error().error, "payload_too_large");

    // The limit applies after inflation: a small gzip body that inflates past it is refused.
    let zipped = gzip(&raw);
    assert!(zipped.len() < 64 * 1024);
    let inflated = post_raw(&server, Some(TOKEN_A), zipped, true)
        .await
        .unwrap();
    assert_eq!(inflated.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(server.count(None).unwrap(), 0);

    // A body far larger than the limit (but under the drain cap) still gets a clean 413.
    big.payload = RawValue::from_string(format!("\"{}\"", "y".repeat(5 * 1024 * 1024))).unwrap();
    let huge = post_raw(&server, Some(TOKEN_A), body(CLIENT_A, &[big]), false)
        .await
        .unwrap();
    assert_eq!(huge.status, StatusCode::PAYLOAD_TOO_LARGE);

    // The connection is still usable afterwards and a small batch goes through.
    assert_eq!(
        push(&server, TOKEN_A, CLIENT_A, &events(1..2)).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn default_limit_is_4_mib() {
    // Events as large as the body (the event limit is tested on its own).
    let (server, _dir) = start(|c| c.max_event_bytes(8 << 20)).await;
    let mut big = event(1, "Big");
    big.payload = RawValue::from_string(format!("\"{}\"", "x".repeat(4 * 1024 * 1024))).unwrap();
    let a = push(&server, TOKEN_A, CLIENT_A, &[big]).await;
    assert_eq!(a.status, StatusCode::PAYLOAD_TOO_LARGE);
    let mut fits = event(2, "Big");
    fits.payload = RawValue::from_string(format!("\"{}\"", "x".repeat(3 * 1024 * 1024))).unwrap();
    assert_eq!(
        push(&server, TOKEN_A, CLIENT_A, &[fits]).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn gzip_bodies_are_accepted() {
    let (server, _dir) = start(|c| c).await;
    let batch = events(1..51);
    let raw = body(CLIENT_A, &batch);
    let zipped = gzip(&raw);
    assert!(zipped.len() < raw.len());
    let a = post_raw(&server, Some(TOKEN_A), zipped, true)
        .await
        .unwrap();
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.statuses(), vec![ResultStatus::Accepted; 50]);
    assert_eq!(server.count(Some(CLIENT_A)).unwrap(), 50);

    // Bytes that claim to be gzip but are not: 400, not a panic.
    let broken = post_raw(&server, Some(TOKEN_A), raw, true).await.unwrap();
    assert_eq!(broken.status, StatusCode::BAD_REQUEST);

    // An encoding the server does not speak: 415.
    let br = client()
        .post(server.events_url())
        .header("authorization", format!("Bearer {TOKEN_A}"))
        .header("content-encoding", "br")
        .body(body(CLIENT_A, &batch))
        .send()
        .await
        .unwrap();
    assert_eq!(br.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
}

#[tokio::test]
async fn malformed_and_misshapen_bodies_are_400_with_a_message() {
    let (server, _dir) = start(|c| c).await;
    for (raw, code) in [
        (&b"{\"protocol\":1,\"client_id\":"[..], "malformed_json"),
        (&b"not json at all"[..], "malformed_json"),
        (&b""[..], "malformed_json"),
        (&b"\xff\xfe\x00"[..], "malformed_json"),
        (
            &b"{\"protocol\":1,\"client_id\":\"a\"}"[..],
            "invalid_request",
        ),
        (
            &b"{\"protocol\":1,\"client_id\":\"a\",\"events\":[{\"id\":\"not-a-uuid\"}]}"[..],
            "invalid_request",
        ),
        (&b"[1,2,3]"[..], "invalid_request"),
    ] {
        let a = post_raw(&server, Some(TOKEN_A), raw.to_vec(), false)
            .await
            .unwrap();
        assert_eq!(
            a.status,
            StatusCode::BAD_REQUEST,
            "{}",
            String::from_utf8_lossy(raw)
        );
        let e = a.error();
        assert_eq!(
            e.error,
            code,
            "{}: {}",
            String::from_utf8_lossy(raw),
            e.message
        );
        assert!(!e.message.is_empty());
    }
    // Empty client_id.
    let a = push(&server, TOKEN_A, "", &events(1..2)).await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    // The server is still fine.
    assert_eq!(
        get(format!("{}/healthz", server.url()), None).await.body,
        b"ok"
    );
}

#[tokio::test]
async fn other_protocol_versions_are_400_naming_the_supported_one() {
    let (server, _dir) = start(|c| c).await;
    let mut v2 = serde_json::to_value(PushRequest {
        protocol: 1,
        client_id: CLIENT_A.into(),
        events: events(1..2),
    })
    .unwrap();
    v2["protocol"] = json!(2);
    let a = post_raw(
        &server,
        Some(TOKEN_A),
        serde_json::to_vec(&v2).unwrap(),
        false,
    )
    .await
    .unwrap();
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    let e = a.error();
    assert_eq!(e.error, "unsupported_protocol");
    assert_eq!(e.supported_protocols, Some(vec![1]));
    assert!(e.message.contains('1'), "{}", e.message);

    // A version 2 body of a different shape is still recognized as version 2.
    let other = json!({"protocol": 2, "stream": "x", "batch": {}});
    let a = post_raw(
        &server,
        Some(TOKEN_A),
        serde_json::to_vec(&other).unwrap(),
        false,
    )
    .await
    .unwrap();
    assert_eq!(a.error().error, "unsupported_protocol");
    assert_eq!(server.count(None).unwrap(), 0);

    // Unknown fields are ignored (forward compatibility within version 1).
    let mut extra = serde_json::to_value(PushRequest {
        protocol: 1,
        client_id: CLIENT_A.into(),
        events: events(1..2),
    })
    .unwrap();
    extra["future_field"] = json!(true);
    extra["events"][0]["future_event_field"] = json!({"x": 1});
    let a = post_raw(
        &server,
        Some(TOKEN_A),
        serde_json::to_vec(&extra).unwrap(),
        false,
    )
    .await
    .unwrap();
    assert_eq!(a.statuses(), vec![ResultStatus::Accepted]);
}

#[tokio::test]
async fn invalid_events_are_rejected_and_the_rest_of_the_batch_goes_through() {
    let (server, _dir) = start(|c| c).await;
    let mut bad_time = event(4, "OrderCreated");
    bad_time.created_at = "yesterday".into();
    let batch = vec![
        event(1, "OrderCreated"),
        event(2, ""),
        event(3, "OrderCreated"),
        bad_time,
    ];
    let a = push(&server, TOKEN_A, CLIENT_A, &batch).await;
    assert_eq!(a.status, StatusCode::OK);
    let results = a.results();
    assert_eq!(
        results.iter().map(|r| r.status).collect::<Vec<_>>(),
        vec![
            ResultStatus::Accepted,
            ResultStatus::Rejected,
            ResultStatus::Accepted,
            ResultStatus::Rejected
        ]
    );
    assert_eq!(
        results.iter().map(|r| r.id).collect::<Vec<_>>(),
        ids(&batch)
    );
    assert!(results[1].reason.as_deref().unwrap().contains("type"));
    assert!(results[3].reason.as_deref().unwrap().contains("created_at"));
    assert_eq!(results[0].reason, None);
    let stored: Vec<i64> = server
        .events(CLIENT_A)
        .unwrap()
        .iter()
        .map(|e| e.event.seq)
        .collect();
    assert_eq!(stored, vec![1, 3]);
}

/// An event whose payload (a JSON string) is `bytes` long, with no key and
/// no headers: its size by the client's measure is 5 (the type) + `bytes`.
fn sized_event(seq: i64, bytes: usize) -> WireEvent {
    let mut e = event(seq, "Sized");
    e.key = None;
    e.headers.clear();
    e.payload = RawValue::from_string(format!("\"{}\"", "x".repeat(bytes - 2))).unwrap();
    e
}

/// An event over the server's event limit (default 256 KiB, the client's
/// default, measured the same way) is rejected alone: a hostile client
/// cannot store events of the body limit's size for every reader to pull.
#[tokio::test]
async fn an_event_over_the_event_limit_is_rejected_alone() {
    let (server, _dir) = start(|c| c).await;
    let limit = edge_outbox::DEFAULT_MAX_EVENT_BYTES;
    // Type (5 bytes) + payload: exactly the limit, then one byte over.
    let batch = vec![
        sized_event(1, limit - 5),
        sized_event(2, limit - 4),
        event(3, "OrderCreated"),
    ];
    let a = push(&server, TOKEN_A, CLIENT_A, &batch).await;
    assert_eq!(
        a.statuses(),
        [
            ResultStatus::Accepted,
            ResultStatus::Rejected,
            ResultStatus::Accepted
        ]
    );
    let reason = a.results()[1].reason.clone().unwrap();
    assert!(reason.contains(&limit.to_string()), "{reason}");
    assert_eq!(server.count(None).unwrap(), 2);
    // Raised with the clients' limit, it is accepted.
    let (roomy, _dir2) = start(|c| c.max_event_bytes(limit + 1)).await;
    let a = push(&roomy, TOKEN_A, CLIENT_A, &batch[1..2]).await;
    assert_eq!(a.statuses(), [ResultStatus::Accepted]);
}

/// A pull page ends before the event that would take it past
/// `PULL_PAGE_BYTES`: a page of big events is not `limit` times their
/// size. Every event is still read once, in order, page after page.
#[tokio::test]
async fn a_pull_page_stops_at_its_byte_budget() {
    let (server, _dir) = start(|c| c.max_event_bytes(2 << 20)).await;
    let big = edge_outbox_server::PULL_PAGE_BYTES * 3 / 8; // 1.5 MiB
    for seq in 1..=3 {
        let a = push(&server, TOKEN_A, CLIENT_A, &[sized_event(seq, big)]).await;
        assert_eq!(a.statuses(), [ResultStatus::Accepted]);
    }
    push(&server, TOKEN_A, CLIENT_A, &events(4..6)).await;
    let mut after = 0;
    let mut pages = Vec::new();
    loop {
        let answer = get(
            format!("{}?after={after}&limit=1000", server.events_url()),
            Some(READER),
        )
        .await;
        assert_eq!(answer.status, StatusCode::OK);
        let page: PullResponse = serde_json::from_slice(&answer.body).unwrap();
        let Some(next) = page.next_cursor else {
            break;
        };
        after = next;
        pages.push(page.events.iter().map(|e| e.event.seq).collect::<Vec<_>>());
    }
    // Two big ones fit (3 MiB), a third would not; then the rest.
    assert_eq!(pages, [vec![1, 2], vec![3, 4, 5]]);
}

#[tokio::test]
async fn empty_batch_is_fine() {
    let (server, _dir) = start(|c| c).await;
    let a = push(&server, TOKEN_A, CLIENT_A, &[]).await;
    assert_eq!(a.status, StatusCode::OK);
    assert!(a.results().is_empty());
}

// ---------- pull ----------

#[tokio::test]
async fn pull_pages_in_arrival_order_and_filters_by_client() {
    let (server, _dir) = start(|c| c).await;
    push(&server, TOKEN_A, CLIENT_A, &events(1..16)).await;
    push(&server, TOKEN_B, CLIENT_B, &events(1..6)).await;
    push(&server, TOKEN_A, CLIENT_A, &events(16..26)).await;

    let mut after = 0;
    let mut seen = Vec::new();
    let mut pages = 0;
    loop {
        let a = get(
            format!("{}?after={after}&limit=10", server.events_url()),
            Some(READER),
        )
        .await;
        assert_eq!(a.status, StatusCode::OK);
        let page: PullResponse = serde_json::from_slice(&a.body).unwrap();
        let Some(next) = page.next_cursor else {
            assert!(page.events.is_empty());
            break;
        };
        assert!(page.events.len() <= 10);
        assert_eq!(next, page.events.last().unwrap().cursor);
        after = next;
        pages += 1;
        seen.extend(page.events);
    }
    assert_eq!(pages, 3);
    assert_eq!(seen.len(), 30);
    assert!(seen.windows(2).all(|w| w[0].cursor < w[1].cursor));
    assert_eq!(seen[15].client_id, CLIENT_B);

    let a = get(
        format!("{}?client_id={CLIENT_A}&limit=1000", server.events_url()),
        Some(READER),
    )
    .await;
    let page: PullResponse = serde_json::from_slice(&a.body).unwrap();
    assert_eq!(page.events.len(), 25);
    assert_eq!(
        page.events.iter().map(|e| e.event.seq).collect::<Vec<_>>(),
        (1..26).collect::<Vec<_>>()
    );

    // Default page size is 100; a bad query is a 400.
    let a = get(server.events_url(), Some(READER)).await;
    let page: PullResponse = serde_json::from_slice(&a.body).unwrap();
    assert_eq!(page.events.len(), 30);
    let bad = get(format!("{}?after=abc", server.events_url()), Some(TOKEN_A)).await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert_eq!(bad.error().error, "invalid_request");
}

// ---------- fault injection (Rust API) ----------

#[tokio::test]
async fn fault_fail_next_with_retry_after() {
    let (server, _dir) = start(|c| c).await;
    server
        .faults()
        .fail_next(2, Failure::status(503).retry_after(7));
    for _ in 0..2 {
        let a = push(&server, TOKEN_A, CLIENT_A, &events(1..2)).await;
        assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(a.headers["retry-after"], "7");
        assert_eq!(a.error().error, "injected_fault");
    }
    assert_eq!(
        server.count(None).unwrap(),
        0,
        "failed pushes store nothing"
    );
    assert_eq!(
        push(&server, TOKEN_A, CLIENT_A, &events(1..2)).await.status,
        StatusCode::OK
    );

    for status in [500, 413, 401, 400] {
        server.faults().fail_next(1, Failure::status(status));
        let a = push(&server, TOKEN_A, CLIENT_A, &events(1..2)).await;
        assert_eq!(a.status.as_u16(), status);
        assert_eq!(a.headers.contains_key("www-authenticate"), status == 401);
    }
    assert_eq!(server.count(None).unwrap(), 1);
}

#[tokio::test]
async fn fault_fail_for_a_duration() {
    let (server, _dir) = start(|c| c).await;
    let window = Duration::from_millis(300);
    let start = Instant::now();
    server.faults().fail_for(window, Failure::status(500));
    // An answer back within the window was decided within it: it failed.
    // (A loaded machine may take longer: then the push says nothing.)
    for _ in 0..2 {
        let a = push(&server, TOKEN_A, CLIENT_A, &events(1..2)).await;
        if start.elapsed() < window {
            assert_eq!(a.status, StatusCode::INTERNAL_SERVER_ERROR);
        }
    }
    tokio::time::sleep(window.saturating_sub(start.elapsed()) + Duration::from_millis(50)).await;
    assert_eq!(
        push(&server, TOKEN_A, CLIENT_A, &events(1..2)).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn fault_delay_makes_clients_time_out_after_the_commit() {
    let (server, _dir) = start(|c| c).await;
    server.faults().delay_next(1, Duration::from_millis(800));
    let batch = events(1..3);
    let err = reqwest::Client::new()
        .post(server.events_url())
        .header("authorization", format!("Bearer {TOKEN_A}"))
        .timeout(Duration::from_millis(200))
        .body(body(CLIENT_A, &batch))
        .send()
        .await
        .expect_err("the client times out");
    assert!(err.is_timeout(), "{err}");
    // Committed before the delay: the resend is a duplicate.
    assert_eq!(server.count(None).unwrap(), 2);
    let again = push(&server, TOKEN_A, CLIENT_A, &batch).await;
    assert_eq!(again.statuses(), vec![ResultStatus::Duplicate; 2]);

    // delay() applies to every push until cleared.
    server.faults().delay(Duration::from_millis(150));
    for _ in 0..2 {
        let t = Instant::now();
        push(&server, TOKEN_A, CLIENT_A, &events(3..4)).await;
        assert!(t.elapsed() >= Duration::from_millis(150));
    }
    server.faults().delay(Duration::ZERO);
    push(&server, TOKEN_A, CLIENT_A, &events(4..5)).await;
    // Cleared: the last push was not delayed (the request log says so,
    // where a clock would say so only on an idle machine).
    let faults: Vec<Option<String>> = server.requests().into_iter().map(|r| r.fault).collect();
    assert_eq!(
        faults[faults.len() - 3..],
        [Some("delay".to_owned()), Some("delay".to_owned()), None]
    );
}

#[tokio::test]
async fn fault_drop_response_after_commit() {
    let (server, _dir) = start(|c| c).await;
    server.faults().drop_response_after_commit(1);
    // A refused push does not use the fault up.
    assert_eq!(
        push(&server, TOKEN_B, CLIENT_A, &events(0..1)).await.status,
        StatusCode::FORBIDDEN
    );
    let batch = events(1..4);
    let lost = post_raw(&server, Some(TOKEN_A), body(CLIENT_A, &batch), false).await;
    assert!(lost.is_err(), "the answer must not be readable");
    assert_eq!(
        server.count(None).unwrap(),
        3,
        "but the events were committed"
    );
    let resend = push(&server, TOKEN_A, CLIENT_A, &batch).await;
    assert_eq!(resend.statuses(), vec![ResultStatus::Duplicate; 3]);
    assert_eq!(server.count(None).unwrap(), 3);
}

#[tokio::test]
async fn fault_malformed_200_body() {
    let (server, _dir) = start(|c| c).await;
    server.faults().malformed_response(1);
    let batch = events(1..3);
    let a = push(&server, TOKEN_A, CLIENT_A, &batch).await;
    assert_eq!(a.status, StatusCode::OK);
    assert!(serde_json::from_slice::<PushResponse>(&a.body).is_err());
    assert_eq!(
        server.count(None).unwrap(),
        0,
        "a malformed answer stores nothing"
    );
    assert_eq!(
        push(&server, TOKEN_A, CLIENT_A, &batch).await.statuses(),
        vec![ResultStatus::Accepted; 2]
    );
}

#[tokio::test]
async fn a_payload_with_a_lone_surrogate_is_rejected_alone() {
    let (server, _dir) = start(|c| c).await;
    let mut batch = events(1..5);
    batch[1].payload = RawValue::from_string(r#"{"title":"cut \ud83d"}"#.into()).unwrap();
    batch[2].payload = RawValue::from_string(r#"{"title":"whole \ud83d\ude00"}"#.into()).unwrap();
    // A number beyond f64 is valid JSON: it must not make the emoji check
    // refuse the payload (it did while that check parsed numbers too).
    batch[3].payload =
        RawValue::from_string(r#"{"big":1e400,"title":"whole \ud83d\ude00"}"#.into()).unwrap();
    let answer = push(&server, TOKEN_A, CLIENT_A, &batch).await;
    assert_eq!(
        answer.statuses(),
        [
            ResultStatus::Accepted,
            ResultStatus::Rejected,
            ResultStatus::Accepted,
            ResultStatus::Accepted
        ]
    );
    assert_eq!(server.count(None).unwrap(), 3);
}

#[tokio::test]
async fn fault_reject_answers_the_next_events_rejected_and_stores_the_rest() {
    let (server, _dir) = start(|c| c.test_controls(true)).await;
    assert_eq!(
        control(&server, "reject", json!({"count": 3})).await,
        StatusCode::NO_CONTENT
    );
    // Counted across pushes: two in the first, one in the second.
    let first = push(&server, TOKEN_A, CLIENT_A, &events(1..3)).await;
    assert_eq!(first.statuses(), vec![ResultStatus::Rejected; 2]);
    let second = push(&server, TOKEN_A, CLIENT_A, &events(3..6)).await;
    assert_eq!(
        second.statuses(),
        [
            ResultStatus::Rejected,
            ResultStatus::Accepted,
            ResultStatus::Accepted
        ]
    );
    assert_eq!(
        server.count(None).unwrap(),
        2,
        "rejected events are not stored"
    );
}

/// A push over the early-413 limit is answered from its head: the server
/// never waits for (or reads) its body, and nothing is stored.
#[tokio::test]
async fn fault_early_413_answers_from_the_head_without_reading_the_body() {
    // A 1 MiB event: over the default event limit, which is not tested here.
    let (server, _dir) = start(|c| c.test_controls(true).max_event_bytes(2 << 20)).await;
    assert_eq!(
        control(&server, "early-413", json!({"above": 64 * 1024})).await,
        StatusCode::NO_CONTENT
    );
    let mut big = event(1, "Big");
    big.payload = RawValue::from_string(format!("\"{}\"", "x".repeat(1 << 20))).unwrap();
    let raw = body(CLIENT_A, std::slice::from_ref(&big));
    // The client usually sees the 413; a reset while it uploads is fine too.
    if let Ok(answer) = post_raw(&server, Some(TOKEN_A), raw.clone(), false).await {
        assert_eq!(answer.status, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(answer.headers["connection"], "close");
        assert_eq!(answer.error().error, "payload_too_large");
    }

    // A head that announces 1 MiB and no body at all is answered at once.
    let addr = server.addr();
    let head_only = tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let head = format!(
            "POST /v1/events HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n",
            1 << 20
        );
        s.write_all(head.as_bytes()).unwrap();
        let mut answer = Vec::new();
        let _ = s.read_to_end(&mut answer);
        String::from_utf8_lossy(&answer).into_owned()
    })
    .await
    .unwrap();
    assert!(head_only.starts_with("HTTP/1.1 413"), "{head_only:?}");

    // The limit is on the bytes on the wire: gzip that inflates past it passes.
    let zipped = post_raw(&server, Some(TOKEN_A), gzip(&raw), true)
        .await
        .unwrap();
    assert_eq!(zipped.statuses(), vec![ResultStatus::Accepted]);
    // Small pushes pass.
    assert_eq!(
        push(&server, TOKEN_A, CLIENT_A, &events(2..4)).await.status,
        StatusCode::OK
    );
    let early = server
        .requests()
        .into_iter()
        .filter(|r| r.fault.as_deref() == Some("early_413"))
        .collect::<Vec<_>>();
    assert!(!early.is_empty() && early.iter().all(|r| r.status == 413));
    assert_eq!(server.count(None).unwrap(), 3);

    assert_eq!(
        control(&server, "early-413", json!({"above": null})).await,
        StatusCode::NO_CONTENT
    );
    big.id = EventId::new();
    assert_eq!(
        push(&server, TOKEN_A, CLIENT_A, &[big]).await.statuses(),
        vec![ResultStatus::Accepted]
    );
    assert_eq!(
        control(&server, "early-413", json!({"above": "64k"})).await,
        StatusCode::BAD_REQUEST
    );
}

/// A slow upload: the server reads the body at the given rate, so a 64 KiB
/// push at 32 KiB/s takes about 2 s.
#[tokio::test]
async fn fault_slow_upload_reads_the_body_at_the_given_rate() {
    let (server, _dir) = start(|c| c.test_controls(true)).await;
    assert_eq!(
        control(&server, "slow-upload", json!({"bytes_per_sec": 32 * 1024})).await,
        StatusCode::NO_CONTENT
    );
    let mut big = event(1, "Big");
    big.payload = RawValue::from_string(format!("\"{}\"", "x".repeat(64 * 1024))).unwrap();
    let started = Instant::now();
    let a = push(&server, TOKEN_A, CLIENT_A, &[big]).await;
    let took = started.elapsed();
    assert_eq!(a.statuses(), vec![ResultStatus::Accepted]);
    assert!(took >= Duration::from_millis(1500), "took {took:?}");
    assert_eq!(
        server.requests().last().unwrap().fault.as_deref(),
        Some("slow_upload")
    );

    assert_eq!(
        control(&server, "slow-upload", json!({"bytes_per_sec": 0})).await,
        StatusCode::NO_CONTENT
    );
    push(&server, TOKEN_A, CLIENT_A, &events(2..3)).await;
    assert_eq!(server.requests().last().unwrap().fault, None);
}

#[tokio::test]
async fn request_log_and_reset() {
    let (server, _dir) = start(|c| c).await;
    push(&server, TOKEN_A, CLIENT_A, &events(1..4)).await;
    server.faults().fail_next(1, Failure::status(503));
    push(&server, TOKEN_B, CLIENT_B, &events(1..2)).await;
    post_raw(&server, Some(TOKEN_A), b"garbage".to_vec(), false)
        .await
        .unwrap();
    server.faults().drop_response_after_commit(1);
    let _ = post_raw(&server, Some(TOKEN_A), body(CLIENT_A, &events(4..5)), false).await;
    // Give the server a moment to log the dropped push.
    tokio::time::sleep(Duration::from_millis(50)).await;

    let log = server.requests();
    assert_eq!(log.len(), 4, "{log:?}");
    let brief: Vec<(Option<&str>, usize, u16, Option<&str>)> = log
        .iter()
        .map(|r| {
            (
                r.client_id.as_deref(),
                r.events,
                r.status,
                r.fault.as_deref(),
            )
        })
        .collect();
    assert_eq!(
        brief,
        vec![
            (Some(CLIENT_A), 3, 200, None),
            (Some(CLIENT_B), 1, 503, Some("fail")),
            (None, 0, 400, None),
            (Some(CLIENT_A), 1, 0, Some("drop_after_commit")),
        ]
    );
    assert!(log.iter().all(|r| r.started_at <= r.finished_at));
    assert!(log.windows(2).all(|w| w[0].started_at <= w[1].started_at));
    let now = Timestamp::now().as_millis();
    assert!(
        (now - log[0].started_at).abs() < 60_000,
        "unix milliseconds"
    );

    server.faults().fail_next(5, Failure::status(500));
    server.faults().reset();
    assert!(server.requests().is_empty());
    assert_eq!(
        push(&server, TOKEN_A, CLIENT_A, &events(5..6)).await.status,
        StatusCode::OK
    );
}

// ---------- fault injection (HTTP endpoints) ----------

async fn control(server: &RunningServer, path: &str, body: Value) -> StatusCode {
    client()
        .post(format!("{}/__test/{path}", server.url()))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap()
        .status()
}

#[tokio::test]
async fn test_control_endpoints() {
    let (server, _dir) = start(|c| c.test_controls(true)).await;

    assert_eq!(
        control(
            &server,
            "fail",
            json!({"status": 503, "count": 1, "retry_after": 2})
        )
        .await,
        StatusCode::NO_CONTENT
    );
    let a = push(&server, TOKEN_A, CLIENT_A, &events(1..2)).await;
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(a.headers["retry-after"], "2");

    assert_eq!(
        control(&server, "fail", json!({"status": 500, "for_ms": 200})).await,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        push(&server, TOKEN_A, CLIENT_A, &events(1..2)).await.status,
        StatusCode::INTERNAL_SERVER_ERROR
    );
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(
        push(&server, TOKEN_A, CLIENT_A, &events(1..2)).await.status,
        StatusCode::OK
    );

    assert_eq!(
        control(&server, "delay", json!({"ms": 200, "count": 1})).await,
        StatusCode::NO_CONTENT
    );
    let t = Instant::now();
    push(&server, TOKEN_A, CLIENT_A, &events(2..3)).await;
    assert!(t.elapsed() >= Duration::from_millis(200));

    assert_eq!(
        control(&server, "drop-after-commit", json!({"count": 1})).await,
        StatusCode::NO_CONTENT
    );
    assert!(
        post_raw(&server, Some(TOKEN_A), body(CLIENT_A, &events(3..4)), false)
            .await
            .is_err()
    );

    assert_eq!(
        control(&server, "malformed", json!({"count": 1})).await,
        StatusCode::NO_CONTENT
    );
    let m = push(&server, TOKEN_A, CLIENT_A, &events(4..5)).await;
    assert!(serde_json::from_slice::<PushResponse>(&m.body).is_err());

    tokio::time::sleep(Duration::from_millis(50)).await;
    let log = get(format!("{}/__test/requests", server.url()), None).await;
    assert_eq!(log.status, StatusCode::OK);
    let log: Vec<RequestRecord> = serde_json::from_slice(&log.body).unwrap();
    let statuses: Vec<u16> = log.iter().map(|r| r.status).collect();
    assert_eq!(statuses, vec![503, 500, 200, 200, 0, 200]);

    // Bad control requests are 400s.
    assert_eq!(
        control(&server, "fail", json!({"status": 200, "count": 1})).await,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        control(&server, "fail", json!({"status": 500})).await,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        control(&server, "delay", json!({"millis": 5})).await,
        StatusCode::BAD_REQUEST
    );

    assert_eq!(
        control(&server, "reset", json!({})).await,
        StatusCode::NO_CONTENT
    );
    let log = get(format!("{}/__test/requests", server.url()), None).await;
    assert_eq!(log.body, b"[]");

    // Without --enable-test-controls the endpoints do not exist.
    let (plain, _dir2) = start(|c| c).await;
    assert_eq!(
        control(&plain, "fail", json!({"status": 500, "count": 1})).await,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        get(format!("{}/__test/requests", plain.url()), None)
            .await
            .status,
        StatusCode::NOT_FOUND
    );
}

// ---------- inbox ----------

/// Writes each order into the app's own table; refuses "Bad" events for
/// good; fails (transiently) on "Boom".
struct Orders;

impl Inbox for Orders {
    fn migrate(&self, conn: &rusqlite::Connection) -> Result<(), BoxError> {
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS orders (seq INTEGER NOT NULL, client TEXT NOT NULL)",
        )?;
        Ok(())
    }

    fn apply(
        &self,
        tx: &rusqlite::Transaction<'_>,
        client_id: &str,
        event: &WireEvent,
    ) -> Result<Applied, BoxError> {
        // The write happens before the verdict, so a rejection must undo it.
        tx.execute(
            "INSERT INTO orders (seq, client) VALUES (?1, ?2)",
            (event.seq, client_id),
        )?;
        match event.event_type.as_str() {
            "Bad" => Ok(Applied::Reject("bad order".into())),
            "Boom" => Err("the payment service is down".into()),
            _ => Ok(Applied::Accept),
        }
    }
}

fn orders(db: &Path) -> Vec<i64> {
    let conn = rusqlite::Connection::open(db).unwrap();
    let mut stmt = conn.prepare("SELECT seq FROM orders ORDER BY seq").unwrap();
    stmt.query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

#[tokio::test]
async fn inbox_applies_in_the_same_transaction_as_the_dedupe_record() {
    let (server, dir) = start(|c| c.inbox(Orders)).await;
    let db: PathBuf = dir.path().join("server.db");

    let batch = vec![
        event(1, "OrderCreated"),
        event(2, "Bad"),
        event(3, "OrderCreated"),
    ];
    let a = push(&server, TOKEN_A, CLIENT_A, &batch).await;
    assert_eq!(
        a.statuses(),
        vec![
            ResultStatus::Accepted,
            ResultStatus::Rejected,
            ResultStatus::Accepted
        ]
    );
    assert_eq!(a.results()[1].reason.as_deref(), Some("bad order"));
    assert_eq!(
        orders(&db),
        vec![1, 3],
        "the rejected event's write was rolled back"
    );

    // Duplicates never reach the inbox: no second effect.
    let again = push(&server, TOKEN_A, CLIENT_A, &batch).await;
    assert_eq!(
        again.statuses(),
        vec![
            ResultStatus::Duplicate,
            ResultStatus::Rejected,
            ResultStatus::Duplicate
        ]
    );
    assert_eq!(orders(&db), vec![1, 3]);

    // An apply error fails the whole push with 500 and stores nothing of it.
    let ok4 = event(4, "OrderCreated");
    let boom = push(&server, TOKEN_A, CLIENT_A, &[ok4.clone(), event(5, "Boom")]).await;
    assert_eq!(boom.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(boom.error().error, "inbox_error");
    assert_eq!(orders(&db), vec![1, 3]);
    assert_eq!(server.count(None).unwrap(), 2, "no dedupe row left behind");
    // So the event is new when it comes again.
    assert_eq!(
        push(&server, TOKEN_A, CLIENT_A, &[ok4]).await.statuses(),
        vec![ResultStatus::Accepted]
    );
    assert_eq!(orders(&db), vec![1, 3, 4]);
}

/// The `Orders` inbox of docs/protocol.md, exactly as written there (checked
/// by `protocol_doc_inbox_example_is_the_one_tested`): between the markers,
/// every line must match the doc's code block.
#[rustfmt::skip]
mod docs_orders {
    // docs-example: begin
    use edge_outbox::protocol::WireEvent;
    use edge_outbox_server::{Applied, BoxError, Inbox, Rejection, ServerConfig, decode_payload};

    struct Orders;

    impl Inbox for Orders {
        fn migrate(&self, conn: &rusqlite::Connection) -> Result<(), BoxError> {
            conn.execute_batch("CREATE TABLE IF NOT EXISTS orders (id INTEGER PRIMARY KEY, amount INTEGER)")?;
            Ok(())
        }
        fn apply(&self, tx: &rusqlite::Transaction<'_>, _client: &str, e: &WireEvent) -> Result<Applied, BoxError> {
            #[derive(serde::Deserialize)]
            struct Order { order_id: i64, amount: i64 }
            match e.event_type.as_str() {
                "OrderCreated" => {
                    // A payload that does not decode: this event is rejected, the batch goes on.
                    let o: Order = decode_payload(e)?;
                    if o.amount <= 0 {
                        return Err(Rejection::new("amount must be positive").into());
                    }
                    // A database error: the whole batch is answered 500 and retried later.
                    let inserted = tx.execute(
                        "INSERT INTO orders (id, amount) VALUES (?1, ?2) ON CONFLICT (id) DO NOTHING",
                        (o.order_id, o.amount),
                    )?;
                    if inserted == 0 {
                        // It would fail the same way every time: reject, never "later".
                        return Ok(Applied::Reject(format!("order {} exists already", o.order_id)));
                    }
                    Ok(Applied::Accept)
                }
                other => Ok(Applied::Reject(format!("unknown event type {other}"))),
            }
        }
    }
    // docs-example: end

    /// The docs' configuration line, with this test's path and token.
    pub fn config(config: ServerConfig) -> ServerConfig {
        config.inbox(Orders)
    }
}

fn order_event(seq: i64, payload: &str) -> WireEvent {
    let mut e = event(seq, "OrderCreated");
    e.payload = RawValue::from_string(payload.to_owned()).unwrap();
    e
}

fn order_amounts(db: &Path) -> Vec<(i64, i64)> {
    let conn = rusqlite::Connection::open(db).unwrap();
    let mut stmt = conn
        .prepare("SELECT id, amount FROM orders ORDER BY id")
        .unwrap();
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

/// Issue 9, item 7: one payload the inbox cannot decode is rejected alone;
/// the other events of the batch are accepted and applied.
#[tokio::test]
async fn docs_inbox_rejects_a_payload_it_cannot_decode_and_applies_the_rest() {
    let (server, dir) = start(docs_orders::config).await;
    let db = dir.path().join("server.db");
    let batch: Vec<WireEvent> = (1..=5)
        .map(|i| {
            if i == 3 {
                order_event(i, r#"{"order_id":3,"amount":"250"}"#)
            } else {
                order_event(i, &format!(r#"{{"order_id":{i},"amount":{}}}"#, i * 100))
            }
        })
        .collect();
    let a = push(&server, TOKEN_A, CLIENT_A, &batch).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(
        a.statuses(),
        vec![
            ResultStatus::Accepted,
            ResultStatus::Accepted,
            ResultStatus::Rejected,
            ResultStatus::Accepted,
            ResultStatus::Accepted
        ]
    );
    let results = a.results();
    assert_eq!(
        results.iter().map(|r| r.id).collect::<Vec<_>>(),
        ids(&batch)
    );
    let reason = results[2].reason.as_deref().unwrap();
    assert!(
        reason.starts_with("OrderCreated payload cannot be decoded: invalid type: string \"250\""),
        "{reason}"
    );
    assert_eq!(
        order_amounts(&db),
        vec![(1, 100), (2, 200), (4, 400), (5, 500)]
    );
    let stored: Vec<i64> = server
        .events(CLIENT_A)
        .unwrap()
        .iter()
        .map(|e| e.event.seq)
        .collect();
    assert_eq!(
        stored,
        vec![1, 2, 4, 5],
        "no dedupe record for the rejected one"
    );

    // The docs' other rejections: an invariant, a conflict with what is
    // stored, an unknown type.
    let more = vec![
        order_event(6, r#"{"order_id":6,"amount":0}"#),
        order_event(7, r#"{"order_id":1,"amount":700}"#),
        event(8, "OrderShipped"),
        order_event(9, r#"{"order_id":9,"amount":900}"#),
    ];
    let b = push(&server, TOKEN_A, CLIENT_A, &more).await;
    assert_eq!(b.status, StatusCode::OK);
    let reasons: Vec<Option<String>> = b.results().into_iter().map(|r| r.reason).collect();
    assert_eq!(
        reasons,
        vec![
            Some("amount must be positive".to_owned()),
            Some("order 1 exists already".to_owned()),
            Some("unknown event type OrderShipped".to_owned()),
            None
        ]
    );
    assert_eq!(order_amounts(&db).len(), 5);
}

/// A database failure in the inbox is still "try later": 500, and nothing of
/// the batch is stored; once it passes, the same batch is applied in full.
#[tokio::test]
async fn docs_inbox_database_failure_fails_the_whole_batch_with_500() {
    let (server, dir) = start(docs_orders::config).await;
    let db = dir.path().join("server.db");
    let batch: Vec<WireEvent> = (1..=3)
        .map(|i| order_event(i, &format!(r#"{{"order_id":{i},"amount":5}}"#)))
        .collect();
    // Another process moves the app's table away: every INSERT fails.
    let admin = rusqlite::Connection::open(&db).unwrap();
    admin
        .execute_batch("ALTER TABLE orders RENAME TO orders_away")
        .unwrap();
    let a = push(&server, TOKEN_A, CLIENT_A, &batch).await;
    assert_eq!(a.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(a.error().error, "inbox_error");
    assert!(
        a.error().message.contains("no such table"),
        "{}",
        a.error().message
    );
    assert_eq!(
        server.count(None).unwrap(),
        0,
        "nothing of the batch stored"
    );

    admin
        .execute_batch("ALTER TABLE orders_away RENAME TO orders")
        .unwrap();
    let b = push(&server, TOKEN_A, CLIENT_A, &batch).await;
    assert_eq!(b.statuses(), vec![ResultStatus::Accepted; 3]);
    assert_eq!(order_amounts(&db).len(), 3);
}

/// An inbox written the naive way (a bare `serde_json::from_str(..)?`, as in
/// examples/orders.rs) rejects an undecodable payload too; a `Rejection`
/// wrapped in the app's own error is still a rejection; a plain error is not.
struct Naive;

#[derive(Debug)]
struct AppError(edge_outbox_server::Rejection);

impl std::fmt::Display for AppError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "app error")
    }
}

impl std::error::Error for AppError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

impl Inbox for Naive {
    fn apply(
        &self,
        _tx: &rusqlite::Transaction<'_>,
        _client_id: &str,
        event: &WireEvent,
    ) -> Result<Applied, BoxError> {
        #[derive(serde::Deserialize)]
        #[allow(dead_code)]
        struct Order {
            amount: i64,
        }
        match event.event_type.as_str() {
            "Wrapped" => Err(Box::new(AppError(edge_outbox_server::Rejection::new(
                "wrapped reason",
            )))),
            "Later" => Err("try later".into()),
            _ => {
                let _order: Order = serde_json::from_str(event.payload.get())?;
                Ok(Applied::Accept)
            }
        }
    }
}

#[tokio::test]
async fn inbox_errors_that_are_about_the_event_reject_it_alone() {
    let (server, _dir) = start(|c| c.inbox(Naive)).await;
    let batch = vec![
        order_event(1, r#"{"amount":1}"#),
        order_event(2, r#"{"amount":"250"}"#),
        event(3, "Wrapped"),
        order_event(4, r#"{"amount":4}"#),
    ];
    let a = push(&server, TOKEN_A, CLIENT_A, &batch).await;
    assert_eq!(a.status, StatusCode::OK);
    let results = a.results();
    assert_eq!(
        a.statuses(),
        vec![
            ResultStatus::Accepted,
            ResultStatus::Rejected,
            ResultStatus::Rejected,
            ResultStatus::Accepted
        ]
    );
    assert!(
        results[1]
            .reason
            .as_deref()
            .unwrap()
            .starts_with("payload cannot be decoded: invalid type: string \"250\"")
    );
    assert_eq!(results[2].reason.as_deref(), Some("wrapped reason"));
    assert_eq!(server.count(None).unwrap(), 2);

    let later = push(
        &server,
        TOKEN_A,
        CLIENT_A,
        &[order_event(5, r#"{"amount":5}"#), event(6, "Later")],
    )
    .await;
    assert_eq!(later.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(server.count(None).unwrap(), 2);
}

/// The `Orders` example of docs/protocol.md is the code the tests above run.
#[test]
fn protocol_doc_inbox_example_is_the_one_tested() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let doc = std::fs::read_to_string(root.join("../docs/protocol.md")).unwrap();
    let section = doc
        .split_once("plugs its effect in with an `Inbox`")
        .expect("the Inbox section of docs/protocol.md")
        .1;
    let block = section
        .split_once("```rust")
        .and_then(|(_, rest)| rest.split_once('\n'))
        .and_then(|(_, rest)| rest.split_once("\n```"))
        .expect("a rust block in the Inbox section")
        .0;
    let this = std::fs::read_to_string(root.join("tests/server.rs")).unwrap();
    let mirror = this
        .split_once("// docs-example: begin\n")
        .and_then(|(_, rest)| rest.split_once("// docs-example: end"))
        .expect("the docs-example markers")
        .0;
    let lines = |text: &str| -> Vec<String> {
        text.lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect()
    };
    let mut documented = lines(block);
    let config = documented.pop().expect("a non-empty block");
    assert!(
        config.starts_with("let config = ServerConfig::new(")
            && config.ends_with(".inbox(Orders);"),
        "the block ends with its configuration line: {config}"
    );
    assert_eq!(
        documented,
        lines(mirror),
        "docs/protocol.md's Orders inbox and tests/server.rs's docs_orders differ"
    );
}

// ---------- CORS ----------

#[tokio::test]
async fn cors_lets_a_page_from_another_origin_push_and_read_retry_after() {
    let origin = "http://127.0.0.1:5173";
    let (server, _dir) = start(|c| c.cors_origin(origin).test_controls(true)).await;
    let preflight = client()
        .request(reqwest::Method::OPTIONS, server.events_url())
        .header("origin", origin)
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "authorization,content-type,content-encoding",
        )
        .send()
        .await
        .unwrap();
    assert!(preflight.status().is_success(), "{}", preflight.status());
    assert_eq!(preflight.headers()["access-control-allow-origin"], origin);
    let allowed = preflight.headers()["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    assert!(allowed.contains("authorization") && allowed.contains("content-encoding"));

    server
        .faults()
        .fail_next(1, Failure::status(503).retry_after(3));
    let resp = client()
        .post(server.events_url())
        .header("origin", origin)
        .header("authorization", format!("Bearer {TOKEN_A}"))
        .body(body(CLIENT_A, &events(1..2)))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(resp.headers()["access-control-allow-origin"], origin);
    let exposed = resp.headers()["access-control-expose-headers"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    assert!(exposed.contains("retry-after"), "{exposed}");

    // Another origin gets no CORS grant; without cors_origin there is none at all.
    let other = client()
        .get(format!("{}/healthz", server.url()))
        .header("origin", "http://evil.test")
        .send()
        .await
        .unwrap();
    assert!(!other.headers().contains_key("access-control-allow-origin"));
    let (plain, _dir2) = start(|c| c).await;
    let none = client()
        .get(format!("{}/healthz", plain.url()))
        .header("origin", origin)
        .send()
        .await
        .unwrap();
    assert!(!none.headers().contains_key("access-control-allow-origin"));
}

// ---------- static files, healthz, binary ----------

#[tokio::test]
async fn serves_static_files_and_healthz() {
    let site = tempfile::tempdir().unwrap();
    std::fs::write(site.path().join("index.html"), "<h1>demo</h1>").unwrap();
    let (server, _dir) = start(|c| c.static_dir(site.path())).await;
    let index = get(format!("{}/", server.url()), None).await;
    assert_eq!(index.status, StatusCode::OK);
    assert_eq!(index.body, b"<h1>demo</h1>");
    let health = get(format!("{}/healthz", server.url()), None).await;
    assert_eq!(
        (health.status, health.body.as_slice()),
        (StatusCode::OK, &b"ok"[..])
    );
    assert_eq!(
        get(format!("{}/missing.js", server.url()), None)
            .await
            .status,
        StatusCode::NOT_FOUND
    );
}

/// The server binary on a free port with its database in `dir` and `args`:
/// the child and its base URL (read from the line it prints).
fn binary(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> (std::process::Child, String) {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_edge-outbox-server"))
        .args(["--listen", "127.0.0.1:0", "--database"])
        .arg(dir.join("bin.db"))
        .args(args)
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line
        .trim()
        .strip_prefix("listening on ")
        .expect("address line")
        .to_owned();
    (child, url)
}

#[test]
fn binary_says_it_listens_only_once_its_database_is_open() {
    // Scripts wait for "listening on" to know the server is up: a server
    // whose database cannot be opened must exit without ever printing it.
    let dir = tempfile::tempdir().unwrap();
    let not_sqlite = dir.path().join("notes.txt");
    std::fs::write(&not_sqlite, "not a database, just text that is long enough").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_edge-outbox-server"))
        .args(["--listen", "127.0.0.1:0", "--allow-anonymous", "--database"])
        .arg(&not_sqlite)
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "started on a file that is not SQLite"
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !stdout.contains("listening on"),
        "announced before failing: {stdout}"
    );
    assert!(!out.stderr.is_empty(), "failed without saying why");
}

#[tokio::test]
async fn binary_prints_its_port_and_serves() {
    let dir = tempfile::tempdir().unwrap();
    let token = format!("{TOKEN_A}:{CLIENT_A}");
    let (mut child, url) = binary(
        dir.path(),
        &["--token", &token, "--enable-test-controls"],
        &[],
    );
    assert!(!url.ends_with(":0"), "{url}");

    let health = get(format!("{url}/healthz"), None).await;
    assert_eq!(health.status, StatusCode::OK);
    let resp = client()
        .post(format!("{url}/v1/events"))
        .header("authorization", format!("Bearer {TOKEN_A}"))
        .body(body(CLIENT_A, &events(1..3)))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let log = get(format!("{url}/__test/requests"), None).await;
    assert_eq!(log.status, StatusCode::OK);
    child.kill().unwrap();
    child.wait().unwrap();
}

// ---------- JSON Schemas ----------

fn schema(name: &str) -> jsonschema::Validator {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../docs/schema")
        .join(format!("{name}.schema.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let value: Value = serde_json::from_str(&text).unwrap();
    jsonschema::draft202012::new(&value)
        .unwrap_or_else(|e| panic!("{name} is not a valid schema: {e}"))
}

fn assert_valid(v: &jsonschema::Validator, name: &str, instance: &Value) {
    let errors: Vec<String> = v
        .iter_errors(instance)
        .map(|e| format!("{e} at {}", e.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "{name}: {instance}\n{}",
        errors.join("\n")
    );
}

#[tokio::test]
async fn real_bodies_match_the_json_schemas() {
    let push_schema = schema("push-request");
    let response_schema = schema("push-response");
    let error_schema = schema("error");
    let pull_schema = schema("pull-response");

    let (server, _dir) = start(|c| c).await;
    let mut minimal = event(3, "Minimal");
    minimal.key = None;
    minimal.headers.clear();
    let batch = vec![event(1, "OrderCreated"), event(2, ""), minimal];
    let request = serde_json::to_value(PushRequest {
        protocol: 1,
        client_id: CLIENT_A.into(),
        events: batch.clone(),
    })
    .unwrap();
    // The empty type is schema-valid on purpose: the server rejects it per event.
    assert_valid(&push_schema, "push-request", &request);

    let a = push(&server, TOKEN_A, CLIENT_A, &batch).await;
    let answer: Value = serde_json::from_slice(&a.body).unwrap();
    assert_valid(&response_schema, "push-response", &answer);
    assert_eq!(a.statuses()[1], ResultStatus::Rejected);

    for bad in [
        push(&server, TOKEN_B, CLIENT_A, &batch).await,
        post_raw(&server, None, body(CLIENT_A, &batch), false)
            .await
            .unwrap(),
        post_raw(&server, Some(TOKEN_A), b"{".to_vec(), false)
            .await
            .unwrap(),
        post_raw(&server, Some(TOKEN_A), br#"{"protocol":2}"#.to_vec(), false)
            .await
            .unwrap(),
    ] {
        let v: Value = serde_json::from_slice(&bad.body).unwrap();
        assert_valid(&error_schema, "error", &v);
    }

    let pulled = get(server.events_url(), Some(TOKEN_A)).await;
    let v: Value = serde_json::from_slice(&pulled.body).unwrap();
    assert_valid(&pull_schema, "pull-response", &v);
    let empty = get(format!("{}?after=1000", server.events_url()), Some(TOKEN_A)).await;
    assert_valid(
        &pull_schema,
        "pull-response",
        &serde_json::from_slice(&empty.body).unwrap(),
    );
}

#[test]
fn schemas_refuse_wrong_bodies() {
    let push_schema = schema("push-request");
    let response_schema = schema("push-response");
    let error_schema = schema("error");
    let pull_schema = schema("pull-response");
    let event = json!({"id": "0192f0c1-7c1e-7000-8000-000000000001", "seq": 1, "type": "T",
                       "payload": {}, "created_at": "2026-11-27T12:00:00.123Z"});
    let good = json!({"protocol": 1, "client_id": "c", "events": [event]});
    assert_valid(&push_schema, "push-request", &good);
    for bad in [
        json!({"protocol": 1, "client_id": "c"}),
        json!({"protocol": "1", "client_id": "c", "events": []}),
        json!({"protocol": 1, "client_id": "c", "events": [{"id": "x", "seq": 1, "type": "T", "payload": 1, "created_at": "2026-11-27T12:00:00.123Z"}]}),
        json!({"protocol": 1, "client_id": "c", "events": [{"seq": 1, "type": "T", "payload": 1, "created_at": "2026-11-27T12:00:00.123Z"}]}),
        json!({"protocol": 1, "client_id": "c", "events": [{"id": "0192f0c1-7c1e-7000-8000-000000000001", "seq": 1, "type": "T", "payload": 1, "created_at": "2026-11-27T12:00:00.123Z", "headers": {"n": 1}}]}),
    ] {
        assert!(!push_schema.is_valid(&bad), "push-request accepted {bad}");
    }
    assert!(!response_schema.is_valid(
        &json!({"results": [{"id": "0192f0c1-7c1e-7000-8000-000000000001", "status": "maybe"}]})
    ));
    assert!(!response_schema.is_valid(&json!({"results": [{"id": "0192f0c1-7c1e-7000-8000-000000000001", "status": "rejected"}]})), "rejected needs a reason");
    assert!(!response_schema.is_valid(&json!({"result": []})));
    assert!(!error_schema.is_valid(&json!({"error": "x"})));
    assert!(!pull_schema.is_valid(&json!({"events": [{"cursor": 1}]})));
}

/// Every ```json block of docs/protocol.md preceded by `<!-- schema: NAME -->`
/// must be valid against docs/schema/NAME.schema.json, and the Rust types
/// must read it.
#[test]
fn protocol_doc_examples_match_the_schemas() {
    let doc_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/protocol.md");
    let doc = std::fs::read_to_string(&doc_path).unwrap();
    let mut checked = 0;
    let mut lines = doc.lines();
    while let Some(line) = lines.next() {
        let Some(name) = line
            .trim()
            .strip_prefix("<!-- schema: ")
            .and_then(|r| r.strip_suffix(" -->"))
        else {
            continue;
        };
        let fence = lines.next().unwrap_or_default();
        assert!(
            fence.starts_with("```json"),
            "schema marker for {name} must precede a ```json block"
        );
        let block: Vec<&str> = lines
            .by_ref()
            .take_while(|l| !l.starts_with("```"))
            .collect();
        let text = block.join("\n");
        let value: Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("docs example for {name} is not JSON: {e}"));
        assert_valid(&schema(name), name, &value);
        let typed = match name {
            "push-request" => serde_json::from_str::<PushRequest>(&text).map(|_| ()),
            "push-response" => serde_json::from_str::<PushResponse>(&text).map(|_| ()),
            "error" => serde_json::from_str::<ErrorBody>(&text).map(|_| ()),
            "pull-response" => serde_json::from_str::<PullResponse>(&text).map(|_| ()),
            other => panic!("unknown schema {other}"),
        };
        typed.unwrap_or_else(|e| {
            panic!("docs example for {name} does not parse as the Rust type: {e}")
        });
        checked += 1;
    }
    assert!(checked >= 5, "only {checked} examples checked");
}

// ---------- observability: /metrics and request logs ----------

/// The value of the sample `name` (with its labels, as printed) in a scrape.
fn sample(scrape: &str, name: &str) -> Option<f64> {
    scrape.lines().find_map(|line| {
        let value = line.strip_prefix(name)?.strip_prefix(' ')?;
        value.trim().parse().ok()
    })
}

#[tokio::test]
async fn metrics_count_events_requests_latency_and_bytes_after_pushes() {
    let (server, _dir) = start(|c| c).await;
    let batch = events(1..4);
    let body_len = body(CLIENT_A, &batch).len();
    assert_eq!(
        push(&server, TOKEN_A, CLIENT_A, &batch).await.status,
        StatusCode::OK
    );
    // Resent: three duplicates; then one good and one bad event.
    assert_eq!(
        push(&server, TOKEN_A, CLIENT_A, &batch).await.status,
        StatusCode::OK
    );
    let mixed = vec![event(4, "OrderCreated"), event(5, "")];
    let mixed_len = body(CLIENT_A, &mixed).len();
    assert_eq!(
        push(&server, TOKEN_A, CLIENT_A, &mixed).await.status,
        StatusCode::OK
    );
    // No token: 401, counted by status, no events.
    let anonymous = post_raw(&server, None, body(CLIENT_A, &batch), false)
        .await
        .unwrap();
    assert_eq!(anonymous.status, StatusCode::UNAUTHORIZED);

    // /metrics needs no token.
    let resp = client()
        .get(format!("{}/metrics", server.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4")
    );
    let scrape = resp.text().await.unwrap();
    let get = |name: &str| {
        sample(&scrape, name).unwrap_or_else(|| panic!("no sample {name} in:\n{scrape}"))
    };
    assert_eq!(get(r#"edge_outbox_events_total{result="accepted"}"#), 4.0);
    assert_eq!(get(r#"edge_outbox_events_total{result="duplicate"}"#), 3.0);
    assert_eq!(get(r#"edge_outbox_events_total{result="rejected"}"#), 1.0);
    assert_eq!(
        get(r#"edge_outbox_http_requests_total{route="/v1/events",status="200"}"#),
        3.0
    );
    assert_eq!(
        get(r#"edge_outbox_http_requests_total{route="/v1/events",status="401"}"#),
        1.0
    );
    // Four pushes timed (the 401 too), but the 401's body was only
    // drained, never read as a push: its bytes are not counted.
    assert_eq!(get("edge_outbox_push_duration_seconds_count"), 4.0);
    assert!(get("edge_outbox_push_duration_seconds_sum") > 0.0);
    assert_eq!(
        get(r#"edge_outbox_push_duration_seconds_bucket{le="+Inf"}"#),
        4.0
    );
    assert_eq!(
        get("edge_outbox_push_body_bytes_total"),
        (2 * body_len + mixed_len) as f64
    );

    // Each instance reports its own: a second server starts from zero.
    let (other, _dir2) = start(|c| c).await;
    let scrape = client()
        .get(format!("{}/metrics", other.url()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        sample(&scrape, r#"edge_outbox_events_total{result="accepted"}"#),
        Some(0.0)
    );
    // A scrape is counted once answered: not in its own output.
    assert_eq!(
        sample(
            &scrape,
            r#"edge_outbox_http_requests_total{route="/metrics",status="200"}"#
        ),
        None
    );
    server.shutdown().await.unwrap();
    other.shutdown().await.unwrap();
}

/// `/metrics` needs no token, so it must not name clients, and its series
/// must not grow with what clients send: many client ids and probed paths
/// add no series (a scanner or a rotating client cannot blow up a scrape).
#[tokio::test]
async fn metrics_name_no_client_and_stay_bounded() {
    let (server, _dir) = start(|c| c.allow_anonymous(true)).await;
    let series = |scrape: &str| {
        scrape
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| l.rsplit_once(' ').unwrap().0.to_owned())
            .collect::<std::collections::BTreeSet<_>>()
    };
    let scrape = || async {
        client()
            .get(format!("{}/metrics", server.url()))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    let probe = |i: usize| {
        let url = format!("{}/probe-{i}/../.env?x={i}", server.url());
        async move { client().get(url).send().await.unwrap().status() }
    };
    // One of each kind first, so every series that can exist does.
    post_raw(&server, None, body("client-0", &events(1..2)), false)
        .await
        .unwrap();
    probe(0).await;
    scrape().await;
    let before = series(&scrape().await);
    for i in 1..40 {
        let client_id = format!("client-{i}");
        post_raw(&server, None, body(&client_id, &events(1..2)), false)
            .await
            .unwrap();
        probe(i).await;
    }
    let after_scrape = scrape().await;
    assert_eq!(series(&after_scrape), before, "{after_scrape}");
    assert!(!after_scrape.contains("client-"), "{after_scrape}");
    assert!(!after_scrape.contains("probe-"), "{after_scrape}");
}

// ---------- auth: push and read rights, JWTs, rate limit, client_id ----------

fn stream_of(answer: &Answer) -> Vec<String> {
    assert_eq!(
        answer.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    let page: PullResponse = serde_json::from_slice(&answer.body).unwrap();
    page.events.into_iter().map(|e| e.client_id).collect()
}

#[tokio::test]
async fn a_client_reads_only_its_own_stream_and_a_reader_reads_all() {
    let (server, _dir) = start(|c| c).await;
    push(&server, TOKEN_A, CLIENT_A, &events(1..3)).await;
    push(&server, TOKEN_B, CLIENT_B, &events(1..4)).await;
    let url = server.events_url();

    // Without client_id a client gets its own stream only.
    assert_eq!(
        stream_of(&get(url.clone(), Some(TOKEN_A)).await),
        [CLIENT_A; 2]
    );
    assert_eq!(
        stream_of(&get(url.clone(), Some(TOKEN_B)).await),
        [CLIENT_B; 3]
    );
    // Its own by name is fine; another's is 403 with the error body, both ways.
    let own = get(format!("{url}?client_id={CLIENT_A}"), Some(TOKEN_A)).await;
    assert_eq!(stream_of(&own), [CLIENT_A; 2]);
    for (token, other) in [(TOKEN_A, CLIENT_B), (TOKEN_B, CLIENT_A)] {
        let refused = get(format!("{url}?client_id={other}"), Some(token)).await;
        assert_eq!(
            refused.status,
            StatusCode::FORBIDDEN,
            "{token} reading {other}"
        );
        assert_eq!(refused.error().error, "forbidden");
        assert!(refused.error().message.contains(other));
    }

    // The reader token reads every stream, or one by name...
    let all = stream_of(&get(url.clone(), Some(READER)).await);
    assert_eq!(all.len(), 5);
    let b = get(format!("{url}?client_id={CLIENT_B}"), Some(READER)).await;
    assert_eq!(stream_of(&b), [CLIENT_B; 3]);
    // ...and pushes for no one.
    let pushed = push(&server, READER, CLIENT_A, &events(9..10)).await;
    assert_eq!(pushed.status, StatusCode::FORBIDDEN);
    assert_eq!(pushed.error().error, "forbidden");
    assert_eq!(server.count(None).unwrap(), 5);

    // Anonymous (development) servers read everything, as before.
    let (anon, _dir2) = start(|c| c.allow_anonymous(true)).await;
    post_raw(&anon, None, body(CLIENT_A, &events(1..2)), false)
        .await
        .unwrap();
    post_raw(&anon, None, body(CLIENT_B, &events(1..2)), false)
        .await
        .unwrap();
    assert_eq!(stream_of(&get(anon.events_url(), None).await).len(), 2);
    // A client token on an anonymous server still gets a client's rights only.
    let refused = get(
        format!("{}?client_id={CLIENT_B}", anon.events_url()),
        Some(TOKEN_A),
    )
    .await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
}

const SECRET: &[u8] = b"a shared secret of at least thirty-two bytes";
const AUDIENCE: &str = "edge-outbox-test";

fn keys_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/keys")
}

fn key_file(name: &str) -> Vec<u8> {
    std::fs::read(keys_dir().join(name)).unwrap()
}

/// Standard claims for client `sub`, expiring `expires_in` seconds from now, plus `extra`.
fn claims(sub: Option<&str>, expires_in: i64, extra: Value) -> Value {
    let mut c = json!({
        "exp": edge_outbox_server::auth::unix_now() + expires_in,
        "aud": AUDIENCE,
        "iss": "https://id.example",
    });
    if let Some(sub) = sub {
        c["sub"] = json!(sub);
    }
    for (k, v) in extra.as_object().unwrap() {
        c[k] = v.clone();
    }
    c
}

fn sign(alg: jsonwebtoken::Algorithm, kid: Option<&str>, pem: &[u8], claims: &Value) -> String {
    use jsonwebtoken::{EncodingKey, Header};
    let key = match alg {
        jsonwebtoken::Algorithm::RS256 => EncodingKey::from_rsa_pem(pem).unwrap(),
        jsonwebtoken::Algorithm::ES256 => EncodingKey::from_ec_pem(pem).unwrap(),
        _ => EncodingKey::from_secret(pem).unwrap(),
    };
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, claims, &key).unwrap()
}

fn hs256(claims: &Value) -> String {
    edge_outbox_server::auth::sign_hs256(SECRET, claims).unwrap()
}

/// Push one event for `client_id` with `token`: status and error code (if any).
async fn try_push(server: &RunningServer, token: &str, client_id: &str) -> (StatusCode, String) {
    let a = push(server, token, client_id, &events(1..2)).await;
    let code = if a.status == StatusCode::OK {
        String::new()
    } else {
        a.error().error
    };
    (a.status, code)
}

#[tokio::test]
async fn hs256_jwts_are_verified_and_bind_the_client_id() {
    use edge_outbox_server::auth::Jwt;
    let jwt = Jwt::hs256(SECRET).unwrap().audience(AUDIENCE);
    let (server, _dir) = start(|c| c.jwt(jwt)).await;
    let ok = (StatusCode::OK, String::new());
    let unauthorized = (StatusCode::UNAUTHORIZED, "unauthorized".to_owned());

    assert_eq!(
        try_push(
            &server,
            &hs256(&claims(Some(CLIENT_A), 300, json!({}))),
            CLIENT_A
        )
        .await,
        ok
    );
    // Bound to A: pushing for B is 403.
    assert_eq!(
        try_push(
            &server,
            &hs256(&claims(Some(CLIENT_A), 300, json!({}))),
            CLIENT_B
        )
        .await,
        (StatusCode::FORBIDDEN, "forbidden".to_owned())
    );
    // Expired (past the 30 s leeway): 401 token_expired, with WWW-Authenticate.
    let expired = push(
        &server,
        &hs256(&claims(Some(CLIENT_A), -3600, json!({}))),
        CLIENT_A,
        &events(1..2),
    )
    .await;
    assert_eq!(expired.status, StatusCode::UNAUTHORIZED);
    assert_eq!(expired.error().error, "token_expired");
    assert!(expired.headers.contains_key("www-authenticate"));
    // Expired within the leeway: accepted (clock skew).
    assert_eq!(
        try_push(
            &server,
            &hs256(&claims(Some(CLIENT_A), -5, json!({}))),
            CLIENT_A
        )
        .await,
        ok
    );
    // Wrong audience, no audience, no exp.
    let wrong_aud = hs256(&claims(
        Some(CLIENT_A),
        300,
        json!({"aud": "another-service"}),
    ));
    assert_eq!(try_push(&server, &wrong_aud, CLIENT_A).await, unauthorized);
    let mut no_aud = claims(Some(CLIENT_A), 300, json!({}));
    no_aud.as_object_mut().unwrap().remove("aud");
    assert_eq!(
        try_push(&server, &hs256(&no_aud), CLIENT_A).await,
        unauthorized
    );
    let mut no_exp = claims(Some(CLIENT_A), 300, json!({}));
    no_exp.as_object_mut().unwrap().remove("exp");
    assert_eq!(
        try_push(&server, &hs256(&no_exp), CLIENT_A).await,
        unauthorized
    );
    // Signed with another secret; tampered payload; not a JWT at all.
    let other = edge_outbox_server::auth::sign_hs256(
        b"another secret, thirty-two bytes long",
        &claims(Some(CLIENT_A), 300, json!({})),
    )
    .unwrap();
    assert_eq!(try_push(&server, &other, CLIENT_A).await, unauthorized);
    let good = hs256(&claims(Some(CLIENT_A), 300, json!({})));
    let forged_claims = hs256(&claims(Some(CLIENT_B), 300, json!({})));
    let mut parts: Vec<&str> = good.split('.').collect();
    parts[1] = forged_claims.split('.').nth(1).unwrap();
    assert_eq!(
        try_push(&server, &parts.join("."), CLIENT_B).await,
        unauthorized
    );
    assert_eq!(try_push(&server, "not.a.jwt", CLIENT_A).await, unauthorized);
    // No sub claim: a valid token with no push right.
    let no_sub = hs256(&claims(None, 300, json!({})));
    assert_eq!(
        try_push(&server, &no_sub, CLIENT_A).await.0,
        StatusCode::FORBIDDEN
    );
    // Static tokens still work beside JWTs.
    assert_eq!(try_push(&server, TOKEN_B, CLIENT_B).await, ok);

    // Reads: a client JWT reads its own stream; the read scope reads all.
    let url = server.events_url();
    let a = hs256(&claims(Some(CLIENT_A), 300, json!({})));
    assert!(
        stream_of(&get(url.clone(), Some(&a)).await)
            .iter()
            .all(|c| c == CLIENT_A)
    );
    assert_eq!(
        get(format!("{url}?client_id={CLIENT_B}"), Some(&a))
            .await
            .status,
        StatusCode::FORBIDDEN
    );
    let reader = hs256(&claims(None, 300, json!({"scope": "openid events:read"})));
    let all = stream_of(&get(url.clone(), Some(&reader)).await);
    assert!(
        all.contains(&CLIENT_A.to_owned()) && all.contains(&CLIENT_B.to_owned()),
        "{all:?}"
    );
    let scp = hs256(&claims(None, 300, json!({"scp": ["events:read"]})));
    assert_eq!(
        get(format!("{url}?client_id={CLIENT_B}"), Some(&scp))
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        get(url.clone(), Some(&no_sub)).await.status,
        StatusCode::FORBIDDEN
    );
    let expired_reader = hs256(&claims(None, -3600, json!({"scope": "events:read"})));
    assert_eq!(
        get(url, Some(&expired_reader)).await.error().error,
        "token_expired"
    );
}

#[tokio::test]
async fn jwt_client_claim_issuer_and_leeway_are_configurable() {
    use edge_outbox_server::auth::Jwt;
    let jwt = Jwt::hs256(SECRET)
        .unwrap()
        .client_claim("device_id")
        .issuer("https://id.example")
        .leeway(Duration::ZERO);
    let (server, _dir) = start(|c| c.jwt(jwt)).await;
    // The client id comes from `device_id`, not `sub`; no audience configured: aud unchecked.
    let token = hs256(&claims(
        Some("user-7"),
        300,
        json!({"device_id": CLIENT_A, "aud": "anything"}),
    ));
    assert_eq!(try_push(&server, &token, CLIENT_A).await.0, StatusCode::OK);
    assert_eq!(
        try_push(&server, &token, "user-7").await.0,
        StatusCode::FORBIDDEN
    );
    let wrong_iss = hs256(&claims(
        None,
        300,
        json!({"device_id": CLIENT_A, "iss": "https://evil.example"}),
    ));
    assert_eq!(
        try_push(&server, &wrong_iss, CLIENT_A).await.0,
        StatusCode::UNAUTHORIZED
    );
    // No leeway: a token one second past exp is expired.
    let just_expired = hs256(&claims(None, -2, json!({"device_id": CLIENT_A})));
    assert_eq!(
        try_push(&server, &just_expired, CLIENT_A).await.1,
        "token_expired"
    );
}

#[tokio::test]
async fn rs256_and_es256_pem_keys_verify_and_refuse_algorithm_confusion() {
    use edge_outbox_server::auth::Jwt;
    use jsonwebtoken::Algorithm::{ES256, HS256, RS256};
    let rs_public = key_file("rs256-public.pem");
    let rs_private = key_file("rs256-private.pem");
    let es_private = key_file("es256-private.pem");
    let es_other = key_file("es256-other-private.pem");
    let good = claims(Some(CLIENT_A), 300, json!({}));

    let rs = Jwt::rs256_pem(&rs_public).unwrap().audience(AUDIENCE);
    let (server, _dir) = start(|c| c.jwt(rs)).await;
    assert_eq!(
        try_push(&server, &sign(RS256, None, &rs_private, &good), CLIENT_A)
            .await
            .0,
        StatusCode::OK
    );
    // Alg confusion: an HS256 token whose "secret" is the server's public key.
    let confused = sign(HS256, None, &rs_public, &good);
    assert_eq!(
        try_push(&server, &confused, CLIENT_A).await.0,
        StatusCode::UNAUTHORIZED
    );
    // Another algorithm, and alg "none".
    assert_eq!(
        try_push(&server, &sign(ES256, None, &es_private, &good), CLIENT_A)
            .await
            .0,
        StatusCode::UNAUTHORIZED
    );
    let unsigned = {
        use base64_like::b64;
        format!(
            "{}.{}.",
            b64(br#"{"alg":"none","typ":"JWT"}"#),
            b64(good.to_string().as_bytes())
        )
    };
    assert_eq!(
        try_push(&server, &unsigned, CLIENT_A).await.0,
        StatusCode::UNAUTHORIZED
    );
    let expired = sign(
        RS256,
        None,
        &rs_private,
        &claims(Some(CLIENT_A), -3600, json!({})),
    );
    assert_eq!(
        try_push(&server, &expired, CLIENT_A).await.1,
        "token_expired"
    );
    server.shutdown().await.unwrap();

    let es = Jwt::es256_pem(&key_file("es256-public.pem"))
        .unwrap()
        .audience(AUDIENCE);
    let (server, _dir) = start(|c| c.jwt(es)).await;
    assert_eq!(
        try_push(&server, &sign(ES256, None, &es_private, &good), CLIENT_A)
            .await
            .0,
        StatusCode::OK
    );
    // Same algorithm, another key pair: a bad signature.
    assert_eq!(
        try_push(&server, &sign(ES256, None, &es_other, &good), CLIENT_A)
            .await
            .0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        try_push(&server, &sign(RS256, None, &rs_private, &good), CLIENT_A)
            .await
            .0,
        StatusCode::UNAUTHORIZED
    );
    let wrong_aud = claims(Some(CLIENT_A), 300, json!({"aud": ["other", "another"]}));
    assert_eq!(
        try_push(
            &server,
            &sign(ES256, None, &es_private, &wrong_aud),
            CLIENT_A
        )
        .await
        .0,
        StatusCode::UNAUTHORIZED
    );
    let listed_aud = claims(Some(CLIENT_A), 300, json!({"aud": ["other", AUDIENCE]}));
    assert_eq!(
        try_push(
            &server,
            &sign(ES256, None, &es_private, &listed_aud),
            CLIENT_A
        )
        .await
        .0,
        StatusCode::OK
    );

    // Bad key material is a configuration error, not a server that refuses everything.
    assert!(Jwt::rs256_pem(b"not a pem").is_err());
    assert!(Jwt::es256_pem(&rs_public).is_err());
    assert!(Jwt::hs256(b"").is_err());
}

/// Unpadded base64url, for hand-made tokens.
mod base64_like {
    pub fn b64(bytes: &[u8]) -> String {
        const ABC: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let n =
                chunk.iter().fold(0u32, |n, &b| (n << 8) | u32::from(b)) << (8 * (3 - chunk.len()));
            for i in 0..=chunk.len() {
                out.push(ABC[((n >> (18 - 6 * i)) & 63) as usize] as char);
            }
        }
        out
    }
}

#[tokio::test]
async fn a_jwks_file_picks_the_key_by_kid() {
    use edge_outbox_server::auth::Jwt;
    use jsonwebtoken::Algorithm::{ES256, RS256};
    use jsonwebtoken::jwk::{Jwk, JwkSet};
    use jsonwebtoken::{DecodingKey, EncodingKey};
    let rs_private = key_file("rs256-private.pem");
    let es_private = key_file("es256-private.pem");
    let es_other = key_file("es256-other-private.pem");
    let mut rsa = Jwk::from_decoding_key(
        &DecodingKey::from_rsa_pem(&key_file("rs256-public.pem")).unwrap(),
        None, // no alg: RSA keys default to RS256
    )
    .unwrap();
    rsa.common.key_id = Some("rsa-1".into());
    let mut ec =
        Jwk::from_encoding_key(&EncodingKey::from_ec_pem(&es_private).unwrap(), ES256).unwrap();
    ec.common.key_id = Some("ec-1".into());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jwks.json");
    std::fs::write(
        &path,
        serde_json::to_vec(&JwkSet {
            keys: vec![rsa, ec],
        })
        .unwrap(),
    )
    .unwrap();

    let (server, _dir) = start(|c| c.jwt(Jwt::jwks_file(&path).unwrap().audience(AUDIENCE))).await;
    let good = claims(Some(CLIENT_A), 300, json!({}));
    assert_eq!(
        try_push(
            &server,
            &sign(RS256, Some("rsa-1"), &rs_private, &good),
            CLIENT_A
        )
        .await
        .0,
        StatusCode::OK
    );
    assert_eq!(
        try_push(
            &server,
            &sign(ES256, Some("ec-1"), &es_private, &good),
            CLIENT_A
        )
        .await
        .0,
        StatusCode::OK
    );
    // Unknown kid; no kid in a set of two; a kid naming a key of another algorithm;
    // the right kid signed by another key.
    for token in [
        sign(ES256, Some("ec-2"), &es_private, &good),
        sign(ES256, None, &es_private, &good),
        sign(ES256, Some("rsa-1"), &es_private, &good),
        sign(ES256, Some("ec-1"), &es_other, &good),
    ] {
        assert_eq!(
            try_push(&server, &token, CLIENT_A).await.0,
            StatusCode::UNAUTHORIZED
        );
    }
    let expired = sign(
        ES256,
        Some("ec-1"),
        &es_private,
        &claims(Some(CLIENT_A), -3600, json!({})),
    );
    assert_eq!(
        try_push(&server, &expired, CLIENT_A).await.1,
        "token_expired"
    );
    // A symmetric key has no place in a key set file; garbage is refused at start.
    assert!(Jwt::jwks(br#"{"keys":[{"kty":"oct","k":"c2VjcmV0","alg":"HS256"}]}"#).is_err());
    assert!(Jwt::jwks(b"{}").is_err());
    assert!(Jwt::jwks_file(dir.path().join("missing.json")).is_err());
}

#[tokio::test]
async fn a_client_pushing_too_fast_gets_429_with_retry_after_and_others_do_not() {
    use edge_outbox_server::RateLimit;
    let (server, _dir) = start(|c| c.rate_limit(Some(RateLimit::new(1, 3)))).await;
    // The burst of 3 passes; pushing on, one is refused within a few pushes
    // (bounded loop, no clock: the budget refills only 1 push per second).
    let mut accepted = 0;
    let refused = loop {
        let answer = push(&server, TOKEN_A, CLIENT_A, &events(accepted..accepted + 1)).await;
        if answer.status != StatusCode::OK || accepted == 50 {
            break answer;
        }
        accepted += 1;
    };
    assert!(accepted >= 3, "the burst passes: {accepted}");
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(refused.error().error, "rate_limited");
    let retry_after: u64 = refused.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=2).contains(&retry_after), "{retry_after}");
    assert_eq!(
        server.count(Some(CLIENT_A)).unwrap(),
        accepted as u64,
        "a refused push stores nothing"
    );
    // Another client has its own budget.
    assert_eq!(
        push(&server, TOKEN_B, CLIENT_B, &events(1..2)).await.status,
        StatusCode::OK
    );
    // Once the window passes, A pushes again (waits as told, bounded).
    let mut answer = refused;
    for _ in 0..10 {
        if answer.status == StatusCode::OK {
            break;
        }
        let secs: u64 = answer.headers["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        tokio::time::sleep(Duration::from_secs(secs)).await;
        answer = push(&server, TOKEN_A, CLIENT_A, &events(accepted..accepted + 1)).await;
    }
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(server.count(Some(CLIENT_A)).unwrap(), accepted as u64 + 1);
    // Unauthenticated requests spend no client's budget; reads are not limited.
    for _ in 0..5 {
        assert_eq!(
            push(&server, "nope", CLIENT_B, &events(9..10)).await.status,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            get(server.events_url(), Some(TOKEN_B)).await.status,
            StatusCode::OK
        );
    }
    server.shutdown().await.unwrap();

    // Anonymous servers limit by the pushed client_id; `None` turns limits off.
    let (anon, _dir2) = start(|c| {
        c.allow_anonymous(true)
            .rate_limit(Some(RateLimit::new(1, 2)))
    })
    .await;
    // Statuses of pushes for `client` until the first refusal (at most 50).
    let until_refused = |client: &'static str| {
        let anon = &anon;
        async move {
            let mut out = Vec::new();
            for i in 0..50i64 {
                let status = post_raw(anon, None, body(client, &events(i..i + 1)), false)
                    .await
                    .unwrap()
                    .status
                    .as_u16();
                out.push(status);
                if status != 200 {
                    break;
                }
            }
            out
        }
    };
    let a = until_refused(CLIENT_A).await;
    assert!(a.len() >= 3 && a.last() == Some(&429), "{a:?}");
    // B's budget is its own: its first two pass whatever A did.
    let b = until_refused(CLIENT_B).await;
    assert!(b.len() >= 3 && b[..2] == [200, 200], "{b:?}");
    let (free, _dir3) = start(|c| c.rate_limit(None)).await;
    for seq in 0..300 {
        assert_eq!(
            push(&free, TOKEN_A, CLIENT_A, &events(seq..seq + 1))
                .await
                .status,
            StatusCode::OK
        );
    }
}

#[tokio::test]
async fn a_client_id_with_control_characters_is_refused() {
    let (server, _dir) = start(|c| c.allow_anonymous(true)).await;
    for bad in [
        "a\u{1b}[31mred",
        "nul\0byte",
        "tab\there",
        "new\nline",
        "del\u{7f}",
        "c1\u{85}next",
        "csi\u{9b}2J",
        // Not controls to Rust, but they change what a reader sees: bidi
        // overrides and isolates ("Trojan Source"), zero-width and invisible
        // characters (two ids that look the same), line separators.
        "evil\u{202E}gpj.exe",
        "iso\u{2066}late",
        "rtl\u{200F}mark",
        "zero\u{200B}width",
        "joiner\u{200D}",
        "bom\u{FEFF}",
        "soft\u{AD}hyphen",
        "line\u{2028}sep",
    ] {
        let a = post_raw(&server, None, body(bad, &events(1..2)), false)
            .await
            .unwrap();
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{bad:?}");
        assert_eq!(a.error().error, "invalid_request");
        assert!(
            a.error().message.contains("control"),
            "{}",
            a.error().message
        );
    }
    assert_eq!(server.count(None).unwrap(), 0);
    // Printable non-ASCII is fine.
    let ok = post_raw(&server, None, body("client-ü-東京", &events(1..2)), false)
        .await
        .unwrap();
    assert_eq!(ok.status, StatusCode::OK);
    // At most 256 bytes (not characters), on push and pull alike.
    for (client_id, status) in [
        ("a".repeat(256), StatusCode::OK),
        ("a".repeat(257), StatusCode::BAD_REQUEST),
        ("é".repeat(129), StatusCode::BAD_REQUEST),
    ] {
        let a = post_raw(&server, None, body(&client_id, &events(1..2)), false)
            .await
            .unwrap();
        assert_eq!(a.status, status, "push, {} bytes", client_id.len());
        let encoded: String = client_id.bytes().map(|b| format!("%{b:02X}")).collect();
        let pulled = get(format!("{}?client_id={encoded}", server.events_url()), None).await;
        assert_eq!(pulled.status, status, "pull, {} bytes", client_id.len());
    }
    // The pull query's client_id too, by the same rule.
    for bad in ["a%1Bb", "a%E2%80%AEb", "a%E2%80%8Bb"] {
        let refused = get(format!("{}?client_id={bad}", server.events_url()), None).await;
        assert_eq!(refused.status, StatusCode::BAD_REQUEST, "{bad}");
        assert_eq!(refused.error().error, "invalid_request");
    }
}

/// Another client's stream is not reachable by spelling the query another
/// way: a repeated `client_id` (either order), percent-encoding, another
/// case of the name, an empty value, or a token in the query string.
#[tokio::test]
async fn another_stream_is_not_read_by_another_spelling_of_client_id() {
    let (server, _dir) = start(|c| c).await;
    push(&server, TOKEN_A, CLIENT_A, &events(1..3)).await;
    push(&server, TOKEN_B, CLIENT_B, &events(1..4)).await;
    let url = server.events_url();
    let encoded_b: String = CLIENT_B.bytes().map(|b| format!("%{b:02X}")).collect();
    for query in [
        format!("client_id={CLIENT_A}&client_id={CLIENT_B}"),
        format!("client_id={CLIENT_B}&client_id={CLIENT_A}"),
        format!("client_id={encoded_b}"),
        format!("client_id={}", CLIENT_B.to_uppercase()),
        format!("client%5Fid={CLIENT_B}"),
    ] {
        let answer = get(format!("{url}?{query}"), Some(TOKEN_A)).await;
        assert!(
            matches!(
                answer.status,
                StatusCode::BAD_REQUEST | StatusCode::FORBIDDEN
            ),
            "{query}: {} {}",
            answer.status,
            String::from_utf8_lossy(&answer.body)
        );
    }
    // Names the query does not know are ignored: the caller's own stream.
    for query in [
        format!("CLIENT_ID={CLIENT_B}"),
        format!("client_id[]={CLIENT_B}"),
    ] {
        let answer = get(format!("{url}?{query}"), Some(TOKEN_A)).await;
        assert_eq!(stream_of(&answer), [CLIENT_A; 2], "{query}");
    }
    let empty = get(format!("{url}?client_id="), Some(TOKEN_A)).await;
    assert_eq!(empty.status, StatusCode::BAD_REQUEST);
    // A token is read from the Authorization header only.
    for query in [format!("access_token={READER}"), format!("token={READER}")] {
        let answer = get(format!("{url}?{query}"), None).await;
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED, "{query}");
    }
}

/// Two Authorization headers are refused (401) whatever they hold, for
/// pushes and reads: a proxy in front may have checked the other one.
#[tokio::test]
async fn two_authorization_headers_are_refused() {
    let (server, _dir) = start(|c| c).await;
    for pair in [[TOKEN_A, TOKEN_B], [TOKEN_B, READER], [READER, READER]] {
        let mut req = client()
            .post(server.events_url())
            .header("content-type", "application/json");
        for t in pair {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let pushed = req
            .body(body(CLIENT_A, &events(1..2)))
            .send()
            .await
            .unwrap();
        assert_eq!(pushed.status(), StatusCode::UNAUTHORIZED, "{pair:?}");
        let mut req = client().get(server.events_url());
        for t in pair {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let read = req.send().await.unwrap();
        assert_eq!(read.status(), StatusCode::UNAUTHORIZED, "{pair:?}");
        let error: Value = serde_json::from_slice(&read.bytes().await.unwrap()).unwrap();
        assert!(
            error["message"].as_str().unwrap().contains("more than one"),
            "{error}"
        );
    }
    assert_eq!(server.count(None).unwrap(), 0);
    // One header is fine.
    assert_eq!(
        push(&server, TOKEN_A, CLIENT_A, &events(1..2)).await.status,
        StatusCode::OK
    );
}

/// The binary's auth and limit flags, wired end to end: a JWT from the env
/// secret with an audience, a reader token, a rate limit, `/__test/token`.
#[tokio::test]
async fn binary_flags_for_jwts_readers_and_rate_limits() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, url) = binary(
        dir.path(),
        &[
            "--jwt-audience",
            AUDIENCE,
            "--reader-token",
            READER,
            "--rate-limit",
            "1/s",
            "--rate-burst",
            "2",
            "--enable-test-controls",
        ],
        &[(
            "EDGE_OUTBOX_JWT_SECRET",
            std::str::from_utf8(SECRET).unwrap(),
        )],
    );
    let send = |token: String, client_id: &'static str, seq: i64| {
        client()
            .post(format!("{url}/v1/events"))
            .bearer_auth(token)
            .body(body(client_id, &events(seq..seq + 1)))
            .send()
    };
    let token = hs256(&claims(Some(CLIENT_A), 300, json!({})));
    let mut statuses = Vec::new();
    for seq in 0..50 {
        statuses.push(
            send(token.clone(), CLIENT_A, seq)
                .await
                .unwrap()
                .status()
                .as_u16(),
        );
        if statuses.last() != Some(&200) {
            break;
        }
    }
    assert!(
        statuses.len() >= 3 && statuses.last() == Some(&429),
        "{statuses:?}"
    );
    let accepted = statuses.len() - 1;
    let expired = hs256(&claims(Some(CLIENT_B), -3600, json!({})));
    assert_eq!(
        send(expired, CLIENT_B, 0).await.unwrap().status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        stream_of(&get(format!("{url}/v1/events"), Some(READER)).await).len(),
        accepted
    );
    // The test control mints with the same secret: its tokens verify.
    let minted = client()
        .post(format!("{url}/__test/token"))
        .header("content-type", "application/json")
        .body(json!({"claims": {"sub": CLIENT_B, "aud": AUDIENCE}, "expires_in": 60}).to_string())
        .send()
        .await
        .unwrap();
    let minted: Value = serde_json::from_slice(&minted.bytes().await.unwrap()).unwrap();
    let minted = minted["token"].as_str().unwrap().to_owned();
    assert_eq!(
        send(minted, CLIENT_B, 0).await.unwrap().status(),
        StatusCode::OK
    );
    child.kill().unwrap();
    child.wait().unwrap();

    // Flag mistakes stop the server at start, loudly.
    for args in [
        &["--rate-limit", "0/s"][..],
        &["--rate-limit", "fast"],
        &["--jwt-ec-pem", "/nonexistent.pem"],
        &["--jwt-secret", "x", "--jwks", "keys.json"],
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_edge-outbox-server"))
            .args(["--listen", "127.0.0.1:0", "--database"])
            .arg(dir.path().join("refused.db"))
            .args(args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} started");
        assert!(!out.stderr.is_empty(), "{args:?} said nothing");
    }
}
