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
//! - Without Web Locks (insecure origins, WebKit before 15.4) every context
//!   runs its loop with a lease owner of its own, and the store lease elects
//!   the sender; `leader` follows the lease.
//! - A frozen page (`freeze`, `pagehide`) gives up the lock while it can
//!   still run code, and queues again on `resume`/`pageshow`.
//! - `stop`/`close` hand the lock over only after the push in flight settled
//!   (the flush stops between batches): never two pushes of one batch at once.
//! - The IndexedDB connection closed under the outbox is reopened by the
//!   store; when it is lost for good the lock is given up at once.
//! - Counts in the status follow local commits even when this context will
//!   not send (offline, another tab sends, stopped): a commit schedules one
//!   recount, and commits that land while it runs share the next one, so a
//!   burst of commits costs at most two counts. Other contexts get the counts
//!   in the BroadcastChannel messages: a message handler never starts
//!   IndexedDB work, which a tab frozen in the middle of it would leave
//!   hanging, blocking every other tab's commits.
//! - The core is taken out of its cell for a flush or a stop; callers wait
//!   in line for it (woken by whoever puts it back), never by polling.

use std::cell::{Cell, RefCell};
use std::rc::{Rc, Weak};

use js_sys::{Function, Promise, Reflect};
use wasm_bindgen::JsCast;
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::{JsFuture, spawn_local};
use web_sys::{BroadcastChannel, EventTarget};

use super::idb::store::{Connection, ConnectionListener, IdbStore};
use super::transport::{FetchTransport, clear_timeout, set_timeout};
use crate::error::{Error, Result};
use crate::relay::{FlushReport, Relay, RelayConfig, RelayStatus};
use crate::store::Store;
use crate::time::Timestamp;
use crate::transport::Transport;

#[wasm_bindgen(module = "/src/web/glue.js")]
extern "C" {
    /// Take the Web Lock `name` if it is free, else queue for it:
    /// `on_acquired` runs once it is held, `on_queued` when it was not free
    /// (another context holds it). One of them answers at once.
    /// Returns the function that releases it, or null without Web Locks.
    #[wasm_bindgen(js_name = acquireLock)]
    fn acquire_lock(name: &str, on_acquired: &JsValue, on_queued: &JsValue) -> JsValue;

    /// True when `navigator.locks` exists (secure contexts; WebKit from 15.4).
    #[wasm_bindgen(js_name = hasWebLocks)]
    fn has_web_locks() -> bool;

    /// The BroadcastChannel message that carries fresh counts.
    #[wasm_bindgen(js_name = countsMessage)]
    fn counts_message(pending: f64, sent: f64, dead: f64) -> JsValue;

    /// Run `work(held)` holding the lock if it is free right now
    /// (`held = false` when another context holds it).
    #[wasm_bindgen(js_name = tryLock)]
    fn try_lock(name: &str, work: &Function) -> Promise;

    /// `[promise, resolve]`: a new Promise and the function that resolves it.
    #[wasm_bindgen(js_name = deferred)]
    fn deferred_js() -> js_sys::Array;
}

/// A new Promise and the function that resolves it (one glue call: a Rust
/// closure per `Promise::new` costs more wasm).
fn deferred() -> (Promise, Function) {
    let pair = deferred_js();
    (pair.get(0).unchecked_into(), pair.get(1).unchecked_into())
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
    /// The state of the IndexedDB connection.
    pub connection: ConnectionState,
}

/// The state of the outbox's IndexedDB connection in [`Status`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ConnectionState {
    /// Open.
    #[default]
    Open,
    /// Closed under the outbox (another tab's upgrade): being reopened.
    Reopening,
    /// Lost for good; `relay.last_error` says why, the sender lock is given up.
    Lost,
}

impl ConnectionState {
    /// The string JavaScript sees in `status.connection`.
    pub fn as_str(self) -> &'static str {
        match self {
            ConnectionState::Open => "open",
            ConnectionState::Reopening => "reopening",
            ConnectionState::Lost => "lost",
        }
    }
}

/// Why a [`Driver::flush`] made no delivery attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlushSkipped {
    /// The network is down (`navigator.onLine === false`, or forced with
    /// [`Driver::set_online_override`]): nothing was tried, no attempt spent.
    Offline,
    /// Another tab or worker holds the sender lock: it was asked to flush,
    /// and the counts are this context's view of the shared store.
    NotLeader,
    /// The relay was stopped before the flush's turn came.
    Stopped,
}

