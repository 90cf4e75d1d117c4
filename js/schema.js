// The outbox's IndexedDB schema: its object stores and indexes. The ONE copy:
// the npm package's `createOutboxStores` (an app's synchronous upgrade
// handler may call it before the wasm module is loaded) and the Rust store
// (src/web/idb/mod.rs imports this file through wasm-bindgen) both run it. The
// Rust store's queries use the names below; tests/browser.rs runs the store
// contract over a database made by an app's own upgrade with this function.

export const EVENTS = "edge_outbox_events";
export const META = "edge_outbox_meta";

/**
 * Create the outbox stores and indexes that `db` lacks. Only valid inside an
 * upgrade (`versionchange`) transaction; pass that transaction when the
 * database may already hold an older outbox schema (indexes are then added to
 * the existing events store).
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
  // Event id (the idempotency key): unique.
  if (!indexes.contains("id")) events.createIndex("id", "id", { unique: true });
  // Each status in commit order.
  if (!indexes.contains("status_seq")) events.createIndex("status_seq", ["status", "seq"]);
  // Only sent events have `sent_at`: the sent events in acknowledgement order.
  if (!indexes.contains("sent_at")) events.createIndex("sent_at", "sent_at");
  createMeta(db);
}

function createMeta(db) {
  if (!db.objectStoreNames.contains(META)) db.createObjectStore(META);
}
