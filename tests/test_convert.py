"""Conversion of Llama-shaped models: exactness limits, training mode, generate(), padding, errors."""
import copy

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from lola_train import AttentionConfig, ConfigError, convert, hybrid_layers, set_transfer_mode, transfer_parameters
from lola_train.convert import set_activation_checkpointing, set_cached_fraction
from lola_train.modeling.feature_maps import FeatureMap

SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512)


def tiny(model_type="llama", **overrides):
    cfg = AutoConfig.for_model(model_type, **{**SMALL, **overrides})
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


def ids(b=2, length=40, seed=0):
    return torch.randint(0, SMALL["vocab_size"], (b, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("layout", ["sw", "tk"])
def test_window_covering_the_sequence_reproduces_softmax(model_type, layout):
    model = tiny(model_type)
    x = ids()
    expected = model(x).logits
    converted = convert(copy.deepcopy(model), {"window_size": 64, "window_layout": layout})
    torch.testing.assert_close(converted(x).logits, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("layout", ["sw", "tk"])
def test_chunked_and_reference_backends_agree_in_the_model(layout):
    """GQA model (4 query heads, 2 KV heads) with a window shorter than the sequence."""
    base = tiny()
    x = ids(length=100)
    outs = []
    for backend in ("reference", "chunked"):
        m = convert(copy.deepcopy(base), {"window_size": 8, "chunk_size": 16, "window_layout": layout,
                                          "backend": backend})
        outs.append(m(x).logits)
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)


def test_forward_backward_and_trainable_set_in_transfer_mode():
    model = convert(tiny(), {"window_size": 8}, transfer=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("feature_map_q.weight", "feature_map_k.weight", "window_factors"))
                             for n in trainable)
    assert len(trainable) == 3 * model.config.num_hidden_layers
    model(ids(length=30))
    loss = sum(layer.transfer_losses["mse"] for layer in hybrid_layers(model))
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    for p in transfer_parameters(model):
        assert p.grad is not None and torch.isfinite(p.grad).all()
    assert model.model.embed_tokens.weight.grad is None


def test_transfer_mode_feeds_the_teacher_forward():
    """Teacher forcing through depth: in transfer mode each layer returns softmax attention, so the model's
    logits equal the unconverted model's even with a small window (trap T17)."""
    base = tiny()
    x = ids(length=50)
    expected = base(x).logits
    model = convert(copy.deepcopy(base), {"window_size": 4}, transfer=True)
    torch.testing.assert_close(model(x).logits, expected, atol=1e-4, rtol=1e-4)
    set_transfer_mode(model, False)
    assert (model(x).logits - expected).abs().max() > 1e-3


def test_xent_transfer_loss():
    model = convert(tiny(), {"window_size": 8}, transfer=True)
    set_transfer_mode(model, True, xent=True)
    model(ids(length=24))
    for layer in hybrid_layers(model):
        assert set(layer.transfer_losses) == {"mse", "xent", "mse_by_position"}
        assert layer.transfer_losses["mse_by_position"].shape == (24,)
        assert not layer.transfer_losses["mse_by_position"].requires_grad
        assert torch.isfinite(layer.transfer_losses["xent"]) and layer.transfer_losses["xent"] > 0


def test_cached_fraction_draws_far_softmax_keys_in_both_stages():
    """<stage>.cached_fraction: far keys join the softmax set (per KV head) in the stage-1 student and in the
    plain forward of stage 2; every trainable parameter still gets gradients, validation (eval mode) draws the same
    keys each call, and 0 is the plain layer."""
    model = convert(tiny(), {"window_size": 4}, transfer=True)
    x = ids(length=48)

    def losses():
        model(x)
        return torch.stack([layer.transfer_losses["mse"] for layer in hybrid_layers(model)])

    plain = losses().detach()
    set_cached_fraction(model, 1.0)
    layer = hybrid_layers(model)[0]
    drawn = layer.draw_cached(64, 48, x.device)
    assert drawn.shape == (64, layer.num_heads, 48)
    groups = layer.num_key_value_groups
    assert torch.equal(drawn, drawn[:, ::groups].repeat_interleave(groups, dim=1))  # shared within a KV group
    share = drawn.float().mean((1, 2))
    assert 0.2 < share.mean() < 0.8 and share.min() < share.max()  # p ~ U(0, 1) per row
    model.train()
    trained = losses()
    assert not torch.allclose(trained.detach(), plain)
    trained.sum().backward()
    for p in transfer_parameters(model):
        assert p.grad is not None and torch.isfinite(p.grad).all()
    model.eval()
    torch.testing.assert_close(losses(), losses())
    set_cached_fraction(model, 0.0)
    torch.testing.assert_close(losses().detach(), plain)

    set_transfer_mode(model, False)  # stage 2's forward
    logits = model(x).logits
    set_cached_fraction(model, 1.0)
    drawn_logits = model(x).logits
    assert (drawn_logits - logits).abs().max() > 1e-4
    torch.testing.assert_close(model(x).logits, drawn_logits)  # eval mode: the fixed draw
    set_cached_fraction(model, 0.0)
    torch.testing.assert_close(model(x).logits, logits)


def saved_bytes_and_grads(model, step):
    """(bytes the autograd graph saved during ``step()``'s forward, {name: grad}) after ``step().backward()``."""
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step()
    forward_bytes = sum(saved)
    loss.backward()
    return forward_bytes, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("xent", [False, True])
def test_activation_checkpointing_same_gradients_less_saved_stage1(xent):
    """transfer.activation_checkpointing: each layer recomputes its student branch in the backward. The gradients
    are the plain ones (far-key draws and decay included) and the forward keeps less for the backward."""
    model = convert(tiny(num_hidden_layers=3), {"window_size": 4, "sink_tokens": 2, "linear_decay": 16},
                    transfer=True)
    set_transfer_mode(model, True, xent=xent)
    set_cached_fraction(model, 0.5)
    model.train()
    x = ids(length=48)

    def step():
        torch.manual_seed(3)  # the same far-key draws in both runs
        model(x)
        layers = hybrid_layers(model)
        loss = torch.stack([layer.transfer_losses["mse"] for layer in layers]).mean()
        if xent:
            loss = loss + torch.stack([layer.transfer_losses["xent"] for layer in layers]).mean()
        return loss

    plain_bytes, plain = saved_bytes_and_grads(model, step)
    set_activation_checkpointing(model, True, transfer=True)
    assert all(layer.checkpoint_student for layer in hybrid_layers(model))
    ckpt_bytes, ckpt = saved_bytes_and_grads(model, step)
    assert plain.keys() == ckpt.keys() == {n for n, p in model.named_parameters() if p.requires_grad}
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)
    assert ckpt_bytes < 0.5 * plain_bytes
    set_activation_checkpointing(model, False, transfer=True)
    assert not any(layer.checkpoint_student for layer in hybrid_layers(model))


