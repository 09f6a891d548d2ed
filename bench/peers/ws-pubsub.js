// Node `ws` peer for side-by-side benchmarks: every client on /ws is a subscriber; POST /publish
// sends the request body to all of them (ws has no topics: a broadcast over its client set).
const http = require("http");
const { WebSocketServer } = require("ws");
const server = http.createServer((req, res) => {
  if (req.method === "POST" && req.url === "/publish") {
    const chunks = [];
    req.on("data", (c) => chunks.push(c));
    req.on("end", () => {
      const body = Buffer.concat(chunks).toString();
      for (const ws of wss.clients) if (ws.readyState === 1) ws.send(body);
      res.writeHead(200, { "Content-Type": "application/json" });
      res.end('{"ok":true}');
    });
    return;
  }
  res.writeHead(200);
  res.end("ok");
});
const wss = new WebSocketServer({ server, path: "/ws", perMessageDeflate: false });
server.listen(Number(process.env.PORT || 0), "127.0.0.1", () => {
  console.log(`listening on http://127.0.0.1:${server.address().port}`);
});
