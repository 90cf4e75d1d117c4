// End-to-end tests: the demo app in headless Chromium against the reference
// server, proving the outbox's promise where a user would see it: nothing
// lost, nothing applied twice, whatever the network and the tabs do.
//
// Run by scripts/test-e2e (which builds the package, the server and the app
// first): node --test www/e2e/

import assert from "node:assert/strict";
import { mkdirSync, statSync } from "node:fs";
import { join } from "node:path";
import { after, before, test } from "node:test";

import {
  addItem, clientId, items, launchBrowser, openApp, repoRoot, startServer, stat, waitFor,
  waitOfflineReady, waitReady,
} from "./harness.mjs";

/** A hung test fails on its own instead of stalling the whole run. */
const TEST_TIMEOUT_MS = 90_000;

let browser;
before(async () => {
  browser = await launchBrowser();
});
after(async () => {
  await browser?.close();
});

/**
 * Run `body` with a fresh server (fresh database) and a fresh browser
 * context (fresh IndexedDB, service worker, locks); both are torn down
 * whatever happens, and on failure the server's stderr and the pages'
 * errors are added to the message.
 */
async function scenario(body) {
  const server = await startServer();
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  try {
    await body({ server, context });
  } catch (e) {
    const problems = context.pages().flatMap((p) => p.problems ?? []);
    e.message += `\n--- page problems: ${JSON.stringify(problems)}\n--- server stderr:\n${server.stderr().slice(-3000)}`;
    throw e;
  } finally {
    await context.close();
    await server.stop();
  }
}

/** Where screenshots go: target/e2e/ (for the report; not compared). */
function screenshotPath(name) {
  const dir = join(repoRoot, "target", "e2e");
  mkdirSync(dir, { recursive: true });
  return join(dir, name);
}

const pad = (n) => String(n).padStart(2, "0");

/** The server's events for a client, checked: unique ids, seq strictly increasing. */
async function checkedEvents(server, client) {
  const events = await server.events(client);
  const ids = new Set(events.map((e) => e.id));
  assert.equal(ids.size, events.length, "an event id appears twice at the server");
  for (let i = 1; i < events.length; i++) {
    assert.ok(events[i].seq > events[i - 1].seq,
      `events arrived out of commit order: seq ${events[i - 1].seq} then ${events[i].seq}`);
  }
  return events;
}

const titlesOf = (events) => events.map((e) => e.payload.title);

async function waitServerCount(server, client, n, timeout = 30_000) {
  await waitFor(async () => (await server.events(client)).length >= n,
    { timeout, message: `the server to hold ${n} events` });
}

async function waitStat(page, name, n, timeout = 20_000) {
  await waitFor(async () => (await stat(page, name)) === n,
    { timeout, message: `stat-${name} to show ${n}` });
}

test("offline: 20 items survive a reload, then arrive exactly once in commit order", { timeout: TEST_TIMEOUT_MS }, async () => {
  await scenario(async ({ server, context }) => {
    const page = await openApp(context, server.url);
    const client = await clientId(page);
    // The shell must be cached before the network goes, or the reload below has nothing to load.
    await waitOfflineReady(page);

    await context.setOffline(true);
    await waitFor(async () => (await page.getByTestId("network").textContent()) === "offline",
      { message: "the offline indicator" });
    const titles = Array.from({ length: 20 }, (_, i) => `item-${pad(i + 1)}`);
    for (const title of titles) await addItem(page, title);
    await waitStat(page, "pending", 20);

    await page.reload();
    await waitReady(page);
    const shown = await items(page);
    assert.deepEqual(shown.map((i) => i.title), titles, "the todos after the reload");
    assert.ok(shown.every((i) => i.sync === "pending"), `all still pending: ${JSON.stringify(shown)}`);
    assert.equal(await stat(page, "pending"), 20);
    assert.equal((await server.events(client)).length, 0, "nothing may reach the server while offline");

    await context.setOffline(false);
    await waitStat(page, "pending", 0);
    await waitServerCount(server, client, 20);
    const events = await checkedEvents(server, client);
    assert.equal(events.length, 20, "exactly 20 events at the server");
    assert.deepEqual(titlesOf(events), titles, "in commit order");
    assert.ok(events.every((e) => e.type === "TodoCreated" && e.key === e.payload.id));
    await waitFor(async () => (await items(page)).every((i) => i.sync === "synced"),
      { message: "every todo marked synced" });
  });
});

