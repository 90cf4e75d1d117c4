// The demo app: a todo list whose every change is written together with the
// event describing it, in one IndexedDB transaction, through edge-outbox.
// The package's relay delivers the events to the reference server, which
// also serves this page (same origin: no CORS setup needed).

// Type-checked: `tsc -p www` (run by scripts/test-e2e) checks this file
// against the package's own index.d.ts, so a change of the package's API
// fails the build here before it breaks the page.

import { Outbox } from "edge-outbox";

/**
 * A todo as stored in the app's IndexedDB store and sent in its events.
 * @typedef {{ id: string, title: string, done: boolean, version: number, createdAt: number }} Todo
 */

const DATABASE = "edge-outbox-demo";
const ENDPOINT = "/v1/events";
const STORE = "todos";
// How often the "Server received" panel asks the server for new events.
const SERVER_POLL_MS = 1000;

/** @param {string} id  @returns {any} the element (typed loosely: the ids are this page's own) */
const $ = (id) => document.getElementById(id);

/** Everything the page shows; the render functions read only this. */
const state = {
  /** @type {import("edge-outbox").Outbox | null} */
  outbox: null,
  /** @type {Map<string, Todo>} id -> todo, as stored in IndexedDB. */
  items: new Map(),
  /** The relay's latest `status` event detail (or `outbox.status`). */
  status: null,
  /** `outbox.stats()`: pending, sent, dead as stored. */
  counts: null,
  /** A status event came while the tab was hidden: re-read the counts when shown. */
  statsStale: false,
  deadLetters: [],
  server: {
    cursor: 0,
    total: 0,
    /** Newest last; only the last few are shown. */
    recent: [],
    /** todo id -> highest todo version the server has an event for. */
    versions: new Map(),
    error: null,
  },
};

// Other tabs of this app commit to the same database; they say so here so
// this tab re-reads the list. (The outbox tells every tab about commits
// itself, with a status event: the counters follow without this.)
const itemsChannel = new BroadcastChannel(`${DATABASE}:items`);

main().catch((e) => showBanner(`Could not start the app: ${describe(e)}`));

async function main() {
  registerServiceWorker();
  state.outbox = await Outbox.open({
    database: DATABASE,
    stores: { [STORE]: { keyPath: "id" } },
    endpoint: ENDPOINT,
    // The demo's whole promise is "nothing lost": a commit is reported done
    // only once it is on disk, not merely handed to the OS.
    durability: "strict",
    // Short backoff so a recovered server is visibly caught up within
    // seconds in the demo; real apps can keep the defaults (1 s up to 5 min).
    retry: { baseMs: 500, capMs: 5000 },
    // A newer version of the app upgrades the database; an old tab that does
    // not let go blocks it. Say so (open gives up after 10 s with a BlockedError).
    onBlocked: () => showBanner("Another tab of this app keeps the database open in an older version: close it (or reload it) to continue."),
  });
  const outbox = state.outbox;
  outbox.addEventListener("status", (e) => onStatus(e.detail));
  onStatus(outbox.status);
  $("client-id").textContent = `client ${outbox.clientId}`;

  // A message handler must not start IndexedDB work a frozen tab could leave
  // hanging (its open transaction would block the other tabs' commits): a
  // hidden tab (the kind a browser freezes) only notes that its list is stale
  // and re-reads it when it is shown again.
  let stale = false;
  itemsChannel.onmessage = () => {
    if (document.visibilityState === "visible") refreshItems();
    else stale = true;
  };
  document.addEventListener("visibilitychange", () => {
    if (document.visibilityState !== "visible") return;
    if (stale) {
      stale = false;
      refreshItems();
    }
    if (state.statsStale) {
      state.statsStale = false;
      refreshStats();
    }
  });
  globalThis.addEventListener("online", renderNetwork);
  globalThis.addEventListener("offline", renderNetwork);
  wireUi();
  await Promise.all([refreshItems(), refreshDeadLetters(), refreshStats()]);
  for (const el of [$("new-title"), $("add-button"), $("flush"), $("retry-now"), $("prune")]) el.disabled = false;
  document.body.dataset.ready = "true"; // tests wait for this
  $("new-title").focus();

  pollServer();
  detectFaultControls();
  // The "next attempt in" countdown moves even when nothing else happens.
  setInterval(renderStatus, 1000);
}

// ---- writes: one outbox transaction per change ----

async function addTodo(title) {
  // Sub-millisecond, monotonic time: todos added in one burst keep their order.
  const createdAt = performance.timeOrigin + performance.now();
  const todo = { id: crypto.randomUUID(), title, done: false, version: 1, createdAt };
  await state.outbox.transaction([STORE], (tx) => {
    tx.put(STORE, todo);
    tx.enqueue("TodoCreated", todo, { key: todo.id });
  });
  afterWrite();
}

