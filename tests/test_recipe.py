"""Recipes: every shipped recipe loads; bad keys and values fail before any work, naming the key and choices."""
import pytest

from lola_train.modeling.attention_config import ConfigError
from lola_train.recipe import RECIPE_DIR, load_recipe


@pytest.mark.parametrize("name", sorted(p.stem for p in RECIPE_DIR.glob("*.yaml")))
def test_shipped_recipes_load(name):
    recipe = load_recipe([f"recipe={name}"])
    assert recipe.stages[0] == "convert" and "export" in recipe.stages


def test_llama_recipes_carry_the_published_values():
    for name in ("llama1b", "llama8b"):
        r = load_recipe([f"recipe={name}"])
        t, f = r.transfer, r.finetune
        assert (t.lr, t.weight_decay, t.batch_size, t.grad_accum, t.epochs, t.eval_every) == (1e-2, 0, 1, 8, 2, 100)
        assert (t.plateau_factor, t.plateau_patience, t.min_lr, t.grad_clip) == (0.1, 10, 1e-5, 1.0)
        assert (t.mse_factor, t.xent_factor, r.data.seq_len, r.data.val_records) == (1000, 0, 1024, 200)
        assert (f.lr, f.lora_r, f.lora_alpha, f.lora_dropout) == (1e-4, 8, 16, 0.0)
        assert list(f.target_modules) == ["q_proj", "k_proj", "v_proj", "o_proj"]
        assert r.model.dtype == "bfloat16"


@pytest.mark.parametrize("override, message", [
    ("transfer.lrr=1", "unknown key 'transfer.lrr'; valid keys here: epochs"),
    ("stages=[transfer,evaluate]", "stages[]='evaluate' is not valid; choose one of 'convert', 'transfer'"),
    ("force=[nope]", "force[]='nope'"),
    ("data.template=vicuna", "data.template='vicuna' is not valid; choose one of 'alpaca', 'chat'"),
    ("data.tokenizer=spm", "data.tokenizer='spm'"),
    ("data.sources=[{kind: books}]", "data.sources[0].kind='books' is not valid; choose one of 'instruction'"),
    ("data.sources=[{kind: instruction}]", "data.sources[0].path is required"),
    ("data.sources=[{kind: wikipedia, path: x.json}]", "data.sources[0].path must be unset"),
    ("data.seq_len=0", "data.seq_len=0 is not valid; it must be a positive integer"),
    ("finetune.lora_r=0", "finetune.lora_r=0"),
    ("finetune.lora_dropout=1.5", "finetune.lora_dropout=1.5"),
    ("finetune.target_modules=[]", "finetune.target_modules is empty"),
    ("transfer.lr=0", "transfer.lr=0"),
    ("transfer.plateau_factor=2.0", "transfer.plateau_factor=2.0"),
    ("transfer.max_steps=0", "transfer.max_steps"),
    ("transfer.cached_fraction=1.5", "transfer.cached_fraction=1.5"),
    ("finetune.cached_max=-1", "finetune.cached_max (or null for no cap)=-1"),
    ("transfer.grad_accum=abc", "transfer.grad_accum"),
    ("export.dtype=int8", "export.dtype='int8' is not valid; choose one of 'model', 'float32'"),
    ("attention.window_layout=xx", "attention.window_layout='xx'"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_recipe(["recipe=tiny", override])
    assert message in str(err.value)


def test_both_loss_factors_zero_is_rejected():
    with pytest.raises(ConfigError, match="mse_factor and transfer.xent_factor are both 0"):
        load_recipe(["recipe=tiny", "transfer.mse_factor=0", "transfer.xent_factor=0"])


def test_unknown_recipe_lists_the_known_ones():
    with pytest.raises(ConfigError, match="tiny"):
        load_recipe(["recipe=does_not_exist"])


def test_lola_cache_section_is_validated():
    from lola_train.recipe import load_recipe

    assert load_recipe(["recipe=tiny"]).lola_cache is None
    r = load_recipe(["recipe=tiny", "lola_cache={window: 16, global_size: 8}"])
    assert (r.lola_cache.window, r.lola_cache.global_size) == (16, 8)
    with pytest.raises(ConfigError, match="lola_cache.mixing='zz'.*'lolcats', 'lola_code'"):
        load_recipe(["recipe=tiny", "lola_cache={mixing: zz}"])
    with pytest.raises(ConfigError, match="unknown key 'lola_cache.windw'; valid keys here: window, global_size"):
        load_recipe(["recipe=tiny", "lola_cache={windw: 3}"])


def test_unknown_key_inside_a_list_entry_names_its_section():
    with pytest.raises(ConfigError, match="unknown key 'pathh' in a DataSource entry; valid keys here: kind, path"):
        load_recipe(["recipe=smollm2", "data.sources=[{kind: text, pathh: x}]"])
