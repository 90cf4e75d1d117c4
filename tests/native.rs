//! Native integration tests of the SQLite outbox: real SQLite files in
//! temporary directories. One binary for the whole area (2-core machine).
#![cfg(not(all(target_arch = "wasm32", target_os = "unknown")))]

mod conformance;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use edge_outbox::{Config, Durability, Error, EventStatus, NewEvent, Outbox, SCHEMA_VERSION};
use rusqlite::Connection;
use serde::Serialize;
use tempfile::TempDir;

const APP_SCHEMA: &str = "CREATE TABLE IF NOT EXISTS orders (id INTEGER PRIMARY KEY, amount INTEGER NOT NULL CHECK (amount > 0))";

fn config() -> Config {
    Config::new("http://127.0.0.1:9/v1/events")
}

/// A fresh outbox in a temp dir, with the app's `orders` table beside it.
fn open_new() -> (TempDir, PathBuf, Outbox) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.db");
    let outbox = Outbox::open(&path, config()).unwrap();
    outbox
        .transaction(|tx| {
            tx.execute(APP_SCHEMA, [])?;
            Ok(())
        })
        .unwrap();
    (dir, path, outbox)
}

fn count_orders(path: &Path) -> i64 {
    let conn = Connection::open(path).unwrap();
    conn.query_row("SELECT count(*) FROM orders", [], |r| r.get(0))
        .unwrap()
}

fn count_events(path: &Path) -> i64 {
    let conn = Connection::open(path).unwrap();
    conn.query_row("SELECT count(*) FROM edge_outbox_events", [], |r| r.get(0))
        .unwrap()
}

#[derive(Serialize, serde::Deserialize)]
struct Order {
    id: i64,
    amount: i64,
}

fn order_created(id: i64, amount: i64) -> NewEvent {
    NewEvent::json("OrderCreated", &Order { id, amount })
        .unwrap()
        .key(format!("order-{id}"))
}

/// Asserts that the events of writer `tag` (order ids `tag * stride + i`) are
/// exactly orders 0..count of that writer, in seq order: one writer's commits
/// keep their commit order among everybody's.
fn assert_writer_order(events: &[edge_outbox::Event], tag: i64, stride: i64, count: i64) {
    let mine: Vec<i64> = events
        .iter()
        .map(|e| e.payload_as::<Order>().unwrap().id)
        .filter(|id| id / stride == tag)
        .collect();
    assert_eq!(
        mine,
        (0..count).map(|i| tag * stride + i).collect::<Vec<_>>()
    );
}

fn insert_order(tx: &edge_outbox::OutboxTx<'_>, id: i64, amount: i64) -> edge_outbox::Result<()> {
    tx.execute(
        "INSERT INTO orders (id, amount) VALUES (?1, ?2)",
        (id, amount),
    )?;
    Ok(())
}

#[tokio::test]
async fn sqlite_store_conforms() {
    let dirs = Mutex::new(Vec::new());
    conformance::run_all(|| {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(dir.path().join("c.db"), config()).unwrap();
        dirs.lock().unwrap().push(dir);
        let store = outbox.store().clone();
        async move { store }
    })
    .await;
}

/// The in-memory store of `edge_outbox::testing` keeps the same contract.
#[tokio::test]
async fn memory_store_conforms() {
    conformance::run_all(|| async { edge_outbox::testing::MemoryStore::new() }).await;
}