impl FlushSkipped {
    /// The string JavaScript sees in `report.skipped`.
    pub fn as_str(self) -> &'static str {
        match self {
            FlushSkipped::Offline => "offline",
            FlushSkipped::NotLeader => "not-leader",
            FlushSkipped::Stopped => "stopped",
        }
    }
}

/// What [`Driver::flush`] did: the core's report, and whether it was skipped.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FlushOutcome {
    /// Counts of this flush (all zero but `pending` when skipped).
    pub report: FlushReport,
    /// Set when no attempt was made, and why; `None` for a real flush.
    pub skipped: Option<FlushSkipped>,
}

impl FlushOutcome {
    fn delivered(report: FlushReport) -> Self {
        FlushOutcome {
            report,
            skipped: None,
        }
    }
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

/// A `flush()` waiting for the loop's next round: the loop stores the
/// outcome, then resolves the promise the caller awaits. The outcome stays in
/// Rust (no detour through a JS value), so an error keeps its kind and
/// reaches JavaScript with the right `name`.
struct Waiter {
    outcome: RefCell<Option<Result<FlushOutcome>>>,
    resolve: Function,
}

impl Waiter {
    fn settle(&self, outcome: Result<FlushOutcome>) {
        *self.outcome.borrow_mut() = Some(outcome);
        let _ = self.resolve.call0(&JsValue::UNDEFINED);
    }
}

/// What the driver needs from a store beyond the [`Store`] contract: a
/// name (the Web Lock's and the BroadcastChannel's) and the commit and
/// connection callbacks. [`IdbStore`] has them; another browser store (OPFS)
/// would plug in by implementing this.
pub trait DriverStore: Store + Clone + 'static {
    /// The outbox's name, unique per origin (the database name).
    fn name(&self) -> &str;
    /// Call `f` after every local commit that added events.
    fn set_on_commit(&self, f: Option<Rc<dyn Fn()>>);
    /// Call `f` when the connection is lost, reopened or given up.
    fn set_on_connection(&self, f: Option<ConnectionListener>);
}

impl DriverStore for IdbStore {
    fn name(&self) -> &str {
        IdbStore::name(self)
    }
    fn set_on_commit(&self, f: Option<Rc<dyn Fn()>>) {
        IdbStore::set_on_commit(self, f);
    }
    fn set_on_connection(&self, f: Option<ConnectionListener>) {
        IdbStore::set_on_connection(self, f);
    }
}

/// The running relay of one outbox in this context, generic over the store
/// and the transport (the browser's are the defaults). Cheap to clone.
pub struct Driver<S: DriverStore = IdbStore, T: Transport + 'static = FetchTransport> {
    state: Rc<State<S, T>>,
}

impl<S: DriverStore, T: Transport + 'static> Clone for Driver<S, T> {
    fn clone(&self) -> Self {
        Driver {
            state: self.state.clone(),
        }
    }
}

