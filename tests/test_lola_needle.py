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
from lola_train.modeling.lola_ops import MEMORIES

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
    assert cell.needle_summary == f"needle: {memory} 100% (layers 0-1 mean)" and cell.needle_summary in logs[0]
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
