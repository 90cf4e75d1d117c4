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
    // Checked before the wasm is loaded: on a server (Node, server-side
    // rendering) loading it would fail first, with fetch's opaque error.
    if (globalThis.indexedDB == null) {
      const e = new Error("IndexedDB is not available here (globalThis.indexedDB is missing): edge-outbox runs in a browser page or worker. Importing it on a server (Node, server-side rendering) is fine; open the outbox in the browser only.");
      e.name = "StorageError";
      throw e;
    }
    await ready();
    return WasmOutbox.open(options);
  },
};

// The outbox's stores: one copy of the schema, shared with the Rust store
// (src/web/idb/mod.rs imports js/schema.js too). Plain JS, so an app's
// synchronous upgrade handler can call it before the wasm module is loaded.
import { EVENTS, createOutboxStores } from "./schema.js";

/**
 * Create the outbox stores in the app's own upgrade handler (idb, Dexie's
 * underlying IDBDatabase, raw IndexedDB). Pass the upgrade transaction too
 * when the database may already hold the outbox stores.
 */
export { createOutboxStores };

/** The names of the outbox stores, to include in an `enqueueIn` transaction's scope. */
export const OUTBOX_STORES = Object.freeze([EVENTS]);
