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
