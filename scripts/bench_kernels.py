#!/usr/bin/env python
"""Benchmark the hybrid attention: Triton kernels vs the chunked PyTorch path vs softmax attention (SDPA).

Prefill rows: forward and forward+backward at each length, tokens/s (batch * length / time) and peak memory.
Decode rows: latency of one new token against a context of length L for
  sdpa         softmax attention over the whole KV cache (grows with L),
  hybrid-full  the hybrid function recomputed over the whole context (Lq=1; backend 'auto', which leaves
               decode-sized queries to the PyTorch reference; on CUDA also hybrid-full-triton, the kernels forced),
  hybrid-state the constant-memory step: softmax over the last W keys + fq S / fq z (flat in L).

  python scripts/bench_kernels.py                      # CUDA: 1K-32K, Llama-3-8B-like heads (32 q / 8 kv, d 128)
  python scripts/bench_kernels.py --device cpu         # PyTorch rows only, small sizes (runs anywhere)
  TRITON_INTERPRET=1 python scripts/bench_kernels.py --device cpu --impls triton chunked sdpa --lengths 80
                                                       # the triton rows in Triton's CPU interpreter (a smoke run)

On CUDA the 'sdpa' rows use FlashAttention when PyTorch has it for these shapes (checked once; the JSON's
config.sdpa_backend says which), else PyTorch's default SDPA dispatch.

Prints a table and writes JSON (default bench_results/bench_kernels_<device>.json). Memory: on CUDA the peak
allocated bytes above the inputs (torch.cuda.max_memory_allocated); on CPU the peak RSS growth sampled every
millisecond (approximate). The feature maps are computed outside the timed region (fq, fk are inputs).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lola_train.modeling.hybrid_ops import BACKENDS, hybrid_attention, hybrid_attention_reference

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


IMPLS = ("triton", "triton-tf32", "chunked", "sdpa")


def uses_kernels(impls) -> bool:
    """Whether any of ``impls`` runs the Triton kernels (the triton* rows)."""
    return any(name.startswith("triton") for name in impls)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--lengths", type=int, nargs="+", help="prefill lengths (default: cuda 1K-32K, cpu 256-1024)")
    ap.add_argument("--decode-lengths", type=int, nargs="+", help="decode context lengths")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, help="query heads (default: cuda 32, cpu 4)")
    ap.add_argument("--kv-heads", type=int, help="KV heads (default: heads / 4)")
    ap.add_argument("--head-dim", type=int, help="d (default: cuda 128, cpu 64)")
    ap.add_argument("--feature-dim", type=int, default=64, help="F; the Hedgehog feature width is D = 2F")
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--layout", choices=("sw", "tk"), default="tk")
    ap.add_argument("--chunk-size", type=int, default=64, help="C of the chunked PyTorch path")
    ap.add_argument("--dtype", choices=tuple(DTYPES), help="q/k/v dtype (default: cuda bf16, cpu fp32)")
    ap.add_argument("--precision", choices=("ieee", "tf32"), default="ieee", help="tl.dot precision of the kernels")
    ap.add_argument("--impls", nargs="+",
                    help="prefill implementations among triton, triton-tf32, chunked, sdpa (default: "
                         "cuda triton, chunked, sdpa; cpu the PyTorch two; triton* on cpu needs TRITON_INTERPRET=1). "
                         "Diagnostic of the kernels' speed: triton-tf32 runs their dots in TF32 (--precision for "
                         "all)")
    ap.add_argument("--no-decode", action="store_true", help="prefill rows only")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is visible; use --device cpu")
    args.lengths = args.lengths or ([1024, 2048, 4096, 8192, 16384, 32768] if cuda else [256, 512, 1024])
    args.decode_lengths = args.decode_lengths or ([1024, 4096, 16384, 65536] if cuda else [256, 1024, 4096])
    args.heads = args.heads or (32 if cuda else 4)
    args.kv_heads = args.kv_heads or max(1, args.heads // 4)
    args.head_dim = args.head_dim or (128 if cuda else 64)
    args.dtype = DTYPES[args.dtype or ("bf16" if cuda else "fp32")]
    args.out = args.out or Path("bench_results") / f"bench_kernels_{args.device}.json"
    args.impls = args.impls or (["triton", "chunked", "sdpa"] if cuda else ["chunked", "sdpa"])
    if args.heads % args.kv_heads:
        ap.error(f"--heads {args.heads} must be a multiple of --kv-heads {args.kv_heads}")
    for name in args.impls:
        if name not in IMPLS:
            ap.error(f"--impls: unknown implementation {name!r}; choose among {', '.join(IMPLS)}")
    if uses_kernels(args.impls) and not cuda and os.environ.get("TRITON_INTERPRET") != "1":
        ap.error("--impls triton on --device cpu runs the kernels in Triton's interpreter: set TRITON_INTERPRET=1")
    return args


# ---------------------------------------------------------------------------------------------------------------
# measurement

def exact_cpu_rss() -> bool:
    """Make freed tensor memory leave the RSS at once (glibc: large blocks always mmap'd), so sampled RSS tracks
    live memory. Returns False where mallopt is unavailable."""
    try:
        import ctypes
        return ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024) == 1  # M_MMAP_THRESHOLD = 128 KiB, fixed
    except (OSError, AttributeError):
        return False


class PeakMemory:
    """Peak memory above the level at entry, in MiB: CUDA allocator stats, or sampled RSS on CPU."""

    def __init__(self, device: str):
        self.device = device
        self.peak_mb = float("nan")

    def __enter__(self):
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            import psutil
            self.proc = psutil.Process()
            self.base = self.proc.memory_info().rss
            self.peak = self.base
            self.stop = threading.Event()
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.001)

    def __exit__(self, *exc):
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak_mb = (torch.cuda.max_memory_allocated() - self.base) / 2 ** 20
        else:
            self.stop.set()
            self.thread.join()
            self.peak = max(self.peak, self.proc.memory_info().rss)
            self.peak_mb = (self.peak - self.base) / 2 ** 20
        return False


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, warmup, repeats):
    """Median wall time of fn() in seconds and the peak memory of one call."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    with PeakMemory(device) as mem:
        fn()
    return statistics.median(times), mem.peak_mb


# ---------------------------------------------------------------------------------------------------------------
# implementations: fn(q, k, v, fq, fk, sigma, ell) -> y, with k, v on KV heads

def make_impls(args):
    groups = args.heads // args.kv_heads
    kw = dict(window=args.window, layout=args.layout)

    def chunked(q, k, v, fq, fk, sigma, ell):
        k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
        return hybrid_attention(q, k, v, fq, fk, sigma, ell, chunk_size=args.chunk_size, backend="chunked", **kw)

    def sdpa(q, k, v, fq, fk, sigma, ell):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=groups > 1)

    impls = {"chunked": chunked, "sdpa": sdpa}
    args.sdpa_backend = "default"
    if args.device == "cuda" and "sdpa" in args.impls:
        flash = flash_sdpa(args)
        if flash is not None:
            impls["sdpa"], args.sdpa_backend = flash, "flash"
    if uses_kernels(args.impls):  # CUDA, or CPU under TRITON_INTERPRET=1 (checked in parse_args)
        import lola_kernels  # noqa: F401  (registers BACKENDS['triton'])

        def triton_impl(precision):
            def run(q, k, v, fq, fk, sigma, ell):
                return lola_kernels.hybrid_attention_triton(q, k, v, fq, fk, sigma, ell, precision=precision, **kw)
            return run

        impls["triton"] = triton_impl(args.precision)
        impls["triton-tf32"] = triton_impl("tf32")
    return {name: fn for name, fn in impls.items() if name in args.impls}


