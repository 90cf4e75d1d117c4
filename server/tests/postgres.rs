//! The server on PostgreSQL: several instances (in this process, each with its
//! own pool) on one real PostgreSQL that each test starts itself (initdb into a
//! temp dir, pg_ctl on a free 127.0.0.1 port, stopped when the test ends).
//! Needs PostgreSQL's binaries (`scripts/setup` installs Debian's `postgresql`):
//! without them these tests FAIL, they do not skip.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use edge_outbox::protocol::{
    PROTOCOL_VERSION, PullResponse, PushRequest, PushResponse, ResultStatus, WireEvent,
};
use edge_outbox::{EventId, Timestamp};
use edge_outbox_server::{
    Applied, InboxFuture, PG_SCHEMA_VERSION, PgInbox, RunningServer, ServerConfig,
};
use serde_json::value::RawValue;
use tempfile::TempDir;

// ---------- a throwaway PostgreSQL ----------

/// A PostgreSQL server of its own in a temp dir; stopped (immediate mode) on drop.
struct Postgres {
    dir: TempDir,
    bin: PathBuf,
    port: u16,
    as_root: bool,
}

/// The directory of PostgreSQL's binaries (the newest installed version).
fn pg_bin() -> PathBuf {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|bin| bin.join("initdb").exists() && bin.join("pg_ctl").exists())
        .collect();
    found.sort();
    found.pop().unwrap_or_else(|| {
        panic!(
            "PostgreSQL binaries not found under /usr/lib/postgresql/*/bin: \
             run scripts/setup (it installs Debian's postgresql package)"
        )
    })
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

impl Postgres {
    fn start() -> Self {
        let bin = pg_bin();
        let dir = tempfile::Builder::new()
            .prefix("edge-outbox-pg-")
            .tempdir()
            .expect("temp dir");
        let as_root = String::from_utf8_lossy(
            &Command::new("id")
                .arg("-u")
                .output()
                .expect("id -u runs")
                .stdout,
        )
        .trim()
            == "0";
        if as_root {
            // initdb refuses to run as root: the data dir belongs to `postgres`.
            run(Command::new("chown")
                .arg("-R")
                .arg("postgres:postgres")
                .arg(dir.path()));
        }
        let pg = Postgres {
            dir,
            bin,
            port: free_port(),
            as_root,
        };
        pg.run_pg(
            "initdb",
            &[
                "-D",
                pg.data().to_str().unwrap(),
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        );
        pg.pg_ctl_start();
        pg
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Run one of PostgreSQL's binaries (as `postgres` when we are root).
    fn run_pg(&self, name: &str, args: &[&str]) {
        let exe = self.bin.join(name);
        let mut cmd = if self.as_root {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&exe);
            c
        } else {
            Command::new(&exe)
        };
        cmd.args(args);
        run(&mut cmd);
    }

    fn pg_ctl_start(&self) {
        // fsync off: these tests kill no machine, and they run on shared cores.
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=300",
            self.port,
            self.dir.path().display()
        );
        let log = self.dir.path().join("log");
        self.run_pg(
            "pg_ctl",
            &[
                "-D",
                self.data().to_str().unwrap(),
                "-o",
                &opts,
                "-l",
                log.to_str().unwrap(),
                "-w",
                "-t",
                "30",
                "start",
            ],
        );
    }

    fn stop(&self, mode: &str) {
        self.run_pg(
            "pg_ctl",
            &[
                "-D",
                self.data().to_str().unwrap(),
                "-m",
                mode,
                "-w",
                "-t",
                "30",
                "stop",
            ],
        );
    }

    /// A direct connection, for the tests' own queries.
    async fn connect(&self) -> tokio_postgres::Client {
        let (client, conn) = tokio_postgres::connect(&self.url(), tokio_postgres::NoTls)
            .await
            .expect("connect to the test PostgreSQL");
        tokio::spawn(conn);
        client
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let exe = self.bin.join("pg_ctl");
        let data = self.data();
        let mut cmd = if self.as_root {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&exe);
            c
        } else {
            Command::new(&exe)
        };
        let _ = cmd
            .arg("-D")
            .arg(&data)
            .args(["-m", "immediate", "-w", "-t", "10", "stop"])
            .output();
    }
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---------- an inbox that records its effect ----------

/// Records each applied event in `effects`; a `Slow` event first sleeps the
/// number of milliseconds its payload says, inside the transaction.
struct Effects;

