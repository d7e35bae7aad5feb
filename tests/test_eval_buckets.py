"""Position buckets (lola_train.metrics_buckets), perplexity by bucket, the equal-memory suite tables with the teacher
baselines, and the baselines through the registered lm-eval model. Tiny random models with the SmolLM2 tokenizer."""
from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import TINY_EVAL_LLAMA

from lola_train.metrics_buckets import (bucket_means, bucket_sums, means_from_sums, merge_bucket_sums,
                                        position_buckets)

pytestmark = pytest.mark.usefixtures("one_thread")



def test_position_buckets():
    assert position_buckets(3000) == [("0-256", 0, 256), ("256-512", 256, 512), ("512-1K", 512, 1024),
                                      ("1K-2K", 1024, 2048), ("2K-4K", 2048, 3000)]
    assert [b[0] for b in position_buckets(8192)] == ["0-256", "256-512", "512-1K", "1K-2K", "2K-4K", "4K-8K"]
    assert position_buckets(8193)[-1] == ("8K-16K", 8192, 8193)
    assert position_buckets(1) == [("0-256", 0, 1)]
    for bad in (0, -3, 2.5, None):
        with pytest.raises(ValueError, match="length"):
            position_buckets(bad)


def test_bucket_means_and_sums():
    torch.manual_seed(0)
    v = torch.rand(3, 600, dtype=torch.float64)
    mask = torch.rand(3, 600) > 0.3
    means = bucket_means(v, mask)
    assert list(means) == ["0-256", "256-512", "512-1K"]
    for name, a, b in position_buckets(600):
        assert math.isclose(means[name], float(v[:, a:b][mask[:, a:b]].mean()), rel_tol=1e-9)
    # accumulating sums over parts equals one pass over the whole; an all-masked bucket is left out
    total: dict = {}
    merge_bucket_sums(total, bucket_sums(v[:1], mask[:1]))
    merge_bucket_sums(total, bucket_sums(v[1:], mask[1:]))
    assert means_from_sums(total) == pytest.approx(means, rel=1e-12)
    m2 = mask.clone()
    m2[:, 256:512] = False
    assert "256-512" not in bucket_means(v, m2)
    assert bucket_means(v) == pytest.approx({n: float(v[:, a:b].mean()) for n, a, b in position_buckets(600)})
    with pytest.raises(ValueError, match="mask has 5 positions"):
        bucket_sums(v, mask[:, :5])




@torch.no_grad()
def test_perplexity_buckets_match_one_forward(tiny_dir, tokenizer):
    """Streamed per-token NLL (through a baseline cache whose window covers the text) = one full forward, and the
    bucket means weight to the overall NLL."""
    import torch.nn.functional as F

    from lola_eval.loading import CacheSpec, load_source, set_cache
    from lola_eval.perplexity import perplexity, token_windows

    model, tok = load_source(str(tiny_dir))
    windows = token_windows(tok, "The grass is green. " * 200, 600, 1)
    logits = model(windows).logits[0, :-1]
    ref = F.cross_entropy(logits, windows[0, 1:], reduction="none").double()
    set_cache(model, CacheSpec.parse("sink:4:700"))
    r = perplexity(model, windows, chunk=512)
    assert math.isclose(r["nll"], float(ref.mean()), rel_tol=1e-5)
    assert list(r["buckets"]) == ["0-256", "256-512", "512-1K"]
    assert r["buckets"]["0-256"]["tokens"] == 255 and r["buckets"]["512-1K"]["tokens"] == 88
    assert math.isclose(r["buckets"]["256-512"]["nll"], float(ref[255:511].mean()), rel_tol=1e-5)
    weighted = sum(b["nll"] * b["tokens"] for b in r["buckets"].values()) / r["tokens"]
    assert math.isclose(weighted, r["nll"], rel_tol=1e-9)
    set_cache(model, CacheSpec.parse("sink:4:60"))   # a real eviction: later buckets get worse or change
    r2 = perplexity(model, windows, chunk=512)
    assert r2["buckets"]["0-256"]["nll"] != r["buckets"]["0-256"]["nll"]
    assert r2["cache_bytes_per_seq"] < r["cache_bytes_per_seq"]


