#!/usr/bin/env bash
# Autobahn fuzzing-client cases 1.* to 10.* (compression cases 12/13 excluded) against the
# diagnostic /v1/echo endpoint, with kosoku (a fast Python runner of the Autobahn cases).
# Every case must be OK, NON-STRICT or INFORMATIONAL, and match the committed expectations in
# docs/conformance/autobahn-expected.json (so a regression from OK to NON-STRICT shows too).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
source .ci/lib.sh
venv="$root/target/ci-venv"
ci_venv "$venv" bin/kosoku kosoku==0.1.0 websockets==15.0.1
cargo build --release --locked -p ringcast
out="$root/target/autobahn"
rm -rf "$out"
log=$(mktemp)
CLEANUP="$log"
RINGCAST_DIAGNOSTICS_ECHO=true start_ringcast "$log" --listen 127.0.0.1:0 --shards 2
addr=$RINGCAST_ADDR
cases=()
for c in 1 2 3 4 5 6 7 9 10; do cases+=(-i "$c.*"); done
"$venv/bin/kosoku" -p 4 "${cases[@]}" -o "$out" "ws://$addr/v1/echo" >"$out.log" 2>&1 || true
python3 - "$out/index.json" docs/conformance/autobahn-expected.json <<'PY'
import json, sys
from collections import Counter
got = next(iter(json.load(open(sys.argv[1])).values()))
expected = json.load(open(sys.argv[2]))
allowed = {"OK", "NON-STRICT", "INFORMATIONAL"}
bad = [k for k, c in got.items() if c["behavior"] not in allowed or c["behaviorClose"] not in allowed]
diff = [k for k in expected if k not in got or
        (got[k]["behavior"], got[k]["behaviorClose"]) != (expected[k]["behavior"], expected[k]["behaviorClose"])]
print("autobahn:", len(got), "cases", dict(Counter(c["behavior"] for c in got.values())))
failing = sorted(set(bad) | set(diff), key=lambda k: [int(x) for x in k.split(".")])
for k in failing:
    print("  ", k, got.get(k, {}).get("behavior"), got.get(k, {}).get("behaviorClose"), "expected", expected.get(k))
failed = len(failing)
print(f"autobahn: {len(set(got) | set(expected)) - failed} passed, {failed} failed")
sys.exit(1 if failed else 0)
PY
