"""LoLA sparse caching math (spec 4): window masks, self-recall error, selection + folding, fusion, and a short
quadratic reference that reads like the equations.

Three memories per head (spec 4.1): the softmax *window* of recent pairs, a sparse *global cache* G of at most
``global_size`` pairs, and the linear *state* (H, s) of everything else. For query i at absolute position p:

    J(i)   = Win(p) u G(i)                                 softmax set (window and cache, raw post-RoPE keys)
    Lin(i) = {j <= p, not pad} \\ J(i)                       linear set (H, s plus recent pairs not yet scored)
    s_ij   = q_i . k_j / sqrt(d),   m_i = max_{J(i)} s_ij

    'lolcats' (default, the trained function of spec 1.4 with Win replaced by J; spec 4.4 (a)):
        y_i = (sigma sum_J e^{s-m} v + ell sum_Lin fq.fk v) / (sigma sum_J e^{s-m} + ell sum_Lin fq.fk)
    'lola_code' (the LoLA reference code's fusion, spec 4.4 (b); computed max-stabilised, same value):
        y_i = (g sum_J e^{s} v + (1-g) sum_Lin fq.fk v) / (g sum_J e^{s} + (1-g) sum_Lin fq.fk + 1e-6)

Cache updates happen at absolute positions u (every multiple of the chunk C, or every decoded token): the
candidates are G u {pairs that can no longer be in any future window}; each is scored with the self-recall error

    SRE(k, v) = || v - phi_k(k)^T H / (phi_k(k)^T s + eps) ||_2^2          (fp32, under the pre-insertion H, s)

the top ``global_size`` stay in G and the rest are folded into H += phi_k(k) v^T, s += phi_k(k). Cached pairs are
never in H (trap T10). Padded tokens never enter any memory (trap T11).

Window modes (absolute positions, W = window):
    'sliding': Win(p) = (p - W, p]                           (the trained 'sw' layout; exact)
    'tk':      blocks of W aligned to the END of the current call (the trained 'tk' layout, end = keys seen
               after the call); Win(p) = previous block + causal part of p's block. For a decoded token that is
               the 2W most recent tokens, as the plain hybrid layer computes it.
    'chunk':   blocks of W aligned to the START of the sequence (the LoLA code's C..2C window)

Shapes: B batch, H query heads, Hk KV heads, L length, d head dim, D feature width, N candidates.
"""
from __future__ import annotations

import math

import torch

WINDOW_MODES = ("sliding", "tk", "chunk")
MIXINGS = ("lolcats", "lola_code")
GQA_SELECTIONS = ("query_head", "kv_mean", "kv_max")


def in_window(q_pos: torch.Tensor, k_pos: torch.Tensor, mode: str, window: int, end: int) -> torch.Tensor:
    """Bool [Lq, Lk]: key position k_pos[j] is in the softmax window of query position q_pos[i] (causal)."""
    qp, kp = q_pos[:, None], k_pos[None, :]
    causal = (kp <= qp) & (kp >= 0)
    if mode == "sliding":
        return causal & (kp > qp - window)
    if mode == "tk":
        shift = (-end) % window
        return causal & (torch.div(kp + shift, window, rounding_mode="floor")
                         >= torch.div(qp + shift, window, rounding_mode="floor") - 1)
    if mode == "chunk":
        return causal & (torch.div(kp, window, rounding_mode="floor")
                         >= torch.div(qp, window, rounding_mode="floor") - 1)
    raise ValueError(f"lola_cache.window_mode={mode!r} is not valid; choose one of {', '.join(WINDOW_MODES)}")


