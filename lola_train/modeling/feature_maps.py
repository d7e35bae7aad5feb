"""Learned feature maps phi: R^d -> R^D applied per query head (spec 1.2).

Every map first projects each head with its own matrix, u = x^T W_h (W_h in R^{d x F}), then applies an
activation:

    softmax_dim, fullspace:  phi(x) = clamp_min([softmax_F(u); softmax_F(-u)], 1e-12)     D = 2F (Hedgehog)
    softmax_dim:             phi(x) = clamp_min(softmax_F(u), 1e-12)                       D = F
    elu:                     phi(x) = 1 + elu(u)                                            D = F
    relu (T2R):              phi(x) = relu(u + b_h)                                         D = F

Parameters are kept in float32 (master copies, spec 9.6); inputs are cast up, so phi(x) is float32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention_config import AttentionConfig


class FeatureMap(nn.Module):
    """phi for all H heads of one layer: ``forward(x [B,H,L,d]) -> [B,H,L,D]`` (float32)."""

    def __init__(self, num_heads: int, head_dim: int, config: AttentionConfig, device=None):
        super().__init__()
        self.kind = config.feature_map
        self.fullspace = config.fullspace
        self.eps = 1e-12
        self.out_dim = config.feature_width
        self.weight = nn.Parameter(torch.empty(num_heads, head_dim, config.feature_dim, device=device))
        self.bias = nn.Parameter(torch.zeros(1, num_heads, 1, 1, device=device)) if config.feature_map_bias else None
        with torch.no_grad():
            if config.feature_map_init == "identity":
                eye = torch.eye(head_dim, config.feature_dim, device=device)
                self.weight.copy_(eye.expand_as(self.weight))
            else:
                nn.init.kaiming_uniform_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = torch.einsum("hdf,bhld->bhlf", self.weight, x.to(self.weight.dtype))
        if self.bias is not None:
            u = u + self.bias
        if self.kind == "softmax_dim":
            phi = torch.cat([F.softmax(u, -1), F.softmax(-u, -1)], -1) if self.fullspace else F.softmax(u, -1)
            return phi.clamp_min(self.eps)
        if self.kind == "elu":
            return 1 + F.elu(u)
        return F.relu(u)

    def extra_repr(self) -> str:
        h, d, f = self.weight.shape
        return f"kind={self.kind}, heads={h}, head_dim={d}, feature_dim={f}, out_dim={self.out_dim}"
