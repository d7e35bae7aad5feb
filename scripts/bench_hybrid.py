#!/usr/bin/env python
"""Benchmark: chunked vs quadratic-reference hybrid attention on CPU, one layer of SmolLM2's shape.

Each (method, length, mode) point runs in a fresh subprocess so its peak RSS is its own. Points whose estimated
memory exceeds --max-gb are skipped with the estimate printed. Prints a table and writes JSON.

    python scripts/bench_hybrid.py                       # 1K, 4K, 16K; fwd and fwd+bwd
    python scripts/bench_hybrid.py --lengths 1024 4096 --modes fwd
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

# one SmolLM2-135M layer: 9 query heads (KV expanded), head_dim 64, Hedgehog D=128, window 64
SHAPE = dict(batch=1, heads=9, head_dim=64, feature_width=128, window=64, chunk=64)


def estimate_gb(method: str, length: int, mode: str) -> float:
    h, d, dd = SHAPE["heads"], SHAPE["head_dim"], SHAPE["feature_width"]
    inputs = 4 * h * length * (3 * d + 2 * dd)
    if method == "reference":
        work = 4 * h * length * length * (6 if mode == "fwd" else 12)  # several [H,L,L] fp32 tensors
    else:
        c, w = SHAPE["chunk"], SHAPE["window"]
        p = -(-(w - 1) // c)
        work = 4 * h * length * ((p + 1) * c * (6 if mode == "fwd" else 12) + 2 * dd * d // c + 4 * d)
    return (inputs * (2 if mode != "fwd" else 1) + work) / 2**30


def run_point(method: str, length: int, mode: str, repeats: int) -> dict:
    import torch

    from lola_train.modeling.hybrid_ops import hybrid_attention_chunked, hybrid_attention_reference

    torch.manual_seed(0)
    b, h, d, dd = SHAPE["batch"], SHAPE["heads"], SHAPE["head_dim"], SHAPE["feature_width"]
    q, k, v = (torch.randn(b, h, length, d) for _ in range(3))
    fq, fk = (torch.softmax(torch.randn(b, h, length, dd), -1) for _ in range(2))
    sigma, ell = torch.full((h,), 0.1), torch.ones(h)
    tensors = [q, k, v, fq, fk]
    if mode == "fwd+bwd":
        tensors = [t.requires_grad_(True) for t in tensors]
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    fn = hybrid_attention_reference if method == "reference" else hybrid_attention_chunked
    kw = {} if method == "reference" else {"chunk_size": SHAPE["chunk"]}
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        if mode == "fwd":
            with torch.no_grad():
                fn(*tensors, sigma, ell, window=SHAPE["window"], layout="sw", **kw)
        else:
            fn(*tensors, sigma, ell, window=SHAPE["window"], layout="sw", **kw).sum().backward()
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"method": method, "length": length, "mode": mode, "seconds": min(times),
            "peak_rss_gb": peak, "work_rss_gb": peak - base_rss, "tokens_per_s": length / min(times)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    ap.add_argument("--methods", nargs="+", default=["chunked", "reference"])
    ap.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--max-gb", type=float, default=12.0)
    ap.add_argument("--out", default="bench_results/hybrid_attention.json")
    ap.add_argument("--one", nargs=3, metavar=("METHOD", "LENGTH", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_point(args.one[0], int(args.one[1]), args.one[2], args.repeats)))
        return
    rows = []
    for mode in args.modes:
        for length in args.lengths:
            for method in args.methods:
                est = estimate_gb(method, length, mode)
                if est > args.max_gb:
                    rows.append({"method": method, "length": length, "mode": mode, "skipped": True,
                                 "estimated_gb": est})
                    continue
                out = subprocess.run([sys.executable, __file__, "--one", method, str(length), mode,
                                      "--repeats", str(args.repeats)], capture_output=True, text=True, check=True)
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(f"  done {method} {length} {mode}", file=sys.stderr)
    print(f"\nhybrid attention, one layer (B=1, H=9, d=64, D=128, W=64 sw, C=64), CPU fp32, "
          f"best of {args.repeats} (min is robust to other load on the CPU)")
    print(f"{'mode':8} {'length':>7} {'method':10} {'seconds':>9} {'tok/s':>10} {'peak RSS GB':>12} "
          f"{'added GB':>9}")
    for r in rows:
        if r.get("skipped"):
            print(f"{r['mode']:8} {r['length']:>7} {r['method']:10} {'skipped: needs ~%.0f GB' % r['estimated_gb']:>43}")
        else:
            print(f"{r['mode']:8} {r['length']:>7} {r['method']:10} {r['seconds']:>9.4f} {r['tokens_per_s']:>10.0f} "
                  f"{r['peak_rss_gb']:>12.2f} {r['work_rss_gb']:>9.2f}")
    done = {(r["method"], r["mode"], r["length"]): r["seconds"] for r in rows if not r.get("skipped")}
    for mode in args.modes:
        ls = sorted(length for (m, md, length) in done if m == "chunked" and md == mode)
        for a, b in zip(ls, ls[1:]):
            ratio = done[("chunked", mode, b)] / done[("chunked", mode, a)]
            print(f"chunked {mode}: time({b})/time({a}) = {ratio:.2f} (length ratio {b / a:.0f})")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"shape": SHAPE, "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
