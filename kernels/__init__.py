"""lola_kernels: Triton kernels for lola-train (import name ``lola_kernels``, source folder ``kernels/``).

Importing this package registers ``BACKENDS['triton']`` in :mod:`lola_train.modeling.hybrid_ops`, so that
``hybrid_attention(..., backend='auto')`` uses the kernels for CUDA tensors and ``backend='triton'`` forces them.
On CPU the kernels run only in Triton's interpreter: set ``TRITON_INTERPRET=1`` before importing this package
(tests do); otherwise the 'triton' backend raises a clear error and 'auto'/'chunked' remain the CPU path.
"""
from __future__ import annotations

from lola_train.modeling.hybrid_ops import BACKENDS

from .hybrid import HybridAttentionTriton, default_block, hybrid_attention_triton, interpreting


def _triton_backend(q, k, v, fq, fk, sigma, ell, *, window, layout, key_mask=None, chunk_size=64):
    """BACKENDS entry: the registry signature; chunk_size belongs to the PyTorch path and is not used."""
    return hybrid_attention_triton(q, k, v, fq, fk, sigma, ell, window=window, layout=layout, key_mask=key_mask)


BACKENDS["triton"] = _triton_backend

__all__ = ["HybridAttentionTriton", "hybrid_attention_triton", "default_block", "interpreting"]
