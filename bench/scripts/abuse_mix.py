#!/usr/bin/env python3
"""Every hostile input of docs/threat-model.md at once, for a bounded time, against a fresh
server this script starts; then the clients leave and the script waits for the sweep.

Measures (printed as JSON):
- the server's RSS (/proc) before, at its peak and after (clients gone, idle topics swept);
- a bystander's ping round trip on the same server (JSON ping -> pong) before and during;
- whether the process stayed up, and what the abusers were answered.

Abusers (each a loop until --seconds pass): deep JSON (`[[[...]]]` 17.5 KB) in reconnecting
clients; clients that flood pings and never read; slow-loris sockets sending a byte every 2 s;
made-up topic names (128 per connection, reconnecting for a fresh allowance); `send_message`
with a 60 KB recipient; `subscribe` with 6,500 event prefixes; a backend publishing to new topic
names (ttl 5 s: events a backend does not want kept).

  python3 bench/scripts/abuse_mix.py --binary target/release/ringcast --seconds 60
"""
import argparse, asyncio, base64, json, os, re, socket, statistics, subprocess, sys, time
import urllib.request

sys.path.insert(0, os.path.dirname(__file__))
from idle_memory import SECRET, heap_bytes, rss_kib, token  # noqa: E402

API_KEY = "abuse-mix-api-key"


def smaps_kib(pid: int) -> dict:
    """Resident KiB by kind of mapping (/proc/PID/smaps): where RSS that stays after a run lives."""
    kinds, kind = {}, None
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split()
            if not head[0].endswith(":"):
                name = head[5] if len(head) > 5 else "[anon]"
                kind = name if name.startswith("[") else "file:" + os.path.basename(name)
            elif head[0] == "Rss:":
                kinds[kind] = kinds.get(kind, 0) + int(head[1])
    return {k: v for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]) if v >= 64}


