//! Relay end to end: a real SQLite outbox (tempfile), the real HTTP transport
//! and the reference server on 127.0.0.1, with the server's fault injection.
//!
//! Backoff is shortened (20 ms base, 200 ms cap) so the file runs in seconds;
//! nothing here asserts on speed. Waits are conditions polled with a bounded
//! timeout, never sleeps used as synchronization.

// Native only: SQLite, tokio and sockets (the browser tests live in tests/browser.rs).
#![cfg(not(all(target_arch = "wasm32", target_os = "unknown")))]

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use edge_outbox::transport::{Push, Response, credentials_fn};
use edge_outbox::{
    Config, HttpTransport, NewEvent, Outbox, RelayBuilder, RelayHandle, Result, RetryPolicy,
    SqliteStore, Store, Timestamp, Transport,
};
use edge_outbox_server::{Applied, Failure, Inbox, RunningServer, ServerConfig};
use tempfile::TempDir;
use tokio::time::Instant;

#[path = "support/fault_proxy.rs"]
mod fault_proxy;
use fault_proxy::{FaultProxy, Mode};

/// Generous bound for any wait: only reached when something is broken.
const PATIENCE: Duration = Duration::from_secs(30);

fn fast_retry() -> RetryPolicy {
    RetryPolicy::new()
        .with_base(Duration::from_millis(20))
        .with_cap(Duration::from_millis(200))
}

fn open(dir: &TempDir) -> Outbox {
    Outbox::open(dir.path().join("app.db"), Config::new("unused")).unwrap()
}

async fn server(config: ServerConfig) -> RunningServer {
    edge_outbox_server::spawn(config).await.unwrap()
}

fn anonymous() -> ServerConfig {
    ServerConfig::in_memory().allow_anonymous(true)
}

fn http(url: &str) -> HttpTransport {
    HttpTransport::builder(url)
        .connect_timeout(Duration::from_millis(500))
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap()
}

/// A relay with test settings: short backoff, fast poll, 5 s lease.
fn relay<T: Transport + 'static>(outbox: &Outbox, transport: T) -> RelayBuilder<SqliteStore, T> {
    outbox
        .relay(transport)
        .retry_policy(fast_retry())
        .poll_interval(Duration::from_millis(50))
        .lease(Duration::from_secs(5))
}

/// Commit `n` events of type `kind` in transactions of up to 100.
fn enqueue(outbox: &Outbox, kind: &str, n: usize) {
    for chunk in (0..n).collect::<Vec<_>>().chunks(100) {
        outbox
            .enqueue(chunk.iter().map(|i| {
                NewEvent::json(kind, &serde_json::json!({ "n": i }))
                    .unwrap()
                    .key(format!("k-{i}"))
            }))
            .unwrap();
    }
}

async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn eventually_async<F: Future<Output = bool>>(what: &str, mut done: impl FnMut() -> F) {
    let deadline = Instant::now() + PATIENCE;
    while !done().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Wait until the outbox has nothing pending.
async fn drained(outbox: &Outbox) {
    eventually("the outbox to drain", || {
        outbox.stats().unwrap().pending == 0
    })
    .await;
}

/// The server holds each of the client's `n` events once, in seq order.
fn assert_delivered_once_in_order(server: &RunningServer, outbox: &Outbox, n: usize) {
    let events = server.events(outbox.client_id()).unwrap();
    assert_eq!(events.len(), n, "each event stored exactly once");
    let seqs: Vec<i64> = events.iter().map(|e| e.event.seq).collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "arrival order = seq order"
    );
    let local: Vec<i64> = outbox
        .pending(usize::MAX)
        .unwrap()
        .iter()
        .map(|e| e.seq)
        .collect();
    assert!(local.is_empty(), "still pending locally: {local:?}");
    let stats = outbox.stats().unwrap();
    assert_eq!(stats.sent as usize, n);
}

/// Flush until nothing is pending; the outbox's (sent, dead) counts.
///
/// The relay may have delivered on its own (it wakes at spawn and at each
/// commit) before the flush request arrives, so the counts are read from the
/// outbox rather than from the report, which covers that one flush.
async fn flushed(relay: &RelayHandle, outbox: &Outbox) -> (u64, u64) {
    let report = relay.flush().await.unwrap();
    assert_eq!(report.pending, 0, "{report:?}");
    let stats = outbox.stats().unwrap();
    (stats.sent, stats.dead)
}

