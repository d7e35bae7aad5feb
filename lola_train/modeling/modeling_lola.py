"""Model classes of exported LoLCATs checkpoints (remote code: stdlib/torch/transformers and siblings only).

``LolaLlamaForCausalLM`` (and the Mistral/Qwen2/Qwen3 twins) builds the base transformers architecture from the
config and swaps in :class:`HybridAttention` with the same code path as training (``swap_attention_layers``);
``from_pretrained`` then fills in the merged weights, feature maps and mixing factors by name. Loading needs
``trust_remote_code=True`` and nothing from lola-train.

Every sibling module of the modeling package is imported here (statically: transformers copies exactly the files
reachable through ``from .x import`` lines into its module cache), so registrations they make at import time (a
cache-layer type, attention backends) happen when the checkpoint loads. ``tests/test_export.py`` checks that the
list below covers every file of the package.
"""
from __future__ import annotations

from transformers.models.llama.modeling_llama import LlamaForCausalLM
from transformers.models.mistral.modeling_mistral import MistralForCausalLM
from transformers.models.qwen2.modeling_qwen2 import Qwen2ForCausalLM
from transformers.models.qwen3.modeling_qwen3 import Qwen3ForCausalLM

from .attention_config import AttentionConfig
from .configuration_lola import LolaLlamaConfig, LolaMistralConfig, LolaQwen2Config, LolaQwen3Config
from .feature_maps import FeatureMap  # noqa: F401  (imported so the file travels with the checkpoint)
from .hybrid_attention import HybridAttention  # noqa: F401
from .hybrid_ops import BACKENDS  # noqa: F401
from .swap_attention import swap_attention_layers

FP32_MODULES = ["feature_map_q", "feature_map_k", "window_factors", "decay_factors"]
"""Feature maps and mixing factors stay float32 whatever dtype the rest of the model loads in (spec 9.6)."""


class LolaMixin:
    """Swap the attention of the freshly built base model for HybridAttention (config.lola_attention)."""

    _keep_in_fp32_modules = FP32_MODULES

    def __init__(self, config):
        super().__init__(config)  # the base architecture (next in the MRO) builds its softmax layers
        self._swap_in_hybrid_attention()

    def _swap_in_hybrid_attention(self) -> None:
        lola = getattr(self.config, "lola_attention", None)
        if lola is None:
            raise ValueError(f"{type(self).__name__}: the config has no 'lola_attention' field; this checkpoint "
                             "was not exported by lola-train")
        swap_attention_layers(self, AttentionConfig.coerce(lola))


class LolaLlamaForCausalLM(LolaMixin, LlamaForCausalLM):
    config_class = LolaLlamaConfig


class LolaMistralForCausalLM(LolaMixin, MistralForCausalLM):
    config_class = LolaMistralConfig


class LolaQwen2ForCausalLM(LolaMixin, Qwen2ForCausalLM):
    config_class = LolaQwen2Config


class LolaQwen3ForCausalLM(LolaMixin, Qwen3ForCausalLM):
    config_class = LolaQwen3Config


LOLA_MODELS = {"llama": LolaLlamaForCausalLM, "mistral": LolaMistralForCausalLM, "qwen2": LolaQwen2ForCausalLM,
               "qwen3": LolaQwen3ForCausalLM}
"""base model_type -> model class of the export"""
