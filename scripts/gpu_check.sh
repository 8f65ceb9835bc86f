#!/usr/bin/env bash
# What a GPU session checks, from the repository root on the GPU machine, logs and results in $OUT
# (or ./gpu-out). One device call allows 10 minutes, so run the stages as separate calls if needed:
#   bash scripts/gpu_check.sh test    build with the machine's torch, the test suite natively on the
#                                     GPU, compute-sanitizer memcheck and racecheck over every kernel
#   bash scripts/gpu_check.sh bench   build, then python -m uba_fused.bench $BENCH_ARGS
#                                     (default: the GPT-2-medium list in fp32 and bf16)
#   bash scripts/gpu_check.sh         both
set -uo pipefail
OUT=${OUT:-gpu-out}
STAGE=${1:-all}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
python3 -m uba_fused.env | tee "$OUT/env.txt"
if [ "$STAGE" = test ] || [ "$STAGE" = all ]; then
  python3 -m pytest -q tests -p no:cacheprovider > "$OUT/tests.log" 2>&1
  echo "pytest: exit $?"; grep -E "passed|failed|^FAILED|^ERROR" "$OUT/tests.log" | tail -15
  for tool in memcheck racecheck; do
    compute-sanitizer --tool $tool --error-exitcode 3 python3 scripts/sanitize_steps.py > "$OUT/sanitizer-$tool.log" 2>&1
    echo "compute-sanitizer $tool: exit $?"; grep -E "ERROR SUMMARY|ran every" "$OUT/sanitizer-$tool.log" | tail -3
  done
fi
if [ "$STAGE" = bench ] || [ "$STAGE" = all ]; then
  python3 -m uba_fused.bench ${BENCH_ARGS:---presets gpt2-medium} --json "$OUT/bench.json" --plot "$OUT/bench.png" \
    2>"$OUT/bench.err" | tee "$OUT/bench.txt"
fi
