"""LoLA cache at the layer level: streaming state vs the quadratic reference, the plain hybrid layer, the
coverage invariant, and bad settings. Random q, k, v fed straight into LolaLayer.attend."""
import pytest
import torch

from lola_train.convert import convert
from lola_train.models import load_model
from lola_train.modeling import ConfigError
from lola_train.modeling.hybrid_attention import repeat_kv
from lola_train.modeling.hybrid_ops import hybrid_attention_reference
from lola_train.modeling.lola_cache import LolaCacheConfig, LolaLayer
from lola_train.modeling.lola_ops import lola_reference, self_recall_error

B, H, HK, D_HEAD, W = 2, 4, 2, 8, 4


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def attn():
    torch.manual_seed(0)
    model, _ = load_model(random=dict(architecture="llama", vocab_size=32, hidden_size=H * D_HEAD,
                                      intermediate_size=32, num_hidden_layers=1, num_attention_heads=H,
                                      num_key_value_heads=HK))
    convert(model, dict(feature_dim=8, window_size=W, chunk_size=W))
    layer = model.model.layers[0].self_attn
    with torch.no_grad():  # break the symmetry of the identity init: different q/k maps, per-head factors
        layer.window_factors.normal_()
        layer.feature_map_k.weight.normal_()
    return layer


def inputs(length, seed=1, pads=(0, 3)):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, length, D_HEAD, generator=g)
    k = torch.randn(B, HK, length, D_HEAD, generator=g)
    v = torch.randn(B, HK, length, D_HEAD, generator=g)
    mask = torch.ones(B, length, dtype=torch.bool)
    for b, p in enumerate(pads):
        mask[b, :p] = False  # left padding
    return q, k, v, mask


def stream(layer_attn, settings, q, k, v, mask, split, hook=None):
    lay = LolaLayer(settings)
    ys, a = [], 0
    with torch.no_grad():
        for n in split:
            ys.append(lay.attend(layer_attn, q[:, :, a:a + n], k[:, :, a:a + n], v[:, :, a:a + n], mask[:, a:a + n]))
            a += n
            if hook:
                hook(lay, a)
    return torch.cat(ys, 2), lay


