"""lola_kernels.guard: backend 'auto' self-checks each Triton kernel once per device and options and falls back to
the PyTorch path (one warning naming the kernel and the error) when it raises or returns wrong values; backend
'triton' is never guarded.

'auto' sends only CUDA tensors to kernels. On this CPU-only machine the dispatch tests feed it CPU tensors of a
subclass whose ``is_cuda`` is True; the kernels there are small fakes (correct, raising, or wrong), while the
real kernels run the checks under Triton's interpreter (TRITON_INTERPRET=1, tests/conftest.py), or compiled on a
CUDA machine (scripts/gpu_check.py runs this file there).
"""
from __future__ import annotations

import os
import warnings

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # read when triton is imported; conftest sets it for the whole session

pytest.importorskip("triton")

import lola_kernels  # noqa: E402
import lola_kernels.lola as kl  # noqa: E402
from lola_kernels import guard  # noqa: E402
from lola_train.modeling import hybrid_ops  # noqa: E402
from lola_train.modeling.hybrid_ops import BACKENDS, hybrid_attention, hybrid_attention_reference  # noqa: E402
from lola_train.modeling.lola_ops import lola_kernels_for  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
REAL = "cuda" if torch.cuda.is_available() else "cpu"  # where the real kernels run


class CudaLooking(torch.Tensor):
    """A CPU tensor that says it is on CUDA: enough for the 'auto' dispatch to consider the kernels."""

    @property
    def is_cuda(self):
        return True


@pytest.fixture(autouse=True)
def fresh_guard():
    guard.reset()
    yield
    guard.reset()


def inputs(b=1, h=2, length=80, d=16, feat=16, seed=0, grad=False, cuda_looking=True, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, length, d, generator=g) for _ in range(3))
    fq, fk = (torch.softmax(torch.randn(b, h, length, feat, generator=g), -1) for _ in range(2))
    sigma, ell = torch.rand(h, generator=g) * 0.8 + 0.1, torch.rand(h, generator=g) + 0.5
    out = [t.to(device) for t in (q, k, v, fq, fk, sigma, ell)]
    if cuda_looking:
        out = [t.as_subclass(CudaLooking) for t in out]
    return [t.requires_grad_() for t in out] if grad else out


def plain(t):
    return t.as_subclass(torch.Tensor)


KW = dict(window=8, layout="sw")


def reference(*args, **kw):
    return plain(hybrid_attention_reference(*(plain(t) for t in args), **KW, **kw))


def fake_backend(impl):
    """A BACKENDS entry like lola_kernels.triton_backend: registry signature, supports, guarded; counts calls."""

    def backend(q, k, v, fq, fk, sigma, ell, *, window, layout, key_mask=None, chunk_size=64, mixing="lolcats",
                sink_tokens=0):
        backend.calls += 1
        return impl(q, k, v, fq, fk, sigma, ell, window=window, layout=layout, key_mask=key_mask, mixing=mixing,
                    sink_tokens=sink_tokens)

    backend.calls = 0
    backend.supports = lambda q, fq, **_: True
    backend.guarded = guard.guarded(backend)
    return backend


def exact(q, k, v, fq, fk, sigma, ell, **kw):
    return hybrid_attention_reference(q, k, v, fq, fk, sigma, ell, **kw)


def raising(*args, **kw):
    raise RuntimeError("PTX JIT compilation failed: out of registers (planted)")


def wrong(q, k, v, fq, fk, sigma, ell, **kw):
    return hybrid_attention_reference(q, k, v, fq, fk, sigma, ell, **kw) * 1.1


class _WrongGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y):
        return y.clone()

    @staticmethod
    def backward(ctx, dy):
        return 2 * dy


def wrong_backward(q, k, v, fq, fk, sigma, ell, **kw):
    return _WrongGrad.apply(hybrid_attention_reference(q, k, v, fq, fk, sigma, ell, **kw))


