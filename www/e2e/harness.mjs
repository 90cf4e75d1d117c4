// Test harness of the end-to-end tests: the reference server (a fresh one,
// with a fresh database, per test), headless Chromium through
// playwright-core, and bounded waits. Anything that cannot start throws
// with the reason: a test never passes by skipping what it could not run.

import { spawn } from "node:child_process";
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const here = dirname(fileURLToPath(import.meta.url));
export const repoRoot = resolve(here, "..", "..");

/** The server binary and the built app; scripts/test-e2e builds both. */
export const SERVER_BIN = process.env.EDGE_OUTBOX_SERVER ?? join(repoRoot, "target", "release", "edge-outbox-server");
export const APP_DIR = process.env.EDGE_OUTBOX_APP_DIR ?? join(repoRoot, "www", "dist");
export const CHROMIUM = process.env.CHROMIUM ?? "/usr/bin/chromium";

// ---- waiting ----

/**
 * Poll `check` until it returns a truthy value (returned) or `timeout` ms
 * pass (throws, with `message` and the last value or error seen). Every
 * wait in these tests is one of these: a condition with a deadline, never a
 * sleep standing in for synchronization.
 */
export async function waitFor(check, { timeout = 15_000, interval = 100, message = "condition" } = {}) {
  const deadline = Date.now() + timeout;
  let last;
  for (;;) {
    try {
      const value = await check();
      if (value) return value;
      last = value;
    } catch (e) {
      last = e;
    }
    if (Date.now() > deadline) {
      const detail = last instanceof Error ? last.stack ?? last.message : JSON.stringify(last);
      throw new Error(`timed out after ${timeout} ms waiting for ${message}; last: ${detail}`);
    }
    await new Promise((r) => setTimeout(r, interval));
  }
}

// ---- the reference server ----

/** Servers still running: killed if the test process exits early (a crash, Ctrl-C). */
const running = new Set();
process.on("exit", () => {
  for (const proc of running) proc.kill("SIGKILL");
});

/**
 * Start `edge-outbox-server` on a random loopback port with test controls,
 * anonymous pushes, a fresh database and the built app at `/`.
 */
export async function startServer() {
  if (!existsSync(SERVER_BIN)) {
    throw new Error(`server binary missing: ${SERVER_BIN} (build it: cargo build -p edge-outbox-server)`);
  }
  if (!existsSync(join(APP_DIR, "index.html"))) {
    throw new Error(`built app missing: ${APP_DIR}/index.html (node www/build.mjs)`);
  }
  const dir = mkdtempSync(join(tmpdir(), "edge-outbox-e2e-"));
  const proc = spawn(SERVER_BIN, [
    "--listen", "127.0.0.1:0",
    "--database", join(dir, "server.db"),
    "--allow-anonymous",
    "--enable-test-controls",
    "--static-dir", APP_DIR,
  ], { stdio: ["ignore", "pipe", "pipe"] });
  running.add(proc);
  proc.once("exit", () => running.delete(proc));
  let stdout = "";
  let stderr = "";
  proc.stderr.on("data", (d) => { stderr += d; });
  const url = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => fail(new Error("no 'listening on' line within 15 s")), 15_000);
    function fail(e) {
      clearTimeout(timer);
      proc.kill("SIGKILL");
      reject(new Error(`edge-outbox-server did not start: ${e.message}\nstdout: ${stdout}\nstderr: ${stderr}`));
    }
    proc.on("error", fail);
    proc.on("exit", (code, signal) => fail(new Error(`exited early (code ${code}, signal ${signal})`)));
    proc.stdout.on("data", (d) => {
      stdout += d;
      const m = /listening on (http:\/\/127\.0\.0\.1:\d+)/.exec(stdout);
      if (m) {
        clearTimeout(timer);
        proc.removeAllListeners("exit");
        resolve(m[1]);
      }
    });
  });
  const server = new Server(url, proc, dir, () => stderr);
  const health = await fetch(`${url}/healthz`);
  if (!health.ok) throw new Error(`${url}/healthz answered ${health.status}`);
  return server;
}

class Server {
  constructor(url, proc, dir, stderr) {
    this.url = url;
    this.proc = proc;
    this.dir = dir;
    this.stderr = stderr;
  }

  /** POST a fault-injection control, e.g. `control("fail", { status: 500, count: 100 })`. */
  async control(name, body) {
    const response = await fetch(`${this.url}/__test/${name}`, {
      method: "POST",
      headers: body ? { "content-type": "application/json" } : {},
      body: body ? JSON.stringify(body) : undefined,
    });
    if (!response.ok) throw new Error(`/__test/${name} answered ${response.status}: ${await response.text()}`);
  }