def flash_sdpa(args):
    """SDPA restricted to the FlashAttention backend, if it runs these shapes (GQA included); else None."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        return None
    groups = args.heads // args.kv_heads

    def flash(q, k, v, fq, fk, sigma, ell):
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=groups > 1)

    q, k, v = (torch.randn(1, h, 128, args.head_dim, device="cuda", dtype=args.dtype)
               for h in (args.heads, args.kv_heads, args.kv_heads))
    try:
        flash(q, k, v, None, None, None, None)
    except RuntimeError:
        return None
    return flash


def make_inputs(args, length, requires_grad, q_len=None):
    dev, dt = args.device, args.dtype
    b, h, hk, d, feat = args.batch, args.heads, args.kv_heads, args.head_dim, 2 * args.feature_dim
    q_len = length if q_len is None else q_len
    q = torch.randn(b, h, q_len, d, device=dev, dtype=dt)
    k = torch.randn(b, hk, length, d, device=dev, dtype=dt)
    v = torch.randn(b, hk, length, d, device=dev, dtype=dt)
    fq = torch.softmax(torch.randn(b, h, q_len, feat, device=dev), -1)
    fk = torch.softmax(torch.randn(b, h, length, feat, device=dev), -1)
    sigma = torch.full((h,), 0.1, device=dev)
    ell = torch.ones(h, device=dev)
    out = [q, k, v, fq, fk, sigma, ell]
    if requires_grad:
        for t in out:
            t.requires_grad_()
    return out


def check_against_reference(args, impls):
    """Each hybrid implementation vs hybrid_attention_reference at a small length (the table is only worth
    reading if this holds)."""
    length = min(args.lengths[0], 512)
    inputs = make_inputs(args, length, requires_grad=False)
    groups = args.heads // args.kv_heads
    q, k, v, fq, fk, sigma, ell = inputs
    want = hybrid_attention_reference(q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1), fq, fk,
                                      sigma, ell, window=args.window, layout=args.layout).float()
    errors = {}
    for name, fn in impls.items():
        if name != "sdpa":
            errors[name] = (fn(*inputs).float() - want).abs().max().item()
    return length, errors


def bench_prefill(args, impls):
    rows = []
    for length in args.lengths:
        for name, fn in impls.items():
            for mode in ("fwd", "fwd+bwd"):
                row = dict(kind="prefill", impl=name, mode=mode, length=length, batch=args.batch)
                try:
                    inputs = make_inputs(args, length, requires_grad=mode != "fwd")
                    if mode == "fwd":
                        def step():
                            with torch.no_grad():
                                fn(*inputs)
                    else:
                        dy = torch.randn(args.batch, args.heads, length, args.head_dim, device=args.device,
                                         dtype=args.dtype)

                        def step():
                            for t in inputs:
                                t.grad = None
                            fn(*inputs).backward(dy)
                    sec, mem = timed(step, args.device, args.warmup, args.repeats)
                    row.update(ms=sec * 1e3, tokens_per_s=args.batch * length / sec, peak_mem_mb=mem)
                except torch.cuda.OutOfMemoryError:
                    row.update(error="out of memory")
                except Exception as e:  # a failing kernel costs its rows, not the table
                    first = str(e).strip().splitlines()
                    row.update(error=f"{type(e).__name__}: {first[0][:300] if first else ''}")
                finally:
                    inputs = None
                    if args.device == "cuda":
                        torch.cuda.empty_cache()
                rows.append(row)
                print(format_row(row), flush=True)
    return rows


def state_decode_step(q, k_win, v_win, fq, s_state, z_state, sigma, ell):
    """One token with constant memory: q, fq [B,H,1,*]; k_win, v_win [B,H,<=W,d] (the keys of its window);
    s_state [B,H,D,d] and z_state [B,H,D] sum every older key. Same function as the reference ('sw')."""
    qf = q.float()
    s = (qf @ k_win.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    m = s.amax(-1, keepdim=True)
    p = torch.exp(s - m)
    sig, el = sigma.view(1, -1, 1, 1), ell.view(1, -1, 1, 1)
    num = sig * (p @ v_win.float()) + el * (fq @ s_state)
    den = sig * p.sum(-1, keepdim=True) + el * (fq @ z_state.unsqueeze(-1))
    return (num / den).to(q.dtype)


def bench_decode(args):
    rows = []
    groups = args.heads // args.kv_heads
    w = args.window
    for length in args.decode_lengths:
        q, k, v, fq, fk, sigma, ell = make_inputs(args, length, requires_grad=False, q_len=1)
        kx, vx = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
        older = slice(0, max(length - w, 0))
        s_state = fk[:, :, older].transpose(-1, -2) @ vx[:, :, older].float()
        z_state = fk[:, :, older].sum(2)
        k_win, v_win = kx[:, :, -w:], vx[:, :, -w:]
        elem = args.dtype.itemsize
        kv_bytes = 2 * args.batch * args.kv_heads * length * args.head_dim * elem
        state_bytes = (2 * args.batch * args.heads * min(w, length) * args.head_dim * elem
                       + s_state.numel() * 4 + z_state.numel() * 4)
        cases = {
            "sdpa": (lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=groups > 1), kv_bytes),
            "hybrid-full": (lambda: hybrid_attention(q, kx, vx, fq, fk, sigma, ell, window=w, layout="sw",
                                                     backend="auto"), kv_bytes + fk.numel() * 4),
            "hybrid-state": (lambda: state_decode_step(q, k_win, v_win, fq, s_state, z_state, sigma, ell),
                             state_bytes),
        }
        if args.device == "cuda" and "triton" in args.impls:  # the kernels forced on one query ('auto' declines)
            cases["hybrid-full-triton"] = (lambda: hybrid_attention(q, kx, vx, fq, fk, sigma, ell, window=w,
                                                                    layout="sw", backend="triton"),
                                           kv_bytes + fk.numel() * 4)
        if length <= 4096:  # the state step is the same function: check it before timing it
            want = hybrid_attention_reference(q, kx, vx, fq, fk, sigma, ell, window=w, layout="sw").float()
            err = (cases["hybrid-state"][0]().float() - want).abs().max().item()
            tol = 1e-4 if args.dtype == torch.float32 else 3e-2
            if err > tol:
                raise SystemExit(f"hybrid-state decode differs from the reference by {err:.3g} at L={length}")
        for name, (fn, memory_bytes) in cases.items():
            row = dict(kind="decode", impl=name, context=length, batch=args.batch, memory_mb=memory_bytes / 2 ** 20)
            with torch.no_grad():
                try:
                    sec, _ = timed(fn, args.device, args.warmup, max(args.repeats, 10))
                    row.update(ms=sec * 1e3)
                except torch.cuda.OutOfMemoryError:
                    row.update(error="out of memory")
            rows.append(row)
            print(format_row(row), flush=True)
    return rows


def format_row(row):
    if row["kind"] == "prefill":
        head = f"prefill  {row['impl']:<8} {row['mode']:<8} L={row['length']:<6}"
        if "error" in row:
            return f"{head} {row['error']}"
        return (f"{head} {row['ms']:10.2f} ms {row['tokens_per_s']:12.0f} tok/s "
                f"{row['peak_mem_mb']:10.1f} MiB peak")
    head = f"decode   {row['impl']:<13}     ctx={row['context']:<6}"
    if "error" in row:
        return f"{head} {row['error']}"
    return f"{head} {row['ms']:10.3f} ms/token {row['memory_mb']:10.2f} MiB cache/state"


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(0)
    impls = make_impls(args)
    config = {k: (str(v) if isinstance(v, (Path, torch.dtype)) else v) for k, v in vars(args).items()}
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({os.cpu_count()} cores)"
    print(f"device: {device_name}  torch {torch.__version__}  backends: {', '.join(BACKENDS)}")
    print(f"B={args.batch} H={args.heads} H_kv={args.kv_heads} d={args.head_dim} D={2 * args.feature_dim} "
          f"W={args.window} layout={args.layout} dtype={config['dtype']} kernel precision={args.precision}")
    if args.device == "cpu" and uses_kernels(args.impls):
        print("note: the triton rows run in Triton's CPU interpreter (TRITON_INTERPRET=1): not a timing")
    length, errors = check_against_reference(args, impls)
    print(f"max |y - reference| at L={length}: " + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()))
    print(f"sdpa backend: {args.sdpa_backend}")
    rows = bench_prefill(args, impls) + ([] if args.no_decode else bench_decode(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(device=device_name, torch=torch.__version__, config=config,
                                        reference_check=dict(length=length, max_abs_error=errors),
                                        rows=rows), indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    # a process-wide malloc setting, so only when run as a script (not when a test imports main)
    if not exact_cpu_rss():
        print("note: could not fix the malloc mmap threshold; CPU peak memory may read low")
    sys.exit(main())