#[test]
fn transaction_commits_app_rows_and_events_together() {
    let (_dir, path, outbox) = open_new();
    let value = outbox
        .transaction(|tx| {
            insert_order(tx, 1, 250)?;
            let id = tx.enqueue(order_created(1, 250))?;
            Ok(id)
        })
        .unwrap();
    assert_eq!(count_orders(&path), 1);
    let event = outbox.get(value).unwrap().expect("event stored");
    assert_eq!(event.event_type, "OrderCreated");
    assert_eq!(event.payload, r#"{"id":1,"amount":250}"#);
    assert_eq!(event.key.as_deref(), Some("order-1"));
    assert_eq!(event.status, EventStatus::Pending);
    assert_eq!(event.id.as_uuid().get_version_num(), 7, "ids are UUIDv7");
    let stats = outbox.stats().unwrap();
    assert_eq!(stats.pending, 1);
    assert!(stats.oldest_pending_at.is_some());
}

#[test]
fn err_from_the_closure_rolls_back_everything() {
    let (_dir, path, outbox) = open_new();
    let err = outbox
        .transaction(|tx| {
            insert_order(tx, 1, 250)?;
            tx.enqueue(order_created(1, 250))?;
            Err::<(), _>(Error::aborted("changed my mind"))
        })
        .unwrap_err();
    assert!(matches!(err, Error::Aborted { .. }));
    assert_eq!((count_orders(&path), count_events(&path)), (0, 0));
}

#[test]
fn panic_in_the_closure_rolls_back_and_the_outbox_stays_usable() {
    let (_dir, path, outbox) = open_new();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        outbox.transaction(|tx| {
            insert_order(tx, 1, 250)?;
            tx.enqueue(order_created(1, 250))?;
            panic!("app bug");
            #[allow(unreachable_code)]
            Ok(())
        })
    }));
    assert!(result.is_err());
    assert_eq!((count_orders(&path), count_events(&path)), (0, 0));
    outbox
        .transaction(|tx| {
            insert_order(tx, 2, 10)?;
            tx.enqueue(order_created(2, 10))?;
            Ok(())
        })
        .unwrap();
    assert_eq!((count_orders(&path), count_events(&path)), (1, 1));
}

#[test]
fn failed_statement_rolls_back_the_events_too() {
    let (_dir, path, outbox) = open_new();
    let err = outbox
        .transaction(|tx| {
            tx.enqueue(order_created(1, 250))?;
            insert_order(tx, 1, -5)?; // violates CHECK (amount > 0)
            Ok(())
        })
        .unwrap_err();
    assert!(matches!(err, Error::Storage { .. }), "{err:?}");
    assert_eq!((count_orders(&path), count_events(&path)), (0, 0));
}

/// Asserts that `f` fails with an input error and that nothing was written.
fn assert_rejected_before_write(
    make_event: impl FnOnce() -> edge_outbox::Result<NewEvent>,
) -> Error {
    let (_dir, path, outbox) = open_new();
    let err = outbox
        .transaction(|tx| {
            insert_order(tx, 1, 250)?;
            tx.enqueue(order_created(1, 250))?;
            tx.enqueue(make_event()?)?;
            Ok(())
        })
        .unwrap_err();
    assert!(err.is_invalid_input(), "{err:?}");
    assert!(!err.is_retryable());
    assert_eq!((count_orders(&path), count_events(&path)), (0, 0));
    err
}

#[test]
fn nan_payload_is_rejected() {
    let err = assert_rejected_before_write(|| NewEvent::json("Measured", &[1.0, f64::NAN]));
    assert!(matches!(err, Error::InvalidPayload { .. }));
    assert!(err.to_string().contains("NaN"), "{err}");
}

#[test]
fn map_with_non_string_keys_is_rejected() {
    let err = assert_rejected_before_write(|| {
        let m: HashMap<u32, &str> = [(7, "seven")].into();
        NewEvent::json("Mapped", &m)
    });
    assert!(matches!(err, Error::InvalidPayload { .. }));
    assert!(err.to_string().contains("keys must be strings"), "{err}");
}

#[test]
fn failing_serialize_is_rejected() {
    struct Broken;
    impl Serialize for Broken {
        fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
            Err(serde::ser::Error::custom("cannot serialize Broken"))
        }
    }
    let err = assert_rejected_before_write(|| NewEvent::json("Broken", &Broken));
    assert!(matches!(err, Error::InvalidPayload { .. }));
    assert!(err.to_string().contains("cannot serialize Broken"), "{err}");
}

