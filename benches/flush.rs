//! Flush throughput: events/s from an SQLite outbox to the reference server on
//! loopback, against posting the same pre-serialized batches with the same
//! reqwest client to the same server with no outbox involved, side by side in
//! one run, for batches of 100 and 500 events with 256-byte payloads. The
//! relay side is the native driver (`RelayBuilder::spawn`, `RelayHandle::flush`).
//!
//! ```text
//! cargo bench --bench flush
//! ```
//!
//! The paired measurement adds a third side, **hand**: the floor of any
//! relay of this protocol on this schema. While each post is on the wire it
//! runs by hand (raw rusqlite, on a blocking thread) what a relay cannot
//! skip: reading the next batch's rows from an outbox file of the library's
//! schema and writing them straight into the next push body, and recording
//! the previous batch as sent the way schema v5 does (the pending floor
//! raised past it, one sent mark). Between two posts it parses the answer
//! (`serde_json`, the protocol's per-event results, matched to the batch by
//! position), as a relay must before the next post: an event the answer does
//! not name must not be overtaken. No relay logic beyond that (no lease, no
//! retry, no expiry, no status): what is left between it and the bare side
//! is the cost of the protocol's own work and of the two SQLite transactions
//! per batch.
//!
//! Each iteration delivers `EVENTS` fresh events (new ids, so the server does
//! the same insert work on both sides). Relay side: the events are committed
//! before the clock starts; the clock covers `RelayHandle::flush` (claim, serialize,
//! POST, parse, settle, batch after batch). Bare side: the bodies are built
//! before the clock starts; the clock covers the POSTs and reading the answers.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use edge_outbox::protocol::{
    PROTOCOL_VERSION, PushRequest, PushResponse, ResultStatus, WireEvent, write_json_string,
};
use edge_outbox::{
    Config, EventId, HttpTransport, NewEvent, Outbox, RelayBuilder, RelayHandle, Store,
};
use edge_outbox_server::{RunningServer, ServerConfig};
use tempfile::TempDir;
use tokio::runtime::Runtime;

/// Events delivered per iteration: enough that a round (0.1-0.3 s) measures
/// the steady rate rather than the first claim and the last settle.
const EVENTS: usize = 10_000;

/// A JSON payload of exactly 256 bytes: `{"data":"xx…","i":N}`.
fn payload(i: usize) -> serde_json::Value {
    let pad = 256 - 16 - i.to_string().len();
    serde_json::json!({ "data": "x".repeat(pad), "i": i })
}

/// Set to a running reference server's base URL (`http://127.0.0.1:PORT`) to
/// measure against it instead of one spawned in this process. `scripts/bench
/// flush` uses it to give the server a core of its own, as a server on
/// another machine would have, so that the client's work does not take CPU
/// from the server it is measured against.
const SERVER_ENV: &str = "EDGE_OUTBOX_BENCH_SERVER";

struct Fixture {
    _dir: TempDir,
    /// The in-process server, when no external one is given.
    _server: Option<RunningServer>,
    events_url: String,
    client: reqwest::Client,
}

fn fixture(rt: &Runtime) -> Fixture {
    let dir = TempDir::new().unwrap();
    let (server, events_url) = match std::env::var(SERVER_ENV) {
        Ok(base) => (None, format!("{}/v1/events", base.trim_end_matches('/'))),
        Err(_) => {
            let server = rt
                .block_on(edge_outbox_server::spawn(
                    // One client pushing flat out: no push rate limit.
                    ServerConfig::new(dir.path().join("server.db"))
                        .allow_anonymous(true)
                        .rate_limit(None),
                ))
                .unwrap();
            let url = server.events_url();
            (Some(server), url)
        }
    };
    println!(
        "server: {}",
        if server.is_some() {
            "in this process"
        } else {
            "external"
        }
    );
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    Fixture {
        _dir: dir,
        _server: server,
        events_url,
        client,
    }
}

fn enqueue(outbox: &Outbox, n: usize) {
    for start in (0..n).step_by(500) {
        outbox
            .enqueue((start..(start + 500).min(n)).map(|i| {
                NewEvent::json("Bench", &payload(i))
                    .unwrap()
                    .key(format!("k-{i}"))
            }))
            .unwrap();
    }
}

/// Post one push body and read the whole answer (returned), as the bare and
/// hand sides both do: one definition, so they do the same HTTP work.
async fn post(client: &reqwest::Client, url: &str, body: Vec<u8>) -> bytes::Bytes {
    let response = client
        .post(url)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.bytes().await.unwrap()
}

