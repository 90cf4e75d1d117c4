//! Storage of received events behind the [`EventStore`] trait, its SQLite
//! implementation [`SqliteStore`], and [`open`]: the one place where a
//! [`Database`] setting becomes a store (the PostgreSQL one is
//! [`crate::PgStore`]).
//!
//! The HTTP layer only talks to [`EventStore`].

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use edge_outbox::Timestamp;
use edge_outbox::protocol::{EventResult, ReceivedEvent, ResultStatus, WireEvent};
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use serde_json::value::RawValue;

use crate::inbox::{Applied, Inbox, PgInbox, StoreOnly, classify};
use crate::postgres::PgStore;
use crate::{Database, Error};

/// The store for `database`, with the inbox meant for it: the one place
/// where the storage is chosen. An inbox of the other storage is a
/// configuration error rather than silently unused.
pub(crate) async fn open(
    database: Database,
    inbox: Option<Arc<dyn Inbox>>,
    pg_inbox: Option<Arc<dyn PgInbox>>,
) -> Result<Arc<dyn EventStore>, Error> {
    let sqlite_inbox = || inbox.clone().unwrap_or_else(|| Arc::new(StoreOnly));
    let no_pg_inbox = || match pg_inbox.is_some() {
        true => Err(Error::Config(
            "a PgInbox was set but the database is SQLite: use ServerConfig::inbox".into(),
        )),
        false => Ok(()),
    };
    Ok(match database {
        Database::File(path) => {
            no_pg_inbox()?;
            Arc::new(SqliteStore::open(&path, sqlite_inbox())?)
        }
        Database::InMemory => {
            no_pg_inbox()?;
            Arc::new(SqliteStore::in_memory(sqlite_inbox())?)
        }
        Database::Postgres { url, pool_size } => {
            if inbox.is_some() {
                return Err(Error::Config(
                    "an Inbox (SQLite) was set but the database is PostgreSQL: use ServerConfig::pg_inbox"
                        .into(),
                ));
            }
            Arc::new(PgStore::open(&url, pool_size, pg_inbox).await?)
        }
        Database::Custom(store) => store,
    })
}

/// One stored event's columns as both stores read them back (their tables
/// have the same columns): the one place where a stored row becomes the
/// event a pull returns.
pub struct StoredRow {
    /// Arrival position (`cursor` column).
    pub cursor: i64,
    /// The pushing client.
    pub client_id: String,
    /// The event id, as text (a UUID).
    pub id: String,
    /// The client's seq.
    pub seq: i64,
    /// The event type.
    pub event_type: String,
    /// The ordering key, if any.
    pub key: Option<String>,
    /// The payload's JSON text, as pushed.
    pub payload: String,
    /// The headers as a JSON object of strings.
    pub headers: String,
    /// The client's `created_at` (RFC 3339), as pushed.
    pub created_at: String,
    /// When the server stored it (RFC 3339).
    pub received_at: String,
}

impl StoredRow {
    /// The event a pull returns. A column that does not decode (a row
    /// changed behind the server's back) is [`Error::Internal`] naming the
    /// cursor and the column, never a panic.
    pub fn decode(self) -> Result<ReceivedEvent, Error> {
        let cursor = self.cursor;
        let corrupt = |what: &str, e: &dyn std::fmt::Display| {
            Error::Internal(format!("stored event at cursor {cursor}: bad {what}: {e}"))
        };
        Ok(ReceivedEvent {
            cursor,
            client_id: self.client_id,
            event: WireEvent {
                id: self.id.parse().map_err(|e| corrupt("id", &e))?,
                seq: self.seq,
                event_type: self.event_type,
                key: self.key,
                payload: RawValue::from_string(self.payload).map_err(|e| corrupt("payload", &e))?,
                headers: serde_json::from_str(&self.headers).map_err(|e| corrupt("headers", &e))?,
                created_at: self.created_at,
            },
            received_at: self.received_at,
        })
    }
}

