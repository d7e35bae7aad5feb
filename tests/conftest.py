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


TINY_EVAL_LLAMA = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
"""A random tiny Llama with SmolLM2's vocabulary (for the evaluation tests)."""


@pytest.fixture(scope="session")
def tokenizer():
    """SmolLM2's tokenizer (from the embedded model, converted once)."""
    from transformers import AutoTokenizer

    from lola_train.models import smollm2_dir

    return AutoTokenizer.from_pretrained(smollm2_dir())


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, tokenizer):
    """A random tiny Llama with the SmolLM2 tokenizer, saved as a plain HF folder (a 'teacher')."""
    from lola_train.models import random_model

    model = random_model({"architecture": "llama", "seed": 0, **TINY_EVAL_LLAMA}, torch.float32)
    path = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
