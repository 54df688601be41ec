"""Kernel tests: on a machine without CUDA, run the Triton kernels in the interpreter.

TRITON_INTERPRET must be set before triton is first imported; pytest loads this file
before the test modules in this directory import anything from sglang_gemma4.kernels.
"""

import os
import sys

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    _TRITON_ALREADY_IMPORTED = "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    _TRITON_ALREADY_IMPORTED = False


def pytest_collection_modifyitems(config, items):
    if not _TRITON_ALREADY_IMPORTED:
        return
    skip = pytest.mark.skip(
        reason="no CUDA and triton was imported before TRITON_INTERPRET=1 could be set "
        "(set it in the environment or in test/conftest.py)"
    )
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(skip)