  /** The push log: `{ client_id, started_at, finished_at, events, status, fault }`, oldest first. */
  async requests() {
    const response = await fetch(`${this.url}/__test/requests`);
    if (!response.ok) throw new Error(`/__test/requests answered ${response.status}`);
    return response.json();
  }

  /** Every event the server stored for `clientId`, in arrival order. */
  async events(clientId) {
    const all = [];
    let after = 0;
    for (;;) {
      const q = new URLSearchParams({ after: String(after), limit: "1000", client_id: clientId });
      const response = await fetch(`${this.url}/v1/events?${q}`);
      if (!response.ok) throw new Error(`GET /v1/events answered ${response.status}: ${await response.text()}`);
      const page = await response.json();
      all.push(...page.events);
      if (page.events.length < 1000) return all;
      after = page.next_cursor;
    }
  }

  async stop() {
    if (this.proc.exitCode === null && this.proc.signalCode === null) {
      const exited = new Promise((r) => this.proc.once("exit", r));
      this.proc.kill("SIGTERM");
      const timer = setTimeout(() => this.proc.kill("SIGKILL"), 5000);
      await exited;
      clearTimeout(timer);
    }
    rmSync(this.dir, { recursive: true, force: true });
  }
}

// ---- the browser ----

/**
 * Debian's Chromium, headless. Playwright gives the browser a fresh
 * temporary profile (user-data dir) of its own, and each test opens a new
 * browser context: its own IndexedDB, service workers, Web Locks.
 */
export async function launchBrowser() {
  if (!existsSync(CHROMIUM)) {
    throw new Error(`${CHROMIUM} is missing: run scripts/setup (apt-get install -y chromium)`);
  }
  try {
    return await chromium.launch({
      executablePath: CHROMIUM,
      headless: true,
      args: [
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
      ],
      timeout: 30_000,
    });
  } catch (e) {
    throw new Error(`cannot start Chromium (${CHROMIUM}): ${e.message}`);
  }
}

/**
 * A page of the app, ready for input. Page errors and console errors are
 * collected on `page.problems` so a test can show them when it fails.
 */
export async function openApp(context, url) {
  const page = await context.newPage();
  page.problems = [];
  page.on("pageerror", (e) => page.problems.push(`pageerror: ${e.message}`));
  page.on("console", (m) => {
    if (m.type() === "error") page.problems.push(`console: ${m.text()}`);
  });
  await page.goto(url);
  await waitReady(page);
  return page;
}

/** Wait until the app has opened its outbox (or fail with what it shows). */
export async function waitReady(page) {
  await waitFor(async () => {
    const banner = page.getByTestId("banner");
    if (await banner.isVisible()) throw new Error(`the app shows an error: ${await banner.textContent()}`);
    return (await page.locator("body").getAttribute("data-ready")) === "true";
  }, { timeout: 20_000, message: `the app to start (${page.url()}); problems: ${JSON.stringify(page.problems)}` });
}

/** The service worker controls the page and has cached the shell: reloads work offline. */
export async function waitOfflineReady(page) {
  await page.evaluate(async () => {
    await navigator.serviceWorker.ready;
    if (!navigator.serviceWorker.controller) {
      await new Promise((r) => navigator.serviceWorker.addEventListener("controllerchange", r, { once: true }));
    }
  });
}

export async function addItem(page, title) {
  await page.getByTestId("new-title").fill(title);
  await page.getByTestId("new-title").press("Enter");
}

/** The number shown in one of the outbox counters (`pending`, `sent`, `dead`, `inflight`). */
export async function stat(page, name) {
  const text = await page.getByTestId(`stat-${name}`).textContent();
  const n = Number(text);
  if (!Number.isFinite(n)) throw new Error(`stat-${name} shows ${JSON.stringify(text)}`);
  return n;
}

export async function clientId(page) {
  const text = await page.getByTestId("client-id").textContent();
  const m = /client (\S+)/.exec(text ?? "");
  if (!m) throw new Error(`no client id shown: ${JSON.stringify(text)}`);
  return m[1];
}

/** The todo titles shown, top to bottom, with their sync badge. */
export async function items(page) {
  return page.getByTestId("item").evaluateAll((lis) => lis.map((li) => ({
    title: li.querySelector("[data-testid=item-title]").textContent,
    sync: li.querySelector("[data-testid=item-sync]").textContent,
  })));
}
