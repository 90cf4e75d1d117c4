// A module Worker that opens the same outbox as its page and runs its relay:
// it queues for the sender lock the page holds. Posts every status change to
// the page (js/test/close-mid-push.test.mjs).
import { Outbox } from "/pkg/index.js";

self.onmessage = async ({ data: { server, database } }) => {
  try {
    const outbox = await Outbox.open({
      database,
      stores: { todos: { keyPath: "id" } },
      endpoint: `${server}/v1/events`,
      retry: { baseMs: 100, capMs: 400 },
    });
    outbox.addEventListener("status", (e) => self.postMessage({ status: e.detail }));
    self.postMessage({ ready: true, status: outbox.status });
  } catch (e) {
    self.postMessage({ error: `${e.name}: ${e.message}` });
  }
};
