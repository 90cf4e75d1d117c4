// A dedicated module Worker that uses the npm package the way an app would:
// open an outbox, commit app records + events in transactions, flush them to
// the reference server, then let the running relay deliver more. Posts a
// report back; js/test/worker.test.mjs checks it against the server.
import { Outbox } from "/pkg/index.js";

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function commit(outbox, from, to, perTx) {
  const ids = [];
  for (let start = from; start < to; start += perTx) {
    const batch = await outbox.transaction(["todos"], (tx) => {
      const out = [];
      for (let id = start; id < Math.min(start + perTx, to); id++) {
        tx.put("todos", { id, title: `todo ${id}` });
        out.push(tx.enqueue("TodoCreated", { id }, { key: `todo-${id}` }));
      }
      return out;
    });
    ids.push(...batch);
  }
  return ids;
}

async function drained(outbox, ms) {
  for (let waited = 0; waited < ms; waited += 100) {
    if ((await outbox.stats()).pending === 0) return true;
    await sleep(100);
  }
  return false;
}

self.onmessage = async ({ data: { server, database } }) => {
  try {
    // The point of the test: no `window` here, only the worker's globalThis.
    if (typeof window !== "undefined" || typeof WorkerGlobalScope === "undefined") {
      throw new Error("not running in a worker");
    }
    const outbox = await Outbox.open({
      database,
      stores: { todos: { keyPath: "id" } },
      endpoint: `${server}/v1/events`,
      durability: "relaxed",
      retry: { baseMs: 100, capMs: 500 },
      autoStart: false,
    });
    const statuses = [];
    outbox.addEventListener("status", (e) => statuses.push(e.detail));

    // 1. Relay stopped: commit, then an explicit flush delivers everything.
    const ids = await commit(outbox, 0, 30, 3);
    const flush = await outbox.flush();

    // 2. Relay running in the worker (Web Lock, commit wake-ups): more commits
    //    are delivered without any flush call.
    outbox.start();
    ids.push(...(await commit(outbox, 30, 50, 5)));
    const done = await drained(outbox, 15000);
    const stats = await outbox.stats();
    const status = outbox.status;
    const clientId = outbox.clientId;
    await outbox.close();
    postMessage({
      ok: true,
      clientId,
      ids,
      flush,
      drained: done,
      stats,
      leader: statuses.some((s) => s.leader),
      lastStatus: status,
    });
  } catch (e) {
    postMessage({ ok: false, error: `${e?.name}: ${e?.message}\n${e?.stack ?? ""}` });
  }
};
