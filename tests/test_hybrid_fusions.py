"""Trainable fusions ('lolcats', 'lola_code'), attention sinks and the linear memory's decay: the chunked path
equals the quadratic reference (values and gradients), and the reference equals the equations written out per
query."""
import math

import pytest
import torch

from lola_train.modeling.hybrid_ops import (hybrid_attention, hybrid_attention_chunked, hybrid_attention_reference,
                                            mixing_weights, sink_keys, window_masks)

from test_hybrid_ops import make_inputs

CASES = [("lolcats", 0), ("lolcats", 4), ("lola_code", 0), ("lola_code", 3)]
DECAY = torch.tensor([0.97, 0.995])  # gamma per head (2 heads)


@pytest.mark.parametrize("decay", [None, DECAY])
@pytest.mark.parametrize("mixing,sinks", CASES)
@pytest.mark.parametrize("layout", ["sw", "tk"])
@pytest.mark.parametrize("length,window,chunk", [(1, 16, 16), (65, 16, 24), (200, 24, 32), (300, 64, 64)])
def test_chunked_matches_reference(mixing, sinks, layout, length, window, chunk, decay):
    args = make_inputs(2, 2, length, length, seed=length + sinks)
    kw = dict(window=window, layout=layout, mixing=mixing, sink_tokens=sinks, decay=decay)
    ref = hybrid_attention_reference(*args, **kw)
    out = hybrid_attention_chunked(*args, chunk_size=chunk, **kw)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("decay", [None, DECAY])
