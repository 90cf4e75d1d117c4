//! Commit cost of `Outbox::transaction` against raw rusqlite doing the same
//! two INSERTs in one transaction with the same pragmas, side by side in one
//! run, for both durability modes; and the commit cost with 1,000,000 pending
//! events against an empty outbox. `scripts/bench commit` runs it and prints
//! the ratios recorded in BENCHMARKS.md.

use std::path::Path;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
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

fn commit_vs_raw(c: &mut Criterion) {
    for durability in [Durability::Normal, Durability::Full] {
        let dir = tempfile::tempdir().unwrap();
        let outbox = open_outbox(&dir.path().join("outbox.db"), durability);
        // The raw side gets its schema and pragmas from the same code, then
        // writes through its own plain connection.
        let raw_path = dir.path().join("raw.db");
        drop(open_outbox(&raw_path, durability));
        let mut raw = Connection::open(&raw_path).unwrap();
        let sync = match durability {
            Durability::Full => "FULL",
            _ => "NORMAL",
        };
        raw.execute_batch(&format!(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = {sync};"
        ))
        .unwrap();

        let mut group = c.benchmark_group(format!("commit_{durability:?}").to_lowercase());
        let mut next = 0i64;
        group.bench_function("outbox", |b| {
            b.iter(|| {
                next += 1;
                commit_outbox(&outbox, next)
            })
        });
        let mut next = 0i64;
        group.bench_function("raw", |b| {
            b.iter(|| {
                next += 1;
                commit_raw(&mut raw, next)
            })
        });
        group.finish();
    }
}

fn commit_with_backlog(c: &mut Criterion) {
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

    let mut group = c.benchmark_group("commit_backlog");
    let mut next = 0i64;
    group.bench_function("empty", |b| {
        b.iter(|| {
            next += 1;
            commit_outbox(&empty, next)
        })
    });
    let mut next = 0i64;
    group.bench_function("1m_pending", |b| {
        b.iter(|| {
            next += 1;
            commit_outbox(&full, next)
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(50)
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(5));
    targets = commit_vs_raw, commit_with_backlog
}
criterion_main!(benches);
