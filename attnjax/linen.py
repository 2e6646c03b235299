"""Flax Linen modules backed by attnjax: ``attnjax.linen.MultiHeadDotProductAttention``.

A drop-in for ``flax.linen.MultiHeadDotProductAttention`` (same attributes and parameter tree,
plus ``num_kv_heads`` for GQA) that runs memory-efficient attention and decodes with a per-row,
optionally sliding-window, KV cache.
"""

from attnjax._src.linen_module import MultiHeadDotProductAttention as MultiHeadDotProductAttention

__all__ = ["MultiHeadDotProductAttention"]
