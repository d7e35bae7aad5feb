"""Build the model each stage works on from the recipe and the outputs of earlier stages.

- stage 1: teacher -> convert(transfer=True)                              (train feature maps + mixing factors)
- stage 2: teacher -> convert -> stage-1 params -> LoRA                   (train LoRA, fp32)
- export:  teacher -> convert -> stage-1 params -> LoRA -> stage-2 params -> merge
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..convert import convert, hybrid_layers, set_transfer_mode, transfer_parameters
from ..models import load_model
from ..recipe import FinetuneSection, Recipe
from .checkpoint import load_named

TRANSFER_FINAL = Path("transfer") / "final.pt"
FINETUNE_FINAL = Path("finetune") / "final.pt"


def named_transfer_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, param) of the feature maps and mixing factors, names as in ``model.named_parameters()``."""
    wanted = {id(p) for p in transfer_parameters(model)}
    return [(n, p) for n, p in model.named_parameters() if id(p) in wanted]


def stage_output(recipe: Recipe, rel: Path, needed_by: str) -> dict:
    path = Path(recipe.output_dir) / rel
    if not path.exists():
        stage = rel.parts[0]
        raise FileNotFoundError(f"{needed_by} needs {path}, the output of stage '{stage}'; run it first "
                                f"(stages=[{stage},{needed_by}]) or keep output_dir={recipe.output_dir}")
    return torch.load(path, map_location="cpu", weights_only=False)


def load_converted(recipe: Recipe, *, transfer: bool):
    """(model, tokenizer): the teacher with HybridAttention in every layer (transfer mode on or off)."""
    torch.manual_seed(recipe.seed)
    model, tok = load_model(recipe.model.name_or_path, random=recipe.model.random, dtype=recipe.model.dtype)
    convert(model, recipe.attention)
    set_transfer_mode(model, transfer, xent=transfer and recipe.transfer.xent_factor > 0)
    return model, tok


def load_transferred(recipe: Recipe, needed_by: str):
    """The converted model with the stage-1 (best) feature maps and mixing factors, transfer mode off."""
    model, tok = load_converted(recipe, transfer=False)
    state = stage_output(recipe, TRANSFER_FINAL, needed_by)["params"]
    load_named(named_transfer_parameters(model), state, f"{needed_by}: stage-1 parameters")
    return model, tok


def add_lora(model: nn.Module, ft: FinetuneSection):
    """Wrap with peft LoRA on ``ft.target_modules``; everything else frozen (feature maps too, unless
    ``ft.train_feature_maps``). LoRA weights are float32 whatever the base dtype (master copies, trap T5/T6)."""
    from peft import LoraConfig, get_peft_model

    for p in model.parameters():
        p.requires_grad_(False)
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    unknown = [t for t in ft.target_modules if t not in names]
    if unknown:
        raise ValueError(f"finetune.target_modules: {unknown[0]!r} is not a module name of this model; "
                         f"e.g. q_proj, k_proj, v_proj, o_proj")
    config = LoraConfig(task_type="CAUSAL_LM", r=ft.lora_r, lora_alpha=ft.lora_alpha,
                        lora_dropout=ft.lora_dropout, target_modules=list(ft.target_modules))
    peft_model = get_peft_model(model, config)
    for n, p in peft_model.named_parameters():
        if "lora_" in n:
            p.data = p.data.float()
    if ft.train_feature_maps:
        for p in transfer_parameters(peft_model):
            p.requires_grad_(True)
    for layer in hybrid_layers(peft_model):
        layer.transfer_mode = False
    return peft_model


def finetune_named_parameters(peft_model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]
