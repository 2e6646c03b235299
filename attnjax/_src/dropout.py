"""Attention dropout whose keep-mask is a pure function of (key, b, n, i, j).

The mask is never stored: each implementation regenerates exactly the entries of the block it is
working on, from positions, in the forward and in the backward pass. Because the mask depends only
on the key and the absolute (batch, head, query, key) indices, it is the same whatever the chunk
sizes, and the materialised and chunked implementations drop exactly the same weights.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attnjax._src.masks import QK

_M1 = 0x85EBCA6B
_M2 = 0xC2B2AE35
_GOLD = 0x9E3779B9


def _mix(x):
    """murmur3's 32-bit finaliser: a bijective avalanche of a uint32 array."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(_M1)
    x = x ^ (x >> 13)
    x = x * jnp.uint32(_M2)
    x = x ^ (x >> 16)
    return x


def seed_from_key(rng) -> jax.Array:
    """Fold a PRNG key (typed or raw uint32) into one uint32 scalar seed."""
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        data = jax.random.key_data(rng)
    else:
        data = rng
    data = jnp.ravel(data).astype(jnp.uint32)
    h = jnp.uint32(0x243F6A88)
    for w in range(data.shape[0]):
        h = _mix(h ^ (data[w] + jnp.uint32(_GOLD) * jnp.uint32(w + 1)))
    return h


def keep_mask(seed, num_kv_heads: int, groups: int, batch: int, q_start, q_size: int,
              k_start, k_size: int, rate: float, layout: str = QK):
    """Boolean keep-mask of one block, shape ``(B, K, G, Tc, Sc)`` or ``(B, K, Sc, G, Tc)``."""
    b = jnp.arange(batch, dtype=jnp.uint32)
    n = jnp.arange(num_kv_heads * groups, dtype=jnp.uint32).reshape(num_kv_heads, groups)
    i = (q_start + jnp.arange(q_size, dtype=jnp.int32)).astype(jnp.uint32)
    j = (k_start + jnp.arange(k_size, dtype=jnp.int32)).astype(jnp.uint32)
    # Per-(b, n) seeds, per-row and per-column hashes: cheap small arrays.
    bn = _mix(seed ^ _mix(b[:, None, None] * jnp.uint32(_GOLD) + n[None] * jnp.uint32(_M1)))
    hi = _mix(i * jnp.uint32(_M2) + jnp.uint32(1))
    hj = _mix(j * jnp.uint32(_GOLD) + jnp.uint32(2))
    if layout == QK:
        row = _mix(bn[..., None] ^ hi)  # (B, K, G, Tc)
        x = _mix(row[..., None] ^ hj)  # (B, K, G, Tc, Sc)
    else:
        row = _mix(bn[..., None] ^ hi)  # (B, K, G, Tc)
        x = _mix(row[:, :, None] ^ hj[None, None, :, None, None])  # (B, K, Sc, G, Tc)
    threshold = jnp.uint32(min(int(round(rate * 2.0**32)), 2**32 - 1))
    return x >= threshold