struct State<S: DriverStore, T: Transport + 'static> {
    store: S,
    /// The core; taken out while a flush runs (one flush at a time).
    relay: RefCell<Option<Relay<S, T>>>,
    /// Callers waiting for the core, first come first served.
    relay_waiters: RefCell<std::collections::VecDeque<Function>>,
    lock_name: String,
    error_pause_ms: f64,
    running: Cell<bool>,
    leader: Cell<bool>,
    /// No Web Locks here: every context runs its loop and the store lease
    /// (one owner per context) elects the sender.
    no_locks: bool,
    /// Frozen or hidden for the back/forward cache: the lock is given up.
    suspended: Cell<bool>,
    /// An explicit flush runs outside the loop (holding the lock briefly).
    explicit_flush: Cell<bool>,
    /// Releases the Web Lock (null without Web Locks).
    release_lock: RefCell<JsValue>,
    /// The lock was just requested and the browser has not said yet whether
    /// it was free (held now) or another context holds it (queued).
    lock_unanswered: Cell<bool>,
    /// `flush()` calls waiting for that answer.
    lock_answer_waiters: RefCell<Vec<Function>>,
    /// A wake arrived while the loop was not waiting: run another round.
    dirty: Cell<bool>,
    /// Resolves the loop's current wait.
    wake: RefCell<Option<(Function, JsValue)>>,
    /// Flush requests waiting for the loop's next round.
    flush_waiters: RefCell<Vec<Rc<Waiter>>>,
    /// Events were committed since the core last counted the store: the next
    /// round recounts first, so the status it publishes includes them.
    relay_counts_stale: Cell<bool>,
    /// A recount of the status (outside the core) is running.
    counting: Cell<bool>,
    /// Another commit arrived while counting: count once more afterwards.
    recount: Cell<bool>,
    online_override: Cell<Option<bool>>,
    status: RefCell<Status>,
    listener: RefCell<Option<StatusListener>>,
    channel: Option<BroadcastChannel>,
    /// Kept alive while the driver lives; removed from the global at close.
    global_listeners: RefCell<Vec<(&'static str, JsCallback)>>,
    /// `freeze`/`resume` (document) and `pagehide`/`pageshow` listeners.
    lifecycle_listeners: RefCell<Vec<(&'static str, EventTarget, JsCallback)>>,
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

impl<S: DriverStore, T: Transport + 'static> Driver<S, T> {
    /// A driver for `store`, sending with `transport`. Not running until
    /// [`Driver::start`].
    pub fn new(store: S, transport: T, config: DriverConfig) -> Driver<S, T> {
        let lock_name = format!("edge-outbox:{}", store.name());
        let no_locks = !has_web_locks();
        // The Web Lock excludes other senders, so all holders share one lease
        // owner (a new holder renews a closed tab's lease at once). Without
        // Web Locks the lease is the election: one owner per context.
        let owner = if no_locks {
            format!("{lock_name}:{}", uuid::Uuid::new_v4())
        } else {
            lock_name.clone()
        };
        let relay_config = config.relay.with_owner(owner);
        let relay = Relay::new(store.clone(), transport, relay_config);
        let channel = BroadcastChannel::new(&lock_name).ok();
        let state = Rc::new(State {
            store: store.clone(),
            relay: RefCell::new(Some(relay)),
            relay_waiters: RefCell::new(std::collections::VecDeque::new()),
            lock_name,
            error_pause_ms: config.error_pause_ms,
            running: Cell::new(false),
            leader: Cell::new(false),
            no_locks,
            suspended: Cell::new(false),
            explicit_flush: Cell::new(false),
            release_lock: RefCell::new(JsValue::NULL),
            lock_unanswered: Cell::new(false),
            lock_answer_waiters: RefCell::new(Vec::new()),
            dirty: Cell::new(false),
            wake: RefCell::new(None),
            flush_waiters: RefCell::new(Vec::new()),
            relay_counts_stale: Cell::new(true),
            counting: Cell::new(false),
            recount: Cell::new(false),
            online_override: Cell::new(None),
            status: RefCell::new(Status {
                online: global_navigator_online(),
                ..Status::default()
            }),
            listener: RefCell::new(None),
            channel,
            global_listeners: RefCell::new(Vec::new()),
            lifecycle_listeners: RefCell::new(Vec::new()),
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
                if let Some(ch) = &st.channel {
                    let _ = ch.post_message(&"commit".into());
                }
                committed(&st, true);
            }
        })));
        // The connection closed under the outbox: reopened, or given up.
        let weak = Rc::downgrade(st);
        st.store
            .set_on_connection(Some(Rc::new(move |c: &Connection| {
                let Some(st) = weak.upgrade() else { return };
                match c {
                    Connection::Reopening { .. } => {
                        st.status.borrow_mut().connection = ConnectionState::Reopening;
                        emit(&st);
                    }
                    Connection::Open => {
                        st.status.borrow_mut().connection = ConnectionState::Open;
                        st.relay_counts_stale.set(true);
                        emit(&st);
                        wake(&st);
                    }
                    Connection::Lost { reason } => {
                        // Another context must be able to send at once.
                        st.running.set(false);
                        release_lock(&st);
                        {
                            let mut s = st.status.borrow_mut();
                            s.connection = ConnectionState::Lost;
                            s.relay.last_error = Some(format!(
                                "the outbox lost its IndexedDB connection: {reason}"
                            ));
                        }
                        emit(&st);
                        wake(&st);
                    }
                }
            })));
        // Commits and flush requests of other tabs.
        if let Some(ch) = &st.channel {
            let weak = Rc::downgrade(st);
            // No IndexedDB work starts here: a tab frozen in the middle of
            // it would hold a transaction that blocks every other tab's
            // commits. Counts come in the messages; only the sender's loop
            // (which gives up the lock when the tab freezes) is woken.
            let on_message = Closure::<dyn FnMut(JsValue)>::new(move |e: JsValue| {
                let Some(st) = weak.upgrade() else { return };
                let data = Reflect::get(&e, &"data".into()).unwrap_or(JsValue::UNDEFINED);
                if data.is_object() {
                    let n = |k: &str| {
                        Reflect::get(&data, &k.into())
                            .ok()
                            .and_then(|v| v.as_f64())
                            .map(|v| v as u64)
                    };
                    if let (Some(pending), Some(sent), Some(dead)) =
                        (n("pending"), n("sent"), n("dead"))
                    {
                        set_counts(
                            &st,
                            &crate::store::Stats {
                                pending,
                                sent,
                                dead,
                                ..Default::default()
                            },
                        );
                    }
                    return;
                }
                // "commit", "flush" or "released": the sender has work.
                committed(&st, false);
            });
            ch.set_onmessage(Some(on_message.as_ref().unchecked_ref()));
            *st._channel_listener.borrow_mut() = Some(on_message);
        }
        // The network coming back, or going away.
        let global: EventTarget = js_sys::global().unchecked_into();
        for kind in ["online", "offline"] {
            let weak: Weak<State<S, T>> = Rc::downgrade(st);
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
        // A frozen tab (a phone's background tab, the back/forward cache)
        // runs nothing, so it must not keep the sender lock: give it up on
        // `freeze` and `pagehide`, ask for it again on `resume`/`pageshow`.
        let document = Reflect::get(&global, &"document".into()).unwrap_or(JsValue::UNDEFINED);
        let targets: [(&'static str, bool, JsValue); 4] = [
            ("freeze", true, document.clone()),
            ("resume", false, document),
            ("pagehide", true, global.clone().into()),
            ("pageshow", false, global.clone().into()),
        ];
        for (kind, suspend, target) in targets {
            let Some(target) = target.dyn_ref::<EventTarget>().cloned() else {
                continue; // a worker: no document, no page lifecycle
            };
            let weak: Weak<State<S, T>> = Rc::downgrade(st);
            let cb = Closure::<dyn FnMut(JsValue)>::new(move |_e: JsValue| {
                if let Some(st) = weak.upgrade() {
                    if suspend {
                        suspend_sender(&st);
                    } else {
                        resume_sender(&st);
                    }
                }
            });
            let _ = target.add_event_listener_with_callback(kind, cb.as_ref().unchecked_ref());
            st.lifecycle_listeners.borrow_mut().push((kind, target, cb));
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
        request_lock(st);
        spawn_local(run(st.clone()));
    }

    /// Stop the loop and hand the sender lock to another tab, once the
    /// push in flight (if any) has settled or been left pending: releasing
    /// the lock earlier would let the next sender push the same batch while
    /// this one is still on the wire. No new batch starts meanwhile.
    pub async fn stop(&self) {
        let st = &self.state;
        if !st.running.replace(false) {
            return;
        }
        wake(st);
        // Wait for the flush in progress (it stops before its next batch),
        // then give up the store lease so another sender need not wait for it.
        {
            let mut relay = take_relay(st).await;
            // With Web Locks every holder shares the lease owner: only the
            // holder may release it. Without, the owner is this context's.
            if st.leader.get() || st.no_locks {
                let _ = relay.release_lease().await;
            }
            put_relay(st, relay);
        }
        release_lock(st);
        if st.no_locks
            && let Some(ch) = &st.channel
        {
            // The lease is free: the other contexts may claim now.
            let _ = ch.post_message(&"released".into());
        }
    }

    /// Wake the loop (after a commit the store did not see, e.g. `enqueueIn`).
    pub fn wake(&self) {
        wake(&self.state);
    }

    /// Deliver what is due now and report. In the sending context this runs
    /// the next round of the loop; with the loop stopped it runs here if no
    /// other context holds the sender lock; otherwise it asks the sender (over
    /// the BroadcastChannel) and reports the current counts with
    /// [`FlushOutcome::skipped`] set, as it does offline.
    pub async fn flush(&self) -> Result<FlushOutcome> {
        let st = self.state.clone();
        if !is_online(&st) {
            // Offline: no attempt is made (none is spent); report the counts.
            return counts_report(&st, FlushSkipped::Offline).await;
        }
        // Just after start the lock request is unanswered: this context may
        // be the sender in a moment (the lock is free) or not (another holds
        // it). Wait for the answer (it comes at once) rather than report
        // "not-leader" for a lock no one else holds.
        while st.lock_unanswered.get() {
            let (promise, resolve) = deferred();
            st.lock_answer_waiters.borrow_mut().push(resolve);
            let _ = JsFuture::from(promise).await;
        }
        if st.running.get() && (st.leader.get() || (st.no_locks && !st.suspended.get())) {
            let slot: Rc<RefCell<Option<Rc<Waiter>>>> = Rc::new(RefCell::new(None));
            let (promise, resolve) = deferred();
            let waiter = Rc::new(Waiter {
                outcome: RefCell::new(None),
                resolve,
            });
            st.flush_waiters.borrow_mut().push(waiter.clone());
            *slot.borrow_mut() = Some(waiter);
            wake(&st);
            // Never rejected: the loop stores the outcome, then resolves.
            let _ = JsFuture::from(promise).await;
            let waiter = slot.borrow_mut().take();
            let outcome = waiter.and_then(|w| w.outcome.borrow_mut().take());
            return outcome.unwrap_or_else(|| Err(Error::storage("the flush was dropped", None)));
        }
        // The loop is stopped here, or this context waits for the lock: flush
        // here if nobody else holds the lock right now.
        let result: Rc<RefCell<Option<Result<FlushOutcome>>>> = Rc::new(RefCell::new(None));
        let (st2, out) = (st.clone(), result.clone());
        let work = Closure::once_into_js(move |held: JsValue| -> Promise {
            if held.as_bool() != Some(true) {
                return Promise::resolve(&JsValue::UNDEFINED);
            }
            wasm_bindgen_futures::future_to_promise(async move {
                st2.explicit_flush.set(true);
                let outcome = flush_now(&st2).await.map(FlushOutcome::delivered);
                st2.explicit_flush.set(false);
                *out.borrow_mut() = Some(outcome);
                Ok(JsValue::UNDEFINED)
            })
        });
        JsFuture::from(try_lock(&st.lock_name, work.unchecked_ref()))
            .await
            .map_err(|e| Error::storage(super::idb::error_parts(&e).1, None))?;
        let outcome = result.borrow_mut().take();
        match outcome {
            Some(outcome) => outcome,
            None => {
                // Another context sends: nudge it, report what is known.
                if let Some(ch) = &st.channel {
                    let _ = ch.post_message(&"flush".into());
                }
                counts_report(&st, FlushSkipped::NotLeader).await
            }
        }
    }

    /// Stop, and drop every listener (the outbox is closing).
    pub async fn close(&self) {
        self.stop().await;
        let st = &self.state;
        let global: EventTarget = js_sys::global().unchecked_into();
        for (kind, cb) in st.global_listeners.borrow_mut().drain(..) {
            let _ = global.remove_event_listener_with_callback(kind, cb.as_ref().unchecked_ref());
        }
        for (kind, target, cb) in st.lifecycle_listeners.borrow_mut().drain(..) {
            let _ = target.remove_event_listener_with_callback(kind, cb.as_ref().unchecked_ref());
        }
        if let Some(ch) = &st.channel {
            ch.set_onmessage(None);
            ch.close();
        }
        st.store.set_on_commit(None);
        *st.listener.borrow_mut() = None;
    }
}

fn is_online<S: DriverStore, T: Transport + 'static>(st: &State<S, T>) -> bool {
    st.online_override
        .get()
        .unwrap_or_else(global_navigator_online)
}

