// The JavaScript side of the browser backend: helpers the Rust code imports
// through wasm-bindgen (`#[wasm_bindgen(module = "/src/web/glue.js")]`).
// One module file, so the package (and the test page) load one snippet for
// all of them.

// ---- used by src/web/bindings.rs ----

const loneSurrogate = /[\uD800-\uDBFF](?![\uDC00-\uDFFF])|(?<![\uD800-\uDBFF])[\uDC00-\uDFFF]/;
const wellFormed = (s) => (typeof s.isWellFormed === "function" ? s.isWellFormed() : !loneSurrogate.test(s));
const LONE = "holds a lone UTF-16 surrogate (text cut inside a character, e.g. by slice() in the middle of an emoji), which UTF-8 and strict JSON readers cannot hold; fix the text (toWellFormed() replaces it with U+FFFD, if that is what you mean)";
export function strictJson(value) {
  const where = (holder, key) => (key === "" ? "the payload" : `the value at ${JSON.stringify(key)}`);
  const text = JSON.stringify(value, function (key, v) {
    if (!wellFormed(key)) throw new TypeError(`the property name ${JSON.stringify(key)} ${LONE}`);
    switch (typeof v) {
      case "string":
        if (!wellFormed(v)) throw new TypeError(`${where(this, key)} ${LONE}`);
        break;
      case "function": case "symbol":
        throw new TypeError(`${where(this, key)} is a ${typeof v}, which JSON cannot represent`);
      case "bigint":
        throw new TypeError(`${where(this, key)} is a BigInt, which JSON cannot represent; convert it to a string`);
      case "number":
        if (!Number.isFinite(v)) throw new TypeError(`${where(this, key)} is ${v}, which JSON cannot represent; use null or a string`);
        break;
      case "undefined":
        if (key === "" || Array.isArray(this)) throw new TypeError(`${where(this, key)} is undefined, which JSON cannot represent; use null`);
        break;
      case "object":
        if (v !== null && !Array.isArray(v)) {
          const p = Object.getPrototypeOf(v);
          if (p !== Object.prototype && p !== null) {
            const name = (v.constructor && v.constructor.name) || "object";
            throw new TypeError(`${where(this, key)} is a ${name}, not a plain object or array, and has no toJSON(); JSON would not keep it (convert it, e.g. Object.fromEntries(map) or [...set])`);
          }
        }
        break;
    }
    return v;
  });
  return text;
}
export function isWellFormed(s) {
  return wellFormed(s);
}
function foreign(cause) {
  const err = new Error(
    "the transaction callback awaited something other than this transaction's own requests " +
    "(a fetch, a timer, Blob.arrayBuffer(), another transaction): IndexedDB would have committed " +
    "the writes made before it alone, so the transaction was aborted and nothing was written; " +
    "do that work before or after outbox.transaction");
  err.name = "ForeignAwaitError";
  if (cause !== undefined) err.cause = cause;
  return err;
}
export function foreignAwaitError(cause) {
  return foreign(cause);
}
export function guardedCall(tx, storeName, callback, handle) {
  let result;
  try {
    result = callback(handle);
  } catch (e) {
    return Promise.reject(e);
  }
  if (result === null || (typeof result !== "object" && typeof result !== "function") || typeof result.then !== "function") {
    return Promise.resolve(result);
  }
  // An async callback. IndexedDB commits a transaction as soon as it has no
  // request left when control returns to the event loop: a callback awaiting
  // a fetch, a timer or Blob.arrayBuffer() would see its first writes
  // committed alone. So keep the transaction open with one cheap request at a
  // time (a keep-alive), and watch the callback's own requests: requests of a
  // transaction complete in the order they were placed, so while the callback
  // waits for one of them, some request other than the keep-alive completes
  // between two keep-alives. Rounds with none mean it waits for something
  // else: abort before anything is written and say why.
  const store = tx.objectStore(storeName);
  return new Promise((resolve, reject) => {
    let settled = false, finished = false, others = 0, idle = 0, keepAlive = null;
    const onRequest = (e) => { if (e.target !== keepAlive) others++; };
    const onEnd = () => { finished = true; };
    tx.addEventListener("success", onRequest, true);
    tx.addEventListener("error", onRequest, true);
    tx.addEventListener("abort", onEnd);
    tx.addEventListener("complete", onEnd);
    const cleanup = () => {
      settled = true;
      tx.removeEventListener("success", onRequest, true);
      tx.removeEventListener("error", onRequest, true);
    };
    const inactive = () => {
      if (finished) return false;
      try { store.get(0); return false; } catch (e) { return e && e.name === "TransactionInactiveError"; }
    };
    const refuse = (cause) => {
      cleanup();
      try { tx.abort(); } catch (_) { /* already finished */ }
      reject(foreign(cause));
    };
    const spin = () => {
      if (settled || finished) return;
      idle = others === 0 ? idle + 1 : 0;
      others = 0;
      if (idle >= 3) return refuse(undefined);
      try {
        keepAlive = store.get(0);
        keepAlive.onsuccess = spin;
      } catch (e) {
        refuse(e);
      }
    };
    spin();
    Promise.resolve(result).then(
      (value) => {
        if (settled) return;
        if (inactive()) return refuse(undefined);
        cleanup();
        resolve(value);
      },
      (error) => {
        if (settled) return;
        if ((error && error.name === "TransactionInactiveError") || inactive()) return refuse(error);
        cleanup();
        reject(error);
      },
    );
  });
}
export function isInactive(tx, name) {
  try { tx.objectStore(name).get(0); return false; } catch (e) { return e && e.name === "TransactionInactiveError"; }
}
// ---- used by src/web/idb/mod.rs (and requestPromise by bindings.rs) ----

