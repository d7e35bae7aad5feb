"""LoLA sparse caching math (spec 4): window rules, self-recall error, selection + folding, fusion, the batched
attention of many segments at once, and a short quadratic reference that reads like the equations.

Positions are counted in each row's REAL tokens (r = 0, 1, ... over the row's non-padding tokens): padding never
enters any memory (trap T11) and never shifts a window or a cache update, so a padded row of a batch computes
exactly what it computes alone. Four memories per head (spec 4.1, plus attention sinks):

    Sink      the first S real tokens of the row (attention.sink_tokens), raw k, v
    Win(r)    the softmax window of query r (window modes below)
    G(r)      the sparse global cache: at most ``global_size`` pairs, chosen by self-recall error
    (H, s)    the linear state of every other past pair: H = sum phi_k(k) v^T, s = sum phi_k(k)

For query r (keys j <= r only):

    J(r)   = Sink(r) u Win(r) u G(r)                 softmax set (raw post-RoPE keys)
    Lin(r) = {j <= r} \\ J(r)                          linear set: (H, s) plus recent pairs not yet scored
    s_rj   = q_r . k_j / sqrt(d),   m_r = max_{j in J(r)} s_rj

    'lolcats' (the trained function of spec 1.4 with Win replaced by J; spec 4.4 (a)):
        y_r = (sigma sum_J e^{s-m} v + ell sum_Lin fq.fk v) / (sigma sum_J e^{s-m} + ell sum_Lin fq.fk)
    'lola_code' (the LoLA code's fusion, spec 4.4 (b); computed as (num e^{-c}) / (den e^{-c}), c = max(m, 0)):
        y_r = (sigma sum_J e^{s} v + ell sum_Lin fq.fk v) / (sigma sum_J e^{s} + ell sum_Lin fq.fk + eps)

    (sigma, ell) [H] are taken as given: ``hybrid_ops.mixing_weights`` makes them (ell = 1 - sigma for 'lola_code').
    With ``cache_weight`` w (ours, default 1), every cached pair's e^s is w e^s (its logit + log w).

The cache is updated before query u attends, for every u that is a multiple of the chunk C (and, with
update_every='token', before every decoded token). The candidates are G plus the pairs that can be in no future
window (never the sinks); each is scored with the self-recall error

    SRE(k, v) = || v - phi_k(k)^T H / (phi_k(k)^T s + eps) ||_2^2          (fp32, under the pre-insertion H, s)

the top ``global_size`` stay in G and the rest are folded into (H, s). Cached pairs are never in H (trap T10).
With ``dedup`` = T > 0 (ours, off by default), a candidate whose value has cosine similarity >= T with a better
candidate's (higher SRE; equal SRE and earlier position) ranks below every candidate without one: in repeated
text the worst-recalled pairs are hundreds of near-copies of a few values, which would otherwise fill G.

Decay (a model trained with ``attention.linear_decay``, gamma [H]): the linear term of query r and key j carries
gamma^(r - j), as in the trained layer. The state is kept referenced to its last update u,
H_u = sum_folded gamma^(u - j) phi_k(k_j) v_j^T (and s_u alike): an update first ages the state,
H <- gamma^(u - u') H, then folds each dropped pair with weight gamma^(u - j); a query r >= u reads it through
gamma^(r - u) phi_q(q_r) (factors <= 1: nothing overflows), and the recent pairs out of the window through
gamma^(r - j). The self-recall error is taken under the aged state H_u, s_u: the memory the pair would join.
The cache contents depend only on keys, values and phi_k(k), never on attention outputs: the selection runs as a
cheap sequential pass and the attention of all queries of a prompt then runs batched (``lola_cache``).

Window modes (real positions, W = window):
    'sliding': Win(r) = (r - W, r]                 (the trained 'sw' layout; exact)
    'tk':      blocks of W aligned to the END of the current call (end = the row's real tokens after the call);
               Win(r) = previous block + causal part of r's block. For a decoded token that is the 2W most
               recent tokens, as the plain hybrid layer computes it.
    'chunk':   blocks of W aligned to the START of the sequence (the LoLA code's C..2C window)

Shapes: B batch, H query heads, Hk KV heads (query head h reads KV head h // (H / Hk)), Hs storage heads of the
cache (H or Hk), L length, d head dim, D feature width, N candidates, S segments of a batched call.
"""
from __future__ import annotations

import math

import torch

from .hybrid_ops import MIXINGS, decay_weights

WINDOW_MODES = ("sliding", "tk", "chunk")
GQA_SELECTIONS = ("query_head", "kv_mean", "kv_max")
MEMORIES = ("recent", "sink", "cache", "linear")
"""Codes 0..3 of :meth:`lola_cache.LolaLayer.memory_of` (-1 = not seen yet): 'recent' = the softmax window or a
pair waiting for the next cache update, 'sink', 'cache' = the sparse global cache, 'linear' = folded into (H, s)."""


def _floor_div(x, n: int):
    return torch.div(x, n, rounding_mode="floor") if isinstance(x, torch.Tensor) else x // n


