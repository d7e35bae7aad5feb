"""Benchmark the LoLA cache on the converted SmolLM2-135M (CPU) against the unconverted model's softmax attention
(SDPA) with transformers' DynamicCache. Prints markdown tables and writes JSON.

    python scripts/bench_lola.py --out bench_lola.json [--contexts 1024 16384 65536] [--prefill 512 2048 8192 32768]
        [--batches 1 4] [--max-sdpa-seconds 240] [--lola-cache 'window=64 global=768 gqa=kv_max dedup=0.98']
        [--attention 'linear_decay=256 feature_map_rope=false sink_tokens=4 mixing=lola_code']
    python scripts/bench_lola.py --profile 2048 --out profile.json [--lola-cache ...] [--attention ...]

``--lola-cache`` (a LoLA cache spec, default 'window=64 global=256') and ``--attention`` (key=value options of the
conversion, on top of window 64 sw) set what the LoLA side runs; the weights are the untrained conversion either
way (the cost does not depend on them).

Every point runs in a fresh subprocess (honest peak RSS), with the same settings for LoLA and SDPA, so their ratio
is fair even when the machine is shared. Three parts:

* decode (batch 1): per-token decode time and peak RSS with a cache holding ``context`` tokens. To keep the run
  short on a CPU, the state is *synthetic*: a real 64-token prefill, then the softmax KV cache is extended with
  random keys and values to ``context`` tokens, and the LoLA cache's position counters are advanced to ``context``
  (its tensors have fixed sizes, so the decode cost is the one of a real state). Points whose estimated KV cache
  exceeds ``--max-gib`` are skipped with the estimate printed.
* prefill (batch 1 and 4): wall time of a real prompt of each length. LoLA: ``lola_train.lola.prefill`` in
  ``--chunk``-token model calls (peak memory independent of the prompt length); softmax: one forward with a
  DynamicCache (SDPA). An SDPA point longer than ``--sdpa-always-upto`` tokens whose time, extrapolated from the
  shorter lengths of its batch size (a + b L + c L^2 through the last three), exceeds ``--max-sdpa-seconds`` is
  skipped with the estimate.
* bytes per sequence (formula, checked against the allocation by tests/test_lola_model.py) for SmolLM2,
  Llama-3.2-1B and Llama-3.1-8B shapes, bf16 k/v, fp32 H and s.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

LOLA = os.environ.get("BENCH_LOLA_CACHE", "window=64 global=256")
ATTENTION = os.environ.get("BENCH_ATTENTION", "")
DECODE_TOKENS = 8
THREADS = int(os.environ.get("BENCH_THREADS", "1"))  # the CPU is shared: 1 thread avoids spin contention


def rss_peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load(kind: str):
    import torch

    from lola_train.convert import convert
    from lola_train.models import load_model

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    model, _ = load_model("embedded:smollm2")
    if kind == "lola":
        convert(model, dict(dict(window_size=64, window_layout="sw", chunk_size=64), **attention_options()))
    return model.eval()


def attention_options() -> dict:
    """``--attention 'k=v ...'`` as typed values (ints, floats, true/false/null)."""
    import yaml

    return {key: yaml.safe_load(value) for key, _, value in (item.partition("=") for item in ATTENTION.split())}


def point_decode(kind: str, context: int, batch: int) -> dict:
    import torch
    from transformers import DynamicCache

    from lola_train.modeling.lola_cache import LolaCache

    model = load(kind)
    ids = torch.randint(0, model.config.vocab_size, (batch, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        if kind == "lola":
            cache = LolaCache(model.config, LOLA)
            model(ids, cache=cache)
            shift = context - 64
            for layer in cache.layers:  # as if `context` real tokens had been seen (fixed-size tensors)
                layer.seen += shift
                layer.real_seen += shift
                layer.first_live += shift
                layer.state_at += shift
                layer.cache_pos += torch.where(layer.cache_pos >= 0, shift, 0).to(layer.cache_pos.dtype)
            cache_bytes = cache.nbytes()
        else:
            cache = DynamicCache(config=model.config)
            model(ids, cache=cache)
            g = torch.Generator().manual_seed(1)
            for layer in cache.layers:
                b, h, n, d = layer.keys.shape
                layer.keys = torch.cat([torch.randn(b, h, context - n, d, generator=g), layer.keys], 2)
                layer.values = torch.cat([torch.randn(b, h, context - n, d, generator=g), layer.values], 2)
            cache_bytes = sum(l.keys.numel() * 4 * 2 for l in cache.layers)
        assert cache.get_seq_length() == context
        tok = ids[:, -1:]
        times = []
        for _ in range(DECODE_TOKENS):
            t = time.perf_counter()
            logits = model(tok, cache=cache).logits
            times.append(time.perf_counter() - t)
            tok = logits[:, -1:].argmax(-1)
    times = sorted(times[1:])  # first call warms up
    return dict(part="decode", kind=kind, context=context, batch=batch, ms_per_token=1000 * times[len(times) // 2],
                cache_mib=cache_bytes / 2 ** 20, peak_rss_mib=rss_peak_mib())


def point_prefill(kind: str, length: int, batch: int, chunk: int) -> dict:
    import torch
    from transformers import DynamicCache

    from lola_train.lola import prefill
    from lola_train.modeling.lola_cache import LolaCache

    model = load(kind)
    ids = torch.randint(0, model.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(0))
    rss_loaded = rss_peak_mib()
    with torch.no_grad():
        t = time.perf_counter()
        if kind == "lola":
            prefill(model, ids, LolaCache(model.config, LOLA), chunk_tokens=chunk)
        else:
            model(ids, cache=DynamicCache(config=model.config), logits_to_keep=1)
        seconds = time.perf_counter() - t
    return dict(part="prefill", kind=kind, length=length, batch=batch, seconds=seconds,
                tokens_per_s=batch * length / seconds, rss_after_load_mib=rss_loaded, peak_rss_mib=rss_peak_mib())


def profile_prefill(length: int, chunk: int, rows: int = 15) -> dict:
    """Where a LoLA prefill of ``length`` tokens (batch 1) spends its time: torch.profiler's self CPU time per op
    (after a 256-token warm-up), next to the wall time of the same prompt through SDPA. Prints a table."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import DynamicCache

    from lola_train.lola import prefill
    from lola_train.modeling.lola_cache import LolaCache

    times = {}
    for kind in ("sdpa", "lola"):
        model = load(kind)
        ids = torch.randint(0, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))

        def run(x):
            if kind == "lola":
                prefill(model, x, LolaCache(model.config, LOLA), chunk_tokens=chunk)
            else:
                model(x, cache=DynamicCache(config=model.config), logits_to_keep=1)
        with torch.no_grad():
            run(ids[:, :256])
            t = time.perf_counter()
            if kind == "lola":
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    run(ids)
            else:
                run(ids)
            times[kind] = time.perf_counter() - t
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in ops) / 1e6
    top = [dict(op=e.key, self_s=e.self_cpu_time_total / 1e6, calls=e.count) for e in ops[:rows]]
    print(f"prefill {length} tokens, batch 1, {THREADS} threads: SDPA {times['sdpa']:.2f} s "
          f"({length / times['sdpa']:.0f} tok/s); LoLA {times['lola']:.2f} s under the profiler "
          f"({length / times['lola']:.0f} tok/s), profiled self CPU {total:.2f} s\n")
    print("| op | self CPU s | share | calls |\n|---|---|---|---|")
    for r in top:
        print(f"| {r['op']} | {r['self_s']:.2f} | {r['self_s'] / total:.0%} | {r['calls']} |")
    return dict(part="profile", length=length, sdpa_seconds=times["sdpa"], lola_seconds_profiled=times["lola"],
                profiled_self_cpu_s=total, top_ops=top)


