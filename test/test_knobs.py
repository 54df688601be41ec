import pytest
from hypothesis import given, strategies as st

from sglang_gemma4.knobs import ALLOWED, KnobError, parse_bool


@pytest.mark.parametrize("raw,want", [("1", True), ("TRUE", True), ("On", True), (" true ", True),
                                      ("0", False), ("False", False), ("OFF", False),
                                      (None, None), ("", None)])
def test_allowed_values(raw, want):
    assert parse_bool("SGLANG_GEMMA4_X", raw) is want


@given(st.text(max_size=8))
def test_anything_else_is_rejected_with_name_value_and_allowed(raw):
    if raw.strip() == "" or raw.strip().lower() in ALLOWED:
        return
    with pytest.raises(KnobError) as ei:
        parse_bool("SGLANG_GEMMA4_X", raw)
    msg = str(ei.value)
    assert "SGLANG_GEMMA4_X" in msg and repr(raw) in msg
    assert all(a in msg for a in ALLOWED)