async function toggleTodo(id) {
  await state.outbox.transaction([STORE], async (tx) => {
    // Read inside the same transaction, so a concurrent change in another
    // tab cannot slip in between the read and the write.
    const current = /** @type {Todo | undefined} */ (await tx.get(STORE, id));
    if (!current) return;
    const next = { ...current, done: !current.done, version: current.version + 1 };
    tx.put(STORE, next);
    tx.enqueue("TodoUpdated", next, { key: id });
  });
  afterWrite();
}

async function deleteTodo(id) {
  await state.outbox.transaction([STORE], (tx) => {
    tx.delete(STORE, id);
    tx.enqueue("TodoDeleted", { id }, { key: id });
  });
  afterWrite();
}

function afterWrite() {
  itemsChannel.postMessage("changed");
  refreshItems();
  // The relay's counts follow at its next wake; read them now so the
  // pending count moves with the click even while offline.
  refreshStats();
}

// ---- reads ----

/** All todos, read with the outbox's own IndexedDB connection. */
function readTodos() {
  return new Promise((resolve, reject) => {
    const request = state.outbox.db.transaction(STORE, "readonly").objectStore(STORE).getAll();
    request.onsuccess = () => resolve(request.result);
    request.onerror = () => reject(request.error);
  });
}

async function refreshItems() {
  try {
    const todos = await readTodos();
    state.items = new Map(todos.map((t) => [t.id, t]));
    renderItems();
  } catch (e) {
    showBanner(`Could not read the todos: ${describe(e)}`);
  }
}

/**
 * Re-read the counts from the store. The counts shown always come from here
 * (the store is the truth; a status event's counts can trail a commit made
 * while the relay was idle or offline). Calls that arrive while a read runs
 * are folded into one more read.
 */
let statsReading = null;
let statsDirty = false;
async function refreshStats() {
  if (statsReading) {
    statsDirty = true;
    return statsReading;
  }
  statsReading = (async () => {
    do {
      statsDirty = false;
      try {
        const stats = await state.outbox.stats();
        const deadBefore = state.counts?.dead;
        state.counts = stats;
        renderStatus();
        if (deadBefore !== stats.dead) refreshDeadLetters();
      } catch (e) {
        showBanner(`Could not read the outbox counts: ${describe(e)}`);
      }
    } while (statsDirty);
  })();
  try {
    await statsReading;
  } finally {
    statsReading = null;
  }
}

async function refreshDeadLetters() {
  try {
    state.deadLetters = await state.outbox.deadLetters(50);
    renderDeadLetters();
  } catch (e) {
    showBanner(`Could not read the dead letters: ${describe(e)}`);
  }
}

/** A status event: the relay's flags now, the counts re-read from the store. */
function onStatus(status) {
  state.status = status;
  renderStatus();
  if (status.connection === "lost") {
    showBanner(`This tab lost its database connection (${status.lastError}); reload the page.`);
  }
  // Status events also come from other tabs' messages: a hidden tab (the kind
  // a browser freezes) does not read IndexedDB for them; it catches up when shown.
  if (document.visibilityState === "visible") refreshStats();
  else state.statsStale = true;
}

/**
 * Follow the server's event log (`GET /v1/events?after=CURSOR`) for this
 * client, page by page. This is what the backend really received: the
 * panel, and each todo's "synced" mark, come from here and not from the
 * outbox's own bookkeeping.
 */
async function pollServer() {
  const { server } = state;
  try {
    for (;;) {
      const url = `/v1/events?after=${server.cursor}&limit=1000&client_id=${encodeURIComponent(state.outbox.clientId)}`;
      const response = await fetch(url, { cache: "no-store" });
      if (!response.ok) throw new Error(`GET /v1/events answered ${response.status}: ${(await response.text()).slice(0, 200)}`);
      const page = await response.json();
      for (const e of page.events) {
        server.total += 1;
        server.recent.push(e);
        if (typeof e.payload?.version === "number") {
          server.versions.set(e.key, Math.max(server.versions.get(e.key) ?? 0, e.payload.version));
        }
      }
      if (server.recent.length > 12) server.recent.splice(0, server.recent.length - 12);
      if (page.next_cursor != null) server.cursor = page.next_cursor;
      if (page.events.length < 1000) break;
    }
    server.error = null;
  } catch (e) {
    // Offline, or the server is down: say so, keep what we knew.
    server.error = navigator.onLine ? describe(e) : "offline: cannot reach the server";
  }
  renderServer();
  renderItems();
  setTimeout(pollServer, SERVER_POLL_MS);
}

// ---- UI ----

