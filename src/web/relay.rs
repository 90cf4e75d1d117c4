//! The relay driver in the browser: runs the target-independent core
//! ([`crate::relay::Relay`]) on the event loop of a page or a worker.
//!
//! - Wakes on a local commit (this tab's, or another tab's through a
//!   `BroadcastChannel`), on the global `online` event, on the retry timer
//!   from the core's status, and on an explicit flush.
//! - While offline (`navigator.onLine === false`, or the test override) it
//!   waits without claiming, so no attempt is spent.
//! - One sender per outbox across tabs and workers: the driver sends only
//!   while it holds the Web Lock `edge-outbox:{database}`; other tabs queue
//!   for it and take over when the holder stops or closes. Because the lock
//!   already excludes other senders, every holder uses the same store lease
//!   owner, so a new holder renews a closed tab's lease at once; an event that
//!   tab had in flight is still pending and is sent again (the server dedupes).

use std::cell::{Cell, RefCell};
use std::rc::{Rc, Weak};

use js_sys::{Function, Promise, Reflect};
use wasm_bindgen::JsCast;
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::{JsFuture, spawn_local};
use web_sys::{BroadcastChannel, EventTarget};

use super::store::IdbStore;
use super::transport::{FetchTransport, clear_timeout, set_timeout};
use crate::error::{Error, Result};
use crate::relay::{FlushReport, Relay, RelayConfig, RelayStatus};
use crate::store::Store;
use crate::time::Timestamp;

#[wasm_bindgen(inline_js = r#"
export function acquireLock(name, onAcquired) {
  const locks = globalThis.navigator && globalThis.navigator.locks;
  if (!locks) return null;
  let release;
  const held = new Promise((resolve) => { release = resolve; });
  locks.request(name, () => { onAcquired(); return held; }).catch(() => {});
  return release;
}
export function tryLock(name, work) {
  const locks = globalThis.navigator && globalThis.navigator.locks;
  if (!locks) return work(true);
  return locks.request(name, { ifAvailable: true }, (lock) => work(lock !== null));
}
"#)]
extern "C" {
    /// Queue for the Web Lock `name`; `on_acquired` runs once it is held.
    /// Returns the function that releases it, or null without Web Locks.
    #[wasm_bindgen(js_name = acquireLock)]
    fn acquire_lock(name: &str, on_acquired: &JsValue) -> JsValue;

    /// Run `work(held)` holding the lock if it is free right now
    /// (`held = false` when another context holds it).
    #[wasm_bindgen(js_name = tryLock)]
    fn try_lock(name: &str, work: &Function) -> Promise;
}

/// What the status event tells the app.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Status {
    /// The core's status (counts, last error, next attempt).
    pub relay: RelayStatus,
    /// What the driver believes about the network.
    pub online: bool,
    /// True while a flush runs.
    pub flushing: bool,
    /// True while this context holds the sender lock.
    pub leader: bool,
}

/// Settings of the browser relay.
#[derive(Clone, Debug)]
pub struct DriverConfig {
    /// Batching, lease and retry settings of the core.
    pub relay: RelayConfig,
    /// Wait this long before trying again after a failure the core gave no
    /// retry time for (a store error).
    pub error_pause_ms: f64,
}

type StatusListener = Rc<dyn Fn(&Status)>;

/// A JS event callback kept alive from Rust.
type JsCallback = Closure<dyn FnMut(JsValue)>;

/// The running relay of one outbox in this context. Cheap to clone.
#[derive(Clone)]
pub struct Driver {
    state: Rc<State>,
}

