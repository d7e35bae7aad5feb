"""Load the models the evaluation compares and switch the LoLA cache on or off.

A *source* names where the weights come from:

    embedded:smollm2 | <hub id> | <local HF folder>   loaded as is: the teacher, or, if the folder is an exported
                                                     lola-train checkpoint (config.json has an ``auto_map``), the
                                                     linearized model through ``trust_remote_code``
    convert:<source>                                 the source converted with ``attention`` (untrained feature
                                                     maps: a development stand-in for a trained checkpoint)

A *cache* names how the model remembers the context during evaluation:

    full         transformers' DynamicCache: the teacher's KV cache, or for a linearized model the exact hybrid
                 layer with every key kept (memory grows with the context)
    lola:W:G     the LoLA constant-memory cache: softmax window W, sparse global cache of G pairs, linear state
                 (G=0 is the plain linearized model: window + linear state only), with the trained fusion
    lola:W:G:lola_code   the same with the LoLA reference code's fusion (lola_cache.mixing, spec 4.4)

The LoLA cache is switched on through ``model.config.lola_cache`` (``lola_train.lola.enable_lola_cache``), so it
applies to every cache transformers creates (``generate()``, forwards with ``use_cache``) and works the same for
exported remote-code checkpoints, whose classes are copies of ``lola_train.modeling``.
"""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

from torch import nn

from lola_train.modeling.attention_config import AttentionConfig
from lola_train.modeling.lola_cache import LolaCacheConfig

CACHE_RE = re.compile(r"^lola:(\d+):(\d+)(?::([a-z_]+))?$")


@dataclass(frozen=True)
class CacheSpec:
    """'full' (DynamicCache) or LoLA with ``window`` W, ``global_size`` G and ``mixing`` (see the module
    docstring)."""

    kind: str = "full"
    window: Optional[int] = None
    global_size: int = 0
    mixing: str = "lolcats"

    @classmethod
    def parse(cls, text: str) -> "CacheSpec":
        text = text.strip()
        if text == "full":
            return cls()
        m = CACHE_RE.match(text)
        if not m:
            raise ValueError(f"cache spec {text!r} is not valid; use 'full' (growing KV cache) or 'lola:W:G' "
                             "(window W, global cache G pairs) with an optional ':lola_code' fusion, e.g. "
                             "lola:64:256 or lola:64:256:lola_code")
        window, g, mixing = int(m.group(1)), int(m.group(2)), m.group(3) or "lolcats"
        if window < 1:
            raise ValueError(f"cache spec {text!r}: the window W must be >= 1")
        LolaCacheConfig(window=window, global_size=g, mixing=mixing)  # names the bad field, e.g. the mixing
        return cls("lola", window, g, mixing)

    @property
    def label(self) -> str:
        if self.kind == "full":
            return "full"
        suffix = "" if self.mixing == "lolcats" else f":{self.mixing}"
        return f"lola:{self.window}:{self.global_size}{suffix}"

    def lola_settings(self) -> Optional[LolaCacheConfig]:
        if self.kind == "full":
            return None
        return LolaCacheConfig(window=self.window, global_size=self.global_size, mixing=self.mixing)


def is_linearized(model: nn.Module) -> bool:
    """True if the model has hybrid (LoLCATs) attention layers, from lola_train or an exported checkpoint."""
    return any(type(m).__name__ == "HybridAttention" for m in model.modules())


def _is_exported(path: str) -> bool:
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    data = json.loads(cfg.read_text())
    return "auto_map" in data and "lola_attention" in data


def load_source(source: str, *, attention: AttentionConfig | Mapping[str, Any] | None = None,
                dtype: str = "float32"):
    """Return ``(model, tokenizer)`` in eval mode for a source string (see the module docstring).

    attention: the attention config used by 'convert:' sources (default: AttentionConfig(), i.e. the smollm2
    recipe's window 64 'sw' Hedgehog F=64).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lola_train.models import DTYPES, load_model

    if not isinstance(source, str) or not source:
        raise ValueError("model source must be a non-empty string: 'embedded:smollm2', a hub id, a local folder "
                         "or 'convert:<one of those>'")
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


def set_cache(model: nn.Module, spec: CacheSpec) -> None:
    """Switch the LoLA cache on (``lola:W:G``) or off (``full``) for every later forward / generate."""
    if spec.kind == "full":
        if hasattr(model.config, "lola_cache"):
            del model.config.lola_cache
        return
    if not is_linearized(model):
        raise ValueError(f"cache {spec.label!r} needs a linearized model (HybridAttention layers); this model is "
                         "plain softmax attention: use cache 'full', or a 'convert:' / exported source")
    model.config.lola_cache = dataclasses.asdict(spec.lola_settings())


def trained_window(model: nn.Module) -> Optional[int]:
    lola = getattr(model.config, "lola_attention", None)
    return None if lola is None else int(lola.get("window_size", 0)) or None