test("closing the tab during an in-flight push loses nothing and applies nothing twice", { timeout: TEST_TIMEOUT_MS }, async () => {
  await scenario(async ({ server, context }) => {
    let page = await openApp(context, server.url);
    const client = await clientId(page);

    // Commit the five while offline, so they go out together in one push.
    await context.setOffline(true);
    const titles = Array.from({ length: 5 }, (_, i) => `flight-${pad(i + 1)}`);
    for (const title of titles) await addItem(page, title);
    await waitStat(page, "pending", 5);

    // The server stores the push, then holds its answer back for a minute:
    // the tab is closed while the request is in flight, answer unseen.
    await server.control("delay", { ms: 60_000, count: 1 });
    await context.setOffline(false);
    await waitServerCount(server, client, 5);
    await waitFor(async () => (await stat(page, "inflight")) === 5,
      { message: "the push to be in flight in the page" });
    assert.equal(await stat(page, "pending"), 5, "unacknowledged events are still pending locally");
    await page.close();

    // Open the app again: the events are still pending and are pushed again;
    // the server recognises them and stores nothing twice.
    page = await openApp(context, server.url);
    await waitStat(page, "pending", 0);
    await waitStat(page, "sent", 5);
    const events = await checkedEvents(server, client);
    assert.deepEqual(titlesOf(events), titles, "each event exactly once, in order");
    const pushes = (await server.requests()).filter((r) => r.client_id === client);
    assert.ok(pushes.length >= 2, `the batch was pushed again after the reopen: ${JSON.stringify(pushes)}`);
    assert.ok(pushes.every((p) => p.events === 5), `both pushes carried the same five: ${JSON.stringify(pushes)}`);
  });
});

/** Pushes of `client` never overlapped at the server (one sender at a time). */
async function assertNoOverlap(server, client) {
  const pushes = (await server.requests())
    .filter((r) => r.client_id === client)
    .sort((a, b) => a.started_at - b.started_at);
  assert.ok(pushes.length > 0);
  for (let i = 1; i < pushes.length; i++) {
    assert.ok(pushes[i - 1].finished_at <= pushes[i].started_at,
      `two pushes of this client overlapped: ${JSON.stringify(pushes[i - 1])} and ${JSON.stringify(pushes[i])}`);
  }
  return pushes;
}

/**
 * Three tabs type 15 items each at once while the first tab flips the
 * network. `noLocks`: the origin has no Web Locks (plain http on a LAN
 * address, WebKit before 15.4), simulated by deleting `navigator.locks`
 * before the app loads.
 */
async function threeTabs({ server, context }, { noLocks }) {
  if (noLocks) {
    await context.addInitScript(() => { delete Navigator.prototype.locks; });
    // Slow pushes: two senders could not help overlapping.
    await server.control("delay", { ms: 150 });
  }
  const pages = [];
  for (let i = 0; i < 3; i++) pages.push(await openApp(context, server.url));
  if (noLocks) {
    for (const p of pages) assert.equal(await p.evaluate(() => typeof navigator.locks), "undefined");
  }
  const client = await clientId(pages[0]);
  for (const p of pages) assert.equal(await clientId(p), client, "the tabs share one outbox");
  if (!noLocks) {
    await waitFor(async () => {
      const senders = await Promise.all(pages.map((p) => p.getByTestId("sender").textContent()));
      return senders.filter((s) => s === "this tab sends").length === 1;
    }, { message: "exactly one tab to hold the sender lock" });
  }

  const perTab = 15;
  const titles = pages.map((_, t) => Array.from({ length: perTab }, (_, i) => `tab${t + 1}-${pad(i + 1)}`));
  await Promise.all(pages.map(async (page, t) => {
    for (let i = 0; i < perTab; i++) {
      await addItem(page, titles[t][i]);
      if (t === 0 && i % 4 === 3) await context.setOffline(i % 8 === 3);
    }
  }));
  await context.setOffline(false);

  const total = 3 * perTab;
  await waitServerCount(server, client, total, 40_000);
  for (const page of pages) await waitStat(page, "pending", 0);
  const events = await checkedEvents(server, client);
  assert.equal(events.length, total, "every event exactly once");
  const got = titlesOf(events);
  assert.deepEqual([...got].sort(), titles.flat().sort(), "the same events that were committed");
  for (const tab of titles) {
    const order = got.filter((title) => tab.includes(title));
    assert.deepEqual(order, tab, "each tab's events arrive in the order it committed them");
  }
  const pushes = await assertNoOverlap(server, client);
  assert.ok(pushes.length <= total + 10, `far more pushes than events: ${pushes.length} for ${total}`);
}

test("without Web Locks, three tabs still elect one sender: every event once, pushes never overlap", { timeout: TEST_TIMEOUT_MS }, async () => {
  await scenario((s) => threeTabs(s, { noLocks: true }));
});

