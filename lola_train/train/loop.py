"""The training loop both stages share: accelerate (single process or DDP), gradient accumulation, grad clipping,
AdamW + ReduceLROnPlateau stepped per eval (trap T15), periodic eval with best-checkpoint reload, atomic
checkpoints with optimiser/scheduler/RNG state and the data position, and resume.

Data order is a function of (seed, epoch) only: every epoch shuffles the train split with
``torch.randperm(n, generator=seed + epoch)``; optimizer step ``s`` of rank ``r`` reads micro-batch ``m`` at
positions ``((s_in_epoch * grad_accum + m) * world + r) * batch_size`` of that order. So the step count *is* the
data position, and a resumed run reads exactly the batches the uninterrupted run would have read.

Files in the stage folder: ``ckpt.pt`` (last state), ``rng-rank{r}.pt`` (per-process RNG at the last two
checkpoints: it is written first, so it covers ckpt.pt whichever of the two a kill interrupts), ``best.pt`` (params
with the lowest eval loss). The caller writes the stage's final outputs.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..modeling.attention_config import ConfigError
from ..recipe import TrainSection
from .checkpoint import atomic_torch_save, load_named, load_rng_state, rng_for_step, rng_record, trainable_state
from .metrics import MetricsLogger

LossFn = Callable[[nn.Module, dict], "tuple[torch.Tensor, dict[str, torch.Tensor]]"]
"""(model, batch {input_ids, labels: [B, L]}) -> (scalar loss, additive extras summed over the batch)."""
SummarizeFn = Callable[[dict, int], dict]
"""(summed extras over the eval set, number of sequences) -> metrics to log."""

EXIT_HOOK_ENV = "LOLA_TEST_EXIT_AFTER_STEP"
"""Test hook: ``<stage>:<k>`` makes the process exit hard (os._exit) right after step k's checkpoint is written,
as a crash or kill would."""


@dataclass
class LoopResult:
    steps: int
    best_step: int
    best_loss: float
    resumed_from: int
    initial_eval: dict = field(default_factory=dict)
    last_eval: dict = field(default_factory=dict)
    seconds_per_step: float = float("nan")


def default_summarize(sums: dict, n: int) -> dict:
    return {k: (v / n).tolist() if v.numel() > 1 else (v / n).item() for k, v in sums.items()}


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def micro_batch_indices(order: torch.Tensor, step_in_epoch: int, micro: int, cfg: TrainSection, world: int,
                        rank: int) -> torch.Tensor:
    start = ((step_in_epoch * cfg.grad_accum + micro) * world + rank) * cfg.batch_size
    return order[start:start + cfg.batch_size]


@torch.no_grad()
def evaluate(model: nn.Module, loss_fn: LossFn, val, cfg: TrainSection, accelerator,
             summarize: SummarizeFn, desc: str) -> dict:
    """Mean loss (weighted by sequences) and summarized extras over the validation split, sharded over ranks."""
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    n = len(val) if cfg.max_eval_batches is None else min(len(val), cfg.max_eval_batches * cfg.batch_size)
    mine = list(range(accelerator.process_index, n, accelerator.num_processes))
    loss_sum = torch.zeros((), dtype=torch.float64)
    sums: dict[str, torch.Tensor] = {}
    for i in tqdm(range(0, len(mine), cfg.batch_size), desc=desc, leave=False,
                  disable=not accelerator.is_main_process):
        idx = mine[i:i + cfg.batch_size]
        batch = {k: v.to(accelerator.device) for k, v in val.batch(idx).items()}
        loss, extras = loss_fn(model, batch)
        loss_sum += loss.detach().double().cpu() * len(idx)
        for k, v in extras.items():
            sums[k] = sums.get(k, 0) + v.detach().double().cpu()
    keys = sorted(sums)
    flat = torch.cat([loss_sum.reshape(1), torch.tensor([float(len(mine))], dtype=torch.float64)]
                     + [sums[k].reshape(-1) for k in keys]) if keys else \
        torch.cat([loss_sum.reshape(1), torch.tensor([float(len(mine))], dtype=torch.float64)])
    if accelerator.num_processes > 1:
        flat = accelerator.reduce(flat.to(accelerator.device), reduction="sum").cpu()
    total = int(flat[1].item())
    out, pos = {"loss": flat[0].item() / max(total, 1)}, 2
    shaped = {}
    for k in keys:
        size = sums[k].numel()
        shaped[k] = flat[pos:pos + size].reshape(sums[k].shape)
        pos += size
    out.update(summarize(shaped, max(total, 1)))
    model.train(was_training)
    return out


def prepare_for_sharding(accelerator, model: nn.Module, cfg: TrainSection, stage: str) -> None:
    """What the sharded launches (accelerate configs with FSDP or DeepSpeed) need before ``prepare``.

    DeepSpeed: our loop batches itself (no dataloader goes through ``prepare``), so the engine is told the micro
    batch (``<stage>.batch_size``) here; seen failing without it on an H200 (accelerate 1.15, DeepSpeed 0.19.8).
    FSDP version 1 flattens each wrapped block's parameters into one tensor of one dtype: a model loaded in
    bf16/fp16 with float32 feature maps cannot be wrapped (seen on the H200: "Must flatten tensors with uniform
    dtype"); this raises a ConfigError that names the fix instead.
    """
    from accelerate.utils import DistributedType

    state = accelerator.state
    if state.distributed_type == DistributedType.DEEPSPEED and state.deepspeed_plugin is not None:
        ds = state.deepspeed_plugin.deepspeed_config
        if ds.get("train_micro_batch_size_per_gpu") in (None, "auto"):
            ds["train_micro_batch_size_per_gpu"] = cfg.batch_size
    if state.distributed_type == DistributedType.FSDP:
        plugin = state.fsdp_plugin
        dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()})
        if getattr(plugin, "fsdp_version", 1) == 1 and len(dtypes) > 1:
            raise ConfigError(f"{stage}: FSDP (fsdp_version: 1) cannot wrap parameters of several dtypes "
                              f"({', '.join(dtypes)}: the model in model.dtype, the trained feature maps and "
                              f"mixing factors in float32); set model.dtype=float32 and let the accelerate "
                              f"config's mixed_precision: bf16 compute in bf16, or use fsdp_version: 2")


def param_groups(named: list[tuple[str, nn.Parameter]], cfg: TrainSection) -> list[dict]:
    """AdamW groups: every parameter at ``cfg.lr``; with ``decay_lr_scale != 1`` the decay logits
    (``*decay_factors``) form a second group at ``decay_lr_scale * lr``; empty groups are left out. The base group
    stays first when present (its lr is the one logged)."""
    if cfg.decay_lr_scale == 1.0:
        return [{"params": [p for _, p in named], "lr": cfg.lr}]
    groups = [{"params": [p for n, p in named if not n.endswith("decay_factors")], "lr": cfg.lr},
              {"params": [p for n, p in named if n.endswith("decay_factors")], "lr": cfg.lr * cfg.decay_lr_scale}]
    return [g for g in groups if g["params"]]


def train_loop(*, stage: str, model: nn.Module, loss_fn: LossFn, train, val, cfg: TrainSection, folder: Path,
               accelerator, metrics: MetricsLogger, seed: int,
               summarize: SummarizeFn = default_summarize) -> LoopResult:
    """Train the parameters of ``model`` that require grad (they must be float32: the master copies, spec 9.6).

    ``train``/``val``: :class:`lola_train.data.PackedSplit`. Resumes from ``folder/ckpt.pt`` when present. On
    return the model holds the best parameters (lowest eval loss, the initial eval included).
    """
    from tqdm.auto import tqdm

    folder = Path(folder)
    world, rank = accelerator.num_processes, accelerator.process_index
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError(f"{stage}: no parameter requires grad; nothing to train")
    not_fp32 = [n for n, p in named if p.dtype != torch.float32]
    if not_fp32:
        raise ValueError(f"{stage}: trainable parameters must be float32 master copies; {not_fp32[0]} is "
                         f"{dict(named)[not_fp32[0]].dtype}")
    per_step = cfg.batch_size * cfg.grad_accum * world
    steps_per_epoch = len(train) // per_step
    if steps_per_epoch == 0:
        raise ConfigError(f"{stage}: the train split has {len(train)} sequences, fewer than one optimizer step "
                          f"needs ({stage}.batch_size={cfg.batch_size} x {stage}.grad_accum={cfg.grad_accum} x "
                          f"{world} processes); lower them or add data")
    total_steps = cfg.max_steps if cfg.max_steps > 0 else cfg.epochs * steps_per_epoch

    optimizer = torch.optim.AdamW(param_groups(named, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=cfg.plateau_factor,
                                                           patience=cfg.plateau_patience, min_lr=cfg.min_lr)
    prepare_for_sharding(accelerator, model, cfg, stage)
    wrapped, optimizer = accelerator.prepare(model, optimizer)
    plain = accelerator.unwrap_model(wrapped)

    ckpt_path, best_path = folder / "ckpt.pt", folder / "best.pt"
    last_rng = None  # this process's RNG at the last checkpoint (its RNG file keeps it next to the newest one)
    start, best_loss, best_step, initial_eval, train_seconds = 0, math.inf, 0, {}, 0.0
    if ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if ckpt["world_size"] != world or ckpt["per_step"] != per_step:
            raise ValueError(f"{stage}: {ckpt_path} was written with {ckpt['world_size']} processes and "
                             f"{ckpt['per_step']} sequences per step; resume with the same launch and batch "
                             f"settings or delete {folder}")
        load_named(named, ckpt["params"], f"resume {ckpt_path}")
        if len(ckpt["optimizer"]["param_groups"]) != len(optimizer.param_groups):
            raise ConfigError(f"{stage}: {ckpt_path} was written with {len(ckpt['optimizer']['param_groups'])} "
                              f"optimizer group(s), this run has {len(optimizer.param_groups)} "
                              f"({stage}.decay_lr_scale={cfg.decay_lr_scale}); resume with the same "
                              f"{stage}.decay_lr_scale or delete {folder}")
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        start, best_loss, best_step = ckpt["step"], ckpt["best_loss"], ckpt["best_step"]
        initial_eval, train_seconds = ckpt["initial_eval"], ckpt["train_seconds"]
        rng_path = folder / f"rng-rank{rank}.pt"
        rng = rng_for_step(torch.load(rng_path, weights_only=False) if rng_path.exists() else None, start)
        if rng is not None:
            load_rng_state(rng)
            last_rng = {"step": start, "rng": rng}
        elif accelerator.is_main_process:
            print(f"{stage}: no RNG state for step {start} of rank {rank}; continuing with the current RNG")
        if accelerator.is_main_process:
            print(f"{stage}: resumed from step {start}/{total_steps} ({ckpt_path})")
    resumed_from = start

    def save_best(step: int, loss: float) -> None:
        if accelerator.is_main_process:
            atomic_torch_save({"step": step, "loss": loss, "params": trainable_state(named)}, best_path)

    def save_checkpoint(step: int) -> None:
        nonlocal last_rng
        last_rng = rng_record(step, last_rng)
        atomic_torch_save(last_rng, folder / f"rng-rank{rank}.pt")
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            epoch, in_epoch = divmod(step, steps_per_epoch)
            atomic_torch_save({
                "step": step, "params": trainable_state(named), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "best_loss": best_loss, "best_step": best_step,
                "initial_eval": initial_eval, "train_seconds": train_seconds, "world_size": world,
                "per_step": per_step, "data_position": {"epoch": epoch, "step_in_epoch": in_epoch},
            }, ckpt_path)
        accelerator.wait_for_everyone()

    def run_eval(step: int) -> dict:
        result = evaluate(plain, loss_fn, val, cfg, accelerator, summarize, desc=f"{stage} eval @{step}")
        metrics.log(stage, step, split="val", lr=optimizer.param_groups[0]["lr"], **result)
        return result

    last_eval = {}
    if start == 0:
        initial_eval = last_eval = run_eval(0)
        best_loss, best_step = initial_eval["loss"], 0
        save_best(0, best_loss)

    exit_hook = os.environ.get(EXIT_HOOK_ENV, "")
    exit_after = int(exit_hook.split(":")[1]) if exit_hook.startswith(f"{stage}:") else None
    wrapped.train()
    window_losses: list[float] = []
    bar = tqdm(total=total_steps, initial=start, desc=stage, disable=not accelerator.is_main_process)
    for step in range(start, total_steps):
        t0 = time.perf_counter()
        epoch, in_epoch = divmod(step, steps_per_epoch)
        order = epoch_order(len(train), seed, epoch)
        step_loss = 0.0
        for micro in range(cfg.grad_accum):
            idx = micro_batch_indices(order, in_epoch, micro, cfg, world, rank)
            batch = {k: v.to(accelerator.device) for k, v in train.batch(idx).items()}
            sync = micro == cfg.grad_accum - 1 or world == 1
            with contextlib.nullcontext() if sync else accelerator.no_sync(wrapped):
                loss, _ = loss_fn(wrapped, batch)
                accelerator.backward(loss / cfg.grad_accum)
            step_loss += loss.detach().float().item() / cfg.grad_accum
        grad_norm = None
        if cfg.grad_clip > 0:
            grad_norm = accelerator.clip_grad_norm_([p for _, p in named], cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        train_seconds += time.perf_counter() - t0
        done = step + 1
        window_losses.append(step_loss)
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.4g}")
        if done % cfg.log_every == 0 or done == total_steps:
            mean = torch.tensor([sum(window_losses) / len(window_losses)], device=accelerator.device)
            if world > 1:
                mean = accelerator.reduce(mean, reduction="mean")
            metrics.log(stage, done, split="train", loss=mean.item(), lr=optimizer.param_groups[0]["lr"],
                        grad_norm=None if grad_norm is None else float(grad_norm),
                        sec_per_step=train_seconds / done,
                        epoch=epoch)
            window_losses = []
        evaluated = done % cfg.eval_every == 0 or done == total_steps
        if evaluated:
            last_eval = run_eval(done)
            scheduler.step(last_eval["loss"])
            if last_eval["loss"] < best_loss:
                best_loss, best_step = last_eval["loss"], done
                save_best(done, best_loss)
        if evaluated or done % cfg.save_every == 0:
            save_checkpoint(done)
        if exit_after == done:
            bar.close()
            os._exit(17)
    bar.close()
    accelerator.wait_for_everyone()
    best = torch.load(best_path, map_location="cpu", weights_only=False)
    load_named(named, best["params"], f"best checkpoint {best_path}")
    if not last_eval:  # resumed after the last step had been checkpointed
        last_eval = run_eval(total_steps)
    return LoopResult(steps=total_steps, best_step=best_step, best_loss=best_loss, resumed_from=resumed_from,
                      initial_eval=initial_eval, last_eval=last_eval,
                      seconds_per_step=train_seconds / max(total_steps, 1))
