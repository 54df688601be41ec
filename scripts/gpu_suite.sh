#!/usr/bin/env bash
# The one command for a GPU host: engine-level GPU suite, kernel GPU tests, quick e2e bench.
#
#   scripts/gpu_suite.sh [engine|kernels|bench|all ...]      (default: all)
#
# Everything lands under $OUT (default ./gpu-out): gpu-suite.json, logs/ (one log per
# engine), *-pytest.txt, runs/e2e-<gpu>.{json,md,png}, jit-cache.tgz, summary.txt.
# Uses the offline bundle when .gpu-bundle/ is present (sources setup.sh, installs this
# package into /tmp/sglang-site). Budget: engine ~6 min, kernels ~1 min, bench ~1.5 min.
# Env: GPU_SUITE_PARALLEL (3), GPU_SUITE_CHECKS (full|strict|idle|none), GPU_SUITE_REUSE=1
# (re-assert an existing gpu-suite.json), JIT_CACHE_TGZ (restore kernel JIT caches).
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD
export OUT="${OUT:-$ROOT/gpu-out}"
mkdir -p "$OUT"
PARTS=("$@")
[ ${#PARTS[@]} -eq 0 ] && PARTS=(all)
PY="${PYTHON:-python3}"
T0=$(date +%s)

if [ -f .gpu-bundle/setup.sh ]; then
  # shellcheck disable=SC1091
  source .gpu-bundle/setup.sh
  # (re)install the plugin with its entry point so SGLang's load_plugins() finds it
  "$PY" -m pip install -q --no-deps --no-build-isolation --no-index --upgrade --target /tmp/sglang-site . \
    >"$OUT/pip-install.txt" 2>&1 || { echo "plugin install failed, see $OUT/pip-install.txt"; exit 2; }
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export SGLANG_GEMMA4_CKPT_ROOT="${SGLANG_GEMMA4_CKPT_ROOT:-$HOME/.cache/sglang-gemma4/ckpt}"

# kernel JIT caches (tvm-ffi, flashinfer): restoring them skips ~80 s on a fresh host
if [ -n "${JIT_CACHE_TGZ:-}" ] && [ -f "$JIT_CACHE_TGZ" ]; then
  tar -C "$HOME" -xzf "$JIT_CACHE_TGZ" && echo "restored JIT caches from $JIT_CACHE_TGZ"
fi

"$PY" -m sglang_gemma4.cli status >"$OUT/status.txt" 2>&1
"$PY" - <<'PYEOF' >"$OUT/env.txt" 2>&1
import json, sys
from sglang_gemma4.cli import versions
print(json.dumps(versions(), indent=1)); print(sys.executable)
PYEOF

declare -A RC
want() { for p in "${PARTS[@]}"; do [ "$p" = all ] || [ "$p" = "$1" ] && return 0; done; return 1; }

if want engine; then
  echo "== engine suite (test/gpu) =="
  timeout 560 "$PY" -m pytest test/gpu -q -p no:cacheprovider -rfE 2>&1 | tee "$OUT/engine-pytest.txt"
  RC[engine]=${PIPESTATUS[0]}
fi
if want kernels; then
  echo "== kernel GPU tests (test/kernels) =="
  timeout 240 "$PY" -m pytest test/kernels -q -p no:cacheprovider -rfE 2>&1 | tee "$OUT/kernels-pytest.txt"
  RC[kernels]=${PIPESTATUS[0]}
fi
if want bench; then
  echo "== e2e bench (quick) =="
  timeout 300 "$PY" bench/e2e.py --quick --out "$OUT/runs" 2>&1 | tee "$OUT/bench.txt"
  RC[bench]=${PIPESTATUS[0]}
fi

( cd "$HOME" && tar -czf "$OUT/jit-cache.tgz" --ignore-failed-read .cache/tvm-ffi .cache/flashinfer 2>/dev/null ) || true
{
  echo "parts: ${PARTS[*]}  wall: $(( $(date +%s) - T0 ))s"
  for k in "${!RC[@]}"; do echo "$k: rc=${RC[$k]}"; done
} | tee "$OUT/summary.txt"
for k in "${!RC[@]}"; do [ "${RC[$k]}" = 0 ] || exit 1; done
exit 0
