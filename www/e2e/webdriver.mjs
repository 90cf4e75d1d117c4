// One WebDriver harness for the three engines the tests run in: Chromium
// (chromedriver), Firefox ESR (geckodriver) and WebKitGTK (WebKitWebDriver,
// under Xvfb), driven with selenium-webdriver's W3C client. Used by the
// end-to-end tests (www/e2e/) and the package's Worker tests (js/test/).
//
// Playwright drives only its own patched browsers, which cannot be installed
// here; WebDriver drives the browsers users have. What WebDriver cannot do
// in every engine is done here per engine, in one place:
// - the engine's own offline signal (`Browser.setOffline`): CDP network
//   emulation in Chromium; in Firefox and WebKit, whose drivers have no
//   offline emulation that works on 127.0.0.1, the page's `navigator.onLine`
//   is overridden and `offline`/`online` dispatched (the network itself is
//   cut by the refusing proxy, www/e2e/proxy.mjs);
// - CDP for Chromium-only scenarios (`Tab.cdp`): a DevTools connection of the
//   harness's own to the tab, next to chromedriver's.
// Anything that cannot start throws with the reason: a test never passes by
// skipping what it could not run.

import { spawn } from "node:child_process";
import { existsSync } from "node:fs";
import { createServer } from "node:net";
import { homedir } from "node:os";
import { join } from "node:path";
import { By, Key, WebDriver } from "selenium-webdriver";
import { Executor, HttpClient } from "selenium-webdriver/http/index.js";
import WebSocket from "ws";

export { By, Key };

/** The engines, in the order the test command runs them. */
export const ENGINES = ["chromium", "firefox", "webkit"];

/** The engine a test process runs in: `E2E_ENGINE` (default `chromium`), checked. */
export function engineFromEnv() {
  const engine = process.env.E2E_ENGINE ?? "chromium";
  if (!ENGINES.includes(engine)) throw new Error(`E2E_ENGINE=${engine}: expected one of ${ENGINES.join(", ")}`);
  return engine;
}

const toolsRoot = process.env.EDGE_OUTBOX_TOOLS ?? join(homedir(), ".local", "share", "edge-outbox-tools");

/**
 * How each engine's driver is started and which session it is asked for.
 * The driver listens on `port`; `args(port)` is the command line.
 */
const ENGINE_SETUP = {
  chromium: {
    name: "Chromium",
    command: () => [process.env.CHROMEDRIVER ?? "/usr/bin/chromedriver"],
    args: (port) => [`--port=${port}`],
    browser: () => process.env.CHROMIUM ?? "/usr/bin/chromium",
    capabilities: (binary) => ({
      browserName: "chrome",
      "goog:chromeOptions": {
        binary,
        // chromedriver gives every session a fresh temporary profile.
        args: ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
               "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--window-size=1280,900"],
      },
    }),
  },
  firefox: {
    name: "Firefox",
    command: () => [process.env.GECKODRIVER ?? join(toolsRoot, "bin", "geckodriver")],
    args: (port) => ["--port", String(port)],
    browser: () => process.env.FIREFOX ?? "/usr/bin/firefox-esr",
    capabilities: (binary) => ({
      browserName: "firefox",
      // geckodriver gives every session a fresh temporary profile.
      "moz:firefoxOptions": { binary, args: ["-headless", "-width", "1280", "-height", "900"] },
    }),
  },
  webkit: {
    name: "WebKit",
    // WebKitGTK has no headless mode: its MiniBrowser gets a virtual display.
    command: () => ["xvfb-run", "-a", "-s", "-screen 0 1280x1024x24", process.env.WEBKITWEBDRIVER ?? "WebKitWebDriver"],
    args: (port) => [`--port=${port}`],
    browser: () => null,
    // No capabilities: WebKitWebDriver starts its MiniBrowser in automation
    // mode, with an ephemeral (memory-only) website data store.
    capabilities: () => ({}),
  },
};

async function freePort() {
  const srv = createServer();
  await new Promise((resolve, reject) => srv.listen(0, "127.0.0.1", resolve).once("error", reject));
  const { port } = srv.address();
  await new Promise((resolve) => srv.close(resolve));
  return port;
}

