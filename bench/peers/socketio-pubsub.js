// Socket.IO peer for side-by-side benchmarks: clients join the room `loadgen` on connect;
// POST /publish emits the (JSON) body to the room as event `ev`.
const http = require("http");
const { Server } = require("socket.io");
const server = http.createServer((req, res) => {
  if (req.method === "POST" && req.url === "/publish") {
    const chunks = [];
    req.on("data", (c) => chunks.push(c));
    req.on("end", () => {
      io.to("loadgen").emit("ev", JSON.parse(Buffer.concat(chunks).toString()));
      res.writeHead(200, { "Content-Type": "application/json" });
      res.end('{"ok":true}');
    });
    return;
  }
  res.writeHead(200);
  res.end("ok");
});
const io = new Server(server, { transports: ["websocket"], perMessageDeflate: false });
io.on("connection", (socket) => socket.join("loadgen"));
server.listen(Number(process.env.PORT || 0), "127.0.0.1", () => {
  console.log(`listening on http://127.0.0.1:${server.address().port}`);
});
