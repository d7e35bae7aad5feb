"""The kernels compile for a real GPU (sm_90 cubin via Triton + ptxas), which the CPU interpreter cannot show.

Runs in a subprocess without TRITON_INTERPRET (tests/conftest.py sets it for this process). About a minute per
test on two busy cores: the default configuration (d=64, Hedgehog D=128, 'tk', key mask, bf16), then the code the
options add (constexprs MIXING and SB): the attention kernels with 'lola_code' + sinks and the dq kernel with
'lolcats' + sinks (the only kernel with code specific to that pair: the max gradient of a sink).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

HYBRID_KERNELS = {"_state_fwd_kernel", "_attn_fwd_kernel", "_attn_bwd_dq_kernel", "_state_bwd_kernel",
                  "_attn_bwd_dkdv_kernel"}


def compile_rows(tmp_path, calls: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path / "triton-cache"), TRITON_DEFAULT_FP_FUSION="1")
    code = f"import json; from lola_kernels import compile_check as cc; print(json.dumps({calls}))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    for r in rows:
        assert 0 < r["shared_bytes"] <= r["shared_limit"], r
    return rows


def test_kernels_compile_for_sm90(tmp_path):
    rows = compile_rows(tmp_path, "cc.compile_kernels(64, 128, arch=90, io_dtype='bf16', layout=1)")
    assert {r["kernel"] for r in rows} == HYBRID_KERNELS
    assert all(not r["sinks"] for r in rows) and {r["mixing"] for r in rows} == {"", "lolcats"}


def test_mixing_and_sink_variants_compile_for_sm90(tmp_path):
    rows = compile_rows(tmp_path, (
        "cc.compile_kernels(64, 128, arch=90, io_dtype='bf16', layout=1, mixing='lola_code', sinks=True, "
        "states=False) + cc.compile_kernels(64, 128, arch=90, io_dtype='bf16', layout=1, mixing='lolcats', "
        "sinks=True, kernels=('_attn_bwd_dq_kernel',))"))
    got = {(r["kernel"], r["mixing"], r["sinks"]) for r in rows}
    assert got == {("_attn_fwd_kernel", "lola_code", True), ("_attn_bwd_dq_kernel", "lola_code", True),
                   ("_attn_bwd_dkdv_kernel", "lola_code", False), ("_attn_bwd_dq_kernel", "lolcats", True)}
