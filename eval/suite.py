"""One command for the whole evaluation of a linearized model against its teacher and against what a user would
pick instead (the teacher with a compressed KV cache at the same bytes): passkey retrieval (noise and essay
haystacks, by length x depth, for each cache), lm-eval tasks (local, offline), RULER needle tasks, held-out
perplexity (overall and by position bucket), a markdown results table with the cache bytes per sequence beside
every number, a heatmap with every row, and the learned mixing factors sigma(w) by layer.

    python -m lola_eval.suite --linearized runs/smollm2/export/model --out results
    python -m lola_eval.suite --linearized convert:embedded:smollm2 --out /tmp/quick --quick   # minutes

Equal memory: ``--teacher-caches full,sink@lola:64:256,tova@lola:64:256`` sizes the StreamingLLM and TOVA baselines
(``lola_eval.baselines``) to the bytes per sequence of the LoLA cache ``lola:64:256`` on the same model and dtype
(with the linearized checkpoint's attention config when it is an exported folder); ``--caches
lola:64:0,lola:64:256,window:64`` are the linearized rows (G = 0, LoLA, and the linear branch switched off).

Every unit of work writes its own JSON under ``--out`` and is skipped when that file exists (``--force`` reruns),
so an interrupted suite resumes, and parts can be run on different days or machines:

    passkey/<model>[_<cache>][_essay]_<L>/passkey.json   one folder per (model, cache, haystack, length)
    lm_eval/<model>_<cache>.json                          lm-eval results (accuracy per task)
    ruler/<model>_<cache>_<L>.json                        RULER niah_* at one length
    perplexity/<model>_<cache>.json                       perplexity on held-out text, with position buckets
    mixing.json                                           sigma(w) per head and layer of the linearized model
    results.md, results.json, passkey.png                 the merged tables, data and heatmap
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


def _dir_name(label: str, cache: str, length: int | None = None, haystack: str = "repeat") -> str:
    name = label if cache == "full" and label == "teacher" else f"{label}_{cache.replace(':', '-')}"
    if haystack != "repeat":
        name = f"{name}_{haystack}"
    return name if length is None else f"{name}_{length}"


def _haystacks(args) -> list[str]:
    return [h for h in (args.haystacks or args.haystack).split(",") if h]


def run_passkey(args, label: str, source: str, cache: str, out: Path) -> None:
    from . import passkey

    for haystack in _haystacks(args):
        for length in args.passkey_lengths.split(","):
            folder = out / "passkey" / _dir_name(label, cache, int(length), haystack)
            if (folder / "passkey.json").exists() and not args.force:
                print(f"[suite] passkey {label} {cache} {haystack} {length}: done ({folder}), skipped")
                continue
            argv = ["--lengths", length, "--depths", args.passkey_depths, "--n", str(args.passkey_n),
                    "--out", str(folder), "--prefill-chunk", str(args.prefill_chunk), "--haystack", haystack,
                    "--device", args.device]
            if args.memory_budget_mb:
                argv += ["--memory-budget-mb", str(args.memory_budget_mb)]
            argv += (["--teacher", source, "--teacher-caches", cache] if label == "teacher"
                     else ["--linearized", source, "--caches", cache])
            passkey.main(argv)


def _model_args(source: str, cache: str) -> str:
    """lm-eval model_args of the registered 'lola' model for a (source, cache spec)."""
    from .loading import CacheSpec

    spec = CacheSpec.parse(cache)
    model_args = f"pretrained={source.removeprefix('convert:')}"
    if source.startswith("convert:"):
        model_args += ",convert=true"
    if spec.kind == "full":
        return model_args + ",cache=none"
    if spec.is_baseline:
        return model_args + f",cache={spec.label}"
    if spec.kind == "window":
        raise ValueError(f"cache {cache!r} (linear branch off) is not wired into lm-eval; use passkey / perplexity")
    return model_args + (f",cache=lola,window={spec.window},global={spec.global_size},mixing={spec.mixing},"
                         f"gqa={spec.gqa}" + (f",dedup={spec.dedup:g}" if spec.dedup else "") +
                         (f",cache_weight={spec.cache_weight:g}" if spec.cache_weight != 1.0 else "") +
                         (f",chunk={spec.chunk_size}" if spec.chunk_size is not None else "") +
                         (f",window_mode={spec.window_mode}" if spec.window_mode != "auto" else ""))


def run_ruler(args, label: str, source: str, cache: str, out: Path) -> None:
    """RULER niah_* tasks at each of ``--ruler-lengths`` (one lm-eval run per length, ``--ruler-limit`` items per
    task: lm-eval's limit takes the first items, which would otherwise all be of the first length)."""
    from .harness import evaluate

    for length in args.ruler_lengths.split(","):
        path = out / "ruler" / f"{_dir_name(label, cache, int(length))}.json"
        if path.exists() and not args.force:
            print(f"[suite] ruler {label} {cache} {length}: done ({path}), skipped")
            continue
        model_args = _model_args(source, cache)
        t0 = time.perf_counter()
        res = evaluate("lola", args.ruler_tasks.split(","), limit=args.ruler_limit, batch_size=1,
                       model_args=model_args, metadata={"max_seq_lengths": [int(length)]},
                       gen_kwargs=f"max_gen_toks={args.ruler_gen_toks}")
        scores = {task: metrics.get(f"{length},none") for task, metrics in res["results"].items()}
        n = {task: v.get("effective") for task, v in res.get("n-samples", {}).items()}
        from lola_train.atomic import write_json_atomic

        write_json_atomic(path, {"model": label, "source": source, "cache": cache, "model_args": model_args,
                                 "length": int(length), "limit": args.ruler_limit, "max_gen_toks": args.ruler_gen_toks,
                                 "scores": scores, "n": n, "seconds": time.perf_counter() - t0})
        print(f"[suite] ruler {label} {cache} {length}: {scores} -> {path}")


def run_lm_eval(args, label: str, source: str, cache: str, out: Path) -> None:
    from .harness import evaluate

    path = out / "lm_eval" / f"{_dir_name(label, cache)}.json"
    if path.exists() and not args.force:
        print(f"[suite] lm-eval {label} {cache}: done ({path}), skipped")
        return
    model_args = _model_args(source, cache)
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
                     "--seq-len", str(args.ppl_seq_len), "--n-seq", str(args.ppl_n), "--out", str(path),
                     "--device", args.device])


