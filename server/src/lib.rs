//! Reference sync server for edge-outbox: receives the events that outboxes
//! push (sync protocol v1, `docs/protocol.md`), exactly once in effect.
//!
//! It is a binary (`edge-outbox-server --help`) and a library:
//!
//! - [`router`] gives the axum [`Router`](axum::Router) to mount in your own app;
//! - [`serve`] runs it on a listener with graceful shutdown;
//! - [`spawn`] runs it in-process on `127.0.0.1:0` for tests and demos, with
//!   fault injection ([`Faults`]) and inspection of what arrived;
//! - an [`Inbox`] (SQLite) or a [`PgInbox`] (PostgreSQL) applies each event
//!   to your own tables inside the same database transaction as the event's
//!   dedupe record; it rejects an event it can never apply (a [`Rejection`],
//!   e.g. from [`decode_payload`]) apart from failing the whole batch for
//!   later (any other error: `500`).
//!
//! ```no_run
//! # async fn demo() -> Result<(), edge_outbox_server::Error> {
//! use edge_outbox_server::{Failure, ServerConfig};
//!
//! let server = edge_outbox_server::spawn(ServerConfig::in_memory().allow_anonymous(true)).await?;
//! println!("push to {}", server.events_url());
//! server.faults().fail_next(2, Failure::status(503).retry_after(1));
//! // ... run a relay against it ...
//! let received = server.events("my-client-id")?;
//! server.shutdown().await?;
//! # Ok(()) }
//! ```
//!
//! Storage sits behind the [`EventStore`] trait: SQLite ([`SqliteStore`],
//! the default: one instance) or PostgreSQL ([`PgStore`],
//! [`ServerConfig::postgres`]: several stateless instances behind a load
//! balancer, all on one database).
#![warn(missing_docs)]

use std::collections::HashMap;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use edge_outbox::protocol::ReceivedEvent;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub mod auth;
pub mod check;
mod faults;
#[doc(hidden)]
pub mod fuzzing;
mod http;
mod inbox;
mod listener;
pub mod logging;
mod metrics;
mod postgres;
mod ratelimit;
mod store;
pub mod text;

pub use faults::{Failure, Faults, RequestRecord};
pub use http::{AppState, BODY_MIN_RATE, DEFAULT_BODY_TIMEOUT, PULL_PAGE_BYTES, router};
pub use inbox::{
    Applied, BoxError, Inbox, InboxFuture, PgInbox, Rejection, StoreOnly, decode_payload,
};
pub use listener::{DEFAULT_HEADER_TIMEOUT, DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_CONNECTIONS};
pub use postgres::{DEFAULT_POOL_SIZE, PG_SCHEMA_VERSION, PgStore};
pub use ratelimit::{DEFAULT_RATE_BURST, DEFAULT_RATE_PER_SECOND, RateLimit};
pub use store::{EventStore, SqliteStore};

/// Default limit on a push body, after gzip inflation: 4 MiB.
pub const DEFAULT_BODY_LIMIT: usize = 4 * 1024 * 1024;

/// Errors of the server library.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The SQLite database failed.
    #[error("database: {0}")]
    Database(#[from] rusqlite::Error),
    /// PostgreSQL failed, or no pooled connection could be had in time.
    #[error("postgres: {0}")]
    Postgres(String),
    /// An [`Inbox`] failed: its `migrate`, or its `apply` with an error that
    /// is not a [`Rejection`] ("try later": the whole batch is rolled back).
    #[error("inbox: {0}")]
    Inbox(BoxError),
    /// Binding or serving failed.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// The configuration is unusable (e.g. a CORS origin that is not a header value).
    #[error("config: {0}")]
    Config(String),
    /// A stored value could not be read back, or another internal failure.
    #[error("internal: {0}")]
    Internal(String),
}

/// Where a server keeps its events.
#[derive(Clone)]
pub(crate) enum Database {
    File(PathBuf),
    InMemory,
    Postgres { url: String, pool_size: usize },
    Custom(Arc<dyn EventStore>),
}

