//! `edge-outbox`: the outbox inspector, for a support engineer looking at one
//! user's app database. It reads and manages the outbox through the library's
//! public API ([`Outbox`]); raw SQL only for what the API lacks (the schema
//! check before opening, and `tail`'s "events after seq"), read-only.
//!
//! Safe on a database the app has open: every command is one short statement
//! or transaction of the library (WAL, busy timeout), and `tail` polls.
//! It refuses a file without the outbox tables or with a schema version it
//! does not know, before [`Outbox::open`] could create or migrate anything.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use edge_outbox::{Config, Event, EventId, Outbox, SCHEMA_VERSION, STATUS_SQL, Timestamp};
use edge_outbox_server::text::printable;
use rusqlite::{Connection, OpenFlags, OptionalExtension};

#[derive(Parser)]
#[command(
    name = "edge-outbox",
    about = "Inspect and manage an app's edge-outbox"
)]
struct Cli {
    /// The app's SQLite database file.
    #[arg(long, short = 'd')]
    db: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Counts, oldest pending age, next attempt, lease, schema version, client id.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Pending events, oldest first.
    Pending(ListArgs),
    /// Dead letters, oldest first.
    Dead(ListArgs),
    /// Make a dead letter (or all of them) pending again.
    Retry {
        id: Option<String>,
        #[arg(long, conflicts_with = "id")]
        all: bool,
    },
    /// Clear the backoff of pending events: due now.
    RetryNow,
    /// Delete a dead letter for good.
    Discard { id: String },
    /// Delete sent events older than a duration (7d, 12h, 30m, 45s).
    Prune {
        #[arg(long, value_parser = parse_duration)]
        older_than: Duration,
    },
    /// Follow new commits: print each new event as it is committed.
    Tail {
        /// Poll interval.
        #[arg(long, value_parser = parse_duration, default_value = "200ms")]
        interval: Duration,
        /// Stop after this long (default: until Ctrl-C).
        #[arg(long = "for", value_parser = parse_duration)]
        for_: Option<Duration>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Args)]
struct ListArgs {
    /// At most this many events.
    #[arg(long, default_value_t = 50)]
    limit: usize,
    /// Only events of this type.
    #[arg(long = "type")]
    event_type: Option<String>,
    #[arg(long)]
    json: bool,
}

/// `7d`, `12h`, `30m`, `45s`, `200ms`.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("`{s}`: needs a unit (ms, s, m, h, d)"))?;
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().map_err(|_| format!("`{s}`: not a number"))?;
    let ms = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(format!("`{s}`: unknown unit `{unit}` (ms, s, m, h, d)")),
    };
    Ok(Duration::from_millis(n.saturating_mul(ms)))
}

fn human(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0 => format!("{}ms", d.as_millis()),
        1..60 => format!("{s}s"),
        60..3600 => format!("{}m{}s", s / 60, s % 60),
        3600..86400 => format!("{}h{}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{}h", s / 86400, s % 86400 / 3600),
    }
}

/// The schema check, read-only and before anything can create tables:
/// the file must exist, hold both outbox tables, and be at the version this
/// build knows. Returns that version.
fn check_schema(path: &Path) -> Result<u32, String> {
    if !path.is_file() {
        return Err(format!("{}: no such file", path.display()));
    }
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| format!("{}: cannot open: {e}", path.display()))?;
    conn.busy_timeout(Duration::from_secs(5)).ok();
    let tables: i64 = conn
        .query_row(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' \
             AND name IN ('edge_outbox_meta', 'edge_outbox_events')",
            [],
            |r| r.get(0),
        )
        .map_err(|e| format!("{}: not a readable SQLite database: {e}", path.display()))?;
    if tables != 2 {
        return Err(format!(
            "{}: no edge-outbox tables (edge_outbox_meta, edge_outbox_events); refusing to touch it",
            path.display()
        ));
    }
    let version: Option<String> = conn
        .query_row(
            "SELECT value FROM edge_outbox_meta WHERE key = 'schema_version'",
            [],
            |r| r.get(0),
        )
        .optional()
        .map_err(|e| format!("{}: cannot read edge_outbox_meta: {e}", path.display()))?;
    let version: u32 = version
        .as_deref()
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| {
            format!(
                "{}: outbox schema version missing or unreadable",
                path.display()
            )
        })?;
    if version != SCHEMA_VERSION {
        return Err(format!(
            "{}: outbox schema version {version}, this inspector knows version {SCHEMA_VERSION}; \
             refusing to touch it (use the edge-outbox build the app uses)",
            path.display()
        ));
    }
    Ok(version)
}

