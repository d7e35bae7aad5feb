#!/usr/bin/env python
"""Run a recipe end to end (linearize.py in a subprocess, wall-clock timed), then measure held-out perplexity of
the teacher and of the exported linearized model on the run's test split (data/test.pt, never used for training
or model selection). Prints a table and writes <output_dir>/bench.json.

    python scripts/bench_pipeline.py recipe=smollm2 [key=value ...]   # --skip-run: only measure an existing run
"""
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, max_seqs: int) -> float:
    nll, count = 0.0, 0
    for row in ids[:max_seqs]:
        logits = model(row[None]).logits[0, :-1].float()
        nll += F.cross_entropy(logits, row[1:], reduction="sum").item()
        count += row.numel() - 1
    return math.exp(nll / count)


def main(argv):
    skip = "--skip-run" in argv
    args = [a for a in argv if a != "--skip-run"]
    from lola_train.recipe import load_recipe

    recipe = load_recipe(args)
    out = Path(recipe.output_dir)
    wall = None
    if not skip:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, str(ROOT / "linearize.py"), *args], check=True, cwd=ROOT)
        wall = time.perf_counter() - t0
    from transformers import AutoModelForCausalLM

    from lola_train.models import load_model

    test = torch.load(out / "data" / "test.pt")["input_ids"]
    n = min(len(test), 16)
    teacher, _ = load_model(recipe.model.name_or_path, random=recipe.model.random, dtype=recipe.model.dtype)
    ppl_teacher = perplexity(teacher, test, n)
    del teacher
    student = AutoModelForCausalLM.from_pretrained(out / "export" / "model", trust_remote_code=True).eval()
    ppl_student = perplexity(student, test, n)
    transfer = json.loads((out / "transfer" / "done.json").read_text())
    finetune = json.loads((out / "finetune" / "done.json").read_text())
    rows = {
        "wall_seconds_full_run": wall,
        "transfer_steps": transfer["steps"], "transfer_seconds_per_step": transfer["seconds_per_step"],
        "transfer_val_loss_initial": transfer["initial_val_loss"], "transfer_val_loss_best": transfer["best_val_loss"],
        "mse_per_layer_before": transfer["mse_per_layer_before"],
        "mse_per_layer_after": transfer["mse_per_layer_last_eval"],
        "finetune_steps": finetune["steps"], "finetune_seconds_per_step": finetune["seconds_per_step"],
        "finetune_val_loss_initial": finetune["initial_val_loss"], "finetune_val_loss_best": finetune["best_val_loss"],
        "test_sequences": n, "test_seq_len": int(test.shape[1]),
        "test_ppl_teacher": ppl_teacher, "test_ppl_linearized": ppl_student,
    }
    print("\n| metric | value |\n|---|---|")
    for k, v in rows.items():
        if isinstance(v, list):
            v = " ".join(f"{x:.3g}" for x in v)
        elif isinstance(v, float):
            v = f"{v:.4g}"
        print(f"| {k} | {v} |")
    (out / "bench.json").write_text(json.dumps(rows, indent=2))
    print(f"\nwrote {out / 'bench.json'}")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    main(sys.argv[1:])