/// Configuration of a server, built with chained setters.
///
/// ```
/// use edge_outbox_server::ServerConfig;
/// let config = ServerConfig::new("events.db")
///     .token("s3cret", "0192f0c1-7c1e-7000-8000-000000000001")
///     .body_limit(1 << 20);
/// ```
#[derive(Clone)]
pub struct ServerConfig {
    pub(crate) listen: SocketAddr,
    pub(crate) database: Database,
    pub(crate) tokens: HashMap<String, String>,
    pub(crate) reader_tokens: Vec<String>,
    pub(crate) jwt: Option<auth::Jwt>,
    pub(crate) rate_limit: Option<RateLimit>,
    pub(crate) allow_anonymous: bool,
    pub(crate) body_limit: usize,
    pub(crate) body_timeout: Duration,
    pub(crate) max_event_bytes: usize,
    pub(crate) static_dir: Option<PathBuf>,
    pub(crate) cors_origins: Vec<String>,
    pub(crate) test_controls: bool,
    pub(crate) inbox: Option<Arc<dyn Inbox>>,
    pub(crate) pg_inbox: Option<Arc<dyn PgInbox>>,
    pub(crate) limits: listener::Limits,
    pub(crate) tls: Option<listener::Tls>,
}

impl std::fmt::Debug for ServerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Tokens are credentials: show how many, never which.
        f.debug_struct("ServerConfig")
            .field("listen", &self.listen)
            .field("tokens", &self.tokens.len())
            .field("reader_tokens", &self.reader_tokens.len())
            .field("jwt", &self.jwt)
            .field("rate_limit", &self.rate_limit)
            .field("allow_anonymous", &self.allow_anonymous)
            .field("body_limit", &self.body_limit)
            .field("static_dir", &self.static_dir)
            .field("cors_origins", &self.cors_origins)
            .field("test_controls", &self.test_controls)
            .field("limits", &self.limits)
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

impl ServerConfig {
    fn with_database(database: Database) -> Self {
        ServerConfig {
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            database,
            tokens: HashMap::new(),
            reader_tokens: Vec::new(),
            jwt: None,
            rate_limit: Some(RateLimit::default()),
            allow_anonymous: false,
            body_limit: DEFAULT_BODY_LIMIT,
            body_timeout: DEFAULT_BODY_TIMEOUT,
            max_event_bytes: edge_outbox::DEFAULT_MAX_EVENT_BYTES,
            static_dir: None,
            cors_origins: Vec::new(),
            test_controls: false,
            inbox: None,
            pg_inbox: None,
            limits: listener::Limits::default(),
            tls: None,
        }
    }

