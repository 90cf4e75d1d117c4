//! The IndexedDB store: the [`Store`] contract over the `edge_outbox_events`
//! and `edge_outbox_meta` object stores.
//!
//! How each obligation of the contract is met:
//! 1. one `enqueue` call is one readwrite transaction;
//! 2. `seq` is the events store's key generator: readwrite transactions whose
//!    scopes overlap run one after another (also across tabs and workers), so
//!    the generator hands out keys in commit order;
//! 5. `claim` reads and writes the lease record and the batch in one
//!    readwrite transaction over both stores;
//! 7. `settle`, `retry` and `discard` re-read each event inside their
//!    transaction and only touch it in the expected status;
//! 10. `settle_and_claim` is one readwrite transaction: the claim's reads
//!     go out with the settle's, its lease write after the settle's writes,
//!     and a settle failing half-way aborts it (nothing recorded).
//!
//! # The sent watermark (schema version 2)
//!
//! Settling a batch of 100 acknowledged events one `put` per record cost
//! more than the push itself (each put rewrites the record and its index
//! entries). So a settle whose events are the oldest pending ones, all
//! `Sent`, writes no record: it raises the **sent watermark** instead (meta
//! key `sent_through`), and records the run it covers under the meta key
//! `["sent", upto]` as `{ after, upto, at }` (`at`: when it was settled).
//! The rule every reader applies, in the same transaction:
//!
//! > a record whose `status` says `"pending"` and whose `seq` is at or below
//! > `sent_through` is **sent**: one more attempt than it says, no error,
//! > `sent_at` = the `at` of the run that covers its `seq`.
//!
//! So claims, counts and lists of pending events start above the watermark;
//! `get` reports such a record as sent; `prune_sent` deletes a run's records
//! with the run; and `retry` of a dead event below the watermark first writes
//! the covered records from its `seq` up as sent (the rare case: a dead event
//! followed by acknowledged ones) and lowers the watermark under it. A
//! settle whose events are not a run of `Sent` at the front of the pending
//! events (a failure, a dead letter in the middle) writes those records one by
//! one, as before. Nothing else changes: no index, no record shape.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::Rc;

use js_sys::{Array, Object, Promise, Reflect};
use wasm_bindgen::JsCast;
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::JsFuture;
use web_sys::{IdbDatabase, IdbKeyRange, IdbObjectStore, IdbTransaction};

use super::{
    self as idb, BY_ID, BY_SENT_AT, BY_STATUS, Blocked, EVENTS, IdbResult, META, SCHEMA_VERSION,
};
use crate::error::{Error, Result};
use crate::event::{DEFAULT_MAX_EVENT_BYTES, Event, EventId, EventStatus, NewEvent};
use crate::store::{Claim, ClaimRequest, Outcome, Settlement, Stats, Store};
use crate::time::Timestamp;

/// How hard IndexedDB works to make a commit durable before reporting it
/// (the `durability` option of `IDBDatabase.transaction`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Durability {
    /// The browser's default: `relaxed` in Chromium (commit reported once the
    /// data is handed to the OS; a power loss may lose the last commits, a
    /// crash of the browser does not), `strict` in some other browsers.
    #[default]
    Default,
    /// Flush to disk before the commit is reported (slower, survives power loss).
    Strict,
    /// Report the commit before the data is flushed to disk (faster).
    Relaxed,
}

impl Durability {
    /// The IndexedDB name: `"default"`, `"strict"` or `"relaxed"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Durability::Default => "default",
            Durability::Strict => "strict",
            Durability::Relaxed => "relaxed",
        }
    }

    /// Parse the IndexedDB name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "default" => Some(Durability::Default),
            "strict" => Some(Durability::Strict),
            "relaxed" => Some(Durability::Relaxed),
            _ => None,
        }
    }
}

/// An outbox kept in IndexedDB: the browser's [`Store`].
///
/// Cheap to clone (a shared handle). Open one with [`IdbStore::open`], or
/// through the JavaScript `Outbox.open`, which also declares the app's stores.
#[derive(Clone)]
pub struct IdbStore {
    inner: Rc<Inner>,
}

struct Inner {
    /// The connection; replaced when it is reopened after a `versionchange`
    /// or a `close` the outbox did not ask for.
    db: RefCell<IdbDatabase>,
    name: String,
    client_id: String,
    options: JsValue,
    max_event_bytes: usize,
    closed: Cell<bool>,
    /// Why the connection was lost for good (the outbox could not reopen).
    lost: RefCell<Option<String>>,
    /// Resolves once a reopen in progress has finished (either way).
    reopening: RefCell<Option<Promise>>,
    /// The app's stores: a reopened database must still have them.
    app: RefCell<Vec<AppStore>>,
    /// The sent watermark as this store last read or wrote it: claims and
    /// settles issue their reads above it at once, with the watermark's own
    /// read, and read again only when it moved meanwhile (another tab).
    floor_hint: Cell<i64>,
    /// Called after every local commit that added events (wakes the relay).
    on_commit: RefCell<Option<Rc<dyn Fn()>>>,
    /// Told when the connection is lost, reopened or given up.
    on_connection: RefCell<Option<ConnectionListener>>,
    /// The `versionchange` and `close` handlers of the current connection.
    handlers: RefCell<Vec<Handler>>,
}

/// Told when the connection is lost, reopened or given up.
pub type ConnectionListener = Rc<dyn Fn(&Connection)>;

/// A DOM event handler kept alive from Rust.
type Handler = Closure<dyn FnMut(JsValue)>;

/// The state of an outbox's IndexedDB connection, as the driver is told.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Connection {
    /// Closed under the outbox (another tab's upgrade, the browser's `close`
    /// event): reopening; store calls wait for it.
    Reopening {
        /// What closed it.
        reason: String,
    },
    /// Open again (at the database's new version).
    Open,
    /// Lost for good (database deleted, outbox stores removed, a newer
    /// outbox schema, reopening timed out): store calls fail with
    /// [`Error::Closed`] and [`IdbStore::lost_reason`] says why.
    Lost {
        /// Why.
        reason: String,
    },
}

/// How long a reopen may wait (behind another connection's upgrade) before
/// the connection is given up.
const REOPEN_TIMEOUT_MS: f64 = 10_000.0;

#[wasm_bindgen(module = "/src/web/glue.js")]
extern "C" {
    /// `promise`'s value, or `"timeout"` after `ms` milliseconds.
    fn timeout(promise: &Promise, ms: f64) -> Promise;

    /// The fields of a stored event record, in one call: `[id, status,
    /// headers, seq, type, key, payload, created_at, attempts,
    /// next_attempt_at, last_error, sent_at, retried_at]` (undefined where
    /// absent). Read field by field, each `Reflect.get` passed its property
    /// name as a new JS string: 13 per record, the largest main-thread item
    /// of a browser flush (BENCHMARKS.md, "Flush").
    #[wasm_bindgen(js_name = recordFields)]
    fn record_fields(record: &JsValue) -> Array;
}

impl std::fmt::Debug for IdbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdbStore")
            .field("database", &self.inner.name)
            .field("client_id", &self.inner.client_id)
            .finish()
    }
}

impl IdbStore {
    /// Open (creating or upgrading when needed) the database `name` with only
    /// the outbox stores in it, or add them to an existing database.
    pub async fn open(name: &str, durability: Durability) -> Result<IdbStore> {
        let db = open_database(name, &[], &Blocked::default())
            .await
            .map_err(OpenFailure::into_error)?;
        IdbStore::from_database(db, durability, DEFAULT_MAX_EVENT_BYTES).await
    }

