"""Training-free KV-cache compression baselines for the softmax teacher, at a byte budget equal to LoLA's.

What a user picks instead of linearizing: keep the original model and bound its KV cache. Two policies, each a
transformers :class:`~transformers.cache_utils.Cache` that ``model.generate(..., cache=cache)`` and the
evaluation suite use unchanged (cache specs ``sink:S:W`` and ``tova:N``, see ``lola_eval.loading``):

``SinkCache`` (``sink:S:W``), StreamingLLM (Xiao et al., 2023)
    keeps the first S tokens ("attention sinks") and the W most recent ones. RoPE: **positions inside the cache**,
    as the paper does: the sink keys are re-rotated so that they sit right before the oldest kept recent token,
    i.e. the relative distance from a query to a sink is what it would be if the evicted middle had never existed.
    RoPE scores depend only on q/k position differences, so this equals the paper's "cache positions" while the
    queries keep their true positions (and ``get_seq_length`` can report tokens seen, which transformers needs).
    Why: with original positions the distance query -> sink grows without bound, leaving the range the model was
    trained on for long streams; with cache positions it never exceeds S + W + block. ``positions='original'``
    (spec ``sink:S:W:orig``) keeps the original positions instead, for comparison. Re-rotation needs a plain RoPE
    (rope types default / linear / llama3 / yarn, whose rotation composes); others are refused.

``TovaCache`` (``tova:N``), score-based eviction in the TOVA style (Oren et al., 2024)
    keeps the N pairs per KV head with the highest attention from the newest queries; nothing else is stored (no
    accumulated scores as in H2O), so its bytes are exactly N pairs per KV head and layer. After each forward, the
    attention of the last ``obs`` queries of the block (TOVA's "current query" when decoding one token; SnapKV's
    observation window of a prefill block) over the held keys, averaged over those queries and over all query heads
    of the layer (TOVA's layer-wise choice, one kept set per layer), ranks the keys; the top N stay. Keys keep
    their original positions (as TOVA). The scores need the queries, which a ``Cache.update`` never sees: a
    forward hook on each attention module (installed by the constructor, idempotent, inert for other caches)
    recomputes the last ``obs`` queries from the layer input, as kvpress does (``TOVAPress``/``SnapKVPress``).

Both evict after every forward: at rest the cache holds exactly ``min(seen, budget)`` pairs per KV head and layer
(constant over long generation); within a forward the new block's pairs are held in addition (transient, like the
LoLA cache's chunk). Long prompts must therefore go through the model in blocks: ``cache.block_size`` (default 64,
LoLA's chunk C) is what the evaluation feeds per forward (:func:`prefill_in_blocks`); a prompt given to
``generate()`` in one piece is attended exactly within itself and compressed afterwards.

Positions and masks under transformers 5: ``get_seq_length()`` reports the tokens **seen** (the model derives
position ids from it) while ``update`` returns only the kept pairs plus the new block; ``get_mask_sizes`` reports
``(kept + q_len, seen - kept)``, so the causal mask lets every new query see every kept pair (all are older) and
the new block causally. One sequence per cache row without padding (left padding would need per-row offsets).

Maintained packages checked (2026-11): transformers 5.24 ships no sink / eviction cache (``SinkCache`` was removed
from transformers in 4.53; ``cache_utils`` has dynamic, sliding-window without sinks, static, quantized,
linear-attention and offloaded layers). ``kvpress`` 0.5.5 (NVIDIA; StreamingLLM, TOVA, SnapKV, ... presses)
requires ``transformers<5.3`` (``pip install --dry-run torch==2.13.0 kvpress`` would downgrade transformers to
5.2.0) and compresses through model hooks rather than a ``Cache``; ``attention-sinks`` 0.4.0 pins
``transformers==4.34.0``. Neither installs next to this project's transformers, so the policies are written here.

Sizing to a byte budget (:func:`pairs_for_budget`, :func:`size_to_budget`, :func:`lola_budget_bytes`): a KV pair
costs ``2 * layers * kv_heads * head_dim * dtype_bytes`` bytes per sequence (one key and one value per KV head and
layer); a budget of B bytes buys ``N = floor(B / that)`` pairs per KV head (so ``N * pair <= B < (N + 1) * pair``).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.cache_utils import Cache, CacheLayerMixin

DEFAULT_BLOCK = 64
DEFAULT_SINKS = 4
DEFAULT_OBS = 16
COMPOSABLE_ROPE = ("default", "linear", "llama3", "yarn")
SINK_POSITIONS = ("cache", "original")
_HOOK_FLAG = "_lola_eval_tova_hook"


# ----------------------------------------------------------------------------------------------------- shapes

def kv_shape(config) -> dict:
    """{'layers', 'heads', 'kv_heads', 'head_dim'} of a (text) model config."""
    cfg = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    heads = cfg.num_attention_heads
    return {"layers": cfg.num_hidden_layers, "heads": heads,
            "kv_heads": getattr(cfg, "num_key_value_heads", None) or heads,
            "head_dim": getattr(cfg, "head_dim", None) or cfg.hidden_size // heads}


def pair_bytes(config, dtype_bytes: int) -> int:
    """Bytes per sequence of one kept (key, value) pair per KV head in every layer."""
    s = kv_shape(config)
    return 2 * s["layers"] * s["kv_heads"] * s["head_dim"] * dtype_bytes


def pairs_for_budget(config, budget_bytes: int, dtype_bytes: int) -> int:
    """The most pairs per KV head that fit ``budget_bytes`` per sequence: N with N*pair <= budget < (N+1)*pair."""
    if budget_bytes < 0:
        raise ValueError(f"budget_bytes={budget_bytes} is not valid; give bytes per sequence (>= 0)")
    return int(budget_bytes // pair_bytes(config, dtype_bytes))


def lola_budget_bytes(config, lola_spec: str, dtype_bytes: int, attention=None) -> int:
    """Bytes per sequence of the LoLA cache ``lola:W:G[:fusion]`` on a model of ``config``'s shape, exactly as
    ``LolaLayer`` allocates it (k/v in the model dtype, H and s in fp32). ``attention``: the linearized model's
    attention config (feature width, trained window); default ``AttentionConfig()`` (the smollm2 recipe's)."""
    from lola_train.modeling.attention_config import AttentionConfig
    from lola_train.modeling.lola_cache import lola_bytes_per_sequence

    from .loading import CacheSpec

    try:
        spec = CacheSpec.parse(lola_spec)
    except ValueError:
        spec = None
    if spec is None or spec.kind != "lola":
        raise ValueError(f"budget {lola_spec!r} is not valid; give a LoLA cache spec such as lola:64:256")
    attention = AttentionConfig.coerce(attention if attention is not None else
                                       getattr(config, "lola_attention", None) or {})
    settings = spec.lola_settings().resolve(attention)
    s = kv_shape(config)
    return lola_bytes_per_sequence(num_layers=s["layers"], num_heads=s["heads"], num_kv_heads=s["kv_heads"],
                                   head_dim=s["head_dim"],
                                   feature_width=attention.feature_dim * (2 if attention.fullspace else 1),
                                   settings=settings, dtype_bytes=dtype_bytes, sink_tokens=attention.sink_tokens,
                                   feature_map_rope=attention.feature_map_rope)


def size_to_budget(kind: str, config, budget_bytes: int, dtype_bytes: int, *, sinks: int = DEFAULT_SINKS) -> str:
    """A concrete baseline spec that fits ``budget_bytes`` per sequence: 'sink:S:W' (S + W = N) or 'tova:N'."""
    n = pairs_for_budget(config, budget_bytes, dtype_bytes)
    if kind == "sink":
        if n < sinks + 1:
            raise ValueError(f"budget {budget_bytes} B holds {n} pairs per KV head: too few for {sinks} sinks plus "
                             "a window; raise the budget or lower the sinks")
        return f"sink:{sinks}:{n - sinks}"
    if kind == "tova":
        if n < 1:
            raise ValueError(f"budget {budget_bytes} B holds no KV pair ({pair_bytes(config, dtype_bytes)} B each)")
        return f"tova:{n}"
    raise ValueError(f"baseline kind {kind!r} is not valid; choose sink or tova")


# ----------------------------------------------------------------------------------------------------- RoPE

def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-b, a), dim=-1)


