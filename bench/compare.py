#!/usr/bin/env python3
"""Side-by-side benchmark: ringcast and the servers users would otherwise pick, driven by the
same ringcast-loadgen scenarios in one run.

Peers (installed by this script into target/peers; nginx from Debian):
  ringcast   target/release/ringcast serve --shards 2 (JWT per connection)
  ringcast1  the same with --shards 1: one thread, like Bun, leaving the other core to the client
  bun        Bun.serve with ws.subscribe / server.publish    (bench/peers/bun-pubsub.js)
  ws         Node `ws`, broadcast over its client set        (bench/peers/ws-pubsub.js)
  socketio   Socket.IO rooms                                 (bench/peers/socketio-pubsub.js)
  nchan      nginx + nchan, nchan_subscriber_first_message newest (bench/peers/nchan.conf.template)

For each peer: `connect` (idle connections, RSS per connection, connects/s) and `fanout` with the
offered rate stepped up until p99 passes 100 ms (or the steps run out); then one more fan-out
at half of Bun's peak rate for every peer. Results go to docs/bench/runs/<date>-<host>/ (JSON
per run, HTML reports) and a Markdown table printed at the end.

usage: bench/compare.py [--peers ringcast,bun,ws,socketio,nchan] [--conns 15000]
                        [--subscribers 5000] [--steps 100,200,400,800] [--duration 5]
                        [--topics 1] [--size 100]
  e.g. 1,000 topics x 15 subscribers: --peers ringcast,bun --subscribers 15000 --topics 1000
       15,000 subscribers on one topic: --subscribers 15000; 1 KiB events: --size 1024
"""
import argparse, datetime, json, os, platform, re, shutil, signal, socket, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEERS_DIR = os.path.join(ROOT, "target", "peers")
LOADGEN = os.path.join(ROOT, "target", "release", "ringcast-loadgen")
# COMPARE_RINGCAST: another ringcast binary (an A/B against an older build, same run).
RINGCAST = os.environ.get("COMPARE_RINGCAST") or os.path.join(ROOT, "target", "release", "ringcast")
# ringcast's peer names and their shard counts.
RINGCASTS = {"ringcast": 2, "ringcast1": 1}


def is_ringcast(name):
    return name in RINGCASTS


def sh(cmd, **kw):
    return subprocess.run(cmd, shell=True, check=True, **kw)


