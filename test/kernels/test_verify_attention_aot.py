"""verify_attention's two kernels compile for sm_90 (H100/H200) at Gemma-4 widths with the launch config the
launcher picks, without register spills, on any machine: Triton's compiler plus the ptxas and cuobjdump its
wheel ships. The interpreter the other CPU tests use never runs the real compiler, so this is the CPU check that
the code the GPU will run lowers at all. Runs in a child process without TRITON_INTERPRET."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

CHILD = r'''
import json, os, re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from sglang_gemma4.kernels import verify_attention as va

CUOBJ = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
TARGET = GPUTarget("cuda", 90, 32)


def usage(k):
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(k.asm["cubin"])
    out = subprocess.run([CUOBJ, "-res-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+)\s+STACK:(\d+).*?LOCAL:(\d+)", out, re.S)
    return {"regs": int(m.group(1)), "stack": int(m.group(2)), "local": int(m.group(3))}


def compile_(fn, types, consts, warps):
    sig = {n: ("constexpr" if n in consts else types.get(n, "i32")) for n in fn.arg_names}
    return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=TARGET,
                          options={"num_warps": warps, "num_stages": 1})


res = {}
for name, (Hq, Hkv, D, W) in json.loads(sys.argv[1]).items():
    for pool in ("bf16", "fp8e4nv"):
        cfg = va.launch_config(4, Hq, Hkv, D, D)
        common = dict(kv_group=Hq // Hkv, L=4, W=W, D=D, DV=D, BLOCK_D=cfg["BLOCK_D"], BLOCK_DV=cfg["BLOCK_DV"],
                      DOT_F32=False)
        pre = compile_(va._verify_prefix_kernel,
                       {"Q": "*bf16", "K_Buf": "*" + pool, "V_Buf": "*" + pool, "Kv_Indptr": "*i32",
                        "Kv_Indices": "*i32", "Mid_O": "*fp32", "Mid_Lse": "*fp32", "qk_scale": "fp32",
                        "v_scale": "fp32"},
                       dict(common, HQ=Hq, GH=cfg["GH"], LSE_M=cfg["BLOCK_M"], BLOCK_M=cfg["BLOCK_R"],
                            BLOCK_N=cfg["BLOCK_N"]), cfg["warps"])
        res[f"{name}/{pool}/prefix"] = usage(pre)
    merge = compile_(va._verify_merge_kernel,
                     {"Q": "*bf16", "K_Draft": "*bf16", "V_Draft": "*bf16", "O": "*bf16", "Mid_O": "*fp32",
                      "Mid_Lse": "*fp32", "sm_scale": "fp32"},
                     dict(common, BLOCK_M=cfg["BLOCK_M"], BLOCK_D=cfg["MERGE_D"], BLOCK_DV=cfg["MERGE_DV"],
                          SPLIT_UNROLL=cfg["SPLIT_UNROLL"]), cfg["MERGE_WARPS"])
    res[f"{name}/merge"] = usage(merge)
    full = va.launch_config(4, Hq, Hkv, D, D, merge_dv=D)  # the bench's one-slice merge
    res[f"{name}/merge_full"] = usage(compile_(
        va._verify_merge_kernel,
        {"Q": "*bf16", "K_Draft": "*bf16", "V_Draft": "*bf16", "O": "*bf16", "Mid_O": "*fp32", "Mid_Lse": "*fp32",
         "sm_scale": "fp32"},
        dict(common, BLOCK_M=full["BLOCK_M"], BLOCK_D=full["MERGE_D"], BLOCK_DV=full["MERGE_DV"],
             SPLIT_UNROLL=full["SPLIT_UNROLL"]), full["MERGE_WARPS"]))
print("RESULT " + json.dumps(res))
'''

# q heads, kv heads, head dim, SGLang window radius (26B-A4B and E4B sliding / full layers)
WIDTHS = {"26b_sliding": (16, 8, 256, 1023), "26b_full": (16, 2, 512, -1), "e4b_sliding": (8, 2, 256, 1023),
          "e4b_full": (8, 2, 512, -1)}


def test_kernels_lower_for_sm90_without_spills():
    import json

    triton = pytest.importorskip("triton")
    bins = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    if not (bins / "ptxas").exists() or not (bins / "cuobjdump").exists():
        pytest.skip("this triton wheel ships no ptxas / cuobjdump")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = env.get("TRITON_CACHE_DIR") or str(Path.home() / ".triton" / "cache")
    p = subprocess.run([sys.executable, "-c", CHILD, json.dumps(WIDTHS)], capture_output=True, text=True, env=env,
                       timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(p.stdout.split("RESULT ", 1)[1])
    assert len(res) == 4 * len(WIDTHS)
    spilled = {k: v for k, v in res.items() if v["stack"] or v["local"]}
    assert not spilled, spilled  # ptxas puts register spills on the stack (local memory)
    assert all(v["regs"] <= 255 for v in res.values())
