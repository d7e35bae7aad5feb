"""lola_kernels: Triton kernels for lola-train (import name ``lola_kernels``, source folder ``kernels/``).

Importing this package registers ``BACKENDS['triton']`` in :mod:`lola_train.modeling.hybrid_ops`, so that
``hybrid_attention(..., backend='auto')`` uses the kernels for CUDA tensors and ``backend='triton'`` forces them.
On CPU the kernels run only in Triton's interpreter: set ``TRITON_INTERPRET=1`` before importing this package
(tests do); otherwise the 'triton' backend raises a clear error and 'auto'/'chunked' remain the CPU path.

The LoLA inference kernels live in :mod:`lola_kernels.lola` (attention segment, self-recall error, fold); the
LoLA cache (lola_train.modeling.lola_ops.lola_kernels_for) imports that module lazily under the same
``attention.backend`` rules.
"""
from __future__ import annotations

if __name__ == "kernels":
    # Reached only when the repository root is on sys.path (``python -m ...`` run from the checkout), where this
    # folder shadows the PyPI package ``kernels`` that transformers probes (is_kernels_available imports it to
    # read a version). Stay inert: no imports, no __version__, so transformers sees no usable ``kernels``.
    __all__: list[str] = []
else:
    from lola_train.modeling.hybrid_ops import BACKENDS

    from .hybrid import HybridAttentionTriton, default_block, hybrid_attention_triton, interpreting, supports
    from . import guard
    from .lola import fold_triton, lola_attend_triton, self_recall_error_triton

    def triton_backend(q, k, v, fq, fk, sigma, ell, *, window, layout, key_mask=None, chunk_size=64,
                       mixing="lolcats", sink_tokens=0):
        """BACKENDS entry (registry signature); chunk_size belongs to the PyTorch path and is not used."""
        return hybrid_attention_triton(q, k, v, fq, fk, sigma, ell, window=window, layout=layout,
                                       key_mask=key_mask, mixing=mixing, sink_tokens=sink_tokens)

    triton_backend.supports = supports  # consulted by backend 'auto' before it picks the kernels
    # what backend 'auto' calls: self-checked once per device and options, else the PyTorch path (lola_kernels.guard)
    triton_backend.guarded = guard.guarded(triton_backend)
    BACKENDS["triton"] = triton_backend

    __all__ = ["HybridAttentionTriton", "hybrid_attention_triton", "triton_backend", "default_block", "interpreting",
               "supports", "lola_attend_triton", "self_recall_error_triton", "fold_triton"]
