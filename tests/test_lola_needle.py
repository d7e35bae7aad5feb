"""Passkey attribution: at the question, which LoLA memory holds the needle's key/value pairs (per layer, averaged
over heads), recorded by lola_eval.passkey.run_model; a tiny random model with a planted needle."""
import pytest
import torch

from lola_eval.passkey import QUESTION, PasskeySample, needle_summary, run_model
from lola_eval.streaming import greedy_generate
from lola_train.convert import convert
from lola_train.lola import disable_lola_cache, enable_lola_cache
from lola_train.models import load_model
from lola_train.modeling.lola_cache import LolaCache
from lola_train.modeling.lola_ops import MEMORIES, expand_heads, fusion_weights, lola_attend

SPEC = dict(architecture="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2)
LENGTH, QUESTION_TOKENS = 40, 5

pytestmark = pytest.mark.usefixtures("one_thread")


class WordTokenizer:
    """Just what run_model needs: the question is QUESTION_TOKENS tokens; decode spells the ids in letters (no
    digits, so no answer ever stops the greedy decoding early)."""

    eos_token_id = None

    def __call__(self, text, add_special_tokens=True):
        assert text == QUESTION
        return type("Encoding", (), {"input_ids": list(range(QUESTION_TOKENS))})()

    def decode(self, ids):
        return " ".join("".join(chr(ord("a") + int(c)) for c in str(i)) for i in ids)


def tiny(sinks=0):
    model, _ = load_model(random=dict(SPEC, seed=0))
    convert(model, dict(feature_dim=8, window_size=4, chunk_size=4, sink_tokens=sinks))
    return model.eval()


def planted(needle_start, needle_tokens=3):
    ids = torch.randint(1, 64, (LENGTH,), generator=torch.Generator().manual_seed(needle_start)).tolist()
    ids[needle_start:needle_start + needle_tokens] = [60, 61, 62]
    return PasskeySample(ids=ids, answer="7", length=LENGTH, depth=0.5, depth_actual=0.5, needle_start=needle_start,
                         needle_tokens=needle_tokens, haystack="repeat")


@torch.no_grad()
@pytest.mark.parametrize("settings,sinks,needle_start,memory", [
    ("window=4 global=0", 0, 12, "linear"),        # long gone from the window, no sparse cache
    ("window=4 global=64", 0, 12, "cache"),        # a cache larger than the prompt keeps every evicted pair
    ("window=4 global=0", 0, 31, "recent"),        # the last tokens before the question
    ("window=4 global=0", 3, 0, "sink"),           # the first real tokens, with attention sinks
])
def test_needle_memory_at_the_question(settings, sinks, needle_start, memory):
    model = tiny(sinks)
    enable_lola_cache(model, settings)
    sample = planted(needle_start)
    logs = []
    cell, = run_model(model, WordTokenizer(), [sample], label="m", cache_label="lola", prefill_chunk=16,
                      log=logs.append)
    assert len(cell.needle_memory) == 2                                            # one entry per layer
    for layer in cell.needle_memory:
        assert set(layer) == set(MEMORIES) and layer[memory] == 1.0
    assert cell.needle_summary == f"needle: {memory} 100% (layers 0-1 mean)" and cell.needle_summary in logs[-1]
    assert logs[0].startswith("  m lola sample 1/1: len=") and len(logs) == 2       # per sample, then per cell
    assert cell.predictions[0]["needle_memory"] == cell.needle_memory

    # the same as prefilling the prompt up to the question into a cache and asking the layers directly
    cache = LolaCache(model.config)
    model(torch.tensor([sample.ids[:LENGTH - QUESTION_TOKENS]]), cache=cache)
    want = [(layer.memory_of(torch.arange(needle_start, needle_start + 3))[0] == MEMORIES.index(memory)).all()
            for layer in cache.layers]
    assert all(want)
    # and the probe's split prefill leaves the answer unchanged
    plain = greedy_generate(model, torch.tensor([sample.ids]), max_new_tokens=12, prefill_chunk=16)
    assert cell.predictions[0]["text"] == WordTokenizer().decode(plain.new_ids)


@torch.no_grad()
def test_mixed_memories_and_no_probe_without_lola():
    """A small cache (G = 2 per head) holds at most 2 of the 6 needle pairs; the recorded fractions are those of
    the layers' memory_of after a prefill up to the question. Without a LoLA cache nothing is recorded."""
    model = tiny()
    enable_lola_cache(model, "window=4 global=2 chunk=4")
    sample = planted(10, needle_tokens=6)
    cell, = run_model(model, WordTokenizer(), [sample], label="m", cache_label="lola", prefill_chunk=7,
                      log=lambda *_: None)
    cache = LolaCache(model.config)
    model(torch.tensor([sample.ids[:LENGTH - QUESTION_TOKENS]]), cache=cache)
    for got, layer in zip(cell.needle_memory, cache.layers):
        codes = layer.memory_of(torch.arange(10, 16))[0]
        assert got == {name: round(float((codes == i).float().mean()), 4) for i, name in enumerate(MEMORIES)}
        assert abs(sum(got.values()) - 1.0) < 1e-6 and got["cache"] <= 2 / 6 and got["linear"] >= 4 / 6
    assert needle_summary([{"recent": 0.0, "sink": 0.0, "cache": 0.25, "linear": 0.75}]) == \
        "needle: linear 75%, cache 25% (layers 0-0 mean)"
    disable_lola_cache(model)                                                    # the exact hybrid layer: no probe
    cell, = run_model(model, WordTokenizer(), [sample], label="m", cache_label="full", log=lambda *_: None)
    assert cell.needle_memory == [] and cell.needle_summary == "" and "needle_memory" not in cell.predictions[0]


@torch.no_grad()
def test_pin_needle_keeps_the_needle_in_the_cache():
    """run_model(pin_needle=True) (passkey --pin-needle): the needle's pairs stay in the sparse cache, where plain
    selection does not keep all 6 of them; the pin is lifted afterwards (the next run selects plainly again)."""
    model = tiny()
    enable_lola_cache(model, "window=4 global=6 chunk=4")
    sample = planted(10, needle_tokens=6)

    def cached(pin):
        cell, = run_model(model, WordTokenizer(), [sample], label="m", cache_label="lola", prefill_chunk=7,
                          log=lambda *_: None, pin_needle=pin)
        return [layer["cache"] for layer in cell.needle_memory]

    plain = cached(False)
    assert cached(True) == [1.0, 1.0] and min(plain) < 1.0
    assert cached(False) == plain and LolaCache(model.config).layers[0].pinned is None


@pytest.mark.parametrize("mixing", ["lolcats", "lola_code"])
@pytest.mark.parametrize("cache_weight", [None, 1.0, 3.0])
def test_fusion_weights_rebuild_lola_attend(mixing, cache_weight):
    """lola_ops.fusion_weights (the diagnostic behind the answer weights): the weights of the local keys, the
    cache keys and the linear memory, applied to their values, give lola_attend's output, and sum to 1 per
    query (GQA: 4 query heads on 2 KV heads; rows with no visible local key)."""
    g = torch.Generator().manual_seed(1)
    s, h, hk, lq, m, d, feat, gc = 2, 4, 2, 5, 7, 8, 6, 9
    q, k, v = torch.randn(s, h, lq, d, generator=g) * 2, torch.randn(s, hk, m, d, generator=g) * 2, \
        torch.randn(s, hk, m, d, generator=g)
    mask = torch.rand(s, 1, lq, m, generator=g) < 0.5
    mask[:, :, 0] = False
    fq = torch.softmax(torch.randn(s, h, lq, feat, generator=g), -1)
    fk = torch.softmax(torch.randn(s, h, 30, feat, generator=g), -1)
    h_state, s_state = fk.transpose(-1, -2) @ torch.randn(s, h, 30, d, generator=g), fk.sum(2)
    lin_num, lin_den = torch.randn(s, h, lq, d, generator=g), torch.rand(s, h, lq, generator=g)
    sigma, ell = torch.rand(h, generator=g) * 0.8 + 0.1, torch.rand(h, generator=g) + 0.5
    cache = {} if cache_weight is None else dict(
        cache_k=torch.randn(s, hk, gc, d, generator=g) * 2, cache_v=torch.randn(s, hk, gc, d, generator=g),
        cache_ok=torch.rand(s, hk, gc, generator=g) < 0.7, cache_weight=cache_weight)
    common = dict(mixing=mixing, eps=1e-6, lin_den=lin_den, **cache)
    y = lola_attend(q, k, v, mask, fq, h_state, s_state, sigma, ell, lin_num=lin_num, **common)
    w_local, w_cache, w_linear = fusion_weights(q, k, mask, fq, s_state, sigma, ell,
                                                **{n: t for n, t in common.items() if n != "cache_v"})
    rebuilt = w_local @ expand_heads(v, h)
    total = w_local.sum(-1) + w_linear
    if cache:
        rebuilt = rebuilt + w_cache @ expand_heads(cache["cache_v"], h)
        total = total + w_cache.sum(-1)
        assert (w_cache[~expand_heads(cache["cache_ok"], h)[:, :, None].expand(-1, -1, lq, -1)] == 0).all()
    else:
        assert w_cache is None
    l_num, l_den = fq @ h_state + lin_num, (fq @ s_state.unsqueeze(-1)).squeeze(-1) + lin_den
    rebuilt = rebuilt + w_linear[..., None] * l_num / l_den[..., None]
    torch.testing.assert_close(rebuilt, y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(total, torch.ones_like(total), atol=1e-4, rtol=0)
    assert (w_local[~mask.expand(-1, h, -1, -1)] == 0).all()


@torch.no_grad()
@pytest.mark.parametrize("settings,needle_start,needle", [
    ("window=4 global=64", 12, True),      # cached: the answer token's softmax reaches it
    ("window=4 global=0", 12, False),      # folded into the linear memory: no needle weight of its own
])
def test_answer_weights_at_the_question(settings, needle_start, needle):
    """run_model records, per layer, where the last prompt token's attention goes (LolaLayer.probe_shares via
    NeedleProbe): shares that sum to 1, a needle share only when the needle's pairs are softmax keys, its largest
    head in 'needle_max'; the probe is lifted afterwards."""
    model = tiny(sinks=2)
    enable_lola_cache(model, settings)
    logs = []
    cell, = run_model(model, WordTokenizer(), [planted(needle_start)], label="m", cache_label="lola",
                      prefill_chunk=16, log=logs.append)
    assert len(cell.answer_weights) == 2 and cell.predictions[0]["answer_weights"] == cell.answer_weights
    heads = cell.predictions[0]["answer_heads"]                             # the same shares, per head
    assert [max(layer["needle"]) for layer in heads] == [layer["needle_max"] for layer in cell.answer_weights]
    for layer in cell.answer_weights:
        assert set(layer) == {"sink", "recent", "needle", "cache", "linear", "needle_max"}
        assert abs(sum(v for name, v in layer.items() if name != "needle_max") - 1.0) < 2e-3
        assert layer["sink"] > 0 and layer["recent"] > 0
        assert (layer["needle"] > 0) == needle and layer["needle_max"] >= layer["needle"]
        if not needle:
            assert layer["cache"] == 0 and layer["linear"] > 0
    assert cell.weights_summary.startswith("answer token -> needle: up to") and cell.weights_summary in logs[-1]
    assert LolaCache(model.config).layers[0].probe is None


@torch.no_grad()
def test_answer_weights_do_not_depend_on_the_prompt_split():
    """The last prompt token attended in a multi-token call (the batched segments) or alone (the decode step,
    prompt fed 13 tokens per call: 13 + 13 + 13 + 1) gets the same answer weights."""
    model = tiny(sinks=2)
    enable_lola_cache(model, "window=4 global=6 chunk=4")
    got = [run_model(model, WordTokenizer(), [planted(10, needle_tokens=6)], label="m", cache_label="lola",
                     prefill_chunk=chunk, log=lambda *_: None)[0].answer_weights for chunk in (16, 13)]
    assert len(got[0]) == len(got[1]) == 2
    for a, b in zip(*got):
        assert a.keys() == b.keys() and all(abs(a[n] - b[n]) < 1e-3 for n in a)
    assert any(layer["needle"] > 0 for layer in got[0])


@torch.no_grad()
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_teacher_answer_weights_match_its_attention(attn):
    """A softmax model (the teacher) gets the same attribution from its own softmax row of the last prompt token
    (SoftmaxAnswerProbe): shares of the first 4 tokens, the last 64 keys, the needle and the rest, which sum to 1
    and equal its eager attention weights; the model's attention and its logits are left as they were."""
    from transformers import DynamicCache

    from lola_eval.passkey import SoftmaxAnswerProbe

    model, _ = load_model(random=dict(SPEC, seed=0, max_position_embeddings=256))
    model.eval().set_attn_implementation(attn)
    sample = planted(12)
    # 120 tokens, so that 'rest' (neither the first 4, the last 64 nor the needle) is not empty
    sample.ids, sample.length = sample.ids + [1 + i % 59 for i in range(80)], LENGTH + 80
    ids, n = torch.tensor([sample.ids]), sample.length
    before = model(ids).logits
    cell, = run_model(model, WordTokenizer(), [sample], label="teacher", cache_label="full", prefill_chunk=50,
                      log=lambda *_: None)
    assert model.config._attn_implementation == attn
    torch.testing.assert_close(model(ids).logits, before)
    with SoftmaxAnswerProbe(model, sample):  # the prompt in 3 calls through a KV cache, as run_model feeds it
        cache = DynamicCache(config=model.config)
        probed = [model(ids[:, i:i + 50], past_key_values=cache).logits for i in range(0, n, 50)]
    torch.testing.assert_close(torch.cat(probed, 1), before, atol=1e-5, rtol=1e-5)
    model.set_attn_implementation("eager")
    att = model(ids, output_attentions=True).attentions                   # per layer [1, H, L, L]
    heads = cell.predictions[0]["answer_heads"]
    for layer, per_head, w in zip(cell.answer_weights, heads, att):
        row = w[0, :, -1]                                                   # [H, L]
        needle = row[:, 12:15].sum(-1)
        torch.testing.assert_close(torch.tensor(per_head["needle"]), needle, atol=1e-4, rtol=0)
        assert set(layer) == {"sink", "recent", "needle", "rest", "needle_max"}
        assert abs(sum(v for k, v in layer.items() if k != "needle_max") - 1.0) < 2e-3
        assert abs(layer["needle"] - float(needle.mean())) < 1e-3
        assert abs(layer["needle_max"] - float(needle.max())) < 1e-3
        assert abs(layer["sink"] - float(row[:, :4].sum(-1).mean())) < 1e-3
        assert abs(layer["recent"] - float(row[:, n - 64:].sum(-1).mean())) < 1e-3
