//! The IndexedDB backend: [`store::IdbStore`] (the [`crate::Store`] contract
//! over IndexedDB, the connection's lifecycle) and, here, thin async helpers
//! over raw IndexedDB (web-sys). The schema itself is `js/schema.js`, shared
//! with the npm package. Nothing here knows the JavaScript API
//! (`super::bindings`) or the relay driver (`super::driver`).
//!
//! Why raw IndexedDB and not a wrapper crate: an `IDBTransaction` commits on
//! its own as soon as the task that uses it yields to anything but one of its
//! own requests. Every helper here resolves inside a microtask of the
//! request's `success` event (wasm-bindgen-futures polls on microtasks), so
//! code that awaits only these futures keeps its transaction alive, and code
//! that awaits anything else (a `fetch`, a timer) must not hold one.

pub(crate) mod store;

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

use js_sys::{Array, Function, Object, Promise, Reflect};
use wasm_bindgen::JsCast;
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::JsFuture;
use web_sys::{
    DomException, IdbDatabase, IdbFactory, IdbOpenDbRequest, IdbRequest, IdbTransaction,
};

use crate::error::{Error, Result};

/// Object store holding the events (key: `seq`, auto-incremented).
pub(crate) const EVENTS: &str = "edge_outbox_events";
/// Object store holding the meta records (schema version, client id, lease).
pub(crate) const META: &str = "edge_outbox_meta";
/// Index of [`EVENTS`] on the event id (unique).
pub(crate) const BY_ID: &str = "id";
/// Index of [`EVENTS`] on `[status, seq]`: each status in commit order.
pub(crate) const BY_STATUS: &str = "status_seq";
/// Index of [`EVENTS`] on `sent_at`; only sent events have that field, so the
/// index holds exactly the sent events, in acknowledgement order.
pub(crate) const BY_SENT_AT: &str = "sent_at";
/// The outbox schema version this build writes and understands: 2 adds the
/// sent watermark (meta `sent_through` and its runs, see `store`); a version
/// 1 database is upgraded in place at open (nothing to rewrite).
pub(crate) const SCHEMA_VERSION: u32 = 2;

#[wasm_bindgen]
extern "C" {
    /// An `IDBDatabase`, seen through the one method web-sys lacks.
    type RawDb;

    /// `IDBDatabase.transaction(names, mode, options)`: web-sys only exposes the
    /// options dictionary (durability) behind its unstable-API flag.
    #[wasm_bindgen(method, catch, js_name = transaction)]
    fn transaction_with_options(
        this: &RawDb,
        names: &JsValue,
        mode: &str,
        options: &JsValue,
    ) -> std::result::Result<IdbTransaction, JsValue>;
}

#[wasm_bindgen]
extern "C" {
    /// An `IDBTransaction`, seen through `commit()` (web-sys marks its
    /// binding deprecated).
    type RawTx;

    #[wasm_bindgen(method, catch, js_name = commit)]
    fn commit(this: &RawTx) -> std::result::Result<(), JsValue>;
}

/// The future of one `IDBRequest`. The handlers are attached when the future
/// is made (not when first polled), so several requests can be issued and
/// then awaited in order without missing an event.
pub(crate) struct Request {
    req: IdbRequest,
    done: JsFuture,
}

/// Start waiting for `req`.
pub(crate) fn wait(req: IdbRequest) -> Request {
    Request {
        done: JsFuture::from(request_promise(&req)),
        req,
    }
}

impl Future for Request {
    type Output = std::result::Result<JsValue, JsValue>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match Pin::new(&mut self.done).poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(_)) => Poll::Ready(self.req.result()),
            Poll::Ready(Err(event)) => Poll::Ready(Err(request_error(&self.req, event))),
        }
    }
}

fn request_error(req: &IdbRequest, fallback: JsValue) -> JsValue {
    match req.error() {
        Ok(Some(e)) => e.into(),
        _ => fallback,
    }
}

/// The future of a transaction's end: `Ok` once it committed, `Err(cause)`
/// when it aborted. Made before the first request, so no event is missed.
pub(crate) struct Done {
    tx: IdbTransaction,
    done: JsFuture,
    /// After [`Done::commit_now`]: the first failed request's error, and the
    /// `error` listener that catches it (removed on drop).
    request_error: Option<RequestError>,
}

