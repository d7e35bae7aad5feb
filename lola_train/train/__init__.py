"""Training: stage 1 (attention transfer), stage 2 (LoRA finetune), the shared loop, checkpoints and metrics."""
from .checkpoint import atomic_torch_save, load_rng_state, rng_state
from .loop import LoopResult, train_loop
from .metrics import MetricsLogger

__all__ = ["LoopResult", "MetricsLogger", "atomic_torch_save", "load_rng_state", "rng_state", "train_loop"]