/// The bodies the relay would send for `n` fresh events, `batch` per body.
fn bodies(client_id: &str, n: usize, batch: usize, seq0: i64) -> Vec<Vec<u8>> {
    let now = edge_outbox::Timestamp::now().to_rfc3339();
    (0..n)
        .collect::<Vec<_>>()
        .chunks(batch)
        .map(|chunk| {
            let events = chunk
                .iter()
                .map(|&i| WireEvent {
                    id: EventId::new(),
                    seq: seq0 + i as i64,
                    event_type: "Bench".into(),
                    key: Some(format!("k-{i}")),
                    payload: serde_json::value::to_raw_value(&payload(i)).unwrap(),
                    headers: Default::default(),
                    created_at: now.clone(),
                })
                .collect();
            serde_json::to_vec(&PushRequest {
                protocol: PROTOCOL_VERSION,
                client_id: client_id.to_owned(),
                events,
            })
            .unwrap()
        })
        .collect()
}

/// One side of the comparison, set up for one batch size.
struct Sides {
    _dir: TempDir,
    outbox: Outbox,
    relay: RelayHandle,
    client: reqwest::Client,
    url: String,
    client_id: String,
    batch: usize,
    seq: i64,
    /// The hand side's outbox (the library's schema, filled by `enqueue`)
    /// and a raw connection to the same file.
    hand_outbox: Outbox,
    hand_conn: Arc<Mutex<rusqlite::Connection>>,
    /// The hand side's last claimed seq.
    hand_after: i64,
}

impl Sides {
    fn new(rt: &Runtime, fx: &Fixture, batch: usize) -> Self {
        let dir = TempDir::new().unwrap();
        let outbox = Outbox::open(dir.path().join("app.db"), Config::new("unused")).unwrap();
        let transport = HttpTransport::builder(fx.events_url.clone())
            .client(fx.client.clone())
            .build()
            .unwrap();
        // The native driver, as an app runs it, minus the commit wake-up (so
        // that committing the next round's events does not start delivering
        // them before the clock starts) and with a poll too slow to matter.
        let _runtime = rt.enter();
        let relay = RelayBuilder::new(outbox.store().clone(), transport)
            .max_events(batch)
            .poll_interval(Duration::from_secs(3600))
            .spawn();
        let hand_path = dir.path().join("hand.db");
        let hand_outbox = Outbox::open(&hand_path, Config::new("unused")).unwrap();
        let hand_conn = rusqlite::Connection::open(&hand_path).unwrap();
        // The library's pragmas (`Durability::Normal`, its default).
        hand_conn
            .execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;")
            .unwrap();
        Sides {
            _dir: dir,
            hand_outbox,
            hand_conn: Arc::new(Mutex::new(hand_conn)),
            hand_after: 0,
            outbox,
            relay,
            client: fx.client.clone(),
            url: fx.events_url.clone(),
            client_id: format!("bare-{batch}"),
            batch,
            seq: 1,
        }
    }

    /// Commit `EVENTS` events (not timed), then time a flush of all of them.
    fn relay_round(&mut self, rt: &Runtime) -> Duration {
        enqueue(&self.outbox, EVENTS);
        let started = Instant::now();
        let report = rt.block_on(self.relay.flush()).unwrap();
        let elapsed = started.elapsed();
        assert_eq!((report.sent, report.pending), (EVENTS as u64, 0));
        elapsed
    }

    /// Build `EVENTS` fresh events' bodies (not timed), then time posting them.
    fn bare_round(&mut self, rt: &Runtime) -> Duration {
        let bodies = bodies(&self.client_id, EVENTS, self.batch, self.seq);
        self.seq += EVENTS as i64;
        let started = Instant::now();
        rt.block_on(async {
            for body in bodies {
                post(&self.client, &self.url, body).await;
            }
        });
        started.elapsed()
    }
}

/// Column `i` of `row`, as text borrowed from SQLite (NULL: `None`).
fn text<'r>(row: &'r rusqlite::Row<'_>, i: usize) -> Option<&'r str> {
    row.get_ref(i).unwrap().as_str_or_null().unwrap()
}

/// One batch the hand side claimed: its seq range, its ids (to match the
/// answer's results) and its push body.
struct HandBatch {
    range: (i64, i64),
    ids: Vec<EventId>,
    body: Vec<u8>,
}

