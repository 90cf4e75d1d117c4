// Service worker of the flush benchmark (bundled by flush.mjs with esbuild,
// NODE_ENV=production so Workbox's dev logging is compiled out). On a message
// it queues the page's events with Workbox Background Sync, one request per
// event as Workbox does (each a valid sync-protocol push of one event, so the
// server does the same work per event as for the outbox), then times
// `queue.replayRequests()` against the same endpoint.
import { Queue } from "workbox-background-sync";

self.addEventListener("install", () => self.skipWaiting());
self.addEventListener("activate", (e) => e.waitUntil(self.clients.claim()));

// UUIDv7, like the outbox's event ids (the protocol's idempotency key).
function uuidv7() {
  const b = crypto.getRandomValues(new Uint8Array(16));
  let ms = Date.now();
  for (let i = 5; i >= 0; i--) { b[i] = ms % 256; ms = Math.floor(ms / 256); }
  b[6] = (b[6] & 0x0f) | 0x70;
  b[8] = (b[8] & 0x3f) | 0x80;
  const h = [...b].map((x) => x.toString(16).padStart(2, "0")).join("");
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

self.addEventListener("message", (e) => {
  const port = e.ports[0];
  e.waitUntil((async () => {
    try {
      const { tag, endpoint, events } = e.data;
      // A no-op onSync: replay only when the benchmark says so (never at startup).
      const queue = new Queue(`bench-${tag}`, { forceSyncFallback: true, onSync: async () => {} });
      const clientId = crypto.randomUUID();
      const t0 = performance.now();
      for (let i = 0; i < events.length; i++) {
        const ev = events[i];
        const body = JSON.stringify({
          protocol: 1, client_id: clientId,
          events: [{ id: uuidv7(), seq: i + 1, type: ev.type, key: ev.key, payload: ev.payload,
                     headers: {}, created_at: new Date().toISOString() }],
        });
        await queue.pushRequest({
          request: new Request(endpoint, { method: "POST", headers: { "content-type": "application/json" }, body }),
        });
      }
      const t1 = performance.now();
      await queue.replayRequests();
      const t2 = performance.now();
      port.postMessage({ ok: true, clientId, queueMs: t1 - t0, replayMs: t2 - t1, left: await queue.size() });
    } catch (err) {
      port.postMessage({ ok: false, error: `${err?.name}: ${err?.message}` });
    }
  })());
});
