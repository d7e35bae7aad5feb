"""The kernels compile for a real GPU (sm_90 cubin via Triton + ptxas), which the CPU interpreter cannot show.

Runs in a subprocess without TRITON_INTERPRET (tests/conftest.py sets it for this process). About a minute on
two busy cores: one configuration only, the default one (d=64, Hedgehog D=128, 'tk', key mask, bf16).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


def test_kernels_compile_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path / "triton-cache"), TRITON_DEFAULT_FP_FUSION="1")
    code = ("import json; from lola_kernels import compile_check as cc; "
            "print(json.dumps(cc.compile_kernels(64, 128, arch=90, io_dtype='bf16', has_mask=True, layout=1)))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    assert {r["kernel"] for r in rows} == {"_state_fwd_kernel", "_attn_fwd_kernel", "_attn_bwd_dq_kernel",
                                           "_state_bwd_kernel", "_attn_bwd_dkdv_kernel"}
    for r in rows:
        assert 0 < r["shared_bytes"] <= r["shared_limit"], r
