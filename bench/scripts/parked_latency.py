#!/usr/bin/env python3
"""What parking costs a client: request round trips on parked and on active connections.

Starts `ringcast serve` (release build, `server.park_after_secs` = 1), opens N WebSocket
connections, waits until all are parked (`ringcast_parked_connections`), then sends one `ping`
request on each in turn and times the `pong` (round 1: parked, read through the shard's epoll
set and its thread). Round 2 pings each again at once (it talked within the window: it goes back
to glommio on this message). Round 3 is the same connections active, read by glommio.

usage: parked_latency.py [--conns 200] [--binary target/release/ringcast]
"""
import argparse, base64, json, os, re, socket, statistics, subprocess, sys, time, urllib.request

sys.path.insert(0, os.path.dirname(__file__))
from idle_memory import SECRET, masked_text, token  # noqa: E402


def metric(host, port, name):
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return 0.0


def read_until(sock, needle, buf=b""):
    while needle not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise RuntimeError("connection closed")
        buf += chunk
    return buf


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--conns", type=int, default=200)
    ap.add_argument("--binary", default="target/release/ringcast")
    args = ap.parse_args()
    env = dict(os.environ, RINGCAST_JWT_SECRET=SECRET.decode(), RINGCAST_API_KEY="bench",
               RINGCAST_SERVER_PARK_AFTER_SECS="1", RUST_LOG="warn,engine::cli=info")
    proc = subprocess.Popen([args.binary, "serve", "--listen", "127.0.0.1:0", "--shards", "2"],
                            env=env, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        m = re.search(r"listening on http://([0-9.]+):(\d+)", line)
        if m:
            host, port = m.group(1), int(m.group(2))
            break
    try:
        socks = []
        for i in range(args.conns):
            s = socket.create_connection((host, port))
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            key = base64.b64encode(os.urandom(16)).decode()
            s.sendall(f"GET /v1/ws?token={token(f'lat-{i}')} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                      f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
            read_until(s, b"welcome")
            socks.append(s)
        deadline = time.time() + 15
        while metric(host, port, "ringcast_parked_connections") < args.conns:
            if time.time() > deadline:
                raise RuntimeError("connections did not park")
            time.sleep(0.2)
        ping = masked_text(json.dumps({"type": "ping", "requestId": "p"}).encode())

        def round_trips():
            out = []
            for s in socks:
                t = time.perf_counter()
                s.sendall(ping)
                read_until(s, b"pong")
                out.append((time.perf_counter() - t) * 1e6)
            return out

        rounds = {"parked": round_trips(), "unparking": round_trips(), "active": round_trips()}
        parked_after = metric(host, port, "ringcast_parked_connections")

        def q(v, p):
            return round(statistics.quantiles(v, n=100)[p - 1], 1)

        print(json.dumps({
            "connections": args.conns, "parked_after_rounds": parked_after,
            **{name: {"p50_us": q(v, 50), "p90_us": q(v, 90), "p99_us": q(v, 99)} for name, v in rounds.items()},
        }))
    finally:
        proc.kill()


if __name__ == "__main__":
    main()
