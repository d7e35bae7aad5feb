"""Config classes of exported LoLCATs checkpoints (remote code: stdlib/torch/transformers and siblings only).

Each class is the base architecture's config under the base ``model_type`` (``llama``, ``mistral``, ...): it carries
every field of the base config plus ``lola_attention`` (the AttentionConfig as a dict) and whatever other fields
conversion added (for example ``layer_types`` / ``lola_cache`` of the LoLA cache), which transformers keeps as
extra attributes. The exported ``config.json`` keeps the base ``model_type`` too, for two reasons found in the
transformers source (5.x):

- ``AutoTokenizer.from_pretrained(dir)`` first loads ``AutoConfig.from_pretrained(dir)`` without
  ``trust_remote_code``; for a ``model_type`` transformers does not know, that asks "Do you wish to run the custom
  code? [y/N]" (and waits for an answer in an interactive shell), then falls back to a bare ``PreTrainedConfig``
  with the warning "You are using a model of type ... to instantiate a model of type ``". With a known type it
  takes the stock config class and the stock tokenizer loads silently.
- ``AutoConfig.from_pretrained(dir, trust_remote_code=True)`` builds the class named in ``auto_map`` (this one);
  a class ``model_type`` that differs from the file's triggers that same warning.

The architecture itself comes from ``auto_map["AutoModelForCausalLM"]`` (``modeling_lola``), which transformers only
follows with ``trust_remote_code=True``. Without it transformers builds its own softmax class and lists the feature
maps and mixing factors as UNEXPECTED weights in its load report.
"""
from __future__ import annotations

from transformers.models.llama.configuration_llama import LlamaConfig
from transformers.models.mistral.configuration_mistral import MistralConfig
from transformers.models.qwen2.configuration_qwen2 import Qwen2Config
from transformers.models.qwen3.configuration_qwen3 import Qwen3Config


class LolaLlamaConfig(LlamaConfig):
    """model_type 'llama' (inherited)."""


class LolaMistralConfig(MistralConfig):
    """model_type 'mistral' (inherited)."""


class LolaQwen2Config(Qwen2Config):
    """model_type 'qwen2' (inherited)."""


class LolaQwen3Config(Qwen3Config):
    """model_type 'qwen3' (inherited)."""


LOLA_CONFIGS = {"llama": LolaLlamaConfig, "mistral": LolaMistralConfig, "qwen2": LolaQwen2Config,
                "qwen3": LolaQwen3Config}
"""base model_type -> config class of the export (its model_type is the base one)"""