def _mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:.2f}"


def collect(out: Path) -> dict:
    """Merge every part's JSON under ``out`` into {'passkey': rows, 'cells': cells, 'lm_eval': [...],
    'perplexity': [...], 'ruler': [...], 'mixing': {...} | None}. Passkey rows and cells carry their 'haystack'."""
    from .passkey import CellResult, summarize

    cells, rows = [], []
    by_haystack: dict[str, list] = {}
    for f in sorted((out / "passkey").glob("*/passkey.json")):
        data = json.loads(f.read_text())
        haystack = data.get("config", {}).get("haystack", "repeat")
        for c in data["cells"]:
            c = CellResult(**{k: v for k, v in c.items() if k != "accuracy"})
            c.haystack = haystack
            by_haystack.setdefault(haystack, []).append(c)
            cells.append(c)
    for haystack, cs in by_haystack.items():
        rows += [{**r, "haystack": haystack} for r in summarize(cs)]
    lm = [json.loads(f.read_text()) for f in sorted((out / "lm_eval").glob("*.json"))]
    ppl = [r for f in sorted((out / "perplexity").glob("*.json")) for r in json.loads(f.read_text())["rows"]]
    ruler = [json.loads(f.read_text()) for f in sorted((out / "ruler").glob("*.json"))]
    mixing = json.loads((out / "mixing.json").read_text()) if (out / "mixing.json").exists() else None
    return {"passkey": rows, "cells": cells, "lm_eval": lm, "perplexity": ppl, "ruler": ruler, "mixing": mixing}


def _order(keys) -> list:
    """(model, cache) rows in the order a reader compares them: teacher full, teacher baselines, linearized rows."""
    def rank(k):
        model, cache = k
        kind = cache.split(":")[0].split("@")[0]
        return (0 if model == "teacher" else 1, {"full": 0, "sink": 1, "tova": 2, "lola": 3, "window": 4}.get(kind, 5),
                cache)
    return sorted(set(keys), key=rank)


