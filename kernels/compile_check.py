"""Compile the hybrid-attention and LoLA kernels for an NVIDIA target without a GPU (Triton -> PTX -> cubin with ptxas).

The interpreter checks the math on CPU; this checks what only the real compiler sees: types of loop-carried
values, dot shapes, layouts, and the shared memory each kernel needs against the target's limit. Run it in a
process where TRITON_INTERPRET is not set (the decorator must produce compilable kernels):

    python -m lola_kernels.compile_check            # sm_90 (H100), the default configurations
    python -m lola_kernels.compile_check --arch 80  # sm_80 (A100)

For each size it compiles the five hybrid kernels for both layouts (mixing 'lolcats', no sinks), then the three
attention kernels again for the other variants ('lolcats' + sinks, 'lola_code', 'lola_code' + sinks: the
constexprs MIXING and SB select different code), then the LoLA kernels.
"""
from __future__ import annotations

import argparse
import json
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import hybrid as kh
from . import lola as kl

SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}  # bytes of shared memory per block (opt-in max)

_INT_ARGS = {"Lq", "Lk", "H", "G", "NB", "n0", "P", "W", "SHIFT", "NS", "d", "D"}


def _signature(kernel, io_dtype: str, constexprs: dict) -> dict:
    """Triton signature strings: q/k/v/dy in io_dtype, feature maps and work buffers fp32, the mask int8, the
    sink positions and arg-max positions int32."""
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in _INT_ARGS:
            sig[name] = "i32"
        elif name == "scale":
            sig[name] = "fp32"
        elif name in ("Q", "K", "V", "DO"):
            sig[name] = f"*{io_dtype}"
        elif name == "KM":
            sig[name] = "*i8"
        elif name in ("AM", "SINK"):
            sig[name] = "*i32"
        else:
            sig[name] = "*fp32"
    return sig


def configurations(head_dim: int, feature_width: int, *, layout: int, precision: str,
                   mixing: str = "lolcats", sinks: bool = False, states: bool = True):
    """(kernel, constexprs, num_warps) for every kernel of one call with these sizes and options, as launched by
    hybrid.py (the state scans with Triton's default of 4 warps). ``mixing`` and ``sinks`` (the sink tile, SB > 0)
    only change the attention kernels; ``states=False`` leaves out the two state scans."""
    block = kh.default_block(head_dim, feature_width)
    dh, df = kh._pow2(head_dim), kh._pow2(feature_width)
    bd, bv = min(df, 64), min(dh, 64)
    attn = dict(LAYOUT=layout, MIXING=kh.MIXINGS.index(mixing), C=block, DH=dh, DF=df, PREC=precision)
    with_sinks = dict(attn, SB=kh.SINK_BLOCK if sinks else 0)
    warps = kh.num_warps(block)
    state_fwd = (kh._state_fwd_kernel, dict(C=block, BD=bd, BV=bv, PREC=precision), 4)
    state_bwd = (kh._state_bwd_kernel, dict(C=block, BD=bd, BV=bv, PREC=precision), 4)
    fwd = (kh._attn_fwd_kernel, with_sinks, warps)
    dq = (kh._attn_bwd_dq_kernel, with_sinks, warps)
    dkdv = (kh._attn_bwd_dkdv_kernel, attn, warps)
    return [state_fwd, fwd, dq, state_bwd, dkdv] if states else [fwd, dq, dkdv]


def compile_kernels(head_dim: int, feature_width: int, *, arch: int = 90, io_dtype: str = "bf16",
                    layout: int = 1, precision: str = "ieee", mixing: str = "lolcats",
                    sinks: bool = False, states: bool = True, kernels: tuple[str, ...] | None = None) -> list[dict]:
    """Compile every kernel to a cubin for sm_<arch> (``states=False``: the attention kernels only; ``kernels``:
    only those names). Returns one dict per kernel (name, options, shared bytes, limit)."""
    if kh.interpreting():
        raise RuntimeError("TRITON_INTERPRET=1 is set: the kernels were decorated for the interpreter and cannot "
                           "be compiled; run this in a process without it")
    target = GPUTarget("cuda", arch, 32)
    out = []
    for kernel, constexprs, num_warps in configurations(head_dim, feature_width, layout=layout,
                                                        precision=precision, mixing=mixing, sinks=sinks,
                                                        states=states):
        if kernels is not None and kernel.__name__ not in kernels:
            continue
        src = ASTSource(fn=kernel, signature=_signature(kernel, io_dtype, constexprs), constexprs=constexprs)
        compiled = triton.compile(src, target=target, options=dict(num_warps=num_warps))
        assert "cubin" in compiled.asm, f"{kernel.__name__}: no cubin produced"
        shared = compiled.metadata.shared
        out.append(dict(kernel=kernel.__name__, head_dim=head_dim, feature_width=feature_width, arch=arch,
                        io_dtype=io_dtype, layout="sw" if layout == 0 else "tk",
                        precision=precision, mixing=mixing if "MIXING" in constexprs else "",
                        sinks=bool(constexprs.get("SB", 0)), num_warps=num_warps, shared_bytes=shared,
                        shared_limit=SHARED_LIMIT.get(arch)))
    return out


