// The whole consumer app: what a user of the npm package writes, nothing
// more. It opens an outbox (which loads the .wasm the bundler emitted) and
// commits a record and an event in one transaction; the relay delivers the
// event by itself. The outcome goes into #result (and window.consumerResult)
// so the test in test/consumer.test.mjs reads an error instead of timing out
// on one.
import { Outbox } from "edge-outbox";

const output = document.getElementById("result");

function report(result) {
  window.consumerResult = result;
  output.dataset.state = result.ok ? "ok" : "error";
  output.textContent = JSON.stringify(result);
}

async function main() {
  output.textContent = "opening";
  const outbox = await Outbox.open({
    database: "consumer",
    stores: { notes: { keyPath: "id" } },
    endpoint: "/v1/events",
  });
  output.textContent = "committing";
  const note = { id: crypto.randomUUID(), text: "written by a bundled app" };
  await outbox.transaction(["notes"], (tx) => {
    tx.put("notes", note);
    tx.enqueue("NoteCreated", note, { key: note.id });
  });
  return { ok: true, clientId: outbox.clientId, note };
}

main().then(report, (e) => report({ ok: false, error: `${e?.name}: ${e?.message}` }));