/// The first error of a transaction's requests, caught by `listener`.
struct RequestError {
    first: Rc<RefCell<Option<JsValue>>>,
    listener: Closure<dyn FnMut(JsValue)>,
}

/// Start waiting for `tx` to commit or abort.
pub(crate) fn done(tx: &IdbTransaction) -> Done {
    Done {
        tx: tx.clone(),
        done: JsFuture::from(tx_done(tx)),
        request_error: None,
    }
}

impl Done {
    /// Tell IndexedDB that the transaction gets no more requests: it commits
    /// once the placed ones succeed, without waiting for their `success`
    /// events to reach this page and come back empty-handed (the
    /// auto-commit's round trip); in Chromium a fifth of a relaxed commit's
    /// time (BENCHMARKS.md, "Browser commit"). Only for a transaction nobody
    /// can still add requests to: a request placed later (from an earlier
    /// request's `success` handler, e.g. a cursor's `continue()`) would fail.
    /// Browsers without `commit()` (Safari before 15) auto-commit as before.
    ///
    /// A request failing after an explicit commit aborts the transaction with
    /// an `AbortError` in Firefox and WebKit (Chromium keeps the request's
    /// error): the first failed request's error is kept here and is the
    /// cause this future reports, as it is without `commit()`.
    pub(crate) fn commit_now(&mut self) {
        if self.request_error.is_none() {
            let first = Rc::new(RefCell::new(None::<JsValue>));
            let slot = first.clone();
            let listener = Closure::<dyn FnMut(JsValue)>::new(move |e: JsValue| {
                let error = Reflect::get(&e, &"target".into())
                    .ok()
                    .and_then(|t| t.dyn_into::<IdbRequest>().ok())
                    .and_then(|r| r.error().ok().flatten());
                let mut slot = slot.borrow_mut();
                if slot.is_none() {
                    *slot = error.map(JsValue::from);
                }
            });
            let _ = self
                .tx
                .add_event_listener_with_callback("error", listener.as_ref().unchecked_ref());
            self.request_error = Some(RequestError { first, listener });
        }
        let _ = self.tx.unchecked_ref::<RawTx>().commit();
    }
}

impl Drop for Done {
    fn drop(&mut self) {
        if let Some(r) = &self.request_error {
            let _ = self
                .tx
                .remove_event_listener_with_callback("error", r.listener.as_ref().unchecked_ref());
        }
    }
}

impl Future for Done {
    type Output = std::result::Result<(), JsValue>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match Pin::new(&mut self.done).poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(_)) => Poll::Ready(Ok(())),
            Poll::Ready(Err(event)) => Poll::Ready(Err(match self.first_request_error() {
                Some(e) => e,
                None => match self.tx.error() {
                    Some(e) => e.into(),
                    // An explicit abort() has no error: report an AbortError.
                    None => DomException::new_with_message_and_name(
                        "the transaction was aborted",
                        "AbortError",
                    )
                    .map(JsValue::from)
                    .unwrap_or(event),
                },
            })),
        }
    }
}

impl Done {
    fn first_request_error(&self) -> Option<JsValue> {
        self.request_error.as_ref()?.first.borrow().clone()
    }
}

/// Open a transaction over `names` with `mode` ("readonly"/"readwrite") and
/// the durability `options` object (`{ durability }`, or undefined).
pub(crate) fn transaction(
    db: &IdbDatabase,
    names: &[&str],
    mode: &str,
    options: &JsValue,
) -> std::result::Result<IdbTransaction, JsValue> {
    let list: Array = names.iter().map(|n| JsValue::from_str(n)).collect();
    db.unchecked_ref::<RawDb>()
        .transaction_with_options(&list, mode, options)
}

/// Open a transaction over a JS array of store names (the app's call).
pub(crate) fn transaction_js(
    db: &IdbDatabase,
    names: &Array,
    mode: &str,
    options: &JsValue,
) -> std::result::Result<IdbTransaction, JsValue> {
    db.unchecked_ref::<RawDb>()
        .transaction_with_options(names, mode, options)
}

