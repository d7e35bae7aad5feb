"""Self-contained modeling code: copied verbatim into exported checkpoints.

Files here import only the standard library, torch, transformers and each other (flat relative imports), so
that ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` works without lola_train installed.
The dispatching op is ``hybrid_ops.hybrid_attention``; it is not re-exported here because the submodule
``hybrid_attention`` (the nn.Module) has the same name.
"""
from .attention_config import AttentionConfig, ConfigError
from .feature_maps import FeatureMap
from .hybrid_attention import HybridAttention
from .hybrid_ops import BACKENDS, hybrid_attention_chunked, hybrid_attention_reference, window_masks

__all__ = ["AttentionConfig", "ConfigError", "FeatureMap", "HybridAttention", "BACKENDS",
           "hybrid_attention_chunked", "hybrid_attention_reference", "window_masks"]
