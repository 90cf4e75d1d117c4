//! Browser tests: the IndexedDB store and the JavaScript API in headless
//! Chromium (wasm-bindgen-test). Run with `scripts/test-browser`, which starts
//! the reference server and passes its URL in `EDGE_OUTBOX_TEST_SERVER`.
#![cfg(all(target_arch = "wasm32", target_os = "unknown"))]

mod conformance;

use std::cell::Cell;

use edge_outbox::web::{Durability, IdbStore};
use edge_outbox::{NewEvent, Store};
use wasm_bindgen_test::*;

wasm_bindgen_test_configure!(run_in_browser);

thread_local! {
    static COUNTER: Cell<u32> = const { Cell::new(0) };
}

/// A database name no other test (nor an earlier run) uses.
fn fresh_name(prefix: &str) -> String {
    let n = COUNTER.with(|c| {
        c.set(c.get() + 1);
        c.get()
    });
    format!("{prefix}-{}-{n}", uuid::Uuid::new_v4())
}

#[wasm_bindgen_test]
async fn conformance_suite_on_indexeddb() {
    conformance::run_all(|| async {
        IdbStore::open(&fresh_name("conformance"), Durability::Relaxed)
            .await
            .unwrap()
    })
    .await;
}

#[wasm_bindgen::prelude::wasm_bindgen(module = "/js/schema.js")]
extern "C" {
    /// The npm package's `createOutboxStores` (the schema's one copy).
    #[wasm_bindgen(js_name = createOutboxStores)]
    fn js_create_outbox_stores(db: &web_sys::IdbDatabase, tx: &web_sys::IdbTransaction);
}

/// Open `name` at version 1 the way an app that owns its database does: its
/// own store and the outbox's, created by the package's JS
/// `createOutboxStores` in its upgrade handler.
async fn app_made_database(name: &str) -> web_sys::IdbDatabase {
    let factory: web_sys::IdbFactory = Reflect::get(&js_sys::global(), &"indexedDB".into())
        .unwrap()
        .unchecked_into();
    let req = factory.open_with_u32(name, 1).unwrap();
    let req2 = req.clone();
    let upgrade = wasm_bindgen::closure::Closure::<dyn FnMut(JsValue)>::new(move |_e: JsValue| {
        let db: web_sys::IdbDatabase = req2.result().unwrap().unchecked_into();
        db.create_object_store("orders").unwrap();
        js_create_outbox_stores(&db, &req2.transaction().unwrap());
    });
    req.set_onupgradeneeded(Some(upgrade.as_ref().unchecked_ref()));
    let req3 = req.clone();
    let db = wait(Promise::new(&mut |resolve, reject| {
        req3.set_onsuccess(Some(&resolve));
        req3.set_onerror(Some(&reject));
    }))
    .await
    .map(|_| req.result().unwrap());
    drop(upgrade);
    db.unwrap().unchecked_into()
}

/// Where the languages meet: the Rust store over a database whose outbox
/// stores the app made with the package's JS `createOutboxStores`.
#[wasm_bindgen_test]
async fn conformance_suite_on_a_database_made_by_the_js_schema() {
    conformance::run_all(|| async {
        let db = app_made_database(&fresh_name("js-schema")).await;
        IdbStore::from_database(
            db,
            Durability::Relaxed,
            edge_outbox::DEFAULT_MAX_EVENT_BYTES,
        )
        .await
        .unwrap()
    })
    .await;
}

#[wasm_bindgen_test]
async fn close_and_reopen_keeps_pending_events() {
    let name = fresh_name("reopen");
    let store = IdbStore::open(&name, Durability::Strict).await.unwrap();
    let client_id = store.client_id().to_owned();
    let events = store
        .enqueue(vec![
            NewEvent::json("A", &1).unwrap(),
            NewEvent::json("B", &2).unwrap(),
        ])
        .await
        .unwrap();
    store.close();
    assert!(matches!(
        store.stats().await,
        Err(edge_outbox::Error::Closed)
    ));
    let again = IdbStore::open(&name, Durability::Strict).await.unwrap();
    assert_eq!(again.client_id(), client_id);
    let pending = again.pending(10).await.unwrap();
    assert_eq!(pending, events);
}

// ---- the JavaScript API ------------------------------------------------------

use edge_outbox::web::Outbox;
use js_sys::{Function, Promise, Reflect};
use wasm_bindgen::{JsCast, JsValue};
use wasm_bindgen_futures::JsFuture;

/// Evaluate a JS object literal / expression.
fn js(expr: &str) -> JsValue {
    Function::new_no_args(&format!("return ({expr});"))
        .call0(&JsValue::UNDEFINED)
        .unwrap()
}

/// A JS function `(tx) => { body }`.
fn callback(body: &str) -> Function {
    Function::new_with_args("tx", body)
}

fn prop(v: &JsValue, k: &str) -> JsValue {
    Reflect::get(v, &JsValue::from_str(k)).unwrap()
}

fn num(v: &JsValue, k: &str) -> f64 {
    prop(v, k)
        .as_f64()
        .unwrap_or_else(|| panic!("{k} is not a number in {v:?}"))
}

async fn wait(p: Promise) -> Result<JsValue, JsValue> {
    JsFuture::from(p).await
}

async fn sleep_ms(ms: i32) {
    let p = Promise::new(&mut |resolve, _| {
        let global = js_sys::global();
        let set_timeout: Function = Reflect::get(&global, &"setTimeout".into())
            .unwrap()
            .unchecked_into();
        set_timeout
            .call2(&JsValue::UNDEFINED, &resolve, &ms.into())
            .unwrap();
    });
    JsFuture::from(p).await.unwrap();
}

async fn open_todos(name: &str, extra: &str) -> Outbox {
    let options = js(&format!(
        r#"{{ database: {name:?}, durability: "relaxed",
             stores: {{ todos: {{ keyPath: "id", indexes: {{ byDone: {{ keyPath: "done" }} }} }} }} {extra} }}"#
    ));
    Outbox::open_with(options).await.unwrap()
}

async fn todo(outbox: &Outbox, id: u32) -> JsValue {
    wait(outbox.transaction(
        JsValue::from_str("todos"),
        callback(&format!("return tx.get('todos', {id});")),
    ))
    .await
    .unwrap()
}

async fn pending_count(outbox: &Outbox) -> f64 {
    num(&wait(outbox.stats()).await.unwrap(), "pending")
}

fn error_name(e: &JsValue) -> String {
    prop(e, "name").as_string().unwrap_or_default()
}