/** Drivers still running: killed if the test process exits early. */
const runningDrivers = new Set();
process.on("exit", () => {
  for (const proc of runningDrivers) killGroup(proc, "SIGKILL");
});

function killGroup(proc, signal) {
  try {
    process.kill(-proc.pid, signal); // the driver's process group: xvfb-run, Xvfb and the browsers too
  } catch {
    // already gone
  }
}

/**
 * Start the WebDriver server of `engine` on a free loopback port, in a
 * process group of its own (so stopping it stops its browsers and Xvfb).
 * Throws with the driver's output if it is missing or not ready in 30 s.
 */
export async function startDriver(engine) {
  const setup = ENGINE_SETUP[engine];
  if (!setup) throw new Error(`unknown engine ${engine}`);
  const [command, ...pre] = setup.command();
  if (command.includes("/") && !existsSync(command)) {
    throw new Error(`${setup.name}: driver missing at ${command} (run scripts/setup)`);
  }
  const binary = setup.browser();
  if (binary && !existsSync(binary)) throw new Error(`${setup.name}: browser missing at ${binary} (run scripts/setup)`);
  const port = await freePort();
  const proc = spawn(command, [...pre, ...setup.args(port)], { stdio: ["ignore", "pipe", "pipe"], detached: true });
  runningDrivers.add(proc);
  let output = "";
  proc.stdout.on("data", (d) => { output += d; });
  proc.stderr.on("data", (d) => { output += d; });
  let exited = null;
  proc.once("error", (e) => { exited = e.message; });
  proc.once("exit", (code, signal) => { exited ??= `exited (code ${code}, signal ${signal})`; runningDrivers.delete(proc); });
  const url = `http://127.0.0.1:${port}`;
  const deadline = Date.now() + 30_000;
  for (;;) {
    if (exited) throw new Error(`${setup.name}: the driver ${command} ${exited}\n${output}`);
    try {
      const status = await (await fetch(`${url}/status`)).json();
      if (status.value?.ready !== false) break;
    } catch {
      // not listening yet
    }
    if (Date.now() > deadline) {
      killGroup(proc, "SIGKILL");
      throw new Error(`${setup.name}: the driver did not answer on ${url} within 30 s\n${output}`);
    }
    await new Promise((r) => setTimeout(r, 100));
  }
  return new Driver(engine, url, proc, binary, () => output);
}

class Driver {
  constructor(engine, url, proc, binary, output) {
    this.engine = engine;
    this.url = url;
    this.proc = proc;
    this.binary = binary;
    this.output = output;
  }

  /**
   * A new browser session: a fresh profile (its own IndexedDB, service
   * workers, locks), one window open on about:blank.
   */
  async newSession() {
    const setup = ENGINE_SETUP[this.engine];
    let wd;
    try {
      wd = await WebDriver.createSession(new Executor(new HttpClient(this.url)), setup.capabilities(this.binary));
      await wd.getSession();
    } catch (e) {
      throw new Error(`${setup.name}: cannot start a browser session: ${e.message}\n${this.output().slice(-3000)}`);
    }
    await wd.manage().setTimeouts({ script: 120_000, pageLoad: 30_000, implicit: 0 });
    const browser = new Browser(this.engine, wd);
    const first = await wd.getWindowHandle();
    browser.current = first;
    browser.blank = new Tab(browser, first);
    if (this.engine !== "chromium") await wd.manage().window().setRect({ width: 1280, height: 900 }).catch(() => {});
    return browser;
  }

  async stop() {
    if (this.proc.exitCode !== null || this.proc.signalCode !== null) return;
    const exited = new Promise((r) => this.proc.once("exit", r));
    killGroup(this.proc, "SIGTERM");
    const timer = setTimeout(() => killGroup(this.proc, "SIGKILL"), 5000);
    await exited;
    clearTimeout(timer);
  }
}

/** One browser session, with its windows ("tabs": each a top-level window, all visible). */
export class Browser {
  constructor(engine, wd) {
    this.engine = engine;
    this.wd = wd;
    this.tabs = [];
    this.offline = false;
    this.current = null;
    this.blank = null;
  }

