"""``build(variant)``: write a variant's checkpoint under the cache root (or reuse it)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from sglang_gemma4.testing.ckpt_config import config_dict
from sglang_gemma4.testing.ckpt_mm import write_mm_processor
from sglang_gemma4.testing.ckpt_specs import BOS_ID, EOS_ID, GENERATOR_VERSION, PAD_ID
from sglang_gemma4.testing.ckpt_variants import BIG_VARIANTS, DRAFT_FOR, default_root, spec
from sglang_gemma4.testing.ckpt_weights import generate_weights


def _gen_device(variant: str) -> str:
    """Big variants generate on CUDA when present (seconds instead of minutes)."""
    if variant not in BIG_VARIANTS:
        return "cpu"
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except Exception:
        return "cpu"


def build(variant: str, root: Optional[os.PathLike] = None, force: bool = False) -> Path:
    """Build (or reuse) the checkpoint for ``variant``; returns its directory.

    The directory name is ``<variant>-<hash of spec>[-cuda]``; a checkpoint is
    complete once ``ckpt_spec.json`` exists (written last, after an atomic
    rename of the temporary build directory).
    """
    from safetensors.torch import save_file

    s = spec(variant)
    device = _gen_device(variant)
    root = Path(root) if root is not None else default_root()
    suffix = "" if device == "cpu" else f"-{device}"
    out_dir = root / f"{variant}-{s.key()}{suffix}"
    if (out_dir / "ckpt_spec.json").exists() and not force:
        return out_dir
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{variant}-", dir=root))
    try:
        cfg = config_dict(s)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        gen_cfg = {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID}
        (tmp / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2) + "\n")
        tensors = generate_weights(s, device=device)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if s.arch == "mm":
            write_mm_processor(s, tmp)
        meta = {
            "variant": variant,
            "key": s.key(),
            "generator_version": GENERATOR_VERSION,
            "gen_device": device,
            "spec": dataclasses.asdict(s),
            "hf_text_config": s.text.hf_dict(),
            "num_params": int(sum(t.numel() for t in tensors.values())),
        }
        (tmp / "ckpt_spec.json").write_text(json.dumps(meta, indent=2) + "\n")
        os.chmod(tmp, 0o755)
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def build_pair(target: str, root: Optional[os.PathLike] = None) -> Tuple[Path, Path]:
    """(target, draft) checkpoint directories for FROZEN_KV_MTP."""
    if target not in DRAFT_FOR:
        raise ValueError(f"no draft defined for {target!r}; known: {', '.join(DRAFT_FOR)}")
    return build(target, root), build(DRAFT_FOR[target], root)


def load_meta(path: os.PathLike) -> Dict[str, Any]:
    return json.loads((Path(path) / "ckpt_spec.json").read_text())
