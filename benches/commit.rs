//! Commit cost of `Outbox::transaction` (one order row plus one event) against
//! two hand-written baselines, side by side in one run, for both durability
//! modes; and the commit cost with 1,000,000 pending events against an empty
//! outbox, and what opening each of those two files takes. `scripts/bench
//! commit` runs it; BENCHMARKS.md records its lines.
//!
//! ```text
//! cargo bench --bench commit            # EDGE_OUTBOX_BENCH_ROUNDS=15 for more rounds
//! ```
//!
//! The sides:
//! - **outbox**: the library, `outbox.transaction(|tx| { INSERT order; tx.enqueue(..) })`;
//! - **raw**: raw rusqlite doing the same two INSERTs into a file with the
//!   library's own schema and pragmas: the library's overhead on its schema;
//! - **minimal**: raw rusqlite writing the order row and an event into the
//!   seed's minimal outbox table (`seq INTEGER PRIMARY KEY AUTOINCREMENT, id
//!   TEXT, type TEXT, payload TEXT, status INTEGER, created_at INTEGER`, the
//!   id a 36-character UUIDv7), same pragmas: what a user would write by hand.
//!
//! Rounds alternate the sides (their order rotates every round), so a
//! neighbour's disk activity or a build on the shared machine lands on every
//! side alike. Each side's round is `COMMITS` commits; the printed figures are
//! the median time per commit over the rounds with its range, and the median
//! of the per-round ratios with their range.

use std::path::Path;
use std::time::{Duration, Instant};

use edge_outbox::{Config, Durability, NewEvent, Outbox, Timestamp};
use rusqlite::{Connection, TransactionBehavior, params};
use serde::Serialize;

#[derive(Serialize)]
struct OrderCreated {
    order_id: i64,
    amount: i64,
}

const ORDERS: &str =
    "CREATE TABLE IF NOT EXISTS orders (id INTEGER PRIMARY KEY, amount INTEGER NOT NULL)";
const INSERT_ORDER: &str = "INSERT INTO orders (id, amount) VALUES (?1, ?2)";
/// The statement the SQLite store runs for an event, written out for the raw side.
const INSERT_EVENT: &str = "INSERT INTO edge_outbox_events \
     (id, type, key, payload, headers, created_at, next_attempt_at) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6)";
/// The seed's minimal outbox table (status 0 = pending).
const MINIMAL: &str = "CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT,
    type TEXT,
    payload TEXT,
    status INTEGER,
    created_at INTEGER
)";
const INSERT_MINIMAL: &str = "INSERT INTO outbox (id, type, payload, status, created_at) \
     VALUES (?1, ?2, ?3, 0, ?4)";

fn open_outbox(path: &Path, durability: Durability) -> Outbox {
    let outbox = Outbox::open(
        path,
        Config::new("http://127.0.0.1:9").durability(durability),
    )
    .unwrap();
    outbox
        .transaction(|tx| {
            tx.execute(ORDERS, [])?;
            Ok(())
        })
        .unwrap();
    outbox
}

/// A plain connection with the library's pragmas.
fn open_raw(path: &Path, durability: Durability) -> Connection {
    let conn = Connection::open(path).unwrap();
    let sync = match durability {
        Durability::Full => "FULL",
        _ => "NORMAL",
    };
    conn.execute_batch(&format!(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = {sync};"
    ))
    .unwrap();
    conn
}

/// One order row plus its event through the library.
fn commit_outbox(outbox: &Outbox, id: i64) {
    outbox
        .transaction(|tx| {
            tx.execute(INSERT_ORDER, (id, 250))?;
            tx.enqueue(
                NewEvent::json(
                    "OrderCreated",
                    &OrderCreated {
                        order_id: id,
                        amount: 250,
                    },
                )?
                .key(format!("order-{id}")),
            )
        })
        .unwrap();
}

/// The same two INSERTs by hand: same schema, same pragmas, same values
/// (a UUIDv7, the JSON payload, the time).
fn commit_raw(conn: &mut Connection, id: i64) {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .unwrap();
    tx.prepare_cached(INSERT_ORDER)
        .unwrap()
        .execute((id, 250))
        .unwrap();
    let payload = serde_json::to_string(&OrderCreated {
        order_id: id,
        amount: 250,
    })
    .unwrap();
    let now = Timestamp::now().as_millis();
    tx.prepare_cached(INSERT_EVENT)
        .unwrap()
        .execute(params![
            uuid::Uuid::now_v7().as_bytes(),
            "OrderCreated",
            format!("order-{id}"),
            payload,
            Option::<String>::None,
            now
        ])
        .unwrap();
    tx.commit().unwrap();
}

/// The order row plus an event in the seed's minimal table, by hand.
fn commit_minimal(conn: &mut Connection, id: i64) {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .unwrap();
    tx.prepare_cached(INSERT_ORDER)
        .unwrap()
        .execute((id, 250))
        .unwrap();
    let payload = serde_json::to_string(&OrderCreated {
        order_id: id,
        amount: 250,
    })
    .unwrap();
    tx.prepare_cached(INSERT_MINIMAL)
        .unwrap()
        .execute(params![
            uuid::Uuid::now_v7().to_string(),
            "OrderCreated",
            payload,
            Timestamp::now().as_millis()
        ])
        .unwrap();
    tx.commit().unwrap();
}

/// One side of a comparison: commits one order (numbered from 1 up).
struct Side<'a> {
    name: &'static str,
    next: i64,
    commit: Box<dyn FnMut(i64) + 'a>,
    /// Time per commit in each measured round.
    rounds: Vec<Duration>,
}

