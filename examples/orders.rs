//! The full demo: an app commits orders and their events while offline, then
//! the server appears and everything is delivered, once, in order.
//!
//! ```text
//! cargo run --release --example orders              # 2,000 orders
//! cargo run --release --example orders -- --orders 50000
//! ```
//!
//! 1. opens an SQLite file in a temp dir holding the app's `orders` table and the outbox;
//! 2. starts the relay against a port where nothing listens, then commits N
//!    orders, each row with its `OrderCreated` event in ONE transaction: the
//!    failed attempts and the growing backoff are printed;
//! 3. starts the reference server in-process on that very port; its inbox
//!    applies each event to a server-side `received_orders` table, in the same
//!    transaction as the dedupe record;
//! 4. shows a progress bar until the outbox is drained, then checks the
//!    server's tables: every order arrived, no effect was applied twice, and
//!    the order of commits was kept.

use std::time::{Duration, Instant};

use edge_outbox::protocol::WireEvent;
use edge_outbox::{Config, HttpTransport, NewEvent, Outbox, RelayStatus, RetryPolicy, Timestamp};
use edge_outbox_server::{Applied, BoxError, Inbox, ServerConfig};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct OrderCreated {
    order_id: i64,
    customer: String,
    amount_cents: i64,
}

/// The backend's side: applying an order is an INSERT with no unique key, so
/// a second application of one event would show up as a duplicate row. The
/// server's dedupe (same transaction) is what keeps it at one.
struct ApplyOrders;

impl Inbox for ApplyOrders {
    fn migrate(&self, conn: &rusqlite::Connection) -> Result<(), BoxError> {
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS received_orders (
                 arrival INTEGER PRIMARY KEY AUTOINCREMENT,
                 order_id INTEGER NOT NULL,
                 amount_cents INTEGER NOT NULL)",
        )?;
        Ok(())
    }

    fn apply(
        &self,
        tx: &rusqlite::Transaction<'_>,
        _client_id: &str,
        event: &WireEvent,
    ) -> Result<Applied, BoxError> {
        let order: OrderCreated = serde_json::from_str(event.payload.get())?;
        tx.execute(
            "INSERT INTO received_orders (order_id, amount_cents) VALUES (?1, ?2)",
            (order.order_id, order.amount_cents),
        )?;
        Ok(Applied::Accept)
    }
}

