// Test harness of the end-to-end tests: the reference server (a fresh one,
// with a fresh database, per test) behind a refusing proxy (proxy.mjs), the
// app's page in any of the three engines (webdriver.mjs), and bounded
// waits. Anything that cannot start throws with the reason: a test never
// passes by skipping what it could not run.

import { spawn } from "node:child_process";
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

import { By, Key } from "./webdriver.mjs";

const here = dirname(fileURLToPath(import.meta.url));
export const repoRoot = resolve(here, "..", "..");

/** The server binary and the built app; scripts/test-e2e builds both. */
export const SERVER_BIN = process.env.EDGE_OUTBOX_SERVER ?? join(repoRoot, "target", "release", "edge-outbox-server");
export const APP_DIR = process.env.EDGE_OUTBOX_APP_DIR ?? join(repoRoot, "www", "dist");

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

// ---- the app's page ----

const byTestId = (id) => `[data-testid="${id}"]`;

/**
 * Open the app at `url` in a new window of `browser` and wait until it is
 * ready for input.
 */
export async function openApp(browser, url) {
  const tab = await browser.open(url);
  await waitReady(tab);
  return tab;
}

/** Wait until the app has opened its outbox (or fail with what it shows). */
export async function waitReady(tab) {
  await waitFor(async () => {
    const { ready, banner } = await tab.eval(() => {
      const b = document.querySelector("[data-testid=banner]");
      return { ready: document.body?.dataset.ready === "true", banner: b && !b.hidden ? b.textContent : null };
    });
    if (banner) throw new Error(`the app shows an error: ${banner}`);
    return ready;
  }, { timeout: 20_000, message: `the app to start; problems: ${JSON.stringify(await tab.collectProblems())}` });
}

/** The service worker controls the page and has cached the shell: reloads work offline. */
export async function waitOfflineReady(tab) {
  await tab.eval(async () => {
    await navigator.serviceWorker.ready;
    if (!navigator.serviceWorker.controller) {
      await new Promise((r) => navigator.serviceWorker.addEventListener("controllerchange", r, { once: true }));
    }
  });
}

/** Type `title` into the new-todo field and press Enter, as a user does. */
export async function addItem(tab, title) {
  const field = await tab.find(byTestId("new-title"));
  await field.sendKeys(title, Key.ENTER);
}

/** The text of the element with `data-testid=id`, or null when there is none or it is hidden. */
export async function shown(tab, id) {
  return tab.eval((sel) => {
    const el = document.querySelector(sel);
    return el && !el.hidden && el.getClientRects().length > 0 ? el.textContent : null;
  }, byTestId(id));
}

/** The text of the element with `data-testid=id` (visible or not). */
export async function text(tab, id) {
  return tab.eval((sel) => document.querySelector(sel)?.textContent ?? null, byTestId(id));
}

/** Click the button named `name` inside the `index`th element with `data-testid=id`. */
export async function clickButton(tab, name, { within, index = 0 } = {}) {
  const wd = await tab.focus();
  const scope = within ? (await wd.findElements(By.css(byTestId(within))))[index] : wd;
  if (!scope) throw new Error(`no ${within} #${index}`);
  const button = await scope.findElement(By.xpath(`.//button[normalize-space()=${JSON.stringify(name)}]`));
  await button.click();
}

/** How many elements have `data-testid=id`. */
export async function count(tab, id) {
  return tab.eval((sel) => document.querySelectorAll(sel).length, byTestId(id));
}

/** The number shown in one of the outbox counters (`pending`, `sent`, `dead`, `inflight`). */
export async function stat(tab, name) {
  const value = await text(tab, `stat-${name}`);
  const n = Number(value);
  if (!Number.isFinite(n)) throw new Error(`stat-${name} shows ${JSON.stringify(value)}`);
  return n;
}

export async function clientId(tab) {
  const value = await text(tab, "client-id");
  const m = /client (\S+)/.exec(value ?? "");
  if (!m) throw new Error(`no client id shown: ${JSON.stringify(value)}`);
  return m[1];
}

/** The todo titles shown, top to bottom, with their sync badge. */
export async function items(tab) {
  return tab.eval(() => [...document.querySelectorAll("[data-testid=item]")].map((li) => ({
    title: li.querySelector("[data-testid=item-title]").textContent,
    sync: li.querySelector("[data-testid=item-sync]").textContent,
  })));
}