def _bytes_of(data: dict, model: str, cache: str) -> float | None:
    """Largest measured cache bytes per sequence of a row (passkey and perplexity runs)."""
    known = [x["cache_bytes_per_seq"] for x in data["passkey"] + data["perplexity"]
             if x["model"] == model and x["cache"] == cache and x.get("cache_bytes_per_seq")]
    return max(known) if known else None


def format_equal_memory(data: dict) -> str:
    """One row per (model, cache): passkey accuracy per haystack x length, perplexity overall and its ratio to the
    teacher's full cache, and the bytes per sequence (largest measured)."""
    pk = data["passkey"]
    if not pk and not data["perplexity"]:
        return ""
    cols = sorted({(r["haystack"], r["length"]) for r in pk}, key=lambda x: (x[0] != "repeat", x[0], x[1]))
    keys = _order([(r["model"], r["cache"]) for r in pk + data["perplexity"]])
    teacher = next((r for r in data["perplexity"] if r["model"] == "teacher" and r["cache"] == "full"), None)
    names = {"repeat": "noise", "essay": "essay"}
    head = ("| model | cache | " + " | ".join(f"{names.get(h, h)} {length // 1024 if length % 1024 == 0 else length}"
                                            f"{'K' if length % 1024 == 0 else ''}" for h, length in cols)
            + " | ppl (x teacher) | cache MiB/seq |")
    lines = [head, "|---|---|" + "---|" * (len(cols) + 2)]
    by = {(r["model"], r["cache"], r["haystack"], r["length"]): r for r in pk}
    for model, cache in keys:
        cells = []
        for h, length in cols:
            r = by.get((model, cache, h, length))
            cells.append("" if r is None or r["accuracy"] is None else f"{r['accuracy']:.2f} ({r['n']})")
        p = next((r for r in data["perplexity"] if r["model"] == model and r["cache"] == cache), None)
        ppl = "" if p is None else f"{p['ppl']:.2f}" + (f" ({p['ppl'] / teacher['ppl']:.2f}x)" if teacher else "")
        nbytes = _bytes_of(data, model, cache)
        lines.append(f"| {model} | {cache} | " + " | ".join(cells) + f" | {ppl} | "
                     f"{'' if nbytes is None else _mib(nbytes)} |")
    return "\n".join(lines)


