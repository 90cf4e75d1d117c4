// Entry of the edge-outbox npm package: loads the wasm module on first use,
// so apps write `await Outbox.open(...)` without an explicit init step.
import init, { Outbox as WasmOutbox } from "./edge_outbox.js";

let loading;

/**
 * Load the wasm module (once). `Outbox.open` calls it; call it yourself only
 * to pass another location of `edge_outbox_bg.wasm` (a URL, a Response, or
 * the bytes).
 */
export function ready(wasm) {
  loading ??= init(wasm === undefined ? undefined : { module_or_path: wasm });
  return loading.then(() => undefined);
}

/** Open an outbox: see index.d.ts and README.md. */
export const Outbox = {
  async open(options) {
    await ready();
    return WasmOutbox.open(options);
  },
};

// Names and shapes of the outbox stores. They mirror `create_outbox_stores` in
// src/web/idb.rs (kept in plain JS so an app's synchronous upgrade handler can
// call it before the wasm module is loaded); the browser tests open databases
// created by both.
const EVENTS = "edge_outbox_events";
const META = "edge_outbox_meta";

/**
 * Create the outbox stores in the app's own upgrade handler (idb, Dexie's
 * underlying IDBDatabase, raw IndexedDB). Pass the upgrade transaction too
 * when the database may already hold the outbox stores.
 */
export function createOutboxStores(db, transaction) {
  const names = db.objectStoreNames;
  let events;
  if (names.contains(EVENTS)) {
    if (!transaction) return createMeta(db);
    events = transaction.objectStore(EVENTS);
  } else {
    events = db.createObjectStore(EVENTS, { keyPath: "seq", autoIncrement: true });
  }
  const indexes = events.indexNames;
  if (!indexes.contains("id")) events.createIndex("id", "id", { unique: true });
  if (!indexes.contains("status_seq")) events.createIndex("status_seq", ["status", "seq"]);
  if (!indexes.contains("sent_at")) events.createIndex("sent_at", "sent_at");
  createMeta(db);
}

function createMeta(db) {
  if (!db.objectStoreNames.contains(META)) db.createObjectStore(META);
}

/** The names of the outbox stores, to include in an `enqueueIn` transaction's scope. */
export const OUTBOX_STORES = Object.freeze([EVENTS]);
