// The app shell's service worker: it lets the app load, and reload, with no
// network at all (an offline-first app that cannot start offline is not one).
//
// Network first, cache as the fallback: online, every load gets the newest
// build (no stale app during development); offline, the cached shell. The
// sync API (/v1/), the server's test controls and health check are never
// touched: the outbox must see the real network, or lack of it.
//
// build.mjs replaces the two placeholders: the build's version (a new build
// is a new worker, which drops the old cache) and the list of files to cache
// at install, so the first visit already makes the app work offline.

const VERSION = "__BUILD_VERSION__";
const PRECACHE = __PRECACHE_FILES__;
const CACHE = `edge-outbox-demo-${VERSION}`;
/// A navigation that hangs this long on a bad network falls back to the cache.
const NETWORK_TIMEOUT_MS = 4000;

self.addEventListener("install", (event) => {
  event.waitUntil((async () => {
    const cache = await caches.open(CACHE);
    // `no-store`: the precache must be this build's files, not the HTTP cache's.
    await cache.addAll(PRECACHE.map((path) => new Request(path, { cache: "no-store" })));
    await self.skipWaiting();
  })());
});

self.addEventListener("activate", (event) => {
  event.waitUntil((async () => {
    for (const name of await caches.keys()) {
      if (name.startsWith("edge-outbox-demo-") && name !== CACHE) await caches.delete(name);
    }
    await self.clients.claim();
  })());
});

self.addEventListener("fetch", (event) => {
  const request = event.request;
  const url = new URL(request.url);
  if (request.method !== "GET" || url.origin !== self.location.origin) return;
  if (url.pathname.startsWith("/v1/") || url.pathname.startsWith("/__test/") || url.pathname === "/healthz") return;
  event.respondWith(networkFirst(request));
});

async function networkFirst(request) {
  const cache = await caches.open(CACHE);
  try {
    const response = await withTimeout(fetch(request), NETWORK_TIMEOUT_MS);
    if (response.ok) await cache.put(request, response.clone());
    return response;
  } catch (error) {
    const cached = await cache.match(request, { ignoreSearch: true });
    if (cached) return cached;
    throw error;
  }
}

function withTimeout(promise, ms) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no answer within ${ms} ms`)), ms);
    promise.then(
      (value) => { clearTimeout(timer); resolve(value); },
      (error) => { clearTimeout(timer); reject(error); },
    );
  });
}
