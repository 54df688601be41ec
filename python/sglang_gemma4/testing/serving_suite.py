"""The serving robustness suite (issue #18): every server configuration, soaked at once on one GPU.

Shared by ``test/gpu/test_serving_gpu.py`` (assertions) and ``bench/soak.py``
(recorded results in runs/). One call: all servers start together (tiny
margin-checked ``agree`` pair with SGLang's leak/invariant checks on, a
full-depth E4B on dummy weights, FROZEN_KV_MTP with ``SGLANG_FROZEN_KV_MTP_V2``
unset/0/1 (and 1 with the no-sync draft step), radix cache on/off, the plugin off), each gets the soak of
:mod:`sglang_gemma4.testing.soak`, and two servers on empty flashinfer JIT
caches time the first sampled request with and without ``jit_prewarm``.
``SERVING_ARMS=a,b`` runs only those arms.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
import zlib
from pathlib import Path

CONTEXT = 1024
N_REQ = int(os.environ.get("SERVING_SOAK_N", "500"))
CONC = 48


def serving_arms(target, draft, e4b, mm):
    base = ["--skip-tokenizer-init", "--attention-backend", "triton", "--context-length", str(CONTEXT),
            "--max-total-tokens", "32768", "--mem-fraction-static", "0.9", "--cuda-graph-max-bs", "16",
            "--random-seed", "0"]
    from sglang_gemma4.testing.server import spec_args

    spec = spec_args(draft)
    fresh = lambda tag: {"FLASHINFER_WORKSPACE_BASE": tempfile.mkdtemp(prefix=f"fi-{tag}-")}  # noqa: E731
    return {
        # name: (model, args, env, checks, soak?)
        "plain": (target, base, {}, "full", True),
        "plain_no_radix": (target, base + ["--disable-radix-cache"], {}, "full", True),
        "mtp_v2_unset": (target, base + spec, {}, "full", True),
        "mtp_v2_0": (target, base + spec, {"SGLANG_FROZEN_KV_MTP_V2": "0"}, "full", True),
        "mtp_v2_1": (target, base + spec, {"SGLANG_FROZEN_KV_MTP_V2": "1"}, "full", True),
        # the overlap draft step without its seq_lens .item() (default-off patch): aborts and mixed load on the bound path
        "mtp_v2_1_nosync": (target, base + spec, {"SGLANG_FROZEN_KV_MTP_V2": "1", "SGLANG_GEMMA4_MTP_DRAFT_NO_SYNC": "1"},
                            "full", True),
        # the split-KV target-verify kernel (default-off patch) under the same load, aborts and bad input
        "mtp_v2_1_verify": (target, base + spec, {"SGLANG_FROZEN_KV_MTP_V2": "1", "SGLANG_GEMMA4_VERIFY_SPLITKV": "1"},
                            "full", True),
        "plugin_off": (target, base, {"SGLANG_PLUGINS": "none"}, "full", True),
        "e4b_full_dummy": (e4b, base + ["--load-format", "dummy"], {}, "idle", True),
        # multimodal checkpoint (processor files inside): broken images, then a good one
        "mm_images": (mm, base + ["--enable-multimodal", "--mm-attention-backend", "triton_attn"], {}, "full", False),
        # fresh flashinfer JIT cache each: first sampled request with and without the prewarm
        "fresh_prewarm_off": (target, base + spec, {"SGLANG_GEMMA4_JIT_PREWARM": "0", **fresh("off")}, "none", False),
        "fresh_prewarm_on": (target, base + spec, fresh("on"), "none", False),
    }


def run_suite(out: Path) -> dict:
    from sglang_gemma4.testing import checkpoints, fullsize, server as srv, soak

    target, draft = checkpoints.build_pair("agree_target")
    e4b, _ = fullsize.write_model("e4b", out / "models")
    mm = checkpoints.build("mm")
    vocab = checkpoints.spec("agree_target").text.vocab_size
    servers = {}
    only = [a for a in os.environ.get("SERVING_ARMS", "").split(",") if a]
    for name, (model, args, env, checks, _) in serving_arms(target, draft, e4b, mm).items():
        if only and name not in only:
            continue
        servers[name] = srv.make_server(name, model, out / "logs", args, env=env, checks=checks)
    res = {"date": time.strftime("%Y-%m-%d"), "n_requests": N_REQ, "concurrency": CONC, "context": CONTEXT,
           "arms": {}}
    try:
        for s in servers.values():
            srv.start(s)
        for name, s in servers.items():
            try:
                srv.wait_ready(s, timeout=540)
            except Exception as e:
                res["arms"][name] = {"start_error": str(e)[-2000:]}
        for name in ("fresh_prewarm_off", "fresh_prewarm_on"):
            s = servers.get(name)
            if s is not None and name not in res["arms"]:
                try:
                    res["arms"][name] = {"ready_s": s.ready_s, "first_sampled_s": round(soak.first_sampled_latency(s), 2),
                                         "second_sampled_s": round(soak.first_sampled_latency(s), 2),
                                         "log_prewarm_line": next((ln for ln in s.log_text().splitlines()
                                                                   if "flashinfer sampling module ready" in ln), None)}
                except Exception as e:
                    res["arms"][name] = {"error": str(e)[-1000:]}
            if s is not None:
                s.stop()
        s = servers.get("mm_images")
        if s is not None and "mm_images" not in res["arms"]:
            try:
                res["arms"]["mm_images"] = {"ready_s": s.ready_s, "alive_before": s.alive(),
                                            "bad_image": soak.mm_bad_image_checks(s, out / "mm-images"),
                                            "alive": s.alive(), "checks_fired": s.checks_fired()[:30]}
            except Exception as e:
                res["arms"]["mm_images"] = {"error": f"{type(e).__name__}: {str(e)[-1500:]}", "alive": s.alive()}
            s.stop()

        def work(name):
            s = servers[name]
            v = 262144 if name.startswith("e4b") else vocab
            try:
                off = name == "plugin_off"
                r = soak.soak(s, N_REQ, CONC, v, CONTEXT, seed=zlib.crc32(name.encode()) % 1000,
                              n_probes=0 if name.startswith("e4b") else 16, skip_bad=soak.ID_CASES if off else ())
                if off:  # SGLang's own answer to the ids that killed it (reference), last: it may die
                    r["id_reference"] = soak.id_reference(s)
                r.update(ready_s=s.ready_s, pools=s.pool_sizes())
                res["arms"][name] = r
            except Exception as e:
                res["arms"][name] = {"error": f"{type(e).__name__}: {str(e)[-1500:]}", "alive": s.alive()}

        todo = [n for n, a in serving_arms(target, draft, e4b, mm).items() if a[4] and n in servers and n not in res["arms"]]
        threads = [threading.Thread(target=work, args=(n,)) for n in todo]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        srv.stop_all(list(servers.values()))
        (out / "serving-robustness.json").write_text(json.dumps(res, indent=1, default=str))
    return res
