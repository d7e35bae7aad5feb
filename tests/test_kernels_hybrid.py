"""Triton hybrid-attention kernels (lola_kernels) against hybrid_attention_reference: outputs and all gradients.

Without a GPU the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, set below before lola_kernels is
imported), so shapes stay small. With CUDA the same tests run the compiled kernels.
"""
from __future__ import annotations

import os

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    # Read when @triton.jit decorates, i.e. when triton itself and lola_kernels are imported. tests/conftest.py
    # sets it before any test module loads; this line covers running this file on its own.
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton")  # a guard only: scripts/setup.sh installs the triton extra, so CI runs these

import lola_kernels  # noqa: E402
import lola_kernels.hybrid as kh  # noqa: E402
from lola_train.modeling import AttentionConfig, FeatureMap  # noqa: E402
from lola_train.modeling.hybrid_ops import BACKENDS, hybrid_attention, hybrid_attention_reference  # noqa: E402

if DEVICE == "cpu" and not kh.interpreting():
    raise RuntimeError("triton was imported before TRITON_INTERPRET=1 was set, so its kernels cannot run on this "
                       "CPU-only machine; set TRITON_INTERPRET=1 in the environment (tests/conftest.py does)")

NAMES = ("y", "dq", "dk", "dv", "dfq", "dfk", "dsigma", "dell")


def make_inputs(b, h, hkv, lq, lk, d, feat, *, scale=1.0, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, lq, d, generator=g) * scale
    k = torch.randn(b, hkv, lk, d, generator=g) * scale
    v = torch.randn(b, hkv, lk, d, generator=g)
    fq = torch.softmax(torch.randn(b, h, lq, feat, generator=g), -1)   # Hedgehog-like positive features
    fk = torch.softmax(torch.randn(b, h, lk, feat, generator=g), -1)
    sigma = torch.rand(h, generator=g) * 0.8 + 0.1
    ell = torch.rand(h, generator=g) + 0.5
    out = [t.to(DEVICE, dtype) for t in (q, k, v, fq, fk)] + [t.to(DEVICE) for t in (sigma, ell)]
    return [t.requires_grad_() for t in out]


def run(fn, inputs, dy, **kw):
    y = fn(*inputs, **kw)
    grads = torch.autograd.grad(y, inputs, dy)
    return [y] + list(grads)


def reference(q, k, v, fq, fk, sigma, ell, **kw):
    groups = q.shape[1] // k.shape[1]
    return hybrid_attention_reference(q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1), fq, fk,
                                      sigma, ell, **kw)


def assert_close(got, want, tol, what):
    err = (got.float() - want.float()).abs().max().item()
    bound = tol * max(1.0, want.float().abs().max().item())
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g}"


CASES = [
    # (b, h, hkv, lq, lk, d, D, window, layout, block, key_mask)
    pytest.param(1, 2, 2, 1, 1, 64, 32, 8, "sw", 16, False, id="L1-sw-d64"),
    pytest.param(1, 2, 2, 37, 37, 64, 32, 8, "sw", 16, False, id="L37-sw-d64"),
    pytest.param(1, 2, 2, 37, 37, 128, 32, 8, "tk", 16, False, id="L37-tk-d128"),
    pytest.param(2, 2, 2, 100, 100, 64, 32, 16, "tk", 16, True, id="L100-tk-d64-mask"),
    pytest.param(1, 1, 1, 100, 100, 128, 16, 5, "sw", 32, False, id="L100-sw-d128-W5"),
    pytest.param(1, 4, 2, 45, 45, 64, 32, 7, "sw", 16, True, id="gqa-sw-mask"),
    pytest.param(2, 2, 1, 20, 70, 64, 32, 6, "tk", 16, True, id="offset-tk-gqa-mask"),
    pytest.param(1, 2, 2, 1, 50, 64, 16, 8, "sw", 16, False, id="decode-sw"),
    pytest.param(1, 2, 2, 33, 33, 64, 32, 64, "tk", 16, False, id="window-longer-than-L"),
    # block-skip boundaries: W = C - 1 puts the only linear pair of a block at its corner
    pytest.param(1, 2, 2, 70, 70, 64, 16, 15, "sw", 16, False, id="sw-W15-C16"),
    pytest.param(1, 2, 2, 83, 83, 64, 16, 9, "tk", 16, False, id="tk-W9-C16"),
]


