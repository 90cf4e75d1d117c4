#!/usr/bin/env node
// Builds the demo app into www/dist: plain ES modules, no bundler.
//
//   node build.mjs [--pkg DIR] [--out DIR]
//
// - copies src/ (the app) and the npm package (default: ../pkg, as built by
//   scripts/build-pkg) under vendor/edge-outbox/;
// - points index.html's import map at the entry module the package's own
//   package.json declares, so `import ... from "edge-outbox"` resolves the
//   way it would from node_modules;
// - stamps the service worker with this build's file list and a content
//   hash, so a new build replaces the old offline cache.
//
// No dependencies: it must run right after `npm ci` on a fresh machine.

import { createHash } from "node:crypto";
import { cpSync, existsSync, mkdirSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { dirname, join, relative, resolve, sep } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const args = process.argv.slice(2);
const arg = (name, fallback) => {
  const i = args.indexOf(name);
  return i >= 0 && args[i + 1] ? resolve(args[i + 1]) : fallback;
};
const pkgDir = arg("--pkg", resolve(here, "..", "pkg"));
const outDir = arg("--out", resolve(here, "dist"));
const srcDir = resolve(here, "src");

function fail(message) {
  console.error(`www/build.mjs: ${message}`);
  process.exit(1);
}

const pkgJsonPath = join(pkgDir, "package.json");
if (!existsSync(pkgJsonPath)) {
  fail(`no npm package at ${pkgDir} (missing package.json): run scripts/build-pkg first`);
}
const pkgJson = JSON.parse(readFileSync(pkgJsonPath, "utf8"));
if (pkgJson.name !== "edge-outbox") {
  fail(`${pkgJsonPath} is the package ${JSON.stringify(pkgJson.name)}, not "edge-outbox"`);
}

/** The ES module a browser should load for `import "edge-outbox"`. */
function entryOf(pkg) {
  const dot = pkg.exports?.["."] ?? pkg.exports;
  const fromExports = typeof dot === "string" ? dot : dot?.browser ?? dot?.import ?? dot?.default;
  const entry = (typeof fromExports === "string" ? fromExports : null) ?? pkg.module ?? pkg.browser ?? pkg.main;
  if (typeof entry !== "string") fail(`${pkgJsonPath} names no entry module (exports, module or main)`);
  return entry.replace(/^\.\//, "");
}
const entry = entryOf(pkgJson);
if (!existsSync(join(pkgDir, entry))) fail(`the package's entry ${entry} is missing from ${pkgDir}`);

rmSync(outDir, { recursive: true, force: true });
mkdirSync(outDir, { recursive: true });
cpSync(srcDir, outDir, { recursive: true });
const vendor = join(outDir, "vendor", "edge-outbox");
cpSync(pkgDir, vendor, {
  recursive: true,
  // A user's bundler ships the runtime files only; so does this build.
  filter: (path) => {
    const name = path.split(sep).pop();
    return !/\.(d\.ts|md)$/.test(name) && name !== "node_modules" && !(name.startsWith(".") && path !== pkgDir);
  },
});

const indexPath = join(outDir, "index.html");
writeFileSync(indexPath, readFileSync(indexPath, "utf8").replace("__ENTRY__", entry));

function walk(dir) {
  return readdirSync(dir).flatMap((name) => {
    const path = join(dir, name);
    return statSync(path).isDirectory() ? walk(path) : [path];
  });
}
const swPath = join(outDir, "sw.js");
const files = walk(outDir).filter((p) => p !== swPath).sort();
const hash = createHash("sha256");
for (const file of files) hash.update(relative(outDir, file)).update(readFileSync(file));
const version = hash.digest("hex").slice(0, 12);
const precache = ["./", ...files.map((p) => `./${relative(outDir, p).split(sep).join("/")}`)];
writeFileSync(swPath, readFileSync(swPath, "utf8")
  .replace("__BUILD_VERSION__", version)
  .replace("__PRECACHE_FILES__", JSON.stringify(precache, null, 2)));

console.log(`www/build.mjs: built ${outDir} (edge-outbox ${pkgJson.version}, entry ${entry}, build ${version}, ${files.length + 1} files)`);
