"""LoLA cache at the layer level: the batched streaming state vs the quadratic reference (every window mode, both
fusions, GQA selections, sinks, odd lengths, mixed left padding, any split into calls), per-row update timing (a
padded row equals the row alone), the plain hybrid layer (G = 0, a large window, a large cache), the coverage
invariant and the memory attribution, and bad settings. Random q, k, v fed straight into LolaLayer.attend."""
import dataclasses

import pytest
import torch

from lola_train.convert import convert
from lola_train.models import load_model
from lola_train.modeling import ConfigError
from lola_train.modeling.attention_config import AttentionConfig
from lola_train.modeling.hybrid_attention import repeat_kv
from lola_train.modeling.hybrid_ops import hybrid_attention_reference, mixing_weights
from lola_train.modeling.lola_cache import LolaCacheConfig, LolaLayer
from lola_train.modeling.lola_ops import (MEMORIES, DuplicatePairs, lola_reference, select_and_fold,
                                          self_recall_error)

B, H, HK, D_HEAD, W = 3, 4, 2, 8, 4
PADS = (0, 3, 6)  # mixed left padding in one batch: none, less than a chunk, more than a chunk


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
    layer.decay_factors = None  # no trained decay unless a test sets one (fixture ``trained``)
    return layer


@pytest.fixture
def trained(attn, monkeypatch):
    """trained(mixing=..., sink_tokens=..., window_layout=...): set the layer's trained options for one test."""
    def set_options(**options):
        for name, value in options.items():
            monkeypatch.setattr(attn.attention_config, name, value)
        if options.get("linear_decay"):  # per-head gamma between 0.7 and 0.95: visible within 23 tokens
            attn.decay_factors = torch.nn.Parameter(torch.logit(torch.linspace(0.7, 0.95, H)))
        return attn
    yield set_options
    attn.decay_factors = None