/// The hand side's claim: the next `limit` pending rows after `after`, read
/// and written straight into a push body (`prefix`, then each event's JSON,
/// the stored payload and headers copied in as they are), the least a relay
/// can do to send them.
fn hand_claim(
    conn: &rusqlite::Connection,
    prefix: &[u8],
    after: i64,
    limit: usize,
) -> Option<HandBatch> {
    let mut stmt = conn
        .prepare_cached(
            "SELECT seq, id, type, key, payload, headers, created_at \
             FROM edge_outbox_events WHERE seq > ?1 AND status = 'pending' \
             ORDER BY seq LIMIT ?2",
        )
        .unwrap();
    let mut rows = stmt.query(rusqlite::params![after, limit as i64]).unwrap();
    let mut body = Vec::with_capacity(limit * 420);
    body.extend_from_slice(prefix);
    let (mut lo, mut hi, mut ids) = (None, 0, Vec::with_capacity(limit));
    while let Some(row) = rows.next().unwrap() {
        let seq: i64 = row.get(0).unwrap();
        let id = EventId::from(uuid::Uuid::from_bytes(row.get(1).unwrap()));
        if lo.is_some() {
            body.push(b',');
        }
        body.extend_from_slice(b"{\"id\":\"");
        body.extend_from_slice(id.to_string().as_bytes());
        body.extend_from_slice(b"\",\"seq\":");
        body.extend_from_slice(seq.to_string().as_bytes());
        body.extend_from_slice(b",\"type\":");
        write_json_string(&mut body, text(row, 2).unwrap());
        if let Some(key) = text(row, 3) {
            body.extend_from_slice(b",\"key\":");
            write_json_string(&mut body, key);
        }
        body.extend_from_slice(b",\"payload\":");
        body.extend_from_slice(text(row, 4).unwrap().as_bytes());
        if let Some(headers) = text(row, 5) {
            body.extend_from_slice(b",\"headers\":");
            body.extend_from_slice(headers.as_bytes());
        }
        let created_at = edge_outbox::Timestamp::from_millis(row.get(6).unwrap());
        body.extend_from_slice(b",\"created_at\":\"");
        body.extend_from_slice(created_at.to_rfc3339().as_bytes());
        body.extend_from_slice(b"\"}");
        lo.get_or_insert(seq);
        hi = seq;
        ids.push(id);
    }
    body.extend_from_slice(b"]}");
    lo.map(|lo| HandBatch {
        range: (lo, hi),
        ids,
        body,
    })
}

/// The hand side's post: the body, then the answer parsed and matched to
/// the batch by position (what a relay must know before its next post).
async fn hand_post(client: &reqwest::Client, url: &str, batch: HandBatch) -> (i64, i64) {
    let answer = PushResponse::from_json(&post(client, url, batch.body).await).unwrap();
    assert_eq!(answer.results.len(), batch.ids.len());
    for (result, id) in answer.results.iter().zip(&batch.ids) {
        assert_eq!(result.id, *id, "results in request order");
        assert!(matches!(
            result.status,
            ResultStatus::Accepted | ResultStatus::Duplicate
        ));
    }
    batch.range
}

/// Set to `rows` to make the hand side settle as schema v4 did, with one
/// ranged UPDATE rewriting the batch's rows, to see what schema v5's settle
/// (the default) buys. The hand side's claim reads the same rows either way.
const HAND_SETTLE_ENV: &str = "EDGE_OUTBOX_BENCH_HAND_SETTLE";

fn settle_rows() -> bool {
    std::env::var(HAND_SETTLE_ENV).is_ok_and(|v| v == "rows")
}

/// The hand side's settle of `lo..=hi` (a whole batch, all sent), in one
/// IMMEDIATE transaction: what schema v5 writes (the pending floor raised
/// past the batch, one sent mark, the sent count), or with
/// [`HAND_SETTLE_ENV`]`=rows` what v4 wrote (one ranged UPDATE).
fn hand_settle(conn: &mut rusqlite::Connection, (lo, hi): (i64, i64)) {
    let tx = conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .unwrap();
    let now = edge_outbox::Timestamp::now().as_millis();
    if settle_rows() {
        tx.prepare_cached(
            "UPDATE edge_outbox_events SET status = 'sent', sent_at = ?1, \
             last_error = NULL, attempts = attempts + 1 \
             WHERE seq BETWEEN ?2 AND ?3 AND status = 'pending'",
        )
        .unwrap()
        .execute(rusqlite::params![now, lo, hi])
        .unwrap();
    } else {
        tx.prepare_cached(
            "INSERT OR REPLACE INTO edge_outbox_meta (key, value) VALUES ('pending_floor', ?1)",
        )
        .unwrap()
        .execute([(hi + 1).to_string()])
        .unwrap();
        tx.prepare_cached(
            "INSERT OR REPLACE INTO edge_outbox_sent_marks (hi, lo, sent_at) VALUES (?1, ?2, ?3)",
        )
        .unwrap()
        .execute([hi, lo, now])
        .unwrap();
        tx.prepare_cached(
            "UPDATE edge_outbox_meta SET value = CAST(value AS INTEGER) + ?1 \
             WHERE key = 'sent_count'",
        )
        .unwrap()
        .execute([hi - lo + 1])
        .unwrap();
    }
    tx.commit().unwrap();
}

