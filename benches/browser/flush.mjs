// Scripted Chromium benchmark: flush throughput to the reference server on
// loopback, the same N events in the same browser, rotated rounds, median
// round, three sides:
// - edge-outbox: outbox.flush(), batches of BATCH;
// - the bare baseline a user would write: a loop of fetch POSTing the same
//   batches, serialized beforehand, from the same page to the same endpoint;
// - Workbox Background Sync: Queue.replayRequests(), one request per event.
// Then one more outbox flush with its IndexedDB transactions and fetches
// recorded, to show where its time goes.
// Run (repository root):
//   scripts/build-pkg && cargo build --release -p edge-outbox-server \
//     && (cd benches/browser && npm install && node flush.mjs)
//   N=1000 ROUNDS=5 BATCH=100 by default; PKG_DIR=<a built package> (default pkg/);
//   SIDES=outbox,fetch leaves Workbox out (quicker, to compare changes);
//   SIDES=outbox,fetch,handjs adds the pipelined floor: the outbox's own
//   IndexedDB transactions and push, written by hand in JS (no wasm);
//   handjs1 the same with the settle and the next claim in one transaction;
//   PROFILE=1 adds a CPU profile of one more outbox flush: self time per
//   function, per batch (wasm functions are named only in a build that keeps
//   its name section)
// The page, its service worker and pkg/ are served by the reference server
// itself (--static-dir), so both sides talk to a same-origin endpoint: no
// CORS preflight on either side.
import { spawn } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import * as esbuild from "esbuild";
import { launchChromium } from "./chromium.mjs";

const here = path.dirname(fileURLToPath(import.meta.url));
const root = path.resolve(here, "../..");
const n = Number(process.env.N ?? 1000);
const rounds = Number(process.env.ROUNDS ?? 5);
const batch = Number(process.env.BATCH ?? 100);
const pkgDir = path.resolve(process.env.PKG_DIR ?? path.join(root, "pkg"));
const serverBin = process.env.EDGE_OUTBOX_SERVER ?? path.join(root, "target/release/edge-outbox-server");
const die = (msg) => { console.error(`flush benchmark: ERROR: ${msg}`); process.exit(1); };
if (!fs.existsSync(serverBin)) die(`${serverBin} is missing: cargo build --release -p edge-outbox-server`);
if (!fs.existsSync(path.join(pkgDir, "index.js"))) die(`${pkgDir} is missing: scripts/build-pkg`);

// ---- the site: page + bundled service worker + the npm package -------------
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), "edge-outbox-flush-"));
const site = path.join(tmp, "site");
fs.mkdirSync(path.join(site, "pkg"), { recursive: true });
fs.copyFileSync(path.join(here, "flush-page.html"), path.join(site, "index.html"));
fs.cpSync(pkgDir, path.join(site, "pkg"), { recursive: true });
await esbuild.build({
  entryPoints: [path.join(here, "flush-sw.js")], bundle: true, format: "iife", minify: false,
  define: { "process.env.NODE_ENV": '"production"' }, outfile: path.join(site, "sw.js"), logLevel: "warning",
});

// ---- the reference server (release build: its per-request cost is what Workbox pays per event)
const server = spawn(serverBin, ["--listen", "127.0.0.1:0", "--allow-anonymous", "--database", path.join(tmp, "server.db"),
                                 "--static-dir", site], { stdio: ["ignore", "pipe", "pipe"] });
let serverErr = "";
server.stderr.on("data", (d) => { serverErr += d; });
const origin = await new Promise((resolve, reject) => {
  let out = "";
  const timer = setTimeout(() => reject(new Error(`the server did not start: ${out} ${serverErr}`)), 15000);
  server.stdout.on("data", (d) => {
    out += d;
    const m = out.match(/http:\/\/127\.0\.0\.1:\d+/);
    if (m) { clearTimeout(timer); resolve(m[0]); }
  });
  server.on("exit", (code) => reject(new Error(`the server exited (${code}): ${serverErr}`)));
}).catch((e) => die(e.message));

