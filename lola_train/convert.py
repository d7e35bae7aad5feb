"""Swap every softmax attention layer of a Llama-shaped causal LM for :class:`HybridAttention`, in place."""
from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from .modeling.attention_config import AttentionConfig
from .modeling.hybrid_attention import HybridAttention
from .modeling.swap_attention import SUPPORTED_MODEL_TYPES, decoder_layers, swap_attention_layers

__all__ = ["SUPPORTED_MODEL_TYPES", "convert", "decoder_layers", "hybrid_layers", "set_activation_checkpointing",
           "set_cached_fraction", "set_transfer_mode", "transfer_parameters"]


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
    swap_attention_layers(model, cfg)
    # The converted layers bring their own window: drop the teacher's softmax sliding window (Mistral/Qwen2), so
    # that transformers neither builds sliding masks nor crops its KV cache for these layers.
    if getattr(config, "sliding_window", None) is not None:
        config.sliding_window = None
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = ["full_attention"] * len(config.layer_types)
    config.lola_attention = cfg.to_dict()
    set_transfer_mode(model, transfer)
    return model


def set_cached_fraction(model: nn.Module, fraction: float, most: int | None = None) -> None:
    """Training with far softmax keys (``<stage>.cached_fraction``, at most ``<stage>.cached_max`` per KV head and
    sequence; recipe.TrainSection): every layer draws keys into its softmax set (HybridAttention.draw_cached) until
    this is set back to 0."""
    for layer in hybrid_layers(model):
        layer.cached_fraction = float(fraction)
        layer.cached_max = None if most is None else int(most)


def set_activation_checkpointing(model: nn.Module, enabled: bool, *, transfer: bool) -> None:
    """``<stage>.activation_checkpointing`` (recipe.TrainSection): trade one more forward for memory.

    Stage 1 (``transfer``): each layer keeps only the inputs of its trained branch (feature maps + hybrid
    attention) and recomputes it in the backward (HybridAttention.checkpoint_student); the frozen model keeps no
    graph anyway, so memory no longer grows with the number of layers. Stage 2: the decoder layers are recomputed
    in the backward (transformers' gradient checkpointing, non-reentrant: the far-key draws replay with the saved
    RNG state)."""
    for layer in hybrid_layers(model):
        layer.checkpoint_student = bool(enabled and transfer)
    if transfer:
        return
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    kwargs = {"use_reentrant": False}
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.2x names
        if enabled:
            base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        elif base.is_activation_checkpointing:
            base.activation_checkpointing_disable()
    elif enabled:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    elif base.is_gradient_checkpointing:
        base.gradient_checkpointing_disable()


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
    """The parameters stage 1 trains: both feature maps, the window factors (and decay factors) of every layer."""
    return [p for layer in hybrid_layers(model) for p in layer.trainable_parameters()]