def frame(payload: bytes, opcode=0x1) -> bytes:
    mask = os.urandom(4)
    n = len(payload)
    if n < 126:
        head = bytes([0x80 | opcode, 0x80 | n])
    elif n < 65536:
        head = bytes([0x80 | opcode, 0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([0x80 | opcode, 0x80 | 127]) + n.to_bytes(8, "big")
    # XOR with the mask, in bulk (payloads are up to 64 KB).
    m = (mask * (n // 4 + 1))[:n]
    body = (int.from_bytes(payload, "big") ^ int.from_bytes(m, "big")).to_bytes(n, "big") if n else b""
    return head + mask + body


async def upgrade(port, customer):
    r, w = await asyncio.open_connection("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    w.write(f"GET /v1/ws?token={token(customer)} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
    head = await r.readuntil(b"\r\n\r\n")
    if int(head.split()[1]) != 101:
        raise ConnectionError(head[:40])
    return r, w


async def read_frame(r):
    b0, b1 = await r.readexactly(2)
    n = b1 & 0x7F
    if n == 126:
        n = int.from_bytes(await r.readexactly(2), "big")
    elif n == 127:
        n = int.from_bytes(await r.readexactly(8), "big")
    return b0 & 0x0F, await r.readexactly(n)


async def text_reply(r):
    """Next text frame as JSON (pings and other control frames skipped)."""
    while True:
        op, data = await read_frame(r)
        if op == 0x8:
            raise ConnectionError("closed")
        if op == 0x1:
            return json.loads(data)


def loop_until(until, stats, name):
    """Decorator: run the coroutine again and again until `until`, counting its outcomes."""
    def wrap(fn):
        async def run(*a):
            while time.time() < until:
                try:
                    key = name + ":" + str(await fn(*a) or "ok")
                    stats[key] = stats.get(key, 0) + 1
                except (OSError, ConnectionError, asyncio.IncompleteReadError, ValueError) as e:
                    key = f"{name}:{type(e).__name__}"
                    stats[key] = stats.get(key, 0) + 1
                    await asyncio.sleep(0.05)
        return run
    return wrap


async def bystander(port, seconds):
    """A well-behaved client: a JSON ping every 300 ms (pings cost an eighth of a request, so
    this stays under the default allowance); round trips in ms. Runs in its own
    process during the abuse so the abusers' Python work does not delay its measurement."""
    r, w = await upgrade(port, "bystander")
    await text_reply(r)  # welcome
    out, end = [], time.time() + seconds
    while time.time() < end:
        t = time.perf_counter()
        w.write(frame(b'{"type":"ping"}')); await w.drain()
        while (await text_reply(r)).get("type") != "pong":
            pass
        out.append((time.perf_counter() - t) * 1000)
        await asyncio.sleep(0.3)
    w.close()
    return out


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bystander-port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--binary", default="target/release/ringcast")
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--settle", type=float, default=25, help="seconds after the run for the sweep")
    ap.add_argument("--only", default="", help="comma-separated abusers to run (default: all)")
    ap.add_argument("--warmup", type=int, default=200, help="benign clients before the run (0: none)")
    ap.add_argument("--smaps-dir", help="copy /proc/PID/smaps here before and after (where RSS stays)")
    ap.add_argument("--rounds", type=int, default=1, help="abuse-then-settle rounds on one server")
    ap.add_argument("--hog", action="store_true",
                    help="control: instead of abusing the server, burn one CPU for the same time")
    args = ap.parse_args()
    if args.bystander_port:
        print(json.dumps(await bystander(args.bystander_port, args.seconds)))
        return

    s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
    env = dict(os.environ, RINGCAST_JWT_SECRET=SECRET.decode(), RINGCAST_API_KEY=API_KEY, RUST_LOG="error")
    server = subprocess.Popen([args.binary, "serve", "--listen", f"127.0.0.1:{port}", "--shards", str(args.shards)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1); break
        except OSError:
            time.sleep(0.1)

    def metric(name):
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        return sum(float(l.rsplit(" ", 1)[1]) for l in text.splitlines() if l.startswith(name + " ") or l.startswith(name + "{"))

    rss_cold = rss_kib(server.pid)
    # Benign warm-up, so "before" is a server that has served traffic (its tables and
    # allocator pages already grown once), not one that has just started: 200 clients join 5
    # topics each, the backend publishes to them, everyone leaves, the sweep runs.
    async def member(i):
        r, w = await upgrade(port, f"member-{i}")
        await text_reply(r)
        topics = [f"room:{(i + k) % 50}" for k in range(5)]
        w.write(frame(json.dumps({"type": "subscribe", "payload": {"topics": topics}}).encode())); await w.drain()
        await text_reply(r)
        return r, w
    members = await asyncio.gather(*[member(i) for i in range(args.warmup)])
    for k in range(50):
        urllib.request.urlopen(urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/publish", method="POST",
            data=json.dumps({"topics": [f"room:{k}"], "event": {"type": "x", "data": {"k": k}, "ttl": 5}}).encode(),
            headers={"Authorization": f"Bearer {API_KEY}"}), timeout=10).read()
    await asyncio.sleep(1)
    for _, w in members:
        w.close()
    if args.warmup:
        await asyncio.sleep(args.settle)
    calm = await bystander(port, 6)
    rss_before = rss_kib(server.pid)
    smaps_before = smaps_kib(server.pid)
    if args.smaps_dir:
        with open(f"/proc/{server.pid}/smaps") as f, open(os.path.join(args.smaps_dir, "before"), "w") as o:
            o.write(f.read())
    heap_before = heap_bytes("127.0.0.1", port)
    topics_before = metric("ringcast_topics_owned")
    rounds = []
    for _ in range(args.rounds):
        until = time.time() + args.seconds
        stats = {}
        peak = [rss_before]
        deep = ("[" * 8750 + "]" * 8750).encode()

        @loop_until(until, stats, "deep_json")
        async def deep_json(i):
            r, w = await upgrade(port, f"deep-{i}")
            await text_reply(r)
            for _ in range(40):  # the message-rate limit (30/min) closes it with 4029 on the way
                w.write(frame(deep)); await w.drain()
                reply = await text_reply(r)
                if reply.get("code") != "bad_json":
                    return "unexpected"
            w.close()

        @loop_until(until, stats, "ping_flood")
        async def ping_flood(i):
            r, w = await upgrade(port, f"pinger-{i}")
            burst = frame(b"", 0x9) * 10_000
            while time.time() < until:
                w.write(burst)
                await asyncio.wait_for(w.drain(), timeout=max(0.1, until - time.time()))
            w.close()

        @loop_until(until, stats, "slowloris")
        async def slowloris(i):
            r, w = await asyncio.open_connection("127.0.0.1", port)
            for b in b"GET /healthz HTTP/1.1\r\nX-Slow: " + b"a" * 100:
                w.write(bytes([b])); await w.drain()
                try:
                    got = await asyncio.wait_for(r.read(100), timeout=2)
                    if got:
                        w.close()
                        return got.split(b" ")[1].decode()  # the status: 408 expected
                    w.close()
                    return "closed"
                except asyncio.TimeoutError:
                    pass
            w.close()

        @loop_until(until, stats, "topic_spam")
        async def topic_spam(i):
            r, w = await upgrade(port, f"spam-{i}")
            await text_reply(r)
            base = int(time.time() * 1000) * 1000 + i * 10_000_000
            names = [f"made-up:{base + k}" for k in range(128)]
            w.write(frame(json.dumps({"type": "subscribe", "payload": {"topics": names}}).encode())); await w.drain()
            reply = await text_reply(r)
            w.close()
            return reply.get("code") or reply.get("type")

        @loop_until(until, stats, "long_recipient")
        async def long_recipient(i):
            r, w = await upgrade(port, f"longto-{i}")
            await text_reply(r)
            for _ in range(25):
                w.write(frame(json.dumps({"type": "send_message", "payload": {"to": "x" * 60_000}}).encode())); await w.drain()
                reply = await text_reply(r)
            w.close()
            return reply.get("code")

        @loop_until(until, stats, "filter_spam")
        async def filter_spam(i):
            r, w = await upgrade(port, f"filters-{i}")
            await text_reply(r)
            w.write(frame(json.dumps({"type": "subscribe", "payload": {"events": [f"e{k}" for k in range(6500)]}}).encode()))
            await w.drain()
            reply = await text_reply(r)
            w.close()
            return reply.get("code") or reply.get("type")

        async def backend():
            n = 0
            loop = asyncio.get_running_loop()
            def post(batch):
                req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/publish/batch", data=json.dumps(batch).encode(),
                                             headers={"Authorization": f"Bearer {API_KEY}"}, method="POST")
                return urllib.request.urlopen(req, timeout=10).status
            while time.time() < until:
                batch = [{"topics": [f"backend-made-up:{n + k}"], "event": {"type": "x", "data": {"n": n + k}, "ttl": 5}}
                         for k in range(100)]
                n += 100
                key = f"backend:{await loop.run_in_executor(None, post, batch)}"
                stats[key] = stats.get(key, 0) + 1
                await asyncio.sleep(0.5)
            stats["backend_topics"] = n

        heap_peak = [heap_before]

        async def sample_rss():
            loop = asyncio.get_running_loop()
            while time.time() < until:
                peak[0] = max(peak[0], rss_kib(server.pid))
                if heap_before is not None:
                    h = await loop.run_in_executor(None, heap_bytes, "127.0.0.1", port)
                    heap_peak[0] = max(heap_peak[0], h or 0)
                await asyncio.sleep(0.5)

        abusers = {"deep_json": (deep_json, 4), "ping_flood": (ping_flood, 4), "slowloris": (slowloris, 300),
                   "topic_spam": (topic_spam, 8), "long_recipient": (long_recipient, 2),
                   "filter_spam": (filter_spam, 2), "backend": (lambda i: backend(), 1)}
        only = [a for a in args.only.split(",") if a] or list(abusers)
        tasks = [abusers[a][0](i) for a in only for i in range(abusers[a][1])] + [sample_rss()]
        if args.hog:
            async def hog():
                while time.time() < until:
                    end = time.time() + 0.5
                    while time.time() < end:
                        pass
                    await asyncio.sleep(0)
            tasks = [hog(), sample_rss()]
        during_proc = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--bystander-port", str(port), "--seconds", str(args.seconds - 2),
            stdout=asyncio.subprocess.PIPE)
        await asyncio.gather(*tasks)
        during = json.loads((await during_proc.communicate())[0])
        topics_peak = metric("ringcast_topics_owned")
        alive_after_run = server.poll() is None
        # Clients have left; let the sweep (every 10 s) forget the made-up topics.
        await asyncio.sleep(args.settle)
        rss_after = rss_kib(server.pid)
        smaps_after = smaps_kib(server.pid)
        if args.smaps_dir:
            with open(f"/proc/{server.pid}/smaps") as f, open(os.path.join(args.smaps_dir, "after"), "w") as o:
                o.write(f.read())
        heap_after = heap_bytes("127.0.0.1", port)
        topics_after = metric("ringcast_topics_owned")
        rounds.append({"rss_peak": peak[0], "rss_after": rss_after, "heap_peak": heap_peak[0], "heap_after": heap_after,
                       "topics_peak": topics_peak, "topics_after": topics_after, "alive_after_run": alive_after_run})
    refusals = {k: metric(f'ringcast_limit_refusals_total{{limit="{k}"}}') for k in
                ["slow_request", "message_rate", "pending_heads", "max_connections"]}
    server.terminate(); server.wait(timeout=20)

    def pct(v, p):
        v = sorted(v); return round(v[min(len(v) - 1, int(len(v) * p))], 2) if v else None
    print(json.dumps({
        "seconds": args.seconds, "alive_after_run": alive_after_run,
        "rounds": rounds,
        "rss_kib": {"cold": rss_cold, "before": rss_before, "peak": peak[0], "after": rss_after,
                    "after_vs_before": round(rss_after / rss_before, 3)},
        "smaps_rss_kib": {"before": smaps_before, "after": smaps_after},
        "heap_bytes (alloc-stats builds)": {"before": heap_before, "peak": heap_peak[0], "after": heap_after},
        "topics_owned": {"before": topics_before, "peak": topics_peak, "after": topics_after},
        "bystander_rtt_ms": {"calm": {"n": len(calm), "p50": pct(calm, .5), "p99": pct(calm, .99)},
                             "during": {"n": len(during), "p50": pct(during, .5), "p99": pct(during, .99),
                                        "max": pct(during, 1)}},
        "refusals": refusals, "abusers": dict(sorted(stats.items())),
    }, indent=1))


asyncio.run(main())