/// Where received events live.
///
/// Contract, one obligation a line:
/// - `push` stores a batch from one client in ONE database transaction, and
///   returns one [`EventResult`] per input event, in input order;
/// - the dedupe key is `(client_id, event.id)`; an event already stored under
///   it is answered `duplicate` and changes nothing, also within one batch;
/// - the dedupe record commits in the same transaction as the event's effect;
/// - `push` returns `Err` only when nothing of the batch was committed;
/// - every accepted event gets a cursor larger than every earlier one
///   (arrival order), never reused;
/// - cursors become visible in cursor order: once `pull` has returned
///   cursor `c`, no event with a cursor below `c` appears later (with
///   concurrent writers: cursors are assigned in commit order, not taken
///   from a sequence at insert), so a reader paging with `after` never
///   skips an event;
/// - `pull` returns events with `cursor > after`, ascending, at most `limit`;
/// - methods block (they are called from `spawn_blocking`).
///
/// [`SqliteStore`] answers the ordering obligations with its one writer
/// connection (one batch at a time); [`crate::PgStore`] with a counter row
/// locked from the cursors' assignment to the commit (its module docs).
pub trait EventStore: Send + Sync + 'static {
    /// Store a batch of valid events from `client_id`.
    fn push(&self, client_id: &str, events: &[&WireEvent]) -> Result<Vec<EventResult>, Error>;

    /// Events received after `after`, oldest first, optionally of one client.
    fn pull(
        &self,
        after: i64,
        limit: usize,
        client_id: Option<&str>,
    ) -> Result<Vec<ReceivedEvent>, Error>;

    /// Number of stored events, optionally of one client.
    fn count(&self, client_id: Option<&str>) -> Result<u64, Error>;
}

/// The events table. `cursor` is AUTOINCREMENT so a cursor is never reused,
/// even after the newest rows are deleted; the UNIQUE constraint is the
/// dedupe record.
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS edge_outbox_server_events (
    cursor      INTEGER PRIMARY KEY AUTOINCREMENT,
    client_id   TEXT NOT NULL,
    id          TEXT NOT NULL,
    seq         INTEGER NOT NULL,
    type        TEXT NOT NULL,
    key         TEXT,
    payload     TEXT NOT NULL,
    headers     TEXT NOT NULL,
    created_at  TEXT NOT NULL,
    received_at TEXT NOT NULL,
    UNIQUE (client_id, id)
);
CREATE INDEX IF NOT EXISTS edge_outbox_server_events_by_client
    ON edge_outbox_server_events (client_id, cursor);
";

/// [`EventStore`] on one SQLite file (WAL), with an [`Inbox`] applied in the
/// same transaction as each event's dedupe record.
///
/// One writer connection serializes pushes (SQLite has one writer anyway);
/// a second connection serves pulls so readers never wait for a batch.
pub struct SqliteStore {
    writer: Mutex<Connection>,
    /// `None` for an in-memory database, which cannot be shared by two connections.
    reader: Option<Mutex<Connection>>,
    inbox: Arc<dyn Inbox>,
}

impl SqliteStore {
    /// Open (or create) the database file at `path`.
    pub fn open(path: &Path, inbox: Arc<dyn Inbox>) -> Result<Self, Error> {
        let writer = Connection::open(path)?;
        configure(&writer)?;
        writer.execute_batch(SCHEMA)?;
        inbox.migrate(&writer).map_err(Error::Inbox)?;
        let reader = Connection::open(path)?;
        configure(&reader)?;
        Ok(SqliteStore {
            writer: Mutex::new(writer),
            reader: Some(Mutex::new(reader)),
            inbox,
        })
    }

    /// A private in-memory database (gone when the store is dropped).
    pub fn in_memory(inbox: Arc<dyn Inbox>) -> Result<Self, Error> {
        let conn = Connection::open_in_memory()?;
        conn.execute_batch(SCHEMA)?;
        inbox.migrate(&conn).map_err(Error::Inbox)?;
        Ok(SqliteStore {
            writer: Mutex::new(conn),
            reader: None,
            inbox,
        })
    }

    fn read_conn(&self) -> MutexGuard<'_, Connection> {
        lock(self.reader.as_ref().unwrap_or(&self.writer))
    }
}

fn configure(conn: &Connection) -> Result<(), Error> {
    // WAL: readers do not block the writer. synchronous=FULL: an `accepted`
    // answer means the event survives a power loss, which is what lets the
    // client mark it sent. busy_timeout: another process (a backup, a CLI)
    // may hold the file briefly.
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    Ok(())
}

