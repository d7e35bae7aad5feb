"""Config classes of exported LoLCATs checkpoints (remote code: stdlib/torch/transformers and siblings only).

Each class is the base architecture's config with its own ``model_type`` (``lola_<base>``), so the hub's
``auto_map`` routes ``AutoConfig``/``AutoModelForCausalLM`` to this folder's code. It carries every field of the
base config plus ``lola_attention`` (the AttentionConfig as a dict) and whatever other fields conversion added
(for example ``layer_types`` / ``lola_cache`` of the LoLA cache), which transformers keeps as extra attributes.
"""
from __future__ import annotations

from transformers.models.llama.configuration_llama import LlamaConfig
from transformers.models.mistral.configuration_mistral import MistralConfig
from transformers.models.qwen2.configuration_qwen2 import Qwen2Config
from transformers.models.qwen3.configuration_qwen3 import Qwen3Config


class LolaLlamaConfig(LlamaConfig):
    model_type = "lola_llama"


class LolaMistralConfig(MistralConfig):
    model_type = "lola_mistral"


class LolaQwen2Config(Qwen2Config):
    model_type = "lola_qwen2"


class LolaQwen3Config(Qwen3Config):
    model_type = "lola_qwen3"


LOLA_CONFIGS = {"llama": LolaLlamaConfig, "mistral": LolaMistralConfig, "qwen2": LolaQwen2Config,
                "qwen3": LolaQwen3Config}
"""base model_type -> config class of the export"""