def install():
    sh(f"cd {ROOT} && cargo build --release --locked -p ringcast -p ringcast-loadgen")
    os.makedirs(PEERS_DIR, exist_ok=True)
    if not os.path.exists(os.path.join(PEERS_DIR, "node_modules", "socket.io")):
        sh(f"cd {PEERS_DIR} && npm install --silent --no-audit --no-fund bun@1 ws@8 socket.io@4")
    if not os.path.exists("/usr/lib/nginx/modules/ngx_nchan_module.so"):
        sh("apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx libnginx-mod-nchan >/dev/null")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Peer:
    """A running server: its WebSocket URL, publish endpoint, pids and loadgen target flags."""

    def __init__(self, name, transport="ws"):
        self.name, self.procs, self.tmp, self.transport = name, [], None, transport

    def start(self):
        n = self.name
        if is_ringcast(n):
            p = subprocess.Popen([RINGCAST, "serve", "--listen", "127.0.0.1:0", "--shards", str(RINGCASTS[n])],
                                 stderr=subprocess.PIPE, text=True,
                                 env=dict(os.environ, RINGCAST_JWT_SECRET="compare-secret", RINGCAST_API_KEY="compare-key"))
            port = self._port_from(p, p.stderr)
            self.procs, self.pids = [p], [p.pid]
            self.flags = ["--url", f"ws://127.0.0.1:{port}/v1/ws", "--secret", "compare-secret"]
            self.publish = ["--api-key", "compare-key"]
        elif n in ("bun", "ws", "socketio"):
            script = {"bun": "bun-pubsub.js", "ws": "ws-pubsub.js", "socketio": "socketio-pubsub.js"}[n]
            runtime = [os.path.join(PEERS_DIR, "node_modules", ".bin", "bun"), "run"] if n == "bun" else ["node"]
            p = subprocess.Popen(runtime + [os.path.join(ROOT, "bench", "peers", script)], stdout=subprocess.PIPE, text=True,
                                 cwd=PEERS_DIR, env=dict(os.environ, NODE_PATH=os.path.join(PEERS_DIR, "node_modules")))
            port = self._port_from(p, p.stdout)
            self.procs, self.pids = [p], [p.pid]
            path = "/socket.io/?EIO=4&transport=websocket" if n == "socketio" else "/ws"
            self.flags = ["--generic", "--url", f"ws://127.0.0.1:{port}{path}"]
            if n == "socketio":
                self.flags += ["--subscribe-frame", "40", "--ready-match", "40{"]
            self.publish = ["--publish-url", f"http://127.0.0.1:{port}/publish",
                            "--publish-body", '{"seq":{seq},"ts":{ts},"pad":"{pad}"}']
        elif n == "nchan":
            self.tmp = tempfile.mkdtemp(prefix="nchan-")
            port = free_port()
            conf = open(os.path.join(ROOT, "bench", "peers", "nchan.conf.template")).read()
            conf = conf.replace("PREFIX", self.tmp).replace("PORT", str(port)).replace("MODULE", "/usr/lib/nginx/modules/ngx_nchan_module.so")
            path = os.path.join(self.tmp, "nginx.conf")
            open(path, "w").write(conf)
            p = subprocess.Popen(["nginx", "-c", path, "-p", self.tmp], stderr=subprocess.DEVNULL)
            self.procs = [p]
            for _ in range(100):
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                    break
                except OSError:
                    time.sleep(0.1)
            kids = subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True, text=True).stdout.split()
            self.pids = [p.pid] + [int(k) for k in kids]
            self.flags = ["--generic", "--url", f"ws://127.0.0.1:{port}/sub"]
            self.publish = ["--publish-url", f"http://127.0.0.1:{port}/pub",
                            "--publish-body", '{"seq":{seq},"ts":{ts},"pad":"{pad}"}']
        if self.transport == "sse":
            self.flags += ["--transport", "sse"]
        time.sleep(0.5)
        return self

    @staticmethod
    def _port_from(proc, stream):
        deadline = time.time() + 30
        while time.time() < deadline:
            line = stream.readline()
            m = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line or "")
            if m:
                return int(m.group(1))
        raise RuntimeError("peer did not report its port")

    def version(self):
        n = self.name
        try:
            if is_ringcast(n):
                v = subprocess.run([RINGCAST, "--version"], capture_output=True, text=True).stdout.strip()
                return f"{v}, {RINGCASTS[n]} shard(s)"
            if n == "bun":
                return "bun " + subprocess.run([os.path.join(PEERS_DIR, "node_modules", ".bin", "bun"), "--version"], capture_output=True, text=True).stdout.strip()
            if n in ("ws", "socketio"):
                pkg = {"ws": "ws", "socketio": "socket.io"}[n]
                v = json.load(open(os.path.join(PEERS_DIR, "node_modules", pkg, "package.json")))["version"]
                node = subprocess.run(["node", "--version"], capture_output=True, text=True).stdout.strip()
                return f"{pkg} {v} on node {node}"
            if n == "nchan":
                return subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip() + " + libnginx-mod-nchan"
        except OSError:
            return "?"

    def stop(self):
        for p in self.procs:
            try:
                p.send_signal(signal.SIGTERM if self.name != "nchan" else signal.SIGQUIT)
                p.wait(timeout=15)
            except Exception:
                p.kill()
        if self.tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)


def loadgen(peer, scenario, args, out):
    cmd = [LOADGEN] + peer.flags + ["--threads", "2", "--label", peer.name, "--out", out, scenario] + args
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        raise RuntimeError(f"{peer.name} {scenario}: {r.stderr[-2000:]}")
    return json.loads(r.stdout)


def traffic(peer, args):
    """Event size and topics for a fan-out run (Bun's peer takes its topic from the body)."""
    a = ["--size", str(args.size)]
    if args.unicast:
        # ringcast addresses the customer c-{i} of subscriber i; Bun's subscriber i joins the
        # topic `c-{i}` in its place.
        if peer.name == "bun":
            a += ["--subscribe-frame", '{"sub":"c-{i}"}', "--ready-match", "subscribed"]
    elif args.topics > 1:
        a += ["--topics", str(args.topics)]
        if peer.name == "bun":
            a += ["--subscribe-frame", '{"sub":"{topic}"}', "--ready-match", "subscribed"]
    return a


