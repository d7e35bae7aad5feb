"""Cache specs of the evaluation suite: 'full', 'lola:W:G' and the optional fusion and GQA-selection suffixes."""
import pytest

from lola_eval.loading import CacheSpec
from lola_train.modeling.attention_config import ConfigError
from lola_train.modeling.lola_cache import LolaCacheConfig


def test_cache_specs_round_trip():
    for text in ("full", "lola:64:0", "lola:64:256", "lola:64:256:lola_code", "lola:64:256:lolcats"):
        assert CacheSpec.parse(text).label == text
    spec = CacheSpec.parse("lola:32:8:lola_code")
    settings = spec.lola_settings()
    assert (settings.window, settings.global_size, settings.mixing) == (32, 8, "lola_code")
    assert CacheSpec.parse("lola:32:8").lola_settings().mixing == "auto"  # the model's trained fusion
    assert CacheSpec.parse("lola:32:8:lolcats").lola_settings().mixing == "lolcats"
    assert CacheSpec.parse("full").lola_settings() is None
    for text in ("lola:64:768:kv_max", "lola:64:256:lola_code:kv_mean"):
        assert CacheSpec.parse(text).label == text
    assert CacheSpec.parse("lola:64:256:kv_max:lola_code").label == "lola:64:256:lola_code:kv_max"  # any order
    settings = CacheSpec.parse("lola:64:768:kv_max").lola_settings()
    assert (settings.gqa_selection, settings.mixing) == ("kv_max", "auto")
    spec = CacheSpec.parse("lola:64:768:dedup0.98:kv_max")
    assert spec.label == "lola:64:768:kv_max:dedup0.98" and spec.lola_settings().dedup == 0.98
    assert CacheSpec.parse("sink@lola:64:768:kv_max:dedup0.98").budget == "lola:64:768:kv_max:dedup0.98"
    spec = CacheSpec.parse("lola:64:768:cw4:kv_max:dedup0.98")
    assert spec.label == "lola:64:768:kv_max:dedup0.98:cw4" and spec.lola_settings().cache_weight == 4.0
    assert CacheSpec.parse("lola:64:768").lola_settings().cache_weight == 1.0
    spec = CacheSpec.parse("lola:64:768:c16:kv_max")  # cC: the cache-update period
    assert spec.label == "lola:64:768:kv_max:c16" and spec.lola_settings().chunk_size == 16
    assert CacheSpec.parse("lola:64:768").lola_settings().chunk_size is None  # = the window
    spec = CacheSpec.parse("lola:64:768:chunk:c32")  # the window rule
    assert spec.label == "lola:64:768:chunk:c32" and spec.lola_settings().window_mode == "chunk"
    assert CacheSpec.parse("lola:64:768").lola_settings().window_mode == "auto"  # the trained layout


def test_lola_cache_dict_keeps_only_what_the_spec_sets():
    """model.config.lola_cache carries window, G and the non-default settings only, so a checkpoint exported before
    a setting (e.g. cache_weight) existed still takes every spec that does not use it."""
    from lola_eval.loading import lola_cache_dict

    plain = lola_cache_dict(CacheSpec.parse("lola:64:256").lola_settings())
    assert plain == {"window": 64, "global_size": 256}
    full = lola_cache_dict(CacheSpec.parse("lola:64:768:kv_max:dedup0.98:cw4").lola_settings())
    assert full == {"window": 64, "global_size": 768, "gqa_selection": "kv_max", "dedup": 0.98, "cache_weight": 4.0}
    assert LolaCacheConfig.coerce(full) == CacheSpec.parse("lola:64:768:kv_max:dedup0.98:cw4").lola_settings()
    assert lola_cache_dict(CacheSpec.parse("lola:64:768:c16").lola_settings()) == {
        "window": 64, "global_size": 768, "chunk_size": 16}


def test_bad_cache_specs_name_the_problem():
    with pytest.raises(ValueError, match="lola:64:256:lola_code"):
        CacheSpec.parse("lola:64")
    with pytest.raises(ConfigError, match="mixing='softmax'.*'auto', 'lolcats', 'lola_code'"):
        CacheSpec.parse("lola:64:8:softmax")
    with pytest.raises(ValueError, match="'dedup0.9.9' is not dedupT"):
        CacheSpec.parse("lola:64:8:dedup0.9.9")
    with pytest.raises(ConfigError, match="lola_cache.dedup"):
        CacheSpec.parse("lola:64:8:dedup2")
    with pytest.raises(ValueError, match="'cw1.2.3' is not cwX"):
        CacheSpec.parse("lola:64:8:cw1.2.3")
    with pytest.raises(ConfigError, match="lola_cache.cache_weight"):
        CacheSpec.parse("lola:64:8:cw0")
    with pytest.raises(ConfigError, match="lola_cache.chunk_size"):
        CacheSpec.parse("lola:64:8:c0")


def test_gqa_selection_counts_in_the_bytes():
    """A KV-head selection stores the cache once per KV head: 'lola:W:3G:kv_max' on a 3-query-heads-per-KV-head
    model holds as many cache pairs as 'lola:W:G' (the budget helper and the closed form agree)."""
    from transformers import LlamaConfig

    from lola_eval.baselines import lola_budget_bytes

    config = LlamaConfig(hidden_size=96, num_attention_heads=6, num_key_value_heads=2, num_hidden_layers=2,
                         intermediate_size=32, vocab_size=100)
    per_query_head = lola_budget_bytes(config, "lola:16:8", 2)
    per_kv_head = lola_budget_bytes(config, "lola:16:24:kv_max", 2)
    assert per_kv_head == per_query_head  # 6 query heads x 8 slots = 2 KV heads x 24 slots (k, v, positions)
    assert lola_budget_bytes(config, "lola:16:8:kv_mean", 2) < per_query_head

