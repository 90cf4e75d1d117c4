//! The JavaScript API of the npm package, a thin layer over [`IdbStore`] and
//! the relay [`Driver`]. Names are camelCase; the TypeScript types are
//! hand-written in `js/index.d.ts` (wasm-bindgen cannot type callbacks and
//! option objects without `any`).

use std::rc::Rc;
use std::time::Duration;

use js_sys::{Array, Function, Object, Promise, Reflect};
use wasm_bindgen::JsCast;
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::{JsFuture, future_to_promise};
use web_sys::{CustomEvent, CustomEventInit, EventTarget, IdbDatabase, IdbTransaction};

use super::driver::{Driver, DriverConfig, Status, report_to_js};
use super::idb::Blocked;
use super::idb::store::{
    AppIndex, AppStore, Durability, IdbStore, KeyPath, OpenFailure, open_database,
};
use super::idb::{self, EVENTS};
use super::transport::FetchTransport;
use crate::error::{Error, quoted};
use crate::event::{DEFAULT_MAX_EVENT_BYTES, Event, EventId, NewEvent};
use crate::policy::RetryPolicy;
use crate::relay::RelayConfig;
use crate::store::Store;
use crate::time::Timestamp;

#[wasm_bindgen(module = "/src/web/glue.js")]
extern "C" {
    /// JSON text of `value`, throwing a TypeError for anything JSON would
    /// drop or change (functions, symbols, BigInt, NaN/Infinity, cycles,
    /// class instances such as Map or Set).
    #[wasm_bindgen(catch, js_name = strictJson)]
    fn strict_json(value: &JsValue) -> std::result::Result<String, JsValue>;

    /// Call the `outbox.transaction` callback: a Promise of its value that
    /// rejects with `foreign(cause)` (and aborts `tx`) when an async callback
    /// awaits anything but this transaction's requests.
    #[wasm_bindgen(js_name = guardedCall)]
    fn guarded_call(
        tx: &IdbTransaction,
        store: &str,
        callback: &Function,
        handle: &JsValue,
    ) -> Promise;

    /// The `ForeignAwaitError` (with `cause`, unless undefined).
    #[wasm_bindgen(js_name = foreignAwaitError)]
    fn foreign_await_error(cause: JsValue) -> JsValue;

    /// True when `s` holds no lone surrogate (`String.prototype.isWellFormed`).
    #[wasm_bindgen(js_name = isWellFormed)]
    fn is_well_formed(s: &js_sys::JsString) -> bool;

    /// True when `tx` is alive but inactive (used outside its callbacks).
    #[wasm_bindgen(js_name = isInactive)]
    fn is_inactive(tx: &IdbTransaction, name: &str) -> bool;

}

/// Turn the crate's error into a real JavaScript `Error` whose `name` is
/// [`Error::js_name`] (`InvalidEventError`, `QuotaExceededError`, ...).
pub fn to_js_error(e: &Error) -> JsValue {
    let err = js_sys::Error::new(&e.to_string());
    err.set_name(e.js_name());
    err.into()
}

fn js_err(e: Error) -> JsValue {
    to_js_error(&e)
}

fn config_error(reason: impl Into<String>) -> JsValue {
    to_js_error(&Error::InvalidConfig {
        reason: reason.into(),
    })
}

fn get(o: &JsValue, k: &str) -> JsValue {
    if o.is_object() {
        Reflect::get(o, &JsValue::from_str(k)).unwrap_or(JsValue::UNDEFINED)
    } else {
        JsValue::UNDEFINED
    }
}

fn set(o: &Object, k: &str, v: &JsValue) {
    let _ = Reflect::set(o, &JsValue::from_str(k), v);
}

fn present(v: &JsValue) -> bool {
    !v.is_undefined() && !v.is_null()
}

/// An `InvalidEventError` with `message` (input refused before anything is
/// written, found by the JS layer).
fn invalid_event(message: String) -> JsValue {
    named_error("InvalidEventError", &message)
}

/// `typeof v`, for messages.
fn type_of(v: &JsValue) -> String {
    v.js_typeof().as_string().unwrap_or_default()
}

