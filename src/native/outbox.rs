//! The native facade: open an outbox inside the app's SQLite file and commit
//! the app's rows and their events in one transaction.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rusqlite::{Connection, TransactionBehavior};
use tokio::sync::Notify;

use super::lease::RelayLease;
use super::sqlite::{DEFAULT_BUSY_TIMEOUT, Inner, SqliteStore};
use crate::error::{Error, Result};
use crate::event::{DEFAULT_MAX_EVENT_BYTES, Event, EventId, NewEvent};
use crate::store::Stats;
use crate::time::Timestamp;

/// How hard a commit tries to survive a power loss.
///
/// Both modes are crash-consistent: after any crash the database holds a
/// prefix of the committed transactions, the app's rows always together with
/// their events. They differ only in what a power loss (or OS crash) may undo.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Durability {
    /// `PRAGMA synchronous = NORMAL` in WAL mode: no fsync per commit. A power
    /// loss may roll back the last few commits (app rows and their events
    /// together); an application crash loses nothing. Several times faster.
    #[default]
    Normal,
    /// `PRAGMA synchronous = FULL`: every commit is fsynced before
    /// `transaction` returns, so a commit that returned survives power loss.
    Full,
}

/// Settings for [`Outbox::open`].
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Config {
    /// The sync endpoint the relay posts to (e.g. `https://api.example.com/v1/events`).
    pub endpoint: String,
    /// Commit durability (applies to the whole connection, hence to the app's
    /// own writes through [`Outbox::transaction`] too).
    pub durability: Durability,
    /// How long a writer waits for another writer (thread or process) before
    /// [`Error::Busy`].
    pub busy_timeout: Duration,
    /// Largest accepted event (type + key + payload + headers), in bytes.
    pub max_event_bytes: usize,
}

impl Config {
    /// Defaults for an outbox that syncs to `endpoint`.
    pub fn new(endpoint: impl Into<String>) -> Self {
        Config {
            endpoint: endpoint.into(),
            durability: Durability::Normal,
            busy_timeout: DEFAULT_BUSY_TIMEOUT,
            max_event_bytes: DEFAULT_MAX_EVENT_BYTES,
        }
    }

    /// Set the durability mode.
    pub fn durability(mut self, durability: Durability) -> Self {
        self.durability = durability;
        self
    }

    /// Set the busy timeout.
    pub fn busy_timeout(mut self, timeout: Duration) -> Self {
        self.busy_timeout = timeout;
        self
    }

    /// Set the event size limit in bytes.
    pub fn max_event_bytes(mut self, bytes: usize) -> Self {
        self.max_event_bytes = bytes;
        self
    }
}

/// A transactional outbox kept in an SQLite file.
///
/// Cheap to clone, `Send + Sync`: clones share one connection, and commits
/// from many threads are serialized without "database is locked" errors.
/// Other processes may open the same file; SQLite's write lock plus the busy
/// timeout order their commits.
#[derive(Clone, Debug)]
pub struct Outbox {
    store: SqliteStore,
}

impl Outbox {
    /// Open the outbox in the SQLite file at `path` (created if missing),
    /// creating or migrating its `edge_outbox_*` tables, switching the file to
    /// WAL mode and making a client id at first open.
    ///
    /// `path` may also be an SQLite URI (`file:app.db?mode=ro`).
    ///
    /// Errors: [`Error::NotADatabase`], [`Error::SchemaTooNew`] and
    /// [`Error::ReadOnly`] leave the file untouched.
    pub fn open(path: impl AsRef<Path>, config: Config) -> Result<Outbox> {
        let path = path.as_ref().to_string_lossy().into_owned();
        if config.max_event_bytes == 0 {
            return Err(Error::InvalidConfig {
                reason: "max_event_bytes must be greater than zero".into(),
            });
        }
        let inner = Inner::open(&path, &config)?;
        Ok(Outbox {
            store: SqliteStore {
                inner: Arc::new(inner),
            },
        })
    }

