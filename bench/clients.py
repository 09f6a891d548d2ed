#!/usr/bin/env python3
"""Checks the load generator against an independent client: the same fan-out scenario, run by
ringcast-loadgen and by wsprobe (tokio + fastwebsockets, built outside this repository), against
Bun and ringcast, printed side by side with the loadgen/wsprobe ratio of each figure.

Every run gets a fresh server. The scenario: N subscribers on one topic, events of 100 bytes
(--size) published over HTTP by K keep-alive connections at each offered rate for S seconds.

usage: bench/clients.py --wsprobe /path/to/wsprobe [--peers bun,ringcast,ringcast1] [--subscribers 5000]
                        [--rates 60,200] [--secs 8] [--size 100] [--pub-conns 8] [--repeat 1]
                        [--no-install] [--json OUT]
  (ringcast1 is ringcast with one shard: see bench/compare.py)
"""
import argparse, json, os, resource, subprocess, sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare  # noqa: E402
from compare import Peer, install  # noqa: E402

SOURCES = "127.0.0.2,127.0.0.3,127.0.0.4,127.0.0.5,127.0.0.6,127.0.0.7"


def proc_cpu(pids):
    """CPU seconds (user + system) the processes have used so far."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def client_cpu(cmd):
    """Runs a client; returns its result and the CPU seconds it used (user + system)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def port_of(peer):
    return peer.flags[peer.flags.index("--url") + 1].split(":")[2].split("/")[0]


def server_answer_p50_ms(peer):
    """ringcast's own p50 of the publish requests it answered (head parsed to response written,
    `publishAnswer` in /v1/stats/histograms). Every run has a fresh server, so its cumulative
    histogram holds exactly this run's publishes. None for other servers."""
    if not compare.is_ringcast(peer.name):
        return None
    import urllib.request
    with urllib.request.urlopen(f"http://127.0.0.1:{port_of(peer)}/v1/stats/histograms", timeout=10) as r:
        return json.load(r)["publishAnswer"]["p50"] / 1000


def run_loadgen(peer, a, rate, out):
    cmd = [a.loadgen] + peer.flags + ["--threads", str(a.threads), "--label", peer.name, "--out", out, "fanout",
                                    "--subscribers", str(a.subscribers), "--rate", str(rate), "--size", str(a.size),
                                    "--duration", str(a.secs), "--publishers", str(a.pub_conns),
                                    "--server-pid", ",".join(map(str, peer.pids))] + peer.publish
    r, cpu = client_cpu(cmd)
    if r.returncode != 0:
        raise RuntimeError(f"loadgen against {peer.name}: {r.stderr[-2000:]}")
    s = json.loads(r.stdout)
    return {
        "deliveries_per_sec": s["deliveries_per_second"],
        "p50_ms": s["latency"]["p50_us"] / 1000,
        "p99_ms": s["latency"]["p99_us"] / 1000,
        "published_per_sec": s["published_per_second"],
        "missing": s["missing"],
        "publish_rtt_p50_ms": s["publish_round_trip"]["p50_us"] / 1000,
        "server_answer_p50_ms": server_answer_p50_ms(peer),
        "client_us_per_delivery": cpu * 1e6 / max(1, s["received"]),
        # The server's CPU (from /proc) over publishing and drain, as the load generator saw it.
        "server_us_per_delivery_window": (s["server_cpu_seconds"] or 0) * 1e6 / max(1, s["received"]),
    }


