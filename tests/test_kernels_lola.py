"""Triton LoLA inference kernels (lola_kernels.lola) against the PyTorch functions of lola_ops: the attention of
a batch of segments vs ``lola_attend`` (local keys under a mask, optionally the global cache per storage head),
the self-recall error vs ``self_recall_error``, the fold vs ``select_and_fold``'s state update, and LolaLayer runs
(batched prefill + decode, with sinks, with a trained decay) with backend 'triton' vs 'chunked'.

Without a GPU the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, tests/conftest.py), so shapes stay
small. With CUDA the same tests run the compiled kernels.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"  # read when triton is imported; conftest sets it for the whole session

pytest.importorskip("triton")

import lola_kernels  # noqa: E402
import lola_kernels.lola as kl  # noqa: E402
from lola_train.modeling.lola_ops import (expand_heads, lola_attend, select_and_fold,  # noqa: E402
                                          self_recall_error)

if DEVICE == "cpu" and not kl.interpreting():
    raise RuntimeError("triton was imported before TRITON_INTERPRET=1 was set, so its kernels cannot run on this "
                       "CPU-only machine; set TRITON_INTERPRET=1 in the environment (tests/conftest.py does)")


pytestmark = pytest.mark.usefixtures("one_thread")


def assert_close(got, want, tol, what):
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    err = (got.float() - want.float()).abs().max().item()
    bound = tol * max(1.0, want.float().abs().max().item())
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g}"


def features(g, *shape):
    return torch.softmax(torch.randn(*shape, generator=g), -1)  # Hedgehog-like positive features


def attend_inputs(b, h, hk, lq, m, d, feat, *, mask_heads, scale=1.0, seed=0, dtype=torch.float32, cache_heads=0,
                  g_cache=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, lq, d, generator=g) * scale
    k = torch.randn(b, hk, m, d, generator=g) * scale
    v = torch.randn(b, hk, m, d, generator=g)
    mask = torch.rand(b, mask_heads, lq, m, generator=g) < 0.4
    mask[:, :, ::5] = False                  # fully masked rows: only the cache and the linear memory are seen
    fq = features(g, b, h, lq, feat)
    fk = features(g, b, h, 40, feat)         # a state built from 40 folded pairs
    hv = torch.randn(b, h, 40, d, generator=g)
    h_state = fk.transpose(-1, -2) @ hv
    s_state = fk.sum(2)
    lin_num = features(g, b, h, lq, 7) @ torch.randn(b, h, 7, d, generator=g)
    lin_den = torch.rand(b, h, lq, generator=g) * 3
    sigma = torch.rand(h, generator=g) * 0.8 + 0.1
    ell = torch.rand(h, generator=g) + 0.5
    cast = [t.to(DEVICE, dtype) for t in (q, k, v)]
    rest = [t.to(DEVICE) for t in (mask, fq, h_state, s_state, sigma, ell, lin_num, lin_den)]
    cache = {}
    if cache_heads:
        cache = dict(cache_k=(torch.randn(b, cache_heads, g_cache, d, generator=g) * scale).to(DEVICE, dtype),
                     cache_v=torch.randn(b, cache_heads, g_cache, d, generator=g).to(DEVICE, dtype),
                     cache_ok=(torch.rand(b, cache_heads, g_cache, generator=g) < 0.7).to(DEVICE))
        cache["cache_ok"][:, :, 0] = False   # an empty slot in every head
    return cast + rest, cache


def attend_reference(q, k, v, mask, fq, h_state, s_state, sigma, ell, lin_num, lin_den, mixing, eps=1e-6, **cache):
    return lola_attend(q, k, v, mask, fq, h_state, s_state, sigma, ell, mixing=mixing, eps=eps, lin_num=lin_num,
                       lin_den=lin_den, **cache)


def test_lola_attend_is_one_fusion_over_both_key_sets():
    """The PyTorch twin itself: local keys under the mask plus valid cache keys, fused once = one softmax block
    over the concatenation (cache per query head, the local keys repeated for GQA), as in lola_ops.fuse."""
    from lola_train.modeling.lola_ops import fuse
    (q, k, v, mask, fq, hs, ss, sigma, ell, ln, ld), cache = attend_inputs(2, 4, 2, 9, 13, 16, 8, mask_heads=1,
                                                                          cache_heads=4, g_cache=6, scale=2.0)
    for mixing in ("lolcats", "lola_code"):
        got = lola_attend(q, k, v, mask, fq, hs, ss, sigma, ell, mixing=mixing, lin_num=ln, lin_den=ld, **cache)
        logits = q @ torch.cat([expand_heads(k, 4), cache["cache_k"]], 2).transpose(-1, -2) / 4.0
        both = torch.cat([mask.expand(-1, 4, -1, -1), cache["cache_ok"][:, :, None].expand(-1, -1, 9, -1)], -1)
        want = fuse(logits, both, torch.cat([expand_heads(v, 4), cache["cache_v"]], 2), fq @ hs + ln,
                    (fq @ ss.unsqueeze(-1)).squeeze(-1) + ld, sigma, ell, mixing=mixing)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_cache_weight_is_a_logit_offset_of_the_cache_block():
    """cache_weight w (lola_cache.cache_weight): the cache keys' softmax weights times w, i.e. their logits + log w,
    in the PyTorch twin and in the kernel; w = 1 is the plain call, and the local keys are untouched."""
    from lola_train.modeling.lola_ops import fuse
    (q, k, v, mask, fq, hs, ss, sigma, ell, ln, ld), cache = attend_inputs(2, 4, 2, 9, 13, 16, 8, mask_heads=1,
                                                                          cache_heads=2, g_cache=6, scale=2.0)
    for mixing in ("lolcats", "lola_code"):
        plain = lola_attend(q, k, v, mask, fq, hs, ss, sigma, ell, mixing=mixing, lin_num=ln, lin_den=ld, **cache)
        torch.testing.assert_close(lola_attend(q, k, v, mask, fq, hs, ss, sigma, ell, mixing=mixing, lin_num=ln,
                                               lin_den=ld, cache_weight=1.0, **cache), plain)
        got = lola_attend(q, k, v, mask, fq, hs, ss, sigma, ell, mixing=mixing, lin_num=ln, lin_den=ld,
                          cache_weight=5.0, **cache)
        logits = torch.cat([q @ expand_heads(k, 4).transpose(-1, -2) / 4.0,
                            q @ expand_heads(cache["cache_k"], 4).transpose(-1, -2) / 4.0 + math.log(5.0)], -1)
        both = torch.cat([mask.expand(-1, 4, -1, -1),
                          expand_heads(cache["cache_ok"][:, :, None].expand(-1, -1, 9, -1), 4)], -1)
        want = fuse(logits, both, torch.cat([expand_heads(v, 4), expand_heads(cache["cache_v"], 4)], 2),
                    fq @ hs + ln, (fq @ ss.unsqueeze(-1)).squeeze(-1) + ld, sigma, ell, mixing=mixing)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(got, plain, atol=1e-3)
        kern = kl.lola_attend_triton(q, k, v, mask, fq, hs, ss, sigma, ell, mixing=mixing, lin_num=ln, lin_den=ld,
                                     cache_weight=5.0, **cache)
        assert_close(kern, got, 2e-5, f"y ({mixing}, cache_weight 5)")
    with pytest.raises(ValueError, match="cache_weight=0.0 must be a finite number > 0"):
        kl.lola_attend_triton(q, k, v, mask, fq, hs, ss, sigma, ell, cache_weight=0.0, **cache)


ATTEND_CASES = [
    # (b, h, hk, lq, m, d, D, mask_heads, extra linear terms, logit scale, cache heads, cache slots)
    pytest.param(1, 2, 2, 1, 50, 64, 32, 2, False, 1.0, 0, 0, id="decode-d64"),
    pytest.param(2, 4, 2, 1, 50, 128, 32, 4, True, 1.0, 4, 20, id="decode-d128-gqa-cache-per-query-head"),
    pytest.param(1, 2, 2, 37, 50, 64, 32, 1, True, 1.0, 0, 0, id="chunk37-d64-maskhead1"),
    pytest.param(1, 4, 1, 37, 50, 128, 16, 4, False, 1.0, 1, 70, id="chunk37-d128-gqa4-cache-per-kv-head"),
    pytest.param(3, 2, 2, 70, 83, 64, 128, 2, True, 3.0, 2, 33, id="segments3-chunk70-D128-large-logits-cache"),
]


@pytest.mark.parametrize("mixing", ["lolcats", "lola_code"])
@pytest.mark.parametrize("b,h,hk,lq,m,d,feat,mask_heads,extra,scale,cache_heads,g_cache", ATTEND_CASES)
def test_attend_matches_torch(b, h, hk, lq, m, d, feat, mask_heads, extra, scale, cache_heads, g_cache, mixing):
    (q, k, v, mask, fq, hs, ss, sigma, ell, ln, ld), cache = attend_inputs(
        b, h, hk, lq, m, d, feat, mask_heads=mask_heads, scale=scale, cache_heads=cache_heads, g_cache=g_cache)
    if not extra:
        ln = ld = None
    got = kl.lola_attend_triton(q, k, v, mask, fq, hs, ss, sigma, ell, mixing=mixing, lin_num=ln, lin_den=ld,
                                **cache)
    want = attend_reference(q, k, v, mask, fq, hs, ss, sigma, ell, ln, ld, mixing, **cache)
    assert_close(got, want, 2e-5, f"y ({mixing})")


def test_attend_max_over_softmax_set_only():
    """Trap T1: a huge logit on a masked key must not shift the max (the linear terms stay unshifted), and a row
    whose softmax set is empty gives exactly its linear read-out."""
    (q, k, v, mask, fq, hs, ss, sigma, ell, ln, ld), _ = attend_inputs(1, 2, 2, 5, 20, 64, 32, mask_heads=2)
    k[:, :, 3] = q[:, :, 0].mean(1, keepdim=True) * 40   # key 3: logit far above the others
    mask[:, :, :, 3] = False
    mask[:, :, 1] = False                                  # row 1: no softmax key at all
    for mixing in ("lolcats", "lola_code"):
        got = kl.lola_attend_triton(q, k, v, mask, fq, hs, ss, sigma, ell, mixing=mixing, lin_num=ln, lin_den=ld)
        want = attend_reference(q, k, v, mask, fq, hs, ss, sigma, ell, ln, ld, mixing)
        assert_close(got, want, 2e-5, f"y ({mixing})")
    lin = (fq @ hs + ln) / ((fq @ ss.unsqueeze(-1)).squeeze(-1) + ld).unsqueeze(-1)
    got = kl.lola_attend_triton(q, k, v, mask, fq, hs, ss, sigma, ell, lin_num=ln, lin_den=ld)
    assert_close(got[:, :, 1], lin[:, :, 1], 2e-5, "empty softmax row = linear read-out")


def test_lola_code_very_negative_logits_stay_finite():
    """'lola_code' is stabilised with c = max(m, 0), not m: with every softmax logit near -120, e^{-m} would
    overflow fp32 and give inf/inf; lola_attend (and the kernel) keep the linear terms at scale e^0."""
    (q, k, v, mask, fq, hs, ss, sigma, ell, ln, ld), _ = attend_inputs(1, 2, 2, 4, 12, 64, 32, mask_heads=2)
    k[:] = -15 * q[:, :, 1:2] + 0.01 * k   # row 1: logits about -15 |q|^2 / 8 ~ -120
    mask[:, :, 1] = False
    mask[:, :, 1, :5] = True
    got = kl.lola_attend_triton(q, k, v, mask, fq, hs, ss, sigma, ell, mixing="lola_code", lin_num=ln, lin_den=ld)
    want = attend_reference(q, k, v, mask, fq, hs, ss, sigma, ell, ln, ld, "lola_code")
    assert torch.isfinite(want).all()
    assert_close(got, want, 2e-5, "y (lola_code, logits ~ -120)")


def test_attend_bf16_inputs():
    (q, k, v, mask, fq, hs, ss, sigma, ell, ln, ld), _ = attend_inputs(1, 2, 1, 9, 30, 64, 32, mask_heads=1,
                                                                       dtype=torch.bfloat16)
    got = kl.lola_attend_triton(q, k, v, mask, fq, hs, ss, sigma, ell, lin_num=ln, lin_den=ld)
    assert got.dtype == torch.float32
    assert_close(got, attend_reference(q, k, v, mask, fq, hs, ss, sigma, ell, ln, ld, "lolcats"), 2e-5, "y bf16")


def state_inputs(b, h, hv, n, d, feat, seed=0):
    g = torch.Generator().manual_seed(seed)
    fk = features(g, b, h, n, feat)
    v = torch.randn(b, hv, n, d, generator=g)
    old = features(g, b, h, 30, feat)
    h_state = old.transpose(-1, -2) @ torch.randn(b, h, 30, d, generator=g)
    s_state = old.sum(2)
    fold = torch.rand(b, hv, n, generator=g) < 0.5
    return [t.to(DEVICE) for t in (fk, v, h_state, s_state, fold)]


STATE_CASES = [
    # (b, h, hv, n, d, D)
    pytest.param(1, 2, 2, 23, 64, 32, id="N23-d64"),
    pytest.param(2, 4, 2, 23, 128, 128, id="N23-d128-D128-gqa"),
    pytest.param(1, 2, 1, 70, 64, 16, id="N70-gqa2"),
]


@pytest.mark.parametrize("b,h,hv,n,d,feat", STATE_CASES)
def test_self_recall_error_matches(b, h, hv, n, d, feat):
    fk, v, hs, ss, _ = state_inputs(b, h, hv, n, d, feat)
    got = kl.self_recall_error_triton(fk, v, hs, ss, 1e-6)
    want = self_recall_error(fk, expand_heads(v, h), hs, ss, 1e-6)
    assert_close(got, want, 2e-5, "sre")
    empty = kl.self_recall_error_triton(fk, v, torch.zeros_like(hs), torch.zeros_like(ss))  # empty state: ||v||^2
    assert_close(empty, (expand_heads(v, h) ** 2).sum(-1), 2e-5, "sre under an empty state")


@pytest.mark.parametrize("b,h,hv,n,d,feat", STATE_CASES)
def test_fold_matches(b, h, hv, n, d, feat):
    fk, v, hs, ss, fold = state_inputs(b, h, hv, n, d, feat)
    want_h, want_s = hs.clone(), ss.clone()
    f = expand_heads(fold, h).unsqueeze(-1).float()
    want_h += (fk * f).transpose(-1, -2) @ expand_heads(v, h)
    want_s += (fk * f).sum(2)
    got_h, got_s = hs.clone(), ss.clone()
    kl.fold_triton(fk, v, fold, got_h, got_s)
    assert_close(got_h, want_h, 2e-5, "H")
    assert_close(got_s, want_s, 2e-5, "s")
    assert (got_h - hs).abs().max() > 1e-3  # something was folded


def test_fold_non_contiguous_state_updated_in_place():
    fk, v, hs, ss, fold = state_inputs(1, 2, 2, 23, 64, 32)
    big = torch.zeros(1, 4, 32, 64, device=DEVICE)
    view = big[:, ::2]  # non-contiguous view: the update must land in it
    view += hs
    kl.fold_triton(fk, v, fold, view, ss.clone())
    want = hs + (fk * fold.unsqueeze(-1).float()).transpose(-1, -2) @ v
    assert_close(big[:, ::2], want, 2e-5, "H through a view")
    assert big[:, 1::2].abs().max() == 0


def test_clear_errors():
    (q, k, v, mask, fq, hs, ss, sigma, ell, _, _), _ = attend_inputs(1, 2, 2, 3, 10, 64, 32, mask_heads=2)
    with pytest.raises(ValueError, match="mixing"):
        kl.lola_attend_triton(q, k, v, mask, fq, hs, ss, sigma, ell, mixing="nope")
    with pytest.raises(ValueError, match="mask must have shape"):
        kl.lola_attend_triton(q, k, v, mask[..., :5], fq, hs, ss, sigma, ell)
    with pytest.raises(ValueError, match="h_state must be float32"):
        kl.lola_attend_triton(q, k, v, mask, fq, hs.double(), ss, sigma, ell)
    with pytest.raises(ValueError, match="cache_ok"):
        kl.lola_attend_triton(q, k, v, mask, fq, hs, ss, sigma, ell, cache_k=k, cache_v=v)
    with pytest.raises(ValueError, match="k has 3 heads"):
        kl.lola_attend_triton(q.repeat(1, 2, 1, 1), k[:, :1].repeat(1, 3, 1, 1), v[:, :1].repeat(1, 3, 1, 1),
                              mask[:, :1], fq.repeat(1, 2, 1, 1), hs.repeat(1, 2, 1, 1), ss.repeat(1, 2, 1),
                              sigma.repeat(2), ell.repeat(2))


def test_select_and_fold_dispatch_matches_torch():
    """select_and_fold with backend 'triton' (kernels for SRE and the fold, argsort between) == 'chunked'."""
    g = torch.Generator().manual_seed(3)
    b, h, hs_heads, n, d, feat = 2, 4, 2, 23, 64, 32
    cand_k = torch.randn(b, hs_heads, n, d, generator=g).to(DEVICE)
    cand_v = torch.randn(b, hs_heads, n, d, generator=g).to(DEVICE)
    cand_pos = torch.arange(n, dtype=torch.int32).repeat(b, hs_heads, 1).to(DEVICE)
    cand_pos[0, :, 5:9] = -1
    cand_fk = features(g, b, h, n, feat).to(DEVICE)
    old = features(g, b, h, 30, feat).to(DEVICE)
    h0, s0 = old.transpose(-1, -2) @ torch.randn(b, h, 30, d, generator=g).to(DEVICE), old.sum(2)
    outs = {}
    for backend in ("chunked", "triton"):
        cand = [t.clone() for t in (cand_k, cand_v, cand_pos, cand_fk)]
        hs, ss = h0.clone(), s0.clone()
        select_and_fold(*cand, hs, ss, global_size=6, gqa_selection="kv_mean", backend=backend)
        outs[backend] = ([t[:, :, :6] for t in cand], hs, ss)
    (cache0, h_ref, s_ref), (cache1, h_got, s_got) = outs["chunked"], outs["triton"]
    for t0, t1 in zip(cache0, cache1):
        assert torch.equal(t0, t1)
    assert_close(h_got, h_ref, 2e-5, "H")
    assert_close(s_got, s_ref, 2e-5, "s")


def test_lola_layer_triton_backend_matches_chunked(monkeypatch):
    """A tiny LolaLayer run (a batched prefill over 3 chunks with cache updates, then decode steps; left padding;
    sinks in the second run, a linear decay in the third, feature maps of other keys (feature_map_rope false) and
    value-deduplicated selection and a cache weight of 4 in the fourth) with attention.backend 'triton' (the kernels, counted) against
    'chunked'."""
    from lola_train.convert import convert
    from lola_train.models import load_model
    from lola_train.modeling.lola_cache import LolaCacheConfig, LolaLayer

    h, hk, d, w = 4, 2, 64, 4
    torch.manual_seed(0)
    model, _ = load_model(random=dict(architecture="llama", vocab_size=32, hidden_size=h * d, intermediate_size=32,
                                      num_hidden_layers=1, num_attention_heads=h, num_key_value_heads=hk))
    convert(model, dict(feature_dim=8, window_size=w, chunk_size=w))
    attn = model.model.layers[0].self_attn.to(DEVICE)
    with torch.no_grad():
        attn.window_factors.normal_()
        attn.feature_map_k.weight.normal_()
    g = torch.Generator().manual_seed(1)
    length = 15
    q = torch.randn(2, h, length, d, generator=g).to(DEVICE)
    k = torch.randn(2, hk, length, d, generator=g).to(DEVICE)
    v = torch.randn(2, hk, length, d, generator=g).to(DEVICE)
    q_map = torch.randn(2, h, length, d, generator=g).to(DEVICE)
    k_map = torch.randn(2, hk, length, d, generator=g).to(DEVICE)
    mask = torch.ones(2, length, dtype=torch.bool, device=DEVICE)
    mask[1, :3] = False  # left padding

    calls = {}
    for name in ("lola_attend_triton", "self_recall_error_triton", "fold_triton"):
        fn = getattr(kl, name)

        def counted(*a, _fn=fn, _name=name, **kw):
            calls[_name] = calls.get(_name, 0) + 1
            return _fn(*a, **kw)
        monkeypatch.setattr(kl, name, counted)

    results = {}
    runs = (("lolcats", "query_head", 0, None, True), ("lola_code", "kv_max", 2, None, True),
            ("lola_code", "query_head", 2, 0.8, True), ("lola_code", "kv_max", 2, 0.8, False))
    for mixing, gqa, sinks, gamma, rope in runs:  # gamma: a trained linear decay (folds weighted by gamma^age)
        settings = LolaCacheConfig(window=w, global_size=3, chunk_size=w, mixing=mixing, gqa_selection=gqa,
                                   dedup=0.0 if rope else 0.98, cache_weight=1.0 if rope else 4.0)
        monkeypatch.setattr(attn.attention_config, "sink_tokens", sinks)
        monkeypatch.setattr(attn.attention_config, "feature_map_rope", rope)
        maps = {} if rope else dict(q_map=q_map, k_map=k_map)

        def part(m, a, b):
            return {name: x[:, :, a:b] for name, x in m.items()}
        attn.decay_factors = None if gamma is None else torch.nn.Parameter(
            torch.logit(torch.full((h,), gamma, device=DEVICE)))
        for backend in ("chunked", "triton"):
            monkeypatch.setattr(attn.attention_config, "backend", backend)
            lay = LolaLayer(settings)
            with torch.no_grad():
                ys = [lay.attend(attn, q[:, :, :11], k[:, :, :11], v[:, :, :11], mask[:, :11], **part(maps, 0, 11))]
                for t in range(11, length):  # decode steps
                    ys.append(lay.attend(attn, q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], mask[:, t:t + 1],
                                         **part(maps, t, t + 1)))
            results[backend] = (torch.cat(ys, 2), lay)
        (y0, lay0), (y1, lay1) = results["chunked"], results["triton"]
        assert_close(y1, y0, 5e-5, f"y ({mixing})")
        assert torch.equal(lay0.cache_pos, lay1.cache_pos)
        assert_close(lay1.h_state, lay0.h_state, 5e-5, "H")
        assert_close(lay1.s_state, lay0.s_state, 5e-5, "s")
    assert calls.get("lola_attend_triton", 0) >= 4 * 5, calls  # 1 batched prefill + 4 decode steps per run
    assert calls.get("self_recall_error_triton", 0) > 0 and calls.get("fold_triton", 0) > 0, calls


def test_registered():
    assert lola_kernels.lola_attend_triton is kl.lola_attend_triton


def test_lola_kernels_compile_for_sm90(tmp_path):
    """The LoLA kernels compile to sm_90 cubins (the interpreter cannot show this): d = 128, D = 128, the widest
    configurations (decode and prefill blocks, both mixings, with the global cache and without, SRE, fold), in a
    process without TRITON_INTERPRET."""
    import json
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path / "triton-cache"), TRITON_DEFAULT_FP_FUSION="1")
    code = ("import json; from lola_kernels import compile_check as cc; "
            "print(json.dumps(cc.compile_lola_kernels(128, 128, arch=90, io_dtype='bf16')))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    assert {r["kernel"].split("[")[0] for r in rows} == {"_lola_attn_kernel", "_sre_kernel", "_fold_kernel"}
    assert len(rows) == 7
    assert sum("cache]" in r["kernel"] and "no cache" not in r["kernel"] for r in rows) == 4  # HAS_CACHE launches
    for r in rows:
        assert 0 < r["shared_bytes"] <= r["shared_limit"], r
