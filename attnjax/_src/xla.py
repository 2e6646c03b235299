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
from attnjax._src.numerics import compute_dtype, einsum


def attention_xla(q, k, v, bias, info: MaskInfo, *, scale: float, logits_soft_cap,
                  dropout_rate: float, seed, precision):
    """Returns ``(out (B,T,N,Hv) in q.dtype, lse (B,T,N))`` (lse in the compute dtype)."""
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    G = N // K
    Hv = v.shape[-1]
    cdt = compute_dtype(q.dtype)  # float32, or float64 for float64 inputs
    # Everything that may depend on the query group g: (B|1, K|1, G|1, T|1, S|1) arrays.
    per_group = {}
    if bias is not None:
        per_group["bias"] = to_grouped(bias, K, T, S, 0)
    vis = info.visible(0, T, 0, S, QK)
    if vis is not None:
        per_group["vis"] = vis
    if dropout_rate > 0.0:
        per_group["keep"] = dropout_lib.keep_mask(seed, K, G, B, 0, T, 0, S, dropout_rate, QK)
    grouped = {n: x for n, x in per_group.items() if x.shape[2] != 1}
    shared = {n: x[:, :, 0] for n, x in per_group.items() if x.shape[2] == 1}

    mod_idx = None
    if info.score_mod is not None:
        mod_idx = info.mod_indices(0, T, 0, S, QK)  # 5-d (B|1, K|1, G|1, T|1, S|1)

    def one_group(qk, g, g_arrays):
        # qk: (B, T, K, H); masks and bias: (B|1, K|1, T|1, S|1). The 4-D einsums are the
        # layout XLA:CPU handles best (as in jax.nn); groups are vmapped, K/V never copied.
        arrays = {**shared, **g_arrays}
        s = einsum("btkh,bskh->bkts", qk, k, out_dtype=cdt, precision=precision)
        s = s * jnp.asarray(scale, cdt)
        if logits_soft_cap is not None:
            c = jnp.asarray(logits_soft_cap, cdt)
            s = c * jnp.tanh(s / c)
        if mod_idx is not None:
            b_, h_, q_, k_ = mod_idx
            h_ = jnp.take(h_, g, axis=2)
            s = info.score_mod(s, b_[:, :, 0], h_, q_[:, :, 0], k_[:, :, 0])
        if "bias" in arrays:
            s = s + arrays["bias"].astype(cdt)
        if "vis" in arrays:
            s = jnp.where(arrays["vis"], s, -jnp.inf)
        m = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
        m = jnp.where(jnp.isfinite(m), m, 0.0)
        p = jnp.exp(s - m)
        l = jnp.sum(p, axis=-1)  # (B, K, T)
        safe_l = jnp.where(l > 0, l, 1.0)
        lse = jnp.where(l > 0, jnp.log(safe_l) + m[..., 0], -jnp.inf)
        if "keep" in arrays:
            p = jnp.where(arrays["keep"], p / jnp.asarray(1.0 - dropout_rate, cdt), 0.0)
        if v.dtype != cdt:
            # Low precision: normalise before the cast, as the weights feed a bf16/f16 matmul.
            p = p / safe_l[..., None]
        out = einsum("bkts,bskh->btkh", p.astype(v.dtype), v, out_dtype=cdt, precision=precision)
        if v.dtype == cdt:
            # Normalise the (T, Hv) output rather than the (T, S) weights: one pass fewer over the
            # score block (about 2x faster on XLA:CPU than dividing the weights).
            inv = jnp.where(l > 0, 1.0 / safe_l, 0.0)
            out = out * jnp.transpose(inv, (0, 2, 1))[..., None]
        return out, lse  # (B, T, K, Hv), (B, K, T)

    qg = q.reshape(B, T, K, G, H)
    out, lse = jax.vmap(one_group, in_axes=(3, 0, 2), out_axes=(3, 2))(
        qg, jnp.arange(G, dtype=jnp.int32), grouped)
    out = out.reshape(B, T, N, Hv).astype(q.dtype)
    lse = jnp.transpose(lse, (0, 3, 1, 2)).reshape(B, T, N)  # (B, K, G, T) -> (B, T, N)
    return out, lse