def format_buckets(data: dict) -> str:
    """Perplexity by position bucket of the predicted token, each with its ratio to the teacher's full cache."""
    rows = [r for r in data["perplexity"] if r.get("buckets")]
    if not rows:
        return ""
    names = list(dict.fromkeys(b for r in rows for b in r["buckets"]))
    teacher = next((r for r in rows if r["model"] == "teacher" and r["cache"] == "full"), None)
    lines = ["| model | cache | " + " | ".join(names) + " | all |", "|---|---|" + "---|" * (len(names) + 1)]
    for model, cache in _order([(r["model"], r["cache"]) for r in rows]):
        r = next(x for x in rows if x["model"] == model and x["cache"] == cache)
        cells = []
        for name in names + ["all"]:
            b = r["buckets"].get(name) if name != "all" else {"ppl": r["ppl"]}
            if b is None:
                cells.append("")
                continue
            t = (teacher["buckets"].get(name) if name != "all" else {"ppl": teacher["ppl"]}) if teacher else None
            cells.append(f"{b['ppl']:.2f}" + (f" ({b['ppl'] / t['ppl']:.2f}x)" if t and r is not teacher else ""))
        lines.append(f"| {model} | {cache} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_ruler(data: dict) -> str:
    rows = data["ruler"]
    if not rows:
        return ""
    tasks = sorted({t for r in rows for t in r["scores"]})
    lengths = sorted({r["length"] for r in rows})
    cols = [(t, length) for t in tasks for length in lengths]
    lines = ["| model | cache | " + " | ".join(f"{t} {length}" for t, length in cols) + " |",
             "|---|---|" + "---|" * len(cols)]
    by = {(r["model"], r["cache"], r["length"]): r for r in rows}
    for model, cache in _order([(r["model"], r["cache"]) for r in rows]):
        cells = []
        for t, length in cols:
            r = by.get((model, cache, length))
            v = None if r is None else r["scores"].get(t)
            cells.append("" if v is None else f"{v:.2f} ({r['n'].get(t)})")
        lines.append(f"| {model} | {cache} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_mixing(mixing: dict | None) -> str:
    """sigma(w) per layer: mean, min, max over heads, then every head."""
    if not mixing:
        return ""
    lines = [f"sigma(w) per head of `{mixing['source']}` (softmax-window weight against the linear terms; the "
             "'lolcats' fusion weights linear terms by 1, 'lola_code' by 1 - sigma):", "",
             "| layer | mean | min | max | per head |", "|---|---|---|---|---|"]
    for i, heads in enumerate(mixing["sigma"]):
        lines.append(f"| {i} | {sum(heads) / len(heads):.3f} | {min(heads):.3f} | {max(heads):.3f} | "
                     + " ".join(f"{x:.2f}" for x in heads) + " |")
    return "\n".join(lines)


def write_mixing(source: str, out: Path) -> dict:
    """Load the linearized model and write its sigma(w) by layer to ``out/mixing.json`` (always refreshed)."""
    from lola_train.atomic import write_json_atomic

    from .loading import load_source, mixing_factors_by_layer

    model, _ = load_source(source)
    data = {"source": source, "sigma": mixing_factors_by_layer(model)}
    write_json_atomic(out / "mixing.json", data)
    return data


def heatmap_grid(cells, path: Path) -> Path:
    """Passkey accuracy by depth (rows) x length (columns): one panel per (model, cache) and haystack, every row of
    the tables side by side (haystacks one above the other)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    haystacks = sorted({c.haystack for c in cells}, key=lambda h: (h != "repeat", h))
    keys = _order([(c.model, c.cache) for c in cells])
    lengths = sorted({c.length for c in cells})
    depths = sorted({c.depth for c in cells})
    fig, axes = plt.subplots(len(haystacks), len(keys), squeeze=False,
                             figsize=(1.0 + (0.55 * len(lengths) + 0.6) * len(keys), 0.5 + 2.4 * len(haystacks)))
    by = {(c.haystack, c.model, c.cache, c.length, c.depth): c for c in cells}
    image = None
    for row, haystack in enumerate(haystacks):
        for col, (model, cache) in enumerate(keys):
            ax = axes[row][col]
            grid = np.full((len(depths), len(lengths)), np.nan)
            for i, d in enumerate(depths):
                for j, length in enumerate(lengths):
                    c = by.get((haystack, model, cache, length, d))
                    if c is not None and c.accuracy is not None:
                        grid[i, j] = c.accuracy
                        ax.text(j, i, f"{c.accuracy:.1f}", ha="center", va="center", fontsize=7)
            image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
            ax.set_xticks(range(len(lengths)), [f"{x // 1024}K" if x % 1024 == 0 else str(x) for x in lengths],
                          fontsize=7)
            ax.set_yticks(range(len(depths)), [str(x) for x in depths] if col == 0 else [], fontsize=7)
            ax.set_title(f"{model}\n{cache}" if row == 0 else "", fontsize=8)
            if col == 0:
                ax.set_ylabel(f"{'noise' if haystack == 'repeat' else haystack}\nneedle depth", fontsize=8)
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="passkey accuracy")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


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


def format_results(data: dict, *, kv_per_token: int | None = None, notes: Sequence[str] = ()) -> str:
    from .passkey import format_table

    parts = []
    equal = format_equal_memory(data)
    if equal:
        parts += ["### At equal memory: passkey accuracy (n), perplexity and bytes per sequence", "", *notes,
                  "" if notes else None, equal, ""]
        parts = [x for x in parts if x is not None]
    for haystack in sorted({r["haystack"] for r in data["passkey"]}, key=lambda h: (h != "repeat", h)):
        rows = [r for r in data["passkey"] if r["haystack"] == haystack]
        name = "noise ('repeat')" if haystack == "repeat" else haystack
        parts += [f"### Passkey retrieval, {name} haystack (accuracy over depths, n samples; cache MiB per sequence "
                  "after the prompt)", "", format_table(rows), ""]
    buckets = format_buckets(data)
    if buckets:
        parts += ["### Perplexity by position of the predicted token (ratio to the teacher's full cache)", "",
                  buckets, ""]
    if data["ruler"]:
        parts += ["### RULER needle tasks (lm-eval, score (n) per task and length)", "", format_ruler(data), ""]
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
                nbytes = _bytes_of(data, r["model"], r["cache"])
                mem = f"{_mib(nbytes)} MiB (constant)" if nbytes else "constant"
            lines.append(f"| {r['model']} | {r['cache']} | " + " | ".join(cells) + f" | {mem} |")
        parts += ["### lm-eval (local offline tasks, 0-shot)", "", *lines, ""]
    if data["perplexity"]:
        lines = ["| model | cache | perplexity | tokens | cache MiB/seq at the end |", "|---|---|---|---|---|"]
        for r in data["perplexity"]:
            lines.append(f"| {r['model']} | {r['cache']} | {r['ppl']:.3f} | {r['tokens']} | "
                         f"{_mib(r['cache_bytes_per_seq'])} |")
        parts += ["### Perplexity (held-out text)", "", *lines, ""]
    if data.get("mixing"):
        parts += ["### Learned mixing factors sigma(w) by layer", "", format_mixing(data["mixing"]), ""]
    return "\n".join(parts)


def _source_config(source: str):
    """The (text) config of a source without loading weights, or None."""
    try:
        from transformers import AutoConfig

        from lola_train.models import EMBEDDED_SMOLLM2, smollm2_dir

        path = source.removeprefix("convert:")
        path = smollm2_dir() if path == EMBEDDED_SMOLLM2 else path
        return AutoConfig.from_pretrained(path, trust_remote_code=True)
    except Exception:  # noqa: BLE001 - the caller says what it falls back to
        return None


def resolve_teacher_caches(args) -> tuple[list[str], list[str]]:
    """Concrete teacher cache specs (``sink@lola:W:G`` -> ``sink:4:N``) and a note per budget-sized one. The
    budget is the LoLA cache's bytes per sequence on the teacher's shape in float32 (the suite's dtype), with the
    linearized checkpoint's attention config when it is an exported folder (default AttentionConfig() else)."""
    from .baselines import describe_budget, lola_budget_bytes, size_to_budget
    from .loading import CacheSpec

    specs = [CacheSpec.parse(c) for c in args.teacher_caches.split(",") if c.strip()]
    bad = [s.label for s in specs if s.needs_linearized]
    if bad:
        raise SystemExit(f"--teacher-caches: {bad} need a linearized model; the teacher takes full, sink:S:W, tova:N, "
                         "sink@lola:W:G, tova@lola:W:G")
    if not any(s.budget for s in specs):
        return [s.label for s in specs], []
    cfg = _source_config(args.teacher)
    if cfg is None:
        raise SystemExit(f"--teacher-caches: cannot read the config of --teacher {args.teacher!r} to size the baselines")
    lin = _source_config(args.linearized) if args.linearized and not args.linearized.startswith("convert:") else None
    attention = getattr(lin, "lola_attention", None)
    out, notes = [], []
    for s in specs:
        if s.budget is None:
            out.append(s.label)
            continue
        budget = lola_budget_bytes(cfg, s.budget, 4, attention)
        concrete = size_to_budget(s.kind, cfg, budget, 4, sinks=s.sinks or 4)
        out.append(concrete)
        notes.append(f"- `{concrete}` = `{s.label}`: the bytes of LoLA `{s.budget}` on this model in float32, "
                     f"{describe_budget(cfg, budget, 4)}.")
    return out, notes


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lola_eval.suite", description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default="embedded:smollm2")
    p.add_argument("--teacher-caches", default="full",
                   help="teacher caches: full and the baselines sink:S:W, tova:N, or sized to a LoLA cache's bytes: "
                        "sink@lola:64:256, tova@lola:64:256 (lola_eval.baselines)")
    p.add_argument("--linearized", required=False, help="exported checkpoint folder or convert:<source>")
    p.add_argument("--caches", default=DEFAULT_CACHES,
                   help="caches of the linearized model (passkey, perplexity): lola:W:G[:lola_code], window:W "
                        "(linear branch off), full")
    p.add_argument("--lm-eval-caches", default="full", help="caches of the linearized model for lm-eval")
    p.add_argument("--parts", default="passkey,lm_eval,perplexity",
                   help="comma-separated: passkey, lm_eval, perplexity, ruler")
    p.add_argument("--passkey-lengths", default="1024,2048,4096")
    p.add_argument("--passkey-depths", default="0.1,0.5,0.9")
    p.add_argument("--passkey-n", type=int, default=20)
    p.add_argument("--haystack", default="repeat", help="passkey haystack (see --haystacks)")
    p.add_argument("--haystacks", default=None, help="comma-separated passkey haystacks: repeat (noise), essay")
    p.add_argument("--prefill-chunk", type=int, default=1024)
    p.add_argument("--memory-budget-mb", type=float, default=None)
    p.add_argument("--tasks", default="piqa_local,arc_easy_local")
    p.add_argument("--limit", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--ruler-tasks", default="niah_single_1,niah_single_2,niah_single_3")
    p.add_argument("--ruler-lengths", default="1024,2048,4096")
    p.add_argument("--ruler-limit", type=int, default=10, help="items per RULER task and length")
    p.add_argument("--ruler-gen-toks", type=int, default=64,
                   help="max generated tokens per RULER item (RULER's own is 128; the answer comes first, and a "
                        "UUID (niah_single_3) takes ~40 SmolLM2 tokens: 32 cut it off)")
    p.add_argument("--ruler-teacher-caches", default=None,
                   help="teacher caches for RULER (default: --teacher-caches)")
    p.add_argument("--ruler-caches", default="lola:64:256",
                   help="linearized caches for RULER (lola:W:G[:lola_code] or full)")
    p.add_argument("--ppl-text", default="essays")
    p.add_argument("--ppl-seq-len", type=int, default=2048)
    p.add_argument("--ppl-n", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="tiny sizes to check the wiring (minutes, not hours)")
    p.add_argument("--force", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="auto",
                   help="passkey and perplexity: auto (CUDA when present, else cpu), cpu, cuda or cuda:N")
    p.add_argument("--out", default="results")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    if args.quick:
        args.passkey_lengths, args.passkey_n, args.limit = "512", 3, 8
        args.ppl_seq_len, args.ppl_n = 256, 1
        args.ruler_lengths, args.ruler_limit = "1024", 2
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    parts = [x for x in args.parts.split(",") if x]
    bad = [x for x in parts if x not in ("passkey", "lm_eval", "perplexity", "ruler")]
    if bad:
        raise SystemExit(f"--parts: unknown {bad}; choose from passkey, lm_eval, perplexity, ruler")
    notes: list[str] = []
    runs = []
    if args.teacher:
        teacher_caches, notes = resolve_teacher_caches(args)
        for note in notes:
            print(f"[suite] {note[2:]}")
        runs.append(("teacher", args.teacher, teacher_caches))
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
        if "ruler" in parts:
            if label == "teacher":
                ruler_caches = caches
                if args.ruler_teacher_caches is not None:
                    saved = args.teacher_caches
                    args.teacher_caches = args.ruler_teacher_caches
                    ruler_caches, _ = resolve_teacher_caches(args)
                    args.teacher_caches = saved
            else:
                ruler_caches = [c for c in args.ruler_caches.split(",") if c]
            for cache in ruler_caches:
                run_ruler(args, label, source, cache, out)
    if args.linearized and parts:
        mixing = write_mixing(args.linearized, out)
        print("\n" + format_mixing(mixing))
    data = collect(out)
    table = format_results(data, kv_per_token=kv_bytes_per_token(args.teacher) if args.teacher else None,
                           notes=notes)
    if data["cells"]:
        heatmap_grid(data["cells"], out / "passkey.png")
    (out / "results.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps({k: v for k, v in data.items() if k != "cells"}, indent=2))
    print("\n" + table)
    print(f"[suite] wrote {out / 'results.md'}, {out / 'results.json'}" +
          (f", {out / 'passkey.png'}" if data["cells"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
