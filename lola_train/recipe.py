"""Recipes: one YAML file fully describes a run. Loaded with OmegaConf onto typed dataclasses, so unknown keys
and wrong types fail before any work, with the key named and the valid choices listed.

    python linearize.py recipe=tiny attention.window_size=16 seed=3
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from .models import DTYPES
from .modeling.attention_config import AttentionConfig, ConfigError, check_choice

RECIPE_DIR = Path(__file__).resolve().parent.parent / "recipes"


@dataclass
class ModelSection:
    """name_or_path: hub id, local HF folder or 'embedded:smollm2'. random: config of a random model
    ({architecture: llama, seed: 0, hidden_size: ...}); exactly one of the two."""

    name_or_path: Optional[str] = None
    random: Optional[Dict[str, Any]] = None
    dtype: str = "float32"


@dataclass
class Recipe:
    name: str = "run"
    seed: int = 0
    output_dir: str = "runs/${name}"
    stages: List[str] = field(default_factory=lambda: ["convert"])
    model: ModelSection = field(default_factory=ModelSection)
    attention: AttentionConfig = field(default_factory=AttentionConfig)


STAGES = ("convert",)


def validate(recipe: Recipe) -> Recipe:
    check_choice("model.dtype", recipe.model.dtype, tuple(DTYPES))
    if (recipe.model.name_or_path is None) == (recipe.model.random is None):
        raise ConfigError("model: set exactly one of model.name_or_path (hub id, local folder or "
                          "'embedded:smollm2') and model.random (a config for a random model)")
    for stage in recipe.stages:
        check_choice("stages[]", stage, STAGES)
    recipe.attention.validate()
    return recipe


def recipe_path(name: str) -> Path:
    p = Path(name)
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p
    p = RECIPE_DIR / f"{name}.yaml"
    if not p.exists():
        known = sorted(x.stem for x in RECIPE_DIR.glob("*.yaml"))
        raise ConfigError(f"recipe={name!r} not found; give a .yaml path or one of: {', '.join(known)}")
    return p


def load_recipe(args: Sequence[str]) -> Recipe:
    """``args``: ``recipe=NAME`` (a name under recipes/ or a YAML path) and ``key.sub=value`` overrides."""
    args = list(args)
    bad = [a for a in args if "=" not in a]
    if bad:
        raise ConfigError(f"argument {bad[0]!r} is not key=value; usage: recipe=NAME [key.sub=value ...]")
    names = [a.split("=", 1)[1] for a in args if a.startswith("recipe=")]
    if len(names) != 1:
        raise ConfigError("give exactly one recipe=NAME (a name under recipes/ or a YAML path)")
    overrides = [a for a in args if not a.startswith("recipe=")]
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(Recipe), OmegaConf.load(recipe_path(names[0])),
                              OmegaConf.from_dotlist(overrides))
        recipe = OmegaConf.to_object(cfg)
    except ConfigKeyError as e:
        raise ConfigError(f"unknown key {e.full_key!r}; valid keys here: {_valid_keys(e.full_key)}") from None
    except ValidationError as e:
        raise ConfigError(f"{e.full_key}: {e.msg.splitlines()[0]}") from None
    except OmegaConfBaseException as e:
        raise ConfigError(str(e)) from None
    return validate(recipe)


def _valid_keys(full_key: str) -> str:
    node: Any = Recipe()
    for part in full_key.split(".")[:-1]:
        node = getattr(node, part, None)
    return ", ".join(f.name for f in dataclasses.fields(node)) if dataclasses.is_dataclass(node) else "(none)"


def to_dict(recipe: Recipe) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(recipe), resolve=True)