fn emit<S: DriverStore, T: Transport + 'static>(st: &Rc<State<S, T>>) {
    let listener = st.listener.borrow().clone();
    if let Some(f) = listener {
        let status = st.status.borrow().clone();
        f(&status);
    }
}

fn wake<S: DriverStore, T: Transport + 'static>(st: &State<S, T>) {
    st.dirty.set(true);
    let waiting = st.wake.borrow_mut().take();
    if let Some((resolve, timer)) = waiting {
        if !timer.is_undefined() {
            clear_timeout(&timer);
        }
        let _ = resolve.call0(&JsValue::UNDEFINED);
    }
}

/// Queue for the sender lock (nothing to queue for without Web Locks: the
/// loop then tries the store lease, which elects one sender).
fn request_lock<S: DriverStore, T: Transport + 'static>(st: &Rc<State<S, T>>) {
    if st.no_locks {
        wake(st);
        return;
    }
    let weak = Rc::downgrade(st);
    let on_acquired = Closure::once_into_js(move || {
        let Some(st) = weak.upgrade() else { return };
        if st.running.get() && !st.suspended.get() {
            st.leader.set(true);
            st.status.borrow_mut().leader = true;
            emit(&st);
            wake(&st);
        }
        lock_answered(&st);
    });
    let weak = Rc::downgrade(st);
    let on_queued = Closure::once_into_js(move || {
        if let Some(st) = weak.upgrade() {
            lock_answered(&st);
        }
    });
    st.lock_unanswered.set(true);
    let release = acquire_lock(&st.lock_name, &on_acquired, &on_queued);
    if release.is_null() {
        lock_answered(st);
    }
    *st.release_lock.borrow_mut() = release;
}

