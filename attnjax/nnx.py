"""Flax NNX modules backed by attnjax: ``attnjax.nnx.MultiHeadAttention``.

A drop-in for ``flax.nnx.MultiHeadAttention`` (same arguments and parameter tree) that runs
memory-efficient attention and decodes with a per-row, optionally sliding-window, KV cache.
"""

from attnjax._src.nnx_module import MultiHeadAttention as MultiHeadAttention

__all__ = ["MultiHeadAttention"]