    /// Run `f` in one SQLite transaction: the app's statements (`tx.execute`,
    /// `tx.query_row`, ... through [`OutboxTx`]'s `Deref` to
    /// [`rusqlite::Transaction`]) and the events it enqueues commit together,
    /// or not at all.
    ///
    /// An `Err` from `f`, a failed statement propagated with `?`, or a panic
    /// rolls everything back; the panic then continues. On success the
    /// closure's value is returned after the commit.
    pub fn transaction<T>(&self, f: impl FnOnce(&mut OutboxTx<'_>) -> Result<T>) -> Result<T> {
        let inner = &self.store.inner;
        let mut conn = inner.lock();
        // IMMEDIATE takes the write lock up front, so the busy timeout covers
        // contention with other processes instead of failing on lock upgrade.
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| inner.map(e))?;
        let mut otx = OutboxTx {
            tx,
            inner,
            enqueued: 0,
        };
        // On `Err` or panic `otx.tx` is dropped here, which rolls back.
        let value = f(&mut otx)?;
        let enqueued = otx.enqueued;
        otx.tx.commit().map_err(|e| inner.map(e))?;
        if enqueued > 0 {
            inner.commits.notify_one();
        }
        Ok(value)
    }

    /// Enqueue events on their own (no app state) in one transaction.
    pub fn enqueue(&self, events: impl IntoIterator<Item = NewEvent>) -> Result<Vec<Event>> {
        let events: Vec<NewEvent> = events.into_iter().collect();
        self.store.inner.enqueue(events)
    }

    /// Enqueue `event` inside a transaction the app opened on its own
    /// rusqlite connection to the same file (a `Transaction` or a `Savepoint`,
    /// both deref to `Connection`). The event commits or rolls back with it.
    ///
    /// Open that transaction with
    /// `conn.transaction_with_behavior(TransactionBehavior::Immediate)`.
    /// rusqlite's `conn.transaction()` is DEFERRED: it starts as a reader,
    /// and if another connection (the relay recording what it delivered, any
    /// other writer) commits between its first read and its first write,
    /// SQLite refuses the write at once, whatever the busy timeout: this
    /// returns [`Error::SnapshotConflict`] (or [`Error::Busy`] if the other
    /// writer is still writing), and the whole transaction must be rolled
    /// back and run again. IMMEDIATE takes the write lock at `BEGIN`,
    /// waiting for it up to the connection's busy timeout, so it never fails
    /// that way.
    ///
    /// ```no_run
    /// # fn demo(outbox: &edge_outbox::Outbox, conn: &mut rusqlite::Connection) -> edge_outbox::Result<()> {
    /// use rusqlite::TransactionBehavior;
    /// let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    /// let total: i64 = tx.query_row("SELECT count(*) FROM orders", [], |r| r.get(0))?;
    /// tx.execute("INSERT INTO orders (id, amount) VALUES (?1, 250)", [total + 1])?;
    /// outbox.enqueue_in(&tx, edge_outbox::NewEvent::json("OrderCreated", &total)?)?;
    /// tx.commit()?;
    /// outbox.notify();
    /// # Ok(()) }
    /// ```
    ///
    /// The outbox tables must exist in that file (open it with
    /// [`Outbox::open`] first). Since the commit happens in the app's code,
    /// call [`Outbox::notify`] after it to wake the relay at once; otherwise
    /// the relay notices on its next poll.
    pub fn enqueue_in(&self, conn: &Connection, event: NewEvent) -> Result<EventId> {
        if conn.is_autocommit() {
            return Err(Error::InvalidConfig {
                reason: "enqueue_in needs an open transaction or savepoint; pass &tx from \
                         conn.transaction_with_behavior(TransactionBehavior::Immediate)"
                    .into(),
            });
        }
        Ok(self.store.inner.insert(conn, &event)?.1)
    }

    /// Wake the relay: events were committed outside [`Outbox::transaction`].
    pub fn notify(&self) {
        self.store.inner.commits.notify_one();
    }

    /// The client id: a UUID made at first open, stored in the file.
    pub fn client_id(&self) -> &str {
        &self.store.inner.client_id
    }

    /// The database path (or URI) this outbox was opened with.
    pub fn path(&self) -> &str {
        &self.store.inner.path
    }

