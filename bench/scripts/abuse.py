#!/usr/bin/env python3
"""Abusive clients for the protection-limit benchmark: while they run, measure the latency of
well-behaved clients on the same shard with ringcast-loadgen (see docs/benchmarks.md).

Two kinds, both bounded by --seconds:
- `attempts`: connection attempts at --rate per second, each with `X-Forwarded-For: 203.0.113.x`
  (the server must list 127.0.0.1 in server.trusted_proxies); beyond the per-address limit every
  one is refused with 429.
- `flood`: WebSocket clients (each behind its own forwarded address) that send requests as fast
  as they can until the server closes them with 4029, then reconnect (customers flood-0..N);
  their reconnects soon meet the per-address attempt limit too.
- `--hog`: instead of abusing the server, burn one CPU for the same time (the control: on a
  2-core machine shared by client and server, any extra busy process costs latency).

Prints a JSON summary: statuses seen, 4029 closes, requests sent.
"""
import argparse, asyncio, base64, collections, json, os, sys, time

sys.path.insert(0, os.path.dirname(__file__))
from idle_memory import masked_text, token  # noqa: E402  (HS256 with the bench secret)


async def handshake(host, port, customer, extra=""):
    reader, writer = await asyncio.open_connection(host, port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(f"GET /v1/ws?token={token(customer)} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                 f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    return int(head.split()[1]), reader, writer


async def attempts(host, port, rate, until, stats):
    i = 0
    while time.time() < until:
        i += 1
        try:
            status, _, w = await handshake(host, port, f"att-{i}", f"X-Forwarded-For: 203.0.113.{i % 4}\r\n")
            stats[f"status_{status}"] += 1
            w.close()
        except (OSError, asyncio.IncompleteReadError):
            stats["errors"] += 1
        await asyncio.sleep(1 / rate)


async def flood(host, port, n, until, stats):
    msg = masked_text(json.dumps({"type": "subscribe", "payload": {"topics": ["x"]}}).encode())
    while time.time() < until:
        try:
            status, reader, writer = await handshake(host, port, f"flood-{n}",
                                                     f"X-Forwarded-For: 198.51.100.{n}\r\n")
            if status != 101:
                stats[f"flood_status_{status}"] += 1
                await asyncio.sleep(0.1)
                continue
            closed = False
            while not closed and time.time() < until:
                writer.write(msg * 10)
                stats["requests_sent"] += 10
                await writer.drain()
                try:
                    data = await asyncio.wait_for(reader.read(65536), 0.01)
                except asyncio.TimeoutError:
                    continue
                # A close frame: opcode 0x8, code in the first two payload bytes.
                idx = data.find(b"\x88")
                if not data or (idx >= 0 and data[idx + 2:idx + 4] == (4029).to_bytes(2, "big")):
                    stats["closed_4029"] += 1 if data else 0
                    closed = True
            writer.close()
        except (OSError, asyncio.IncompleteReadError):
            stats["errors"] += 1


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--addr", required=True)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--attempt-rate", type=float, default=200)
    ap.add_argument("--flooders", type=int, default=4)
    ap.add_argument("--hog", action="store_true")
    a = ap.parse_args()
    if a.hog:
        until, n = time.time() + a.seconds, 0
        while time.time() < until:
            n += 1
        print(json.dumps({"hog_iterations": n}))
        return
    host, port = a.addr.rsplit(":", 1)
    until = time.time() + a.seconds
    stats = collections.Counter()
    await asyncio.gather(attempts(host, int(port), a.attempt_rate, until, stats),
                         *(flood(host, int(port), n, until, stats) for n in range(a.flooders)))
    print(json.dumps(dict(stats)))


if __name__ == "__main__":
    asyncio.run(main())
