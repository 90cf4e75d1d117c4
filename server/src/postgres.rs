//! [`PgStore`]: the [`EventStore`] on PostgreSQL, for several stateless
//! server instances behind a load balancer, all on one database.
//!
//! The store's answers to the [`EventStore`] contract:
//! - one batch is one transaction (`READ COMMITTED`), on a pooled connection;
//! - the dedupe record is a row of `edge_outbox_server_dedupe`, primary key
//!   `(client_id, id)`, inserted for the whole batch by one statement before
//!   any effect runs. Two instances inserting the same key at once: the
//!   second waits on the first's row until it commits (then `DO NOTHING`:
//!   `duplicate`) or rolls back (then it inserts: `accepted`). Exactly one
//!   of them applies the effect;
//! - a [`PgInbox`] applies each new event in the same transaction, in a
//!   savepoint, so a rejection undoes that event's writes and dedupe record;
//! - cursors are assigned last, right before the commit, from a one-row
//!   counter table (`UPDATE ... RETURNING`): the row lock is held until the
//!   commit, so batches that add events take their cursors one after the
//!   other, in commit order, across every instance. A reader that sees
//!   cursor `c` therefore sees every cursor below `c`: `GET /v1/events`
//!   never skips an event that committed late. (A `BIGSERIAL` would not do:
//!   a value is taken at insert and becomes visible at commit, so a reader
//!   can see 8 before 7 and page past 7 for good.) The price is that
//!   commits carrying new events are serialized, one lock hold = one commit
//!   round trip; batches of many events amortize it (see BENCHMARKS.md);
//! - schema creation and migration run at start under a transaction-level
//!   advisory lock, so N instances starting at the same moment migrate once.
//!
//! The [`EventStore`] methods block (the HTTP layer calls them from
//! `spawn_blocking`); they drive the async client on the runtime the store
//! was opened on. From async code call the `*_async` methods instead.

use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use edge_outbox::Timestamp;
use edge_outbox::protocol::{EventResult, ReceivedEvent, ResultStatus, WireEvent};
use tokio_postgres::NoTls;

use crate::Error;
use crate::inbox::{Applied, PgInbox, classify};
use crate::store::{EventStore, StoredRow};

/// Schema version this build writes (in `edge_outbox_server_meta`).
pub const PG_SCHEMA_VERSION: i64 = 1;

/// Key of the advisory lock that serializes migrations (any constant that
/// other software on the same database is unlikely to use).
const MIGRATION_LOCK: i64 = 0x6564_6765_6f75_7462; // "edgeoutb"

/// Version 1 of the schema.
const SCHEMA_V1: &str = "
CREATE TABLE edge_outbox_server_dedupe (
    client_id TEXT NOT NULL,
    id        TEXT NOT NULL,
    PRIMARY KEY (client_id, id)
);
CREATE TABLE edge_outbox_server_events (
    cursor      BIGINT PRIMARY KEY,
    client_id   TEXT NOT NULL,
    id          TEXT NOT NULL,
    seq         BIGINT NOT NULL,
    type        TEXT NOT NULL,
    key         TEXT,
    payload     TEXT NOT NULL,
    headers     TEXT NOT NULL,
    created_at  TEXT NOT NULL,
    received_at TEXT NOT NULL
);
CREATE INDEX edge_outbox_server_events_by_client
    ON edge_outbox_server_events (client_id, cursor);
CREATE TABLE edge_outbox_server_cursor (
    one  BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (one),
    last BIGINT NOT NULL
);
INSERT INTO edge_outbox_server_cursor (one, last) VALUES (TRUE, 0);
";

/// Default number of pooled connections per server instance.
pub const DEFAULT_POOL_SIZE: usize = 16;

/// How long a push waits for a pooled connection (or a new one) before it
/// is answered `500` (the client retries later).
const POOL_WAIT: Duration = Duration::from_secs(10);