async fn stop(relay: RelayHandle) {
    relay.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivers_10_000_events_in_order() {
    let dir = TempDir::new().unwrap();
    let outbox = open(&dir);
    let server = server(anonymous()).await;
    enqueue(&outbox, "OrderCreated", 10_000);
    let relay = relay(&outbox, http(&server.events_url())).spawn();
    assert_eq!(flushed(&relay, &outbox).await, (10_000, 0));
    assert_delivered_once_in_order(&server, &outbox, 10_000);
    assert_eq!(server.requests().len(), 100, "batches of 100");
    let status = relay.status();
    assert_eq!(
        (status.pending, status.sent, status.in_flight),
        (0, 10_000, 0)
    );
    stop(relay).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gzip_request_bodies() {
    let dir = TempDir::new().unwrap();
    let outbox = open(&dir);
    // Compressed bodies are only accepted when sent with `Content-Encoding:
    // gzip` (read as JSON, one would be a 400 and its events dead-lettered).
    let server = server(anonymous()).await;
    let transport = HttpTransport::builder(server.events_url())
        .gzip(true)
        .build()
        .unwrap();
    enqueue(&outbox, "Zipped", 300);
    let relay = relay(&outbox, transport).spawn();
    assert_eq!(flushed(&relay, &outbox).await, (300, 0));
    assert_delivered_once_in_order(&server, &outbox, 300);
    stop(relay).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wakes_on_commit_without_explicit_flush() {
    let dir = TempDir::new().unwrap();
    let outbox = open(&dir);
    let server = server(anonymous()).await;
    // A long poll interval: only the commit signal can wake the relay in time.
    let relay = relay(&outbox, http(&server.events_url()))
        .poll_interval(Duration::from_secs(3600))
        .spawn();
    let mut status = relay.subscribe();
    enqueue(&outbox, "T", 5);
    tokio::time::timeout(PATIENCE, status.wait_for(|s| s.sent == 5))
        .await
        .expect("woken by the commit")
        .unwrap();
    assert_delivered_once_in_order(&server, &outbox, 5);
    stop(relay).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_refused_then_server_appears() {
    let dir = TempDir::new().unwrap();
    let outbox = open(&dir);
    // Reserve a port, then close it: connections are refused until the server binds it.
    let addr: SocketAddr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    enqueue(&outbox, "T", 250);
    let relay = relay(&outbox, http(&format!("http://{addr}/v1/events"))).spawn();
    let report = relay.flush().await.unwrap();
    assert_eq!((report.sent, report.pending), (0, 250));
    assert!(
        report.last_error.unwrap().contains("connect"),
        "a connection error"
    );
    assert!(report.next_attempt.is_some());
    eventually("a few retries", || {
        outbox.pending(1).unwrap()[0].attempts >= 3
    })
    .await;
    let server = server(anonymous().listen(addr)).await;
    drained(&outbox).await;
    assert_delivered_once_in_order(&server, &outbox, 250);
    assert_eq!(relay.status().last_error, None);
    stop(relay).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_for_a_while() {
    let dir = TempDir::new().unwrap();
    let outbox = open(&dir);
    let server = server(anonymous()).await;
    server
        .faults()
        .fail_for(Duration::from_millis(400), Failure::status(500));
    enqueue(&outbox, "T", 300);
    let relay = relay(&outbox, http(&server.events_url())).spawn();
    drained(&outbox).await;
    assert_delivered_once_in_order(&server, &outbox, 300);
    let statuses: Vec<u16> = server.requests().iter().map(|r| r.status).collect();
    assert!(statuses.len() > 3 && statuses[0] == 500, "{statuses:?}");
    assert!(
        outbox.dead_letters().unwrap().is_empty(),
        "5xx never dead-letters"
    );
    stop(relay).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_in_the_middle_of_a_pipelined_flush_keeps_the_order() {
    // A backlog keeps claims full, so while each push is out the relay has
    // already claimed the pushes after it: a failure in the middle must not
    // let any of those overtake the failed push, nor lose or repeat one.
    let dir = TempDir::new().unwrap();
    let outbox = open(&dir);
    let server = server(anonymous()).await;
    // Slow answers, so the failure lands in the middle of the flush.
    server.faults().delay(Duration::from_millis(5));
    enqueue(&outbox, "T", 3000);
    let relay = relay(&outbox, http(&server.events_url())).spawn();
    eventually("the first pushes to arrive", || {
        server.events(outbox.client_id()).unwrap().len() >= 500
    })
    .await;
    server
        .faults()
        .fail_for(Duration::from_millis(300), Failure::status(500));
    drained(&outbox).await;
    assert_delivered_once_in_order(&server, &outbox, 3000);
    let statuses: Vec<u16> = server.requests().iter().map(|r| r.status).collect();
    let failed = statuses.iter().position(|&s| s == 500);
    assert!(
        failed.is_some_and(|i| i > 0 && statuses[i..].contains(&200)),
        "a push failed midway, and delivery resumed: {statuses:?}"
    );
    stop(relay).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_of_a_503_is_honoured() {
    let dir = TempDir::new().unwrap();
    let outbox = open(&dir);
    let server = server(anonymous()).await;
    server
        .faults()
        .fail_next(1, Failure::status(503).retry_after(1));
    enqueue(&outbox, "T", 10);
    // A cap above the Retry-After (the cap is its ceiling).
    let relay = relay(&outbox, http(&server.events_url()))
        .retry_policy(fast_retry().with_cap(Duration::from_secs(5)))
        .spawn();
    drained(&outbox).await;
    assert_delivered_once_in_order(&server, &outbox, 10);
    let log = server.requests();
    assert_eq!(log[0].status, 503);
    assert_eq!(log[1].status, 200);
    // The backoff alone would have come back within 20 ms; Retry-After says 1 s.
    let waited = log[1].started_at - log[0].finished_at;
    assert!(waited >= 990, "came back after {waited} ms");
    stop(relay).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_of_ten_years_is_capped_and_try_now_overrides_the_wait() {
    let dir = TempDir::new().unwrap();
    let outbox = open(&dir);
    let server = server(anonymous()).await;
    server
        .faults()
        .fail_next(1, Failure::status(503).retry_after(315_360_000));
    enqueue(&outbox, "T", 10);
    // The default cap, 5 minutes: the ceiling of any Retry-After.
    let relay = relay(&outbox, http(&server.events_url()))
        .retry_policy(RetryPolicy::new())
        .spawn();
    let report = relay.flush().await.unwrap();
    let before = Timestamp::now();
    let at = report.next_attempt.expect("waiting for the Retry-After");
    assert!(at <= before.add(RetryPolicy::DEFAULT_CAP), "{at:?}");
    assert!(at >= before.add(Duration::from_secs(200)), "{at:?}");
    assert_eq!(relay.flush().await.unwrap().sent, 0, "not before");
    // The app's "try now": the relay wakes and the waiting events go.
    assert_eq!(
        outbox.store().retry_now(Timestamp::now()).await.unwrap(),
        10
    );
    drained(&outbox).await;
    assert_delivered_once_in_order(&server, &outbox, 10);
    stop(relay).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_400_for_every_push_dead_letters_nothing() {
    // A proxy's header limit, a WAF, a backend that cannot read the body's
    // encoding: the same 400 for every push, for a minute.
    let dir = TempDir::new().unwrap();
    let outbox = open(&dir);
    let server = server(anonymous()).await;
    server
        .faults()
        .fail_for(Duration::from_secs(60), Failure::status(400));
    enqueue(&outbox, "T", 250);
    let relay = relay(&outbox, http(&server.events_url())).spawn();
    let report = relay.flush().await.unwrap();
    assert_eq!((report.dead, report.pending), (0, 250), "{report:?}");
    let error = report.last_error.expect("the report names the failure");
    assert!(error.contains("400"), "{error}");
    assert_eq!(relay.status().last_error.as_deref(), Some(error.as_str()));
    // A few more attempts with backoff: still nothing dead, and no storm of
    // requests (one per attempt, no bisection of a channel failure).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stats = outbox.stats().unwrap();
    assert_eq!((stats.dead, stats.pending), (0, 250));
    let requests = server.requests().len();
    assert!(requests <= 30, "{requests} requests in 0.5 s");
    server.faults().reset();
    drained(&outbox).await;
    assert_delivered_once_in_order(&server, &outbox, 250);
    stop(relay).await;
}

/// `n` events whose push JSON is about `kib` KiB each.
fn enqueue_large(outbox: &Outbox, n: usize, kib: usize) -> Vec<i64> {
    let events = (0..n).map(|i| {
        NewEvent::json(
            "Large",
            &serde_json::json!({ "i": i, "data": "x".repeat(kib * 1024 - 64) }),
        )
        .unwrap()
    });
    outbox
        .enqueue(events)
        .unwrap()
        .iter()
        .map(|e| e.seq)
        .collect()
}

/// The seqs the server stored for `outbox`'s client, in arrival order.
fn received_seqs(server: &RunningServer, outbox: &Outbox) -> Vec<i64> {
    server
        .events(outbox.client_id())
        .unwrap()
        .iter()
        .map(|e| e.event.seq)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_uplink_delays_large_events_but_delivers_them() {
    // A 40 KiB/s uplink; 16 KiB events take 0.4 s each to upload. A push of
    // two or more times out (0.45 s plus the body at 160 KiB/s is not
    // enough), a push of one does not: the relay must narrow its pushes
    // to single events instead of rebuilding the same push forever.
    let dir = TempDir::new().unwrap();
    let outbox = open(&dir);
    let server = server(anonymous()).await;
    let proxy = FaultProxy::start(server.addr()).await;
    proxy.set_mode(Mode::ThrottleUpload {
        bytes_per_sec: 40 * 1024,
    });
    let seqs = enqueue_large(&outbox, 6, 16);
    let transport = HttpTransport::builder(proxy.events_url())
        .timeout(Duration::from_millis(450))
        .min_upload_rate(160 * 1024)
        .build()
        .unwrap();
    let relay = relay(&outbox, transport).spawn();
    drained(&outbox).await;
    assert_eq!(
        received_seqs(&server, &outbox),
        seqs,
        "every event once, in order"
    );
    assert_eq!(outbox.stats().unwrap().dead, 0);
    // The server finishes a push the client has given up on (and answers
    // the resend `duplicate`), so its log shows the attempts, not timeouts.
    let mut log = server.requests();
    log.sort_by_key(|r| r.started_at);
    assert!(
        log.iter().filter(|r| r.events > 1).count() >= 2,
        "large pushes were tried, timed out and tried again: {log:?}"
    );
    assert!(
        log.iter().rev().take(3).all(|r| r.events == 1),
        "then single events: {log:?}"
    );
    stop(relay).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_early_413_seen_as_a_reset_leads_to_smaller_pushes() {
    // A proxy that answers 413 from the head and closes while a large push
    // is still uploading: the client mostly sees a connection reset.
    let dir = TempDir::new().unwrap();
    let outbox = open(&dir);
    let server = server(anonymous()).await;
    let proxy = FaultProxy::start(server.addr()).await;
    proxy.set_mode(Mode::EarlyRejectAbove {
        body_bytes: 256 * 1024,
    });
    // 24 events of 64 KiB: 8 per push under the 512 KiB default, and no
    // more than 3 fit under the proxy's limit.
    let seqs = enqueue_large(&outbox, 24, 64);
    let relay = relay(&outbox, http(&proxy.events_url())).spawn();
    drained(&outbox).await;
    assert_eq!(
        received_seqs(&server, &outbox),
        seqs,
        "every event once, in order"
    );
    assert_eq!(
        outbox.stats().unwrap().dead,
        0,
        "nothing dead for the proxy's limit"
    );
    assert!(proxy.requests_cut() > 0, "the proxy cut large pushes");
    stop(relay).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_expired_dead_letter_is_sent() {
    let dir = TempDir::new().unwrap();
    let outbox = open(&dir);
    let server = server(anonymous()).await;
    enqueue(&outbox, "T", 1);
    let id = outbox.pending(1).unwrap()[0].id;
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let relay = relay(&outbox, http(&server.events_url()))
        .retry_policy(fast_retry().with_max_age(Some(Duration::from_secs(1))))
        .spawn();
    assert_eq!(flushed(&relay, &outbox).await, (0, 1));
    assert_eq!(
        outbox.get(id).unwrap().unwrap().last_error.as_deref(),
        Some("expired")
    );
    assert!(outbox.retry(id).unwrap());
    assert_eq!(flushed(&relay, &outbox).await, (1, 0));
    assert_delivered_once_in_order(&server, &outbox, 1);
    stop(relay).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_that_never_comes_times_out_and_the_resend_is_a_duplicate() {
    let dir = TempDir::new().unwrap();
    let outbox = open(&dir);
    let server = server(anonymous()).await;
    // The server commits, then holds the answer past the client's 2 s timeout.
    server.faults().delay_next(1, Duration::from_secs(4));
    enqueue(&outbox, "T", 20);
    let relay = relay(&outbox, http(&server.events_url())).spawn();
    let report = relay.flush().await.unwrap();
    assert_eq!(report.pending, 20);
    assert!(report.last_error.unwrap().contains("timed out"));
    drained(&outbox).await;
    assert_delivered_once_in_order(&server, &outbox, 20);
    stop(relay).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_response_after_commit_changes_nothing_on_resend() {
    let dir = TempDir::new().unwrap();
    let outbox = open(&dir);
    let server = server(anonymous()).await;
    server.faults().drop_response_after_commit(1);
    enqueue(&outbox, "T", 50);
    let relay = relay(&outbox, http(&server.events_url())).spawn();
    drained(&outbox).await;
    assert_delivered_once_in_order(&server, &outbox, 50);
    let log = server.requests();
    assert_eq!((log[0].status, log[0].events), (0, 50), "first answer lost");
    assert_eq!((log[1].status, log[1].events), (200, 50), "resent whole");
    stop(relay).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_200_is_retried() {
    let dir = TempDir::new().unwrap();
    let outbox = open(&dir);
    let server = server(anonymous()).await;
    server.faults().malformed_response(1);
    enqueue(&outbox, "T", 30);
    let relay = relay(&outbox, http(&server.events_url())).spawn();
    let report = relay.flush().await.unwrap();
    assert!(report.last_error.unwrap().contains("unreadable"));
    drained(&outbox).await;
    assert_delivered_once_in_order(&server, &outbox, 30);
    stop(relay).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_401_asks_for_a_fresh_token() {
    let dir = TempDir::new().unwrap();
    let outbox = open(&dir);
    let server = server(ServerConfig::in_memory().token("fresh", outbox.client_id())).await;
    // The app's token cache: starts stale; a refresh fetches a fresh one.
    let token = Arc::new(Mutex::new("stale".to_owned()));
    let refreshes = Arc::new(Mutex::new(0));
    let credentials = {
        let (token, refreshes) = (token.clone(), refreshes.clone());
        credentials_fn(move |refresh: bool| {
            if refresh {
                *token.lock().unwrap() = "fresh".to_owned();
                *refreshes.lock().unwrap() += 1;
            }
            let value = format!("Bearer {}", token.lock().unwrap());
            async move { Ok(vec![("authorization".to_owned(), value)]) }
        })
    };
    let transport = HttpTransport::builder(server.events_url())
        .credentials(credentials)
        .build()
        .unwrap();
    enqueue(&outbox, "T", 150);
    let relay = relay(&outbox, transport).spawn();
    assert_eq!(flushed(&relay, &outbox).await, (150, 0));
    assert_delivered_once_in_order(&server, &outbox, 150);
    let statuses: Vec<u16> = server.requests().iter().map(|r| r.status).collect();
    assert_eq!(statuses, [401, 200, 200]);
    assert_eq!(*refreshes.lock().unwrap(), 1);
    stop(relay).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_413_splits_the_batch_and_only_an_oversized_event_dies() {
    let dir = TempDir::new().unwrap();
    let outbox = open(&dir);
    let server = server(anonymous().body_limit(16 * 1024)).await;
    let events = (0..60).map(|i| {
        let size = if i == 30 { 20 * 1024 } else { 1024 };
        NewEvent::json(
            "Blob",
            &serde_json::json!({ "i": i, "data": "x".repeat(size) }),
        )
        .unwrap()
    });
    let big_seq = outbox.enqueue(events).unwrap()[30].seq;
    let relay = relay(&outbox, http(&server.events_url())).spawn();
    assert_eq!(flushed(&relay, &outbox).await, (59, 1));
    let dead = outbox.dead_letters().unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].seq, big_seq);
    assert!(dead[0].last_error.as_deref().unwrap().contains("413"));
    let received = server.events(outbox.client_id()).unwrap();
    assert_eq!(received.len(), 59);
    assert!(received.windows(2).all(|w| w[0].event.seq < w[1].event.seq));
    assert!(server.requests().iter().any(|r| r.status == 413));
    stop(relay).await;
}

/// An inbox that refuses events of type "Poison" for good.
struct RefusePoison;

impl Inbox for RefusePoison {
    fn apply(
        &self,
        _tx: &rusqlite::Transaction<'_>,
        _client_id: &str,
        event: &edge_outbox::protocol::WireEvent,
    ) -> std::result::Result<Applied, edge_outbox_server::BoxError> {
        Ok(if event.event_type == "Poison" {
            Applied::Reject("poison is not accepted here".into())
        } else {
            Applied::Accept
        })
    }
}

/// An inbox that cannot apply events of type "Unappliable" and fails the
/// whole batch for them ("try later", a 500), every time: the docs' Orders
/// inbox meeting a payload it cannot decode, before issue 9.
struct FailsOnOne;

impl Inbox for FailsOnOne {
    fn apply(
        &self,
        _tx: &rusqlite::Transaction<'_>,
        _client_id: &str,
        event: &edge_outbox::protocol::WireEvent,
    ) -> std::result::Result<Applied, edge_outbox_server::BoxError> {
        if event.event_type == "Unappliable" {
            return Err("invalid type: string \"250\", expected i64".into());
        }
        Ok(Applied::Accept)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_failing_one_event_with_500_still_gets_the_events_before_it() {
    let dir = TempDir::new().unwrap();
    let outbox = open(&dir);
    let server = server(anonymous().inbox(FailsOnOne)).await;
    enqueue_with_poison(&outbox, "Unappliable");
    let relay = relay(&outbox, http(&server.events_url())).spawn();
    // Repeated 500s narrow the pushes until the 17 events before the one
    // the backend cannot apply are through.
    eventually("the events before the failing one at the server", || {
        server.count(Some(outbox.client_id())).unwrap() >= 17
    })
    .await;
    eventually("the failing event pushed alone", || {
        server
            .requests()
            .last()
            .is_some_and(|r| r.events == 1 && r.status == 500)
    })
    .await;
    let received = server.events(outbox.client_id()).unwrap();
    let seqs: Vec<i64> = received.iter().map(|e| e.event.seq).collect();
    assert_eq!(
        seqs,
        (1..=17).collect::<Vec<_>>(),
        "in order, nothing after it"
    );
    let stats = outbox.stats().unwrap();
    assert_eq!((stats.dead, stats.pending), (0, 23), "never dead for a 5xx");
    assert!(relay.status().last_error.unwrap().contains("500"));
    stop(relay).await;
}

fn enqueue_with_poison(outbox: &Outbox, poison_type: &str) {
    let events = (0..40).map(|i| {
        let kind = if i == 17 { poison_type } else { "Good" };
        NewEvent::json(kind, &i).unwrap()
    });
    outbox.enqueue(events).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_poison_event_alone_goes_dead() {
    let dir = TempDir::new().unwrap();
    let outbox = open(&dir);
    let server = server(anonymous().inbox(RefusePoison)).await;
    enqueue_with_poison(&outbox, "Poison");
    let relay = relay(&outbox, http(&server.events_url())).spawn();
    assert_eq!(flushed(&relay, &outbox).await, (39, 1));
    let dead = outbox.dead_letters().unwrap();
    assert_eq!(dead[0].event_type, "Poison");
    assert_eq!(
        dead[0].last_error.as_deref(),
        Some("poison is not accepted here")
    );
    let received = server.events(outbox.client_id()).unwrap();
    assert_eq!(received.len(), 39);
    assert!(received.iter().all(|e| e.event.event_type == "Good"));
    stop(relay).await;
}

/// A fault-injecting proxy transport: a push holding an event of type
/// "Poison422" is answered 422 without reaching the server, as a backend that
/// refuses whole requests (instead of single events) would.
struct RejectWholeRequests(HttpTransport);

impl Transport for RejectWholeRequests {
    async fn send(&self, push: Push) -> Result<Response> {
        if std::str::from_utf8(&push.body)
            .unwrap()
            .contains(r#""type":"Poison422""#)
        {
            return Ok(Response {
                status: 422,
                retry_after: None,
                body: br#"{"error":"invalid_event","message":"cannot process Poison422"}"#.to_vec(),
            });
        }
        self.0.send(push).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_422_is_bisected_until_the_poison_event_is_alone() {
    let dir = TempDir::new().unwrap();
    let outbox = open(&dir);
    let server = server(anonymous()).await;
    enqueue_with_poison(&outbox, "Poison422");
    let relay = relay(&outbox, RejectWholeRequests(http(&server.events_url()))).spawn();
    assert_eq!(flushed(&relay, &outbox).await, (39, 1));
    let dead = outbox.dead_letters().unwrap();
    assert_eq!(dead[0].event_type, "Poison422");
    assert!(
        dead[0]
            .last_error
            .as_deref()
            .unwrap()
            .contains("cannot process Poison422")
    );
    let received = server.events(outbox.client_id()).unwrap();
    assert_eq!(received.len(), 39);
    assert!(received.windows(2).all(|w| w[0].event.seq < w[1].event.seq));
    stop(relay).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_killed_mid_flight_loses_nothing() {
    let dir = TempDir::new().unwrap();
    let outbox = open(&dir);
    let server = server(anonymous()).await;
    server.faults().delay_next(1, Duration::from_secs(3));
    enqueue(&outbox, "T", 500);
    let first = relay(&outbox, http(&server.events_url()))
        .lease(Duration::from_millis(500))
        .spawn();
    let mut status = first.subscribe();
    tokio::time::timeout(PATIENCE, status.wait_for(|s| s.in_flight > 0))
        .await
        .unwrap()
        .unwrap();
    // A crash: no settle, no lease release.
    first.abort();
    // A new process opens the file and relays; it waits out the dead lease.
    let reopened = open(&dir);
    let second = relay(&reopened, http(&server.events_url()))
        .lease(Duration::from_millis(500))
        .spawn();
    drained(&reopened).await;
    assert_delivered_once_in_order(&server, &reopened, 500);
    stop(second).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_settles_the_batch_in_flight() {
    let dir = TempDir::new().unwrap();
    let outbox = open(&dir);
    let server = server(anonymous()).await;
    server.faults().delay_next(1, Duration::from_millis(500));
    enqueue(&outbox, "T", 100);
    let relay = relay(&outbox, http(&server.events_url())).spawn();
    let mut status = relay.subscribe();
    tokio::time::timeout(PATIENCE, status.wait_for(|s| s.in_flight > 0))
        .await
        .unwrap()
        .unwrap();
    relay.shutdown().await.unwrap();
    // The batch on the wire was answered and settled before the relay stopped.
    assert_delivered_once_in_order(&server, &outbox, 100);
    // And the lease was released: a new relay starts at once.
    enqueue(&outbox, "T", 1);
    let next = self::relay(&outbox, http(&server.events_url()))
        .lease(Duration::from_secs(3600))
        .spawn();
    let report = next.flush().await.unwrap();
    assert_eq!((report.pending, report.lease_held_until), (0, None));
    assert_eq!(outbox.stats().unwrap().sent, 101);
    stop(next).await;
}

const CHILD_DB: &str = "EDGE_OUTBOX_TEST_CHILD_DB";
const CHILD_URL: &str = "EDGE_OUTBOX_TEST_CHILD_URL";
const PER_PROCESS: usize = 1_500;

/// The second process of `two_processes_relay_one_file`: does nothing unless
/// started by it (with the database path and server URL in the environment).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_process_relay() {
    let (Ok(db), Ok(url)) = (std::env::var(CHILD_DB), std::env::var(CHILD_URL)) else {
        return;
    };
    let outbox = Outbox::open(&db, Config::new(&url)).unwrap();
    let relay = relay(&outbox, http(&url))
        .lease(Duration::from_secs(2))
        .spawn();
    for round in 0..15 {
        enqueue(&outbox, &format!("Child{round}"), PER_PROCESS / 15);
        tokio::task::yield_now().await;
    }
    eventually_async("the shared file to drain", || async {
        outbox.stats().unwrap().pending == 0
    })
    .await;
    relay.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_relay_one_file() {
    let dir = TempDir::new().unwrap();
    let db = dir.path().join("app.db");
    let outbox = open(&dir);
    let server = server(anonymous()).await;
    let url = server.events_url();
    let child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_process_relay",
            "--quiet",
            "--test-threads=1",
        ])
        .env(CHILD_DB, &db)
        .env(CHILD_URL, &url)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let relay = relay(&outbox, http(&url))
        .lease(Duration::from_secs(2))
        .spawn();
    for round in 0..15 {
        enqueue(&outbox, &format!("Parent{round}"), PER_PROCESS / 15);
        tokio::task::yield_now().await;
    }
    let child = tokio::task::spawn_blocking(move || {
        let mut child = child;
        child.wait().unwrap()
    });
    let total = 2 * PER_PROCESS as u64;
    eventually("every event of both processes at the server", || {
        server.count(Some(outbox.client_id())).unwrap() >= total
    })
    .await;
    assert!(child.await.unwrap().success(), "child relay failed");
    drained(&outbox).await;
    let stats = server.stats().unwrap();
    assert_eq!(stats.len(), 1, "one client (one file)");
    assert_eq!(stats[0].events, total, "no duplicate effects");
    assert_eq!(stats[0].out_of_order, 0, "seq order kept at the server");
    assert_eq!(outbox.stats().unwrap().sent, total);
    stop(relay).await;
}

const MEMORY_DB: &str = "EDGE_OUTBOX_TEST_MEMORY_DB";
const MEMORY_URL: &str = "EDGE_OUTBOX_TEST_MEMORY_URL";
const BACKLOG: usize = 1_000_000;

/// Peak resident memory of this process (VmHWM), in KiB.
fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// The measured process of `peak_memory_flushing_a_million_events`: opens
/// the prepared file, flushes the whole backlog, prints its peak RSS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_memory_relay() {
    let (Ok(db), Ok(url)) = (std::env::var(MEMORY_DB), std::env::var(MEMORY_URL)) else {
        return;
    };
    let outbox = Outbox::open(&db, Config::new(&url)).unwrap();
    let before = peak_rss_kib();
    let relay = outbox.relay(http(&url)).spawn();
    loop {
        let report = relay.flush().await.unwrap();
        assert!(report.last_error.is_none(), "{report:?}");
        if report.pending == 0 {
            break;
        }
    }
    relay.shutdown().await.unwrap();
    assert_eq!(outbox.stats().unwrap().sent, BACKLOG as u64);
    println!("PEAK_RSS_KIB before={before} after={}", peak_rss_kib());
}

/// Peak memory while a relay flushes a backlog of 1,000,000 events (target
/// 64 MiB). The relay runs in a child process (this test binary re-executed)
/// so the server and the backlog's preparation are not counted.
/// `cargo test --release --test relay -- --ignored --nocapture peak_memory`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "about a minute in release; run for BENCHMARKS.md"]
async fn peak_memory_flushing_a_million_events() {
    let dir = TempDir::new().unwrap();
    let db = dir.path().join("app.db");
    let outbox = open(&dir);
    let started = Instant::now();
    for start in (0..BACKLOG).step_by(10_000) {
        outbox
            .enqueue((start..start + 10_000).map(|i| {
                NewEvent::json(
                    "Bench",
                    &serde_json::json!({ "i": i, "data": "x".repeat(200) }),
                )
                .unwrap()
            }))
            .unwrap();
    }
    drop(outbox);
    println!("backlog of {BACKLOG} committed in {:?}", started.elapsed());
    // One client flushing a million events flat out: no push rate limit.
    let server = server(
        ServerConfig::new(dir.path().join("server.db"))
            .allow_anonymous(true)
            .rate_limit(None),
    )
    .await;
    let url = server.events_url();
    let started = Instant::now();
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "child_memory_relay",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(MEMORY_DB, &db)
            .env(MEMORY_URL, &url)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "child failed: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let line = stdout
        .lines()
        .find_map(|l| l.find("PEAK_RSS_KIB").map(|at| &l[at..]))
        .unwrap_or_else(|| panic!("the child reports its peak: {stdout}"));
    let elapsed = started.elapsed();
    println!(
        "{line}; flushed {BACKLOG} events in {elapsed:?} ({:.0} events/s)",
        BACKLOG as f64 / elapsed.as_secs_f64()
    );
    let after: u64 = line.rsplit('=').next().unwrap().parse().unwrap();
    assert_eq!(server.count(None).unwrap(), BACKLOG as u64);
    assert!(after <= 64 * 1024, "peak RSS {after} KiB is over 64 MiB");
}

// ---- JWT expiry end to end (issue 12, item 2) ----

/// The relay's app hands out an expired JWT first (a cached token past its
/// `exp`); the server answers 401 `token_expired`, the relay asks the app for
/// fresh credentials and resends: everything arrives exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_jwt_is_refused_with_401_and_the_refreshed_one_delivers() {
    use edge_outbox_server::auth::{Jwt, sign_hs256, unix_now};
    const SECRET: &[u8] = b"relay test secret, thirty-two bytes or more";
    let dir = TempDir::new().unwrap();
    let outbox = open(&dir);
    let jwt = Jwt::hs256(SECRET).unwrap().audience("edge-outbox");
    let server = server(ServerConfig::in_memory().jwt(jwt)).await;
    let token_for = |expires_in: i64| {
        let claims = serde_json::json!({
            "sub": outbox.client_id(),
            "aud": "edge-outbox",
            "exp": unix_now() + expires_in,
        });
        sign_hs256(SECRET, &claims).unwrap()
    };
    // The app's token cache: starts with a token that expired an hour ago.
    let token = Arc::new(Mutex::new(token_for(-3600)));
    let asked = Arc::new(Mutex::new(Vec::new()));
    let fresh = token_for(600);
    let credentials = {
        let (token, asked) = (token.clone(), asked.clone());
        credentials_fn(move |refresh: bool| {
            asked.lock().unwrap().push(refresh);
            if refresh {
                *token.lock().unwrap() = fresh.clone();
            }
            let value = format!("Bearer {}", token.lock().unwrap());
            async move { Ok(vec![("authorization".to_owned(), value)]) }
        })
    };
    let transport = HttpTransport::builder(server.events_url())
        .credentials(credentials)
        .build()
        .unwrap();
    enqueue(&outbox, "T", 150);
    let relay = relay(&outbox, transport).spawn();
    assert_eq!(flushed(&relay, &outbox).await, (150, 0));
    assert_delivered_once_in_order(&server, &outbox, 150);
    let statuses: Vec<u16> = server.requests().iter().map(|r| r.status).collect();
    assert_eq!(statuses.first(), Some(&401), "{statuses:?}");
    assert!(statuses[1..].iter().all(|&s| s == 200), "{statuses:?}");
    // Asked once without refresh, then exactly one refresh, then the fresh token kept.
    let asked = asked.lock().unwrap().clone();
    assert_eq!(asked.iter().filter(|&&r| r).count(), 1, "{asked:?}");
    assert_eq!(asked[..2], [false, true], "{asked:?}");
    stop(relay).await;
}

// ---- HTTPS (issue 12, item 5) ----

#[path = "support/tls.rs"]
mod tls;

/// The reference server terminates TLS with a certificate from a private
/// CA made at test time. A transport that does not trust the CA (platform
/// roots only, the default) fails with a transport error naming the
/// certificate and loses nothing; one that trusts it through
/// `add_root_certificate` delivers every event once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_delivers_over_https_once_the_ca_is_trusted() {
    let pki = tls::TestPki::new();
    let server = server(anonymous().tls_pem(pki.cert_pem.clone(), pki.key_pem.clone())).await;
    assert!(server.events_url().starts_with("https://"));
    let dir = TempDir::new().unwrap();
    let outbox = open(&dir);
    enqueue(&outbox, "T", 120);

    let untrusting = http(&server.events_url());
    let refused = relay(&outbox, untrusting).spawn();
    let report = refused.flush().await.unwrap();
    stop(refused).await;
    assert_eq!(report.pending, 120, "{report:?}");
    let error = report.last_error.expect("the flush stopped on the failure");
    assert!(
        error.contains("certificate") && error.contains("UnknownIssuer"),
        "{error}"
    );
    assert_eq!(server.count(None).unwrap(), 0);
    assert_eq!(outbox.stats().unwrap().dead, 0, "a TLS failure is retried");

    let trusting = HttpTransport::builder(server.events_url())
        .add_root_certificate(pki.ca_pem.clone())
        .build()
        .unwrap();
    // The events may still wait for their backoff; the app's "try now" ends it.
    outbox.retry_now().unwrap();
    let delivering = relay(&outbox, trusting).spawn();
    assert_eq!(flushed(&delivering, &outbox).await, (120, 0));
    stop(delivering).await;
    assert_delivered_once_in_order(&server, &outbox, 120);
}

/// `add_root_certificate` refuses what it cannot use when the transport is
/// built, not at the first push.
#[test]
fn unusable_root_certificates_fail_the_build() {
    let err = HttpTransport::builder("https://127.0.0.1:1/v1/events")
        .add_root_certificate("not a certificate")
        .build()
        .unwrap_err();
    assert!(err.to_string().contains("no CERTIFICATE"), "{err}");
    let pki = tls::TestPki::new();
    let err = HttpTransport::builder("https://127.0.0.1:1/v1/events")
        .client(reqwest::Client::new())
        .add_root_certificate(pki.ca_pem)
        .build()
        .unwrap_err();
    assert!(err.to_string().contains("client of your own"), "{err}");
}

/// The server's real push rate limit (issue 12, item 6): pushes over the
/// client's budget get 429 with Retry-After; the relay waits (capped by its
/// backoff cap) and resends, and every event still arrives exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limited_relay_waits_and_delivers_everything_once() {
    use edge_outbox_server::RateLimit;
    let dir = TempDir::new().unwrap();
    let outbox = open(&dir);
    // A burst of 3 pushes, then 1 per second.
    let server = server(anonymous().rate_limit(Some(RateLimit::new(1, 3)))).await;
    enqueue(&outbox, "T", 60);
    // 10 events per push: 3 pushes pass at once, the other 3 wait for the budget.
    let relay = relay(&outbox, http(&server.events_url()))
        .max_events(10)
        .spawn();
    drained(&outbox).await;
    assert_delivered_once_in_order(&server, &outbox, 60);
    let statuses: Vec<u16> = server.requests().iter().map(|r| r.status).collect();
    assert!(statuses.contains(&429), "{statuses:?}");
    assert!(
        statuses.iter().all(|&s| s == 200 || s == 429),
        "{statuses:?}"
    );
    assert_eq!(statuses.iter().filter(|&&s| s == 200).count(), 3 + 3);
    assert_eq!(outbox.stats().unwrap().dead, 0);
    stop(relay).await;
}
