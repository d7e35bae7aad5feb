"""A ten-second report on a linearized checkpoint: what `bash scripts/demo.sh` prints at the end.

    python -m lola_eval.report --linearized runs/smollm2/export/model [--teacher embedded:smollm2]

Measured here (one 1024-token window, one passkey prompt; 9.5 min wall / 5 min CPU with a 2048-token window on
the shared 2-core box under load 4, for the untrained convert:embedded:smollm2 stand-in):

- held-out perplexity (Paul Graham essays; the smollm2 recipe trains on ShareGPT + Wikipedia) of the teacher and
  of the linearized model in constant memory (``lola:64:0``), by position of the predicted token;
- one passkey probe (noise haystack, 1024 tokens, needle at the middle) for the teacher and the linearized model
  without the sparse cache (``lola:64:0``) and with it (``lola:64:256``, trained fusion and LoLA's own fusion);
- the bytes per sequence each cache holds (measured from its tensors), and what the same bytes buy the teacher
  as a compressed KV cache (``lola_eval.baselines``);
- where the full evaluation lives (``python -m lola_eval.suite``), with its heatmap.

Writes ``<out>/report.json`` and ``<out>/report.md``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Sequence

PROBE_CACHES = ("lola:64:0", "lola:64:256", "lola:64:256:lola_code")


def _fmt_bytes(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def build(args) -> dict:
    import torch

    from .baselines import lola_budget_bytes, pairs_for_budget
    from .loading import CacheSpec, load_source, set_cache
    from .passkey import PasskeyBuilder, answer_complete, parse_answer
    from .perplexity import held_out_text, perplexity, token_windows
    from .streaming import greedy_generate

    t0 = time.perf_counter()
    text = held_out_text("essays")
    out: dict = {"teacher": args.teacher, "linearized": args.linearized, "ppl": {}, "passkey": [], "bytes": {}}
    sample = None
    for label, source, caches in (("teacher", args.teacher, ["full"]),
                                  ("linearized", args.linearized, ["lola:64:0", *PROBE_CACHES[1:]])):
        model, tok = load_source(source)
        if sample is None:
            sample = PasskeyBuilder(tok, "repeat").build(args.passkey_length, 0.5, seed=0, index=0)
            windows = token_windows(tok, text, args.seq_len, 1)
        for cache in caches:
            spec = set_cache(model, CacheSpec.parse(cache))
            if cache in ("full", "lola:64:0"):
                r = perplexity(model, windows)
                out["ppl"][label] = {"cache": spec.label, "ppl": r["ppl"], "tokens": r["tokens"],
                                     "buckets": {k: v["ppl"] for k, v in r["buckets"].items()}}
            g = greedy_generate(model, torch.tensor([sample.ids]), max_new_tokens=12,
                                eos_token_id=tok.eos_token_id, stop=answer_complete(tok))
            answer = tok.decode(g.new_ids)
            out["passkey"].append({"model": label, "cache": spec.label, "expected": sample.answer,
                                   "answer": answer.strip(), "correct": parse_answer(answer) == sample.answer,
                                   "cache_bytes_per_seq": g.cache_bytes})
            out["bytes"][f"{label} {spec.label}"] = g.cache_bytes
        if label == "linearized":
            dtype_bytes = next(model.parameters()).element_size()
            budget = lola_budget_bytes(model.config, "lola:64:256", dtype_bytes, model.config.lola_attention)
            out["equal_memory_pairs"] = pairs_for_budget(model.config, budget, dtype_bytes)
        del model
    out["seconds"] = time.perf_counter() - t0
    return out


def render(r: dict, *, results_dir: str | None) -> str:
    t, lin = r["ppl"]["teacher"], r["ppl"]["linearized"]
    names = list(t["buckets"])
    lines = [f"## Quality report: {r['linearized']} vs its teacher {r['teacher']}", "",
             f"Held-out perplexity ({t['tokens'] + 1} essay tokens; teacher = full KV cache, linearized = "
             f"{lin['cache']} in constant memory), by position of the predicted token:", "",
             "| | " + " | ".join(names) + " | all |", "|---|" + "---|" * (len(names) + 1),
             "| teacher | " + " | ".join(f"{t['buckets'][n]:.1f}" for n in names) + f" | {t['ppl']:.1f} |",
             "| linearized | " + " | ".join(f"{lin['buckets'].get(n, float('nan')):.1f}" for n in names)
             + f" | {lin['ppl']:.1f} |",
             "| ratio | " + " | ".join(f"{lin['buckets'].get(n, float('nan')) / t['buckets'][n]:.2f}x" for n in names)
             + f" | {lin['ppl'] / t['ppl']:.2f}x |", "",
             f"Passkey probe (1024-token noise haystack, needle in the middle, key {r['passkey'][0]['expected']}):", "",
             "| model | cache | answer | found | bytes per sequence |", "|---|---|---|---|---|"]
    for p in r["passkey"]:
        lines.append(f"| {p['model']} | {p['cache']} | {p['answer']!r} | {'yes' if p['correct'] else 'no'} | "
                     f"{_fmt_bytes(p['cache_bytes_per_seq'])} |")
    lines += ["", "Bytes: the teacher's KV cache grows with the context (the number above is at 1K tokens); "
              "LoLA's state is constant at any length. The bytes of lola:64:256 would hold "
              f"{r.get('equal_memory_pairs', '?')} KV pairs per KV head for the teacher (sink / tova baselines, "
              "`lola_eval.baselines`).", ""]
    if results_dir and (Path(results_dir) / "results.md").exists():
        lines.append(f"Full results: {results_dir}/results.md, heatmap {results_dir}/passkey.png.")
    lines.append("Full evaluation (passkey 1K-4K, both haystacks, RULER, lm-eval, perplexity by bucket, equal-memory "
                 f"baselines): python -m lola_eval.suite --linearized {r['linearized']} --teacher-caches "
                 "full,sink@lola:64:256,tova@lola:64:256 --caches lola:64:0,lola:64:256,window:64 --haystacks "
                 "repeat,essay --out results/<name>  (hours on 2 cores; see BENCHMARKS.md)")
    lines.append(f"(report computed in {r['seconds']:.0f} s)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lola_eval.report", description=__doc__.split("\n\n")[0])
    p.add_argument("--linearized", required=True, help="exported checkpoint folder (or convert:<source>)")
    p.add_argument("--teacher", default="embedded:smollm2")
    p.add_argument("--seq-len", type=int, default=1024, help="held-out tokens for the perplexity")
    p.add_argument("--passkey-length", type=int, default=1024)
    p.add_argument("--results", default="results/equal_memory", help="where the full suite results are, if run")
    p.add_argument("--out", default=None, help="folder for report.json / report.md (default: next to the model)")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not args.linearized.startswith("convert:") and not (Path(args.linearized) / "config.json").exists():
        raise SystemExit(f"--linearized {args.linearized}: no config.json there; run the pipeline's export stage "
                         "first (bash scripts/demo.sh)")
    r = build(args)
    text = render(r, results_dir=args.results)
    out = Path(args.out) if args.out else (Path(args.linearized).parent.parent / "report"
                                           if not args.linearized.startswith("convert:") else Path("results/report"))
    from lola_train.atomic import write_json_atomic

    write_json_atomic(out / "report.json", r)
    (out / "report.md").write_text(text + "\n")
    print("\n" + text + f"\n\n(written to {out / 'report.md'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
