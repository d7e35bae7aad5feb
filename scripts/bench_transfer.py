"""Stage-1 (attention transfer) cost per token on this machine, and where it goes.

For a model and sequence lengths, times one stage-1 micro-step (forward in transfer mode + backward into the
feature maps) and its parts:

* ``frozen``: the unconverted model's forward (projections, MLPs, softmax attention): the teacher work that
  stage 1 cannot skip (every layer needs teacher inputs, trap T17);
* ``teacher attn``: the per-layer softmax teacher, with an explicit causal mask tensor (before) and with SDPA's
  causal flag (what HybridAttention uses when there is no padding);
* ``step``: the whole stage-1 micro-step, forward + backward;
* ``graph MiB``: what the autograd graph holds between the forward and the backward (bytes of saved tensors),
  the part of the step's memory that grows with length and depth.

``--recipe NAME`` takes the attention and ``transfer.cached_fraction`` of a recipe (default: lola_code + 4 sinks,
no far keys); ``--checkpointing both`` times every length with ``transfer.activation_checkpointing`` off and on.

    python scripts/bench_transfer.py --lengths 1024,2048 --out results/bench_transfer.json
    python scripts/bench_transfer.py --recipe smollm2_long --lengths 1024,2048 --checkpointing both
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lola_train.atomic import write_json_atomic
from lola_train.convert import (convert, hybrid_layers, set_activation_checkpointing, set_cached_fraction,
                                set_transfer_mode)
from lola_train.models import load_model
from lola_train.recipe import load_recipe


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="embedded:smollm2")
    p.add_argument("--lengths", default="1024,2048")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--mixing", default="lola_code")
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--recipe", default=None, help="take attention.* and transfer.cached_fraction from this recipe")
    p.add_argument("--cached-max", type=int, default=None, help="transfer.cached_max (default: the recipe's)")
    p.add_argument("--checkpointing", choices=["off", "on", "both"], default="off",
                   help="transfer.activation_checkpointing for the step: off, on, or both (each length twice)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model, _ = load_model(args.model)
    cfg = model.config
    heads, head_dim = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    rows = []
    for length in (int(x) for x in args.lengths.split(",")):
        ids = torch.randint(0, cfg.vocab_size, (1, length))
        with torch.no_grad():
            frozen = timed(lambda: model(input_ids=ids, use_cache=False, logits_to_keep=1), args.repeats)
        q, k, v = (torch.randn(1, heads, length, head_dim) for _ in range(3))
        mask = torch.ones(length, length, dtype=torch.bool).tril()[None, None]
        with torch.no_grad():
            t_mask = timed(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask), args.repeats)
            t_causal = timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), args.repeats)
        rows.append({"length": length, "frozen_forward_s": frozen,
                     "teacher_attn_mask_s_per_layer": t_mask, "teacher_attn_causal_s_per_layer": t_causal})

    attention, cached_fraction, cached_max = {"mixing": args.mixing, "sink_tokens": args.sinks}, 0.0, None
    if args.recipe:
        recipe = load_recipe([f"recipe={args.recipe}"])
        attention, cached_fraction = recipe.attention, recipe.transfer.cached_fraction
        cached_max = recipe.transfer.cached_max if args.cached_max is None else args.cached_max
    convert(model, attention)
    set_transfer_mode(model, True)
    set_cached_fraction(model, cached_fraction, cached_max)
    model.train()  # far keys drawn as in training
    layers = hybrid_layers(model)
    graph_bytes = [0]

    def step(ids):
        saved = []

        def pack(t):
            saved.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
            loss = torch.stack([layer.transfer_losses["mse"] for layer in layers]).mean()
        graph_bytes[0] = sum(saved)
        loss.backward()

    n_layers = len(layers)
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.checkpointing]
    print(f"{args.model}: {n_layers} layers, {heads} heads x {head_dim}; {args.threads} threads; "
          f"attention {args.recipe or attention}, cached_fraction={cached_fraction}, cached_max={cached_max}; "
          f"best of {args.repeats}")
    print(f"{'length':>7} {'ckpt':>5} {'step s':>8} {'tok/s':>8} {'graph MiB':>10} {'frozen fwd s':>13} "
          f"{'teacher mask s':>15} {'teacher causal s':>17} {'teacher saved/step':>19}")
    out_rows = []
    for base in rows:
        ids = torch.randint(0, cfg.vocab_size, (1, base["length"]))
        for ckpt in modes:
            set_activation_checkpointing(model, ckpt, transfer=True)
            row = {**base, "activation_checkpointing": ckpt}
            torch.manual_seed(0)
            row["step_s"] = timed(lambda: step(ids), args.repeats)
            row["graph_mib"] = graph_bytes[0] / 2 ** 20
            row["tokens_per_s"] = row["length"] / row["step_s"]
            saved = n_layers * (row["teacher_attn_mask_s_per_layer"] - row["teacher_attn_causal_s_per_layer"])
            row["teacher_saved_s_per_step"] = saved
            row["tokens_per_s_before"] = row["length"] / (row["step_s"] + saved)
            print(f"{row['length']:7d} {str(ckpt):>5} {row['step_s']:8.2f} {row['tokens_per_s']:8.0f} "
                  f"{row['graph_mib']:10.0f} {row['frozen_forward_s']:13.2f} "
                  f"{n_layers * row['teacher_attn_mask_s_per_layer']:15.2f} "
                  f"{n_layers * row['teacher_attn_causal_s_per_layer']:17.2f} {saved:19.2f}", flush=True)
            out_rows.append(row)
    if args.out:
        write_json_atomic(Path(args.out), {"model": args.model, "threads": args.threads,
                                           "attention": args.recipe or attention, "cached_fraction": cached_fraction,
                                           "cached_max": cached_max,
                                           "rows": out_rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