#[wasm_bindgen_test]
async fn transaction_commits_app_record_and_event_together() {
    let outbox = open_todos(&fresh_name("tx-ok"), "").await;
    let value = wait(outbox.transaction(
        js(r#"["todos"]"#),
        callback(
            "tx.put('todos', { id: 1, title: 'milk', done: 0 });
             return tx.enqueue('TodoCreated', { id: 1, title: 'milk' }, { key: 'todo-1', headers: { schema: '1' } });",
        ),
    ))
    .await
    .unwrap();
    let id = value
        .as_string()
        .expect("the callback's value (the event id)");
    assert_eq!(
        prop(&todo(&outbox, 1).await, "title").as_string().unwrap(),
        "milk"
    );
    let pending = wait(outbox.pending(None)).await.unwrap();
    let first = js_sys::Array::from(&pending).get(0);
    assert_eq!(prop(&first, "id").as_string().unwrap(), id);
    assert_eq!(prop(&first, "key").as_string().unwrap(), "todo-1");
    assert_eq!(
        prop(&prop(&first, "payload"), "title").as_string().unwrap(),
        "milk"
    );
    assert_eq!(
        prop(&prop(&first, "headers"), "schema")
            .as_string()
            .unwrap(),
        "1"
    );
    wait(outbox.close()).await.unwrap();
}

#[wasm_bindgen_test]
async fn a_throw_rolls_everything_back() {
    let outbox = open_todos(&fresh_name("tx-throw"), "").await;
    let err = wait(outbox.transaction(
        js(r#"["todos"]"#),
        callback(
            "tx.put('todos', { id: 1, done: 0 });
             tx.enqueue('TodoCreated', { id: 1 });
             throw new Error('boom');",
        ),
    ))
    .await
    .unwrap_err();
    assert_eq!(prop(&err, "message").as_string().unwrap(), "boom");
    assert!(todo(&outbox, 1).await.is_undefined());
    assert_eq!(pending_count(&outbox).await, 0.0);
}

#[wasm_bindgen_test]
async fn a_failed_put_rolls_everything_back() {
    let outbox = open_todos(&fresh_name("tx-put"), "").await;
    // Synchronous failure: the record lacks the key path.
    let err = wait(outbox.transaction(
        js(r#"["todos"]"#),
        callback("tx.enqueue('A', 1); tx.put('todos', { title: 'no id' });"),
    ))
    .await
    .unwrap_err();
    assert_eq!(error_name(&err), "DataError");
    // Asynchronous failure: the key exists already (ConstraintError at commit time).
    wait(outbox.transaction(
        js(r#""todos""#),
        callback("tx.put('todos', { id: 7, done: 0 });"),
    ))
    .await
    .unwrap();
    let err = wait(outbox.transaction(
        js(r#"["todos"]"#),
        callback(
            "tx.put('todos', { id: 8, done: 0 });
             tx.enqueue('A', 1);
             tx.add('todos', { id: 7, done: 1 });",
        ),
    ))
    .await
    .unwrap_err();
    assert_eq!(error_name(&err), "ConstraintError");
    assert!(todo(&outbox, 8).await.is_undefined());
    assert_eq!(num(&todo(&outbox, 7).await, "done"), 0.0);
    assert_eq!(pending_count(&outbox).await, 0.0);
    // An async callback that rejects.
    let err = wait(outbox.transaction(
        js(r#"["todos"]"#),
        callback("tx.put('todos', { id: 9, done: 0 }); tx.enqueue('A', 1); return Promise.reject(new TypeError('late'));"),
    ))
    .await
    .unwrap_err();
    assert_eq!(error_name(&err), "TypeError");
    assert!(todo(&outbox, 9).await.is_undefined());
    assert_eq!(pending_count(&outbox).await, 0.0);
}

#[wasm_bindgen_test]
async fn payloads_json_cannot_represent_are_refused_and_nothing_is_written() {
    let outbox = open_todos(&fresh_name("tx-json"), "").await;
    for payload in [
        "() => 1",
        "(() => { const o = { a: 1 }; o.self = o; return o; })()",
        "{ big: 10n }",
        "{ x: NaN }",
        "{ f: function () {} }",
        "new Map([[1, 2]])",
        "[undefined]",
    ] {
        let err = wait(outbox.transaction(
            js(r#"["todos"]"#),
            callback(&format!(
                "tx.put('todos', {{ id: 1, done: 0 }});
                 try {{ tx.enqueue('Bad', {payload}); }} catch (e) {{ /* swallowed on purpose */ }}"
            )),
        ))
        .await
        .unwrap_err();
        assert_eq!(error_name(&err), "InvalidEventError", "{payload}: {err:?}");
        assert!(err.is_instance_of::<js_sys::Error>(), "a real Error object");
        assert!(todo(&outbox, 1).await.is_undefined(), "{payload}");
    }
    assert_eq!(pending_count(&outbox).await, 0.0);
    // enqueue() alone refuses them too.
    let err = wait(outbox.enqueue("Bad".into(), js("{ f() {} }"), JsValue::UNDEFINED))
        .await
        .unwrap_err();
    assert_eq!(error_name(&err), "InvalidEventError");
    // An empty type name.
    let err = wait(outbox.enqueue("".into(), js("1"), JsValue::UNDEFINED))
        .await
        .unwrap_err();
    assert_eq!(error_name(&err), "InvalidEventError");
    assert_eq!(pending_count(&outbox).await, 0.0);
}

#[wasm_bindgen_test]
async fn closed_outbox_rejects_with_closed_error_and_reopen_keeps_events() {
    let name = fresh_name("js-reopen");
    let outbox = open_todos(&name, "").await;
    let client_id = outbox.client_id();
    wait(outbox.enqueue("A".into(), js("{ n: 1 }"), JsValue::UNDEFINED))
        .await
        .unwrap();
    wait(outbox.close()).await.unwrap();
    let err = wait(outbox.stats()).await.unwrap_err();
    assert_eq!(error_name(&err), "ClosedError");
    let err = wait(outbox.transaction(js("'todos'"), callback("")))
        .await
        .unwrap_err();
    assert_eq!(error_name(&err), "ClosedError");
    let again = open_todos(&name, "").await;
    assert_eq!(again.client_id(), client_id);
    assert_eq!(pending_count(&again).await, 1.0);
}

/// The app's own readwrite transaction over `todos` and the outbox, with
/// the todo `id` put in it.
fn app_tx(db: &web_sys::IdbDatabase, id: u32) -> web_sys::IdbTransaction {
    let tx = db
        .transaction_with_str_sequence_and_mode(
            &js(r#"["todos", "edge_outbox_events"]"#),
            web_sys::IdbTransactionMode::Readwrite,
        )
        .unwrap();
    tx.object_store("todos")
        .unwrap()
        .put(&js(&format!("{{ id: {id}, done: 0 }}")))
        .unwrap();
    tx
}

#[wasm_bindgen_test]
async fn enqueue_in_the_apps_own_transaction() {
    let outbox = open_todos(&fresh_name("enqueue-in"), "").await;
    let db = outbox.db();
    // Commit.
    let tx = app_tx(&db, 3);
    outbox
        .enqueue_in(tx.clone(), "A".into(), js("{ n: 3 }"), JsValue::UNDEFINED)
        .unwrap();
    finished(&tx).await.expect("the app's transaction commits");
    assert_eq!(pending_count(&outbox).await, 1.0);
    // An invalid event aborts the app's transaction.
    let tx = app_tx(&db, 4);
    let err = outbox
        .enqueue_in(tx.clone(), "A".into(), js("{ n: NaN }"), JsValue::UNDEFINED)
        .unwrap_err();
    assert_eq!(error_name(&err), "InvalidEventError");
    assert!(finished(&tx).await.is_err(), "the app's transaction aborts");
    assert!(todo(&outbox, 4).await.is_undefined());
    assert_eq!(pending_count(&outbox).await, 1.0);
}

// ---- relay delivery to the reference server ---------------------------------

/// The reference server, started by scripts/test-browser with
/// `--cors-origin '*'` (the test page is served from another origin).
const SERVER: Option<&str> = option_env!("EDGE_OUTBOX_TEST_SERVER");

/// The reference server's URL. A relay test without a server fails loudly:
/// it never passes by skipping.
fn server() -> &'static str {
    SERVER.expect(
        "EDGE_OUTBOX_TEST_SERVER is not set: run scripts/test-browser, \
         which starts the reference server and passes its URL",
    )
}

/// Wait (up to 2 s) until `outbox` is (or is not) the sending tab.
async fn leader_is(outbox: &Outbox, want: bool) {
    for _ in 0..40 {
        if prop(&outbox.status(), "leader").as_bool() == Some(want) {
            return;
        }
        sleep_ms(50).await;
    }
    panic!("status.leader never became {want}: {:?}", outbox.status());
}

/// Wait until `tx` commits (Ok) or aborts (Err).
async fn finished(tx: &web_sys::IdbTransaction) -> Result<JsValue, JsValue> {
    let tx = tx.clone();
    wait(Promise::new(&mut |resolve, reject| {
        tx.set_oncomplete(Some(&resolve));
        tx.set_onabort(Some(&reject));
    }))
    .await
}

async fn http(method: &str, url: &str, body: Option<&str>) -> JsValue {
    let init = web_sys::RequestInit::new();
    init.set_method(method);
    if let Some(b) = body {
        init.set_body(&JsValue::from_str(b));
        let headers = web_sys::Headers::new().unwrap();
        headers.set("content-type", "application/json").unwrap();
        init.set_headers(&headers);
    }
    let global = js_sys::global();
    let fetch: Function = Reflect::get(&global, &"fetch".into())
        .unwrap()
        .unchecked_into();
    let request = web_sys::Request::new_with_str_and_init(url, &init).unwrap();
    let resp: web_sys::Response = wait(
        fetch
            .call1(&JsValue::UNDEFINED, &request)
            .unwrap()
            .unchecked_into(),
    )
    .await
    .unwrap()
    .unchecked_into();
    assert!(resp.ok(), "{method} {url}: {}", resp.status());
    let text = wait(resp.text().unwrap())
        .await
        .unwrap()
        .as_string()
        .unwrap();
    if text.is_empty() {
        JsValue::NULL
    } else {
        js_sys::JSON::parse(&text).unwrap_or(JsValue::from_str(&text))
    }
}

/// Event ids the server received from `client_id`, in arrival order.
async fn received(server: &str, client_id: &str) -> Vec<String> {
    let page = http(
        "GET",
        &format!("{server}/v1/events?after=0&limit=1000&client_id={client_id}"),
        None,
    )
    .await;
    js_sys::Array::from(&prop(&page, "events"))
        .iter()
        .map(|e| prop(&e, "id").as_string().unwrap())
        .collect()
}

/// Wait (up to `secs`) until the outbox has nothing pending.
async fn drained(outbox: &Outbox, secs: u32) {
    for _ in 0..secs * 10 {
        if pending_count(outbox).await == 0.0 {
            return;
        }
        sleep_ms(100).await;
    }
    panic!("events still pending after {secs} s: {:?}", outbox.status());
}

/// The `status` getter's number `k`, polled until it equals `want` (up to 2 s).
async fn status_reaches(outbox: &Outbox, k: &str, want: f64) {
    for _ in 0..40 {
        if num(&outbox.status(), k) == want {
            return;
        }
        sleep_ms(50).await;
    }
    panic!("status.{k} never reached {want}: {:?}", outbox.status());
}

async fn commit_todos(outbox: &Outbox, ids: std::ops::Range<u32>) -> Vec<String> {
    let mut out = Vec::new();
    for id in ids {
        let v = wait(outbox.transaction(
            js("['todos']"),
            callback(&format!(
                "tx.put('todos', {{ id: {id}, done: 0 }}); return tx.enqueue('TodoCreated', {{ id: {id} }}, {{ key: 'todo-{id}' }});"
            )),
        ))
        .await
        .unwrap();
        out.push(v.as_string().unwrap());
    }
    out
}

#[wasm_bindgen_test]
async fn relay_delivers_through_a_500_period_and_an_offline_period() {
    let server = server();
    http("POST", &format!("{server}/__test/reset"), Some("{}")).await;
    let outbox = open_todos(
        &fresh_name("relay"),
        &format!(
            // A CORS-safelisted header: the server allows only the protocol's
            // own headers cross-origin, like a real deployment would.
            r#", endpoint: "{server}/v1/events", retry: {{ baseMs: 100, capMs: 400 }},
                    headers: async ({{ refresh }}) => {{
                        globalThis.headerCalls = (globalThis.headerCalls ?? 0) + 1;
                        return {{ "accept-language": refresh ? "fr" : "en" }};
                    }}"#
        ),
    )
    .await;
    let statuses = std::rc::Rc::new(std::cell::RefCell::new(Vec::<JsValue>::new()));
    let seen = statuses.clone();
    let listener = wasm_bindgen::closure::Closure::<dyn FnMut(JsValue)>::new(move |e: JsValue| {
        seen.borrow_mut().push(prop(&e, "detail"));
    });
    outbox
        .add_event_listener(
            "status".into(),
            listener.as_ref().unchecked_ref::<Function>().clone(),
        )
        .unwrap();
    let client = outbox.client_id();

    // Plain delivery, woken by the commits.
    let mut expected = commit_todos(&outbox, 0..5).await;
    drained(&outbox, 10).await;
    assert_eq!(received(server, &client).await, expected);
    assert!(
        num(&js_sys::global(), "headerCalls") >= 1.0,
        "headers() is asked at send time"
    );
    status_reaches(&outbox, "sent", 5.0).await;

    // A 500 period: attempts fail, then the backoff timer delivers everything.
    http(
        "POST",
        &format!("{server}/__test/fail"),
        Some(r#"{"status":500,"for_ms":1000}"#),
    )
    .await;
    expected.extend(commit_todos(&outbox, 5..8).await);
    // Not a synchronization: a window in which the failing server must not
    // have let anything through.
    sleep_ms(300).await;
    assert!(pending_count(&outbox).await > 0.0, "the server is failing");
    drained(&outbox, 15).await;
    assert_eq!(
        received(server, &client).await,
        expected,
        "all, in order, once"
    );
    assert!(
        statuses
            .borrow()
            .iter()
            .any(|s| prop(s, "lastError").as_string().is_some()),
        "a status event carried the 500"
    );

    // An offline period: nothing is attempted, nothing is spent.
    outbox.set_online(Some(false)).unwrap();
    expected.extend(commit_todos(&outbox, 8..11).await);
    // A window in which an online relay would have tried (its backoff is
    // 100-400 ms): the assertion is that nothing was.
    sleep_ms(500).await;
    let pending = js_sys::Array::from(&wait(outbox.pending(None)).await.unwrap());
    assert_eq!(pending.length(), 3);
    assert!(
        pending.iter().all(|e| num(&e, "attempts") == 0.0),
        "no attempt spent offline"
    );
    // The status follows offline commits, although the loop sleeps.
    status_reaches(&outbox, "pending", 3.0).await;
    assert!(
        statuses
            .borrow()
            .iter()
            .any(|s| num(s, "pending") == 3.0 && !prop(s, "online").as_bool().unwrap()),
        "a status event reported the offline commits"
    );
    let report = wait(outbox.flush()).await.unwrap();
    assert_eq!(num(&report, "sent"), 0.0);
    assert_eq!(num(&report, "pending"), 3.0);
    assert_eq!(
        prop(&report, "skipped").as_string().as_deref(),
        Some("offline")
    );
    assert!(!prop(&outbox.status(), "online").as_bool().unwrap());
    outbox.set_online(None).unwrap();
    drained(&outbox, 10).await;
    assert_eq!(received(server, &client).await, expected);

    // flush() reports what it delivered.
    wait(outbox.stop()).await.unwrap();
    expected.extend(commit_todos(&outbox, 11..13).await);
    let report = wait(outbox.flush()).await.unwrap();
    assert_eq!(num(&report, "sent"), 2.0);
    assert_eq!(num(&report, "pending"), 0.0);
    assert!(prop(&report, "skipped").is_null(), "a real flush");
    assert_eq!(received(server, &client).await, expected);
    wait(outbox.close()).await.unwrap();
}

#[wasm_bindgen_test]
async fn one_sender_per_outbox_and_handover_on_close() {
    let server = server();
    let name = fresh_name("tabs");
    let opts = format!(r#", endpoint: "{server}/v1/events", retry: {{ baseMs: 100, capMs: 400 }}"#);
    let a = open_todos(&name, &opts).await;
    leader_is(&a, true).await;
    let b = open_todos(&name, &opts).await;
    leader_is(&a, true).await;
    leader_is(&b, false).await;
    // B commits, A (the sender) is told over the BroadcastChannel and delivers.
    let mut expected = commit_todos(&b, 0..3).await;
    drained(&b, 10).await;
    let client = b.client_id();
    assert_eq!(received(server, &client).await, expected);
    // B's status follows A's delivery (B counts after A's "flushed" message).
    status_reaches(&b, "sent", 3.0).await;
    status_reaches(&b, "pending", 0.0).await;
    // B's flush is A's job: B says so instead of looking like a real flush.
    let report = wait(b.flush()).await.unwrap();
    assert_eq!(
        prop(&report, "skipped").as_string().as_deref(),
        Some("not-leader")
    );
    // A closes: B takes over the lock and delivers.
    wait(a.close()).await.unwrap();
    leader_is(&b, true).await;
    expected.extend(commit_todos(&b, 3..6).await);
    drained(&b, 10).await;
    assert_eq!(received(server, &client).await, expected);
    wait(b.close()).await.unwrap();
}

/// Case 1: a connection closed under the relay without an event (an
/// `InvalidStateError` on a connection the outbox did not close) is
/// reopened; one lost for good rejects every queued flush with a named error.
#[wasm_bindgen_test]
async fn a_connection_closed_under_the_relay_is_reopened_and_queued_flushes_get_named_errors() {
    // Nothing listens on port 9: no request gets that far anyway.
    let name = fresh_name("flush-error");
    let outbox = open_todos(&name, r#", endpoint: "http://127.0.0.1:9/v1/events""#).await;
    leader_is(&outbox, true).await;
    // Close the connection under the running relay: it is reopened.
    outbox.db().close();
    wait(outbox.enqueue("A".into(), js("{ n: 1 }"), JsValue::UNDEFINED))
        .await
        .expect("the outbox reopened its connection");
    let report = within(10_000, outbox.flush()).await.unwrap();
    assert!(prop(&report, "skipped").is_null(), "{report:?}");
    assert_eq!(status_str(&outbox, "connection"), "open");
    // Delete the database: the connection is lost for good. Two flushes
    // queued for the same round both get the error.
    run_js(&format!(
        "await new Promise((resolve) => {{ const r = indexedDB.deleteDatabase({name:?}); r.onsuccess = resolve; }});"
    ))
    .await;
    let (a, b) = (outbox.flush(), outbox.flush());
    for p in [a, b] {
        let e = within(10_000, p).await.expect_err("the connection is lost");
        assert!(e.is_instance_of::<js_sys::Error>(), "a real Error: {e:?}");
        assert_eq!(error_name(&e), "ConnectionLostError", "{e:?}");
    }
    wait(outbox.close()).await.unwrap();
}

// ---- browser lifecycle (issue 10) ---------------------------------------------

/// Whether this engine resumed code awaiting `Blob.arrayBuffer()` (of a small
/// in-memory Blob) while an IndexedDB transaction kept alive by a chain of
/// requests (as `outbox.transaction` keeps it) was still active, in one try.
async fn blob_read_resumes_inside_the_transaction() -> bool {
    let name = fresh_name("blob-probe");
    run_js(&format!(
        "const db = await new Promise((resolve, reject) => {{
            const r = indexedDB.open({name:?}, 1);
            r.onupgradeneeded = () => r.result.createObjectStore('s');
            r.onsuccess = () => resolve(r.result);
            r.onerror = () => reject(r.error);
        }});
        const tx = db.transaction('s', 'readwrite');
        const done = new Promise((resolve) => {{ tx.oncomplete = tx.onabort = resolve; }});
        const store = tx.objectStore('s');
        let reading = true;
        const keepAlive = () => {{ if (reading) store.get(0).onsuccess = keepAlive; }};
        keepAlive();
        await new Blob(['abc']).arrayBuffer();
        reading = false;
        let active;
        try {{ store.get(0); active = true; }} catch (e) {{ active = false; }}
        await done;
        db.close();
        indexedDB.deleteDatabase({name:?});
        return active;"
    ))
    .await
    .as_bool()
    .unwrap()
}

/// Case 6: an async callback that awaits something other than its own
/// transaction's requests (a fetch, a timer, `Blob.arrayBuffer()`): IndexedDB
/// would commit what was written before the await alone. The commit is
/// refused before anything is written, with a named error
/// (WebKit: see the Blob.arrayBuffer() note inside).
#[wasm_bindgen_test]
async fn a_callback_awaiting_something_else_writes_nothing() {
    let outbox = open_todos(&fresh_name("foreign-await"), "").await;
    // An engine difference. Chromium and Firefox resume an await of
    // Blob.arrayBuffer() in a task of its own, after the transaction went
    // inactive (0 of 20 tries): the library must refuse it like the others.
    // WebKit (WebKitGTK 2.50) resumes it about half the time while the
    // transaction kept alive by the library is still active (10 of 20): that
    // await is then no foreign await, the callback's later writes are accepted
    // and the transaction commits whole. So where the engine can do that (seen
    // in up to 20 tries, WebKit misses all 20 about once in a million runs),
    // either outcome is allowed, each with its all-or-nothing asserted: a whole
    // commit (the todo AND its event) or the refusal with nothing written.
    let mut blob_read_inside = false;
    for _ in 0..20 {
        if blob_read_resumes_inside_the_transaction().await {
            blob_read_inside = true;
            break;
        }
    }
    let mut committed = 0.0;
    for (i, (what, wait_for)) in [
        ("a timer", "await new Promise((r) => setTimeout(r, 50));"),
        (
            "a fetch",
            "await fetch('data:text/plain,x').then((r) => r.text());",
        ),
        (
            "Blob.arrayBuffer()",
            "await new Blob(['abc']).arrayBuffer();",
        ),
        (
            "a zero timer",
            "await new Promise((r) => setTimeout(r, 0));",
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let id = 10 + i as u32;
        let result = wait(outbox.transaction(
            js(r#"["todos"]"#),
            Function::new_with_args(
                "tx",
                &format!(
                    "return (async () => {{
                        tx.put('todos', {{ id: {id}, done: 0 }});
                        {wait_for}
                        tx.enqueue('TodoCreated', {{ id: {id} }});
                    }})();"
                ),
            ),
        ))
        .await;
        if what == "Blob.arrayBuffer()" && blob_read_inside && result.is_ok() {
            committed += 1.0;
            assert!(
                !todo(&outbox, id).await.is_undefined(),
                "{what}: the todo is missing"
            );
            assert_eq!(
                pending_count(&outbox).await,
                committed,
                "{what}: the event was not committed with the todo"
            );
            continue;
        }
        let err = result.expect_err(what);
        assert_eq!(error_name(&err), "ForeignAwaitError", "{what}: {err:?}");
        assert!(
            prop(&err, "message")
                .as_string()
                .unwrap()
                .contains("before or after outbox.transaction"),
            "{what}: {err:?}"
        );
        assert!(
            todo(&outbox, id).await.is_undefined(),
            "{what}: the todo was written alone"
        );
        assert_eq!(pending_count(&outbox).await, committed, "{what}");
    }
    // A callback that catches the failure of its late write still writes nothing.
    let err = wait(outbox.transaction(
        js(r#"["todos"]"#),
        callback(
            "return (async () => {
                tx.put('todos', { id: 2, done: 0 });
                await new Promise((r) => setTimeout(r, 30));
                try { tx.enqueue('TodoCreated', { id: 2 }); } catch (e) { /* swallowed */ }
                return 'done';
            })();",
        ),
    ))
    .await
    .unwrap_err();
    assert_eq!(error_name(&err), "ForeignAwaitError", "{err:?}");
    assert!(todo(&outbox, 2).await.is_undefined());
    // Awaiting the transaction's own requests (and microtasks) is fine.
    let value = wait(outbox.transaction(
        js(r#"["todos"]"#),
        callback(
            "return (async () => {
                tx.put('todos', { id: 3, done: 0 });
                const before = await tx.get('todos', 3);
                await Promise.resolve();
                const missing = await tx.get('todos', 4);
                tx.put('todos', { id: 4, done: before.done + 1 });
                await tx.get('todos', 4);
                return tx.enqueue('TodoCreated', { id: 3 }, { key: missing === undefined ? 'ok' : 'bad' });
            })();",
        ),
    ))
    .await
    .unwrap();
    assert!(value.as_string().is_some());
    assert_eq!(num(&todo(&outbox, 4).await, "done"), 1.0);
    assert_eq!(pending_count(&outbox).await, committed + 1.0);
    wait(outbox.close()).await.unwrap();
}

/// `promise`, or an error when it neither resolves nor rejects within `ms`
/// (a hang fails the test instead of stalling the suite).
async fn within(ms: u32, promise: Promise) -> Result<JsValue, JsValue> {
    let race = Function::new_with_args(
        "p, ms",
        "return Promise.race([p, new Promise((_, reject) => setTimeout(() => reject(new Error(`still pending after ${ms} ms`)), ms))]);",
    );
    let raced: Promise = race
        .call2(&JsValue::UNDEFINED, &promise, &ms.into())
        .unwrap()
        .unchecked_into();
    wait(raced).await
}

/// Run an async JS function body and wait for its value.
async fn run_js(body: &str) -> JsValue {
    let f = Function::new_no_args(&format!("return (async () => {{ {body} }})();"));
    let p: Promise = f.call0(&JsValue::UNDEFINED).unwrap().unchecked_into();
    within(10_000, p).await.unwrap()
}

/// Poll `check` (up to `secs` seconds) until it is true.
async fn until(secs: u32, what: &str, mut check: impl FnMut() -> bool) {
    for _ in 0..secs * 20 {
        if check() {
            return;
        }
        sleep_ms(50).await;
    }
    panic!("timed out after {secs} s waiting for {what}");
}

fn status_str(outbox: &Outbox, k: &str) -> String {
    prop(&outbox.status(), k).as_string().unwrap_or_default()
}

/// Case 1: another tab (a newer build, one more app store) upgrades the
/// database under the sending outbox. The sender notices, reopens at the new
/// version, and both tabs' events keep flowing.
#[wasm_bindgen_test]
async fn another_tabs_upgrade_reopens_the_outbox_and_events_keep_flowing() {
    let server = server();
    let name = fresh_name("upgrade");
    let opts = format!(r#", endpoint: "{server}/v1/events", retry: {{ baseMs: 100, capMs: 400 }}"#);
    let a = open_todos(&name, &opts).await;
    leader_is(&a, true).await;
    let version = a.db().version();
    // "Tab B": the next version of the app, with a `notes` store.
    let b = Outbox::open_with(js(&format!(
        r#"{{ database: {name:?}, durability: "relaxed",
             stores: {{ todos: {{ keyPath: "id", indexes: {{ byDone: {{ keyPath: "done" }} }} }}, notes: {{ keyPath: "id" }} }}
             {opts} }}"#
    )))
    .await
    .unwrap();
    assert_eq!(b.db().version(), version + 1.0, "B upgraded the database");
    // A reopened the database at B's version and goes on committing.
    let mut expected = commit_todos(&a, 0..2).await;
    assert_eq!(
        a.db().version(),
        version + 1.0,
        "A reopened at the new version"
    );
    assert_eq!(status_str(&a, "connection"), "open");
    expected.extend(commit_todos(&b, 2..4).await);
    drained(&b, 10).await;
    assert_eq!(received(server, &b.client_id()).await, expected);
    // Still one sender: A kept the lock.
    leader_is(&a, true).await;
    leader_is(&b, false).await;
    wait(a.close()).await.unwrap();
    wait(b.close()).await.unwrap();
}

/// Case 1, when reopening is impossible (the database was deleted under
/// the outbox): the sender lock is given up at once, the status says why,
/// and calls reject with a `ConnectionLostError`; another outbox sends.
#[wasm_bindgen_test]
async fn a_deleted_database_gives_up_the_sender_lock_and_says_why() {
    let server = server();
    let name = fresh_name("deleted");
    let opts = format!(r#", endpoint: "{server}/v1/events", retry: {{ baseMs: 100, capMs: 400 }}"#);
    let a = open_todos(&name, &opts).await;
    leader_is(&a, true).await;
    run_js(&format!(
        "await new Promise((resolve, reject) => {{
            const r = indexedDB.deleteDatabase({name:?});
            r.onsuccess = resolve; r.onerror = () => reject(r.error);
        }});"
    ))
    .await;
    leader_is(&a, false).await;
    assert_eq!(status_str(&a, "connection"), "lost");
    let why = status_str(&a, "lastError");
    assert!(why.contains("deleted"), "{why}");
    let err = within(5_000, a.transaction(js("'todos'"), callback("")))
        .await
        .unwrap_err();
    assert_eq!(error_name(&err), "ConnectionLostError", "{err:?}");
    let err = within(5_000, a.flush()).await.unwrap_err();
    assert_eq!(error_name(&err), "ConnectionLostError", "{err:?}");
    // The lock is free: a new outbox over the (new) database sends.
    let c = open_todos(&name, &opts).await;
    leader_is(&c, true).await;
    let expected = commit_todos(&c, 0..2).await;
    drained(&c, 10).await;
    assert_eq!(received(server, &c.client_id()).await, expected);
    wait(a.close()).await.unwrap();
    wait(c.close()).await.unwrap();
}

/// Case 2: an upgrade blocked by a connection that ignores `versionchange`
/// is reported (`onBlocked`) and `Outbox.open` rejects with a `BlockedError`
/// after `blockedTimeoutMs`, leaving the database as it was.
#[wasm_bindgen_test]
async fn a_blocked_upgrade_is_reported_and_open_rejects_in_bounded_time() {
    let name = fresh_name("blocked");
    // The app's own connection (or an old tab) that never closes.
    run_js(&format!(
        "globalThis.blockedCalls = [];
         globalThis.holder = await new Promise((resolve, reject) => {{
            const r = indexedDB.open({name:?}, 1);
            r.onupgradeneeded = () => r.result.createObjectStore('legacy');
            r.onsuccess = () => resolve(r.result); r.onerror = () => reject(r.error);
        }});"
    ))
    .await;
    let options = js(&format!(
        r#"{{ database: {name:?}, stores: {{ todos: {{ keyPath: "id" }} }}, blockedTimeoutMs: 300,
             onBlocked: (e) => globalThis.blockedCalls.push(e) }}"#
    ));
    let err = within(5_000, Outbox::open(options)).await.unwrap_err();
    assert_eq!(error_name(&err), "BlockedError", "{err:?}");
    assert!(
        prop(&err, "message")
            .as_string()
            .unwrap()
            .contains("close the other tabs"),
        "{err:?}"
    );
    let calls = js_sys::Array::from(&prop(&js_sys::global(), "blockedCalls"));
    assert!(calls.length() >= 1, "onBlocked was called");
    assert_eq!(num(&calls.get(0), "newVersion"), 2.0);
    // The database was not changed, and opens once the other connection closes.
    run_js("globalThis.holder.close();").await;
    let outbox = open_todos(&name, "").await;
    assert_eq!(outbox.db().version(), 2.0);
    assert!(outbox.db().object_store_names().contains("legacy"));
    wait(outbox.close()).await.unwrap();
}