@pytest.mark.parametrize("mixing,sinks", CASES)
def test_chunked_gradients_match_reference(mixing, sinks, decay):
    base = make_inputs(1, 2, 130, 130, seed=11) + ((DECAY.clone(),) if decay is not None else ())
    weight = torch.randn(1, 2, 130, 16, generator=torch.Generator().manual_seed(2))
    grads = []
    for fn, kw in ((hybrid_attention_reference, {}), (hybrid_attention_chunked, {"chunk_size": 32})):
        xs = [t.clone().requires_grad_(True) for t in base]
        gamma = xs.pop() if decay is not None else None
        (fn(*xs, window=24, layout="sw", mixing=mixing, sink_tokens=sinks, decay=gamma, **kw)
         * weight).sum().backward()
        grads.append([x.grad for x in xs] + ([gamma.grad] if gamma is not None else []))
    for g_ref, g_out in zip(*grads):  # sigma and gamma gradients sum ~10^4 float32 terms in different orders
        torch.testing.assert_close(g_out, g_ref, atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("decay", [None, DECAY])
@pytest.mark.parametrize("mixing,sinks", CASES)
@pytest.mark.parametrize("lq", [1, 70])
def test_offset_and_left_padding(mixing, sinks, lq, decay):
    lk = 150
    args = make_inputs(3, 2, lq, lk, seed=lq)
    key_mask = torch.ones(3, lk, dtype=torch.bool)
    key_mask[1, :37] = False   # left padding
    key_mask[2, :148] = False  # fewer real tokens than sinks
    kw = dict(window=20, layout="sw", key_mask=key_mask, mixing=mixing, sink_tokens=sinks, decay=decay)
    ref = hybrid_attention_reference(*args, **kw)
    out = hybrid_attention_chunked(*args, chunk_size=16, **kw)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(out).all()


def random_cached(b, h, lk, share, seed):
    """Bool [B,H,Lk]: each key cached with probability ``share`` (transfer.cached_fraction's draw, fixed here)."""
    return torch.rand(b, h, lk, generator=torch.Generator().manual_seed(seed)) < share


@pytest.mark.parametrize("decay", [None, DECAY])
@pytest.mark.parametrize("mixing,sinks", CASES)
@pytest.mark.parametrize("layout", ["sw", "tk"])
@pytest.mark.parametrize("lq,lk,share", [(130, 130, 0.3), (1, 97, 0.5), (45, 150, 0.1), (70, 70, 0.0)])
def test_chunked_matches_reference_with_cached_keys(mixing, sinks, layout, lq, lk, share, decay):
    """transfer.cached_fraction's student: the chunked path (cached keys gathered as extra softmax keys, out of
    the linear state) equals the quadratic reference, with left padding, offsets and rows without any cached key."""
    args = make_inputs(3, 2, lq, lk, seed=lk + sinks)
    key_mask = torch.ones(3, lk, dtype=torch.bool)
    key_mask[1, :29] = False
    cached = random_cached(3, 2, lk, share, seed=lq)
    cached[2] = False
    kw = dict(window=20, layout=layout, key_mask=key_mask, mixing=mixing, sink_tokens=sinks, decay=decay,
              cached=cached)
    ref = hybrid_attention_reference(*args, **kw)
    out = hybrid_attention_chunked(*args, chunk_size=16, **kw)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("mixing,sinks", CASES)
def test_chunked_gradients_match_reference_with_cached_keys(mixing, sinks):
    base = make_inputs(1, 2, 130, 130, seed=12) + (DECAY.clone(),)
    cached = random_cached(1, 2, 130, 0.25, seed=3)
    weight = torch.randn(1, 2, 130, 16, generator=torch.Generator().manual_seed(2))
    grads = []
    for fn, kw in ((hybrid_attention_reference, {}), (hybrid_attention_chunked, {"chunk_size": 32})):
        xs = [t.clone().requires_grad_(True) for t in base]
        gamma = xs.pop()
        (fn(*xs, window=24, layout="sw", mixing=mixing, sink_tokens=sinks, decay=gamma, cached=cached, **kw)
         * weight).sum().backward()
        grads.append([x.grad for x in xs] + [gamma.grad])
    for g_ref, g_out in zip(*grads):
        torch.testing.assert_close(g_out, g_ref, atol=5e-5, rtol=1e-4)


def test_cached_keys_are_refused_by_kernel_backends():
    args = make_inputs(1, 2, 40, 40)
    with pytest.raises(ValueError, match="does not implement cached keys"):
        hybrid_attention(*args, window=8, backend="triton", cached=random_cached(1, 2, 40, 0.5, seed=0))


@pytest.mark.parametrize("mixing,sinks", CASES)
def test_left_padded_row_equals_row_alone(mixing, sinks):
    """Sinks are the first REAL tokens: padding on the left changes nothing for the real tokens."""
    q, k, v, fq, fk, sigma, ell = make_inputs(1, 2, 90, 90, seed=3)
    pad = 13
    padded = [torch.cat([torch.randn_like(t[:, :, :pad]), t], 2) for t in (q, k, v, fq, fk)]
    key_mask = torch.ones(1, 90 + pad, dtype=torch.bool)
    key_mask[0, :pad] = False
    kw = dict(window=16, layout="sw", chunk_size=16, mixing=mixing, sink_tokens=sinks)
    plain = hybrid_attention_chunked(q, k, v, fq, fk, sigma, ell, **kw)
    out = hybrid_attention_chunked(*padded, sigma, ell, key_mask=key_mask, **kw)
    torch.testing.assert_close(out[:, :, pad:], plain, atol=1e-5, rtol=1e-5)


def per_query(q, k, v, fq, fk, sigma, ell, window, mixing, sinks, gamma=1.0, cached=()):
    """The module docstring's equations for one (batch, head), one query at a time, sw layout, no padding;
    ``cached``: key positions in the softmax set of every later query."""
    length, d = q.shape
    out = torch.zeros_like(q, dtype=torch.float64)
    for i in range(length):
        soft = [j for j in range(i + 1) if j > i - window or j < sinks or j in cached]
        lin = [j for j in range(i + 1) if j not in soft]
        s = {j: float(q[i] @ k[j]) / math.sqrt(d) for j in soft}
        m = max(s.values())
        shift = m if mixing == "lolcats" else 0.0
        terms = {j: float(sigma) * math.exp(s[j] - shift) for j in soft}
        terms.update({j: float(ell) * float(gamma) ** (i - j) * float(fq[i] @ fk[j]) for j in lin})
        den = sum(terms.values()) + (1e-6 if mixing == "lola_code" else 0.0)
        out[i] = sum(a * v[j].double() for j, a in terms.items()) / den
    return out


@pytest.mark.parametrize("gamma", [1.0, 0.9])
@pytest.mark.parametrize("mixing,sinks", CASES)
def test_reference_equals_equations(mixing, sinks, gamma):
    q, k, v, fq, fk, sigma, ell = make_inputs(1, 1, 40, 40, seed=5)
    q, k = q / 2, k / 2  # moderate logits: the unshifted 'lola_code' sum is evaluated directly here
    decay = None if gamma == 1.0 else torch.tensor([gamma])
    y = hybrid_attention_reference(q, k, v, fq, fk, sigma, ell, window=8, layout="sw", mixing=mixing,
                                   sink_tokens=sinks, decay=decay)
    want = per_query(q[0, 0], k[0, 0], v[0, 0], fq[0, 0], fk[0, 0], sigma[0], ell[0], 8, mixing, sinks, gamma)
    torch.testing.assert_close(y[0, 0].double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("gamma", [1.0, 0.9])
@pytest.mark.parametrize("mixing,sinks", CASES)
def test_cached_keys_join_the_softmax_set(mixing, sinks, gamma):
    """transfer.cached_fraction's student: keys marked cached are softmax terms for every later query."""
    q, k, v, fq, fk, sigma, ell = make_inputs(1, 2, 40, 40, seed=6)
    q, k = q / 2, k / 2
    decay = None if gamma == 1.0 else torch.tensor([gamma, gamma])
    cached = torch.zeros(1, 2, 40, dtype=torch.bool)
    cached[0, 0, [2, 9, 10, 25]] = True
    cached[0, 1, [0, 17, 39]] = True
    y = hybrid_attention_reference(q, k, v, fq, fk, sigma, ell, window=8, layout="sw", mixing=mixing,
                                   sink_tokens=sinks, decay=decay, cached=cached)
    for head in range(2):
        keys = set(torch.nonzero(cached[0, head]).flatten().tolist())
        want = per_query(q[0, head], k[0, head], v[0, head], fq[0, head], fk[0, head], sigma[head], ell[head], 8,
                         mixing, sinks, gamma, cached=keys)
        torch.testing.assert_close(y[0, head].double(), want, atol=1e-5, rtol=1e-5)
    none = hybrid_attention_reference(q, k, v, fq, fk, sigma, ell, window=8, layout="sw", mixing=mixing,
                                      sink_tokens=sinks, decay=decay, cached=torch.zeros_like(cached))
    plain = hybrid_attention_reference(q, k, v, fq, fk, sigma, ell, window=8, layout="sw", mixing=mixing,
                                       sink_tokens=sinks, decay=decay)
    torch.testing.assert_close(none, plain)


def test_lola_code_is_stable_for_large_logits():
    """e^{s} overflows float32 past s = 88.7; the max-stabilised form stays finite and equals the small-logit
    form with the linear block's share divided by e^{shift} (here: negligible)."""
    q, k, v, fq, fk, sigma, ell = make_inputs(1, 2, 100, 100, seed=9)
    y = hybrid_attention_chunked(q * 40, k, v, fq, fk, sigma, ell, window=16, layout="sw", chunk_size=32,
                                 mixing="lola_code", sink_tokens=2)
    assert torch.isfinite(y).all()
    ref = hybrid_attention_reference(q * 40, k, v, fq, fk, sigma, ell, window=16, layout="sw",
                                     mixing="lola_code", sink_tokens=2)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)


def test_mixing_weights():
    w = torch.tensor([-2.0, 0.0, 3.0])
    s, e = mixing_weights(w, "lolcats")
    torch.testing.assert_close(e, torch.ones(3))
    torch.testing.assert_close(mixing_weights(w, "lolcats", affine=True)[1], 1 - s)
    torch.testing.assert_close(mixing_weights(w, "lola_code")[1], 1 - torch.sigmoid(w))
    with pytest.raises(ValueError, match="attention.mixing"):
        mixing_weights(w, "nope")


def test_sink_keys_are_first_real_tokens():
    mask = torch.tensor([[False, False, True, True, True, True], [True] * 6, [False] * 5 + [True]])
    got = sink_keys(mask, 3, 6, 2, "cpu")
    want = torch.tensor([[0, 0, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(got, want)
    assert sink_keys(mask, 3, 6, 0, "cpu") is None


def test_decay_bounds_the_linear_mass():
    """With gamma < 1 the output at the end of a long sequence no longer depends on the distant past."""
    q, k, v, fq, fk, sigma, ell = make_inputs(1, 2, 600, 600, seed=4)
    kw = dict(window=16, layout="sw", chunk_size=32, decay=torch.tensor([0.9, 0.95]))
    full = hybrid_attention_chunked(q, k, v, fq, fk, sigma, ell, **kw)
    tail = hybrid_attention_chunked(*(t[:, :, 300:] for t in (q, k, v, fq, fk)), sigma, ell, **kw)
    torch.testing.assert_close(full[:, :, -1], tail[:, :, -1], atol=1e-5, rtol=1e-5)
    undecayed = hybrid_attention_chunked(q, k, v, fq, fk, sigma, ell, window=16, layout="sw", chunk_size=32)
    assert (undecayed[:, :, -1] - full[:, :, -1]).abs().max() > 1e-3