    /// Wrap an open database that already has the outbox stores (created with
    /// `createOutboxStores` in the app's upgrade handler, or by
    /// [`IdbStore::open`]): checks the schema version and reads or makes the
    /// client id.
    ///
    /// The store owns the connection from then on: when another connection
    /// upgrades the database (`versionchange`) it closes it at once, so the
    /// upgrade is not blocked, and reopens it at the new version; when the
    /// browser closes it (`close`) it reopens it too. When it cannot (the
    /// database was deleted, the upgrade removed the outbox or app stores, a
    /// newer outbox schema) the connection is lost for good: calls fail with
    /// [`Error::Closed`] and [`IdbStore::lost_reason`] says why.
    pub async fn from_database(
        db: IdbDatabase,
        durability: Durability,
        max_event_bytes: usize,
    ) -> Result<IdbStore> {
        if !idb::has_outbox_stores(&db) {
            return Err(Error::InvalidConfig {
                reason: format!(
                    "the database {} has no outbox stores; call createOutboxStores(db) in its upgrade handler",
                    crate::error::quoted(&db.name())
                ),
            });
        }
        let options = idb::durability_options(durability.as_str());
        let client_id = init_meta(&db, &options).await?;
        let store = IdbStore {
            inner: Rc::new(Inner {
                name: db.name(),
                db: RefCell::new(db.clone()),
                client_id,
                options,
                max_event_bytes,
                closed: Cell::new(false),
                lost: RefCell::new(None),
                reopening: RefCell::new(None),
                app: RefCell::new(Vec::new()),
                floor_hint: Cell::new(0),
                on_commit: RefCell::new(None),
                on_connection: RefCell::new(None),
                handlers: RefCell::new(Vec::new()),
            }),
        };
        install_handlers(&store.inner, &db);
        Ok(store)
    }

    /// The app's stores, which a reopened database must still have.
    pub(crate) fn set_app_stores(&self, app: Vec<AppStore>) {
        *self.inner.app.borrow_mut() = app;
    }

    /// The current connection (the app reads its own stores with it). It
    /// changes when the outbox reopens the database after another
    /// connection's upgrade.
    pub fn database(&self) -> IdbDatabase {
        self.inner.db.borrow().clone()
    }

    /// The database name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Largest accepted event (type + key + payload + headers), in bytes.
    pub fn max_event_bytes(&self) -> usize {
        self.inner.max_event_bytes
    }

    /// Close the connection; later calls fail with [`Error::Closed`].
    pub fn close(&self) {
        self.inner.closed.set(true);
        self.inner.handlers.borrow_mut().clear();
        self.inner.db.borrow().close();
    }

    /// True once [`IdbStore::close`] was called, or the connection was lost
    /// for good.
    pub fn is_closed(&self) -> bool {
        self.inner.closed.get() || self.inner.lost.borrow().is_some()
    }

    /// Why the connection was lost for good, if it was (not after
    /// [`IdbStore::close`]).
    pub fn lost_reason(&self) -> Option<String> {
        self.inner.lost.borrow().clone()
    }

    /// Call `f` after every commit of this store that added events (the
    /// browser relay wakes on it).
    pub fn set_on_commit(&self, f: Option<Rc<dyn Fn()>>) {
        *self.inner.on_commit.borrow_mut() = f;
    }

    /// Call `f` when the connection is lost, reopened or given up.
    pub fn set_on_connection(&self, f: Option<ConnectionListener>) {
        *self.inner.on_connection.borrow_mut() = f;
    }

    /// Tell the commit listener that events were committed.
    pub(crate) fn committed(&self) {
        let f = self.inner.on_commit.borrow().clone();
        if let Some(f) = f {
            f();
        }
    }

    /// Wait for a reopen in progress; fail when closed or lost.
    pub(crate) async fn ready(&self) -> Result<()> {
        let reopening = self.inner.reopening.borrow().clone();
        if let Some(p) = reopening {
            let _ = JsFuture::from(p).await;
        }
        if self.is_closed() {
            return Err(Error::Closed);
        }
        Ok(())
    }

    /// A transaction over `names` (a JS array) for the app's
    /// `outbox.transaction`, on the current connection: waits for a reopen
    /// in progress, and reopens a connection found closed.
    pub(crate) async fn app_transaction(
        &self,
        names: &Array,
    ) -> std::result::Result<IdbTransaction, JsValue> {
        for attempt in 0..2 {
            self.ready()
                .await
                .map_err(|e| JsValue::from_str(&e.to_string()))?;
            let db = self.database();
            match idb::transaction_js(&db, names, "readwrite", &self.inner.options) {
                Ok(tx) => return Ok(tx),
                Err(e) if attempt == 0 && self.closed_under_us(&e) => {}
                Err(e) => return Err(e),
            }
        }
        Err(JsValue::from_str(&Error::Closed.to_string()))
    }

    /// True when `e` says the connection is closed although the outbox did
    /// not close it (no event told it): starts reopening.
    fn closed_under_us(&self, e: &JsValue) -> bool {
        if self.is_closed() || !matches!(idb::to_error("", e.clone()), Error::Closed) {
            return false;
        }
        connection_lost(
            &self.inner,
            "the IndexedDB connection was closed under the outbox".into(),
        );
        true
    }

    /// Add `event` to the app's own readwrite transaction `tx`, whose scope
    /// must include the events store. Validates first: on a bad event nothing
    /// is written and the error is returned (the caller aborts `tx`).
    /// The event commits with `tx`, or not at all.
    pub fn enqueue_in(&self, tx: &IdbTransaction, event: &NewEvent) -> Result<EventId> {
        event.validate(self.inner.max_event_bytes)?;
        let store = tx.object_store(EVENTS).idb("the transaction does not include the outbox store (add \"edge_outbox_events\" to its scope)")?;
        let (id, record) = new_record(event, Timestamp::now());
        store.add(&record).idb("writing the event")?;
        Ok(id)
    }

    async fn tx(&self, names: &[&str], mode: &str) -> Result<IdbTransaction> {
        let options = if mode == "readwrite" {
            &self.inner.options
        } else {
            &JsValue::UNDEFINED
        };
        for attempt in 0..2 {
            self.ready().await?;
            let db = self.database();
            match idb::transaction(&db, names, mode, options) {
                Ok(tx) => return Ok(tx),
                Err(e) if attempt == 0 && self.closed_under_us(&e) => {}
                Err(e) => {
                    return Err(if db.name().is_empty() {
                        Error::Closed
                    } else {
                        idb::to_error("starting a transaction", e)
                    });
                }
            }
        }
        Err(Error::Closed)
    }
}

/// Watch `db` for `versionchange` (another connection upgrades or deletes
/// the database) and `close` (the browser closed it: storage cleared, a
/// crash of its backend).
fn install_handlers(inner: &Rc<Inner>, db: &IdbDatabase) {
    let mut handlers = inner.handlers.borrow_mut();
    handlers.clear();
    let weak = Rc::downgrade(inner);
    let closing = db.clone();
    let on_versionchange = Closure::<dyn FnMut(JsValue)>::new(move |e: JsValue| {
        // Close at once: an open connection would block the upgrade.
        closing.close();
        let Some(inner) = weak.upgrade() else { return };
        // An integer: formatted as u64, as f64 formatting would add ~7 KB
        // gzip to the package.
        match Reflect::get(&e, &"newVersion".into())
            .ok()
            .and_then(|v| v.as_f64())
            .map(|v| v as u64)
        {
            Some(v) => connection_lost(
                &inner,
                format!("another connection upgraded the database to version {v}"),
            ),
            None => give_up(
                &inner,
                "the database was deleted (by another tab, or site data was cleared)".into(),
            ),
        }
    });
    db.set_onversionchange(Some(on_versionchange.as_ref().unchecked_ref()));
    handlers.push(on_versionchange);
    let weak = Rc::downgrade(inner);
    let on_close = Closure::<dyn FnMut(JsValue)>::new(move |_e: JsValue| {
        if let Some(inner) = weak.upgrade() {
            connection_lost(&inner, "the browser closed the IndexedDB connection".into());
        }
    });
    let target: &web_sys::EventTarget = db.as_ref();
    let _ = target.add_event_listener_with_callback("close", on_close.as_ref().unchecked_ref());
    handlers.push(on_close);
}