/// The global `indexedDB` (page or worker: read from `globalThis`).
pub(crate) fn factory() -> Result<IdbFactory> {
    Reflect::get(&js_sys::global(), &JsValue::from_str("indexedDB"))
        .ok()
        .filter(|f| !f.is_undefined() && !f.is_null())
        .map(JsCast::unchecked_into)
        .ok_or_else(|| Error::Storage {
            message: "IndexedDB is not available in this context (globalThis.indexedDB is missing)"
                .into(),
            source: None,
        })
}

#[wasm_bindgen(module = "/src/web/glue.js")]
extern "C" {
    /// A Promise of an `IDBRequest`'s result (its `success` and `error`
    /// handlers set in JS: smaller than a Rust closure pair per request).
    #[wasm_bindgen(js_name = requestPromise)]
    pub(crate) fn request_promise(req: &IdbRequest) -> Promise;

    /// A Promise that resolves when `tx` commits and rejects with the
    /// `abort` event when it aborts.
    #[wasm_bindgen(js_name = txDone)]
    fn tx_done(tx: &IdbTransaction) -> Promise;

    /// Wait for an open request: runs `upgrade(oldVersion)` in its
    /// `upgradeneeded`, calls `on_blocked({ oldVersion, newVersion })` when
    /// another connection blocks it, and rejects with
    /// `blocked_error(oldVersion, newVersion)` (versions undefined when it
    /// was not blocked itself but queued behind a blocked upgrade) when it
    /// has neither upgraded nor opened `timeout_ms` after the request (an
    /// upgrade that would run after that is aborted, a connection that opens
    /// after that is closed).
    #[wasm_bindgen(js_name = openRequest)]
    fn open_request(
        req: &IdbOpenDbRequest,
        upgrade: &Function,
        on_blocked: Option<&Function>,
        timeout_ms: Option<f64>,
        blocked_error: &Function,
    ) -> Promise;
}

/// What to do when an open is blocked by another connection (another tab,
/// or the app's own connection, that does not close on `versionchange`).
#[derive(Clone, Debug, Default)]
pub(crate) struct Blocked {
    /// Called with `{ oldVersion, newVersion }` each time the open is blocked.
    pub on_blocked: Option<Function>,
    /// Give up when the open has neither upgraded nor opened this long after
    /// it was requested (`None`: wait).
    pub timeout_ms: Option<f64>,
}

/// Name of the error of an open still blocked after its timeout.
pub(crate) const BLOCKED_ERROR: &str = "BlockedError";

fn blocked_error(name: &str) -> Closure<dyn Fn(JsValue, JsValue) -> JsValue> {
    let name = name.to_owned();
    Closure::new(move |old: JsValue, new: JsValue| {
        // Versions are integers: formatted as u64, as f64 formatting would
        // add ~7 KB gzip to the package.
        let version = |v: JsValue| v.as_f64().map(|n| n as u64);
        let err = js_sys::Error::new(&match (version(old), version(new)) {
            (Some(old), Some(new)) => format!(
                "the upgrade of the IndexedDB database {} from version {old} to {new} is \
                 blocked by another connection that does not close (another tab of an older \
                 version of this app, or a connection of the app's own); close the other tabs \
                 and try again",
                crate::error::quoted(&name)
            ),
            _ => format!(
                "opening the IndexedDB database {} waited behind another connection's \
                 upgrade, which another connection blocks (another tab of an older version of \
                 this app, or a connection of the app's own); close the other tabs and try again",
                crate::error::quoted(&name)
            ),
        });
        err.set_name(BLOCKED_ERROR);
        err.into()
    })
}