/**
 * Freeze `page` as a browser freezes a background tab: the `freeze` event
 * (its last chance to run code), then no task runs at all. This headless
 * Chromium accepts `Page.setWebLifecycleState` but keeps running the page's
 * timers and handlers, so the debugger stops its script too. Returns the
 * function that thaws it (`resume` event included).
 */
async function freeze(context, page) {
  await page.evaluate(() => document.dispatchEvent(new Event("freeze")));
  const cdp = await context.newCDPSession(page);
  await cdp.send("Page.setWebLifecycleState", { state: "frozen" });
  await cdp.send("Debugger.enable");
  await cdp.send("Debugger.pause");
  return async () => {
    await cdp.send("Debugger.resume");
    await cdp.send("Debugger.disable");
    await cdp.send("Page.setWebLifecycleState", { state: "active" });
    await page.evaluate(() => document.dispatchEvent(new Event("resume")));
  };
}

test("a frozen sender tab gives the lock up: another tab takes over and its commits never hang", { timeout: TEST_TIMEOUT_MS }, async () => {
  await scenario(async ({ server, context }) => {
    const a = await openApp(context, server.url);
    await waitFor(async () => (await a.getByTestId("sender").textContent()) === "this tab sends",
      { message: "the first tab to send" });
    const b = await openApp(context, server.url);
    const client = await clientId(a);
    await waitFor(async () => (await b.getByTestId("sender").textContent()) === "another tab sends",
      { message: "the second tab to follow" });
    await addItem(a, "before-freeze");
    await waitServerCount(server, client, 1);

    const thaw = await freeze(context, a);
    await waitFor(async () => (await b.getByTestId("sender").textContent()) === "this tab sends",
      { message: "the second tab to take over from the frozen one" });
    const titles = Array.from({ length: 5 }, (_, i) => `while-frozen-${pad(i + 1)}`);
    for (const title of titles) await addItem(b, title);
    await waitStat(b, "pending", 0);
    await waitServerCount(server, client, 6);

    await thaw();
    await addItem(a, "after-thaw");
    await waitServerCount(server, client, 7);
    await waitStat(a, "pending", 0);
    const events = await checkedEvents(server, client);
    assert.deepEqual(titlesOf(events), ["before-freeze", ...titles, "after-thaw"]);
    await assertNoOverlap(server, client);
  });
});

test("three tabs writing while the network flaps: every event once, pushes never overlap", { timeout: TEST_TIMEOUT_MS }, async () => {
  await scenario((s) => threeTabs(s, { noLocks: false }));
});

test("a server answering 500 for a while: the error is shown, then everything arrives", { timeout: TEST_TIMEOUT_MS }, async () => {
  await scenario(async ({ server, context }) => {
    const page = await openApp(context, server.url);
    const client = await clientId(page);
    await addItem(page, "before-1");
    await waitServerCount(server, client, 1);

    await server.control("fail", { status: 500, count: 10_000 });
    const titles = Array.from({ length: 5 }, (_, i) => `during-${pad(i + 1)}`);
    for (const title of titles) await addItem(page, title);
    // All five committed (typing returns before the commit does).
    await waitStat(page, "pending", 5);
    const shownError = await waitFor(async () => {
      const box = page.getByTestId("last-error");
      return (await box.isVisible()) && /500/.test(await box.textContent()) && box.textContent();
    }, { message: "the status to show the 500" });
    // The relay keeps trying (with backoff) and nothing gets through meanwhile.
    await waitFor(async () => (await server.requests()).filter((r) => r.status === 500).length >= 2,
      { message: "at least two failed attempts" });
    assert.equal((await server.events(client)).length, 1, "nothing stored while failing");
    assert.equal(await stat(page, "dead"), 0, "a 500 never dead-letters");
    assert.ok(await page.getByTestId("last-error").isVisible(), `still shown while it lasts (${shownError})`);
    await page.screenshot({ path: screenshotPath("app-500.png"), fullPage: true });

    await server.control("reset");
    await waitServerCount(server, client, 6);
    await waitStat(page, "pending", 0);
    await waitFor(async () => !(await page.getByTestId("last-error").isVisible()),
      { message: "the error to clear after recovery" });
    const events = await checkedEvents(server, client);
    assert.deepEqual(titlesOf(events), ["before-1", ...titles]);
  });
});

