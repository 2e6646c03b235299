"""The materialised implementation (``implementation="xla"``): the plain path.

It forms the full ``(B, K, G, T, S)`` score block, asks :class:`MaskInfo` once for the whole
block, and lets JAX differentiate it. Memory is O(B·N·T·S): use it for short sequences and as
the executable definition of what every other implementation must compute.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attnjax._src import dropout as dropout_lib
from attnjax._src.masks import QK, MaskInfo, to_grouped


def attention_xla(q, k, v, bias, info: MaskInfo, *, scale: float, logits_soft_cap,
                  dropout_rate: float, seed, precision):
    """Returns ``(out (B,T,N,Hv) in q.dtype, lse (B,T,N) float32)``."""
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    G = N // K
    Hv = v.shape[-1]
    f32 = jnp.float32
    qg = q.reshape(B, T, K, G, H)
    s = jnp.einsum("btkgh,bskh->bkgts", qg, k, preferred_element_type=f32, precision=precision)
    s = s * f32(scale)
    if logits_soft_cap is not None:
        c = f32(logits_soft_cap)
        s = c * jnp.tanh(s / c)
    if bias is not None:
        s = s + to_grouped(bias, K, T, S, 0).astype(f32)
    vis = info.visible(0, T, 0, S, QK)
    if vis is not None:
        s = jnp.where(vis, s, -jnp.inf)
    m = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - m)
    l = jnp.sum(p, axis=-1, keepdims=True)
    w = p / jnp.where(l > 0, l, 1.0)
    lse = jnp.where(l > 0, jnp.log(jnp.where(l > 0, l, 1.0)) + m, -jnp.inf)
    if dropout_rate > 0.0:
        keep = dropout_lib.keep_mask(seed, K, G, B, 0, T, 0, S, dropout_rate, QK)
        w = jnp.where(keep, w / f32(1.0 - dropout_rate), 0.0)
    out = jnp.einsum("bkgts,bskh->btkgh", w.astype(v.dtype), v, preferred_element_type=f32,
                     precision=precision)
    out = out.reshape(B, T, N, Hv).astype(q.dtype)
    lse = jnp.transpose(lse[..., 0], (0, 3, 1, 2)).reshape(B, T, N)
    return out, lse