struct State {
    store: IdbStore,
    /// The core; taken out while a flush runs (one flush at a time).
    relay: RefCell<Option<Relay<IdbStore, FetchTransport>>>,
    lock_name: String,
    error_pause_ms: f64,
    running: Cell<bool>,
    leader: Cell<bool>,
    /// Releases the Web Lock (null without Web Locks).
    release_lock: RefCell<JsValue>,
    /// A wake arrived while the loop was not waiting: run another round.
    dirty: Cell<bool>,
    /// Resolves the loop's current wait.
    wake: RefCell<Option<(Function, JsValue)>>,
    /// Flush requests waiting for the loop's next round.
    flush_waiters: RefCell<Vec<(Function, Function)>>,
    online_override: Cell<Option<bool>>,
    status: RefCell<Status>,
    listener: RefCell<Option<StatusListener>>,
    channel: Option<BroadcastChannel>,
    /// Kept alive while the driver lives; removed from the global at close.
    global_listeners: RefCell<Vec<(&'static str, JsCallback)>>,
    _channel_listener: RefCell<Option<JsCallback>>,
}

fn global_navigator_online() -> bool {
    let nav = Reflect::get(&js_sys::global(), &"navigator".into()).unwrap_or(JsValue::UNDEFINED);
    if nav.is_undefined() {
        return true;
    }
    Reflect::get(&nav, &"onLine".into())
        .ok()
        .and_then(|v| v.as_bool())
        .unwrap_or(true)
}

impl Driver {
    /// A driver for `store`, sending with `transport`. Not running until
    /// [`Driver::start`].
    pub fn new(store: IdbStore, transport: FetchTransport, config: DriverConfig) -> Driver {
        let lock_name = format!("edge-outbox:{}", store.name());
        // The Web Lock excludes other senders, so all holders share one lease owner.
        let relay_config = config.relay.with_owner(lock_name.clone());
        let relay = Relay::new(store.clone(), transport, relay_config);
        let channel = BroadcastChannel::new(&lock_name).ok();
        let state = Rc::new(State {
            store: store.clone(),
            relay: RefCell::new(Some(relay)),
            lock_name,
            error_pause_ms: config.error_pause_ms,
            running: Cell::new(false),
            leader: Cell::new(false),
            release_lock: RefCell::new(JsValue::NULL),
            dirty: Cell::new(false),
            wake: RefCell::new(None),
            flush_waiters: RefCell::new(Vec::new()),
            online_override: Cell::new(None),
            status: RefCell::new(Status {
                online: global_navigator_online(),
                ..Status::default()
            }),
            listener: RefCell::new(None),
            channel,
            global_listeners: RefCell::new(Vec::new()),
            _channel_listener: RefCell::new(None),
        });
        let driver = Driver { state };
        driver.install_listeners();
        driver
    }

    fn install_listeners(&self) {
        let st = &self.state;
        // Status from the core: published after every change.
        let weak = Rc::downgrade(st);
        if let Some(relay) = st.relay.borrow_mut().as_mut() {
            relay.set_observer(move |s: &RelayStatus| {
                if let Some(st) = weak.upgrade() {
                    st.status.borrow_mut().relay = s.clone();
                    emit(&st);
                }
            });
        }
        // Commits in this context wake the loop and tell the other tabs.
        let weak = Rc::downgrade(st);
        st.store.set_on_commit(Some(Rc::new(move || {
            if let Some(st) = weak.upgrade() {
                wake(&st);
                if let Some(ch) = &st.channel {
                    let _ = ch.post_message(&"commit".into());
                }
            }
        })));
        // Commits and flush requests of other tabs.
        if let Some(ch) = &st.channel {
            let weak = Rc::downgrade(st);
            let on_message = Closure::<dyn FnMut(JsValue)>::new(move |_e: JsValue| {
                if let Some(st) = weak.upgrade() {
                    if st.leader.get() {
                        wake(&st);
                    } else {
                        // Not the sender: refresh the counts the app shows.
                        refresh_counts(&st);
                    }
                }
            });
            ch.set_onmessage(Some(on_message.as_ref().unchecked_ref()));
            *st._channel_listener.borrow_mut() = Some(on_message);
        }
        // The network coming back, or going away.
        let global: EventTarget = js_sys::global().unchecked_into();
        for kind in ["online", "offline"] {
            let weak: Weak<State> = Rc::downgrade(st);
            let cb = Closure::<dyn FnMut(JsValue)>::new(move |_e: JsValue| {
                if let Some(st) = weak.upgrade() {
                    let online = is_online(&st);
                    st.status.borrow_mut().online = online;
                    emit(&st);
                    wake(&st);
                }
            });
            let _ = global.add_event_listener_with_callback(kind, cb.as_ref().unchecked_ref());
            st.global_listeners.borrow_mut().push((kind, cb));
        }
    }

