"""Cache specs of the evaluation suite: 'full', 'lola:W:G' and the optional fusion suffix."""
import pytest

from lola_eval.loading import CacheSpec
from lola_train.modeling.attention_config import ConfigError


def test_cache_specs_round_trip():
    for text in ("full", "lola:64:0", "lola:64:256", "lola:64:256:lola_code", "lola:64:256:lolcats"):
        assert CacheSpec.parse(text).label == text
    spec = CacheSpec.parse("lola:32:8:lola_code")
    settings = spec.lola_settings()
    assert (settings.window, settings.global_size, settings.mixing) == (32, 8, "lola_code")
    assert CacheSpec.parse("lola:32:8").lola_settings().mixing == "auto"  # the model's trained fusion
    assert CacheSpec.parse("lola:32:8:lolcats").lola_settings().mixing == "lolcats"
    assert CacheSpec.parse("full").lola_settings() is None


def test_bad_cache_specs_name_the_problem():
    with pytest.raises(ValueError, match="lola:64:256:lola_code"):
        CacheSpec.parse("lola:64")
    with pytest.raises(ConfigError, match="mixing='softmax'.*'auto', 'lolcats', 'lola_code'"):
        CacheSpec.parse("lola:64:8:softmax")