def in_window(q_pos: torch.Tensor, k_pos: torch.Tensor, mode: str, window: int, end) -> torch.Tensor:
    """Bool [..., Lq, Lk]: key position k_pos[..., j] is in the softmax window of query position q_pos[..., i]
    (causal; negative key positions never are). q_pos [..., Lq] and k_pos [..., Lk] broadcast; ``end`` (an int or
    a tensor broadcastable to [...]) is the sequence length 'tk' blocks are aligned to."""
    qp, kp = q_pos.unsqueeze(-1), k_pos.unsqueeze(-2)
    causal = (kp <= qp) & (kp >= 0)
    if mode == "sliding":
        return causal & (kp > qp - window)
    if mode == "tk":
        shift = (-end) % window
        if isinstance(shift, torch.Tensor):
            shift = shift[..., None, None]
        return causal & (_floor_div(kp + shift, window) >= _floor_div(qp + shift, window) - 1)
    if mode == "chunk":
        return causal & (_floor_div(kp, window) >= _floor_div(qp, window) - 1)
    raise ValueError(f"lola_cache.window_mode={mode!r} is not valid; choose one of {', '.join(WINDOW_MODES)}")


def evict_before(position, mode: str, window: int):
    """Keys older than this (int or tensor) can be in no window of a query at ``position`` or later: they are the
    candidates of the cache update at ``position``. It is also where the window of that query starts."""
    if mode == "sliding":
        return position - window + 1
    if mode == "tk":  # a later call may align its blocks differently: only the 2W most recent are ever visible
        return position - 2 * window + 1
    return (_floor_div(position, window) - 1) * window  # 'chunk': the start of the previous block


def recent_capacity(mode: str, window: int, chunk: int) -> int:
    """Slots of the recent-pairs buffer: what survives an update plus the <= C pairs appended before the next."""
    return (window - 1 if mode == "sliding" else 2 * window - 1) + chunk


