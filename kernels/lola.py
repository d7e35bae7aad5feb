"""Triton kernels for LoLA inference (spec 4): one attention segment (prefill chunk or decode token), the
self-recall error of cache candidates, and the fold of evicted pairs into the linear state.

The functions are exactly those of :mod:`lola_train.modeling.lola_ops`:

* :func:`lola_attend_triton` = ``lola_ops.lola_attend``: ``q k^T / sqrt(d)`` over the softmax set J (local keys
  under a boolean mask: sinks and the window; optionally the global cache, per-slot validity) fused with the
  linear terms ``fq H (+ lin_num)``, ``fq s (+ lin_den)``:

      m_i = max_{j in J(i)} s_ij          (softmax set only, trap T1; rows with no softmax key use m = 0)
      'lolcats':   y = (sigma sum_J e^{s-m} v + ell num_lin) / (sigma sum_J e^{s-m} + ell den_lin)   (0/0 -> 0)
      'lola_code': y = (sigma e^{m-c} sum_J e^{s-m} v + ell e^{-c} num_lin)
                       / (sigma e^{m-c} sum_J e^{s-m} + ell e^{-c} den_lin + eps e^{-c}),  c = max(m, 0)

  (sigma, ell as given: ``hybrid_ops.mixing_weights`` makes ell = 1 - sigma for 'lola_code'.) The linear terms are
  never shifted by m. One program per (block of query rows, batch*head): an online max over the key blocks of
  both sets, then the state product fq @ H [D, d] in one tile. The batch may be a batch of segments (one per
  (chunk, row) of a prefill), each with its own keys, cache and state.
* :func:`self_recall_error_triton` = ``self_recall_error``:  || v - fk H / (fk . s + eps) ||^2 per candidate.
* :func:`fold_triton`: H += sum_{folded n} fk_n^T v_n, s += sum_{folded n} fk_n (in place), the state update of
  ``select_and_fold`` (the top-G selection itself stays ``torch.topk``).

All arithmetic is float32 (``tl.dot`` with ``input_precision='ieee'``); k, v, q may be fp32/bf16/fp16 and are
cast up on load. Grouped heads: k, v, the cache and the fold mask may have fewer heads than q (head h reads
h // groups), so GQA keys are never repeated; fq, fk, H and s are per query head. Any lengths (Lq, M, N) work; head dim d and feature width D up to 128.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .hybrid import interpreting

_NEG = tl.constexpr(-1.0e30)  # running-max sentinel of rows that have seen no softmax key yet

MIXING_CODES = {"lolcats": 0, "lola_code": 1}
MAX_HEAD_DIM = 128
MAX_FEATURE_WIDTH = 128


@triton.jit
def _softmax_block(acc, l_w, m, q, K, V, kv_off, j0, n_keys, vis_row, cd, d, d_ok, scale, bias,
                   BM: tl.constexpr, PREC: tl.constexpr):
    """One block of BM keys (rows j0.. of K, V at kv_off) into the online softmax (acc, l_w, m); vis_row [BQ, BM]:
    visibility of the block's keys (already False past n_keys); ``bias`` is added to the block's logits."""
    j = j0 + tl.arange(0, BM)
    j_ok = j < n_keys
    k = tl.load(K + kv_off + j[:, None] * d + cd[None, :], mask=j_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    v = tl.load(V + kv_off + j[:, None] * d + cd[None, :], mask=j_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    s = tl.where(vis_row, tl.dot(q, tl.trans(k), input_precision=PREC) * scale + bias, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    alpha = tl.exp(m - m_new)
    p = tl.exp(s - m_new[:, None])  # 0 where not visible
    acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PREC)
    l_w = l_w * alpha + tl.sum(p, 1)
    return acc, l_w, m_new


@triton.jit
def _lola_attn_kernel(Q, K, V, MASK, K2, V2, OK2, FQ, HS, SS, LN, LD, SIG, ELL, Y,
                      Lq, M, M2, H, G, G2, d, D, scale, eps, cache_bias, msb, msh, msq, msm,
                      MIXING: tl.constexpr, HAS_LIN: tl.constexpr, BQ: tl.constexpr, BM: tl.constexpr,
                      DH: tl.constexpr, DF: tl.constexpr, PREC: tl.constexpr, HAS_CACHE: tl.constexpr = False):
    """Y[bh, rows] for one block of BQ query rows of one (batch, head); see the module docstring. G, G2: query
    heads per head of (K, V) and of the cache (K2, V2, OK2; read only with HAS_CACHE, logits + cache_bias)."""
    pid_q = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    i = pid_q * BQ + tl.arange(0, BQ)
    cd = tl.arange(0, DH)
    cf = tl.arange(0, DF)
    row_ok = i < Lq
    d_ok = cd < d
    f_ok = cf < D
    q = tl.load(Q + bh * Lq * d + i[:, None] * d + cd[None, :], mask=row_ok[:, None] & d_ok[None, :],
                other=0.0).to(tl.float32)

    acc = tl.zeros([BQ, DH], dtype=tl.float32)
    l_w = tl.zeros([BQ], dtype=tl.float32)
    m = tl.full([BQ], _NEG, tl.float32)
    kv_off = (b * (H // G) + h // G) * M * d
    m_base = MASK + b * msb + h * msh + i[:, None] * msq
    for j0 in range(0, M, BM):  # local keys (sinks, window), visibility per query
        j = j0 + tl.arange(0, BM)
        vis = tl.load(m_base + j[None, :] * msm, mask=row_ok[:, None] & (j < M)[None, :], other=0) != 0
        acc, l_w, m = _softmax_block(acc, l_w, m, q, K, V, kv_off, j0, M, vis, cd, d, d_ok, scale, 0.0, BM, PREC)
    if HAS_CACHE:  # the global cache, one validity flag per slot
        c_head = b * (H // G2) + h // G2
        for j0 in range(0, M2, BM):
            j = j0 + tl.arange(0, BM)
            ok = tl.load(OK2 + c_head * M2 + j, mask=j < M2, other=0) != 0
            acc, l_w, m = _softmax_block(acc, l_w, m, q, K2, V2, c_head * M2 * d, j0, M2,
                                         row_ok[:, None] & ok[None, :], cd, d, d_ok, scale, cache_bias, BM, PREC)
    m = tl.where(m > _NEG, m, 0.0)  # rows with no softmax key (acc = l_w = 0 there)

    fq = tl.load(FQ + bh * Lq * D + i[:, None] * D + cf[None, :], mask=row_ok[:, None] & f_ok[None, :],
                 other=0.0).to(tl.float32)
    hs = tl.load(HS + bh * D * d + cf[:, None] * d + cd[None, :], mask=f_ok[:, None] & d_ok[None, :], other=0.0)
    ss = tl.load(SS + bh * D + cf, mask=f_ok, other=0.0)
    num_l = tl.dot(fq, hs, input_precision=PREC)
    den_l = tl.sum(fq * ss[None, :], 1)
    if HAS_LIN:
        num_l += tl.load(LN + bh * Lq * d + i[:, None] * d + cd[None, :], mask=row_ok[:, None] & d_ok[None, :],
                         other=0.0)
        den_l += tl.load(LD + bh * Lq + i, mask=row_ok, other=0.0)

    sigma = tl.load(SIG + h)
    ell = tl.load(ELL + h)
    if MIXING == 0:  # 'lolcats'
        num = sigma * acc + ell * num_l
        den = sigma * l_w + ell * den_l
        y = num / tl.where(den > 0, den, 1.0)[:, None]
    else:  # 'lola_code', stabilised by e^{-c}, c = max(m, 0)
        c = tl.maximum(m, 0.0)
        soft_scale = tl.exp(m - c)
        lin_scale = tl.exp(-c)
        num = (sigma * soft_scale)[:, None] * acc + (ell * lin_scale)[:, None] * num_l
        den = sigma * soft_scale * l_w + ell * lin_scale * den_l + eps * lin_scale
        y = num / den[:, None]
    tl.store(Y + bh * Lq * d + i[:, None] * d + cd[None, :], y, mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _sre_kernel(FK, V, HS, SS, OUT, N, H, G, d, D, eps,
                BN: tl.constexpr, DH: tl.constexpr, DF: tl.constexpr, PREC: tl.constexpr):
    """OUT[bh, n] = || v_n - fk_n H / (fk_n . s + eps) ||^2 for a block of BN candidates."""
    pid_n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    n = pid_n * BN + tl.arange(0, BN)
    cd = tl.arange(0, DH)
    cf = tl.arange(0, DF)
    n_ok = n < N
    d_ok = cd < d
    f_ok = cf < D
    fk = tl.load(FK + bh * N * D + n[:, None] * D + cf[None, :], mask=n_ok[:, None] & f_ok[None, :],
                 other=0.0).to(tl.float32)
    v = tl.load(V + (b * (H // G) + h // G) * N * d + n[:, None] * d + cd[None, :],
                mask=n_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    hs = tl.load(HS + bh * D * d + cf[:, None] * d + cd[None, :], mask=f_ok[:, None] & d_ok[None, :], other=0.0)
    ss = tl.load(SS + bh * D + cf, mask=f_ok, other=0.0)
    recall = tl.dot(fk, hs, input_precision=PREC) / (tl.sum(fk * ss[None, :], 1) + eps)[:, None]
    err = tl.where(d_ok[None, :], v - recall, 0.0)
    tl.store(OUT + bh * N + n, tl.sum(err * err, 1), mask=n_ok)


@triton.jit
def _fold_kernel(FK, V, F, HS, SS, N, H, G, GF, d, D, fsb, fsh, fsn,
                 BN: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    """HS[bh] tile [BD, BV] += sum_n f_n fk_n^T v_n;  SS[bh] tile [BD] += sum_n f_n fk_n (f = fold mask)."""
    pid_d = tl.program_id(0)
    pid_v = tl.program_id(1)
    bh = tl.program_id(2).to(tl.int64)
    b = bh // H
    h = bh % H
    cf = pid_d * BD + tl.arange(0, BD)
    cd = pid_v * BV + tl.arange(0, BV)
    f_ok = cf < D
    d_ok = cd < d
    v_base = V + (b * (H // G) + h // G) * N * d
    f_base = F + b * fsb + (h // GF) * fsh
    acc = tl.zeros([BD, BV], dtype=tl.float32)
    z = tl.zeros([BD], dtype=tl.float32)
    for n0 in range(0, N, BN):
        n = n0 + tl.arange(0, BN)
        n_ok = n < N
        fold = tl.load(f_base + n * fsn, mask=n_ok, other=0) != 0
        fk = tl.load(FK + bh * N * D + n[:, None] * D + cf[None, :], mask=fold[:, None] & f_ok[None, :],
                     other=0.0).to(tl.float32)
        v = tl.load(v_base + n[:, None] * d + cd[None, :], mask=fold[:, None] & d_ok[None, :],
                    other=0.0).to(tl.float32)
        acc += tl.dot(tl.trans(fk), v, input_precision=PREC)
        z += tl.sum(fk, 0)
    hs_ptr = HS + bh * D * d + cf[:, None] * d + cd[None, :]
    tl.store(hs_ptr, tl.load(hs_ptr, mask=f_ok[:, None] & d_ok[None, :], other=0.0) + acc,
             mask=f_ok[:, None] & d_ok[None, :])
    ss_ok = f_ok & (cf * 0 + pid_v == 0)  # one column tile writes s
    tl.store(SS + bh * D + cf, tl.load(SS + bh * D + cf, mask=ss_ok, other=0.0) + z, mask=ss_ok)


# ----------------------------------------------------------------------------------------------------------------
# host side

def _pow2(x: int) -> int:
    return max(16, triton.next_power_of_2(x))


def supports(head_dim: int, feature_width: int) -> bool:
    """Whether the kernels take these widths (one H tile [D, d] must fit on chip)."""
    return head_dim <= MAX_HEAD_DIM and feature_width <= MAX_FEATURE_WIDTH


def attend_blocks(lq: int, head_dim: int) -> tuple[int, int]:
    """(BQ, BM): query rows per program (16 for decode, up to 64 for a prefill chunk) and keys per step."""
    bq = min(64, _pow2(lq))
    bm = 64 if head_dim <= 64 else 32
    return bq, bm


def _device_check(x: torch.Tensor, what: str) -> None:
    if not (x.is_cuda or (interpreting() and x.device.type == "cpu")):
        raise RuntimeError(
            f"{what}: attention.backend='triton' needs CUDA tensors, got {x.device.type} tensors; use backend "
            f"'chunked' (or 'auto') on CPU, or set TRITON_INTERPRET=1 before importing lola_kernels to run the "
            f"kernels in Triton's (slow) CPU interpreter")


def _shape(name: str, t: torch.Tensor, want: tuple, what: str) -> None:
    """want: ints, or None for 'any'; raise naming the tensor and the expected layout."""
    if t.dim() != len(want) or any(w is not None and s != w for s, w in zip(t.shape, want)):
        spec = ", ".join("?" if w is None else str(w) for w in want)
        raise ValueError(f"{what}: {name} must have shape [{spec}]; got {tuple(t.shape)}")


def _heads_divide(name: str, heads: int, h: int, what: str) -> None:
    if heads < 1 or h % heads:
        raise ValueError(f"{what}: {name} has {heads} heads, which must divide the {h} query heads (GQA)")


def _state_check(h_state, s_state, b, h, dd, d, what):
    _shape("h_state", h_state, (b, h, dd, d), what)
    _shape("s_state", s_state, (b, h, dd), what)
    for name, t in (("h_state", h_state), ("s_state", s_state)):
        if t.dtype != torch.float32:
            raise ValueError(f"{what}: {name} must be float32 (the LoLA state is accumulated in fp32); got {t.dtype}")
    if d > MAX_HEAD_DIM or dd > MAX_FEATURE_WIDTH:
        raise ValueError(f"{what}: head_dim={d} / feature width={dd} too large for the triton kernels (max "
                         f"{MAX_HEAD_DIM} / {MAX_FEATURE_WIDTH}); use attention.backend 'chunked'")


def lola_attend_triton(q, k, v, mask, fq, h_state, s_state, sigma, ell, *, mixing: str = "lolcats",
                       eps: float = 1e-6, lin_num=None, lin_den=None, cache_k=None, cache_v=None, cache_ok=None,
                       cache_weight: float = 1.0, scale: float | None = None, precision: str = "ieee") -> torch.Tensor:
    """LoLA attention of a batch of segments: queries against their softmax set and linear state.

    q [B,H,Lq,d]; local keys k, v [B,Hk,M,d] (Hk divides H; query head h reads h // (H/Hk)) with mask [B,H or 1,
    Lq,M] bool (True = key j is in the softmax set of query i); optional cache keys cache_k, cache_v [B,Hs,G,d]
    (Hs divides H) with cache_ok [B,Hs,G] bool (valid slots, visible to every query); fq [B,H,Lq,D];
    h_state [B,H,D,d], s_state [B,H,D] float32; sigma, ell [H]; optional extra linear terms lin_num [B,H,Lq,d],
    lin_den [B,H,Lq] (e.g. recent pairs not yet folded), added to fq @ H and fq @ s; ``cache_weight`` w > 0
    multiplies the cache keys' softmax weights (their logits + log w). ``scale`` defaults to
    1/sqrt(d). Returns y [B,H,Lq,d] float32, equal to ``lola_ops.lola_attend`` with the same arguments.
    """
    what = "lola_attend_triton"
    _device_check(q, what)
    if mixing not in MIXING_CODES:
        raise ValueError(f"lola_cache.mixing={mixing!r} is not valid; choose one of {', '.join(MIXING_CODES)}")
    if not 0 < cache_weight < float("inf"):
        raise ValueError(f"{what}: cache_weight={cache_weight!r} must be a finite number > 0")
    if precision not in ("ieee", "tf32"):
        raise ValueError(f"{what}: precision={precision!r} must be 'ieee' (exact fp32) or 'tf32'")
    if q.dim() != 4:
        raise ValueError(f"{what}: q must be 4D [batch, heads, queries, head_dim]; got {tuple(q.shape)}")
    b, h, lq, d = q.shape
    _shape("k", k, (b, None, None, d), what)
    _shape("v", v, tuple(k.shape), what)
    hk, m = k.shape[1], k.shape[2]
    _heads_divide("k", hk, h, what)
    _shape("mask", mask, (b, None, lq, m), what)
    if mask.shape[1] not in (1, h):
        raise ValueError(f"{what}: mask must be [batch, heads ({h}) or 1, queries, keys]; got {tuple(mask.shape)}")
    has_cache = cache_k is not None
    if has_cache != (cache_v is not None) or has_cache != (cache_ok is not None):
        raise ValueError(f"{what}: pass all of cache_k, cache_v, cache_ok or none")
    if has_cache:
        _shape("cache_k", cache_k, (b, None, None, d), what)
        _shape("cache_v", cache_v, tuple(cache_k.shape), what)
        _heads_divide("cache_k", cache_k.shape[1], h, what)
        _shape("cache_ok", cache_ok, tuple(cache_k.shape[:3]), what)
    _shape("fq", fq, (b, h, lq, None), what)
    dd = fq.shape[-1]
    _state_check(h_state, s_state, b, h, dd, d, what)
    _shape("sigma", sigma, (h,), what)
    _shape("ell", ell, (h,), what)
    if (lin_num is None) != (lin_den is None):
        raise ValueError(f"{what}: pass both lin_num and lin_den or neither")
    if lin_num is not None:
        _shape("lin_num", lin_num, (b, h, lq, d), what)
        _shape("lin_den", lin_den, (b, h, lq), what)
    tensors = [("k", k), ("v", v), ("mask", mask), ("fq", fq), ("h_state", h_state), ("s_state", s_state)]
    if has_cache:
        tensors += [("cache_k", cache_k), ("cache_v", cache_v), ("cache_ok", cache_ok)]
    for name, t in tensors:
        if t.device != q.device:
            raise ValueError(f"{what}: {name} is on {t.device} but q is on {q.device}; move all inputs to one device")
    y = torch.empty(b, h, lq, d, device=q.device, dtype=torch.float32)
    if y.numel() == 0:
        return y
    mk = mask.to(torch.int8)
    msb, msh, msq, msm = mk.stride()
    if mk.shape[1] == 1:
        msh = 0
    has_lin = lin_num is not None
    ln = lin_num.float().contiguous() if has_lin else y
    ld = lin_den.float().contiguous() if has_lin else y
    if has_cache:
        k2, v2, ok2, m2, g2 = (cache_k.contiguous(), cache_v.contiguous(), cache_ok.to(torch.int8).contiguous(),
                               cache_k.shape[2], h // cache_k.shape[1])
    else:
        k2, v2, ok2, m2, g2 = k, v, mk, 0, 1
    bq, bm = attend_blocks(lq, d)
    grid = (triton.cdiv(lq, bq), b * h)
    _lola_attn_kernel[grid](q.contiguous(), k.contiguous(), v.contiguous(), mk, k2, v2, ok2, fq.contiguous(),
                            h_state.contiguous(), s_state.contiguous(), ln, ld, sigma.float().contiguous(),
                            ell.float().contiguous(), y, lq, m, m2, h, h // hk, g2, d, dd,
                            1.0 / math.sqrt(d) if scale is None else float(scale), float(eps),
                            math.log(cache_weight), msb, msh, msq, msm,
                            MIXING=MIXING_CODES[mixing], HAS_LIN=has_lin, HAS_CACHE=has_cache, BQ=bq, BM=bm,
                            DH=_pow2(d), DF=_pow2(dd), PREC=precision, num_warps=4)
    return y


def self_recall_error_triton(fk, v, h_state, s_state, eps: float = 1e-6, precision: str = "ieee") -> torch.Tensor:
    """SRE per candidate: fk [B,H,N,D], v [B,Hv,N,d] (Hv divides H), h_state [B,H,D,d], s_state [B,H,D] ->
    [B,H,N] float32 = ``lola_ops.self_recall_error(fk, v expanded to H heads, h_state, s_state, eps)``."""
    what = "self_recall_error_triton"
    _device_check(fk, what)
    if fk.dim() != 4:
        raise ValueError(f"{what}: fk must be 4D [batch, heads, candidates, D]; got {tuple(fk.shape)}")
    b, h, n, dd = fk.shape
    _shape("v", v, (b, None, n, None), what)
    _heads_divide("v", v.shape[1], h, what)
    d = v.shape[-1]
    _state_check(h_state, s_state, b, h, dd, d, what)
    out = torch.empty(b, h, n, device=fk.device, dtype=torch.float32)
    if out.numel() == 0:
        return out
    bn = 32
    _sre_kernel[(triton.cdiv(n, bn), b * h)](fk.contiguous(), v.contiguous(), h_state.contiguous(),
                                              s_state.contiguous(), out, n, h, h // v.shape[1], d, dd, float(eps),
                                              BN=bn, DH=_pow2(d), DF=_pow2(dd), PREC=precision, num_warps=4)
    return out


def fold_triton(fk, v, fold, h_state, s_state, precision: str = "ieee") -> None:
    """In place: h_state += sum_n fold_n fk_n^T v_n, s_state += sum_n fold_n fk_n (the fold of select_and_fold).

    fk [B,H,N,D]; v [B,Hv,N,d] (Hv divides H); fold [B,Hf,N] bool (Hf divides H; True = fold this candidate;
    head h reads fold head h // (H/Hf)); h_state [B,H,D,d], s_state [B,H,D] float32 (updated in place).
    """
    what = "fold_triton"
    _device_check(fk, what)
    if fk.dim() != 4:
        raise ValueError(f"{what}: fk must be 4D [batch, heads, candidates, D]; got {tuple(fk.shape)}")
    b, h, n, dd = fk.shape
    _shape("v", v, (b, None, n, None), what)
    _heads_divide("v", v.shape[1], h, what)
    _shape("fold", fold, (b, None, n), what)
    _heads_divide("fold", fold.shape[1], h, what)
    d = v.shape[-1]
    _state_check(h_state, s_state, b, h, dd, d, what)
    if n == 0 or b * h == 0:
        return
    hs = h_state if h_state.is_contiguous() else h_state.contiguous()
    ss = s_state if s_state.is_contiguous() else s_state.contiguous()
    fm = fold.to(torch.int8)
    bd, bv = min(_pow2(dd), 64), min(_pow2(d), 64)
    grid = (triton.cdiv(dd, bd), triton.cdiv(d, bv), b * h)
    _fold_kernel[grid](fk.contiguous(), v.contiguous(), fm, hs, ss, n, h, h // v.shape[1], h // fold.shape[1], d, dd,
                       fm.stride(0), fm.stride(1), fm.stride(2), BN=32, BD=bd, BV=bv, PREC=precision, num_warps=4)
    if hs is not h_state:
        h_state.copy_(hs)
    if ss is not s_state:
        s_state.copy_(ss)
