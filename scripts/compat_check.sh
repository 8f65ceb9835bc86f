#!/usr/bin/env bash
# Tests under the GPU machine's torch and triton, on this machine's CPU, before a GPU is lent.
#
# CI and `make test` use the pinned torch 2.14.1 and triton 3.8.0. The GPU machine has torch 2.11.0+cu130 and triton
# 3.6.0, and nothing can be installed there. On 2026-12-05 this check found two bugs that only those versions show:
# the compiled step under Inductor, and torch's fused CPU SGD on 16-bit parameters (benchmarks/RESULTS.md).
#
#   bash scripts/compat_check.sh                  tests/test_compile.py and tests/test_optim.py
#   bash scripts/compat_check.sh tests            the whole suite (about 16 minutes on 2 cores)
#   bash scripts/compat_check.sh ARGS...          any pytest arguments
#
# It copies the working tree to $COMPAT_DIR (default /tmp/uba_fused-compat), because an editable build writes the
# extension into the source tree, and builds the extension there against torch $COMPAT_TORCH. Its virtual
# environment holds torch, triton and the build tools. A path file adds .venv's site-packages after them, for the
# test dependencies and the CUDA libraries that torch's wheel loads (the same CUDA 13 major). Run `make setup` first.
set -euo pipefail
TORCH=${COMPAT_TORCH:-2.11.0}
TRITON=${COMPAT_TRITON:-3.6.0}
DIR=${COMPAT_DIR:-/tmp/uba_fused-compat}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
MAIN_SITE=$(ls -d "$ROOT"/.venv/lib/python3*/site-packages)
mkdir -p "$DIR/src"
# the tree as git sees it (tracked, and untracked files not ignored), over the last copy's build outputs
find "$DIR/src" -type f ! -path "$DIR/src/build/*" ! -name '*.so' ! -path '*.egg-info/*' -delete
git -C "$ROOT" ls-files -co --exclude-standard -z | tar -C "$ROOT" --null --ignore-failed-read -T - -cf - |
  tar -C "$DIR/src" -xf -
if [ ! -x "$DIR/venv/bin/python" ] || ! "$DIR/venv/bin/python" -c "import torch, triton, sys
sys.exit(torch.__version__.split('+')[0] != '$TORCH' or triton.__version__ != '$TRITON')"; then
  rm -rf "$DIR/venv"
  python3 -m venv "$DIR/venv"
  "$DIR/venv/bin/python" -m pip install --quiet --no-deps "torch==$TORCH" "triton==$TRITON"
  # the build tools as requirements.txt pins them
  "$DIR/venv/bin/python" -m pip install --quiet --no-deps \
    $(grep -E '^(pip|setuptools|ninja|pybind11)==' "$ROOT/requirements.txt" | cut -d' ' -f1)
  echo "$MAIN_SITE" > "$("$DIR/venv/bin/python" -c 'import site; print(site.getsitepackages()[0])')/zz-main-venv.pth"
fi
cd "$DIR/src"
"$DIR/venv/bin/python" -m pip install --quiet --no-build-isolation --no-deps -e . 2>&1 | grep -v -i warning || true
"$DIR/venv/bin/python" -c "import torch, triton, uba_fused._C; print('torch', torch.__version__, 'triton', triton.__version__)"
[ $# -gt 0 ] || set -- tests/test_compile.py tests/test_optim.py
exec "$DIR/venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
