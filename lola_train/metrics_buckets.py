"""Per-position buckets for long-context diagnostics (token NLL, transfer MSE, ... by position in the sequence).

One definition, shared by the evaluation (``lola_eval.perplexity``: NLL by bucket) and training diagnostics (e.g.
stage-1 transfer MSE by bucket): positions ``[0, 256), [256, 512), [512, 1K), [1K, 2K), [2K, 4K), [4K, 8K)``, then
doubling (``[8K, 16K)``, ...). A value at index ``i`` of the last axis belongs to position ``i``; the caller decides
what that means (for next-token NLL we put the loss of predicting token ``i`` at index ``i``, so index 0 has none
and is masked out).

    from lola_train.metrics_buckets import position_buckets, bucket_means, bucket_sums, merge_bucket_sums

    position_buckets(3000)   # [('0-256', 0, 256), ('256-512', 256, 512), ('512-1K', 512, 1024),
                             #  ('1K-2K', 1024, 2048), ('2K-4K', 2048, 3000)]
    bucket_means(nll, mask)  # {'0-256': 2.31, ...} over every leading axis; empty buckets left out

To accumulate over several batches, add up :func:`bucket_sums` with :func:`merge_bucket_sums` and divide at the
end (:func:`means_from_sums`); averaging per-batch means would weight batches, not tokens.
"""
from __future__ import annotations

from typing import Mapping

import torch

FIRST_EDGES = (0, 256, 512, 1024, 2048, 4096, 8192)


def _name(n: int) -> str:
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def position_buckets(length: int) -> list[tuple[str, int, int]]:
    """``[(name, start, end), ...]`` covering positions ``0 .. length-1``; the last bucket is cut at ``length``
    (its name keeps the full range, e.g. '2K-4K' for positions 2048..2999 of a 3000-token sequence)."""
    if not isinstance(length, int) or isinstance(length, bool) or length < 1:
        raise ValueError(f"position_buckets: length={length!r} is not valid; give the sequence length (int >= 1)")
    edges = list(FIRST_EDGES)
    while edges[-1] < length:
        edges.append(edges[-1] * 2)
    out = []
    for start, end in zip(edges[:-1], edges[1:]):
        if start >= length:
            break
        out.append((f"{_name(start)}-{_name(end)}", start, min(end, length)))
    return out


def bucket_sums(values: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, tuple[float, int]]:
    """``{name: (sum, count)}`` of ``values`` [..., L] over every leading axis and the positions of each bucket,
    counting only where ``mask`` (same shape, or broadcastable; bool or 0/1) is true. Empty buckets are left out."""
    if not isinstance(values, torch.Tensor) or values.dim() < 1:
        raise ValueError("bucket_sums: values must be a tensor [..., L] with positions on the last axis")
    length = values.shape[-1]
    if mask is None:
        mask = torch.ones_like(values, dtype=torch.bool)
    else:
        mask = torch.as_tensor(mask, device=values.device)
        if mask.shape[-1] != length:
            raise ValueError(f"bucket_sums: mask has {mask.shape[-1]} positions, values have {length}; give a mask "
                             "of the same shape [..., L]")
        mask = mask.bool().expand_as(values)
    v = values.detach().double()
    out: dict[str, tuple[float, int]] = {}
    for name, start, end in position_buckets(length):
        m = mask[..., start:end]
        count = int(m.sum())
        if count:
            out[name] = (float(v[..., start:end][m].sum()), count)
    return out


def merge_bucket_sums(total: dict[str, tuple[float, int]], part: Mapping[str, tuple[float, int]]) -> dict:
    """Add ``part`` into ``total`` (in place; returns it), keeping the bucket order of first appearance."""
    for name, (s, c) in part.items():
        s0, c0 = total.get(name, (0.0, 0))
        total[name] = (s0 + s, c0 + c)
    return total


def means_from_sums(sums: Mapping[str, tuple[float, int]]) -> dict[str, float]:
    return {name: s / c for name, (s, c) in sums.items() if c}


def bucket_means(values: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, float]:
    """``{name: mean}`` of ``values`` [..., L] per position bucket (see :func:`bucket_sums`)."""
    return means_from_sums(bucket_sums(values, mask))