    /// Events in the SQLite file at `path` (created if missing, WAL mode).
    /// Listens on `127.0.0.1:0` (an ephemeral port) unless [`listen`](Self::listen) says otherwise.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self::with_database(Database::File(path.into()))
    }

    /// Events in a private in-memory SQLite database, gone with the server.
    pub fn in_memory() -> Self {
        Self::with_database(Database::InMemory)
    }

    /// Events in PostgreSQL at `url` (`postgres://USER@HOST:PORT/DB`), so
    /// that several server instances can share them. Tables are created or
    /// migrated at start (safe when instances start at the same moment).
    /// Set the effect with [`pg_inbox`](Self::pg_inbox), the pool size with
    /// [`pool_size`](Self::pool_size). Only [`spawn`], [`serve`] and
    /// [`AppState::open`] can open it (connecting is async).
    pub fn postgres(url: impl Into<String>) -> Self {
        Self::with_database(Database::Postgres {
            url: url.into(),
            pool_size: DEFAULT_POOL_SIZE,
        })
    }

    /// Connections in this instance's PostgreSQL pool (default
    /// [`DEFAULT_POOL_SIZE`]); ignored on SQLite.
    pub fn pool_size(mut self, n: usize) -> Self {
        if let Database::Postgres { pool_size, .. } = &mut self.database {
            *pool_size = n.max(1);
        }
        self
    }

    /// Events in a store of your own (the [`Inbox`] setting is then unused:
    /// the store applies events itself).
    pub fn with_store(store: Arc<dyn EventStore>) -> Self {
        Self::with_database(Database::Custom(store))
    }

    /// Address to bind (used by [`spawn`] and the binary; [`serve`] takes a bound listener).
    pub fn listen(mut self, addr: SocketAddr) -> Self {
        self.listen = addr;
        self
    }

    /// Accept bearer `token` for pushes of `client_id` and for reads of
    /// that client's own stream (never another's). Repeatable.
    pub fn token(mut self, token: impl Into<String>, client_id: impl Into<String>) -> Self {
        self.tokens.insert(token.into(), client_id.into());
        self
    }

    /// Accept bearer `token` for reads of every client's stream
    /// (`GET /v1/events`), for backends. It may not push. Repeatable.
    pub fn reader_token(mut self, token: impl Into<String>) -> Self {
        self.reader_tokens.push(token.into());
        self
    }

    /// Accept JWTs verified by `jwt` (see [`auth::Jwt`] for the claims),
    /// besides the static tokens.
    pub fn jwt(mut self, jwt: auth::Jwt) -> Self {
        self.jwt = Some(jwt);
        self
    }

    /// Push rate limit per client (default [`RateLimit::default`]: 100/s,
    /// burst 200); `None` turns it off. Over it a push gets `429` with `Retry-After`.
    pub fn rate_limit(mut self, limit: Option<RateLimit>) -> Self {
        self.rate_limit = limit;
        self
    }

    /// Accept pushes for any client id, and reads of every stream, without a
    /// token. Local development only. A request that does present a token
    /// still needs a valid one (and gets only that token's rights).
    pub fn allow_anonymous(mut self, yes: bool) -> Self {
        self.allow_anonymous = yes;
        self
    }

    /// Largest push body in bytes, after gzip inflation (default [`DEFAULT_BODY_LIMIT`]); larger ones get 413.
    pub fn body_limit(mut self, bytes: usize) -> Self {
        self.body_limit = bytes;
        self
    }

    /// Base time a push body may take to arrive (default
    /// [`DEFAULT_BODY_TIMEOUT`], 30 s): the whole body must be read within
    /// this plus 1 s per [`BODY_MIN_RATE`] bytes received (1 KiB/s). A body
    /// that falls behind is answered `408` and its connection closed, so a
    /// client dribbling a body cannot hold a connection (the header and
    /// idle timeouts do not run while a request is answered). A body of a
    /// push refused from its head (`401`, `403`, `429`) is drained for at
    /// most 10 s (or this, if shorter).
    pub fn body_timeout(mut self, timeout: Duration) -> Self {
        self.body_timeout = timeout;
        self
    }

    /// Largest event accepted, in bytes, measured as the client's
    /// `max_event_bytes` is (type + key + payload + headers; default
    /// [`edge_outbox::DEFAULT_MAX_EVENT_BYTES`], 256 KiB, the client's
    /// default). A larger event is answered `rejected` (the rest of its
    /// batch goes on): raise this with the clients' limit. It bounds what one
    /// stored event costs every reader that pulls it.
    pub fn max_event_bytes(mut self, bytes: usize) -> Self {
        self.max_event_bytes = bytes;
        self
    }

    /// Serve the files of `dir` at `/` (the demo web app), behind the API routes.
    pub fn static_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.static_dir = Some(dir.into());
        self
    }

    /// Let web pages from `origin` (e.g. `http://127.0.0.1:5173`, or `*` for
    /// any) call the API and the test controls from the browser: answers CORS
    /// preflights, allows the `Authorization`, `Content-Type` and
    /// `Content-Encoding` request headers, and exposes `Retry-After` and
    /// `WWW-Authenticate` to scripts (a relay needs `Retry-After`).
    /// Repeatable. Not needed when the app is served by [`static_dir`](Self::static_dir).
    pub fn cors_origin(mut self, origin: impl Into<String>) -> Self {
        self.cors_origins.push(origin.into());
        self
    }

    /// Mount the fault-injection endpoints under `/__test/` and log pushes.
    /// Never in production: anyone reaching the server could break it.
    pub fn test_controls(mut self, yes: bool) -> Self {
        self.test_controls = yes;
        self
    }

    /// Apply events with `inbox` on SQLite (default [`StoreOnly`]).
    pub fn inbox(mut self, inbox: impl Inbox) -> Self {
        self.inbox = Some(Arc::new(inbox));
        self
    }

    /// Apply events with `inbox` on PostgreSQL (default: store events only).
    pub fn pg_inbox(mut self, inbox: impl PgInbox) -> Self {
        self.pg_inbox = Some(Arc::new(inbox));
        self
    }

    /// Time a client has to send a request's head (default
    /// [`DEFAULT_HEADER_TIMEOUT`], 10 s), counted from the accept (TLS
    /// handshake included) for a connection's first request and from the
    /// first byte for a later one. A connection over it is closed without
    /// an answer, however steadily it dribbles bytes (slowloris).
    pub fn header_timeout(mut self, timeout: Duration) -> Self {
        self.limits.header_timeout = timeout;
        self
    }

    /// Time a keep-alive connection may send nothing between two requests
    /// (default [`DEFAULT_IDLE_TIMEOUT`], 60 s) before it is closed. A
    /// request being answered, however long, is never idle.
    pub fn idle_timeout(mut self, timeout: Duration) -> Self {
        self.limits.idle_timeout = timeout;
        self
    }

    /// Connections open at once (default [`DEFAULT_MAX_CONNECTIONS`], 1024;
    /// at least 1). At the bound, idle keep-alive connections are closed to
    /// make room, and the server stops accepting: new connections wait in
    /// the kernel's listen backlog and are served as slots free up (the
    /// timeouts free them), instead of being refused. Keep it below the
    /// process's file descriptor limit (`ulimit -n`; a warning is logged at
    /// start on Linux when it is not).
    pub fn max_connections(mut self, n: usize) -> Self {
        self.limits.max_connections = n.max(1);
        self
    }

    /// Terminate HTTPS here: `cert_chain_pem` holds the server's certificate
    /// and its intermediates (PEM, leaf first), `key_pem` its private key
    /// (PEM: PKCS#8, PKCS#1 or SEC1). HTTP/1.1 over TLS 1.2 or 1.3 (rustls);
    /// plain HTTP is then not served on this listener. Both are parsed when
    /// the server starts: [`spawn`] and [`serve`] fail with [`Error::Config`]
    /// on unusable ones. Behind a load balancer that terminates TLS, leave
    /// it unset.
    pub fn tls_pem(
        mut self,
        cert_chain_pem: impl Into<Vec<u8>>,
        key_pem: impl Into<Vec<u8>>,
    ) -> Self {
        self.tls = Some(listener::Tls {
            cert_chain_pem: cert_chain_pem.into(),
            key_pem: key_pem.into(),
        });
        self
    }
}

