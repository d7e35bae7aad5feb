"""Chunked prefill and greedy decoding through a cache, and the bytes that cache holds per sequence.

The prompt goes through the model ``prefill_chunk`` tokens at a time with ``logits_to_keep=1``, so activations are
bounded by the chunk (not the prompt). With the LoLA cache the state is constant too, so the peak memory of a
long-context run does not depend on its length; the teacher's KV cache grows by
``2 * layers * kv_heads * head_dim * dtype_bytes`` per token, which :func:`estimate_cache_bytes` predicts.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.cache_utils import DynamicCache

from lola_train.modeling.lola_cache import kv_bytes_per_sequence, lola_bytes_per_sequence
from lola_train.modeling.attention_config import AttentionConfig

from .loading import CacheSpec


def new_cache(model: nn.Module):
    """A fresh cache for one sequence: the teacher baseline that ``lola_eval.loading.set_cache`` selected
    (``sink`` / ``tova``), else the cache transformers itself would create; with ``config.lola_cache`` set, the
    model's hybrid layers turn its layers into LoLA layers on first use (lola_train.modeling.lola_cache.lola_layer)."""
    factory = getattr(model, "lola_eval_cache_factory", None)
    return factory() if factory is not None else DynamicCache(config=model.config)


def block_limit(cache, chunk: int) -> int:
    """Tokens per forward through ``cache``: ``chunk``, capped at the cache's ``block_size`` (baseline caches evict
    after every forward, so their prompt must arrive in blocks; LoLA chunks internally)."""
    block = getattr(cache, "block_size", None)
    return min(chunk, block) if block else chunk


def cache_nbytes(cache) -> int:
    """Bytes held by a filled cache (whole batch): LoLA layers report their state tensors; KV layers their
    keys and values."""
    total = 0
    for layer in getattr(cache, "layers", []):
        if hasattr(layer, "nbytes") and callable(layer.nbytes):
            total += layer.nbytes()
            continue
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def cache_batch_size(cache) -> int:
    for layer in getattr(cache, "layers", []):
        if hasattr(layer, "h_state") and layer.h_state is not None:
            return layer.h_state.shape[0]
        keys = getattr(layer, "keys", None)
        if isinstance(keys, torch.Tensor) and keys.dim() == 4:
            return keys.shape[0]
    return 1


def _shape(model: nn.Module) -> dict:
    cfg = model.config.get_text_config(decoder=True)
    heads = cfg.num_attention_heads
    return dict(num_layers=cfg.num_hidden_layers, num_heads=heads,
                num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
                head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)


def dtype_bytes(model: nn.Module) -> int:
    return next(model.parameters()).element_size()


def estimate_cache_bytes(model: nn.Module, spec: CacheSpec, context: int) -> int:
    """Bytes per sequence the cache will hold after ``context`` tokens (closed form, from lola_train's formulas):
    the KV cache for 'full' (also what a linearized model keeps under a DynamicCache), the kept pairs of a baseline
    (sink / tova), the constant LoLA state otherwise ('window:W' holds the LoLA G=0 state)."""
    s = _shape(model)
    linearized = getattr(model.config, "lola_attention", None)
    attention = AttentionConfig.coerce(linearized) if linearized is not None else None
    if spec.kind == "full":
        return kv_bytes_per_sequence(num_layers=s["num_layers"], num_kv_heads=s["num_kv_heads"],
                                     head_dim=s["head_dim"], context=context, dtype_bytes=dtype_bytes(model),
                                     feature_map_rope=attention is None or attention.feature_map_rope)
    if spec.is_baseline:  # at rest: min(context, S + W) or min(context, N) pairs per KV head
        from .baselines import pair_bytes

        spec = spec.resolve(model)
        kept = spec.sinks + spec.window if spec.kind == "sink" else spec.global_size
        return min(context, kept) * pair_bytes(model.config, dtype_bytes(model))
    feature_width = attention.feature_dim * (2 if attention.fullspace else 1)
    settings = spec.lola_settings().resolve(attention)
    return lola_bytes_per_sequence(num_layers=s["num_layers"], num_heads=s["num_heads"],
                                   num_kv_heads=s["num_kv_heads"], head_dim=s["head_dim"],
                                   feature_width=feature_width, settings=settings, dtype_bytes=dtype_bytes(model),
                                   sink_tokens=attention.sink_tokens, feature_map_rope=attention.feature_map_rope)


@dataclass
class GenerationResult:
    new_ids: list[int]          # generated token ids (greedy), eos excluded
    cache_bytes: int            # bytes per sequence held by the cache after the prompt and the generation
    prompt_tokens: int


@torch.no_grad()
def prefill(model: nn.Module, input_ids: torch.Tensor, cache, *, chunk: int = 1024) -> torch.Tensor:
    """Feed ``input_ids`` [1,L] through the model ``chunk`` tokens at a time into ``cache``; returns the logits of
    the last position [1,vocab] (float32)."""
    if chunk < 1:
        raise ValueError(f"prefill_chunk={chunk} is not valid; it must be >= 1 (tokens per forward)")
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"prefill expects input_ids of shape [1, L], got {tuple(input_ids.shape)}")
    logits = None
    chunk = block_limit(cache, chunk)
    for a in range(0, input_ids.shape[1], chunk):
        out = model(input_ids=input_ids[:, a:a + chunk], cache=cache, use_cache=True, logits_to_keep=1)
        logits = out.logits[:, -1].float()
    return logits


@torch.no_grad()
def greedy_generate(model: nn.Module, input_ids: torch.Tensor, *, max_new_tokens: int, prefill_chunk: int = 1024,
                    eos_token_id: int | None = None, stop=None) -> GenerationResult:
    """Greedy decoding with chunked prefill through a fresh cache (see :func:`new_cache`).

    input_ids: [1, L] prompt. stop: optional callable(list_of_new_ids) -> bool to end early (e.g. the answer is
    complete). Returns the new ids and the cache's bytes per sequence.
    """
    cache = new_cache(model)
    logits = prefill(model, input_ids, cache, chunk=prefill_chunk)
    new: list[int] = []
    for _ in range(max_new_tokens):
        nxt = int(logits.argmax(-1)[0])
        if eos_token_id is not None and nxt == eos_token_id:
            break
        new.append(nxt)
        if stop is not None and stop(new):
            break
        out = model(input_ids=torch.tensor([[nxt]], device=input_ids.device), cache=cache, use_cache=True)
        logits = out.logits[:, -1].float()
    return GenerationResult(new, cache_nbytes(cache) // cache_batch_size(cache), input_ids.shape[1])
