"""Export a linearized model as a self-contained Hugging Face folder (remote code), and the LoRA adapter alone.

The folder holds the merged weights (base + LoRA, feature maps, mixing factors), a config that keeps the base
``model_type`` (so the stock tokenizer loads without a remote-code prompt; see ``configuration_lola``) with an
``auto_map`` to ``configuration_lola`` / ``modeling_lola``, every file of ``lola_train/modeling/`` and the tokenizer
(its config carrying the model's maximum length and no load-time arguments).
``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` rebuilds it on a machine without
lola-train; ``AutoTokenizer.from_pretrained(folder)`` needs no remote code. Folders are written to a temp dir and
renamed into place.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from .models import DTYPES

MODELING_DIR = Path(__file__).resolve().parent / "modeling"


def replace_dir(tmp: Path, target: Path) -> None:
    """Atomically put folder ``tmp`` at ``target`` (an existing target is moved aside first, then deleted)."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def remove_stale_export_dirs(folder: Path) -> list[Path]:
    """Delete what a killed export leaves in ``folder``: temp folders of :func:`export_model` /
    :func:`export_adapter` (``.<name>-<8 random chars>``) and folders :func:`replace_dir` moved aside
    (``.<name>.old``)."""
    removed = []
    for path in Path(folder).glob(".*") if Path(folder).is_dir() else ():
        if path.is_dir() and (path.name.endswith(".old") or re.fullmatch(r"\.[^.].*-[a-z0-9_]{8}", path.name)):
            shutil.rmtree(path)
            removed.append(path)
    return removed


LOAD_TIME_KEYS = ("is_local", "local_files_only", "cache_dir", "force_download", "resume_download", "proxies",
                  "token", "use_auth_token", "revision", "subfolder", "trust_remote_code", "code_revision",
                  "_commit_hash", "_from_auto", "_from_pipeline")
"""Arguments of a tokenizer's ``from_pretrained`` that transformers keeps in ``init_kwargs`` (5.x adds
``is_local`` and ``local_files_only`` itself) and ``save_pretrained`` writes back: they describe one load on one
machine, not the tokenizer."""


def model_max_length(config) -> int | None:
    """The longest context the model was trained for (``max_position_embeddings``), if the config has one."""
    n = getattr(config, "max_position_embeddings", None)
    return n if isinstance(n, int) and n > 0 else None


def clean_tokenizer_config(path: Path, max_length: int | None) -> None:
    """Drop load-time arguments from a saved ``tokenizer_config.json``; cap ``model_max_length`` at the model's
    (a tokenizer without a known limit carries transformers' int(1e30) there)."""
    if not path.exists():
        return
    config = json.loads(path.read_text(encoding="utf-8"))
    for key in LOAD_TIME_KEYS:
        config.pop(key, None)
    if max_length is not None:
        current = config.get("model_max_length")
        config["model_max_length"] = max_length if not isinstance(current, int) else min(current, max_length)
    path.write_text(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def write_remote_code(folder: Path, base_model_type: str) -> None:
    """Copy the modeling package and point config.json at its classes."""
    from .modeling.configuration_lola import LOLA_CONFIGS
    from .modeling.modeling_lola import LOLA_MODELS

    if base_model_type not in LOLA_CONFIGS:
        raise ValueError(f"export: model_type {base_model_type!r} has no exported class; supported: "
                         f"{', '.join(LOLA_CONFIGS)}")
    for f in sorted(MODELING_DIR.glob("*.py")):
        shutil.copyfile(f, folder / f.name)
    cfg_path = folder / "config.json"
    config = json.loads(cfg_path.read_text())
    config_cls, model_cls = LOLA_CONFIGS[base_model_type], LOLA_MODELS[base_model_type]
    config.update({
        "model_type": base_model_type,
        "architectures": [model_cls.__name__],
        "auto_map": {"AutoConfig": f"configuration_lola.{config_cls.__name__}",
                     "AutoModelForCausalLM": f"modeling_lola.{model_cls.__name__}"},
        "lola_base_model_type": base_model_type,
    })
    cfg_path.write_text(json.dumps(config, indent=2, sort_keys=True))


def export_model(model: nn.Module, tokenizer, target: Path, *, dtype: str = "model") -> Path:
    """Save a converted (LoRA already merged) causal LM to ``target`` as a remote-code HF folder.

    dtype: 'model' keeps the parameter dtypes; otherwise the weights are cast to it while what stage 1 trains
    (feature maps, mixing and decay factors) stays float32.
    """
    from .convert import hybrid_layers

    if not hybrid_layers(model):
        raise ValueError("export: the model has no HybridAttention layers; convert it first")
    if any("lora_" in n for n, _ in model.named_parameters()):
        raise ValueError("export: the model still has LoRA layers; merge them first (peft merge_and_unload)")
    base_type = model.config.model_type
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        if dtype != "model":
            keep = {id(p) for layer in hybrid_layers(model) for p in layer.trainable_parameters()}
            for p in model.parameters():
                if id(p) not in keep:
                    p.data = p.data.to(DTYPES[dtype])
            model.config.dtype = dtype
        model.save_pretrained(tmp)
        if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(tmp)
            clean_tokenizer_config(tmp / "tokenizer_config.json", model_max_length(model.config))
        write_remote_code(tmp, base_type)
        replace_dir(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def export_adapter(peft_model, lola_params: dict[str, torch.Tensor], target: Path) -> Path:
    """Save the LoRA adapter (peft format) plus the stage-1 parameters it was trained on top of
    (``lola_attention.safetensors``: feature maps and mixing factors by parameter name)."""
    from safetensors.torch import save_file

    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        peft_model.save_pretrained(tmp)
        save_file({k: v.detach().contiguous().cpu() for k, v in lola_params.items()},
                  str(tmp / "lola_attention.safetensors"))
        replace_dir(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