def test_suite_equal_memory_tables(tiny_dir, tmp_path):
    """Teacher full + a baseline sized to a LoLA budget and the window-only linearized row, both haystacks: every
    unit's JSON, the equal-memory table with ratios to the teacher, perplexity buckets, sigma(w), the heatmap."""
    from lola_eval import suite

    argv = ["--teacher", str(tiny_dir), "--teacher-caches", "full,tova@lola:16:4",
            "--linearized", f"convert:{tiny_dir}", "--caches", "window:64",
            "--parts", "passkey,perplexity", "--haystacks", "repeat,essay", "--passkey-lengths", "160",
            "--passkey-depths", "0.5", "--passkey-n", "1", "--ppl-seq-len", "300", "--ppl-n", "1", "--out", str(tmp_path)]
    assert suite.main(argv) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    caches = {(r["model"], r["cache"]) for r in data["perplexity"]}
    tova = next(c for m, c in caches if c.startswith("tova:"))
    assert caches == {("teacher", "full"), ("teacher", tova), ("linearized", "window:64")}
    assert (tmp_path / "passkey" / f"teacher_{tova.replace(':', '-')}_essay_160" / "passkey.json").exists()
    assert {r["haystack"] for r in data["passkey"]} == {"repeat", "essay"}
    table = (tmp_path / "results.md").read_text()
    assert "At equal memory" in table and f"`{tova}` = `tova@lola:16:4`" in table
    assert "| teacher | full | " in table and "| linearized | window:64 |" in table
    assert "x)" in table and "0-256" in table and "256-512" in table
    assert "sigma(w)" in table and len(data["mixing"]["sigma"]) == TINY_EVAL_LLAMA["num_hidden_layers"]
    assert all(abs(x - 0.1) < 1e-6 for row in data["mixing"]["sigma"] for x in row)   # untrained: sigmoid(logit 0.1)
    tova_bytes = next(r["cache_bytes_per_seq"] for r in data["perplexity"] if r["cache"] == tova)
    assert tova_bytes == int(tova.split(":")[1]) * 2 * 2 * 2 * 16 * 4   # N pairs x layers x kv heads x head_dim x fp32
    assert (tmp_path / "passkey.png").stat().st_size > 0


def test_lm_eval_model_with_a_baseline_cache(tiny_dir):
    """cache=sink:S:W: generation goes through the baseline (equal to the teacher when W covers the prompt,
    different when it evicts); loglikelihood and batches are refused with the fix named."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.registry import get_model

    from lola_eval.harness import register

    register()
    lola = get_model("lola")
    full = lola.create_from_arg_string(f"pretrained={tiny_dir},cache=none", {})
    wide = lola.create_from_arg_string(f"pretrained={tiny_dir},cache=sink:4:400", {})
    narrow = lola.create_from_arg_string(f"pretrained={tiny_dir},cache=tova:8", {})
    assert wide.baseline.label == "sink:4:400" and narrow.baseline.label == "tova:8"
    ctx = torch.randint(0, 1000, (1, 150), generator=torch.Generator().manual_seed(0))
    a = full._model_generate(ctx.clone(), 166, [], do_sample=False)
    b = wide._model_generate(ctx.clone(), 166, [], do_sample=False)
    c = narrow._model_generate(ctx.clone(), 166, [], do_sample=False)
    assert torch.equal(a, b) and a.shape == c.shape == (1, 166)
    with pytest.raises(ValueError, match="cache=none"):
        narrow.loglikelihood([])
    with pytest.raises(ValueError, match="batch_size=1"):
        lola.create_from_arg_string(f"pretrained={tiny_dir},cache=sink:4:60,batch_size=4", {})
    with pytest.raises(ValueError, match="cache='lola:64:0' is not valid"):
        lola.create_from_arg_string(f"pretrained={tiny_dir},cache=lola:64:0", {})


def test_quality_report(tiny_dir, tmp_path):
    """The demo's closing report: perplexity by bucket teacher vs linearized, passkey probes with and without the
    sparse cache, bytes, pointers to the full results."""
    from lola_eval import report

    out = tmp_path / "report"
    assert report.main(["--teacher", str(tiny_dir), "--linearized", f"convert:{tiny_dir}", "--seq-len", "300",
                        "--passkey-length", "200", "--out", str(out)]) == 0
    data = json.loads((out / "report.json").read_text())
    assert list(data["ppl"]["teacher"]["buckets"]) == ["0-256", "256-512"]
    assert [(p["model"], p["cache"]) for p in data["passkey"]] == [
        ("teacher", "full"), ("linearized", "lola:64:0"), ("linearized", "lola:64:256"),
        ("linearized", "lola:64:256:lola_code")]
    sizes = {p["cache"]: p["cache_bytes_per_seq"] for p in data["passkey"]}
    assert sizes["lola:64:256"] > sizes["lola:64:0"] > 0
    text = (out / "report.md").read_text()
    assert "| ratio |" in text and "python -m lola_eval.suite" in text and "KV pairs per KV head" in text
    with pytest.raises(SystemExit, match="export stage"):
        report.main(["--linearized", str(tmp_path / "missing")])
