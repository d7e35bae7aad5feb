"""Triton kernels for the hybrid sliding-window softmax + linear attention, forward and backward (spec 1.4).

The function is exactly :func:`lola_train.modeling.hybrid_ops.hybrid_attention_reference`, both mixings and
attention sinks included. With J(i) = Win(i) u Sink(i) the softmax set of query i (Sink(i): the first S real keys
of its row with j <= p, S = ``sink_tokens``; they are never in Lin(i)):

    s_ij = q_i . k_j / sqrt(d),   m_i = max_{j in J(i)} s_ij       (softmax set only, trap T1)
    'lolcats':   A_ij = sigma_h exp(s_ij - m_i) on J(i),  ell_h fq_i . fk_j on Lin(i)   (linear terms never shifted)
                 y_i  = sum_j A_ij v_j / sum_j A_ij      (0 / 1 when the denominator is not positive, like the reference)
    'lola_code': A_ij = sigma_h exp(s_ij) on J(i),  ell_h fq_i . fk_j on Lin(i)
                 y_i  = sum_j A_ij v_j / (sum_j A_ij + 1e-6), evaluated with every term and the 1e-6 times e^{-c_i},
                 c_i = max(m_i, 0): the softmax terms become sigma e^{s - c}, the linear ones ell e^{-c} fq.fk.

Algorithm (the blueprint is ``hybrid_attention_chunked``). The key axis is cut into blocks of C keys aligned to
position 0; query row p (absolute position, p = Lk - Lq + i) lives in block n = p // C. Query block n scores the
keys of blocks n-P..n explicitly (P = ceil(lookback / C), lookback = W-1 for 'sw', 2W-1 for 'tk'), which hold
its whole window and the newest part of its linear memory; every older key enters through the prefix state
S_n = sum_{keys < (n-P) C} fk^T v  [D, d] and z = sum fk [D]. Sinks: the host gathers their positions
(``SINK`` [B, NS] int32, Lk where a row has fewer than NS real keys) and removes them from the key mask the
kernels read, so the window/linear blocks and the state scans skip them; each query block scores them once more
as one extra tile of SB = 16 softmax keys (NS <= 16), so each key is counted once.

Forward:  ``_state_fwd_kernel`` (scan: states at every block boundary, [B*H, NB, D, d]) then
          ``_attn_fwd_kernel`` (one program per query block and head: the sink tile, then an online max over the
          window positions, an unshifted linear accumulator plus fq @ S; the mixing is applied at the end). It
          saves per row the full denominator, the shift of the softmax terms (m for 'lolcats', c for
          'lola_code') and the position of the arg-max key of the softmax set (a window key or a sink).
Backward: ``_attn_bwd_dq_kernel`` (dq, dfq, the per-row max gradient, per-row sigma/ell gradients and, per query
          block, the partial dk/dv of the sink keys [B*H, NQ, NS, d], summed and scattered on the host),
          ``_state_bwd_kernel`` (reverse scan of dS = sum ell e^{-c} fq^T g over the query blocks that read a state),
          ``_attn_bwd_dkdv_kernel`` (dk, dv, dfk of the non-sink keys from the local blocks plus the state
          gradients). In 'lolcats' the max m is part of the function and carries a gradient (to the arg-max key);
          in 'lola_code' y does not depend on c (numerator and denominator share the factor e^{-c}), so c carries
          none.
A (query block, key block) pair with no window pair skips the softmax half, one with no linear pair the
linear half (``_block_has``). Saved for backward: the inputs, the sink-free key mask and sink positions, y in
fp32 and three numbers per row (den, shift, arg-max position); the states are recomputed (one scan) rather
than kept.

All arithmetic is float32 (``tl.dot`` with ``input_precision='ieee'`` by default, so no TF32 rounding); inputs
may be fp32/bf16/fp16 and are cast up on load. Grouped-query attention: k and v may have H_kv heads with
H % H_kv == 0 (query head h reads KV head h // (H / H_kv)); fq and fk are per query head (trap T2).

Masks: ``key_mask`` [B, Lk] (True = real token) removes keys from both memories, as in the reference. The
max of a row is taken over its softmax keys that are real; rows with no such key use m = 0 (the reference's
convention). Ties for the max send its gradient to the first arg-max key (torch.amax splits it among ties).
"""
from __future__ import annotations

import math

import torch
import triton
from torch.autograd.function import once_differentiable
import triton.language as tl

from lola_train.modeling.hybrid_ops import (LOLA_CODE_EPS, MIXINGS, check_mixing, hybrid_attention_reference,
                                            sink_keys)

_NEG = tl.constexpr(-1.0e30)  # running-max sentinel of rows that have seen no softmax key yet
_EPS = tl.constexpr(LOLA_CODE_EPS)  # 'lola_code' denominator epsilon
SINK_BLOCK = 16  # SB: width of the sink tile (tl.dot needs >= 16); at most this many sink tokens


@triton.jit
def _window_masks(p, j, key_ok, W, SHIFT, LAYOUT: tl.constexpr):
    """(win, lin) [rows, keys] for absolute query positions p [rows] and key positions j [keys]."""
    pp = p[:, None]
    jj = j[None, :]
    causal = (jj <= pp) & key_ok[None, :]
    if LAYOUT == 0:  # 'sw': the current token and the W-1 before it
        win = causal & (jj > pp - W)
        lin = causal & (jj <= pp - W)
    else:  # 'tk': blocks of W aligned to the end of the keys (SHIFT = (-Lk) % W); previous block + own block
        bj = (jj + SHIFT) // W
        bp = (pp + SHIFT) // W
        win = causal & (bj >= bp - 1)
        lin = causal & (bj <= bp - 2)
    return win, lin