/** Event ids the server holds for `clientId`, in arrival order (paged). */
async function received(clientId) {
  const ids = [];
  let after = 0;
  for (;;) {
    const r = await fetch(`${origin}/v1/events?after=${after}&limit=1000&client_id=${clientId}`);
    if (!r.ok) throw new Error(`GET /v1/events: ${r.status} ${await r.text()}`);
    const page = await r.json();
    ids.push(...page.events.map((e) => e.id));
    if (page.events.length === 0 || page.next_cursor == null) return ids;
    after = page.next_cursor;
  }
}

/**
 * Where the profiled flush's time went: each instant of it is charged to the
 * first of these that was under way then: a fetch (network and server), a
 * claim transaction, a settle transaction, a read-only transaction (counts),
 * or none of them (wasm and JS on the main thread between requests).
 */
function profileSplit({ ms, spans, sent }) {
  const order = ["fetch", "claim", "settle", "read"];
  const edges = [...new Set([0, ms, ...spans.flatMap((s) => [s.start, s.end])])]
    .filter((t) => t >= 0 && t <= ms).sort((a, b) => a - b);
  const total = Object.fromEntries([...order, "none"].map((k) => [k, 0]));
  for (let i = 0; i + 1 < edges.length; i++) {
    const [a, b] = [edges[i], edges[i + 1]];
    const mid = (a + b) / 2;
    const on = new Set(spans.filter((s) => s.start <= mid && s.end >= mid).map((s) => s.kind));
    total[order.find((k) => on.has(k)) ?? "none"] += b - a;
  }
  const count = (k) => spans.filter((s) => s.kind === k).length;
  const busy = (k) => spans.filter((s) => s.kind === k).reduce((t, s) => t + s.end - s.start, 0);
  const batches = sent / batch;
  const lines = [`profiled flush: ${ms.toFixed(0)} ms for ${sent} events (${batches} batches), per batch:`,
    "| span | count | open (ms per batch) | charged (ms per batch, first of fetch > claim > settle > read) |",
    "|---|---|---|---|"];
  for (const k of order) {
    lines.push(`| ${k} | ${count(k)} | ${(busy(k) / batches).toFixed(2)} | ${(total[k] / batches).toFixed(2)} |`);
  }
  lines.push(`| none (main thread between requests) | | | ${(total.none / batches).toFixed(2)} |`);
  return lines.join("\n");
}

