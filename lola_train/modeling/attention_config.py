"""Configuration of the hybrid (sliding-window softmax + linear) attention layer.

This file is part of ``lola_train.modeling``, the self-contained package that is copied verbatim into exported
checkpoints: it may import only the standard library, torch, transformers and its sibling files.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from .hybrid_ops import MIXINGS

LOGIT_0_1 = -2.1972245773362196  # logit(0.1): sigmoid of this is the published initial window factor


class ConfigError(ValueError):
    """Bad configuration value. The message names the field and how to fix it."""


def check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not valid; choose one of {', '.join(map(repr, choices))}")


def check_positive(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{name}={value!r} is not valid; it must be a positive integer")


def from_mapping(cls, data: Mapping[str, Any], prefix: str):
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys with the list of valid ones."""
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        where = prefix.rstrip(".") or "the top level"
        raise ConfigError(f"unknown key {prefix + unknown[0]!r}; valid keys under {where}: {', '.join(names)}")
    return cls(**dict(data))


@dataclass
class AttentionConfig:
    """How each softmax attention layer is replaced.

    feature_map:      'softmax_dim' (Hedgehog, spec 1.2), 'elu' (1 + elu) or 'relu' (T2R), each applied to a
                      learned untied per-head projection x W_h with W_h in R^{d x feature_dim}.
    feature_dim:      F, the projection width. The feature width D is 2F for fullspace softmax_dim, else F.
    fullspace:        softmax_dim only: phi(x) = [softmax(u); softmax(-u)] (true, published) or softmax(u).
    feature_map_init: 'identity' (W_h = I_{d x F}; every published run, spec trap T3) or 'kaiming'.
    feature_map_bias: one learned scalar per head added to u (the T2R configs use it).
    window_size:      W, softmax window in tokens.
    window_layout:    'sw' (the current token and the W-1 before it) or 'tk' (terrace: blocks of W aligned to the
                      end of the sequence; the previous block plus the causal part of the current one).
    init_window_factor: w, initial logit of the per-head mixing factor sigma(w) (logit(0.1) published).
    affine_attention_factors: if true the linear terms are weighted by 1 - sigma(w) instead of 1 ('lolcats'
                      mixing only; 'lola_code' always weights them by 1 - sigma(w)).
    mixing:           how the softmax block and the linear block are fused (see hybrid_ops):
                      'lolcats' (spec 1.4: window terms sigma e^{s - m}, m the max over the softmax set, linear
                      terms ell fq.fk, never shifted) or 'lola_code' (LoLA's fusion, spec 4.4 (b): softmax terms
                      sigma e^{s} unshifted, linear terms (1 - sigma) fq.fk, + 1e-6 in the denominator; computed
                      max-stabilised). The LoLA cache uses the trained mixing unless told otherwise.
    linear_decay:     None (LoLCATs: the linear memory sums every older pair with weight 1) or the initial horizon
                      T in tokens of a learned per-head decay gamma_h = sigmoid(a_h), gamma_h(0) = 1 - 1/T: a key
                      j < p enters the linear terms of query p with weight gamma_h^(p - j), so the linear block's
                      mass stays bounded (at most 2 / (1 - gamma_h)) however long the context (Lizard, GLA).
    feature_map_rope: true (LoLCATs): the feature maps read the rotated (post-RoPE) q and k, so the linear terms
                      depend on absolute positions and break past the positions seen in training (measured on
                      smollm2_long: the same 1K text at positions 3072+ instead of 0+, perplexity 31.7 -> 88; the
                      teacher is unchanged). false: they read the unrotated q and k, a position-free linear memory
                      (recency comes from linear_decay); the softmax terms keep RoPE either way.
    sink_tokens:      S, the first S real (non-padding) tokens of every sequence are attention sinks: they are
                      in the softmax set of every later query and never in the linear memory (0 = none,
                      LoLCATs). The teacher puts much of its attention mass on them; a linear term cannot
                      carry that mass past the training length.
    chunk_size:       C of the chunked PyTorch path (cost is linear in length for a fixed C and W).
    backend:          'auto' (chunked for prompts, reference for short queries; on CUDA the Triton kernels of
                      lola_kernels for prompts when triton is installed), 'reference', 'chunked' (forces the
                      PyTorch path) or 'triton' (forces the kernels; needs lola-train[triton] and CUDA).
    """

    feature_map: str = "softmax_dim"
    feature_dim: int = 64
    fullspace: bool = True
    feature_map_init: str = "identity"
    feature_map_bias: bool = False
    window_size: int = 64
    window_layout: str = "sw"
    init_window_factor: float = LOGIT_0_1
    affine_attention_factors: bool = False
    mixing: str = "lolcats"
    sink_tokens: int = 0
    linear_decay: Optional[int] = None
    feature_map_rope: bool = True
    chunk_size: int = 64
    backend: str = "auto"

    FEATURE_MAPS = ("softmax_dim", "elu", "relu")
    INITS = ("identity", "kaiming")
    LAYOUTS = ("sw", "tk")
    MIXINGS = MIXINGS

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, prefix: str = "attention.") -> "AttentionConfig":
        from .hybrid_ops import BACKENDS, load_kernel_backends  # registry grows when kernel packages load
        if self.backend == "triton":
            load_kernel_backends()

        check_choice(prefix + "feature_map", self.feature_map, self.FEATURE_MAPS)
        check_choice(prefix + "feature_map_init", self.feature_map_init, self.INITS)
        check_choice(prefix + "window_layout", self.window_layout, self.LAYOUTS)
        check_choice(prefix + "mixing", self.mixing, self.MIXINGS)
        if not isinstance(self.sink_tokens, int) or isinstance(self.sink_tokens, bool) or self.sink_tokens < 0:
            raise ConfigError(f"{prefix}sink_tokens={self.sink_tokens!r} is not valid; it must be an integer >= 0 "
                              "(0 = no attention sinks)")
        if self.linear_decay is not None and (not isinstance(self.linear_decay, int) or
                                              isinstance(self.linear_decay, bool) or self.linear_decay < 2):
            raise ConfigError(f"{prefix}linear_decay={self.linear_decay!r} is not valid; give the initial horizon in "
                              "tokens (an integer >= 2, e.g. 512) or null for no decay")
        if not isinstance(self.feature_map_rope, bool):
            raise ConfigError(f"{prefix}feature_map_rope={self.feature_map_rope!r} is not valid; it must be true "
                              "(feature maps of the rotated q, k: LoLCATs) or false (of the unrotated q, k)")
        check_choice(prefix + "backend", self.backend, ("auto",) + tuple(BACKENDS))
        for name in ("feature_dim", "window_size", "chunk_size"):
            check_positive(prefix + name, getattr(self, name))
        return self

    @property
    def feature_width(self) -> int:
        """D, the width of phi(x)."""
        doubled = self.feature_map == "softmax_dim" and self.fullspace
        return 2 * self.feature_dim if doubled else self.feature_dim

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def coerce(cls, value: "AttentionConfig | Mapping[str, Any] | None") -> "AttentionConfig":
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, Mapping):
            return from_mapping(cls, value, "attention.")
        raise ConfigError(f"attention config must be an AttentionConfig or a mapping, got {type(value).__name__}")
