#!/usr/bin/env python3
"""Resident memory per idle authenticated WebSocket connection.

Starts `ringcast serve` (release build) on a free loopback port, opens N WebSocket connections
with distinct customers (real RFC 6455 handshakes with a JWT, then one `subscribe` to a topic),
holds them idle, and reads the server's VmRSS from /proc before and after. The client is plain
asyncio sockets so that it stays light; connections are spread over several 127.0.0.x source
addresses.

usage: idle_memory.py [--conns 10000] [--shards 2] [--binary target/release/ringcast]
"""
import argparse, asyncio, base64, hashlib, hmac, json, os, re, subprocess, sys, time

SECRET = b"idle-memory-bench-secret"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def token(sub: str) -> str:
    header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    claims = b64(json.dumps({"sub": sub, "exp": int(time.time()) + 3600, "channels": ["*"]}).encode())
    sig = hmac.new(SECRET, f"{header}.{claims}".encode(), hashlib.sha256).digest()
    return f"{header}.{claims}.{b64(sig)}"


def masked_text(payload: bytes) -> bytes:
    mask = os.urandom(4)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    assert len(payload) < 126
    return bytes([0x81, 0x80 | len(payload)]) + mask + body


def heap_bytes(host, port):
    """Live heap bytes from /v1/stats (a build with `--features alloc-stats`), else None."""
    import urllib.request
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/v1/stats", timeout=10) as r:
            return json.loads(r.read()).get("heapBytes")
    except OSError:
        return None


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))


async def open_conn(host, port, i, writers, topic):
    src = f"127.0.0.{2 + i % 8}"
    reader, writer = await asyncio.open_connection(host, port, local_addr=(src, 0))
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        f"GET /v1/ws?token={token(f'c-{i}')} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101"), head
    writer.write(masked_text(json.dumps({"type": "subscribe", "payload": {"topics": [topic]}}).encode()))
    # welcome + subscription_confirmed: read until the confirmation has arrived.
    seen = b""
    while b"subscription_confirmed" not in seen:
        seen += await reader.read(4096)
    writers.append((reader, writer))


async def read_frames(reader, want_type, deadline):
    """Reads server frames until `deadline`; returns the JSON messages of type `want_type`."""
    buf, got = b"", []
    while True:
        timeout = deadline - time.time()
        if timeout <= 0:
            return got
        try:
            chunk = await asyncio.wait_for(reader.read(65536), timeout)
        except asyncio.TimeoutError:
            return got
        if not chunk:
            return got
        buf += chunk
        while len(buf) >= 2:
            n, off = buf[1] & 0x7F, 2
            if n == 126:
                if len(buf) < 4:
                    break
                n, off = int.from_bytes(buf[2:4], "big"), 4
            if len(buf) < off + n:
                break
            opcode, payload, buf = buf[0] & 0x0F, buf[off:off + n], buf[off + n:]
            if opcode == 1:
                msg = json.loads(payload)
                if msg.get("type") == want_type:
                    got.append(msg)


async def check_broadcast(host, port, writers, count):
    """Publishes `count` broadcasts of a 100-byte event; every connection must get each once."""
    data = "x" * (100 - len('{"p":""}'))
    body = json.dumps({"broadcast": True, "event": {"type": "bcast", "data": {"p": data}}}).encode()
    deadline = time.time() + 10
    readers = [asyncio.create_task(read_frames(r, "bcast", deadline)) for r, _ in writers]
    t0 = time.time()
    delivered = []
    for _ in range(count):
        r, w = await asyncio.open_connection(host, port)
        w.write(b"POST /v1/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer bench\r\nConnection: close\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        resp = await r.read()
        delivered.append(json.loads(resp.split(b"\r\n\r\n", 1)[1])["delivered"]["websocket"])
        w.close()
    api_seconds = time.time() - t0
    results = await asyncio.gather(*readers)
    counts = {}
    for got in results:
        counts[len(got)] = counts.get(len(got), 0) + 1
    ids_ok = all(len({m["id"] for m in got}) == len(got) for got in results)
    return {"events": count, "api_delivered": delivered, "api_seconds": round(api_seconds, 3),
            "receivers_by_count": counts, "exactly_once": counts == {count: len(writers)} and ids_ok}


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--conns", type=int, default=10000)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--binary", default="target/release/ringcast")
    ap.add_argument("--concurrency", type=int, default=200)
    ap.add_argument("--broadcasts", type=int, default=0,
                    help="after measuring, publish this many 100-byte broadcasts and check every connection gets each exactly once")
    ap.add_argument("--settle", type=float, default=2.0, help="seconds to wait before each RSS reading")
    ap.add_argument("--base", type=int, default=2000,
                    help="connections opened before the first reading, so that start-up and warm-up allocations are not charged to the measured ones")
    args = ap.parse_args()
    env = dict(os.environ, RINGCAST_JWT_SECRET=SECRET.decode(), RINGCAST_API_KEY="bench", RUST_LOG="warn,engine::cli=info")
    proc = subprocess.Popen([args.binary, "serve", "--listen", "127.0.0.1:0", "--shards", str(args.shards)],
                            env=env, stderr=subprocess.PIPE, text=True)
    addr = None
    for line in proc.stderr:
        m = re.search(r"listening on http://([0-9.]+):(\d+)", line)
        if m:
            addr = (m.group(1), int(m.group(2)))
            break
    host, port = addr
    try:
        writers = []
        sem = asyncio.Semaphore(args.concurrency)

        async def one(i):
            async with sem:
                await open_conn(host, port, i, writers, f"room:{i % 100}")

        await asyncio.sleep(0.5)
        empty = rss_kib(proc.pid)
        heap_empty = heap_bytes(host, port)
        # The base population: its cost includes one-off growth (maps, chunks, allocator pages).
        await asyncio.gather(*(one(1_000_000 + i) for i in range(args.base)))
        await asyncio.sleep(args.settle)
        before = rss_kib(proc.pid)
        heap_before = heap_bytes(host, port)
        t0 = time.time()
        await asyncio.gather(*(one(i) for i in range(args.conns)))
        elapsed = time.time() - t0
        await asyncio.sleep(args.settle)
        after = rss_kib(proc.pid)
        heap_after = heap_bytes(host, port)
        per_conn = (after - before) * 1024 / args.conns
        all_in = (after - empty) * 1024 / (args.conns + args.base)
        broadcast = await check_broadcast(host, port, writers, args.broadcasts) if args.broadcasts else None
        print(json.dumps({
            "connections": args.conns, "base": args.base, "shards": args.shards,
            "rss_empty_kib": empty, "rss_before_kib": before, "rss_after_kib": after,
            "bytes_per_connection": round(per_conn, 1), "bytes_per_connection_all_in": round(all_in, 1),
            "connect_seconds": round(elapsed, 2), "broadcast": broadcast,
            "heap_bytes": [heap_empty, heap_before, heap_after],
            "heap_bytes_per_connection": round((heap_after - heap_before) / args.conns, 1) if heap_after else None,
        }))
        for _, w in writers:
            w.close()
    finally:
        proc.terminate()
        proc.wait(timeout=20)


if __name__ == "__main__":
    asyncio.run(main())
