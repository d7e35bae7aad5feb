"""KV-cache compression baselines for the teacher (lola_eval.baselines): StreamingLLM sinks + window, TOVA-style
eviction, sizing to a byte budget, the cache specs, and the window-only switch of the linearized model.
Tiny random Llamas; every reference here is computed independently of the cache classes."""
from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from lola_eval.baselines import (SinkCache, TovaCache, lola_budget_bytes, pair_bytes, pairs_for_budget,
                                 prefill_in_blocks, size_to_budget)
from lola_eval.loading import CacheSpec, linear_branch_disabled, set_cache
from lola_eval.streaming import cache_nbytes, new_cache, prefill
from lola_train.models import random_model

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=4096)


def tiny(layers: int = 2, sharp: float = 1.0, seed: int = 0):
    m = random_model({"architecture": "llama", "seed": seed, **TINY, "num_hidden_layers": layers}, torch.float32)
    if sharp != 1.0:  # larger q/k so attention (and RoPE) matters in a random model
        with torch.no_grad():
            for layer in m.model.layers:
                layer.self_attn.q_proj.weight.mul_(sharp)
                layer.self_attn.k_proj.weight.mul_(sharp)
    return m.eval()


def converted(attention: dict, **kw):
    """The tiny teacher of the same seed, linearized (untrained feature maps)."""
    from lola_train.convert import convert

    m = tiny(**kw)
    convert(m, attention)
    return m.eval()


