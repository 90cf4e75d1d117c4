#!/usr/bin/env python3
"""Write the seed corpus (fuzz/seeds/TARGET/) from docs/protocol.md's worked
examples: its push requests, answers, error bodies and pulled events, in each
target's input format (see the targets' docs). Re-run after the examples
change: python3 fuzz/seeds.py"""
import datetime, gzip, json, pathlib, re, shutil, struct, uuid, zlib

root = pathlib.Path(__file__).resolve().parent
doc = (root.parent / "docs" / "protocol.md").read_text()
blocks = {}
for kind, body in re.findall(r"<!-- schema: ([a-z-]+) -->\n```json\n(.*?)```", doc, re.S):
    blocks.setdefault(kind, []).append(json.loads(body))
pushes, answers = blocks["push-request"], blocks["push-response"]
errors, pulls = blocks["error"], blocks["pull-response"]
compact = lambda v: json.dumps(v, separators=(",", ":"), ensure_ascii=False).encode()

out = root / "seeds"
shutil.rmtree(out, ignore_errors=True)
def seed(target, name, data):
    d = out / target
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data)

push = pushes[0]
bad = json.loads(json.dumps(push))
bad["events"][1]["type"] = ""
surrogate = json.loads(json.dumps(push))
surrogate["events"][0]["payload"] = {"note": "cut emoji"}
v2 = dict(push, protocol=2)

# push: the example as written, compact, with a bad event, a lone surrogate,
# another version, cut short.
seed("push", "example", json.dumps(push, indent=2).encode())
seed("push", "compact", compact(push))
seed("push", "bad-event", compact(bad))
seed("push", "lone-surrogate", compact(surrogate).replace(b"cut emoji", b"\\ud83d cut"))
seed("push", "protocol-2", compact(v2))
seed("push", "cut-short", compact(push)[:90])

# gzip_body: flags, limit (u16 BE), frame size, data.
def gz(flags, limit, frame, data):
    return bytes([flags]) + struct.pack(">H", limit) + bytes([frame]) + data
body = compact(push)
seed("gzip_body", "gzipped-here-fits", gz(1, 4096, 0, body))
seed("gzip_body", "gzipped-here-over", gz(1 | 4, 100, 7, body))
seed("gzip_body", "gzip-stream", gz(2, 4096, 16, gzip.compress(body)))
seed("gzip_body", "gzip-two-members", gz(2, 1000, 0, gzip.compress(body[:50]) + gzip.compress(body[50:])))
seed("gzip_body", "plain", gz(4, 4096, 3, body))
seed("gzip_body", "bomb", gz(2, 1000, 0, gzip.compress(b"\0" * 20000)))

# answer: status, Retry-After, pushed events (digits name results), body.
def answer(status, retry_after, pushed, body):
    return f"{status}\n{retry_after}\n{pushed}\n".encode() + body
for i, a in enumerate(answers):
    n = len(a["results"])
    seed("answer", f"200-{i}-in-order", answer(200, "", "".join(map(str, range(n))), compact(a)))
    seed("answer", f"200-{i}-shuffled", answer(200, "", "".join(map(str, reversed(range(n)))) + "x", compact(a)))
for i, e in enumerate(errors):
    for status in (400, 401, 403, 413, 422):
        seed("answer", f"{status}-{i}", answer(status, "", "01", compact(e)))
seed("answer", "503-retry-after", answer(503, "120", "0", compact(errors[0])))
seed("answer", "429-http-date", answer(429, "Wed, 21 Oct 2015 07:28:00 GMT", "0", b""))
seed("answer", "502-proxy-page", answer(502, "", "0", b"<html><body>Bad Gateway</body></html>"))
seed("answer", "200-cut", answer(200, "", "0", b'{"results":[{"id":'))

# server_row: cursor, seq, id, client_id, type, key (~: NULL), created_at,
# received_at, headers, payload.
for p in pulls:
    for e in p["events"]:
        fields = [e["cursor"], e["seq"], e["id"], e["client_id"], e["type"],
                  e.get("key", "~"), e["created_at"], e["received_at"],
                  compact(e.get("headers", {})).decode(), compact(e["payload"]).decode()]
        seed("server_row", f"cursor-{e['cursor']}", "\n".join(map(str, fields)).encode())

# native_row: 13 typed columns (i integer, t text, x hex blob, n NULL).
def millis(t):
    return int(datetime.datetime.fromisoformat(t.replace("Z", "+00:00")).timestamp() * 1000)
for e in push["events"]:
    ms = millis(e["created_at"])
    cols = [f"i{e['seq']}", "x" + uuid.UUID(e["id"]).hex, "t" + e["type"],
            "t" + e["key"] if "key" in e else "n",
            "t" + compact(e["payload"]).decode(),
            "t" + compact(e["headers"]).decode() if "headers" in e else "n",
            f"i{ms}", "tpending", "i0", f"i{ms}", "n", "n", "n"]
    seed("native_row", f"seq-{e['seq']}", "\n".join(cols).encode())
    dead = cols[:7] + ["tdead", "i3", f"i{ms + 9000}", "tthe server answered 503", "n", f"i{ms + 60000}"]
    seed("native_row", f"seq-{e['seq']}-dead", "\n".join(dead).encode())
