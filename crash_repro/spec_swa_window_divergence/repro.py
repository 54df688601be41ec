"""Reproduce issue #10 on a GPU: FROZEN_KV_MTP and plain decode disagree once the window fills.

Plain SGLang 0.5.17 (``SGLANG_PLUGINS=none``), triton attention, decode CUDA
graphs, on the margin-checked window probe (next token = g(token W-1 back)).
Prints, per prompt, the first output index where each engine leaves the
closed-form chain (which the fp32 transformers model follows with >= 3-logit
margins), and checks the plain engine against an fp32 emulation of a decode
window one key short.

    python crash_repro/spec_swa_window_divergence/repro.py [--out DIR] [--with-fix]

``--with-fix`` loads the plugin with SGLANG_GEMMA4_TRITON_SWA_WINDOW=1 instead.
Exit 0 when the engines behave as the report says (bug reproduced, or fixed
with ``--with-fix``), 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import sys


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "gpu-out"), "repro-swa-window"))
    ap.add_argument("--with-fix", action="store_true")
    a = ap.parse_args()

    from sglang_gemma4.testing import window_lossless as wl

    env = {"SGLANG_GEMMA4_TRITON_SWA_WINDOW": "1"} if a.with_fix else {"SGLANG_PLUGINS": "none"}
    s = wl.run(a.out, ["nospec", "spec_v2_1"], env, parallel=2)
    print(wl.table(s))
    failed = [n for n, r in s["engines"].items() if "mixed" not in r]
    if failed:
        print(f"engines failed: {failed}; logs under {a.out}/logs")
        return 1
    ps = wl.prompts()
    W = wl.ck.spec(wl.PROBE).text.sliding_window
    emu = wl.emulate_short_decode(ps)
    nospec = s["raw"]["nospec"]["jobs"]["mixed"]["tokens"]
    same_as_emulation = [t == e for t, e in zip(nospec, emu)]
    print(f"plain decode == fp32 model with a {W - 1}-key decode window: "
          f"{sum(same_as_emulation)}/{len(ps)} prompts")
    # first index at which the short window can matter: the first decode query at position >= W - 1
    fd = s["engines"]["nospec"]["mixed"]["first_diff"]
    spec_fd = s["engines"]["spec_v2_1"]["mixed"]["first_diff"]
    print("prompt lengths       ", [len(p) for p in ps])
    print("nospec first diff    ", fd)
    print("FROZEN_KV_MTP 1st diff", spec_fd)
    if a.with_fix:
        return 0 if all(x is None for x in fd + spec_fd) else 1
    reproduced = any(x is not None for x in fd) and all(x is None for x in spec_fd) and all(same_as_emulation)
    print("REPRODUCED" if reproduced else "NOT REPRODUCED")
    return 0 if reproduced else 1


if __name__ == "__main__":
    sys.exit(main())
