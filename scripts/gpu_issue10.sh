#!/usr/bin/env bash
# Issue #10 on one GPU call (~8 min): window-lossless suite with the fixes (defaults), without them
# (both knobs 0: the listed engines must fail), and the plain-SGLang repro.
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 SGLANG_GEMMA4_CKPT_ROOT=/tmp/ck
OUT="${OUT:-$PWD/gpu-out}"; W=/tmp/w10; mkdir -p "$OUT" $W
if [ -f .gpu-bundle/setup.sh ]; then
  source .gpu-bundle/setup.sh
  python3 -m pip install -q --no-deps --no-build-isolation --no-index --upgrade --target /tmp/sglang-site . >/dev/null 2>&1
fi
T=test/gpu/test_window_lossless_gpu.py
OUT=$W/fixed timeout "${FIXED_S:-480}" python3 -m pytest $T -q -rfEs -p no:cacheprovider 2>&1 | tee $OUT/fixed.txt
SGLANG_GEMMA4_TRITON_SWA_WINDOW=0 SGLANG_GEMMA4_TREE_VERIFY_SWA=0 WINDOW_LOSSLESS_ENGINES=nospec,owner_nospec,spec_v2_0,spec_v2_1_topk2 OUT=$W/nofix \
  timeout 200 python3 -m pytest $T -q -rfEs -p no:cacheprovider > $OUT/nofix.txt 2>&1 &
timeout 200 python3 crash_repro/spec_swa_window_divergence/repro.py --out $W/repro 2>&1 | tee $OUT/repro.txt
wait
tail -30 $OUT/nofix.txt
for d in fixed nofix; do cp $W/$d/window-lossless/window-lossless.json $OUT/$d.json 2>/dev/null; done
cp $W/repro/window-lossless.json $OUT/repro.json 2>/dev/null
tar czf $OUT/logs.tgz -C $W . 2>/dev/null
ls -la $OUT