test("dead letters: a rejected event is listed, retried and discarded from the page", { timeout: TEST_TIMEOUT_MS }, async () => {
  await scenario(async ({ server, context }) => {
    const page = await openApp(context, server.url);
    const client = await clientId(page);
    // The server rejects the next two events (a per-event verdict): both
    // are dead-lettered. (A 422 for a lone event is not enough: nothing
    // passing beside it, it could be the channel's.)
    await server.control("reject", { count: 2 });
    await addItem(page, "rejected-1");
    await waitStat(page, "dead", 1);
    await addItem(page, "rejected-2");
    await waitStat(page, "dead", 2);
    const dead = page.getByTestId("dead-letter");
    await waitFor(async () => (await dead.count()) === 2, { message: "two dead letters listed" });
    assert.match(await dead.first().textContent(), /TodoCreated/);

    await dead.first().getByRole("button", { name: "Retry" }).click();
    await waitServerCount(server, client, 1);
    await waitStat(page, "dead", 1);
    await page.getByTestId("dead-letter").first().getByRole("button", { name: "Discard" }).click();
    await waitStat(page, "dead", 0);
    await waitFor(async () => (await dead.count()) === 0, { message: "the list to empty" });
    // The server may hold the retried event a moment before the page has settled it.
    await waitStat(page, "pending", 0);
    assert.deepEqual(titlesOf(await checkedEvents(server, client)), ["rejected-1"]);
  });
});

test("screenshot: the app with sent, pending and dead events", { timeout: TEST_TIMEOUT_MS }, async () => {
  await scenario(async ({ server, context }) => {
    const page = await openApp(context, server.url);
    const client = await clientId(page);
    for (const title of ["Buy oat milk", "Write the quarterly report", "Call the plumber"]) {
      await addItem(page, title);
    }
    await waitServerCount(server, client, 3);
    await page.getByTestId("item").first().getByRole("button", { name: "Mark done" }).click();
    await waitServerCount(server, client, 4);
    await server.control("reject", { count: 1 });
    await addItem(page, "Pay the invoice");
    await waitStat(page, "dead", 1);
    await waitFor(async () => (await items(page)).filter((i) => i.sync === "synced").length === 3,
      { message: "three todos marked synced" });

    await context.setOffline(true);
    await addItem(page, "Book flights");
    await addItem(page, "Water the plants");
    await waitStat(page, "pending", 2);
    await waitFor(async () => (await page.getByTestId("network").textContent()) === "offline",
      { message: "the offline indicator" });
    await waitFor(async () => /offline/.test(await page.getByTestId("server-error").textContent()),
      { message: "the server panel to say it cannot reach the server" });

    const path = screenshotPath("app.png");
    await page.screenshot({ path, fullPage: true });
    assert.ok(statSync(path).size > 20_000, `${path} looks empty`);
    console.log(`screenshot: ${path}`);
  });
});

test("the Retry now button: waiting events are made due, the page says how many, all arrive", { timeout: TEST_TIMEOUT_MS }, async () => {
  await scenario(async ({ server, context }) => {
    const page = await openApp(context, server.url);
    const client = await clientId(page);
    // A 503 with Retry-After parks the event (for at most the app's 5 s cap);
    // outbox.retryNow() itself is tested against a 60 s wait in tests/browser.rs.
    await server.control("fail", { status: 503, count: 1, retry_after: 60 });
    await addItem(page, "parked");
    await waitFor(async () => (await server.requests()).some((r) => r.status === 503),
      { message: "the 503" });
    await page.getByTestId("retry-now").click();
    await waitFor(async () => /retrying \d+ waiting events?/.test(await page.getByTestId("flush-result").textContent()),
      { message: "the retry-now result" });
    await waitServerCount(server, client, 1);
    await waitStat(page, "pending", 0);
    assert.deepEqual(titlesOf(await checkedEvents(server, client)), ["parked"]);
  });
});

test("site data cleared under the app: the connection is lost for good, the page says so and gives the sender lock up", { timeout: TEST_TIMEOUT_MS }, async () => {
  await scenario(async ({ server, context }) => {
    const page = await openApp(context, server.url);
    await waitFor(async () => (await page.getByTestId("sender").textContent()) === "this tab sends",
      { message: "the tab to send" });
    // What "Clear site data" does: the browser closes the IndexedDB
    // connections (their `close` event) and deletes the databases.
    const cdp = await context.newCDPSession(page);
    await cdp.send("Storage.clearDataForOrigin", { origin: server.url, storageTypes: "indexeddb" });
    await waitFor(async () => {
      const banner = page.getByTestId("banner");
      return (await banner.isVisible()) && /lost its (database|IndexedDB) connection/.test(await banner.textContent());
    }, { message: "the banner saying the connection is lost" });
    await waitFor(async () => (await page.getByTestId("sender").textContent()) === "another tab sends",
      { message: "the tab to stop sending" });
    const held = await page.evaluate(async () => (await navigator.locks.query()).held.map((l) => l.name));
    assert.deepEqual(held.filter((n) => n.startsWith("edge-outbox:")), [], "the sender lock was given up");
    page.problems.length = 0; // the banner is the expected outcome here
  });
});