@triton.jit
def _block_has(p_lo, j_lo, W, SHIFT, LAYOUT: tl.constexpr, C: tl.constexpr):
    """(any window pair, any linear pair) between query rows p_lo..p_lo+C-1 and keys j_lo..j_lo+C-1.

    Conservative (ignores padding and row validity): False only when no pair of that kind exists, so a block
    that is entirely window or entirely linear memory skips the other half of the work."""
    p_hi = p_lo + C - 1
    j_hi = j_lo + C - 1
    if LAYOUT == 0:
        has_win = (j_lo <= p_hi) & (j_hi > p_lo - W)
        has_lin = j_lo <= p_hi - W
    else:
        has_win = (j_lo <= p_hi) & ((j_hi + SHIFT) // W >= (p_lo + SHIFT) // W - 1)
        has_lin = (j_lo + SHIFT) // W <= (p_hi + SHIFT) // W - 2
    return has_win, has_lin


@triton.jit
def _key_ok(KM, b, j, Lk):
    # always read, also when every key is real (an all-True mask): on an H200 the forward without the mask
    # read (a HAS_MASK=False specialization) ran 39.7 ms per call against 5.4 ms with it (BENCHMARKS.md)
    return (j < Lk) & (tl.load(KM + b * Lk + j, mask=j < Lk, other=0) != 0)


@triton.jit
def _state_fwd_kernel(FK, V, KM, S, Z, Lk, H, G, NB, D, d,
                      C: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr,
                      PREC: tl.constexpr):
    """S[bh, n] = sum_{real keys j < nC} fk_j^T v_j (tile [BD, BV]);  Z[bh, n] = sum fk_j (tile BD)."""
    pid_d = tl.program_id(0)
    pid_v = tl.program_id(1)
    bh = tl.program_id(2).to(tl.int64)  # 64-bit offsets: B*H*NB*D*d can pass 2^31
    b = bh // H
    h = bh % H
    hk = h // G
    offs_f = pid_d * BD + tl.arange(0, BD)
    offs_v = pid_v * BV + tl.arange(0, BV)
    f_ok = offs_f < D
    v_ok = offs_v < d
    rows = tl.arange(0, C)
    fk_base = FK + bh * Lk * D
    v_base = V + (b * (H // G) + hk) * Lk * d
    s_base = S + bh * NB * D * d
    z_base = Z + bh * NB * D
    acc = tl.zeros([BD, BV], dtype=tl.float32)
    zacc = tl.zeros([BD], dtype=tl.float32)
    for n in range(0, NB):
        tl.store(s_base + n * D * d + offs_f[:, None] * d + offs_v[None, :], acc,
                 mask=f_ok[:, None] & v_ok[None, :])
        tl.store(z_base + n * D + offs_f, zacc, mask=f_ok & (offs_f * 0 + pid_v == 0))
        j = n * C + rows
        ok = _key_ok(KM, b, j, Lk)
        fkb = tl.load(fk_base + j[:, None] * D + offs_f[None, :], mask=ok[:, None] & f_ok[None, :],
                      other=0.0).to(tl.float32)
        vb = tl.load(v_base + j[:, None] * d + offs_v[None, :], mask=ok[:, None] & v_ok[None, :],
                     other=0.0).to(tl.float32)
        acc += tl.dot(tl.trans(fkb), vb, input_precision=PREC)
        zacc += tl.sum(fkb, 0)


@triton.jit
def _sink_tile(K, V, SINK, kv_off, b, p, Lk, NS, d, cd, d_ok, SB: tl.constexpr):
    """The sink keys of row b as one tile: (positions sp [SB], visible [rows, SB], k [SB, DH], v [SB, DH]).

    A sink is visible to the query rows at or after its position; slots past NS or holding Lk (the row has fewer
    real keys than sinks) are invisible and load zeros."""
    cs = tl.arange(0, SB)
    sp = tl.load(SINK + b * NS + cs, mask=cs < NS, other=0)
    s_ok = (cs < NS) & (sp < Lk)
    ks = tl.load(K + kv_off + sp[:, None] * d + cd[None, :], mask=s_ok[:, None] & d_ok[None, :],
                 other=0.0).to(tl.float32)
    vs = tl.load(V + kv_off + sp[:, None] * d + cd[None, :], mask=s_ok[:, None] & d_ok[None, :],
                 other=0.0).to(tl.float32)
    vis = s_ok[None, :] & (sp[None, :] <= p[:, None])
    return sp, vis, ks, vs


@triton.jit
def _attn_fwd_kernel(Q, K, V, FQ, FK, SIG, ELL, KM, SINK, S, Z, Y, DEN, M, AM,
                     Lq, Lk, H, G, NB, n0, P, W, SHIFT, NS, scale, d, D,
                     LAYOUT: tl.constexpr, MIXING: tl.constexpr, SB: tl.constexpr,
                     C: tl.constexpr, DH: tl.constexpr, DF: tl.constexpr, PREC: tl.constexpr):
    """One query block n (program 0, offset by n0) of one query head bh = b*H + h (program 1).

    Q [B,H,Lq,d], K, V [B,H/G,Lk,d], FQ [B,H,Lq,D], FK [B,H,Lk,D], SIG, ELL [H] fp32, KM [B,Lk] int8 (real and not
    a sink), SINK [B,NS] int32 (read when SB > 0), S [B*H,NB,D,d], Z [B*H,NB,D] prefix states.
    Writes Y [B,H,Lq,d] fp32 and per row DEN (the full denominator, with the eps term in 'lola_code'), M (the
    shift of the softmax terms: m for MIXING 0 'lolcats', c = max(m, 0) for MIXING 1 'lola_code') and AM (int32
    position of the first arg-max key of the softmax set, -1 if none), all [B*H, Lq].
    """
    n = tl.program_id(0) + n0
    bh = tl.program_id(1).to(tl.int64)  # 64-bit offsets: B*H*NB*D*d can pass 2^31
    b = bh // H
    h = bh % H
    hk = h // G
    kv_off = (b * (H // G) + hk) * Lk * d
    off = Lk - Lq
    r = tl.arange(0, C)
    cd = tl.arange(0, DH)
    cf = tl.arange(0, DF)
    d_ok = cd < d
    f_ok = cf < D
    p = n * C + r
    row_ok = (p >= off) & (p < Lk)
    i = p - off
    q = tl.load(Q + bh * Lq * d + i[:, None] * d + cd[None, :], mask=row_ok[:, None] & d_ok[None, :],
                other=0.0).to(tl.float32)
    fq = tl.load(FQ + bh * Lq * D + i[:, None] * D + cf[None, :], mask=row_ok[:, None] & f_ok[None, :],
                 other=0.0).to(tl.float32)
    sigma = tl.load(SIG + h)
    ell = tl.load(ELL + h)

    nb = tl.maximum(n - P, 0)  # state of every key before block nb (zeros for nb = 0)
    st = tl.load(S + (bh * NB + nb) * D * d + cf[:, None] * d + cd[None, :], mask=f_ok[:, None] & d_ok[None, :],
                 other=0.0)
    zt = tl.load(Z + (bh * NB + nb) * D + cf, mask=f_ok, other=0.0)
    acc_l = tl.dot(fq, st, input_precision=PREC)
    l_l = tl.sum(fq * zt[None, :], 1)
    acc_w = tl.zeros([C, DH], dtype=tl.float32)
    l_w = tl.zeros([C], dtype=tl.float32)
    m = tl.full([C], _NEG, tl.float32)
    am = tl.full([C], -1, tl.int32)
    if SB > 0:  # the sink tile opens the online max (softmax keys outside the window blocks)
        # (names of its own: a name assigned before the loop below would become one of its loop-carried values)
        sp, vis, ks, vs = _sink_tile(K, V, SINK, kv_off, b, p, Lk, NS, d, cd, d_ok, SB)
        s_snk = tl.where(vis, tl.dot(q, tl.trans(ks), input_precision=PREC) * scale, float("-inf"))
        max_snk = tl.max(s_snk, 1)
        arg_snk = tl.min(tl.where(s_snk == max_snk[:, None], sp[None, :], Lk), 1)  # first (lowest) arg-max sink
        am = tl.where(max_snk > m, arg_snk, am)
        m = tl.maximum(m, max_snk)
        p_snk = tl.exp(s_snk - m[:, None])  # 0 for invisible sinks
        acc_w = tl.dot(p_snk, vs, input_precision=PREC)
        l_w = tl.sum(p_snk, 1)
    for kb in range(nb, n + 1):
        j = kb * C + r
        key_ok = _key_ok(KM, b, j, Lk)
        v = tl.load(V + kv_off + j[:, None] * d + cd[None, :], mask=key_ok[:, None] & d_ok[None, :],
                    other=0.0).to(tl.float32)
        win, lin = _window_masks(p, j, key_ok, W, SHIFT, LAYOUT)
        has_win, has_lin = _block_has(n * C, kb * C, W, SHIFT, LAYOUT, C)
        if has_win:
            k = tl.load(K + kv_off + j[:, None] * d + cd[None, :], mask=key_ok[:, None] & d_ok[None, :],
                        other=0.0).to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
            s_w = tl.where(win, s, float("-inf"))
            blk_max = tl.max(s_w, 1)
            blk_arg = tl.argmax(s_w, 1).to(tl.int32) + kb * C
            am = tl.where(blk_max > m, blk_arg, am)
            m_new = tl.maximum(m, blk_max)
            alpha = tl.exp(m - m_new)
            pw = tl.exp(s_w - m_new[:, None])  # 0 off the window (s_w = -inf there)
            acc_w = acc_w * alpha[:, None] + tl.dot(pw, v, input_precision=PREC)
            l_w = l_w * alpha + tl.sum(pw, 1)
            m = m_new
        if has_lin:
            fk = tl.load(FK + bh * Lk * D + j[:, None] * D + cf[None, :], mask=key_ok[:, None] & f_ok[None, :],
                         other=0.0).to(tl.float32)
            ls = tl.where(lin, tl.dot(fq, tl.trans(fk), input_precision=PREC), 0.0)
            acc_l += tl.dot(ls, v, input_precision=PREC)
            l_l += tl.sum(ls, 1)
    if MIXING == 0:  # 'lolcats': softmax terms shifted by m, linear terms as they are
        num = sigma * acc_w + ell * acc_l
        den = sigma * l_w + ell * l_l
        y = num / tl.where(den > 0, den, 1.0)[:, None]
        shift = tl.where(m > _NEG, m, 0.0)
    else:  # 'lola_code': every term times e^{-c}, c = max(m, 0) (= 0 for rows without a softmax key)
        shift = tl.maximum(m, 0.0)
        w_soft = sigma * tl.exp(m - shift)  # e^{m - c} brings the accumulators from shift m to shift c
        w_lin = ell * tl.exp(-shift)
        num = w_soft[:, None] * acc_w + w_lin[:, None] * acc_l
        den = w_soft * l_w + w_lin * l_l + _EPS * tl.exp(-shift)
        y = num / den[:, None]
    tl.store(Y + bh * Lq * d + i[:, None] * d + cd[None, :], y, mask=row_ok[:, None] & d_ok[None, :])
    tl.store(DEN + bh * Lq + i, den, mask=row_ok)
    tl.store(M + bh * Lq + i, shift, mask=row_ok)
    tl.store(AM + bh * Lq + i, am, mask=row_ok)


@triton.jit
def _softmax_tile_dq(q, k, pos, visible, da, m, am, sigma, scale, dsig, dm, dq, kmax,
                     MIXING: tl.constexpr, PREC: tl.constexpr):
    """The softmax-key part of the dq pass for one tile of keys k [T, DH] at positions pos [T] (visible [C, T]
    for the C queries of the block), with da = g v^T + delta [C, T]: adds to dsig, dm, dq and, for 'lolcats'
    (MIXING 0), kmax (the key at each row's max). Used for the window tiles and the sink tile.
    Returns (p, t, dsig, dm, dq, kmax) with p = e^{s - m} on the visible keys and t = sigma p da."""
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
    p = tl.exp(tl.where(visible, s - m[:, None], float("-inf")))
    t = p * da
    dsig += tl.sum(t, 1)
    t = sigma * t
    dm += tl.sum(t, 1)
    dq += tl.dot(t, k, input_precision=PREC)
    if MIXING == 0:
        kmax += tl.dot(tl.where(pos[None, :] == am[:, None], 1.0, 0.0), k, input_precision=PREC)
    return p, t, dsig, dm, dq, kmax


@triton.jit
def _attn_bwd_dq_kernel(Q, K, V, FQ, FK, SIG, ELL, KM, SINK, S, Z, DO, RDEN, DELTA, M, AM,
                        DQ, DFQ, DM, DSIG, DELL, DKS, DVS,
                        Lq, Lk, H, G, NB, n0, P, W, SHIFT, NS, scale, d, D,
                        LAYOUT: tl.constexpr, MIXING: tl.constexpr, SB: tl.constexpr,
                        C: tl.constexpr, DH: tl.constexpr, DF: tl.constexpr, PREC: tl.constexpr):
    """Per query block: DQ [B,H,Lq,d], DFQ [B,H,Lq,D] and per row ([B*H, Lq]) DM = sum_J A dA (the gradient of
    -m; 0 in 'lola_code', where y does not depend on the shift), DSIG and DELL (per-row sigma/ell gradients).
    With sinks, DKS and DVS [B*H, NB-n0, NS, d] receive this block's part of the sink keys' dk and dv.

    RDEN = 1 / DEN and DELTA = dL/dDEN = -(dy . y) / DEN per row; M and AM as saved by the forward.
    """
    n = tl.program_id(0) + n0
    bh = tl.program_id(1).to(tl.int64)  # 64-bit offsets: B*H*NB*D*d can pass 2^31
    b = bh // H
    h = bh % H
    hk = h // G
    kv_off = (b * (H // G) + hk) * Lk * d
    off = Lk - Lq
    r = tl.arange(0, C)
    cd = tl.arange(0, DH)
    cf = tl.arange(0, DF)
    d_ok = cd < d
    f_ok = cf < D
    p = n * C + r
    row_ok = (p >= off) & (p < Lk)
    i = p - off
    rd_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + bh * Lq * d + i[:, None] * d + cd[None, :], mask=rd_mask, other=0.0).to(tl.float32)
    fq = tl.load(FQ + bh * Lq * D + i[:, None] * D + cf[None, :], mask=row_ok[:, None] & f_ok[None, :],
                 other=0.0).to(tl.float32)
    do = tl.load(DO + bh * Lq * d + i[:, None] * d + cd[None, :], mask=rd_mask, other=0.0).to(tl.float32)
    rden = tl.load(RDEN + bh * Lq + i, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + bh * Lq + i, mask=row_ok, other=0.0)
    m = tl.load(M + bh * Lq + i, mask=row_ok, other=0.0)
    am = tl.load(AM + bh * Lq + i, mask=row_ok, other=-1)
    sigma = tl.load(SIG + h)
    ell = tl.load(ELL + h)
    g = do * rden[:, None]

    nb = tl.maximum(n - P, 0)
    st = tl.load(S + (bh * NB + nb) * D * d + cf[:, None] * d + cd[None, :], mask=f_ok[:, None] & d_ok[None, :],
                 other=0.0)
    zt = tl.load(Z + (bh * NB + nb) * D + cf, mask=f_ok, other=0.0)
    gs = tl.dot(g, tl.trans(st), input_precision=PREC)  # [C, DF]
    dfq = gs + delta[:, None] * zt[None, :]  # the linear sums; times ell (and e^{-c}) at the end
    dell = tl.sum(fq * gs, 1) + delta * tl.sum(fq * zt[None, :], 1)
    dsig = tl.zeros([C], dtype=tl.float32)
    dm = tl.zeros([C], dtype=tl.float32)
    dq = tl.zeros([C, DH], dtype=tl.float32)
    kmax = tl.zeros([C, DH], dtype=tl.float32)
    for kb in range(nb, n + 1):
        j = kb * C + r
        key_ok = _key_ok(KM, b, j, Lk)
        v = tl.load(V + kv_off + j[:, None] * d + cd[None, :], mask=key_ok[:, None] & d_ok[None, :],
                    other=0.0).to(tl.float32)
        win, lin = _window_masks(p, j, key_ok, W, SHIFT, LAYOUT)
        has_win, has_lin = _block_has(n * C, kb * C, W, SHIFT, LAYOUT, C)
        da = tl.dot(g, tl.trans(v), input_precision=PREC) + delta[:, None]
        if has_win:
            k = tl.load(K + kv_off + j[:, None] * d + cd[None, :], mask=key_ok[:, None] & d_ok[None, :],
                        other=0.0).to(tl.float32)
            _, _, dsig, dm, dq, kmax = _softmax_tile_dq(q, k, j, win, da, m, am, sigma, scale, dsig, dm, dq, kmax,
                                                        MIXING, PREC)
        if has_lin:
            fk = tl.load(FK + bh * Lk * D + j[:, None] * D + cf[None, :], mask=key_ok[:, None] & f_ok[None, :],
                         other=0.0).to(tl.float32)
            ls = tl.dot(fq, tl.trans(fk), input_precision=PREC)
            dal = tl.where(lin, da, 0.0)
            dell += tl.sum(dal * ls, 1)
            dfq += tl.dot(dal, fk, input_precision=PREC)
    if SB > 0:  # the sink tile: after the window loop, so that dm (the max gradient) is complete
        sp, vis, ks, vs = _sink_tile(K, V, SINK, kv_off, b, p, Lk, NS, d, cd, d_ok, SB)
        da_snk = tl.dot(g, tl.trans(vs), input_precision=PREC) + delta[:, None]
        p_snk, t_snk, dsig, dm, dq, kmax = _softmax_tile_dq(q, ks, sp, vis, da_snk, m, am, sigma, scale, dsig, dm,
                                                            dq, kmax, MIXING, PREC)
        if MIXING == 0:
            t_snk = t_snk - tl.where(sp[None, :] == am[:, None], 1.0, 0.0) * dm[:, None]
        # this query block's share of the sink keys' gradients (rows outside the queries have g = delta = 0)
        dks = tl.dot(tl.trans(t_snk), q, input_precision=PREC) * scale
        dvs = tl.dot(tl.trans(sigma * p_snk), g, input_precision=PREC)
        cs = tl.arange(0, SB)
        part = (bh * (NB - n0) + n - n0) * NS + cs
        s_mask = (cs < NS)[:, None] & d_ok[None, :]
        tl.store(DKS + part[:, None] * d + cd[None, :], dks, mask=s_mask)
        tl.store(DVS + part[:, None] * d + cd[None, :], dvs, mask=s_mask)
    if MIXING == 0:
        dq = (dq - dm[:, None] * kmax) * scale
        dfq = ell * dfq
    else:  # y is independent of c: no max gradient; the linear terms carry the factor e^{-c}
        lin_scale = tl.exp(-m)
        dq = dq * scale
        dm = tl.zeros([C], dtype=tl.float32)
        dfq = (ell * lin_scale)[:, None] * dfq
        dell = dell * lin_scale
    tl.store(DQ + bh * Lq * d + i[:, None] * d + cd[None, :], dq, mask=rd_mask)
    tl.store(DFQ + bh * Lq * D + i[:, None] * D + cf[None, :], dfq, mask=row_ok[:, None] & f_ok[None, :])
    tl.store(DM + bh * Lq + i, dm, mask=row_ok)
    tl.store(DSIG + bh * Lq + i, dsig, mask=row_ok)
    tl.store(DELL + bh * Lq + i, dell, mask=row_ok)


@triton.jit
def _state_bwd_kernel(FQ, DO, RDEN, DELTA, ELL, DS, DZ, Lq, Lk, H, NB, P, D, d,
                      C: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    """DS[bh, b] = sum over query blocks n >= b+1+P of ell fq_n^T g_n (the gradient reaching key block b through
    every state that contains it); DZ[bh, b] = the same with delta in place of g. A reverse scan.

    DS [B*H, NB, D, d], DZ [B*H, NB, D]; g = DO * RDEN per row. In 'lola_code' the host passes RDEN and DELTA
    already multiplied by the rows' e^{-c} (the linear terms' factor), so this kernel is the same for both mixings."""
    pid_d = tl.program_id(0)
    pid_v = tl.program_id(1)
    bh = tl.program_id(2).to(tl.int64)  # 64-bit offsets: B*H*NB*D*d can pass 2^31
    h = bh % H
    ell = tl.load(ELL + h)
    off = Lk - Lq
    offs_f = pid_d * BD + tl.arange(0, BD)
    offs_v = pid_v * BV + tl.arange(0, BV)
    f_ok = offs_f < D
    v_ok = offs_v < d
    r = tl.arange(0, C)
    acc = tl.zeros([BD, BV], dtype=tl.float32)
    zacc = tl.zeros([BD], dtype=tl.float32)
    for it in range(0, NB):
        kb = NB - 1 - it
        tl.store(DS + (bh * NB + kb) * D * d + offs_f[:, None] * d + offs_v[None, :], acc,
                 mask=f_ok[:, None] & v_ok[None, :])
        tl.store(DZ + (bh * NB + kb) * D + offs_f, zacc, mask=f_ok & (offs_f * 0 + pid_v == 0))
        p = (kb + P) * C + r  # the query block whose state first contains key block kb - 1
        row_ok = (p >= off) & (p < Lk)
        i = p - off
        fq = tl.load(FQ + bh * Lq * D + i[:, None] * D + offs_f[None, :], mask=row_ok[:, None] & f_ok[None, :],
                     other=0.0).to(tl.float32)
        do = tl.load(DO + bh * Lq * d + i[:, None] * d + offs_v[None, :], mask=row_ok[:, None] & v_ok[None, :],
                     other=0.0).to(tl.float32)
        rden = tl.load(RDEN + bh * Lq + i, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + bh * Lq + i, mask=row_ok, other=0.0)
        acc += ell * tl.dot(tl.trans(fq), do * rden[:, None], input_precision=PREC)
        zacc += ell * tl.sum(fq * delta[:, None], 0)


@triton.jit
def _attn_bwd_dkdv_kernel(Q, K, V, FQ, FK, SIG, ELL, KM, DS, DZ, DO, RDEN, DELTA, M, AM, DM,
                          DK, DV, DFK,
                          Lq, Lk, H, G, NB, n0, P, W, SHIFT, scale, d, D,
                          LAYOUT: tl.constexpr, MIXING: tl.constexpr, C: tl.constexpr,
                          DH: tl.constexpr, DF: tl.constexpr, PREC: tl.constexpr):
    """Per key block and query head: DK, DV [B,H,Lk,d] and DFK [B,H,Lk,D] (per query head; the host sums the
    heads of a KV group) from query blocks kb..kb+P plus the state gradients DS, DZ. Keys that KM excludes
    (padding and sinks) get 0 here; the host adds the sinks' gradients from the dq kernel."""
    kb = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)  # 64-bit offsets: B*H*NB*D*d can pass 2^31
    b = bh // H
    h = bh % H
    hk = h // G
    kv_off = (b * (H // G) + hk) * Lk * d
    off = Lk - Lq
    r = tl.arange(0, C)
    cd = tl.arange(0, DH)
    cf = tl.arange(0, DF)
    d_ok = cd < d
    f_ok = cf < D
    j = kb * C + r
    key_ok = _key_ok(KM, b, j, Lk)
    kd_mask = key_ok[:, None] & d_ok[None, :]
    kf_mask = key_ok[:, None] & f_ok[None, :]
    k = tl.load(K + kv_off + j[:, None] * d + cd[None, :], mask=kd_mask, other=0.0).to(tl.float32)
    v = tl.load(V + kv_off + j[:, None] * d + cd[None, :], mask=kd_mask, other=0.0).to(tl.float32)
    fk = tl.load(FK + bh * Lk * D + j[:, None] * D + cf[None, :], mask=kf_mask, other=0.0).to(tl.float32)
    sigma = tl.load(SIG + h)
    ell = tl.load(ELL + h)

    rs = tl.load(DS + (bh * NB + kb) * D * d + cf[:, None] * d + cd[None, :], mask=f_ok[:, None] & d_ok[None, :],
                 other=0.0)
    rz = tl.load(DZ + (bh * NB + kb) * D + cf, mask=f_ok, other=0.0)
    dfk = tl.dot(v, tl.trans(rs), input_precision=PREC) + rz[None, :]
    dv = tl.dot(fk, rs, input_precision=PREC)
    dk = tl.zeros([C, DH], dtype=tl.float32)
    for n in range(tl.maximum(kb, n0), tl.minimum(kb + P, NB - 1) + 1):
        p = n * C + r
        row_ok = (p >= off) & (p < Lk)
        i = p - off
        rd_mask = row_ok[:, None] & d_ok[None, :]
        q = tl.load(Q + bh * Lq * d + i[:, None] * d + cd[None, :], mask=rd_mask, other=0.0).to(tl.float32)
        fq = tl.load(FQ + bh * Lq * D + i[:, None] * D + cf[None, :], mask=row_ok[:, None] & f_ok[None, :],
                     other=0.0).to(tl.float32)
        do = tl.load(DO + bh * Lq * d + i[:, None] * d + cd[None, :], mask=rd_mask, other=0.0).to(tl.float32)
        rden = tl.load(RDEN + bh * Lq + i, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + bh * Lq + i, mask=row_ok, other=0.0)
        m = tl.load(M + bh * Lq + i, mask=row_ok, other=0.0)
        if MIXING == 1:  # 'lola_code': the linear terms of row i carry e^{-c_i}; fq enters only those
            fq = fq * tl.exp(-m)[:, None]
        g = do * rden[:, None]
        win, lin = _window_masks(p, j, key_ok, W, SHIFT, LAYOUT)
        has_win, has_lin = _block_has(n * C, kb * C, W, SHIFT, LAYOUT, C)
        da = tl.dot(g, tl.trans(v), input_precision=PREC) + delta[:, None]
        if has_win:
            s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
            aw = sigma * tl.exp(tl.where(win, s - m[:, None], float("-inf")))
            dv += tl.dot(tl.trans(aw), g, input_precision=PREC)
            ds = aw * da
            if MIXING == 0:  # the max m_i is the logit of key am_i: its gradient -dm_i goes to that key
                am = tl.load(AM + bh * Lq + i, mask=row_ok, other=-1)
                dm = tl.load(DM + bh * Lq + i, mask=row_ok, other=0.0)
                ds -= tl.where(j[None, :] == am[:, None], dm[:, None], 0.0)
            dk += tl.dot(tl.trans(ds), q, input_precision=PREC)
        if has_lin:
            al = tl.where(lin, ell * tl.dot(fq, tl.trans(fk), input_precision=PREC), 0.0)
            dv += tl.dot(tl.trans(al), g, input_precision=PREC)
            dfk += ell * tl.dot(tl.trans(tl.where(lin, da, 0.0)), fq, input_precision=PREC)
    dk = tl.where(kd_mask, dk * scale, 0.0)
    dv = tl.where(kd_mask, dv, 0.0)
    dfk = tl.where(kf_mask, dfk, 0.0)
    out_ok = (j < Lk)[:, None]
    tl.store(DK + bh * Lk * d + j[:, None] * d + cd[None, :], dk, mask=out_ok & d_ok[None, :])
    tl.store(DV + bh * Lk * d + j[:, None] * d + cd[None, :], dv, mask=out_ok & d_ok[None, :])
    tl.store(DFK + bh * Lk * D + j[:, None] * D + cf[None, :], dfk, mask=out_ok & f_ok[None, :])


# ----------------------------------------------------------------------------------------------------------------
# host side

def interpreting() -> bool:
    """True when these kernels run in Triton's CPU interpreter, i.e. TRITON_INTERPRET=1 was set before this
    module was imported (the decorator decides at import time, so the kernel objects are what counts)."""
    from triton.runtime.interpreter import InterpretedFunction
    return isinstance(_attn_fwd_kernel, InterpretedFunction)


def _pow2(x: int) -> int:
    return max(16, triton.next_power_of_2(x))


def default_block(head_dim: int, feature_width: int) -> int:
    """Key/query block C (also the state granularity): 64 for head dims up to 64, else 32.

    Shared memory per program on sm_90 (from ``python -m lola_kernels.compile_check``): d=64, D=128, C=64 up to
    132 KB (fits H100 and A100); d=128, D=128, C=32 up to 115 KB. Cards with less shared memory raise
    OutOfResources at launch and the call retries with half the block (see _run_with_block_fallback).
    """
    return 64 if head_dim <= 64 and feature_width <= 128 else 32


def num_warps(block: int) -> int:
    """Warps per program of the attention kernels for a block of C rows."""
    return 4 if block <= 32 else 8


class _Plan:
    """Sizes shared by the kernels of one call."""

    def __init__(self, q, k, fq, window: int, layout: str, block: int, precision: str, mixing: str = "lolcats",
                 sinks: int = 0):
        self.B, self.H, self.Lq, self.d = q.shape
        self.Hkv, self.Lk = k.shape[1], k.shape[2]
        self.G = self.H // self.Hkv
        self.D = fq.shape[-1]
        self.C = block
        self.W = window
        self.layout = 0 if layout == "sw" else 1
        self.shift = (-self.Lk) % window
        lookback = window - 1 if layout == "sw" else 2 * window - 1
        self.P = -(-lookback // block)
        self.NB = -(-self.Lk // block)
        self.n0 = (self.Lk - self.Lq) // block  # first key block that holds a query
        self.NQ = self.NB - self.n0             # query blocks (programs of the forward and dq kernels)
        self.DH, self.DF = _pow2(self.d), _pow2(self.D)
        self.BD, self.BV = min(self.DF, 64), min(self.DH, 64)
        self.scale = 1.0 / math.sqrt(self.d)
        self.prec = precision
        self.num_warps = num_warps(block)
        self.mixing = MIXINGS.index(mixing)     # 0 'lolcats', 1 'lola_code'
        self.NS = sinks                         # sink tokens per row
        self.SB = SINK_BLOCK if sinks else 0    # width of the sink tile (0: no sink code is compiled)

    def common(self):
        return dict(W=self.W, SHIFT=self.shift, scale=self.scale, d=self.d, D=self.D, LAYOUT=self.layout,
                    MIXING=self.mixing, C=self.C, DH=self.DH, DF=self.DF, PREC=self.prec, num_warps=self.num_warps)


def _states(fk, v, km, plan: _Plan):
    """Prefix states at every block boundary: S [B*H, NB, D, d], Z [B*H, NB, D] (float32)."""
    bh = plan.B * plan.H
    s = torch.empty(bh, plan.NB, plan.D, plan.d, device=fk.device, dtype=torch.float32)
    z = torch.empty(bh, plan.NB, plan.D, device=fk.device, dtype=torch.float32)
    grid = (triton.cdiv(plan.D, plan.BD), triton.cdiv(plan.d, plan.BV), bh)
    _state_fwd_kernel[grid](fk, v, km, s, z, plan.Lk, plan.H, plan.G, plan.NB, plan.D, plan.d,
                            C=plan.C, BD=plan.BD, BV=plan.BV, PREC=plan.prec)
    return s, z


def sink_positions(key_mask: torch.Tensor | None, batch: int, k_len: int, sink_tokens: int, device):
    """(km, sp) for the kernels: km [B, Lk] int8 = real and not a sink (all ones when every key is real and there
    are no sinks: the kernels always read it); sp [B, S] int32 = positions of the first S real keys of each row in
    order, Lk where a row has fewer than S real keys (None without sinks)."""
    real = torch.ones(batch, k_len, dtype=torch.bool, device=device) if key_mask is None else \
        key_mask.to(device=device, dtype=torch.bool)
    sinks = sink_keys(key_mask, batch, k_len, sink_tokens, device)
    if sinks is None:
        return real.to(torch.int8).contiguous(), None
    pos = torch.where(sinks, torch.arange(k_len, device=device), k_len)
    pos = torch.nn.functional.pad(pos, (0, max(0, sink_tokens - k_len)), value=k_len)
    sp = pos.sort(dim=-1).values[:, :sink_tokens]
    return (real & ~sinks).to(torch.int8).contiguous(), sp.to(torch.int32).contiguous()


def _forward(q, k, v, fq, fk, sigma, ell, km, sp, plan: _Plan):
    """Forward launches. km: the kernels' key mask [B, Lk] int8 (real, not a sink); sp: sink positions [B, S] or None.
    Returns y [B,H,Lq,d] fp32 and, per row ([B*H, Lq] each), den, the softmax shift (m or c) and am."""
    sp_arg = sp if sp is not None else q  # read only when plan.SB > 0
    s, z = _states(fk, v, km, plan)
    bh = plan.B * plan.H
    # y in fp32 even for bf16/fp16 inputs: the backward's delta = -(dy . y) / den needs the unrounded y
    # (with a rounded y the sigma/ell gradients, sums of cancelling terms, lose about 2 digits)
    y = torch.empty(q.shape, device=q.device, dtype=torch.float32)
    den = torch.empty(bh, plan.Lq, device=q.device, dtype=torch.float32)
    m = torch.empty_like(den)
    am = torch.empty(bh, plan.Lq, device=q.device, dtype=torch.int32)
    _attn_fwd_kernel[(plan.NQ, bh)](q, k, v, fq, fk, sigma, ell, km, sp_arg, s, z, y, den, m, am,
                                    plan.Lq, plan.Lk, plan.H, plan.G, plan.NB, plan.n0, plan.P, NS=plan.NS,
                                    SB=plan.SB, **plan.common())
    return y, den, m, am  # the states are dropped: backward recomputes them (one cheap scan)


def _backward(dy, q, k, v, fq, fk, sigma, ell, km, sp, y, den, m, am, plan: _Plan):
    """Backward launches. Returns fp32 (dq, dk, dv, dfq, dfk, dsigma, dell); dk, dv on the KV heads."""
    sp_arg = sp if sp is not None else q
    bh = plan.B * plan.H
    dot = (dy.float() * y).sum(-1).reshape(bh, plan.Lq)
    if plan.mixing == 0:  # 'lolcats': y = num / den where den > 0, else 0
        pos = den > 0
        den_safe = torch.where(pos, den, torch.ones_like(den))
        rden = 1.0 / den_safe
        delta = torch.where(pos, -dot / den_safe, torch.zeros_like(den))  # dL/d(den) per row
        rden_lin, delta_lin = rden, delta
    else:  # 'lola_code': den includes eps e^{-c} > 0; the linear terms (and so the state gradients) carry e^{-c}
        rden = 1.0 / den
        delta = -dot * rden
        lin_scale = torch.exp(-m)
        rden_lin, delta_lin = rden * lin_scale, delta * lin_scale

    s, z = _states(fk, v, km, plan)
    f32 = dict(device=q.device, dtype=torch.float32)
    dq = torch.empty(plan.B, plan.H, plan.Lq, plan.d, **f32)
    dfq = torch.empty(plan.B, plan.H, plan.Lq, plan.D, **f32)
    dm = torch.empty(bh, plan.Lq, **f32)
    dsig = torch.empty(bh, plan.Lq, **f32)
    dell = torch.empty(bh, plan.Lq, **f32)
    # per query block partial gradients of the sink keys (NS/C of q's size); summed below
    dks = torch.empty(bh, plan.NQ, plan.NS, plan.d, **f32) if plan.NS else dq
    dvs = torch.empty(bh, plan.NQ, plan.NS, plan.d, **f32) if plan.NS else dq
    _attn_bwd_dq_kernel[(plan.NQ, bh)](q, k, v, fq, fk, sigma, ell, km, sp_arg, s, z, dy, rden, delta, m, am,
                                       dq, dfq, dm, dsig, dell, dks, dvs,
                                       plan.Lq, plan.Lk, plan.H, plan.G, plan.NB, plan.n0, plan.P, NS=plan.NS,
                                       SB=plan.SB, **plan.common())
    ds, dz = s, z  # reuse the state buffers for their gradients
    grid = (triton.cdiv(plan.D, plan.BD), triton.cdiv(plan.d, plan.BV), bh)
    _state_bwd_kernel[grid](fq, dy, rden_lin, delta_lin, ell, ds, dz, plan.Lq, plan.Lk, plan.H, plan.NB, plan.P,
                            plan.D, plan.d, C=plan.C, BD=plan.BD, BV=plan.BV, PREC=plan.prec)
    dk = torch.empty(plan.B, plan.H, plan.Lk, plan.d, **f32)
    dv = torch.empty_like(dk)
    dfk = torch.empty(plan.B, plan.H, plan.Lk, plan.D, **f32)
    _attn_bwd_dkdv_kernel[(plan.NB, bh)](q, k, v, fq, fk, sigma, ell, km, ds, dz, dy, rden, delta, m, am,
                                         dm, dk, dv, dfk,
                                         plan.Lq, plan.Lk, plan.H, plan.G, plan.NB, plan.n0, plan.P,
                                         **plan.common())
    if plan.NS:  # the sink keys got 0 from the dkdv kernel (masked out there): add their gradients
        real = (sp < plan.Lk)[:, None, :, None]                              # [B,1,S,1]
        index = sp.long().clamp(max=plan.Lk - 1)[:, None, :, None].expand(plan.B, plan.H, plan.NS, plan.d)
        for grad, part in ((dk, dks), (dv, dvs)):
            grad.scatter_add_(2, index, part.sum(1).view(plan.B, plan.H, plan.NS, plan.d) * real)
    if plan.G > 1:  # sum the query heads of each KV group
        dk = dk.view(plan.B, plan.Hkv, plan.G, plan.Lk, plan.d).sum(2)
        dv = dv.view(plan.B, plan.Hkv, plan.G, plan.Lk, plan.d).sum(2)
    dsigma = dsig.view(plan.B, plan.H, plan.Lq).sum((0, 2))
    dell_h = dell.view(plan.B, plan.H, plan.Lq).sum((0, 2))
    return dq, dk, dv, dfq, dfk, dsigma, dell_h


def _run_with_block_fallback(launch, q, k, fq, window, layout, block, precision, explicit_block, mixing="lolcats",
                             sinks=0):
    """launch(plan) with the requested block; when the GPU lacks the shared memory for it (smaller cards than
    A100/H100) retry with half the block, down to 16, unless the caller fixed the block."""
    from triton.runtime.errors import OutOfResources

    while True:
        try:
            return launch(_Plan(q, k, fq, window, layout, block, precision, mixing, sinks)), block
        except OutOfResources:
            if explicit_block or block <= 16:
                raise
            block //= 2


class HybridAttentionTriton(torch.autograd.Function):
    """Autograd wrapper: forward and backward are Triton kernels; gradients for q, k, v, fq, fk, sigma, ell.

    km [B,Lk] int8 or None and sp [B,S] int32 or None come from :func:`sink_positions`. Saved for backward: the
    inputs, km, sp, y [B,H,Lq,d] fp32 and den, shift, am [B*H, Lq] (den and shift fp32, am int32).
    """

    @staticmethod
    def forward(ctx, q, k, v, fq, fk, sigma, ell, km, sp, window, layout, block, precision, explicit_block=False,
                mixing="lolcats"):
        sinks = 0 if sp is None else sp.shape[1]
        (y, den, m, am), block = _run_with_block_fallback(
            lambda plan: _forward(q, k, v, fq, fk, sigma, ell, km, sp, plan), q, k, fq, window, layout, block,
            precision, explicit_block, mixing, sinks)
        ctx.save_for_backward(q, k, v, fq, fk, sigma, ell, km, sp, y, den, m, am)
        ctx.args = (window, layout, block, precision, explicit_block, mixing, sinks)
        return y.to(q.dtype)

    @staticmethod
    @once_differentiable  # the kernels' gradients are not themselves differentiable
    def backward(ctx, dy):
        q, k, v, fq, fk, sigma, ell, km, sp, y, den, m, am = ctx.saved_tensors
        window, layout, block, precision, explicit_block, mixing, sinks = ctx.args
        dy = dy.contiguous()
        grads, _ = _run_with_block_fallback(
            lambda plan: _backward(dy, q, k, v, fq, fk, sigma, ell, km, sp, y, den, m, am, plan), q, k, fq, window,
            layout, block, precision, explicit_block, mixing, sinks)
        dq, dk, dv, dfq, dfk, dsigma, dell = grads
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dfq.to(fq.dtype), dfk.to(fk.dtype),
                dsigma, dell) + (None,) * 8


MAX_HEAD_DIM = 128       # d: Llama-family heads are 64 or 128
MAX_FEATURE_WIDTH = 128  # D: Hedgehog fullspace with feature_dim 64 (every published config)
MAX_SINK_TOKENS = SINK_BLOCK  # the sinks are scored as one tile


AUTO_MIN_QUERIES = 65    # 'auto' leaves shorter query blocks (decode) to the PyTorch reference path


def supports(q: torch.Tensor, fq: torch.Tensor, *, mixing: str = "lolcats", sink_tokens: int = 0) -> bool:
    """Whether backend 'auto' should use the kernels: head and feature widths they take, both mixings, at most
    MAX_SINK_TOKENS sinks, and more than 64 queries.

    Decode-sized query blocks go to the reference form, as on CPU: it costs Lq x Lk, while the kernels' state
    scan costs Lk x D x d whatever Lq is. ``backend='triton'`` still runs the kernels for any Lq.
    """
    return (q.shape[-1] <= MAX_HEAD_DIM and fq.shape[-1] <= MAX_FEATURE_WIDTH
            and q.shape[2] >= AUTO_MIN_QUERIES and mixing in MIXINGS and 0 <= sink_tokens <= MAX_SINK_TOKENS)


def _check(q, k, v, fq, fk, sigma, ell, window, layout, key_mask, block, precision, mixing, sink_tokens):
    if not (q.is_cuda or (interpreting() and q.device.type == "cpu")):
        raise RuntimeError(
            f"attention.backend='triton' needs CUDA tensors, got {q.device.type} tensors; use backend 'chunked' "
            f"(or 'auto') on CPU, or set TRITON_INTERPRET=1 before importing lola_kernels to run the kernels in "
            f"Triton's (slow) CPU interpreter")
    for name, t in (("q", q), ("k", k), ("v", v), ("fq", fq), ("fk", fk)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4D [batch, heads, length, dim]; got shape {tuple(t.shape)}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}; move all inputs to one device")
    b, h, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    if k.shape[0] != b or k.shape[-1] != d or v.shape != k.shape:
        raise ValueError(f"k and v must be [batch={b}, kv_heads, keys, head_dim={d}]; got k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    if hkv < 1 or h % hkv:
        raise ValueError(f"query heads ({h}) must be a multiple of the KV heads of k/v ({hkv})")
    if lq > lk:
        raise ValueError(f"q has {lq} positions but k only {lk}; the queries must be the last Lq of the keys")
    if fq.shape[:3] != q.shape[:3] or fk.shape[:3] != (b, h, lk) or fq.shape[-1] != fk.shape[-1]:
        raise ValueError(f"fq must be [batch, heads, Lq, D] and fk [batch, heads (query heads), Lk, D]; got fq "
                         f"{tuple(fq.shape)}, fk {tuple(fk.shape)} for q {tuple(q.shape)}, k {tuple(k.shape)}")
    if d > MAX_HEAD_DIM or fq.shape[-1] > MAX_FEATURE_WIDTH:
        raise ValueError(f"head_dim={d} / feature width={fq.shape[-1]} too large for the triton kernels "
                         f"(max {MAX_HEAD_DIM} / {MAX_FEATURE_WIDTH}: one block's state tile must fit on chip); "
                         f"use backend 'chunked'")
    for name, t in (("sigma", sigma), ("ell", ell)):
        if tuple(t.shape) != (h,):
            raise ValueError(f"{name} must have shape [heads]=({h},); got {tuple(t.shape)}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}; move all inputs to one device")
    if not isinstance(window, int) or window < 1:
        raise ValueError(f"window={window!r} must be a positive integer")
    if layout not in ("sw", "tk"):
        raise ValueError(f"window_layout={layout!r} is not valid; choose 'sw' or 'tk'")
    if key_mask is not None and tuple(key_mask.shape) != (b, lk):
        raise ValueError(f"key_mask must be [batch, keys]=({b}, {lk}); got {tuple(key_mask.shape)}")
    if block not in (16, 32, 64, 128):
        raise ValueError(f"block={block!r} must be one of 16, 32, 64, 128")
    if precision not in ("ieee", "tf32"):
        raise ValueError(f"precision={precision!r} must be 'ieee' (exact fp32) or 'tf32'")
    check_mixing(mixing)
    if not isinstance(sink_tokens, int) or isinstance(sink_tokens, bool) or sink_tokens < 0:
        raise ValueError(f"sink_tokens={sink_tokens!r} must be an integer >= 0")
    if sink_tokens > MAX_SINK_TOKENS:
        raise ValueError(f"sink_tokens={sink_tokens} is more than the triton kernels take (max {MAX_SINK_TOKENS}: "
                         f"the sinks are scored as one tile); use backend 'chunked' (or 'auto')")


def hybrid_attention_triton(q, k, v, fq, fk, sigma, ell, *, window: int, layout: str = "sw",
                            key_mask: torch.Tensor | None = None, chunk_size: int | None = None,
                            block: int | None = None, precision: str = "ieee", mixing: str = "lolcats",
                            sink_tokens: int = 0) -> torch.Tensor:
    """Hybrid attention with Triton kernels; same arguments and result as ``hybrid_attention_reference``.

    q [B,H,Lq,d], k, v [B,H_kv,Lk,d] (H_kv divides H; expanded heads H_kv = H work too), fq [B,H,Lq,D],
    fk [B,H,Lk,D], sigma, ell [H], key_mask [B,Lk] bool or None. Returns y [B,H,Lq,d] in q's dtype,
    differentiable in q, k, v, fq, fk, sigma and ell. ``mixing`` 'lolcats' or 'lola_code' and ``sink_tokens``
    (0 to MAX_SINK_TOKENS; the first S real keys of each row) as in the reference.

    ``chunk_size`` (the PyTorch path's chunk) is accepted for the BACKENDS signature and ignored: the kernels
    use ``block`` (default :func:`default_block`). ``precision='tf32'`` trades exact fp32 dots for speed.
    """
    explicit_block = block is not None
    block = default_block(q.shape[-1], fq.shape[-1]) if block is None else block
    _check(q, k, v, fq, fk, sigma, ell, window, layout, key_mask, block, precision, mixing, sink_tokens)
    if q.numel() == 0 or k.shape[2] == 0:  # nothing to launch; the reference handles empty shapes
        return hybrid_attention_reference(q, k, v, fq, fk, sigma, ell, window=window, layout=layout,
                                          key_mask=key_mask, mixing=mixing, sink_tokens=sink_tokens)
    km, sp = sink_positions(key_mask, q.shape[0], k.shape[2], sink_tokens, q.device)
    return HybridAttentionTriton.apply(q.contiguous(), k.contiguous(), v.contiguous(), fq.contiguous(),
                                       fk.contiguous(), sigma.float().contiguous(), ell.float().contiguous(), km, sp,
                                       window, layout, block, precision, explicit_block, mixing)