def test_activation_checkpointing_same_gradients_less_saved_stage2():
    """finetune.activation_checkpointing: decoder layers recomputed in the backward (transformers' gradient
    checkpointing); the far-key draws replay with the saved RNG state, so the gradients are the plain ones."""
    model = convert(tiny(num_hidden_layers=3), {"window_size": 4, "sink_tokens": 2, "linear_decay": 16})
    set_cached_fraction(model, 0.5)
    model.train()
    x = ids(length=48)

    def step():
        torch.manual_seed(3)
        return model(x, labels=x, use_cache=False).loss

    plain_bytes, plain = saved_bytes_and_grads(model, step)
    set_activation_checkpointing(model, True, transfer=False)
    assert model.is_activation_checkpointing
    ckpt_bytes, ckpt = saved_bytes_and_grads(model, step)
    assert plain.keys() == ckpt.keys() and len(plain) > 0
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)
    assert ckpt_bytes < 0.5 * plain_bytes
    set_activation_checkpointing(model, False, transfer=False)
    assert not model.is_activation_checkpointing


def test_backward_in_inference_mode_reaches_projections():
    model = convert(tiny(), {"window_size": 8})
    model.train()
    out = model(ids(length=70), labels=ids(length=70))
    out.loss.backward()
    layer = hybrid_layers(model)[0]
    assert layer.q_proj.weight.grad is not None and layer.feature_map_k.weight.grad is not None
    assert layer.window_factors.grad is not None


@pytest.mark.parametrize("layout", ["sw", "tk"])
def test_generate_with_cache_equals_generate_without(layout):
    model = convert(tiny(), {"window_size": 8, "window_layout": layout})
    x = ids(b=1, length=30)
    cached = model.generate(x, max_new_tokens=12, do_sample=False)
    uncached = model.generate(x, max_new_tokens=12, do_sample=False, use_cache=False)
    assert cached.shape == (1, 42)
    assert torch.equal(cached, uncached)


