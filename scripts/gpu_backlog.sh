#!/usr/bin/env bash
# GPU validations, one name each. Each part fits one <=10-minute device call; results land under $OUT.
# Recorded results (which part produced which file, earlier runs): runs/README.md.
#   scripts/gpu_backlog.sh swa|window|suite|demo|repro|yoco|modes|mm|fused|kernels|bench-kernels|bench-tune|bench-e2e|bench-spec|bench-enc|bench-layer|sanitizer|serving|serve-e4b|serve-e4b-yoco|serve-small|serve-e2b|serve-26b|serve-26b-swa|mtp-e4b|mtp-e4b-v2|mtp-nosync|nosync-modes|mtp-26b|mtp-26b-v2|mtp-26b-verify|verify-splitkv|verify-splitkv-modes|verify-all|decode-attn|decode-splits-ab|prof-26b|e4b-all|fusion-ab
#   scripts/gpu_backlog.sh lanes "repro demo suite" "yoco modes" ...   test parts only: each quoted lane runs its
#     parts in order, lanes run at the same time (engines at GPU_ENGINE_MEM_FRACTION=0.08), all stop by
#     LANES_DEADLINE_S (540) so $OUT/lanes.tgz (every output + engine log) is written inside a 600 s call.
set -u
cd "$(dirname "$0")/.."
export OUT="${OUT:-$PWD/gpu-out}" PYTHONUNBUFFERED=1
mkdir -p "$OUT"
if [ -f .gpu-bundle/setup.sh ] && [ -z "${GPU_BACKLOG_READY:-}" ]; then  # once: lanes' parts inherit it
  # shellcheck disable=SC1091
  source .gpu-bundle/setup.sh
  python3 -m pip install -q --no-deps --no-build-isolation --no-index --upgrade --target /tmp/sglang-site . >/dev/null 2>&1
  export GPU_BACKLOG_READY=1
