"""LoLA sparse caching as a transformers ``Cache``: constant memory per sequence (spec 4).

Per layer (:class:`LolaLayer`) and per sequence it holds, at fixed sizes once allocated:

    recent_k, recent_v [B,Hk,R,d]  model dtype  the recent pairs: the softmax window plus pairs that left it and wait
                                                for the next cache update (R = W-1+C 'sliding', 2W-1+C 'tk'/'chunk');
                                                stored once per KV head (identical for the heads of a group)
    recent_valid       [B,R]       bool         False for padding and empty slots
    cache_k, cache_v   [B,Hs,G,d]  model dtype  the sparse global cache; Hs = H (per query head, as LoLA) or Hk
                                                ('kv_mean'/'kv_max' GQA-aware selection)
    cache_pos          [B,Hs,G]    int32        absolute position of each cached pair, -1 = empty slot
    h_state            [B,H,D,d]   float32      H = sum phi_k(k) v^T over folded pairs (per query head)
    s_state            [B,H,D]     float32      s = sum phi_k(k)

phi_k(k) is recomputed from the raw keys when needed (scoring, the few recent pairs outside the window), never
stored. The math lives in ``lola_ops``; this file does the bookkeeping.

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
from .lola_ops import (GQA_SELECTIONS, MIXINGS, WINDOW_MODES, evict_before, expand_heads, fuse, in_window,
                       lola_kernels_for, recent_capacity, select_and_fold)


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
    mixing:        'lolcats' (the trained function, max over window+cache, linear terms never shifted) or
                   'lola_code' (the LoLA reference code's g : (1-g) fusion, to reproduce its numbers).
    gqa_selection: 'query_head' (one selection per query head, as LoLA; cache stored per query head), 'kv_mean'
                   / 'kv_max' (one selection per KV head by mean / max SRE over its query heads; stored once).
    eps:           epsilon of the self-recall error and of the 'lola_code' denominator.
    """

    window: Optional[int] = None
    global_size: int = 256
    chunk_size: Optional[int] = None
    window_mode: str = "auto"
    update_every: str = "chunk"
    mixing: str = "lolcats"
    gqa_selection: str = "query_head"
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
        check_choice(prefix + "mixing", self.mixing, MIXINGS)
        check_choice(prefix + "gqa_selection", self.gqa_selection, GQA_SELECTIONS)
        if not isinstance(self.eps, (int, float)) or not self.eps > 0:
            raise ConfigError(f"{prefix}eps={self.eps!r} is not valid; it must be a number > 0 (default 1e-6)")
        return self

    def resolve(self, attention: AttentionConfig) -> "LolaCacheConfig":
        """A copy with window, chunk_size and window_mode made concrete for a model with ``attention``."""
        window = self.window or attention.window_size
        mode = self.window_mode
        if mode == "auto":
            mode = "sliding" if attention.window_layout == "sw" else "tk"
        return dataclasses.replace(self, window=window, chunk_size=self.chunk_size or window, window_mode=mode)

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

    ALIASES = {"global": "global_size", "chunk": "chunk_size", "mode": "window_mode", "gqa": "gqa_selection"}

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
            elif key == "eps":
                values[key] = float(raw)
            elif key in ("window", "global_size", "chunk_size"):
                try:
                    values[key] = int(raw)
                except ValueError:
                    raise ConfigError(f"lola cache {key}={raw!r} is not an integer") from None
            else:
                values[key] = raw
        return cls(**values)


