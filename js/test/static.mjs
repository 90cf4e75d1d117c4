// A static file server for the package tests: /pkg/** from pkg/, /test/**
// from js/test/, on a loopback port (the pages are served from another
// origin than the reference server, which allows it with --cors-origin '*').
import fs from "node:fs";
import http from "node:http";
import path from "node:path";

const types = { ".html": "text/html", ".js": "text/javascript", ".wasm": "application/wasm", ".json": "application/json" };

export async function staticServer(root, testDir) {
  const dirs = { pkg: path.join(root, "pkg"), test: testDir };
  const srv = http.createServer((req, res) => {
    const [, top, ...rest] = new URL(req.url, "http://x").pathname.split("/");
    const base = dirs[top];
    const file = base && path.join(base, ...rest);
    if (!file || !file.startsWith(base) || !fs.existsSync(file) || fs.statSync(file).isDirectory()) {
      res.writeHead(404).end();
      return;
    }
    res.writeHead(200, { "content-type": types[path.extname(file)] ?? "application/octet-stream" });
    fs.createReadStream(file).pipe(res);
  });
  await new Promise((resolve) => srv.listen(0, "127.0.0.1", resolve));
  return srv;
}