function wireUi() {
  $("add-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const input = $("new-title");
    const title = input.value.trim();
    if (!title) return;
    input.value = "";
    addTodo(title).catch((err) => showBanner(`Could not add "${title}": ${describe(err)}`));
  });

  $("items").addEventListener("click", (e) => {
    const hit = clicked(e);
    if (!hit) return;
    const action = hit.action === "toggle" ? toggleTodo(hit.id) : deleteTodo(hit.id);
    action.catch((err) => showBanner(`Could not change the todo: ${describe(err)}`));
  });

  $("flush").addEventListener("click", async () => {
    const out = $("flush-result");
    out.textContent = "flushing…";
    try {
      const report = await state.outbox.flush();
      // Offline, the relay makes no attempt (and spends none): say so.
      const offline = state.status && !state.status.online;
      out.textContent = offline
        ? `offline: nothing sent, ${report.pending} pending`
        : `sent ${report.sent}, pending ${report.pending}` + (report.lastError ? ` (failed: ${report.lastError})` : "");
    } catch (e) {
      out.textContent = `flush failed: ${describe(e)}`;
    }
    refreshStats();
  });

  $("retry-now").addEventListener("click", async () => {
    const out = $("flush-result");
    try {
      // Events waiting for their backoff (or the server's Retry-After) go now.
      const n = await state.outbox.retryNow();
      out.textContent = `retrying ${n} waiting event${n === 1 ? "" : "s"} now`;
    } catch (e) {
      out.textContent = `retry failed: ${describe(e)}`;
    }
    refreshStats();
  });

  $("prune").addEventListener("click", async () => {
    try {
      const n = await state.outbox.pruneSent(0);
      $("flush-result").textContent = `pruned ${n} sent event${n === 1 ? "" : "s"}`;
    } catch (e) {
      $("flush-result").textContent = `prune failed: ${describe(e)}`;
    }
    refreshStats();
  });

  $("dead-letters").addEventListener("click", async (e) => {
    const hit = clicked(e);
    if (!hit) return;
    try {
      if (hit.action === "retry") {
        // Pending again, due now; the relay is woken by the retry itself.
        await state.outbox.retry(hit.id);
      } else {
        await state.outbox.discard(hit.id);
      }
    } catch (err) {
      showBanner(`Could not ${hit.action} the event: ${describe(err)}`);
    }
    await Promise.all([refreshDeadLetters(), refreshStats()]);
  });
}

/** The `data-action` of a clicked button and the `data-id` of its list item. */
function clicked(/** @type {Event} */ e) {
  const target = /** @type {HTMLElement} */ (e.target);
  const button = /** @type {HTMLElement | null} */ (target.closest("[data-action]"));
  const item = button?.closest("li");
  return button && item ? { action: button.dataset.action, id: item.dataset.id } : null;
}

function renderItems() {
  const list = $("items");
  const todos = [...state.items.values()].sort((a, b) => a.createdAt - b.createdAt || a.id.localeCompare(b.id));
  list.replaceChildren(...todos.map((todo) => {
    const synced = (state.server.versions.get(todo.id) ?? 0) >= todo.version;
    const rejected = !synced && state.deadLetters.some((e) => e.key === todo.id && e.payload?.version === todo.version);
    const [badgeClass, badgeText, badgeTitle] = synced
      ? ["synced", "synced", "The server has this version"]
      : rejected
        ? ["rejected", "rejected", "The server refused this change: see Dead letters"]
        : ["pending", "pending", "Not yet on the server"];
    const li = el("li", { class: `item${todo.done ? " done" : ""}`, "data-id": todo.id, "data-testid": "item" });
    const check = el("button", {
      class: "check", "data-action": "toggle", "aria-label": todo.done ? "Mark not done" : "Mark done",
    }, todo.done ? "✓" : "");
    const title = el("span", { class: "title", "data-testid": "item-title" }, todo.title);
    const badge = el("span", { class: `badge ${badgeClass}`, "data-testid": "item-sync", title: badgeTitle }, badgeText);
    const remove = el("button", { class: "remove", "data-action": "delete", "aria-label": "Delete" }, "×");
    li.append(check, title, badge, remove);
    return li;
  }));
  $("items-empty").hidden = todos.length > 0;
  $("item-count").textContent = `${todos.length} todo${todos.length === 1 ? "" : "s"}`;
}

