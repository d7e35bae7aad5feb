"""The chunked hybrid attention equals the quadratic reference, and the reference equals spec 1.4 written out."""
import math

import pytest
import torch

from lola_train.modeling.hybrid_ops import (hybrid_attention, hybrid_attention_chunked,
                                            hybrid_attention_reference, window_masks)


def make_inputs(b, h, lq, lk, d=16, dd=32, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    q, k, v = 2 * r(b, h, lq, d), 2 * r(b, h, lk, d), r(b, h, lk, d)
    fq = torch.softmax(r(b, h, lq, dd), -1)
    fk = torch.softmax(r(b, h, lk, dd), -1)
    sigma = torch.rand(h, generator=g, dtype=dtype) * 0.8 + 0.1
    ell = torch.rand(h, generator=g, dtype=dtype) + 0.5
    return q, k, v, fq, fk, sigma, ell


LENGTHS = [1, 63, 64, 65, 257, 1000]


@pytest.mark.parametrize("layout", ["sw", "tk"])
@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("window,chunk", [(64, 64), (16, 24)])
def test_chunked_matches_reference(layout, length, window, chunk):
    args = make_inputs(2, 2, length, length, seed=length)
    ref = hybrid_attention_reference(*args, window=window, layout=layout)
    out = hybrid_attention_chunked(*args, window=window, layout=layout, chunk_size=chunk)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", ["sw", "tk"])
@pytest.mark.parametrize("length", [65, 257])
def test_chunked_gradients_match_reference(layout, length):
    base = make_inputs(1, 2, length, length, seed=7)
    weight = torch.randn(1, 2, length, 16, generator=torch.Generator().manual_seed(1))
    grads = []
    for fn, kw in ((hybrid_attention_reference, {}), (hybrid_attention_chunked, {"chunk_size": 32})):
        xs = [t.clone().requires_grad_(True) for t in base]
        (fn(*xs, window=24, layout=layout, **kw) * weight).sum().backward()
        grads.append([x.grad for x in xs])
    for g_ref, g_out in zip(*grads):
        torch.testing.assert_close(g_out, g_ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("layout", ["sw", "tk"])
@pytest.mark.parametrize("lq", [1, 5, 70])
def test_chunked_with_offset_and_left_padding(layout, lq):
    lk = 150
    args = make_inputs(2, 3, lq, lk, seed=lq)
    key_mask = torch.ones(2, lk, dtype=torch.bool)
    key_mask[1, :37] = False  # left padding of the second row
    ref = hybrid_attention_reference(*args, window=20, layout=layout, key_mask=key_mask)
    out = hybrid_attention_chunked(*args, window=20, layout=layout, key_mask=key_mask, chunk_size=16)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_padding_rows_are_ignored_exactly():
    """A left-padded row gives the same outputs for its real tokens as the unpadded sequence."""
    q, k, v, fq, fk, sigma, ell = make_inputs(1, 2, 90, 90, seed=3)
    pad = 13
    padded = [torch.cat([torch.randn_like(t[:, :, :pad]), t], 2) for t in (q, k, v, fq, fk)]
    key_mask = torch.ones(1, 90 + pad, dtype=torch.bool)
    key_mask[0, :pad] = False
    for layout in ("sw",):  # tk blocks are aligned to the end, which padding on the left does not move
        plain = hybrid_attention_chunked(q, k, v, fq, fk, sigma, ell, window=16, layout=layout, chunk_size=16)
        out = hybrid_attention_chunked(*padded, sigma, ell, window=16, layout=layout, key_mask=key_mask,
                                       chunk_size=16)
        torch.testing.assert_close(out[:, :, pad:], plain, atol=1e-5, rtol=1e-5)
        assert torch.isfinite(out).all()


def spec_equation(q, k, v, fq, fk, sigma, ell, window, layout):
    """Spec 1.4 for one (batch, head), one query at a time, with Win(i)/Lin(i) as explicit index sets."""
    lq, lk, d = q.shape[0], k.shape[0], q.shape[1]
    off = lk - lq
    pad = (-lk) % window
    block = lambda j: (j + pad) // window  # noqa: E731
    out = []
    for i in range(lq):
        p = off + i
        if layout == "sw":
            win = [j for j in range(lk) if p - window < j <= p]
        else:
            win = [j for j in range(p + 1) if block(j) >= block(p) - 1]
        lin = [j for j in range(p + 1) if j not in win]
        s = {j: float(q[i] @ k[j]) / math.sqrt(d) for j in win}
        m = max(s.values())
        weights = {j: sigma * math.exp(s[j] - m) for j in win}
        weights.update({j: ell * float(fq[i] @ fk[j]) for j in lin})
        den = sum(weights.values())
        out.append(sum(w * v[j] for j, w in weights.items()) / den)
    return torch.stack(out)


@pytest.mark.parametrize("layout", ["sw", "tk"])
def test_reference_is_the_spec_equation(layout):
    q, k, v, fq, fk, sigma, ell = make_inputs(1, 1, 10, 10, seed=5, dtype=torch.float64)
    ref = hybrid_attention_reference(q, k, v, fq, fk, sigma, ell, window=4, layout=layout)
    expected = spec_equation(q[0, 0], k[0, 0], v[0, 0], fq[0, 0], fk[0, 0], float(sigma[0]), float(ell[0]), 4,
                             layout)
    torch.testing.assert_close(ref[0, 0].double(), expected, atol=1e-5, rtol=1e-5)


def test_terrace_blocks_are_aligned_to_the_end():
    # L=10, W=4: blocks {0,1}, {2..5}, {6..9}; query 6 sees block {2..5} plus itself, query 5 sees {0..5}.
    win, lin = window_masks(torch.arange(10), torch.arange(10), 4, "tk", 10)
    assert win[6].nonzero().flatten().tolist() == [2, 3, 4, 5, 6]
    assert lin[6].nonzero().flatten().tolist() == [0, 1]
    assert win[5].nonzero().flatten().tolist() == [0, 1, 2, 3, 4, 5]
    assert win[9].nonzero().flatten().tolist() == [2, 3, 4, 5, 6, 7, 8, 9]
    win, lin = window_masks(torch.arange(10), torch.arange(10), 4, "sw", 10)
    assert win[6].nonzero().flatten().tolist() == [3, 4, 5, 6]
    assert lin[6].nonzero().flatten().tolist() == [0, 1, 2]


def test_max_shift_is_part_of_the_function():
    """Shifting all logits changes the output (linear terms are not shifted, trap T1)."""
    q, k, v, fq, fk, sigma, ell = make_inputs(1, 1, 40, 40, seed=9)
    a = hybrid_attention_reference(q, k, v, fq, fk, sigma, ell, window=8)
    b = hybrid_attention_reference(q * 1.5, k, v, fq, fk, sigma, ell, window=8)
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("layout", ["sw", "tk"])
def test_window_covering_everything_is_softmax(layout):
    q, k, v, fq, fk, sigma, ell = make_inputs(2, 2, 50, 50, seed=11)
    out = hybrid_attention_chunked(q, k, v, fq, fk, sigma, ell, window=64, layout=layout, chunk_size=16)
    exact = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, exact, atol=1e-5, rtol=1e-5)


def test_reference_weights_are_normalised():
    q, k, v, fq, fk, sigma, ell = make_inputs(1, 2, 30, 30, seed=2)
    y, a = hybrid_attention_reference(q, k, v, fq, fk, sigma, ell, window=8, return_weights=True)
    torch.testing.assert_close(a.sum(-1), torch.ones(1, 2, 30))
    torch.testing.assert_close(a @ v, y)


def test_dispatch_rejects_unknown_backend():
    args = make_inputs(1, 1, 4, 4)
    with pytest.raises(ValueError, match="attention.backend='nope'"):
        hybrid_attention(*args, window=4, backend="nope")
