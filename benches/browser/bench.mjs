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
const rounds = Number(process.env.ROUNDS ?? 6);
const perRound = Number(process.env.PER_ROUND ?? 200);
const types = { ".html": "text/html", ".js": "text/javascript", ".wasm": "application/wasm", ".json": "application/json" };

const server = http.createServer((req, res) => {
  const url = new URL(req.url, "http://x");
  const file = url.pathname === "/" ? path.join(root, "benches/browser/page.html") : path.join(root, url.pathname);
  if (!file.startsWith(root) || !fs.existsSync(file) || fs.statSync(file).isDirectory()) {
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
    rows.push({ durability, outboxRate, rawRate, ratio: rawRate / outboxRate, pending: r.pending });
  }
  const version = await context.browser()?.version?.() ?? "chromium";
  console.log(`Chromium ${version}, ${rounds} rounds x ${perRound} commits per side, median round`);
  console.log("| durability | raw IndexedDB (commits/s) | outbox.transaction (commits/s) | time ratio outbox/raw |");
  console.log("|---|---|---|---|");
  for (const row of rows) {
    console.log(`| ${row.durability} | ${row.rawRate.toFixed(0)} | ${row.outboxRate.toFixed(0)} | ${row.ratio.toFixed(2)} |`);
  }
  const expected = (rounds * perRound + 50);
  for (const row of rows) {
    if (row.pending !== expected) throw new Error(`expected ${expected} pending events, found ${row.pending}`);
  }
} finally {
  await context.close();
  server.close();
}
