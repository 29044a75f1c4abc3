#!/usr/bin/env bash
# Runs every fuzz target (fuzz/fuzz_targets/*.rs) for a bounded time each, one after the other,
# with cargo-fuzz on nightly (installed with `cargo install` if missing), debug assertions and
# overflow checks on. Not part of scripts/test.sh, which only builds the targets.
#
#   bash scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]     # default 30 s, every target
#
# Each target's corpus grows in fuzz/corpus/TARGET (not committed); fuzz/seeds/TARGET, where
# there is one, seeds it, and the JSON targets use fuzz/json.dict. A crash, panic, leak, timeout
# (-timeout, 10 s) or allocation past -malloc_limit_mb (512 MiB) stops that target and leaves the
# input in fuzz/artifacts/TARGET/; the script goes on with the others, prints one line per
# target (runs, seconds, result) and exits 1 if any target failed.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-30}
shift || true
command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz
if [ $# -gt 0 ]; then
  targets=("$@")
else
  mapfile -t targets < <(cd fuzz && cargo +nightly fuzz list)
fi
# Targets that write files (sealed_layer) do so under $TMPDIR: a directory of ours, on tmpfs
# where there is one, removed at the end.
scratch=$(mktemp -d -p /dev/shm 2>/dev/null || mktemp -d)
logs=$(mktemp -d)
trap 'rm -rf "$scratch" "$logs"' EXIT
(cd fuzz && cargo +nightly fuzz build -a)
failed=0
summary=()
for t in "${targets[@]}"; do
  mkdir -p "fuzz/corpus/$t"
  corpora=("corpus/$t")
  [ -d "fuzz/seeds/$t" ] && corpora+=("seeds/$t")
  extra=()
  case $t in disk_manifest | image_*) extra+=(-dict=json.dict) ;; esac
  echo "== $t: $secs s"
  if (cd fuzz && TMPDIR=$scratch cargo +nightly fuzz run -a "$t" "${corpora[@]}" -- \
    -max_total_time="$secs" -timeout=10 -malloc_limit_mb=512 -rss_limit_mb=2048 -print_final_stats=1 \
    "${extra[@]}") >"$logs/$t" 2>&1; then
    result=ok
  else
    result="FAILED (see fuzz/artifacts/$t; log tail below)"
    failed=1
    tail -40 "$logs/$t"
  fi
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$logs/$t" | tail -1)
  took=$(sed -n 's/^Done [0-9]* runs in \([0-9]*\) second.*/\1/p' "$logs/$t" | tail -1)
  summary+=("$(printf '%-18s %10s runs %5s s  %s' "$t" "${runs:-?}" "${took:-?}" "$result")")
done
printf '%s\n' "${summary[@]}"
exit "$failed"
