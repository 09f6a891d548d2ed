#!/usr/bin/env python3
"""A publisher beside the load: one keep-alive HTTP connection POSTs one event every DELAY
seconds to a topic nobody follows and prints the round trip's p50 / p90 / max. Run it while a
fan-out benchmark loads the server to see what an ordinary publisher waits, measured by a
process that is not the load client.

    bench/scripts/publish_probe.py --port P [--kind ringcast|bun] [--n 80] [--delay 0.05]
                                   [--api-key K] [--source 127.0.0.9] [--stamps]

--kind bun posts `probe:1\\n{}` to /publish (bench/peers/bun-pubsub.js); ringcast posts a topic
event to /v1/publish with the API key. --stamps prints each request's CLOCK_MONOTONIC send and
receive times, to set beside a server's own stamps.
"""
import argparse, http.client, json, time

ap = argparse.ArgumentParser()
ap.add_argument("--port", type=int, required=True)
ap.add_argument("--kind", default="ringcast", choices=["ringcast", "bun"])
ap.add_argument("--n", type=int, default=80)
ap.add_argument("--delay", type=float, default=0.05)
ap.add_argument("--api-key", default="wsprobe-ab-key")
ap.add_argument("--source", default="127.0.0.9", help="source address, to tell the probe's requests apart")
ap.add_argument("--stamps", action="store_true")
a = ap.parse_args()

conn = http.client.HTTPConnection("127.0.0.1", a.port, source_address=(a.source, 0))
if a.kind == "bun":
    path, body, headers = "/publish", "probe:1\n{}", {}
else:
    path = "/v1/publish"
    body = json.dumps({"topics": ["probe:1"], "event": {"type": "probe", "data": {}}})
    headers = {"Authorization": f"Bearer {a.api_key}", "Content-Type": "application/json"}
rtts = []
for _ in range(a.n):
    t0 = time.monotonic()
    conn.request("POST", path, body, headers)
    r = conn.getresponse()
    r.read()
    t1 = time.monotonic()
    if r.status != 200:
        raise SystemExit(f"publish answered {r.status}")
    if a.stamps:
        print(f"P {t0:.6f} {t1:.6f}")
    rtts.append((t1 - t0) * 1000)
    time.sleep(a.delay)
rtts.sort()
print(f"probe {a.kind} n={a.n} p50={rtts[len(rtts) // 2]:.2f}ms p90={rtts[int(len(rtts) * 0.9)]:.2f}ms max={rtts[-1]:.2f}ms")
