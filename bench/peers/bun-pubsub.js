// Bun (uWebSockets) pub/sub peer for side-by-side benchmarks: every WebSocket client on /ws
// is subscribed to the topic `loadgen`; POST /publish publishes the request body to it.
// Several topics (loadgen `fanout --topics N`): a client's `{"sub":"<topic>"}` moves it to that
// topic (answered `{"subscribed":"<topic>"}`), and a body `<topic>\n<event>` publishes the event
// to that topic.
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
      const nl = body.indexOf("\n");
      if (nl > 0 && nl < 256) server.publish(body.slice(0, nl), body.slice(nl + 1));
      else server.publish("loadgen", body);
      return new Response('{"ok":true}', { headers: { "Content-Type": "application/json" } });
    }
    return new Response("ok");
  },
  websocket: {
    open(ws) {
      ws.subscribe("loadgen");
    },
    message(ws, message) {
      const m = JSON.parse(String(message));
      if (typeof m.sub === "string") {
        ws.unsubscribe("loadgen");
        ws.subscribe(m.sub);
        ws.send(JSON.stringify({ subscribed: m.sub }));
      }
    },
  },
});
console.log(`listening on http://127.0.0.1:${server.port}`);
