// The npm package as a user gets it: scripts/test-consumer packs pkg/ with
// `npm pack`, installs the tarball here and builds this app with Vite (no
// bundler config). These tests then check
// - the packed files: every module the entry reaches is in the tarball, and
//   nothing else is (a stale file from an old build would ship otherwise);
// - Node (what server-side rendering does): importing the package does not
//   throw; opening an outbox rejects with a StorageError that says why;
// - the built app in headless Chromium, served by the reference server: the
//   .wasm Vite emitted is fetched and instantiated, Outbox.open works and the
//   committed event reaches the server;
// - the same app built by webpack 5 (webpack.config.js: the entry and the
//   page, nothing for the package);
// - the same under Vite's dev server (which pre-bundles dependencies and can
//   lose a package's .wasm), proxying /v1 to the reference server.
// Run by scripts/test-consumer:
//   EDGE_OUTBOX_SERVER=target/debug/edge-outbox-server CONSUMER_APP_DIR=DIST WEBPACK_APP_DIR=DIST2 node --test test/
// Fails (never skips) when the server, the build or the browser is missing.
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { test } from "node:test";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const here = path.dirname(fileURLToPath(import.meta.url));
const appRoot = path.resolve(here, "..");
const installed = path.join(appRoot, "node_modules", "edge-outbox");
const serverBin = process.env.EDGE_OUTBOX_SERVER;
const appDir = process.env.CONSUMER_APP_DIR;
const webpackDir = process.env.WEBPACK_APP_DIR;
const chromiumPath = process.env.CHROMIUM ?? "/usr/bin/chromium";

/** The relative module specifiers a JS file imports statically. */
function relativeImports(file) {
  const source = fs.readFileSync(file, "utf8");
  // The package's JS is minified: several statements share a line, and
  // `import*as x from"./y.js"` has no spaces.
  const from = /(?:^|[;}\s])(?:import|export)\b[^'";]*?from\s*['"](\.[^'"]+)['"]/gm;
  const bare = /(?:^|[;}\s])import\s*['"](\.[^'"]+)['"]/gm;
  return [...source.matchAll(from), ...source.matchAll(bare)].map((m) => m[1]);
}

test("the tarball holds the modules its entry reaches, and no other", () => {
  assert.ok(fs.existsSync(path.join(installed, "package.json")), `edge-outbox is not installed in ${appRoot}: run scripts/test-consumer`);
  const manifest = JSON.parse(fs.readFileSync(path.join(installed, "package.json"), "utf8"));
  const reached = new Set();
  const queue = [path.join(installed, manifest.exports["."].default)];
  while (queue.length) {
    const file = queue.pop();
    if (reached.has(file)) continue;
    assert.ok(fs.existsSync(file), `${path.relative(installed, file)} is imported but not in the package`);
    reached.add(file);
    for (const spec of relativeImports(file)) queue.push(path.resolve(path.dirname(file), spec));
  }
  const shipped = fs.readdirSync(installed, { recursive: true })
    .map((f) => path.join(installed, f))
    .filter((f) => f.endsWith(".js"));
  const unused = shipped.filter((f) => !reached.has(f)).map((f) => path.relative(installed, f));
  assert.deepEqual(unused, [], "JS files in the package that no module imports (left over from an older build?)");
  assert.ok(fs.existsSync(path.join(installed, "edge_outbox_bg.wasm")), "edge_outbox_bg.wasm is not in the package");
});

test("importing the package in Node does not throw; opening an outbox says it needs a browser", async () => {
  // Resolved by name through package.json's "exports", as an SSR build does.
  const mod = await import("edge-outbox");
  assert.deepEqual(Object.keys(mod).sort(), ["OUTBOX_STORES", "Outbox", "createOutboxStores", "ready"]);
  assert.deepEqual(mod.OUTBOX_STORES, ["edge_outbox_events"]);
  await assert.rejects(mod.Outbox.open({ database: "ssr", endpoint: "/v1/events" }), (e) => {
    assert.ok(e instanceof Error);
    assert.equal(e.name, "StorageError");
    assert.match(e.message, /IndexedDB/);
    assert.match(e.message, /browser/);
    return true;
  });
});

test("the Vite-built app loads the wasm, opens an outbox and delivers an event", { timeout: 120_000 }, async (t) => {
  assert.ok(appDir && fs.existsSync(path.join(appDir, "index.html")), `CONSUMER_APP_DIR has no built app (${appDir}): run scripts/test-consumer`);
  const emitted = fs.readdirSync(path.join(appDir, "assets")).filter((f) => f.endsWith(".wasm"));
  assert.equal(emitted.length, 1, `Vite should emit the package's .wasm as one asset; assets: ${fs.readdirSync(path.join(appDir, "assets"))}`);
  const server = await startServer(appDir);
  t.after(() => server.stop());
  const wasm = await runApp(t, `${server.url}/`, server.url);
  assert.equal(new URL(wasm.url()).pathname, `/assets/${emitted[0]}`, "the page loaded the .wasm Vite emitted");
});

test("the webpack-built app loads the wasm, opens an outbox and delivers an event", { timeout: 120_000 }, async (t) => {
  assert.ok(webpackDir && fs.existsSync(path.join(webpackDir, "index.html")), `WEBPACK_APP_DIR has no built app (${webpackDir}): run scripts/test-consumer`);
  const emitted = fs.readdirSync(webpackDir).filter((f) => f.endsWith(".wasm"));
  assert.equal(emitted.length, 1, `webpack should emit the package's .wasm as one asset; files: ${fs.readdirSync(webpackDir)}`);
  const server = await startServer(webpackDir);
  t.after(() => server.stop());
  const wasm = await runApp(t, `${server.url}/`, server.url);
  assert.equal(new URL(wasm.url()).pathname, `/${emitted[0]}`, "the page loaded the .wasm webpack emitted");
});

