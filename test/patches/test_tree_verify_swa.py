"""tree_verify_swa: SGLang 0.5.17's real extend kernel (Triton interpreter on CPU) vs a torch reference.

A draft tree of N tokens sits on a prefix of P keys; token i has depth d_i
(RoPE position P + d_i) and sees the prefix keys within its sliding window
(P + d_i - c <= sws) plus its tree ancestors. SGLang's target-verify call
(window buffer of the last min(P, sws) prefix keys, tree mask, ``sws``) is
compared with that reference, then the same call with the patch's arguments.
"""

import types

import pytest
import torch

from sglang_gemma4 import registry
from sglang_gemma4.patches import tree_verify_swa as tvs

SWS = 5
N = 6
# parent of each draft token (token 0 = the verified root): two children per
# node of the first levels, as topk 2 lays them out (index > depth from token 2 on)
PARENT = [-1, 0, 0, 1, 2, 3]
HQ, HKV, D = 2, 1, 16


def _depths():
    d = []
    for p in PARENT:
        d.append(0 if p < 0 else d[p] + 1)
    return d


def _ancestors(i):
    out = set()
    while i >= 0:
        out.add(i)
        i = PARENT[i]
    return out


def _tree_mask(prefix_lens):
    blocks = []
    for P in prefix_lens:
        m = torch.zeros(N, P + N, dtype=torch.bool)
        m[:, :P] = True
        for i in range(N):
            for j in _ancestors(i):
                m[i, P + j] = True
        blocks.append(m.flatten())
    return torch.cat(blocks)


