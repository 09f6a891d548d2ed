// Bun (uWebSockets) pub/sub peer for side-by-side benchmarks: every WebSocket client on /ws
// is subscribed to the topic `loadgen`; POST /publish publishes the request body to it.
const server = Bun.serve({
  hostname: "127.0.0.1",
  port: Number(process.env.PORT || 0),
  async fetch(req, server) {
    const url = new URL(req.url);
    if (url.pathname === "/ws") {
      if (server.upgrade(req)) return;
      return new Response("upgrade required", { status: 426 });
    }
    if (url.pathname === "/publish" && req.method === "POST") {
      const body = await req.text();
      server.publish("loadgen", body);
      return new Response('{"ok":true}', { headers: { "Content-Type": "application/json" } });
    }
    return new Response("ok");
  },
  websocket: {
    open(ws) {
      ws.subscribe("loadgen");
    },
    message(ws, message) {},
  },
});
console.log(`listening on http://127.0.0.1:${server.port}`);