class LolaLayer(CacheLayerMixin):
    """LoLA state of one decoder layer. Driven by ``HybridAttention`` through :meth:`attend`; it never stores
    the full keys, so the plain ``update(k, v)`` of transformers' KV caches is not available."""

    is_compileable = False
    is_croppable = False
    is_sliding = False

    def __init__(self, settings: LolaCacheConfig | Mapping[str, Any] | None = None, **kwargs):
        super().__init__()
        self.settings = None if settings is None else LolaCacheConfig.coerce(settings)
        self._clear()

    def _clear(self) -> None:
        self.seen = 0            # tokens (pad included) of this sequence so far: the next absolute position
        self.first_live = 0      # recent pairs before this position have left the recent buffer (cache or H)
        self.recent_k = self.recent_v = self.recent_valid = None
        self.cache_k = self.cache_v = self.cache_pos = None
        self.h_state = self.s_state = None
        self.resolved: LolaCacheConfig | None = None
        self.is_initialized = False

    # ---- transformers CacheLayerMixin API ------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Allocation needs the attention module (heads, feature width); it happens in :meth:`attend`."""

    def update(self, key_states, value_states, *args, **kwargs):
        raise RuntimeError("LolaLayer: this layer keeps LoLA memories, not a full KV cache; it is updated by "
                           "HybridAttention (lola_train.modeling). Use a DynamicCache for softmax attention.")

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def tensors(self) -> dict[str, torch.Tensor]:
        names = ("recent_k", "recent_v", "recent_valid", "cache_k", "cache_v", "cache_pos", "h_state", "s_state")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

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
    def _allocate(self, attn, k: torch.Tensor) -> None:
        cfg = self.resolved
        b, hk, _, d = k.shape
        h, dd = attn.num_heads, attn.feature_map_k.out_dim
        hs = h if cfg.gqa_selection == "query_head" else hk
        r = recent_capacity(cfg.window_mode, cfg.window, cfg.chunk_size)
        dev, dt = k.device, k.dtype
        self.device = dev
        self.recent_k = torch.zeros(b, hk, r, d, dtype=dt, device=dev)
        self.recent_v = torch.zeros(b, hk, r, d, dtype=dt, device=dev)
        self.recent_valid = torch.zeros(b, r, dtype=torch.bool, device=dev)
        self.cache_k = torch.zeros(b, hs, cfg.global_size, d, dtype=dt, device=dev)
        self.cache_v = torch.zeros(b, hs, cfg.global_size, d, dtype=dt, device=dev)
        self.cache_pos = torch.full((b, hs, cfg.global_size), -1, dtype=torch.int32, device=dev)
        self.h_state = torch.zeros(b, h, dd, d, dtype=torch.float32, device=dev)
        self.s_state = torch.zeros(b, h, dd, dtype=torch.float32, device=dev)
        self.is_initialized = True

    def recent_positions(self) -> torch.Tensor:
        """Absolute position of each recent slot [R] (negative = never filled)."""
        r = self.recent_k.shape[2]
        return torch.arange(self.seen - r, self.seen, device=self.recent_k.device)

    def attend(self, attn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Consume L new tokens and return their attention output.

        attn: the HybridAttention module (feature maps, mixing factors, attention config); q [B,H,L,d],
        k, v [B,Hk,L,d] post-RoPE; key_mask [B,L] (True = real token) for the NEW tokens or None.
        Returns y [B,H,L,d] float32. Runs in segments that end at multiples of C, so memory is O(C (R + G)).
        """
        if self.resolved is None:
            if self.settings is None:
                raise RuntimeError("LolaLayer has no settings: build it with LolaCache(config, ...) or set "
                                   "model.config.lola_cache (lola_train.lola.enable_lola_cache)")
            self.resolved = self.settings.resolve(attn.attention_config)
        cfg = self.resolved
        if not self.is_initialized:
            self._allocate(attn, k)
        b, _, length, _ = q.shape
        if k.shape[0] != self.recent_k.shape[0]:
            raise ValueError(f"LolaLayer: batch size {k.shape[0]} differs from the cache's "
                             f"{self.recent_k.shape[0]}; use a fresh cache (cache.reset()) for a new batch")
        valid = torch.ones(b, length, dtype=torch.bool, device=q.device) if key_mask is None else key_mask.bool()
        end = self.seen + length
        outputs, a = [], 0
        while a < length:
            p0 = self.seen
            if p0 % cfg.chunk_size == 0 or (cfg.update_every == "token" and length == 1):
                self._update(attn, p0)
            stop = min(length, a + cfg.chunk_size - p0 % cfg.chunk_size)
            self._append(k[:, :, a:stop], v[:, :, a:stop], valid[:, a:stop])
            outputs.append(self._attend_segment(attn, q[:, :, a:stop], p0, end))
            a = stop
        return torch.cat(outputs, dim=2)

    def _update(self, attn, position: int) -> None:
        """Score the pairs that can no longer be in a window (plus the cache) and keep the top G; fold the rest."""
        cfg = self.resolved
        limit = evict_before(position, cfg.window_mode, cfg.window)
        if limit <= self.first_live:
            return
        r = self.recent_k.shape[2]
        lo = self.first_live - (self.seen - r)
        hi = limit - (self.seen - r)
        heads_s = self.cache_k.shape[1]
        pos = self.recent_positions()[lo:hi].to(torch.int32)
        new_pos = torch.where(self.recent_valid[:, lo:hi], pos, torch.full_like(pos, -1))   # [B,n]
        cand_k = torch.cat([self.cache_k, expand_heads(self.recent_k[:, :, lo:hi], heads_s)], dim=2)
        cand_v = torch.cat([self.cache_v, expand_heads(self.recent_v[:, :, lo:hi], heads_s)], dim=2)
        cand_pos = torch.cat([self.cache_pos, new_pos[:, None, :].expand(-1, heads_s, -1)], dim=2)
        self.cache_k, self.cache_v, self.cache_pos = select_and_fold(
            cand_k, cand_v, cand_pos, attn.feature_map_k, self.h_state, self.s_state,
            global_size=cfg.global_size, gqa_selection=cfg.gqa_selection, eps=cfg.eps,
            backend=attn.attention_config.backend)
        self.first_live = limit

    def _append(self, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor) -> None:
        n, r = k.shape[2], self.recent_k.shape[2]
        if self.seen - r + n > self.first_live:
            raise RuntimeError(f"LolaLayer: recent buffer overflow (seen={self.seen}, first_live="
                               f"{self.first_live}, capacity={r}, new={n}); this is a bug")
        self.recent_k = torch.cat([self.recent_k[:, :, n:], k.to(self.recent_k.dtype)], dim=2)
        self.recent_v = torch.cat([self.recent_v[:, :, n:], v.to(self.recent_v.dtype)], dim=2)
        self.recent_valid = torch.cat([self.recent_valid[:, n:], valid], dim=1)
        self.seen += n

    def _attend_segment(self, attn, q: torch.Tensor, p0: int, end: int) -> torch.Tensor:
        cfg = self.resolved
        h, d = q.shape[1], q.shape[-1]
        q_pos = torch.arange(p0, p0 + q.shape[2], device=q.device)
        r_pos = self.recent_positions()
        live = (r_pos >= self.first_live) & self.recent_valid                      # [B,R]
        win = in_window(q_pos, r_pos, cfg.window_mode, cfg.window, end)             # [Lq,R]
        causal = r_pos[None, :] <= q_pos[:, None]
        soft_recent = win[None] & live[:, None, :]                                  # [B,Lq,R]
        lin_recent = (causal & ~win)[None] & live[:, None, :]

        kernels = lola_kernels_for(q, attn.attention_config.backend, d, self.h_state.shape[-2])
        cache_ok = expand_heads(self.cache_pos >= 0, h)[:, :, None, :].expand(-1, -1, q.shape[2], -1)
        soft_mask = torch.cat([soft_recent[:, None].expand(-1, h, -1, -1), cache_ok], dim=-1)

        fq = attn.feature_map_q(q).float()
        extra_num = extra_den = None
        cols = torch.nonzero(lin_recent.any(1).any(0)).flatten()
        if cols.numel():  # recent pairs out of the window but not yet scored: linear, phi_k recomputed
            lo, hi = int(cols[0]), int(cols[-1]) + 1
            fk = attn.feature_map_k(expand_heads(self.recent_k[:, :, lo:hi], h)).float()
            scores = (fq @ fk.transpose(-1, -2)) * lin_recent[:, None, :, lo:hi]
            extra_num = scores @ expand_heads(self.recent_v[:, :, lo:hi], h).float()
            extra_den = scores.sum(-1)
        sigma, ell = attn.mixing_factors()
        if kernels is not None:  # Triton: softmax set + fq @ (H, s) + the extra linear terms in one kernel
            heads_s = self.cache_k.shape[1]
            soft_k = torch.cat([expand_heads(self.recent_k, heads_s), self.cache_k], dim=2)
            soft_v = torch.cat([expand_heads(self.recent_v, heads_s), self.cache_v], dim=2)
            return kernels.lola_attend_triton(q, soft_k, soft_v, soft_mask, fq, self.h_state, self.s_state, sigma,
                                              ell, mixing=cfg.mixing, eps=cfg.eps, lin_num=extra_num,
                                              lin_den=extra_den)
        qf = q.float()
        rk, rv = expand_heads(self.recent_k, h).float(), expand_heads(self.recent_v, h).float()
        ck, cv = expand_heads(self.cache_k, h).float(), expand_heads(self.cache_v, h).float()
        logits = torch.cat([qf @ rk.transpose(-1, -2), qf @ ck.transpose(-1, -2)], dim=-1) / d ** 0.5
        lin_num, lin_den = fq @ self.h_state, (fq @ self.s_state.unsqueeze(-1)).squeeze(-1)
        if extra_num is not None:
            lin_num, lin_den = lin_num + extra_num, lin_den + extra_den
        return fuse(logits, soft_mask, torch.cat([rv, cv], dim=2), lin_num, lin_den, sigma, ell,
                    mixing=cfg.mixing, eps=cfg.eps)


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
                            feature_width: int, settings: LolaCacheConfig, dtype_bytes: int = 2) -> int:
    """Bytes per sequence of a LoLA cache with resolved ``settings`` (window, chunk_size, window_mode concrete),
    exactly as :class:`LolaLayer` allocates it; independent of the context length."""
    s = settings
    r = recent_capacity(s.window_mode, s.window, s.chunk_size)
    hs = num_heads if s.gqa_selection == "query_head" else num_kv_heads
    per_layer = (2 * num_kv_heads * r * head_dim * dtype_bytes + r            # recent k, v + valid flags
                 + 2 * hs * s.global_size * head_dim * dtype_bytes            # cache k, v
                 + hs * s.global_size * 4                                     # cache positions (int32)
                 + num_heads * feature_width * (head_dim + 1) * 4)            # H and s, float32
    return num_layers * per_layer


def kv_bytes_per_sequence(*, num_layers: int, num_kv_heads: int, head_dim: int, context: int,
                          dtype_bytes: int = 2) -> int:
    """Bytes per sequence of the softmax model's (GQA) KV cache at ``context`` tokens."""
    return num_layers * 2 * num_kv_heads * context * head_dim * dtype_bytes