impl<'a> Side<'a> {
    fn new(name: &'static str, commit: impl FnMut(i64) + 'a) -> Self {
        Side {
            name,
            next: 0,
            commit: Box::new(commit),
            rounds: Vec::new(),
        }
    }

    fn round(&mut self, commits: u32) -> Duration {
        let started = Instant::now();
        for _ in 0..commits {
            self.next += 1;
            (self.commit)(self.next);
        }
        started.elapsed() / commits
    }
}

fn median(mut xs: Vec<f64>) -> (f64, f64, f64) {
    xs.sort_by(f64::total_cmp);
    (xs[xs.len() / 2], xs[0], xs[xs.len() - 1])
}

/// Run `rounds` rounds of `commits` commits on every side, rotating which
/// side goes first, after one unmeasured round each; print each side's
/// median time per commit and the per-round time ratio of every side after
/// the first against the first.
fn alternate(label: &str, sides: &mut [Side<'_>], rounds: usize, commits: u32) {
    for side in sides.iter_mut() {
        side.round(commits);
    }
    let n = sides.len();
    for r in 0..rounds {
        for k in 0..n {
            let side = &mut sides[(r + k) % n];
            let t = side.round(commits);
            side.rounds.push(t);
        }
    }
    let us = |d: &Duration| d.as_secs_f64() * 1e6;
    for side in sides.iter() {
        let (m, lo, hi) = median(side.rounds.iter().map(us).collect());
        println!(
            "{label} {}: {m:.1} us per commit (rounds {lo:.1}-{hi:.1})",
            side.name
        );
    }
    let first = &sides[0];
    for other in &sides[1..] {
        let ratios = first
            .rounds
            .iter()
            .zip(&other.rounds)
            .map(|(a, b)| a.as_secs_f64() / b.as_secs_f64())
            .collect();
        let (m, lo, hi) = median(ratios);
        println!(
            "{label} ratio {}/{} (time): median {m:.3} (rounds {lo:.3}-{hi:.3}); as commits/s: {:.3} ({:.3}-{:.3}), {rounds} rounds of {commits}",
            first.name,
            other.name,
            1.0 / m,
            1.0 / hi,
            1.0 / lo,
        );
    }
}

fn rounds() -> usize {
    std::env::var("EDGE_OUTBOX_BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(9)
}

fn commit_vs_hand_written() {
    for (durability, commits) in [(Durability::Normal, 2_000), (Durability::Full, 300)] {
        let dir = tempfile::tempdir().unwrap();
        let outbox = open_outbox(&dir.path().join("outbox.db"), durability);
        // The raw side gets its schema and pragmas from the same code, then
        // writes through its own plain connection.
        let raw_path = dir.path().join("raw.db");
        drop(open_outbox(&raw_path, durability));
        let mut raw = open_raw(&raw_path, durability);
        let mut minimal = open_raw(&dir.path().join("minimal.db"), durability);
        minimal.execute_batch(ORDERS).unwrap();
        minimal.execute_batch(MINIMAL).unwrap();

        let label = format!("commit {durability:?}").to_lowercase();
        let mut sides = [
            Side::new("outbox", |id| commit_outbox(&outbox, id)),
            Side::new("raw", |id| commit_raw(&mut raw, id)),
            Side::new("minimal", |id| commit_minimal(&mut minimal, id)),
        ];
        alternate(&label, &mut sides, rounds(), commits);
    }
}

fn commit_with_backlog() {
    let dir = tempfile::tempdir().unwrap();
    let empty = open_outbox(&dir.path().join("empty.db"), Durability::Normal);
    let full = open_outbox(&dir.path().join("backlog.db"), Durability::Normal);
    eprintln!("filling the backlog: 1,000,000 pending events");
    for chunk in 0..100 {
        full.enqueue((0..10_000).map(|i| {
            NewEvent::json(
                "Backlog",
                &OrderCreated {
                    order_id: chunk * 10_000 + i,
                    amount: 1,
                },
            )
            .unwrap()
        }))
        .unwrap();
    }
    assert_eq!(full.stats().unwrap().pending, 1_000_000);
    // What opening the file costs an app at start with this backlog: medians
    // of 5 opens of each file (the OS has the files in its page cache).
    drop(full);
    let open_ms = |name: &str| {
        let path = dir.path().join(name);
        let ms = (0..5)
            .map(|_| {
                let started = Instant::now();
                drop(Outbox::open(&path, Config::new("http://127.0.0.1:9")).unwrap());
                started.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        median(ms)
    };
    let (full_ms, full_lo, full_hi) = open_ms("backlog.db");
    let (empty_ms, empty_lo, empty_hi) = open_ms("empty.db");
    println!(
        "open backlog: 1,000,000 pending {full_ms:.2} ms ({full_lo:.2}-{full_hi:.2}), \
         empty {empty_ms:.2} ms ({empty_lo:.2}-{empty_hi:.2}), medians of 5 opens"
    );
    let full = open_outbox(&dir.path().join("backlog.db"), Durability::Normal);
    let mut sides = [
        Side::new("1m_pending", |id| commit_outbox(&full, id)),
        Side::new("empty", |id| commit_outbox(&empty, id)),
    ];
    alternate("commit backlog", &mut sides, rounds(), 2_000);
}

fn main() {
    // `cargo bench` passes `--bench`; a filter argument picks one part.
    let filter = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .unwrap_or_default();
    if "hand_written".contains(&filter) {
        commit_vs_hand_written();
    }
    if "backlog".contains(&filter) {
        commit_with_backlog();
    }
}
