"""Shared input validation and launch heuristics for the Gemma-4 Triton kernels.

Pure torch; no Triton or SGLang import here so the helpers stay cheap.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_2d(name: str, t: torch.Tensor, dtypes=FLOAT_DTYPES) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D [T, H], got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise ValueError(f"{name} has unsupported dtype {t.dtype}; expected one of {dtypes}")


def check_vector(name: str, t: torch.Tensor, n: int, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},), got {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} has unsupported dtype {t.dtype}; expected one of {FLOAT_DTYPES}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device}")


def check_same(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    """`t` must be a 2-D float tensor with `ref`'s shape and device (dtype may differ)."""
    check_2d(name, t)
    if t.shape != ref.shape:
        raise ValueError(f"{name} shape {tuple(t.shape)} != {ref_name} shape {tuple(ref.shape)}")
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device}, expected {ref.device} (like {ref_name})")


def check_eps(eps: float) -> float:
    eps = float(eps)
    if not eps >= 0.0:  # also rejects NaN
        raise ValueError(f"eps must be a non-negative float, got {eps}")
    return eps


def inner_contiguous(t: torch.Tensor) -> torch.Tensor:
    """Kernels take a row stride but need unit stride along the last dim."""
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def check_scalar(
    name: str, scalar: Union[float, int, torch.Tensor], device: torch.device
) -> Optional[torch.Tensor]:
    """Return a 1-element tensor view, or None for a Python number."""
    if isinstance(scalar, torch.Tensor):
        if scalar.numel() != 1:
            raise ValueError(f"{name} must have exactly one element, got shape {tuple(scalar.shape)}")
        if scalar.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name} has unsupported dtype {scalar.dtype}; expected one of {FLOAT_DTYPES}")
        if scalar.device != device:
            raise ValueError(f"{name} is on {scalar.device}, expected {device}")
        return scalar.reshape(1)
    if isinstance(scalar, (float, int)) and not isinstance(scalar, bool):
        return None
    raise ValueError(f"{name} must be a float or a 1-element tensor, got {type(scalar).__name__}")


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def rowwise_num_warps(block: int) -> int:
    """Warps for a one-row-per-program norm: ~8-16 elements per thread (16B vectors)."""
    if block >= 16384:
        return 16
    if block >= 4096:
        return 8
    if block >= 2048:
        return 4
    if block >= 512:
        return 2
    return 1