/// Serve `config` on `listener` until `shutdown` completes, then stop
/// accepting, let in-flight requests finish, and return.
///
/// Fails with [`Error::Config`] on unusable TLS files and with the storage's
/// error when the database cannot be opened or migrated, before serving.
pub async fn serve(
    listener: TcpListener,
    config: ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    serve_when_ready(listener, config, || {}, shutdown).await
}

/// [`serve`], calling `ready` once the TLS files are parsed and the
/// database is open and migrated, just before the first connection is
/// accepted: the moment to tell a supervisor or a test script that the
/// server is up. Not called when starting fails.
pub async fn serve_when_ready(
    listener: TcpListener,
    config: ServerConfig,
    ready: impl FnOnce(),
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let limits = config.limits;
    let tls = listener::Tls::acceptor(config.tls.as_ref())?;
    let state = AppState::open(config).await?;
    ready();
    serve_state(listener, state, limits, tls, shutdown).await
}

async fn serve_state(
    listener: TcpListener,
    state: AppState,
    limits: listener::Limits,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    listener::serve(listener, router(state), limits, tls, shutdown).await
}

/// Start a server in this process on `config`'s listen address (by default
/// `127.0.0.1:0`, an ephemeral port). Its fault controls are active (from
/// Rust, see [`RunningServer::faults`]); the `/__test/` HTTP endpoints exist
/// only with [`ServerConfig::test_controls`]. Must be called within a tokio runtime.
pub async fn spawn(config: ServerConfig) -> Result<RunningServer, Error> {
    let listener = TcpListener::bind(config.listen).await?;
    let addr = listener.local_addr()?;
    let limits = config.limits;
    let tls = listener::Tls::acceptor(config.tls.as_ref())?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    let state = AppState::build(config, true).await?;
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(serve_state(listener, state.clone(), limits, tls, async {
        // Either an explicit shutdown or the RunningServer being dropped.
        let _ = rx.await;
    }));
    Ok(RunningServer {
        addr,
        scheme,
        state,
        shutdown: Some(tx),
        task: Some(task),
    })
}

/// A server started by [`spawn`]. Dropping it stops the server too (without waiting).
#[derive(Debug)]
pub struct RunningServer {
    addr: SocketAddr,
    /// `https` when the server terminates TLS ([`ServerConfig::tls_pem`]).
    scheme: &'static str,
    state: AppState,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), Error>>>,
}