  /**
   * Open `url` in a window: the session's first window the first time, a new
   * window afterwards (a window, not a background tab: background tabs are
   * hidden, and browsers throttle or freeze hidden pages). Collects the
   * page's uncaught errors on `tab.problems`.
   */
  async open(url) {
    let tab;
    if (this.blank) {
      tab = this.blank;
      this.blank = null;
    } else {
      await this.wd.switchTo().newWindow("window");
      tab = new Tab(this, await this.wd.getWindowHandle());
      this.current = tab.handle;
    }
    this.tabs.push(tab);
    if (this.engine === "chromium" && this.offline) await tab.emulateOffline(true);
    await tab.goto(url);
    return tab;
  }

  /**
   * The engine's own offline signal in every open tab (the network itself is
   * the proxy's to cut): Chromium's CDP network emulation (`navigator.onLine`
   * and the events are the browser's own); elsewhere the page's
   * `navigator.onLine` is overridden and the event dispatched. A page loaded
   * later starts online in Firefox and WebKit: `Tab.goto`/`reload` re-apply it.
   */
  async setOffline(offline) {
    this.offline = offline;
    for (const tab of this.tabs) if (!tab.closed) await tab.emulateOffline(offline);
  }

  async quit() {
    for (const tab of this.tabs) tab.cdpSocket?.close();
    await this.wd.quit().catch(() => {});
  }
}

/**
 * The script that stands in for an offline signal in Firefox and WebKit, run
 * in the page's own realm (`inPage`). Its state lives in the DOM, which every
 * script context shares.
 */
function pageOffline(offline) {
  const root = document.documentElement;
  if (!root.dataset.e2eOnline) {
    const real = Object.getOwnPropertyDescriptor(Navigator.prototype, "onLine").get;
    Object.defineProperty(Navigator.prototype, "onLine", {
      configurable: true,
      get() { return document.documentElement.dataset.e2eOnline === "false" ? false : real.call(this); },
    });
  }
  const was = root.dataset.e2eOnline === "false";
  root.dataset.e2eOnline = String(!offline);
  if (was !== offline) dispatchEvent(new Event(offline ? "offline" : "online"));
}

/** Collects the page's uncaught errors and rejections, in the DOM (re-installed after each load). */
function watchProblems() {
  const root = document.documentElement;
  if (root.dataset.e2eProblems) return;
  root.dataset.e2eProblems = "[]";
  const note = (p) => { root.dataset.e2eProblems = JSON.stringify([...JSON.parse(root.dataset.e2eProblems), p]); };
  addEventListener("error", (e) => note(`pageerror: ${e.message}`));
  addEventListener("unhandledrejection", (e) => note(`unhandledrejection: ${e.reason?.message ?? e.reason}`));
}

/**
 * Run `fn(arg)` in the page's own realm, through a script element. A
 * WebDriver script may run elsewhere (Firefox runs it in a sandbox whose
 * globals the page never sees); a script element runs as the page's own code.
 */
function inPageScript(source) {
  const script = document.createElement("script");
  script.textContent = source;
  document.documentElement.append(script);
  script.remove();
}

export class Tab {
  constructor(browser, handle) {
    this.browser = browser;
    this.handle = handle;
    this.problems = [];
    this.closed = false;
    this.cdpSocket = null;
  }

  get wd() {
    return this.browser.wd;
  }

  /** Make this the window WebDriver commands go to. */
  async focus() {
    if (this.closed) throw new Error("this tab is closed");
    if (this.browser.current !== this.handle) {
      await this.wd.switchTo().window(this.handle);
      this.browser.current = this.handle;
    }
    return this.wd;
  }

  async afterLoad() {
    await this.inPage(watchProblems);
    if (this.browser.offline && this.browser.engine !== "chromium") await this.inPage(pageOffline, true);
  }

  /** Run `fn(arg)` (`arg` JSON) as the page's own code; returns nothing. */
  async inPage(fn, arg) {
    await this.eval(inPageScript, `(${fn})(${JSON.stringify(arg ?? null)});`);
  }

  async goto(url) {
    await (await this.focus()).get(url);
    await this.afterLoad();
  }