def run_wsprobe(peer, a, rate):
    port = port_of(peer)
    cmd = [a.wsprobe, "fanout", "--conns", str(a.subscribers), "--rate", str(rate), "--secs", str(a.secs),
           "--payload-bytes", str(a.size), "--pub-conns", str(a.pub_conns), "--pid", ",".join(map(str, peer.pids)),
           "--src-ips", SOURCES]
    if compare.is_ringcast(peer.name):
        cmd += ["--url", f"ws://127.0.0.1:{port}/v1/ws?token={{token}}", "--jwt-secret", "compare-secret",
                "--jwt-claims", '{"channels":["loadgen"]}',
                "--subscribe-msg", '{"type":"subscribe","payload":{"topics":["loadgen"]}}',
                "--publish-url", f"http://127.0.0.1:{port}/v1/publish", "--content-type", "application/json",
                "--publish-header", "Authorization: Bearer compare-key",
                "--publish-body-template",
                '{"topics":["loadgen"],"event":{"type":"bench","data":{"seq":{seq},"ts":{ts},"pad":"{pad}"}}}']
    else:
        cmd += ["--url", f"ws://127.0.0.1:{port}/ws", "--publish-url", f"http://127.0.0.1:{port}/publish"]
    r, cpu = client_cpu(cmd)
    if r.returncode != 0:
        raise RuntimeError(f"wsprobe against {peer.name}: {r.stderr[-2000:]}")
    s = json.loads(r.stdout.strip().splitlines()[-1])
    return {
        "deliveries_per_sec": s["deliveries_per_sec"],
        "p50_ms": s["latency_us"]["p50"] / 1000,
        "p99_ms": s["latency_us"]["p99"] / 1000,
        "published_per_sec": s["publish_rate_achieved"],
        "missing": s["lost"],
        "publish_rtt_p50_ms": s["publish_http_us"]["p50"] / 1000,
        "server_answer_p50_ms": server_answer_p50_ms(peer),
        "client_us_per_delivery": cpu * 1e6 / max(1, s["received"]),
        # The server's CPU (from /proc) over the publishing step, as wsprobe saw it.
        "server_us_per_delivery_window": s["cpu"]["server_pct"] / 100 * 1e6 / max(1, s["deliveries_per_sec"]),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--wsprobe", required=True, help="path of the wsprobe binary")
    ap.add_argument("--loadgen", default=compare.LOADGEN, help="the ringcast-loadgen binary (default: this build's)")
    ap.add_argument("--ringcast", default=compare.RINGCAST, help="the ringcast binary (default: this build's)")
    ap.add_argument("--threads", type=int, default=2, help="loadgen executor threads (wsprobe runs 2 workers)")
    ap.add_argument("--peers", default="bun,ringcast")
    ap.add_argument("--subscribers", type=int, default=5000)
    ap.add_argument("--rates", default="60,200")
    ap.add_argument("--secs", type=float, default=8)
    ap.add_argument("--size", type=int, default=100, help="event payload bytes (both clients pad to it)")
    ap.add_argument("--pub-conns", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=1, help="runs of each client per peer and rate (alternated)")
    ap.add_argument("--no-install", action="store_true")
    ap.add_argument("--json", help="write every run here")
    a = ap.parse_args()
    compare.RINGCAST = a.ringcast
    if not a.no_install:
        install()
    out_dir = os.path.join(os.path.dirname(compare.LOADGEN), "clients-runs")
    os.makedirs(out_dir, exist_ok=True)
    rows = []
    for name in a.peers.split(","):
        for rate in [float(r) for r in a.rates.split(",")]:
            for rep in range(a.repeat):
                for client in ("loadgen", "wsprobe"):
                    peer = Peer(name).start()
                    try:
                        server_before = proc_cpu(peer.pids)
                        if client == "loadgen":
                            r = run_loadgen(peer, a, rate, os.path.join(out_dir, f"{name}-{int(rate)}-{rep}"))
                        else:
                            r = run_wsprobe(peer, a, rate)
                        received = r["deliveries_per_sec"] * a.secs
                        r["server_us_per_delivery"] = (proc_cpu(peer.pids) - server_before) * 1e6 / max(1, received)
                    finally:
                        peer.stop()
                    r.update(peer=name, rate=rate, client=client, rep=rep)
                    rows.append(r)
                    print(json.dumps(r), file=sys.stderr)
    if a.json:
        json.dump(rows, open(a.json, "w"), indent=1)
    print(f"\n{a.subscribers} subscribers, 100 B events, {a.pub_conns} publisher connections, {a.secs:g} s per run, "
          f"fresh server per run; ratio = loadgen / wsprobe (median of {a.repeat} each)\n")
    print("| server | offered/s | measure | loadgen | wsprobe | ratio |")
    print("|---|---|---|---|---|---|")

    def med(xs):
        xs = sorted(xs)
        return xs[len(xs) // 2]

    for name in a.peers.split(","):
        for rate in [float(r) for r in a.rates.split(",")]:
            for key, label in (("published_per_sec", "publishes/s"), ("deliveries_per_sec", "deliveries/s"),
                               ("p50_ms", "p50 ms"), ("p99_ms", "p99 ms"), ("publish_rtt_p50_ms", "POST p50 ms"),
                               ("server_answer_p50_ms", "POST p50 ms inside the server"),
                               ("client_us_per_delivery", "client CPU µs/delivery"),
                               ("server_us_per_delivery", "server CPU µs/delivery, whole run (ramp included)"),
                               ("server_us_per_delivery_window", "server CPU µs/delivery, publishing only")):
                got = {c: [r[key] for r in rows if r["peer"] == name and r["rate"] == rate and r["client"] == c]
                       for c in ("loadgen", "wsprobe")}
                if any(v is None for xs in got.values() for v in xs):
                    continue  # a measure this server does not report
                vals = {c: med(xs) for c, xs in got.items()}
                ratio = vals["loadgen"] / vals["wsprobe"] if vals["wsprobe"] else float("nan")
                print(f"| {name} | {rate:g} | {label} | {vals['loadgen']:,.2f} | {vals['wsprobe']:,.2f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