const context = await launchChromium("edge-outbox-flush-chromium-");
try {
  const page = await context.newPage();
  page.on("pageerror", (e) => console.error("page error:", e));
  await page.goto(origin + "/");
  await page.waitForFunction(() => window.benchReady === true);
  await page.evaluate(() => window.setUp());
  // Warm-up of both sides (JIT, wasm, IndexedDB files, connections).
  await page.evaluate((o) => window.runOutbox(o), { n: 100, batch, tag: "warm" });
  await page.evaluate((o) => window.runFetch(o), { n: 100, batch });
  const warm = await page.evaluate((o) => window.runWorkbox(o), { n: 20, tag: "warm" });
  if (!warm.ok) throw new Error(`Workbox warm-up failed: ${warm.error}`);

  const outboxRates = [];
  const fetchRates = [];
  const workboxRates = [];
  const queueRates = [];
  const handRates = [];
  const hand1Rates = [];
  const run = {
    async outbox(r) {
      const res = await page.evaluate((o) => window.runOutbox(o), { n, batch, tag: `r${r}` });
      if (res.sent !== n) throw new Error(`outbox sent ${res.sent} of ${n}: ${JSON.stringify(res.report)}`);
      const ids = await received(res.clientId);
      if (ids.length !== n || new Set(ids).size !== n) throw new Error(`server holds ${ids.length} outbox events, expected ${n}`);
      outboxRates.push((n * 1000) / res.ms);
    },
    async fetch() {
      const res = await page.evaluate((o) => window.runFetch(o), { n, batch });
      if (res.sent !== n) throw new Error(`the fetch loop had ${res.sent} of ${n} events accepted`);
      const ids = await received(res.clientId);
      if (ids.length !== n || new Set(ids).size !== n) throw new Error(`server holds ${ids.length} fetch-loop events, expected ${n}`);
      fetchRates.push((n * 1000) / res.ms);
    },
    async handjs(r) {
      const res = await page.evaluate((o) => window.runHandJs(o), { n, batch, tag: `r${r}` });
      if (res.sent !== n) throw new Error(`the hand-written pipeline sent ${res.sent} of ${n}`);
      const ids = await received(res.clientId);
      if (ids.length !== n || new Set(ids).size !== n) throw new Error(`server holds ${ids.length} hand-written events, expected ${n}`);
      handRates.push((n * 1000) / res.ms);
    },
    async handjs1(r) {
      const res = await page.evaluate((o) => window.runHandJs(o), { n, batch, tag: `one${r}`, oneTx: true });
      if (res.sent !== n) throw new Error(`the one-transaction pipeline sent ${res.sent} of ${n}`);
      const ids = await received(res.clientId);
      if (ids.length !== n || new Set(ids).size !== n) throw new Error(`server holds ${ids.length} one-transaction events, expected ${n}`);
      hand1Rates.push((n * 1000) / res.ms);
    },
    async workbox(r) {
      const res = await page.evaluate((o) => window.runWorkbox(o), { n, tag: `r${r}` });
      if (!res.ok) throw new Error(`Workbox failed: ${res.error}`);
      if (res.left !== 0) throw new Error(`Workbox left ${res.left} requests queued`);
      const ids = await received(res.clientId);
      if (ids.length !== n || new Set(ids).size !== n) throw new Error(`server holds ${ids.length} Workbox events, expected ${n}`);
      workboxRates.push((n * 1000) / res.replayMs);
      queueRates.push((n * 1000) / res.queueMs);
    },
  };
  const sides = (process.env.SIDES ?? "outbox,fetch,workbox").split(",");
  if (!sides.includes("outbox") || !sides.includes("fetch")) die("SIDES must include outbox and fetch");
  for (let r = 0; r < rounds; r++) {
    // Rotate which side goes first, so drift hits every side alike.
    const order = sides.map((_, i) => sides[(i + r) % sides.length]);
    for (const side of order) await run[side](r);
    console.error(`round ${r + 1}/${rounds}: outbox ${outboxRates.at(-1).toFixed(0)}, fetch loop ${fetchRates.at(-1).toFixed(0)}, `
      + `Workbox replay ${workboxRates.at(-1)?.toFixed(0) ?? "-"}, hand-written pipeline ${handRates.at(-1)?.toFixed(0) ?? "-"} events/s`);
  }

  // One more outbox flush, profiled: where its time goes.
  const prof = await page.evaluate((o) => window.runOutbox(o), { n, batch, tag: "profile", profile: true });
  if (prof.sent !== n) throw new Error(`profiled outbox sent ${prof.sent} of ${n}`);

  if (process.env.PROFILE === "1") {
    const cdp = await context.newCDPSession(page);
    await cdp.send("Profiler.enable");
    await cdp.send("Profiler.setSamplingInterval", { interval: 50 });
    // The page brackets the timed flush alone with console.profile().
    const finished = new Promise((resolve) => cdp.once("Profiler.consoleProfileFinished", resolve));
    const res = await page.evaluate((o) => window.runOutbox(o), { n, batch, tag: "cpu", cpu: true });
    const { profile: p } = await finished;
    if (res.sent !== n) throw new Error(`CPU-profiled outbox sent ${res.sent} of ${n}`);
    // Self time per function: samples are node ids, timeDeltas in µs;
    // "(idle)" and "(program)" are the main thread waiting or in the browser.
    const byId = new Map(p.nodes.map((x) => [x.id, x]));
    const self = new Map();
    p.samples.forEach((id, i) => {
      const f = byId.get(id).callFrame;
      const name = `${f.functionName || "(anonymous)"} ${f.url ? path.basename(f.url) : ""}`.trim();
      self.set(name, (self.get(name) ?? 0) + (p.timeDeltas[i] ?? 0));
    });
    const batches = n / batch;
    console.log(`CPU profile of one outbox flush (${n} events, ${res.ms.toFixed(0)} ms); self ms per batch of ${batch}, top 25:`);
    for (const [name, us] of [...self].sort((a, b) => b[1] - a[1]).slice(0, 25)) {
      console.log(`  ${(us / 1000 / batches).toFixed(3).padStart(7)} ms  ${name}`);
    }
  }

  // The floor: the same transactions by hand in JS, no network (3 runs each).
  const floors = { watermark: [], perRecord: [] };
  for (let r = 0; r < 3; r++) {
    for (const perRecord of [false, true]) {
      const f = await page.evaluate((o) => window.runFloor(o), { n, batch, tag: `f${r}-${perRecord}`, perRecord });
      floors[perRecord ? "perRecord" : "watermark"].push(f);
    }
  }

  const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
  const range = (xs) => `${Math.min(...xs).toFixed(2)}–${Math.max(...xs).toFixed(2)}`;
  const version = context.browser()?.version?.() ?? "unknown";
  const o = median(outboxRates);
  const f = median(fetchRates);
  const w = workboxRates.length ? median(workboxRates) : NaN;
  const fmt = (xs) => xs.map((x) => x.toFixed(0)).join(", ");
  console.log(`Chromium ${version}, N=${n} events per side per round, ${rounds} rounds, batches of ${batch}, median round`);
  console.log("| side | events/s (median) | all rounds |");
  console.log("|---|---|---|");
  console.log(`| edge-outbox \`flush()\` | ${o.toFixed(0)} | ${fmt(outboxRates)} |`);
  console.log(`| bare \`fetch\` loop, same batches pre-serialized | ${f.toFixed(0)} | ${fmt(fetchRates)} |`);
  if (workboxRates.length) {
    console.log(`| Workbox \`replayRequests()\` | ${w.toFixed(0)} | ${fmt(workboxRates)} |`);
    console.log(`| (Workbox \`pushRequest\`, queueing, for reference) | ${median(queueRates).toFixed(0)} | ${fmt(queueRates)} |`);
  }
  // Per round: each round's sides ran back to back.
  const perRound = outboxRates.map((x, i) => x / fetchRates[i]);
  console.log(`ratio edge-outbox / bare fetch: ${(o / f).toFixed(2)} (per round: median ${median(perRound).toFixed(2)}, `
    + `range ${range(perRound)}; target >= 0.5)`);
  if (workboxRates.length) console.log(`ratio edge-outbox / Workbox: ${(o / w).toFixed(1)}x (target >= 20x)`);
  if (hand1Rates.length) {
    const h1 = median(hand1Rates);
    console.log(`| hand-written pipeline, settle + next claim in one transaction | ${h1.toFixed(0)} | ${fmt(hand1Rates)} |`);
    console.log(`ratio one-transaction pipeline / bare fetch: ${(h1 / f).toFixed(2)}; edge-outbox / it: ${(o / h1).toFixed(2)}`
      + (handRates.length ? `; it / two-transaction pipeline: ${(h1 / median(handRates)).toFixed(2)}` : ""));
  }
  if (handRates.length) {
    const h = median(handRates);
    const perRoundHand = handRates.map((x, i) => x / fetchRates[i]);
    console.log(`| hand-written pipeline (same IndexedDB transactions in JS, claim/settle during the push) | ${h.toFixed(0)} | ${fmt(handRates)} |`);
    console.log(`ratio hand-written pipeline / bare fetch: ${(h / f).toFixed(2)} (per round: median ${median(perRoundHand).toFixed(2)}, `
      + `range ${range(perRoundHand)}); edge-outbox / hand-written pipeline: ${(o / h).toFixed(2)}`);
  }
  console.log(profileSplit(prof));
  const ms = (xs, k) => `${median(xs.map((x) => x[k])).toFixed(2)} (${range(xs.map((x) => x[k]))})`;
  console.log(`floor, the same IndexedDB transactions by hand in JS, ms per batch of ${batch} (median of 3 runs, range):`);
  console.log("| transaction | ms per batch |");
  console.log("|---|---|");
  console.log(`| claim (lease get + put, watermark get, getAll on the status index) | ${ms(floors.watermark, "claimMs")} |`);
  console.log(`| settle by the watermark (watermark get, getAllKeys, 2 meta puts) | ${ms(floors.watermark, "settleMs")} |`);
  console.log(`| settle one put per event (getAll by seq range, ${batch} puts) | ${ms(floors.perRecord, "settleMs")} |`);
} finally {
  await context.close();
  server.kill();
  fs.rmSync(tmp, { recursive: true, force: true });
}
