#!/usr/bin/env bash
# ringcast-loadgen against a real server: a connect ramp and a short fan-out. Fails unless
# every delivery arrived exactly once and in order, and the server's own delivery counter
# (ringcast_events_out_total) agrees with the load generator's count.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
cargo build --release --locked -p ringcast -p ringcast-loadgen
log=$(mktemp); out=$(mktemp -d)
source .ci/lib.sh
CLEANUP="$log $out"
start_ringcast "$log" --listen 127.0.0.1:0 --shards 2
addr=$RINGCAST_ADDR; pid=$RINGCAST_PID
lg=./target/release/ringcast-loadgen
$lg --url "ws://$addr/v1/ws" --threads 1 --out "$out/connect" connect --conns 1000 --rate 2000 --hold 1 --server-pid $pid >/dev/null
$lg --url "ws://$addr/v1/ws" --out "$out/procs" connect --procs 2 --conns 600 --rate 2000 --hold 1 --server-pid $pid >/dev/null
$lg --url "ws://$addr/v1/ws" --threads 1 --out "$out/fanout" fanout --subscribers 500 --rate 20 --duration 2 --publishers 2 >/dev/null
$lg --url "ws://$addr/v1/ws" --threads 1 --out "$out/unicast" unicast --subscribers 300 --rate 100 --duration 2 --publishers 2 >/dev/null
$lg --url "ws://$addr/v1/ws" --threads 1 --out "$out/chat" chat --subscribers 300 --room-size 10 --rate 1 --duration 2 >/dev/null
$lg --url "ws://$addr/v1/ws" --threads 1 --out "$out/storm" storm --subscribers 300 --rate 10 --duration 3 --at 1 >/dev/null
$lg --url "ws://$addr/v1/ws" --transport sse --threads 1 --out "$out/sse-fanout" fanout --subscribers 300 --rate 20 --duration 2 --publishers 2 >/dev/null
$lg --url "ws://$addr/v1/ws" --transport sse --threads 1 --out "$out/sse-unicast" unicast --subscribers 300 --rate 100 --duration 2 --publishers 2 >/dev/null
$lg --url "ws://$addr/v1/ws" --out "$out/fanout-procs" fanout --procs 2 --subscribers 400 --rate 20 --duration 2 --publishers 2 >/dev/null
$lg --url "ws://$addr/v1/ws" --out "$out/topics-procs" fanout --procs 2 --topics 20 --subscribers 400 --rate 40 --duration 2 --publishers 2 >/dev/null
$lg --url "ws://$addr/v1/ws" --out "$out/chat-procs" chat --procs 2 --subscribers 200 --room-size 10 --rate 1 --duration 2 >/dev/null
$lg --out "$out/merged" report "$out/connect" "$out/fanout" 2>/dev/null
python3 - "$out" <<'PY'
import json, os, sys
out = sys.argv[1]
c = json.load(open(os.path.join(out, "connect/summary.json")))
pr = json.load(open(os.path.join(out, "procs/summary.json")))
f = json.load(open(os.path.join(out, "fanout/summary.json")))
def load(name):
    return json.load(open(os.path.join(out, name, "summary.json")))

def exact(summary):
    return summary["published"] > 0 and summary["missing"] == 0 and summary["duplicates"] == 0 and summary.get("server_check", {}).get("agree") is True

checks = {
    "connect: all 1000 connected": c["connections"]["connected"] == 1000 and c["connections"]["errors"] == 0,
    "connect: server RSS measured": c["server_bytes_per_connection"] is not None,
    "connect --procs 2: 600 connected, histograms merged": pr["processes"] == 2 and pr["connections"]["connected"] == 600 and pr["handshake"]["count"] == 600,
    "fanout: events published": f["published"] > 0 and f["publish_errors"] == 0,
    "fanout: nothing lost": f["missing"] == 0 and f["received"] == f["expected_deliveries"],
    "fanout: no duplicates, reorders or gaps": f["duplicates"] == 0 and f["reorders"] == 0 and f["gaps"] == 0,
    "fanout: server count agrees": f.get("server_check", {}).get("agree") is True,
    "unicast: every event reached its one customer": exact(load("unicast")),
    "chat: every message reached its 10 room members": exact(load("chat")) and load("chat")["expected_deliveries"] == 10 * load("chat")["published"],
    "sse fanout: every event reached all 300 SSE subscribers": exact(load("sse-fanout")) and load("sse-fanout")["expected_deliveries"] == 300 * load("sse-fanout")["published"],
    "sse unicast: every event reached its one customer's SSE stream": exact(load("sse-unicast")),
    "fanout --procs 2: children's counts and histograms merged, server agrees": exact(load("fanout-procs")) and load("fanout-procs")["subscribers"]["connected"] == 400 and load("fanout-procs")["expected_deliveries"] == 400 * load("fanout-procs")["published"] and load("fanout-procs")["latency"]["count"] == load("fanout-procs")["received"],
    "fanout --topics 20 --procs 2: each event reached its topic's 20 subscribers, server agrees": exact(load("topics-procs")) and load("topics-procs")["topics"] == 20 and load("topics-procs")["expected_deliveries"] == 20 * load("topics-procs")["published"] and load("topics-procs")["received"] == load("topics-procs")["expected_deliveries"],
    "chat --procs 2: members in two processes, every message reached its room": exact(load("chat-procs")) and load("chat-procs")["expected_deliveries"] == 10 * load("chat-procs")["published"],
    "storm: all 300 reconnected, no duplicate or reordering": load("storm")["storm"]["reconnected"] == 300 and load("storm")["duplicates"] == 0 and load("storm")["reorders"] == 0,
    "reports written": all(os.path.exists(os.path.join(out, p)) for p in ["fanout/latency.hgrm", "fanout/report.html", "merged/report.html"]),
}
for name, ok in checks.items():
    print(("ok   " if ok else "FAIL ") + name)
failed = sum(not ok for ok in checks.values())
print(f"loadgen: {len(checks) - failed} passed, {failed} failed")
sys.exit(1 if failed else 0)
PY
