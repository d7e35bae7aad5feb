"""scripts/bench_kernels.py runs on CPU at a tiny size and writes the JSON table (a smoke test, not a timing)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_kernels.py"


def test_bench_kernels_cpu_smoke(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_kernels", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    assert bench.main(["--device", "cpu", "--lengths", "96", "--decode-lengths", "80", "--heads", "2",
                       "--kv-heads", "1", "--head-dim", "32", "--feature-dim", "8", "--window", "16",
                       "--warmup", "0", "--repeats", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = result["rows"]
    prefill = {(r["impl"], r["mode"]) for r in rows if r["kind"] == "prefill"}
    assert prefill == {("chunked", "fwd"), ("chunked", "fwd+bwd"), ("sdpa", "fwd"), ("sdpa", "fwd+bwd")}
    assert {r["impl"] for r in rows if r["kind"] == "decode"} == {"sdpa", "hybrid-full", "hybrid-state"}
    assert all(r["ms"] > 0 for r in rows)
    assert all(r["tokens_per_s"] > 0 and r["peak_mem_mb"] >= 0 for r in rows if r["kind"] == "prefill")
    assert result["reference_check"]["max_abs_error"]["chunked"] < 1e-4
    assert "prefill  chunked" in capsys.readouterr().out
