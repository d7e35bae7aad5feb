"""The job a recipe describes, stage by stage. ``linearize.py`` is the command-line entry."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .convert import convert, hybrid_layers, set_transfer_mode, transfer_parameters
from .models import load_model
from .recipe import STAGES, Recipe, to_dict
from .atomic import write_json_atomic
from .export import remove_stale_export_dirs

PROBE_TEXT = ("The quick brown fox jumps over the lazy dog. Linear attention replaces the softmax over all past "
              "tokens with a feature map, so the state has a fixed size while the sliding window keeps recent "
              "tokens exact. ")


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
        elif isinstance(v, list) and v and all(isinstance(x, float) for x in v):
            v = "[" + ", ".join(f"{x:.4g}" for x in v) + "]"
        print(f"  {k:<{width}}  {v}")


def make_accelerator():
    """An Accelerator for this launch: plain ``python`` gives 1 process, ``accelerate launch``/``torchrun`` DDP."""
    from accelerate import Accelerator

    return Accelerator(cpu=not torch.cuda.is_available())


def run_folders() -> list[str]:
    """The folders a run writes into under its output_dir: 'data' and one per stage that keeps files (its
    checkpoints and ``done.json``; 'convert' writes into output_dir itself). Swept for stale temp files."""
    return ["data"] + [stage for stage in STAGES if stage != "convert"]


def stage_done(out: Path, stage: str) -> Path:
    return out / stage / "done.json"


def data_loader(recipe: Recipe, accelerator):
    """data_fn(tokenizer, vocab_size) for the training stages: builds (main process) or loads the packed splits."""
    from .data import get_tokenizer, prepare_data

    def data_fn(model_tokenizer, vocab_size):
        tok = get_tokenizer(recipe.data, model_tokenizer, vocab_size)
        return prepare_data(recipe.data, tok, recipe.seed, Path(recipe.output_dir) / "data",
                            is_main=accelerator.is_main_process, wait=accelerator.wait_for_everyone)
    return data_fn


def stage_export(recipe: Recipe) -> dict:
    """Merge the LoRA of stage 2 into the converted model and write the HF folder and the adapter; with
    export.stage 'transfer', write the stage-1 model (no LoRA, no adapter)."""
    from .export import export_adapter, export_model
    from .train.checkpoint import load_named, trainable_state
    from .train.student import (FINETUNE_FINAL, add_lora, finetune_named_parameters, load_transferred,
                                named_transfer_parameters, stage_output)

    out = Path(recipe.output_dir) / "export"
    model, tok = load_transferred(recipe, needed_by="export")
    summary = {"stage": recipe.export.stage}
    if recipe.export.stage == "transfer":
        merged = model
    else:
        lola_params = trainable_state(named_transfer_parameters(model))
        peft_model = add_lora(model, recipe.finetune)
        final = stage_output(recipe, FINETUNE_FINAL, "export")
        load_named(finetune_named_parameters(peft_model), final["params"], "export: stage-2 parameters")
        if recipe.export.adapter:
            summary["adapter_dir"] = str(export_adapter(peft_model, lola_params, out / "adapter"))
        merged = peft_model.merge_and_unload()
    if recipe.lola_cache is not None:  # the exported config.json switches the LoLA cache on at load
        from .lola import enable_lola_cache

        enable_lola_cache(merged, recipe.lola_cache)
    summary["model_dir"] = str(export_model(merged, tok, out / "model", dtype=recipe.export.dtype))
    summary["model_class"] = json.loads((out / "model" / "config.json").read_text())["architectures"][0]
    return summary


TRAINING_STAGES = ("transfer", "finetune", "export")


def planned_stages(recipe: Recipe) -> list[str]:
    """The stages this invocation runs, in order: 'convert' and 'eval' when listed; a training stage when listed
    and not finished (``<stage>/done.json``), listed in ``force``, or after an earlier training stage that runs."""
    out, plan, upstream = Path(recipe.output_dir), [], False
    for stage in ("convert",) + TRAINING_STAGES + ("eval",):
        if stage not in recipe.stages:
            continue
        if stage in TRAINING_STAGES:
            if not (upstream or stage in recipe.force or not stage_done(out, stage).exists()):
                continue
            upstream = True
        plan.append(stage)
    return plan


def run(recipe: Recipe) -> dict:
    """Run the recipe's stages in order. A finished stage (``<stage>/done.json``) is skipped unless listed in
    ``force`` or an earlier stage ran again in this invocation; an unfinished one resumes from its checkpoint.
    Everything the stages need is checked first (:func:`lola_train.preflight.preflight`): a bad input raises a
    ConfigError before any work."""
    import shutil

    from .preflight import preflight
    from .train.checkpoint import remove_stale_temp_files
    from .train.finetune import run_finetune
    from .train.metrics import MetricsLogger
    from .train.transfer import run_transfer

    plan = planned_stages(recipe)
    report = preflight(recipe, plan)
    accelerator = make_accelerator()
    main = accelerator.is_main_process
    out = Path(recipe.output_dir)
    if main:
        print(report.line())
        remove_stale_temp_files(out, run_folders())  # left by a killed run
        remove_stale_export_dirs(out / "export")
        write_json_atomic(out / "recipe.json", to_dict(recipe))
    accelerator.wait_for_everyone()
    results = {}
    if "convert" in recipe.stages:
        if main:
            results["convert"] = stage_convert(recipe)
            print_summary(f"convert: {results['convert']['model']}", results["convert"])
            write_json_atomic(out / "convert_summary.json", results["convert"])
        accelerator.wait_for_everyone()
    metrics = MetricsLogger(out, enabled=main)
    data_fn = data_loader(recipe, accelerator)
    upstream_ran = False
    for stage in TRAINING_STAGES:
        if stage not in recipe.stages:
            continue
        marker = stage_done(out, stage)
        if stage not in plan:
            results[stage] = json.loads(marker.read_text())
            if main:
                print(f"\n== {stage}: already done ({marker}); skipped (force=[{stage}] reruns it) ==")
            continue
        if (stage in recipe.force or upstream_ran) and (out / stage).exists():
            # start over: its checkpoint belongs to the old upstream
            if main:
                shutil.rmtree(out / stage)
            accelerator.wait_for_everyone()
        torch.manual_seed(recipe.seed)
        if stage == "transfer":
            results[stage] = run_transfer(recipe, accelerator, metrics, data_fn)
        elif stage == "finetune":
            results[stage] = run_finetune(recipe, accelerator, metrics, data_fn)
        else:
            results[stage] = stage_export(recipe) if main else {}
        if main:
            write_json_atomic(marker, results[stage])
            print_summary(stage, results[stage])
        accelerator.wait_for_everyone()
        upstream_ran = True
    metrics.close()
    if "eval" in recipe.stages and main:  # the evaluation suite (lola_eval) on the exported checkpoint
        from lola_eval.pipeline_stage import stage_eval

        results["eval"] = stage_eval(recipe)
        write_json_atomic(stage_done(out, "eval"), results["eval"])
    if main:
        print(f"\nresults in {out}/")
    return results