def evict_before(position: int, mode: str, window: int) -> int:
    """Keys older than this can be in no window of a query at ``position`` or later (they become candidates)."""
    if mode == "sliding":
        return position - window + 1
    if mode == "tk":  # a later call may align its blocks differently: only the 2W most recent are ever visible
        return position - 2 * window + 1
    return (position // window - 1) * window  # 'chunk': the start of the previous block


def recent_capacity(mode: str, window: int, chunk: int) -> int:
    """Slots of the recent-pairs buffer: what survives an update plus the <= C pairs appended before the next."""
    return (window - 1 if mode == "sliding" else 2 * window - 1) + chunk


def self_recall_error(fk: torch.Tensor, v: torch.Tensor, h_state: torch.Tensor, s_state: torch.Tensor,
                      eps: float = 1e-6) -> torch.Tensor:
    """SRE per candidate: fk [B,H,N,D], v [B,H,N,d], H [B,H,D,d], s [B,H,D] -> [B,H,N] (float32, squared L2)."""
    fk, v = fk.float(), v.float()
    recall = (fk @ h_state) / ((fk @ s_state.unsqueeze(-1)) + eps)
    return ((v - recall) ** 2).sum(-1)


def group_scores(score: torch.Tensor, groups: int, gqa_selection: str) -> torch.Tensor:
    """[B,H,N] per query head -> [B,Hs,N] per storage head (Hs = H for 'query_head', else H / groups)."""
    if gqa_selection == "query_head" or groups == 1:
        return score
    b, h, n = score.shape
    grouped = score.view(b, h // groups, groups, n)
    if gqa_selection == "kv_mean":
        return grouped.mean(2)
    if gqa_selection == "kv_max":
        return grouped.amax(2)
    raise ValueError(f"lola_cache.gqa_selection={gqa_selection!r} is not valid; choose one of "
                     f"{', '.join(GQA_SELECTIONS)}")


def expand_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B,h,...] -> [B,heads,...] by repeating each head heads/h times (query head i uses head i // groups)."""
    return x if x.shape[1] == heads else x.repeat_interleave(heads // x.shape[1], dim=1)


def lola_kernels_for(x: torch.Tensor, backend: str = "auto", head_dim: int = 0, feature_width: int = 0):
    """The Triton LoLA kernels (module ``lola_kernels.lola``) when they should run for tensors like ``x``, else
    None (the PyTorch path). ``backend`` is ``attention.backend``: 'auto' uses them for CUDA tensors when
    lola_kernels imports and takes these widths; 'chunked'/'reference' never; 'triton' always (an error if
    lola_kernels is missing; the kernels themselves refuse CPU tensors outside Triton's interpreter).
    Imported lazily: this file is copied into exported checkpoints, which must work without triton."""
    if backend in ("chunked", "reference") or (backend == "auto" and not x.is_cuda):
        return None
    try:
        from lola_kernels import lola as kernels
    except ImportError:
        if backend == "triton":
            raise ValueError("attention.backend='triton' needs the lola_kernels package and triton "
                             "(pip install 'lola-train[triton]'); or choose 'auto' or 'chunked'") from None
        return None
    if backend == "auto" and not kernels.supports(head_dim, feature_width):
        return None
    return kernels


def select_and_fold(cand_k, cand_v, cand_pos, feature_map_k, h_state, s_state, *, global_size: int,
                    gqa_selection: str = "query_head", eps: float = 1e-6, backend: str = "auto"):
    """One cache update (spec 4.2 'update', 4.5).

    cand_k, cand_v [B,Hs,N,d]: the current cache followed by the pairs leaving the window; cand_pos [B,Hs,N]
    (absolute position, -1 = empty slot or padding); feature_map_k maps [B,H,N,d] -> [B,H,N,D];
    h_state [B,H,D,d], s_state [B,H,D] float32, updated in place. ``backend`` (attention.backend) picks the
    Triton kernels for the scores and the fold (:func:`lola_kernels_for`); the selection is torch.topk.
    Returns the new cache (k, v [B,Hs,G,d], pos [B,Hs,G]) with G = global_size; empty slots have pos -1.
    """
    heads = h_state.shape[1]
    groups = heads // cand_k.shape[1]
    valid = cand_pos >= 0
    fk = feature_map_k(expand_heads(cand_k, heads)).float() * expand_heads(valid, heads).unsqueeze(-1)
    kernels = lola_kernels_for(fk, backend, h_state.shape[-1], h_state.shape[-2])
    vq = cand_v if kernels is not None else expand_heads(cand_v, heads).float()
    if global_size > 0:
        if kernels is not None:
            sre = kernels.self_recall_error_triton(fk, cand_v, h_state, s_state, eps)
        else:
            sre = self_recall_error(fk, vq, h_state, s_state, eps)
        score = group_scores(sre, groups, gqa_selection).masked_fill(~valid, float("-inf"))
        idx = score.topk(global_size, dim=-1).indices                   # [B,Hs,G]
        kept = torch.zeros_like(valid).scatter_(-1, idx, True) & valid
    else:
        idx = cand_pos.new_zeros(cand_pos.shape[:-1] + (0,), dtype=torch.long)
        kept = torch.zeros_like(valid)
    if kernels is not None:
        kernels.fold_triton(fk, cand_v, valid & ~kept, h_state, s_state)
    else:
        fold = expand_heads(valid & ~kept, heads).unsqueeze(-1).float()    # [B,H,N,1]
        h_state += (fk * fold).transpose(-1, -2) @ vq
        s_state += (fk * fold).sum(2)
    gather = idx.unsqueeze(-1).expand(-1, -1, -1, cand_k.shape[-1])
    return cand_k.gather(2, gather), cand_v.gather(2, gather), cand_pos.gather(2, idx)


def fuse(soft_logits, soft_mask, soft_v, lin_num, lin_den, sigma, ell, *, mixing: str = "lolcats",
         eps: float = 1e-6) -> torch.Tensor:
    """Combine the softmax memories with the linear ones.

    soft_logits, soft_mask [B,H,Lq,M] (scaled logits of window + cache keys), soft_v [B,H,M,d];
    lin_num [B,H,Lq,d] = sum_Lin (fq.fk) v, lin_den [B,H,Lq] = sum_Lin fq.fk; sigma, ell [H]. Returns float32.
    Rows with no visible key give 0.
    """
    s = soft_logits.float().masked_fill(~soft_mask, float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = m.masked_fill(torch.isinf(m), 0.0)
    w = torch.exp(s - m)                                                 # [B,H,Lq,M], masked entries 0
    soft_num, soft_den = w @ soft_v.float(), w.sum(-1, keepdim=True)
    lin_den = lin_den.unsqueeze(-1)
    sig = sigma.float().view(-1, 1, 1)
    if mixing == "lolcats":
        num = sig * soft_num + ell.float().view(-1, 1, 1) * lin_num
        den = sig * soft_den + ell.float().view(-1, 1, 1) * lin_den
        return num / torch.where(den > 0, den, torch.ones_like(den))
    if mixing == "lola_code":  # multiply numerator and denominator by e^{-c}, c = max(m, 0): no overflow
        c = m.clamp_min(0.0)
        soft_scale, lin_scale = torch.exp(m - c), torch.exp(-c)
        num = sig * soft_scale * soft_num + (1 - sig) * lin_scale * lin_num
        den = sig * soft_scale * soft_den + (1 - sig) * lin_scale * lin_den + eps * lin_scale
        return num / den
    raise ValueError(f"lola_cache.mixing={mixing!r} is not valid; choose one of {', '.join(MIXINGS)}")


def lola_reference(q, k, v, fq, fk, sigma, ell, *, window: int, global_size: int, update_positions,
                   window_mode: str = "sliding", mixing: str = "lolcats", gqa_selection: str = "query_head",
                   num_kv_heads: int | None = None, key_mask: torch.Tensor | None = None, eps: float = 1e-6):
    """Quadratic LoLA over one whole sequence (a test oracle; O(L^2) memory).

    q, k, v [B,H,L,d] (KV already expanded to the H query heads), fq, fk [B,H,L,D], key_mask [B,L] (True = token).
    ``update_positions``: the positions u at which the cache is updated (before query u attends). 'tk' aligns
    its blocks to the end L (one call). Returns (y [B,H,L,d] float32, cached [B,H,L] bool after the last update).
    """
    b, h, length, d = q.shape
    dev = q.device
    pos = torch.arange(length, device=dev)
    valid = torch.ones(b, length, dtype=torch.bool, device=dev) if key_mask is None else key_mask.bool()
    q, k, v, fq, fk = (t.float() for t in (q, k, v, fq, fk))
    fk = fk * valid[:, None, :, None]
    groups = h // (num_kv_heads or h)

    cached = torch.zeros(b, h, length, dtype=torch.bool, device=dev)
    folded = torch.zeros_like(cached)
    cached_for_query = torch.zeros(b, h, length, length, dtype=torch.bool, device=dev)  # [B,H,query,key]
    bounds = sorted(set(int(u) for u in update_positions if 0 < u < length)) + [length]
    for u, nxt in zip([0] + bounds[:-1], bounds):
        if u > 0:  # the update at position u
            candidates = (cached | (pos < evict_before(u, window_mode, window))) & ~folded & valid[:, None, :]
            h_state = torch.einsum("bhlD,bhld->bhDd", fk * folded[..., None], v)
            s_state = (fk * folded[..., None]).sum(2)
            sre = self_recall_error(fk, v, h_state, s_state, eps)
            score = group_scores(sre, groups, gqa_selection)
            score = expand_heads(score, h).masked_fill(~candidates, float("-inf"))
            kept = torch.zeros_like(cached)
            if global_size > 0:
                kept.scatter_(-1, score.topk(min(global_size, length), dim=-1).indices, True)
            cached = kept & candidates
            folded = folded | (candidates & ~cached)
        cached_for_query[:, :, u:nxt] = cached[:, :, None, :]

    causal = (pos[None, :] <= pos[:, None]) & valid[:, None, None, :]                  # [B,1,L,L]
    soft = (in_window(pos, pos, window_mode, window, length) | cached_for_query) & causal
    lin = causal & ~soft
    s = (q @ k.transpose(-1, -2)) / math.sqrt(d)
    phi = (fq @ fk.transpose(-1, -2)) * lin
    sig, el = sigma.float().view(-1, 1, 1), ell.float().view(-1, 1, 1)
    if mixing == "lolcats":
        m = s.masked_fill(~soft, float("-inf")).amax(-1, keepdim=True)
        m = m.masked_fill(torch.isinf(m), 0.0)
        a = sig * torch.exp(s - m) * soft + el * phi
        den = a.sum(-1, keepdim=True)
        y = (a @ v) / torch.where(den > 0, den, torch.ones_like(den))
    else:  # the LoLA code's form, unstabilised (use moderate logits)
        a = sig * torch.exp(s) * soft + (1 - sig) * phi
        y = (a @ v) / (a.sum(-1, keepdim=True) + eps)
    return y, cached