def find_rotary(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if hasattr(m, "inv_freq") and isinstance(getattr(m, "inv_freq"), torch.Tensor):
            return m
    raise ValueError("sink cache with positions='cache' needs the model's rotary embedding (a module with inv_freq); "
                     "none found: use positions='original' (spec sink:S:W:orig)")


def rotate_by(x: torch.Tensor, shift: int, inv_freq: torch.Tensor) -> torch.Tensor:
    """Move RoPE-rotated keys x [..., D] by ``shift`` positions (pure rotation R(shift); R(a)R(b) = R(a+b))."""
    if shift == 0:
        return x
    freqs = float(shift) * inv_freq.to(device=x.device, dtype=torch.float64)
    emb = torch.cat((freqs, freqs))
    cos, sin = emb.cos().to(torch.float32), emb.sin().to(torch.float32)
    xf = x.float()
    return (xf * cos + _rotate_half(xf) * sin).to(x.dtype)


# ----------------------------------------------------------------------------------------------------- layers

class _EvictingLayer(CacheLayerMixin):
    """Shared bookkeeping: ``keys``/``values`` [B, H_kv, kept, D] at rest, ``seen`` tokens so far."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, budget: int):
        super().__init__()
        if budget < 1:
            raise ValueError(f"cache budget={budget} is not valid; keep at least 1 pair per KV head")
        self.budget = budget
        self.seen = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.keys = key_states[:, :, :0].clone()
        self.values = value_states[:, :, :0].clone()
        self.is_initialized = True

    @property
    def kept(self) -> int:
        return 0 if self.keys is None else self.keys.shape[-2]

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.kept + query_length, self.seen - self.kept

    def get_max_length(self) -> int:
        return self.budget

    def nbytes(self) -> int:
        if self.keys is None:
            return 0
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()

    def reset(self) -> None:
        self.keys = self.values = None
        self.is_initialized = False
        self.seen = 0

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError(f"{type(self).__name__}: crop is not supported (evicted pairs cannot be restored)")

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.keys is not None:
            self.keys = self.keys.repeat_interleave(repeats, dim=0)
            self.values = self.values.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.keys is not None:
            self.keys, self.values = self.keys[indices], self.values[indices]


class SinkLayer(_EvictingLayer):
    """StreamingLLM for one layer: the first ``sinks`` pairs + the ``window`` most recent (module docstring)."""

    def __init__(self, sinks: int, window: int, positions: str = "cache", inv_freq: torch.Tensor | None = None):
        if sinks < 0 or window < 1:
            raise ValueError(f"sink cache sinks={sinks}, window={window} are not valid; need sinks >= 0, window >= 1")
        if positions not in SINK_POSITIONS:
            raise ValueError(f"sink cache positions={positions!r} is not valid; choose one of {SINK_POSITIONS}")
        if positions == "cache" and inv_freq is None:
            raise ValueError("sink cache positions='cache' needs the model's RoPE inv_freq")
        super().__init__(sinks + window)
        self.sinks, self.window, self.positions, self.inv_freq = sinks, window, positions, inv_freq

    def evicted(self) -> int:
        """Tokens dropped between the sinks and the kept recent pairs."""
        return self.seen - self.kept

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        shift = self.evicted()
        keys = self.keys
        if self.positions == "cache" and shift and self.sinks:
            keys = torch.cat([rotate_by(keys[:, :, :self.sinks], shift, self.inv_freq), keys[:, :, self.sinks:]], 2)
        full_k = torch.cat([keys, key_states], dim=-2)
        full_v = torch.cat([self.values, value_states], dim=-2)
        self.seen += key_states.shape[-2]
        # stored: the sinks as first rotated (their shift is applied on the way out) + the most recent pairs
        stored_k = torch.cat([self.keys, key_states], dim=-2)
        if stored_k.shape[-2] > self.budget:
            stored_k = torch.cat([stored_k[:, :, :self.sinks], stored_k[:, :, -self.window:]], dim=-2)
            stored_v = torch.cat([full_v[:, :, :self.sinks], full_v[:, :, -self.window:]], dim=-2)
        else:
            stored_v = full_v
        self.keys, self.values = stored_k, stored_v
        return full_k, full_v


class TovaLayer(_EvictingLayer):
    """TOVA-style eviction for one layer: holds the kept pairs plus the newest block until the attention hook
    scores them and keeps the top ``budget`` (module docstring)."""

    def __init__(self, budget: int, obs: int = DEFAULT_OBS):
        if obs < 1:
            raise ValueError(f"tova cache obs={obs} is not valid; score with at least the newest query (obs >= 1)")
        super().__init__(budget)
        self.obs = obs
        self.pending = 0  # pairs of the last block, not yet scored

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.kept > self.budget:
            raise RuntimeError(f"TovaCache holds {self.kept} pairs > budget {self.budget}: the previous forward was "
                               "not scored. Create the cache as TovaCache(model, budget) (its constructor installs "
                               "the scoring hooks on the model's attention modules)")
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        self.seen += key_states.shape[-2]
        self.pending = key_states.shape[-2]
        return self.keys, self.values

    def evict(self, scores: torch.Tensor) -> None:
        """Keep the ``budget`` pairs with the highest ``scores`` [B, M] (one set per layer) or [B, H_kv, M]."""
        n = self.kept
        self.pending = 0
        if n <= self.budget:
            return
        if scores.dim() == 2:
            scores = scores[:, None].expand(-1, self.keys.shape[1], -1)
        idx = scores.topk(self.budget, dim=-1).indices.sort(dim=-1).values           # [B,H_kv,N], time order
        gather = idx[..., None].expand(-1, -1, -1, self.keys.shape[-1])
        self.keys, self.values = self.keys.gather(2, gather), self.values.gather(2, gather)


# ----------------------------------------------------------------------------------------------------- caches

def _num_layers(model: nn.Module) -> int:
    return kv_shape(model.config)["layers"]


def _check_softmax(model: nn.Module, name: str) -> None:
    from .loading import is_linearized

    if is_linearized(model):
        raise ValueError(f"{name} is a baseline for the softmax teacher; this model is linearized (HybridAttention "
                         "expects contiguous keys): use a 'lola:W:G' or 'full' cache for it")


class SinkCache(Cache):
    """StreamingLLM cache: ``SinkCache(model, sinks=4, window=1020)`` (module docstring)."""

    def __init__(self, model: nn.Module, sinks: int = DEFAULT_SINKS, window: int = 1020, *,
                 positions: str = "cache", block_size: int = DEFAULT_BLOCK):
        _check_softmax(model, "sink cache")
        inv_freq = None
        if positions == "cache":
            rotary = find_rotary(model)
            rope_type = getattr(rotary, "rope_type", "default")
            if rope_type not in COMPOSABLE_ROPE:
                raise ValueError(f"sink cache positions='cache' re-rotates keys, which needs a RoPE whose rotations "
                                 f"compose; rope_type={rope_type!r} does not (use one of {COMPOSABLE_ROPE} or "
                                 "positions='original', spec sink:S:W:orig)")
            inv_freq = rotary.inv_freq.detach().float().clone()
        self.sinks, self.window, self.positions, self.block_size = sinks, window, positions, block_size
        super().__init__(layers=[SinkLayer(sinks, window, positions, inv_freq) for _ in range(_num_layers(model))])

    @property
    def label(self) -> str:
        return f"sink:{self.sinks}:{self.window}" + (":orig" if self.positions == "original" else "")


def _attention_modules(model: nn.Module):
    for m in model.modules():
        if all(hasattr(m, a) for a in ("q_proj", "k_proj", "layer_idx", "head_dim")) and \
                type(m).__name__ != "HybridAttention":
            yield m


def _recompute_queries(module: nn.Module, hidden: torch.Tensor, position_embeddings) -> torch.Tensor:
    """Post-RoPE queries [B, H, T, D] of ``hidden`` [B, T, hidden] as the (Llama-shaped) attention computes them."""
    b, t, _ = hidden.shape
    q = module.q_proj(hidden).view(b, t, -1, module.head_dim)
    if getattr(module, "q_norm", None) is not None:
        q = module.q_norm(q)
    q = q.transpose(1, 2)
    cos, sin = position_embeddings
    cos, sin = cos[..., -t:, :].unsqueeze(1), sin[..., -t:, :].unsqueeze(1)
    return q * cos + _rotate_half(q) * sin


@torch.no_grad()
def _tova_hook(module, args, kwargs, output):
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if not isinstance(cache, TovaCache):
        return None
    layer = cache.layers[module.layer_idx]
    n_new = layer.pending
    if layer.kept <= layer.budget:
        layer.pending = 0
        return None
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    pe = kwargs.get("position_embeddings")
    if hidden is None or pe is None:
        raise RuntimeError("TovaCache scoring hook: the attention module was called without hidden_states / "
                           "position_embeddings keyword arguments; this model's attention is not Llama-shaped")
    obs = min(layer.obs, n_new, hidden.shape[1])
    q = _recompute_queries(module, hidden[:, -obs:], pe).float()                        # [B,H,o,D]
    k = layer.keys.float()
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)                                              # [B,H,M,D]
    scaling = getattr(module, "scaling", module.head_dim ** -0.5)
    s = (q @ k.transpose(-1, -2)) * scaling                                             # [B,H,o,M]
    m = k.shape[2]
    key_pos = torch.arange(m, device=s.device) - (m - n_new)     # < 0: kept (older); >= 0: index in the new block
    q_pos = torch.arange(n_new - obs, n_new, device=s.device)    # index in the new block
    visible = key_pos[None, :] <= q_pos[:, None]                                        # [o,M]
    a = torch.softmax(s.masked_fill(~visible, float("-inf")), dim=-1)
    if cache.head_reduce == "layer":
        layer.evict(a.mean(dim=(1, 2)))                                                 # [B,M]
    else:
        b, h = a.shape[:2]
        layer.evict(a.view(b, h // groups, groups, obs, m).mean(dim=(2, 3)))             # [B,H_kv,M]
    return None


def install_tova_hooks(model: nn.Module) -> int:
    """Register the scoring hook on every attention module (once); returns how many modules carry it."""
    count = 0
    for m in _attention_modules(model):
        if not getattr(m, _HOOK_FLAG, False):
            m.register_forward_hook(_tova_hook, with_kwargs=True)
            setattr(m, _HOOK_FLAG, True)
        count += 1
    if count == 0:
        raise ValueError("tova cache: no Llama-shaped attention module (q_proj, k_proj, layer_idx, head_dim) found")
    return count


class TovaCache(Cache):
    """TOVA-style eviction cache: ``TovaCache(model, budget=1096)`` (module docstring).

    head_reduce: 'layer' (TOVA: one kept set per layer, scores averaged over all heads) or 'kv_head' (one set per
    KV head, averaged over its query-head group). obs: queries of each forward that score the keys."""

    HEAD_REDUCE = ("layer", "kv_head")

    def __init__(self, model: nn.Module, budget: int = 1024, *, obs: int = DEFAULT_OBS, head_reduce: str = "layer",
                 block_size: int = DEFAULT_BLOCK):
        _check_softmax(model, "tova cache")
        if head_reduce not in self.HEAD_REDUCE:
            raise ValueError(f"tova cache head_reduce={head_reduce!r} is not valid; choose one of {self.HEAD_REDUCE}")
        install_tova_hooks(model)
        self.budget, self.obs, self.head_reduce, self.block_size = budget, obs, head_reduce, block_size
        super().__init__(layers=[TovaLayer(budget, obs) for _ in range(_num_layers(model))])

    @property
    def label(self) -> str:
        return f"tova:{self.budget}"


def make_cache(model: nn.Module, spec: str | Any, **kwargs) -> Cache:
    """A fresh baseline cache for a spec ('sink:S:W', 'sink:S:W:orig', 'tova:N') or a parsed CacheSpec."""
    from .loading import CacheSpec

    spec = CacheSpec.parse(spec) if isinstance(spec, str) else spec
    if spec.kind == "sink":
        return SinkCache(model, spec.sinks, spec.window, positions=spec.positions, **kwargs)
    if spec.kind == "tova":
        return TovaCache(model, spec.global_size, **kwargs)
    raise ValueError(f"cache {spec.label!r} is not a baseline cache; baselines are sink:S:W and tova:N")


@torch.no_grad()
def prefill_in_blocks(model: nn.Module, input_ids: torch.Tensor, cache: Cache, block: int | None = None):
    """Feed ``input_ids`` [B, L] through ``cache`` ``block`` tokens per forward (default ``cache.block_size``);
    returns the last forward's output. Use before ``generate(input_ids, cache=cache)`` on a long prompt:
    generate then only feeds the tokens the cache has not seen."""
    block = block or getattr(cache, "block_size", None) or input_ids.shape[1]
    out = None
    for a in range(0, input_ids.shape[1], block):
        out = model(input_ids=input_ids[:, a:a + block], cache=cache, use_cache=True)
    return out


def describe_budget(config, budget_bytes: int, dtype_bytes: int) -> str:
    n = pairs_for_budget(config, budget_bytes, dtype_bytes)
    pb = pair_bytes(config, dtype_bytes)
    return (f"{budget_bytes / 2**20:.2f} MiB/seq = {n} KV pairs per KV head ({pb} B each; "
            f"{n * pb / 2**20:.2f} MiB used, {budget_bytes - n * pb} B spare)")


__all__ = ["SinkCache", "TovaCache", "SinkLayer", "TovaLayer", "make_cache", "prefill_in_blocks", "pair_bytes",
           "pairs_for_budget", "size_to_budget", "lola_budget_bytes", "describe_budget", "install_tova_hooks",
           "rotate_by"]
