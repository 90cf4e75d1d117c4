//! Ingest load generator: N clients speaking sync protocol v1, each pushing
//! batches of events one after the other (as a relay does), for a fixed
//! time. Prints events/s and push latency (p50, p99) as one line of JSON.
//!
//! ```sh
//! cargo run --release -p edge-outbox-server --example ingest -- \
//!   --url http://127.0.0.1:8080/v1/events --clients 50 --batch 100 --payload 256 --seconds 10
//! ```
//!
//! `--url` may be repeated: pushes then go to the URLs in turn (a client-side
//! round robin); behind a load balancer give its one URL. Every answer must be
//! a `200` with every event `accepted` (ids are fresh UUIDv7s): anything else
//! is counted as a failure and printed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use edge_outbox::protocol::{PROTOCOL_VERSION, PushRequest, PushResponse, ResultStatus, WireEvent};
use edge_outbox::{EventId, Timestamp};
use serde_json::value::RawValue;

struct Args {
    urls: Vec<String>,
    clients: usize,
    batch: usize,
    payload: usize,
    seconds: f64,
    warmup: f64,
}

fn parse() -> Args {
    let mut args = Args {
        urls: Vec::new(),
        clients: 50,
        batch: 100,
        payload: 256,
        seconds: 10.0,
        warmup: 1.0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--url" => args.urls.push(value()),
            "--clients" => args.clients = value().parse().expect("--clients N"),
            "--batch" => args.batch = value().parse().expect("--batch N"),
            "--payload" => args.payload = value().parse().expect("--payload BYTES"),
            "--seconds" => args.seconds = value().parse().expect("--seconds S"),
            "--warmup" => args.warmup = value().parse().expect("--warmup S"),
            other => panic!("unknown flag {other}"),
        }
    }
    assert!(!args.urls.is_empty(), "give at least one --url");
    args
}

#[tokio::main]
async fn main() {
    let args = Arc::new(parse());
    // A JSON payload of exactly `payload` bytes: {"data":"xxx…"}.
    let filler = "x".repeat(args.payload.saturating_sub(11));
    let payload = Arc::new(format!(r#"{{"data":"{filler}"}}"#));
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(args.clients)
        .build()
        .expect("http client");
    let start = Instant::now();
    let measure_from = start + Duration::from_secs_f64(args.warmup);
    let end = measure_from + Duration::from_secs_f64(args.seconds);
    let run = std::process::id();
    let mut tasks = Vec::new();
    for c in 0..args.clients {
        let (args, http, payload) = (Arc::clone(&args), http.clone(), Arc::clone(&payload));
        tasks.push(tokio::spawn(async move {
            let client_id = format!("ingest-{run}-{c}");
            let mut seq = 0i64;
            let (mut events, mut failures) = (0u64, 0u64);
            let mut latencies = Vec::new();
            let mut push_no = c;
            while Instant::now() < end {
                let batch: Vec<WireEvent> = (0..args.batch)
                    .map(|_| {
                        seq += 1;
                        WireEvent {
                            id: EventId::new(),
                            seq,
                            event_type: "OrderCreated".into(),
                            key: None,
                            payload: RawValue::from_string(payload.to_string()).unwrap(),
                            headers: Default::default(),
                            created_at: Timestamp::now().to_rfc3339(),
                        }
                    })
                    .collect();
                let body = serde_json::to_vec(&PushRequest {
                    protocol: PROTOCOL_VERSION,
                    client_id: client_id.clone(),
                    events: batch,
                })
                .unwrap();
                let url = &args.urls[push_no % args.urls.len()];
                push_no += 1;
                let sent = Instant::now();
                let answer = http
                    .post(url)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await;
                let ok = match answer {
                    Ok(a) if a.status() == reqwest::StatusCode::OK => {
                        match a
                            .bytes()
                            .await
                            .map(|b| serde_json::from_slice::<PushResponse>(&b))
                        {
                            Ok(Ok(r)) => {
                                r.results.iter().all(|r| r.status == ResultStatus::Accepted)
                            }
                            _ => false,
                        }
                    }
                    Ok(a) => {
                        eprintln!("push answered {}", a.status());
                        false
                    }
                    Err(e) => {
                        eprintln!("push failed: {e}");
                        false
                    }
                };
                let done = Instant::now();
                if sent >= measure_from && done <= end {
                    latencies.push(done - sent);
                    if ok {
                        events += args.batch as u64;
                    }
                }
                if !ok {
                    failures += 1;
                }
            }
            (events, failures, latencies)
        }));
    }
    let (mut events, mut failures, mut latencies) = (0u64, 0u64, Vec::new());
    for t in tasks {
        let (e, f, l) = t.await.expect("client task");
        events += e;
        failures += f;
        latencies.extend(l);
    }
    latencies.sort();
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    println!(
        "{{\"events_per_s\": {:.0}, \"pushes\": {}, \"failures\": {}, \"p50_ms\": {:.1}, \"p99_ms\": {:.1}, \"clients\": {}, \"batch\": {}, \"payload\": {}, \"seconds\": {}}}",
        events as f64 / args.seconds,
        latencies.len(),
        failures,
        pct(0.50),
        pct(0.99),
        args.clients,
        args.batch,
        args.payload,
        args.seconds
    );
}