def _reference(q, kp, vp, ke, ve, P, sws):
    """[N, HQ, D] attention with depth positions."""
    dep = _depths()
    out = torch.empty(N, HQ, D)
    for i in range(N):
        keys = [kp[c] for c in range(P) if P + dep[i] - c <= sws] + [ke[j] for j in sorted(_ancestors(i))]
        vals = [vp[c] for c in range(P) if P + dep[i] - c <= sws] + [ve[j] for j in sorted(_ancestors(i))]
        K, V = torch.stack(keys), torch.stack(vals)  # [n, HKV, D]
        for h in range(HQ):
            s = (K[:, h // (HQ // HKV)] @ q[i, h]) / D ** 0.5
            out[i, h] = torch.softmax(s, 0) @ V[:, h // (HQ // HKV)]
    return out


def _run(prefix_lens, patched, seed=0):
    from sglang.kernels.ops.attention.extend_attention import extend_attention_fwd

    g = torch.Generator().manual_seed(seed)
    bs = len(prefix_lens)
    S = sum(prefix_lens) + 8
    kbuf = torch.randn(S, HKV, D, generator=g)
    vbuf = torch.randn(S, HKV, D, generator=g)
    q = torch.randn(bs * N, HQ, D, generator=g)
    ke = torch.randn(bs * N, HKV, D, generator=g)
    ve = torch.randn(bs * N, HKV, D, generator=g)
    # slots of request b's prefix: a shuffled block, so a wrong window start reads other keys
    perm = torch.randperm(S, generator=g)
    slots, start = [], 0
    for P in prefix_lens:
        slots.append(perm[start:start + P])
        start += P
    # SGLang's window buffer: the last min(P, sws) prefix keys, offset = first window position
    wl = [min(P, SWS) for P in prefix_lens]
    kv_indptr = torch.tensor([0] + list(torch.cumsum(torch.tensor(wl), 0)), dtype=torch.int32)
    kv_indices = torch.cat([s[P - w:] for s, P, w in zip(slots, prefix_lens, wl)]).to(torch.int64)
    offsets = torch.tensor([P - w for P, w in zip(prefix_lens, wl)], dtype=torch.int32)
    qo_indptr = torch.arange(0, (bs + 1) * N, N, dtype=torch.int32)
    mask = _tree_mask(prefix_lens)
    lens = torch.tensor([N * (P + N) for P in prefix_lens])
    mask_indptr = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(lens, 0)])
    kw = dict(sliding_window_size=SWS, window_kv_offsets=offsets)
    if patched:
        mask = tvs.tree_window_mask(mask, mask_indptr, torch.tensor(prefix_lens), N, SWS)
        kw.update(sliding_window_size=SWS + N - 1, skip_prefix_custom_mask=False)
    o = torch.zeros(bs * N, HQ, D)
    extend_attention_fwd(q, ke, ve, o, kbuf, vbuf, qo_indptr, kv_indptr, kv_indices, mask, True,
                         mask_indptr, N, 1.0, 1.0, sm_scale=D ** -0.5, **kw)
    refs = []
    for b, P in enumerate(prefix_lens):
        sl = slice(b * N, (b + 1) * N)
        refs.append(_reference(q[sl], kbuf[slots[b]], vbuf[slots[b]], ke[sl], ve[sl], P, SWS))
    return o, torch.cat(refs)


PREFIXES = [2, SWS - 1, SWS, SWS + 1, 12]  # below, at, past the window


def _row_err(o, ref):
    return (o - ref).abs().amax(dim=(1, 2)).view(-1, N)


def test_unpatched_tree_verify_drops_window_keys_of_tokens_deeper_in_the_tree_index():
    o, ref = _run(PREFIXES, patched=False)
    err = _row_err(o, ref)
    dep = _depths()
    lagging = [i for i in range(N) if i > dep[i]]
    assert err[:, [i for i in range(N) if i == dep[i]]].max() < 1e-4  # chain tokens are right
    # every request whose tokens have a full window loses keys on the lagging tokens
    for b, P in enumerate(PREFIXES):
        if P + min(dep) >= SWS:  # some needed key falls out under the index rule
            assert err[b, lagging].max() > 1e-3, (P, err[b])


def test_patched_arguments_match_the_depth_reference():
    o, ref = _run(PREFIXES, patched=True)
    assert _row_err(o, ref).max() < 1e-4


def test_tree_window_mask_against_a_loop():
    seqs = [0, 3, SWS, 9]
    mask = _tree_mask(seqs)
    lens = torch.tensor([N * (P + N) for P in seqs])
    ind = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(lens, 0)])
    pad = torch.ones(17, dtype=torch.bool)  # buffer tail past the batch: copied unchanged
    got = tvs.tree_window_mask(torch.cat([mask, pad]).to(torch.uint8), ind, torch.tensor(seqs), N, SWS)
    assert got.dtype == torch.uint8 and got.shape[0] == mask.shape[0] + 17
    dep = _depths()
    exp = []
    for P in seqs:
        m = torch.zeros(N, P + N, dtype=torch.bool)
        for i in range(N):
            for c in range(P):
                m[i, c] = P + dep[i] - c <= SWS
            for j in _ancestors(i):
                m[i, P + j] = True
        exp.append(m.flatten())
    assert torch.equal(got[: mask.shape[0]].bool(), torch.cat(exp))
    assert got[mask.shape[0]:].bool().all()
    out = torch.zeros(mask.shape[0] + 17, dtype=torch.uint8)
    tvs.tree_window_mask(torch.cat([mask, pad]).to(torch.uint8), ind, torch.tensor(seqs), N, SWS, out=out)
    assert torch.equal(out, got)


class _FakeBackend:
    def __init__(self):
        self.calls = []
        self.extend_attention_fwd = self._kernel
        self.num_draft_tokens = N

    def _kernel(self, *a, **kw):
        self.calls.append((a, kw))


def _fake_forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True):
    self.extend_attention_fwd(*range(9), "sglang-mask", True, sliding_window_size=layer.sliding_window_size)
    return "o"


def _fb(verify=True):
    mode = types.SimpleNamespace(is_target_verify=lambda: verify)
    return types.SimpleNamespace(forward_mode=mode, batch_size=1, spec_info=None)


