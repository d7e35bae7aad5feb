"""Load the models the evaluation compares and switch the LoLA cache on or off.

A *source* names where the weights come from:

    embedded:smollm2 | <hub id> | <local HF folder>   loaded as is: the teacher, or, if the folder is an exported
                                                     lola-train checkpoint (config.json has an ``auto_map``), the
                                                     linearized model through ``trust_remote_code``
    convert:<source>                                 the source converted with ``attention`` (untrained feature
                                                     maps: a development stand-in for a trained checkpoint)
    softmax:<exported folder>                        an exported linearized checkpoint's weights (LoRA merged into
                                                     q/k/v/o) in its base architecture, softmax attention over every
                                                     pair: what the linearized model computes with unbounded memory
                                                     (a diagnostic; a plain model, so it takes the teacher's caches)

A *cache* names how the model remembers the context during evaluation:

    full         transformers' DynamicCache: the teacher's KV cache, or for a linearized model the exact hybrid
                 layer with every key kept (memory grows with the context)
    lola:W:G     the LoLA constant-memory cache: softmax window W, sparse global cache of G pairs, linear state
                 (G=0 is the plain linearized model: window + linear state only), with the trained fusion
    lola:W:G:lola_code   the same with the LoLA reference code's fusion (lola_cache.mixing, spec 4.4); ':lolcats'
                 forces the LoLCATs fusion; without a suffix the model's trained fusion (attention.mixing) is used
    lola:W:G:...  further suffixes, in any order: kv_mean / kv_max (GQA selection), sliding / tk / chunk (the window
                 rule, lola_cache.window_mode), dedupT, cwX, cC (update period C); see SPEC_HELP
    window:W     the linearized model with its linear branch switched off: softmax over the window W only (the LoLA
                 cache with G=0 and every query feature map returning 0, see :func:`linear_branch_off`); shows
                 whether the linear memory contributes at all
    sink:S:W     teacher baseline, StreamingLLM: the first S + the W most recent KV pairs (``lola_eval.baselines``);
                 ``sink:S:W:orig`` keeps the original RoPE positions instead of positions inside the cache
    tova:N       teacher baseline, TOVA-style eviction: the N pairs per KV head the newest queries attend to most
    sink@lola:W:G, tova@lola:W:G
                 the baseline sized to the bytes per sequence of the LoLA cache lola:W:G on the same model and
                 dtype (:meth:`CacheSpec.resolve`; sink keeps S = 4 sinks)

The LoLA cache is switched on through ``model.config.lola_cache`` (``lola_train.lola.enable_lola_cache``), so it
applies to every cache transformers creates (``generate()``, forwards with ``use_cache``) and works the same for
exported remote-code checkpoints, whose classes are copies of ``lola_train.modeling``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from torch import nn

from lola_train.modeling.attention_config import AttentionConfig
from lola_train.modeling.lola_cache import LolaCacheConfig
from lola_train.modeling.lola_ops import GQA_SELECTIONS, WINDOW_MODES

CACHE_RE = re.compile(r"^lola:(\d+):(\d+)((?::(?:[a-z_]+|dedup[0-9.]+|cw[0-9.]+|c[0-9]+)){0,5})$")
WINDOW_RE = re.compile(r"^window:(\d+)$")
SINK_RE = re.compile(r"^sink:(\d+):(\d+)(:orig)?$")
TOVA_RE = re.compile(r"^tova:(\d+)$")
BUDGET_RE = re.compile(r"^(sink|tova)@(lola:\d+:\d+(?::(?:[a-z_]+|dedup[0-9.]+|cw[0-9.]+|c[0-9]+)){0,5})$")
SPEC_HELP = ("use 'full' (growing KV cache), 'lola:W:G[:fusion][:gqa][:mode][:dedupT][:cwX][:cC]' (LoLA: window W, "
             "G global pairs; "
             "fusion lolcats | lola_code, default the trained one; gqa query_head (default) | kv_mean | kv_max; "
             "mode: the window rule sliding | tk | chunk, default the trained layout; "
             "dedupT: value-deduplicated selection at cosine threshold T, e.g. dedup0.98; cwX: the sparse cache's "
             "softmax weights times X, e.g. cw4; cC: cache-update period C in tokens, default W, e.g. c16), 'window:W' "
             "(linearized, linear branch off), 'sink:S:W[:orig]' (StreamingLLM: S sinks + W recent), 'tova:N' "
             "(TOVA eviction, N pairs per KV head) or 'sink@lola:W:G' / 'tova@lola:W:G' (sized to that LoLA cache's "
             "bytes), e.g. lola:64:256, lola:64:256:lola_code or sink@lola:64:256")


def _suffix_number(text: str, part: str, prefix: str, name: str, example: str) -> float:
    """The number after ``prefix`` in a cache spec suffix such as 'dedup0.98' or 'cw4'; a clear error else."""
    try:
        return float(part[len(prefix):])
    except ValueError:
        raise ValueError(f"cache spec {text!r}: {part!r} is not {prefix}{name} with a number {name}, e.g. "
                         f"{example}") from None


@dataclass(frozen=True)
class CacheSpec:
    """One cache of the evaluation (see the module docstring). kind: full | lola | window | sink | tova.

    lola / window: ``window`` W, ``global_size`` G (0 for window), ``mixing``, ``gqa`` (the cache's GQA selection:
    per query head, or one per KV head by mean / max score, stored once per KV head), ``dedup`` (0 or the cosine
    threshold of value-deduplicated selection, ``LolaCacheConfig.dedup``), ``cache_weight`` (the sparse cache's
    softmax weight factor, ``LolaCacheConfig.cache_weight``). sink: ``sinks`` S, ``window`` W,
    ``positions`` ('cache' or 'original'). tova: ``global_size`` N (pairs per KV head). ``budget`` (sink / tova
    before :meth:`resolve`): the LoLA spec whose bytes the baseline is sized to."""

    kind: str = "full"
    window: Optional[int] = None
    global_size: int = 0
    mixing: str = "auto"
    sinks: int = 0
    positions: str = "cache"
    budget: Optional[str] = None
    gqa: str = "query_head"
    dedup: float = 0.0
    cache_weight: float = 1.0
    chunk_size: Optional[int] = None
    window_mode: str = "auto"

    @classmethod
    def parse(cls, text: str) -> "CacheSpec":
        text = text.strip()
        if text == "full":
            return cls()
        if m := WINDOW_RE.match(text):
            if int(m.group(1)) < 1:
                raise ValueError(f"cache spec {text!r}: the window W must be >= 1")
            return cls("window", int(m.group(1)), 0)
        if m := SINK_RE.match(text):
            sinks, window = int(m.group(1)), int(m.group(2))
            if window < 1:
                raise ValueError(f"cache spec {text!r}: the recent window W must be >= 1 (sink:S:W)")
            return cls("sink", window, 0, sinks=sinks, positions="original" if m.group(3) else "cache")
        if m := TOVA_RE.match(text):
            if int(m.group(1)) < 1:
                raise ValueError(f"cache spec {text!r}: the budget N must be >= 1 pair per KV head (tova:N)")
            return cls("tova", None, int(m.group(1)))
        if m := BUDGET_RE.match(text):
            cls.parse(m.group(2))  # names a bad LoLA spec
            return cls(m.group(1), budget=m.group(2), sinks=4 if m.group(1) == "sink" else 0)
        m = CACHE_RE.match(text)
        if not m:
            raise ValueError(f"cache spec {text!r} is not valid; {SPEC_HELP}")
        window, g, mixing, gqa, dedup, weight = int(m.group(1)), int(m.group(2)), "auto", "query_head", 0.0, 1.0
        chunk, mode = None, "auto"
        for part in filter(None, m.group(3).split(":")):  # fusion, GQA, mode, dedup, weight, C: any order
            if re.fullmatch(r"c[0-9]+", part):
                chunk = int(part[1:])
            elif part in WINDOW_MODES:
                mode = part
            elif part in GQA_SELECTIONS:
                gqa = part
            elif part.startswith("dedup"):
                dedup = _suffix_number(text, part, "dedup", "T", "dedup0.98")
            elif part.startswith("cw"):
                weight = _suffix_number(text, part, "cw", "X", "cw4")
            else:
                mixing = part
        if window < 1:
            raise ValueError(f"cache spec {text!r}: the window W must be >= 1")
        LolaCacheConfig(window=window, global_size=g, mixing=mixing, gqa_selection=gqa, dedup=dedup,
                        cache_weight=weight, chunk_size=chunk, window_mode=mode)  # names errors
        return cls("lola", window, g, mixing, gqa=gqa, dedup=dedup, cache_weight=weight, chunk_size=chunk,
                   window_mode=mode)

    @classmethod
    def of_settings(cls, settings: "LolaCacheConfig | Mapping[str, Any]", *, window: int) -> "CacheSpec":
        """The 'lola:...' spec of LoLA cache settings (a LolaCacheConfig or its dict, e.g. an export's
        ``config.lola_cache``); ``window``: the softmax window where the settings name none (the trained one).
        Settings a spec cannot name (update_every 'token', another eps) are a ValueError."""
        s = LolaCacheConfig.coerce(dict(settings) if isinstance(settings, Mapping) else settings)
        if s.update_every != "chunk" or s.eps != LolaCacheConfig.eps:
            raise ValueError(f"LoLA cache settings {s.to_dict()} have update_every / eps that a cache spec cannot "
                             "name; use them through model.config.lola_cache")
        return cls("lola", s.window or window, s.global_size, s.mixing, gqa=s.gqa_selection, dedup=s.dedup,
                   cache_weight=s.cache_weight, chunk_size=s.chunk_size, window_mode=s.window_mode)

    @property
    def label(self) -> str:
        if self.kind == "full":
            return "full"
        if self.budget is not None:
            return f"{self.kind}@{self.budget}"
        if self.kind == "window":
            return f"window:{self.window}"
        if self.kind == "sink":
            return f"sink:{self.sinks}:{self.window}" + (":orig" if self.positions == "original" else "")
        if self.kind == "tova":
            return f"tova:{self.global_size}"
        suffix = ("" if self.mixing == "auto" else f":{self.mixing}") + \
            ("" if self.gqa == "query_head" else f":{self.gqa}") + \
            ("" if self.window_mode == "auto" else f":{self.window_mode}") + \
            ("" if not self.dedup else f":dedup{self.dedup:g}") + \
            ("" if self.cache_weight == 1.0 else f":cw{self.cache_weight:g}") + \
            ("" if self.chunk_size is None else f":c{self.chunk_size}")
        return f"lola:{self.window}:{self.global_size}{suffix}"

    @property
    def is_baseline(self) -> bool:
        """A teacher baseline cache (sink / tova)."""
        return self.kind in ("sink", "tova")

    @property
    def needs_linearized(self) -> bool:
        return self.kind in ("lola", "window")

    def resolve(self, model: nn.Module, attention=None) -> "CacheSpec":
        """A budget-relative baseline (``sink@lola:W:G``) made concrete for ``model``'s shape and dtype: the most
        pairs per KV head whose bytes do not exceed the LoLA cache's (``lola_eval.baselines``). ``attention``: the
        linearized model's attention config (feature width; default AttentionConfig()). Others: returned as is."""
        if self.budget is None:
            return self
        from .baselines import lola_budget_bytes, size_to_budget

        dtype_bytes = next(model.parameters()).element_size()
        budget = lola_budget_bytes(model.config, self.budget, dtype_bytes, attention)
        return CacheSpec.parse(size_to_budget(self.kind, model.config, budget, dtype_bytes, sinks=self.sinks or 4))

    def lola_settings(self) -> Optional[LolaCacheConfig]:
        if self.kind == "lola":
            return LolaCacheConfig(window=self.window, global_size=self.global_size, mixing=self.mixing,
                                   gqa_selection=self.gqa, dedup=self.dedup, cache_weight=self.cache_weight,
                                   chunk_size=self.chunk_size, window_mode=self.window_mode)
        if self.kind == "window":
            return LolaCacheConfig(window=self.window, global_size=0)
        return None


