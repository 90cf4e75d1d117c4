// Issue 10, case 5, across contexts: the page sends, a module Worker on the
// same outbox waits for the sender lock; the page calls close() while its
// push is on the wire (the server holds the answer back). The Worker must
// not push that batch while the first push is in flight: the lock passes
// only once the push settled. Run by scripts/test-browser in each engine
// (E2E_ENGINE; it builds pkg/ and starts the reference server with test
// controls):
//   E2E_ENGINE=firefox EDGE_OUTBOX_TEST_SERVER=http://127.0.0.1:PORT node --test js/test/close-mid-push.test.mjs
import assert from "node:assert/strict";
import fs from "node:fs";
import path from "node:path";
import { test } from "node:test";
import { fileURLToPath } from "node:url";

import { engineFromEnv, startDriver } from "../../www/e2e/webdriver.mjs";
import { staticServer } from "./static.mjs";

const here = path.dirname(fileURLToPath(import.meta.url));
const root = path.resolve(here, "../..");
const server = process.env.EDGE_OUTBOX_TEST_SERVER;
// The engine (E2E_ENGINE=chromium|firefox|webkit), driven over WebDriver by
// the end-to-end tests' harness (www/e2e/webdriver.mjs).
const engine = engineFromEnv();
const ENGINE = { chromium: "Chromium", firefox: "Firefox", webkit: "WebKit" }[engine];

async function control(name, body) {
  const r = await fetch(`${server}/__test/${name}`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify(body ?? {}),
  });
  assert.ok(r.ok, `/__test/${name}: ${r.status}`);
}

test(`${ENGINE}: close() mid-push hands the lock to a Worker only after the push settled: no overlapping pushes`, { timeout: 120_000 }, async () => {
  assert.ok(server, "EDGE_OUTBOX_TEST_SERVER is not set: run scripts/test-browser (it starts the reference server)");
  assert.ok(fs.existsSync(path.join(root, "pkg/index.js")), "pkg/ is not built: run scripts/build-pkg");
  const files = await staticServer(root, here);
  const origin = `http://127.0.0.1:${files.address().port}`;
  const driver = await startDriver(engine);
  const browser = await driver.newSession().catch(async (e) => { await driver.stop(); throw e; });
  try {
    const page = await browser.open(`${origin}/test/worker.html`);
    // The next push is stored, then its answer held back for 1.5 s.
    await control("delay", { ms: 1500, count: 1 });
    const result = await page.eval(async ({ server, database }) => {
      const until = async (what, check, ms = 10_000) => {
        for (const end = Date.now() + ms; Date.now() < end; await new Promise((r) => setTimeout(r, 20))) {
          if (check()) return;
        }
        throw new Error(`timed out waiting for ${what}`);
      };
      const { Outbox } = await import("/pkg/index.js");
      const outbox = await Outbox.open({
        database,
        stores: { todos: { keyPath: "id" } },
        endpoint: `${server}/v1/events`,
        retry: { baseMs: 100, capMs: 400 },
      });
      await until("the page to send", () => outbox.status.leader);
      const worker = new Worker("/test/follower.js", { type: "module" });
      let workerStatus = null;
      let workerError = null;
      worker.onmessage = ({ data }) => {
        if (data.error) workerError = data.error;
        if (data.status) workerStatus = data.status;
      };
      worker.postMessage({ server, database });
      await until("the worker's outbox", () => workerStatus !== null || workerError !== null);
      if (workerError) throw new Error(workerError);
      const leaderBefore = workerStatus.leader;
      const ids = [];
      for (let id = 0; id < 3; id++) {
        ids.push(await outbox.transaction(["todos"], (tx) => {
          tx.put("todos", { id });
          return tx.enqueue("TodoCreated", { id }, { key: `todo-${id}` });
        }));
      }
      await until("the page's push to be in flight", () => outbox.status.inFlight > 0);
      await outbox.close();
      await until("the worker to send", () => workerStatus.leader);
      await until("the worker to see nothing pending", () => workerStatus.pending === 0);
      return { clientId: outbox.clientId, ids, leaderBefore };
    }, { server, database: `close-mid-push-${Date.now()}` });
    assert.deepEqual(await page.collectProblems(), [], "no page errors");
    assert.equal(result.leaderBefore, false, "the worker waited for the lock");
    const log = (await (await fetch(`${server}/__test/requests`)).json())
      .filter((r) => r.client_id === result.clientId)
      .sort((a, b) => a.started_at - b.started_at);
    assert.ok(log.length >= 1);
    for (let i = 1; i < log.length; i++) {
      assert.ok(log[i - 1].finished_at <= log[i].started_at,
        `two pushes of this outbox overlapped: ${JSON.stringify(log[i - 1])} and ${JSON.stringify(log[i])}`);
    }
    const answer = await fetch(`${server}/v1/events?after=0&limit=1000&client_id=${result.clientId}`);
    const received = (await answer.json()).events.map((e) => e.id);
    assert.deepEqual(received, result.ids, "received once each, in commit order");
  } finally {
    await browser.quit();
    await driver.stop();
    files.close();
  }
});
