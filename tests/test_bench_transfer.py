"""scripts/bench_transfer.py runs a tiny local model with a recipe's attention, checkpointing off and on, and writes
its JSON (a smoke test, not a timing): the checkpointed step keeps a smaller graph."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_transfer.py"


def test_bench_transfer_smoke(tmp_path, capsys, monkeypatch):
    cfg = AutoConfig.for_model("llama", vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    spec = importlib.util.spec_from_file_location("bench_transfer", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(bench, "load_model", lambda name: (model, None))
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # keep the test process's threads
    out = tmp_path / "bench.json"
    assert bench.main(["--model", "tiny-random", "--recipe", "smollm2_long", "--cached-max", "8",
                       "--lengths", "160", "--repeats", "1", "--threads", "1", "--checkpointing", "both",
                       "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["cached_fraction"] == 0.5 and result["cached_max"] == 8
    plain, ckpt = result["rows"]
    assert (plain["activation_checkpointing"], ckpt["activation_checkpointing"]) == (False, True)
    assert 0 < ckpt["graph_mib"] < plain["graph_mib"]
    assert plain["step_s"] > 0 and ckpt["tokens_per_s"] > 0
    assert "graph MiB" in capsys.readouterr().out