#[test]
fn empty_and_oversized_type_names_are_rejected() {
    let err = assert_rejected_before_write(|| NewEvent::json("", &1));
    assert!(matches!(err, Error::InvalidEventType { .. }));
    let err = assert_rejected_before_write(|| NewEvent::json("T".repeat(257), &1));
    assert!(matches!(err, Error::InvalidEventType { .. }));
}

#[test]
fn oversized_event_is_rejected() {
    let err = assert_rejected_before_write(|| NewEvent::json("Big", &"x".repeat(256 * 1024)));
    assert!(
        matches!(err, Error::EventTooLarge { limit, .. } if limit == 256 * 1024),
        "{err:?}"
    );
    // The limit is configurable.
    let dir = tempfile::tempdir().unwrap();
    let small = Outbox::open(dir.path().join("s.db"), config().max_event_bytes(64)).unwrap();
    let err = small
        .enqueue([NewEvent::json("T", &"y".repeat(100)).unwrap()])
        .unwrap_err();
    assert!(matches!(err, Error::EventTooLarge { limit: 64, .. }));
    assert_eq!(small.stats().unwrap().pending, 0);
}

#[test]
fn a_file_that_is_not_sqlite_is_refused_and_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notes.txt");
    let text = "these are my notes, not a database\n".repeat(200);
    std::fs::write(&path, &text).unwrap();
    let err = Outbox::open(&path, config()).unwrap_err();
    assert!(matches!(err, Error::NotADatabase { .. }), "{err:?}");
    assert!(err.to_string().contains("notes.txt"));
    assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
}

#[test]
fn a_newer_schema_is_refused_and_the_file_untouched() {
    let (_dir, path, outbox) = open_new();
    outbox.enqueue([order_created(1, 1)]).unwrap();
    drop(outbox);
    {
        let conn = Connection::open(&path).unwrap();
        conn.execute(
            "UPDATE edge_outbox_meta SET value = ?1 WHERE key = 'schema_version'",
            [(SCHEMA_VERSION + 1).to_string()],
        )
        .unwrap();
        // Fold the WAL into the main file so the bytes below are the whole state.
        conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);")
            .unwrap();
    }
    let before = std::fs::read(&path).unwrap();
    let err = Outbox::open(&path, config()).unwrap_err();
    assert!(
        matches!(err, Error::SchemaTooNew { found, supported } if found == SCHEMA_VERSION + 1 && supported == SCHEMA_VERSION),
        "{err:?}"
    );
    assert!(err.is_version_conflict());
    assert_eq!(
        std::fs::read(&path).unwrap(),
        before,
        "file must be untouched"
    );
}

