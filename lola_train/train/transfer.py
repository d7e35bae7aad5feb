"""Stage 1, attention transfer (spec 2): every HybridAttention layer learns to match its own softmax teacher.

The layers run in transfer mode: each computes its teacher on its own q, k, v, records the per-layer losses in
``layer.transfer_losses`` and returns the teacher output, so every layer sees teacher inputs (trap T17). Only the
feature maps and mixing factors train (float32). Loss (trap T16), with M converted layers:

    L = mse_factor * (1/M) sum_l MSE(y_l, y_teacher_l)  +  xent_factor * (1/M) sum_l CE(a_l, a_teacher_l)

where the MSE is over all elements of the per-head outputs [B, H, L, d] before o_proj.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..convert import hybrid_layers, set_activation_checkpointing, set_cached_fraction
from ..modeling.attention_config import ConfigError
from ..recipe import Recipe
from .checkpoint import atomic_torch_save, load_named, trainable_state
from ..metrics_buckets import bucket_means
from .loop import default_summarize, train_loop
from .student import TRANSFER_FINAL, load_converted, named_transfer_parameters

INIT_MUST_MATCH = ("feature_map", "feature_dim", "fullspace", "feature_map_bias", "window_size", "window_layout",
                   "affine_attention_factors", "mixing", "sink_tokens", "feature_map_rope")
"""attention.* fields that change what the stage-1 parameters mean: transfer.init_from needs them equal (the
initial values, chunk size and backend may differ)."""


def init_file(recipe: Recipe) -> Path:
    """The stage-1 file ``transfer.init_from`` names, checked (it exists; the run it comes from has the same
    attention) without loading it: preflight calls this before any work."""
    source = Path(recipe.transfer.init_from)
    path = source / TRANSFER_FINAL if source.is_dir() else source
    if not path.is_file():
        raise ConfigError(f"transfer.init_from={recipe.transfer.init_from}: {path} does not exist; give the folder "
                          f"of a run whose stage 1 finished (it holds {TRANSFER_FINAL}) or a final.pt file")
    theirs_path = source / "recipe.json"
    if source.is_dir() and theirs_path.is_file():
        theirs = json.loads(theirs_path.read_text()).get("attention", {})
        ours = recipe.attention.to_dict()
        differ = [k for k in INIT_MUST_MATCH if k in theirs and theirs[k] != ours.get(k)]
        if "linear_decay" in theirs and (theirs["linear_decay"] is None) != (ours.get("linear_decay") is None):
            differ.append("linear_decay")  # its value is only the initial horizon; with or without is what counts
        if differ:
            k = differ[0]
            value = "null" if theirs[k] is None else theirs[k]
            raise ConfigError(f"transfer.init_from={source}: that run has attention.{k}={theirs[k]!r}, this recipe "
                              f"{ours.get(k)!r}; set attention.{k}={value} (stage-1 parameters only carry "
                              f"over between runs with the same attention)")
    return path


def load_init(recipe: Recipe, model) -> str:
    """Copy the stage-1 parameters named by ``transfer.init_from`` into ``model``; returns the file read."""
    path = init_file(recipe)
    state = torch.load(path, map_location="cpu", weights_only=False)
    load_named(named_transfer_parameters(model), state["params"], f"transfer.init_from={path}")
    return str(path)


def transfer_loss_fn(layers, mse_factor: float, xent_factor: float):
    """loss_fn for the loop: forward (only the last position's logits are computed), then read the layers."""
    def loss_fn(model, batch):
        model(input_ids=batch["input_ids"], use_cache=False, logits_to_keep=1)
        b = batch["input_ids"].shape[0]
        mse = torch.stack([layer.transfer_losses["mse"] for layer in layers])
        loss = mse_factor * mse.mean()
        by_pos = torch.stack([layer.transfer_losses["mse_by_position"] for layer in layers]).mean(0)
        extras = {"mse_per_layer": mse.detach() * b, "mse_by_position": by_pos * b}
        if xent_factor > 0:
            xent = torch.stack([layer.transfer_losses["xent"] for layer in layers])
            loss = loss + xent_factor * xent.mean()
            extras["xent_per_layer"] = xent.detach() * b
        return loss, extras
    return loss_fn


def summarize_transfer(sums: dict, n: int) -> dict:
    """Eval metrics: the loop's means, with the per-position MSE (mean over layers) reported by position bucket
    (lola_train.metrics_buckets) instead of position by position."""
    sums = dict(sums)
    by_pos = sums.pop("mse_by_position", None)
    out = default_summarize(sums, n)
    if by_pos is not None:
        out["mse_by_bucket"] = bucket_means(by_pos / n)
    return out


def decay_horizons(layers) -> dict | None:
    """Learned horizons 1 / (1 - gamma) of the linear memory over every layer's heads: min, median, 90th
    percentile, max (tokens), or None without ``attention.linear_decay``."""
    gammas = [layer.decay() for layer in layers if layer.decay_factors is not None]
    if not gammas:
        return None
    horizon = 1.0 / (1.0 - torch.cat(gammas).detach().double())
    q = torch.quantile(horizon, torch.tensor([0.0, 0.5, 0.9, 1.0], dtype=torch.float64))
    return {k: round(v, 1) for k, v in zip(("min", "median", "q90", "max"), q.tolist())}


def run_transfer(recipe: Recipe, accelerator, metrics, data_fn) -> dict:
    """Train stage 1 (resuming from its checkpoint) and write ``<output_dir>/transfer/final.pt``.

    data_fn(tokenizer, vocab_size) -> {'train', 'val', 'test': PackedSplit}.
    """
    folder = Path(recipe.output_dir) / "transfer"
    cfg = recipe.transfer
    model, tok = load_converted(recipe, transfer=True)
    data = data_fn(tok, model.config.vocab_size)
    layers = hybrid_layers(model)
    init_path = load_init(recipe, model) if cfg.init_from else None  # a resumed run then loads its own ckpt
    set_cached_fraction(model, cfg.cached_fraction, cfg.cached_max)
    set_activation_checkpointing(model, cfg.activation_checkpointing, transfer=True)
    horizons_initial = decay_horizons(layers)
    result = train_loop(stage="transfer", model=model, loss_fn=transfer_loss_fn(layers, cfg.mse_factor,
                                                                                 cfg.xent_factor),
                        train=data["train"], val=data["val"], cfg=cfg, folder=folder, accelerator=accelerator,
                        metrics=metrics, seed=recipe.seed, summarize=summarize_transfer)
    summary = {"steps": result.steps, "resumed_from": result.resumed_from, "init_from": init_path,
               "best_step": result.best_step, "best_val_loss": result.best_loss,
               "initial_val_loss": result.initial_eval.get("loss"),
               "mse_per_layer_before": result.initial_eval.get("mse_per_layer"),
               "mse_per_layer_last_eval": result.last_eval.get("mse_per_layer"),
               "mse_by_bucket_before": result.initial_eval.get("mse_by_bucket"),
               "mse_by_bucket_last_eval": result.last_eval.get("mse_by_bucket"),
               "decay_horizons_initial": horizons_initial, "decay_horizons_final": decay_horizons(layers),
               "seconds_per_step": result.seconds_per_step,
               "trainable_params": sum(p.numel() for _, p in named_transfer_parameters(model))}
    set_cached_fraction(model, 0.0)
    set_activation_checkpointing(model, False, transfer=True)
    if accelerator.is_main_process:
        atomic_torch_save({"params": trainable_state(named_transfer_parameters(model)), **summary},
                          folder / "final.pt")
    accelerator.wait_for_everyone()
    return summary
