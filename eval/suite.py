"""One command for the whole evaluation of a linearized model against its teacher: passkey retrieval (by length x
depth, for each cache), lm-eval tasks (local, offline), held-out perplexity, and a markdown results table with
the cache bytes per sequence beside every number.

    python -m lola_eval.suite --linearized runs/smollm2/export/model --out results
    python -m lola_eval.suite --linearized convert:embedded:smollm2 --out /tmp/quick --quick   # minutes

Every unit of work writes its own JSON under ``--out`` and is skipped when that file exists (``--force`` reruns),
so an interrupted suite resumes, and parts can be run on different days or machines:

    passkey/<model>_<L>/passkey.json           teacher (cache full), one folder per length
    passkey/<model>_<cache>_<L>/passkey.json   linearized, one folder per (cache, length)
    lm_eval/<model>_<cache>.json               lm-eval results (accuracy per task)
    perplexity/<model>_<cache>.json            perplexity on held-out text
    results.md, results.json, passkey.png      the merged table, data and heatmap
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Sequence

DEFAULT_CACHES = "lola:64:0,lola:64:64,lola:64:256"


def _dir_name(label: str, cache: str, length: int | None = None) -> str:
    name = label if cache == "full" and label == "teacher" else f"{label}_{cache.replace(':', '-')}"
    return name if length is None else f"{name}_{length}"


def run_passkey(args, label: str, source: str, cache: str, out: Path) -> None:
    from . import passkey

    for length in args.passkey_lengths.split(","):
        folder = out / "passkey" / _dir_name(label, cache, int(length))
        if (folder / "passkey.json").exists() and not args.force:
            print(f"[suite] passkey {label} {cache} {length}: done ({folder}), skipped")
            continue
        argv = ["--lengths", length, "--depths", args.passkey_depths, "--n", str(args.passkey_n),
                "--out", str(folder), "--prefill-chunk", str(args.prefill_chunk), "--haystack", args.haystack]
        if args.memory_budget_mb:
            argv += ["--memory-budget-mb", str(args.memory_budget_mb)]
        argv += ["--teacher", source] if label == "teacher" else ["--linearized", source, "--caches", cache]
        passkey.main(argv)


def run_lm_eval(args, label: str, source: str, cache: str, out: Path) -> None:
    from .harness import evaluate
    from .loading import CacheSpec

    path = out / "lm_eval" / f"{_dir_name(label, cache)}.json"
    if path.exists() and not args.force:
        print(f"[suite] lm-eval {label} {cache}: done ({path}), skipped")
        return
    spec = CacheSpec.parse(cache)
    model_args = f"pretrained={source.removeprefix('convert:')}"
    if source.startswith("convert:"):
        model_args += ",convert=true"
    if spec.kind == "full":
        model_args += ",cache=none"
    else:
        model_args += f",cache=lola,window={spec.window},global={spec.global_size},mixing={spec.mixing}"
    t0 = time.perf_counter()
    res = evaluate("lola", args.tasks.split(","), limit=args.limit, batch_size=args.batch_size,
                   model_args=model_args)
    results = {task: {k.split(",")[0]: v for k, v in metrics.items() if isinstance(v, (int, float))}
               for task, metrics in res["results"].items()}
    n = {task: v.get("effective") for task, v in res.get("n-samples", {}).items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"model": label, "source": source, "cache": cache, "model_args": model_args,
                                "limit": args.limit, "results": results, "n": n,
                                "seconds": time.perf_counter() - t0}, indent=2))
    print(f"[suite] lm-eval {label} {cache}: {results} -> {path}")


def run_perplexity(args, label: str, source: str, cache: str, out: Path) -> None:
    from . import perplexity

    path = out / "perplexity" / f"{_dir_name(label, cache)}.json"
    if path.exists() and not args.force:
        print(f"[suite] perplexity {label} {cache}: done ({path}), skipped")
        return
    perplexity.main(["--model", f"{label}={source}", "--caches", cache, "--text", args.ppl_text,
                     "--seq-len", str(args.ppl_seq_len), "--n-seq", str(args.ppl_n), "--out", str(path)])


def _mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:.2f}"


def collect(out: Path) -> dict:
    """Merge every part's JSON under ``out`` into {'passkey': rows, 'cells': cells, 'lm_eval': [...],
    'perplexity': [...]}."""
    from .passkey import CellResult, summarize

    cells = []
    for f in sorted((out / "passkey").glob("*/passkey.json")):
        for c in json.loads(f.read_text())["cells"]:
            c = {k: v for k, v in c.items() if k != "accuracy"}
            cells.append(CellResult(**c))
    lm = [json.loads(f.read_text()) for f in sorted((out / "lm_eval").glob("*.json"))]
    ppl = [r for f in sorted((out / "perplexity").glob("*.json")) for r in json.loads(f.read_text())["rows"]]
    return {"passkey": summarize(cells), "cells": cells, "lm_eval": lm, "perplexity": ppl}


def kv_bytes_per_token(source: str) -> int | None:
    """Bytes per token of context of the softmax KV cache for a source's config (no weights loaded)."""
    try:
        from transformers import AutoConfig

        from lola_train.models import EMBEDDED_SMOLLM2, smollm2_dir

        path = smollm2_dir() if source.removeprefix("convert:") == EMBEDDED_SMOLLM2 else source.removeprefix("convert:")
        cfg = AutoConfig.from_pretrained(path, trust_remote_code=True)
    except Exception:  # noqa: BLE001 - only used to annotate the table
        return None
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    return 2 * cfg.num_hidden_layers * kv_heads * head_dim * 4  # float32


