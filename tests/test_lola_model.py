"""LoLA cache on whole (tiny, random) converted models: generate(), switching on at load/generate time, padding,
beams, exact limits, fixed sizes over 4K generated tokens, bytes accounting, exported checkpoints."""
import os
import subprocess
import sys
import sysconfig

import pytest
import torch
from transformers import DynamicCache

from lola_train.convert import convert
from lola_train.export import export_model
from lola_train.lola import (MODEL_SHAPES, bytes_table, disable_lola_cache, enable_lola_cache, format_bytes_table,
                             prefill)
from lola_train.models import load_model
from lola_train.modeling.lola_cache import (LolaCache, LolaCacheConfig, LolaLayer, kv_bytes_per_sequence,
                                            lola_bytes_per_sequence)

SPEC = dict(architecture="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192)
ATTN = dict(feature_dim=8, window_size=4, chunk_size=4)


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(seed=0, **overrides):
    model, _ = load_model(random=dict(SPEC, seed=seed, **overrides))
    convert(model, ATTN)
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.window_factors.normal_()
            layer.self_attn.feature_map_k.weight.normal_()
    return model


@pytest.fixture(scope="module")
def model():
    return tiny()


IDS = torch.randint(0, 64, (2, 19), generator=torch.Generator().manual_seed(5))


@torch.no_grad()
def test_global_size_zero_equals_plain_hybrid_prefill_decode_generate(model):
    plain = model(IDS, use_cache=False).logits
    lola = model(IDS, cache=LolaCache(model.config, global_size=0)).logits
    torch.testing.assert_close(lola, plain, atol=1e-5, rtol=1e-5)
    cache = LolaCache(model.config, global_size=0)
    steps = torch.cat([model(IDS[:, i:i + 1], cache=cache).logits for i in range(IDS.shape[1])], 1)
    torch.testing.assert_close(steps, plain, atol=1e-5, rtol=1e-5)
    mask = torch.ones_like(IDS)
    g_lola = model.generate(IDS, attention_mask=mask, max_new_tokens=8, do_sample=False,
                            cache=LolaCache(model.config, global_size=0))
    g_plain = model.generate(IDS, attention_mask=mask, max_new_tokens=8, do_sample=False)
    assert torch.equal(g_lola, g_plain)


@torch.no_grad()
def test_decode_equals_prefill_with_global_cache(model):
    prefilled = model(IDS, cache=LolaCache(model.config, global_size=3)).logits
    cache = LolaCache(model.config, global_size=3)
    decoded = torch.cat([model(IDS[:, i:i + 1], cache=cache).logits for i in range(IDS.shape[1])], 1)
    torch.testing.assert_close(decoded, prefilled, atol=1e-5, rtol=1e-5)
    plain = model(IDS, use_cache=False).logits
    assert (prefilled - plain).abs().max() > 1e-3  # the sparse cache really changes the function
    chunked = LolaCache(model.config, global_size=3)
    last = prefill(model, IDS, chunked, chunk_tokens=5)
    torch.testing.assert_close(last, prefilled[:, -1], atol=1e-5, rtol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("settings", [dict(window=32, global_size=0),            # window covers everything
                                      dict(window=2, global_size=19, chunk_size=1)])  # cache keeps everything
def test_large_window_or_cache_is_exact_softmax(settings):
    base, _ = load_model(random=SPEC)
    model = tiny()
    expected = base(IDS).logits
    got = model(IDS, cache=LolaCache(model.config, **settings)).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_switch_on_at_load_time_via_config(model):
    try:
        enable_lola_cache(model, "window=4 global=3")
        out = model(IDS)  # eval mode, use_cache default: the default DynamicCache becomes a LoLA cache
        assert all(isinstance(layer, LolaLayer) for layer in out.past_key_values.layers)
        explicit = model(IDS, cache=LolaCache(model.config, "global=3")).logits
        torch.testing.assert_close(out.logits, explicit)
        g_config = model.generate(IDS, attention_mask=torch.ones_like(IDS), max_new_tokens=6, do_sample=False)
        g_explicit = model.generate(IDS, attention_mask=torch.ones_like(IDS), max_new_tokens=6, do_sample=False,
                                    cache=LolaCache(model.config, global_size=3))
        assert torch.equal(g_config, g_explicit)
        model.train()  # training forwards never switch to LoLA
        out = model(IDS)
        assert not any(isinstance(layer, LolaLayer) for layer in out.past_key_values.layers)
    finally:
        model.eval()
        disable_lola_cache(model)
    out = model(IDS)
    assert not any(isinstance(layer, LolaLayer) for layer in out.past_key_values.layers)


@torch.no_grad()
@pytest.mark.parametrize("settings", [dict(global_size=3), dict(global_size=3, chunk_size=3, window_mode="chunk")])
def test_mixed_left_padding_equals_each_row_alone(model, settings):
    """Rows left-padded by 0, 3 and 6 tokens in one batch (C = 4 or 3: pads are not multiples of C) generate what
    each generates alone; the pad token ids do not matter."""
    ids = torch.randint(0, 64, (3, 19), generator=torch.Generator().manual_seed(6))
    mask = torch.ones_like(ids)
    for row, pad in enumerate((0, 3, 6)):
        mask[row, :pad] = 0
        ids[row, :pad] = 7
    batch = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                           cache=LolaCache(model.config, **settings))
    for row, pad in enumerate((0, 3, 6)):
        alone = model.generate(ids[row:row + 1, pad:], attention_mask=mask[row:row + 1, pad:], max_new_tokens=8,
                               do_sample=False, cache=LolaCache(model.config, **settings))
        assert torch.equal(batch[row, 19:], alone[0, 19 - pad:]), row
    ids[1:, :3] = 9
    again = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                           cache=LolaCache(model.config, **settings))
    assert torch.equal(again[:, 19:], batch[:, 19:])


