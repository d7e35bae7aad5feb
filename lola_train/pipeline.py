"""The job a recipe describes, stage by stage. ``linearize.py`` is the command-line entry."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .convert import convert, hybrid_layers, set_transfer_mode, transfer_parameters
from .models import load_model
from .recipe import Recipe, to_dict

PROBE_TEXT = ("The quick brown fox jumps over the lazy dog. Linear attention replaces the softmax over all past "
              "tokens with a feature map, so the state has a fixed size while the sliding window keeps recent "
              "tokens exact. ")


def write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


def probe_ids(tokenizer, vocab_size: int, length: int = 256, seed: int = 0) -> torch.Tensor:
    if tokenizer is None:
        return torch.randint(0, vocab_size, (1, length), generator=torch.Generator().manual_seed(seed))
    ids = tokenizer(PROBE_TEXT * 20, return_tensors="pt").input_ids
    return ids[:, :length]


@torch.no_grad()
def compare_logits(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> dict:
    t, s = teacher_logits.float(), student_logits.float()
    kl = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="none").sum(-1)
    return {"max_abs_logit_diff": (t - s).abs().max().item(), "mean_kl_teacher_student": kl.mean().item(),
            "top1_agreement": (t.argmax(-1) == s.argmax(-1)).float().mean().item(),
            "finite": bool(torch.isfinite(s).all())}


def count(params) -> int:
    return sum(p.numel() for p in params)


def stage_convert(recipe: Recipe) -> dict:
    """Load the teacher, convert it and report what changed."""
    torch.manual_seed(recipe.seed)
    model, tok = load_model(recipe.model.name_or_path, random=recipe.model.random, dtype=recipe.model.dtype)
    ids = probe_ids(tok, model.config.vocab_size)
    teacher_logits = model(ids).logits
    total_before = count(model.parameters())
    convert(model, recipe.attention)
    student_logits = model(ids).logits
    set_transfer_mode(model, True)
    trainable = count(p for p in model.parameters() if p.requires_grad)
    set_transfer_mode(model, False)
    layers = hybrid_layers(model)
    cfg = model.config
    summary = {
        "model": recipe.model.name_or_path or f"random {recipe.model.random.get('architecture', 'llama')}",
        "model_type": cfg.model_type, "layers_converted": len(layers), "heads": layers[0].num_heads,
        "kv_heads": layers[0].num_kv_heads, "head_dim": layers[0].head_dim,
        "attention": recipe.attention.to_dict(),
        "params_before": total_before, "params_added": count(transfer_parameters(model)),
        "params_trainable_stage1": trainable, "probe_tokens": ids.shape[1],
        **compare_logits(teacher_logits, student_logits),
    }
    return summary


def print_summary(title: str, rows: dict) -> None:
    print(f"\n== {title} ==")
    width = max(len(k) for k in rows)
    for k, v in rows.items():
        if isinstance(v, dict):
            v = ", ".join(f"{a}={b}" for a, b in v.items())
        elif isinstance(v, float):
            v = f"{v:.6g}"
        print(f"  {k:<{width}}  {v}")


def run(recipe: Recipe) -> dict:
    out = Path(recipe.output_dir)
    write_json_atomic(out / "recipe.json", to_dict(recipe))
    results = {}
    if "convert" in recipe.stages:
        results["convert"] = stage_convert(recipe)
        print_summary(f"convert: {results['convert']['model']}", results["convert"])
        write_json_atomic(out / "convert_summary.json", results["convert"])
    print(f"\nresults in {out}/")
    return results