def expand_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B,h,...] -> [B,heads,...] by repeating each head heads/h times (query head i uses head i // groups)."""
    return x if x.shape[1] == heads else x.repeat_interleave(heads // x.shape[1], dim=1)


def grouped_matmul(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x [B,H,M,X] @ y [B,Hy,X,Z] -> [B,H,M,Z], where query head h uses y's head h // (H / Hy) (GQA without
    repeating y: the H / Hy heads of a group are stacked into one matmul)."""
    b, h, m, k = x.shape
    hy = y.shape[1]
    if hy == h:  # no group to stack (x may be a transposed view: matmul takes it as is)
        return x @ y
    return (x.reshape(b, hy, (h // hy) * m, k) @ y).view(b, h, m, y.shape[-1])


def self_recall_error(fk: torch.Tensor, v: torch.Tensor, h_state: torch.Tensor, s_state: torch.Tensor,
                      eps: float = 1e-6) -> torch.Tensor:
    """SRE per candidate: fk [B,H,N,D], v [B,Hv,N,d] (Hv divides H), H [B,H,D,d], s [B,H,D] -> [B,H,N]
    (float32, squared L2). One matmul gives both fk H and fk . s."""
    b, h, n, _ = fk.shape
    hv, d = v.shape[1], v.shape[-1]
    r = fk.float() @ torch.cat([h_state, s_state.unsqueeze(-1)], dim=-1)               # [B,H,N,d+1]
    recall, norm = r[..., :d].view(b, hv, h // hv, n, d), r[..., d:].view(b, hv, h // hv, n, 1)
    err = torch.addcdiv(v.float().unsqueeze(2), recall, norm + eps, value=-1.0)
    return torch.linalg.vector_norm(err, dim=-1).square_().view(b, h, n)


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


def _unit_values(v: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(v.float(), dim=-1, eps=1e-12)


def _ranked_last(score: torch.Tensor, dup: torch.Tensor) -> torch.Tensor:
    """Scores with the candidates ``dup`` marks (and that are candidates: score > -inf) mapped to -1 / (1 + score),
    in (-1, 0]: below every SRE, their order kept."""
    dup = dup & (score > float("-inf"))
    return torch.where(dup, -1.0 / (1.0 + score), score)


def demote_duplicates(score: torch.Tensor, cand_v: torch.Tensor, cand_pos: torch.Tensor,
                      threshold: float) -> torch.Tensor:
    """Value-deduplicated selection scores (``lola_cache.dedup``): a candidate whose value has cosine similarity
    >= ``threshold`` with the value of a better candidate (higher score; equal score and earlier position) is
    ranked after every candidate that has none, keeping its order among such duplicates. So a run of near-copies
    of one value (a repeated phrase) holds one cache slot, not hundreds, while anything else is left for them.

    score [B,Hs,N] (SRE >= 0, -inf = not a candidate), cand_v [B,Hs,N,d], cand_pos [B,Hs,N]. Returns the scores
    with duplicates mapped to -1 / (1 + score), in (-1, 0]: below every SRE, order kept. Cost: one [N, N] value
    similarity per storage head, taken in rank order so that "better" is the strict lower triangle.
    """
    by_pos = cand_pos.argsort(dim=-1, stable=True)
    rank = by_pos.gather(-1, score.gather(-1, by_pos).argsort(dim=-1, descending=True, stable=True))  # best first
    vn = _unit_values(take_rows(cand_v, rank))
    covered = (vn @ vn.transpose(-1, -2)).tril_(-1).amax(-1) >= threshold               # [B,Hs,N] by rank
    return _ranked_last(score, torch.zeros_like(covered).scatter_(-1, rank, covered))


class DuplicatePairs:
    """The near-copy pairs of one call's candidate slots, kept across its cache updates: the same demotion as
    :func:`demote_duplicates` at a fraction of its cost. The cached values do not change between updates, only
    their scores do, so the [G, G] value similarity is taken once per call (:meth:`of_cache`) and each update adds
    the [N, G+N] similarity of its N new candidates (:meth:`add_candidates`); the rank order then only decides,
    per similar pair, which of the two is the duplicate (:meth:`demote`). After the selection
    (:meth:`follow_selection`) the pairs of dropped slots go and moved slots are renamed.

    pairs [E,4] long: (row b, storage head, slot i, slot j), i != j, both valid (position >= 0), cosine >= the
    threshold; each unordered pair once. Slots >= G hold the update's new candidates.
    """

    def __init__(self, pairs: torch.Tensor, threshold: float):
        self.pairs, self.threshold = pairs, threshold

    @classmethod
    def of_cache(cls, cache_v: torch.Tensor, cache_pos: torch.Tensor, threshold: float) -> "DuplicatePairs":
        """The similar pairs among the cache: cache_v [B,Hs,G,d], cache_pos [B,Hs,G] (-1 = empty)."""
        ok = cache_pos >= 0
        if not bool(ok.any()):
            return cls(torch.zeros(0, 4, dtype=torch.long, device=cache_pos.device), threshold)
        vn = _unit_values(cache_v)
        similar = (vn @ vn.transpose(-1, -2) >= threshold).tril_(-1) & ok[..., :, None] & ok[..., None, :]
        return cls(torch.nonzero(similar), threshold)

    def add_candidates(self, cand_v: torch.Tensor, cand_pos: torch.Tensor, g: int) -> None:
        """Add the pairs of the new candidates in slots g.. (cand_v [B,Hs,G+N,d], cand_pos [B,Hs,G+N]) with every
        slot before them."""
        n = cand_pos.shape[-1] - g
        if n <= 0:
            return
        vn = _unit_values(cand_v)
        new = torch.nonzero(vn[:, :, g:] @ vn.transpose(-1, -2) >= self.threshold)       # of [B,Hs,N,G+N]
        new[:, 2] += g
        b, hs, i, j = new.unbind(1)  # few rows (each new slot is similar to itself): filter them, not the matrix
        new = new[(j < i) & (cand_pos[b, hs, i] >= 0) & (cand_pos[b, hs, j] >= 0)]
        self.pairs = torch.cat([self.pairs, new])

    def demote(self, score: torch.Tensor, cand_pos: torch.Tensor) -> torch.Tensor:
        """:func:`demote_duplicates` of ``score`` [B,Hs,G+N] (SRE, -inf = not a candidate) from the pairs: of each
        similar pair the worse (lower score; equal score and later position) is a duplicate."""
        b, hs, i, j = self.pairs.unbind(1)
        si, sj = score[b, hs, i], score[b, hs, j]
        i_worse = (si < sj) | ((si == sj) & (cand_pos[b, hs, i] > cand_pos[b, hs, j]))
        dup = torch.zeros_like(score, dtype=torch.bool)
        dup[b, hs, torch.where(i_worse, i, j)] = True
        return _ranked_last(score, dup)

    def follow_selection(self, kept: torch.Tensor, free: torch.Tensor, src: torch.Tensor) -> None:
        """After :func:`select_and_fold`: keep the pairs of kept slots (kept [B,Hs,G+N] bool) and rename slot
        src[k] to free[k] (the moves, [B,Hs,K])."""
        b, hs, i, j = self.pairs.unbind(1)
        stay = kept[b, hs, i] & kept[b, hs, j]
        rename = torch.arange(kept.shape[-1], device=kept.device).expand(kept.shape).clone()
        rename.scatter_(-1, src, free)
        p = self.pairs[stay]
        b, hs = p[:, 0], p[:, 1]
        self.pairs = torch.stack([b, hs, rename[b, hs, p[:, 2]], rename[b, hs, p[:, 3]]], dim=1)

    def rows(self, rows: torch.Tensor, batch: int) -> "DuplicatePairs":
        """The pairs of batch rows ``rows`` [B'] as a batch of B' rows (for an update of some rows only)."""
        index = torch.full((batch,), -1, dtype=torch.long, device=rows.device)
        index[rows] = torch.arange(rows.shape[0], device=rows.device)
        p = self.pairs[index[self.pairs[:, 0]] >= 0].clone()
        p[:, 0] = index[p[:, 0]]
        return DuplicatePairs(p, self.threshold)

    def put_rows(self, rows: torch.Tensor, part: "DuplicatePairs", batch: int) -> None:
        """Replace the pairs of batch rows ``rows`` by ``part`` (a :meth:`rows` result, updated)."""
        mine = torch.zeros(batch, dtype=torch.bool, device=rows.device)
        mine[rows] = True
        p = part.pairs.clone()
        p[:, 0] = rows[p[:, 0]]
        self.pairs = torch.cat([self.pairs[~mine[self.pairs[:, 0]]], p])


def lola_kernels_for(x: torch.Tensor, backend: str = "auto", head_dim: int = 0, feature_width: int = 0):
    """The Triton LoLA kernels (module ``lola_kernels.lola``) when they should run for tensors like ``x``, else
    None (the PyTorch path). ``backend`` is ``attention.backend``: 'auto' uses them for CUDA tensors when
    lola_kernels imports and takes these widths; 'chunked'/'reference' never; 'triton' always (an error if
    lola_kernels is missing; the kernels themselves refuse CPU tensors outside Triton's interpreter). Under 'auto'
    the kernels are first checked against the PyTorch functions (lola_kernels.guard.lola_kernels_ok).
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
    if backend == "auto":
        if not kernels.supports(head_dim, feature_width):
            return None
        from lola_kernels.guard import lola_kernels_ok  # self-check once per device and widths; warns on failure
        if not lola_kernels_ok(kernels, x.device, head_dim, feature_width):
            return None
    return kernels


def select_and_fold(cand_k, cand_v, cand_pos, cand_fk, h_state, s_state, *, global_size: int,
                    gqa_selection: str = "query_head", eps: float = 1e-6, backend: str = "auto",
                    fold_weight: torch.Tensor | None = None, dedup: float = 0.0,
                    pinned: torch.Tensor | None = None, duplicates: DuplicatePairs | None = None) -> None:
    """One cache update (spec 4.2 'update', 4.5), in place.

    The candidates are the cache (the first G = global_size slots) followed by N pairs leaving the window:
    cand_k [B,Hs,G+N,dk] (any width: only moved), cand_v [B,Hs,G+N,d], cand_pos [B,Hs,G+N] (position, -1 = empty
    slot or not a candidate), cand_fk [B,H,G+N,D] float32 (phi_k per query head). All are scored by self-recall
    error under (h_state [B,H,D,d], s_state [B,H,D], float32); the top G are kept, the rest folded into h_state,
    s_state. Afterwards the cache is the first G slots again: each kept new pair has moved into the slot of a
    dropped one (only <= N rows move).
    ``backend`` (attention.backend) picks the Triton kernels for the scores and the fold (:func:`lola_kernels_for`).
    ``fold_weight`` [B,H,G+N] (decay: gamma^(u - position)) multiplies phi_k of the pairs that are folded; the
    scores use the unweighted phi_k. ``dedup`` > 0: candidates whose value nearly copies a better candidate's are
    ranked last (:func:`demote_duplicates`; with ``duplicates``, the pairs of the cache carried from the call's
    previous update, from :class:`DuplicatePairs`, which this update then keeps current). ``pinned`` [B,Hs,G+N]
    bool (a diagnostic): those candidates rank before all others.
    """
    heads, hs = h_state.shape[1], cand_k.shape[1]
    groups, g, n = heads // hs, global_size, cand_pos.shape[-1] - global_size
    valid = cand_pos >= 0
    kernels = lola_kernels_for(cand_fk, backend, cand_v.shape[-1], h_state.shape[-2])
    if g > 0:
        if kernels is not None:
            sre = kernels.self_recall_error_triton(cand_fk, cand_v, h_state, s_state, eps)
        else:
            sre = self_recall_error(cand_fk, cand_v, h_state, s_state, eps)
        score = group_scores(sre, groups, gqa_selection).masked_fill(~valid, float("-inf"))
        if dedup > 0 and duplicates is not None:
            duplicates.add_candidates(cand_v, cand_pos, g)
            score = duplicates.demote(score, cand_pos)
        elif dedup > 0:
            score = demote_duplicates(score, cand_v, cand_pos, dedup)
        if pinned is not None:
            score = torch.where(pinned & valid, float("inf"), score)
        order = score.argsort(dim=-1, descending=True)                    # [B,Hs,G+N]
    else:
        order = torch.arange(g + n, device=cand_pos.device).expand(cand_pos.shape)
    keep, drop = order[..., :g], order[..., g:]
    fk_fold = cand_fk if fold_weight is None else cand_fk * fold_weight.unsqueeze(-1)
    if kernels is not None:
        fold = valid & ~torch.zeros_like(valid).scatter_(-1, keep, True)
        kernels.fold_triton(fk_fold.contiguous(), cand_v, fold, h_state, s_state)
    else:  # only the N dropped candidates enter the matmul
        fk_drop = take_rows(fk_fold, drop) * valid.gather(-1, drop).unsqueeze(-1).repeat_interleave(groups, 1)
        h_state += grouped_matmul(fk_drop.transpose(-1, -2), take_rows(cand_v, drop).float())
        s_state += fk_drop.sum(2)
    if g == 0 or n == 0:
        return
    kept = torch.zeros_like(valid).scatter_(-1, keep, True)
    moves = kept[..., g:]                                                 # kept new pairs; as many as free slots
    most = min(g, n)
    free = (~kept[..., :g]).to(torch.uint8).argsort(dim=-1, descending=True, stable=True)[..., :most]
    moved = moves.to(torch.uint8).argsort(dim=-1, descending=True, stable=True)[..., :most] + g
    src = torch.where(torch.arange(most, device=moves.device) < moves.sum(-1, keepdim=True), moved, free)
    for t in (cand_k, cand_v, cand_fk):  # row free[i] <- row src[i] (src = free: a kept slot copied onto itself)
        put_rows(t, free, take_rows(t, src))
    cand_pos.scatter_(-1, free, cand_pos.gather(-1, src))
    if dedup > 0 and duplicates is not None:
        duplicates.follow_selection(kept, free, src)


def _head_index(index: torch.Tensor, h: int) -> torch.Tensor:
    return index if index.shape[1] == h else index.repeat_interleave(h // index.shape[1], dim=1)


def take_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B,h,N,w], index [B,hi,X] (hi divides h: head j uses index head j // (h / hi)) -> [B,h,X,w] with
    out[b, j, i] = x[b, j, index[b, j', i]]. Whole rows are copied (index_select on a contiguous x), far faster
    on CPU than an element-wise gather."""
    b, h, n, w = x.shape
    index = _head_index(index, h)
    if not x.is_contiguous():
        return x[torch.arange(b, device=x.device)[:, None, None], torch.arange(h, device=x.device)[:, None], index]
    flat = (index + torch.arange(b * h, device=x.device).view(b, h, 1) * n).flatten()
    return x.view(b * h * n, w).index_select(0, flat).view(b, h, -1, w)


def put_rows(x: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> None:
    """In place: x[b, j, index[b, j', i]] = rows[b, j, i], the inverse of :func:`take_rows` (x may be a view)."""
    b, h, n, w = x.shape
    index = _head_index(index, h)
    if not x.is_contiguous():
        x[torch.arange(b, device=x.device)[:, None, None], torch.arange(h, device=x.device)[:, None], index] = rows
        return
    flat = (index + torch.arange(b * h, device=x.device).view(b, h, 1) * n).flatten()
    x.view(b * h * n, w).index_copy_(0, flat, rows.reshape(-1, w).to(x.dtype))


# ---- fusion ------------------------------------------------------------------------------------------------

HIDDEN = 1e30
"""Additive bias of a key outside the softmax set, so that a row max sees only visible keys (an add is far cheaper
than a masked fill on CPU)."""
EXP_FLOOR = -80.0
"""Exponents are clamped here before exp: e^{-80} ~ 2e-35 is still a normal float32, while smaller results are
denormals that make exp ~10x slower on CPU. Next to the row max's term e^0 = 1 the difference is far below
float32 resolution."""


def hide(logits: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [..., Lq, M] with invisible keys (mask False; the mask broadcasts) pushed to about -1e30, in
    place; the mask as float 0/1)."""
    visible = mask.float()
    return logits.add_((visible - 1.0) * HIDDEN), visible


def visible_max(hidden_logits: torch.Tensor) -> torch.Tensor:
    """Row max [..., Lq, 1] over the visible keys of :func:`hide`'s output; 0 for a row with none."""
    m = hidden_logits.amax(-1, keepdim=True)
    return torch.where(m > -HIDDEN / 2, m, torch.zeros_like(m))


def exp_weights(hidden_logits: torch.Tensor, visible: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """e^{s_ij - m_i} of the visible keys j, 0 elsewhere, from :func:`hide`'s output (overwritten in place)."""
    return hidden_logits.sub_(m).clamp_(min=EXP_FLOOR).exp_().mul_(visible)


def exp_sums(hidden_logits: torch.Tensor, visible: torch.Tensor, m: torch.Tensor, v: torch.Tensor):
    """(sum_j e^{s_ij - m_i} v_j [B,H,Lq,d], sum_j e^{s_ij - m_i} [B,H,Lq,1]) over the visible keys j, from
    :func:`hide`'s output (logits [B,H,Lq,M], overwritten; visible 0/1); v [B,Hv,M,d] (Hv divides H)."""
    w = exp_weights(hidden_logits, visible, m)
    return grouped_matmul(w, v.float()), w.sum(-1, keepdim=True)


def mix_scales(m, sigma, ell, *, mixing: str = "lolcats", eps: float = 1e-6):
    """(soft_scale, lin_scale, floor) of the fusion: y = (soft_scale soft_num + lin_scale lin_num) / (soft_scale
    soft_den + lin_scale lin_den + floor) for the parts of :func:`mix`; m [B,H,Lq,1]; floor None for 'lolcats'
    (its rows with nothing visible give 0)."""
    sig, el = sigma.float().view(-1, 1, 1), ell.float().view(-1, 1, 1)
    if mixing == "lolcats":
        return sig, el, None
    if mixing == "lola_code":  # multiply numerator and denominator by e^{-c}, c = max(m, 0): no overflow
        c = m.clamp_min(0.0)
        lin_scale = torch.exp(-c)
        return sig * torch.exp(m - c), el * lin_scale, eps * lin_scale
    raise ValueError(f"lola_cache.mixing={mixing!r} is not valid; choose one of {', '.join(MIXINGS)}")


def mix(m, soft_num, soft_den, lin_num, lin_den, sigma, ell, *, mixing: str = "lolcats", eps: float = 1e-6):
    """The fusion of the module docstring from its parts: m [B,H,Lq,1] the row max of the softmax set (0 if it is
    empty), soft_num [B,H,Lq,d] / soft_den [B,H,Lq,1] = sum_J e^{s-m} v / sum_J e^{s-m}, lin_num [B,H,Lq,d] /
    lin_den [B,H,Lq,1] = sum_Lin fq.fk v / sum_Lin fq.fk; sigma, ell [H]. Returns y float32; 'lolcats' rows with
    nothing visible give 0."""
    soft_scale, lin_scale, floor = mix_scales(m, sigma, ell, mixing=mixing, eps=eps)
    num = soft_scale * soft_num + lin_scale * lin_num
    return num / mix_denominator(soft_scale * soft_den + lin_scale * lin_den, floor)


def mix_denominator(den, floor):
    """The fusion's divisor from the scaled sums ``den``: den + floor ('lola_code'), or den where it is > 0 and 1
    elsewhere ('lolcats', floor None: rows with nothing visible give 0)."""
    return torch.where(den > 0, den, torch.ones_like(den)) if floor is None else den + floor


def fuse(soft_logits, soft_mask, soft_v, lin_num, lin_den, sigma, ell, *, mixing: str = "lolcats",
         eps: float = 1e-6) -> torch.Tensor:
    """One block of softmax keys fused with given linear terms.

    soft_logits, soft_mask [B,H,Lq,M] (scaled logits; the mask broadcasts), soft_v [B,Hv,M,d] (Hv divides H);
    lin_num [B,H,Lq,d], lin_den [B,H,Lq]; sigma, ell [H]. Returns y [B,H,Lq,d] float32.
    """
    t, visible = hide(soft_logits.float().clone(), soft_mask)
    m = visible_max(t)
    num, den = exp_sums(t, visible, m, soft_v)
    return mix(m, num, den, lin_num, lin_den.unsqueeze(-1), sigma, ell, mixing=mixing, eps=eps)


def _softmax_logits(q, k, mask, cache_k, cache_ok, cache_weight):
    """The softmax set of :func:`lola_attend`: (local logits [S,H,Lq,M] and visible 0/1 from :func:`hide`, cache
    logits [S,Hs,(H/Hs) Lq,G] and their visible 0/1 (None without a cache), the row max m [S,H,Lq,1] over both, 0
    for a row with nothing visible)."""
    s, h, lq, d = q.shape
    qf = q.float() / math.sqrt(d)                                                              # scaled once
    local, visible = hide(grouped_matmul(qf, k.float().transpose(-1, -2)), mask)                 # [S,H,Lq,M]
    m = local.amax(-1, keepdim=True)
    cached = c_visible = None
    if cache_k is not None:  # the cache block per storage head: [S,Hs,(H/Hs) Lq,G]
        hs = cache_k.shape[1]
        logits = qf.reshape(s, hs, -1, d) @ cache_k.float().transpose(-1, -2)
        if cache_weight != 1.0:
            logits += math.log(cache_weight)
        cached, c_visible = hide(logits, cache_ok.unsqueeze(2))
        m = torch.maximum(m, cached.amax(-1, keepdim=True).view(s, h, lq, 1))
    m = torch.where(m > -HIDDEN / 2, m, torch.zeros_like(m))
    return local, visible, cached, c_visible, m


def lola_attend(q, k, v, mask, fq, h_state, s_state, sigma, ell, *, mixing: str = "lolcats", eps: float = 1e-6,
                lin_num=None, lin_den=None, cache_k=None, cache_v=None, cache_ok=None,
                cache_weight: float = 1.0) -> torch.Tensor:
    """Attention of S independent segments against their memories (the PyTorch twin of ``lola_kernels.lola.
    lola_attend_triton``, same arguments).

    q [S,H,Lq,d]; local softmax keys k, v [S,Hk,M,d] (sinks and recent pairs, per KV head) with mask [S,1 or H,
    Lq,M]; optional cache keys cache_k, cache_v [S,Hs,G,d] with cache_ok [S,Hs,G] (Hk and Hs divide H);
    fq [S,H,Lq,D]; the linear state h_state [S,H,D,d], s_state [S,H,D] float32 plus optional extra linear terms
    lin_num [S,H,Lq,d], lin_den [S,H,Lq] (recent pairs out of the window, not yet scored); ``cache_weight`` w
    multiplies the cache keys' softmax weights (logits + log w; ``lola_cache.cache_weight``). Returns y [S,H,Lq,d]
    float32 = the fusion over J = (visible local keys) u (valid cache keys).
    """
    s, h, lq, d = q.shape
    local, visible, cached, c_visible, m = _softmax_logits(q, k, mask, cache_k, cache_ok, cache_weight)
    num, den = exp_sums(local, visible, m, v)
    if cache_k is not None:
        c_num, c_den = exp_sums(cached, c_visible, m.view(s, cache_k.shape[1], -1, 1), cache_v)
        num, den = num + c_num.view(s, h, lq, d), den + c_den.view(s, h, lq, 1)
    fq = fq.float()
    l_num, l_den = fq @ h_state, fq @ s_state.unsqueeze(-1)
    if lin_num is not None:
        l_num, l_den = l_num + lin_num, l_den + lin_den.unsqueeze(-1)
    return mix(m, num, den, l_num, l_den, sigma, ell, mixing=mixing, eps=eps)


def fusion_weights(q, k, mask, fq, s_state, sigma, ell, *, mixing: str = "lolcats", eps: float = 1e-6,
                   lin_den=None, cache_k=None, cache_ok=None, cache_weight: float = 1.0):
    """Diagnostic: the share of each term in :func:`lola_attend`'s output for the same arguments (values and H are
    not needed). Returns (local [S,H,Lq,M], cache [S,H,Lq,G] or None, linear [S,H,Lq]) float32: the weight of
    each visible local and cache key, and of the linear memory as a whole (state and extra linear terms), in the
    fusion's normalisation, so that ``lola_attend`` = local @ v + cache @ cache_v + linear * (linear numerator /
    linear denominator). They sum to 1 per query up to the ``lola_code`` eps term (0 for a 'lolcats' row with
    nothing visible)."""
    s, h, lq, d = q.shape
    local, visible, cached, c_visible, m = _softmax_logits(q, k, mask, cache_k, cache_ok, cache_weight)
    soft_scale, lin_scale, floor = mix_scales(m, sigma, ell, mixing=mixing, eps=eps)
    w_local = soft_scale * exp_weights(local, visible, m)
    w_cache = None
    if cached is not None:
        w_cache = soft_scale * exp_weights(cached, c_visible, m.view(s, cache_k.shape[1], -1, 1)).view(s, h, lq, -1)
    l_den = fq.float() @ s_state.unsqueeze(-1)
    if lin_den is not None:
        l_den = l_den + lin_den.unsqueeze(-1)
    w_linear = lin_scale * l_den
    den = w_local.sum(-1, keepdim=True) + w_linear
    if w_cache is not None:
        den = den + w_cache.sum(-1, keepdim=True)
    den = mix_denominator(den, floor)
    return w_local / den, None if w_cache is None else w_cache / den, (w_linear / den).squeeze(-1)


# ---- quadratic reference -----------------------------------------------------------------------------------

def lola_reference(q, k, v, fq, fk, sigma, ell, *, window: int, global_size: int, chunk_size: int | None = None,
                   update_positions=None, window_mode: str = "sliding", mixing: str = "lolcats",
                   gqa_selection: str = "query_head", key_mask: torch.Tensor | None = None, sink_tokens: int = 0,
                   decay: torch.Tensor | None = None, dedup: float = 0.0, cache_weight: float = 1.0,
                   eps: float = 1e-6):
    """Quadratic LoLA over one call (a test oracle; O(L^2) memory per row).

    q [B,H,L,d], k, v [B,Hk,L,d] (Hk divides H), fq [B,H,L,D], fk [B,H,L,D] (phi_k of the keys, per query head),
    key_mask [B,L] (True = real token). Each row's real tokens are taken out of the padding and numbered 0, 1, ...;
    the cache is updated before real query u for every u in ``update_positions`` (default: the multiples of
    ``chunk_size``). 'tk' aligns its blocks to the row's number of real tokens. ``decay`` gamma [H] weighs the
    linear term of query r and key j by gamma^(r - j), and the state scored at update u by gamma^(u - j).
    ``dedup`` > 0: a candidate whose value is that cosine-similar to a better-scored candidate's is ranked after all
    others (``lola_cache.dedup``). ``cache_weight`` w: the softmax weight of a pair in the sparse cache is w e^s.
    Returns (y [B,H,L,d] float32, 0 at padding; cached [B,H,L] bool: in the sparse cache after the last update).
    """
    b, h, length, d = q.shape
    groups = h // k.shape[1]
    valid = torch.ones(b, length, dtype=torch.bool, device=q.device) if key_mask is None else key_mask.bool()
    y = torch.zeros(b, h, length, d, device=q.device)
    cached_out = torch.zeros(b, h, length, dtype=torch.bool, device=q.device)
    for row in range(b):
        idx = torch.nonzero(valid[row]).flatten()
        n = idx.numel()
        if n == 0:
            continue
        qr, fqr, fkr = q[row][:, idx].float(), fq[row][:, idx].float(), fk[row][:, idx].float()
        kr, vr = expand_heads(k[row:row + 1], h)[0][:, idx].float(), expand_heads(v[row:row + 1], h)[0][:, idx].float()
        updates = range(chunk_size, n, chunk_size) if update_positions is None else update_positions
        yr, cached = _reference_row(qr, kr, vr, fqr, fkr, sigma, ell, window=window, global_size=global_size,
                                    updates=updates, window_mode=window_mode, mixing=mixing, groups=groups,
                                    gqa_selection=gqa_selection, sink_tokens=sink_tokens, decay=decay,
                                    dedup=dedup, cache_weight=cache_weight, eps=eps)
        y[row][:, idx] = yr
        cached_out[row][:, idx] = cached
    return y, cached_out


def _reference_row(q, k, v, fq, fk, sigma, ell, *, window, global_size, updates, window_mode, mixing, groups,
                   gqa_selection, sink_tokens, decay, dedup, cache_weight, eps):
    """One row's real tokens: q, k, v [H,n,d], fq, fk [H,n,D]. Returns (y [H,n,d], cached [H,n])."""
    h, n, d = q.shape
    pos = torch.arange(n, device=q.device)

    def aged(distance):  # gamma^distance [H, ...] (1 without decay)
        if decay is None:
            return torch.ones((h,) + distance.shape, device=q.device)
        return decay_weights(decay, distance)

    sink = pos < sink_tokens                                                   # [n]
    cached = torch.zeros(h, n, dtype=torch.bool, device=q.device)
    folded = torch.zeros_like(cached)
    cached_for_query = torch.zeros(h, n, n, dtype=torch.bool, device=q.device)  # [H,query,key]
    bounds = sorted(set(int(u) for u in updates if 0 < u < n)) + [n]
    for u, nxt in zip([0] + bounds[:-1], bounds):
        if u > 0:  # the update before query u
            candidates = (cached | (pos < evict_before(u, window_mode, window))) & ~folded & ~sink
            weight = folded * aged(u - pos)                                    # [H,n]: gamma^(u - j) if folded
            h_state = torch.einsum("hlD,hld->hDd", fk * weight[..., None], v)
            s_state = (fk * weight[..., None]).sum(1)
            sre = self_recall_error(fk[None], v[None], h_state[None], s_state[None], eps)
            score = expand_heads(group_scores(sre, groups, gqa_selection), h)[0]
            score = score.masked_fill(~candidates, float("-inf"))
            if dedup > 0:  # i is a duplicate if a candidate j with a similar value scores above it (or ties, earlier)
                vn = torch.nn.functional.normalize(v, dim=-1, eps=1e-12)
                similar = vn @ vn.transpose(-1, -2) >= dedup                          # [H,i,j]
                si, sj = score[:, :, None], score[:, None, :]
                better = (sj > si) | ((sj == si) & (pos[None, None, :] < pos[None, :, None]))
                dup = (similar & better & candidates[:, None, :]).any(-1) & candidates
                score = torch.where(dup, -1.0 / (1.0 + score), score)
            kept = torch.zeros_like(cached)
            if global_size > 0:
                kept.scatter_(-1, score.topk(min(global_size, n), dim=-1).indices, True)
            cached = kept & candidates
            folded = folded | (candidates & ~cached)
        cached_for_query[:, u:nxt] = cached[:, None, :]

    causal = pos[None, :] <= pos[:, None]                                       # [query, key]
    local = in_window(pos, pos, window_mode, window, n) | sink[None, :]          # window and sinks [query, key]
    soft = (local | cached_for_query) & causal
    lin = causal & ~soft
    s = (q @ k.transpose(-1, -2)) / math.sqrt(d)
    s = s + math.log(cache_weight) * (cached_for_query & ~local)                # w e^s for the sparse cache's pairs
    phi = (fq @ fk.transpose(-1, -2)) * lin * aged(pos[:, None] - pos[None, :])
    sig, el = sigma.float().view(-1, 1, 1), ell.float().view(-1, 1, 1)
    if mixing == "lolcats":
        m = s.masked_fill(~soft, float("-inf")).amax(-1, keepdim=True)
        m = m.masked_fill(torch.isinf(m), 0.0)
        a = sig * torch.exp(s.masked_fill(~soft, float("-inf")) - m) + el * phi
        den = a.sum(-1, keepdim=True)
        y = (a @ v) / torch.where(den > 0, den, torch.ones_like(den))
    else:  # 'lola_code', unstabilised (tests use moderate logits)
        a = sig * torch.exp(s.masked_fill(~soft, float("-inf"))) + el * phi
        y = (a @ v) / (a.sum(-1, keepdim=True) + eps)
    return y, cached