impl Sides {
    /// Commit `EVENTS` events to the hand outbox (not timed), then time
    /// claiming, posting and settling them by hand, batch after batch, the
    /// next batch claimed and the last one settled beside each post.
    fn hand_round(&mut self, rt: &Runtime) -> Duration {
        enqueue(&self.hand_outbox, EVENTS);
        let prefix = format!(
            "{{\"protocol\":{PROTOCOL_VERSION},\"client_id\":\"{}\",\"events\":[",
            self.hand_outbox.store().client_id()
        )
        .into_bytes();
        let prefix = Arc::new(prefix);
        let (conn, batch) = (Arc::clone(&self.hand_conn), self.batch);
        let started = Instant::now();
        let after = rt.block_on(async {
            // The first batch is claimed before its post, as a relay must.
            let mut sending = hand_claim(&conn.lock().unwrap(), &prefix, self.hand_after, batch);
            let mut settle: Option<(i64, i64)> = None;
            while let Some(claimed) = sending {
                let after = claimed.range.1;
                let (conn, prefix) = (Arc::clone(&conn), Arc::clone(&prefix));
                let local = tokio::task::spawn_blocking(move || {
                    let mut conn = conn.lock().unwrap();
                    if let Some(range) = settle {
                        hand_settle(&mut conn, range);
                    }
                    hand_claim(&conn, &prefix, after, batch)
                });
                let (posted, next) =
                    tokio::join!(hand_post(&self.client, &self.url, claimed), local);
                settle = Some(posted);
                sending = next.unwrap();
            }
            let range = settle.unwrap();
            hand_settle(&mut conn.lock().unwrap(), range);
            range.1
        });
        let elapsed = started.elapsed();
        self.hand_after = after;
        elapsed
    }
}

/// CPU time used so far by this whole process (all threads: the relay, the
/// HTTP client and, when it runs in this process, the server), from
/// `/proc/self/stat` (Linux), in clock ticks of 10 ms.
fn process_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at ")".
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or(vec![], |(_, rest)| rest.split_whitespace().collect());
    // utime and stime are fields 14 and 15, so 11 and 12 after ")".
    let ticks: u64 = fields
        .get(11..13)
        .map_or(0, |f| f.iter().filter_map(|x| x.parse::<u64>().ok()).sum());
    Duration::from_millis(ticks * 10)
}