impl PgInbox for Effects {
    fn migrate<'a>(&'a self, tx: &'a tokio_postgres::Transaction<'a>) -> InboxFuture<'a, ()> {
        Box::pin(async move {
            tx.batch_execute(
                "CREATE TABLE IF NOT EXISTS effects (
                     client_id TEXT NOT NULL,
                     id        TEXT NOT NULL,
                     seq       BIGINT NOT NULL,
                     n         BIGSERIAL
                 )",
            )
            .await?;
            Ok(())
        })
    }

    fn apply<'a>(
        &'a self,
        tx: &'a tokio_postgres::Transaction<'a>,
        client_id: &'a str,
        e: &'a WireEvent,
    ) -> InboxFuture<'a, Applied> {
        Box::pin(async move {
            if e.event_type == "Slow" {
                let ms: f64 = serde_json::from_str(e.payload.get())?;
                tx.execute("SELECT pg_sleep($1)", &[&(ms / 1000.0)]).await?;
            }
            tx.execute(
                "INSERT INTO effects (client_id, id, seq) VALUES ($1, $2, $3)",
                &[&client_id, &e.id.to_string(), &e.seq],
            )
            .await?;
            Ok(Applied::Accept)
        })
    }
}

/// How many times each (client, id) was applied.
async fn effects(pg: &Postgres) -> HashMap<(String, String), i64> {
    pg.connect()
        .await
        .query(
            "SELECT client_id, id, COUNT(*) FROM effects GROUP BY client_id, id",
            &[],
        )
        .await
        .expect("read effects")
        .into_iter()
        .map(|r| ((r.get(0), r.get(1)), r.get(2)))
        .collect()
}

// ---------- the protocol, spoken by hand ----------

async fn instances(pg: &Postgres, n: usize) -> Vec<RunningServer> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(
            edge_outbox_server::spawn(
                ServerConfig::postgres(pg.url())
                    .pool_size(8)
                    .allow_anonymous(true)
                    .pg_inbox(Effects),
            )
            .await
            .expect("instance starts"),
        );
    }
    out
}

