// The outbox and its relay in a dedicated module Worker (no `window`), in
// Chromium, Firefox or WebKit (E2E_ENGINE), delivering to the reference
// server. Run by scripts/test-browser in each engine, which builds pkg/ and
// starts the server with `--cors-origin '*'` (this page is served from
// another port):
//   E2E_ENGINE=webkit EDGE_OUTBOX_TEST_SERVER=http://127.0.0.1:PORT node --test js/test/worker.test.mjs
// Fails (never skips) when the server, the package or the browser is missing.
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

test(`${ENGINE}: outbox + relay in a dedicated module Worker deliver once, in order`, { timeout: 120_000 }, async () => {
  assert.ok(server, "EDGE_OUTBOX_TEST_SERVER is not set: run scripts/test-browser (it starts the reference server)");
  assert.ok(fs.existsSync(path.join(root, "pkg/index.js")), "pkg/ is not built: run scripts/build-pkg");
  const files = await staticServer(root, here);
  const origin = `http://127.0.0.1:${files.address().port}`;
  const driver = await startDriver(engine);
  const browser = await driver.newSession().catch(async (e) => { await driver.stop(); throw e; });
  try {
    const page = await browser.open(`${origin}/test/worker.html`);
    const database = `worker-${Date.now()}`;
    const result = await page.eval(
      ({ server, database }) =>
        new Promise((resolve) => {
          const worker = new Worker("/test/worker.js", { type: "module" });
          const timer = setTimeout(() => resolve({ ok: false, error: "the worker did not answer within 60 s" }), 60_000);
          worker.onmessage = (e) => { clearTimeout(timer); resolve(e.data); };
          worker.onerror = (e) => { clearTimeout(timer); resolve({ ok: false, error: `worker error: ${e.message}` }); };
          worker.postMessage({ server, database });
        }),
      { server, database },
    );
    assert.deepEqual(await page.collectProblems(), [], "no page errors");
    assert.ok(result.ok, `the worker failed: ${result.error}`);
    assert.equal(result.ids.length, 50);
    // The explicit flush (relay stopped) really ran and delivered the first 30.
    assert.equal(result.flush.skipped, null, `flush skipped: ${JSON.stringify(result.flush)}`);
    assert.equal(result.flush.sent, 30, `flush report: ${JSON.stringify(result.flush)}`);
    assert.equal(result.flush.pending, 0);
    // The running relay (Web Lock held in the worker) delivered the rest.
    assert.ok(result.leader, "the worker became the sender");
    assert.ok(result.drained, `events left pending: ${JSON.stringify(result.lastStatus)}`);
    assert.deepEqual({ pending: result.stats.pending, sent: result.stats.sent, dead: result.stats.dead },
                     { pending: 0, sent: 50, dead: 0 });
    // The server has every event once, in commit order.
    const answer = await fetch(`${server}/v1/events?after=0&limit=1000&client_id=${result.clientId}`);
    assert.equal(answer.status, 200, await answer.clone().text());
    const received = (await answer.json()).events.map((e) => e.id);
    assert.deepEqual(received, result.ids, "received once each, in commit order");
  } finally {
    await browser.quit();
    await driver.stop();
    files.close();
  }
});