/// What one client's events look like at the server (see [`RunningServer::stats`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientStats {
    /// The client id.
    pub client_id: String,
    /// Events stored (each id once: duplicates are never stored).
    pub events: u64,
    /// Events that arrived with a `seq` not greater than the one before them
    /// (0 when the client's order was kept).
    pub out_of_order: u64,
    /// Smallest and largest `seq` received.
    pub seq_range: (i64, i64),
}

impl RunningServer {
    /// The bound address (the real port when the config asked for port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Base URL, e.g. `http://127.0.0.1:41234` (`https://` with
    /// [`ServerConfig::tls_pem`]).
    pub fn url(&self) -> String {
        format!("{}://{}", self.scheme, self.addr)
    }

    /// The push/pull endpoint, e.g. `http://127.0.0.1:41234/v1/events`.
    pub fn events_url(&self) -> String {
        format!("{}/v1/events", self.url())
    }

    /// Fault injection and the request log.
    pub fn faults(&self) -> &Faults {
        self.state.faults()
    }

    /// The request log (same as `faults().requests()`).
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.faults().requests()
    }

    /// The event store, for direct queries. Its methods block: on
    /// PostgreSQL they wait for the runtime the server runs on, so from
    /// async code call them inside `tokio::task::spawn_blocking` (or use
    /// [`PgStore`]'s `*_async` methods); the same holds for [`events`](Self::events),
    /// [`all_events`](Self::all_events), [`count`](Self::count) and [`stats`](Self::stats).
    pub fn store(&self) -> &Arc<dyn EventStore> {
        self.state.store()
    }

    /// Every event received from `client_id`, in arrival order.
    pub fn events(&self, client_id: &str) -> Result<Vec<ReceivedEvent>, Error> {
        let mut out = Vec::new();
        self.for_each_event(Some(client_id), |e| out.push(e))?;
        Ok(out)
    }

    /// Every event received, in arrival order.
    pub fn all_events(&self) -> Result<Vec<ReceivedEvent>, Error> {
        let mut out = Vec::new();
        self.for_each_event(None, |e| out.push(e))?;
        Ok(out)
    }

    /// Number of events stored, of one client or of all.
    pub fn count(&self, client_id: Option<&str>) -> Result<u64, Error> {
        self.store().count(client_id)
    }

    /// Per-client counts and order check, over all stored events (paged, so
    /// memory stays flat with millions of events). Sorted by client id.
    pub fn stats(&self) -> Result<Vec<ClientStats>, Error> {
        let mut by_client: HashMap<String, (ClientStats, i64)> = HashMap::new();
        self.for_each_event(None, |e| {
            let seq = e.event.seq;
            let (stats, last) = by_client.entry(e.client_id.clone()).or_insert_with(|| {
                (
                    ClientStats {
                        client_id: e.client_id.clone(),
                        events: 0,
                        out_of_order: 0,
                        seq_range: (seq, seq),
                    },
                    i64::MIN,
                )
            });
            stats.events += 1;
            if seq <= *last {
                stats.out_of_order += 1;
            }
            *last = seq;
            stats.seq_range = (stats.seq_range.0.min(seq), stats.seq_range.1.max(seq));
        })?;
        let mut out: Vec<ClientStats> = by_client.into_values().map(|(s, _)| s).collect();
        out.sort_by(|a, b| a.client_id.cmp(&b.client_id));
        Ok(out)
    }

    fn for_each_event(
        &self,
        client_id: Option<&str>,
        mut f: impl FnMut(ReceivedEvent),
    ) -> Result<(), Error> {
        let mut after = 0;
        loop {
            let page = self.store().pull(after, 1000, client_id)?;
            let Some(last) = page.last() else {
                return Ok(());
            };
            after = last.cursor;
            page.into_iter().for_each(&mut f);
        }
    }

    /// Stop accepting, give in-flight requests up to 5 s to finish, and stop.
    pub async fn shutdown(mut self) -> Result<(), Error> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let Some(mut task) = self.task.take() else {
            return Ok(());
        };
        match tokio::time::timeout(http::SHUTDOWN_GRACE, &mut task).await {
            Ok(Ok(result)) => result,
            Ok(Err(join)) => Err(Error::Internal(format!("server task failed: {join}"))),
            Err(_) => {
                // A request held by a delay fault, say: stop waiting for it.
                task.abort();
                Ok(())
            }
        }
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}