/// The browser said whether the sender lock was free (or the request was
/// given up): `flush()` calls waiting for that go on.
fn lock_answered<S: DriverStore, T: Transport + 'static>(st: &State<S, T>) {
    st.lock_unanswered.set(false);
    let waiters: Vec<_> = st.lock_answer_waiters.borrow_mut().drain(..).collect();
    for resolve in waiters {
        let _ = resolve.call0(&JsValue::UNDEFINED);
    }
}

/// The tab is being frozen or put in the back/forward cache: give up the
/// sender lock now (while code still runs), so another tab sends. A push on
/// the wire settles when the tab runs again (the server dedupes the batch if
/// the next sender pushed it too); no further batch starts here.
fn suspend_sender<S: DriverStore, T: Transport + 'static>(st: &Rc<State<S, T>>) {
    if st.suspended.replace(true) || !st.running.get() {
        return;
    }
    release_lock(st);
    emit(st);
}

/// The tab runs again: queue for the lock again.
fn resume_sender<S: DriverStore, T: Transport + 'static>(st: &Rc<State<S, T>>) {
    if !st.suspended.replace(false) || !st.running.get() {
        return;
    }
    if st.release_lock.borrow().is_null() {
        request_lock(st);
    }
    wake(st);
}

fn release_lock<S: DriverStore, T: Transport + 'static>(st: &State<S, T>) {
    let release = st.release_lock.replace(JsValue::NULL);
    if let Some(f) = release.dyn_ref::<Function>() {
        let _ = f.call0(&JsValue::UNDEFINED);
    }
    st.leader.set(false);
    st.status.borrow_mut().leader = false;
    lock_answered(st);
}

