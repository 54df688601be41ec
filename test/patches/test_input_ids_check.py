"""input_ids_check against SGLang 0.5.17's real TokenizerManager validation (CPU).

Reference: the unpatched ``_validate_one_request``, which lets out-of-vocab ids
through (they then kill the server with a device-side assert, issue #18).
"""

from __future__ import annotations

import types

import numpy as np
import pytest

from sglang_gemma4 import registry
from sglang_gemma4.patches.input_ids_check import PATCH, InvalidInputIdsError, check_input_ids
from sglang_gemma4.testing.hooks import patch_applied

VOCAB = 256
CONTEXT = 64


def _manager():
    from sglang.srt.managers.tokenizer_manager import TokenizerManager

    # Real methods on a bare instance: only the fields _validate_one_request reads.
    tm = TokenizerManager.__new__(TokenizerManager)
    tm.context_len = CONTEXT
    tm.num_reserved_tokens = 0
    tm.allow_auto_truncate = False
    tm.validate_total_tokens = True
    tm.is_generation = True
    tm.server_args = types.SimpleNamespace(return_hidden_states_mode=None, enable_return_hidden_states=False,
                                           enable_custom_logit_processor=False)
    tm.model_config = types.SimpleNamespace(vocab_size=VOCAB)
    return tm


def _req(ids, **sp):
    from sglang.srt.managers.io_struct import GenerateReqInput

    return GenerateReqInput(input_ids=ids, sampling_params={"max_new_tokens": 4, **sp})


def _validate(ids, **sp):
    tm = _manager()
    obj = _req(ids, **sp)
    return type(tm)._validate_one_request(tm, obj, ids)


BAD = [[2, 99999999], [2, -1], [VOCAB], [1, 2.0], [True, 3], ["7"], [None]]


@pytest.mark.parametrize("ids", BAD, ids=repr)
def test_unpatched_sglang_lets_bad_ids_through(clean_env, ids):
    assert _validate(ids) is None  # the bug: nothing stops them before the embedding


@pytest.mark.parametrize("ids", BAD, ids=repr)
def test_patched_rejects_bad_ids_naming_position_and_range(clean_env, ids):
    with patch_applied(PATCH, {}) as st:
        assert st.state == "active"
        with pytest.raises(InvalidInputIdsError) as e:
            _validate(ids)
    msg = str(e.value)
    pos = next(i for i, t in enumerate(ids) if not (type(t) is int and 0 <= t < VOCAB))
    assert f"input_ids[{pos}]={ids[pos]!r}" in msg and f"[0, {VOCAB})" in msg
    assert isinstance(e.value, ValueError)  # SGLang's HTTP layer turns ValueError into a 400


def test_patched_rejects_empty_and_keeps_sglang_length_checks(clean_env):
    with patch_applied(PATCH, {}):
        with pytest.raises(InvalidInputIdsError, match="empty"):
            _validate([])
        with pytest.raises(ValueError, match="context length") as e:
            _validate(list(range(CONTEXT + 5)))
        assert not isinstance(e.value, InvalidInputIdsError)
        with pytest.raises(ValueError, match="maximum context length"):
            _validate([1, 2, 3], max_new_tokens=CONTEXT)


@pytest.mark.parametrize("ids", [[0], [VOCAB - 1], list(range(0, VOCAB, 7)), list(np.arange(5, 9))], ids=repr)
def test_valid_ids_pass_patched_and_unpatched_alike(clean_env, ids):
    assert _validate(ids) is None
    with patch_applied(PATCH, {}):
        assert _validate(ids) is None


def test_input_embeds_requests_are_not_checked(clean_env):
    from sglang.srt.managers.io_struct import GenerateReqInput

    with patch_applied(PATCH, {}):
        tm = _manager()
        obj = GenerateReqInput(input_embeds=[[0.0] * 4], sampling_params={"max_new_tokens": 1})
        assert type(tm)._validate_one_request(tm, obj, [VOCAB + 5]) is None


def test_message_lists_at_most_three_positions():
    with pytest.raises(InvalidInputIdsError) as e:
        check_input_ids([-1] * 10, VOCAB)
    assert str(e.value).count("input_ids[") == 3 and "(and more)" in str(e.value)


def test_status_knob_and_upstream(clean_env):
    assert registry.evaluate(PATCH, {}).state == "active"
    assert registry.evaluate(PATCH, {PATCH.knob: "0"}).state == "disabled"
    assert PATCH.upstream() is None  # 0.5.17 never range-checks input_ids