fn notify(inner: &Inner, c: &Connection) {
    let f = inner.on_connection.borrow().clone();
    if let Some(f) = f {
        f(c);
    }
}

/// The connection is lost for good: say why, once.
fn give_up(inner: &Rc<Inner>, reason: String) {
    if inner.closed.get() || inner.lost.borrow().is_some() {
        return;
    }
    inner.db.borrow().close();
    *inner.lost.borrow_mut() = Some(reason.clone());
    inner.handlers.borrow_mut().clear();
    notify(inner, &Connection::Lost { reason });
}

/// The connection was closed under the outbox: reopen it (once at a time).
fn connection_lost(inner: &Rc<Inner>, reason: String) {
    if inner.closed.get() || inner.lost.borrow().is_some() || inner.reopening.borrow().is_some() {
        return;
    }
    notify(
        inner,
        &Connection::Reopening {
            reason: reason.clone(),
        },
    );
    let weak = Rc::downgrade(inner);
    let reopen = wasm_bindgen_futures::future_to_promise(async move {
        let Some(inner) = weak.upgrade() else {
            return Ok(JsValue::UNDEFINED);
        };
        let name = inner.name.clone();
        let app = inner.app.borrow().clone();
        let options = inner.options.clone();
        let client_id = inner.client_id.clone();
        drop(inner);
        let attempt = wasm_bindgen_futures::future_to_promise(async move {
            reopen(&name, &app, &options, &client_id)
                .await
                .map(JsValue::from)
                .map_err(|e| JsValue::from_str(&e))
        });
        let outcome = JsFuture::from(timeout(&attempt, REOPEN_TIMEOUT_MS)).await;
        let Some(inner) = weak.upgrade() else {
            return Ok(JsValue::UNDEFINED);
        };
        match outcome {
            Ok(db) if db.is_instance_of::<IdbDatabase>() => {
                let db: IdbDatabase = db.unchecked_into();
                if inner.closed.get() {
                    db.close();
                } else {
                    *inner.db.borrow_mut() = db.clone();
                    install_handlers(&inner, &db);
                    inner.reopening.borrow_mut().take();
                    notify(&inner, &Connection::Open);
                }
            }
            Ok(_) => {
                // Still waiting behind another upgrade: close it if it opens.
                let close_late = Closure::<dyn FnMut(JsValue)>::new(|db: JsValue| {
                    if let Some(db) = db.dyn_ref::<IdbDatabase>() {
                        db.close();
                    }
                });
                let _ = attempt.then(&close_late);
                close_late.forget();
                give_up(
                    &inner,
                    format!(
                        "{reason}, and reopening it did not finish within {} s (another upgrade is blocked)",
                        // Whole seconds: u64, not f64 (see on_versionchange).
                        (REOPEN_TIMEOUT_MS / 1000.0) as u64
                    ),
                );
            }
            Err(e) => give_up(
                &inner,
                format!(
                    "{reason}, and it cannot be reopened: {}",
                    e.as_string().unwrap_or_default()
                ),
            ),
        }
        inner.reopening.borrow_mut().take();
        Ok(JsValue::UNDEFINED)
    });
    *inner.reopening.borrow_mut() = Some(reopen);
}

/// Open `name` again at its current version, never creating it: the outbox
/// and app stores must be there, with this client id.
async fn reopen(
    name: &str,
    app: &[AppStore],
    options: &JsValue,
    client_id: &str,
) -> std::result::Result<IdbDatabase, String> {
    // An upgrade from version 0 means the database is gone: abort it, so
    // reopening never creates an empty database.
    let db = idb::open(name, None, &Blocked::default(), |_, _, _| {
        Err(JsValue::from_str("the database no longer exists"))
    })
    .await
    .map_err(|e| match idb::error_parts(&e).0.as_str() {
        "AbortError" => "the database no longer exists".to_owned(),
        _ => idb::to_error("reopening", e).to_string(),
    })?;
    let fail = |db: &IdbDatabase, why: String| {
        db.close();
        Err(why)
    };
    if !idb::has_outbox_stores(&db) {
        return fail(&db, "the new version has no outbox stores".into());
    }
    match app_schema_missing(&db, app) {
        Ok(false) => {}
        Ok(true) => {
            return fail(
                &db,
                "the new version lacks a store or index this outbox was opened with".into(),
            );
        }
        Err(e) => return fail(&db, e.to_string()),
    }
    match init_meta(&db, options).await {
        Ok(id) if id == client_id => Ok(db),
        Ok(_) => fail(&db, "the database was recreated (another client id)".into()),
        Err(e) => fail(&db, e.to_string()),
    }
}

/// Why [`open_database`] failed.
#[derive(Debug)]
pub(crate) enum OpenFailure {
    /// Still blocked by another connection after the configured wait.
    Blocked(JsValue),
    /// Any other failure.
    Error(Error),
}

impl OpenFailure {
    /// The crate's error (a blocked open is a storage error for Rust callers).
    pub(crate) fn into_error(self) -> Error {
        match self {
            OpenFailure::Blocked(e) => Error::storage(idb::error_parts(&e).1, None),
            OpenFailure::Error(e) => e,
        }
    }
}

impl From<Error> for OpenFailure {
    fn from(e: Error) -> Self {
        OpenFailure::Error(e)
    }
}

/// Open `name`, upgrading it (version + 1) when it lacks the outbox stores
/// or one of the app stores declared in `app`; `app` is run inside the
/// upgrade to create what is missing.
pub(crate) async fn open_database(
    name: &str,
    app: &[AppStore],
    blocked: &Blocked,
) -> std::result::Result<IdbDatabase, OpenFailure> {
    let blocked_or = |what: &'static str| {
        move |e: JsValue| {
            if idb::error_parts(&e).0 == idb::BLOCKED_ERROR {
                OpenFailure::Blocked(e)
            } else {
                OpenFailure::Error(idb::to_error(what, e))
            }
        }
    };
    let db = idb::open(name, None, blocked, |_, _, _| Ok(()))
        .await
        .map_err(blocked_or("opening the database"))?;
    let missing =
        !idb::has_outbox_stores(&db) || app_schema_missing(&db, app).map_err(OpenFailure::Error)?;
    if !missing {
        return Ok(db);
    }
    let version = db.version() as u32 + 1;
    db.close();
    let app = app.to_vec();
    idb::open(name, Some(version), blocked, move |db, tx, _| {
        idb::create_outbox_stores(db, Some(tx))?;
        for store in &app {
            store.create(db, tx)?;
        }
        Ok(())
    })
    .await
    .map_err(|e| match idb::error_parts(&e).0.as_str() {
        "VersionError" => OpenFailure::Error(Error::InvalidConfig {
            reason: format!(
                "the database {} was upgraded by another tab meanwhile; open it again",
                crate::error::quoted(name)
            ),
        }),
        _ => blocked_or("upgrading the database")(e),
    })
}

/// An object store the app declares in `Outbox.open({ stores })`.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct AppStore {
    pub name: String,
    /// A key path (string or array of strings), or `None` for out-of-line keys.
    pub key_path: Option<KeyPath>,
    pub auto_increment: bool,
    pub indexes: Vec<AppIndex>,
}

/// A key path: one property or several.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum KeyPath {
    One(String),
    Many(Vec<String>),
}

