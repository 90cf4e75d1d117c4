// Hand-written types of the edge-outbox npm package (no `any`): the runtime
// is wasm-bindgen's glue, whose generated types cannot describe callbacks
// and option objects precisely.

/** The JSON values an event payload may hold. */
export type JsonValue =
  | null
  | boolean
  | number
  | string
  | JsonValue[]
  | { [key: string]: JsonValue | undefined };

/** An index of an app store (IndexedDB `createIndex`). */
export interface IndexDefinition {
  keyPath: string | string[];
  unique?: boolean;
  multiEntry?: boolean;
}

/** An app store (IndexedDB `createObjectStore`), created or completed at open. */
export interface StoreDefinition {
  /** In-line key path; omit for out-of-line keys. */
  keyPath?: string | string[] | null;
  autoIncrement?: boolean;
  indexes?: Record<string, IndexDefinition>;
}

/**
 * `"relaxed"`: the commit is reported before the data reaches the disk (a power
 * loss may lose the last commits; a browser crash does not). `"strict"`: flushed
 * first (slower). `"default"`: the browser's choice (relaxed in Chromium).
 */
export type Durability = "strict" | "relaxed" | "default";

/** Options of {@link Outbox.open}. */
export interface OutboxOptions {
  /** IndexedDB database name. Holds the app's stores and the outbox stores. */
  database: string;
  /** The app's stores; missing stores and indexes are added (the version is bumped). */
  stores?: Record<string, StoreDefinition>;
  /** Sync endpoint, e.g. `"/v1/events"`. Without it events are only stored. */
  endpoint?: string;
  /** IndexedDB durability of every write transaction. Default `"default"`. */
  durability?: Durability;
  /**
   * Extra request headers (credentials), asked for before every request;
   * `refresh` is true after a 401/403: return fresh credentials then.
   */
  headers?: (info: { refresh: boolean }) => Record<string, string> | Promise<Record<string, string>>;
  /** Start the relay at open (default true when `endpoint` is set). */
  autoStart?: boolean;
  /** Most events per request (default 100). */
  batchSize?: number;
  /** Most event bytes per request (default 512 KiB). */
  batchBytes?: number;
  /** Largest event (type + key + payload + headers) in bytes (default 256 KiB). */
  maxEventBytes?: number;
  /**
   * Base time allowed for a request (default 20000 ms): a push of `n` bytes
   * may take `timeoutMs + n / minUploadRate` seconds' worth, so a slow uplink
   * delays a large push instead of failing it forever. After repeated
   * timeouts (and 5xx, resets) the relay also sends smaller pushes, down to
   * one event; nothing is dead-lettered for it.
   */
  timeoutMs?: number;
  /** The slowest uplink, in bytes per second, a push is given time for (default 2048). */
  minUploadRate?: number;
  /**
   * Called when opening has to upgrade the database (new stores or indexes)
   * and another connection blocks it: another tab of an older version of the
   * app, or a connection of the app's own, that does not close on
   * `versionchange`. Show "close the other tabs of this app".
   */
  onBlocked?: (info: { oldVersion: number; newVersion: number | null }) => void;
  /**
   * How long `open` may wait for the database (blocked by another connection,
   * or queued behind another tab's blocked upgrade) before it rejects with a
   * `BlockedError`, leaving the database unchanged (default 10000 ms; `null`:
   * wait for as long as it takes).
   */
  blockedTimeoutMs?: number | null;
  /**
   * Backoff with full jitter: first retry within `baseMs` (1000), at most
   * `capMs` (300000), which is also the ceiling of a server's `Retry-After`
   * (a stored retry time further ahead is not believed). Events older than
   * `maxAgeMs` go dead ("expired"): the age is the clock now minus the
   * commit time (or the app's last `retry` of the event, so a retried
   * expired event is sent); a commit time before 2026 (a reset clock) never
   * expires, and an event is never older than one committed before it.
   * Only evidence against one event dead-letters it: a `rejected` result,
   * or a 400/422 with the protocol's error body that a lone event still
   * gets while others pass. A proxy's 400, 5xx, timeouts and auth failures
   * leave every event pending, with the error in `status.lastError`.
   */
  retry?: { baseMs?: number; capMs?: number; maxAgeMs?: number };
}