@pytest.mark.parametrize("b,h,hkv,lq,lk,d,feat,window,layout,block,masked", CASES)
def test_matches_reference(b, h, hkv, lq, lk, d, feat, window, layout, block, masked):
    inputs = make_inputs(b, h, hkv, lq, lk, d, feat, scale=1.5, seed=lq + lk + d)
    key_mask = None
    if masked:  # left padding on the first row, scattered holes on the others
        key_mask = torch.rand(b, lk, generator=torch.Generator().manual_seed(1)) > 0.25
        key_mask[0, : lk // 3] = False
        key_mask = key_mask.to(DEVICE)
    dy = torch.randn(b, h, lq, d, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    kw = dict(window=window, layout=layout, key_mask=key_mask)
    got = run(lola_kernels.hybrid_attention_triton, inputs, dy, block=block, **kw)
    want = run(reference, inputs, dy, **kw)
    for name, g, w in zip(NAMES, got, want):
        assert g.shape == w.shape and g.dtype == w.dtype, name
        assert_close(g, w, 1e-4, name)


MIXED = [("lolcats", 3), ("lola_code", 0), ("lola_code", 3)]  # ('lolcats', 0) is CASES above


def padded_mask(b, lk, real_last):
    """Key mask [B, Lk]: row 0 left-padded by a third, row 1 with scattered holes, row 2 with only ``real_last``
    real tokens at the end (fewer than the sinks when real_last < S)."""
    key_mask = torch.rand(b, lk, generator=torch.Generator().manual_seed(3)) > 0.25
    key_mask[0, : lk // 3] = False
    key_mask[0, lk // 3:] = True
    if b > 2:
        key_mask[2] = False
        key_mask[2, lk - real_last:] = True
    return key_mask.to(DEVICE)


MIXED_CASES = [
    # (b, h, hkv, lq, lk, d, D, window, layout, block, key_mask)
    pytest.param(1, 2, 2, 1, 1, 64, 32, 8, "sw", 16, False, id="L1-sw-d64"),
    pytest.param(1, 2, 2, 37, 37, 128, 32, 8, "tk", 16, False, id="L37-tk-d128"),
    pytest.param(3, 2, 1, 100, 100, 64, 16, 7, "sw", 16, True, id="L100-sw-gqa-leftpad"),
    pytest.param(3, 2, 1, 20, 70, 64, 16, 6, "tk", 16, True, id="offset-tk-gqa-leftpad"),
]


@pytest.mark.parametrize("mixing,sinks", MIXED)
@pytest.mark.parametrize("b,h,hkv,lq,lk,d,feat,window,layout,block,masked", MIXED_CASES)
def test_mixing_and_sinks_match_reference(b, h, hkv, lq, lk, d, feat, window, layout, block, masked, mixing, sinks):
    """Both mixings with and without attention sinks: outputs and all seven gradients equal the reference.
    The masked cases have a left-padded row (the sinks are its first real tokens, not positions 0..S-1) and a
    row with 2 real tokens (fewer than S = 3)."""
    inputs = make_inputs(b, h, hkv, lq, lk, d, feat, scale=1.5, seed=lq + lk + d + sinks)
    key_mask = padded_mask(b, lk, real_last=2) if masked else None
    dy = torch.randn(b, h, lq, d, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    kw = dict(window=window, layout=layout, key_mask=key_mask, mixing=mixing, sink_tokens=sinks)
    got = run(lola_kernels.hybrid_attention_triton, inputs, dy, block=block, **kw)
    want = run(reference, inputs, dy, **kw)
    for name, g, w in zip(NAMES, got, want):
        assert g.shape == w.shape and g.dtype == w.dtype, name
        assert_close(g, w, 1e-4, f"{mixing}/S={sinks} {name}")


def test_sink_holding_the_max_gets_its_gradient():
    """'lolcats': when a sink has the largest logit of every row, the max m (and its gradient) belongs to the sink
    key, which lives outside the window blocks (its dk arrives through the dq kernel's per-block partials)."""
    q, k, v, fq, fk, sigma, ell = (t.detach() for t in make_inputs(1, 2, 2, 50, 50, 64, 16, seed=13))
    u = torch.randn(64, generator=torch.Generator().manual_seed(15)).to(DEVICE)
    q, k = q + u, k.clone()
    k[:, :, 1] = 2.0 * u  # the second token (the first real one, see the mask) aligns with every query
    key_mask = torch.ones(1, 50, dtype=torch.bool, device=DEVICE)
    key_mask[0, 0] = False
    inputs = [t.requires_grad_() for t in (q, k, v, fq, fk, sigma, ell)]
    s = (q @ k.transpose(-1, -2))[0, :, 2:] / 8.0
    assert (s.argmax(-1) == 1).all()  # the premise: the sink is every (later) row's arg-max
    dy = torch.randn(1, 2, 50, 64, generator=torch.Generator().manual_seed(14)).to(DEVICE)
    kw = dict(window=6, layout="sw", key_mask=key_mask, sink_tokens=2)
    got = run(lola_kernels.hybrid_attention_triton, inputs, dy, block=16, **kw)
    want = run(reference, inputs, dy, **kw)
    for name, g, w in zip(NAMES, got, want):
        assert_close(g, w, 1e-4, name)


@pytest.mark.parametrize("sinks,sign", [(0, 1.0), (2, 1.0), (2, -1.0)])
def test_lola_code_extreme_logits(sinks, sign):
    """'lola_code' with logits far beyond +-88.7. Large (sign +1): e^{s} would overflow fp32; the kernel's e^{-c}
    scaling stays finite and equals the reference, gradients included. Very negative (sign -1, every logit
    below -88): c = max(m, 0) = 0, where shifting by m itself would overflow e^{-m} in the linear terms.
    Either way the softmax-vs-linear balance is far from the 'lolcats' one, so the results differ clearly."""
    inputs = make_inputs(1, 2, 2, 60, 60, 64, 32, scale=4.0, seed=21)
    with torch.no_grad():
        inputs[0].mul_(4.0)
        if sign < 0:  # q . k / 8 = -sum |q| |k| / 8: at most -150 here
            inputs[0].abs_().mul_(0.8)
            inputs[1].abs_().neg_()
        logits = inputs[0] @ inputs[1].transpose(-1, -2) / 8.0
        assert (logits.max() < -88.7) if sign < 0 else (logits.max() > 88.7)  # the premise
    dy = torch.randn(1, 2, 60, 64, generator=torch.Generator().manual_seed(22)).to(DEVICE)
    kw = dict(window=8, layout="tk", mixing="lola_code", sink_tokens=sinks)
    got = run(lola_kernels.hybrid_attention_triton, inputs, dy, block=16, **kw)
    want = run(reference, inputs, dy, **kw)
    assert want[0].abs().max() < 1e3 and torch.isfinite(got[0]).all()
    for name, g, w in zip(NAMES, got, want):
        assert torch.isfinite(g).all(), name
        # dsigma with large logits: y hardly depends on sigma (exactly ~4e-7 here), and the sum over 120 rows of
        # cancelling terms of size |dy . y| is fp32 noise on both sides (the fp32 reference is 6.5e-5 off float64)
        assert_close(g, w, 1e-3 if name == "dsigma" and sign > 0 else 1e-4, name)
    lolcats = lola_kernels.hybrid_attention_triton(*inputs, block=16, **dict(kw, mixing="lolcats"))
    assert (lolcats - got[0]).abs().max() > 1e-2


def test_max_shift_is_the_model():
    """Large logits make e^{-m} tiny: the linear block dominates. A kernel that shifted the linear terms too
    (or normalised the softmax block on its own) would give a different y; the kernel must match the reference."""
    inputs = make_inputs(1, 2, 2, 60, 60, 64, 32, scale=4.0, seed=3)
    dy = torch.randn(1, 2, 60, 64, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    kw = dict(window=8, layout="sw")
    got = run(lola_kernels.hybrid_attention_triton, inputs, dy, block=16, **kw)
    want = run(reference, inputs, dy, **kw)
    for name, g, w in zip(NAMES, got, want):
        assert_close(g, w, 1e-4, name)
    # the same inputs with the linear terms shifted by m as well (the T1 mistake) give a clearly different output
    q, k, v, fq, fk, sigma, ell = (t.detach() for t in inputs)
    s = (q @ k.transpose(-1, -2)) / 8.0
    pos = torch.arange(60, device=DEVICE)
    win = (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - 8)
    lin = pos[None, :] <= pos[:, None] - 8
    m = s.masked_fill(~win, float("-inf")).amax(-1, keepdim=True)
    a = sigma.view(-1, 1, 1) * torch.exp(s - m) * win + ell.view(-1, 1, 1) * (fq @ fk.transpose(-1, -2)) * lin \
        * torch.exp(-m)
    wrong = (a @ v) / a.sum(-1, keepdim=True)
    assert (wrong - got[0]).abs().max() > 1e-2


@pytest.mark.parametrize("mixing,sinks", [("lolcats", 0), ("lola_code", 3)])
def test_bf16_inputs(mixing, sinks):
    inputs = make_inputs(1, 2, 2, 37, 37, 64, 32, dtype=torch.bfloat16, seed=4)
    dy = torch.randn(1, 2, 37, 64, generator=torch.Generator().manual_seed(8)).to(DEVICE, torch.bfloat16)
    kw = dict(window=8, layout="tk", mixing=mixing, sink_tokens=sinks)
    got = run(lola_kernels.hybrid_attention_triton, inputs, dy, block=16, **kw)
    want = run(reference, inputs, dy, **kw)
    for name, g, w in zip(NAMES, got, want):
        assert g.dtype == w.dtype, name
        assert_close(g, w, 1e-2, name)


def test_registered_and_dispatched():
    assert BACKENDS["triton"] is lola_kernels.triton_backend
    assert AttentionConfig(backend="triton").backend == "triton"
    inputs = make_inputs(1, 2, 2, 21, 21, 64, 16, seed=5)
    kw = dict(window=4, layout="sw")
    y = hybrid_attention(*inputs, backend="triton", **kw)
    assert_close(y, hybrid_attention_reference(*inputs, **kw), 1e-4, "y")
    kw.update(mixing="lola_code", sink_tokens=2)  # the new options reach the kernels through the registry
    y = hybrid_attention(*inputs, backend="triton", **kw)
    assert_close(y, hybrid_attention_reference(*inputs, **kw), 1e-4, "y")


def test_auto_policy():
    """'auto' takes the kernels for prompts, not for decode-sized query blocks or widths they do not take."""
    q, fq = torch.zeros(1, 2, 65, 64), torch.zeros(1, 2, 65, 128)
    assert lola_kernels.triton_backend.supports(q, fq)
    assert not lola_kernels.triton_backend.supports(q[:, :, :64], fq[:, :, :64])
    assert not lola_kernels.triton_backend.supports(torch.zeros(1, 2, 65, 256), fq)
    assert not lola_kernels.triton_backend.supports(q, torch.zeros(1, 2, 65, 256))
    assert lola_kernels.triton_backend.supports(q, fq, mixing="lola_code", sink_tokens=kh.MAX_SINK_TOKENS)
    assert not lola_kernels.triton_backend.supports(q, fq, sink_tokens=kh.MAX_SINK_TOKENS + 1)
    assert not lola_kernels.triton_backend.supports(q, fq, mixing="nope")


def test_auto_on_cpu_keeps_pytorch_path(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("auto must not pick the triton backend for CPU tensors")

    monkeypatch.setitem(BACKENDS, "triton", boom)
    inputs = [t.detach().cpu() for t in make_inputs(1, 2, 2, 70, 70, 64, 16, seed=6)]
    kw = dict(window=8, layout="sw")
    assert_close(hybrid_attention(*inputs, backend="auto", **kw), hybrid_attention_reference(*inputs, **kw), 1e-5,
                 "y")


def test_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(kh, "interpreting", lambda: False)
    inputs = [t.detach().cpu() for t in make_inputs(1, 1, 1, 4, 4, 64, 16)]
    with pytest.raises(RuntimeError, match="CUDA tensors.*'chunked'"):
        kh.hybrid_attention_triton(*inputs, window=4)


@pytest.mark.parametrize("change,match", [
    (dict(window=0), "window=0"),
    (dict(layout="xx"), "window_layout='xx'"),
    (dict(block=48), "block=48"),
    (dict(precision="fp16"), "precision='fp16'"),
    (dict(key_mask=torch.ones(1, 3, dtype=torch.bool)), "key_mask must be"),
    (dict(sigma=torch.ones(3)), "sigma must have shape"),
    (dict(fq=torch.rand(1, 2, 9, 256), fk=torch.rand(1, 2, 9, 256)), "too large"),
    (dict(k=torch.zeros(1, 3, 9, 64), v=torch.zeros(1, 3, 9, 64)), "multiple of the KV heads"),
    (dict(q=torch.zeros(1, 2, 12, 64)), "queries must be the last"),
    (dict(q=torch.zeros(1, 2, 9, 256), k=torch.zeros(1, 2, 9, 256), v=torch.zeros(1, 2, 9, 256)), "too large"),
    (dict(mixing="nope"), "attention.mixing='nope'"),
    (dict(sink_tokens=-1), "sink_tokens=-1"),
    (dict(sink_tokens=17), "sink_tokens=17 is more than"),
])
def test_bad_input_errors(change, match):
    q, k, v, fq, fk, sigma, ell = (t.detach() for t in make_inputs(1, 2, 2, 9, 9, 64, 16))
    args = dict(q=q, k=k, v=v, fq=fq, fk=fk, sigma=sigma, ell=ell)
    kw = dict(window=4, layout="sw", key_mask=None, block=16, precision="ieee", mixing="lolcats", sink_tokens=0)
    for key, value in change.items():
        value = value.to(DEVICE) if torch.is_tensor(value) else value
        (args if key in args else kw)[key] = value
    with pytest.raises(ValueError, match=match):
        kh.hybrid_attention_triton(**args, **kw)


def test_feature_map_gradients_through_kernel():
    """End to end with the Hedgehog feature map: gradients reach the map weights exactly as with 'chunked'."""
    torch.manual_seed(7)
    cfg = AttentionConfig(feature_dim=16, window_size=8, window_layout="tk")
    fmap_q, fmap_k = FeatureMap(2, 64, cfg).to(DEVICE), FeatureMap(2, 64, cfg).to(DEVICE)
    for fmap in (fmap_q, fmap_k):
        torch.nn.init.normal_(fmap.weight, std=0.3)
    q, k, v = (torch.randn(1, 2, 40, 64, device=DEVICE) for _ in range(3))
    sigma, ell = torch.full((2,), 0.1, device=DEVICE), torch.ones(2, device=DEVICE)
    grads = {}
    for backend in ("triton", "chunked"):
        y = hybrid_attention(q, k, v, fmap_q(q), fmap_k(k), sigma, ell, window=8, layout="tk", chunk_size=16,
                             backend=backend)
        grads[backend] = torch.autograd.grad((y * v).sum(), (fmap_q.weight, fmap_k.weight))
    for g, w in zip(grads["triton"], grads["chunked"]):
        assert_close(g, w, 1e-4, "feature map weight grad")


def test_smaller_block_when_shared_memory_runs_out(monkeypatch):
    """A GPU without the shared memory for the default block raises OutOfResources at launch: forward and
    backward retry with half the block and still compute the same function."""
    from triton.runtime.errors import OutOfResources

    seen = []

    def limited(fn):
        def wrapper(*args):
            plan = args[-1]
            seen.append((fn.__name__, plan.C))
            if plan.C > 16:
                raise OutOfResources(plan.C * 4096, 16 * 4096, "shared memory")
            return fn(*args)
        return wrapper

    monkeypatch.setattr(kh, "_forward", limited(kh._forward))
    monkeypatch.setattr(kh, "_backward", limited(kh._backward))
    inputs = make_inputs(1, 2, 2, 40, 40, 64, 32, seed=11)
    dy = torch.randn(1, 2, 40, 64, generator=torch.Generator().manual_seed(12)).to(DEVICE)
    kw = dict(window=8, layout="sw")
    got = run(kh.hybrid_attention_triton, inputs, dy, **kw)   # default block (64) -> 32 -> 16
    want = run(reference, inputs, dy, **kw)
    for name, g, w in zip(NAMES, got, want):
        assert_close(g, w, 1e-4, name)
    assert seen == [("_forward", 64), ("_forward", 32), ("_forward", 16), ("_backward", 16)]
    with pytest.raises(OutOfResources):  # a block the caller fixed is not changed behind its back
        kh.hybrid_attention_triton(*inputs, block=32, **kw)
