"""Export packaging: every file of the modeling package travels with the checkpoint and is imported by
modeling_lola.py (transformers copies exactly the files reachable through static ``from .x import`` lines), and
exporting refuses models that are not ready."""
from pathlib import Path

import pytest
import torch
from transformers.dynamic_module_utils import get_relative_import_files

from lola_train.convert import convert
from lola_train.export import MODELING_DIR, export_model
from lola_train.models import load_model
from lola_train.recipe import load_recipe


def test_modeling_lola_imports_every_modeling_file():
    reachable = {Path(p).name for p in get_relative_import_files(str(MODELING_DIR / "modeling_lola.py"))}
    files = {p.name for p in MODELING_DIR.glob("*.py")} - {"__init__.py", "modeling_lola.py"}
    missing = sorted(files - reachable)
    assert not missing, f"add 'from .{missing[0][:-3]} import ...' to lola_train/modeling/modeling_lola.py"


def test_export_rejects_unconverted_model(tmp_path):
    model, _ = load_model(random=load_recipe(["recipe=tiny"]).model.random)
    with pytest.raises(ValueError, match="convert it first"):
        export_model(model, None, tmp_path / "m")


def test_export_keeps_feature_maps_fp32_when_casting(tmp_path):
    recipe = load_recipe(["recipe=tiny"])
    model, _ = load_model(random=recipe.model.random)
    convert(model, recipe.attention)
    model.config.lola_cache = {"global_size": 8}  # fields other features add to the config travel with it
    folder = export_model(model, None, tmp_path / "m", dtype="bfloat16")
    from safetensors.torch import load_file

    weights = load_file(str(folder / "model.safetensors"))
    assert weights["model.layers.0.self_attn.feature_map_q.weight"].dtype == torch.float32
    assert weights["model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16
    import json

    config = json.loads((folder / "config.json").read_text())
    assert config["lola_cache"] == {"global_size": 8}
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_lola.LolaLlamaForCausalLM"
