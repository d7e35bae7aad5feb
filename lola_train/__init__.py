"""lola-train: linearize pretrained softmax-attention LLMs (LoLCATs) and run them with constant memory (LoLA)."""
from .convert import SUPPORTED_MODEL_TYPES, convert, hybrid_layers, set_transfer_mode, transfer_parameters
from .models import load_model
from .modeling import AttentionConfig, ConfigError, HybridAttention

__version__ = "0.1.0"
__all__ = ["AttentionConfig", "ConfigError", "HybridAttention", "SUPPORTED_MODEL_TYPES", "convert",
           "hybrid_layers", "load_model", "set_transfer_mode", "transfer_parameters"]
