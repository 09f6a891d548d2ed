#!/usr/bin/env bash
# One measurement of a ringcast binary with the independent wsprobe client (tokio +
# fastwebsockets; built outside this repository), on a fresh 2-shard server:
#   idle:   10,000 idle authenticated connections, RSS per connection;
#   fanout: 5,000 subscribers of one topic, 100 B events, 32 publisher connections,
#           steps of 200/400/800/1600 publishes/s for 8 s.
# Alternate two binaries (A B A B) to compare them on a noisy machine; read deliveries/s and
# server CPU per delivery at equal offered load rather than a single peak.
#
#   bench/scripts/wsprobe_ab.sh WSPROBE BINARY OUT.json idle|fanout
set -euo pipefail
W=$1 BIN=$2 OUT=$3 MODE=$4
export RINGCAST_JWT_SECRET=wsprobe-ab-secret-wsprobe-ab-secret RINGCAST_API_KEY=wsprobe-ab-key
PORT=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
RUST_LOG=error "$BIN" serve --listen "127.0.0.1:$PORT" --shards 2 >/dev/null 2>&1 &
PID=$!
trap 'kill $PID 2>/dev/null; wait $PID 2>/dev/null || true' EXIT
for _ in $(seq 50); do curl -s -o /dev/null "http://127.0.0.1:$PORT/healthz" && break; sleep 0.1; done
SRC=127.0.0.2,127.0.0.3,127.0.0.4,127.0.0.5,127.0.0.6,127.0.0.7
if [ "$MODE" = fanout ]; then
  "$W" fanout --url "ws://127.0.0.1:$PORT/v1/ws?token={token}" --jwt-secret "$RINGCAST_JWT_SECRET" \
    --jwt-claims '{"channels":["bench:*"]}' \
    --subscribe-msg '{"type":"subscribe","payload":{"topics":["bench:1"]}}' \
    --conns 5000 --publish-url "http://127.0.0.1:$PORT/v1/publish" --content-type application/json \
    --publish-header "Authorization: Bearer $RINGCAST_API_KEY" \
    --publish-body-template '{"topics":["bench:1"],"event":{"type":"bench","data":{"seq":{seq},"ts":{ts},"pad":"{pad}"}}}' \
    --rate 200,400,800,1600 --secs 8 --payload-bytes 100 --pub-conns 32 --pid "$PID" \
    --src-ips "$SRC" 2>/dev/null | tail -1 > "$OUT"
else
  "$W" idle --url "ws://127.0.0.1:$PORT/v1/ws?token={token}" --jwt-secret "$RINGCAST_JWT_SECRET" \
    --jwt-claims '{"channels":["bench:*"]}' --conns 10000 --rate 2000 --pid "$PID" \
    --settle-secs 5 --hold-secs 10 --src-ips "$SRC" 2>/dev/null | tail -1 > "$OUT"
fi
