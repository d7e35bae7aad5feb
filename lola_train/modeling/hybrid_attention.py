"""The hybrid attention layer that replaces a Llama-shaped softmax attention module (spec 1.1-1.4, 2).

``HybridAttention`` keeps the pretrained q/k/v/o projections (and q/k norms where the model has them) and adds
two learned feature maps and one mixing logit per head. It has the forward contract of transformers 5.x
attention modules: ``forward(hidden_states, position_embeddings, attention_mask, cache, **kwargs) -> (out, None)``.

Order of operations (traps T1, T2): project -> (q/k norm) -> RoPE -> cache -> repeat KV heads -> phi per query head
-> hybrid attention -> o_proj.

In transfer mode (stage 1) the layer also computes the teacher, exact causal softmax attention on the same
q, k, v under ``no_grad``, records the per-layer losses in ``self.transfer_losses`` ('mse', optional 'xent', and
the detached diagnostic 'mse_by_position' [Lq]) and returns the TEACHER's
output, so that every layer sees teacher inputs (teacher forcing through depth, trap T17). Each layer's loss then
depends on that layer's own parameters only, so with ``checkpoint_student`` (``transfer.activation_checkpointing``)
the layer keeps only the inputs of its student branch and recomputes the branch in the backward: stage-1 memory
is one layer's graph instead of every layer's, for one more student forward per layer.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention_config import AttentionConfig
from .feature_maps import FeatureMap
from .hybrid_ops import hybrid_attention, hybrid_attention_reference, mixing_weights
from .lola_cache import lola_layer


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(q, k, cos, sin):
    """HF rotate_half RoPE with precomputed cos/sin [B,L,d] (they carry any frequency scaling of the model)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B,H_kv,L,d] -> [B,H_kv*groups,L,d]; query head h uses KV head h // groups."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def key_padding_mask(attention_mask: torch.Tensor | None, q_len: int, k_len: int) -> torch.Tensor | None:
    """Turn the mask a transformers model passes its attention modules into a key mask [B,Lk] (True = token).

    Accepts None, a 2D padding mask, or the 4D causal+padding masks that transformers builds (bool, True =
    attend, or additive float). Any other 4D pattern (packed-sequence blocks, bidirectional spans) cannot be
    expressed by the window/linear split and is rejected instead of being silently ignored.
    """
    if attention_mask is None:
        return None
    if attention_mask.dim() == 2:
        keys = attention_mask[:, -k_len:].bool()
    elif attention_mask.dim() == 4:
        m = attention_mask[:, 0, -q_len:, :k_len]
        m = m if m.dtype == torch.bool else m > torch.finfo(m.dtype).min / 2
        keys = m[:, -1, :]
        pos_q = torch.arange(k_len - q_len, k_len, device=m.device)
        expected = (torch.arange(k_len, device=m.device)[None, :] <= pos_q[:, None])[None] & keys[:, None, :]
        real_rows = keys[:, k_len - q_len:]
        if not torch.equal(m & real_rows[..., None], expected & real_rows[..., None]):
            raise ValueError(
                "attention_mask: HybridAttention supports causal masks with padding only (pass the tokenizer's "
                "2D attention_mask); this 4D mask has another pattern (packed sequences or bidirectional blocks), "
                "which the sliding-window/linear split cannot express.")
    else:
        raise ValueError(f"attention_mask must be 2D [batch, keys] or 4D [batch, 1, queries, keys]; "
                         f"got shape {tuple(attention_mask.shape)}")
    return None if bool(keys.all()) else keys


def softmax_teacher(q, k, v, key_mask, with_weights: bool):
    """Exact causal softmax attention in float32 (the stage-1 teacher). Returns (y [B,H,Lq,d], weights or None)."""
    lq, lk = q.shape[2], k.shape[2]
    pos = torch.arange(lk, device=q.device)
    mask = (pos[None, :] <= pos[lk - lq:, None])[None, None]
    if key_mask is not None:
        mask = mask & key_mask[:, None, None, :]
        mask = mask | torch.eye(lk, device=q.device, dtype=torch.bool)[lk - lq:]  # keep pad rows finite
    q, k, v = q.float(), k.float(), v.float()
    if not with_weights:
        if key_mask is None and lq == lk:  # no mask tensor: SDPA's causal flash path (same function, faster)
            return F.scaled_dot_product_attention(q, k, v, is_causal=True), None
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask), None
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    a = torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1)
    return a @ v, a