def publish_flags(peer, args):
    """The peer's publish flags; Bun's body names the topic first when there are several."""
    p = list(peer.publish)
    if args.unicast and peer.name == "bun":
        p[p.index("--publish-body") + 1] = 'c-{cust}\n{"seq":{seq},"ts":{ts},"pad":"{pad}"}'
    elif args.topics > 1 and peer.name == "bun":
        p[p.index("--publish-body") + 1] = '{topic}\n{"seq":{seq},"ts":{ts},"pad":"{pad}"}'
    return p


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--peers", default="ringcast,bun,ws,socketio,nchan")
    ap.add_argument("--conns", type=int, default=15000)
    ap.add_argument("--subscribers", type=int, default=5000)
    ap.add_argument("--steps", default="100,200,400,800")
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--publishers", type=int, default=8)
    ap.add_argument("--topics", type=int, default=1,
                    help="fan-out over this many topics (subscribers spread evenly; ringcast and bun only)")
    ap.add_argument("--unicast", action="store_true",
                    help="each event to one customer (ringcast: customer events; bun: a topic per connection); "
                         "steps are events/s, each delivered once; ringcast and bun only")
    ap.add_argument("--size", type=int, default=100, help="bytes of each event's data")
    ap.add_argument("--hold", type=float, default=15.0,
                    help="seconds the connect scenario holds its idle connections before reading the server's RSS "
                         "(ringcast parks sockets quiet for server.park_after_secs = 10; the same hold for every peer)")
    ap.add_argument("--transport", choices=["ws", "sse"], default="ws",
                    help="subscribers' transport; sse: ringcast (/v1/events/stream) against nginx+nchan (EventSource) only")
    ap.add_argument("--only-connect", action="store_true", help="measure idle memory and connects/s only")
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-install", action="store_true")
    args = ap.parse_args()
    if not args.no_install:
        install()
    stamp = datetime.date.today().isoformat() + "-" + platform.node()
    out = args.out or os.path.join(ROOT, "docs", "bench", "runs", stamp)
    os.makedirs(out, exist_ok=True)
    peers = args.peers.split(",")
    if args.transport == "sse":
        skipped = [p for p in peers if not (is_ringcast(p) or p == "nchan")]
        if skipped:
            print(f"--transport sse: skipping {','.join(skipped)} (WebSocket only)", file=sys.stderr)
        peers = [p for p in peers if p not in skipped]
    if args.topics > 1 or args.unicast:
        skipped = [p for p in peers if not (is_ringcast(p) or p == "bun")]
        if skipped:
            print(f"skipping {','.join(skipped)}: several topics and unicast are ringcast and bun only", file=sys.stderr)
        peers = [p for p in peers if p not in skipped]
    steps = [] if args.only_connect else [float(x) for x in args.steps.split(",")]
    scenario = "unicast" if args.unicast else "fanout"
    results = {}
    for name in peers:
        res = results[name] = {"steps": []}
        peer = Peer(name, args.transport).start()
        res["version"] = peer.version()
        try:
            c = loadgen(peer, "connect", ["--conns", str(args.conns), "--rate", "5000", "--hold", str(args.hold),
                                          "--server-pid", ",".join(map(str, peer.pids))], os.path.join(out, f"{name}-connect"))
            res["connect"] = c
        finally:
            peer.stop()
        peer = Peer(name, args.transport).start()
        try:
            for rate in steps:
                f = loadgen(peer, scenario, ["--subscribers", str(args.subscribers), "--rate", str(rate)] + traffic(peer, args) + [
                                             "--duration", str(args.duration), "--publishers", str(args.publishers),
                                             "--server-pid", ",".join(map(str, peer.pids))] + publish_flags(peer, args),
                            os.path.join(out, f"{name}-fanout-{int(rate)}"))
                res["steps"].append(f)
                print(f"{name} fanout offered {rate}/s: {f['deliveries_per_second']:.0f} deliveries/s "
                      f"({f.get('deliveries_per_server_cpu_second') or 0:.0f} per server CPU-second), "
                      f"p99 {f['latency']['p99_us'] / 1000:.1f} ms, missing {f['missing']}", file=sys.stderr)
                if f["latency"]["p99_us"] > 100_000:
                    break
        finally:
            peer.stop()
    # Half of Bun's peak *published* rate, for every peer.
    if "bun" in results and results["bun"]["steps"]:
        bun_peak = peak_step(results["bun"])
        half = max(1.0, bun_peak["published_per_second"] / 2)
        for name in peers:
            peer = Peer(name, args.transport).start()
            try:
                results[name]["half_bun"] = loadgen(peer, scenario, ["--subscribers", str(args.subscribers), "--rate", str(half)] + traffic(peer, args) + [
                                                                     "--duration", str(args.duration), "--publishers", str(args.publishers),
                                                                     "--server-pid", ",".join(map(str, peer.pids))] + publish_flags(peer, args),
                                                    os.path.join(out, f"{name}-fanout-half-bun"))
            finally:
                peer.stop()
    json.dump(results, open(os.path.join(out, "results.json"), "w"), indent=1)
    table = render(results, args)
    open(os.path.join(out, "README.md"), "w").write(readme(table, args, results))
    print(table)