/// `v` as a Rust string when it is a well-formed JS string: a lone surrogate
/// would become U+FFFD on the way, so it is refused, naming `what`.
fn exact_string(v: &JsValue, what: &str) -> Result<Option<String>, JsValue> {
    let Some(s) = v.dyn_ref::<js_sys::JsString>() else {
        return Ok(None);
    };
    if !is_well_formed(s) {
        return Err(invalid_event(format!(
            "{what} holds a lone UTF-16 surrogate (text cut inside a character, e.g. by slice() \
             in the middle of an emoji), which UTF-8 cannot hold; fix the text \
             (toWellFormed() replaces it with U+FFFD, if that is what you mean)"
        )));
    }
    Ok(Some(String::from(s)))
}

/// The ordering key: a string as it is, a finite number as JavaScript's
/// `String(n)` writes it (`-0` is `"0"`, `1e21` is `"1e+21"`).
fn event_key(key: &JsValue) -> Result<String, JsValue> {
    if let Some(s) = exact_string(key, "the key")? {
        return Ok(s);
    }
    match key.as_f64() {
        Some(n) if n.is_finite() => Ok(String::from(
            js_sys::Number::from(n)
                .to_string_with_radix(10)
                .map_err(|e| invalid_event(idb::error_parts(&e).1))?,
        )),
        Some(n) => Err(invalid_event(format!(
            "the key is {}: a key must be a string or a finite number",
            if n.is_nan() {
                "NaN"
            } else if n > 0.0 {
                "Infinity"
            } else {
                "-Infinity"
            }
        ))),
        None => Err(invalid_event(format!(
            "the key is a {}: a key must be a string or a finite number",
            type_of(key)
        ))),
    }
}

/// Build a [`NewEvent`] from the JS arguments `(type, payload, { key, headers })`.
/// Errors are `InvalidEventError`s that name the field and the cause.
fn new_event(event_type: &JsValue, payload: &JsValue, opts: &JsValue) -> Result<NewEvent, JsValue> {
    let event_type = exact_string(event_type, "the event type")?.ok_or_else(|| {
        invalid_event(format!(
            "the event type is a {}: it must be a string, such as \"TodoCreated\"",
            type_of(event_type)
        ))
    })?;
    let text = strict_json(payload)
        .map_err(|e| invalid_event(format!("invalid event payload: {}", idb::error_parts(&e).1)))?;
    let mut event = NewEvent::from_json_text(event_type, text).map_err(js_err)?;
    let key = get(opts, "key");
    if present(&key) {
        event = event.key(event_key(&key)?);
    }
    let headers = get(opts, "headers");
    if present(&headers) {
        if !headers.is_object() {
            return Err(invalid_event(format!(
                "the headers are a {}: they must be an object of strings",
                type_of(&headers)
            )));
        }
        for entry in Object::entries(headers.unchecked_ref()).iter() {
            let pair: Array = entry.unchecked_into();
            let name = exact_string(&pair.get(0), "a header name")?.unwrap_or_default();
            let value = pair.get(1);
            let value = exact_string(
                &value,
                &format!("the value of the header {}", quoted(&name)),
            )?
            .ok_or_else(|| {
                invalid_event(format!(
                    "the value of the header {} is a {}, not a string",
                    quoted(&name),
                    type_of(&value)
                ))
            })?;
            event = event.header(name, value);
        }
    }
    Ok(event)
}

/// An event as JS sees it (`OutboxEvent` in the TypeScript types).
fn event_to_js(e: &Event) -> JsValue {
    let o = Object::new();
    let ms = |t: Timestamp| JsValue::from_f64(t.as_millis() as f64);
    set(&o, "seq", &JsValue::from_f64(e.seq as f64));
    set(&o, "id", &JsValue::from_str(&e.id.to_string()));
    set(&o, "type", &JsValue::from_str(&e.event_type));
    set(
        &o,
        "key",
        &e.key.as_deref().map_or(JsValue::NULL, JsValue::from_str),
    );
    set(
        &o,
        "payload",
        &js_sys::JSON::parse(&e.payload).unwrap_or(JsValue::NULL),
    );
    let headers = Object::new();
    for (k, v) in &e.headers {
        set(&headers, k, &JsValue::from_str(v));
    }
    set(&o, "headers", &headers);
    set(&o, "createdAt", &ms(e.created_at));
    set(&o, "status", &JsValue::from_str(e.status.as_str()));
    set(&o, "attempts", &JsValue::from_f64(f64::from(e.attempts)));
    set(&o, "nextAttemptAt", &ms(e.next_attempt_at));
    set(
        &o,
        "lastError",
        &e.last_error
            .as_deref()
            .map_or(JsValue::NULL, JsValue::from_str),
    );
    set(&o, "sentAt", &e.sent_at.map_or(JsValue::NULL, ms));
    o.into()
}

