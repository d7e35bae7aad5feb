"""The one code path that puts :class:`HybridAttention` into a Llama-shaped model: used by
``lola_train.convert.convert`` (training) and by the exported checkpoint's ``modeling_lola.py`` (reload).

Part of the self-contained modeling package copied into exported checkpoints (stdlib/torch/transformers only).
"""
from __future__ import annotations

from torch import nn

from .attention_config import AttentionConfig
from .hybrid_attention import HybridAttention

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
"""Architectures whose attention has the Llama shape: q/k/v/o projections, rotate-half RoPE given as
position_embeddings, GQA, scaling 1/sqrt(head_dim) (Qwen3 adds q/k RMSNorm, which is kept)."""


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no decoder layers at .model.layers; supported model types: "
                         f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    return layers


def swap_attention_layers(model: nn.Module, cfg: AttentionConfig) -> None:
    """Replace each decoder layer's ``self_attn`` by a HybridAttention reusing its q/k/v/o (and q/k norm) modules.

    Only modules change; ``model.config`` is left alone (``convert`` edits it, a reloaded export already has it).
    """
    config = model.config
    num_heads = config.num_attention_heads
    num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    for idx, layer in enumerate(decoder_layers(model)):
        attn = layer.self_attn
        scaling = getattr(attn, "scaling", head_dim ** -0.5)
        if abs(scaling - head_dim ** -0.5) > 1e-9:
            raise ValueError(f"convert: layer {idx} scales attention logits by {scaling}, not 1/sqrt(head_dim); "
                             "only the standard scaling is supported")
        layer.self_attn = HybridAttention(attn, cfg, num_heads=num_heads, num_kv_heads=num_kv_heads,
                                          head_dim=head_dim, layer_idx=getattr(attn, "layer_idx", idx))
