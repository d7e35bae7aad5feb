"""Swap every softmax attention layer of a Llama-shaped causal LM for :class:`HybridAttention`, in place."""
from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from .modeling.attention_config import AttentionConfig
from .modeling.hybrid_attention import HybridAttention

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


def hybrid_layers(model: nn.Module) -> list[HybridAttention]:
    return [m for m in model.modules() if isinstance(m, HybridAttention)]


def convert(model: nn.Module, attention_config: AttentionConfig | Mapping[str, Any] | None = None, *,
            transfer: bool = False) -> nn.Module:
    """Replace each decoder layer's ``self_attn`` by a :class:`HybridAttention` that reuses its q/k/v/o weights.

    ``transfer=True`` puts the model in stage-1 mode (see :func:`set_transfer_mode`). The attention config is
    recorded in ``model.config.lola_attention``. Returns the same model object.
    """
    cfg = AttentionConfig.coerce(attention_config)
    config = model.config
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"convert: model_type {model_type!r} ({type(model).__name__}) is not supported; "
                         f"supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}")
    if hybrid_layers(model):
        raise ValueError("convert: this model is already converted (it has HybridAttention layers)")
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
    # The converted layers bring their own window: drop the teacher's softmax sliding window (Mistral/Qwen2), so
    # that transformers neither builds sliding masks nor crops its KV cache for these layers.
    if getattr(config, "sliding_window", None) is not None:
        config.sliding_window = None
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = ["full_attention"] * len(config.layer_types)
    config.lola_attention = cfg.to_dict()
    set_transfer_mode(model, transfer)
    return model


def set_transfer_mode(model: nn.Module, enabled: bool, *, xent: bool = False) -> None:
    """Stage-1 mode on/off. On: every layer computes its teacher and returns it, and only the feature maps and
    mixing factors keep ``requires_grad``. Off: layers return their own output; ``requires_grad`` is untouched."""
    layers = hybrid_layers(model)
    if not layers:
        raise ValueError("set_transfer_mode: the model has no HybridAttention layers; call convert() first")
    for layer in layers:
        layer.transfer_mode, layer.transfer_xent = enabled, enabled and xent
        layer.transfer_losses = {}
    if enabled:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in transfer_parameters(model):
            p.requires_grad_(True)


def transfer_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters stage 1 trains: both feature maps and the window factors of every layer."""
    params = []
    for layer in hybrid_layers(model):
        params += list(layer.feature_map_q.parameters()) + list(layer.feature_map_k.parameters())
        params.append(layer.window_factors)
    return params
