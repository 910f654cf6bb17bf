#!/usr/bin/env bash
# On a GPU machine without ray/diffusers (the device tool's image), from the repo root:
# installs the devkit (ray, diffusers, ...) and python-multipart, then runs stages.
#
#   bash bench/device.sh tests            # GPU tests       -> $OUT/pytest_gpu.log
#   bash bench/device.sh forward          # bench.forward   -> $OUT/forward.{json,log}
#   bash bench/device.sh run CMD ARGS...  # any command in that environment
#
# The device tool call carries the ignored folders: carry [".devkit", ".cache/gpuwhl"]
# (.cache/gpuwhl holds python_multipart-*.whl; see docs/gpu.md).
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
t0=$SECONDS
bash .devkit/install.sh >>"$OUT/setup.log" 2>&1 || { tail -30 "$OUT/setup.log"; exit 1; }
if compgen -G ".cache/gpuwhl/*.whl" >/dev/null; then
  python3 -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile \
    --upgrade --target /tmp/site .cache/gpuwhl/*.whl >>"$OUT/setup.log" 2>&1
fi
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH RAY_AUTH_MODE=disabled \
  RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
echo "setup: $((SECONDS - t0)) s"
nvidia-smi --query-gpu=index,name,memory.used,memory.total,driver_version --format=csv

stage=${1:-tests}
shift || true
case $stage in
  tests)
    timeout "${TESTS_TIMEOUT_S:-300}" python3 -m pytest tests/gpu -v -s -rA -p no:cacheprovider "$@" \
      2>&1 | tee "$OUT/pytest_gpu.log"
    ;;
  forward)
    CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0} timeout "${FORWARD_TIMEOUT_S:-200}" \
      python3 -m bench.forward --out "$OUT/forward.json" "$@" 2>&1 | tee "$OUT/forward.log"
    ;;
  run)
    "$@"
    ;;
  *)
    echo "unknown stage $stage" >&2
    exit 2
    ;;
esac