fi
PY=python3
# the lossless FROZEN_KV_MTP modes test with one knob set (KNOB=VALUE), then which engine logs show the patch's
# line (regex $2): modes_with KNOB=VALUE REGEX OUTFILE
modes_with() {
  env "$1" $PY -m pytest test/gpu/test_frozen_kv_mtp_modes.py -q -s -rfE 2>&1 | tee "$OUT/$3"
  grep -H "$2" "$OUT"/logs/*.log 2>/dev/null | sed "s/^/fired: /" | tee -a "$OUT/$3"
}
# serve-*/mtp-*/prof-*/e4b-*/fusion-*/*modes: greedy loads never reach flashinfer's sampler, so skip its ~100 s
# first-build (jit_prewarm) on a fresh device (97 s of the modes part's first engine on 2026-12-04); the serving
# soak (part "serving") keeps it on, since it tests that.
case "${1:-}" in serve-*|mtp-*|prof-*|e4b-*|fusion-*|*modes) export SGLANG_GEMMA4_JIT_PREWARM="${SGLANG_GEMMA4_JIT_PREWARM:-0}" ;; esac
if [ "${1:-}" = lanes ]; then
  shift
  export GPU_ENGINE_MEM_FRACTION="${GPU_ENGINE_MEM_FRACTION:-0.08}"
  deadline=$(( $(date +%s) + ${LANES_DEADLINE_S:-540} ))
  mkdir -p "$OUT/lanes"
  i=0
  for lane in "$@"; do
    i=$((i + 1))
    ( for part in $lane; do
        left=$(( deadline - $(date +%s) ))
        [ "$left" -le 5 ] && { echo "== $part: skipped (lane deadline)"; continue; }
        echo "== $part (lane $i, ${left}s left) $(date +%T)"
        OUT="$OUT/lanes/$part" timeout -k 5 "$left" bash "$0" "$part" >"$OUT/lanes/$part.log" 2>&1
        echo "== $part rc=$? $(date +%T)"
      done ) >"$OUT/lanes/lane$i.txt" 2>&1 &
  done
  wait
  cat "$OUT"/lanes/lane*.txt | tee "$OUT/lanes-summary.txt"
  for f in "$OUT"/lanes/*.log; do echo "== $f"; tail -n 25 "$f"; done >"$OUT/lanes-tails.txt"
  tar -czf "$OUT/lanes.tgz" -C "$OUT" lanes && rm -rf "$OUT/lanes"
  exit 0
fi
case "${1:-}" in
  swa)   # triton SWA decode-window fix: regret vs fp32, spec vs no-spec
    $PY -m pytest test/gpu/test_triton_swa_window_gpu.py -q -s 2>&1 | tee "$OUT/swa.txt" ;;
  window) # issue #10: spec == plain == fp32 reference past the window (7 engines, ~5 min)
    $PY -m pytest test/gpu/test_window_lossless_gpu.py -q -s -rfE 2>&1 | tee "$OUT/window.txt" ;;
  suite) # engine suite: plugin on vs off, FROZEN_KV_MTP pairs vs no-spec (calibrated comparison rule)
    $PY -m pytest test/gpu/test_engine_plugin.py test/gpu/test_engine_spec.py -q -rfE 2>&1 | tee "$OUT/suite.txt" ;;
  demo)  $PY -m sglang_gemma4.cli demo 2>&1 | tee "$OUT/demo.txt"
          $PY -m sglang_gemma4.cli demo --spec 2>&1 | tee -a "$OUT/demo.txt" ;;
  modes) $PY -m pytest test/gpu/test_frozen_kv_mtp_modes.py -q -s -rfE 2>&1 | tee "$OUT/modes.txt" ;;
  kernels) $PY -m pytest test/kernels -q -rfE 2>&1 | tee "$OUT/kernels.txt" ;;
  repro) # crash_repro scripts on the H200 (paste outputs into the REPORT.md files)
    for f in crash_repro/*/repro.py; do echo "== $f"; timeout 420 $PY "$f"; done 2>&1 | tee "$OUT/repro.txt" ;;
  yoco)  $PY -m pytest test/gpu/test_yoco_gpu.py -q -rfE 2>&1 | tee "$OUT/yoco.txt" ;;
  mm)    $PY -m pytest test/gpu/test_mm_engine_gpu.py test/gpu/test_batched_encoder_gpu.py -q -s -rfE 2>&1 | tee "$OUT/mm.txt" ;;
  fused) $PY -m pytest test/gpu/test_fused_layers_gpu.py -q -rfE 2>&1 | tee "$OUT/fused.txt" ;;
  bench-kernels) $PY bench/kernels.py --out "$OUT/runs" 2>&1 | tee "$OUT/bench-kernels.txt" ;;  # table, ~200 s
  bench-tune) # tile sweeps only (the table does not fit in the same call)
    timeout 240 $PY bench/kernels.py --out "$OUT/tune-r" --ops routing --tune --tune-only --tune-t 1024,8192,32768 2>&1 | tee "$OUT/tune.txt"
    timeout 320 $PY bench/kernels.py --out "$OUT/tune-g" --ops gelu_tanh_mul --tune --tune-only --tune-t 1,8,256,8192,32768 2>&1 | tee -a "$OUT/tune.txt" ;;
  bench-e2e) # fused triple-norm / PLE engine A/B, 256-token decode windows, best of 3 (scheduler-bound at these depths)
    $PY bench/e2e.py --variants moe26b_w,moe26b_w8 --ab SGLANG_GEMMA4_FUSED_TRIPLE_NORM=0,1 --batch 1,8 --repeat 3 --decode-tokens 256 --parallel 1 --out "$OUT/runs"
    $PY bench/e2e.py --variants e4b_w --ab SGLANG_GEMMA4_FUSED_PLE=0,1 --batch 1,8 --repeat 3 --decode-tokens 256 --parallel 1 --out "$OUT/runs-ple" ;;
  prof-26b) # issues #17/#20: 26B-A4B on/off at equal static budget and equal concurrency (3000/100 capped at 24
    # running, which both pools hold), c1 TPOT, and the decode-step kernel profile at batch 1/16, 1k/8k context
    $PY bench/serve.py --model 26b --arms on,off --static-gib "${SERVE_STATIC_GIB:-62}" --repeat 3 \
      --deadline-s "${SERVE_DEADLINE_S:-430}" --extra-server-args "--max-running-requests 24 ${SERVE_EXTRA:-}" \
      --workloads "${SERVE_WORKLOADS:-tpot_3000_100,chat_c1}" \
      --profile "${SERVE_PROFILE-on:chat_c1,off:chat_c1,on:chat_c16@0.8,on:ctx8k_c1@3,on:ctx8k_c16@8}" --profiles-first \
      --out "$OUT/prof-26b" 2>&1 | tee "$OUT/prof-26b.txt" ;;
  e4b-all) # issues #17/#19/#20 in one call: E4B on/off (c16 TTFT question, c1 TPOT), FROZEN_KV_MTP V2=1/0 at
    # batch 1/8 (overlap vs sync), decode-step profiles (GPU activity only: with CPU activity the 42-layer server
    # stalled >240 s writing its trace; traced after the timed runs so a stalled trace cannot cost them)
    V1="spec+SGLANG_FROZEN_KV_MTP_V2=1"; V0="spec+SGLANG_FROZEN_KV_MTP_V2=0"
    $PY bench/serve.py --model e4b --arms "on,off,$V1,$V0" --repeat 3 --max-total-tokens 100000 --mem-fraction-static 0.88 \
      --extra-server-args "--max-running-requests 64 ${SERVE_EXTRA:-}" --deadline-s "${SERVE_DEADLINE_S:-470}" \
      --workloads "${SERVE_WORKLOADS:-ttft_c16,chat_c1,chat_c8}" \
      --only "ttft_c16=on|off" --only "chat_c1=on|off|$V1" --only "chat_c8=on|$V1|$V0" \
      --profile "${SERVE_PROFILE-on:chat_c1,$V1:chat_c8@0.8,$V0:chat_c8@0.8}" --bench-timeout 90 \
      --out "$OUT/e4b-all" 2>&1 | tee "$OUT/e4b-all.txt" ;;
  bench-spec) # issue #5: FROZEN_KV_MTP spec-v2 overlap vs synchronous, tokens/s
    $PY bench/e2e.py --with-spec --variants agree_target,dense_ple --ab SGLANG_FROZEN_KV_MTP_V2=0,1 --batch 1,8 --repeat 3 --parallel 1 \
      --out "$OUT/runs-spec" 2>&1 | tee "$OUT/bench-spec.txt" ;;
  bench-layer) # per-layer GPU time in CUDA graphs, fused on vs off (the engine A/B is CPU-bound at reduced depth)
    $PY bench/layer.py --out "$OUT/runs" 2>&1 | tee "$OUT/bench-layer.txt" ;;
  sanitizer) # compute-sanitizer memcheck over the compiled kernel tests (current tile defaults)
    compute-sanitizer --tool memcheck --error-exitcode 9 $PY -m pytest test/kernels -q -k gpu -p no:cacheprovider 2>&1 \
      | tee "$OUT/sanitizer.txt"; echo "sanitizer rc=${PIPESTATUS[0]}" | tee -a "$OUT/sanitizer.txt" ;;
  serving) # issue #18: launch_server soak, faults, bad input, fresh-host first sampled request (one call, ~8 min)
    $PY -m pytest test/gpu/test_serving_gpu.py test/patches/test_jit_prewarm.py -q -rfE 2>&1 | tee "$OUT/serving.txt" ;;
  serve-e4b) # issue #17: full-depth E4B, plugin on/off + FROZEN_KV_MTP, servers alive together
    $PY bench/serve.py --model e4b --arms on,off,spec --repeat 3 --deadline-s "${SERVE_DEADLINE_S:-480}" \
      --workloads "${SERVE_WORKLOADS:-tpot_3000_100,yoco_7000_10,long_ttft_c1,chat_c1,ttft_c16,chat_c32,decode_100_500}" \
      --out "$OUT/serve-e4b" 2>&1 | tee "$OUT/serve-e4b.txt" ;;
  serve-e4b-yoco) # issues #17/#20: full-depth E4B, whole plugin and the YOCO graph rule A/B (the c16 TTFT question), profiles
    $PY bench/serve.py --model e4b --arms on,off,SGLANG_GEMMA4_YOCO=0,SGLANG_GEMMA4_YOCO_EAGER_MIN_ROWS=1000000 --repeat 3 \
      --deadline-s "${SERVE_DEADLINE_S:-480}" --max-total-tokens 100000 --mem-fraction-static 0.88 \
      --workloads "${SERVE_WORKLOADS:-yoco_7000_10,ttft_c16,chat_c1,long_ttft_c1}" \
      --profile "${SERVE_PROFILE-on:chat_c1,off:chat_c1,on:ttft_c16,off:ttft_c16}" --out "$OUT/serve-e4b" 2>&1 | tee "$OUT/serve-e4b.txt" ;;
  serve-e2b) # issue #17: full-depth E2B (YOCO target 7000/10 >= 1.5x)
    $PY bench/serve.py --model e2b --arms on,off,SGLANG_GEMMA4_YOCO=0 --repeat 3 --deadline-s "${SERVE_DEADLINE_S:-480}" \
      --max-total-tokens 100000 --mem-fraction-static 0.88 --workloads "${SERVE_WORKLOADS:-yoco_7000_10,tpot_3000_100,ttft_c16,chat_c1}" \
      --out "$OUT/serve-e2b" 2>&1 | tee "$OUT/serve-e2b.txt" ;;
  serve-small) # issues #17/#18/#20 in one call: E4B (on/off/graph-always) and E2B (on/off) servers plus the mm bad-image
    # arm, all started together; one file lock serialises every measured load, and the mm soak holds it first
    L="$OUT/bench.lock"; : >"$L"
    ( flock 9; SERVING_ARMS=mm_images timeout -k 5 300 bash "$0" serving ) 9>"$L" >"$OUT/mm.log" 2>&1 &
    sleep 2
    $PY bench/serve.py --model e2b --arms on,off --repeat 3 --deadline-s "${SERVE_DEADLINE_S:-440}" --bench-lock "$L" \
      --max-total-tokens 100000 --mem-fraction-static 0.88 --workloads "${SERVE_E2B_WORKLOADS:-yoco_7000_10}" \
      --out "$OUT/serve-e2b" >"$OUT/serve-e2b.txt" 2>&1 &
    $PY bench/serve.py --model e4b --arms on,off,SGLANG_GEMMA4_YOCO_EAGER_MIN_ROWS=1000000 --repeat 3 --bench-lock "$L" \
      --deadline-s "${SERVE_DEADLINE_S:-440}" --max-total-tokens 100000 --mem-fraction-static 0.88 \
      --workloads "${SERVE_WORKLOADS:-yoco_7000_10,ttft_c16,chat_c1}" --profile "${SERVE_PROFILE-on:chat_c1,off:chat_c1}" \
      --out "$OUT/serve-e4b" 2>&1 | tee "$OUT/serve-e4b.txt"
    wait ;;
  serve-26b) # issue #17: full-depth 26B-A4B, equal static budgets (swa_ratio sizes pools as in production)
    $PY bench/serve.py --model 26b --arms "${SERVE_ARMS:-on,off}" --static-gib "${SERVE_STATIC_GIB:-62}" --repeat 3 \
      --deadline-s "${SERVE_DEADLINE_S:-480}" --extra-server-args "${SERVE_EXTRA:-}" \
      --workloads "${SERVE_WORKLOADS:-tpot_3000_100,summ_8000_200,chat_c1,chat_c32,decode_100_500}" \
      --profile "${SERVE_PROFILE-on:chat_c1,off:chat_c1}" --out "$OUT/serve-26b" 2>&1 | tee "$OUT/serve-26b.txt" ;;
  serve-26b-swa) # issue #17: swa_ratio alone (plugin on both arms), 8k summarisation where the full pool binds
    SERVE_ARMS=on,SGLANG_GEMMA4_SWA_RATIO=0 SERVE_WORKLOADS=summ_8000_200,tpot_3000_100 SERVE_PROFILE=, bash "$0" serve-26b ;;
  mtp-e4b) # issue #19: FROZEN_KV_MTP step cost vs plain, V2=0/1, batch 1..48 (cap raised past SGLang's 48 default)
    $PY bench/serve.py --model e4b --arms "on,spec+SGLANG_FROZEN_KV_MTP_V2=0,spec+SGLANG_FROZEN_KV_MTP_V2=1" --repeat 3 \
      --max-total-tokens 100000 --mem-fraction-static 0.88 --extra-server-args "--max-running-requests 64 ${SERVE_EXTRA:-}" \
      --deadline-s "${SERVE_DEADLINE_S:-480}" --workloads "${SERVE_WORKLOADS:-chat_c1,chat_c8,chat_c16,chat_c48}" \
      --profile "${SERVE_PROFILE:-spec+SGLANG_FROZEN_KV_MTP_V2=1:chat_c8,spec+SGLANG_FROZEN_KV_MTP_V2=0:chat_c8}" \
      --profile-activities CPU,GPU --out "$OUT/mtp-e4b" 2>&1 | tee "$OUT/mtp-e4b.txt" ;;
  fusion-ab) # issue #20: the default-off fusions' GPU tests, then one of them A/B'd on a full-depth model:
    # FUSION=SGLANG_GEMMA4_FUSED_NEXT_INPUT_NORM (26B MoE layers) or SGLANG_GEMMA4_FUSED_QKV_NORM_ROPE (any model),
    # SERVE_MODEL=26b (equal 62 GiB static budgets) or e4b; c1 TPOT at 1k/8k and the decode profile of both arms
    $PY -m pytest test/kernels/test_tail_next_norm.py test/kernels/test_qkv_norm_rope.py \
      test/patches/test_fused_next_input_norm.py test/patches/test_fused_qkv_norm_rope.py \
      test/gpu/test_fused_layers_gpu.py -k "next_input_norm or tail_next_norm or qkv_norm_rope" -q -rfE 2>&1 | tee "$OUT/fusion-tests.txt"
    F="${FUSION:-SGLANG_GEMMA4_FUSED_NEXT_INPUT_NORM}=1"; M="${SERVE_MODEL:-26b}"
    MEM="--static-gib ${SERVE_STATIC_GIB:-62}"; [ "$M" = 26b ] || MEM="--max-total-tokens 100000 --mem-fraction-static 0.88"
    $PY bench/serve.py --model "$M" --arms "on,$F" --base on $MEM --repeat 3 \
      --deadline-s "${SERVE_DEADLINE_S:-420}" --extra-server-args "--max-running-requests 24 ${SERVE_EXTRA:-}" \
      --workloads "${SERVE_WORKLOADS:-chat_c1,ctx8k_c1}" --profile "on:ctx8k_c1@3,$F:ctx8k_c1@3" --profiles-first \
      --out "$OUT/fusion-ab" 2>&1 | tee "$OUT/fusion-ab.txt" ;;
  decode-splits-ab) # issue #20: decode_kv_splits (triton decode split cap, default off) A/B on full-depth 26B-A4B,
    # equal 62 GiB static budgets, c1 at 1k / 8k and c8; SPLITS_CAP sets the cap (default the patch's 32)
    A="SGLANG_GEMMA4_DECODE_KV_SPLITS=1"; [ -n "${SPLITS_CAP:-}" ] && A="$A+SGLANG_GEMMA4_DECODE_KV_SPLITS_CAP=$SPLITS_CAP"
    $PY bench/serve.py --model 26b --arms "on,$A" --base on --static-gib "${SERVE_STATIC_GIB:-62}" --repeat 3 \
      --deadline-s "${SERVE_DEADLINE_S:-420}" --extra-server-args "${SERVE_EXTRA:-}" \
      --workloads "${SERVE_WORKLOADS:-chat_c1,ctx8k_c1,chat_c8}" --out "$OUT/decode-splits-ab" 2>&1 | tee "$OUT/decode-splits-ab.txt" ;;
  mtp-e4b-v2) # issue #19: overlap (V2=1) vs synchronous (V2=0) FROZEN_KV_MTP at full E4B size, the two spec servers
    # only (fits a short call); ratios V2=1 / V2=0
    V1="spec+SGLANG_FROZEN_KV_MTP_V2=1"; V0="spec+SGLANG_FROZEN_KV_MTP_V2=0"
    $PY bench/serve.py --model e4b --arms "$V1,$V0" --base "$V0" --repeat 3 --max-total-tokens 100000 --mem-fraction-static 0.88 \
      --extra-server-args "--max-running-requests 64 ${SERVE_EXTRA:-}" --deadline-s "${SERVE_DEADLINE_S:-400}" --bench-timeout 60 \
      --workloads "${SERVE_WORKLOADS:-chat_c8,chat_c1}" --out "$OUT/mtp-e4b-v2" 2>&1 | tee "$OUT/mtp-e4b-v2.txt" ;;
  mtp-nosync) # issue #19: the draft step without its per-step .item() (SGLANG_GEMMA4_MTP_DRAFT_NO_SYNC): its GPU
    # tests, then overlap as SGLang ships it vs overlap + the fix vs synchronous at full E4B size (ratios vs SGLang's
    # overlap), then the lossless FROZEN_KV_MTP modes (spec greedy == plain, leak checks on) with the fix on
    t0=$(date +%s)
    $PY -m pytest test/gpu/test_mtp_draft_no_sync_gpu.py test/patches/test_mtp_draft_no_sync.py \
      test/patches/test_fused_next_input_norm.py test/kernels/test_tail_next_norm.py -q -rfE 2>&1 | tee "$OUT/nosync-tests.txt"
    V1="spec+SGLANG_FROZEN_KV_MTP_V2=1"; V0="spec+SGLANG_FROZEN_KV_MTP_V2=0"
    $PY bench/serve.py --model e4b --arms "$V1,$V1+SGLANG_GEMMA4_MTP_DRAFT_NO_SYNC=1,$V0" --base "$V1" --repeat 3 \
      --max-total-tokens 100000 --mem-fraction-static 0.88 --bench-timeout 60 --deadline-s "${SERVE_DEADLINE_S:-300}" \
      --extra-server-args "--max-running-requests 64 --cuda-graph-backend-prefill disabled ${SERVE_EXTRA:-}" \
      --workloads "${SERVE_WORKLOADS:-chat_c8,chat_c1}" --out "$OUT/mtp-nosync" 2>&1 | tee "$OUT/mtp-nosync.txt"
    left=$(( ${PART_BUDGET_S:-555} - ($(date +%s) - t0) ))
    echo "== modes with the fix on (${left}s left)"
    [ "$left" -gt 30 ] && timeout -k 5 "$left" bash "$0" nosync-modes
    grep -l "draft step sized from the host" "$OUT"/mtp-nosync/logs/*.log 2>/dev/null | sed 's/^/fix fired: /' ;;
  nosync-modes) # issue #19: the lossless FROZEN_KV_MTP modes (spec greedy == plain, leak checks on) with
    # SGLANG_GEMMA4_MTP_DRAFT_NO_SYNC=1; its 8-running engines reach the verify graph's captured max batch, where
    # the row-sized mask must fall back to SGLang's exact draft (the overflow of session 12)
    modes_with SGLANG_GEMMA4_MTP_DRAFT_NO_SYNC=1 "draft step sized from the host\|bounded tree mask would not fit" \
      nosync-modes.txt ;;
  mtp-26b) # issue #19 on 26B-A4B: one V2 mode per call (MTP_V2=0|1), equal static budgets
    SERVE_ARMS="on,spec+SGLANG_FROZEN_KV_MTP_V2=${MTP_V2:-1}" SERVE_WORKLOADS="${SERVE_WORKLOADS:-chat_c1,chat_c8,chat_c16}" \
      SERVE_PROFILE="${SERVE_PROFILE-spec+SGLANG_FROZEN_KV_MTP_V2=${MTP_V2:-1}:chat_c1}" bash "$0" serve-26b ;;
  mtp-26b-v2) # issue #19 on 26B-A4B: overlap (V2=1) vs synchronous (V2=0), the two spec servers side by side at
    # equal static budgets (ratios V2=1 / V2=0), each one's speculative step traced first (GPU only: a CPU+GPU trace of the 26B overlap server
    # did not finish in 150 s, and that server then answered no timed run)
    V1="spec+SGLANG_FROZEN_KV_MTP_V2=1"; V0="spec+SGLANG_FROZEN_KV_MTP_V2=0"
    $PY bench/serve.py --model 26b --arms "$V1,$V0" --base "$V0" --static-gib "${SERVE_STATIC_GIB:-62}" --repeat 3 \
      --deadline-s "${SERVE_DEADLINE_S:-430}" --bench-timeout 60 --extra-server-args "${SERVE_EXTRA:-}" \
      --workloads "${SERVE_WORKLOADS:-chat_c1,chat_c16}" --profile "$V1:chat_c1,$V0:chat_c1" --profiles-first \
      --profile-activities "${SERVE_PROFILE_ACTIVITIES:-GPU}" --out "$OUT/mtp-26b-v2" 2>&1 | tee "$OUT/mtp-26b-v2.txt" ;;
  verify-splitkv) # issue #19: the split-KV target-verify kernel compiled at Gemma-4 widths (tests vs fp32 and SGLang's
    # extend kernel; the patch's tests are CPU-interpreter only), then the kernel bench vs SGLang (VERIFY_BENCH=full
    # for all batches)
    $PY -m pytest test/kernels/test_verify_attention.py -q -rfE 2>&1 | tee "$OUT/verify-tests.txt"
    $PY bench/verify_attention.py --out "$OUT/runs" --fp8 --splits "${VERIFY_SPLITS:-2,4,8,16,32}" --tiles "${VERIFY_TILES:-16x4,32x8,64x8}" $([ "${VERIFY_BENCH:-quick}" = full ] || echo --quick) 2>&1 | tee "$OUT/verify-bench.txt" ;;
  verify-splitkv-modes) # issue #19: lossless FROZEN_KV_MTP modes (spec greedy == plain, leak checks) with the kernel on
    modes_with SGLANG_GEMMA4_VERIFY_SPLITKV=1 "split-KV target-verify attention" verify-modes.txt ;;
  decode-attn) # issues #19/#20: plain decode attention, SGLang's triton kernel at split caps 8/16/32/64 vs ours at L=1
    $PY bench/decode_attention.py --out "$OUT/runs" $([ "${DECODE_BENCH:-quick}" = full ] || echo --quick) 2>&1 | tee "$OUT/decode-attn.txt" ;;
  verify-all) # issues #19/#20, one call: verify-splitkv (kernel tests + bench, <= 270 s), then decode-attn in what
    # is left of PART_BUDGET_S (555); the lossless modes (verify_splitkv is on by default) are part "modes"
    t0=$(date +%s)
    timeout -k 5 270 bash "$0" verify-splitkv
    left=$(( ${PART_BUDGET_S:-555} - ($(date +%s) - t0) ))
    echo "== decode-attn (${left}s left)"
    [ "$left" -gt 30 ] && timeout -k 5 "$left" bash "$0" decode-attn ;;
  mtp-26b-verify) # issue #19 on 26B-A4B: FROZEN_KV_MTP V2=1 with the split-KV verify kernel vs without, side by side
    # (equal static budgets), then each one's step traced; ratios vs SGLang's verify
    V1="spec+SGLANG_FROZEN_KV_MTP_V2=1"
    $PY bench/serve.py --model 26b --arms "$V1,$V1+SGLANG_GEMMA4_VERIFY_SPLITKV=1" --base "$V1" --static-gib "${SERVE_STATIC_GIB:-62}" \
      --repeat 3 --deadline-s "${SERVE_DEADLINE_S:-430}" --bench-timeout 60 --extra-server-args "${SERVE_EXTRA:-}" \
      --workloads "${SERVE_WORKLOADS:-chat_c1,chat_c16}" $([ "${SERVE_PROFILE:-1}" = 0 ] || echo --profile "$V1+SGLANG_GEMMA4_VERIFY_SPLITKV=1:chat_c1") \
      --out "$OUT/mtp-26b-verify" 2>&1 | tee "$OUT/mtp-26b-verify.txt" ;;
  bench-enc) $PY bench/encoder.py --out "$OUT/runs" --mm-attention-backend triton_attn --quick 2>&1 | tee "$OUT/bench-enc.txt" ;;
  *) echo "usage: $0 lanes|$(sed -n 4p "$0" | sed 's/.*gpu_backlog.sh //')"; exit 2 ;;
esac
