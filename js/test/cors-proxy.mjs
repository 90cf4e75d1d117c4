// A loopback proxy that adds CORS headers in front of the reference server,
// so the wasm tests (served by wasm-bindgen-test-runner on another port)
// may call it. Usage: node cors-proxy.mjs http://127.0.0.1:PORT
// Prints "listening on http://127.0.0.1:PORT" once ready.
import http from "node:http";

const target = new URL(process.argv[2]);
const cors = {
  "access-control-allow-origin": "*",
  "access-control-allow-methods": "GET, POST, OPTIONS",
  "access-control-allow-headers": "content-type, authorization, content-encoding",
  "access-control-expose-headers": "retry-after",
  "access-control-max-age": "600",
};

const server = http.createServer((req, res) => {
  if (req.method === "OPTIONS") {
    // Allow whatever headers the page asks for (credentials from headers()).
    const asked = req.headers["access-control-request-headers"];
    res.writeHead(204, asked ? { ...cors, "access-control-allow-headers": asked } : cors);
    res.end();
    return;
  }
  const upstream = http.request(
    { host: target.hostname, port: target.port, path: req.url, method: req.method, headers: req.headers },
    (up) => {
      res.writeHead(up.statusCode ?? 502, { ...up.headers, ...cors });
      up.pipe(res);
    },
  );
  upstream.on("error", () => {
    // The server is down: let the browser see a network failure.
    req.socket.destroy();
  });
  req.pipe(upstream);
});
server.listen(0, "127.0.0.1", () => {
  console.log(`listening on http://127.0.0.1:${server.address().port}`);
});
