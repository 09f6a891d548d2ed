#!/usr/bin/env python3
"""100,000 authenticated WebSocket connections on this host, over several ringcast processes
joined as one cluster through NATS JetStream, with topic fan-out and broadcasts running.

One process may hold 20,000 open files here, so the connections are spread over `--nodes`
ringcast processes (nats broker, one shard each) and held by the load generator's `--procs`
child processes, from several 127.0.0.x source addresses. The load generator subscribes every
connection to one topic and publishes to it through the first node; once every connection is
up, this script also sends `--broadcasts` broadcasts through the nodes in turn.

Reported: connections reached, topic deliveries and missing (the load generator's sequence
check), broadcast deliveries checked with the nodes' own counters (the sum of
`ringcast_events_out_total` must grow by exactly topic deliveries + broadcasts x
connections), memory per connection (the nodes' RSS from /proc, before and with the
connections), and NATS's share (nats-server RSS, CPU, bytes per event).

usage: bench/scripts/cluster_100k.py [--conns 100000] [--nodes 6] [--rate 2] [--secs 30]
                                     [--broadcasts 5] [--nats-server PATH] [--json OUT]
"""
import argparse, json, os, shutil, subprocess, sys, tempfile, time, urllib.request

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from clients import proc_cpu  # noqa: E402
from cluster import wait_http  # noqa: E402
from compare import free_port  # noqa: E402

SECRET, API_KEY = "cluster-100k-secret", "cluster-100k-key"