test("under Vite's dev server (dependencies pre-bundled) the same app loads the wasm and delivers", { timeout: 120_000 }, async (t) => {
  const server = await startServer();
  t.after(() => server.stop());
  // What a user's vite.config.js holds to reach their backend in
  // development: a proxy for the API routes. Nothing for the package.
  const { createServer } = await import("vite");
  // A fresh dependency cache: a pre-bundle of an older tarball must not be reused.
  const cacheDir = fs.mkdtempSync(path.join(os.tmpdir(), "edge-outbox-consumer-vite-"));
  t.after(() => fs.rmSync(cacheDir, { recursive: true, force: true }));
  const dev = await createServer({
    root: appRoot,
    configFile: false,
    cacheDir,
    logLevel: "warn",
    clearScreen: false,
    server: { host: "127.0.0.1", port: 0, proxy: { "/v1": server.url } },
  });
  t.after(() => dev.close());
  await dev.listen();
  const url = dev.resolvedUrls?.local[0];
  assert.ok(url, "the Vite dev server has no local URL");
  await runApp(t, url, server.url);
});

/**
 * Open the app at `url` in headless Chromium; assert that it reports
 * success, fetched exactly one .wasm (200, application/wasm) and that its
 * event reached the reference server at `serverUrl`. Returns the .wasm's
 * response.
 */
async function runApp(t, url, serverUrl) {
  assert.ok(fs.existsSync(chromiumPath), `no browser at ${chromiumPath}: run scripts/setup`);
  const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), "edge-outbox-consumer-"));
  t.after(() => fs.rmSync(userDataDir, { recursive: true, force: true }));
  const context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: chromiumPath,
    headless: true,
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
           "--disable-component-update", "--disable-sync"],
  });
  t.after(() => context.close());
  const page = await context.newPage();
  const problems = [];
  page.on("pageerror", (e) => problems.push(`pageerror: ${e.message}`));
  page.on("console", (m) => m.type() === "error" && problems.push(`console: ${m.text()}`));
  const wasmResponses = [];
  page.on("response", (r) => new URL(r.url()).pathname.endsWith(".wasm") && wasmResponses.push(r));

  await page.goto(url);
  await page.waitForFunction(() => document.getElementById("result")?.dataset.state !== "running", null, { timeout: 30_000 })
    .catch(async (e) => { throw new Error(`the app did not finish (it shows "${await page.textContent("#result")}"): ${e.message}; ${problems.join("; ")}`); });
  const result = await page.evaluate(() => window.consumerResult);
  assert.equal(result?.ok, true, `the app failed: ${JSON.stringify(result)}; ${problems.join("; ")}`);

  assert.equal(wasmResponses.length, 1, `one .wasm fetched: ${wasmResponses.map((r) => r.url())}`);
  const wasm = wasmResponses[0];
  assert.equal(wasm.status(), 200);
  assert.equal(wasm.headers()["content-type"], "application/wasm");

  // The relay pushes after the commit; wait (bounded) until the server holds it.
  const events = await waitFor(async () => {
    const q = new URLSearchParams({ after: "0", limit: "100", client_id: result.clientId });
    const response = await fetch(`${serverUrl}/v1/events?${q}`);
    assert.equal(response.status, 200, `GET /v1/events answered ${response.status}`);
    const page = await response.json();
    return page.events.length > 0 && page.events;
  }, "the app's event at the server");
  assert.equal(events.length, 1);
  assert.equal(events[0].type, "NoteCreated");
  assert.equal(events[0].key, result.note.id);
  assert.deepEqual(events[0].payload, result.note);
  assert.deepEqual(problems, []);
  return wasm;
}

/** Poll `check` until it returns a truthy value, for at most 15 s. */
async function waitFor(check, what) {
  const deadline = Date.now() + 15_000;
  for (;;) {
    const value = await check();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out after 15 s waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

/**
 * The reference server on a free loopback port with a fresh database,
 * anonymous pushes, and `staticDir` (if given) at `/`.
 */
async function startServer(staticDir) {
  assert.ok(serverBin && fs.existsSync(serverBin), `EDGE_OUTBOX_SERVER is not a server binary (${serverBin}): run scripts/test-consumer`);
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "edge-outbox-consumer-server-"));
  const args = ["--listen", "127.0.0.1:0", "--database", path.join(dir, "server.db"), "--allow-anonymous"];
  if (staticDir) args.push("--static-dir", staticDir);
  const proc = spawn(serverBin, args, { stdio: ["ignore", "pipe", "pipe"] });
  let output = "";
  proc.stderr.on("data", (d) => { output += d; });
  const url = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => fail("no 'listening on' line within 15 s"), 15_000);
    function fail(why) {
      clearTimeout(timer);
      proc.kill("SIGKILL");
      reject(new Error(`edge-outbox-server did not start: ${why}\n${output}`));
    }
    proc.on("error", (e) => fail(e.message));
    proc.on("exit", (code) => fail(`exited with ${code}`));
    proc.stdout.on("data", (d) => {
      output += d;
      const m = /listening on (http:\/\/127\.0\.0\.1:\d+)/.exec(output);
      if (m) {
        clearTimeout(timer);
        proc.removeAllListeners("exit");
        resolve(m[1]);
      }
    });
  });
  return {
    url,
    async stop() {
      const exited = new Promise((r) => proc.once("exit", r));
      proc.kill("SIGTERM");
      await exited;
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
}