  /**
   * Reload as a user does (F5), with `location.reload()`: a navigation the
   * service worker answers. (WebDriver's own refresh command does not go
   * through the service worker when the network fails in every engine.)
   */
  async reload() {
    const wd = await this.focus();
    // The old document carries a mark; the reload is done when a complete document has none.
    await wd.executeScript(() => { document.documentElement.dataset.e2eOld = "true"; });
    await wd.executeScript(() => setTimeout(() => location.reload(), 0));
    const deadline = Date.now() + 30_000;
    for (;;) {
      const done = await wd.executeScript(() => document.readyState === "complete" && !document.documentElement.dataset.e2eOld)
        .catch(() => false);
      if (done) break;
      if (Date.now() > deadline) throw new Error("the reload did not complete within 30 s");
      await new Promise((r) => setTimeout(r, 100));
    }
    await this.afterLoad();
  }

  /** Run `fn(...args)` in the page; a returned promise is awaited. */
  async eval(fn, ...args) {
    return (await this.focus()).executeScript(fn, ...args);
  }

  /** The page's collected problems, merged into `this.problems`. */
  async collectProblems() {
    if (this.closed) return this.problems;
    const found = await this.eval(() => JSON.parse(document.documentElement.dataset.e2eProblems ?? "[]")).catch(() => []);
    for (const p of found) if (!this.problems.includes(p)) this.problems.push(p);
    return this.problems;
  }

  async find(css) {
    return (await this.focus()).findElement(By.css(css));
  }

  async url() {
    return (await this.focus()).getCurrentUrl();
  }

  /**
   * Show the window again as a user going back to it does: minimized, then
   * restored (the page sees `visibilitychange` to hidden, then to visible).
   */
  async show() {
    const window = (await this.focus()).manage().window();
    await window.minimize();
    await window.setRect({ width: 1280, height: 900 });
  }

  /** A PNG of the window's viewport. */
  async screenshot() {
    return Buffer.from(await (await this.focus()).takeScreenshot(), "base64");
  }

  async close() {
    await this.focus();
    this.cdpSocket?.close();
    await this.wd.close();
    this.closed = true;
    const rest = this.browser.tabs.filter((t) => !t.closed);
    this.browser.current = null;
    if (rest.length > 0) await rest[0].focus();
  }

  async emulateOffline(offline) {
    if (this.browser.engine === "chromium") {
      await this.cdp("Network.enable");
      await this.cdp("Network.emulateNetworkConditions",
        { offline, latency: 0, downloadThroughput: -1, uploadThroughput: -1 });
    } else {
      await this.inPage(pageOffline, offline);
    }
  }

  /**
   * Send a DevTools command to this tab (Chromium only) over the harness's
   * own connection to it, kept open for the tab's life (emulations last as
   * long as the connection that set them).
   */
  async cdp(method, params = {}) {
    if (this.browser.engine !== "chromium") throw new Error(`CDP (${method}) exists in Chromium only`);
    if (!this.cdpSocket) this.cdpSocket = await this.connectCdp();
    const socket = this.cdpSocket;
    const id = ++socket.lastId;
    return new Promise((resolve, reject) => {
      socket.pending.set(id, { resolve, reject, method });
      socket.send(JSON.stringify({ id, method, params }));
    });
  }

  async connectCdp() {
    const caps = await this.wd.getCapabilities();
    const address = caps.get("goog:chromeOptions")?.debuggerAddress;
    if (!address) throw new Error("chromedriver did not report the browser's debuggerAddress");
    const targets = await (await fetch(`http://${address}/json/list`)).json();
    const target = targets.find((t) => t.type === "page" && t.id.toUpperCase() === this.handle.replace(/^CDwindow-/, "").toUpperCase());
    if (!target) throw new Error(`no DevTools target for window ${this.handle}: ${JSON.stringify(targets.map((t) => t.id))}`);
    const socket = new WebSocket(target.webSocketDebuggerUrl, { perMessageDeflate: false });
    socket.lastId = 0;
    socket.pending = new Map();
    socket.on("message", (data) => {
      const msg = JSON.parse(data);
      const waiter = msg.id && socket.pending.get(msg.id);
      if (!waiter) return;
      socket.pending.delete(msg.id);
      if (msg.error) waiter.reject(new Error(`${waiter.method}: ${msg.error.message}`));
      else waiter.resolve(msg.result);
    });
    socket.on("close", () => {
      for (const w of socket.pending.values()) w.reject(new Error(`${w.method}: DevTools connection closed`));
      socket.pending.clear();
    });
    await new Promise((resolve, reject) => socket.once("open", resolve).once("error", reject));
    return socket;
  }
}