/// Wait until woken, or `ms` milliseconds (forever when `None`).
async fn sleep<S: DriverStore, T: Transport + 'static>(st: &State<S, T>, ms: Option<f64>) {
    if st.dirty.replace(false) {
        return;
    }
    let (promise, resolve) = deferred();
    let timer = match ms {
        // setTimeout's delay is a signed 32-bit number of milliseconds.
        Some(ms) => set_timeout(&resolve, ms.clamp(0.0, 2_147_483_647.0)),
        None => JsValue::UNDEFINED,
    };
    *st.wake.borrow_mut() = Some((resolve, timer));
    let _ = JsFuture::from(promise).await;
    st.dirty.set(false);
}

/// Take the core out for one flush (or a stop), waiting in line while
/// another flush has it: whoever puts it back ([`put_relay`]) wakes the next.
async fn take_relay<S: DriverStore, T: Transport + 'static>(st: &State<S, T>) -> Relay<S, T> {
    loop {
        if let Some(relay) = st.relay.borrow_mut().take() {
            return relay;
        }
        let (promise, resolve) = deferred();
        st.relay_waiters.borrow_mut().push_back(resolve);
        let _ = JsFuture::from(promise).await;
    }
}

/// Put the core back and wake the first caller waiting for it.
fn put_relay<S: DriverStore, T: Transport + 'static>(st: &State<S, T>, relay: Relay<S, T>) {
    *st.relay.borrow_mut() = Some(relay);
    let next = st.relay_waiters.borrow_mut().pop_front();
    if let Some(resolve) = next {
        let _ = resolve.call0(&JsValue::UNDEFINED);
    }
}