def format_results(data: dict, *, kv_per_token: int | None = None) -> str:
    from .passkey import format_table

    parts = []
    if data["passkey"]:
        parts += ["### Passkey retrieval (accuracy over depths, n samples; cache MiB per sequence after the prompt)",
                  "", format_table(data["passkey"]), ""]
    if data["lm_eval"]:
        tasks = sorted({t for r in data["lm_eval"] for t in r["results"]})
        head = "| model | cache | " + " | ".join(f"{t} acc / acc_norm (n)" for t in tasks) + " | cache bytes/seq |"
        lines = [head, "|---|---|" + "---|" * (len(tasks) + 1)]
        for r in data["lm_eval"]:
            cells = []
            for t in tasks:
                m = r["results"].get(t, {})
                norm = f" / {m['acc_norm']:.3f}" if "acc_norm" in m else ""
                cells.append(f"{m.get('acc', float('nan')):.3f}{norm} ({r['n'].get(t)})" if m else "")
            if r["cache"] == "full":
                mem = f"KV: {kv_per_token / 1024:.1f} KiB per token" if kv_per_token else "KV (grows)"
            else:  # LoLA state: constant, measured in the passkey / perplexity runs of the same (model, cache)
                known = [x["cache_bytes_per_seq"] for x in data["passkey"] + data["perplexity"]
                         if x["model"] == r["model"] and x["cache"] == r["cache"] and x["cache_bytes_per_seq"]]
                mem = f"{_mib(max(known))} MiB (constant)" if known else "constant"
            lines.append(f"| {r['model']} | {r['cache']} | " + " | ".join(cells) + f" | {mem} |")
        parts += ["### lm-eval (local offline tasks, 0-shot)", "", *lines, ""]
    if data["perplexity"]:
        lines = ["| model | cache | perplexity | tokens | cache MiB/seq at the end |", "|---|---|---|---|---|"]
        for r in data["perplexity"]:
            lines.append(f"| {r['model']} | {r['cache']} | {r['ppl']:.3f} | {r['tokens']} | "
                         f"{_mib(r['cache_bytes_per_seq'])} |")
        parts += ["### Perplexity (held-out text)", "", *lines, ""]
    return "\n".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lola_eval.suite", description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default="embedded:smollm2")
    p.add_argument("--linearized", required=False, help="exported checkpoint folder or convert:<source>")
    p.add_argument("--caches", default=DEFAULT_CACHES, help="caches of the linearized model (passkey, perplexity)")
    p.add_argument("--lm-eval-caches", default="full", help="caches of the linearized model for lm-eval")
    p.add_argument("--parts", default="passkey,lm_eval,perplexity")
    p.add_argument("--passkey-lengths", default="1024,2048,4096")
    p.add_argument("--passkey-depths", default="0.1,0.5,0.9")
    p.add_argument("--passkey-n", type=int, default=20)
    p.add_argument("--haystack", default="repeat")
    p.add_argument("--prefill-chunk", type=int, default=1024)
    p.add_argument("--memory-budget-mb", type=float, default=None)
    p.add_argument("--tasks", default="piqa_local,arc_easy_local")
    p.add_argument("--limit", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--ppl-text", default="essays")
    p.add_argument("--ppl-seq-len", type=int, default=2048)
    p.add_argument("--ppl-n", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="tiny sizes to check the wiring (minutes, not hours)")
    p.add_argument("--force", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="results")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    if args.quick:
        args.passkey_lengths, args.passkey_n, args.limit = "512", 3, 8
        args.ppl_seq_len, args.ppl_n = 256, 1
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    parts = [x for x in args.parts.split(",") if x]
    bad = [x for x in parts if x not in ("passkey", "lm_eval", "perplexity")]
    if bad:
        raise SystemExit(f"--parts: unknown {bad}; choose from passkey, lm_eval, perplexity")
    runs = [("teacher", args.teacher, ["full"])] if args.teacher else []
    if args.linearized:
        runs.append(("linearized", args.linearized, [c for c in args.caches.split(",") if c]))
    for label, source, caches in runs:
        for cache in caches:
            if "passkey" in parts:
                run_passkey(args, label, source, cache, out)
            if "perplexity" in parts:
                run_perplexity(args, label, source, cache, out)
        if "lm_eval" in parts:
            for cache in (["full"] if label == "teacher" else args.lm_eval_caches.split(",")):
                run_lm_eval(args, label, source, cache, out)
    data = collect(out)
    table = format_results(data, kv_per_token=kv_bytes_per_token(args.teacher) if args.teacher else None)
    if data["cells"]:
        from .passkey import heatmap

        heatmap(data["cells"], out / "passkey.png")
    (out / "results.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps({k: v for k, v in data.items() if k != "cells"}, indent=2))
    print("\n" + table)
    print(f"[suite] wrote {out / 'results.md'}, {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
