// End-to-end tests: the demo app in a browser against the reference server,
// proving the outbox's promise where a user would see it: nothing lost,
// nothing applied twice, whatever the network and the tabs do.
//
// One engine per run: E2E_ENGINE=chromium|firefox|webkit (default chromium),
// driven over WebDriver (webdriver.mjs). The page is loaded through a proxy
// (proxy.mjs) that the tests switch to refusing connections: the network cut
// that works in every engine; the engine's own offline signal goes with it.
// Tests whose names start with "Chromium only" need CDP (a frozen tab, site
// data cleared under the page) and run in Chromium alone.
//
// Run by scripts/test-e2e (which builds the package, the server and the app
// first, and runs every engine): E2E_ENGINE=firefox node --test www/e2e/

import assert from "node:assert/strict";
import { mkdirSync, statSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { after, before, test } from "node:test";

import {
  addItem, clickButton, clientId, count, items, openApp, repoRoot, shown, startServer, stat, text, waitFor,
  waitOfflineReady, waitReady,
} from "./harness.mjs";
import { startProxy } from "./proxy.mjs";
import { engineFromEnv, startDriver } from "./webdriver.mjs";

const engine = engineFromEnv();
const ENGINE = { chromium: "Chromium", firefox: "Firefox", webkit: "WebKit" }[engine];

/** A hung test fails on its own instead of stalling the whole run. */
const TEST_TIMEOUT_MS = 120_000;

let driver;
before(async () => {
  driver = await startDriver(engine);
});
after(async () => {
  await driver?.stop();
});

/**
 * Run `body` with a fresh server (fresh database) behind a fresh proxy, and
 * a fresh browser session (fresh profile: IndexedDB, service worker, locks);
 * all torn down whatever happens, and on failure the server's stderr and the
 * pages' errors are added to the message. `network.set(false)` cuts the
 * network (the proxy refuses, the engine signals offline), `set(true)`
 * restores it; `{ signal: false }` leaves the engine's signal alone (the
 * network fails while the browser says online).
 */
async function scenario(body) {
  const server = await startServer();
  const proxy = await startProxy(server.url);
  const browser = await driver.newSession();
  const network = {
    async set(online, { signal = true } = {}) {
      if (online) {
        await proxy.accept();
        if (signal) await browser.setOffline(false);
      } else {
        await proxy.refuse();
        if (signal) await browser.setOffline(true);
      }
    },
  };
  try {
    await body({ server, proxy, browser, network, url: proxy.url });
  } catch (e) {
    const problems = [];
    for (const tab of browser.tabs) problems.push(...await tab.collectProblems().catch(() => tab.problems));
    e.message += `\n--- page problems: ${JSON.stringify(problems)}\n--- server stderr:\n${server.stderr().slice(-3000)}`;
    throw e;
  } finally {
    await browser.quit();
    await proxy.stop();
    await server.stop();
  }
}

/** A test in this run's engine, named after it. */
function engineTest(name, body) {
  test(`${ENGINE}: ${name}`, { timeout: TEST_TIMEOUT_MS }, body);
}

/** A test that needs Chromium's DevTools protocol: registered in Chromium's run only. */
function chromiumOnlyTest(name, body) {
  if (engine === "chromium") test(`Chromium only (CDP): ${name}`, { timeout: TEST_TIMEOUT_MS }, body);
}

/** Save a screenshot in target/e2e/ (for the report; not compared): `app.png` in Chromium, `app-firefox.png`... */
async function screenshot(tab, base) {
  const dir = join(repoRoot, "target", "e2e");
  mkdirSync(dir, { recursive: true });
  const path = join(dir, engine === "chromium" ? `${base}.png` : `${base}-${engine}.png`);
  writeFileSync(path, await tab.screenshot());
  return path;
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

async function waitStat(tab, name, n, timeout = 20_000) {
  await waitFor(async () => (await stat(tab, name)) === n,
    { timeout, message: `stat-${name} to show ${n}` });
}

engineTest("offline: 20 items survive a reload, then arrive exactly once in commit order", async () => {
  await scenario(async ({ server, browser, network, url }) => {
    const page = await openApp(browser, url);
    const client = await clientId(page);
    // The shell must be cached before the network goes, or the reload below has nothing to load.
    await waitOfflineReady(page);

    await network.set(false);
    await waitFor(async () => (await text(page, "network")) === "offline", { message: "the offline indicator" });
    const titles = Array.from({ length: 20 }, (_, i) => `item-${pad(i + 1)}`);
    for (const title of titles) await addItem(page, title);
    await waitStat(page, "pending", 20);

    // The service worker answers the reload from its cache: the proxy refuses.
    await page.reload();
    await waitReady(page);
    const shownItems = await items(page);
    assert.deepEqual(shownItems.map((i) => i.title), titles, "the todos after the reload");
    assert.ok(shownItems.every((i) => i.sync === "pending"), `all still pending: ${JSON.stringify(shownItems)}`);
    assert.equal(await stat(page, "pending"), 20);
    assert.equal((await server.events(client)).length, 0, "nothing may reach the server while offline");

    await network.set(true);
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

engineTest("the network refuses while the browser says online: nothing is lost, the relay backs off, all arrive once the network is back", async () => {
  await scenario(async ({ server, browser, network, url }) => {
    const page = await openApp(browser, url);
    const client = await clientId(page);
    await addItem(page, "before-1");
    await waitServerCount(server, client, 1);

    // What WebKit's driver can only do, and what a dead server or a captive
    // portal does in any browser: connections fail, navigator.onLine stays true.
    await network.set(false, { signal: false });
    assert.equal(await page.eval(() => navigator.onLine), true);
    const titles = Array.from({ length: 5 }, (_, i) => `refused-${pad(i + 1)}`);
    for (const title of titles) await addItem(page, title);
    await waitStat(page, "pending", 5);
    await waitFor(async () => Boolean(await shown(page, "last-error")), { message: "the failed push to be shown" });
    assert.equal((await server.events(client)).length, 1, "nothing gets through a refusing network");

    await network.set(true, { signal: false });
    await waitServerCount(server, client, 6);
    await waitStat(page, "pending", 0);
    const events = await checkedEvents(server, client);
    assert.deepEqual(titlesOf(events), ["before-1", ...titles], "each once, in commit order");
  });
});

engineTest("closing the tab during an in-flight push loses nothing and applies nothing twice", async () => {
  await scenario(async ({ server, browser, network, url }) => {
    const page = await openApp(browser, url);
    const client = await clientId(page);

    // Commit the five while offline, so they go out together in one push.
    await network.set(false);
    const titles = Array.from({ length: 5 }, (_, i) => `flight-${pad(i + 1)}`);
    for (const title of titles) await addItem(page, title);
    await waitStat(page, "pending", 5);

    // The server stores the push, then holds its answer back for a minute:
    // the tab is closed while the request is in flight, answer unseen.
    await server.control("delay", { ms: 60_000, count: 1 });
    await network.set(true);
    await waitServerCount(server, client, 5);
    await waitFor(async () => (await stat(page, "inflight")) === 5,
      { message: "the push to be in flight in the page" });
    assert.equal(await stat(page, "pending"), 5, "unacknowledged events are still pending locally");
    // Closing the session's last window would end the session: another one first.
    const other = await browser.open("about:blank");
    await page.close();

    // Open the app again: the events are still pending and are pushed again;
    // the server recognises them and stores nothing twice.
    await other.goto(url);
    await waitReady(other);
    await waitStat(other, "pending", 0);
    await waitStat(other, "sent", 5);
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
 * Three tabs (windows) add 15 items each, in turns, while the network is cut
 * and restored every fourth item of the first. `noLocks`: the origin has no
 * Web Locks (plain http on a LAN address, WebKit before 15.4), simulated by
 * deleting `navigator.locks` before the app's script runs (a script the
 * proxy adds to the page: WebDriver has no init script in every engine).
 */
async function threeTabs({ server, proxy, browser, network, url }, { noLocks }) {
  if (noLocks) {
    proxy.injectScript("delete Navigator.prototype.locks;");
    // Slow pushes: two senders could not help overlapping.
    await server.control("delay", { ms: 150 });
  }
  const pages = [];
  for (let i = 0; i < 3; i++) pages.push(await openApp(browser, url));
  if (noLocks) {
    for (const p of pages) assert.equal(await p.eval(() => typeof navigator.locks), "undefined");
  }
  const client = await clientId(pages[0]);
  for (const p of pages) assert.equal(await clientId(p), client, "the tabs share one outbox");
  if (!noLocks) {
    await waitFor(async () => {
      const senders = [];
      for (const p of pages) senders.push(await text(p, "sender"));
      return senders.filter((s) => s === "this tab sends").length === 1;
    }, { message: "exactly one tab to hold the sender lock" });
  }

  const perTab = 15;
  const titles = pages.map((_, t) => Array.from({ length: perTab }, (_, i) => `tab${t + 1}-${pad(i + 1)}`));
  for (let i = 0; i < perTab; i++) {
    for (let t = 0; t < pages.length; t++) {
      await addItem(pages[t], titles[t][i]);
      if (t === 0 && i % 4 === 3) await network.set(i % 8 !== 3);
    }
  }
  await network.set(true);

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

engineTest("without Web Locks, three tabs still elect one sender: every event once, pushes never overlap", async () => {
  await scenario((s) => threeTabs(s, { noLocks: true }));
});

/**
 * Freeze `tab` as a browser freezes a background tab: the `freeze` event
 * (its last chance to run code), then no task runs at all. Headless Chromium
 * accepts `Page.setWebLifecycleState` but keeps running the page's timers and
 * handlers, so the debugger stops its script too. Returns the function that
 * thaws it (`resume` event included) and shows it again. The other engines
 * have no way to freeze a page from a test.
 */
async function freeze(tab) {
  await tab.eval(() => document.dispatchEvent(new Event("freeze")));
  await tab.cdp("Page.setWebLifecycleState", { state: "frozen" });
  await tab.cdp("Debugger.enable");
  await tab.cdp("Debugger.pause");
  return async () => {
    await tab.cdp("Debugger.resume");
    await tab.cdp("Debugger.disable");
    await tab.cdp("Page.setWebLifecycleState", { state: "active" });
    // A frozen page stays hidden once thawed, as a background tab does: the
    // user comes back to it.
    await tab.show();
    await tab.eval(() => document.dispatchEvent(new Event("resume")));
  };
}

chromiumOnlyTest("a frozen sender tab gives the lock up: another tab takes over and its commits never hang", async () => {
  await scenario(async ({ server, browser, url }) => {
    const a = await openApp(browser, url);
    await waitFor(async () => (await text(a, "sender")) === "this tab sends", { message: "the first tab to send" });
    const b = await openApp(browser, url);
    const client = await clientId(a);
    await waitFor(async () => (await text(b, "sender")) === "another tab sends", { message: "the second tab to follow" });
    await addItem(a, "before-freeze");
    await waitServerCount(server, client, 1);

    const thaw = await freeze(a);
    await waitFor(async () => (await text(b, "sender")) === "this tab sends",
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

engineTest("a sender tab hidden and shown again (a background tab): the other tab's commits arrive meanwhile, the shown tab catches up", async () => {
  await scenario(async ({ server, browser, url }) => {
    const a = await openApp(browser, url);
    await waitFor(async () => (await text(a, "sender")) === "this tab sends", { message: "the first tab to send" });
    const b = await openApp(browser, url);
    const client = await clientId(a);
    await addItem(a, "before-hiding");
    await waitServerCount(server, client, 1);

    // Minimized: the page is hidden (where WebKit on iOS may close its
    // IndexedDB connections; WebKitGTK does not). It keeps the sender lock.
    const window = (await a.focus()).manage().window();
    await window.minimize();
    assert.equal(await a.eval(() => document.visibilityState), "hidden");
    const titles = Array.from({ length: 3 }, (_, i) => `while-hidden-${pad(i + 1)}`);
    for (const title of titles) await addItem(b, title);
    await waitServerCount(server, client, 4);
    await waitStat(b, "pending", 0);

    await a.show();
    assert.equal(await a.eval(() => document.visibilityState), "visible");
    await waitFor(async () => (await items(a)).length === 4, { message: "the shown tab to list the other tab's todos" });
    await addItem(a, "after-showing");
    await waitServerCount(server, client, 5);
    await waitStat(a, "pending", 0);
    assert.equal(await shown(a, "banner"), null, "no lost connection");
    const events = await checkedEvents(server, client);
    assert.deepEqual(titlesOf(events), ["before-hiding", ...titles, "after-showing"]);
    await assertNoOverlap(server, client);
  });
});

engineTest("three tabs writing while the network flaps: every event once, pushes never overlap", async () => {
  await scenario((s) => threeTabs(s, { noLocks: false }));
});

engineTest("a server answering 500 for a while: the error is shown, then everything arrives", async () => {
  await scenario(async ({ server, browser, url }) => {
    const page = await openApp(browser, url);
    const client = await clientId(page);
    await addItem(page, "before-1");
    await waitServerCount(server, client, 1);

    await server.control("fail", { status: 500, count: 10_000 });
    const titles = Array.from({ length: 5 }, (_, i) => `during-${pad(i + 1)}`);
    for (const title of titles) await addItem(page, title);
    // All five committed (typing returns before the commit does).
    await waitStat(page, "pending", 5);
    const shownError = await waitFor(async () => {
      const error = await shown(page, "last-error");
      return error !== null && /500/.test(error) && error;
    }, { message: "the status to show the 500" });
    // The relay keeps trying (with backoff) and nothing gets through meanwhile.
    await waitFor(async () => (await server.requests()).filter((r) => r.status === 500).length >= 2,
      { message: "at least two failed attempts" });
    assert.equal((await server.events(client)).length, 1, "nothing stored while failing");
    assert.equal(await stat(page, "dead"), 0, "a 500 never dead-letters");
    assert.notEqual(await shown(page, "last-error"), null, `still shown while it lasts (${shownError})`);
    await screenshot(page, "app-500");

    await server.control("reset");
    await waitServerCount(server, client, 6);
    await waitStat(page, "pending", 0);
    await waitFor(async () => (await shown(page, "last-error")) === null, { message: "the error to clear after recovery" });
    const events = await checkedEvents(server, client);
    assert.deepEqual(titlesOf(events), ["before-1", ...titles]);
  });
});

engineTest("dead letters: a rejected event is listed, retried and discarded from the page", async () => {
  await scenario(async ({ server, browser, url }) => {
    const page = await openApp(browser, url);
    const client = await clientId(page);
    // The server rejects the next two events (a per-event verdict): both
    // are dead-lettered. (A 422 for a lone event is not enough: nothing
    // passing beside it, it could be the channel's.)
    await server.control("reject", { count: 2 });
    await addItem(page, "rejected-1");
    await waitStat(page, "dead", 1);
    await addItem(page, "rejected-2");
    await waitStat(page, "dead", 2);
    await waitFor(async () => (await count(page, "dead-letter")) === 2, { message: "two dead letters listed" });
    assert.match(await page.eval(() => document.querySelector("[data-testid=dead-letter]").textContent), /TodoCreated/);

    await clickButton(page, "Retry", { within: "dead-letter" });
    await waitServerCount(server, client, 1);
    await waitStat(page, "dead", 1);
    await clickButton(page, "Discard", { within: "dead-letter" });
    await waitStat(page, "dead", 0);
    await waitFor(async () => (await count(page, "dead-letter")) === 0, { message: "the list to empty" });
    // The server may hold the retried event a moment before the page has settled it.
    await waitStat(page, "pending", 0);
    assert.deepEqual(titlesOf(await checkedEvents(server, client)), ["rejected-1"]);
  });
});

engineTest("screenshot: the app with sent, pending and dead events", async () => {
  await scenario(async ({ server, browser, network, url }) => {
    const page = await openApp(browser, url);
    const client = await clientId(page);
    for (const title of ["Buy oat milk", "Write the quarterly report", "Call the plumber"]) {
      await addItem(page, title);
    }
    await waitServerCount(server, client, 3);
    await (await page.find("[data-testid=item] button[data-action=toggle]")).click();
    await waitServerCount(server, client, 4);
    await server.control("reject", { count: 1 });
    await addItem(page, "Pay the invoice");
    await waitStat(page, "dead", 1);
    await waitFor(async () => (await items(page)).filter((i) => i.sync === "synced").length === 3,
      { message: "three todos marked synced" });

    await network.set(false);
    await addItem(page, "Book flights");
    await addItem(page, "Water the plants");
    await waitStat(page, "pending", 2);
    await waitFor(async () => (await text(page, "network")) === "offline", { message: "the offline indicator" });
    await waitFor(async () => /offline/.test(await text(page, "server-error")),
      { message: "the server panel to say it cannot reach the server" });

    const path = await screenshot(page, "app");
    assert.ok(statSync(path).size > 20_000, `${path} looks empty`);
    console.log(`screenshot: ${path}`);
  });
});

engineTest("the Retry now button: waiting events are made due, the page says how many, all arrive", async () => {
  await scenario(async ({ server, browser, url }) => {
    const page = await openApp(browser, url);
    const client = await clientId(page);
    // A 503 with Retry-After parks the event (for at most the app's 5 s cap);
    // outbox.retryNow() itself is tested against a 60 s wait in tests/browser.rs.
    await server.control("fail", { status: 503, count: 1, retry_after: 60 });
    await addItem(page, "parked");
    await waitFor(async () => (await server.requests()).some((r) => r.status === 503), { message: "the 503" });
    await (await page.find("[data-testid=retry-now]")).click();
    // On a timeout, say what the page showed instead (an error from
    // retryNow(), or nothing: the click or the promise went missing).
    let shown = null;
    await waitFor(async () => /retrying \d+ waiting events?/.test(shown = await text(page, "flush-result")),
      { message: "the retry-now result" })
      .catch((e) => { throw new Error(`${e.message}; the result line showed ${JSON.stringify(shown)}`); });
    await waitServerCount(server, client, 1);
    await waitStat(page, "pending", 0);
    assert.deepEqual(titlesOf(await checkedEvents(server, client)), ["parked"]);
  });
});

chromiumOnlyTest("site data cleared under the app: the connection is lost for good, the page says so and gives the sender lock up", async () => {
  await scenario(async ({ browser, url }) => {
    const page = await openApp(browser, url);
    await waitFor(async () => (await text(page, "sender")) === "this tab sends", { message: "the tab to send" });
    // What "Clear site data" does: the browser closes the IndexedDB
    // connections (their `close` event) and deletes the databases.
    await page.cdp("Storage.clearDataForOrigin", { origin: url, storageTypes: "indexeddb" });
    await waitFor(async () => {
      const banner = await shown(page, "banner");
      return banner !== null && /lost its (database|IndexedDB) connection/.test(banner);
    }, { message: "the banner saying the connection is lost" });
    await waitFor(async () => (await text(page, "sender")) === "another tab sends", { message: "the tab to stop sending" });
    const held = await page.eval(async () => (await navigator.locks.query()).held.map((l) => l.name));
    assert.deepEqual(held.filter((n) => n.startsWith("edge-outbox:")), [], "the sender lock was given up");
    await page.collectProblems();
    page.problems.length = 0; // the banner is the expected outcome here
  });
});