fn event(seq: i64, event_type: &str, payload: &str) -> WireEvent {
    WireEvent {
        id: EventId::new(),
        seq,
        event_type: event_type.to_owned(),
        key: None,
        payload: RawValue::from_string(payload.to_owned()).unwrap(),
        headers: BTreeMap::new(),
        created_at: Timestamp::now().to_rfc3339(),
    }
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// Push `events` to `server`; `timeout` bounds the wait for the answer.
async fn push(
    http: &reqwest::Client,
    server: &RunningServer,
    client_id: &str,
    events: &[WireEvent],
    timeout: Duration,
) -> Result<PushResponse, String> {
    let body = serde_json::to_vec(&PushRequest {
        protocol: PROTOCOL_VERSION,
        client_id: client_id.to_owned(),
        events: events.to_vec(),
    })
    .unwrap();
    let answer = http
        .post(server.events_url())
        .header("content-type", "application/json")
        .timeout(timeout)
        .body(body)
        .send()
        .await
        .map_err(|e| format!("send: {e}"))?;
    let status = answer.status();
    let bytes = answer.bytes().await.map_err(|e| format!("body: {e}"))?;
    if status != reqwest::StatusCode::OK {
        return Err(format!("{status}: {}", String::from_utf8_lossy(&bytes)));
    }
    serde_json::from_slice(&bytes).map_err(|e| format!("answer: {e}"))
}

/// One page of `GET /v1/events?after=`.
async fn pull(http: &reqwest::Client, server: &RunningServer, after: i64) -> PullResponse {
    let answer = http
        .get(format!("{}?after={after}&limit=1000", server.events_url()))
        .send()
        .await
        .expect("pull");
    assert_eq!(answer.status(), reqwest::StatusCode::OK);
    serde_json::from_slice(&answer.bytes().await.expect("pull body")).expect("pull answer")
}

/// Every stored event, paging through `server`.
async fn pull_all(http: &reqwest::Client, server: &RunningServer) -> Vec<(i64, String, WireEvent)> {
    let mut out = Vec::new();
    let mut after = 0;
    loop {
        let page = pull(http, server, after).await;
        let Some(next) = page.next_cursor else {
            return out;
        };
        after = next;
        out.extend(
            page.events
                .into_iter()
                .map(|e| (e.cursor, e.client_id, e.event)),
        );
    }
}

// ---------- tests ----------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn instances_starting_at_once_create_the_schema_once() {
    let pg = Postgres::start();
    let config = || {
        ServerConfig::postgres(pg.url())
            .pool_size(2)
            .pg_inbox(Effects)
    };
    let (a, b, c) = tokio::join!(
        edge_outbox_server::spawn(config()),
        edge_outbox_server::spawn(config()),
        edge_outbox_server::spawn(config()),
    );
    let servers = [a.unwrap(), b.unwrap(), c.unwrap()];
    let db = pg.connect().await;
    let version: String = db
        .query_one(
            "SELECT value FROM edge_outbox_server_meta WHERE key = 'schema_version'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(version, PG_SCHEMA_VERSION.to_string());
    // A later start on the same database finds the schema and keeps it.
    let d = edge_outbox_server::spawn(config()).await.unwrap();
    for s in servers {
        s.shutdown().await.unwrap();
    }
    d.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_same_event_pushed_to_instances_at_once_is_accepted_once_and_applied_once() {
    let pg = Postgres::start();
    let servers = instances(&pg, 3).await;
    let http = http();
    let client = "0192f0c1-7c1e-7000-8000-0000000000c1";
    let mut all = Vec::new();
    for round in 0..5 {
        // A slow first event keeps the winner's transaction open while the
        // others arrive: they wait on its dedupe rows, then see them committed.
        let batch = vec![
            event(round * 3 + 1, "Slow", "150"),
            event(round * 3 + 2, "OrderCreated", "{}"),
            event(round * 3 + 3, "OrderCreated", "{}"),
        ];
        let t = Duration::from_secs(20);
        let (a, b, c) = tokio::join!(
            push(&http, &servers[0], client, &batch, t),
            push(&http, &servers[1], client, &batch, t),
            push(&http, &servers[2], client, &batch, t),
        );
        let answers = [a.unwrap(), b.unwrap(), c.unwrap()];
        for (i, event) in batch.iter().enumerate() {
            let statuses: Vec<ResultStatus> = answers.iter().map(|a| a.results[i].status).collect();
            assert_eq!(
                statuses
                    .iter()
                    .filter(|s| **s == ResultStatus::Accepted)
                    .count(),
                1,
                "round {round}, event {i}: {statuses:?}"
            );
            assert_eq!(
                statuses
                    .iter()
                    .filter(|s| **s == ResultStatus::Duplicate)
                    .count(),
                2,
                "round {round}, event {i}: {statuses:?}"
            );
            all.push(event.id.to_string());
        }
    }
    let applied = effects(&pg).await;
    assert_eq!(applied.len(), all.len());
    for id in &all {
        assert_eq!(
            applied.get(&(client.to_owned(), id.clone())),
            Some(&1),
            "{id}"
        );
    }
    let stored = pull_all(&http, &servers[1]).await;
    assert_eq!(stored.len(), all.len(), "each event stored once");
}

/// One client (three, in fact, at once): its batches go to the instances in
/// turn; every answer is held past the client's timeout and the effect is
/// slow, so each resend goes to another instance while the original is
/// still in its transaction. Every event is stored and applied once, and
/// each client's events are stored in `seq` order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn batches_spread_over_instances_with_racing_resends_arrive_once_in_order() {
    let pg = Postgres::start();
    let servers = Arc::new(instances(&pg, 3).await);
    for s in servers.iter() {
        s.faults().delay(Duration::from_millis(120));
    }
    let started = Instant::now();
    let mut clients = Vec::new();
    for c in 0..3 {
        let servers = Arc::clone(&servers);
        clients.push(tokio::spawn(async move {
            let http = http();
            let client = format!("0192f0c1-7c1e-7000-8000-0000000001{c:02}");
            let mut sent = Vec::new();
            let mut resends = 0;
            let mut seq = 0;
            for batch_no in 0..8usize {
                let batch: Vec<WireEvent> = (0..5)
                    .map(|i| {
                        seq += 1;
                        // The first event of a batch holds its transaction open 40 ms.
                        if i == 0 {
                            event(seq, "Slow", "40")
                        } else {
                            event(seq, "OrderCreated", "{}")
                        }
                    })
                    .collect();
                let mut attempt = 0u32;
                loop {
                    let server = &servers[(batch_no + attempt as usize + c) % servers.len()];
                    // 30 ms, then doubling: the first tries time out mid-transaction.
                    let timeout = Duration::from_millis(30 << attempt.min(6));
                    match push(&http, server, &client, &batch, timeout).await {
                        Ok(answer) => {
                            assert!(
                                answer
                                    .results
                                    .iter()
                                    .all(|r| r.status != ResultStatus::Rejected),
                                "{answer:?}"
                            );
                            break;
                        }
                        Err(_) => {
                            attempt += 1;
                            resends += 1;
                            assert!(attempt < 12, "batch {batch_no} never answered");
                        }
                    }
                }
                sent.extend(batch.iter().map(|e| (e.id.to_string(), e.seq)));
            }
            (client, sent, resends)
        }));
    }
    let mut expected = HashMap::new();
    let mut total_resends = 0;
    for c in clients {
        let (client, sent, resends) = c.await.unwrap();
        total_resends += resends;
        expected.insert(client, sent);
    }
    assert!(total_resends > 0, "no resend raced an original");
    eprintln!(
        "{total_resends} resends, {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let http = http();
    let stored = pull_all(&http, &servers[2]).await;
    let applied = effects(&pg).await;
    for (client, sent) in &expected {
        let mine: Vec<&(i64, String, WireEvent)> =
            stored.iter().filter(|(_, c, _)| c == client).collect();
        let seqs: Vec<i64> = mine.iter().map(|(_, _, e)| e.seq).collect();
        let want: Vec<i64> = sent.iter().map(|(_, s)| *s).collect();
        assert_eq!(seqs, want, "{client}: stored once each, in seq order");
        for (id, _) in sent {
            assert_eq!(
                applied.get(&(client.clone(), id.clone())),
                Some(&1),
                "{client} {id} applied once"
            );
        }
    }
    assert_eq!(
        applied.values().sum::<i64>() as usize,
        expected.values().map(Vec::len).sum::<usize>()
    );
}

/// A transaction that started first but commits last: its events must come
/// after the cursor a reader already holds, not below it. (Checked against
/// cursors taken like a sequence, at insert: this test and the next fail,
/// the next one's reader seeing 245 of 450 events.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_cursor_never_skips_an_event_that_commits_late() {
    let pg = Postgres::start();
    let servers = Arc::new(instances(&pg, 2).await);
    // The slow batch inserts its dedupe rows first, then sleeps 600 ms in its transaction.
    let slow = vec![event(1, "Slow", "600"), event(2, "OrderCreated", "{}")];
    let slow_push = {
        let servers = Arc::clone(&servers);
        let slow = slow.clone();
        tokio::spawn(async move {
            push(
                &http(),
                &servers[0],
                "0192f0c1-7c1e-7000-8000-0000000002a1",
                &slow,
                Duration::from_secs(20),
            )
            .await
        })
    };
    tokio::time::sleep(Duration::from_millis(150)).await;
    let http = http();
    let fast = vec![
        event(1, "OrderCreated", "{}"),
        event(2, "OrderCreated", "{}"),
    ];
    push(
        &http,
        &servers[1],
        "0192f0c1-7c1e-7000-8000-0000000002b1",
        &fast,
        Duration::from_secs(20),
    )
    .await
    .unwrap();
    // The fast batch committed while the slow one is still open.
    let page = pull(&http, &servers[1], 0).await;
    let seen: Vec<String> = page.events.iter().map(|e| e.event.id.to_string()).collect();
    assert_eq!(
        seen,
        fast.iter().map(|e| e.id.to_string()).collect::<Vec<_>>()
    );
    let cursor = page.next_cursor.unwrap();
    slow_push.await.unwrap().unwrap();
    let page = pull(&http, &servers[0], cursor).await;
    let later: Vec<String> = page.events.iter().map(|e| e.event.id.to_string()).collect();
    assert_eq!(
        later,
        slow.iter().map(|e| e.id.to_string()).collect::<Vec<_>>(),
        "the late commit is after the reader's cursor"
    );
}

/// Three instances written by many clients at once, with slow transactions
/// mixed in, while a reader pages with `after=`: the pages together hold
/// every event exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reader_paging_while_three_instances_write_sees_every_event_once() {
    let pg = Postgres::start();
    let servers = Arc::new(instances(&pg, 3).await);
    let done = Arc::new(AtomicBool::new(false));
    let reader = {
        let servers = Arc::clone(&servers);
        let done = Arc::clone(&done);
        tokio::spawn(async move {
            let http = http();
            let mut seen: Vec<String> = Vec::new();
            let mut after = 0;
            let mut reads = 0usize;
            loop {
                let finished = done.load(Ordering::SeqCst);
                let page = pull(&http, &servers[reads % 3], after).await;
                reads += 1;
                match page.next_cursor {
                    Some(next) => {
                        after = next;
                        seen.extend(page.events.into_iter().map(|e| e.event.id.to_string()));
                    }
                    // Done only once a read that began after the writers finished is empty.
                    None if finished => return (seen, reads),
                    None => tokio::time::sleep(Duration::from_millis(2)).await,
                }
            }
        })
    };
    let mut writers = Vec::new();
    for w in 0..9usize {
        let servers = Arc::clone(&servers);
        writers.push(tokio::spawn(async move {
            let http = http();
            let client = format!("0192f0c1-7c1e-7000-8000-0000000003{w:02}");
            let mut ids = Vec::new();
            for b in 0..10i64 {
                let batch: Vec<WireEvent> = (0..5)
                    .map(|i| {
                        let seq = b * 5 + i + 1;
                        // Every third batch of a writer holds its transaction open.
                        if i == 0 && (b + w as i64) % 3 == 0 {
                            event(seq, "Slow", "30")
                        } else {
                            event(seq, "OrderCreated", "{}")
                        }
                    })
                    .collect();
                let server = &servers[(w + b as usize) % 3];
                push(&http, server, &client, &batch, Duration::from_secs(20))
                    .await
                    .unwrap();
                ids.extend(batch.iter().map(|e| e.id.to_string()));
            }
            ids
        }));
    }
    let mut written = HashSet::new();
    for w in writers {
        written.extend(w.await.unwrap());
    }
    done.store(true, Ordering::SeqCst);
    let (seen, reads) = reader.await.unwrap();
    let unique: HashSet<&String> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "no event listed twice");
    assert_eq!(
        seen.len(),
        written.len(),
        "every event listed ({reads} reads)"
    );
    assert!(seen.iter().all(|id| written.contains(id)));
}