def inputs(length, seed=1, pads=PADS):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(len(pads), H, length, D_HEAD, generator=g)
    k = torch.randn(len(pads), HK, length, D_HEAD, generator=g)
    v = torch.randn(len(pads), HK, length, D_HEAD, generator=g)
    mask = torch.ones(len(pads), length, dtype=torch.bool)
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
    with torch.no_grad():
        fq, fk = layer_attn.feature_map_q(q), layer_attn.feature_map_k(repeat_kv(k, H // HK))
        sigma, ell = mixing_weights(layer_attn.window_factors, s.mixing)
        return lola_reference(q, k, v, fq, fk, sigma, ell, window=s.window, global_size=s.global_size,
                              chunk_size=s.chunk_size, window_mode=s.window_mode, mixing=s.mixing,
                              gqa_selection=s.gqa_selection, key_mask=mask,
                              sink_tokens=layer_attn.attention_config.sink_tokens, decay=layer_attn.decay(),
                              dedup=s.dedup, cache_weight=s.cache_weight)


SPLITS = {"prefill": [23], "decode": [1] * 23, "mixed": [5, 1, 1, 9, 7]}


@pytest.mark.parametrize("mode,chunk", [("sliding", 3), ("sliding", 4), ("chunk", 4), ("chunk", 3)])
@pytest.mark.parametrize("global_size", [0, 3])
@pytest.mark.parametrize("gqa", ["query_head", "kv_max"])
@pytest.mark.parametrize("mixing", ["lolcats", "lola_code"])
@pytest.mark.parametrize("sinks", [0, 2])
@pytest.mark.parametrize("decay", [None, 16])
def test_streaming_matches_reference_for_any_split(attn, trained, mode, chunk, global_size, gqa, mixing, sinks,
                                                   decay):
    trained(sink_tokens=sinks, linear_decay=decay)
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


def repeated_values(v, distinct=3, seed=7):
    """v with every value a near-copy (cosine > 0.999) of one of ``distinct`` directions per KV head, as a repeated
    phrase gives: value-deduplicated selection then has duplicates to demote."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(v.shape[0], v.shape[1], distinct, v.shape[-1], generator=g)
    copies = base[:, :, torch.arange(v.shape[2]) % distinct]
    return copies * (1 + torch.rand(v.shape[:3] + (1,), generator=g)) + 1e-3 * torch.randn(v.shape, generator=g)


@pytest.mark.parametrize("mode,chunk", [("sliding", 3), ("chunk", 4)])
@pytest.mark.parametrize("gqa", ["query_head", "kv_max"])
@pytest.mark.parametrize("sinks,decay", [(0, None), (2, 16)])
def test_deduplicated_selection_matches_reference(attn, trained, mode, chunk, gqa, sinks, decay):
    """lola_cache.dedup: streaming (lola_ops.demote_duplicates in select_and_fold) == the reference's own rule, for
    any split into calls, with values that repeat (so duplicates are demoted and the cache differs from plain
    selection) and with the half of the values distinct."""
    trained(sink_tokens=sinks, linear_decay=decay)
    q, k, v, mask = inputs(23, seed=3)
    v = torch.cat([repeated_values(v[..., :12, :]), v[..., 12:, :]], dim=2)
    cfg = LolaCacheConfig(window=W, global_size=3, chunk_size=chunk, window_mode=mode, gqa_selection=gqa,
                          dedup=0.98)
    y_ref, cached = reference(attn, cfg, q, k, v, mask)
    _, cached_plain = reference(attn, LolaCacheConfig(window=W, global_size=3, chunk_size=chunk, window_mode=mode,
                                                      gqa_selection=gqa), q, k, v, mask)
    assert not torch.equal(cached, cached_plain)
    for name, split in SPLITS.items():
        y, _ = stream(attn, cfg, q, k, v, mask, split)
        torch.testing.assert_close(y, y_ref, atol=2e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("mode,chunk", [("sliding", 3), ("chunk", 4)])
@pytest.mark.parametrize("mixing", ["lolcats", "lola_code"])
@pytest.mark.parametrize("gqa,sinks,decay", [("query_head", 0, None), ("kv_max", 2, 16)])
def test_cache_weight_matches_reference(attn, trained, mode, chunk, mixing, gqa, sinks, decay):
    """lola_cache.cache_weight w: the sparse cache's pairs weigh w e^s in the streaming path (prefill, decode, any
    split) as in the reference; the window, the sinks and the linear memory are unchanged, so with G = 0 the
    weight changes nothing and with G > 0 it changes the output."""
    trained(sink_tokens=sinks, linear_decay=decay)
    q, k, v, mask = inputs(23)
    cfg = LolaCacheConfig(window=W, global_size=3, chunk_size=chunk, window_mode=mode, gqa_selection=gqa,
                          mixing=mixing, cache_weight=6.0)
    y_ref, _ = reference(attn, cfg, q, k, v, mask)
    y_plain, _ = reference(attn, dataclasses.replace(cfg, cache_weight=1.0), q, k, v, mask)
    assert not torch.allclose(y_ref, y_plain, atol=1e-4)
    for name, split in SPLITS.items():
        y, _ = stream(attn, cfg, q, k, v, mask, split)
        torch.testing.assert_close(y, y_ref, atol=2e-6, rtol=1e-5, msg=name)
    no_cache = dataclasses.replace(cfg, global_size=0)
    torch.testing.assert_close(stream(attn, no_cache, q, k, v, mask, [23])[0],
                               stream(attn, dataclasses.replace(no_cache, cache_weight=1.0), q, k, v, mask, [23])[0])


def test_pinned_positions_stay_in_the_cache(attn, trained):
    """LolaLayer.pinned (the passkey --pin-needle diagnostic): the pinned real positions rank first at every
    update, so after the prompt they are all in the sparse cache, which plain selection does not give here."""
    trained()
    q, k, v, mask = inputs(23)
    cfg = LolaCacheConfig(window=W, global_size=3, chunk_size=3, gqa_selection="kv_max")
    keep = torch.arange(2, 5)

    def memory(pin):
        lay = LolaLayer(cfg)
        lay.pinned = pin
        with torch.no_grad():
            lay.attend(attn, q, k, v, mask)
        return lay.memory_of(keep)[0]                                            # row 0, unpadded: [H, 3]

    cache = MEMORIES.index("cache")
    assert (memory((2, 5)) == cache).all()
    assert not (memory(None) == cache).all()


def test_deduplicated_selection_keeps_one_pair_per_repeated_value():
    """Six candidates, two copies each of three values (the copies scaled, so they score differently), G = 3: plain
    selection keeps the best three scores, whatever they copy; dedup keeps the best-scored copy of each value."""
    g = torch.Generator().manual_seed(2)
    b, h, d, dd, keep = 1, 1, 4, 6, 3
    base = torch.randn(3, d, generator=g) * torch.tensor([[5.0], [1.0], [1.0]])  # value 0: both copies top plainly
    cand_v = torch.cat([base, base * 1.5])[None, None].contiguous()              # copies at slots i and i + 3
    cand_k, cand_fk = torch.randn(b, h, 6, d, generator=g), torch.rand(b, h, 6, dd, generator=g)
    cand_pos = torch.arange(6, dtype=torch.int32).view(1, 1, 6)
    h0, s0 = torch.zeros(b, h, dd, d), torch.zeros(b, h, dd)                      # SRE = ||v||^2
    kept = {}
    for dedup in (0.0, 0.99):
        pos = cand_pos.clone()
        select_and_fold(cand_k.clone(), cand_v.clone(), pos, cand_fk.clone(), h0.clone(), s0.clone(),
                        global_size=keep, dedup=dedup)
        kept[dedup] = sorted(int(p) for p in pos[0, 0, :keep])
    norms = cand_v[0, 0].norm(dim=-1)
    assert kept[0.0] == sorted(norms.topk(keep).indices.tolist()) and {0, 3} <= set(kept[0.0])
    assert kept[0.99] == [3, 4, 5]                                                # the larger copy of each value


@pytest.mark.parametrize("gqa", ["query_head", "kv_max"])
def test_duplicate_pairs_carried_across_updates_match_the_full_similarity(gqa):
    """DuplicatePairs (the streaming path's dedup: the cache's similar pairs taken once, then only the new
    candidates' similarities per update, renamed as slots move) selects exactly what demote_duplicates' full
    [G+N, G+N] similarity selects, over many updates, with values that repeat a few directions (many duplicates)
    exact copies (equal scores), and an update of only some rows of the batch."""
    g = torch.Generator().manual_seed(5)
    b, hs, d, dd, cache, n = 3, 2, 8, 6, 12, 5
    h = hs * (1 if gqa == "query_head" else 2)                                 # query heads; hs storage heads
    base = torch.randn(b, hs, 4, d, generator=g)

    def values(m):  # 3 in 4 values near-copy one of 4 directions, the others are distinct
        pick = base[:, :, torch.randint(0, 4, (m,), generator=g)]
        near = pick * (1 + torch.rand(b, hs, m, 1, generator=g)) + 1e-4 * torch.randn(b, hs, m, d, generator=g)
        return torch.where(torch.rand(b, hs, m, 1, generator=g) < 0.75, near, torch.randn(b, hs, m, d, generator=g))

    def fresh():
        return dict(k=torch.zeros(b, hs, cache + n, d), v=torch.zeros(b, hs, cache + n, d),
                    pos=torch.full((b, hs, cache + n), -1, dtype=torch.long), fk=torch.zeros(b, h, cache + n, dd),
                    h=torch.zeros(b, h, dd, d), s=torch.zeros(b, h, dd))
    full, paired, plain = fresh(), fresh(), fresh()
    pairs = DuplicatePairs.of_cache(paired["v"][:, :, :cache], paired["pos"][:, :, :cache], 0.98)
    differs = kept_pairs = 0
    for u in range(12):
        new = dict(k=torch.randn(b, hs, n, d, generator=g), v=values(n),
                   pos=torch.arange(u * n, (u + 1) * n).expand(b, hs, n).clone(),
                   fk=torch.rand(b, h, n, dd, generator=g))
        if u:  # an exact copy of a value and feature of the last update: equal scores, ranked by position
            new["v"][:, :, 0], new["fk"][:, :, 0] = last["v"][:, :, 1], last["fk"][:, :, 1]
        last = new
        rows = torch.tensor([0, 2]) if u % 3 == 2 else None                  # some updates touch rows 0 and 2 only
        for state in (full, paired, plain):
            for name, t in new.items():
                state[name][:, :, cache:] = t
        for state, dup in ((full, None), (paired, pairs), (plain, None)):
            cand = {name: t if rows is None else t[rows] for name, t in state.items()}
            part = dup if rows is None or dup is None else dup.rows(rows, b)
            select_and_fold(cand["k"], cand["v"], cand["pos"], cand["fk"], cand["h"], cand["s"], global_size=cache,
                            gqa_selection=gqa, dedup=0.0 if state is plain else 0.98, duplicates=part)
            if rows is not None:
                for name, t in cand.items():
                    state[name][rows] = t
                if dup is not None:
                    dup.put_rows(rows, part, b)
        assert torch.equal(full["pos"], paired["pos"]), u
        torch.testing.assert_close(full["h"], paired["h"])
        differs += int(not torch.equal(plain["pos"], full["pos"]))
        kept_pairs = max(kept_pairs, pairs.pairs.shape[0])
    assert differs > 0 and kept_pairs > 0           # dedup changed the cache; similar pairs were carried in it


@pytest.mark.parametrize("gqa,dedup", [("query_head", 0.0), ("kv_max", 0.0), ("kv_max", 0.98)])
def test_unrotated_map_keys_match_reference(attn, trained, gqa, dedup):
    """attention.feature_map_rope false: the feature maps read q_map, k_map (the unrotated q, k) while the softmax
    reads q, k; the cache keeps [k | k_map] and equals the reference given phi(q_map), phi(k_map), for any split."""
    trained(feature_map_rope=False, sink_tokens=2, linear_decay=16)
    q, k, v, mask = inputs(23, seed=3)
    q_map, k_map, _, _ = inputs(23, seed=9)
    cfg = LolaCacheConfig(window=W, global_size=3, chunk_size=3, gqa_selection=gqa, dedup=dedup)
    s = cfg.resolve(attn.attention_config)
    with torch.no_grad():
        fq, fk = attn.feature_map_q(q_map), attn.feature_map_k(repeat_kv(k_map, H // HK))
        sigma, ell = mixing_weights(attn.window_factors, s.mixing)
        y_ref, _ = lola_reference(q, k, v, fq, fk, sigma, ell, window=W, global_size=3, chunk_size=3,
                                  window_mode=s.window_mode, mixing=s.mixing, gqa_selection=gqa, key_mask=mask,
                                  sink_tokens=2, decay=attn.decay(), dedup=dedup)
    for name, split in SPLITS.items():
        lay, ys, a = LolaLayer(cfg), [], 0
        with torch.no_grad():
            for n in split:
                part = slice(a, a + n)
                ys.append(lay.attend(attn, q[:, :, part], k[:, :, part], v[:, :, part], mask[:, part],
                                     q_map=q_map[:, :, part], k_map=k_map[:, :, part]))
                a += n
        torch.testing.assert_close(torch.cat(ys, 2), y_ref, atol=2e-6, rtol=1e-5, msg=name)
    assert lay.cache_k.shape[-1] == lay.recent_k.shape[-1] == 2 * D_HEAD and lay.sink_k.shape[-1] == D_HEAD
    with pytest.raises(ValueError, match="pass q_map and k_map"):
        LolaLayer(cfg).attend(attn, q, k, v, mask)


@pytest.mark.parametrize("global_size", [0, 3])
@pytest.mark.parametrize("mixing,sinks,decay", [("lolcats", 0, None), ("lola_code", 2, None), ("lola_code", 2, 16)])
def test_tk_prefill_matches_reference(attn, trained, global_size, mixing, sinks, decay):
    """'tk' aligns its blocks to the end of each call, so the one-call reference is compared with one call."""
    trained(sink_tokens=sinks, linear_decay=decay)
    cfg = LolaCacheConfig(window=W, global_size=global_size, chunk_size=3, window_mode="tk", mixing=mixing)
    q, k, v, mask = inputs(29, seed=4)
    y_ref, _ = reference(attn, cfg, q, k, v, mask)
    y, _ = stream(attn, cfg, q, k, v, mask, [29])
    torch.testing.assert_close(y, y_ref, atol=2e-6, rtol=1e-5)


def test_long_calls_run_in_blocks(attn, monkeypatch):
    """A call longer than SEGMENT_BLOCK_TOKENS is attended block by block, carrying the state between blocks."""
    cfg = LolaCacheConfig(window=W, global_size=3, chunk_size=3)
    q, k, v, mask = inputs(23)
    y_ref, _ = reference(attn, cfg, q, k, v, mask)
    monkeypatch.setattr(LolaLayer, "SEGMENT_BLOCK_TOKENS", 6)  # 2 chunks per block
    y, _ = stream(attn, cfg, q, k, v, mask, [23])
    torch.testing.assert_close(y, y_ref, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("mode", ["sliding", "tk", "chunk"])
@pytest.mark.parametrize("global_size,chunk", [(0, 3), (3, 3), (3, 4), (5, 2)])
@pytest.mark.parametrize("update_every", ["chunk", "token"])
@pytest.mark.parametrize("decay", [None, 16])
def test_padded_row_equals_the_row_alone(attn, trained, mode, global_size, chunk, update_every, decay):
    """Updates are timed by each row's real tokens: rows with 0, 3 and 6 pad tokens in one batch give what each
    gives alone, for a prefill and the decode steps after it (outputs and final state)."""
    trained(sink_tokens=2, linear_decay=decay)
    cfg = LolaCacheConfig(window=W, global_size=global_size, chunk_size=chunk, window_mode=mode,
                          update_every=update_every)
    prompt, steps = 13, 9
    q, k, v, mask = inputs(prompt + steps, seed=7)
    y, lay = stream(attn, cfg, q, k, v, mask, [prompt] + [1] * steps)
    for b, pad in enumerate(PADS):
        sl = slice(pad, None)
        alone, lay1 = stream(attn, cfg, q[b:b + 1, :, sl], k[b:b + 1, :, sl], v[b:b + 1, :, sl],
                             mask[b:b + 1, sl], [prompt - pad] + [1] * steps)
        torch.testing.assert_close(y[b:b + 1, :, sl], alone, atol=2e-6, rtol=1e-5, msg=f"row {b}")
        assert torch.equal(y[b, :, :pad], torch.zeros_like(y[b, :, :pad]))  # padding gives 0
        assert torch.equal(lay.cache_pos[b].sort(-1).values, lay1.cache_pos[0].sort(-1).values)
        torch.testing.assert_close(lay.h_state[b], lay1.h_state[0], atol=1e-5, rtol=1e-5)
        assert int(lay.real_seen[b]) == prompt + steps - pad
    assert lay.get_seq_length() == prompt + steps  # transformers' counter includes the padding


@pytest.mark.parametrize("layout", ["sw", "tk"])
@pytest.mark.parametrize("mixing,sinks,decay", [("lolcats", 0, None), ("lolcats", 4, None), ("lola_code", 0, None),
                                                ("lola_code", 4, None), ("lola_code", 4, 16), ("lolcats", 0, 16)])
@pytest.mark.parametrize("settings", [dict(global_size=0), dict(window=32, global_size=0),
                                      dict(window=2, global_size=32, chunk_size=1, window_mode="sliding")],
                         ids=["G0", "big-window", "big-G"])
def test_plain_hybrid_layer_is_the_limit(attn, trained, layout, mixing, sinks, decay, settings):
    """G = 0 in the trained layout, or a window / cache that holds everything, = the trained hybrid layer (with
    its DynamicCache: each call attends the whole prefix, tk blocks aligned to the end of the keys so far), for
    both fusions and with attention sinks; the cache uses the trained mixing ('auto'). The big cache uses the
    'sliding' window, where every pair leaving the window is scored at once ('tk' keeps a few recent pairs out of
    its terrace, and so linear, until they are older than 2W)."""
    trained(window_layout=layout, mixing=mixing, sink_tokens=sinks, linear_decay=decay)
    window = W if settings.get("global_size") == 0 and "window" not in settings else 32
    cfg = LolaCacheConfig(chunk_size=settings.get("chunk_size", 3), **{k: v for k, v in settings.items()
                                                                       if k != "chunk_size"})
    q, k, v, mask = inputs(23)
    kk, vv = repeat_kv(k, H // HK), repeat_kv(v, H // HK)
    with torch.no_grad():
        fq, fk = attn.feature_map_q(q), attn.feature_map_k(kk)
        sigma, ell = attn.mixing_factors()
    for name, split in SPLITS.items():
        y, _ = stream(attn, cfg, q, k, v, mask, split)
        parts, a = [], 0
        with torch.no_grad():
            for n in split:
                parts.append(hybrid_attention_reference(q[:, :, a:a + n], kk[:, :, :a + n], vv[:, :, :a + n],
                                                        fq[:, :, a:a + n], fk[:, :, :a + n], sigma, ell,
                                                        window=window, layout=layout, key_mask=mask[:, :a + n],
                                                        mixing=mixing, sink_tokens=sinks, decay=attn.decay()))
                a += n
        torch.testing.assert_close(y, torch.cat(parts, 2).float(), atol=2e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("gqa", ["query_head", "kv_mean"])
@pytest.mark.parametrize("update_every", ["chunk", "token"])
def test_every_past_token_is_in_exactly_one_memory(attn, trained, gqa, update_every):
    """After every call: live recent pairs, sinks, cached pairs and folded pairs partition each row's past real
    tokens; H and s equal the explicit sums over exactly the folded ones; memory_of reports the same partition."""
    sinks = 2
    trained(sink_tokens=sinks)
    cfg = LolaCacheConfig(window=W, global_size=3, chunk_size=3, gqa_selection=gqa, update_every=update_every)
    q, k, v, mask = inputs(29, seed=3, pads=(0, 5, 2))
    kk, vv = repeat_kv(k, H // HK), repeat_kv(v, H // HK)
    with torch.no_grad():
        fk = attn.feature_map_k(kk).float()
    checked = []

    def check(lay, seen):
        assert lay.get_seq_length() == seen
        codes = lay.memory_of(torch.arange(seen + 2))
        for b in range(3):
            tokens = torch.nonzero(mask[b, :seen]).flatten().tolist()       # real position r -> token index
            assert int(lay.real_seen[b]) == len(tokens)
            n = len(tokens)
            sink = set(range(min(sinks, n)))
            live = {int(r) for r in lay.recent_positions()[b] if int(lay.first_live[b]) <= r < n and r >= sinks}
            for h in range(H):
                hs = h if gqa == "query_head" else h // (H // HK)
                cached = [int(r) for r in lay.cache_pos[b, hs] if r >= 0]
                assert len(cached) == len(set(cached)) and not (set(cached) & (live | sink))
                assert set(cached) | live | sink <= set(range(n))
                folded = sorted(set(range(n)) - live - sink - set(cached))
                idx = [tokens[r] for r in folded]
                torch.testing.assert_close(lay.h_state[b, h], fk[b, h, idx].T @ vv[b, h, idx].float(), atol=1e-5,
                                           rtol=1e-5)
                torch.testing.assert_close(lay.s_state[b, h], fk[b, h, idx].sum(0), atol=1e-5, rtol=1e-5)
                want = [MEMORIES.index("sink") if r in sink else MEMORIES.index("recent") if r in live else
                        MEMORIES.index("cache") if r in cached else MEMORIES.index("linear") if r < n else -1
                        for r in range(seen + 2)]
                assert codes[b, h].tolist() == want
        checked.append(seen)

    stream(attn, cfg, q, k, v, mask, [4, 1, 1, 1, 7] + [1] * 15, hook=check)
    assert len(checked) == 20
    _, lay = stream(attn, cfg, q, k, v, mask, [29])
    assert (lay.cache_pos >= 0).all() and lay.h_state.abs().sum() > 0  # the cache is full, the state used


def test_select_and_fold_keeps_the_top_scores_in_place():
    """The first G slots hold the G best candidates by self-recall error afterwards (kept new pairs moved into the
    slots of dropped ones); exactly the other valid candidates are folded into (H, s)."""
    g = torch.Generator().manual_seed(5)
    b, h, n, d, dd, keep = 2, 3, 11, 4, 6, 5
    cand_k, cand_v = torch.randn(b, h, n, d, generator=g), torch.randn(b, h, n, d, generator=g)
    cand_pos = torch.arange(n, dtype=torch.int32).repeat(b, h, 1)
    cand_pos[:, :, 2] = -1                   # an empty cache slot
    cand_pos[0, 1, 8] = -1                   # a candidate that is not one (padding)
    cand_fk = torch.rand(b, h, n, dd, generator=g)
    h0, s0 = torch.rand(b, h, dd, d, generator=g), torch.rand(b, h, dd, generator=g)
    sre = self_recall_error(cand_fk, cand_v, h0, s0).masked_fill(cand_pos < 0, float("-inf"))
    best = sre.topk(keep, -1).indices
    before = [t.clone() for t in (cand_k, cand_v, cand_pos, cand_fk)]
    hs, ss = h0.clone(), s0.clone()
    select_and_fold(cand_k, cand_v, cand_pos, cand_fk, hs, ss, global_size=keep)
    for bi in range(b):
        for hi in range(h):
            kept = sorted(int(p) for p in cand_pos[bi, hi, :keep])
            assert kept == sorted(int(before[2][bi, hi, j]) for j in best[bi, hi])
            for slot in range(keep):  # each slot holds one candidate's k, v, phi_k whole
                j = int(cand_pos[bi, hi, slot])
                assert torch.equal(cand_k[bi, hi, slot], before[0][bi, hi, j])
                assert torch.equal(cand_fk[bi, hi, slot], before[3][bi, hi, j])
            folded = [j for j in range(n) if before[2][bi, hi, j] >= 0 and j not in best[bi, hi].tolist()]
            want_h = h0[bi, hi] + before[3][bi, hi, folded].T @ before[1][bi, hi, folded]
            torch.testing.assert_close(hs[bi, hi], want_h)
            torch.testing.assert_close(ss[bi, hi], s0[bi, hi] + before[3][bi, hi, folded].sum(0))


def test_self_recall_error_definition():
    fk = torch.tensor([[[[1.0, 0.0], [0.5, 0.5]]]])
    v = torch.tensor([[[[2.0, 0.0], [0.0, 2.0]]]])
    h = torch.tensor([[[[2.0, 0.0], [0.0, 2.0]]]])  # recalls v = 2 fk / (fk . s)
    s = torch.tensor([[[1.0, 1.0]]])
    sre = self_recall_error(fk, v, h, s, eps=0.0)
    torch.testing.assert_close(sre, torch.tensor([[[0.0, 2.0]]]))  # (1, 1) vs (0, 2): 1 + 1
    empty = self_recall_error(fk, v, torch.zeros_like(h), torch.zeros_like(s))
    torch.testing.assert_close(empty, (v ** 2).sum(-1))  # H = s = 0: SRE = ||v||^2
    grouped = self_recall_error(fk.repeat(1, 2, 1, 1), v, h.repeat(1, 2, 1, 1), s.repeat(1, 2, 1), eps=0.0)
    torch.testing.assert_close(grouped, sre.repeat(1, 2, 1))  # v shared by a group of query heads


def test_lola_code_fusion_does_not_overflow(attn):
    cfg = LolaCacheConfig(window=W, global_size=3, chunk_size=W, mixing="lola_code")
    q, k, v, mask = inputs(12)
    y, _ = stream(attn, cfg, q * 40, k * 40, v, mask, [12])  # logits far beyond exp's float32 range
    assert torch.isfinite(y).all()


def test_mixing_auto_is_the_trained_fusion():
    trained = AttentionConfig(mixing="lola_code")
    assert LolaCacheConfig().mixing == "auto"
    assert LolaCacheConfig().resolve(trained).mixing == "lola_code"
    assert LolaCacheConfig(mixing="lolcats").resolve(trained).mixing == "lolcats"
    assert LolaCacheConfig().resolve(AttentionConfig()).mixing == "lolcats"


def test_settings_errors_name_the_field():
    with pytest.raises(ConfigError, match="lola_cache.window_mode"):
        LolaCacheConfig(window_mode="ring")
    with pytest.raises(ConfigError, match="lola_cache.global_size"):
        LolaCacheConfig(global_size=-1)
    with pytest.raises(ConfigError, match="lola_cache.mixing"):
        LolaCacheConfig(mixing="softmax")
    with pytest.raises(ConfigError, match="unknown lola cache key 'size'"):
        LolaCacheConfig.from_spec("lola size=3")
    with pytest.raises(ConfigError, match="lola_cache.windw"):
        LolaCacheConfig.coerce({"windw": 3})
    for bad in (1.5, -0.1, "0.9", True):
        with pytest.raises(ConfigError, match="lola_cache.dedup"):
            LolaCacheConfig(dedup=bad)
    for bad in (0, -1.0, float("inf"), True, "big"):
        with pytest.raises(ConfigError, match="lola_cache.cache_weight"):
            LolaCacheConfig(cache_weight=bad)
    assert LolaCacheConfig.from_spec("lola weight=20").cache_weight == 20.0
    with pytest.raises(ConfigError, match="dedup='high' is not a number"):
        LolaCacheConfig.from_spec("lola dedup=high")
    assert LolaCacheConfig.from_spec("lola dedup=0.98").dedup == 0.98
    cfg = LolaCacheConfig.from_spec("cache=lola window=64 global=256 mixing=lola_code chunk=none")
    assert (cfg.window, cfg.global_size, cfg.mixing, cfg.chunk_size) == (64, 256, "lola_code", None)


def test_decayed_state_is_the_weighted_sum_of_folded_pairs(attn, trained):
    """With a trained decay, (H, s) after a prefill = sum over folded pairs of gamma^(state_at - j) phi_k(k_j) v_j,
    and state_at is the last update's position."""
    trained(linear_decay=16)
    cfg = LolaCacheConfig(window=W, global_size=2, chunk_size=3)
    q, k, v, mask = inputs(17, pads=(0,))
    _, lay = stream(attn, cfg, q, k, v, mask, [17])
    assert int(lay.state_at[0]) == 15
    code = lay.memory_of(torch.arange(17))[0]                                    # [H,17]
    with torch.no_grad():
        fk = attn.feature_map_k(repeat_kv(k, H // HK))[0].float()                # [H,17,D]
    weight = attn.decay()[:, None] ** (15 - torch.arange(17.0)) * (code == MEMORIES.index("linear"))
    h_want = torch.einsum("hl,hlD,hld->hDd", weight, fk, repeat_kv(v, H // HK)[0])
    assert (code == MEMORIES.index("linear")).any()
    torch.testing.assert_close(lay.h_state[0], h_want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lay.s_state[0], torch.einsum("hl,hlD->hD", weight, fk), atol=1e-5, rtol=1e-5)


def test_crop_is_refused_and_reset_clears(attn):
    q, k, v, mask = inputs(9)
    _, lay = stream(attn, LolaCacheConfig(window=W, global_size=2), q, k, v, mask, [9])
    lay.crop(0)
    with pytest.raises(ValueError, match="cannot be cropped"):
        lay.crop(-1)
    lay.reset()
    assert lay.get_seq_length() == 0 and not lay.is_initialized and lay.nbytes() == 0
    with pytest.raises(RuntimeError, match="has not seen"):
        lay.memory_of(torch.arange(3))