export function requestPromise(req) {
  return new Promise((resolve, reject) => {
    req.onsuccess = () => resolve(req.result);
    req.onerror = () => reject(req.error);
  });
}
// Resolves when `tx` commits, rejects with the abort event when it aborts.
export function txDone(tx) {
  return new Promise((resolve, reject) => {
    tx.oncomplete = resolve;
    tx.onabort = reject;
  });
}

export function openRequest(req, upgrade, onBlocked, timeoutMs, blockedError) {
  return new Promise((resolve, reject) => {
    let gaveUp = false;
    let seen; // the versions of the blocked event, if there was one
    // Bounded from the start: an open also waits, without a blocked event of
    // its own, behind another connection's upgrade that is itself blocked.
    const timer = timeoutMs === undefined ? undefined : setTimeout(() => {
      gaveUp = true;
      reject(blockedError(seen && seen.oldVersion, seen && seen.newVersion));
    }, timeoutMs);
    req.onupgradeneeded = (e) => {
      // Given up while blocked: leave the database as it was.
      if (gaveUp) { try { req.transaction.abort(); } catch (_) {} return; }
      clearTimeout(timer);
      upgrade(e.oldVersion);
    };
    req.onsuccess = () => {
      clearTimeout(timer);
      if (gaveUp) { req.result.close(); return; }
      resolve(req.result);
    };
    req.onerror = (e) => {
      clearTimeout(timer);
      // An aborted open is this module's choice, not an app error event.
      e.preventDefault();
      if (!gaveUp) reject(req.error);
    };
    req.onblocked = (e) => {
      seen = { oldVersion: e.oldVersion, newVersion: e.newVersion };
      if (onBlocked) {
        try { onBlocked(seen); } catch (err) { console.error(err); }
      }
    };
  });
}

// ---- used by src/web/driver.rs ----

export function deferred() {
  let resolve;
  const promise = new Promise((r) => { resolve = r; });
  return [promise, resolve];
}