@torch.no_grad()
def test_masks_cover_only_the_new_tokens(model):
    """With a LoLA cache transformers builds each call's mask over the new tokens only (LolaLayer.get_mask_sizes),
    not over the whole context: a padded prompt then decode steps."""
    ids = torch.randint(0, 64, (2, 19), generator=torch.Generator().manual_seed(6))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    seen = []
    hook = model.model.layers[1].self_attn.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append((kwargs["hidden_states"].shape[1], kwargs["attention_mask"])),
        with_kwargs=True)
    try:
        model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                       cache=LolaCache(model.config, global_size=3))
    finally:
        hook.remove()
    assert len(seen) == 6 and seen[0][1] is not None  # the padded prompt needs a mask; a decode step may not
    for length, m in seen:
        assert m is None or m.shape[-1] == length, (length, None if m is None else m.shape)


@torch.no_grad()
@pytest.mark.parametrize("mixing,sinks,decay,rope", [("lola_code", 0, None, True), ("lolcats", 4, None, True),
                                                     ("lola_code", 4, None, True), ("lola_code", 4, 16, True),
                                                     ("lola_code", 4, 16, False), ("lolcats", 0, None, False)])
def test_trained_fusion_and_sinks_global_size_zero_equals_plain_hybrid(mixing, sinks, decay, rope):
    """A model trained with the 'lola_code' fusion and/or attention sinks and/or a linear decay and/or feature maps
    of the unrotated q, k (feature_map_rope false): LoLA with G = 0 computes the trained hybrid layer (prefill and
    token-by-token decode), so does a DynamicCache, and the LoLA cache counts the sink buffer and the map keys."""
    model, _ = load_model(random=dict(SPEC, seed=3))
    convert(model, dict(ATTN, mixing=mixing, sink_tokens=sinks, linear_decay=decay, feature_map_rope=rope))
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.window_factors.normal_()
    mask = torch.ones_like(IDS)
    mask[1, :5] = 0
    plain = model(IDS, attention_mask=mask, use_cache=False).logits
    cache = LolaCache(model.config, global_size=0)
    lola = model(IDS, attention_mask=mask, cache=cache).logits
    torch.testing.assert_close(lola[0], plain[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lola[1, 5:], plain[1, 5:], atol=1e-5, rtol=1e-5)
    steps, cache = [], LolaCache(model.config, global_size=0)
    for i in range(IDS.shape[1]):
        steps.append(model(IDS[:, i:i + 1], attention_mask=mask[:, :i + 1], cache=cache).logits)
    steps = torch.cat(steps, 1)
    torch.testing.assert_close(steps[0], plain[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(steps[1, 5:], plain[1, 5:], atol=1e-5, rtol=1e-5)
    dynamic, dyn_cache = [], DynamicCache(config=model.config)  # a growing KV cache: exact hybrid decode
    for i in range(IDS.shape[1]):
        dynamic.append(model(IDS[:, i:i + 1], attention_mask=mask[:, :i + 1], cache=dyn_cache).logits)
    dynamic = torch.cat(dynamic, 1)
    torch.testing.assert_close(dynamic[0], plain[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dynamic[1, 5:], plain[1, 5:], atol=1e-5, rtol=1e-5)
    resolved = LolaCacheConfig(global_size=0).resolve(model.model.layers[0].self_attn.attention_config)
    assert resolved.mixing == mixing
    assert cache.bytes_per_sequence() == lola_bytes_per_sequence(
        num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, feature_width=16, settings=resolved, dtype_bytes=4,
        sink_tokens=sinks, feature_map_rope=rope)


@torch.no_grad()
def test_unrotated_feature_maps_are_position_free():
    """feature_map_rope false: the linear terms see no position, so with the softmax window covering nothing but
    the current token's own band the layer's linear output is the same at any position offset; with RoPE inside
    the maps (LoLCATs) it is not."""
    outs = {}
    for rope in (True, False):
        model, _ = load_model(random=dict(SPEC, seed=4, num_hidden_layers=1))
        convert(model, dict(ATTN, feature_map_rope=rope))
        with torch.no_grad():
            model.model.layers[0].self_attn.window_factors.fill_(-30.0)  # sigma ~ 0: the linear terms alone
        ids = IDS[:1]
        pos = torch.arange(ids.shape[1])[None]
        outs[rope] = [model(ids, position_ids=pos + shift, use_cache=False, output_hidden_states=True).hidden_states[-1]
                      for shift in (0, 3000)]
    torch.testing.assert_close(outs[False][0], outs[False][1], atol=1e-5, rtol=1e-5)
    assert (outs[True][0] - outs[True][1]).abs().max() > 1e-3  # 2.6e-3 here; the unrotated maps: 2e-7


@torch.no_grad()
def test_beam_search(model):
    mask = torch.ones_like(IDS)
    g0 = model.generate(IDS, attention_mask=mask, max_new_tokens=6, num_beams=3, do_sample=False,
                        cache=LolaCache(model.config, global_size=0))
    plain = model.generate(IDS, attention_mask=mask, max_new_tokens=6, num_beams=3, do_sample=False)
    assert torch.equal(g0, plain)
    g3 = model.generate(IDS, attention_mask=mask, max_new_tokens=6, num_beams=3, do_sample=False,
                        cache=LolaCache(model.config, global_size=3))
    assert g3.shape == (2, 25)
    cache = LolaCache(model.config, global_size=3)
    model(IDS, cache=cache)
    before = {n: t.clone() for n, t in cache.layers[0].tensors().items()}
    cache.reorder_cache(torch.tensor([1, 0]))
    for name, t in cache.layers[0].tensors().items():
        assert torch.equal(t, before[name].flip(0)), name


@torch.no_grad()
def test_cache_sizes_stay_fixed_over_4k_generated_tokens():
    model = tiny(num_hidden_layers=1)
    cache = LolaCache(model.config, window=8, global_size=8)
    ids = torch.randint(0, 64, (1, 5), generator=torch.Generator().manual_seed(0))
    logits = model(ids, cache=cache).logits[:, -1]
    shapes = {n: t.shape for n, t in cache.layers[0].tensors().items()}
    nbytes = cache.nbytes()
    for _ in range(4096):
        nxt = logits.argmax(-1, keepdim=True)
        logits = model(nxt, cache=cache).logits[:, -1]
        assert cache.nbytes() == nbytes
    assert {n: t.shape for n, t in cache.layers[0].tensors().items()} == shapes
    assert cache.get_seq_length() == 4101
    assert (cache.layers[0].cache_pos >= 0).all()


@torch.no_grad()
def test_bytes_per_sequence_formula_matches_allocation(model):
    for settings in (dict(global_size=3), dict(global_size=5, gqa_selection="kv_mean", window_mode="chunk")):
        cache = LolaCache(model.config, **settings)
        model(IDS, cache=cache)
        resolved = LolaCacheConfig(**settings).resolve(model.model.layers[0].self_attn.attention_config)
        expected = lola_bytes_per_sequence(num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, feature_width=16,
                                           settings=resolved, dtype_bytes=4)
        assert cache.bytes_per_sequence() == expected
    # Llama-3.1-8B at 4K: the KV cache is 512 MiB (spec 4.8)
    assert kv_bytes_per_sequence(num_layers=32, num_kv_heads=8, head_dim=128, context=4096) == 512 * 2 ** 20
    rows = bytes_table(contexts=(4096,))
    assert {r["model"] for r in rows} == {"SmolLM2-135M", "Llama-3.2-1B", "Llama-3.1-8B"}
    assert "| Llama-3.1-8B | 64 | 256 |" in format_bytes_table(rows)
    with_sinks = bytes_table(contexts=(4096,), sink_tokens=4)  # 4 sink pairs per KV head, bf16, per layer
    for r0, r4 in zip(rows, with_sinks):
        shape = MODEL_SHAPES[r0["model"]]
        assert r4["lola_bytes"] - r0["lola_bytes"] == shape["num_layers"] * 2 * shape["num_kv_heads"] * 4 * \
            shape["head_dim"] * 2


def test_exported_checkpoint_carries_the_cache(tmp_path):
    model = tiny()
    enable_lola_cache(model, "window=4 global=3")
    with torch.no_grad():
        expected = model(IDS).logits
    export_model(model, None, tmp_path / "export")
    torch.save({"ids": IDS}, tmp_path / "ids.pt")
    code = f"""
import sys, importlib, importlib.util
sys.path.append({sysconfig.get_paths()['purelib']!r})
assert importlib.util.find_spec('lola_train') is None
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'export')!r}, trust_remote_code=True).eval()
ids = torch.load({str(tmp_path / 'ids.pt')!r})['ids']
with torch.no_grad():
    out = model(ids)
    lola = importlib.import_module(type(model).__module__.rsplit('.', 1)[0] + '.lola_cache')
    gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                         cache=lola.LolaCache(model.config, global_size=0))
torch.save({{'logits': out.logits, 'layers': [type(l).__name__ for l in out.past_key_values.layers],
            'gen': gen}}, {str(tmp_path / 'out.pt')!r})
"""
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", code], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt", weights_only=False)
    assert got["layers"] == ["LolaLayer", "LolaLayer"]
    torch.testing.assert_close(got["logits"], expected, atol=1e-5, rtol=1e-5)
    assert got["gen"].shape == (2, 23)
