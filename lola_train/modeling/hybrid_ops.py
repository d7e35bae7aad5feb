"""Hybrid sliding-window softmax + linear attention (spec 1.4), as functions of post-RoPE tensors.

One math, several speeds:

* :func:`hybrid_attention_reference`: quadratic, reads like the equations, returns the weights too.
* :func:`hybrid_attention_chunked`: the same function at O(L (C + W) d + L D d) cost (CPU default).
* kernel packages (``lola_kernels``) register more backends in :data:`BACKENDS`.

Shapes (all heads already expanded from KV heads, so H is the number of query heads):
    q [B,H,Lq,d]   k, v [B,H,Lk,d]   fq [B,H,Lq,D]   fk [B,H,Lk,D]   sigma, ell [H]
The queries are the last Lq of the Lk key positions (offset o = Lk - Lq). ``key_mask`` [B,Lk] (True = real
token) removes padded keys from both memories. For query i (absolute position p = o + i) and key j:

    s_ij = q_i . k_j / sqrt(d)
    J(i) = Win(i) u Sink(i)                              softmax set; Sink(i) = the first S real keys, j <= p
    m_i  = max_{j in J(i)} s_ij                          (softmax set only: trap T1, the shift is part of the model)

    mixing 'lolcats' (spec 1.4, LoLCATs):
        A_ij = sigma_h exp(s_ij - m_i)   if j in J(i)
             = ell_h  fq_i . fk_j         if j in Lin(i)   (never shifted)
        y_i  = sum_j A_ij v_j / sum_j A_ij
    mixing 'lola_code' (spec 4.4 (b), the LoLA code's fusion, here trainable):
        A_ij = sigma_h exp(s_ij)         if j in J(i)      (unshifted: the softmax block's mass is e^{m_i} times
             = ell_h  fq_i . fk_j         if j in Lin(i)    larger than in 'lolcats'; callers pass ell = 1 - sigma)
        y_i  = sum_j A_ij v_j / (sum_j A_ij + 1e-6)
        computed as (num e^{-c}) / (den e^{-c}) with c = max(m_i, 0), so no term overflows

    'sw':  Win(i) = {j : p - W < j <= p},  Lin(i) = {j : j <= p - W} minus the sinks
    'tk':  blocks of W keys aligned to the END of the Lk keys (the first block is partial);
           Win(i) = {j <= p : block(j) >= block(p) - 1},  Lin(i) = {j : block(j) <= block(p) - 2} minus the sinks

Decay (``decay`` gamma [H] in (0, 1], optional): every linear term of query p and key j is multiplied by
gamma_h^(p - j) (distances in key-axis positions), which bounds the linear block's mass at any length.

Cached keys (``cached`` [B, H or 1, Lk] bool, optional; the reference and the chunked path, not the kernels): keys
that join the softmax set of every later query, as LoLA's sparse cache puts them there at inference (spec 4.1):
J(i) = Win(i) u Sink(i) u {j in cached, j <= p}, and they leave Lin(i). Training draws them at random
(``<stage>.cached_fraction``), so the fusion is fitted with far softmax pairs beside the linear memory.

Attention sinks (``sink_tokens`` S > 0): the first S real tokens of each row stay in the softmax set of every
later query and never enter the linear memory. Without them the first token's large softmax mass (the attention
sink of pretrained LLMs) must be carried by a linear term, which is bounded, and the model learns to inflate the
whole linear block instead; past the training length that block then outweighs the window (spec 11).

All arithmetic is float32; the output has q's dtype. Rows with no visible key (padded queries) return 0.
"""
from __future__ import annotations

import functools
import math
from typing import Callable

import torch
import torch.nn.functional as F