async fn flush_now<S: DriverStore, T: Transport + 'static>(
    st: &Rc<State<S, T>>,
) -> Result<FlushReport> {
    let mut relay = take_relay(st).await;
    st.status.borrow_mut().flushing = true;
    emit(st);
    // Commits since the core's last count (this tab's or another's): count
    // them now, once per round, so the status and the report include them.
    // A failed count is not fatal (the flush counts again at its end); it is
    // simply tried again next round.
    if st.relay_counts_stale.replace(false) && relay.refresh_status().await.is_err() {
        st.relay_counts_stale.set(true);
    }
    // A stop (close, connection lost) is taken between batches.
    let flushing = st.clone();
    let result = relay
        .flush_while(move || {
            flushing.explicit_flush.get()
                || (flushing.running.get()
                    && !flushing.suspended.get()
                    && (flushing.leader.get() || flushing.no_locks))
        })
        .await;
    put_relay(st, relay);
    st.status.borrow_mut().flushing = false;
    if let Err(e) = &result {
        st.relay_counts_stale.set(true);
        st.status.borrow_mut().relay.last_error = Some(e.to_string());
    }
    if st.no_locks
        && let Ok(report) = &result
    {
        // Without Web Locks, the sender is whoever holds the store lease.
        let holds = report.lease_held_until.is_none();
        st.leader.set(holds);
        st.status.borrow_mut().leader = holds;
    }
    emit(st);
    broadcast_counts(st);
    result
}

/// Tell the other contexts the counts (they never read the store from a
/// message handler).
fn broadcast_counts<S: DriverStore, T: Transport + 'static>(st: &State<S, T>) {
    if let Some(ch) = &st.channel {
        let r = &st.status.borrow().relay;
        let _ = ch.post_message(&counts_message(
            r.pending as f64,
            r.sent as f64,
            r.dead as f64,
        ));
    }
}

/// A skipped flush's outcome: the counts as the store has them now.
async fn counts_report<S: DriverStore, T: Transport + 'static>(
    st: &Rc<State<S, T>>,
    why: FlushSkipped,
) -> Result<FlushOutcome> {
    let stats = st.store.stats().await?;
    set_counts(st, &stats);
    Ok(FlushOutcome {
        report: FlushReport {
            pending: stats.pending,
            ..FlushReport::default()
        },
        skipped: Some(why),
    })
}

/// Publish fresh counts (read outside the core, which is not running).
fn set_counts<S: DriverStore, T: Transport + 'static>(
    st: &Rc<State<S, T>>,
    stats: &crate::store::Stats,
) {
    let changed = {
        let mut s = st.status.borrow_mut();
        let before = (s.relay.pending, s.relay.sent, s.relay.dead);
        s.relay.pending = stats.pending;
        s.relay.sent = stats.sent;
        s.relay.dead = stats.dead;
        before != (stats.pending, stats.sent, stats.dead)
    };
    if changed {
        emit(st);
    }
}

/// Events were committed here (`local`), or another context said it
/// committed or asked for a flush.
fn committed<S: DriverStore, T: Transport + 'static>(st: &Rc<State<S, T>>, local: bool) {
    st.relay_counts_stale.set(true);
    let sends = st.running.get()
        && !st.suspended.get()
        && (st.leader.get() || st.no_locks)
        && is_online(st);
    if sends {
        // The next round counts before it sends, and publishes the counts.
        wake(st);
    } else if local {
        // Nobody here will count soon: do it (this context's own work, never
        // a message handler's), so this app and the other tabs see the commit.
        request_count(st);
    }
}

/// Count the store, publish and tell the other contexts, coalescing
/// requests: while a count runs, more requests make exactly one more count
/// after it (one per burst of commits).
fn request_count<S: DriverStore, T: Transport + 'static>(st: &Rc<State<S, T>>) {
    if st.counting.replace(true) {
        st.recount.set(true);
        return;
    }
    let st = st.clone();
    spawn_local(async move {
        loop {
            st.recount.set(false);
            if let Ok(stats) = st.store.stats().await {
                set_counts(&st, &stats);
                broadcast_counts(&st);
            }
            if !st.recount.get() {
                break;
            }
        }
        st.counting.set(false);
    });
}

