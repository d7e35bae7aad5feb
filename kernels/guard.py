"""Self-check of the Triton kernels before backend 'auto' trusts them (import name ``lola_kernels.guard``).

The kernels are tested under ``TRITON_INTERPRET=1`` and compiled for sm_90, but until they have a record on real
GPUs a user's first CUDA run must not be the test. So ``attention.backend: auto`` runs each kernel once per
process, device and set of compile-time options on a small input (lengths that are not multiples of any block)
against the PyTorch path, forward and, when gradients are needed, backward. On a mismatch, a compile error or a
launch failure it uses the PyTorch path for those options from then on and warns once per kernel and device,
naming the kernel and the error. ``backend: triton`` bypasses all of this and fails loudly.

* :func:`guarded` wraps the hybrid-attention backend (registry signature) for 'auto':
  ``lola_train.modeling.hybrid_ops.hybrid_attention`` calls ``BACKENDS['triton'].guarded(..., fallback=_auto)``.
  Options checked separately (each is a different compiled kernel or code path): dtype of q/k/v and of the
  features, head dim d, feature width D, GQA groups, layout, key mask or not, mixing, sink tokens, and whether
  the backward is needed. A real call that raises (other than out-of-memory) also switches those options to the
  PyTorch path, with the same single warning.
* :func:`lola_kernels_ok` checks the three LoLA inference kernels (attention segment, self-recall error, fold)
  against ``lola_ops`` once per device and widths (d, D), in fp32 and bf16 inputs and both mixings;
  ``lola_ops.lola_kernels_for`` returns None (the PyTorch path) when it fails.
* :func:`report` lists every check of this process (for ``scripts/gpu_check.py`` and bug reports);
  :func:`reset` forgets them (tests).

The check inputs come from a private CPU generator (the global RNG streams, hence training runs, are untouched)
and run with autocast off, so both sides compute the exact function.
"""
from __future__ import annotations

import threading
import warnings
from typing import Callable

import torch

HYBRID_KERNEL = "hybrid_attention_triton"
LOLA_KERNELS = ("lola_attend_triton", "self_recall_error_triton", "fold_triton")

# max |kernel - PyTorch| allowed, relative to max(1, max |PyTorch|). fp32: both sides compute in fp32 (the kernels
# use exact ieee dots); half inputs: outputs and q/k/v gradients are rounded to 8 mantissa bits on both sides.
TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-3, torch.bfloat16: 5e-2, torch.float16: 2e-2}
LOLA_TOLERANCE = 1e-3  # the LoLA kernels return fp32 and read half inputs exactly

_LOCK = threading.RLock()
_RESULTS: dict[tuple, dict] = {}   # key -> {"kernel", "device", "options", "passed", "error"}
_WARNED: set[tuple[str, str]] = set()


def report() -> list[dict]:
    """Every self-check of this process: kernel, device, options, passed, error (None when it passed)."""
    with _LOCK:
        return [dict(r) for r in _RESULTS.values()]


def reset() -> None:
    """Forget all checks and warnings (tests)."""
    with _LOCK:
        _RESULTS.clear()
        _WARNED.clear()


def _error_text(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(e).__name__}: {first[:400]}" if first else type(e).__name__


def _record_failure(key: tuple, kernel: str, device: str, options: dict, error: str) -> None:
    with _LOCK:
        _RESULTS[key] = dict(kernel=kernel, device=device, options=options, passed=False, error=error)
        if (kernel, device) in _WARNED:
            return
        _WARNED.add((kernel, device))
    opts = ", ".join(f"{k}={v}" for k, v in options.items())
    warnings.warn(f"lola_kernels: the Triton kernel {kernel} failed its self-check on {device} ({opts}): {error}. "
                  f"attention.backend 'auto' uses the PyTorch path instead for these options in this process "
                  f"(correct, slower); 'triton' forces the kernel. Please report this with the output of "
                  f"`python scripts/gpu_check.py`.", RuntimeWarning, stacklevel=4)


def _checked(key: tuple, kernel: str, device: str, options: dict, check: Callable[[], str | None],
             names: tuple[str, ...] = ()) -> bool:
    """Run ``check`` once for ``key`` (it returns None or an error text; exceptions count as errors). The warning
    names ``kernel``, or the one of ``names`` that the error text starts with."""
    with _LOCK:
        done = _RESULTS.get(key)
        if done is not None:
            return done["passed"]
        try:
            error = check()
        except Exception as e:  # compile errors, launch failures, shape errors: all mean "do not use it"
            error = _error_text(e)
        if error is None:
            _RESULTS[key] = dict(kernel=kernel, device=device, options=options, passed=True, error=None)
            return True
        _record_failure(key, next((n for n in names if error.startswith(n + " ")), kernel), device, options, error)
        return False