    /// Receive every status change.
    pub fn set_listener(&self, f: Option<StatusListener>) {
        *self.state.listener.borrow_mut() = f;
    }

    /// The latest status.
    pub fn status(&self) -> Status {
        self.state.status.borrow().clone()
    }

    /// Force the online state (`Some`) or go back to `navigator.onLine`
    /// (`None`). Tests use it to simulate an offline period; apps can use it
    /// when they know better than the browser (a captive portal).
    pub fn set_online_override(&self, online: Option<bool>) {
        self.state.online_override.set(online);
        let now = is_online(&self.state);
        self.state.status.borrow_mut().online = now;
        emit(&self.state);
        wake(&self.state);
    }

    /// True while this context is running its relay loop.
    pub fn is_running(&self) -> bool {
        self.state.running.get()
    }

    /// Start the loop: queue for the sender lock, then deliver whenever woken.
    pub fn start(&self) {
        let st = &self.state;
        if st.running.replace(true) {
            return;
        }
        let weak = Rc::downgrade(st);
        let on_acquired = Closure::once_into_js(move || {
            if let Some(st) = weak.upgrade()
                && st.running.get()
            {
                st.leader.set(true);
                st.status.borrow_mut().leader = true;
                emit(&st);
                wake(&st);
            }
        });
        let release = acquire_lock(&st.lock_name, &on_acquired);
        if release.is_null() {
            // No Web Locks (very old browser): the store lease alone decides.
            st.leader.set(true);
            st.status.borrow_mut().leader = true;
        }
        *st.release_lock.borrow_mut() = release;
        spawn_local(run(st.clone()));
    }

    /// Stop the loop and hand the sender lock to another tab. An in-flight
    /// batch still settles (or stays pending).
    pub async fn stop(&self) {
        let st = &self.state;
        if !st.running.replace(false) {
            return;
        }
        wake(st);
        release_lock(st);
        // Give up the store lease so another sender need not wait for it.
        if let Some(mut relay) = take_relay(st).await {
            let _ = relay.release_lease().await;
            *st.relay.borrow_mut() = Some(relay);
        }
    }

    /// Wake the loop (after a commit the store did not see, e.g. `enqueueIn`).
    pub fn wake(&self) {
        wake(&self.state);
    }

    /// Deliver what is due now and report. In the sending context this runs
    /// the next round of the loop; with the loop stopped it runs here if no
    /// other context holds the sender lock; otherwise it asks the sender (over
    /// the BroadcastChannel) and reports the current counts.
    pub async fn flush(&self) -> Result<FlushReport> {
        let st = self.state.clone();
        if !is_online(&st) {
            // Offline: no attempt is made (none is spent); report the counts.
            return counts_report(&st).await;
        }
        if st.running.get() && st.leader.get() {
            let promise = Promise::new(&mut |resolve, reject| {
                st.flush_waiters.borrow_mut().push((resolve, reject));
            });
            wake(&st);
            let report = JsFuture::from(promise).await.map_err(|e| Error::Storage {
                message: super::idb::error_parts(&e).1,
                source: None,
            })?;
            return Ok(report_from_js(&report));
        }
        let st2 = st.clone();
        let work = Closure::once_into_js(move |held: JsValue| -> Promise {
            if held.as_bool() != Some(true) {
                return Promise::resolve(&JsValue::NULL);
            }
            wasm_bindgen_futures::future_to_promise(async move {
                let report = flush_now(&st2)
                    .await
                    .map_err(|e| JsValue::from_str(&e.to_string()))?;
                Ok(report_to_js(&report))
            })
        });
        let result = JsFuture::from(try_lock(&st.lock_name, work.unchecked_ref()))
            .await
            .map_err(|e| Error::Storage {
                message: super::idb::error_parts(&e).1,
                source: None,
            })?;
        if result.is_null() {
            // Another context sends: nudge it, report what is known.
            if let Some(ch) = &st.channel {
                let _ = ch.post_message(&"flush".into());
            }
            return counts_report(&st).await;
        }
        Ok(report_from_js(&result))
    }