_LOLA_INT_ARGS = {"Lq", "M", "M2", "N", "H", "G", "G2", "GF", "d", "D", "msb", "msh", "msq", "msm", "fsb", "fsh",
                  "fsn"}


def _lola_signature(kernel, io_dtype: str, constexprs: dict) -> dict:
    """LoLA kernels: q/k/v (and the global cache's K2/V2) in io_dtype, masks and validity flags int8, feature maps,
    states and outputs fp32."""
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in _LOLA_INT_ARGS:
            sig[name] = "i32"
        elif name in ("scale", "eps", "cache_bias"):
            sig[name] = "fp32"
        elif name in ("Q", "K", "V", "K2", "V2"):
            sig[name] = f"*{io_dtype}"
        elif name in ("MASK", "F", "OK2"):
            sig[name] = "*i8"
        else:
            sig[name] = "*fp32"
    return sig


def lola_configurations(head_dim: int, feature_width: int, precision: str = "ieee"):
    """(kernel, constexprs, num_warps) of lola.py as launched: the attention segment for a decode token and for
    a prefill chunk (both mixings, with the extra linear terms and the sparse global cache, G > 0; and once
    without the cache, G = 0), the self-recall error and the fold."""
    dh, df = kl._pow2(head_dim), kl._pow2(feature_width)
    out = []
    for lq in (1, 64):
        bq, bm = kl.attend_blocks(lq, head_dim)
        for mixing, has_cache in ((0, True), (1, True)) + (((1, False),) if lq == 64 else ()):
            out.append((kl._lola_attn_kernel, dict(MIXING=mixing, HAS_LIN=True, BQ=bq, BM=bm, DH=dh, DF=df,
                                                   PREC=precision, HAS_CACHE=has_cache), 4))
    out.append((kl._sre_kernel, dict(BN=32, DH=dh, DF=df, PREC=precision), 4))
    out.append((kl._fold_kernel, dict(BN=32, BD=min(df, 64), BV=min(dh, 64), PREC=precision), 4))
    return out


def compile_lola_kernels(head_dim: int, feature_width: int, *, arch: int = 90, io_dtype: str = "bf16",
                         precision: str = "ieee") -> list[dict]:
    """Compile the LoLA inference kernels (lola.py) to cubins for sm_<arch>; rows as :func:`compile_kernels`."""
    if kh.interpreting():
        raise RuntimeError("TRITON_INTERPRET=1 is set: the kernels were decorated for the interpreter and cannot "
                           "be compiled; run this in a process without it")
    target = GPUTarget("cuda", arch, 32)
    out = []
    for kernel, constexprs, num_warps in lola_configurations(head_dim, feature_width, precision):
        src = ASTSource(fn=kernel, signature=_lola_signature(kernel, io_dtype, constexprs), constexprs=constexprs)
        compiled = triton.compile(src, target=target, options=dict(num_warps=num_warps))
        assert "cubin" in compiled.asm, f"{kernel.__name__}: no cubin produced"
        name = kernel.__name__
        if "BQ" in constexprs:
            name += (f"[BQ={constexprs['BQ']},{'lolcats' if constexprs['MIXING'] == 0 else 'lola_code'},"
                     f"{'cache' if constexprs['HAS_CACHE'] else 'no cache'}]")
        out.append(dict(kernel=name, head_dim=head_dim, feature_width=feature_width, arch=arch,
                        io_dtype=io_dtype, layout="lola", precision=precision, mixing="",
                        sinks=False, num_warps=num_warps, shared_bytes=compiled.metadata.shared,
                        shared_limit=SHARED_LIMIT.get(arch)))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--sizes", nargs="+", default=["64x128", "128x128"],
                    help="head_dim x feature_width pairs")
    ap.add_argument("--io-dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    ap.add_argument("--precision", default="ieee", choices=("ieee", "tf32"))
    ap.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = ap.parse_args(argv)
    rows, too_big = [], []
    for size in args.sizes:
        d, f = (int(x) for x in size.split("x"))
        for layout in (0, 1):
            rows += compile_kernels(d, f, arch=args.arch, io_dtype=args.io_dtype, layout=layout,
                                    precision=args.precision)
        for mixing, sinks in (("lolcats", True), ("lola_code", False), ("lola_code", True)):  # the other variants
            rows += compile_kernels(d, f, arch=args.arch, io_dtype=args.io_dtype, layout=1, precision=args.precision,
                                    mixing=mixing, sinks=sinks, states=False)
        rows += compile_lola_kernels(d, f, arch=args.arch, io_dtype=args.io_dtype, precision=args.precision)
    for r in rows:
        if r["shared_limit"] is not None and r["shared_bytes"] > r["shared_limit"]:
            too_big.append(r)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        for r in rows:
            variant = f"{r['mixing']}{'+sinks' if r['sinks'] else ''}"
            print(f"sm_{r['arch']} d={r['head_dim']:<3} D={r['feature_width']:<3} {r['layout']} {r['io_dtype']} "
                  f"{r['kernel']:<24} {variant:<15} shared {r['shared_bytes']:>7} B (limit {r['shared_limit']})")
    if too_big:
        print(f"{len(too_big)} kernel(s) need more shared memory than sm_{args.arch} has", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