def test_left_padding_matches_unpadded_sequences():
    model = convert(tiny(), {"window_size": 8})
    x = ids(b=2, length=40)
    mask = torch.ones_like(x)
    mask[1, :9] = 0
    batched = model(x, attention_mask=mask).logits
    alone = model(x[1:, 9:]).logits
    torch.testing.assert_close(batched[1, 9:], alone[0], atol=1e-4, rtol=1e-4)
    gen = model.generate(x, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    alone_ids = x[1:, 9:]
    gen_alone = model.generate(alone_ids, attention_mask=torch.ones_like(alone_ids), max_new_tokens=6,
                               do_sample=False, pad_token_id=0)
    assert torch.equal(gen[1, 40:], gen_alone[0, 31:])


def test_left_padding_with_eager_masks():
    model = tiny()
    model.config._attn_implementation = "eager"
    model = convert(model, {"window_size": 8})
    x = ids(b=2, length=20)
    mask = torch.ones_like(x)
    mask[0, :5] = 0
    out = model(x, attention_mask=mask).logits
    torch.testing.assert_close(out[0, 5:], model(x[:1, 5:]).logits[0], atol=1e-4, rtol=1e-4)


def test_non_causal_4d_mask_is_rejected():
    model = convert(tiny(), {"window_size": 8})
    x = ids(b=1, length=10)
    block = torch.ones(1, 1, 10, 10, dtype=torch.bool)  # bidirectional: not causal + padding
    with pytest.raises(ValueError, match="attention_mask"):
        model(x, attention_mask=block)


def test_unknown_architecture_is_rejected():
    cfg = AutoConfig.for_model("gpt2", n_layer=1, n_embd=32, n_head=2, vocab_size=64)
    with pytest.raises(ValueError, match="supported model types: llama, mistral, qwen2, qwen3"):
        convert(AutoModelForCausalLM.from_config(cfg))


def test_converting_twice_is_rejected():
    model = convert(tiny())
    with pytest.raises(ValueError, match="already converted"):
        convert(model)


def test_bad_attention_config_names_the_field():
    with pytest.raises(ConfigError, match="attention.window_layout='diagonal'.*'sw', 'tk'"):
        AttentionConfig(window_layout="diagonal")
    with pytest.raises(ConfigError, match="unknown key 'attention.window'.*window_size"):
        convert(tiny(), {"window": 8})
    with pytest.raises(ConfigError, match="attention.window_size=0"):
        AttentionConfig(window_size=0)


def test_conversion_reuses_projection_weights_and_records_config():
    model = tiny()
    q_weight = model.model.layers[0].self_attn.q_proj.weight
    convert(model, {"window_size": 8})
    assert model.model.layers[0].self_attn.q_proj.weight is q_weight
    assert model.config.lola_attention["window_size"] == 8


def test_identity_feature_map_and_untied_copies():
    cfg = AttentionConfig(feature_dim=8)
    fm = FeatureMap(num_heads=3, head_dim=16, config=cfg)
    x = torch.randn(2, 3, 5, 16)
    expected = torch.cat([torch.softmax(x[..., :8], -1), torch.softmax(-x[..., :8], -1)], -1)
    torch.testing.assert_close(fm(x), expected)
    layer = hybrid_layers(convert(tiny(), {"feature_dim": 8}))[0]
    torch.testing.assert_close(layer.feature_map_q.weight, layer.feature_map_k.weight)
    assert layer.feature_map_q.weight.data_ptr() != layer.feature_map_k.weight.data_ptr()
    torch.testing.assert_close(torch.sigmoid(layer.window_factors), torch.full((4,), 0.1))


@pytest.mark.parametrize("kind,width", [("elu", 8), ("relu", 8), ("softmax_dim", 16)])
def test_feature_map_kinds(kind, width):
    cfg = AttentionConfig(feature_map=kind, feature_dim=8, feature_map_init="kaiming",
                          feature_map_bias=kind == "relu")
    fm = FeatureMap(num_heads=2, head_dim=16, config=cfg)
    out = fm(torch.randn(1, 2, 7, 16))
    assert out.shape == (1, 2, 7, width) and cfg.feature_width == width
    assert (out >= 0).all()


def test_cached_max_caps_the_drawn_keys_per_kv_head():
    """<stage>.cached_max: at most M drawn keys per KV head and sequence (a fixed budget, as LoLA's cache), a subset
    of the uncapped draw; none with M = 0; no cap when M >= the length."""
    model = convert(tiny(), {"window_size": 4}, transfer=True)
    layer = hybrid_layers(model)[0]
    set_cached_fraction(model, 1.0)
    groups = layer.num_key_value_groups
    uncapped = layer.draw_cached(16, 200, torch.device("cpu"))  # eval mode: the same draws every call
    per_head = uncapped[:, ::groups].sum(-1)
    assert per_head.max() > 50
    for most in (0, 7, 50, 500):
        set_cached_fraction(model, 1.0, most)
        capped = layer.draw_cached(16, 200, torch.device("cpu"))
        assert not (capped & ~uncapped).any()  # a subset of the uncapped draw
        assert torch.equal(capped[:, ::groups].sum(-1), per_head.clamp(max=most))
        assert torch.equal(capped, capped[:, ::groups].repeat_interleave(groups, dim=1))
