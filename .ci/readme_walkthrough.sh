#!/usr/bin/env bash
# The README's quick start, run literally: `ringcast serve` on its embedded defaults,
# `ringcast token --sub alice`, a plain Python `websockets` client subscribing to
# conversation:1, and an event published with curl. Fails unless the client receives it.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
venv="$root/target/ci-venv"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -c "import websockets" 2>/dev/null || "$venv/bin/pip" install --quiet --disable-pip-version-check websockets==15.0.1
cargo build --release --locked -p ringcast
bin=./target/release/ringcast
log=$(mktemp)
# The embedded default listens on 127.0.0.1:8080; if a stray process holds it, use another port.
listen=127.0.0.1:8080
if (exec 3<>/dev/tcp/127.0.0.1/8080) 2>/dev/null; then listen=127.0.0.1:0; fi
source .ci/lib.sh
CLEANUP="$log"
unset RINGCAST_JWT_SECRET RINGCAST_API_KEY
start_ringcast "$log" --listen "$listen"
addr=$RINGCAST_ADDR
grep -q "DEVELOPMENT CREDENTIALS" "$log" || { echo "missing the development-credentials warning"; exit 1; }
token=$("$bin" token --sub alice --channels 'conversation:*')
"$venv/bin/python" - "$addr" "$token" <<'PY' &
import asyncio, json, sys, websockets
addr, token = sys.argv[1], sys.argv[2]
async def main():
    async with websockets.connect(f"ws://{addr}/v1/ws?token={token}") as ws:
        welcome = json.loads(await ws.recv())
        assert welcome["type"] == "welcome", welcome
        await ws.send(json.dumps({"type": "subscribe", "payload": {"topics": ["conversation:1"]}}))
        confirmed = json.loads(await ws.recv())
        assert confirmed["type"] == "subscription_confirmed", confirmed
        open("/tmp/ringcast-walkthrough.ready", "w").close()
        event = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert event["type"] == "message_received" and event["data"]["text"] == "hello", event
        print("walkthrough: client received", json.dumps(event))
asyncio.run(main())
PY
client=$!
for _ in $(seq 1 100); do [ -f /tmp/ringcast-walkthrough.ready ] && break; sleep 0.1; done
rm -f /tmp/ringcast-walkthrough.ready
curl -fsS -X POST "http://$addr/v1/publish" \
  -H "Authorization: Bearer ringcast-dev-api-key" -H "Content-Type: application/json" \
  -d '{"topics": ["conversation:1"], "event": {"type": "message_received", "data": {"text": "hello"}}}'
echo
wait $client
echo "walkthrough: 1 passed, 0 failed"
