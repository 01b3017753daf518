#!/usr/bin/env bash
# Runs ferry's fuzz targets one after another (never in parallel), SECONDS each (default 120):
#
#   fuzz/run.sh [SECONDS] [TARGET...]
#
# Needs a nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`). The committed seeds in
# fuzz/corpus/<target> are only read; inputs the fuzzer finds go to fuzz/target/live-corpus/<target>
# (ignored by git). A crash stops that target and leaves its input in fuzz/artifacts/<target>/;
# docs/FUZZING.md says how it becomes a regression. Exits non-zero if any target crashed.
set -uo pipefail
cd "$(dirname "$0")/.."

secs="${1:-120}"
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(v1_rebuild ltx_decode head_decode job_message)

failed=()
for t in "${targets[@]}"; do
  live="fuzz/target/live-corpus/$t"
  mkdir -p "$live"
  extra=()
  [ -f "fuzz/dicts/$t.dict" ] && extra+=("-dict=fuzz/dicts/$t.dict")
  echo "fuzz: $t for ${secs}s"
  # -malloc_limit_mb: no single allocation may approach a size an input merely claims (the
  # largest legitimate one is a 1 MiB v1 file, FUZZ_MAX_SIZE). -timeout: a hang is a crash.
  if ! cargo +nightly fuzz run --debug-assertions "$t" "$live" "fuzz/corpus/$t" -- \
    -max_total_time="$secs" -malloc_limit_mb=64 -timeout=10 -print_final_stats=1 "${extra[@]}"; then
    failed+=("$t")
  fi
done

if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz: crashed: ${failed[*]} (inputs in fuzz/artifacts/)" >&2
  exit 1
fi
echo "fuzz: ${#targets[@]} targets ran ${secs}s each without a crash"