def test_forward_extend_rewrites_sliding_layers_only_and_restores_the_kernel():
    b = _FakeBackend()
    kernel = b.extend_attention_fwd
    tvs._STATE[b] = {"sws": SWS, "mask": "our-mask", "static": None, "num_draft": N}
    swa, full = types.SimpleNamespace(sliding_window_size=SWS), types.SimpleNamespace(sliding_window_size=-1)
    assert tvs.around_forward_extend(_fake_forward_extend, b, 0, 0, 0, swa, _fb()) == "o"
    a, kw = b.calls[-1]
    assert a[9] == "our-mask" and kw["sliding_window_size"] == SWS + N - 1 and kw["skip_prefix_custom_mask"] is False
    assert b.extend_attention_fwd == kernel
    tvs.around_forward_extend(_fake_forward_extend, b, 0, 0, 0, full, _fb())
    a, kw = b.calls[-1]
    assert a[9] == "sglang-mask" and kw == {"sliding_window_size": -1}
    tvs.around_forward_extend(_fake_forward_extend, b, 0, 0, 0, swa, _fb(verify=False))
    assert b.calls[-1][0][9] == "sglang-mask"
    del tvs._STATE[b]
    tvs.around_forward_extend(_fake_forward_extend, b, 0, 0, 0, swa, _fb())  # not eligible
    assert b.calls[-1][0][9] == "sglang-mask"


@pytest.mark.parametrize("arch,topk,draft,eligible", [
    ("Gemma4ForCausalLM", 2, False, True), ("Gemma4ForCausalLM", 1, False, False),
    ("Gemma3ForCausalLM", 2, False, False), ("Gemma4AssistantForCausalLM", 2, True, False),
])
def test_eligibility(arch, topk, draft, eligible):
    b = type("B", (), {})()
    b.sliding_window_size, b.topk, b.is_draft_runner = SWS, topk, draft
    runner = types.SimpleNamespace(model=type(arch, (), {})(), model_config=types.SimpleNamespace(
        hf_config=types.SimpleNamespace(architectures=[arch])))
    tvs.after_init(None, b, runner)
    assert (b in tvs._STATE) is eligible


def test_status_on_sglang_0_5_17(clean_env):
    assert tvs.PATCH.unavailable() is None
    assert tvs.PATCH.upstream() is None  # 0.5.17 checks the window at prefix + tree index
    assert registry.evaluate(tvs.PATCH, {}).state == registry.ACTIVE
    assert registry.evaluate(tvs.PATCH, {"SGLANG_GEMMA4_TREE_VERIFY_SWA": "0"}).state == registry.DISABLED


def test_cuda_graph_path_fills_one_static_buffer_from_sglangs_verify_buffer():
    seqs = [3, 9]
    mask = _tree_mask(seqs).to(torch.uint8)
    lens = torch.tensor([N * (P + N) for P in seqs])
    ind = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(lens, 0)])
    buf = torch.zeros(mask.shape[0] + 40, dtype=torch.uint8)
    buf[: mask.shape[0]] = mask
    b = type("B", (), {})()  # weak-referenceable, like the real backend
    b._verify_mask, b.mask_indptr, b.num_draft_tokens = types.SimpleNamespace(buffer=buf), ind.clone(), N
    tvs._STATE[b] = {"sws": SWS, "mask": None, "static": None}
    fb = types.SimpleNamespace(forward_mode=types.SimpleNamespace(is_target_verify=lambda: True),
                               req_pool_indices=torch.arange(2), seq_lens=torch.tensor(seqs),
                               spec_info=types.SimpleNamespace(custom_mask=mask, draft_token_num=N))
    tvs.after_init_out_graph(None, b, fb)
    first = tvs._STATE[b]["mask"]
    assert first is tvs._STATE[b]["static"] and first.data_ptr() != buf.data_ptr()
    want = tvs.tree_window_mask(buf, ind, torch.tensor(seqs), N, SWS)
    assert torch.equal(first, want)
    buf[: mask.shape[0]] = 1  # next replay: SGLang refilled its buffer; ours is rewritten in place
    tvs.after_init_out_graph(None, b, fb)
    assert tvs._STATE[b]["mask"].data_ptr() == first.data_ptr()
    assert torch.equal(first, tvs.tree_window_mask(buf, ind, torch.tensor(seqs), N, SWS))
    fb.spec_info = types.SimpleNamespace(custom_mask=None)  # SGLang uses no tree mask: neither do we
    tvs.after_init_out_graph(None, b, fb)
    assert tvs._STATE[b]["mask"] is None
    del tvs._STATE[b]