/**
 * Options of `enqueue`.
 *
 * Payloads (typed `unknown`) must be JSON-representable, and are stored as
 * `JSON.stringify` writes them: an object with a `toJSON()` method (a `Date`)
 * is stored as what it returns; functions, symbols, BigInt, NaN/Infinity,
 * `undefined` in arrays, cycles and class instances without `toJSON()` (Map,
 * Set, typed arrays) are refused with an `InvalidEventError` that names the
 * value (convert them first: `Object.fromEntries(map)`, `[...set]`).
 *
 * Every string (the type, the key, header names and values, and every string
 * and property name in the payload) must be well-formed UTF-16: a lone
 * surrogate (text cut inside an emoji with `slice`) is refused with an
 * `InvalidEventError` naming the field, never silently replaced.
 */
export interface EnqueueOptions {
  /**
   * Ordering/aggregate key, e.g. `"todo-42"`. A number is formatted as
   * JavaScript's `String(n)` does (`-0` is `"0"`, `1e21` is `"1e+21"`), so
   * `42` and `"42"` are the same key; NaN and ±Infinity are refused.
   */
  key?: string | number;
  /** String headers sent with the event (trace context, schema version). */
  headers?: Record<string, string>;
}

export type EventStatus = "pending" | "sent" | "dead";

/** A stored event. Times are Unix milliseconds. */
export interface OutboxEvent {
  seq: number;
  /** UUIDv7, the idempotency key. */
  id: string;
  type: string;
  key: string | null;
  payload: JsonValue;
  headers: Record<string, string>;
  createdAt: number;
  status: EventStatus;
  attempts: number;
  nextAttemptAt: number;
  lastError: string | null;
  sentAt: number | null;
}

/** Counts over the outbox. */
export interface OutboxStats {
  pending: number;
  sent: number;
  dead: number;
  oldestPendingAt: number | null;
}

/**
 * Why a flush made no delivery attempt:
 * - `"offline"`: `navigator.onLine` is false (or `setOnline(false)`); nothing
 *   was tried and no attempt was spent; the relay sends when the network is back;
 * - `"not-leader"`: another tab or worker is this outbox's sender; it was asked
 *   to flush, and the result shows up in `status` events, not in this report;
 * - `"stopped"`: the relay was stopped (`stop()`, `close()`) before this
 *   flush's turn came.
 */
export type FlushSkipped = "offline" | "not-leader" | "stopped";

/** What a flush achieved. */
export interface FlushReport {
  /** Events acknowledged by the server during this flush. */
  sent: number;
  /** Events dead-lettered during this flush (rejected, too large, expired). */
  dead: number;
  /** Events still pending afterwards. */
  pending: number;
  /** When the next attempt is due (Unix ms), if events wait for a retry time. */
  nextAttemptAt: number | null;
  /** The last delivery failure, if the flush stopped on one. */
  lastError: string | null;
  /** Null when the flush really ran; otherwise why it made no attempt (`sent` and `dead` are 0 then). */
  skipped: FlushSkipped | null;
}

/**
 * The outbox's IndexedDB connection:
 * - `"open"`;
 * - `"reopening"`: another tab upgraded the database (or the browser closed
 *   the connection); the outbox closed its connection at once, so the upgrade
 *   is not blocked, and reopens it at the new version; calls wait meanwhile;
 * - `"lost"`: it could not reopen (the database was deleted, the new version
 *   has no outbox stores or lacks one of this outbox's app stores); the
 *   sender lock was given up at once so another tab sends, `lastError` says
 *   why, and calls reject with a `ConnectionLostError`: open the outbox again
 *   (reload the page).
 */
export type ConnectionState = "open" | "reopening" | "lost";

/** The relay's status, in `status` events and `outbox.status`. */
export interface OutboxStatus {
  pending: number;
  sent: number;
  dead: number;
  /** Events in the request on the wire. */
  inFlight: number;
  /** `navigator.onLine`, or the value forced with `setOnline`. */
  online: boolean;
  flushing: boolean;
  /**
   * True while this tab/worker is the one sender of this outbox: it holds the
   * Web Lock (or, where `navigator.locks` is missing, the outbox's lease in
   * IndexedDB). A tab gives it up when it is frozen (`freeze`, `pagehide`)
   * and queues for it again on `resume`/`pageshow`.
   */
  leader: boolean;
  /** The IndexedDB connection: see {@link ConnectionState}. */
  connection: ConnectionState;
  lastError: string | null;
  nextAttemptAt: number | null;
}