impl KeyPath {
    fn to_js(&self) -> JsValue {
        match self {
            KeyPath::One(s) => JsValue::from_str(s),
            KeyPath::Many(v) => v
                .iter()
                .map(|s| JsValue::from_str(s))
                .collect::<Array>()
                .into(),
        }
    }
}

/// An index the app declares on one of its stores.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct AppIndex {
    pub name: String,
    pub key_path: KeyPath,
    pub unique: bool,
    pub multi_entry: bool,
}

impl AppStore {
    /// Create this store and its indexes where missing (inside an upgrade).
    fn create(&self, db: &IdbDatabase, tx: &IdbTransaction) -> std::result::Result<(), JsValue> {
        let store: IdbObjectStore = if db.object_store_names().contains(&self.name) {
            tx.object_store(&self.name)?
        } else {
            let params = web_sys::IdbObjectStoreParameters::new();
            if let Some(kp) = &self.key_path {
                params.set_key_path(&kp.to_js());
            }
            params.set_auto_increment(self.auto_increment);
            db.create_object_store_with_optional_parameters(&self.name, &params)?
        };
        let existing = store.index_names();
        for index in &self.indexes {
            if existing.contains(&index.name) {
                continue;
            }
            let params = web_sys::IdbIndexParameters::new();
            params.set_unique(index.unique);
            params.set_multi_entry(index.multi_entry);
            match &index.key_path {
                KeyPath::One(p) => {
                    store.create_index_with_str_and_optional_parameters(&index.name, p, &params)?
                }
                KeyPath::Many(v) => {
                    let arr: Array = v.iter().map(|s| JsValue::from_str(s)).collect();
                    store.create_index_with_str_sequence_and_optional_parameters(
                        &index.name,
                        &arr,
                        &params,
                    )?
                }
            };
        }
        Ok(())
    }
}

