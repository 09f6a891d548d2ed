# Shared helpers for the .ci scripts (sourced, not run).

# start_ringcast LOG [serve args...]: starts target/release/ringcast serve in the background with
# its log in LOG; sets RINGCAST_PID and RINGCAST_ADDR (host:port, once it listens) and arranges
# for the server to be stopped, and the paths in CLEANUP removed, when the calling script exits.
start_ringcast() {
  local log=$1
  shift
  ./target/release/ringcast serve "$@" 2>"$log" &
  RINGCAST_PID=$!
  trap 'kill $RINGCAST_PID 2>/dev/null || true; rm -rf ${CLEANUP:-}' EXIT
  RINGCAST_ADDR=""
  for _ in $(seq 1 100); do
    RINGCAST_ADDR=$(grep -o 'listening on http://[0-9.:]*' "$log" | head -1 | sed 's#.*http://##') || true
    [ -n "$RINGCAST_ADDR" ] && return 0
    sleep 0.1
  done
  cat "$log"
  echo "ringcast did not start" >&2
  return 1
}

# ci_venv DIR PROBE PACKAGE...: a Python virtualenv in DIR holding PACKAGEs, made once: it is
# (re)made when DIR/PROBE (an executable the packages install) is missing.
ci_venv() {
  local venv=$1 probe=$2
  shift 2
  if [ ! -x "$venv/$probe" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "$@"
  fi
}