fn parse_orders() -> usize {
    let args: Vec<String> = std::env::args().collect();
    match args.iter().position(|a| a == "--orders") {
        Some(i) => args
            .get(i + 1)
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("--orders takes a number")),
        None => 2_000,
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let n = parse_orders();
    let dir = tempfile::tempdir()?;
    let app_db = dir.path().join("shop.db");
    let server_db = dir.path().join("server.db");

    // A port nothing listens on yet (reserved, then closed): the server takes it later.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let endpoint = format!("http://{addr}/v1/events");

    println!("edge-outbox demo: {n} orders");
    println!("  app database   {}", app_db.display());
    println!("  sync endpoint  {endpoint} (nothing listens there yet)\n");

    let outbox = Outbox::open(&app_db, Config::new(&endpoint))?;
    outbox.transaction(|tx| {
        tx.execute_batch(
            "CREATE TABLE IF NOT EXISTS orders (
                 id INTEGER PRIMARY KEY,
                 customer TEXT NOT NULL,
                 amount_cents INTEGER NOT NULL)",
        )?;
        Ok(())
    })?;

    // A short backoff so the demo's offline phase shows several attempts.
    let relay = outbox
        .relay(HttpTransport::new(&endpoint)?)
        .retry_policy(
            RetryPolicy::new()
                .with_base(Duration::from_millis(250))
                .with_cap(Duration::from_secs(2)),
        )
        .spawn();

    // Print each failed attempt and when the next one is due.
    let mut status = relay.subscribe();
    let printer = tokio::spawn(async move {
        let mut last: Option<Timestamp> = None;
        let mut attempts = 0;
        while status.changed().await.is_ok() {
            let s: RelayStatus = status.borrow_and_update().clone();
            if let (Some(error), Some(at)) = (&s.last_error, s.next_attempt)
                && last != Some(at)
            {
                last = Some(at);
                attempts += 1;
                let wait = at.since(Timestamp::now());
                println!(
                    "  [offline] attempt {attempts} failed ({} pending): {}; next in {} ms",
                    s.pending,
                    short(error),
                    wait.as_millis()
                );
            }
        }
    });

    // The app: each order row and its event commit together, or not at all.
    let started = Instant::now();
    let slices = 5;
    for slice in 0..slices {
        for id in (slice * n / slices)..((slice + 1) * n / slices) {
            let order = OrderCreated {
                order_id: id as i64 + 1,
                customer: format!("customer-{}", id % 97),
                amount_cents: 1_000 + (id as i64 * 37) % 9_000,
            };
            outbox.transaction(|tx| {
                tx.execute(
                    "INSERT INTO orders (id, customer, amount_cents) VALUES (?1, ?2, ?3)",
                    (order.order_id, &order.customer, order.amount_cents),
                )?;
                tx.enqueue(
                    NewEvent::json("OrderCreated", &order)?
                        .key(format!("order-{}", order.order_id)),
                )?;
                Ok(())
            })?;
        }
        // Spread the commits over a few seconds of "offline" time.
        tokio::time::sleep(Duration::from_millis(600)).await;
    }
    let committed: i64 = outbox
        .transaction(|tx| Ok(tx.query_row("SELECT COUNT(*) FROM orders", [], |r| r.get(0))?))?;
    println!(
        "  [offline] committed {committed} orders with their events in {:.1} s; pending {}\n",
        started.elapsed().as_secs_f64(),
        outbox.stats()?.pending
    );

    // The backend comes online on the port the relay keeps trying.
    let server = edge_outbox_server::spawn(
        ServerConfig::new(&server_db)
            .listen(addr)
            .allow_anonymous(true)
            .inbox(ApplyOrders),
    )
    .await?;
    printer.abort();
    println!("  [online]  reference server listening on {}", server.url());

    let bar = ProgressBar::new(n as u64).with_style(ProgressStyle::with_template(
        "  [{elapsed_precise}] {wide_bar} {pos}/{len} delivered ({per_sec})",
    )?);
    let online = Instant::now();
    let mut status = relay.subscribe();
    loop {
        let s = status.borrow_and_update().clone();
        bar.set_position(s.sent);
        if s.pending == 0 && s.sent >= n as u64 {
            break;
        }
        // The relay publishes after every batch; the timeout keeps the bar alive meanwhile.
        let _ = tokio::time::timeout(Duration::from_millis(200), status.changed()).await;
    }
    bar.finish();
    let delivery = online.elapsed();
    relay.shutdown().await?;

    // Check at the server: its stored events and the effects its inbox applied.
    let received = server.events(outbox.client_id())?;
    let stats = server.stats()?;
    let requests = server.requests().len();
    server.shutdown().await?;
    let check = rusqlite::Connection::open(&server_db)?;
    let (effects, distinct): (i64, i64) = check.query_row(
        "SELECT COUNT(*), COUNT(DISTINCT order_id) FROM received_orders",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    let mut applied = check.prepare("SELECT order_id FROM received_orders ORDER BY arrival")?;
    let applied: Vec<i64> = applied
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    let order_kept = applied.windows(2).all(|w| w[0] < w[1])
        && received.windows(2).all(|w| w[0].event.seq < w[1].event.seq)
        && stats.iter().all(|s| s.out_of_order == 0);

    println!("\nSummary");
    println!("  committed          {committed}");
    println!("  delivered          {}", received.len());
    println!("  effects applied    {effects}");
    println!("  duplicate effects  {}", effects - distinct);
    println!(
        "  order kept         {}",
        if order_kept { "yes" } else { "NO" }
    );
    println!(
        "  delivery           {:.2} s after the server came up, {requests} requests in all",
        delivery.as_secs_f64()
    );
    let ok = committed as usize == n
        && received.len() == n
        && effects == n as i64
        && distinct == n as i64
        && order_kept;
    if !ok {
        return Err("the demo's checks failed".into());
    }
    Ok(())
}

/// The first line of an error, without the cause chain.
fn short(error: &str) -> &str {
    error.lines().next().unwrap_or(error)
}
