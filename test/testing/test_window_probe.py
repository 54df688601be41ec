"""Window probes (issue #10) on CPU: fp32 transformers follows the closed-form chain, decisively.

The GPU test (test/gpu/test_window_lossless_gpu.py) compares engines token by
token with the chain; that is exact only if the fp32 model produces the chain
with a clear margin at every compared position, and meaningful only if a
window one key short produces something else. Both are checked here against
transformers' own Gemma-4 (fp32, explicit masks).
"""

import pytest
import torch

from sglang_gemma4.testing import checkpoints as ck
from sglang_gemma4.testing import reference
from sglang_gemma4.testing import window_lossless as wl

W = ck.spec(wl.PROBE).text.sliding_window
V = ck.spec(wl.PROBE).text.vocab_size


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {v: reference.load(v, root) for v in (wl.PROBE, wl.OWNER)}, root


def test_chain_semantics():
    g = ck.window_map(V)
    assert sorted(g[ck.FIRST_PROMPT_ID:]) == list(range(ck.FIRST_PROMPT_ID, V))  # a permutation
    p = [ck.BOS_ID, 10, 11]
    out = ck.window_continuation(p, W + 3, W, V)
    # until position W-1 the oldest key is BOS; then the prompt's tokens, then the outputs
    assert out[: W - 2] == [g[ck.BOS_ID]] * (W - 2)
    assert out[W - 2: W] == [g[10], g[11]] and out[W] == g[out[0]]


@pytest.mark.parametrize("prompts", ["mixed", "prefix"])
def test_fp32_model_is_the_chain_with_margin(models, prompts):
    _, root = models
    ps = wl.prompts() if prompts == "mixed" else wl.prefix_prompts(wl.prompts())
    for v, r in wl.reference_check(ps, root).items():  # the check the GPU test runs first
        assert all(r["argmax_is_chain"]), v
        assert r["min_margin"] >= wl.MIN_MARGIN, v


def _short_window_chain(p, n):
    """Prefill row keeps W keys, decode rows W - 1: the oldest key seen is one position later."""
    g = ck.window_map(V)
    x = list(p)
    for k in range(n):
        w = W if k == 0 else W - 1
        x.append(g[x[max(0, len(x) - w)]])
    return x[len(p):]


def test_a_window_one_key_short_leaves_the_chain_where_the_window_fills(models):
    ms, _ = models
    model, text = ms[wl.PROBE]
    ps = [p for p in wl.prompts() if len(p) in (3, 4, W - 1, W, W + 1, 33)]
    n = 24
    got = reference.greedy(model, text, ps, n, decode_window=W - 1)["tokens"]
    exp = wl.expected(ps, n)
    for p, t, e in zip(ps, got, exp):
        assert t == _short_window_chain(p, n)
        k = reference.first_difference(t, e)
        # first decode step whose query position has a key W - 1 back: L - 1 + k >= W - 1
        assert k == max(1, W - len(p)), (len(p), k)


def test_probe_specs_are_checked():
    import dataclasses

    bad = dataclasses.replace(ck.spec(wl.PROBE), probe_layer=2)  # a full-attention layer
    with pytest.raises(ValueError, match="probe_layer"):
        ck.generate_weights(bad)


def test_assistant_head_maps_codes_like_the_target(models):
    _, root = models
    from safetensors.torch import load_file

    a = load_file(str(ck.build(wl.DRAFT, root) / "model.safetensors"))
    t = load_file(str(ck.build(wl.PROBE, root) / "model.safetensors"))
    g = ck.window_map(V)
    d = ck.spec(wl.PROBE).text.swa_head_dim
    head_a = a["model.embed_tokens.weight"].float()[:, :d]
    head_t = t["lm_head.weight"].float()[:, ck.PROBE_OUT:ck.PROBE_OUT + d]
    codes = ck.probe_codes(V, d)
    for tok in (ck.FIRST_PROMPT_ID, 100, V - 1):
        s = g[tok]
        for head in (head_a, head_t):
            assert torch.nn.functional.cosine_similarity(head[s], codes[tok], dim=0) > 0.99


def test_explicit_masks_equal_transformers_own_sliding_mask(models):
    # the reference's masks must be Gemma-4's: same logits as transformers building its own masks
    ms, _ = models
    model, text = ms[wl.PROBE]
    p = wl.prompts()[0] + wl.expected(wl.prompts()[:1])[0]
    ids = torch.tensor([p])
    with torch.no_grad():
        own = model(input_ids=ids).logits
        explicit = model(input_ids=ids, attention_mask=reference.masks(len(p), len(p), text.sliding_window)).logits
    assert torch.allclose(own, explicit, atol=1e-4)
    with torch.no_grad():
        short = model(input_ids=ids, attention_mask=reference.masks(len(p), 0, text.sliding_window,
                                                                   decode_window=text.sliding_window - 1)).logits
    assert (short - own).abs().max() > 1.0  # one key fewer is visible in the output


def test_evaluate_and_table_on_synthetic_results():
    ps = wl.prompts()
    exp = wl.expected(ps)
    pp = wl.prefix_prompts(ps)
    bad = [list(e) for e in exp]
    bad[2][7] = (bad[2][7] + 1) % V

    def res(mixed, prefix=None, acc=None):
        jobs = {"mixed": {"tokens": mixed, "meta": [{"cached_tokens": 0}] * len(mixed), "accept_length": acc}}
        if prefix is not None:
            jobs["prefix"] = {"tokens": prefix, "meta": [{"cached_tokens": 16}] * len(prefix), "accept_length": acc}
        return {"ok": True, "jobs": jobs}

    ev = wl.evaluate({"good": res(exp, wl.expected(pp), 2.2), "bad": res(bad),
                      "dead": {"ok": False, "error": "boom", "jobs": {}}})
    assert ev["good"]["mixed"]["first_diff"] == [None] * len(ps)
    assert ev["good"]["prefix"]["first_diff"] == [None] * len(pp) and ev["good"]["prefix"]["cached_tokens"][0] == 16
    assert ev["bad"]["mixed"]["first_diff"][2] == 7 and ev["bad"]["mixed"]["first_diff"].count(None) == len(ps) - 1
    assert "prefix" not in ev["bad"] and "mixed" not in ev["dead"]
    t = wl.table({"engines": ev})
    assert "good" in t and "20/20" in t and "19/20" in t and "FAILED: boom" in t


def test_engine_configurations(models):
    _, root = models
    cfgs = {c.name: c for c in wl.configs(ckpt_root=root)}
    assert set(cfgs) == set(wl.ENGINES)
    assert cfgs["nospec_eager"].engine_kwargs["disable_cuda_graph"] is True
    assert "owner" in cfgs["owner_nospec"].model_path
    for n in ("spec_v2_0", "spec_v2_1", "spec_v2_0_topk2", "spec_v2_1_topk2"):
        kw = cfgs[n].engine_kwargs
        assert cfgs[n].env[wl.V2_KNOB] == n.split("_")[2]
        assert kw["speculative_eagle_topk"] == (2 if n.endswith("topk2") else 1)
        assert wl.DRAFT in kw["speculative_draft_model_path"]
    assert [j.name for j in cfgs["nospec"].jobs] == ["mixed", "prefix"]
    assert cfgs["nospec"].jobs[1].flush_cache is False  # the prefix job must hit the cache of the first
    with pytest.raises(ValueError, match="unknown window_lossless engines"):
        wl.configs(["nope"], ckpt_root=root)
