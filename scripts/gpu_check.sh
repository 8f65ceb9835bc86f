#!/usr/bin/env bash
# Everything a GPU session checks, in one device call (run from the repository root on the GPU machine):
# build with the machine's own torch, the test suite natively on the GPU, compute-sanitizer over every
# kernel, then the throughput benchmark. Logs and results go to $OUT (or ./gpu-out).
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
python3 -m uba_fused.env | tee "$OUT/env.txt"
python3 -m pytest -q -x tests -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" | tail -5
for tool in memcheck racecheck; do
  compute-sanitizer --tool $tool --error-exitcode 3 python3 scripts/sanitize_steps.py > "$OUT/sanitizer-$tool.log" 2>&1
  echo "compute-sanitizer $tool: exit $? ($(grep -c 'ERROR SUMMARY: 0 errors' "$OUT/sanitizer-$tool.log") clean summaries)"
done
python3 -m uba_fused.bench ${BENCH_ARGS:-} --json "$OUT/bench.json" --plot "$OUT/bench.png" 2>"$OUT/bench.err" | tee "$OUT/bench.txt"