fn parse_id(s: &str) -> Result<EventId, String> {
    s.parse()
        .map_err(|_| format!("`{s}`: not an event id (a UUID)"))
}

fn print_events(events: &[Event], json: bool) -> Result<(), String> {
    if json {
        let text = serde_json::to_string_pretty(events).map_err(|e| e.to_string())?;
        println!("{text}");
        return Ok(());
    }
    let now = Timestamp::now();
    for e in events {
        let mut line = format!(
            "{:>6}  {}  {}  {}  age {}  attempts {}",
            e.seq,
            e.id,
            e.status.as_str(),
            e.event_type,
            human(now.since(e.created_at)),
            e.attempts
        );
        if let Some(key) = &e.key {
            line.push_str(&format!("  key {key}"));
        }
        if e.status.as_str() == "pending" && e.next_attempt_at > now {
            line.push_str(&format!(
                "  next in {}",
                human(e.next_attempt_at.since(now))
            ));
        }
        if let Some(err) = &e.last_error {
            line.push_str(&format!("  error: {err}"));
        }
        // Types, keys and errors are the app's (or a server's) text.
        println!("{}", printable(&line));
    }
    if events.is_empty() {
        println!("(none)");
    }
    Ok(())
}

fn list(events: Vec<Event>, args: &ListArgs) -> Result<(), String> {
    let events: Vec<Event> = events
        .into_iter()
        .filter(|e| args.event_type.as_ref().is_none_or(|t| &e.event_type == t))
        .take(args.limit)
        .collect();
    print_events(&events, args.json)
}

fn run(cli: Cli) -> Result<(), String> {
    let version = check_schema(&cli.db)?;
    let outbox = Outbox::open(&cli.db, Config::new("")).map_err(|e| e.to_string())?;
    let err = |e: edge_outbox::Error| e.to_string();
    match cli.command {
        Command::Status { json } => {
            let now = Timestamp::now();
            let stats = outbox.stats().map_err(err)?;
            let oldest = outbox.pending(1).map_err(err)?;
            let next = oldest.first().map(|e| e.next_attempt_at);
            let lock = format!("{}-outbox.lock", cli.db.display());
            let lease = outbox.relay_lease().map_err(err)?;
            let holder_json = lease.holder.as_ref().map(|h| {
                serde_json::json!({
                    "pid": h.pid,
                    "owner": h.owner,
                    "since": h.since.to_rfc3339(),
                })
            });
            if json {
                let v = serde_json::json!({
                    "pending": stats.pending,
                    "sent": stats.sent,
                    "dead": stats.dead,
                    "oldest_pending_age_ms": stats.oldest_pending_age(now).map(|d| d.as_millis() as u64),
                    "next_attempt_at": next.map(|t| t.to_rfc3339()),
                    "lease_held": lease.held,
                    "lease_holder": holder_json,
                    "lease_lock_file": lock,
                    "schema_version": version,
                    "client_id": outbox.client_id(),
                });
                println!("{v:#}");
            } else {
                println!("database        {}", cli.db.display());
                println!("schema version  {version}");
                println!("client id       {}", outbox.client_id());
                println!("pending         {}", stats.pending);
                println!("sent            {}", stats.sent);
                println!("dead            {}", stats.dead);
                match stats.oldest_pending_age(now) {
                    Some(age) => println!("oldest pending  {} ago", human(age)),
                    None => println!("oldest pending  -"),
                }
                match next {
                    Some(t) if t > now => {
                        println!(
                            "next attempt    {} (in {})",
                            t.to_rfc3339(),
                            human(t.since(now))
                        )
                    }
                    Some(_) => println!("next attempt    due now"),
                    None => println!("next attempt    -"),
                }
                let who = |h: &edge_outbox::LeaseHolder| {
                    format!(
                        "pid {}, relay {}, since {} ({} ago)",
                        h.pid,
                        h.owner,
                        h.since.to_rfc3339(),
                        human(now.since(h.since))
                    )
                };
                match (&lease.held, &lease.holder) {
                    (true, Some(h)) => println!("lease holder    {}", printable(&who(h))),
                    (true, None) => {
                        println!("lease holder    held (its record in {lock} is unreadable)")
                    }
                    (false, Some(h)) => {
                        println!("lease holder    none (last: {})", printable(&who(h)))
                    }
                    (false, None) => println!("lease holder    none"),
                }
            }
        }
        Command::Pending(args) => {
            let fetch = if args.event_type.is_some() {
                usize::MAX
            } else {
                args.limit
            };
            list(outbox.pending(fetch).map_err(err)?, &args)?;
        }
        Command::Dead(args) => list(outbox.dead_letters().map_err(err)?, &args)?,
        Command::Retry { id: Some(id), .. } => {
            let id = parse_id(&id)?;
            if outbox.retry(id).map_err(err)? {
                println!("retried {id}: pending again");
            } else {
                return Err(format!("{id}: no such dead letter"));
            }
        }
        Command::Retry { id: None, all } => {
            if !all {
                return Err("retry: give an event ID or --all".into());
            }
            let mut n = 0;
            for e in outbox.dead_letters().map_err(err)? {
                if outbox.retry(e.id).map_err(err)? {
                    n += 1;
                }
            }
            println!("retried {n} dead letter(s)");
        }
        Command::RetryNow => {
            let n = outbox.retry_now().map_err(err)?;
            println!("{n} pending event(s) due now");
        }
        Command::Discard { id } => {
            let id = parse_id(&id)?;
            if outbox.discard(id).map_err(err)? {
                println!("discarded {id}");
            } else {
                return Err(format!("{id}: no such dead letter"));
            }
        }
        Command::Prune { older_than } => {
            let n = outbox.prune_sent(older_than).map_err(err)?;
            println!("pruned {n} sent event(s) older than {}", human(older_than));
        }
        Command::Tail {
            interval,
            for_,
            json,
        } => tail(&cli.db, interval, for_, json)?,
    }
    Ok(())
}