    /// Stop, and drop every listener (the outbox is closing).
    pub async fn close(&self) {
        self.stop().await;
        let st = &self.state;
        let global: EventTarget = js_sys::global().unchecked_into();
        for (kind, cb) in st.global_listeners.borrow_mut().drain(..) {
            let _ = global.remove_event_listener_with_callback(kind, cb.as_ref().unchecked_ref());
        }
        if let Some(ch) = &st.channel {
            ch.set_onmessage(None);
            ch.close();
        }
        st.store.set_on_commit(None);
        *st.listener.borrow_mut() = None;
    }
}

fn is_online(st: &State) -> bool {
    st.online_override
        .get()
        .unwrap_or_else(global_navigator_online)
}

fn emit(st: &Rc<State>) {
    let listener = st.listener.borrow().clone();
    if let Some(f) = listener {
        let status = st.status.borrow().clone();
        f(&status);
    }
}

fn wake(st: &State) {
    st.dirty.set(true);
    let waiting = st.wake.borrow_mut().take();
    if let Some((resolve, timer)) = waiting {
        if !timer.is_undefined() {
            clear_timeout(&timer);
        }
        let _ = resolve.call0(&JsValue::UNDEFINED);
    }
}

fn release_lock(st: &State) {
    let release = st.release_lock.replace(JsValue::NULL);
    if let Some(f) = release.dyn_ref::<Function>() {
        let _ = f.call0(&JsValue::UNDEFINED);
    }
    st.leader.set(false);
    st.status.borrow_mut().leader = false;
}

/// Wait until woken, or `ms` milliseconds (forever when `None`).
async fn sleep(st: &State, ms: Option<f64>) {
    if st.dirty.replace(false) {
        return;
    }
    let promise = Promise::new(&mut |resolve, _reject| {
        let timer = match ms {
            // setTimeout's delay is a signed 32-bit number of milliseconds.
            Some(ms) => set_timeout(&resolve, ms.clamp(0.0, 2_147_483_647.0)),
            None => JsValue::UNDEFINED,
        };
        *st.wake.borrow_mut() = Some((resolve, timer));
    });
    let _ = JsFuture::from(promise).await;
    st.dirty.set(false);
}

/// Take the core out for one flush, waiting while another flush has it.
async fn take_relay(st: &State) -> Option<Relay<IdbStore, FetchTransport>> {
    for _ in 0..600 {
        if let Some(relay) = st.relay.borrow_mut().take() {
            return Some(relay);
        }
        // Another flush runs: poll again shortly (flushes are short).
        let promise = Promise::new(&mut |resolve, _| {
            set_timeout(&resolve, 50.0);
        });
        let _ = JsFuture::from(promise).await;
    }
    None
}

async fn flush_now(st: &Rc<State>) -> Result<FlushReport> {
    let Some(mut relay) = take_relay(st).await else {
        return Err(Error::Storage {
            message: "another flush did not finish within 30 s".into(),
            source: None,
        });
    };
    st.status.borrow_mut().flushing = true;
    emit(st);
    let result = relay.flush().await;
    *st.relay.borrow_mut() = Some(relay);
    st.status.borrow_mut().flushing = false;
    if let Err(e) = &result {
        st.status.borrow_mut().relay.last_error = Some(e.to_string());
    }
    emit(st);
    if let Some(ch) = &st.channel {
        // Followers refresh their counts.
        let _ = ch.post_message(&"flushed".into());
    }
    result
}

async fn counts_report(st: &State) -> Result<FlushReport> {
    let stats = st.store.stats().await?;
    Ok(FlushReport {
        pending: stats.pending,
        ..FlushReport::default()
    })
}

fn refresh_counts(st: &Rc<State>) {
    let st = st.clone();
    spawn_local(async move {
        if let Ok(stats) = st.store.stats().await {
            {
                let mut s = st.status.borrow_mut();
                s.relay.pending = stats.pending;
                s.relay.sent = stats.sent;
                s.relay.dead = stats.dead;
            }
            emit(&st);
        }
    });
}

/// The loop: one per running driver.
async fn run(st: Rc<State>) {
    // Let the first round happen at once (events left from earlier sessions).
    st.dirty.set(true);
    while st.running.get() {
        if !st.leader.get() {
            // Waiting for the sender lock; commits elsewhere are not ours to send.
            sleep(&st, None).await;
            continue;
        }
        if !is_online(&st) {
            // Offline: wait for the `online` event without spending attempts.
            sleep(&st, None).await;
            continue;
        }
        st.dirty.set(false);
        let waiters: Vec<_> = st.flush_waiters.borrow_mut().drain(..).collect();
        let result = flush_now(&st).await;
        for (resolve, reject) in waiters {
            let _ = match &result {
                Ok(report) => resolve.call1(&JsValue::UNDEFINED, &report_to_js(report)),
                Err(e) => reject.call1(&JsValue::UNDEFINED, &JsValue::from_str(&e.to_string())),
            };
        }
        if !st.running.get() {
            break;
        }
        let pause = match &result {
            Err(_) => Some(st.error_pause_ms),
            Ok(report) => {
                let until = report.lease_held_until.or(report.next_attempt);
                match until {
                    Some(t) => Some((t.as_millis() - Timestamp::now().as_millis()).max(0) as f64),
                    None if report.pending > 0 && report.last_error.is_some() => {
                        Some(st.error_pause_ms)
                    }
                    // Pending events without a retry time were committed during
                    // the flush: go again now.
                    None if report.pending > 0 => Some(0.0),
                    None => None,
                }
            }
        };
        sleep(&st, pause).await;
    }
    // Flush requests still queued when the loop stops get the counts.
    let waiters: Vec<_> = st.flush_waiters.borrow_mut().drain(..).collect();
    for (resolve, _) in waiters {
        let _ = resolve.call1(&JsValue::UNDEFINED, &report_to_js(&FlushReport::default()));
    }
}

/// A [`FlushReport`] as the JS object `{ sent, dead, pending, nextAttemptAt, lastError }`.
pub(crate) fn report_to_js(r: &FlushReport) -> JsValue {
    let o = js_sys::Object::new();
    let set = |k: &str, v: JsValue| {
        let _ = Reflect::set(&o, &k.into(), &v);
    };
    set("sent", (r.sent as f64).into());
    set("dead", (r.dead as f64).into());
    set("pending", (r.pending as f64).into());
    set(
        "nextAttemptAt",
        r.next_attempt
            .map_or(JsValue::NULL, |t| (t.as_millis() as f64).into()),
    );
    set(
        "lastError",
        r.last_error
            .as_deref()
            .map_or(JsValue::NULL, JsValue::from_str),
    );
    o.into()
}

fn report_from_js(v: &JsValue) -> FlushReport {
    let n = |k: &str| Reflect::get(v, &k.into()).ok().and_then(|x| x.as_f64());
    FlushReport {
        sent: n("sent").unwrap_or(0.0) as u64,
        dead: n("dead").unwrap_or(0.0) as u64,
        pending: n("pending").unwrap_or(0.0) as u64,
        next_attempt: n("nextAttemptAt").map(|t| Timestamp::from_millis(t as i64)),
        last_error: Reflect::get(v, &"lastError".into())
            .ok()
            .and_then(|x| x.as_string()),
        lease_held_until: None,
    }
}