/** The `tx` of `outbox.transaction`: valid only inside the callback. */
export interface OutboxTransaction {
  put(store: string, value: unknown, key?: IDBValidKey): void;
  add(store: string, value: unknown, key?: IDBValidKey): void;
  delete(store: string, key: IDBValidKey | IDBKeyRange): void;
  /** Read inside the transaction (await only these inside an async callback). */
  get(store: string, key: IDBValidKey): Promise<unknown>;
  /** Add an event; returns its id. Throws `InvalidEventError` (and aborts) if not JSON. */
  enqueue(type: string, payload: unknown, options?: EnqueueOptions): string;
  readonly idbTransaction: IDBTransaction;
}

/** Error names of rejected promises (`error.name`). */
export type OutboxErrorName =
  | "InvalidEventError"
  | "QuotaExceededError"
  | "ClosedError"
  | "ForeignAwaitError"
  | "ConnectionLostError"
  | "BlockedError"
  | "VersionConflictError"
  | "InvalidConfigError"
  | "NetworkError"
  | "ProtocolError"
  | "StorageError";

/** An outbox over one IndexedDB database. */
export interface Outbox {
  /**
   * Commit the app's writes and the events in ONE IndexedDB transaction: all
   * of it or nothing. An async callback may await only this transaction's own
   * requests (`tx.get`); when it awaits anything else (a fetch, a timer,
   * `Blob.arrayBuffer()`), the transaction is aborted before anything is
   * written and the promise rejects with a `ForeignAwaitError`.
   */
  transaction<T>(storeNames: string | string[], callback: (tx: OutboxTransaction) => T | Promise<T>): Promise<T>;
  /** Add an event to the app's own IDBTransaction (scope must include `"edge_outbox_events"`). */
  enqueueIn(transaction: IDBTransaction, type: string, payload: unknown, options?: EnqueueOptions): string;
  /** Enqueue an event alone; resolves with its id once committed. */
  enqueue(type: string, payload: unknown, options?: EnqueueOptions): Promise<string>;
  /**
   * Deliver what is due now. Resolves with what was done; `skipped` tells an
   * offline (or another tab's) flush from a real one. Rejects with an `Error`
   * whose `name` is an {@link OutboxErrorName} (e.g. `ClosedError`).
   */
  flush(): Promise<FlushReport>;
  start(): void;
  stop(): Promise<void>;
  stats(): Promise<OutboxStats>;
  pending(limit?: number): Promise<OutboxEvent[]>;
  deadLetters(limit?: number): Promise<OutboxEvent[]>;
  /** Make a dead event pending again; resolves false when no dead event has this id. */
  retry(id: string): Promise<boolean>;
  /**
   * "Try now" (a button after the network is known to be back): every pending
   * event waiting for a retry time (backoff, `Retry-After`) becomes due and the
   * sender is woken. Resolves with how many events were waiting.
   */
  retryNow(): Promise<number>;
  discard(id: string): Promise<boolean>;
  pruneSent(olderThanMs: number): Promise<number>;
  /**
   * Stop the relay and close the database. When this tab sends and a push is
   * on the wire, the sender lock passes to another tab only once that push
   * has settled (or its events were left pending), so two pushes of the same
   * events never overlap.
   */
  close(): Promise<void>;
  /** Force the online state, or follow `navigator.onLine` again with `null`. */
  setOnline(online: boolean | null): void;
  readonly status: OutboxStatus;
  readonly clientId: string;
  /**
   * The outbox's IndexedDB connection (read your stores with it). It is
   * replaced when the outbox reopens the database after another tab's
   * upgrade: read this property each time rather than keeping it.
   */
  readonly db: IDBDatabase;
  addEventListener(type: "status", listener: (event: CustomEvent<OutboxStatus>) => void): void;
  removeEventListener(type: "status", listener: (event: CustomEvent<OutboxStatus>) => void): void;
}

export declare const Outbox: {
  /**
   * Open (create/upgrade) the database and start the relay when `endpoint` is set.
   * Rejects with a `StorageError` where there is no IndexedDB (Node, server-side
   * rendering: importing the package there is fine, opening an outbox is not).
   */
  open(options: OutboxOptions): Promise<Outbox>;
};

/** Load the wasm module (Outbox.open does it); pass another location of the .wasm file if needed. */
export declare function ready(wasm?: string | URL | Response | BufferSource | WebAssembly.Module): Promise<void>;

/** Create the outbox stores in the app's own upgrade handler. */
export declare function createOutboxStores(db: IDBDatabase, transaction?: IDBTransaction): void;

/** Store names to include in the scope of an `enqueueIn` transaction. */
export declare const OUTBOX_STORES: readonly ["edge_outbox_events"];
