#!/usr/bin/env bash
# Runs every fuzz target (or those named) for SECONDS each, JOBS at a time, with libFuzzer
# through cargo-fuzz on the nightly toolchain (ASan). New interesting inputs are added to
# corpus/<target>/ (commit them, after `cargo fuzz cmin` if it grew a lot); a crash is saved
# under artifacts/<target>/ and makes this script fail. Each run's last status line is kept
# in logs/<target>.log.
#
#   bash proto/fuzz/run.sh [SECONDS] [TARGET...]      (default 60 s, all targets; JOBS=2)
set -euo pipefail
cd "$(dirname "$0")"
secs="${1:-60}"; shift || true
if ! rustup run nightly rustc --version >/dev/null 2>&1; then
  echo "fuzzing needs the nightly toolchain (rustup toolchain install nightly)" >&2; exit 2
fi
if ! command -v cargo-fuzz >/dev/null; then cargo install cargo-fuzz --locked; fi
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(http_head ws_receiver client_json proxy_header jwt api_body bus_message)
fi
cargo +nightly fuzz build -O
mkdir -p logs
jobs="${JOBS:-2}"
fail=0
run_one() {
  local t="$1"
  mkdir -p "corpus/$t" "artifacts/$t"
  # 64 KiB inputs: the largest client message and far beyond any head or token.
  if cargo +nightly fuzz run -O "$t" "corpus/$t" -- -max_total_time="$secs" -max_len=65536 \
      -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 >"logs/$t.log" 2>&1; then
    echo "$t: ok, $(grep -m1 'stat::number_of_executed_units' "logs/$t.log" | awk '{print $2}') executions"
  else
    echo "$t: FAILED (logs/$t.log, artifacts/$t/)"; return 1
  fi
}
pids=()
for t in "${targets[@]}"; do
  run_one "$t" & pids+=($!)
  if [ ${#pids[@]} -ge "$jobs" ]; then wait "${pids[0]}" || fail=1; pids=("${pids[@]:1}"); fi
done
for p in "${pids[@]}"; do wait "$p" || fail=1; done
exit $fail