function renderStatus() {
  const s = state.status ?? {};
  const c = state.counts ?? {};
  const show = (id, v) => { $(id).textContent = v == null ? "–" : String(v); };
  show("stat-pending", c.pending);
  show("stat-inflight", s.inFlight ?? 0);
  show("stat-sent", c.sent);
  show("stat-dead", c.dead);
  $("stat-pending").classList.toggle("warn", c.pending > 0);
  $("stat-dead").classList.toggle("bad", c.dead > 0);
  $("flushing").hidden = !s.flushing;

  const err = $("last-error");
  err.hidden = !s.lastError;
  err.textContent = s.lastError ? `Last error: ${s.lastError}` : "";

  const next = $("next-attempt");
  const wait = s.nextAttemptAt ? Math.ceil((s.nextAttemptAt - Date.now()) / 1000) : null;
  next.hidden = !(c.pending > 0 && wait != null && wait > 0);
  next.textContent = `next attempt in ${wait} s`;

  const sender = $("sender");
  if (s.leader !== undefined) {
    sender.textContent = s.leader ? "this tab sends" : "another tab sends";
  }
  renderNetwork();
}

function renderNetwork() {
  // The relay's own view when it has one (it can be told better than the
  // browser); otherwise the browser's.
  const online = state.status?.online ?? navigator.onLine;
  const pill = $("network");
  pill.textContent = online ? "online" : "offline";
  pill.className = `pill ${online ? "online" : "offline"}`;
}

function renderDeadLetters() {
  const list = $("dead-letters");
  list.replaceChildren(...state.deadLetters.map((e) => {
    const li = el("li", { "data-id": e.id, "data-testid": "dead-letter" });
    const head = el("div", { class: "dead-head" },
      el("strong", {}, e.type), " ", el("span", { class: "mono muted" }, `seq ${e.seq}`),
      " ", el("span", { class: "muted" }, todoLabel(e.key, e.payload)));
    const reason = el("div", { class: "reason" }, e.lastError ?? "no reason given");
    const buttons = el("div", { class: "actions" },
      el("button", { "data-action": "retry" }, "Retry"),
      el("button", { class: "secondary", "data-action": "discard" }, "Discard"));
    li.append(head, reason, buttons);
    return li;
  }));
  $("dead-empty").hidden = state.deadLetters.length > 0;
  renderItems(); // their "rejected" badges
}

function renderServer() {
  const { server } = state;
  $("server-total").textContent = String(server.total);
  const err = $("server-error");
  err.hidden = !server.error;
  err.textContent = server.error ?? "";
  $("server-events").replaceChildren(...[...server.recent].reverse().map((e) => el("tr", {},
    el("td", { class: "mono" }, String(e.cursor)),
    el("td", { class: "mono" }, String(e.seq)),
    el("td", {}, e.type),
    el("td", {}, todoLabel(e.key, e.payload)),
    el("td", { class: "muted" }, new Date(e.received_at).toLocaleTimeString()),
  )));
}

function todoLabel(key, payload) {
  return payload?.title ?? state.items.get(key)?.title ?? (key ? key.slice(0, 8) : "");
}

// ---- fault controls (only when the server runs with --enable-test-controls) ----

async function detectFaultControls() {
  try {
    const response = await fetch("/__test/requests", { cache: "no-store" });
    if (!response.ok) return;
  } catch {
    return;
  }
  $("faults").hidden = false;
  const faults = {
    fail500: ["/__test/fail", { status: 500, for_ms: 10_000 }, "pushes answer 500 for 10 s"],
    slow: ["/__test/delay", { ms: 3000 }, "every push answer waits 3 s"],
    reject: ["/__test/reject", { count: 3 }, "the server rejects the next 3 events: they become dead letters"],
    reset: ["/__test/reset", null, "server back to normal"],
  };
  $("faults").addEventListener("click", async (e) => {
    const name = /** @type {HTMLElement} */ (e.target).closest("[data-fault]")?.getAttribute("data-fault");
    if (!name) return;
    const [path, body, what] = faults[name];
    try {
      const response = await fetch(path, {
        method: "POST",
        headers: body ? { "content-type": "application/json" } : {},
        body: body ? JSON.stringify(body) : undefined,
      });
      if (!response.ok) throw new Error(`${path} answered ${response.status}: ${await response.text()}`);
      $("fault-result").textContent = what;
    } catch (err) {
      $("fault-result").textContent = describe(err);
    }
  });
}

// ---- helpers ----

/** The offline shell: lets the page load (and reload) with no network. */
function registerServiceWorker() {
  if (!("serviceWorker" in navigator)) return;
  navigator.serviceWorker.register("./sw.js").catch((e) => {
    console.warn("service worker not registered; the app will not load offline", e);
  });
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  node.append(...children);
  return node;
}

/** An error as a person should read it: the package's errors carry a `name`. */
function describe(e) {
  if (e instanceof Error) return e.name && e.name !== "Error" ? `${e.name}: ${e.message}` : e.message;
  return String(e);
}

function showBanner(text) {
  const banner = $("banner");
  banner.hidden = false;
  banner.textContent = text;
}