export function hasWebLocks() {
  const nav = globalThis.navigator;
  return !!(nav && nav.locks && typeof nav.locks.request === "function");
}
export function acquireLock(name, onAcquired, onQueued) {
  if (!hasWebLocks()) return null;
  let release;
  let released = false;
  const held = new Promise((resolve) => { release = () => { released = true; resolve(); }; });
  const locks = globalThis.navigator.locks;
  // A request released before it was granted lets go at once, unannounced.
  const granted = () => { if (!released) onAcquired(); return held; };
  // First take it only if it is free (answered at once, never queued): until
  // then a flush waits for the answer instead of reporting "not-leader" while
  // no one else holds the lock. Taken: held. Not: another context holds it,
  // so queue (onQueued is the answer then).
  locks.request(name, { ifAvailable: true }, (lock) => {
    if (lock) return granted();
    onQueued();
    if (!released) locks.request(name, granted).catch(() => {});
    return undefined;
  }).catch(() => onQueued());
  return release;
}
export function countsMessage(pending, sent, dead) {
  return { kind: "counts", pending, sent, dead };
}
export function tryLock(name, work) {
  const locks = globalThis.navigator && globalThis.navigator.locks;
  if (!locks) return work(true);
  return locks.request(name, { ifAvailable: true }, (lock) => work(lock !== null));
}

// ---- used by src/web/idb/store.rs ----

export function timeout(promise, ms) {
  let timer;
  return Promise.race([
    promise.finally(() => clearTimeout(timer)),
    new Promise((resolve) => { timer = setTimeout(() => resolve("timeout"), ms); }),
  ]);
}

// The fields of a stored event record in one call, in the order
// store.rs parse_record reads them: from wasm, each Reflect.get passed its
// property name as a new string (13 per record). Object(): a corrupt record
// that is not an object reads as all fields absent, not as a throw.
const FIELDS = ["id", "status", "headers", "seq", "type", "key", "payload", "created_at", "attempts",
  "next_attempt_at", "last_error", "sent_at", "retried_at"];
export function recordFields(r) {
  const o = Object(r);
  return FIELDS.map((k) => o[k]);
}

// ---- used by src/web/json.rs ----
// The browser's JSON parser instead of serde_json's in the package, with the
// checks serde's derive makes natively (src/protocol.rs): required fields,
// their types, unknown fields ignored.

const isObject = (v) => v !== null && typeof v === "object" && !Array.isArray(v);
const STATUSES = ["accepted", "duplicate", "rejected"];
export function pushResults(text) {
  const body = JSON.parse(text);
  if (!isObject(body)) throw new TypeError("the answer is not a JSON object");
  if (!Array.isArray(body.results)) throw new TypeError(body.results === undefined ? "missing field `results`" : "`results` is not an array");
  return body.results.map((r, i) => {
    const what = `results[${i}]`;
    if (!isObject(r)) throw new TypeError(`${what} is not an object`);
    if (typeof r.id !== "string") throw new TypeError(`${what}.id is not a string`);
    const status = STATUSES.indexOf(r.status);
    if (status < 0) throw new TypeError(`${what}.status is not one of ${STATUSES.join(", ")}`);
    if (r.reason != null && typeof r.reason !== "string") throw new TypeError(`${what}.reason is not a string`);
    return [r.id, status, r.reason ?? undefined];
  });
}
export function errorBody(text) {
  let b;
  try { b = JSON.parse(text); } catch (_) { return null; }
  if (!isObject(b) || typeof b.error !== "string" || typeof b.message !== "string") return null;
  const v = b.supported_protocols;
  if (v != null && !(Array.isArray(v) && v.every((n) => Number.isInteger(n) && n >= 0 && n <= 0xffffffff))) return null;
  return [b.error, b.message, v ?? null];
}
const SURROGATE_ESCAPE = /\\u[dD][89a-fA-F]/;
export function checkJsonText(text) {
  // Escapes are decoded, and strings checked, only in text that has a
  // surrogate escape at all (as natively: protocol::check_well_formed_strings).
  if (!SURROGATE_ESCAPE.test(text)) return void JSON.parse(text);
  JSON.parse(text, function (key, v) {
    if (!wellFormed(key) || (typeof v === "string" && !wellFormed(v))) {
      throw new SyntaxError(`a string ${LONE}`);
    }
    return v;
  });
}
// The text of a thrown value that is neither an Error nor a string (what
// `{:?}` of a JsValue gave, without wasm-bindgen's debug-string code).
export function valueText(v) {
  try { return String(v); } catch (_) { return typeof v; }
}