def reference(layer_attn, settings, q, k, v, mask):
    s = settings.resolve(layer_attn.attention_config)
    kk, vv = repeat_kv(k, H // HK), repeat_kv(v, H // HK)
    with torch.no_grad():
        fq, fk = layer_attn.feature_map_q(q), layer_attn.feature_map_k(kk)
        sigma, ell = layer_attn.mixing_factors()
        return lola_reference(q, kk, vv, fq, fk, sigma, ell, window=s.window, global_size=s.global_size,
                              update_positions=range(s.chunk_size, q.shape[2], s.chunk_size),
                              window_mode=s.window_mode, mixing=s.mixing, gqa_selection=s.gqa_selection,
                              num_kv_heads=HK, key_mask=mask)


SPLITS = {"prefill": [23], "decode": [1] * 23, "mixed": [5, 1, 1, 9, 7]}


@pytest.mark.parametrize("mode,chunk", [("sliding", 3), ("sliding", 4), ("chunk", 4)])
@pytest.mark.parametrize("global_size", [0, 3])
@pytest.mark.parametrize("gqa", ["query_head", "kv_max"])
@pytest.mark.parametrize("mixing", ["lolcats", "lola_code"])
def test_streaming_matches_reference_for_any_split(attn, mode, chunk, global_size, gqa, mixing):
    cfg = LolaCacheConfig(window=W, global_size=global_size, chunk_size=chunk, window_mode=mode,
                          gqa_selection=gqa, mixing=mixing)
    q, k, v, mask = inputs(23)
    y_ref, cached = reference(attn, cfg, q, k, v, mask)
    if global_size:
        assert cached.sum() > 0
    for name, split in SPLITS.items():
        y, _ = stream(attn, cfg, q, k, v, mask, split)
        torch.testing.assert_close(y, y_ref, atol=2e-6, rtol=1e-5, msg=name)
        assert torch.isfinite(y).all()


def test_global_cache_changes_the_output(attn):
    q, k, v, mask = inputs(23)
    y0, _ = stream(attn, LolaCacheConfig(window=W, global_size=0), q, k, v, mask, [23])
    y3, _ = stream(attn, LolaCacheConfig(window=W, global_size=3), q, k, v, mask, [23])
    assert (y0 - y3).abs().max() > 1e-3


@pytest.mark.parametrize("layout", ["sw", "tk"])
@pytest.mark.parametrize("split", ["prefill", "decode", "mixed"])
def test_global_size_zero_is_the_plain_hybrid_layer(attn, layout, split):
    """G = 0 in the trained layout = the hybrid layer with its DynamicCache: each call attends the whole prefix
    (tk blocks aligned to the end of the keys seen so far)."""
    cfg = LolaCacheConfig(global_size=0, window_mode="auto", chunk_size=3)
    old = attn.attention_config.window_layout
    attn.attention_config.window_layout = layout
    try:
        q, k, v, mask = inputs(23)
        y, _ = stream(attn, cfg, q, k, v, mask, SPLITS[split])
        kk, vv = repeat_kv(k, H // HK), repeat_kv(v, H // HK)
        with torch.no_grad():
            fq, fk = attn.feature_map_q(q), attn.feature_map_k(kk)
            sigma, ell = attn.mixing_factors()
            parts, a = [], 0
            for n in SPLITS[split]:
                parts.append(hybrid_attention_reference(q[:, :, a:a + n], kk[:, :, :a + n], vv[:, :, :a + n],
                                                        fq[:, :, a:a + n], fk[:, :, :a + n], sigma, ell,
                                                        window=W, layout=layout, key_mask=mask[:, :a + n]))
                a += n
        torch.testing.assert_close(y, torch.cat(parts, 2).float(), atol=2e-6, rtol=1e-5)
    finally:
        attn.attention_config.window_layout = old


@pytest.mark.parametrize("gqa", ["query_head", "kv_mean"])
@pytest.mark.parametrize("update_every", ["chunk", "token"])
def test_every_past_token_is_in_exactly_one_memory(attn, gqa, update_every):
    """After every call: live window pairs, cached pairs and folded pairs partition the past non-pad tokens.
    Folded = H and s equal the explicit sums over exactly the tokens in neither the window nor the cache."""
    cfg = LolaCacheConfig(window=W, global_size=3, chunk_size=3, gqa_selection=gqa, update_every=update_every)
    q, k, v, mask = inputs(29, seed=3, pads=(0, 5))
    kk, vv = repeat_kv(k, H // HK), repeat_kv(v, H // HK)
    with torch.no_grad():
        fk = attn.feature_map_k(kk).float()
    checked = []

    def check(lay, seen):
        assert lay.get_seq_length() == seen
        r_pos = lay.recent_positions()
        for b in range(B):
            live = {int(p) for p, ok in zip(r_pos, lay.recent_valid[b]) if ok and p >= lay.first_live}
            for h in range(H):
                hs = h if gqa == "query_head" else h // (H // HK)
                cached = [int(p) for p in lay.cache_pos[b, hs] if p >= 0]
                assert len(cached) == len(set(cached)) and not (set(cached) & live)
                past = {p for p in range(seen) if mask[b, p]}
                assert set(cached) | live <= past
                folded = sorted(past - live - set(cached))
                h_exp = fk[b, h, folded].T @ vv[b, h, folded].float()
                torch.testing.assert_close(lay.h_state[b, h], h_exp, atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(lay.s_state[b, h], fk[b, h, folded].sum(0), atol=1e-5, rtol=1e-5)
                assert len(live) + len(cached) + len(folded) == len(past)
        checked.append(seen)

    stream(attn, cfg, q, k, v, mask, [4, 1, 1, 1, 7] + [1] * 15, hook=check)
    assert len(checked) == 20
    _, lay = stream(attn, cfg, q, k, v, mask, [29])
    assert (lay.cache_pos >= 0).all() and lay.h_state.abs().sum() > 0  # the cache is full, the state used


def test_self_recall_error_definition():
    fk = torch.tensor([[[[1.0, 0.0], [0.5, 0.5]]]])
    v = torch.tensor([[[[2.0, 0.0], [0.0, 2.0]]]])
    h = torch.tensor([[[[2.0, 0.0], [0.0, 2.0]]]])  # recalls v = 2 fk / (fk . s)
    s = torch.tensor([[[1.0, 1.0]]])
    sre = self_recall_error(fk, v, h, s, eps=0.0)
    torch.testing.assert_close(sre, torch.tensor([[[0.0, 2.0]]]))  # (1, 1) vs (0, 2): 1 + 1
    empty = self_recall_error(fk, v, torch.zeros_like(h), torch.zeros_like(s))
    torch.testing.assert_close(empty, (v ** 2).sum(-1))  # H = s = 0: SRE = ||v||^2


def test_lola_code_fusion_does_not_overflow(attn):
    cfg = LolaCacheConfig(window=W, global_size=3, chunk_size=W, mixing="lola_code")
    q, k, v, mask = inputs(12)
    y, _ = stream(attn, cfg, q * 40, k * 40, v, mask, [12])  # logits far beyond exp's float32 range
    assert torch.isfinite(y).all()


def test_settings_errors_name_the_field():
    with pytest.raises(ConfigError, match="lola_cache.window_mode"):
        LolaCacheConfig(window_mode="ring")
    with pytest.raises(ConfigError, match="lola_cache.global_size"):
        LolaCacheConfig(global_size=-1)
    with pytest.raises(ConfigError, match="unknown lola cache key 'size'"):
        LolaCacheConfig.from_spec("lola size=3")
    with pytest.raises(ConfigError, match="lola_cache.windw"):
        LolaCacheConfig.coerce({"windw": 3})
    cfg = LolaCacheConfig.from_spec("cache=lola window=64 global=256 mixing=lola_code chunk=none")
    assert (cfg.window, cfg.global_size, cfg.mixing, cfg.chunk_size) == (64, 256, "lola_code", None)


def test_crop_is_refused_and_reset_clears(attn):
    q, k, v, mask = inputs(9)
    _, lay = stream(attn, LolaCacheConfig(window=W, global_size=2), q, k, v, mask, [9])
    lay.crop(0)
    with pytest.raises(ValueError, match="cannot be cropped"):
        lay.crop(-1)
    lay.reset()
    assert lay.get_seq_length() == 0 and not lay.is_initialized and lay.nbytes() == 0
