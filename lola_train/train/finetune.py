"""Stage 2, low-rank linearizing (spec 3): LoRA on the converted model, next-token loss, prompts masked.

The model is the converted teacher with the best stage-1 feature maps; peft LoRA (float32) goes on
``finetune.target_modules`` of every layer and everything else is frozen. Loss: cross-entropy of logits[:, :-1]
against labels[:, 1:], averaged over supervised tokens (labels -100 are prompt tokens of instruction data).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from ..convert import set_activation_checkpointing, set_cached_fraction
from ..data import IGNORE_INDEX
from ..recipe import Recipe
from .checkpoint import atomic_torch_save, trainable_state
from .loop import train_loop
from .student import add_lora, finetune_named_parameters, load_transferred


def lm_loss_fn(model, batch):
    """-> (mean NLL over supervised tokens, {'nll': summed NLL, 'tokens': count})."""
    logits = model(input_ids=batch["input_ids"], use_cache=False).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX,
                          reduction="sum")
    tokens = (labels != IGNORE_INDEX).sum()
    return nll / tokens.clamp_min(1), {"nll": nll.detach(), "tokens": tokens.detach().float()}


def lm_summarize(sums: dict, n: int) -> dict:
    token_loss = (sums["nll"] / sums["tokens"].clamp_min(1)).item()
    return {"token_loss": token_loss, "ppl": math.exp(min(token_loss, 50.0)), "tokens": int(sums["tokens"].item())}


def run_finetune(recipe: Recipe, accelerator, metrics, data_fn) -> dict:
    """Train stage 2 (resuming from its checkpoint) and write ``<output_dir>/finetune/final.pt``."""
    folder = Path(recipe.output_dir) / "finetune"
    model, tok = load_transferred(recipe, needed_by="finetune")
    data = data_fn(tok, model.config.vocab_size)
    peft_model = add_lora(model, recipe.finetune)
    named = finetune_named_parameters(peft_model)
    set_cached_fraction(peft_model, recipe.finetune.cached_fraction, recipe.finetune.cached_max)
    set_activation_checkpointing(peft_model, recipe.finetune.activation_checkpointing, transfer=False)
    result = train_loop(stage="finetune", model=peft_model, loss_fn=lm_loss_fn, train=data["train"],
                        val=data["val"], cfg=recipe.finetune, folder=folder, accelerator=accelerator,
                        metrics=metrics, seed=recipe.seed, summarize=lm_summarize)
    summary = {"steps": result.steps, "resumed_from": result.resumed_from, "best_step": result.best_step,
               "best_val_loss": result.best_loss, "initial_val_loss": result.initial_eval.get("loss"),
               "initial_val_ppl": result.initial_eval.get("ppl"), "last_val_ppl": result.last_eval.get("ppl"),
               "seconds_per_step": result.seconds_per_step, "trainable_params": sum(p.numel() for _, p in named),
               "total_params": sum(p.numel() for p in peft_model.parameters())}
    set_cached_fraction(peft_model, 0.0)
    set_activation_checkpointing(peft_model, False, transfer=False)
    if accelerator.is_main_process:
        atomic_torch_save({"params": trainable_state(named), **summary}, folder / "final.pt")
    accelerator.wait_for_everyone()
    return summary