#[test]
fn a_schema_v1_file_is_migrated_in_place() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("v1.db");
    {
        // The v1 layout, as an earlier release left it: pending events on an
        // index of their own.
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(
            "CREATE TABLE edge_outbox_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
             CREATE TABLE edge_outbox_events (
                 seq INTEGER PRIMARY KEY AUTOINCREMENT, id BLOB NOT NULL UNIQUE,
                 type TEXT NOT NULL, key TEXT, payload TEXT NOT NULL, headers TEXT,
                 created_at INTEGER NOT NULL,
                 status TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'sent', 'dead')),
                 attempts INTEGER NOT NULL DEFAULT 0, next_attempt_at INTEGER NOT NULL,
                 last_error TEXT, sent_at INTEGER);
             CREATE INDEX edge_outbox_events_pending ON edge_outbox_events (seq) WHERE status = 'pending';
             CREATE INDEX edge_outbox_events_dead ON edge_outbox_events (seq) WHERE status = 'dead';
             INSERT INTO edge_outbox_meta VALUES ('schema_version', '1'),
                 ('client_id', '0191d3a4-0000-7000-8000-000000000001');
             INSERT INTO edge_outbox_events (id, type, payload, created_at, status, next_attempt_at, sent_at)
                 VALUES (randomblob(16), 'T', '{}', 1, 'sent', 1, 2),
                        (randomblob(16), 'T', '{}', 1, 'dead', 1, NULL),
                        (randomblob(16), 'T', '{}', 1, 'pending', 1, NULL),
                        (randomblob(16), 'T', '{}', 1, 'pending', 1, NULL);",
        )
        .unwrap();
    }
    let outbox = Outbox::open(&path, config()).unwrap();
    assert_eq!(outbox.client_id(), "0191d3a4-0000-7000-8000-000000000001");
    let stats = outbox.stats().unwrap();
    assert_eq!((stats.pending, stats.sent, stats.dead), (2, 1, 1));
    let seqs = |events: Vec<edge_outbox::Event>| events.iter().map(|e| e.seq).collect::<Vec<_>>();
    assert_eq!(seqs(outbox.pending(10).unwrap()), [3, 4]);
    // A dead letter made pending again goes first, below the old floor.
    let dead = outbox.dead_letters().unwrap();
    assert!(outbox.retry(dead[0].id).unwrap());
    assert_eq!(seqs(outbox.pending(10).unwrap()), [2, 3, 4]);
    let conn = Connection::open(&path).unwrap();
    let version: String = conn
        .query_row(
            "SELECT value FROM edge_outbox_meta WHERE key = 'schema_version'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(version, SCHEMA_VERSION.to_string());
    let old_index: i64 = conn
        .query_row(
            "SELECT count(*) FROM sqlite_master WHERE name = 'edge_outbox_events_pending'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(
        old_index, 0,
        "v2 finds pending events from the pending floor"
    );
}

#[test]
fn a_read_only_database_is_refused() {
    let (_dir, path, outbox) = open_new();
    drop(outbox);
    // `mode=ro` gives a read-only connection even to root, for whom file
    // permissions do not stop writes.
    let uri = format!("file:{}?mode=ro", path.display());
    let err = Outbox::open(&uri, config()).unwrap_err();
    assert!(matches!(err, Error::ReadOnly { .. }), "{err:?}");
    assert!(err.to_string().contains("read-only"));
}

#[test]
fn reopen_keeps_events_and_client_id() {
    let (_dir, path, outbox) = open_new();
    let client_id = outbox.client_id().to_owned();
    let ids: Vec<_> = (0..10)
        .map(|i| {
            outbox
                .transaction(|tx| {
                    insert_order(tx, i, 10)?;
                    tx.enqueue(order_created(i, 10))
                })
                .unwrap()
        })
        .collect();
    drop(outbox);
    let reopened = Outbox::open(&path, config()).unwrap();
    assert_eq!(reopened.client_id(), client_id);
    let pending = reopened.pending(100).unwrap();
    assert_eq!(pending.iter().map(|e| e.id).collect::<Vec<_>>(), ids);
    assert_eq!(count_orders(&path), 10);
}