def guard_warnings(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn()
    return result, [w for w in caught if "lola_kernels" in str(w.message)]


def test_correct_kernel_is_used_after_its_check(monkeypatch):
    backend = fake_backend(exact)
    monkeypatch.setitem(BACKENDS, "triton", backend)
    args = inputs()
    y, warned = guard_warnings(lambda: hybrid_attention(*args, backend="auto", **KW))
    assert not warned
    assert backend.calls == 3  # the check (offset queries + whole sequence) and the call
    torch.testing.assert_close(plain(y), reference(*args), rtol=0, atol=1e-6)
    hybrid_attention(*args, backend="auto", **KW)
    assert backend.calls == 4  # checked once per process, device and options
    (row,) = guard.report()
    assert row["passed"] and row["kernel"] == "hybrid_attention_triton" and row["device"] == "cpu"


@pytest.mark.parametrize("impl,error", [(raising, "RuntimeError: PTX JIT compilation failed"),
                                        (wrong, "max |kernel - PyTorch|")])
def test_failing_kernel_falls_back_with_one_warning(monkeypatch, impl, error):
    backend = fake_backend(impl)
    monkeypatch.setitem(BACKENDS, "triton", backend)
    args = inputs()
    want = plain(hybrid_attention(*(plain(t) for t in args), backend="chunked", **KW))
    y, warned = guard_warnings(lambda: hybrid_attention(*args, backend="auto", **KW))
    torch.testing.assert_close(plain(y), want, rtol=0, atol=0)   # exactly the PyTorch path
    assert len(warned) == 1 and warned[0].category is RuntimeWarning
    message = str(warned[0].message)
    assert "hybrid_attention_triton" in message and error in message and "PyTorch path" in message
    calls = backend.calls
    for _ in range(2):  # later calls: no second check, no second warning, no kernel call
        y, again = guard_warnings(lambda: hybrid_attention(*args, backend="auto", **KW))
        assert not again and backend.calls == calls
        torch.testing.assert_close(plain(y), want, rtol=0, atol=0)
    (row,) = guard.report()
    assert not row["passed"] and error in row["error"]


def test_other_options_are_checked_separately_but_warned_once(monkeypatch):
    backend = fake_backend(raising)
    monkeypatch.setitem(BACKENDS, "triton", backend)
    args = inputs()
    _, warned = guard_warnings(lambda: hybrid_attention(*args, backend="auto", **KW))
    _, again = guard_warnings(lambda: hybrid_attention(*args, backend="auto", window=8, layout="tk"))
    assert len(warned) == 1 and not again  # one warning per kernel and device
    assert [r["options"]["layout"] for r in guard.report()] == ["sw", "tk"]


def test_wrong_gradients_fall_back_in_training_only(monkeypatch):
    backend = fake_backend(wrong_backward)
    monkeypatch.setitem(BACKENDS, "triton", backend)
    args = inputs()
    with torch.no_grad():
        _, warned = guard_warnings(lambda: hybrid_attention(*args, backend="auto", **KW))
    assert not warned  # the forward is right: inference keeps the kernel
    calls = backend.calls
    train = inputs(grad=True)
    y, warned = guard_warnings(lambda: hybrid_attention(*train, backend="auto", **KW))
    assert len(warned) == 1 and "dq: max |kernel - PyTorch|" in str(warned[0].message)
    grads = torch.autograd.grad(plain(y).sum(), train)
    want = torch.autograd.grad(reference(*train).sum(), train)
    for got, w in zip(grads, want):  # the training call took the PyTorch path: right gradients
        torch.testing.assert_close(plain(got), plain(w), rtol=0, atol=1e-5)
    with torch.no_grad():
        hybrid_attention(*args, backend="auto", **KW)
    assert backend.calls > calls  # inference still uses the kernel
    assert {(r["options"]["backward"], r["passed"]) for r in guard.report()} == {(False, True), (True, False)}


def test_failure_in_a_real_call_after_the_check(monkeypatch):
    def long_inputs_fail(q, k, v, fq, fk, sigma, ell, **kw):
        if k.shape[2] > 200:
            raise RuntimeError("illegal launch configuration (planted)")
        return exact(q, k, v, fq, fk, sigma, ell, **kw)

    backend = fake_backend(long_inputs_fail)
    monkeypatch.setitem(BACKENDS, "triton", backend)
    args = inputs(length=240)
    y, warned = guard_warnings(lambda: hybrid_attention(*args, backend="auto", **KW))
    assert len(warned) == 1 and "after the check passed" in str(warned[0].message)
    torch.testing.assert_close(plain(y), reference(*args), rtol=0, atol=1e-5)
    calls = backend.calls
    hybrid_attention(*args, backend="auto", **KW)
    assert backend.calls == calls


def test_backend_triton_is_never_guarded(monkeypatch):
    monkeypatch.setitem(BACKENDS, "triton", fake_backend(raising))
    args = inputs(cuda_looking=False)
    with pytest.raises(RuntimeError, match="planted"):
        hybrid_attention(*args, backend="triton", **KW)
    monkeypatch.setitem(BACKENDS, "triton", fake_backend(wrong))
    y = hybrid_attention(*args, backend="triton", **KW)
    assert (y - reference(*args)).abs().max() > 1e-2  # its wrong values come through: no check, no fallback
    assert guard.report() == []


def test_cpu_tensors_never_reach_the_guard(monkeypatch):
    backend = fake_backend(raising)
    monkeypatch.setitem(BACKENDS, "triton", backend)
    args = inputs(cuda_looking=False)
    _, warned = guard_warnings(lambda: hybrid_attention(*args, backend="auto", **KW))
    assert not warned and backend.calls == 0 and guard.report() == []


def test_real_kernel_passes_its_check_forward_and_backward():
    """The interpreted Triton kernel against the PyTorch path, with a mask and GQA-shaped options, as the guard
    runs it on a GPU (lengths 2w + 101: no block size divides them). The global RNG is not touched."""
    q, k, v, fq, fk, sigma, ell = inputs(b=2, cuda_looking=False, device=REAL)
    rng = torch.get_rng_state()
    error = guard.check_hybrid(lola_kernels.triton_backend, hybrid_ops._auto, q, k, fq, window=4, layout="tk",
                               masked=True, chunk_size=16, backward=True)
    assert error is None
    assert torch.equal(rng, torch.get_rng_state())
    y, warned = guard_warnings(lambda: lola_kernels.triton_backend.guarded(
        q, k, v, fq, fk, sigma, ell, window=4, layout="sw", fallback=hybrid_ops._auto))
    assert not warned and guard.report()[0]["passed"] and guard.report()[0]["device"].startswith(REAL)
    torch.testing.assert_close(y, hybrid_attention_reference(q, k, v, fq, fk, sigma, ell, window=4, layout="sw"),
                               rtol=0, atol=1e-4)


def test_check_catches_a_real_kernel_that_is_wrong(monkeypatch):
    """The same real kernel with its linear terms dropped (a plausible bug) fails the check."""
    import lola_kernels.hybrid as kh

    def no_linear(q, k, v, fq, fk, sigma, ell, **kw):
        return kh.hybrid_attention_triton(q, k, v, fq, fk, sigma, torch.zeros_like(ell), window=kw["window"],
                                          layout=kw["layout"], key_mask=kw["key_mask"])

    q, k, _, fq, _, _, _ = inputs(cuda_looking=False, device=REAL)
    error = guard.check_hybrid(no_linear, hybrid_ops._auto, q, k, fq, window=4, layout="sw", masked=False)
    assert error is not None and "max |kernel - PyTorch|" in error


# ------------------------------------------------------------------------------------------------ LoLA kernels

def cuda_looking_x(d=16):
    if REAL == "cuda":
        return torch.zeros(1, 2, 1, d, device="cuda")
    return torch.zeros(1, 2, 1, d).as_subclass(CudaLooking)


def test_lola_kernels_pass_their_check():
    assert lola_kernels_for(cuda_looking_x(), "auto", 16, 16) is kl
    (row,) = guard.report()
    assert row["passed"] and row["options"] == dict(d=16, D=16)
    assert lola_kernels_for(cuda_looking_x(), "auto", 16, 16) is kl  # cached: one check


@pytest.mark.parametrize("name,broken,error", [
    ("fold_triton", "raise", "RuntimeError: out of resources (planted)"),
    ("lola_attend_triton", "wrong", "y: max |kernel - PyTorch|"),
    ("self_recall_error_triton", "wrong", "sre: max |kernel - PyTorch|"),
])
def test_lola_kernel_failure_keeps_the_pytorch_path(monkeypatch, name, broken, error):
    real = getattr(kl, name)

    def bad(*args, **kwargs):
        if broken == "raise":
            raise RuntimeError("out of resources (planted)")
        return real(*args, **kwargs) + 0.5

    monkeypatch.setattr(kl, name, bad)
    got, warned = guard_warnings(lambda: lola_kernels_for(cuda_looking_x(), "auto", 16, 16))
    assert got is None
    assert len(warned) == 1
    message = str(warned[0].message)
    assert message.startswith(f"lola_kernels: the Triton kernel {name} failed") and error in message
    got, again = guard_warnings(lambda: lola_kernels_for(cuda_looking_x(), "auto", 16, 16))
    assert got is None and not again
    assert lola_kernels_for(cuda_looking_x(), "triton", 16, 16) is kl  # 'triton' is never guarded