/// [`EventStore`] on PostgreSQL, with a [`PgInbox`] applied in the same
/// transaction as each event's dedupe record.
pub struct PgStore {
    pool: Pool,
    inbox: Option<Arc<dyn PgInbox>>,
    runtime: tokio::runtime::Handle,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("pool", &self.pool.status())
            .finish_non_exhaustive()
    }
}

impl From<tokio_postgres::Error> for Error {
    fn from(e: tokio_postgres::Error) -> Self {
        Error::Postgres(e.to_string())
    }
}

impl From<deadpool_postgres::PoolError> for Error {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        Error::Postgres(format!("connection pool: {e}"))
    }
}

impl PgStore {
    /// Connect to `url` (`postgres://USER@HOST:PORT/DB`, any form
    /// `tokio_postgres::Config` parses) with up to `pool_size` connections,
    /// create or migrate the schema, and run `inbox`'s `migrate` (`None`:
    /// store events only). Must be called within a tokio runtime, which the
    /// blocking [`EventStore`] methods then use.
    pub async fn open(
        url: &str,
        pool_size: usize,
        inbox: Option<Arc<dyn PgInbox>>,
    ) -> Result<Self, Error> {
        let config: tokio_postgres::Config = url
            .parse()
            .map_err(|e| Error::Config(format!("database URL: {e}")))?;
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                // Checks only that the connection is open: a connection
                // PostgreSQL closed (a restart) is replaced, not handed out.
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(pool_size.max(1))
            .wait_timeout(Some(POOL_WAIT))
            .create_timeout(Some(POOL_WAIT))
            .recycle_timeout(Some(POOL_WAIT))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| Error::Config(format!("connection pool: {e}")))?;
        let store = PgStore {
            pool,
            inbox,
            runtime: tokio::runtime::Handle::current(),
        };
        store.migrate().await?;
        Ok(store)
    }

    /// The connection pool (for an app's own queries, or to watch its status).
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Create the schema, or bring it to [`PG_SCHEMA_VERSION`], under an
    /// advisory lock (instances starting at once wait for each other).
    async fn migrate(&self) -> Result<(), Error> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS edge_outbox_server_meta (
                 key   TEXT PRIMARY KEY,
                 value TEXT NOT NULL
             )",
        )
        .await?;
        let version: i64 = match tx
            .query_opt(
                "SELECT value FROM edge_outbox_server_meta WHERE key = 'schema_version'",
                &[],
            )
            .await?
        {
            None => 0,
            Some(row) => {
                let v: String = row.get(0);
                v.parse()
                    .map_err(|_| Error::Internal(format!("schema_version {v:?} is not a number")))?
            }
        };
        if version > PG_SCHEMA_VERSION {
            return Err(Error::Config(format!(
                "the database has schema version {version}, newer than this server's \
                 {PG_SCHEMA_VERSION}: upgrade the server"
            )));
        }
        if version < 1 {
            tx.batch_execute(SCHEMA_V1).await?;
        }
        // Later versions: `if version < 2 { ... }`, each step in this transaction.
        tx.execute(
            "INSERT INTO edge_outbox_server_meta (key, value) VALUES ('schema_version', $1)
             ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
            &[&PG_SCHEMA_VERSION.to_string()],
        )
        .await?;
        if let Some(inbox) = &self.inbox {
            inbox.migrate(&tx).await.map_err(Error::Inbox)?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// [`EventStore::push`], from async code.
    pub async fn push_async(
        &self,
        client_id: &str,
        events: &[&WireEvent],
    ) -> Result<Vec<EventResult>, Error> {
        // Within the batch, a second copy of an id is a duplicate of the
        // first: only first copies go to the database.
        let mut first_copy = Vec::with_capacity(events.len());
        {
            let mut seen = std::collections::HashSet::with_capacity(events.len());
            for event in events {
                first_copy.push(seen.insert(event.id));
            }
        }
        let ids: Vec<String> = events
            .iter()
            .zip(&first_copy)
            .filter(|(_, first)| **first)
            .map(|(e, _)| e.id.to_string())
            .collect();

        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        // One statement for the whole batch: the ids it returns are new.
        let insert = tx
            .prepare_cached(
                "INSERT INTO edge_outbox_server_dedupe (client_id, id)
                 SELECT $1, id FROM unnest($2::text[]) AS t(id)
                 ON CONFLICT (client_id, id) DO NOTHING
                 RETURNING id",
            )
            .await?;
        let new: std::collections::HashSet<String> = tx
            .query(&insert, &[&client_id, &ids])
            .await?
            .into_iter()
            .map(|row| row.get(0))
            .collect();

        let mut results = Vec::with_capacity(events.len());
        let mut accepted: Vec<&WireEvent> = Vec::with_capacity(new.len());
        for (event, first) in events.iter().zip(first_copy) {
            let id = event.id.to_string();
            if !first {
                // A second copy in one batch: answered like the first one
                // (`duplicate` after an acceptance; the same rejection after
                // a rejection, which left no dedupe record to be a duplicate of).
                let earlier = results
                    .iter()
                    .find(|r: &&EventResult| r.id == event.id)
                    .cloned()
                    .ok_or_else(|| Error::Internal("a second copy without a first".into()))?;
                results.push(match earlier.status {
                    ResultStatus::Rejected => earlier,
                    _ => EventResult {
                        id: event.id,
                        status: ResultStatus::Duplicate,
                        reason: None,
                    },
                });
                continue;
            }
            if !new.contains(&id) {
                results.push(EventResult {
                    id: event.id,
                    status: ResultStatus::Duplicate,
                    reason: None,
                });
                continue;
            }
            let (status, reason) = match &self.inbox {
                None => (ResultStatus::Accepted, None),
                Some(inbox) => {
                    tx.batch_execute("SAVEPOINT edge_outbox_event").await?;
                    let verdict = match inbox.apply(&tx, client_id, event).await {
                        Ok(applied) => applied,
                        Err(e) => Applied::Reject(classify(e).map_err(Error::Inbox)?),
                    };
                    match verdict {
                        Applied::Accept => {
                            tx.batch_execute("RELEASE edge_outbox_event").await?;
                            (ResultStatus::Accepted, None)
                        }
                        Applied::Reject(reason) => {
                            tx.batch_execute("ROLLBACK TO edge_outbox_event").await?;
                            // No dedupe record for a rejected event: a resend is judged again.
                            tx.execute(
                                "DELETE FROM edge_outbox_server_dedupe
                                  WHERE client_id = $1 AND id = $2",
                                &[&client_id, &id],
                            )
                            .await?;
                            tx.batch_execute("RELEASE edge_outbox_event").await?;
                            (ResultStatus::Rejected, Some(reason))
                        }
                    }
                }
            };
            if status == ResultStatus::Accepted {
                accepted.push(event);
            }
            results.push(EventResult {
                id: event.id,
                status,
                reason,
            });
        }

        if !accepted.is_empty() {
            // Cursors last: the counter row's lock is held until the commit,
            // so cursors are handed out in commit order (see the module docs).
            let n = accepted.len() as i64;
            let received_at = Timestamp::now().to_rfc3339();
            let mut ids = Vec::with_capacity(accepted.len());
            let mut seqs = Vec::with_capacity(accepted.len());
            let mut types = Vec::with_capacity(accepted.len());
            let mut keys = Vec::with_capacity(accepted.len());
            let mut payloads = Vec::with_capacity(accepted.len());
            let mut headers = Vec::with_capacity(accepted.len());
            let mut created = Vec::with_capacity(accepted.len());
            for e in &accepted {
                ids.push(e.id.to_string());
                seqs.push(e.seq);
                types.push(e.event_type.as_str());
                keys.push(e.key.as_deref());
                payloads.push(e.payload.get());
                headers.push(
                    serde_json::to_string(&e.headers)
                        .map_err(|e| Error::Internal(format!("headers: {e}")))?,
                );
                created.push(e.created_at.as_str());
            }
            let store = tx
                .prepare_cached(
                    "WITH c AS (
                         UPDATE edge_outbox_server_cursor SET last = last + $1 RETURNING last
                     )
                     INSERT INTO edge_outbox_server_events
                       (cursor, client_id, id, seq, type, key, payload, headers, created_at, received_at)
                     SELECT c.last - $1 + t.n, $2, t.id, t.seq, t.type, t.key, t.payload, t.headers,
                            t.created_at, $3
                       FROM c, unnest($4::text[], $5::bigint[], $6::text[], $7::text[], $8::text[],
                                      $9::text[], $10::text[])
                            WITH ORDINALITY AS t(id, seq, type, key, payload, headers, created_at, n)",
                )
                .await?;
            tx.execute(
                &store,
                &[
                    &n,
                    &client_id,
                    &received_at,
                    &ids,
                    &seqs,
                    &types,
                    &keys,
                    &payloads,
                    &headers,
                    &created,
                ],
            )
            .await?;
        }
        tx.commit().await.map_err(|e| {
            // The connection broke during COMMIT: the batch may be stored or
            // not. The client's resend finds out (`duplicate` or `accepted`).
            Error::Postgres(format!("commit not confirmed (a resend is safe): {e}"))
        })?;
        Ok(results)
    }

    /// [`EventStore::pull`], from async code.
    pub async fn pull_async(
        &self,
        after: i64,
        limit: usize,
        client_id: Option<&str>,
    ) -> Result<Vec<ReceivedEvent>, Error> {
        let client = self.pool.get().await?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = match client_id {
            Some(client_id) => {
                let stmt = client
                    .prepare_cached(
                        "SELECT cursor, client_id, id, seq, type, key, payload, headers,
                                created_at, received_at
                           FROM edge_outbox_server_events
                          WHERE client_id = $3 AND cursor > $1
                          ORDER BY cursor
                          LIMIT $2",
                    )
                    .await?;
                client.query(&stmt, &[&after, &limit, &client_id]).await?
            }
            None => {
                let stmt = client
                    .prepare_cached(
                        "SELECT cursor, client_id, id, seq, type, key, payload, headers,
                                created_at, received_at
                           FROM edge_outbox_server_events
                          WHERE cursor > $1
                          ORDER BY cursor
                          LIMIT $2",
                    )
                    .await?;
                client.query(&stmt, &[&after, &limit]).await?
            }
        };
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            out.push(
                StoredRow {
                    cursor: row.get(0),
                    client_id: row.get(1),
                    id: row.get(2),
                    seq: row.get(3),
                    event_type: row.get(4),
                    key: row.get(5),
                    payload: row.get(6),
                    headers: row.get(7),
                    created_at: row.get(8),
                    received_at: row.get(9),
                }
                .decode()?,
            );
        }
        Ok(out)
    }

    /// [`EventStore::count`], from async code.
    pub async fn count_async(&self, client_id: Option<&str>) -> Result<u64, Error> {
        let client = self.pool.get().await?;
        let n: i64 = client
            .query_one(
                "SELECT COUNT(*) FROM edge_outbox_server_events
                  WHERE ($1::text IS NULL OR client_id = $1)",
                &[&client_id],
            )
            .await?
            .get(0);
        Ok(n.max(0) as u64)
    }
}

impl EventStore for PgStore {
    fn push(&self, client_id: &str, events: &[&WireEvent]) -> Result<Vec<EventResult>, Error> {
        self.runtime.block_on(self.push_async(client_id, events))
    }

    fn pull(
        &self,
        after: i64,
        limit: usize,
        client_id: Option<&str>,
    ) -> Result<Vec<ReceivedEvent>, Error> {
        self.runtime
            .block_on(self.pull_async(after, limit, client_id))
    }

    fn count(&self, client_id: Option<&str>) -> Result<u64, Error> {
        self.runtime.block_on(self.count_async(client_id))
    }
}
