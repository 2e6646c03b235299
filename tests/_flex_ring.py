"""Ring attention with mask_mod / score_mod / sinks on 4 simulated CPU devices (subprocess of
``tests/test_flex.py``): prints the largest differences from single-device attention."""

from __future__ import annotations

import os
import sys

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
).strip()
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import json  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType  # noqa: E402

import attnjax  # noqa: E402
from attnjax import masks  # noqa: E402


def main():
    rng = np.random.default_rng(0)
    B, L, N, K, H, P = 2, 32, 4, 2, 8, 4
    q = jnp.asarray(rng.standard_normal((B, L, N, H)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((B, L, K, H)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((B, L, K, H)), jnp.float32)
    doc = jnp.asarray(np.sort(rng.integers(0, 3, (B, L)), axis=1), jnp.int32)
    slopes = attnjax.masks.alibi_slopes(N)
    sinks = jnp.asarray(rng.standard_normal((N,)), jnp.float32)
    dout = jnp.asarray(rng.standard_normal((B, L, N, H)), jnp.float32)
    mesh = jax.make_mesh((P,), ("seq",), axis_types=(AxisType.Explicit,))
    results = {}
    for layout in ("contiguous", "zigzag"):
        def ring(q, k, v, sinks, layout=layout):
            mm = masks.and_masks(masks.causal, masks.document(doc))
            perm = (lambda x: attnjax.zigzag_permute(x, P)) if layout == "zigzag" else (lambda x: x)
            unperm = ((lambda x: attnjax.zigzag_unpermute(x, P)) if layout == "zigzag"
                      else (lambda x: x))
            out = attnjax.ring_attention_sharded(
                perm(q), perm(k), perm(v), mesh=mesh, seq_axis="seq", layout=layout,
                mask_mod=mm, score_mod=masks.alibi(slopes), sinks=sinks, chunk_size=4,
                is_causal=True)
            return jnp.sum(unperm(out) * dout)

        def single(q, k, v, sinks):
            mm = masks.and_masks(masks.causal, masks.document(doc))
            out = attnjax.dot_product_attention(q, k, v, mask_mod=mm, score_mod=masks.alibi(slopes),
                                                sinks=sinks, implementation="xla")
            return jnp.sum(out * dout)

        args = (q, k, v, sinks)
        got = jax.jit(jax.value_and_grad(ring, argnums=(0, 1, 2, 3)))(*args)
        want = jax.jit(jax.value_and_grad(single, argnums=(0, 1, 2, 3)))(*args)
        diffs = [float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(got),
                                                                 jax.tree.leaves(want), strict=True)]
        results[layout] = dict(diffs=diffs, dsinks=float(jnp.max(jnp.abs(got[1][3]))))
    # Gradients with respect to a score_mod's closed-over arrays: a clear error in the ring.
    # (not implemented in the ring): a clear error or NaN, never a silent zero.
    try:
        g = jax.jit(jax.grad(lambda s: jnp.sum(attnjax.ring_attention_sharded(
            q, k, v, mesh=mesh, seq_axis="seq", score_mod=masks.alibi(s)))))(slopes)
        results["closure_grad"] = "nan" if bool(jnp.all(jnp.isnan(g))) else "value"
    except TypeError as e:
        results["closure_grad"] = "error" if "cannot yet differentiate" in str(e) else str(e)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