def get(url, timeout=10):
    return urllib.request.urlopen(url, timeout=timeout).read()


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def metric(port, name):
    text = get(f"http://127.0.0.1:{port}/metrics").decode()
    return sum(float(l.rsplit(" ", 1)[1]) for l in text.splitlines()
               if l.startswith(name + " ") or l.startswith(name + "{"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", default="target/release/ringcast")
    ap.add_argument("--loadgen", default="target/release/ringcast-loadgen")
    ap.add_argument("--nats-server", default="target/nats-venv/bin/nats-server")
    ap.add_argument("--conns", type=int, default=100_000)
    ap.add_argument("--nodes", type=int, default=6)
    ap.add_argument("--rate", type=float, default=2, help="topic events per second")
    ap.add_argument("--secs", type=float, default=30, help="seconds of publishing")
    ap.add_argument("--broadcasts", type=int, default=5)
    ap.add_argument("--json")
    a = ap.parse_args()
    if not os.path.exists(a.nats_server):
        sys.exit(f"no nats-server at {a.nats_server}: run bash .ci/cluster.sh once, or pass --nats-server")
    store = tempfile.mkdtemp(prefix="ringcast-100k-")
    nats_port, monitor = free_port(), free_port()
    nats = subprocess.Popen([a.nats_server, "-a", "127.0.0.1", "-p", str(nats_port), "-m", str(monitor),
                             "-js", "-sd", store], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs = [nats]
    try:
        wait_http(f"http://127.0.0.1:{monitor}/varz")
        ports = []
        for i in range(a.nodes):
            port = free_port()
            env = dict(os.environ, RINGCAST_JWT_SECRET=SECRET, RINGCAST_API_KEY=API_KEY, RUST_LOG="warn",
                       RINGCAST_BROKER="nats", RINGCAST_NATS_URL=f"nats://127.0.0.1:{nats_port}",
                       RINGCAST_NODE_ID=f"n{i}", RINGCAST_NATS_STORAGE="memory",
                       RINGCAST_LIMITS_MAX_CONNECTIONS="19000",
                       RINGCAST_LIMITS_EXEMPT_IPS="127.0.0.0/8")
            procs.append(subprocess.Popen([a.binary, "serve", "--listen", f"127.0.0.1:{port}", "--shards", "1"],
                                          env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            ports.append(port)
        for port in ports:
            wait_http(f"http://127.0.0.1:{port}/readyz")
        nodes = procs[1:]
        time.sleep(2)
        rss_before = [rss_kib(p.pid) for p in nodes]
        nats_rss_before = rss_kib(nats.pid)
        out_before = sum(metric(p, "ringcast_events_out_total") for p in ports)
        urls = ",".join(f"ws://127.0.0.1:{p}/v1/ws" for p in ports)
        per_child = -(-a.conns // 20_000) if a.conns > 20_000 else 1
        children = max(per_child, a.nodes)
        out_dir = tempfile.mkdtemp(prefix="ringcast-100k-out-")
        cmd = [a.loadgen, "--url", urls, "--secret", SECRET, "--sources", "127.0.0.2-127.0.0.13",
               "--threads", "1", "--label", "cluster-100k", "--out", out_dir, "fanout",
               "--subscribers", str(a.conns), "--procs", str(children), "--rate", str(a.rate), "--size", "100",
               "--duration", str(a.secs), "--publishers", "2", "--connect-rate", "4000",
               "--api-key", API_KEY, "--publish-url", f"http://127.0.0.1:{ports[0]}/v1/publish",
               "--server-pid", ",".join(str(p.pid) for p in nodes)]
        lg = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        # Wait for every connection, then measure memory and send the broadcasts.
        seen, at_full = 0, {}
        deadline = time.time() + 300
        while time.time() < deadline and lg.poll() is None:
            seen = sum(metric(p, "ringcast_connections") for p in ports)
            if seen >= a.conns:
                break
            time.sleep(1)
        at_full["connections"] = seen
        at_full["per_node"] = [metric(p, "ringcast_connections") for p in ports]
        at_full["rss_kib"] = [rss_kib(p.pid) for p in nodes]
        at_full["nats_rss_kib"] = rss_kib(nats.pid)
        v0, nats_cpu0 = json.loads(get(f"http://127.0.0.1:{monitor}/varz")), proc_cpu([nats.pid])
        t0 = time.time()
        sent = 0
        for i in range(a.broadcasts):
            body = json.dumps({"broadcast": True, "event": {"type": "bench_broadcast", "data": {"n": i}}}).encode()
            req = urllib.request.Request(f"http://127.0.0.1:{ports[i % len(ports)]}/v1/publish", data=body,
                                         method="POST", headers={"Authorization": f"Bearer {API_KEY}",
                                                                 "Content-Type": "application/json"})
            if json.loads(get_req(req)).get("id"):
                sent += 1
            time.sleep(2)
        stdout, stderr = lg.communicate(timeout=900)
        v1, nats_cpu1 = json.loads(get(f"http://127.0.0.1:{monitor}/varz")), proc_cpu([nats.pid])
        span = time.time() - t0
        if lg.returncode != 0:
            raise RuntimeError(f"loadgen failed: {stderr[-3000:]}")
        s = json.loads(stdout)
        time.sleep(1)
        out_after = sum(metric(p, "ringcast_events_out_total") for p in ports)
        server_delivered = out_after - out_before
        expected = s["received"] + sent * at_full["connections"]
        per_conn = [(full - before) * 1024 / max(1, n)
                    for full, before, n in zip(at_full["rss_kib"], rss_before, at_full["per_node"])]
        result = {
            "connections": at_full["connections"],
            "connections_per_node": at_full["per_node"],
            "loadgen": {k: s[k] for k in ("published", "received", "missing", "duplicates", "reorders", "gaps",
                                          "deliveries_per_second")},
            "latency_ms": {"p50": s["latency"]["p50_us"] / 1000, "p99": s["latency"]["p99_us"] / 1000},
            "broadcasts_sent": sent,
            "server_events_out": server_delivered,
            "expected_topic_plus_broadcast": expected,
            "server_counters_match": server_delivered == expected,
            "node_rss_bytes_per_connection": [round(x) for x in per_conn],
            "node_rss_mib_with_connections": [round(x / 1024, 1) for x in at_full["rss_kib"]],
            "nats_rss_mib": {"before": round(nats_rss_before / 1024, 1),
                             "with_connections": round(at_full["nats_rss_kib"] / 1024, 1)},
            "nats_subscriptions": json.loads(get(f"http://127.0.0.1:{monitor}/subsz"))["num_subscriptions"],
            "nats_during_traffic": {"secs": round(span, 1), "cpu_secs": round(nats_cpu1 - nats_cpu0, 2),
                                    "msgs_out": v1["out_msgs"] - v0["out_msgs"],
                                    "bytes_out": v1["out_bytes"] - v0["out_bytes"]},
        }
        print(json.dumps(result, indent=1))
        if a.json:
            with open(a.json, "w") as f:
                json.dump(result, f, indent=1)
    finally:
        for p in procs:
            p.kill()
            p.wait()
        shutil.rmtree(store, ignore_errors=True)


def get_req(req):
    return urllib.request.urlopen(req, timeout=30).read()


if __name__ == "__main__":
    main()