/// Polls for events committed after the last one seen (raw read-only SQL:
/// the library has no "events after seq" accessor), and prints each.
/// Each poll is one read statement; stops after `for_`, or on Ctrl-C.
fn tail(path: &Path, interval: Duration, for_: Option<Duration>, json: bool) -> Result<(), String> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| e.to_string())?;
    conn.busy_timeout(Duration::from_secs(5)).ok();
    let mut last: i64 = conn
        .query_row(
            "SELECT coalesce(max(seq), 0) FROM edge_outbox_events",
            [],
            |r| r.get(0),
        )
        .map_err(|e| e.to_string())?;
    // Said once the first poll has run, so that whoever waits for this line
    // (a script, a test) knows every later commit comes in a later poll.
    let mut announce = Some(format!(
        "following {} after seq {last} (Ctrl-C stops)",
        path.display()
    ));
    let deadline = for_.map(|d| Instant::now() + d);
    let mut stmt = conn
        .prepare(&format!(
            "SELECT seq, id, type, key, payload, created_at, {STATUS_SQL} \
             FROM edge_outbox_events WHERE seq > ?1 ORDER BY seq LIMIT 1000"
        ))
        .map_err(|e| e.to_string())?;
    loop {
        let rows = stmt
            .query_map([last], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, Vec<u8>>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, Option<String>>(3)?,
                    r.get::<_, String>(4)?,
                    r.get::<_, i64>(5)?,
                    r.get::<_, String>(6)?,
                ))
            })
            .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
            .map_err(|e| e.to_string())?;
        for (seq, id, ty, key, payload, created, status) in rows {
            last = seq;
            let id = uuid_text(&id);
            let at = Timestamp::from_millis(created).to_rfc3339();
            if json {
                let payload: serde_json::Value =
                    serde_json::from_str(&payload).unwrap_or(serde_json::Value::String(payload));
                let v = serde_json::json!({
                    "seq": seq, "id": id, "type": ty, "key": key,
                    "created_at": at, "status": status, "payload": payload,
                });
                println!("{v}");
            } else {
                let key = key.map(|k| format!("  key {k}")).unwrap_or_default();
                let line = format!("{seq:>6}  {id}  {at}  {status}  {ty}{key}  {payload}");
                println!("{}", printable(&line));
            }
        }
        if let Some(line) = announce.take() {
            eprintln!("{line}");
        }
        let wait = match deadline {
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Ok(());
                }
                left.min(interval)
            }
            None => interval,
        };
        std::thread::sleep(wait);
    }
}

fn uuid_text(bytes: &[u8]) -> String {
    if bytes.len() != 16 {
        return bytes.iter().map(|b| format!("{b:02x}")).collect();
    }
    let h: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("edge-outbox: {e}");
            ExitCode::FAILURE
        }
    }
}
