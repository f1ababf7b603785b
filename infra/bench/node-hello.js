// A hello upstream on Node.js's own http server, with its default headers: `Connection:
// keep-alive` and `Keep-Alive: timeout=5` on every answer, as Node and Express apps send them
// (infra/bench/instructions.sh and ab-gateways.sh with UPSTREAM=node; docs/performance.md
// section 31). Listens on 127.0.0.1, on the port PORT names or a free one, and announces it the
// way herd's processes do.
"use strict";
const http = require("http");
// RESPONSE_BYTES=N: a body of N bytes on every path instead (a page, an API's list, an image),
// to see what a proxy spends moving an answer's body rather than its head.
const size = Number(process.env.RESPONSE_BYTES || 0);
const body = size > 0 ? "x".repeat(size - 1) + "\n" : "hello from node\n";
// `/page`: 64 KiB of hello lines, as herd-worker's hello app and `herd bench upstream` answer it
// (herd_shared::page; the `page` scenario of `herd bench proxy`).
const page = "hello\n".repeat(Math.ceil(65536 / 6)).slice(0, 65536);
// CHUNKED=1: the answer in two writes without a length, which Node sends chunked
// (`Transfer-Encoding: chunked` after its `Keep-Alive` line), as a streamed page goes.
const chunked = process.env.CHUNKED === "1";
const server = http.createServer((request, response) => {
  const answer = request.url === "/page" ? page : body;
  if (chunked) {
    response.writeHead(200, { "Content-Type": "text/plain; charset=utf-8" });
    response.write(answer.slice(0, 6));
    response.end(answer.slice(6));
    return;
  }
  response.writeHead(200, {
    "Content-Type": "text/plain; charset=utf-8",
    "Content-Length": Buffer.byteLength(answer),
  });
  response.end(answer);
});
server.listen(Number(process.env.PORT || 0), "127.0.0.1", () => {
  const { address, port } = server.address();
  console.log(JSON.stringify({ event: "listening", role: "public", addr: `${address}:${port}` }));
});