/// The server's request log for `client`, by start; with `unparsed`, also
/// the requests whose body never arrived whole (no client id: a push the
/// page gave up on while it was uploading).
async fn request_log(server: &str, client: &str, unparsed: bool) -> Vec<JsValue> {
    let log = http("GET", &format!("{server}/__test/requests"), None).await;
    let mut out: Vec<JsValue> = js_sys::Array::from(&log)
        .iter()
        .filter(|r| match prop(r, "client_id").as_string() {
            Some(id) => id == client,
            None => unparsed,
        })
        .collect();
    out.sort_by(|a, b| num(a, "started_at").total_cmp(&num(b, "started_at")));
    out
}

/// Pushes of `client` in the server's log, by start: `(started_at, finished_at)`.
async fn pushes(server: &str, client: &str) -> Vec<(f64, f64)> {
    request_log(server, client, false)
        .await
        .iter()
        .map(|r| (num(r, "started_at"), num(r, "finished_at")))
        .collect()
}

/// Case 5: `close()` while a push is on the wire hands the sender lock over
/// only after that push settled, so the next sender never pushes the same
/// batch while the first is in flight.
#[wasm_bindgen_test]
async fn close_mid_push_hands_over_only_after_the_push_settled() {
    let server = server();
    let name = fresh_name("close-mid-push");
    let opts = format!(r#", endpoint: "{server}/v1/events", retry: {{ baseMs: 100, capMs: 400 }}"#);
    let a = open_todos(&name, &opts).await;
    leader_is(&a, true).await;
    let b = open_todos(&name, &opts).await;
    leader_is(&b, false).await;
    let client = a.client_id();
    // The server stores the next push, then holds its answer back.
    http(
        "POST",
        &format!("{server}/__test/delay"),
        Some(r#"{"ms":1500,"count":1}"#),
    )
    .await;
    let expected = commit_todos(&a, 0..3).await;
    until(5, "A's push to be in flight", || {
        num(&a.status(), "inFlight") > 0.0
    })
    .await;
    let closing = a.close();
    leader_is(&b, true).await;
    within(10_000, closing).await.unwrap();
    drained(&b, 10).await;
    assert_eq!(received(server, &client).await, expected);
    let log = pushes(server, &client).await;
    assert!(!log.is_empty());
    for pair in log.windows(2) {
        assert!(
            pair[0].1 <= pair[1].0,
            "two pushes of this outbox overlapped: {log:?}"
        );
    }
    wait(b.close()).await.unwrap();
}

/// `outbox.retryNow()`: events waiting for a long `Retry-After` are sent at
/// once, and the call says how many were waiting.
#[wasm_bindgen_test]
async fn retry_now_sends_events_waiting_for_a_retry_time() {
    let server = server();
    let outbox = open_todos(
        &fresh_name("retry-now"),
        &format!(r#", endpoint: "{server}/v1/events", retry: {{ baseMs: 100, capMs: 120000 }}"#),
    )
    .await;
    leader_is(&outbox, true).await;
    http(
        "POST",
        &format!("{server}/__test/fail"),
        Some(r#"{"status":503,"count":1,"retry_after":60}"#),
    )
    .await;
    let expected = commit_todos(&outbox, 0..2).await;
    // The 503 was seen: both wait about a minute.
    until(10, "the 503 to park the events", || {
        prop(&outbox.status(), "lastError").as_string().is_some()
    })
    .await;
    let pending = js_sys::Array::from(&wait(outbox.pending(None)).await.unwrap());
    assert_eq!(pending.length(), 2);
    let now = js_sys::Date::now();
    assert!(
        pending
            .iter()
            .all(|e| num(&e, "nextAttemptAt") > now + 30_000.0),
        "parked by Retry-After: {pending:?}"
    );
    let waiting = wait(outbox.retry_now()).await.unwrap();
    assert_eq!(waiting.as_f64(), Some(2.0));
    drained(&outbox, 5).await;
    assert_eq!(received(server, &outbox.client_id()).await, expected);
    // Nothing waits now.
    assert_eq!(wait(outbox.retry_now()).await.unwrap().as_f64(), Some(0.0));
    wait(outbox.close()).await.unwrap();
}

/// Case 3: a tab never starts IndexedDB work from a BroadcastChannel
/// message (a tab frozen in the middle of it would hold a transaction that
/// blocks every other tab's commits); the counts come in the messages.
#[wasm_bindgen_test]
async fn message_handlers_start_no_indexeddb_work() {
    let server = server();
    let name = fresh_name("no-idb-in-handlers");
    let opts = format!(r#", endpoint: "{server}/v1/events", retry: {{ baseMs: 100, capMs: 400 }}"#);
    let a = open_todos(&name, &opts).await;
    leader_is(&a, true).await;
    // Mark every task that runs a BroadcastChannel message handler, until
    // the next task; count the transactions started meanwhile on `watched`.
    run_js(
        "if (!globalThis.handlerTx) {
            globalThis.handlerTx = 0;
            globalThis.inHandler = false;
            const d = Object.getOwnPropertyDescriptor(BroadcastChannel.prototype, 'onmessage');
            Object.defineProperty(BroadcastChannel.prototype, 'onmessage', {
                configurable: true,
                get() { return d.get.call(this); },
                set(h) {
                    d.set.call(this, h && ((e) => {
                        globalThis.inHandler = true;
                        setTimeout(() => { globalThis.inHandler = false; }, 0);
                        return h(e);
                    }));
                },
            });
            const t = IDBDatabase.prototype.transaction;
            IDBDatabase.prototype.transaction = function (...args) {
                if (globalThis.inHandler && this === globalThis.watched) globalThis.handlerTx++;
                return t.apply(this, args);
            };
        }
        globalThis.handlerTx = 0;",
    )
    .await;
    let b = open_todos(&name, &opts).await;
    leader_is(&b, false).await;
    Reflect::set(&js_sys::global(), &"watched".into(), &b.db()).unwrap();
    // A commits and sends: B learns both from messages.
    let expected = commit_todos(&a, 0..3).await;
    drained(&a, 10).await;
    status_reaches(&b, "sent", 3.0).await;
    status_reaches(&b, "pending", 0.0).await;
    assert_eq!(received(server, &a.client_id()).await, expected);
    assert_eq!(
        num(&js_sys::global(), "handlerTx"),
        0.0,
        "B started IndexedDB transactions from its message handler"
    );
    wait(a.close()).await.unwrap();
    wait(b.close()).await.unwrap();
}

fn message(e: &JsValue) -> String {
    prop(e, "message").as_string().unwrap_or_default()
}

/// Case 7: strings JavaScript allows and UTF-8 cannot hold (a lone
/// surrogate, from text cut inside an emoji) are refused with an
/// `InvalidEventError` naming the field, never changed to U+FFFD; whole
/// characters outside the BMP are stored exactly.
#[wasm_bindgen_test]
async fn lone_surrogates_are_refused_naming_the_field() {
    let outbox = open_todos(&fresh_name("surrogates"), "").await;
    for (what, args, field) in [
        ("type", r#"["a\uD83D", {}]"#, "the event type"),
        ("key", r#"["T", {}, { key: "a\uD83D" }]"#, "the key"),
        ("low half", r#"["T", {}, { key: "\uDE00b" }]"#, "the key"),
        (
            "header value",
            r#"["T", {}, { headers: { h: "x\uD83D" } }]"#,
            "header \"h\"",
        ),
        (
            "header name",
            r#"["T", {}, { headers: { ["x\uD83D"]: "v" } }]"#,
            "a header name",
        ),
        (
            "payload value",
            r#"["T", { title: "milk \uD83D" }]"#,
            "\"title\"",
        ),
        (
            "payload name",
            r#"["T", { ["t\uD83D"]: 1 }]"#,
            "property name",
        ),
        (
            "nested payload",
            r#"["T", { list: ["ok", "\uDC00"] }]"#,
            "\"1\"",
        ),
    ] {
        let args = js_sys::Array::from(&js(args));
        let err = wait(outbox.enqueue(args.get(0), args.get(1), args.get(2)))
            .await
            .expect_err(what);
        assert_eq!(error_name(&err), "InvalidEventError", "{what}: {err:?}");
        assert!(message(&err).contains(field), "{what}: {}", message(&err));
        assert!(
            message(&err).contains("lone UTF-16 surrogate"),
            "{what}: {}",
            message(&err)
        );
    }
    // In a transaction: refused, and nothing is written.
    let err = wait(outbox.transaction(
        js(r#"["todos"]"#),
        callback("tx.put('todos', { id: 1, done: 0 }); tx.enqueue('T', 1, { key: 'a\\uD83D' });"),
    ))
    .await
    .unwrap_err();
    assert_eq!(error_name(&err), "InvalidEventError", "{err:?}");
    assert!(todo(&outbox, 1).await.is_undefined());
    assert_eq!(pending_count(&outbox).await, 0.0);
    // Whole characters are kept exactly.
    let emoji = "a\u{1F600}\u{10FFFF}";
    wait(outbox.enqueue(
        JsValue::from_str(emoji),
        js(&format!("{{ t: {emoji:?} }}")),
        js(&format!(
            "{{ key: {emoji:?}, headers: {{ h: {emoji:?} }} }}"
        )),
    ))
    .await
    .unwrap();
    let stored = js_sys::Array::from(&wait(outbox.pending(None)).await.unwrap()).get(0);
    assert_eq!(prop(&stored, "type").as_string().unwrap(), emoji);
    assert_eq!(prop(&stored, "key").as_string().unwrap(), emoji);
    assert_eq!(
        prop(&prop(&stored, "headers"), "h").as_string().unwrap(),
        emoji
    );
    assert_eq!(
        prop(&prop(&stored, "payload"), "t").as_string().unwrap(),
        emoji
    );
    wait(outbox.close()).await.unwrap();
}

/// Case 8: numeric keys follow JavaScript's `String(n)`, non-finite ones are
/// refused as key errors; payloads JSON would not keep (Map, Set) are refused
/// with their own cause, objects with `toJSON()` (Date) are stored as it.
#[wasm_bindgen_test]
async fn keys_and_payload_types_follow_the_docs() {
    let outbox = open_todos(&fresh_name("keys"), "").await;
    for (key, want) in [
        ("-0", "0"),
        ("0", "0"),
        ("1e21", "1e+21"),
        ("0.1", "0.1"),
        ("-5", "-5"),
        ("2 ** 53", "9007199254740992"),
        ("'007'", "007"),
    ] {
        wait(outbox.enqueue("K".into(), js("1"), js(&format!("{{ key: {key} }}"))))
            .await
            .unwrap_or_else(|e| panic!("{key}: {e:?}"));
        let events = js_sys::Array::from(&wait(outbox.pending(Some(100))).await.unwrap());
        let last = events.get(events.length() - 1);
        assert_eq!(prop(&last, "key").as_string().unwrap(), want, "key {key}");
    }
    for key in [
        "NaN",
        "Infinity",
        "-Infinity",
        "true",
        "{}",
        "10n",
        "Symbol('k')",
    ] {
        let err = wait(outbox.enqueue("K".into(), js("1"), js(&format!("{{ key: {key} }}"))))
            .await
            .expect_err(key);
        assert_eq!(error_name(&err), "InvalidEventError", "{key}: {err:?}");
        let m = message(&err);
        assert!(m.contains("the key") && !m.contains("header"), "{key}: {m}");
    }
    // Map and Set are refused, for what they are, without unrelated hints.
    for payload in ["new Map([['a', 1]])", "{ tags: new Set(['x']) }"] {
        let err = wait(outbox.enqueue("P".into(), js(payload), JsValue::UNDEFINED))
            .await
            .expect_err(payload);
        assert_eq!(error_name(&err), "InvalidEventError");
        let m = message(&err);
        assert!(m.contains("Map") || m.contains("Set"), "{payload}: {m}");
        assert!(!m.contains("NaN"), "{payload}: an unrelated hint: {m}");
    }
    let err = wait(outbox.enqueue("P".into(), js("{ x: NaN }"), JsValue::UNDEFINED))
        .await
        .unwrap_err();
    assert!(message(&err).contains("NaN"), "{}", message(&err));
    // A non-string header value is a header error.
    let err = wait(outbox.enqueue("P".into(), js("1"), js("{ headers: { v: 2 } }")))
        .await
        .unwrap_err();
    assert!(message(&err).contains("header \"v\""), "{}", message(&err));
    // Date (toJSON) is stored as its JSON form.
    wait(outbox.enqueue(
        "D".into(),
        js("{ at: new Date(Date.UTC(2026, 0, 2)) }"),
        JsValue::UNDEFINED,
    ))
    .await
    .unwrap();
    let events = js_sys::Array::from(&wait(outbox.pending(Some(100))).await.unwrap());
    let last = events.get(events.length() - 1);
    assert_eq!(
        prop(&prop(&last, "payload"), "at").as_string().unwrap(),
        "2026-01-02T00:00:00.000Z"
    );
    wait(outbox.close()).await.unwrap();
}

/// Case 1, an upgrade this outbox cannot follow: another connection's
/// upgrade deletes the outbox stores. The outbox gives up at once (no
/// reopen can help), says why, and another outbox over the database sends.
#[wasm_bindgen_test]
async fn an_upgrade_that_removes_the_outbox_stores_gives_up_with_the_reason() {
    let server = server();
    let name = fresh_name("incompatible");
    let opts = format!(r#", endpoint: "{server}/v1/events", retry: {{ baseMs: 100, capMs: 400 }}"#);
    let a = open_todos(&name, &opts).await;
    leader_is(&a, true).await;
    let version = a.db().version();
    run_js(&format!(
        "const db = await new Promise((resolve, reject) => {{
            const r = indexedDB.open({name:?}, {next});
            r.onupgradeneeded = () => {{
                r.result.deleteObjectStore('edge_outbox_events');
                r.result.deleteObjectStore('edge_outbox_meta');
            }};
            r.onsuccess = () => resolve(r.result); r.onerror = () => reject(r.error);
        }});
        db.close();",
        next = version + 1.0
    ))
    .await;
    leader_is(&a, false).await;
    assert_eq!(status_str(&a, "connection"), "lost");
    let why = status_str(&a, "lastError");
    assert!(why.contains("no outbox stores"), "{why}");
    let err = within(5_000, a.enqueue("A".into(), js("1"), JsValue::UNDEFINED))
        .await
        .unwrap_err();
    assert_eq!(error_name(&err), "ConnectionLostError", "{err:?}");
    assert!(message(&err).contains("no outbox stores"), "{err:?}");
    // A newer build that declares the outbox again takes over.
    let b = open_todos(&name, &opts).await;
    leader_is(&b, true).await;
    let expected = commit_todos(&b, 0..2).await;
    drained(&b, 10).await;
    assert_eq!(received(server, &b.client_id()).await, expected);
    wait(a.close()).await.unwrap();
    wait(b.close()).await.unwrap();
}

/// Case 3, single page: `pagehide` (the back/forward cache, which freezes
/// the page) gives the sender lock up at once so another context sends;
/// `pageshow` queues for it again.
#[wasm_bindgen_test]
async fn pagehide_gives_the_sender_lock_up_and_pageshow_queues_again() {
    let server = server();
    let name = fresh_name("pagehide");
    let opts = format!(r#", endpoint: "{server}/v1/events", retry: {{ baseMs: 100, capMs: 400 }}"#);
    let a = open_todos(&name, &opts).await;
    leader_is(&a, true).await;
    // `b` runs in a worker-like context of its own in a real app; here it is
    // a second outbox of the same page, which the page's events reach too,
    // so it starts after the event.
    run_js("globalThis.dispatchEvent(new PageTransitionEvent('pagehide', { persisted: true }));")
        .await;
    leader_is(&a, false).await;
    let b = open_todos(&name, &opts).await;
    leader_is(&b, true).await;
    let expected = commit_todos(&a, 0..2).await;
    drained(&a, 10).await;
    assert_eq!(received(server, &a.client_id()).await, expected);
    run_js("globalThis.dispatchEvent(new PageTransitionEvent('pageshow', { persisted: true }));")
        .await;
    // The page is shown again: `a` queues behind `b` and takes over when it closes.
    wait(b.close()).await.unwrap();
    leader_is(&a, true).await;
    wait(a.close()).await.unwrap();
}

/// Case 2, one step removed: an outbox whose open only queues behind
/// another connection's blocked upgrade (no `blocked` event of its own)
/// rejects with a `BlockedError` within `blockedTimeoutMs` too.
#[wasm_bindgen_test]
async fn an_open_queued_behind_a_blocked_upgrade_rejects_in_bounded_time() {
    let name = fresh_name("queued");
    run_js(&format!(
        "globalThis.oldTab = await new Promise((resolve, reject) => {{
            const r = indexedDB.open({name:?}, 1);
            r.onsuccess = () => resolve(r.result); r.onerror = () => reject(r.error);
        }});
        // Another tab's upgrade, blocked by the old tab, which ignores versionchange.
        globalThis.newTab = indexedDB.open({name:?}, 2);
        await new Promise((resolve) => {{ globalThis.newTab.onblocked = resolve; }});"
    ))
    .await;
    let options = js(&format!(
        r#"{{ database: {name:?}, stores: {{ todos: {{ keyPath: "id" }} }}, blockedTimeoutMs: 300 }}"#
    ));
    let err = within(5_000, Outbox::open(options)).await.unwrap_err();
    assert_eq!(error_name(&err), "BlockedError", "{err:?}");
    assert!(
        message(&err).contains("waited behind another connection's upgrade"),
        "{err:?}"
    );
    // Once the old tab goes, the other upgrade and then the outbox open.
    run_js(
        "globalThis.oldTab.close();
         const db = await new Promise((resolve) => { globalThis.newTab.onsuccess = () => resolve(globalThis.newTab.result); });
         db.close();",
    )
    .await;
    let outbox = open_todos(&name, "").await;
    assert_eq!(outbox.db().version(), 3.0);
    wait(outbox.close()).await.unwrap();
}

/// Issue 9, case 1, in the browser: a 400 for every push (a proxy's header
/// or cookie limit, a WAF, a backend that cannot read the body) is the
/// channel's failure, not the events': nothing is dead-lettered, the error
/// shows, and everything goes once the channel is back.
#[wasm_bindgen_test]
async fn a_400_for_every_push_dead_letters_nothing() {
    let server = server();
    http("POST", &format!("{server}/__test/reset"), Some("{}")).await;
    let outbox = open_todos(
        &fresh_name("proxy-400"),
        &format!(r#", endpoint: "{server}/v1/events", retry: {{ baseMs: 50, capMs: 200 }}"#),
    )
    .await;
    leader_is(&outbox, true).await;
    http(
        "POST",
        &format!("{server}/__test/fail"),
        Some(r#"{"status":400,"for_ms":60000}"#),
    )
    .await;
    let expected = commit_todos(&outbox, 0..30).await;
    until(10, "the 400 to show in the status", || {
        prop(&outbox.status(), "lastError")
            .as_string()
            .is_some_and(|e| e.contains("400"))
    })
    .await;
    // Several attempts later (backoff at most 200 ms): still nothing dead.
    sleep_ms(600).await;
    assert_eq!(num(&outbox.status(), "dead"), 0.0, "{:?}", outbox.status());
    assert_eq!(pending_count(&outbox).await, 30.0);
    http("POST", &format!("{server}/__test/reset"), Some("{}")).await;
    drained(&outbox, 10).await;
    assert_eq!(received(server, &outbox.client_id()).await, expected);
    wait(outbox.close()).await.unwrap();
}

/// Events in each push of `client` in the server's log, by start; a push
/// whose body never arrived whole (the page gave up on it) counts as 0.
async fn push_sizes(server: &str, client: &str) -> Vec<f64> {
    request_log(server, client, true)
        .await
        .iter()
        .map(|r| num(r, "events"))
        .collect()
}

/// Issue 9, case 8, in the browser: a slow uplink (the server reads push
/// bodies at 40 KiB/s) delays 16 KiB events but delivers them. A push of two
/// or more times out (450 ms plus the body at 160 KiB/s is not enough), a
/// push of one does not: the relay narrows to single events instead of
/// sending the same push forever.
#[wasm_bindgen_test]
async fn a_slow_uplink_delays_large_events_but_delivers_them() {
    let server = server();
    http("POST", &format!("{server}/__test/reset"), Some("{}")).await;
    let outbox = open_todos(
        &fresh_name("slow-uplink"),
        &format!(
            r#", endpoint: "{server}/v1/events", timeoutMs: 450, minUploadRate: 163840,
                retry: {{ baseMs: 50, capMs: 200 }}"#
        ),
    )
    .await;
    leader_is(&outbox, true).await;
    http(
        "POST",
        &format!("{server}/__test/slow-upload"),
        Some(r#"{"bytes_per_sec":40960}"#),
    )
    .await;
    // Six 16 KiB events committed in one transaction: one push at first.
    let ids = wait(outbox.transaction(
        js("['todos']"),
        callback(
            "const ids = []; for (let id = 0; id < 6; id++) { \
               tx.put('todos', { id, done: 0 }); \
               ids.push(tx.enqueue('Large', { id, data: 'x'.repeat(16 * 1024 - 64) })); \
             } return Promise.all(ids);",
        ),
    ))
    .await
    .unwrap();
    let expected: Vec<String> = js_sys::Array::from(&ids)
        .iter()
        .map(|v| v.as_string().unwrap())
        .collect();
    drained(&outbox, 30).await;
    http(
        "POST",
        &format!("{server}/__test/slow-upload"),
        Some(r#"{"bytes_per_sec":0}"#),
    )
    .await;
    assert_eq!(received(server, &outbox.client_id()).await, expected);
    assert_eq!(num(&outbox.status(), "dead"), 0.0);
    // The log (reset at the start) shows the attempts: pushes cut while
    // uploading (0) or finished after the page gave up (more than 1), then
    // single events.
    let sizes = push_sizes(server, &outbox.client_id()).await;
    assert!(
        sizes.iter().filter(|&&n| n != 1.0).count() >= 2,
        "large pushes tried and timed out: {sizes:?}"
    );
    assert!(
        sizes.iter().rev().take(3).all(|&n| n == 1.0),
        "then single events: {sizes:?}"
    );
    wait(outbox.close()).await.unwrap();
}

/// Schema version 1 (before the sent watermark): a database an older build
/// wrote, with events sent, dead and pending, opens, delivers its pending
/// events in order, keeps the others as they were, and is marked version 2.
#[wasm_bindgen_test]
async fn a_version_1_outbox_opens_and_delivers_its_pending_events() {
    let server = server();
    let name = fresh_name("schema-v1");
    let db = app_made_database(&name).await;
    let client = uuid::Uuid::new_v4().to_string();
    let ids: Vec<String> = (0..4).map(|_| uuid::Uuid::now_v7().to_string()).collect();
    // The records and meta exactly as version 1 wrote them.
    let write = Function::new_with_args(
        "db, client, ids",
        r#"return new Promise((resolve, reject) => {
             const tx = db.transaction(["edge_outbox_events", "edge_outbox_meta"], "readwrite");
             const now = Date.now();
             const rec = (i, status, extra) => ({ id: ids[i], type: "Old", key: `k${i}`, payload: `{"n":${i}}`,
               headers: {}, created_at: now - 1000, status, attempts: 0, next_attempt_at: now - 1000, ...extra });
             const events = tx.objectStore("edge_outbox_events");
             events.add(rec(0, "sent", { attempts: 1, sent_at: now - 500 }));
             events.add(rec(1, "dead", { attempts: 1, last_error: "rejected" }));
             events.add(rec(2, "pending", { attempts: 2, last_error: "timeout" }));
             events.add(rec(3, "pending", {}));
             const meta = tx.objectStore("edge_outbox_meta");
             meta.put(1, "schema_version");
             meta.put(client, "client_id");
             tx.oncomplete = () => { db.close(); resolve(); };
             tx.onabort = () => reject(tx.error);
           });"#,
    );
    let ids_js: js_sys::Array = ids.iter().map(|s| JsValue::from_str(s)).collect();
    let written: Promise = write
        .call3(&JsValue::UNDEFINED, &db, &client.as_str().into(), &ids_js)
        .unwrap()
        .unchecked_into();
    wait(written).await.unwrap();

    let outbox = Outbox::open_with(js(&format!(
        r#"{{ database: {name:?}, durability: "relaxed", endpoint: "{server}/v1/events" }}"#
    )))
    .await
    .unwrap();
    assert_eq!(outbox.client_id(), client);
    drained(&outbox, 10).await;
    assert_eq!(received(server, &client).await, ids[2..]);
    let stats = wait(outbox.stats()).await.unwrap();
    assert_eq!(
        (
            num(&stats, "pending"),
            num(&stats, "sent"),
            num(&stats, "dead")
        ),
        (0.0, 3.0, 1.0)
    );
    let dead = js_sys::Array::from(&wait(outbox.dead_letters(None)).await.unwrap());
    assert_eq!(dead.length(), 1);
    assert_eq!(prop(&dead.get(0), "id").as_string(), Some(ids[1].clone()));
    let version = run_js(&format!(
        r#"const db = await new Promise((ok, ko) => {{ const r = indexedDB.open({name:?}); r.onsuccess = () => ok(r.result); r.onerror = () => ko(r.error); }});
           const v = await new Promise((ok) => {{ const r = db.transaction("edge_outbox_meta").objectStore("edge_outbox_meta").get("schema_version"); r.onsuccess = () => ok(r.result); }});
           db.close();
           return v;"#
    ))
    .await;
    assert_eq!(version.as_f64(), Some(2.0));
    wait(outbox.close()).await.unwrap();
}

// ---- JWT expiry end to end (issue 12, item 2) ----

/// The page's `headers` callback hands out a cached JWT that has expired (the
/// server, started by scripts/test-browser with `--jwt-secret`, mints both
/// tokens at `/__test/token`, so no JWT code ships in the test's wasm): the
/// push gets 401 `token_expired`, the callback is asked again with
/// `refresh: true`, and the fresh token delivers everything once, in order.
#[wasm_bindgen_test]
async fn an_expired_jwt_gets_401_and_the_headers_callback_refreshes_it() {
    let server = server();
    let name = fresh_name("jwt-expiry");
    let outbox = open_todos(
        &name,
        &format!(
            r#", endpoint: "{server}/v1/events", retry: {{ baseMs: 100, capMs: 400 }},
                headers: async ({{ refresh }}) => {{
                    const s = globalThis.jwtTest;
                    s.asked.push(refresh);
                    const mint = async (expiresIn) => {{
                        const r = await fetch("{server}/__test/token", {{
                            method: "POST",
                            headers: {{ "content-type": "application/json" }},
                            body: JSON.stringify({{ claims: {{ sub: s.client }}, expires_in: expiresIn }}),
                        }});
                        if (!r.ok) throw new Error("minting a token: " + r.status + " " + await r.text());
                        return (await r.json()).token;
                    }};
                    if (s.token === undefined) s.token = await mint(-3600);
                    if (refresh) s.token = await mint(600);
                    return {{ authorization: "Bearer " + s.token }};
                }}"#
        ),
    )
    .await;
    let client = outbox.client_id();
    // Set before the first commit, so before the first push asks for headers.
    Reflect::set(
        &js_sys::global(),
        &"jwtTest".into(),
        &js(&format!(r#"{{ client: {client:?}, asked: [] }}"#)),
    )
    .unwrap();

    // The server refuses an expired token from the request head, before it
    // reads the body, so the 401's log record names no client: start from
    // an empty log and read the unparsed records too (they are this test's).
    http("POST", &format!("{server}/__test/reset"), Some("{}")).await;
    let expected = commit_todos(&outbox, 0..5).await;
    drained(&outbox, 15).await;
    assert_eq!(
        received(server, &client).await,
        expected,
        "all, in order, once"
    );

    let state = Reflect::get(&js_sys::global(), &"jwtTest".into()).unwrap();
    let asked: Vec<bool> = js_sys::Array::from(&prop(&state, "asked"))
        .iter()
        .map(|r| r.as_bool().unwrap())
        .collect();
    assert_eq!(asked.first(), Some(&false), "{asked:?}");
    assert_eq!(
        asked.iter().filter(|&&r| r).count(),
        1,
        "one refresh: {asked:?}"
    );
    let statuses: Vec<f64> = request_log(server, &client, true)
        .await
        .iter()
        .map(|r| num(r, "status"))
        .collect();
    assert_eq!(statuses.first(), Some(&401.0), "{statuses:?}");
    assert!(statuses[1..].iter().all(|&s| s == 200.0), "{statuses:?}");
    wait(outbox.close()).await.unwrap();
}

/// Issue 13 follow-up: `flush()` right after a fresh outbox's first commit,
/// in a context with no other tab. Its sender lock was requested at open and
/// is free; the flush used to run before the browser granted it, tried the
/// lock beside its own queued request, lost, and reported "not-leader" with
/// the event still pending (every time the flush came before the grant).
/// Now the flush waits for the lock's answer and delivers. Every round also
/// bounds the flush (15 s): a hang fails here instead of stalling the suite.
#[wasm_bindgen_test]
async fn flush_right_after_open_and_first_commit_delivers_in_a_lone_tab() {
    let server = server();
    let opts = format!(r#", endpoint: "{server}/v1/events""#);
    let mut wrong = Vec::new();
    for round in 0..20u32 {
        let outbox = open_todos(&fresh_name("first-flush"), &opts).await;
        let commit = outbox.transaction(
            js("['todos']"),
            callback(
                "tx.put('todos', { id: 1, done: 0 }); return tx.enqueue('TodoCreated', { id: 1 });",
            ),
        );
        // Even rounds: the commit awaited first; odd: the flush issued at once.
        let flush = if round % 2 == 0 {
            wait(commit).await.unwrap();
            outbox.flush()
        } else {
            let flush = outbox.flush();
            wait(commit).await.unwrap();
            flush
        };
        let report = within(15_000, flush).await.unwrap_or_else(|e| {
            panic!("round {round}: flush: {e:?} (status {:?})", outbox.status())
        });
        if !prop(&report, "skipped").is_null() {
            wrong.push((round, js_sys::JSON::stringify(&report).unwrap()));
        }
        drained(&outbox, 10).await;
        wait(outbox.close()).await.unwrap();
    }
    assert!(wrong.is_empty(), "flushes skipped in a lone tab: {wrong:?}");
}

/// `outbox.transaction` commits at once when the callback is done (an
/// explicit `IDBTransaction.commit()`), except when the callback took the raw
/// `idbTransaction`: a cursor walked from its `success` handlers keeps
/// placing requests after the callback returned, and every one of them must
/// land in the same transaction as the event.
#[wasm_bindgen_test]
async fn requests_chained_on_the_raw_transaction_commit_with_the_event() {
    let outbox = open_todos(&fresh_name("raw-chain"), "").await;
    commit_todos(&outbox, 0..5).await;
    wait(outbox.transaction(
        js("['todos']"),
        callback(
            "const store = tx.idbTransaction.objectStore('todos');
             store.openCursor().onsuccess = (e) => {
               const cursor = e.target.result;
               if (!cursor) return;
               cursor.update({ ...cursor.value, done: 1 });
               cursor.continue();
             };
             return tx.enqueue('AllDone', {});",
        ),
    ))
    .await
    .unwrap();
    for id in 0..5 {
        assert_eq!(num(&todo(&outbox, id).await, "done"), 1.0, "todo {id}");
    }
    assert_eq!(pending_count(&outbox).await, 6.0);
    wait(outbox.close()).await.unwrap();
}
