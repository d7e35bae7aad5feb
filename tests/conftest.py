import os
import sys

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Triton decides at import time whether @triton.jit compiles or interprets; without a GPU the kernel tests need the
# interpreter, so it must be switched on before anything imports triton (tests/test_kernels_hybrid.py).
if "triton" not in sys.modules:
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def one_thread():
    """Tiny ops on a shared 2-core machine run far faster on one thread (use via pytest.mark.usefixtures)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