fn status_to_js(s: &Status) -> JsValue {
    let o = Object::new();
    let n = |v: u64| JsValue::from_f64(v as f64);
    set(&o, "pending", &n(s.relay.pending));
    set(&o, "sent", &n(s.relay.sent));
    set(&o, "dead", &n(s.relay.dead));
    set(&o, "inFlight", &n(s.relay.in_flight as u64));
    set(&o, "online", &s.online.into());
    set(&o, "flushing", &s.flushing.into());
    set(&o, "leader", &s.leader.into());
    set(&o, "connection", &JsValue::from_str(s.connection.as_str()));
    set(
        &o,
        "lastError",
        &s.relay
            .last_error
            .as_deref()
            .map_or(JsValue::NULL, JsValue::from_str),
    );
    set(
        &o,
        "nextAttemptAt",
        &s.relay
            .next_attempt
            .map_or(JsValue::NULL, |t| JsValue::from_f64(t.as_millis() as f64)),
    );
    o.into()
}

fn key_path(v: &JsValue, what: &str) -> Result<Option<KeyPath>, JsValue> {
    if !present(v) {
        return Ok(None);
    }
    if let Some(s) = v.as_string() {
        return Ok(Some(KeyPath::One(s)));
    }
    if Array::is_array(v) {
        let parts: Option<Vec<String>> = Array::from(v).iter().map(|p| p.as_string()).collect();
        if let Some(parts) = parts {
            return Ok(Some(KeyPath::Many(parts)));
        }
    }
    Err(config_error(format!(
        "{what}: keyPath must be a string or an array of strings"
    )))
}