class HybridAttention(nn.Module):
    """Sliding-window softmax + feature-mapped linear attention for one decoder layer.

    Parameters added per layer: ``feature_map_q.weight`` and ``feature_map_k.weight`` [H,d,F],
    ``window_factors`` [H] (sigma(w) mixes the softmax block against the linear block) and, with
    ``attention.linear_decay``, ``decay_factors`` [H] (gamma = sigmoid, the linear memory's decay per token).
    """

    def __init__(self, attn: nn.Module, config: AttentionConfig, *, num_heads: int, num_kv_heads: int,
                 head_dim: int, layer_idx: int):
        super().__init__()
        self.attention_config = config
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.num_key_value_groups = num_heads // num_kv_heads
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        self.q_norm = getattr(attn, "q_norm", None)
        self.k_norm = getattr(attn, "k_norm", None)
        device = attn.q_proj.weight.device
        self.feature_map_q = FeatureMap(num_heads, head_dim, config, device=device)
        self.feature_map_k = FeatureMap(num_heads, head_dim, config, device=device)
        self.feature_map_k.load_state_dict(self.feature_map_q.state_dict())  # k map starts as a copy (T3)
        self.window_factors = nn.Parameter(torch.full((num_heads,), float(config.init_window_factor),
                                                      device=device))
        if config.linear_decay is not None:  # logit of gamma_h, gamma_h(0) = 1 - 1/T
            self.decay_factors = nn.Parameter(torch.full((num_heads,), math.log(config.linear_decay - 1.0),
                                                         device=device))
        else:
            self.decay_factors = None
        self.model_config = getattr(attn, "config", None)  # read for config.lola_cache (LoLA switched on at load)
        self.transfer_mode = False
        self.transfer_xent = False
        self.cached_fraction = 0.0  # <stage>.cached_fraction while a stage trains (convert.set_cached_fraction)
        self.cached_max: int | None = None  # <stage>.cached_max: most drawn keys per KV head and sequence
        self.checkpoint_student = False  # transfer.activation_checkpointing (convert.set_activation_checkpointing)
        self.transfer_losses: dict[str, torch.Tensor] = {}
        self.train(attn.training)  # follow the replaced module's train/eval mode (LoLA switches on in eval only)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What stage 1 trains in this layer: both feature maps, the mixing logits and the decay logits."""
        extra = [self.decay_factors] if self.decay_factors is not None else []
        return (list(self.feature_map_q.parameters()) + list(self.feature_map_k.parameters())
                + [self.window_factors] + extra)

    def decay(self) -> torch.Tensor | None:
        """gamma [H] float32 of the linear memory's decay, or None (no decay)."""
        return None if self.decay_factors is None else torch.sigmoid(self.decay_factors.float())

    def mixing_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(sigma [H], ell [H]): weights of the softmax and linear terms of the trained mixing."""
        cfg = self.attention_config
        return mixing_weights(self.window_factors, cfg.mixing, cfg.affine_attention_factors)

    def project(self, hidden_states: torch.Tensor, position_embeddings):
        """hidden [B,L,hidden] -> (q [B,H,L,d], k, v [B,H_kv,L,d] post-RoPE, q_map [B,H,L,d], k_map [B,H_kv,L,d]):
        what the feature maps read, the rotated q, k (attention.feature_map_rope) or the unrotated ones."""
        b, length, _ = hidden_states.shape
        shape = (b, length, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(shape)
        k = self.k_proj(hidden_states).view(shape)
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        cos, sin = position_embeddings
        q_map, k_map = q, k
        q, k = apply_rotary(q, k, cos, sin)
        if self.attention_config.feature_map_rope:
            q_map, k_map = q, k
        return q, k, v, q_map, k_map

    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None, cache=None,
                **kwargs):
        if cache is None:
            cache = kwargs.pop("past_key_values", None)
        b, length, _ = hidden_states.shape
        q, k, v, q_map, k_map = self.project(hidden_states, position_embeddings)
        mapped = k_map is not k  # the feature maps read other keys than the softmax: cache both, [k | k_map]
        lola = None if cache is None else lola_layer(cache, self.layer_idx, self.model_config, self.training)
        if lola is not None:  # LoLA sparse caching: window + global cache + linear state, constant memory
            if self.transfer_mode:
                raise ValueError("HybridAttention: stage-1 transfer mode cannot run with a LoLA cache; call the "
                                 "model with use_cache=False (or without the LolaCache)")
            # the padding of the new tokens: the mask's last `length` keys (LolaLayer.get_mask_sizes asks
            # transformers for just those; a mask over the whole context works too)
            keys = length if attention_mask is None else attention_mask.shape[-1]
            key_mask = key_padding_mask(attention_mask, length, keys)
            y = lola.attend(self, q, k, v, None if key_mask is None else key_mask[:, -length:],
                            q_map=q_map, k_map=k_map)
            return self.o_proj(y.transpose(1, 2).reshape(b, length, -1).to(hidden_states.dtype)), None
        if cache is not None:  # a plain transformers KV cache: exact, but grows with the context
            if mapped:
                both, v = cache.update(torch.cat([k, k_map], dim=-1), v, self.layer_idx)
                k, k_map = both.split(self.head_dim, dim=-1)
            else:
                k, v = cache.update(k, v, self.layer_idx)
                k_map = k
        key_mask = key_padding_mask(attention_mask, length, k.shape[2])
        groups = self.num_key_value_groups
        k, v = repeat_kv(k, groups), repeat_kv(v, groups)
        k_map = repeat_kv(k_map, groups) if mapped else k
        y = self.attend(q, k, v, key_mask, q_map=q_map, k_map=k_map)
        return self.o_proj(y.transpose(1, 2).reshape(b, length, -1).to(hidden_states.dtype)), None

    def attend(self, q, k, v, key_mask, q_map=None, k_map=None) -> torch.Tensor:
        """Hybrid attention on expanded heads (q_map, k_map: what the feature maps read; default q, k); in transfer
        mode records the losses and returns the teacher."""
        cached = None
        if self.cached_fraction > 0 and q.shape[2] == k.shape[2]:  # a training forward: far keys drawn as softmax
            cached = self.draw_cached(q.shape[0], k.shape[2], q.device)
        if not self.transfer_mode:
            return self.student(q, k, v, key_mask, q_map, k_map, cached)
        with torch.no_grad():
            y_teacher, a_teacher = softmax_teacher(q, k, v, key_mask, self.transfer_xent)
        rows = torch.ones(q.shape[0], q.shape[2], device=q.device) if key_mask is None else \
            key_mask[:, k.shape[2] - q.shape[2]:].float()
        rows = rows[:, None, :, None]  # [B,1,Lq,1]: real query rows
        n_rows = rows.sum() * q.shape[1]
        args = (q, k, v, key_mask, q_map, k_map, cached, self.transfer_xent)
        if self.checkpoint_student and torch.is_grad_enabled():  # keep the inputs, recompute in the backward
            out = checkpoint(self.student, *args, use_reentrant=False)
        else:
            out = self.student(*args)
        self.transfer_losses = {}
        if self.transfer_xent:
            y, a = out
            ce = -(a_teacher * torch.log(a.clamp_min(1e-12))).sum(-1, keepdim=True)
            self.transfer_losses["xent"] = (ce * rows).sum() / n_rows
        else:
            y = out
        se = (y.float() - y_teacher) ** 2 * rows                       # [B,H,Lq,d]
        self.transfer_losses["mse"] = se.sum() / (n_rows * q.shape[-1])
        with torch.no_grad():  # diagnostics: MSE per query position [Lq] over batch rows, heads and head dims
            per_pos = rows.sum((0, 1, 3)) * q.shape[1] * q.shape[-1]
            self.transfer_losses["mse_by_position"] = se.detach().sum((0, 1, 3)) / per_pos.clamp_min(1)
        return y_teacher.to(q.dtype)

    def student(self, q, k, v, key_mask, q_map, k_map, cached, weights: bool = False):
        """The trained branch: feature maps, then hybrid attention -> y [B,H,Lq,d] (and, with ``weights``, the
        attention weights [B,H,Lq,Lk] from the quadratic reference, for stage 1's cross-entropy)."""
        cfg = self.attention_config
        fq = self.feature_map_q(q if q_map is None else q_map)
        fk = self.feature_map_k(k if k_map is None else k_map)
        sigma, ell = self.mixing_factors()
        common = dict(window=cfg.window_size, layout=cfg.window_layout, key_mask=key_mask, mixing=cfg.mixing,
                      sink_tokens=cfg.sink_tokens, decay=self.decay(), cached=cached)
        if weights:
            return hybrid_attention_reference(q, k, v, fq, fk, sigma, ell, return_weights=True, **common)
        return hybrid_attention(q, k, v, fq, fk, sigma, ell, chunk_size=cfg.chunk_size, backend=cfg.backend,
                                **common)

    def draw_cached(self, batch: int, k_len: int, device) -> torch.Tensor:
        """Bool [B,H,Lk]: the keys that join the softmax set while a stage trains (<stage>.cached_fraction f).
        Each row draws p ~ U(0, f), then each key is cached with probability p, per KV head (its query heads share
        it, like LoLA's kv-head selections); with ``cached_max`` M, a KV head keeps the M of them with the lowest
        draws (a uniform subset), as LoLA's cache holds a fixed number of pairs whatever the length, and the cost
        stays linear in length. Training draws afresh each call; eval mode draws the same keys every time (a
        generator seeded with the layer index), so validation losses compare across steps."""
        gen = None if self.training else torch.Generator(device=device).manual_seed(self.layer_idx)
        p = torch.rand(batch, 1, 1, generator=gen, device=device) * self.cached_fraction
        draws = torch.rand(batch, self.num_kv_heads, k_len, generator=gen, device=device)
        keep = draws < p
        if self.cached_max is not None and self.cached_max < k_len:
            nth = draws.kthvalue(self.cached_max + 1, dim=-1, keepdim=True).values if self.cached_max else 0.0
            keep = keep & (draws < nth)  # draws are distinct with probability 1
        return repeat_kv(keep, self.num_key_value_groups)

    def extra_repr(self) -> str:
        c = self.attention_config
        return (f"layer_idx={self.layer_idx}, heads={self.num_heads}, kv_heads={self.num_kv_heads}, "
                f"window={c.window_size} ({c.window_layout}), mixing={c.mixing}, sinks={c.sink_tokens}, "
                f"transfer_mode={self.transfer_mode}")