/// PostgreSQL stops under load and comes back: meanwhile pushes are answered
/// `5xx` (never `rejected`), then they succeed again; nothing is lost and
/// nothing is stored twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_restarted_under_load_gives_5xx_then_recovers_with_nothing_lost() {
    let pg = Arc::new(Postgres::start());
    let servers = Arc::new(instances(&pg, 2).await);
    let stop_after = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for c in 0..4usize {
        let servers = Arc::clone(&servers);
        let stop_after = Arc::clone(&stop_after);
        clients.push(tokio::spawn(async move {
            let http = http();
            let client = format!("0192f0c1-7c1e-7000-8000-0000000004{c:02}");
            let (mut sent, mut failures, mut seq) = (Vec::new(), 0usize, 0i64);
            let deadline = Instant::now() + Duration::from_secs(60);
            let mut batches_after_stop = 0;
            while batches_after_stop < 5 {
                let batch: Vec<WireEvent> = (0..10)
                    .map(|_| {
                        seq += 1;
                        event(seq, "OrderCreated", "{}")
                    })
                    .collect();
                let mut attempt = 0usize;
                loop {
                    assert!(Instant::now() < deadline, "{client}: no recovery in 60 s");
                    let server = &servers[(c + attempt) % servers.len()];
                    match push(&http, server, &client, &batch, Duration::from_secs(15)).await {
                        Ok(answer) => {
                            assert!(
                                answer
                                    .results
                                    .iter()
                                    .all(|r| r.status != ResultStatus::Rejected),
                                "{answer:?}"
                            );
                            break;
                        }
                        Err(e) => {
                            assert!(e.starts_with("500"), "a failure is a 5xx: {e}");
                            failures += 1;
                            attempt += 1;
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
                sent.extend(batch.iter().map(|e| (e.id.to_string(), e.seq)));
                if stop_after.load(Ordering::SeqCst) {
                    batches_after_stop += 1;
                }
            }
            (client, sent, failures)
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    {
        let pg = Arc::clone(&pg);
        tokio::task::spawn_blocking(move || {
            pg.stop("fast");
            std::thread::sleep(Duration::from_millis(500));
            pg.pg_ctl_start();
        })
        .await
        .unwrap();
    }
    stop_after.store(true, Ordering::SeqCst);
    let mut failures = 0;
    let mut expected = Vec::new();
    for c in clients {
        let (client, sent, f) = c.await.unwrap();
        failures += f;
        expected.push((client, sent));
    }
    assert!(failures > 0, "no push saw PostgreSQL down");
    let stored = pull_all(&http(), &servers[0]).await;
    for (client, sent) in &expected {
        let seqs: Vec<i64> = stored
            .iter()
            .filter(|(_, c, _)| c == client)
            .map(|(_, _, e)| e.seq)
            .collect();
        let want: Vec<i64> = sent.iter().map(|(_, s)| *s).collect();
        assert_eq!(seqs, want, "{client}: each event once, in seq order");
    }
    let applied = effects(&pg).await;
    assert!(applied.values().all(|n| *n == 1));
    assert_eq!(
        applied.len(),
        expected.iter().map(|(_, s)| s.len()).sum::<usize>()
    );
}

/// An `edge-outbox-server` binary on `url`, on a free port.
struct Instance {
    child: std::process::Child,
    url: String,
}

impl Instance {
    fn start(database_url: &str) -> Self {
        use std::io::{BufRead, BufReader};
        let mut child = Command::new(env!("CARGO_BIN_EXE_edge-outbox-server"))
            .args([
                "--listen",
                "127.0.0.1:0",
                "--allow-anonymous",
                "--pool-size",
                "8",
            ])
            .arg("--database-url")
            .arg(database_url)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("the server binary starts");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .expect("its first line");
        let base = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_owned();
        Instance {
            child,
            url: format!("{base}/v1/events"),
        }
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// 50 clients push through three server processes; one is killed with
/// SIGKILL mid-run and started again. Every event is stored once, each
/// client's in `seq` order, and nothing answered `accepted` is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_clients_through_three_processes_one_killed_mid_run() {
    let pg = Postgres::start();
    let urls: Arc<std::sync::RwLock<Vec<String>>> = Arc::new(std::sync::RwLock::new(Vec::new()));
    let mut procs: Vec<Instance> = (0..3).map(|_| Instance::start(&pg.url())).collect();
    *urls.write().unwrap() = procs.iter().map(|p| p.url.clone()).collect();
    let mut clients = Vec::new();
    for c in 0..50usize {
        let urls = Arc::clone(&urls);
        clients.push(tokio::spawn(async move {
            let http = http();
            let client = format!("0192f0c1-7c1e-7000-8000-0000000005{c:02}");
            let (mut sent, mut failures, mut seq) = (Vec::new(), 0usize, 0i64);
            for b in 0..12usize {
                let batch: Vec<WireEvent> = (0..10)
                    .map(|_| {
                        seq += 1;
                        event(seq, "OrderCreated", r#"{"amount":250}"#)
                    })
                    .collect();
                let body = serde_json::to_vec(&PushRequest {
                    protocol: PROTOCOL_VERSION,
                    client_id: client.clone(),
                    events: batch.clone(),
                })
                .unwrap();
                let mut attempt = 0usize;
                loop {
                    let url = {
                        let urls = urls.read().unwrap();
                        urls[(c + b + attempt) % urls.len()].clone()
                    };
                    let answer = http
                        .post(url)
                        .header("content-type", "application/json")
                        .timeout(Duration::from_secs(10))
                        .body(body.clone())
                        .send()
                        .await;
                    match answer {
                        Ok(a) if a.status() == reqwest::StatusCode::OK => {
                            let a: PushResponse =
                                serde_json::from_slice(&a.bytes().await.unwrap()).unwrap();
                            assert!(a.results.iter().all(|r| r.status != ResultStatus::Rejected));
                            break;
                        }
                        other => {
                            if let Ok(a) = &other {
                                assert!(a.status().is_server_error(), "{:?}", a.status());
                            }
                            failures += 1;
                            attempt += 1;
                            assert!(attempt < 100, "{client}: batch {b} never answered");
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                }
                sent.push(batch.iter().map(|e| e.seq).collect::<Vec<_>>());
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
            (client, sent.concat(), failures)
        }));
    }
    tokio::time::sleep(Duration::from_millis(250)).await;
    // SIGKILL, mid-run: in-flight transactions roll back, answers are lost.
    procs[1].child.kill().unwrap();
    procs[1].child.wait().unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let restarted = tokio::task::spawn_blocking({
        let url = pg.url();
        move || Instance::start(&url)
    })
    .await
    .unwrap();
    urls.write().unwrap()[1] = restarted.url.clone();
    procs[1] = restarted;

    let mut expected = Vec::new();
    let mut failures = 0;
    for c in clients {
        let (client, seqs, f) = c.await.unwrap();
        failures += f;
        expected.push((client, seqs));
    }
    eprintln!("{failures} failed pushes (retried)");
    let db = pg.connect().await;
    let rows = db
        .query(
            "SELECT client_id, seq FROM edge_outbox_server_events ORDER BY cursor",
            &[],
        )
        .await
        .unwrap();
    let mut stored: HashMap<String, Vec<i64>> = HashMap::new();
    for r in rows {
        stored.entry(r.get(0)).or_default().push(r.get(1));
    }
    for (client, seqs) in &expected {
        assert_eq!(
            stored.get(client),
            Some(seqs),
            "{client}: every event once, in seq order"
        );
    }
    drop(procs);
}

/// The `PgInbox` example of docs/protocol.md, exactly as written there
/// (checked by `protocol_doc_pg_inbox_example_is_the_one_tested_and_works`).
#[rustfmt::skip]
mod doc_example {
    // docs-example: begin
    use edge_outbox::protocol::WireEvent;
    use edge_outbox_server::{Applied, InboxFuture, PgInbox, Rejection, ServerConfig, decode_payload};

    struct Orders;

    impl PgInbox for Orders {
        fn migrate<'a>(&'a self, tx: &'a tokio_postgres::Transaction<'a>) -> InboxFuture<'a, ()> {
            Box::pin(async move {
                tx.batch_execute("CREATE TABLE IF NOT EXISTS orders (id BIGINT PRIMARY KEY, amount BIGINT)").await?;
                Ok(())
            })
        }
        fn apply<'a>(&'a self, tx: &'a tokio_postgres::Transaction<'a>, _client: &'a str, e: &'a WireEvent)
            -> InboxFuture<'a, Applied>
        {
            Box::pin(async move {
                #[derive(serde::Deserialize)]
                struct Order { order_id: i64, amount: i64 }
                let o: Order = decode_payload(e)?;
                if o.amount <= 0 {
                    return Err(Rejection::new("amount must be positive").into());
                }
                let inserted = tx.execute(
                    "INSERT INTO orders (id, amount) VALUES ($1, $2) ON CONFLICT (id) DO NOTHING",
                    &[&o.order_id, &o.amount],
                ).await?;
                if inserted == 0 {
                    return Ok(Applied::Reject(format!("order {} exists already", o.order_id)));
                }
                Ok(Applied::Accept)
            })
        }
    }
    // docs-example: end

    pub(super) fn config(url: String) -> ServerConfig {
        ServerConfig::postgres(url).allow_anonymous(true).pg_inbox(Orders)
    }
}

/// The `PgInbox` example of docs/protocol.md is this code, and it does what
/// the page says: rejections undo one event, the rest of the batch commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_doc_pg_inbox_example_is_the_one_tested_and_works() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let doc = std::fs::read_to_string(root.join("../docs/protocol.md")).unwrap();
    let block = doc
        .split_once("the same inbox is a `PgInbox`")
        .and_then(|(_, rest)| rest.split_once("```rust"))
        .and_then(|(_, rest)| rest.split_once('\n'))
        .and_then(|(_, rest)| rest.split_once("\n```"))
        .expect("the PgInbox block of docs/protocol.md")
        .0;
    let this = std::fs::read_to_string(root.join("tests/postgres.rs")).unwrap();
    let mirror = this
        .split_once("// docs-example: begin\n")
        .and_then(|(_, rest)| rest.split_once("// docs-example: end"))
        .unwrap()
        .0;
    let lines = |text: &str| -> Vec<String> {
        text.lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with("let config"))
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(
        lines(mirror),
        lines(block),
        "docs/protocol.md's PgInbox example"
    );

    let pg = Postgres::start();
    let server = edge_outbox_server::spawn(doc_example::config(pg.url()))
        .await
        .unwrap();
    let batch = [
        event(1, "OrderCreated", r#"{"order_id": 1, "amount": 250}"#),
        event(2, "OrderCreated", r#"{"order_id": 2, "amount": -5}"#),
        event(3, "OrderCreated", r#"{"order_id": 3, "amount": "250"}"#),
        event(4, "OrderCreated", r#"{"order_id": 1, "amount": 100}"#),
        event(5, "OrderCreated", r#"{"order_id": 5, "amount": 100}"#),
    ];
    let answer = push(&http(), &server, "doc", &batch, Duration::from_secs(20))
        .await
        .unwrap();
    let statuses: Vec<ResultStatus> = answer.results.iter().map(|r| r.status).collect();
    use ResultStatus::{Accepted, Rejected};
    assert_eq!(statuses, [Accepted, Rejected, Rejected, Rejected, Accepted]);
    assert_eq!(
        answer.results[1].reason.as_deref(),
        Some("amount must be positive")
    );
    let orders: Vec<i64> = pg
        .connect()
        .await
        .query("SELECT id FROM orders ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(orders, [1, 5]);
    // A rejected event leaves no dedupe record: its resend is judged again.
    let again = push(
        &http(),
        &server,
        "doc",
        &batch[1..2],
        Duration::from_secs(20),
    )
    .await
    .unwrap();
    assert_eq!(again.results[0].status, Rejected);
    let stored = pull_all(&http(), &server).await;
    assert_eq!(stored.len(), 2);
    // Two copies of one event in one batch: the second is answered like the first.
    let bad = event(6, "OrderCreated", r#"{"order_id": 6, "amount": 0}"#);
    let good = event(7, "OrderCreated", r#"{"order_id": 7, "amount": 1}"#);
    let twice = [bad.clone(), bad, good.clone(), good];
    let answer = push(&http(), &server, "doc", &twice, Duration::from_secs(20))
        .await
        .unwrap();
    let statuses: Vec<ResultStatus> = answer.results.iter().map(|r| r.status).collect();
    assert_eq!(
        statuses,
        [Rejected, Rejected, Accepted, ResultStatus::Duplicate]
    );
    assert_eq!(answer.results[0].reason, answer.results[1].reason);
    assert_eq!(pull_all(&http(), &server).await.len(), 3);
}

// ---------- the conformance checker ----------

/// The conformance checker (`edge-outbox-server check`) passes every
/// obligation against the reference server on PostgreSQL, twice in a row
/// (fresh ids each run), with a token bound to one client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_conformance_checker_passes_every_obligation_on_postgres() {
    const CLIENT: &str = "0192f0c1-7c1e-7000-8000-0000000000c2";
    let pg = Postgres::start();
    let server =
        edge_outbox_server::spawn(ServerConfig::postgres(pg.url()).token("pg-check", CLIENT))
            .await
            .expect("server on PostgreSQL starts");
    for _ in 0..2 {
        let report =
            edge_outbox_server::check::run_as(&server.events_url(), Some("pg-check"), Some(CLIENT))
                .await;
        print!("{report}");
        assert!(report.passed(), "{report}");
        assert_eq!(report.failed(), Vec::<&str>::new(), "{report}");
    }
}

/// Read rights on PostgreSQL: a client's token reads only its own stream
/// (with or without `client_id`; another client's is `403`), a reader token
/// reads every stream (issue 12, item 1; the other auth tests are
/// storage-independent and run on SQLite in tests/server.rs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_cannot_read_another_clients_stream_on_postgres() {
    const A: &str = "0192f0c1-7c1e-7000-8000-0000000000d1";
    const B: &str = "0192f0c1-7c1e-7000-8000-0000000000d2";
    let pg = Postgres::start();
    let server = edge_outbox_server::spawn(
        ServerConfig::postgres(pg.url())
            .token("token-a", A)
            .token("token-b", B)
            .reader_token("reader"),
    )
    .await
    .expect("server on PostgreSQL starts");
    let http = http();
    for (token, client, n) in [("token-a", A, 2), ("token-b", B, 3)] {
        let batch: Vec<WireEvent> = (1..=n).map(|s| event(s, "OrderCreated", "{}")).collect();
        let body = serde_json::to_vec(&PushRequest {
            protocol: PROTOCOL_VERSION,
            client_id: client.to_owned(),
            events: batch,
        })
        .unwrap();
        let answer = http
            .post(server.events_url())
            .bearer_auth(token)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), reqwest::StatusCode::OK);
    }
    let read = |token: &'static str, query: String| {
        let http = http.clone();
        let url = format!("{}{query}", server.events_url());
        async move {
            let answer = http.get(url).bearer_auth(token).send().await.unwrap();
            let status = answer.status();
            let bytes = answer.bytes().await.unwrap();
            let clients: Vec<String> = serde_json::from_slice::<PullResponse>(&bytes)
                .map(|page| page.events.into_iter().map(|e| e.client_id).collect())
                .unwrap_or_default();
            (status.as_u16(), clients)
        }
    };
    assert_eq!(
        read("token-a", String::new()).await,
        (200, vec![A.to_owned(); 2])
    );
    assert_eq!(
        read("token-b", String::new()).await,
        (200, vec![B.to_owned(); 3])
    );
    assert_eq!(
        read("token-a", format!("?client_id={B}")).await,
        (403, vec![])
    );
    assert_eq!(
        read("token-b", format!("?client_id={A}")).await,
        (403, vec![])
    );
    assert_eq!(read("reader", String::new()).await.1.len(), 5);
    assert_eq!(
        read("reader", format!("?client_id={B}")).await,
        (200, vec![B.to_owned(); 3])
    );
}