def run_point(args: list[str]) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, __file__, "--point", *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"point {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def extrapolate(points: list[tuple[int, float]], length: int) -> float | None:
    """Seconds at ``length`` from a + b L + c L^2 through the last three (length, seconds) points (a line through
    two, None with fewer)."""
    import numpy as np

    pts = points[-3:]
    if len(pts) < 2:
        return None
    xs, ys = np.array([p[0] for p in pts], float), np.array([p[1] for p in pts], float)
    coeffs = np.polyfit(xs, ys, len(pts) - 1)
    return float(max(np.polyval(coeffs, length), ys[-1] * length / xs[-1]))


def main() -> None:
    global LOLA, ATTENTION
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench_lola.json")
    ap.add_argument("--contexts", type=int, nargs="*", default=[1024, 16384, 65536])
    ap.add_argument("--prefill", type=int, nargs="*", default=[512, 2048, 8192, 32768])
    ap.add_argument("--batches", type=int, nargs="*", default=[1, 4])
    ap.add_argument("--chunk", type=int, default=512, help="LoLA prefill tokens per model call")
    ap.add_argument("--max-gib", type=float, default=10.0)
    ap.add_argument("--max-sdpa-seconds", type=float, default=240.0)
    ap.add_argument("--sdpa-always-upto", type=int, default=8192, help="SDPA points up to this length always run")
    ap.add_argument("--lola-cache", default=LOLA, help="LoLA cache spec of the lola side, e.g. 'window=64 global=256'")
    ap.add_argument("--attention", default=ATTENTION, help="conversion options of the lola side, 'key=value ...'")
    ap.add_argument("--profile", type=int, metavar="TOKENS",
                    help="instead of the tables: where one LoLA prefill of TOKENS spends its time (torch.profiler)")
    ap.add_argument("--point", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ["BENCH_LOLA_CACHE"], os.environ["BENCH_ATTENTION"] = args.lola_cache, args.attention  # for the points
    if args.profile:
        LOLA, ATTENTION = args.lola_cache, args.attention
        result = profile_prefill(args.profile, args.chunk)
        with open(args.out, "w") as f:
            json.dump(dict(lola=args.lola_cache, attention=args.attention, chunk=args.chunk, threads=THREADS,
                           **result), f, indent=1)
        print(f"\nwrote {args.out}")
        return
    if args.point:
        part, kind, *rest = args.point
        if part == "decode":
            print(json.dumps(point_decode(kind, int(rest[0]), int(rest[1]))))
        else:
            print(json.dumps(point_prefill(kind, int(rest[0]), int(rest[1]), int(rest[2]))))
        return

    from lola_train.lola import bytes_table, format_bytes_table

    results = []
    print("## decode (SmolLM2-135M, fp32, batch 1, median of", DECODE_TOKENS - 1, "tokens)")
    print("| context | kind | ms/token | cache MiB | peak RSS MiB |\n|---|---|---|---|---|")
    for ctx in args.contexts:
        for kind in ("softmax", "lola"):
            kv_gib = 30 * 2 * 3 * ctx * 64 * 4 / 2 ** 30
            if kind == "softmax" and kv_gib + 1.5 > args.max_gib:
                print(f"| {ctx} | {kind} | skipped: estimated {kv_gib:.1f} GiB KV cache | | |")
                continue
            r = run_point(["decode", kind, str(ctx), "1"])
            results.append(r)
            print(f"| {ctx} | {kind} | {r['ms_per_token']:.1f} | {r['cache_mib']:.1f} | {r['peak_rss_mib']:.0f} |",
                  flush=True)
    print(f"\n## prefill (real prompt; LoLA in {args.chunk}-token calls, softmax in one call)")
    print("| length | batch | kind | seconds | tokens/s | peak RSS MiB |\n|---|---|---|---|---|---|")
    for batch in args.batches:
        done: list[tuple[int, float]] = []
        for n in args.prefill:
            for kind in ("softmax", "lola"):
                guess = extrapolate(done, n) if kind == "softmax" and n > args.sdpa_always_upto else None
                if guess is not None and guess > args.max_sdpa_seconds:
                    results.append(dict(part="prefill", kind=kind, length=n, batch=batch, skipped=True,
                                        estimated_seconds=guess))
                    print(f"| {n} | {batch} | {kind} | skipped: estimated {guess:.0f} s | | |", flush=True)
                    continue
                r = run_point(["prefill", kind, str(n), str(batch), str(args.chunk)])
                results.append(r)
                if kind == "softmax":
                    done.append((n, r["seconds"]))
                print(f"| {n} | {batch} | {kind} | {r['seconds']:.2f} | {r['tokens_per_s']:.0f} | "
                      f"{r['peak_rss_mib']:.0f} |", flush=True)
    from lola_train.modeling.lola_cache import LolaCacheConfig

    rows = bytes_table(settings=[LolaCacheConfig(global_size=0), LolaCacheConfig(global_size=256),
                                 LolaCacheConfig(global_size=256, gqa_selection="kv_mean"),
                                 LolaCacheConfig(window=256, global_size=256, window_mode="chunk")],
                       contexts=(1024, 4096, 16384, 32768))
    print("\n## bytes per sequence (bf16 k/v, fp32 H and s, feature width 128)")
    print(format_bytes_table(rows))
    results += [dict(part="bytes", **r) for r in rows]
    with open(args.out, "w") as f:
        json.dump(dict(lola=args.lola_cache, attention=args.attention, chunk=args.chunk, threads=THREADS,
                       results=results), f, indent=2)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
