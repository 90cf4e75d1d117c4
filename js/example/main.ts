// The npm README's quick start, type-checked by scripts/test-browser
// (`tsc --noEmit -p js/example/tsconfig.json`) against the built package.
import { Outbox, createOutboxStores, OUTBOX_STORES, type OutboxStatus, type FlushReport, type FlushSkipped } from "edge-outbox";

interface Todo { id: string; title: string; done: boolean }

declare function getToken(refresh: boolean): Promise<string>;

export async function quickStart(): Promise<void> {
  const outbox = await Outbox.open({
    database: "todos",
    stores: { todos: { keyPath: "id", indexes: { byDone: { keyPath: "done" } } } },
    endpoint: "/v1/events",
    durability: "relaxed",
    headers: async ({ refresh }) => ({ authorization: `Bearer ${await getToken(refresh)}` }),
  });

  const todo: Todo = { id: crypto.randomUUID(), title: "milk", done: false };
  const eventId: string = await outbox.transaction(["todos"], (tx) => {
    tx.put("todos", todo);
    return tx.enqueue("TodoCreated", todo, { key: todo.id });
  });
  console.log("enqueued", eventId);

  outbox.addEventListener("status", (e) => {
    const s: OutboxStatus = e.detail;
    console.log(`${s.pending} pending, online: ${s.online}`, s.lastError);
  });

  const report: FlushReport = await outbox.flush();
  const skipped: FlushSkipped | null = report.skipped;
  if (report.skipped === "offline") console.log(`offline: ${report.pending} waiting`);
  else if (skipped === null) console.log(report.sent, report.pending);
  for (const dead of await outbox.deadLetters()) {
    console.log(dead.id, dead.lastError);
    await outbox.retry(dead.id);
  }
  await outbox.pruneSent(7 * 24 * 3600 * 1000);
  try {
    await outbox.enqueue("Bad", { n: 10n });
  } catch (e) {
    if (e instanceof Error && e.name === "InvalidEventError") console.log("refused:", e.message);
  }
  await outbox.close();
}

export function upgrade(db: IDBDatabase, tx: IDBTransaction, outbox: Outbox, order: { id: string }): void {
  createOutboxStores(db, tx);
  const write = db.transaction(["orders", ...OUTBOX_STORES], "readwrite");
  write.objectStore("orders").put(order);
  outbox.enqueueIn(write, "OrderCreated", order, { key: order.id });
}
