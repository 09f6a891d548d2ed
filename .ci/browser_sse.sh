#!/usr/bin/env bash
# A real browser's EventSource (headless Chromium, driven by playwright-core) receives events
# and resumes after the server closes its stream, without loss. Installs what it needs.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
if ! command -v chromium >/dev/null; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null
fi
if ! command -v node >/dev/null; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm) >/dev/null
fi
node_dir="$root/target/ci-node"
mkdir -p "$node_dir"
if [ ! -d "$node_dir/node_modules/playwright-core" ]; then
  (cd "$node_dir" && npm init -y >/dev/null && npm install --silent --no-audit --no-fund playwright-core@1.49.1 >/dev/null)
fi
cargo build --release --locked -p ringcast
log=$(mktemp)
source .ci/lib.sh
CLEANUP="$log"
export RINGCAST_JWT_SECRET=browser-sse-secret RINGCAST_API_KEY=browser-sse-key
# A slow retry makes sure events are published while the browser is disconnected.
export RINGCAST_DELIVERY_SSE_RETRY_MS=1500
start_ringcast "$log" --listen 127.0.0.1:0 --shards 2
token=$(./target/release/ringcast token --sub browser-patient)
cp .ci/browser_sse.mjs "$node_dir/"
node "$node_dir/browser_sse.mjs" "$RINGCAST_ADDR" "$token" "$RINGCAST_API_KEY" browser-patient "$(command -v chromium)"