/// Lock a connection even if a previous holder panicked: rusqlite rolls back
/// an unfinished transaction on drop, so the connection is still consistent.
fn lock(m: &Mutex<Connection>) -> MutexGuard<'_, Connection> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl EventStore for SqliteStore {
    fn push(&self, client_id: &str, events: &[&WireEvent]) -> Result<Vec<EventResult>, Error> {
        let mut conn = lock(&self.writer);
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let received_at = Timestamp::now().to_rfc3339();
        let mut results = Vec::with_capacity(events.len());
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO edge_outbox_server_events
                   (client_id, id, seq, type, key, payload, headers, created_at, received_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
                 ON CONFLICT (client_id, id) DO NOTHING",
            )?;
            for event in events {
                // A savepoint per event, so a rejected event's insert and the
                // inbox's writes for it are undone without touching the others.
                tx.execute_batch("SAVEPOINT edge_outbox_event")?;
                let headers = serde_json::to_string(&event.headers)
                    .map_err(|e| Error::Internal(format!("headers: {e}")))?;
                let inserted = insert.execute(params![
                    client_id,
                    event.id.to_string(),
                    event.seq,
                    event.event_type,
                    event.key,
                    event.payload.get(),
                    headers,
                    event.created_at,
                    received_at,
                ])?;
                let (status, reason) = if inserted == 0 {
                    (ResultStatus::Duplicate, None)
                } else {
                    // A rejection (an `Ok(Reject)` or an error that is one)
                    // undoes this event alone. Any other Err returns early:
                    // dropping `tx` rolls the whole batch back (see the Inbox
                    // contract).
                    let verdict = match self.inbox.apply(&tx, client_id, event) {
                        Ok(applied) => applied,
                        Err(e) => Applied::Reject(classify(e).map_err(Error::Inbox)?),
                    };
                    match verdict {
                        Applied::Accept => (ResultStatus::Accepted, None),
                        Applied::Reject(reason) => {
                            tx.execute_batch("ROLLBACK TO edge_outbox_event")?;
                            (ResultStatus::Rejected, Some(reason))
                        }
                    }
                };
                tx.execute_batch("RELEASE edge_outbox_event")?;
                results.push(EventResult {
                    id: event.id,
                    status,
                    reason,
                });
            }
        }
        tx.commit()?;
        Ok(results)
    }

    fn pull(
        &self,
        after: i64,
        limit: usize,
        client_id: Option<&str>,
    ) -> Result<Vec<ReceivedEvent>, Error> {
        let conn = self.read_conn();
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        // Two statements rather than `(?2 IS NULL OR client_id = ?2)`, which
        // would keep SQLite from using the (client_id, cursor) index.
        let mut stmt = conn.prepare_cached(if client_id.is_some() {
            "SELECT cursor, client_id, id, seq, type, key, payload, headers, created_at, received_at
               FROM edge_outbox_server_events
              WHERE client_id = ?2 AND cursor > ?1
              ORDER BY cursor
              LIMIT ?3"
        } else {
            "SELECT cursor, client_id, id, seq, type, key, payload, headers, created_at, received_at
               FROM edge_outbox_server_events
              WHERE cursor > ?1 AND ?2 IS NULL
              ORDER BY cursor
              LIMIT ?3"
        })?;
        let rows = stmt.query_map(params![after, client_id, limit], |row| {
            Ok((
                row.get::<_, i64>(0)?,
                row.get::<_, String>(1)?,
                row.get::<_, String>(2)?,
                row.get::<_, i64>(3)?,
                row.get::<_, String>(4)?,
                row.get::<_, Option<String>>(5)?,
                row.get::<_, String>(6)?,
                row.get::<_, String>(7)?,
                row.get::<_, String>(8)?,
                row.get::<_, String>(9)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (
                cursor,
                client_id,
                id,
                seq,
                event_type,
                key,
                payload,
                headers,
                created_at,
                received_at,
            ) = row?;
            out.push(
                StoredRow {
                    cursor,
                    client_id,
                    id,
                    seq,
                    event_type,
                    key,
                    payload,
                    headers,
                    created_at,
                    received_at,
                }
                .decode()?,
            );
        }
        Ok(out)
    }

    fn count(&self, client_id: Option<&str>) -> Result<u64, Error> {
        let conn = self.read_conn();
        let n: Option<i64> = conn
            .query_row(
                "SELECT COUNT(*) FROM edge_outbox_server_events
                  WHERE (?1 IS NULL OR client_id = ?1)",
                params![client_id],
                |row| row.get(0),
            )
            .optional()?;
        Ok(n.unwrap_or(0).max(0) as u64)
    }
}