def window_masks(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int, layout: str, k_len: int):
    """Boolean (win, lin) masks of shape ``q_pos.shape + k_pos.shape[-1:]`` from absolute positions.

    ``q_pos [..., Lq]`` and ``k_pos [..., Lk]`` broadcast against each other; ``k_len`` is the full key length
    that 'tk' blocks are aligned to.
    """
    qp, kp = q_pos.unsqueeze(-1), k_pos.unsqueeze(-2)
    causal = kp <= qp
    if layout == "sw":
        win = causal & (kp > qp - window)
    elif layout == "tk":
        shift = (-k_len) % window
        win = causal & (torch.div(kp + shift, window, rounding_mode="floor")
                        >= torch.div(qp + shift, window, rounding_mode="floor") - 1)
    else:
        raise ValueError(f"window_layout={layout!r} is not valid; choose 'sw' or 'tk'")
    return win, causal & ~win


MIXINGS = ("lolcats", "lola_code")
LOLA_CODE_EPS = 1e-6  # the LoLA code's denominator epsilon (spec 4.2 step 3)


def check_mixing(mixing: str) -> None:
    if mixing not in MIXINGS:
        raise ValueError(f"attention.mixing={mixing!r} is not valid; choose one of {', '.join(map(repr, MIXINGS))}")


def mixing_weights(window_factors: torch.Tensor, mixing: str = "lolcats", affine: bool = False):
    """(sigma, ell) [H] float32: weights of the softmax and linear terms for a mixing.

    'lolcats': sigma = sigmoid(w), ell = 1 (or 1 - sigma with affine_attention_factors); 'lola_code': ell = 1 - sigma.
    """
    check_mixing(mixing)
    sigma = torch.sigmoid(window_factors.float())
    if mixing == "lola_code" or affine:
        return sigma, 1 - sigma
    return sigma, torch.ones_like(sigma)


def sink_keys(key_mask: torch.Tensor | None, batch: int, k_len: int, sink_tokens: int, device) -> torch.Tensor | None:
    """Bool [B,Lk]: the first ``sink_tokens`` real keys of each row (None when there are no sinks)."""
    if sink_tokens <= 0:
        return None
    real = torch.ones(batch, k_len, dtype=torch.bool, device=device) if key_mask is None else key_mask.bool()
    return real & (torch.cumsum(real.long(), dim=-1) <= sink_tokens)


