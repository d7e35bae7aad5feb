"""User-facing LoLA helpers: switch the cache on/off, chunked prefill with flat peak memory, bytes-per-sequence
tables. The cache itself lives in ``lola_train.modeling.lola_cache`` (it travels with exported checkpoints).

    from lola_train.lola import enable_lola_cache
    enable_lola_cache(model, "window=64 global=256")        # every generate() now uses constant memory
    model.generate(ids, max_new_tokens=100)
    # or, for one call only:
    model.generate(ids, past_key_values=LolaCache(model.config, "window=64 global=256"))
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from .modeling.attention_config import AttentionConfig
from .modeling.lola_cache import (LolaCache, LolaCacheConfig, kv_bytes_per_sequence, lola_bytes_per_sequence)

__all__ = ["LolaCache", "LolaCacheConfig", "MODEL_SHAPES", "bytes_table", "disable_lola_cache",
           "enable_lola_cache", "format_bytes_table", "prefill"]


def _attention_config(model_or_config) -> AttentionConfig:
    config = getattr(model_or_config, "config", model_or_config)
    lola = getattr(config, "lola_attention", None)
    if lola is None:
        raise ValueError("LoLA cache: the model is not converted (config has no lola_attention); call "
                         "lola_train.convert(model, ...) first or load an exported checkpoint")
    return AttentionConfig.coerce(lola)


def enable_lola_cache(model: nn.Module, settings: LolaCacheConfig | Mapping[str, Any] | str | None = None,
                      **overrides) -> LolaCacheConfig:
    """Record LoLA settings in ``model.config.lola_cache``: from then on the default cache that transformers
    creates (``generate()``, eval-mode forwards with ``use_cache``) is a LoLA cache. Saved with the config, so an
    exported checkpoint loads with it on. Returns the settings (unresolved: window None = trained window)."""
    _attention_config(model)
    cfg = LolaCacheConfig.coerce(settings)
    if overrides:
        cfg = dataclasses.replace(cfg, **overrides)
    model.config.lola_cache = cfg.to_dict()
    return cfg


def disable_lola_cache(model: nn.Module) -> None:
    """Back to transformers' DynamicCache (exact hybrid attention, memory grows with the context)."""
    if hasattr(model.config, "lola_cache"):
        del model.config.lola_cache


@torch.no_grad()
def prefill(model: nn.Module, input_ids: torch.Tensor, cache: LolaCache, *, chunk_tokens: int = 512,
            attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Feed a prompt [B,L] through the model ``chunk_tokens`` at a time, filling ``cache``; return the logits of
    the last position [B,vocab]. Peak activation memory depends on ``chunk_tokens``, not on L. Continue with
    ``model.generate(full_ids, past_key_values=cache, ...)`` (generate skips the tokens the cache has seen)."""
    if chunk_tokens < 1:
        raise ValueError(f"prefill: chunk_tokens={chunk_tokens} must be >= 1")
    logits = None
    start = cache.get_seq_length()
    for a in range(start, input_ids.shape[1], chunk_tokens):
        b = min(a + chunk_tokens, input_ids.shape[1])
        kwargs = {}
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask[:, :b]
            pos = attention_mask[:, :b].long().cumsum(-1) - 1
            kwargs["position_ids"] = pos.clamp_min(0)[:, a:b]
        out = model(input_ids[:, a:b], cache=cache, use_cache=True, logits_to_keep=1, **kwargs)
        logits = out.logits[:, -1]
    return logits


MODEL_SHAPES: dict[str, dict[str, int]] = {
    # spec 1.0; feature width D = 2F = 128 for the published Hedgehog maps (feature_dim 64, fullspace)
    "SmolLM2-135M": dict(num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64, window=64),
    "Llama-3.2-1B": dict(num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64, window=64),
    "Llama-3.1-8B": dict(num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, window=64),
}


def bytes_table(shapes: Mapping[str, Mapping[str, int]] | None = None,
                settings: Iterable[LolaCacheConfig] | None = None, contexts: Iterable[int] = (1024, 4096, 16384,
                                                                                              32768),
                *, feature_width: int = 128, dtype_bytes: int = 2, sink_tokens: int = 0) -> list[dict]:
    """Rows {model, lola (settings), sinks, context, kv_bytes, lola_bytes, ratio} for each model shape, LoLA
    setting and context, for models trained with ``sink_tokens`` attention sinks (their sink buffer is counted).
    Settings with window None take the shape's trained window; window_mode 'auto' means 'sliding'."""
    shapes = MODEL_SHAPES if shapes is None else shapes
    settings = list(settings) if settings is not None else [LolaCacheConfig(global_size=g) for g in (0, 64, 256)]
    rows = []
    for name, shape in shapes.items():
        for s in settings:
            attention = AttentionConfig(window_size=shape["window"], window_layout="sw", sink_tokens=sink_tokens)
            r = s.resolve(attention)
            lola = lola_bytes_per_sequence(num_layers=shape["num_layers"], num_heads=shape["num_heads"],
                                           num_kv_heads=shape["num_kv_heads"], head_dim=shape["head_dim"],
                                           feature_width=feature_width, settings=r, dtype_bytes=dtype_bytes,
                                           sink_tokens=sink_tokens)
            for ctx in contexts:
                kv = kv_bytes_per_sequence(num_layers=shape["num_layers"], num_kv_heads=shape["num_kv_heads"],
                                           head_dim=shape["head_dim"], context=ctx, dtype_bytes=dtype_bytes)
                rows.append(dict(model=name, window=r.window, global_size=r.global_size, chunk=r.chunk_size,
                                 window_mode=r.window_mode, gqa_selection=r.gqa_selection, sinks=sink_tokens,
                                 context=ctx,
                                 kv_bytes=kv, lola_bytes=lola, ratio=kv / lola))
    return rows


def format_bytes_table(rows: list[dict]) -> str:
    """A markdown table of :func:`bytes_table` rows (MiB, ratio = KV cache / LoLA)."""
    lines = ["| model | W | G | C | mode | selection | context | softmax KV MiB | LoLA MiB | KV/LoLA |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['window']} | {r['global_size']} | {r['chunk']} | {r['window_mode']} | "
                     f"{r['gqa_selection']} | {r['context']} | {r['kv_bytes'] / 2**20:.1f} | "
                     f"{r['lola_bytes'] / 2**20:.2f} | {r['ratio']:.2f} |")
    return "\n".join(lines)