/// Parse `stores: { name: { keyPath, autoIncrement, indexes: { name: { keyPath, unique, multiEntry } } } }`.
fn app_stores(stores: &JsValue) -> Result<Vec<AppStore>, JsValue> {
    if !present(stores) {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for entry in Object::entries(stores.unchecked_ref()).iter() {
        let pair: Array = entry.unchecked_into();
        let name = pair.get(0).as_string().unwrap_or_default();
        if name.starts_with("edge_outbox") {
            return Err(config_error(format!(
                "the store name {} is reserved for the outbox",
                quoted(&name)
            )));
        }
        let def = pair.get(1);
        let mut indexes = Vec::new();
        let idx = get(&def, "indexes");
        if present(&idx) {
            for entry in Object::entries(idx.unchecked_ref()).iter() {
                let pair: Array = entry.unchecked_into();
                let index_name = pair.get(0).as_string().unwrap_or_default();
                let def = pair.get(1);
                let path = key_path(&get(&def, "keyPath"), &format!("index {index_name}"))?
                    .ok_or_else(|| config_error(format!("index {index_name} needs a keyPath")))?;
                indexes.push(AppIndex {
                    name: index_name,
                    key_path: path,
                    unique: get(&def, "unique").as_bool().unwrap_or(false),
                    multi_entry: get(&def, "multiEntry").as_bool().unwrap_or(false),
                });
            }
        }
        out.push(AppStore {
            key_path: key_path(&get(&def, "keyPath"), &format!("store {name}"))?,
            auto_increment: get(&def, "autoIncrement").as_bool().unwrap_or(false),
            name,
            indexes,
        });
    }
    Ok(out)
}

fn opt_ms(options: &JsValue, k: &str) -> Option<Duration> {
    get(options, k)
        .as_f64()
        .filter(|n| n.is_finite() && *n >= 0.0)
        .map(|n| Duration::from_millis(n as u64))
}

/// How long `Outbox.open` waits for an upgrade blocked by another
/// connection before it rejects with a `BlockedError` (`blockedTimeoutMs`).
pub const DEFAULT_BLOCKED_TIMEOUT_MS: f64 = 10_000.0;

/// Name of the error of calls on an outbox whose connection was lost for
/// good (see [`IdbStore::lost_reason`]).
pub const CONNECTION_LOST_ERROR: &str = "ConnectionLostError";

/// The JS error of a store call: [`Error::Closed`] on a connection lost for
/// good becomes a `ConnectionLostError` that says why.
pub(crate) fn store_error(store: &IdbStore, e: Error) -> JsValue {
    match (&e, store.lost_reason()) {
        (Error::Closed, Some(reason)) => named_error(
            CONNECTION_LOST_ERROR,
            &format!(
                "the outbox lost its IndexedDB connection: {reason}; open the outbox again (reload the page)"
            ),
        ),
        _ => js_err(e),
    }
}

struct Shared {
    store: IdbStore,
    target: EventTarget,
    driver: Option<Driver>,
}

/// An outbox over an IndexedDB database: the app's stores and the outbox
/// commit together; a relay delivers the events to the sync endpoint.
#[wasm_bindgen(skip_typescript)]
pub struct Outbox {
    shared: Rc<Shared>,
}

impl Outbox {
    /// `Outbox.open` for Rust callers (tests, apps written in Rust that also
    /// expose the JS API): the same options object, the outbox itself.
    pub async fn open_with(options: JsValue) -> Result<Outbox, JsValue> {
        let database = get(&options, "database")
            .as_string()
            .filter(|s| !s.is_empty())
            .ok_or_else(|| config_error("options.database (the IndexedDB name) is required"))?;
        let stores = app_stores(&get(&options, "stores"))?;
        let durability = match get(&options, "durability").as_string() {
            None => Durability::Default,
            Some(s) => Durability::parse(&s).ok_or_else(|| {
                config_error(format!(
                    "durability must be \"strict\", \"relaxed\" or \"default\", not {}",
                    quoted(&s)
                ))
            })?,
        };
        let max_event_bytes = get(&options, "maxEventBytes")
            .as_f64()
            .map_or(DEFAULT_MAX_EVENT_BYTES, |n| n as usize);
        let blocked = Blocked {
            on_blocked: get(&options, "onBlocked").dyn_into::<Function>().ok(),
            timeout_ms: match get(&options, "blockedTimeoutMs") {
                v if v.is_null() => None,
                v if v.is_undefined() => Some(DEFAULT_BLOCKED_TIMEOUT_MS),
                v => Some(v.as_f64().filter(|n| *n >= 0.0).ok_or_else(|| {
                    config_error("blockedTimeoutMs must be a number of milliseconds, or null")
                })?),
            },
        };
        let db = open_database(&database, &stores, &blocked)
            .await
            .map_err(|e| match e {
                OpenFailure::Blocked(e) => e,
                OpenFailure::Error(e) => js_err(e),
            })?;
        let store = IdbStore::from_database(db, durability, max_event_bytes)
            .await
            .map_err(js_err)?;
        store.set_app_stores(stores);
        let target = EventTarget::new().map_err(|e| config_error(idb::error_parts(&e).1))?;

        let endpoint = get(&options, "endpoint").as_string();
        let driver = endpoint.map(|endpoint| {
            let mut transport = FetchTransport::new(
                endpoint,
                opt_ms(&options, "timeoutMs").unwrap_or(Duration::from_secs(20)),
            );
            if let Some(f) = get(&options, "headers").dyn_ref::<Function>() {
                transport = transport.with_headers(f.clone());
            }
            if let Some(rate) = get(&options, "minUploadRate").as_f64() {
                transport = transport.with_min_upload_rate(rate as u64);
            }
            let retry = get(&options, "retry");
            let mut policy = RetryPolicy::new();
            if let Some(d) = opt_ms(&retry, "baseMs") {
                policy = policy.with_base(d);
            }
            if let Some(d) = opt_ms(&retry, "capMs") {
                policy = policy.with_cap(d);
            }
            policy = policy.with_max_age(opt_ms(&retry, "maxAgeMs"));
            let mut relay = RelayConfig::new().with_retry(policy);
            if let Some(n) = get(&options, "batchSize").as_f64() {
                relay = relay.with_max_events(n as usize);
            }
            if let Some(n) = get(&options, "batchBytes").as_f64() {
                relay = relay.with_max_bytes(n as usize);
            }
            Driver::new(
                store.clone(),
                transport,
                DriverConfig {
                    relay,
                    error_pause_ms: 1000.0,
                },
            )
        });
        if let Some(driver) = &driver {
            let target = target.clone();
            driver.set_listener(Some(Rc::new(move |s: &Status| {
                let init = CustomEventInit::new();
                init.set_detail(&status_to_js(s));
                if let Ok(e) = CustomEvent::new_with_event_init_dict("status", &init) {
                    let _ = target.dispatch_event(&e);
                }
            })));
            if get(&options, "autoStart").as_bool() != Some(false) {
                driver.start();
            }
        }
        Ok(Outbox {
            shared: Rc::new(Shared {
                store,
                target,
                driver,
            }),
        })
    }
}

#[wasm_bindgen]
impl Outbox {
    /// `Outbox.open({ database, stores, endpoint, durability, headers, ... })`:
    /// open (creating or upgrading) the database with the app's declared
    /// stores and the outbox stores, and start the relay when an endpoint is
    /// given (unless `autoStart: false`).
    #[wasm_bindgen(js_name = open)]
    pub fn open(options: JsValue) -> Promise {
        future_to_promise(async move { Outbox::open_with(options).await.map(JsValue::from) })
    }

    /// Run `callback(tx)` in ONE IndexedDB transaction over `storeNames` and
    /// the outbox; resolves with the callback's value once committed. A throw,
    /// a failed request or an invalid event aborts everything and rejects
    /// with the cause.
    pub fn transaction(&self, store_names: JsValue, callback: Function) -> Promise {
        let shared = self.shared.clone();
        future_to_promise(async move {
            let names = Array::new();
            if let Some(s) = store_names.as_string() {
                names.push(&JsValue::from_str(&s));
            } else if Array::is_array(&store_names) {
                for n in Array::from(&store_names).iter() {
                    names.push(&n);
                }
            } else {
                return Err(config_error(
                    "storeNames must be a string or an array of strings",
                ));
            }
            names.push(&JsValue::from_str(EVENTS));
            if shared.store.is_closed() {
                return Err(store_error(&shared.store, Error::Closed));
            }
            let tx =
                shared.store.app_transaction(&names).await.map_err(|e| {
                    match idb::to_error("starting the transaction", e.clone()) {
                        Error::Closed => store_error(&shared.store, Error::Closed),
                        _ if e.is_string() => store_error(&shared.store, Error::Closed),
                        _ => e,
                    }
                })?;
            let mut done = idb::done(&tx);
            let state = Rc::new(TxState {
                tx: tx.clone(),
                store: shared.store.clone(),
                failure: std::cell::RefCell::new(None),
                enqueued: std::cell::Cell::new(0),
                raw_taken: std::cell::Cell::new(false),
            });
            let handle: JsValue = OutboxTransaction {
                state: state.clone(),
            }
            .into();
            // An async callback may await this transaction's own requests
            // (tx.get); awaiting anything else is refused before IndexedDB
            // can commit part of the work (see `guardedCall`).
            let outcome = JsFuture::from(guarded_call(&tx, EVENTS, &callback, &handle)).await;
            // The handle is only valid inside the callback.
            if let Some(free) = get(&handle, "free").dyn_ref::<Function>() {
                let _ = free.call0(&handle);
            }
            let failure = state.failure.borrow_mut().take();
            let value = match (outcome, failure) {
                (_, Some(cause)) | (Err(cause), None) => {
                    let _ = tx.abort();
                    let _ = done.await;
                    return Err(cause);
                }
                (Ok(value), None) => value,
            };
            // The callback is done and its handle freed: no request can follow.
            if !state.raw_taken.get() {
                done.commit_now();
            }
            done.await?;
            if state.enqueued.get() > 0 {
                shared.store.committed();
            }
            Ok(value)
        })
    }

    /// Add an event to the app's own `IDBTransaction` (Dexie, idb), whose
    /// scope must include `"edge_outbox_events"`. Returns the event id. An
    /// invalid event aborts that transaction and throws.
    #[wasm_bindgen(js_name = enqueueIn)]
    pub fn enqueue_in(
        &self,
        transaction: IdbTransaction,
        event_type: JsValue,
        payload: JsValue,
        options: JsValue,
    ) -> Result<String, JsValue> {
        let result = new_event(&event_type, &payload, &options).and_then(|e| {
            self.shared
                .store
                .enqueue_in(&transaction, &e)
                .map_err(js_err)
        });
        match result {
            Ok(id) => {
                let store = self.shared.store.clone();
                let on_complete = Closure::once_into_js(move || store.committed());
                let _ = transaction
                    .add_event_listener_with_callback("complete", on_complete.unchecked_ref());
                Ok(id.to_string())
            }
            Err(e) => {
                let _ = transaction.abort();
                Err(e)
            }
        }
    }

    /// Enqueue one event alone (no app state): resolves with its id once committed.
    pub fn enqueue(&self, event_type: JsValue, payload: JsValue, options: JsValue) -> Promise {
        let store = self.shared.store.clone();
        future_to_promise(async move {
            let event = new_event(&event_type, &payload, &options)?;
            let stored = store
                .enqueue(vec![event])
                .await
                .map_err(|e| store_error(&store, e))?;
            Ok(JsValue::from_str(
                &stored.first().map(|e| e.id.to_string()).unwrap_or_default(),
            ))
        })
    }

    fn driver(&self) -> Result<Driver, JsValue> {
        self.shared.driver.clone().ok_or_else(|| {
            config_error("this outbox has no endpoint; pass `endpoint` to Outbox.open")
        })
    }

    /// Deliver what is due now; resolves with `{ sent, dead, pending,
    /// nextAttemptAt, lastError, skipped }`, where `skipped` says why no
    /// attempt was made (`"offline"`, `"not-leader"`, `"stopped"`) or is null.
    /// Rejects with a real `Error` named after its kind ([`Error::js_name`]).
    pub fn flush(&self) -> Promise {
        let driver = self.driver();
        let store = self.shared.store.clone();
        future_to_promise(async move {
            let outcome = driver?.flush().await.map_err(|e| store_error(&store, e))?;
            Ok(report_to_js(&outcome))
        })
    }

    /// Start the relay (after `stop()`, or with `autoStart: false`).
    pub fn start(&self) -> Result<(), JsValue> {
        self.driver()?.start();
        Ok(())
    }

    /// Stop the relay; pending events stay and are sent after `start()`.
    pub fn stop(&self) -> Promise {
        let driver = self.shared.driver.clone();
        future_to_promise(async move {
            if let Some(d) = driver {
                d.stop().await;
            }
            Ok(JsValue::UNDEFINED)
        })
    }

    /// Counts: `{ pending, sent, dead, oldestPendingAt }`.
    pub fn stats(&self) -> Promise {
        let store = self.shared.store.clone();
        future_to_promise(async move {
            let s = store.stats().await.map_err(|e| store_error(&store, e))?;
            let o = Object::new();
            set(&o, "pending", &JsValue::from_f64(s.pending as f64));
            set(&o, "sent", &JsValue::from_f64(s.sent as f64));
            set(&o, "dead", &JsValue::from_f64(s.dead as f64));
            set(
                &o,
                "oldestPendingAt",
                &s.oldest_pending_at
                    .map_or(JsValue::NULL, |t| JsValue::from_f64(t.as_millis() as f64)),
            );
            Ok(o.into())
        })
    }

    /// Up to `limit` (default 100) pending events, oldest first.
    pub fn pending(&self, limit: Option<u32>) -> Promise {
        let store = self.shared.store.clone();
        future_to_promise(async move {
            let events = store
                .pending(limit.unwrap_or(100) as usize)
                .await
                .map_err(|e| store_error(&store, e))?;
            Ok(events.iter().map(event_to_js).collect::<Array>().into())
        })
    }

    /// Up to `limit` (default 100) dead events, oldest first.
    #[wasm_bindgen(js_name = deadLetters)]
    pub fn dead_letters(&self, limit: Option<u32>) -> Promise {
        let store = self.shared.store.clone();
        future_to_promise(async move {
            let events = store
                .dead_letters(limit.unwrap_or(100) as usize)
                .await
                .map_err(|e| store_error(&store, e))?;
            Ok(events.iter().map(event_to_js).collect::<Array>().into())
        })
    }

    /// Make a dead event pending again; resolves false when no dead event has this id.
    pub fn retry(&self, id: String) -> Promise {
        let store = self.shared.store.clone();
        future_to_promise(async move {
            let id: EventId = id.parse().map_err(js_err)?;
            Ok(store
                .retry(id, Timestamp::now())
                .await
                .map_err(|e| store_error(&store, e))?
                .into())
        })
    }

    /// "Try now": every pending event waiting for a retry time (backoff,
    /// `Retry-After`) becomes due, and the sender (this tab's relay, or
    /// another tab's) is woken. Resolves with how many events were waiting.
    #[wasm_bindgen(js_name = retryNow)]
    pub fn retry_now(&self) -> Promise {
        let store = self.shared.store.clone();
        future_to_promise(async move {
            let waiting = store
                .retry_now(Timestamp::now())
                .await
                .map_err(|e| store_error(&store, e))?;
            // Wake the sender here, and tell the other tabs (as a commit does).
            store.committed();
            Ok(JsValue::from_f64(waiting as f64))
        })
    }

    /// Delete a dead event; resolves false when no dead event has this id.
    pub fn discard(&self, id: String) -> Promise {
        let store = self.shared.store.clone();
        future_to_promise(async move {
            let id: EventId = id.parse().map_err(js_err)?;
            Ok(store
                .discard(id)
                .await
                .map_err(|e| store_error(&store, e))?
                .into())
        })
    }

    /// Delete sent events acknowledged more than `olderThanMs` ago; resolves with how many.
    #[wasm_bindgen(js_name = pruneSent)]
    pub fn prune_sent(&self, older_than_ms: f64) -> Promise {
        let store = self.shared.store.clone();
        future_to_promise(async move {
            let before = Timestamp::now().sub(Duration::from_millis(older_than_ms.max(0.0) as u64));
            Ok(JsValue::from_f64(
                store
                    .prune_sent(before)
                    .await
                    .map_err(|e| store_error(&store, e))? as f64,
            ))
        })
    }

    /// Stop the relay (handing over to another tab) and close the database.
    pub fn close(&self) -> Promise {
        let shared = self.shared.clone();
        future_to_promise(async move {
            if let Some(d) = &shared.driver {
                d.close().await;
            }
            shared.store.close();
            Ok(JsValue::UNDEFINED)
        })
    }

    /// The latest relay status (as in the `status` event).
    #[wasm_bindgen(getter)]
    pub fn status(&self) -> JsValue {
        let status = self
            .shared
            .driver
            .as_ref()
            .map(Driver::status)
            .unwrap_or_default();
        status_to_js(&status)
    }

    /// The client id (stream name at the server), made at first open.
    #[wasm_bindgen(getter, js_name = clientId)]
    pub fn client_id(&self) -> String {
        self.shared.store.client_id().to_owned()
    }

    /// The IndexedDB connection (read the app's stores with it).
    #[wasm_bindgen(getter)]
    pub fn db(&self) -> IdbDatabase {
        self.shared.store.database()
    }

    /// Listen to `status` events (`event.detail` is the status).
    #[wasm_bindgen(js_name = addEventListener)]
    pub fn add_event_listener(&self, kind: String, listener: Function) -> Result<(), JsValue> {
        self.shared
            .target
            .add_event_listener_with_callback(&kind, &listener)
    }

    /// Stop listening.
    #[wasm_bindgen(js_name = removeEventListener)]
    pub fn remove_event_listener(&self, kind: String, listener: Function) -> Result<(), JsValue> {
        self.shared
            .target
            .remove_event_listener_with_callback(&kind, &listener)
    }

    /// Force the online state (`true`/`false`) or follow `navigator.onLine`
    /// again (`null`). For tests, and for apps that detect connectivity better.
    #[wasm_bindgen(js_name = setOnline)]
    pub fn set_online(&self, online: Option<bool>) -> Result<(), JsValue> {
        self.driver()?.set_online_override(online);
        Ok(())
    }
}

/// A JavaScript `Error` named `name` (errors of the browser's lifecycle that
/// the crate's [`Error`] has no kind for).
pub(crate) fn named_error(name: &str, message: &str) -> JsValue {
    let err = js_sys::Error::new(message);
    err.set_name(name);
    err.into()
}

struct TxState {
    tx: IdbTransaction,
    store: IdbStore,
    /// The first failure inside the callback: the transaction is aborted with it.
    failure: std::cell::RefCell<Option<JsValue>>,
    enqueued: std::cell::Cell<u32>,
    /// The callback took the raw `idbTransaction`: it may chain requests from
    /// `success` handlers, so the transaction is left to commit by itself.
    raw_taken: std::cell::Cell<bool>,
}

impl TxState {
    /// Record `cause` (the first one wins), abort, and hand it back to throw.
    fn fail(&self, cause: JsValue) -> JsValue {
        // Used after the callback awaited something else: say so, not
        // what the closed transaction made the request look like.
        let cause = if is_inactive(&self.tx, EVENTS) {
            foreign_await_error(cause)
        } else {
            cause
        };
        let mut failure = self.failure.borrow_mut();
        if failure.is_none() {
            *failure = Some(cause.clone());
        }
        let _ = self.tx.abort();
        cause
    }
}

/// The `tx` handed to the `outbox.transaction` callback. Valid only inside it.
#[wasm_bindgen(skip_typescript)]
pub struct OutboxTransaction {
    state: Rc<TxState>,
}

#[wasm_bindgen]
impl OutboxTransaction {
    fn object_store(&self, name: &str) -> Result<web_sys::IdbObjectStore, JsValue> {
        self.state
            .tx
            .object_store(name)
            .map_err(|e| self.state.fail(e))
    }

    /// `put` into one of the app's stores (`key` for out-of-line keys).
    pub fn put(&self, store: String, value: JsValue, key: JsValue) -> Result<(), JsValue> {
        let s = self.object_store(&store)?;
        let r = if key.is_undefined() {
            s.put(&value)
        } else {
            s.put_with_key(&value, &key)
        };
        r.map(|_| ()).map_err(|e| self.state.fail(e))
    }

    /// `add` into one of the app's stores (fails, and aborts, if the key exists).
    pub fn add(&self, store: String, value: JsValue, key: JsValue) -> Result<(), JsValue> {
        let s = self.object_store(&store)?;
        let r = if key.is_undefined() {
            s.add(&value)
        } else {
            s.add_with_key(&value, &key)
        };
        r.map(|_| ()).map_err(|e| self.state.fail(e))
    }

    /// `delete` a key (or key range) from one of the app's stores.
    pub fn delete(&self, store: String, key: JsValue) -> Result<(), JsValue> {
        let s = self.object_store(&store)?;
        s.delete(&key).map(|_| ()).map_err(|e| self.state.fail(e))
    }

    /// Read a record of one of the app's stores inside this transaction.
    pub fn get(&self, store: String, key: JsValue) -> Result<Promise, JsValue> {
        let s = self.object_store(&store)?;
        let req = s.get(&key).map_err(|e| self.state.fail(e))?;
        Ok(super::idb::request_promise(&req))
    }

    /// Add an event; it commits with the transaction. Returns its id. An
    /// invalid event aborts the whole transaction and throws `InvalidEventError`.
    pub fn enqueue(
        &self,
        event_type: JsValue,
        payload: JsValue,
        options: JsValue,
    ) -> Result<String, JsValue> {
        let result = new_event(&event_type, &payload, &options).and_then(|e| {
            self.state
                .store
                .enqueue_in(&self.state.tx, &e)
                .map_err(js_err)
        });
        match result {
            Ok(id) => {
                self.state.enqueued.set(self.state.enqueued.get() + 1);
                Ok(id.to_string())
            }
            Err(e) => Err(self.state.fail(e)),
        }
    }

    /// The underlying `IDBTransaction` (for requests this API does not wrap).
    #[wasm_bindgen(getter, js_name = idbTransaction)]
    pub fn idb_transaction(&self) -> IdbTransaction {
        self.state.raw_taken.set(true);
        self.state.tx.clone()
    }
}