    /// Who holds the relay lease of this file (the one relay, in any
    /// process, that may send), or last held it, without taking it. For
    /// support tools (the inspector's `status`); a relay needs none of it.
    ///
    /// Errors: [`Error::Storage`] when the lease's lock file
    /// (`<database>-outbox.lock`) exists but cannot be opened or locked.
    pub fn relay_lease(&self) -> Result<RelayLease> {
        let database = self.store.inner.lock().path().map(str::to_owned);
        super::lease::probe(database.as_deref())
    }

    /// The [`Store`](crate::Store) behind this outbox, for the relay.
    pub fn store(&self) -> &SqliteStore {
        &self.store
    }

    /// The signal the relay waits on: notified after each commit with events.
    pub fn commit_notify(&self) -> Arc<Notify> {
        self.store.inner.commits.clone()
    }

    /// Counts of pending, sent and dead events, and when the oldest pending
    /// one was committed.
    pub fn stats(&self) -> Result<Stats> {
        self.store.inner.stats()
    }

    /// Up to `limit` pending events, oldest first.
    pub fn pending(&self, limit: usize) -> Result<Vec<Event>> {
        self.store.inner.pending_list(limit)
    }

    /// Every dead event (rejected, expired or too large), oldest first.
    pub fn dead_letters(&self) -> Result<Vec<Event>> {
        self.store.inner.dead_list(usize::MAX)
    }

    /// One event by id.
    pub fn get(&self, id: EventId) -> Result<Option<Event>> {
        self.store.inner.get(id)
    }

    /// Make a dead event pending again (attempts reset, `retried_at` set to
    /// now, from which the retry policy's max age counts again). It keeps its
    /// `seq`, so it reaches the server after events committed later that
    /// were delivered meanwhile. Returns false when no dead event has this id.
    ///
    /// Cost: one write transaction that also writes the sent state into the
    /// row of every event delivered since this one and not yet pruned (the
    /// relay records delivered batches without rewriting their rows: see
    /// the README, "The SQLite schema"), about 1 µs each; pruning sent
    /// events keeps it small.
    pub fn retry(&self, id: EventId) -> Result<bool> {
        self.store.inner.retry(id, Timestamp::now())
    }

    /// The app's "try now": every pending event waiting for its retry time
    /// (a backoff after a failure, a server's `Retry-After`) becomes due now,
    /// and the relay is woken, so its next flush sends them. Attempts, errors
    /// and order are kept. Call it when the app knows the backend is back (a
    /// user's "retry" button, a push notification). Returns how many pending
    /// events were waiting.
    pub fn retry_now(&self) -> Result<u64> {
        self.store.inner.retry_now(Timestamp::now())
    }

    /// Delete a dead event for good. Returns false when no dead event has this id.
    pub fn discard(&self, id: EventId) -> Result<bool> {
        self.store.inner.discard(id)
    }

    /// Delete sent events acknowledged more than `older_than` ago. Returns how many.
    pub fn prune_sent(&self, older_than: Duration) -> Result<u64> {
        self.store
            .inner
            .prune_sent(Timestamp::now().sub(older_than))
    }
}

/// The transaction handed to [`Outbox::transaction`]'s closure.
///
/// Derefs to [`rusqlite::Transaction`], so the app's own SQL runs on it
/// directly; [`OutboxTx::enqueue`] adds events to the same transaction.
pub struct OutboxTx<'a> {
    tx: rusqlite::Transaction<'a>,
    inner: &'a Inner,
    enqueued: usize,
}

impl OutboxTx<'_> {
    /// Add an event to this transaction. It is validated first; an invalid
    /// event returns an error, and propagating it with `?` rolls back the
    /// whole transaction.
    pub fn enqueue(&mut self, event: NewEvent) -> Result<EventId> {
        let (_, id, _) = self.inner.insert(&self.tx, &event)?;
        self.enqueued += 1;
        Ok(id)
    }
}

impl<'a> std::ops::Deref for OutboxTx<'a> {
    type Target = rusqlite::Transaction<'a>;
    fn deref(&self) -> &Self::Target {
        &self.tx
    }
}
