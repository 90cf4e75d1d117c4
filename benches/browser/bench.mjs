// Scripted Chromium benchmark: commit of one app record + one event through
// outbox.transaction vs a raw IndexedDB transaction doing the same two writes,
// side by side in one page, for both durability modes.
// Run: scripts/build-pkg && (cd benches/browser && npm install && node bench.mjs)
import http from "node:http";
import fs from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { launchChromium } from "./chromium.mjs";

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");
// PKG_DIR: a built package to measure (default pkg/), e.g. a copy kept apart
// while pkg/ is rebuilt, or an older build to compare with.
const pkgDir = path.resolve(process.env.PKG_DIR ?? path.join(root, "pkg"));
if (!fs.existsSync(path.join(pkgDir, "index.js"))) throw new Error(`${pkgDir} is missing: scripts/build-pkg`);
// PROFILE=1: after the rounds, a CPU profile of PER_ROUND relaxed commits per
// side (Chrome DevTools protocol), self time by function.
const profile = process.env.PROFILE === "1";
const rounds = Number(process.env.ROUNDS ?? 15);
const perRound = Number(process.env.PER_ROUND ?? 200);
const types = { ".html": "text/html", ".js": "text/javascript", ".wasm": "application/wasm", ".json": "application/json" };

const server = http.createServer((req, res) => {
  const url = new URL(req.url, "http://x");
  const file = url.pathname === "/" ? path.join(root, "benches/browser/page.html")
    : url.pathname.startsWith("/pkg/") ? path.join(pkgDir, url.pathname.slice(5))
    : path.join(root, url.pathname);
  if (!(file.startsWith(root) || file.startsWith(pkgDir)) || !fs.existsSync(file) || fs.statSync(file).isDirectory()) {
    res.writeHead(404).end();
    return;
  }
  res.writeHead(200, { "content-type": types[path.extname(file)] ?? "application/octet-stream" });
  fs.createReadStream(file).pipe(res);
});
await new Promise((r) => server.listen(0, "127.0.0.1", r));
const origin = `http://127.0.0.1:${server.address().port}`;

const context = await launchChromium("edge-outbox-bench-");
try {
  const page = await context.newPage();
  page.on("pageerror", (e) => console.error("page error:", e));
  await page.goto(origin + "/");
  await page.waitForFunction(() => window.benchReady === true);
  const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
  const rows = [];
  for (const durability of ["relaxed", "strict"]) {
    const r = await page.evaluate((o) => window.runBench(o), { rounds, perRound, durability });
    const rate = (ms) => (perRound * 1000) / ms;
    const outboxRate = median(r.outbox.map(rate));
    const rawRate = median(r.raw.map(rate));
    // Each round times both sides back to back: its ratio sees the same
    // machine load on both, so the per-round ratios show the noise.
    const ratios = r.outbox.map((ms, i) => ms / r.raw[i]);
    rows.push({ durability, outboxRate, rawRate, ratio: rawRate / outboxRate, ratios, pending: r.pending });
  }
  const version = await context.browser()?.version?.() ?? "chromium";
  console.log(`Chromium ${version}, ${rounds} rounds x ${perRound} commits per side, median round (${pkgDir})`);
  console.log("| durability | raw IndexedDB (commits/s) | outbox.transaction (commits/s) | time ratio outbox/raw | per-round ratio: median (range) |");
  console.log("|---|---|---|---|---|");
  for (const row of rows) {
    const lo = Math.min(...row.ratios), hi = Math.max(...row.ratios);
    console.log(`| ${row.durability} | ${row.rawRate.toFixed(0)} | ${row.outboxRate.toFixed(0)} | ${row.ratio.toFixed(2)} | ${median(row.ratios).toFixed(2)} (${lo.toFixed(2)}–${hi.toFixed(2)}) |`);
  }
  const expected = (rounds * perRound + 50);
  for (const row of rows) {
    if (row.pending !== expected) throw new Error(`expected ${expected} pending events, found ${row.pending}`);
  }
  if (profile) {
    const cdp = await context.newCDPSession(page);
    await cdp.send("Profiler.enable");
    await cdp.send("Profiler.setSamplingInterval", { interval: 50 });
    for (const side of ["outbox", "raw"]) {
      await cdp.send("Profiler.start");
      const ms = await page.evaluate((o) => window.runSide(o), { side, n: perRound, durability: "relaxed" });
      const { profile: p } = await cdp.send("Profiler.stop");
      // Self time per function: samples are node ids, timeDeltas in µs.
      const byId = new Map(p.nodes.map((n) => [n.id, n]));
      const self = new Map();
      p.samples.forEach((id, i) => {
        const f = byId.get(id).callFrame;
        const name = `${f.functionName || "(anonymous)"} ${f.url ? path.basename(f.url) : ""}`.trim();
        self.set(name, (self.get(name) ?? 0) + (p.timeDeltas[i] ?? 0));
      });
      const total = [...self.values()].reduce((a, b) => a + b, 0);
      console.log(`\nCPU profile, ${side}: ${perRound} relaxed commits in ${ms.toFixed(1)} ms (${(ms * 1000 / perRound).toFixed(0)} µs each); self time per commit, top 15:`);
      for (const [name, us] of [...self].sort((a, b) => b[1] - a[1]).slice(0, 15)) {
        console.log(`  ${(us / perRound).toFixed(1).padStart(7)} µs  ${(100 * us / total).toFixed(1).padStart(5)} %  ${name}`);
      }
    }
  }
} finally {
  await context.close();
  server.close();
}