/// Relay and bare rounds alternated, so a machine whose load drifts (other
/// builds on a shared box) hits both sides alike; prints the median ratio.
fn paired(rt: &Runtime, fx: &Fixture, batch: usize, rounds: usize) {
    let mut sides = Sides::new(rt, fx, batch);
    for _ in 0..3 {
        sides.relay_round(rt);
        sides.bare_round(rt);
        sides.hand_round(rt);
    }
    let mut ratios = Vec::new();
    let (mut hand_ratios, mut hand_total, mut hand_cpu) =
        (Vec::new(), Duration::ZERO, Duration::ZERO);
    let (mut relay_total, mut bare_total) = (Duration::ZERO, Duration::ZERO);
    let (mut relay_cpu, mut bare_cpu) = (Duration::ZERO, Duration::ZERO);
    for _ in 0..rounds {
        // The relay round's CPU includes committing its events (untimed);
        // `commit_cpu` below measures that part alone to subtract it (and
        // `bodies_cpu` the bare round's untimed bodies).
        let cpu = process_cpu();
        let relay = sides.relay_round(rt);
        relay_cpu += process_cpu() - cpu;
        let cpu = process_cpu();
        let bare = sides.bare_round(rt);
        bare_cpu += process_cpu() - cpu;
        let cpu = process_cpu();
        let hand = sides.hand_round(rt);
        hand_cpu += process_cpu() - cpu;
        relay_total += relay;
        bare_total += bare;
        hand_total += hand;
        ratios.push(bare.as_secs_f64() / relay.as_secs_f64());
        hand_ratios.push(bare.as_secs_f64() / hand.as_secs_f64());
    }
    let commit_cpu = {
        let cpu = process_cpu();
        for _ in 0..rounds {
            enqueue(&sides.outbox, EVENTS);
        }
        let used = process_cpu() - cpu;
        // Deliver them so that nothing is left pending.
        rt.block_on(sides.relay.flush()).unwrap();
        used
    };
    // The bare round builds its bodies untimed: that part alone,
    // to subtract it from their CPU as the commits are from the relay's.
    let bodies_cpu = {
        let cpu = process_cpu();
        for _ in 0..rounds {
            std::hint::black_box(bodies("cpu", EVENTS, batch, 1));
        }
        process_cpu() - cpu
    };
    ratios.sort_by(f64::total_cmp);
    hand_ratios.sort_by(f64::total_cmp);
    let rate = |d: Duration| (rounds * EVENTS) as f64 / d.as_secs_f64();
    let per_event = |d: Duration| d.as_secs_f64() * 1e6 / (rounds * EVENTS) as f64;
    println!(
        "paired batch={batch}: relay {:.0} events/s, bare {:.0} events/s, ratio median {:.2} (min {:.2}, max {:.2}, {rounds} rounds of {EVENTS}); CPU per event, all threads: relay {:.1} us, bare {:.1} us",
        rate(relay_total),
        rate(bare_total),
        ratios[rounds / 2],
        ratios[0],
        ratios[rounds - 1],
        per_event(relay_cpu.saturating_sub(commit_cpu)),
        per_event(bare_cpu.saturating_sub(bodies_cpu)),
    );
    println!(
        "floor batch={batch}{}: hand (a relay by hand: rows read into the body, post, answer parsed, v5 settle) {:.0} events/s, bare / hand median {:.2} (min {:.2}, max {:.2}); CPU per event, all threads: hand {:.1} us",
        if settle_rows() {
            " (settle: v4 rows)"
        } else {
            ""
        },
        rate(hand_total),
        hand_ratios[rounds / 2],
        hand_ratios[0],
        hand_ratios[rounds - 1],
        // Its untimed commits cost what the relay side's do.
        per_event(hand_cpu.saturating_sub(commit_cpu)),
    );
}

/// Set to `relay`, `bare` or `hand` to run only that side's rounds (no
/// ratios, no criterion), for a profiler: `perf record` then sees one side.
const ONLY_ENV: &str = "EDGE_OUTBOX_BENCH_ONLY";

fn flush(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let fx = fixture(&rt);
    assert_eq!(
        payload(12345).to_string().len(),
        256,
        "payloads are 256 bytes"
    );
    if let Ok(side) = std::env::var(ONLY_ENV) {
        for batch in [100, 500] {
            let mut sides = Sides::new(&rt, &fx, batch);
            let (mut took, mut cpu) = (Duration::ZERO, Duration::ZERO);
            for _ in 0..15 {
                let before = process_cpu();
                took += match side.as_str() {
                    "relay" => sides.relay_round(&rt),
                    "bare" => sides.bare_round(&rt),
                    "hand" => sides.hand_round(&rt),
                    other => panic!("{ONLY_ENV}={other}: relay, bare or hand"),
                };
                cpu += process_cpu() - before;
            }
            let events = (15 * EVENTS) as f64;
            println!(
                "only {side} batch={batch}: {:.0} events/s; CPU per event, all threads, untimed commits included: {:.1} us",
                events / took.as_secs_f64(),
                cpu.as_secs_f64() * 1e6 / events
            );
        }
        return;
    }
    for batch in [100, 500] {
        paired(&rt, &fx, batch, 15);
    }

    let mut group = c.benchmark_group("flush");
    group.throughput(Throughput::Elements(EVENTS as u64));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(8));
    group.warm_up_time(Duration::from_secs(2));
    for batch in [100, 500] {
        let mut sides = Sides::new(&rt, &fx, batch);
        group.bench_function(format!("relay/batch={batch}"), |b| {
            b.iter_custom(|iters| (0..iters).map(|_| sides.relay_round(&rt)).sum())
        });
        group.bench_function(format!("bare/batch={batch}"), |b| {
            b.iter_custom(|iters| (0..iters).map(|_| sides.bare_round(&rt)).sum())
        });
        let stats = rt.block_on(sides.outbox.store().stats()).unwrap();
        assert_eq!(stats.pending, 0, "everything delivered");
    }
    group.finish();
}

criterion_group!(benches, flush);
criterion_main!(benches);