def hybrid_modules(model: nn.Module) -> list[nn.Module]:
    """The hybrid (LoLCATs) attention layers of ``model`` in order, from lola_train or an exported checkpoint (whose
    remote-code classes are copies, so they are matched by class name)."""
    return [m for m in model.modules() if type(m).__name__ == "HybridAttention"]


def is_linearized(model: nn.Module) -> bool:
    """True if the model has hybrid (LoLCATs) attention layers, from lola_train or an exported checkpoint."""
    return bool(hybrid_modules(model))


def _is_exported(path: str) -> bool:
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    data = json.loads(cfg.read_text())
    return "auto_map" in data and "lola_attention" in data


def resolve_device(name: str = "auto"):
    """A ``--device`` value -> torch.device: 'auto' (CUDA when this machine has it, else the CPU), 'cpu', 'cuda' or
    'cuda:N'. A device the machine lacks is a ValueError that names the fix."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name!r}: the evaluation runs on cpu or cuda; use auto, cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name!r}: this machine has no CUDA device (torch.cuda.is_available() is False); "
                         "use --device cpu (or auto)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s); use "
                         f"cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    return dev


def load_source(source: str, *, attention: AttentionConfig | Mapping[str, Any] | None = None,
                dtype: str = "float32", device: str | None = None):
    """Return ``(model, tokenizer)`` in eval mode for a source string (see the module docstring), on ``device``
    (:func:`resolve_device`; None = where it loads, the CPU).

    attention: the attention config used by 'convert:' sources (default: AttentionConfig(), i.e. the smollm2
    recipe's window 64 'sw' Hedgehog F=64).
    """
    if device is not None:
        dev = resolve_device(device)
        model, tok = load_source(source, attention=attention, dtype=dtype)
        return model.to(dev), tok
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lola_train.models import DTYPES, load_model

    if not isinstance(source, str) or not source:
        raise ValueError("model source must be a non-empty string: 'embedded:smollm2', a hub id, a local folder "
                         "or 'convert:<one of those>'")
    if source.startswith("softmax:"):
        path = source[len("softmax:"):]
        if not _is_exported(path):
            raise ValueError(f"model source {source!r}: 'softmax:' takes an exported lola-train checkpoint folder "
                             "(config.json with auto_map and lola_attention)")
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r} is not valid; choose one of {', '.join(DTYPES)}")
        # without the remote code, transformers builds the base class of the config's model_type; the feature
        # maps, mixing and decay factors are left unused
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=False, dtype=DTYPES[dtype])
        return model.eval(), AutoTokenizer.from_pretrained(path)
    if source.startswith("convert:"):
        from lola_train.convert import convert

        model, tok = load_source(source[len("convert:"):], dtype=dtype)
        if is_linearized(model):
            raise ValueError(f"model source {source!r}: the model is already linearized; drop 'convert:'")
        convert(model, attention)
        return model.eval(), tok
    if _is_exported(source):
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r} is not valid; choose one of {', '.join(DTYPES)}")
        model = AutoModelForCausalLM.from_pretrained(source, trust_remote_code=True, dtype=DTYPES[dtype])
        tok = AutoTokenizer.from_pretrained(source, trust_remote_code=True)
        return model.eval(), tok
    return load_model(source, dtype=dtype)


def set_cache(model: nn.Module, spec: CacheSpec, *, attention=None) -> CacheSpec:
    """Switch the cache of every later forward / generate of the evaluation: LoLA (``lola:W:G``, through
    ``model.config.lola_cache``), the window-only linearized model (``window:W``), a teacher baseline (``sink`` /
    ``tova``: ``lola_eval.streaming.new_cache`` builds one per sequence) or ``full``. Returns the spec as applied
    (budget-relative baselines resolved for this model, see :meth:`CacheSpec.resolve`)."""
    linear_branch_on(model)
    if hasattr(model, "lola_eval_cache_factory"):
        del model.lola_eval_cache_factory
    if hasattr(model.config, "lola_cache"):
        del model.config.lola_cache
    if spec.kind == "full":
        return spec
    if spec.is_baseline:
        if is_linearized(model):
            raise ValueError(f"cache {spec.label!r} is a KV-cache compression baseline for the softmax teacher; this "
                             "model is linearized: use 'lola:W:G', 'window:W' or 'full'")
        from .baselines import make_cache

        spec = spec.resolve(model, attention)
        model.lola_eval_cache_factory = lambda: make_cache(model, spec)
        return spec
    if not is_linearized(model):
        raise ValueError(f"cache {spec.label!r} needs a linearized model (HybridAttention layers); this model is "
                         "plain softmax attention: use cache 'full', 'sink:S:W' or 'tova:N', or a 'convert:' / "
                         "exported source")
    model.config.lola_cache = lola_cache_dict(spec.lola_settings())
    if spec.kind == "window":
        linear_branch_off(model)
    return spec


BACKENDS_CHOICE = ("auto", "chunked", "reference", "triton")


def check_backend(backend: str | None) -> None:
    """A ``--backend`` value: None (the model's own) or one of BACKENDS_CHOICE; else a ValueError naming them."""
    if backend is not None and backend not in BACKENDS_CHOICE:
        raise ValueError(f"--backend {backend!r} is not valid; choose one of {', '.join(BACKENDS_CHOICE)}")


def set_backend(model: nn.Module, backend: str | None) -> int:
    """Override ``attention.backend`` of every hybrid layer for this evaluation (None: keep the model's own), e.g.
    'chunked' on a GPU for the exact PyTorch path without the Triton kernels' first-call compilation. Returns the
    number of layers changed."""
    check_backend(backend)
    if backend is None:
        return 0
    layers = hybrid_modules(model)
    for m in layers:
        m.attention_config.backend = backend
    return len(layers)


def lola_cache_dict(settings: LolaCacheConfig) -> dict:
    """``model.config.lola_cache`` for ``settings``: window, G and every setting that differs from its default. A
    checkpoint exported before a setting existed then still loads every cache that does not use it (its own
    ``LolaCacheConfig`` refuses unknown keys)."""
    out = {}
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        if f.name in ("window", "global_size") or value != f.default:
            out[f.name] = value
    return out


_LINEAR_OFF = "_lola_eval_linear_off"


def _zero_features(module, args, output):
    return torch.zeros_like(output)


def linear_branch_off(model: nn.Module) -> int:
    """Switch the linear branch of every hybrid layer off: the query feature map returns 0, so every linear term
    (the prefix state, LoLA's H and s, linear window-overflow terms) is 0 in both fusions and the layer is softmax
    attention over its window alone (and LoLA's sparse cache, if any). No modeling file changes: a forward hook on
    each ``HybridAttention.feature_map_q``. Undo with :func:`linear_branch_on`. Returns the number of layers."""
    layers = hybrid_modules(model)
    for m in layers:
        if getattr(m, _LINEAR_OFF, None) is None:
            setattr(m, _LINEAR_OFF, m.feature_map_q.register_forward_hook(_zero_features))
    if not layers:
        raise ValueError("linear_branch_off needs a linearized model (HybridAttention layers)")
    return len(layers)


def linear_branch_on(model: nn.Module) -> None:
    for m in model.modules():
        handle = getattr(m, _LINEAR_OFF, None)
        if handle is not None:
            handle.remove()
            setattr(m, _LINEAR_OFF, None)


@contextlib.contextmanager
def linear_branch_disabled(model: nn.Module):
    """``with linear_branch_disabled(model): ...`` — :func:`linear_branch_off` for the block only."""
    linear_branch_off(model)
    try:
        yield model
    finally:
        linear_branch_on(model)


def mixing_factors_by_layer(model: nn.Module) -> list[list[float]]:
    """sigma(w) per head for every hybrid layer (layer order): the learned weight of the softmax window against
    the linear terms (``HybridAttention.mixing_factors``)."""
    return [[float(x) for x in m.mixing_factors()[0].detach().float().cpu()] for m in hybrid_modules(model)]


def trained_window(model: nn.Module) -> Optional[int]:
    lola = getattr(model.config, "lola_attention", None)
    return None if lola is None else int(lola.get("window_size", 0)) or None
