"""LoLA sparse caching as a transformers ``Cache``: constant memory per sequence (spec 4).

Per layer (:class:`LolaLayer`) and per sequence it holds, at fixed sizes once allocated (positions count each
row's real tokens, see ``lola_ops``; padding is never stored):

    recent_k, recent_v [B,Hk,R,d]  model dtype  the last R real tokens of the row: the softmax window plus pairs
                                                that left it and wait for the next cache update (R = W-1+C
                                                'sliding', 2W-1+C 'tk'/'chunk'); stored once per KV head
    sink_k, sink_v     [B,Hk,S,d]  model dtype  the first S real tokens (attention.sink_tokens; S = 0: empty)
    cache_k, cache_v   [B,Hs,G,d]  model dtype  the sparse global cache; Hs = H (per query head, as LoLA) or Hk
                                                ('kv_mean'/'kv_max' GQA-aware selection)
    cache_pos          [B,Hs,G]    int32        real position of each cached pair, -1 = empty slot
    h_state            [B,H,D,d]   float32      H = sum phi_k(k) v^T over folded pairs (per query head)
    s_state            [B,H,D]     float32      s = sum phi_k(k)
    real_seen          [B]         int64        real tokens of the row so far
    first_live         [B]         int64        recent pairs before this position have left the buffer
    state_at           [B]         int64        real position of the last update: with a trained linear decay,
                                                (H, s) hold gamma^(state_at - j)-weighted sums (lola_ops)

With ``dedup`` > 0 the layer also carries ``cache_pairs`` (:class:`lola_ops.DuplicatePairs`): which cached values
nearly copy each other, derived from cache_v and kept current by each update, so that an update computes only its
new candidates' similarities. It is derived data (a few index rows), not state: it is rebuilt from cache_v after
any batch reordering.

phi_k(k) is recomputed from the raw keys when needed (scoring, the recent pairs outside the window), never
stored. A model with ``attention.feature_map_rope: false`` (feature maps of the unrotated keys) keeps both keys in
recent_k and cache_k, [k | k_map] [..., 2d] (:func:`softmax_part` / :func:`map_part`). The math lives in
``lola_ops``; this file does the bookkeeping.

How it is switched on (no custom generate code):

* at generate/forward time: ``model.generate(ids, past_key_values=LolaCache(model.config, window=64,
  global_size=256))`` (or ``cache=``);
* at load time: ``model.config.lola_cache = {...}`` (a :class:`LolaCacheConfig` as a dict; ``lola_train.lola.
  enable_lola_cache`` sets it, exported checkpoints carry it in config.json). Then whenever transformers creates
  its default ``DynamicCache`` (``generate()``, or a forward with ``use_cache=True``), each HybridAttention layer
  of a model in eval mode replaces its still-empty ``DynamicLayer`` inside that cache by a :class:`LolaLayer`
  on first use. A forward in training mode, or with ``use_cache=False``, computes the plain hybrid layer.

Why not ``config.layer_types = ['lola', ...]``: transformers 5.24 validates layer_types against a fixed list
when a config is built, saved or loaded, so such a config could not round-trip through config.json.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache, DynamicLayer

from .attention_config import AttentionConfig, ConfigError, check_choice, check_positive, from_mapping
from .hybrid_ops import MIXINGS, decay_weights, mixing_weights
from .lola_ops import (GQA_SELECTIONS, MEMORIES, WINDOW_MODES, DuplicatePairs, evict_before, expand_heads,
                       fusion_weights, grouped_matmul, in_window, lola_attend, lola_kernels_for, recent_capacity,
                       select_and_fold, take_rows)


@dataclass
class LolaCacheConfig:
    """Settings of the LoLA cache (recipe section ``lola_cache``; spec 4, 9.2-9.5).

    window:        softmax window W in tokens; None = the model's trained ``attention.window_size``.
    global_size:   G (lambda), pairs kept in the sparse global cache per storage head; 0 = plain hybrid model.
    chunk_size:    C, prefill chunk and cache-update period in tokens; None = the window (as the LoLA code).
    window_mode:   'auto' (the trained layout: 'sliding' for sw models, 'tk' for tk models), 'sliding'
                   (exactly the W most recent pairs), 'tk' (end-aligned terrace, 2W most recent when decoding)
                   or 'chunk' (the LoLA code's start-aligned C..2C window).
    update_every:  'chunk' (update at every multiple of C, prefill and decode alike: decode == prefill; the LoLA
                   code) or 'token' (decode updates after every generated token, as the paper describes;
                   prefill still updates per chunk).
    mixing:        'auto' (the model's trained ``attention.mixing``), 'lolcats' (max over the softmax set, linear
                   terms never shifted) or 'lola_code' (the LoLA reference code's g : (1-g) fusion, softmax terms
                   unshifted). An explicit choice takes its weights from ``hybrid_ops.mixing_weights``.
    gqa_selection: 'query_head' (one selection per query head, as LoLA; cache stored per query head), 'kv_mean'
                   / 'kv_max' (one selection per KV head by mean / max SRE over its query heads; stored once).
    dedup:         0 (off, as LoLA) or a cosine threshold in (0, 1]: at each update a candidate whose value is at
                   least that similar to a better-scored candidate's is ranked after all others, so the cache does
                   not fill with near-copies of one value (lola_ops.demote_duplicates).
    cache_weight:  w > 0 multiplies the softmax weight e^s of every sparse-cache pair (a logit offset of log w;
                   the window and the sinks keep the trained weights). 1 (default) = the trained fusion, which never
                   saw a far pair in its softmax set. Ours: a model trained with a window only can under-weight the
                   cached pairs against the linear memory; BENCHMARKS.md ("Long-context fidelity") measures what
                   w trades (retrieval for perplexity).
    eps:           epsilon of the self-recall error and of the 'lola_code' denominator.
    """

    window: Optional[int] = None
    global_size: int = 256
    chunk_size: Optional[int] = None
    window_mode: str = "auto"
    update_every: str = "chunk"
    mixing: str = "auto"
    gqa_selection: str = "query_head"
    dedup: float = 0.0
    cache_weight: float = 1.0
    eps: float = 1e-6

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, prefix: str = "lola_cache.") -> "LolaCacheConfig":
        for name in ("window", "chunk_size"):
            if getattr(self, name) is not None:
                check_positive(prefix + name, getattr(self, name))
        if not isinstance(self.global_size, int) or isinstance(self.global_size, bool) or self.global_size < 0:
            raise ConfigError(f"{prefix}global_size={self.global_size!r} is not valid; it must be an integer >= 0 "
                              "(0 = no sparse cache, the plain hybrid model)")
        check_choice(prefix + "window_mode", self.window_mode, ("auto",) + WINDOW_MODES)
        check_choice(prefix + "update_every", self.update_every, ("chunk", "token"))
        check_choice(prefix + "mixing", self.mixing, ("auto",) + MIXINGS)
        check_choice(prefix + "gqa_selection", self.gqa_selection, GQA_SELECTIONS)
        if isinstance(self.dedup, bool) or not isinstance(self.dedup, (int, float)) or not 0 <= self.dedup <= 1:
            raise ConfigError(f"{prefix}dedup={self.dedup!r} is not valid; it must be 0 (off) or a cosine "
                              "similarity threshold in (0, 1], e.g. 0.98")
        if (isinstance(self.cache_weight, bool) or not isinstance(self.cache_weight, (int, float))
                or not 0 < self.cache_weight < float("inf")):
            raise ConfigError(f"{prefix}cache_weight={self.cache_weight!r} is not valid; it must be a finite number "
                              "> 0 (1 = the trained fusion's weighting of the sparse cache)")
        if not isinstance(self.eps, (int, float)) or not self.eps > 0:
            raise ConfigError(f"{prefix}eps={self.eps!r} is not valid; it must be a number > 0 (default 1e-6)")
        return self

    def resolve(self, attention: AttentionConfig) -> "LolaCacheConfig":
        """A copy with window, chunk_size, window_mode and mixing made concrete for a model with ``attention``."""
        window = self.window or attention.window_size
        mode = self.window_mode
        if mode == "auto":
            mode = "sliding" if attention.window_layout == "sw" else "tk"
        mixing = attention.mixing if self.mixing == "auto" else self.mixing
        return dataclasses.replace(self, window=window, chunk_size=self.chunk_size or window, window_mode=mode,
                                   mixing=mixing)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def coerce(cls, value: "LolaCacheConfig | Mapping[str, Any] | str | None") -> "LolaCacheConfig":
        """From a LolaCacheConfig, a mapping, None (defaults) or a spec string such as 'window=64 global=256'."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            return cls.from_spec(value)
        if isinstance(value, Mapping):
            return from_mapping(cls, value, "lola_cache.")
        raise ConfigError(f"lola_cache must be a LolaCacheConfig, a mapping or a 'key=value ...' string, got "
                          f"{type(value).__name__}")

    ALIASES = {"global": "global_size", "chunk": "chunk_size", "mode": "window_mode", "gqa": "gqa_selection",
               "weight": "cache_weight"}

    @classmethod
    def from_spec(cls, spec: str) -> "LolaCacheConfig":
        """Parse 'lola window=64 global=256 mixing=lola_code' (a leading 'lola' or 'cache=lola' is optional)."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for item in spec.split():
            if item in ("lola", "cache=lola"):
                continue
            if "=" not in item:
                raise ConfigError(f"lola cache spec item {item!r} is not key=value; example: "
                                  "'lola window=64 global=256'")
            key, raw = item.split("=", 1)
            key = cls.ALIASES.get(key, key)
            if key not in fields:
                raise ConfigError(f"unknown lola cache key {key!r}; valid keys: {', '.join(fields)} "
                                  f"(aliases: {', '.join(cls.ALIASES)})")
            if raw.lower() in ("none", "null"):
                values[key] = None
            elif key in ("eps", "dedup", "cache_weight"):
                try:
                    values[key] = float(raw)
                except ValueError:
                    raise ConfigError(f"lola cache {key}={raw!r} is not a number") from None
            elif key in ("window", "global_size", "chunk_size"):
                try:
                    values[key] = int(raw)
                except ValueError:
                    raise ConfigError(f"lola cache {key}={raw!r} is not an integer") from None
            else:
                values[key] = raw
        return cls(**values)


class _Call:
    """Where the pairs of one ``LolaLayer.attend`` call live, by real position (see lola_ops: positions count each
    row's real tokens). The keys of the call are addressed in ``ext = [recent buffer (R) ; new tokens (L) ; zero]``.

    r0, r1 [B]: real tokens of each row before / after the call; inv [B,L]: token index (in the call) of the row's
    k-th new real token, L where there is none; work: the candidate buffers of the call's cache updates
    (:meth:`LolaLayer._working`), allocated at its first update.
    """

    def __init__(self, r0: torch.Tensor, r1: torch.Tensor, inv: torch.Tensor, recent: int):
        self.r0, self.r1, self.inv, self.recent = r0, r1, inv, recent
        self.length = inv.shape[1]
        self.work: dict[str, torch.Tensor] | None = None
        self.duplicates: DuplicatePairs | None = None  # the cache's near-copy pairs (lola_cache.dedup > 0)

    def source(self, real: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """real positions [B',X] (rows ``rows`` of the batch, or all) -> index into ext; the zero slot R + L where
        the pair is not held (older than the recent buffer, or not seen yet)."""
        r0, r1, inv = self.r0, self.r1, self.inv
        if rows is not None:
            r0, r1, inv = r0.index_select(0, rows), r1.index_select(0, rows), inv.index_select(0, rows)
        rel = real - r0[:, None]
        zero = self.recent + self.length
        new = self.recent + inv.gather(1, rel.clamp(0, self.length - 1))
        old = rel + self.recent
        return torch.where(rel < 0, torch.where(old >= 0, old, zero), torch.where(real < r1[:, None], new, zero))


def softmax_part(x: torch.Tensor, d: int) -> torch.Tensor:
    """The rotated q / k of a stored [..., d] or [x | x_map] [..., 2d] tensor (what the softmax terms read)."""
    return x if x.shape[-1] == d else x[..., :d]


def map_part(x: torch.Tensor, d: int) -> torch.Tensor:
    """What the feature maps read: x itself, or x_map of [x | x_map]."""
    return x if x.shape[-1] == d else x[..., d:]


def _take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B,h,E,w], index [B,X] -> x[b, :, index[b]] [B,h,X,w]."""
    return take_rows(x, index[:, None])


def _segments(x: torch.Tensor, m: int) -> torch.Tensor:
    """[B,h,M*X,w] -> [M*B,h,X,w]: one batch entry per (segment, row)."""
    b, h, n, w = x.shape
    return x.view(b, h, m, n // m, w).permute(2, 0, 1, 3, 4).reshape(m * b, h, n // m, w)


def _rows_of_segments(x: torch.Tensor, m: int) -> torch.Tensor:
    """The inverse of :func:`_segments`: [M*B,h,X,w] -> [B,h,M*X,w]."""
    s, h, n, w = x.shape
    return x.view(m, s // m, h, n, w).permute(1, 2, 0, 3, 4).reshape(s // m, h, m * n, w)


class LolaLayer(CacheLayerMixin):
    """LoLA state of one decoder layer. Driven by ``HybridAttention`` through :meth:`attend`; it never stores
    the full keys, so the plain ``update(k, v)`` of transformers' KV caches is not available."""

    is_compileable = False
    is_croppable = False
    is_sliding = False

    SEGMENT_BLOCK_TOKENS = 512
    """Queries attended per batched step of a long call: bounds the memory of the per-chunk cache snapshots."""
    pinned: tuple[int, int] | None = None
    """Diagnostic (``lola_eval.passkey --pin-needle``): real positions [a, b) rank before every other candidate at
    each update, so they stay in the sparse cache (an oracle selection for them); None = plain selection."""
    probe: tuple[int, int, int] | None = None
    """Diagnostic (``lola_eval.passkey``): (query position p, a, b): when a batch-1 call attends the query at real
    position p, :meth:`probe_shares` of its fusion weights, with positions [a, b) counted as 'needle', are left in
    ``probe_result``."""
    PROBE_SHARES = ("sink", "recent", "needle", "cache", "linear")

    def __init__(self, settings: LolaCacheConfig | Mapping[str, Any] | None = None, **kwargs):
        super().__init__()
        self.settings = None if settings is None else LolaCacheConfig.coerce(settings)
        self._clear()

    def _clear(self) -> None:
        self.seen = 0            # tokens (padding included) of this sequence so far: transformers' position counter
        self.real_seen = None    # [B] real tokens per row so far: the next real position
        self.first_live = None   # [B] recent pairs before this real position have left the buffer (cache or H)
        self.state_at = None     # [B] real position the (decayed) linear state is referenced to: the last update
        self.recent_k = self.recent_v = None
        self.sink_k = self.sink_v = None
        self.cache_k = self.cache_v = self.cache_pos = None
        self.cache_pairs: DuplicatePairs | None = None  # near-copy pairs of the cache (dedup); None = derive anew
        self.h_state = self.s_state = None
        self.resolved: LolaCacheConfig | None = None
        self.sinks = 0
        self.is_initialized = False
        self.probe_result: dict[str, list[float]] | None = None

    # ---- transformers CacheLayerMixin API ------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Allocation needs the attention module (heads, feature width); it happens in :meth:`attend`."""

    def update(self, key_states, value_states, *args, **kwargs):
        raise RuntimeError("LolaLayer: this layer keeps LoLA memories, not a full KV cache; it is updated by "
                           "HybridAttention (lola_train.modeling). Use a DynamicCache for softmax attention.")

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """(kv_length, kv_offset) of the mask transformers builds for the next call: only the new tokens, at offset
        ``seen`` (as its sliding-window layers do). HybridAttention reads just their padding from it, so the mask
        stays [L, L] per call instead of growing to [L, context] (O(L^2) memory and time over a long prompt)."""
        return query_length, self.seen

    def get_max_length(self) -> int:
        return -1

    STATE = ("recent_k", "recent_v", "sink_k", "sink_v", "cache_k", "cache_v", "cache_pos", "h_state", "s_state",
             "real_seen", "first_live", "state_at")

    def tensors(self) -> dict[str, torch.Tensor]:
        return {n: getattr(self, n) for n in self.STATE if getattr(self, n) is not None}

    @property
    def batch_size(self) -> int:
        return self.h_state.shape[0] if self.is_initialized else -1

    def nbytes(self) -> int:
        """Bytes held by this layer's state tensors (all sequences of the batch)."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def reset(self) -> None:
        self._clear()

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove == 0:
            return
        raise ValueError("LolaLayer.crop: LoLA folds old tokens into its linear state, which cannot be undone, so "
                         "the cache cannot be cropped (assisted/speculative decoding needs a DynamicCache)")

    def _apply_batch(self, fn) -> None:
        for name, t in self.tensors().items():
            setattr(self, name, fn(t))
        self.cache_pairs = None  # derived from cache_v at the next update

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            self._apply_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._apply_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self._apply_batch(lambda t: t[indices])

    def offload(self) -> None:
        if self.is_initialized:
            self._apply_batch(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        if self.is_initialized and self.h_state.device != self.device:
            self._apply_batch(lambda t: t.to(self.device, non_blocking=True))

    # ---- LoLA ---------------------------------------------------------------------------------------------
    def _resolve(self, attn) -> LolaCacheConfig:
        if self.resolved is None:
            if self.settings is None:
                raise RuntimeError("LolaLayer has no settings: build it with LolaCache(config, ...) or set "
                                   "model.config.lola_cache (lola_train.lola.enable_lola_cache)")
            self.resolved = self.settings.resolve(attn.attention_config)
            self.sinks = attn.attention_config.sink_tokens
        return self.resolved

    def _allocate(self, attn, k: torch.Tensor) -> None:
        """k [B,Hk,L,dk]: dk = d, or 2d for [k | k_map] (recent and cache keys are stored at that width)."""
        cfg = self.resolved
        b, hk, _, dk = k.shape
        d = attn.head_dim
        h, dd = attn.num_heads, attn.feature_map_k.out_dim
        hs = h if cfg.gqa_selection == "query_head" else hk
        r = recent_capacity(cfg.window_mode, cfg.window, cfg.chunk_size)
        dev, dt = k.device, k.dtype
        self.device = dev
        self.recent_k = torch.zeros(b, hk, r, dk, dtype=dt, device=dev)
        self.recent_v = torch.zeros(b, hk, r, d, dtype=dt, device=dev)
        self.sink_k = torch.zeros(b, hk, self.sinks, d, dtype=dt, device=dev)
        self.sink_v = torch.zeros(b, hk, self.sinks, d, dtype=dt, device=dev)
        self.cache_k = torch.zeros(b, hs, cfg.global_size, dk, dtype=dt, device=dev)
        self.cache_v = torch.zeros(b, hs, cfg.global_size, d, dtype=dt, device=dev)
        self.cache_pos = torch.full((b, hs, cfg.global_size), -1, dtype=torch.int32, device=dev)
        self.h_state = torch.zeros(b, h, dd, d, dtype=torch.float32, device=dev)
        self.s_state = torch.zeros(b, h, dd, dtype=torch.float32, device=dev)
        self.real_seen = torch.zeros(b, dtype=torch.long, device=dev)
        self.first_live = torch.zeros(b, dtype=torch.long, device=dev)
        self.state_at = torch.zeros(b, dtype=torch.long, device=dev)
        self.is_initialized = True

    def recent_positions(self) -> torch.Tensor:
        """Real position of each recent slot [B,R] (negative = never filled); the slots at or after ``first_live``
        and at or after the sinks hold live pairs."""
        r = self.recent_k.shape[2]
        return self.real_seen[:, None] - r + torch.arange(r, device=self.real_seen.device)

    def memory_of(self, positions: torch.Tensor) -> torch.Tensor:
        """Which memory holds the pair of each real position now: positions [P] or [B,P] (counted in each row's
        real tokens: the token index for an unpadded row) -> int8 [B,H,P] with the codes of ``lola_ops.MEMORIES``
        (0 recent = softmax window or waiting for the next update, 1 sink, 2 sparse cache, 3 linear state (H, s));
        -1 for a position the row has not seen. Cache membership is per storage head, shown per query head."""
        if not self.is_initialized:
            raise RuntimeError("LolaLayer.memory_of: the layer has not seen any token yet")
        b, h = self.h_state.shape[:2]
        pos = positions.to(self.real_seen.device).long()
        pos = pos.expand(b, -1) if pos.dim() == 1 else pos
        cached = (self.cache_pos[..., None].long() == pos[:, None, None, :]).any(2)                # [B,Hs,P]
        code = torch.full((b, h, pos.shape[1]), MEMORIES.index("linear"), dtype=torch.int8, device=pos.device)
        code = code.masked_fill(expand_heads(cached, h), MEMORIES.index("cache"))
        code = code.masked_fill((pos >= self.first_live[:, None])[:, None], MEMORIES.index("recent"))
        code = code.masked_fill((pos < self.sinks)[:, None], MEMORIES.index("sink"))
        return code.masked_fill(((pos >= self.real_seen[:, None]) | (pos < 0))[:, None], -1)

    def attend(self, attn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               key_mask: torch.Tensor | None = None, q_map: torch.Tensor | None = None,
               k_map: torch.Tensor | None = None) -> torch.Tensor:
        """Consume L new tokens and return their attention output.

        attn: the HybridAttention module (feature maps, mixing factors, attention config); q [B,H,L,d],
        k, v [B,Hk,L,d] post-RoPE; key_mask [B,L] (True = real token) for the NEW tokens or None; q_map, k_map:
        what the feature maps read (the unrotated q, k of a model with attention.feature_map_rope false; needed
        there, ignored otherwise). Returns y [B,H,L,d] float32 (0 at padding).

        Two passes over the chunks of C real positions the call touches: (1) the cache updates in order (they
        depend only on keys, values and phi_k), keeping a snapshot of (cache, H, s) per chunk; (2) the attention of
        all queries at once, one batch entry per (row, chunk): sinks + recent pairs, the chunk's cache and state
        (:func:`lola_ops.lola_attend` or the Triton kernel). Long calls go in blocks of SEGMENT_BLOCK_TOKENS.
        """
        cfg = self._resolve(attn)
        if not attn.attention_config.feature_map_rope:  # carry both: [q | q_map], [k | k_map]
            if q_map is None or k_map is None:
                raise ValueError("LolaLayer.attend: this model's feature maps read the unrotated q, k "
                                 "(attention.feature_map_rope false); pass q_map and k_map")
            q, k = torch.cat([q, q_map.to(q.dtype)], dim=-1), torch.cat([k, k_map.to(k.dtype)], dim=-1)
        if not self.is_initialized:
            self._allocate(attn, k)
        b, h, length, _ = q.shape
        d = v.shape[-1]
        if k.shape[0] != self.recent_k.shape[0]:
            raise ValueError(f"LolaLayer: batch size {k.shape[0]} differs from the cache's "
                             f"{self.recent_k.shape[0]}; use a fresh cache (cache.reset()) for a new batch")
        dev = q.device
        if length == 1 and (key_mask is None or bool(key_mask.all())) and self._plain_step(cfg):
            return self._decode_step(attn, cfg, q, k, v)
        valid = torch.ones(b, length, dtype=torch.bool, device=dev) if key_mask is None else key_mask.bool()
        rank = valid.long().cumsum(1) - 1                                   # index among the call's real tokens
        r0 = self.real_seen
        r1 = r0 + rank[:, -1] + 1 if length else r0
        self.seen += length
        out = torch.zeros(b, h, length + 1, d, dtype=torch.float32, device=dev)    # last column: padding sink
        if length == 0 or not bool((r1 > r0).any()):
            return out[:, :, :length]
        inv = torch.full((b, length + 1), length, dtype=torch.long, device=dev)
        inv.scatter_(1, torch.where(valid, rank, length), torch.arange(length, device=dev).expand(b, -1))
        r = self.recent_k.shape[2]
        call = _Call(r0, r1, inv[:, :length], r)
        ext_k = torch.cat([self.recent_k, k.to(self.recent_k.dtype), self.recent_k.new_zeros(b, k.shape[1], 1,
                                                                                             k.shape[-1])], dim=2)
        ext_v = torch.cat([self.recent_v, v.to(self.recent_v.dtype), self.recent_v.new_zeros(b, k.shape[1], 1, d)],
                          dim=2)
        if self.sinks:
            self._store_sinks(softmax_part(k, d), v, valid, r0[:, None] + rank)
        fk_ext = self._key_features(attn, call, ext_k)
        sigma, ell = mixing_weights(attn.window_factors, cfg.mixing, attn.attention_config.affine_attention_factors)

        c = cfg.chunk_size
        c0 = torch.div(r0, c, rounding_mode="floor")
        n_chunks = int(torch.where(r1 > r0, torch.div(r1 - 1, c, rounding_mode="floor") - c0 + 1, 0).max())
        per_segment = min(c, int((r1 - r0).max()))                         # queries of one (row, chunk) at most
        starts = (c0[:, None] + torch.arange(n_chunks, device=dev)) * c      # [B,N] real position of each chunk
        seg_start = torch.maximum(starts, r0[:, None])
        seg_end = torch.minimum(starts + c, r1[:, None])
        update_at = torch.where((starts >= r0[:, None]) & (starts < r1[:, None]), starts, -1)
        if cfg.update_every == "token" and length == 1:                    # decode: update before every token
            update_at[:, 0] = torch.where(r1 > r0, r0, -1)
        q_ext = torch.cat([q, q.new_zeros(b, h, 1, q.shape[-1])], dim=2)

        block = max(1, self.SEGMENT_BLOCK_TOKENS // c)
        for na in range(0, n_chunks, block):
            nz = min(n_chunks, na + block)
            snapshots = self._snapshot_buffers(nz - na)
            for i, n in enumerate(range(na, nz)):
                self._update(attn, call, ext_k, ext_v, fk_ext, update_at[:, n])
                cache = self._cache_now(call)
                for name, t in zip(("k", "v", "pos", "h", "s", "first_live", "state_at"),
                                   (*cache, self.h_state, self.s_state, self.first_live, self.state_at)):
                    snapshots[name][i].copy_(t)
            y, tok = self._attend_segments(attn, call, q_ext, ext_k, ext_v, fk_ext, snapshots,
                                           seg_start[:, na:nz], seg_end[:, na:nz], per_segment, sigma, ell)
            out.scatter_(2, tok[:, None, :, None].expand(-1, h, -1, d), y)

        if call.work is not None:
            self.cache_k, self.cache_v, self.cache_pos = (t.clone() for t in self._cache_now(call))
            self.cache_pairs = call.duplicates
        keep = call.source(r1[:, None] - r + torch.arange(r, device=dev))  # the last R real positions
        self.recent_k, self.recent_v = _take(ext_k, keep), _take(ext_v, keep)
        self.real_seen = r1
        if bool((self.first_live < r1 - r).any()):
            raise RuntimeError("LolaLayer: recent buffer overflow (a pair left it before its cache update); this "
                               "is a bug")
        return out[:, :, :length]

    def probe_shares(self, args: dict, key_pos: torch.Tensor,
                     cache_pos: torch.Tensor | None) -> dict[str, list[float]]:
        """Per query head, the share of one query's attention output that each memory contributes
        (:func:`lola_ops.fusion_weights` of ``args``, one segment and one query): 'sink', 'recent' (the other
        softmax keys of the window), 'needle' (softmax keys at positions [a, b) of ``probe``, in the window or the
        cache), 'cache' (the other cached pairs), 'linear' (the linear memory as a whole, the recent pairs out of
        the window included). key_pos [M]: real position of each local key (the sinks first); cache_pos
        [Hs,G]. Diagnostic only."""
        w_local, w_cache, w_linear = fusion_weights(**{name: t for name, t in args.items() if name != "cache_v"})
        _, a, b = self.probe
        h = w_local.shape[1]
        w_local = w_local[0, :, 0]                                                         # [H,M]
        is_needle = (key_pos >= a) & (key_pos < b)
        is_sink = torch.arange(key_pos.shape[0], device=key_pos.device) < self.sinks
        out = {"sink": w_local[:, is_sink].sum(-1), "recent": w_local[:, ~is_sink & ~is_needle].sum(-1),
               "needle": w_local[:, ~is_sink & is_needle].sum(-1), "cache": w_local.new_zeros(h),
               "linear": w_linear[0, :, 0]}
        if w_cache is not None:
            cached_needle = expand_heads(((cache_pos >= a) & (cache_pos < b))[None], h)[0]   # [H,G]
            w_cache = w_cache[0, :, 0]
            out["needle"] = out["needle"] + (w_cache * cached_needle).sum(-1)
            out["cache"] = (w_cache * ~cached_needle).sum(-1)
        return {name: [round(float(x), 4) for x in out[name]] for name in self.PROBE_SHARES}

    def _plain_step(self, cfg: LolaCacheConfig) -> bool:
        """Whether the next token of every row (all real) needs no cache update and is not a sink."""
        if cfg.update_every == "token":
            return False
        r0 = self.real_seen
        return not bool(((r0 % cfg.chunk_size == 0) | (r0 < self.sinks)).any())

    def _decode_step(self, attn, cfg: LolaCacheConfig, q, k, v) -> torch.Tensor:
        """One real token per row with no cache update (most decode steps): the same attention as :meth:`attend`
        with the segment machinery left out. The softmax band is the last R real tokens, which is also the new
        recent buffer."""
        b, h, _, _ = q.shape
        d = v.shape[-1]
        r = self.recent_k.shape[2]
        band_k = torch.cat([self.recent_k[:, :, 1:], k.to(self.recent_k.dtype)], dim=2)  # real r1-R .. r1-1
        band_v = torch.cat([self.recent_v[:, :, 1:], v.to(self.recent_v.dtype)], dim=2)
        r1 = self.real_seen + 1
        k_real = r1[:, None] - r + torch.arange(r, device=q.device)                        # [B,R]
        live = k_real >= self.first_live.clamp_min(self.sinks)[:, None]
        win = in_window(r1[:, None] - 1, k_real, cfg.window_mode, cfg.window, r1)[:, 0]             # [B,R]
        soft, lin = win & live, ~win & live
        fq = attn.feature_map_q(map_part(q, d)).float()
        gamma = attn.decay()
        lin_num = lin_den = None
        cols = torch.nonzero(lin.any(0)).flatten()
        if cols.numel():  # recent pairs out of the window, not yet scored: linear terms with phi_k(k)
            lo, hi = int(cols[0]), int(cols[-1]) + 1
            fk = attn.feature_map_k(expand_heads(map_part(band_k[:, :, lo:hi], d), h)).float()
            a = (fq @ fk.transpose(-1, -2)).mul_(lin[:, None, None, lo:hi].float())
            if gamma is not None:  # gamma^(r - j) [B,H,1,hi-lo]
                a.mul_(decay_weights(gamma, (r1[:, None] - 1 - k_real[:, lo:hi])[:, None, None], head_axis=1))
            lin_num, lin_den = grouped_matmul(a, band_v[:, :, lo:hi].float()), a.sum(-1)
        if gamma is not None:  # gamma^(r - state_at) phi_q(q_r) reads the state referenced to its last update
            fq = fq * decay_weights(gamma, (r1 - 1 - self.state_at)[:, None, None, None], head_axis=1)
        soft_k = softmax_part(band_k, d)
        local_k, local_v, mask = soft_k, band_v, soft[:, None, None, :]
        if self.sinks:  # all S sinks are filled (r1 > S)
            local_k, local_v = torch.cat([self.sink_k, soft_k], dim=2), torch.cat([self.sink_v, band_v], dim=2)
            mask = torch.cat([mask.new_ones(b, 1, 1, self.sinks), mask], dim=-1)
        cache = {}
        if cfg.global_size > 0:
            cache = dict(cache_k=softmax_part(self.cache_k, d), cache_v=self.cache_v, cache_ok=self.cache_pos >= 0,
                         cache_weight=cfg.cache_weight)
        sigma, ell = mixing_weights(attn.window_factors, cfg.mixing, attn.attention_config.affine_attention_factors)
        if self.probe is not None and b == 1 and int(r1) - 1 == self.probe[0]:
            key_pos = torch.cat([torch.arange(self.sinks, device=q.device), k_real[0]])
            self.probe_result = self.probe_shares(
                dict(q=softmax_part(q, d), k=local_k, mask=mask, fq=fq, s_state=self.s_state, sigma=sigma, ell=ell,
                     mixing=cfg.mixing, eps=cfg.eps, lin_den=lin_den, **cache), key_pos,
                None if cfg.global_size == 0 else self.cache_pos[0])
        kernels = lola_kernels_for(q, attn.attention_config.backend, d, fq.shape[-1])
        fn = lola_attend if kernels is None else kernels.lola_attend_triton
        y = fn(softmax_part(q, d), local_k, local_v, mask, fq, self.h_state, self.s_state, sigma, ell,
               mixing=cfg.mixing, eps=cfg.eps, lin_num=lin_num, lin_den=lin_den, **cache)
        self.recent_k, self.recent_v, self.real_seen = band_k, band_v, r1
        self.seen += 1
        return y

    def _store_sinks(self, k, v, valid, real) -> None:
        """Copy the new tokens at real positions < S into the sink buffer (slot = real position)."""
        s = self.sinks
        slot = torch.where(valid & (real < s), real, s)                    # s = a discarded extra slot
        if not bool((slot < s).any()):
            return
        index = slot[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[-1])
        for name, new in (("sink_k", k), ("sink_v", v)):
            buf = getattr(self, name)
            full = torch.cat([buf, buf.new_zeros(buf.shape[0], buf.shape[1], 1, buf.shape[-1])], dim=2)
            setattr(self, name, full.scatter(2, index, new.to(buf.dtype))[:, :, :s])

    def _key_features(self, attn, call: _Call, ext_k: torch.Tensor) -> torch.Tensor:
        """phi_k [B,H,R+L+1,D] of the ext keys that may be linear or candidates in this call (real positions from
        first_live up to the window start of the last query); zeros elsewhere."""
        h, dd = attn.num_heads, attn.feature_map_k.out_dim
        b, _, e, _ = ext_k.shape
        fk = torch.zeros(b, h, e, dd, device=ext_k.device)
        cfg = self.resolved
        lo, hi = self.first_live, evict_before(call.r1 - 1, cfg.window_mode, cfg.window)
        rows = (call.r1 > call.r0) & (hi > lo)
        if not bool(rows.any()):
            return fk
        span = call.source(torch.stack([lo, hi - 1], 1))                  # [B,2] ext index of the first / last
        a, z = int(span[rows, 0].min()), int(span[rows, 1].max()) + 1
        fk[:, :, a:z] = attn.feature_map_k(expand_heads(map_part(ext_k[:, :, a:z], attn.head_dim), h)).float()
        return fk

    def _snapshot_buffers(self, m: int) -> dict[str, torch.Tensor]:
        """Per-chunk copies of the memories that change at cache updates, for M chunks: [M,B,...] each."""
        return {name: t.new_empty(m, *t.shape) for name, t in
                (("k", self.cache_k), ("v", self.cache_v), ("pos", self.cache_pos), ("h", self.h_state),
                 ("s", self.s_state), ("first_live", self.first_live), ("state_at", self.state_at))}

    def _working(self, attn, call: _Call, width: int) -> dict[str, torch.Tensor]:
        """The call's candidate buffers for updates of up to ``width`` new pairs (allocated at the call's first
        update, grown when an update needs more): k, v [B,Hs,G+N,d], pos [B,Hs,G+N], fk [B,H,G+N,D] (phi_k per
        query head). The cache lives in the first G slots; an update writes its candidates after them (slots it
        does not use get pos -1) and :func:`lola_ops.select_and_fold` leaves the new cache in the first G slots."""
        g = self.cache_k.shape[2]
        if call.work is None:
            h = self.h_state.shape[1]
            call.work = dict(k=self.cache_k, v=self.cache_v, pos=self.cache_pos,
                             fk=attn.feature_map_k(expand_heads(map_part(self.cache_k, attn.head_dim), h)).float())
            if self.resolved.dedup > 0:
                call.duplicates = self.cache_pairs if self.cache_pairs is not None else \
                    DuplicatePairs.of_cache(self.cache_v, self.cache_pos, self.resolved.dedup)
        have = call.work["pos"].shape[-1] - g
        if width > have:
            call.work = {name: torch.cat([t, t.new_zeros(*t.shape[:2], width - have, t.shape[-1])], dim=2)
                         if name != "pos" else torch.cat([t, t.new_full((*t.shape[:2], width - have), -1)], dim=2)
                         for name, t in call.work.items()}
        return call.work

    def _cache_now(self, call: _Call) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The current cache (k, v, pos): the stored one, or the first G slots of the call's candidate buffers."""
        if call.work is None:
            return self.cache_k, self.cache_v, self.cache_pos
        g = self.cache_k.shape[2]
        return call.work["k"][:, :, :g], call.work["v"][:, :, :g], call.work["pos"][:, :, :g]

    def _update(self, attn, call: _Call, ext_k, ext_v, fk_ext, at: torch.Tensor) -> None:
        """The cache update of each row whose ``at`` (real position, -1 = none) is set: score the cache and the
        pairs that can no longer be in a window; keep the top G, fold the rest into (H, s)."""
        cfg = self.resolved
        limit = evict_before(at, cfg.window_mode, cfg.window)
        active = (at >= 0) & (limit > self.first_live)
        if not bool(active.any()):
            return
        rows = None if bool(active.all()) else torch.nonzero(active).flatten()

        def sel(t):
            return t if rows is None else t.index_select(0, rows)

        hs, g = self.cache_k.shape[1:3]
        lo, hi = sel(self.first_live), sel(limit)
        work = self._working(attn, call, int((hi - lo).max()))
        real = lo[:, None] + torch.arange(work["pos"].shape[-1] - g, device=lo.device)
        ok = (real < hi[:, None]) & (real >= self.sinks)
        src = call.source(real, rows)
        cand = {name: sel(t) for name, t in work.items()}  # the buffers themselves, or copies of some rows
        cand["k"][:, :, g:] = expand_heads(_take(sel(ext_k), src), hs)
        cand["v"][:, :, g:] = expand_heads(_take(sel(ext_v), src), hs)
        cand["pos"][:, :, g:] = torch.where(ok, real, -1)[:, None, :]
        cand["fk"][:, :, g:] = _take(sel(fk_ext), src)
        h_state, s_state = sel(self.h_state), sel(self.s_state)
        gamma, fold_weight = attn.decay(), None
        if gamma is not None:  # age the state to this update, fold each pair with gamma^(u - j) (lola_ops)
            u = sel(at)
            age = decay_weights(gamma, (u - sel(self.state_at))[:, None], head_axis=1)     # [B',H]
            h_state.mul_(age[..., None, None])
            s_state.mul_(age[..., None])
            fold_weight = decay_weights(gamma, expand_heads(u[:, None, None] - cand["pos"].long(), h_state.shape[1]),
                                        head_axis=1)
        duplicates = call.duplicates
        if duplicates is not None and rows is not None:
            duplicates = duplicates.rows(rows, self.cache_pos.shape[0])
        select_and_fold(cand["k"], cand["v"], cand["pos"], cand["fk"], h_state, s_state, global_size=g,
                        gqa_selection=cfg.gqa_selection, eps=cfg.eps, backend=attn.attention_config.backend,
                        fold_weight=fold_weight, dedup=cfg.dedup, duplicates=duplicates,
                        pinned=None if self.pinned is None else
                        (cand["pos"] >= self.pinned[0]) & (cand["pos"] < self.pinned[1]))
        if rows is not None:
            if duplicates is not None:
                call.duplicates.put_rows(rows, duplicates, self.cache_pos.shape[0])
            for name, t in cand.items():
                work[name].index_copy_(0, rows, t)
            self.h_state.index_copy_(0, rows, h_state)
            self.s_state.index_copy_(0, rows, s_state)
        self.first_live = torch.where(active, limit, self.first_live)
        self.state_at = torch.where(active, at, self.state_at)

    def _attend_segments(self, attn, call: _Call, q_ext, ext_k, ext_v, fk_ext, snapshots, seg_start, seg_end,
                         per_segment: int, sigma, ell):
        """Attention of the queries of M chunks, one batch entry per (chunk, row). seg_start, seg_end [B,M]: the
        real positions of each segment's queries; snapshots: :meth:`_snapshot_buffers` filled per chunk.
        Returns (y [B,H,M*Q,d], token index in the call [B,M*Q]; L for empty query slots), Q = per_segment."""
        cfg = self.resolved
        b, h, _, _ = q_ext.shape
        d = ext_v.shape[-1]
        m, nq, r = seg_start.shape[1], per_segment, self.recent_k.shape[2]
        dev = q_ext.device
        length = call.length

        def per_segment_mask(x):  # [B,M,Q,K] -> [M*B,1,Q,K]
            return x.transpose(0, 1).reshape(m * b, 1, *x.shape[2:])

        q_real = seg_start[:, :, None] + torch.arange(nq, device=dev)                     # [B,M,Q]
        q_ok = q_real < seg_end[:, :, None]
        tok = call.inv.gather(1, (q_real - call.r0[:, None, None]).clamp(0, length - 1).view(b, -1))
        tok = torch.where(q_ok.view(b, -1), tok, length)                                   # [B,M*Q]
        q_both = _segments(_take(q_ext, tok), m)                                           # [M*B,H,Q,d|2d]
        q_seg, fq_seg = softmax_part(q_both, d), attn.feature_map_q(map_part(q_both, d)).float()

        k_real = seg_end[:, :, None] - r + torch.arange(r, device=dev)                    # [B,M,R] band
        first_live = snapshots["first_live"].t().clamp_min(self.sinks)                     # [B,M]
        live = (k_real >= first_live[:, :, None]) & (k_real < call.r1[:, None, None])
        src = call.source(k_real.view(b, -1))                                              # [B,M*R]
        k_band = softmax_part(_segments(_take(ext_k, src), m), d)                          # [M*B,Hk,R,d]
        v_band = _segments(_take(ext_v, src), m)
        win = in_window(q_real, k_real, cfg.window_mode, cfg.window, call.r1[:, None])     # [B,M,Q,R]
        causal = k_real[:, :, None, :] <= q_real[:, :, :, None]
        live = live[:, :, None, :] & q_ok[:, :, :, None]
        soft, lin = win & live, causal & ~win & live

        lin_num = lin_den = None
        cols = torch.nonzero(lin.flatten(0, 2).any(0)).flatten()
        gamma = attn.decay()
        if cols.numel():  # recent pairs out of the window, not yet scored: linear terms with phi_k(k)
            lo, hi = int(cols[0]), int(cols[-1]) + 1
            fk_band = _segments(_take(fk_ext, src.view(b, m, r)[:, :, lo:hi].reshape(b, -1)), m)
            a = (fq_seg @ fk_band.transpose(-1, -2)).mul_(per_segment_mask(lin[..., lo:hi]).float())
            if gamma is not None:  # gamma^(r - j) per (query, key) [M*B,H,Q,hi-lo]
                dist = per_segment_mask(q_real[..., None] - k_real[:, :, None, lo:hi])
                a.mul_(decay_weights(gamma, dist, head_axis=1))
            lin_num, lin_den = grouped_matmul(a, v_band[:, :, lo:hi].float()), a.sum(-1)
        if gamma is not None:  # the state is referenced to its last update: gamma^(r - state_at) phi_q(q_r)
            ages = q_real - snapshots["state_at"].t()[:, :, None]                               # [B,M,Q]
            fq_seg = fq_seg * decay_weights(gamma, per_segment_mask(ages[..., None]), head_axis=1)  # [M*B,H,Q,D]

        local_k, local_v, mask = k_band, v_band, per_segment_mask(soft)
        if self.sinks:  # sink j (real position j) is visible to queries at or after it
            hk, n_s = self.sink_k.shape[1], self.sinks
            sink_ok = (torch.arange(n_s, device=dev) <= q_real[..., None]) & q_ok[..., None]   # [B,M,Q,S]
            local_k = torch.cat([self.sink_k.expand(m, -1, -1, -1, -1).reshape(m * b, hk, n_s, d), k_band], dim=2)
            local_v = torch.cat([self.sink_v.expand(m, -1, -1, -1, -1).reshape(m * b, hk, n_s, d), v_band], dim=2)
            mask = torch.cat([per_segment_mask(sink_ok), mask], dim=-1)

        def flat(name):  # [M,B,...] -> [M*B,...]
            return snapshots[name].flatten(0, 1)

        cache = {}
        if cfg.global_size > 0:
            cache = dict(cache_k=softmax_part(flat("k"), d), cache_v=flat("v"), cache_ok=flat("pos") >= 0,
                         cache_weight=cfg.cache_weight)
        if self.probe is not None and b == 1 and bool((hit := (q_real[0] == self.probe[0]) & q_ok[0]).any()):
            mi, qi = (int(i) for i in torch.nonzero(hit)[0])                # the probed query: chunk, row

            def one(x):  # that query's slice of a [M*B, H, Q, ...] input (B = 1: entry mi)
                return None if x is None else x[mi:mi + 1, :, qi:qi + 1]
            key_pos = torch.cat([torch.arange(self.sinks, device=dev), k_real[0, mi]])
            self.probe_result = self.probe_shares(
                dict(q=one(q_seg), k=local_k[mi:mi + 1], mask=one(mask), fq=one(fq_seg), s_state=flat("s")[mi:mi + 1],
                     sigma=sigma, ell=ell, mixing=cfg.mixing, eps=cfg.eps,
                     lin_den=None if lin_den is None else lin_den[mi:mi + 1, :, qi:qi + 1],
                     **{name: t[mi:mi + 1] if torch.is_tensor(t) else t for name, t in cache.items()}),
                key_pos, flat("pos")[mi] if cfg.global_size > 0 else None)
        kernels = lola_kernels_for(q_ext, attn.attention_config.backend, d, fq_seg.shape[-1])
        fn = lola_attend if kernels is None else kernels.lola_attend_triton
        y = fn(q_seg, local_k, local_v, mask, fq_seg, flat("h"), flat("s"), sigma, ell, mixing=cfg.mixing,
               eps=cfg.eps, lin_num=lin_num, lin_den=lin_den, **cache)
        return _rows_of_segments(y, m), tok


class LolaCache(DynamicCache):
    """A transformers cache whose every layer is a :class:`LolaLayer` (constant memory per sequence).

    ``LolaCache(model.config, window=64, global_size=256)``; settings as in :class:`LolaCacheConfig` (a config,
    a mapping, or a spec string 'window=64 global=256' as ``settings``). Works with ``generate()``, batches with
    left padding and beam search; ``crop`` is refused (folded tokens cannot be removed).
    """

    def __init__(self, config=None, settings: LolaCacheConfig | Mapping[str, Any] | str | None = None,
                 num_layers: int | None = None, **overrides):
        if settings is None and config is not None and getattr(config, "lola_cache", None) is not None:
            settings = config.lola_cache
        cfg = LolaCacheConfig.coerce(settings)
        if overrides:
            cfg = dataclasses.replace(cfg, **overrides)
        if num_layers is None:
            if config is None:
                raise ValueError("LolaCache: pass the model config (or num_layers)")
            num_layers = config.get_text_config(decoder=True).num_hidden_layers
        self.settings = cfg
        Cache.__init__(self, layers=[LolaLayer(cfg) for _ in range(num_layers)])

    def nbytes(self) -> int:
        """Bytes of all layers' state (whole batch)."""
        return sum(layer.nbytes() for layer in self.layers)

    def bytes_per_sequence(self) -> int:
        layer = self.layers[0]
        return self.nbytes() // layer.batch_size if layer.is_initialized else 0


def lola_layer(cache, layer_idx: int, model_config=None, training: bool = False) -> LolaLayer | None:
    """The LolaLayer for ``layer_idx`` in ``cache``, or None (then the layer uses the cache as a KV cache).

    If ``model_config.lola_cache`` is set and the model is not training, a still-empty ``DynamicLayer`` (the
    default cache transformers creates) is replaced in place by a LolaLayer with those settings.
    """
    layers = getattr(cache, "layers", None)
    if layers is None:
        return None
    if layer_idx < len(layers) and isinstance(layers[layer_idx], LolaLayer):
        return layers[layer_idx]
    settings = getattr(model_config, "lola_cache", None) if model_config is not None else None
    if settings is None or training or not isinstance(cache, DynamicCache):
        return None
    replicate = getattr(cache, "layer_class_to_replicate", None)
    while replicate is not None and len(layers) <= layer_idx:
        layers.append(replicate())
    if layer_idx >= len(layers):
        return None
    current = layers[layer_idx]
    if type(current) is not DynamicLayer or current.get_seq_length() > 0:
        return None
    layers[layer_idx] = LolaLayer(settings)
    return layers[layer_idx]


def lola_bytes_per_sequence(*, num_layers: int, num_heads: int, num_kv_heads: int, head_dim: int,
                            feature_width: int, settings: LolaCacheConfig, dtype_bytes: int = 2,
                            sink_tokens: int = 0, feature_map_rope: bool = True) -> int:
    """Bytes per sequence of a LoLA cache with resolved ``settings`` (window, chunk_size, window_mode concrete)
    for a model with ``sink_tokens`` attention sinks (and unrotated keys stored beside the keys when
    ``feature_map_rope`` is false), exactly as :class:`LolaLayer` allocates it; independent of the context
    length."""
    key_copies = 1 if feature_map_rope else 2
    s = settings
    r = recent_capacity(s.window_mode, s.window, s.chunk_size)
    hs = num_heads if s.gqa_selection == "query_head" else num_kv_heads
    per_layer = ((1 + key_copies) * num_kv_heads * r * head_dim * dtype_bytes  # recent k (| k_map), v
                 + 2 * num_kv_heads * sink_tokens * head_dim * dtype_bytes   # sink k, v
                 + (1 + key_copies) * hs * s.global_size * head_dim * dtype_bytes  # cache k (| k_map), v
                 + hs * s.global_size * 4                                     # cache positions (int32)
                 + num_heads * feature_width * (head_dim + 1) * 4             # H and s, float32
                 + 3 * 8)                                             # real_seen, first_live, state_at (int64)
    return num_layers * per_layer


def kv_bytes_per_sequence(*, num_layers: int, num_kv_heads: int, head_dim: int, context: int,
                          dtype_bytes: int = 2, feature_map_rope: bool = True) -> int:
    """Bytes per sequence of a (GQA) KV cache at ``context`` tokens: the softmax model's, or a linearized model's
    under a DynamicCache (which holds [k | k_map] and v when ``feature_map_rope`` is false)."""
    key_copies = 1 if feature_map_rope else 2
    return num_layers * (1 + key_copies) * num_kv_heads * context * head_dim * dtype_bytes
