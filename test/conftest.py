import os
import sys

import pytest
import torch

# Kernels run under the Triton interpreter where there is no GPU; the variable
# must be set before anything imports triton (sglang does, at import).
if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import settings  # noqa: E402

from sglang_gemma4.testing.configs import KNOB_PREFIXES, write_gemma4_config  # noqa: E402

# CI must not flake on a new random example: property tests draw a fixed example set
# by default; HYPOTHESIS_PROFILE=explore searches afresh (and saves failures locally).
settings.register_profile("ci", derandomize=True, database=None)
settings.register_profile("explore")
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def clean_env(monkeypatch):
    for k in list(os.environ):
        if k.startswith(KNOB_PREFIXES) or k == "SGLANG_PLUGINS":
            monkeypatch.delenv(k, raising=False)
    return os.environ


@pytest.fixture(scope="session")
def gemma4_configs(tmp_path_factory):
    root = tmp_path_factory.mktemp("g4cfg")
    return {"moe": write_gemma4_config(root / "moe", True),
            "dense": write_gemma4_config(root / "dense", False)}