def _compare(name: str, got: torch.Tensor, want: torch.Tensor, tol: float) -> str | None:
    if got.shape != want.shape:
        return f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    got, want = got.float(), want.float()
    if not torch.isfinite(got).all():
        return f"{name}: non-finite values"
    err = (got - want).abs().max().item() if got.numel() else 0.0
    bound = tol * max(1.0, want.abs().max().item() if want.numel() else 0.0)
    if not err <= bound:
        return f"{name}: max |kernel - PyTorch| = {err:.3g} > {bound:.3g}"
    return None


# ------------------------------------------------------------------------------------------- hybrid attention

def check_window(window: int) -> int:
    """The window of the check: the call's up to 128 (the window is a runtime argument of the kernels, so a
    smaller one runs the same code), else 128 or 129 (keeping Triton's divisible-by-16 specialization)."""
    return window if window <= 128 else (128 if window % 16 == 0 else 129)


def _hybrid_inputs(q, k, fq, window: int, masked: bool, backward: bool):
    """Small inputs like the call's: same dtypes, d, D and GQA groups; lengths 2w + 101 (odd, so no block size
    divides them, and every layout has linear terms); a left-padded and a holed mask row when the call has one."""
    g = torch.Generator().manual_seed(20240611)
    dev = q.device
    groups = max(1, q.shape[1] // max(1, k.shape[1]))
    hk, d, feat = 2, q.shape[-1], fq.shape[-1]
    h = hk * groups
    lk = 2 * window + 101
    b = 2

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    qq = randn(b, h, lk, d, scale=1.5).to(dev, q.dtype)
    kk = randn(b, hk, lk, d, scale=1.5).to(dev, k.dtype)
    vv = randn(b, hk, lk, d).to(dev, k.dtype)
    fqq = torch.softmax(randn(b, h, lk, feat), -1).to(dev, fq.dtype)
    fkk = torch.softmax(randn(b, h, lk, feat), -1).to(dev, fq.dtype)
    sigma = (torch.rand(h, generator=g) * 0.8 + 0.1).to(dev)
    ell = (torch.rand(h, generator=g) + 0.5).to(dev)
    key_mask = None
    if masked:
        key_mask = torch.rand(b, lk, generator=g) > 0.2
        key_mask[0, : lk // 3] = False   # left padding
        key_mask[:, -1] = True
        key_mask = key_mask.to(dev)
    inputs = [qq, kk, vv, fqq, fkk, sigma, ell]
    if backward:
        inputs = [t.requires_grad_() for t in inputs]
    return inputs, key_mask


def check_hybrid(kernel: Callable, fallback: Callable, q, k, fq, *, window: int, layout: str, masked: bool,
                 chunk_size: int = 64, mixing: str = "lolcats", sink_tokens: int = 0,
                 backward: bool = False) -> str | None:
    """``kernel`` against ``fallback`` (both with the BACKENDS signature) on small inputs shaped like the call.
    Returns None when they agree, else what differs. Exceptions propagate (the caller records them)."""
    tol = TOLERANCE.get(q.dtype, 5e-2)
    window = check_window(window)
    inputs, key_mask = _hybrid_inputs(q, k, fq, window, masked, backward)
    kw = dict(window=window, layout=layout, key_mask=key_mask, chunk_size=chunk_size, mixing=mixing,
              sink_tokens=sink_tokens)
    names = ("y", "dq", "dk", "dv", "dfq", "dfk", "dsigma", "dell")
    with torch.autocast(q.device.type, enabled=False), torch.set_grad_enabled(backward):
        # the queries alone (offset: Lq < Lk, as a prefill after cached tokens) and the whole sequence
        lq = inputs[0].shape[2] - 40
        part = [inputs[0][:, :, -lq:], *inputs[1:3], inputs[3][:, :, -lq:], *inputs[4:]]
        err = _compare(f"forward, {lq} of {inputs[1].shape[2]} queries", kernel(*part, **kw).detach(),
                       fallback(*part, **kw).detach(), tol)
        if err:
            return err
        got, want = kernel(*inputs, **kw), fallback(*inputs, **kw)
        if backward:
            dy = torch.randn(got.shape, generator=torch.Generator().manual_seed(7)).to(got.device, got.dtype)
            got = [got] + list(torch.autograd.grad(got, inputs, dy))
            want = [want] + list(torch.autograd.grad(want, inputs, dy))
        else:
            got, want = [got], [want]
        for name, a, b in zip(names, got, want):
            err = _compare(name if backward else "forward", a.detach(), b.detach(), tol)
            if err:
                return err
    return None


def guarded(kernel: Callable, name: str = HYBRID_KERNEL) -> Callable:
    """``kernel`` (BACKENDS signature) for backend 'auto': self-checked first, the given ``fallback`` (the
    PyTorch path of the caller's hybrid_ops) when the check fails or the call raises."""

    def run(q, k, v, fq, fk, sigma, ell, *, window, layout, key_mask=None, chunk_size=64, mixing="lolcats",
            sink_tokens=0, fallback: Callable):
        kw = dict(window=window, layout=layout, key_mask=key_mask, chunk_size=chunk_size, mixing=mixing,
                  sink_tokens=sink_tokens)
        backward = torch.is_grad_enabled() and any(
            t.requires_grad for t in (q, k, v, fq, fk, sigma, ell) if torch.is_tensor(t))
        device = str(q.device)
        groups = q.shape[1] // max(1, k.shape[1])
        options = dict(dtype=str(q.dtype).replace("torch.", ""), features=str(fq.dtype).replace("torch.", ""),
                       d=q.shape[-1], D=fq.shape[-1], groups=groups, layout=layout,
                       key_mask=key_mask is not None, mixing=mixing, sink_tokens=int(sink_tokens),
                       backward=backward)
        key = (name, device, *options.values())

        def check():
            return check_hybrid(kernel, fallback, q, k, fq, window=window, layout=layout,
                                masked=key_mask is not None, chunk_size=chunk_size, mixing=mixing,
                                sink_tokens=sink_tokens, backward=backward)

        if not _checked(key, name, device, options, check):
            return fallback(q, k, v, fq, fk, sigma, ell, **kw)
        try:
            return kernel(q, k, v, fq, fk, sigma, ell, **kw)
        except torch.cuda.OutOfMemoryError:
            raise  # memory, not a kernel fault; the PyTorch path needs more of it
        except Exception as e:
            _record_failure(key, name, device, options, f"{_error_text(e)} (in a real call after the check passed)")
            return fallback(q, k, v, fq, fk, sigma, ell, **kw)

    run.kernel = kernel
    return run


# ------------------------------------------------------------------------------------------- LoLA kernels

def _lola_inputs(g, device, dtype, b, h, hk, lq, m, d, feat):
    q = (torch.randn(b, h, lq, d, generator=g) * 1.5).to(device, dtype)
    k = (torch.randn(b, hk, m, d, generator=g) * 1.5).to(device, dtype)
    v = torch.randn(b, hk, m, d, generator=g).to(device, dtype)
    mask = torch.rand(b, h, lq, m, generator=g) < 0.4
    mask[:, :, ::3] = False                            # rows with only the linear memory
    fq = torch.softmax(torch.randn(b, h, lq, feat, generator=g), -1).to(device)
    old = torch.softmax(torch.randn(b, h, 40, feat, generator=g), -1)
    h_state = (old.transpose(-1, -2) @ torch.randn(b, h, 40, d, generator=g)).to(device)
    s_state = old.sum(2).to(device)
    lin_num = (torch.softmax(torch.randn(b, h, lq, 7, generator=g), -1) @ torch.randn(b, h, 7, d, generator=g))
    lin_den = torch.rand(b, h, lq, generator=g) * 3
    sigma = torch.rand(h, generator=g) * 0.8 + 0.1
    ell = torch.rand(h, generator=g) + 0.5
    return q, k, v, mask.to(device), fq, h_state, s_state, sigma.to(device), ell.to(device), lin_num.to(device), \
        lin_den.to(device)


def check_lola(kernels, device, head_dim: int, feature_width: int) -> str | None:
    """The three LoLA kernels of module ``kernels`` (lola_kernels.lola) against lola_ops, on ``device``: attention
    segments (decode and a 37-query chunk, with and without extra linear terms, with a sparse cache when the
    kernel takes one, both mixings), self-recall error and fold (GQA, 45 candidates), each with fp32 and bf16
    k/v. The reference is ``lola_ops.lola_attend`` (the kernel's PyTorch twin, same arguments) where it exists,
    else ``fuse`` over the same terms. Returns None or '<kernel> (<case>): <error>'."""
    import inspect
    import math

    from lola_train.modeling import lola_ops

    expand_heads, fuse, self_recall_error = lola_ops.expand_heads, lola_ops.fuse, lola_ops.self_recall_error
    twin = getattr(lola_ops, "lola_attend", None)
    takes_cache = twin is not None and "cache_k" in inspect.signature(kernels.lola_attend_triton).parameters
    d, feat = head_dim or 64, feature_width or 128
    g = torch.Generator().manual_seed(20240612)
    b, h, hk, m, n = 2, 4, 2, 83, 45

    def reference(q, k, v, mask, fq, hs, ss, sigma, ell, mixing, ln, ld, cache):
        if twin is not None:
            return twin(q, k, v, mask, fq, hs, ss, sigma, ell, mixing=mixing, lin_num=ln, lin_den=ld, **cache)
        num, den = fq @ hs, (fq @ ss.unsqueeze(-1)).squeeze(-1)
        if ln is not None:
            num, den = num + ln, den + ld
        logits = (q.float() @ expand_heads(k, h).float().transpose(-1, -2)) / math.sqrt(d)
        return fuse(logits, mask.expand(-1, h, -1, -1), expand_heads(v, h).float(), num, den, sigma, ell,
                    mixing=mixing)

    cases = [(1, False, False), (37, True, False)] + ([(1, False, True), (37, True, True)] if takes_cache else [])
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).replace("torch.", "")
        for lq, extra, with_cache in cases:
            q, k, v, mask, fq, hs, ss, sigma, ell, ln, ld = _lola_inputs(g, device, dtype, b, h, hk, lq, m, d, feat)
            if not extra:
                ln = ld = None
            cache = {}
            if with_cache:  # 37 cached pairs per KV head, a few empty slots
                ok = torch.rand(b, hk, 37, generator=g) > 0.2
                cache = dict(cache_k=(torch.randn(b, hk, 37, d, generator=g) * 1.5).to(device, dtype),
                             cache_v=torch.randn(b, hk, 37, d, generator=g).to(device, dtype), cache_ok=ok.to(device))
            for mixing in ("lolcats", "lola_code"):
                # the weights hybrid_ops.mixing_weights gives: ell = 1 for 'lolcats', 1 - sigma for 'lola_code'
                el = 1 - sigma if mixing == "lola_code" else ell
                case = f"{lq} queries, {name}, mixing={mixing}{', sparse cache' if with_cache else ''}"
                try:
                    got = kernels.lola_attend_triton(q, k, v, mask, fq, hs, ss, sigma, el, mixing=mixing,
                                                     lin_num=ln, lin_den=ld, **cache)
                except Exception as e:
                    return f"lola_attend_triton ({case}): {_error_text(e)}"
                err = _compare("y", got, reference(q, k, v, mask, fq, hs, ss, sigma, el, mixing, ln, ld, cache),
                               LOLA_TOLERANCE)
                if err:
                    return f"lola_attend_triton ({case}): {err}"
        fk = torch.softmax(torch.randn(b, h, n, feat, generator=g), -1).to(device)
        v = torch.randn(b, hk, n, d, generator=g).to(device, dtype)
        _, _, _, _, _, hs, ss, _, _, _, _ = _lola_inputs(g, device, dtype, b, h, hk, 1, 1, d, feat)
        case = f"{n} candidates, {name}"
        try:
            got = kernels.self_recall_error_triton(fk, v, hs, ss, 1e-6)
        except Exception as e:
            return f"self_recall_error_triton ({case}): {_error_text(e)}"
        err = _compare("sre", got, self_recall_error(fk, expand_heads(v, h).float(), hs, ss, 1e-6), LOLA_TOLERANCE)
        if err:
            return f"self_recall_error_triton ({case}): {err}"
        fold = (torch.rand(b, hk, n, generator=g) < 0.5).to(device)
        want_h, want_s = hs.clone(), ss.clone()
        f = expand_heads(fold, h).unsqueeze(-1).float()
        want_h += (fk * f).transpose(-1, -2) @ expand_heads(v, h).float()
        want_s += (fk * f).sum(2)
        got_h, got_s = hs.clone(), ss.clone()
        try:
            kernels.fold_triton(fk, v, fold, got_h, got_s)
        except Exception as e:
            return f"fold_triton ({case}): {_error_text(e)}"
        err = _compare("H", got_h, want_h, LOLA_TOLERANCE) or _compare("s", got_s, want_s, LOLA_TOLERANCE)
        if err:
            return f"fold_triton ({case}): {err}"
    return None


def lola_kernels_ok(kernels, device, head_dim: int, feature_width: int) -> bool:
    """Whether backend 'auto' may use the LoLA kernels (module ``kernels``) on ``device`` for these widths:
    checked once per process, device and (d, D); a failure warns once and keeps the PyTorch path."""
    device = torch.device(device)

    def check():
        with torch.autocast(device.type, enabled=False), torch.no_grad():
            return check_lola(kernels, device, head_dim, feature_width)

    return _checked(("lola", str(device), head_dim, feature_width), "/".join(LOLA_KERNELS), str(device),
                    dict(d=head_dim, D=feature_width), check, names=LOLA_KERNELS)
