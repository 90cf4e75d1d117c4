// The network the browser sees, as a switch: an HTTP proxy on a loopback
// port in front of the reference server. The page is loaded from the proxy's
// address, so the app, its service worker and its pushes all go through it.
// `refuse()` closes the listening socket and drops every open connection:
// new connections are refused (ECONNREFUSED), which every engine reports as
// a network error, whatever its offline emulation can or cannot do (Firefox's
// offline mode lets 127.0.0.1 through; WebKitWebDriver has none).
// `accept()` listens again on the same port: the origin, and so the page's
// IndexedDB and service worker, stay the same.
//
// It can also add a script at the top of every HTML page it serves
// (`injectScript`): an init script that runs before the app's own, in every
// engine (WebDriver has no portable one).

import http from "node:http";

/** Start a proxy to `target` (e.g. `http://127.0.0.1:PORT`); resolves once it listens. */
export async function startProxy(target) {
  const proxy = new Proxy(new URL(target));
  await proxy.accept();
  return proxy;
}

class Proxy {
  constructor(upstream) {
    this.upstream = upstream;
    this.port = 0;
    this.server = null;
    this.sockets = new Set();
    this.script = null;
  }

  /** The address pages are loaded from. */
  get url() {
    return `http://127.0.0.1:${this.port}`;
  }

  /** Whether connections are accepted now. */
  get accepting() {
    return this.server !== null;
  }

  /** Run `source` (a script's text) at the top of every HTML page from now on; `null` stops. */
  injectScript(source) {
    this.script = source;
  }

  /** Listen (again, on the same port once it has one). Throws if the port was taken meanwhile. */
  async accept() {
    if (this.server) return;
    const server = http.createServer((req, res) => this.forward(req, res));
    server.keepAliveTimeout = 5000;
    server.on("connection", (socket) => {
      this.sockets.add(socket);
      socket.once("close", () => this.sockets.delete(socket));
    });
    await new Promise((resolve, reject) => {
      server.once("error", (e) => reject(new Error(`proxy cannot listen on 127.0.0.1:${this.port}: ${e.message}`)));
      server.listen(this.port, "127.0.0.1", resolve);
    });
    this.port = server.address().port;
    this.server = server;
  }

  /** Refuse new connections and cut the open ones (requests in flight fail as network errors). */
  async refuse() {
    const server = this.server;
    if (!server) return;
    this.server = null;
    const closed = new Promise((resolve) => server.close(resolve));
    for (const socket of this.sockets) socket.destroy();
    this.sockets.clear();
    await closed;
  }

  async stop() {
    await this.refuse();
  }

  forward(req, res) {
    const inject = this.script !== null && req.method === "GET" && /text\/html/.test(req.headers.accept ?? "");
    const headers = { ...req.headers };
    // An HTML page to rewrite must come uncompressed.
    if (inject) delete headers["accept-encoding"];
    const upstream = http.request({
      host: this.upstream.hostname,
      port: this.upstream.port,
      method: req.method,
      path: req.url,
      headers,
    }, (answer) => {
      if (inject && /text\/html/.test(answer.headers["content-type"] ?? "")) {
        const chunks = [];
        answer.on("data", (c) => chunks.push(c));
        answer.on("end", () => {
          const html = Buffer.concat(chunks).toString("utf8");
          const tag = `<script>${this.script}</script>`;
          const body = /<head[^>]*>/i.test(html) ? html.replace(/<head[^>]*>/i, (m) => m + tag) : tag + html;
          const out = { ...answer.headers, "content-length": Buffer.byteLength(body) };
          delete out.etag;
          delete out["transfer-encoding"];
          res.writeHead(answer.statusCode, out);
          res.end(body);
        });
        return;
      }
      res.writeHead(answer.statusCode, answer.headers);
      answer.pipe(res);
    });
    upstream.on("error", () => res.destroy());
    // The browser went away (a tab closed, the network cut): so does the upstream request.
    res.on("close", () => {
      if (!res.writableFinished) upstream.destroy();
    });
    req.pipe(upstream);
  }
}
