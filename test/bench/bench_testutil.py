import importlib.util
import os
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


def load_interpreted_bench(name: str):
    """bench/<name>.py as a module, for CPU tests that push CPU tensors through Triton: they need the interpreter
    (set by test/conftest.py without a GPU); on a GPU machine the bench itself is what runs."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CPU test of the bench: needs the Triton interpreter (set by test/conftest.py without a GPU)")
    if str(BENCH) not in sys.path:  # benches import each other's helpers (decode_attention -> verify_attention)
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