/// True when a declared store or index is missing from `db`.
fn app_schema_missing(db: &IdbDatabase, app: &[AppStore]) -> Result<bool> {
    let names = db.object_store_names();
    if app.iter().any(|s| !names.contains(&s.name)) {
        return Ok(true);
    }
    if app.iter().all(|s| s.indexes.is_empty()) {
        return Ok(false);
    }
    // Index names are only visible through a transaction; this one makes no
    // request and ends on its own.
    let with_indexes: Vec<&str> = app
        .iter()
        .filter(|s| !s.indexes.is_empty())
        .map(|s| s.name.as_str())
        .collect();
    let tx = idb::transaction(db, &with_indexes, "readonly", &JsValue::UNDEFINED)
        .idb("reading the schema")?;
    for s in app.iter().filter(|s| !s.indexes.is_empty()) {
        let store = tx.object_store(&s.name).idb("reading the schema")?;
        let existing = store.index_names();
        if s.indexes.iter().any(|i| !existing.contains(&i.name)) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Check the outbox schema version and read (or make, at first open) the client id.
async fn init_meta(db: &IdbDatabase, options: &JsValue) -> Result<String> {
    let tx = idb::transaction(db, &[META], "readwrite", options).idb("reading the outbox meta")?;
    let done = idb::done(&tx);
    let meta = tx.object_store(META).idb("reading the outbox meta")?;
    let version = idb::wait(
        meta.get(&"schema_version".into())
            .idb("reading the outbox meta")?,
    );
    let client = idb::wait(
        meta.get(&"client_id".into())
            .idb("reading the outbox meta")?,
    );
    let version = version.await.idb("reading the outbox meta")?;
    let client = client.await.idb("reading the outbox meta")?;
    if let Some(found) = version.as_f64() {
        let found = found as u32;
        if found > SCHEMA_VERSION {
            // Leave the database untouched: abort this transaction.
            let _ = tx.abort();
            let _ = done.await;
            return Err(Error::SchemaTooNew {
                found,
                supported: SCHEMA_VERSION,
            });
        }
    }
    if version.as_f64() != Some(f64::from(SCHEMA_VERSION)) {
        // New, or version 1: a version 1 database is a version 2 one with no
        // sent watermark yet (nothing to rewrite). Writing 2 makes an older
        // build refuse it (it would resend what the watermark says is sent).
        meta.put_with_key(&JsValue::from(SCHEMA_VERSION), &"schema_version".into())
            .idb("writing the outbox meta")?;
    }
    let client_id = match client.as_string() {
        Some(id) => id,
        None => {
            let id = uuid::Uuid::new_v4().to_string();
            meta.put_with_key(&JsValue::from_str(&id), &"client_id".into())
                .idb("writing the outbox meta")?;
            id
        }
    };
    done.await.idb("writing the outbox meta")?;
    Ok(client_id)
}

// ---- records ---------------------------------------------------------------

fn set(o: &Object, k: &str, v: &JsValue) {
    // Reflect.set on a plain fresh object cannot fail.
    let _ = Reflect::set(o, &JsValue::from_str(k), v);
}

fn get(o: &JsValue, k: &str) -> JsValue {
    Reflect::get(o, &JsValue::from_str(k)).unwrap_or(JsValue::UNDEFINED)
}

fn opt_str(v: JsValue) -> Option<String> {
    v.as_string()
}

fn num(o: &JsValue, k: &str) -> Option<f64> {
    get(o, k).as_f64()
}

/// The record of a new event (no `seq`: the key generator assigns it).
fn new_record(e: &NewEvent, now: Timestamp) -> (EventId, Object) {
    let id = EventId::new();
    let o = Object::new();
    set(&o, "id", &JsValue::from_str(&id.to_string()));
    set(&o, "type", &JsValue::from_str(&e.event_type));
    if let Some(k) = &e.key {
        set(&o, "key", &JsValue::from_str(k));
    }
    // The payload stays JSON text: what the app wrote is what is sent, byte for byte.
    set(&o, "payload", &JsValue::from_str(&e.payload));
    let headers = Object::new();
    for (k, v) in &e.headers {
        set(&headers, k, &JsValue::from_str(v));
    }
    set(&o, "headers", &headers);
    set(&o, "created_at", &JsValue::from_f64(now.as_millis() as f64));
    set(&o, "status", &JsValue::from_str("pending"));
    set(&o, "attempts", &JsValue::from_f64(0.0));
    set(
        &o,
        "next_attempt_at",
        &JsValue::from_f64(now.as_millis() as f64),
    );
    (id, o)
}

/// Parse a stored record.
pub(crate) fn parse_record(r: &JsValue) -> Result<Event> {
    let bad = |what: &str| Error::Storage {
        message: format!("a stored outbox record is corrupt ({what})"),
        source: None,
    };
    // In the order of glue.js `recordFields`.
    let f = record_fields(r);
    let text = |i| f.get(i).as_string();
    let ts = |i| f.get(i).as_f64().map(|n| Timestamp::from_millis(n as i64));
    let id: EventId = text(0)
        .ok_or_else(|| bad("id"))?
        .parse()
        .map_err(|_| bad("id"))?;
    let status = text(1)
        .and_then(|s| EventStatus::parse(&s))
        .ok_or_else(|| bad("status"))?;
    let mut headers = BTreeMap::new();
    let h = f.get(2);
    if h.is_object() {
        for entry in Object::entries(h.unchecked_ref()).iter() {
            let pair: Array = entry.unchecked_into();
            if let (Some(k), Some(v)) = (pair.get(0).as_string(), pair.get(1).as_string()) {
                headers.insert(k, v);
            }
        }
    }
    Ok(Event {
        seq: f.get(3).as_f64().ok_or_else(|| bad("seq"))? as i64,
        id,
        event_type: text(4).ok_or_else(|| bad("type"))?,
        key: text(5),
        payload: text(6).ok_or_else(|| bad("payload"))?,
        headers,
        created_at: ts(7).ok_or_else(|| bad("created_at"))?,
        status,
        attempts: f.get(8).as_f64().unwrap_or(0.0) as u32,
        next_attempt_at: ts(9).unwrap_or(Timestamp::from_millis(0)),
        last_error: text(10),
        sent_at: ts(11),
        retried_at: ts(12),
    })
}

/// The `[status, seq]` index range of events with `status` (and, with
/// `after`, a seq above it).
fn status_range(status: &str, after: Option<i64>) -> Result<JsValue> {
    // No seq is -infinity.
    range_between(
        status,
        after.map_or(f64::NEG_INFINITY, |a| a as f64),
        f64::INFINITY,
    )
}

/// Meta key of the sent watermark (see the module docs).
const SENT_THROUGH: &str = "sent_through";

/// Meta key of the run of sent events whose last `seq` is `upto`.
fn run_key(upto: f64) -> JsValue {
    Array::of2(&JsValue::from_str("sent"), &JsValue::from_f64(upto)).into()
}

/// Meta keys of the runs whose last `seq` lies in `[lo, hi]`.
fn run_range(lo: f64, hi: f64) -> Result<JsValue> {
    IdbKeyRange::bound(&run_key(lo), &run_key(hi))
        .map(JsValue::from)
        .idb("building a key range")
}

/// The sent watermark (0: none yet; seqs start at 1), read in `meta`'s
/// transaction.
async fn watermark(meta: &IdbObjectStore, what: &str) -> Result<i64> {
    let v = idb::wait(meta.get(&SENT_THROUGH.into()).idb(what)?)
        .await
        .idb(what)?;
    Ok(v.as_f64().unwrap_or(0.0) as i64)
}

/// An event read from `record` as the watermark `floor` says (module docs):
/// a pending record at or below it is sent, at the time `sent_at` of its run.
fn read_event(record: &JsValue, floor: i64, sent_at: Option<Timestamp>) -> Result<Event> {
    let mut event = parse_record(record)?;
    if event.status == EventStatus::Pending && event.seq <= floor {
        event.status = EventStatus::Sent;
        event.attempts += 1;
        event.last_error = None;
        event.sent_at = sent_at;
    }
    Ok(event)
}

/// The `[status, seq]` index range of events with `status` and a seq in
/// `(after, upto]`.
fn status_range_between(status: &str, after: i64, upto: i64) -> Result<JsValue> {
    range_between(status, after as f64, upto as f64)
}

fn range_between(status: &str, after: f64, upto: f64) -> Result<JsValue> {
    let lo = Array::of2(&JsValue::from_str(status), &JsValue::from_f64(after));
    let hi = Array::of2(&JsValue::from_str(status), &JsValue::from_f64(upto));
    IdbKeyRange::bound_with_lower_open_and_upper_open(&lo, &hi, true, false)
        .map(JsValue::from)
        .idb("building a key range")
}

/// The first reads of a claim, placed together so they cost one round trip:
/// the lease record and, where it is known where they start, the first
/// pending records above a seq (the sent watermark or the claim's `after`, as
/// far as known when they were placed).
struct ClaimReads {
    lease: idb::Request,
    records: Option<(i64, idb::Request)>,
}

/// Place a read of up to `limit` records with `status` (and, with `after`, a
/// seq above it), in `seq` order.
fn read_status(
    events: &IdbObjectStore,
    status: &str,
    after: Option<i64>,
    limit: usize,
) -> Result<idb::Request> {
    let range = status_range(status, after)?;
    let index = events.index(BY_STATUS).idb("reading events")?;
    Ok(idb::wait(
        index
            .get_all_with_key_and_limit(&range, count_arg(limit))
            .idb("reading events")?,
    ))
}

fn count_arg(limit: usize) -> u32 {
    u32::try_from(limit).unwrap_or(u32::MAX)
}

impl IdbStore {
    async fn list(&self, status: EventStatus, limit: usize) -> Result<Vec<Event>> {
        if limit == 0 {
            // getAll's count 0 means "no limit" in IndexedDB.
            return Ok(Vec::new());
        }
        const WHAT: &str = "listing events";
        let tx = self.tx(&[EVENTS, META], "readonly").await?;
        let meta = tx.object_store(META).idb(WHAT)?;
        let events = tx.object_store(EVENTS).idb(WHAT)?;
        // Pending events start above the sent watermark.
        let after = match status {
            EventStatus::Pending => Some(watermark(&meta, WHAT).await?),
            _ => None,
        };
        let all = read_status(&events, status.as_str(), after, limit)?;
        let all: Array = all.await.idb(WHAT)?.unchecked_into();
        all.iter().map(|r| parse_record(&r)).collect()
    }

    /// Make the watermark lie below `seq` (a dead event there is about to be
    /// pending again, which the watermark would read as sent): the pending
    /// records it covers from `seq` up are written as sent (from their runs),
    /// the runs from `seq` up are cut back to end below it, and the
    /// watermark drops to `seq - 1`. Nothing to do when it is already below.
    async fn lower_watermark_below(
        store: &IdbObjectStore,
        meta: &IdbObjectStore,
        seq: i64,
    ) -> Result<()> {
        const WHAT: &str = "retrying an event";
        let floor = watermark(meta, WHAT).await?;
        if seq > floor {
            return Ok(());
        }
        let runs = idb::wait(
            meta.get_all_with_key(&run_range(seq as f64, floor as f64)?)
                .idb(WHAT)?,
        );
        let index = store.index(BY_STATUS).idb(WHAT)?;
        let covered = idb::wait(
            index
                .get_all_with_key(&status_range_between("pending", seq - 1, floor)?)
                .idb(WHAT)?,
        );
        let runs: Array = runs.await.idb(WHAT)?.unchecked_into();
        let covered: Array = covered.await.idb(WHAT)?.unchecked_into();
        // Runs in `upto` order; each covers (after, upto].
        let runs: Vec<(f64, f64, f64)> = runs
            .iter()
            .map(|r| {
                let n = |k| num(&r, k).unwrap_or(0.0);
                (n("after"), n("upto"), n("at"))
            })
            .collect();
        for record in covered.iter() {
            let at = num(&record, "seq")
                .and_then(|s| runs.iter().find(|(a, u, _)| *a < s && s <= *u))
                .map_or(0.0, |r| r.2);
            let o: &Object = record.unchecked_ref();
            set(
                o,
                "attempts",
                &JsValue::from_f64(num(&record, "attempts").unwrap_or(0.0) + 1.0),
            );
            set(o, "status", &JsValue::from_str("sent"));
            set(o, "sent_at", &JsValue::from_f64(at));
            let _ = Reflect::delete_property(o, &"last_error".into());
            store.put(&record).idb(WHAT)?;
        }
        meta.delete(&run_range(seq as f64, floor as f64)?)
            .idb(WHAT)?;
        if let Some(&(after, _, at)) = runs.first()
            && after < (seq - 1) as f64
        {
            let run = Object::new();
            set(&run, "after", &JsValue::from_f64(after));
            set(&run, "upto", &JsValue::from_f64((seq - 1) as f64));
            set(&run, "at", &JsValue::from_f64(at));
            meta.put_with_key(&run, &run_key((seq - 1) as f64))
                .idb(WHAT)?;
        }
        meta.put_with_key(&JsValue::from_f64((seq - 1) as f64), &SENT_THROUGH.into())
            .idb(WHAT)?;
        Ok(())
    }

    /// The sent watermark, and how far a settle of `outcomes` can raise it:
    /// up to the last of the oldest pending events that `outcomes` settle as
    /// `Sent`, passing over those it settles as `Dead` (their records are
    /// written and stop being pending), stopping at the first pending event
    /// it leaves pending. The pending keys are read above the last watermark
    /// seen together with the watermark itself, and again only if it moved.
    async fn sent_run(
        &self,
        store: &IdbObjectStore,
        meta: &IdbObjectStore,
        outcomes: &[Settlement],
    ) -> Result<(i64, i64)> {
        let is_sent = |o: &&Settlement| matches!(o.outcome, Outcome::Sent);
        let hi = outcomes.iter().filter(is_sent).map(|o| o.seq).max();
        let index = store.index(BY_STATUS).idb("settling")?;
        let keys_between = |lo: i64, hi: i64| -> Result<idb::Request> {
            let range = status_range_between("pending", lo, hi)?;
            Ok(idb::wait(
                index.get_all_keys_with_key(&range).idb("settling")?,
            ))
        };
        let guess = self.inner.floor_hint.get();
        let floor = idb::wait(meta.get(&SENT_THROUGH.into()).idb("settling")?);
        let keys = match hi {
            Some(hi) if hi > guess => Some(keys_between(guess, hi)?),
            _ => None,
        };
        let floor = floor.await.idb("settling")?.as_f64().unwrap_or(0.0) as i64;
        let keys = match hi {
            Some(hi) if hi > floor && floor != guess => Some(keys_between(floor, hi)?),
            Some(hi) if hi > floor => keys,
            _ => None,
        };
        let Some(keys) = keys else {
            self.inner.floor_hint.set(floor);
            return Ok((floor, floor));
        };
        let keys: Array = keys.await.idb("settling")?.unchecked_into();
        let mut sent: Vec<i64> = outcomes.iter().filter(is_sent).map(|o| o.seq).collect();
        sent.sort_unstable();
        let mut upto = floor;
        for key in keys.iter() {
            let seq = key.as_f64().unwrap_or(0.0) as i64;
            if sent.binary_search(&seq).is_ok() {
                upto = seq;
            } else if !outcomes
                .iter()
                .any(|o| o.seq == seq && matches!(o.outcome, Outcome::Dead { .. }))
            {
                break;
            }
        }
        self.inner.floor_hint.set(upto);
        Ok((floor, upto))
    }

    /// The current records of the settled events (undefined for one that is
    /// gone, or whose `seq` now holds another id), in order, all requested
    /// before any is awaited: IndexedDB serves queued requests back to back,
    /// while one request per await costs a trip through the event loop each.
    /// A claimed batch is usually one short run of seqs, so ONE `getAll` over
    /// its primary-key range replaces the per-event reads; settling a batch of
    /// 100 took about half as long that way.
    async fn records_for_settle(
        store: &IdbObjectStore,
        settled: &[Settlement],
    ) -> Result<Vec<JsValue>> {
        if settled.is_empty() {
            return Ok(Vec::new());
        }
        let same_event = |record: &JsValue, s: &Settlement| {
            // A seq is never reused, but check the id anyway: it is cheap.
            record.is_object() && opt_str(get(record, "id")) == Some(s.id.to_string())
        };
        let lo = settled.iter().map(|s| s.seq).min().unwrap_or(0);
        let hi = settled.iter().map(|s| s.seq).max().unwrap_or(0);
        // Only when the range holds little besides the settled events.
        if (hi - lo) as usize <= 2 * settled.len() + 16 {
            let range =
                IdbKeyRange::bound(&(lo as f64).into(), &(hi as f64).into()).idb("settling")?;
            let all: Array = idb::wait(store.get_all_with_key(&range).idb("settling")?)
                .await
                .idb("settling")?
                .unchecked_into();
            // getAll answers in primary-key (seq) order.
            let by_seq: Vec<(i64, JsValue)> = all
                .iter()
                .filter_map(|r| num(&r, "seq").map(|n| (n as i64, r)))
                .collect();
            return Ok(settled
                .iter()
                .map(|s| {
                    by_seq
                        .binary_search_by_key(&s.seq, |(seq, _)| *seq)
                        .ok()
                        .map(|i| &by_seq[i].1)
                        .filter(|r| same_event(r, s))
                        .cloned()
                        .unwrap_or(JsValue::UNDEFINED)
                })
                .collect());
        }
        let mut reads = Vec::with_capacity(settled.len());
        for s in settled {
            let req = store.get(&(s.seq as f64).into()).idb("settling")?;
            reads.push(idb::wait(req));
        }
        let mut records = Vec::with_capacity(settled.len());
        for (read, s) in reads.into_iter().zip(settled) {
            let record = read.await.idb("settling")?;
            records.push(if same_event(&record, s) {
                record
            } else {
                JsValue::UNDEFINED
            });
        }
        Ok(records)
    }

    /// `settle`, `claim` and `settle_and_claim` in one: settle `outcomes` at
    /// `now` and, with `request`, claim, in one readwrite transaction. The
    /// claim's first reads go out with the settle's (one IndexedDB round trip
    /// for all reads, one commit, where two transactions cost two of each:
    /// BENCHMARKS.md, "Flush"). An outer `Err`: the transaction recorded
    /// nothing (a settle failing half-way aborts it). Without `request` the
    /// claim part is skipped and the answer is `Claim::Empty`.
    async fn settle_claim(
        &self,
        outcomes: Vec<Settlement>,
        now: Timestamp,
        request: Option<&ClaimRequest<'_>>,
    ) -> Result<Result<Claim>> {
        const WHAT: &str = "settling or claiming";
        // The records are read before any is written, so an event named
        // twice would get both outcomes (store.rs, 7).
        let mut outcomes = outcomes;
        Settlement::keep_first_of_each(&mut outcomes);
        let tx = self.tx(&[EVENTS, META], "readwrite").await?;
        let done = idb::done(&tx);
        let events = tx.object_store(EVENTS).idb(WHAT)?;
        let meta = tx.object_store(META).idb(WHAT)?;
        // Pending events start above the sent watermark: the claim reads them
        // above the last one seen (or its `after`), and again only if the
        // watermark moved. These reads are placed before the settle's writes,
        // so only when those cannot change what they read: the settled events
        // lie at or below where the claim starts (the relay settles what it
        // claimed before).
        let reads = match request {
            Some(r) => {
                let guess = r.after.unwrap_or(0).max(self.inner.floor_hint.get());
                let above = outcomes.iter().all(|o| o.seq <= guess).then_some(guess);
                let limit = r.max_events.max(1);
                let lease = idb::wait(meta.get(&"lease".into()).idb(WHAT)?);
                let records = match above {
                    Some(a) => Some((a, read_status(&events, "pending", Some(a), limit)?)),
                    None => None,
                };
                Some(ClaimReads { lease, records })
            }
            None => None,
        };
        let floor = match self.settle_in(&events, &meta, outcomes, now).await {
            Ok(floor) => floor,
            Err(e) => {
                // Nothing half applied: drop the writes placed so far (an
                // error before them leaves reads only, which record nothing).
                let _ = tx.abort();
                return Err(e);
            }
        };
        let claim = match (request, reads) {
            (Some(r), Some(reads)) => self.claim_in(&meta, &events, r, reads, floor).await,
            _ => Ok(Claim::Empty),
        };
        // Aborted (the error says why): nothing of it was recorded.
        done.await.idb(WHAT)?;
        Ok(claim)
    }

    /// The rest of a claim after its first `reads`, in their transaction,
    /// with `floor` the sent watermark as the transaction sees it: the lease
    /// (taken or renewed, or held by another owner: nothing written) and the
    /// batch. Leaves the transaction to its caller to finish.
    async fn claim_in(
        &self,
        meta: &IdbObjectStore,
        events: &IdbObjectStore,
        request: &ClaimRequest<'_>,
        reads: ClaimReads,
        floor: i64,
    ) -> Result<Claim> {
        self.inner.floor_hint.set(floor);
        let lease = reads.lease.await.idb("claiming")?;
        if lease.is_object() {
            let owner = opt_str(get(&lease, "owner")).unwrap_or_default();
            let until = Timestamp::from_millis(num(&lease, "until").unwrap_or(0.0) as i64);
            if owner != request.owner && request.lease_holds(until) {
                return Ok(Claim::LeaseHeld { until });
            }
        }
        let new_lease = Object::new();
        set(&new_lease, "owner", &JsValue::from_str(request.owner));
        set(
            &new_lease,
            "until",
            &JsValue::from_f64(request.now.add(request.lease).as_millis() as f64),
        );
        meta.put_with_key(&new_lease, &"lease".into())
            .idb("claiming")?;

        let after = request.after.unwrap_or(0).max(floor);
        let records = match reads.records {
            Some((above, records)) if above == after => records,
            _ => read_status(events, "pending", Some(after), request.max_events.max(1))?,
        };
        let records: Array = records.await.idb("claiming")?.unchecked_into();
        let mut batch = Vec::new();
        let mut bytes = 0usize;
        for record in records.iter() {
            let event = parse_record(&record)?;
            if batch.is_empty() && !request.is_due(event.next_attempt_at) {
                // Head-of-line: nothing overtakes an event waiting to retry.
                return Ok(Claim::NotBefore(event.next_attempt_at));
            }
            bytes += event.size();
            if !batch.is_empty() && bytes > request.max_bytes {
                break;
            }
            batch.push(event);
        }
        Ok(if batch.is_empty() {
            Claim::Empty
        } else {
            Claim::Batch(batch)
        })
    }

    /// Place the writes of a settle of `outcomes` at `now` in the transaction
    /// of `store` and `meta` (the caller awaits its end). Returns the sent
    /// watermark as it stands after them.
    async fn settle_in(
        &self,
        store: &IdbObjectStore,
        meta: &IdbObjectStore,
        outcomes: Vec<Settlement>,
        now: Timestamp,
    ) -> Result<i64> {
        if outcomes.is_empty() {
            // A plain claim.
            return watermark(meta, "claiming").await;
        }
        let (floor, upto) = self.sent_run(store, meta, &outcomes).await?;
        // Outcomes the watermark does not cover: one record each.
        let rest: Vec<Settlement> = outcomes
            .into_iter()
            .filter(|o| !(matches!(o.outcome, Outcome::Sent) && o.seq > floor && o.seq <= upto))
            .collect();
        let records = Self::records_for_settle(store, &rest).await?;
        for (record, Settlement { outcome, seq, .. }) in records.into_iter().zip(rest) {
            if record.is_undefined() {
                continue;
            }
            // Only pending events: a late answer never resurrects an event the
            // app has since discarded, nor undoes a dead or sent state (an
            // event under the watermark is sent whatever its record says).
            if opt_str(get(&record, "status")).as_deref() != Some("pending") || seq <= floor {
                continue;
            }
            let o: &Object = record.unchecked_ref();
            // The attempt is counted when it reaches an outcome (store.rs, 7).
            let attempts = num(&record, "attempts").unwrap_or(0.0) + 1.0;
            set(o, "attempts", &JsValue::from_f64(attempts));
            match outcome {
                Outcome::Sent => {
                    set(o, "status", &JsValue::from_str("sent"));
                    set(o, "sent_at", &JsValue::from_f64(now.as_millis() as f64));
                    let _ = Reflect::delete_property(o, &"last_error".into());
                }
                Outcome::Dead { reason } => {
                    set(o, "status", &JsValue::from_str("dead"));
                    set(o, "last_error", &JsValue::from_str(&reason));
                }
                Outcome::Retry { at, error } => {
                    set(
                        o,
                        "next_attempt_at",
                        &JsValue::from_f64(at.as_millis() as f64),
                    );
                    set(o, "last_error", &JsValue::from_str(&error));
                }
            }
            store.put(&record).idb("settling")?;
        }
        if upto > floor {
            let run = Object::new();
            set(&run, "after", &JsValue::from_f64(floor as f64));
            set(&run, "upto", &JsValue::from_f64(upto as f64));
            set(&run, "at", &JsValue::from_f64(now.as_millis() as f64));
            meta.put_with_key(&run, &run_key(upto as f64))
                .idb("settling")?;
            meta.put_with_key(&JsValue::from_f64(upto as f64), &SENT_THROUGH.into())
                .idb("settling")?;
        }
        Ok(upto)
    }

    async fn record_by_id(store: &IdbObjectStore, id: EventId) -> Result<Option<JsValue>> {
        let index = store.index(BY_ID).idb("reading an event")?;
        let req = index
            .get(&JsValue::from_str(&id.to_string()))
            .idb("reading an event")?;
        let r = idb::wait(req).await.idb("reading an event")?;
        Ok((!r.is_undefined()).then_some(r))
    }
}

impl Store for IdbStore {
    fn client_id(&self) -> &str {
        &self.inner.client_id
    }

    async fn enqueue(&self, events: Vec<NewEvent>) -> Result<Vec<Event>> {
        for e in &events {
            e.validate(self.inner.max_event_bytes)?;
        }
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let tx = self.tx(&[EVENTS], "readwrite").await?;
        let done = idb::done(&tx);
        let store = tx.object_store(EVENTS).idb("writing events")?;
        let now = Timestamp::now();
        let mut pending = Vec::with_capacity(events.len());
        for e in events {
            let (id, record) = new_record(&e, now);
            let req = store.add(&record).idb("writing events")?;
            pending.push((id, e, idb::wait(req)));
        }
        let mut out = Vec::with_capacity(pending.len());
        for (id, e, req) in pending {
            let seq = req.await.idb("writing events")?.as_f64().unwrap_or(0.0) as i64;
            out.push(e.into_pending(seq, id, now));
        }
        done.await.idb("committing events")?;
        self.committed();
        Ok(out)
    }

    async fn claim(&self, request: ClaimRequest<'_>) -> Result<Claim> {
        self.settle_claim(Vec::new(), request.now, Some(&request))
            .await?
    }

    async fn settle(&self, outcomes: Vec<Settlement>, now: Timestamp) -> Result<()> {
        // No request: the inner answer is always `Ok(Claim::Empty)`.
        let _ = self.settle_claim(outcomes, now, None).await?;
        Ok(())
    }

    /// One readwrite transaction (obligation 10): see `settle_claim`.
    async fn settle_and_claim(
        &self,
        outcomes: Vec<Settlement>,
        now: Timestamp,
        request: ClaimRequest<'_>,
    ) -> Result<Result<Claim>> {
        self.settle_claim(outcomes, now, Some(&request)).await
    }

    async fn release_lease(&self, owner: &str) -> Result<()> {
        let tx = self.tx(&[META], "readwrite").await?;
        let done = idb::done(&tx);
        let meta = tx.object_store(META).idb("releasing the lease")?;
        let lease = idb::wait(meta.get(&"lease".into()).idb("releasing the lease")?)
            .await
            .idb("releasing the lease")?;
        if lease.is_object() && opt_str(get(&lease, "owner")).as_deref() == Some(owner) {
            meta.delete(&"lease".into()).idb("releasing the lease")?;
        }
        done.await.idb("releasing the lease")
    }

    async fn stats(&self) -> Result<Stats> {
        let tx = self.tx(&[EVENTS, META], "readonly").await?;
        let meta = tx.object_store(META).idb("counting events")?;
        let index = tx
            .object_store(EVENTS)
            .and_then(|s| s.index(BY_STATUS))
            .idb("counting events")?;
        let floor = watermark(&meta, "counting events").await?;
        let count = |range: JsValue| -> Result<idb::Request> {
            Ok(idb::wait(
                index.count_with_key(&range).idb("counting events")?,
            ))
        };
        let pending = count(status_range("pending", Some(floor))?)?;
        let sent = count(status_range("sent", None)?)?;
        // Pending records under the watermark are sent (module docs).
        let covered = count(status_range_between("pending", i64::MIN, floor)?)?;
        let dead = count(status_range("dead", None)?)?;
        let oldest = idb::wait(
            index
                .get_all_with_key_and_limit(&status_range("pending", Some(floor))?, 1)
                .idb("counting events")?,
        );
        let n = |v: JsValue| v.as_f64().unwrap_or(0.0) as u64;
        let pending = n(pending.await.idb("counting events")?);
        let sent =
            n(sent.await.idb("counting events")?) + n(covered.await.idb("counting events")?);
        let dead = n(dead.await.idb("counting events")?);
        let oldest: Array = oldest.await.idb("counting events")?.unchecked_into();
        let oldest_pending_at = (oldest.length() > 0)
            .then(|| num(&oldest.get(0), "created_at"))
            .flatten()
            .map(|n| Timestamp::from_millis(n as i64));
        Ok(Stats {
            pending,
            sent,
            dead,
            oldest_pending_at,
        })
    }

    async fn pending(&self, limit: usize) -> Result<Vec<Event>> {
        self.list(EventStatus::Pending, limit).await
    }

    async fn dead_letters(&self, limit: usize) -> Result<Vec<Event>> {
        self.list(EventStatus::Dead, limit).await
    }

    async fn get(&self, id: EventId) -> Result<Option<Event>> {
        let tx = self.tx(&[EVENTS, META], "readonly").await?;
        let store = tx.object_store(EVENTS).idb("reading an event")?;
        let meta = tx.object_store(META).idb("reading an event")?;
        let floor = watermark(&meta, "reading an event").await?;
        let Some(record) = Self::record_by_id(&store, id).await? else {
            return Ok(None);
        };
        let seq = num(&record, "seq").unwrap_or(0.0);
        let covered =
            seq as i64 <= floor && opt_str(get(&record, "status")).as_deref() == Some("pending");
        let sent_at = if covered {
            // The first run ending at or after its seq is the one covering it.
            let run = idb::wait(
                meta.get(&run_range(seq, f64::INFINITY)?)
                    .idb("reading an event")?,
            )
            .await
            .idb("reading an event")?;
            num(&run, "at").map(|t| Timestamp::from_millis(t as i64))
        } else {
            None
        };
        read_event(&record, floor, sent_at).map(Some)
    }

    async fn retry(&self, id: EventId, now: Timestamp) -> Result<bool> {
        let tx = self.tx(&[EVENTS, META], "readwrite").await?;
        let done = idb::done(&tx);
        let store = tx.object_store(EVENTS).idb("retrying an event")?;
        let meta = tx.object_store(META).idb("retrying an event")?;
        let record = Self::record_by_id(&store, id).await?;
        let changed = match record {
            Some(r) if opt_str(get(&r, "status")).as_deref() == Some("dead") => {
                let seq = num(&r, "seq").unwrap_or(0.0) as i64;
                Self::lower_watermark_below(&store, &meta, seq).await?;
                let o: &Object = r.unchecked_ref();
                set(o, "status", &JsValue::from_str("pending"));
                set(o, "attempts", &JsValue::from_f64(0.0));
                set(
                    o,
                    "next_attempt_at",
                    &JsValue::from_f64(now.as_millis() as f64),
                );
                set(o, "retried_at", &JsValue::from_f64(now.as_millis() as f64));
                let _ = Reflect::delete_property(o, &"last_error".into());
                store.put(&r).idb("retrying an event")?;
                true
            }
            _ => false,
        };
        done.await.idb("retrying an event")?;
        if changed {
            self.committed();
        }
        Ok(changed)
    }

    async fn retry_now(&self, now: Timestamp) -> Result<u64> {
        let tx = self.tx(&[EVENTS, META], "readwrite").await?;
        let done = idb::done(&tx);
        let store = tx.object_store(EVENTS).idb("retrying now")?;
        let meta = tx.object_store(META).idb("retrying now")?;
        let floor = watermark(&meta, "retrying now").await?;
        let index = store.index(BY_STATUS).idb("retrying now")?;
        let req = index
            .get_all_with_key(&status_range("pending", Some(floor))?)
            .idb("retrying now")?;
        let records: Array = idb::wait(req).await.idb("retrying now")?.unchecked_into();
        let at = now.as_millis() as f64;
        let mut waiting = 0;
        for record in records.iter() {
            if num(&record, "next_attempt_at").is_some_and(|t| t > at) {
                set(
                    record.unchecked_ref(),
                    "next_attempt_at",
                    &JsValue::from_f64(at),
                );
                store.put(&record).idb("retrying now")?;
                waiting += 1;
            }
        }
        done.await.idb("retrying now")?;
        if waiting > 0 {
            self.committed();
        }
        Ok(waiting)
    }

    async fn discard(&self, id: EventId) -> Result<bool> {
        let tx = self.tx(&[EVENTS], "readwrite").await?;
        let done = idb::done(&tx);
        let store = tx.object_store(EVENTS).idb("discarding an event")?;
        let record = Self::record_by_id(&store, id).await?;
        let changed = match record {
            Some(r) if opt_str(get(&r, "status")).as_deref() == Some("dead") => {
                store.delete(&get(&r, "seq")).idb("discarding an event")?;
                true
            }
            _ => false,
        };
        done.await.idb("discarding an event")?;
        Ok(changed)
    }

    async fn prune_sent(&self, before: Timestamp) -> Result<u64> {
        let tx = self.tx(&[EVENTS, META], "readwrite").await?;
        let done = idb::done(&tx);
        let store = tx.object_store(EVENTS).idb("pruning sent events")?;
        let index = store.index(BY_SENT_AT).idb("pruning sent events")?;
        let range =
            IdbKeyRange::upper_bound_with_open(&JsValue::from_f64(before.as_millis() as f64), true)
                .idb("pruning sent events")?;
        let keys: Array = idb::wait(
            index
                .get_all_keys_with_key(&range)
                .idb("pruning sent events")?,
        )
        .await
        .idb("pruning sent events")?
        .unchecked_into();
        for key in keys.iter() {
            store.delete(&key).idb("pruning sent events")?;
        }
        let mut pruned = u64::from(keys.length());
        // The runs of the watermark settled before `before`, with their records.
        let meta = tx.object_store(META).idb("pruning sent events")?;
        let runs: Array = idb::wait(
            meta.get_all_with_key(&run_range(f64::NEG_INFINITY, f64::INFINITY)?)
                .idb("pruning sent events")?,
        )
        .await
        .idb("pruning sent events")?
        .unchecked_into();
        let index = store.index(BY_STATUS).idb("pruning sent events")?;
        let mut deletes = Vec::new();
        for run in runs.iter() {
            let n = |k| num(&run, k).unwrap_or(0.0);
            if n("at") >= before.as_millis() as f64 {
                continue;
            }
            let range = status_range_between("pending", n("after") as i64, n("upto") as i64)?;
            deletes.push(idb::wait(
                index
                    .get_all_keys_with_key(&range)
                    .idb("pruning sent events")?,
            ));
            meta.delete(&run_key(n("upto")))
                .idb("pruning sent events")?;
        }
        for keys in deletes {
            let keys: Array = keys.await.idb("pruning sent events")?.unchecked_into();
            for key in keys.iter() {
                store.delete(&key).idb("pruning sent events")?;
            }
            pruned += u64::from(keys.length());
        }
        done.await.idb("pruning sent events")?;
        Ok(pruned)
    }
}
