//! Drain time under faults: 1,000 events from an SQLite outbox to the
//! reference server on loopback when **every push fails once** (the first
//! send of each push gets a network error, the resend passes), with the
//! default retry policy (full-jitter backoff, base 1 s). Against what a user
//! would write by hand with the same policy: a loop that posts pre-serialized
//! batches of 100 and, after a failure, waits the policy's backoff for a
//! first failed attempt and posts again.
//!
//! ```text
//! cargo bench --bench drain
//! ```
//!
//! Both sides draw their delays from the same seeded jitter sequence in each
//! round, so the ratio shows what the relay adds (a backoff that grows with
//! attempts the events never had, as before issue 9, shows as a ratio far
//! above 1), not the luck of the draw. Rounds alternate between the sides.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use edge_outbox::protocol::{PROTOCOL_VERSION, PushRequest, WireEvent};
use edge_outbox::transport::{Push, Response};
use edge_outbox::{
    Config, Error, EventId, HttpTransport, Jitter, NewEvent, Outbox, RelayBuilder, RetryPolicy,
    Store, Transport,
};
use tempfile::TempDir;
use tokio::runtime::Runtime;

const EVENTS: usize = 1_000;
const BATCH: usize = 100;
const ROUNDS: u64 = 5;

/// Fails every other send (the first send of each push) with a network error.
struct FailEachPushOnce<T> {
    inner: T,
    sends: Arc<AtomicU64>,
}

impl<T: Transport> Transport for FailEachPushOnce<T> {
    async fn send(&self, push: Push) -> edge_outbox::Result<Response> {
        if self.sends.fetch_add(1, Ordering::Relaxed).is_multiple_of(2) {
            push.sent.notify();
            return Err(Error::Network {
                message: "injected: connection refused".into(),
                source: None,
            });
        }
        self.inner.send(push).await
    }
}

fn payload(i: usize) -> serde_json::Value {
    serde_json::json!({ "data": "x".repeat(200), "i": i })
}

async fn relay_round(url: &str, seed: u64) -> Duration {
    let dir = TempDir::new().unwrap();
    let outbox = Outbox::open(dir.path().join("app.db"), Config::new("unused")).unwrap();
    outbox
        .enqueue((0..EVENTS).map(|i| NewEvent::json("Drain", &payload(i)).unwrap()))
        .unwrap();
    let transport = FailEachPushOnce {
        inner: HttpTransport::new(url).unwrap(),
        sends: Arc::new(AtomicU64::new(0)),
    };
    let started = Instant::now();
    let relay = RelayBuilder::new(outbox.store().clone(), transport)
        .max_events(BATCH)
        .retry_policy(RetryPolicy::new())
        .jitter(Jitter::seeded(seed))
        .poll_interval(Duration::from_secs(3600))
        .spawn();
    while outbox.store().stats().await.unwrap().pending > 0 {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let elapsed = started.elapsed();
    relay.shutdown().await.unwrap();
    elapsed
}

async fn bare_round(url: &str, seed: u64, round: u64) -> Duration {
    let client = reqwest::Client::new();
    let now = edge_outbox::Timestamp::now().to_rfc3339();
    let bodies: Vec<Vec<u8>> = (0..EVENTS)
        .collect::<Vec<_>>()
        .chunks(BATCH)
        .map(|chunk| {
            let events = chunk
                .iter()
                .map(|&i| WireEvent {
                    id: EventId::new(),
                    seq: i as i64 + 1,
                    event_type: "Drain".into(),
                    key: None,
                    payload: serde_json::value::to_raw_value(&payload(i)).unwrap(),
                    headers: Default::default(),
                    created_at: now.clone(),
                })
                .collect();
            serde_json::to_vec(&PushRequest {
                protocol: PROTOCOL_VERSION,
                client_id: format!("bare-{round}"),
                events,
            })
            .unwrap()
        })
        .collect();
    let policy = RetryPolicy::new();
    let mut jitter = Jitter::seeded(seed);
    let started = Instant::now();
    for body in bodies {
        // The first send fails (as the relay's does); wait the policy's
        // backoff for a first failed attempt, then post.
        tokio::time::sleep(policy.delay(1, None, &mut jitter)).await;
        let response = client
            .post(url)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        response.bytes().await.unwrap();
    }
    started.elapsed()
}

fn main() {
    // `cargo test --benches` runs bench binaries with no arguments too: only
    // `cargo bench` (which passes --bench) runs the rounds.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let rt = Runtime::new().unwrap();
    let dir = TempDir::new().unwrap();
    let server = rt
        .block_on(edge_outbox_server::spawn(
            edge_outbox_server::ServerConfig::new(dir.path().join("server.db"))
                .allow_anonymous(true)
                // One client pushing flat out for as long as the bench runs.
                .rate_limit(None),
        ))
        .unwrap();
    let url = server.events_url();
    let mut ratios = Vec::new();
    for round in 0..ROUNDS {
        let seed = 1_000 + round;
        // Alternate which side goes first.
        let (relay, bare) = if round % 2 == 0 {
            let r = rt.block_on(relay_round(&url, seed));
            (r, rt.block_on(bare_round(&url, seed, round)))
        } else {
            let b = rt.block_on(bare_round(&url, seed, round));
            (rt.block_on(relay_round(&url, seed)), b)
        };
        let ratio = relay.as_secs_f64() / bare.as_secs_f64();
        println!(
            "drain round {round}: relay {:.2} s, bare loop {:.2} s, ratio relay/bare {ratio:.3}",
            relay.as_secs_f64(),
            bare.as_secs_f64()
        );
        ratios.push(ratio);
    }
    ratios.sort_by(f64::total_cmp);
    println!(
        "drain 1,000 events, every push failing once: median ratio relay/bare {:.3} (range {:.3}-{:.3}, {ROUNDS} rounds)",
        ratios[ratios.len() / 2],
        ratios[0],
        ratios[ratios.len() - 1]
    );
}