def within_slo(f):
    """A step counts towards the peak only while its p99 is at most 100 ms."""
    return f["latency"]["p99_us"] <= 100_000


def peak_step(r):
    ok = [f for f in r["steps"] if within_slo(f)] or r["steps"][:1]
    return max(ok, key=lambda f: f["deliveries_per_second"])


def render(results, args):
    # Ratios against Bun, or against nchan when Bun did not run (the SSE comparison).
    base_name = "bun" if "bun" in results else "nchan" if "nchan" in results else None
    base = results.get(base_name) if base_name else None
    label = {"bun": "Bun", "nchan": "nchan"}.get(base_name, "")
    rows = ["| server | idle memory per connection | connects/s | peak deliveries/s at p99 <= 100 ms | deliveries per server CPU-second at the first step (same load for all) | p50 / p99 at half of Bun's peak | missing |",
            "|---|---|---|---|---|---|---|"]

    def ratio(v, b):
        return f" ({v / b:.2f}x {label})" if b else ""

    for name, r in results.items():
        c = r.get("connect", {})
        mem = c.get("server_bytes_per_connection")
        ps = peak_step(r) if r["steps"] else None
        peak = ps["deliveries_per_second"] if ps and within_slo(ps) else 0
        eff = (r["steps"][0] if r["steps"] else {}).get("deliveries_per_server_cpu_second") or 0
        half = r.get("half_bun")
        lost = sum(f["missing"] for f in r["steps"]) + (half["missing"] if half else 0)
        bmem = base and base.get("connect", {}).get("server_bytes_per_connection")
        bps = peak_step(base) if base and base["steps"] else None
        bpeak = bps["deliveries_per_second"] if bps and within_slo(bps) else 0
        beff = (base["steps"][0] if base and base["steps"] else {}).get("deliveries_per_server_cpu_second") or 0
        hl = f"{half['latency']['p50_us'] / 1000:.1f} / {half['latency']['p99_us'] / 1000:.1f} ms" if half else "-"
        peak_txt = "-" if not r["steps"] else "none (p99 > 100 ms at the lowest step)" if not peak else f"{peak:.0f}{ratio(peak, bpeak) if name != base_name else ''}"
        rows.append(f"| {name} | {mem:.0f} B{ratio(mem, bmem) if mem and name != base_name else ''} | {c.get('connects_per_second', 0):.0f} | "
                    f"{peak_txt} | {eff:.0f}{ratio(eff, beff) if name != base_name and eff else ''} | {hl} | {lost} |" if mem else
                    f"| {name} | - | - | {peak:.0f} | {eff:.0f} | {hl} | {lost} |")
    return "\n".join(rows)


def readme(table, args, results):
    cpu = subprocess.run("lscpu | grep 'Model name' | sed 's/.*: *//'", shell=True, capture_output=True, text=True).stdout.strip()
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    versions = "\n".join(f"- {n}: {r.get('version')}" for n, r in results.items())
    return f"""# Side-by-side run {datetime.date.today()}

Command: `python3 bench/compare.py --peers {args.peers} --conns {args.conns} --hold {args.hold} --subscribers {args.subscribers} --steps {args.steps} --duration {args.duration} --publishers {args.publishers}{' --transport sse' if args.transport == 'sse' else ''}{' --only-connect' if args.only_connect else ''}`

Machine: {os.cpu_count()} vCPU ({cpu}), kernel {platform.release()}, commit {commit}. Client and servers share the
same cores: the load generator (2 threads) competes with the server under test, so absolute rates
are lower than on separate hosts; compare the ratios.

{table}

Versions:
{versions}

Each row: `connect` ramps {args.conns} idle connections at 5,000/s (RSS of the server's processes before and after);
`fanout` holds {args.subscribers} subscribers{f' spread evenly over {args.topics} topics (each event goes to one topic)' if args.topics > 1 else ''} and {args.publishers} HTTP publishers (open-loop schedule, staggered, one request in flight each) post {args.size}-byte events at
stepped rates ({args.steps}/s offered) for {args.duration}s each, stopping after the first step whose p99 passes 100 ms.
Per-run JSON summaries, .hgrm files and HTML reports are in this directory.
"""


if __name__ == "__main__":
    main()