/// Hand every queued flush request `outcome` (or its copy).
fn settle_waiters<S: DriverStore, T: Transport + 'static>(
    st: &State<S, T>,
    outcome: &Result<FlushOutcome>,
) {
    let waiters: Vec<_> = st.flush_waiters.borrow_mut().drain(..).collect();
    for waiter in waiters {
        waiter.settle(match outcome {
            Ok(o) => Ok(o.clone()),
            Err(e) => Err(duplicate(e)),
        });
    }
}

/// A copy of `e` for the second and later waiters of one round (the cause
/// chain is not cloneable; its message is in the copy's message already).
fn duplicate(e: &Error) -> Error {
    match e {
        Error::InvalidEventType { reason } => Error::InvalidEventType {
            reason: reason.clone(),
        },
        Error::InvalidPayload { reason } => Error::InvalidPayload {
            reason: reason.clone(),
        },
        Error::InvalidHeader { reason } => Error::InvalidHeader {
            reason: reason.clone(),
        },
        Error::EventTooLarge { size, limit } => Error::EventTooLarge {
            size: *size,
            limit: *limit,
        },
        Error::NotADatabase { path } => Error::NotADatabase { path: path.clone() },
        Error::SchemaTooNew { found, supported } => Error::SchemaTooNew {
            found: *found,
            supported: *supported,
        },
        Error::ReadOnly { path } => Error::ReadOnly { path: path.clone() },
        Error::Busy => Error::Busy,
        Error::QuotaExceeded => Error::QuotaExceeded,
        Error::Closed => Error::Closed,
        Error::InvalidConfig { reason } => Error::InvalidConfig {
            reason: reason.clone(),
        },
        Error::Aborted { reason } => Error::Aborted {
            reason: reason.clone(),
        },
        Error::Storage { message, .. } => Error::storage(message.clone(), None),
        Error::Network { message, .. } => Error::Network {
            message: message.clone(),
            source: None,
        },
        Error::Protocol { message } => Error::Protocol {
            message: message.clone(),
        },
        // A kind added to the crate's Error later: its message, as a storage
        // error, until it is listed here (or error.rs offers a copy).
        #[allow(unreachable_patterns)]
        other => Error::storage(other.to_string(), None),
    }
}

/// The loop: one per running driver.
async fn run<S: DriverStore, T: Transport + 'static>(st: Rc<State<S, T>>) {
    // Let the first round happen at once (events left from earlier sessions).
    st.dirty.set(true);
    while st.running.get() {
        if st.suspended.get() || !(st.leader.get() || st.no_locks) {
            // Waiting for the sender lock; commits elsewhere are not ours to send.
            sleep(&st, None).await;
            continue;
        }
        if !is_online(&st) {
            // Offline: flush requests queued before the network went away
            // get the counts, then wait for the `online` event without
            // spending attempts.
            if !st.flush_waiters.borrow().is_empty() {
                let outcome = counts_report(&st, FlushSkipped::Offline).await;
                settle_waiters(&st, &outcome);
            }
            sleep(&st, None).await;
            continue;
        }
        st.dirty.set(false);
        // Requests queued now are answered by this round; later ones by the next.
        let waiters: Vec<_> = st.flush_waiters.borrow_mut().drain(..).collect();
        let result = flush_now(&st).await;
        let outcome = match &result {
            Ok(report) => Ok(FlushOutcome::delivered(report.clone())),
            Err(e) => Err(duplicate(e)),
        };
        for waiter in waiters {
            waiter.settle(match &outcome {
                Ok(o) => Ok(o.clone()),
                Err(e) => Err(duplicate(e)),
            });
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
    if !st.flush_waiters.borrow().is_empty() {
        let outcome = counts_report(&st, FlushSkipped::Stopped).await;
        settle_waiters(&st, &outcome);
    }
}

/// A flush outcome as the JS object
/// `{ sent, dead, pending, nextAttemptAt, lastError, skipped }` (`FlushReport`
/// in `js/index.d.ts`).
pub(crate) fn report_to_js(o: &FlushOutcome) -> JsValue {
    let r = &o.report;
    let obj = js_sys::Object::new();
    let set = |k: &str, v: JsValue| {
        let _ = Reflect::set(&obj, &k.into(), &v);
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
    set(
        "skipped",
        o.skipped
            .map_or(JsValue::NULL, |s| JsValue::from_str(s.as_str())),
    );
    obj.into()
}