def ids_of(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (1, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def stream(model, ids, cache, block: int) -> torch.Tensor:
    outs = [model(input_ids=ids[:, a:a + block], cache=cache, use_cache=True).logits
            for a in range(0, ids.shape[1], block)]
    return torch.cat(outs, dim=1)


@torch.no_grad()
def test_sink_with_window_covering_the_sequence_equals_full_cache():
    m, ids = tiny(sharp=8.0), ids_of(40)
    full = m(ids).logits
    for block in (1, 7, 40):
        cache = SinkCache(m, sinks=4, window=40, block_size=block)
        assert torch.allclose(stream(m, ids, cache, block), full, atol=1e-5), block
        assert cache.layers[0].kept == 40 and cache.get_seq_length() == 40
    g_full = m.generate(ids, max_new_tokens=12, do_sample=False)
    g_sink = m.generate(ids, max_new_tokens=12, do_sample=False, cache=SinkCache(m, 4, 60))
    assert torch.equal(g_full, g_sink)


@torch.no_grad()
@pytest.mark.parametrize("positions", ["cache", "original"])
def test_sink_equals_attention_over_the_kept_tokens(positions):
    """One layer (its keys depend only on token and position): each query's logits equal a plain forward over the
    sinks + recent tokens + itself, at contiguous positions ('cache', StreamingLLM) or the original ones."""
    s, w, n = 2, 5, 24
    m, ids = tiny(layers=1, sharp=8.0), ids_of(n)
    cache = SinkCache(m, sinks=s, window=w, positions=positions, block_size=1)
    got = stream(m, ids, cache, 1)
    differs = 0.0
    for t in range(n):
        kept = sorted(set(range(min(s, t))) | set(range(max(0, t - w), t)))
        pos = kept + [t]
        sub = ids[:, pos]
        contiguous = m(input_ids=sub, position_ids=torch.arange(len(pos))[None]).logits[0, -1]
        orig = m(input_ids=sub, position_ids=torch.tensor([pos])).logits[0, -1]
        ref = contiguous if positions == "cache" else orig
        assert torch.allclose(got[0, t], ref, atol=2e-5), (t, (got[0, t] - ref).abs().max())
        differs = max(differs, float((contiguous - orig).abs().max()))
    assert differs > 1e-3  # the two RoPE choices give different results: the test can tell them apart
    assert cache.layers[0].kept == s + w and cache.get_seq_length() == n


@torch.no_grad()
def test_tova_matches_an_independent_reference_policy():
    """One layer, one token per forward: the kept set follows TOVA (drop the pairs with the lowest attention of the
    newest query, averaged over heads), checked against eager attention probabilities over the kept set."""
    budget, n = 6, 22
    m, ids = tiny(layers=1, sharp=8.0), ids_of(n, seed=3)
    cache = TovaCache(m, budget, obs=1, block_size=1)
    got = stream(m, ids, cache, 1)
    m.set_attn_implementation("eager")
    kept: list[int] = []
    for t in range(n):
        allowed = kept + [t]
        mask = torch.full((1, 1, t + 1, t + 1), torch.finfo(torch.float32).min).triu(1)
        mask[0, 0, -1] = torch.finfo(torch.float32).min
        mask[0, 0, -1, allowed] = 0.0
        out = m(input_ids=ids[:, :t + 1], attention_mask=mask, output_attentions=True)
        assert torch.allclose(got[0, t], out.logits[0, -1], atol=2e-5), t
        probs = out.attentions[0][0, :, -1, allowed].mean(0)
        if len(allowed) > budget:
            top = probs.topk(budget).indices.tolist()
            allowed = [allowed[i] for i in sorted(top)]
        kept = allowed
    m.set_attn_implementation("sdpa")
    assert cache.layers[0].kept == budget


def test_tova_without_its_hooks_refuses_to_grow():
    m = tiny()
    cache = TovaCache(m, 4, block_size=4)
    layer = cache.layers[0]
    k = torch.zeros(1, 2, 6, 16)
    layer.update(k, k)  # a forward the hook never scored
    with pytest.raises(RuntimeError, match="not scored"):
        layer.update(k, k)


@torch.no_grad()
@pytest.mark.parametrize("spec", ["sink:2:10", "tova:12"])
def test_cache_bytes_stay_constant_over_long_generation(spec):
    m, ids = tiny(), ids_of(30)
    cache = CacheSpec.parse(spec)
    set_cache(m, cache)
    c = new_cache(m)
    logits = prefill(m, ids, c, chunk=64)      # capped at the cache's block (64 here, more than the prompt)
    budget_bytes = 12 * pair_bytes(m.config, 4)
    sizes = [cache_nbytes(c)]
    for _ in range(150):
        nxt = logits.argmax(-1, keepdim=True)
        logits = m(input_ids=nxt, cache=c, use_cache=True).logits[:, -1]
        sizes.append(cache_nbytes(c))
    assert set(sizes) == {budget_bytes}                # 12 pairs per KV head and layer, from the prompt on
    assert c.get_seq_length() == 180 and all(layer.kept == 12 for layer in c.layers)
    set_cache(m, CacheSpec())
    assert type(new_cache(m)) is DynamicCache


@pytest.mark.parametrize("sinks", [0, 4])
def test_equal_budget_sizing_is_exact(sinks):
    """The budget is LoLA's measured bytes (its sink buffer included); the sized baselines hold the most pairs that
    fit, measured."""
    teacher = tiny()
    lin = converted({"window_size": 16, "feature_dim": 8, "chunk_size": 16, "sink_tokens": sinks})
    set_cache(lin, CacheSpec.parse("lola:16:8"))
    c = new_cache(lin)
    prefill(lin, ids_of(100), c, chunk=32)
    measured_lola = cache_nbytes(c)
    budget = lola_budget_bytes(lin.config, "lola:16:8", 4)
    assert budget == measured_lola
    per_pair = pair_bytes(teacher.config, 4)
    n = pairs_for_budget(teacher.config, budget, 4)
    assert n * per_pair <= budget < (n + 1) * per_pair
    assert pairs_for_budget(teacher.config, 7 * per_pair, 4) == 7
    assert pairs_for_budget(teacher.config, 7 * per_pair - 1, 4) == 6
    for kind in ("sink", "tova"):
        spec = set_cache(teacher, CacheSpec.parse(f"{kind}@lola:16:8"), attention=lin.config.lola_attention)
        assert spec.label == size_to_budget(kind, teacher.config, budget, 4)
        cache = new_cache(teacher)
        prefill(teacher, ids_of(3 * n), cache)
        assert cache_nbytes(cache) == n * per_pair <= budget
    assert spec.label == f"tova:{n}"
    with pytest.raises(ValueError, match="too few"):
        size_to_budget("sink", teacher.config, 3 * per_pair, 4, sinks=4)


def test_cache_specs_for_baselines_and_window():
    for text in ("sink:4:1020", "sink:4:1020:orig", "tova:1024", "window:64", "sink@lola:64:256",
                 "tova@lola:64:256:lola_code"):
        assert CacheSpec.parse(text).label == text
    assert CacheSpec.parse("sink:4:60").is_baseline and not CacheSpec.parse("sink:4:60").needs_linearized
    assert CacheSpec.parse("window:64").lola_settings().global_size == 0
    assert CacheSpec.parse("sink:4:60:orig").positions == "original"
    for bad, match in (("sink:4", "sink:S:W"), ("tova:0", "tova:N"), ("sink:4:0", "window W"),
                       ("sink@lola:64", "lola:W:G"), ("window:0", "window W")):
        with pytest.raises(ValueError, match=match):
            CacheSpec.parse(bad)


def test_baselines_refuse_the_linearized_model_and_lola_refuses_the_teacher():
    teacher = tiny()
    lin = converted({"window_size": 16, "feature_dim": 8})
    with pytest.raises(ValueError, match="baseline for the softmax teacher"):
        set_cache(lin, CacheSpec.parse("sink:4:60"))
    with pytest.raises(ValueError, match="baseline for the softmax teacher"):
        SinkCache(lin, 4, 60)
    with pytest.raises(ValueError, match="needs a linearized model"):
        set_cache(teacher, CacheSpec.parse("window:16"))


@torch.no_grad()
def test_window_only_is_softmax_over_the_window():
    """'window:W' switches the linear branch off: the converted model then computes sliding-window softmax
    attention (current token + W-1 before), which is the teacher with a sink:0:(W-1) cache fed one token at a time."""
    w, n = 8, 40
    teacher = tiny(sharp=4.0)
    lin = converted({"window_size": w, "feature_dim": 8, "chunk_size": 8}, sharp=4.0)
    ids = ids_of(n)
    ref = stream(teacher, ids, SinkCache(teacher, sinks=0, window=w - 1, block_size=1), 1)
    hybrid = lin(ids).logits
    set_cache(lin, CacheSpec.parse(f"window:{w}"))
    got = stream(lin, ids, new_cache(lin), 16)      # through the LoLA cache (G = 0), linear terms off
    assert torch.allclose(got, ref, atol=1e-4), (got - ref).abs().max()
    assert (hybrid[0, w:] - ref[0, w:]).abs().max() > 1e-3   # with the linear branch on, it differs
    set_cache(lin, CacheSpec())                                # back on: the exact hybrid again
    assert torch.allclose(lin(ids).logits, hybrid, atol=1e-6)
    with linear_branch_disabled(lin):
        assert torch.allclose(lin(ids).logits, ref, atol=1e-4)
    assert torch.allclose(lin(ids).logits, hybrid, atol=1e-6)


@torch.no_grad()
def test_prefill_in_blocks_then_generate_continues_the_stream():
    m, ids = tiny(), ids_of(50)
    a = SinkCache(m, 2, 12, block_size=8)
    prefill_in_blocks(m, ids[:, :-1], a)
    g = m.generate(ids, max_new_tokens=6, do_sample=False, cache=a)
    b = SinkCache(m, 2, 12, block_size=8)
    logits = stream(m, ids, b, 8)[:, -1]
    manual = []
    for _ in range(6):
        nxt = logits.argmax(-1, keepdim=True)
        manual.append(int(nxt))
        logits = m(input_ids=nxt, cache=b, use_cache=True).logits[:, -1]
    assert g[0, 50:].tolist() == manual