def _combine(s, soft, lin_scores, v, sigma, ell, mixing):
    """Fuse one block of keys. s, soft, lin_scores [..., Lq, M], v [..., M, d]; sigma, ell broadcast per head.

    Returns (A, num [..., Lq, d], den [..., Lq, 1], lin_scale [..., Lq, 1]): A are the terms of the module
    docstring times ``lin_scale`` (1 for 'lolcats', e^{-c} for 'lola_code'), which the caller applies to any
    further linear terms (the prefix state) and to the epsilon.
    """
    check_mixing(mixing)
    s = s.masked_fill(~soft, float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = m.masked_fill(torch.isinf(m), 0.0)
    if mixing == "lolcats":
        lin_scale = torch.ones_like(m)
        a = sigma * torch.exp(s - m) + ell * lin_scores
    else:  # 'lola_code'
        c = m.clamp_min(0.0)
        lin_scale = torch.exp(-c)
        a = sigma * torch.exp(s - c) + (ell * lin_scale) * lin_scores
    return a, a @ v, a.sum(-1, keepdim=True), lin_scale


def _finish(num, den, lin_scale, mixing):
    if mixing == "lola_code":
        return num / (den + LOLA_CODE_EPS * lin_scale)
    return _safe_divide(num, den)


def _safe_divide(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return num / torch.where(den > 0, den, torch.ones_like(den))


def decay_weights(decay: torch.Tensor, distance: torch.Tensor, head_axis: int = 0) -> torch.Tensor:
    """gamma_h^distance (float32; negative distances count as 0) for decay [H] and integer distances: [...] ->
    [H, ...] with head_axis 0; distances [B, H or 1, ...] -> [B, H, ...] with head_axis 1."""
    shape = (-1,) + (1,) * distance.dim() if head_axis == 0 else (1, -1) + (1,) * (distance.dim() - 2)
    return torch.exp(distance.float().clamp_min(0) * torch.log(decay.float()).view(shape))


def hybrid_attention_reference(q, k, v, fq, fk, sigma, ell, *, window: int, layout: str = "sw",
                               key_mask: torch.Tensor | None = None, return_weights: bool = False,
                               mixing: str = "lolcats", sink_tokens: int = 0, decay: torch.Tensor | None = None,
                               cached: torch.Tensor | None = None):
    """Quadratic form: materialises [B,H,Lq,Lk] scores. Returns y [B,H,Lq,d] (and weights a = A / sum A).
    ``cached`` [B, H or 1, Lk] bool: keys in the softmax set of every later query (module docstring)."""
    b, lq, lk, d = q.shape[0], q.shape[2], k.shape[2], q.shape[-1]
    dev, out_dtype = q.device, q.dtype
    win, lin = window_masks(torch.arange(lk - lq, lk, device=dev), torch.arange(lk, device=dev), window, layout, lk)
    if key_mask is not None:
        km = key_mask[:, None, None, :].bool()
        win, lin = win & km, lin & km
    sinks = sink_keys(key_mask, b, lk, sink_tokens, dev)
    if sinks is not None:
        sink = sinks[:, None, None, :] & (win | lin)      # causal sinks of each query
        win, lin = win | sink, lin & ~sink
    if cached is not None:
        far = lin & cached[:, :, None, :].bool()          # [B,H,Lq,Lk]: cached keys out of the window
        win, lin = win | far, lin & ~far
    q, k, v, fq, fk = (t.float() for t in (q, k, v, fq, fk))
    s = (q @ k.transpose(-1, -2)) / math.sqrt(d)
    lin_scores = (fq @ fk.transpose(-1, -2)) * lin
    if decay is not None:
        q_pos, k_pos = torch.arange(lk - lq, lk, device=dev), torch.arange(lk, device=dev)
        lin_scores = lin_scores * decay_weights(decay, q_pos[:, None] - k_pos[None, :])
    a, num, den, lin_scale = _combine(s, win, lin_scores, v, sigma.float().view(-1, 1, 1),
                                      ell.float().view(-1, 1, 1), mixing)
    y = _finish(num, den, lin_scale, mixing).to(out_dtype)
    if return_weights:
        return y, _finish(a, den, lin_scale, mixing)
    return y


def first_marked(mask: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``count`` marked positions of ``mask`` [..., L] (bool), in order: (index [..., count], a valid
    gather index, and pos [..., count], the same with L where a row has fewer than ``count`` marked)."""
    length = mask.shape[-1]
    first = (mask.float() * torch.arange(length, 0, -1, device=mask.device)).topk(count, dim=-1).indices
    return first, torch.where(mask.gather(-1, first), first, torch.full_like(first, length))


def hybrid_attention_chunked(q, k, v, fq, fk, sigma, ell, *, window: int, layout: str = "sw",
                             key_mask: torch.Tensor | None = None, chunk_size: int = 64, mixing: str = "lolcats",
                             sink_tokens: int = 0, decay: torch.Tensor | None = None,
                             cached: torch.Tensor | None = None):
    """Chunked form, linear in length. Same arguments and result as :func:`hybrid_attention_reference`.

    Keys are split into chunks of C aligned to the end of the sequence. Query chunk n scores exactly the keys of
    chunks n-P..n (P = ceil(lookback / C), lookback = W-1 for 'sw', 2W-1 for 'tk'), which hold its whole window
    and the most recent part of its linear memory; everything older enters through the running state
    S_n = sum_{chunks < n-P} fk^T v, z_n = sum fk (an exclusive cumulative sum over chunk sums).
    With a decay the chunk states are decayed sums, U_m = gamma^C U_{m-1} + sum_{j in chunk m} gamma^(t_m - j)
    fk_j v_j^T (t_m = the first position after chunk m), a scan over the N chunks.
    The S sink keys of each row are gathered once ([B,H,S,d]) and scored by every query chunk as extra softmax
    keys; they are removed from the local blocks and from the state, so each key is counted once.
    Cached keys (``cached``) are gathered alike ([B,H,K,d], K = the most any row and head has) and scored as extra
    softmax keys by the queries whose window they are out of; their phi_k is zeroed, so no linear term counts them.
    With an offset (Lq < Lk) the missing queries are computed as zeros and dropped.
    """
    out_dtype = q.dtype
    b, h, lq, d = q.shape
    lk, dd = k.shape[2], fk.shape[-1]
    dev = q.device
    c = chunk_size
    lookback = window - 1 if layout == "sw" else 2 * window - 1
    p = -(-lookback // c)
    front = (-lk) % c
    n = (lk + front) // c

    q, k, v, fq, fk = (t.float() for t in (q, k, v, fq, fk))
    # queries padded to the key length (front: offset queries and chunk alignment), keys padded to chunks
    q = F.pad(q, (0, 0, front + lk - lq, 0))
    fq = F.pad(fq, (0, 0, front + lk - lq, 0))
    pos = torch.arange(-front, lk, device=dev)
    valid = pos >= 0
    valid = valid.expand(b, -1) if key_mask is None else valid & F.pad(key_mask.bool(), (front, 0))
    sinks = sink_keys(key_mask, b, lk, sink_tokens, dev)
    if sinks is not None:  # [B,H,S,.] sink keys (first S real positions; a row with fewer real keys has gaps)
        n_s = min(sink_tokens, lk)
        first, sink_pos = first_marked(sinks, n_s)                                       # [B,S]; lk = no sink
        gather = first[:, None, :, None].expand(-1, h, -1, d)
        k_sink, v_sink = k.gather(2, gather), v.gather(2, gather)
        valid = valid & ~F.pad(sinks, (front, 0))       # sinks leave the local blocks and the linear state
    far = None
    if cached is not None:  # [B,H,K] cached positions in order (lk = none), their keys and values
        cached = cached.bool().expand(b, h, lk) & valid[:, None, front:]
        n_c = int(cached.sum(-1).max())
        if n_c > 0:
            first, far_pos = first_marked(cached, n_c)
            gather = first[..., None].expand(-1, -1, -1, d)
            far = (far_pos, k.gather(2, gather), v.gather(2, gather))
            fk = fk * (~cached)[..., None]                # no linear term counts a cached key
    vf = valid[:, None, :, None].float()
    k, v, fk = F.pad(k, (0, 0, front, 0)), F.pad(v, (0, 0, front, 0)) * vf, F.pad(fk, (0, 0, front, 0)) * vf

    def local(t: torch.Tensor) -> torch.Tensor:  # [B,H,n*C,X] -> [B,H,N,(P+1)C,X], keys of chunks n-P..n
        t = F.pad(t, (0, 0, p * c, 0))
        return t.unfold(2, (p + 1) * c, c).transpose(-1, -2)

    def chunks(t: torch.Tensor) -> torch.Tensor:  # [B,H,n*C,X] -> [B,H,N,C,X]
        return t.reshape(t.shape[0], t.shape[1], n, c, t.shape[-1])

    qc, fqc = chunks(q), chunks(fq)
    k_loc, v_loc, fk_loc = local(k), local(v), local(fk)
    q_pos = pos.view(n, c)
    k_pos = F.pad(pos, (p * c, 0), value=-1).unfold(0, (p + 1) * c, c)  # [N,(P+1)C]
    k_valid = F.pad(valid.float(), (p * c, 0)).unfold(1, (p + 1) * c, c) > 0  # [B,N,(P+1)C]
    win, lin = window_masks(q_pos, k_pos, window, layout, lk)           # [N,C,(P+1)C]
    kv_ok = k_valid[:, None, :, None, :]
    win, lin = win & kv_ok, lin & kv_ok                                 # [B,1,N,C,(P+1)C]

    s = (qc @ k_loc.transpose(-1, -2)) / math.sqrt(d)
    lin_scores = (fqc @ fk_loc.transpose(-1, -2)) * lin
    if decay is not None:
        lin_scores = lin_scores * decay_weights(decay, q_pos[:, :, None] - k_pos[:, None, :])  # [H,N,C,(P+1)C]
    if sinks is not None:  # append the sink keys to every chunk's local keys, softmax only
        s_sink = torch.einsum("bhncd,bhsd->bhncs", qc, k_sink) / math.sqrt(d)
        sink_ok = (sink_pos[:, None, None, :] <= q_pos[None, :, :, None])[:, None]     # [B,1,N,C,S]
        s = torch.cat([s, s_sink], dim=-1)
        win = torch.cat([win.expand(b, -1, -1, -1, -1), sink_ok], dim=-1)
        lin_scores = torch.cat([lin_scores, torch.zeros_like(s_sink)], dim=-1)
        v_loc = torch.cat([v_loc, v_sink[:, :, None].expand(-1, -1, n, -1, -1)], dim=-2)
    if far is not None:  # cached keys: softmax terms of the queries whose linear set they would be in
        far_pos, k_far, v_far = far
        s_far = torch.einsum("bhncd,bhkd->bhnck", qc, k_far) / math.sqrt(d)
        _, far_ok = window_masks(q_pos, far_pos[:, :, None, :], window, layout, lk)     # [B,H,N,C,K]
        s = torch.cat([s, s_far], dim=-1)
        win = torch.cat([win.expand(b, h, -1, -1, -1), far_ok], dim=-1)
        lin_scores = torch.cat([lin_scores.expand(b, h, -1, -1, -1), torch.zeros_like(s_far)], dim=-1)
        v_loc = torch.cat([v_loc, v_far[:, :, None].expand(-1, -1, n, -1, -1)], dim=-2)
    sig, el = sigma.float().view(-1, 1, 1, 1), ell.float().view(-1, 1, 1, 1)
    _, num, den, lin_scale = _combine(s, win, lin_scores, v_loc, sig, el, mixing)

    # state of everything older than the local keys: exclusive prefix sums over chunk sums, shifted by P
    fkc, vc = chunks(fk), chunks(v)
    if decay is None:
        kv_sum = torch.cumsum(fkc.transpose(-1, -2) @ vc, dim=2)        # [B,H,N,D,d]
        z_sum = torch.cumsum(fkc.sum(3), dim=2)                         # [B,H,N,D]
    else:  # decayed chunk sums, then the scan U_m = gamma^C U_{m-1} + T_m
        offs = torch.arange(c, device=dev)
        fkw = fkc * decay_weights(decay, c - offs).view(1, h, 1, c, 1)  # gamma^(t_m - j) within each chunk
        t_kv, t_z = fkw.transpose(-1, -2) @ vc, fkw.sum(3)
        g_c = decay.float().pow(c).view(1, h, 1, 1)
        kv_parts, z_parts = [t_kv[:, :, 0]], [t_z[:, :, 0]]
        for m in range(1, n):
            kv_parts.append(g_c * kv_parts[-1] + t_kv[:, :, m])
            z_parts.append(g_c[..., 0] * z_parts[-1] + t_z[:, :, m])
        kv_sum, z_sum = torch.stack(kv_parts, 2), torch.stack(z_parts, 2)
        fqc = fqc * decay_weights(decay, offs + p * c).view(1, h, 1, c, 1)  # gamma^(P C + offset in the chunk)
    kv_state = F.pad(kv_sum, (0, 0, 0, 0, p + 1, 0))[:, :, :n]
    z_state = F.pad(z_sum, (0, 0, p + 1, 0))[:, :, :n]
    lin_w = el * lin_scale
    num = num + lin_w * (fqc @ kv_state)
    den = den + lin_w * (fqc @ z_state.unsqueeze(-1))

    y = _finish(num, den, lin_scale, mixing).reshape(b, h, n * c, d)
    return y[:, :, front + lk - lq:].to(out_dtype)


def _auto(q, k, v, fq, fk, sigma, ell, *, window, layout, key_mask=None, chunk_size=64, mixing="lolcats",
          sink_tokens=0, decay=None, cached=None):
    """Short query blocks (decode) use the reference (cost Lq x Lk); longer ones the chunked form."""
    fn = hybrid_attention_chunked if q.shape[2] > chunk_size else _reference
    return fn(q, k, v, fq, fk, sigma, ell, window=window, layout=layout, key_mask=key_mask, chunk_size=chunk_size,
              mixing=mixing, sink_tokens=sink_tokens, decay=decay, cached=cached)


def _reference(q, k, v, fq, fk, sigma, ell, *, window, layout, key_mask=None, chunk_size=64, mixing="lolcats",
               sink_tokens=0, decay=None, cached=None):
    return hybrid_attention_reference(q, k, v, fq, fk, sigma, ell, window=window, layout=layout, key_mask=key_mask,
                                      mixing=mixing, sink_tokens=sink_tokens, decay=decay, cached=cached)


BACKENDS: dict[str, Callable] = {"reference": _reference, "chunked": hybrid_attention_chunked}
"""name -> fn(q, k, v, fq, fk, sigma, ell, *, window, layout, key_mask, chunk_size, mixing, sink_tokens) -> y.
Kernel packages add entries (e.g. 'triton'); 'auto' is resolved by :func:`hybrid_attention`. The PyTorch entries
also take ``decay`` and ``cached``, which the kernels do not implement yet."""
PYTORCH_BACKENDS = ("reference", "chunked")


def load_kernel_backends() -> None:
    """Register the Triton backend from ``lola_kernels`` when that package (and triton) is importable.

    Lazy and optional: this file is copied into exported checkpoints, which must load without either package.
    The entry is added to THIS module's registry, so it also works for such a copy.
    """
    if "triton" in BACKENDS:
        return
    try:
        import lola_kernels
    except ImportError:
        return
    BACKENDS.setdefault("triton", lola_kernels.triton_backend)


def hybrid_attention(q, k, v, fq, fk, sigma, ell, *, window: int, layout: str = "sw",
                     key_mask: torch.Tensor | None = None, chunk_size: int = 64, backend: str = "auto",
                     mixing: str = "lolcats", sink_tokens: int = 0, decay: torch.Tensor | None = None,
                     cached: torch.Tensor | None = None):
    """Dispatch to a backend. 'auto' picks a registered GPU kernel for CUDA tensors when one is present."""
    if decay is not None and backend not in ("auto",) + PYTORCH_BACKENDS:
        raise ValueError(f"attention.backend={backend!r} does not implement attention.linear_decay; choose "
                         f"'auto', 'chunked' or 'reference'")
    if cached is not None and backend not in ("auto",) + PYTORCH_BACKENDS:
        raise ValueError(f"attention.backend={backend!r} does not implement cached keys (transfer.cached_fraction, "
                         f"finetune.cached_fraction); choose 'auto', 'chunked' or 'reference', or set them to 0")
    extra = {k: x for k, x in (("decay", decay), ("cached", cached)) if x is not None}  # PyTorch paths only
    pytorch_only = bool(extra)
    if (backend == "auto" and q.is_cuda and not pytorch_only) or backend == "triton":
        load_kernel_backends()
        if backend == "triton" and "triton" not in BACKENDS:
            raise ValueError("attention.backend='triton' needs the lola_kernels package and triton "
                             "(pip install 'lola-train[triton]'); or choose 'auto' or 'chunked'")
    if backend == "auto":
        fn = BACKENDS.get("triton") if q.is_cuda and not pytorch_only else None
        if fn is None or not getattr(fn, "supports", lambda *_, **__: True)(q, fq, mixing=mixing,
                                                                             sink_tokens=sink_tokens):
            fn = _auto  # kernels decline some widths and options
        elif getattr(fn, "guarded", None) is not None:
            # lola_kernels.guard: the kernel is self-checked once per device and options against this PyTorch
            # path, which it falls back to (with one warning) on a mismatch or error
            fn = functools.partial(fn.guarded, fallback=_auto)
    else:
        try:
            fn = BACKENDS[backend]
        except KeyError:
            raise ValueError(f"attention.backend={backend!r} is not registered; choose 'auto' or one of "
                             f"{', '.join(map(repr, BACKENDS))}") from None
    return fn(q, k, v, fq, fk, sigma, ell, window=window, layout=layout, key_mask=key_mask, chunk_size=chunk_size,
              mixing=mixing, sink_tokens=sink_tokens, **extra)