/// Open `name` at `version` (or its current version), running `upgrade`
/// inside the `versionchange` transaction when the version grows. `upgrade`
/// gets the database, the upgrade transaction and the old version; an `Err`
/// aborts the upgrade. A blocked open follows `blocked`.
pub(crate) async fn open(
    name: &str,
    version: Option<u32>,
    blocked: &Blocked,
    upgrade: impl FnMut(&IdbDatabase, &IdbTransaction, u32) -> std::result::Result<(), JsValue>
    + 'static,
) -> std::result::Result<IdbDatabase, JsValue> {
    let factory = factory().map_err(|e| JsValue::from_str(&e.to_string()))?;
    let req: IdbOpenDbRequest = match version {
        Some(v) => factory.open_with_u32(name, v)?,
        None => factory.open(name)?,
    };
    let mut upgrade = upgrade;
    let req2 = req.clone();
    let on_upgrade = Closure::<dyn FnMut(JsValue)>::new(move |old: JsValue| {
        let Ok(db) = req2.result() else { return };
        let db: IdbDatabase = db.unchecked_into();
        let Some(tx) = req2.transaction() else { return };
        let old = old.as_f64().unwrap_or(0.0) as u32;
        if upgrade(&db, &tx, old).is_err() {
            // Aborting the versionchange transaction fails the open request:
            // the database keeps its previous version and schema.
            let _ = tx.abort();
        }
    });
    let error = blocked_error(name);
    let result = JsFuture::from(open_request(
        &req,
        on_upgrade.as_ref().unchecked_ref(),
        blocked.on_blocked.as_ref(),
        blocked.timeout_ms,
        error.as_ref().unchecked_ref(),
    ))
    .await;
    // The closures must outlive the request: a given-up open may still
    // complete later and call them.
    on_upgrade.forget();
    error.forget();
    Ok(result?.unchecked_into())
}

#[wasm_bindgen(module = "/js/schema.js")]
extern "C" {
    /// Create the outbox stores and indexes that `db` lacks. Only valid inside
    /// an upgrade (`versionchange`) transaction; `tx` is that transaction.
    /// The schema's one copy is `js/schema.js`, which the npm package's
    /// `createOutboxStores` is too.
    #[wasm_bindgen(catch, js_name = createOutboxStores)]
    pub(crate) fn create_outbox_stores(
        db: &IdbDatabase,
        tx: Option<&IdbTransaction>,
    ) -> std::result::Result<(), JsValue>;
}

/// True when `db` already has every outbox store (and, when the versionchange
/// transaction is not at hand, the indexes are assumed with them).
pub(crate) fn has_outbox_stores(db: &IdbDatabase) -> bool {
    let names = db.object_store_names();
    names.contains(EVENTS) && names.contains(META)
}

/// The `{ durability }` options object for `IDBDatabase.transaction`.
pub(crate) fn durability_options(durability: &str) -> JsValue {
    let o = Object::new();
    let _ = Reflect::set(&o, &"durability".into(), &durability.into());
    o.into()
}

/// `name` and `message` of a JS error value (DOMException, Error, or anything).
pub(crate) fn error_parts(e: &JsValue) -> (String, String) {
    let get = |k: &str| {
        Reflect::get(e, &JsValue::from_str(k))
            .ok()
            .and_then(|v| v.as_string())
            .unwrap_or_default()
    };
    let (name, message) = (get("name"), get("message"));
    if name.is_empty() && message.is_empty() {
        (
            String::new(),
            e.as_string()
                .unwrap_or_else(|| crate::web::json::value_text(e)),
        )
    } else {
        (name, message)
    }
}

/// Map an IndexedDB failure to the crate's error: a full quota is
/// [`Error::QuotaExceeded`], a closed connection [`Error::Closed`], a newer
/// database version [`Error::SchemaTooNew`]-like version conflict, the rest
/// [`Error::Storage`] with the DOMException's name and message.
pub(crate) fn to_error(what: &str, e: JsValue) -> Error {
    let (name, message) = error_parts(&e);
    match name.as_str() {
        "QuotaExceededError" => Error::QuotaExceeded,
        "InvalidStateError" if message.contains("clos") => Error::Closed,
        _ => Error::Storage {
            message: if name.is_empty() {
                format!("{what}: {message}")
            } else {
                format!("{what}: {name}: {message}")
            },
            source: None,
        },
    }
}

/// `.idb("what")` on web-sys results: map the JS error with [`to_error`].
pub(crate) trait IdbResult<T> {
    /// Map the error, naming the operation that failed.
    fn idb(self, what: &str) -> Result<T>;
}

impl<T> IdbResult<T> for std::result::Result<T, JsValue> {
    fn idb(self, what: &str) -> Result<T> {
        self.map_err(|e| to_error(what, e))
    }
}
