//! The outbox inspector (`edge-outbox`), run as the built binary against real
//! SQLite files written by the library, some while another thread commits.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use edge_outbox::testing::{Fault, MemoryServer};
use edge_outbox::{Config, NewEvent, Outbox};

fn inspector(db: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_edge-outbox"))
        .arg("--db")
        .arg(db)
        .args(args)
        .output()
        .expect("run edge-outbox")
}

fn ok(db: &Path, args: &[&str]) -> String {
    let out = inspector(db, args);
    assert!(
        out.status.success(),
        "edge-outbox {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn ev(ty: &str, n: u64) -> NewEvent {
    NewEvent::json(ty, &serde_json::json!({ "n": n })).unwrap()
}

/// A database written by the library: 3 sent, 2 dead (`bad`, rejected by
/// the server), then 3 pending (2 `order.placed`, 1 `note`).
async fn fixture(dir: &Path) -> (PathBuf, Outbox) {
    let path = dir.join("app.db");
    let outbox = Outbox::open(&path, Config::new("http://test.invalid")).unwrap();
    let server = MemoryServer::new();
    server.reject_type("bad");
    outbox
        .enqueue([
            ev("order.placed", 1),
            ev("bad", 2),
            ev("order.placed", 3),
            ev("bad", 4),
            ev("order.placed", 5),
        ])
        .unwrap();
    let relay = outbox.relay(server).spawn();
    let report = relay.flush().await.unwrap();
    assert_eq!(report.pending, 0);
    relay.shutdown().await.unwrap();
    outbox
        .enqueue([ev("order.placed", 6), ev("note", 7), ev("order.placed", 8)])
        .unwrap();
    let stats = outbox.stats().unwrap();
    assert_eq!((stats.pending, stats.sent, stats.dead), (3, 3, 2));
    (path, outbox)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reports_counts_schema_and_client_id() {
    let dir = tempfile::tempdir().unwrap();
    let (db, outbox) = fixture(dir.path()).await;
    let text = ok(&db, &["status"]);
    let schema = format!("schema version  {}", edge_outbox::SCHEMA_VERSION);
    assert!(text.contains(&schema), "{text}");
    assert!(text.contains(&format!("client id       {}", outbox.client_id())));
    assert!(text.contains("pending         3"), "{text}");
    assert!(text.contains("sent            3"), "{text}");
    assert!(text.contains("dead            2"), "{text}");
    assert!(text.contains("next attempt    due now"), "{text}");
    // The fixture's relay has shut down: nobody holds the lease, and the
    // last holder was this process.
    let last = format!(
        "lease holder    none (last: pid {}, relay ",
        std::process::id()
    );
    assert!(text.contains(&last), "{text}");
    let json: serde_json::Value = serde_json::from_str(&ok(&db, &["status", "--json"])).unwrap();
    assert_eq!(json["lease_held"], false);
    assert_eq!(json["lease_holder"]["pid"], std::process::id());
    assert_eq!(json["pending"], 3);
    assert_eq!(json["sent"], 3);
    assert_eq!(json["dead"], 2);
    assert_eq!(json["schema_version"], edge_outbox::SCHEMA_VERSION);
    assert_eq!(json["client_id"], outbox.client_id());
    assert!(json["oldest_pending_age_ms"].is_u64());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_names_the_relay_holding_the_lease_without_taking_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.db");
    let outbox = Outbox::open(&path, Config::new("http://test.invalid")).unwrap();
    let never_run = ok(&path, &["status"]);
    assert!(never_run.contains("lease holder    none\n"), "{never_run}");

    // A relay that holds the lease: a server that cannot be reached keeps
    // the event pending, and the relay alive and holding.
    let server = MemoryServer::new();
    server.fail_always(Some(Fault::Network));
    outbox.enqueue([ev("order.placed", 1)]).unwrap();
    let relay = outbox.relay(server.clone()).spawn();
    let wait_for = |want: &'static str| {
        let path = path.clone();
        async move {
            for _ in 0..200 {
                let text = ok(&path, &["status"]);
                if text.contains(want) {
                    return text;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            panic!("status never said {want:?}");
        }
    };
    let held = wait_for("lease holder    pid ").await;
    assert!(
        held.contains(&format!(
            "lease holder    pid {}, relay ",
            std::process::id()
        )),
        "{held}"
    );
    let json: serde_json::Value = serde_json::from_str(&ok(&path, &["status", "--json"])).unwrap();
    assert_eq!(json["lease_held"], true);
    assert_eq!(json["lease_holder"]["pid"], std::process::id());
    let owner = json["lease_holder"]["owner"].as_str().unwrap().to_owned();
    assert!(!owner.is_empty());
    // Looking did not take it: the relay still holds it and still works.
    assert_eq!(outbox.relay_lease().unwrap().holder.unwrap().owner, owner);
    server.fail_always(None);
    outbox.retry_now().unwrap();
    let report = relay.flush().await.unwrap();
    assert_eq!(report.pending, 0);
    relay.shutdown().await.unwrap();
    let after = ok(&path, &["status"]);
    assert!(
        after.contains(&format!(
            "lease holder    none (last: pid {}, relay {owner}",
            std::process::id()
        )),
        "{after}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_and_dead_listings_filter_limit_and_json() {
    let dir = tempfile::tempdir().unwrap();
    let (db, _outbox) = fixture(dir.path()).await;
    let all: Vec<serde_json::Value> =
        serde_json::from_str(&ok(&db, &["pending", "--json"])).unwrap();
    assert_eq!(all.len(), 3);
    assert!(all.iter().all(|e| e["status"] == "pending"));
    let placed: Vec<serde_json::Value> =
        serde_json::from_str(&ok(&db, &["pending", "--type", "order.placed", "--json"])).unwrap();
    assert_eq!(placed.len(), 2);
    assert!(placed.iter().all(|e| e["type"] == "order.placed"));
    let one: Vec<serde_json::Value> = serde_json::from_str(&ok(
        &db,
        &[
            "pending",
            "--type",
            "order.placed",
            "--limit",
            "1",
            "--json",
        ],
    ))
    .unwrap();
    assert_eq!(one.len(), 1);
    assert_eq!(one[0]["payload"], "{\"n\":6}");
    let text = ok(&db, &["pending", "--type", "note"]);
    assert_eq!(text.lines().count(), 1, "{text}");
    assert!(text.contains("note"));

    let dead: Vec<serde_json::Value> = serde_json::from_str(&ok(&db, &["dead", "--json"])).unwrap();
    assert_eq!(dead.len(), 2);
    assert!(
        dead.iter()
            .all(|e| e["type"] == "bad" && e["status"] == "dead")
    );
    let text = ok(&db, &["dead", "--limit", "1"]);
    assert_eq!(text.lines().count(), 1, "{text}");
    assert!(text.contains("error:"), "{text}");
    assert_eq!(ok(&db, &["dead", "--type", "nothing"]).trim(), "(none)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_one_and_all_dead_letters() {
    let dir = tempfile::tempdir().unwrap();
    let (db, outbox) = fixture(dir.path()).await;
    let dead = outbox.dead_letters().unwrap();
    let id = dead[0].id.to_string();
    assert!(ok(&db, &["retry", &id]).contains("pending again"));
    assert_eq!(outbox.dead_letters().unwrap().len(), 1);
    assert_eq!(outbox.stats().unwrap().pending, 4);
    // Not a dead letter any more: an error, non-zero exit.
    assert!(!inspector(&db, &["retry", &id]).status.success());
    assert!(!inspector(&db, &["retry", "not-a-uuid"]).status.success());
    assert!(!inspector(&db, &["retry"]).status.success());
    assert!(ok(&db, &["retry", "--all"]).contains("retried 1 dead letter(s)"));
    let stats = outbox.stats().unwrap();
    assert_eq!((stats.pending, stats.dead), (5, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_now_clears_backoff() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.db");
    let outbox = Outbox::open(&path, Config::new("http://test.invalid")).unwrap();
    outbox.enqueue([ev("a", 1), ev("b", 2)]).unwrap();
    // A server that answers 503 with Retry-After: 60 s: both events back off.
    let server = MemoryServer::new();
    server.fail_always(Some(Fault::Status {
        status: 503,
        retry_after: Some(Duration::from_secs(60)),
        body: String::new(),
    }));
    let relay = outbox.relay(server).spawn();
    let _ = tokio::time::timeout(Duration::from_secs(10), relay.flush()).await;
    relay.shutdown().await.unwrap();
    let now = edge_outbox::Timestamp::now();
    let pending = outbox.pending(10).unwrap();
    assert!(
        pending.iter().all(|e| e.next_attempt_at > now),
        "{pending:?}"
    );
    assert!(ok(&path, &["status"]).contains("(in "));
    assert!(ok(&path, &["retry-now"]).contains("2 pending event(s) due now"));
    let now = edge_outbox::Timestamp::now();
    assert!(
        outbox
            .pending(10)
            .unwrap()
            .iter()
            .all(|e| e.next_attempt_at <= now)
    );
    assert!(ok(&path, &["status"]).contains("next attempt    due now"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discard_and_prune() {
    let dir = tempfile::tempdir().unwrap();
    let (db, outbox) = fixture(dir.path()).await;
    let victim = outbox.dead_letters().unwrap()[0].id;
    assert!(ok(&db, &["discard", &victim.to_string()]).contains("discarded"));
    assert!(outbox.get(victim).unwrap().is_none());
    assert_eq!(outbox.stats().unwrap().dead, 1);
    // Pending events are not discarded (the library discards dead letters only).
    let pending = outbox.pending(1).unwrap()[0].id;
    assert!(
        !inspector(&db, &["discard", &pending.to_string()])
            .status
            .success()
    );
    assert!(outbox.get(pending).unwrap().is_some());
    assert!(
        !inspector(&db, &["discard", &victim.to_string()])
            .status
            .success()
    );
    // Sent just now: not older than 7d, so kept; older than 0s: pruned.
    assert!(ok(&db, &["prune", "--older-than", "7d"]).contains("pruned 0"));
    assert_eq!(outbox.stats().unwrap().sent, 3);
    assert!(
        !inspector(&db, &["prune", "--older-than", "7 weeks"])
            .status
            .success()
    );
    std::thread::sleep(Duration::from_millis(5));
    assert!(ok(&db, &["prune", "--older-than", "0s"]).contains("pruned 3"));
    assert_eq!(outbox.stats().unwrap().sent, 0);
}

/// A thread that keeps committing to the file until stopped.
fn writer(
    db: PathBuf,
    stop: Arc<AtomicBool>,
    count: Arc<AtomicU64>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let outbox = Outbox::open(&db, Config::new("http://test.invalid")).unwrap();
        let mut n = 0;
        while !stop.load(Ordering::Relaxed) && n < 2_000 {
            n += 1;
            outbox.enqueue([ev("live", n)]).unwrap();
            count.fetch_add(1, Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(10));
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_tail_while_the_app_commits() {
    let dir = tempfile::tempdir().unwrap();
    let (db, _outbox) = fixture(dir.path()).await;
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let w = writer(db.clone(), stop.clone(), count.clone());
    for _ in 0..3 {
        let json: serde_json::Value =
            serde_json::from_str(&ok(&db, &["status", "--json"])).unwrap();
        assert!(json["pending"].as_u64().unwrap() >= 3);
    }
    let before = count.load(Ordering::Relaxed);
    let out = ok(
        &db,
        &["tail", "--for", "1500ms", "--interval", "50ms", "--json"],
    );
    let after = count.load(Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    w.join().unwrap();
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(!lines.is_empty(), "tail printed nothing");
    assert!(lines.iter().all(|e| e["type"] == "live"));
    // Only new commits, each once, in order.
    let seqs: Vec<i64> = lines.iter().map(|e| e["seq"].as_i64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    assert!(seqs[0] > 8, "the fixture's events are not new: {seqs:?}");
    let ns: Vec<u64> = lines
        .iter()
        .map(|e| e["payload"]["n"].as_u64().unwrap())
        .collect();
    assert!(
        ns[0] > before.saturating_sub(2) && *ns.last().unwrap() <= after + 1,
        "{ns:?}"
    );
    // Text form too.
    let out = ok(&db, &["tail", "--for", "200ms"]);
    assert!(out.is_empty(), "nothing new was committed: {out}");
}

#[test]
fn refuses_a_newer_schema_and_a_foreign_file_and_leaves_them_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    // A newer schema version.
    let db = dir.path().join("newer.db");
    drop(Outbox::open(&db, Config::new("http://test.invalid")).unwrap());
    {
        let conn = rusqlite::Connection::open(&db).unwrap();
        conn.execute(
            "UPDATE edge_outbox_meta SET value = '99' WHERE key = 'schema_version'",
            [],
        )
        .unwrap();
    }
    let before = std::fs::read(&db).unwrap();
    for args in [
        &["status"][..],
        &["retry", "--all"],
        &["prune", "--older-than", "0s"],
    ] {
        let out = inspector(&db, args);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("schema version 99"), "{err}");
    }
    assert_eq!(std::fs::read(&db).unwrap(), before);

    // A SQLite file of something else: no outbox tables, and none created.
    let other = dir.path().join("other.db");
    {
        let conn = rusqlite::Connection::open(&other).unwrap();
        conn.execute_batch("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT); INSERT INTO notes (body) VALUES ('hi');")
            .unwrap();
    }
    let before = std::fs::read(&other).unwrap();
    for args in [&["status"][..], &["pending"], &["tail", "--for", "100ms"]] {
        let out = inspector(&other, args);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("no edge-outbox tables"), "{err}");
    }
    assert_eq!(std::fs::read(&other).unwrap(), before);
    let conn = rusqlite::Connection::open(&other).unwrap();
    let n: i64 = conn
        .query_row(
            "SELECT count(*) FROM sqlite_master WHERE name LIKE 'edge_outbox%'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(n, 0);

    // A missing file is not created.
    let missing = dir.path().join("missing.db");
    assert!(!inspector(&missing, &["status"]).status.success());
    assert!(!missing.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listings_escape_what_could_drive_the_terminal() {
    // Keys and types are the app's text, errors a server's: an ANSI escape
    // (ESC [2J clears the screen) or a bidi override printed raw would act on
    // the support engineer's terminal.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.db");
    let outbox = Outbox::open(&path, Config::new("http://test.invalid")).unwrap();
    outbox
        .enqueue([ev("note", 1).key("k\u{1b}[2J\u{202E}gpj.exe")])
        .unwrap();
    let text = ok(&path, &["pending"]);
    assert!(
        !text.contains('\u{1b}') && !text.contains('\u{202E}'),
        "{text:?}"
    );
    assert!(text.contains("key k\\u{001B}[2J\\u{202E}gpj.exe"), "{text}");
    // --json is for programs: the key reads back as it was stored.
    let all: Vec<serde_json::Value> =
        serde_json::from_str(&ok(&path, &["pending", "--json"])).unwrap();
    assert_eq!(all[0]["key"], "k\u{1b}[2J\u{202E}gpj.exe");
}

/// `tail` prints each new event's status as the library reads it: events
/// committed and delivered between two polls show `sent`, though schema v5
/// records their delivery by the pending floor and leaves their rows as
/// they were committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_shows_events_delivered_between_polls_as_sent() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    let dir = tempfile::tempdir().unwrap();
    let (db, outbox) = fixture(dir.path()).await;
    let mut child = Command::new(env!("CARGO_BIN_EXE_edge-outbox"))
        .arg("--db")
        .arg(&db)
        .args(["tail", "--for", "5s", "--interval", "3s", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run edge-outbox");
    // It says where it starts once its first poll has run; the events are
    // committed and delivered after that poll and well before the next
    // one, 3 s later.
    let mut started = String::new();
    BufReader::new(child.stderr.take().unwrap())
        .read_line(&mut started)
        .unwrap();
    assert!(started.starts_with("following"), "{started}");
    outbox.enqueue([ev("late", 1), ev("late", 2)]).unwrap();
    let relay = outbox.relay(MemoryServer::new()).spawn();
    assert_eq!(relay.flush().await.unwrap().pending, 0);
    relay.shutdown().await.unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let seen: Vec<(&str, &str)> = lines
        .iter()
        .map(|e| (e["type"].as_str().unwrap(), e["status"].as_str().unwrap()))
        .collect();
    assert_eq!(seen, [("late", "sent"), ("late", "sent")]);
}
