"""Long-context diagnostics of a stage-1 (or stage-2) run: does the hybrid layer hold up past its training length?

For held-out text (Paul Graham essays by default; the smollm2 recipes train on ShareGPT + Wikipedia) in windows of
``--seq-len`` tokens, by position bucket (0-256, 256-512, 512-1K, 1K-2K, 2K-4K, 4K-8K):

* transfer MSE: each converted layer's output vs its own softmax teacher on teacher inputs (stage-1 view, trap
  T17), mean over layers (and per layer in the JSON);
* token NLL of the converted model (stage-1 feature maps; plus the LoRA weights with ``--stage finetune``) and of
  the teacher, and their perplexity ratio;
* the learned mixing factors sigma(w) per layer (mean over heads).

    python scripts/diag_long_context.py run=runs/smollm2_long --seq-len 4096 --n-seq 2 --out results/diag.json

``run=DIR`` is a finished run (its recipe.json and transfer/final.pt); extra ``key=value`` arguments override its
recipe (e.g. ``attention.backend=chunked``).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from lola_train.atomic import write_json_atomic
from lola_train.convert import hybrid_layers, set_transfer_mode
from lola_train.metrics_buckets import bucket_means, bucket_sums, means_from_sums, merge_bucket_sums
from lola_train.models import load_model


def load_run_recipe(run: Path, overrides: list[str]):
    from omegaconf import OmegaConf

    from lola_train.recipe import Recipe, validate

    path = run / "recipe.json"
    if not path.exists():
        raise SystemExit(f"run={run}: no recipe.json there; give the output_dir of a linearize.py run")
    cfg = OmegaConf.merge(OmegaConf.structured(Recipe), OmegaConf.create(json.loads(path.read_text())),
                          OmegaConf.from_dotlist(overrides))
    return validate(OmegaConf.to_object(cfg))


def load_student(recipe, stage: str):
    from lola_train.train.student import FINETUNE_FINAL, add_lora, load_transferred, stage_output
    from lola_train.train.checkpoint import load_named

    model, tok = load_transferred(recipe, "diag")
    if stage == "finetune":
        model = add_lora(model, recipe.finetune)
        state = stage_output(recipe, FINETUNE_FINAL, "diag")["params"]
        named = [(n, p) for n, p in model.named_parameters() if "lora_" in n]
        load_named(named, state, "diag: stage-2 parameters")
        model = model.merge_and_unload()
    return model.eval(), tok


@torch.no_grad()
def token_nll(model, ids: torch.Tensor) -> torch.Tensor:
    """NLL [L] of predicting token i from tokens < i (entry 0 is 0), one full forward without a cache."""
    logits = model(input_ids=ids, use_cache=False).logits[0].float()
    nll = torch.zeros(ids.shape[1], dtype=torch.float64)
    nll[1:] = torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:], reduction="none").double()
    return nll


@torch.no_grad()
def transfer_mse(model, ids: torch.Tensor) -> torch.Tensor:
    """[layers, L] MSE of each layer's output against its softmax teacher, teacher-forced."""
    set_transfer_mode(model, True)
    try:
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
        return torch.stack([layer.transfer_losses["mse_by_position"].double() for layer in hybrid_layers(model)])
    finally:
        set_transfer_mode(model, False)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--n-seq", type=int, default=2)
    p.add_argument("--text", default="essays", help="held-out text: essays | wikipedia | file:PATH")
    p.add_argument("--stage", choices=("transfer", "finetune"), default="transfer",
                   help="weights to evaluate: stage-1 feature maps, or with the stage-2 LoRA merged")
    p.add_argument("--no-teacher", action="store_true", help="skip the teacher's NLL")
    p.add_argument("--out", default=None, help="JSON output path")
    args, rest = p.parse_known_args(argv)
    runs = [a for a in rest if a.startswith("run=")]
    if len(runs) != 1:
        p.error("give run=DIR (the output_dir of a linearize.py run)")
    run = Path(runs[0][4:])
    recipe = load_run_recipe(run, [a for a in rest if not a.startswith("run=")])

    from lola_eval.perplexity import held_out_text, token_windows

    t0 = time.perf_counter()
    student, tok = load_student(recipe, args.stage)
    windows = token_windows(tok, held_out_text(args.text), args.seq_len, args.n_seq)
    mse_sums: dict = {}
    mse_layers = []
    nll_sums: dict = {}
    teacher_sums: dict = {}
    for row in windows:
        ids = row[None]
        per_layer = transfer_mse(student, ids)
        mse_layers.append([bucket_means(x) for x in per_layer])
        merge_bucket_sums(mse_sums, bucket_sums(per_layer.mean(0)))
        nll = token_nll(student, ids)
        mask = torch.ones_like(nll, dtype=torch.bool)
        mask[0] = False
        merge_bucket_sums(nll_sums, bucket_sums(nll, mask))
    sigmas = [float(torch.sigmoid(layer.window_factors.detach().float()).mean()) for layer in hybrid_layers(student)]
    del student
    if not args.no_teacher:
        teacher, _ = load_model(recipe.model.name_or_path, random=recipe.model.random, dtype=recipe.model.dtype)
        teacher.eval()
        for row in windows:
            nll = token_nll(teacher, row[None])
            mask = torch.ones_like(nll, dtype=torch.bool)
            mask[0] = False
            merge_bucket_sums(teacher_sums, bucket_sums(nll, mask))
    mse, nll, tnll = means_from_sums(mse_sums), means_from_sums(nll_sums), means_from_sums(teacher_sums)
    rows = []
    print(f"run {run} ({args.stage}), {args.n_seq} x {args.seq_len} tokens of {args.text}; "
          f"mixing={recipe.attention.mixing} sinks={recipe.attention.sink_tokens}")
    print(f"{'bucket':>10} {'transfer MSE':>13} {'ppl':>9} {'teacher ppl':>12} {'ratio':>7}")
    for name in mse:
        ppl = math.exp(nll[name])
        tppl = math.exp(tnll[name]) if name in tnll else float("nan")
        rows.append({"bucket": name, "transfer_mse": mse[name], "ppl": ppl, "teacher_ppl": tppl,
                     "ppl_ratio": ppl / tppl})
        print(f"{name:>10} {mse[name]:13.5f} {ppl:9.2f} {tppl:12.2f} {ppl / tppl:7.2f}")
    print("sigma(w) by layer:", " ".join(f"{s:.2f}" for s in sigmas))
    result = {"run": str(run), "stage": args.stage, "seq_len": args.seq_len, "n_seq": args.n_seq,
              "text": args.text, "attention": recipe.attention.__dict__, "buckets": rows,
              "transfer_mse_per_layer": mse_layers, "sigma_per_layer": sigmas,
              "seconds": time.perf_counter() - t0}
    if args.out:
        write_json_atomic(Path(args.out), result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
