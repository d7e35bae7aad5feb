import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Triton decides at import time whether @triton.jit compiles or interprets; without a GPU the kernel tests need the
# interpreter, so it must be switched on before anything imports triton (tests/test_kernels_hybrid.py).
if "triton" not in sys.modules:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