#[test]
fn four_threads_commit_in_strictly_increasing_seq() {
    let (_dir, _path, outbox) = open_new();
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let outbox = outbox.clone();
            std::thread::spawn(move || {
                for i in 0..250 {
                    let id = t * 1000 + i;
                    outbox
                        .transaction(|tx| {
                            insert_order(tx, id, 1)?;
                            tx.enqueue(order_created(id, 1))?;
                            Ok(())
                        })
                        .expect("no thread may see an error (\"database is locked\")");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let events = outbox.pending(usize::MAX).unwrap();
    assert_eq!(events.len(), 1000);
    assert!(events.windows(2).all(|w| w[0].seq < w[1].seq));
    // Within one thread, commit order = seq order.
    for t in 0..4 {
        assert_writer_order(&events, t, 1000, 250);
    }
}

/// Env var that turns this test binary into a writer process for the
/// two-process test: it names the database file and the writer's tag.
const CHILD_ENV: &str = "EDGE_OUTBOX_TEST_CHILD_DB";

/// Commit 300 orders, each with its event, tagged by writer; used by the
/// two-process test (run as a child process with `CHILD_ENV` set) and,
/// without the variable, on a temp file of its own.
#[test]
fn writer_commits_tagged_orders() {
    let mut _own_dir = None;
    let (path, tag) = match std::env::var(CHILD_ENV) {
        Ok(v) => {
            let (tag, path) = v.split_once(':').unwrap();
            (PathBuf::from(path), tag.parse::<i64>().unwrap())
        }
        Err(_) => {
            let (dir, path, _outbox) = open_new();
            _own_dir = Some(dir);
            (path, 9)
        }
    };
    let outbox = Outbox::open(&path, config()).unwrap();
    for i in 0..300 {
        let id = tag * 100_000 + i;
        outbox
            .transaction(|tx| {
                insert_order(tx, id, 1)?;
                tx.enqueue(order_created(id, 1))?;
                Ok(())
            })
            .unwrap();
    }
    assert_writer_order(&outbox.pending(usize::MAX).unwrap(), tag, 100_000, 300);
}

#[test]
fn two_processes_commit_in_strictly_increasing_seq() {
    let (_dir, path, outbox) = open_new();
    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = [1, 2]
        .iter()
        .map(|tag| {
            Command::new(&exe)
                .args([
                    "--exact",
                    "writer_commits_tagged_orders",
                    "--test-threads=1",
                ])
                .env(CHILD_ENV, format!("{tag}:{}", path.display()))
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "writer process failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let events = outbox.pending(usize::MAX).unwrap();
    assert_eq!(events.len(), 600);
    assert!(events.windows(2).all(|w| w[0].seq < w[1].seq));
    assert_eq!(count_orders(&path), 600);
    // Each process's own commits are in its commit order.
    for tag in [1, 2] {
        assert_writer_order(&events, tag, 100_000, 300);
    }
}

#[test]
fn enqueue_in_an_app_owned_transaction_and_savepoint() {
    let (_dir, path, outbox) = open_new();
    let mut conn = Connection::open(&path).unwrap();
    {
        let mut tx = conn.transaction().unwrap();
        tx.execute("INSERT INTO orders (id, amount) VALUES (1, 5)", [])
            .unwrap();
        outbox.enqueue_in(&tx, order_created(1, 5)).unwrap();
        {
            let sp = tx.savepoint().unwrap();
            sp.execute("INSERT INTO orders (id, amount) VALUES (2, 5)", [])
                .unwrap();
            outbox.enqueue_in(&sp, order_created(2, 5)).unwrap();
            // Dropped without commit: the savepoint's order and event roll back.
        }
        tx.commit().unwrap();
    }
    outbox.notify();
    assert_eq!(count_orders(&path), 1);
    let pending = outbox.pending(10).unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].key.as_deref(), Some("order-1"));

    // A rolled back app transaction takes its event with it.
    {
        let tx = conn.transaction().unwrap();
        outbox.enqueue_in(&tx, order_created(3, 5)).unwrap();
        tx.rollback().unwrap();
    }
    assert_eq!(outbox.stats().unwrap().pending, 1);

    // Outside a transaction it is refused: the event would commit alone.
    let err = outbox.enqueue_in(&conn, order_created(4, 5)).unwrap_err();
    assert!(matches!(err, Error::InvalidConfig { .. }), "{err:?}");
}

#[test]
fn full_durability_commits_and_reports_sync_mode() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("full.db");
    let outbox = Outbox::open(&path, config().durability(Durability::Full)).unwrap();
    outbox.enqueue([order_created(1, 1)]).unwrap();
    assert_eq!(outbox.stats().unwrap().pending, 1);
    let mode: String = Connection::open(&path)
        .unwrap()
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
}

#[test]
fn management_calls_on_a_real_file() {
    let (_dir, _path, outbox) = open_new();
    let events = outbox.enqueue((0..3).map(|i| order_created(i, 1))).unwrap();
    assert_eq!(outbox.dead_letters().unwrap().len(), 0);
    assert!(!outbox.retry(events[0].id).unwrap(), "pending is not dead");
    assert!(
        !outbox.discard(events[0].id).unwrap(),
        "pending cannot be discarded"
    );
    assert_eq!(outbox.prune_sent(std::time::Duration::ZERO).unwrap(), 0);
    assert_eq!(outbox.stats().unwrap().pending, 3);
}

#[test]
fn the_sent_count_follows_settles_and_prunes_and_survives_reopen() {
    use edge_outbox::{Outcome, Settlement, Store, Timestamp};
    let (_dir, path, outbox) = open_new();
    let e = outbox.enqueue((0..8).map(|i| order_created(i, 1))).unwrap();
    let store = outbox.store().clone();
    let settle = |events: &[edge_outbox::Event], outcome: Outcome, at: Timestamp| {
        let all = events
            .iter()
            .map(|e| Settlement::new(e, outcome.clone()))
            .collect();
        block_on(store.settle(all, at)).unwrap();
    };
    let t0 = Timestamp::from_millis(1_000);
    let t1 = Timestamp::from_millis(2_000);
    settle(&e[0..3], Outcome::Sent, t0);
    // A late second answer for the same events counts nothing twice.
    settle(&e[0..3], Outcome::Sent, t1);
    settle(&e[3..5], Outcome::Sent, t1);
    settle(&e[5..6], Outcome::Dead { reason: "r".into() }, t1);
    let sent_rows = |path: &Path| -> u64 {
        let n: i64 = Connection::open(path)
            .unwrap()
            .query_row(
                "SELECT count(*) FROM edge_outbox_events WHERE status = 'sent'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        n as u64
    };
    let stats = outbox.stats().unwrap();
    assert_eq!((stats.pending, stats.sent, stats.dead), (2, 5, 1));
    assert_eq!(stats.sent, sent_rows(&path));
    // Pruning the ones sent before t1 takes them off the count.
    let pruned = block_on(store.prune_sent(t1)).unwrap();
    assert_eq!(pruned, 3);
    assert_eq!(outbox.stats().unwrap().sent, 2);
    drop((store, outbox));
    let reopened = Outbox::open(&path, config()).unwrap();
    let stats = reopened.stats().unwrap();
    assert_eq!((stats.pending, stats.sent, stats.dead), (2, 2, 1));
    assert_eq!(stats.sent, sent_rows(&path));
}

/// Run a store future to completion (the SQLite store never really waits).
fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(f)
}

#[test]
fn a_hundred_thousand_events_survive_reopen() {
    let (_dir, path, outbox) = open_new();
    for chunk in 0..100 {
        outbox
            .transaction(|tx| {
                for i in 0..1000 {
                    let id = chunk * 1000 + i;
                    insert_order(tx, id, 1)?;
                    tx.enqueue(order_created(id, 1))?;
                }
                Ok(())
            })
            .unwrap();
    }
    drop(outbox);
    let reopened = Outbox::open(&path, config()).unwrap();
    let stats = reopened.stats().unwrap();
    assert_eq!((stats.pending, stats.sent, stats.dead), (100_000, 0, 0));
    assert_eq!(count_orders(&path), 100_000);
    let first = reopened.pending(1).unwrap();
    assert_eq!(first[0].payload, r#"{"id":0,"amount":1}"#);
}

#[test]
fn outbox_is_clone_send_sync() {
    fn assert_traits<T: Clone + Send + Sync + 'static>() {}
    assert_traits::<Outbox>();
    assert_traits::<edge_outbox::SqliteStore>();
}
