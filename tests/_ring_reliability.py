"""Ring attention in the configurations users train in, run in a subprocess by
``tests/test_reliability.py`` (it needs 2 simulated devices, set before jax is imported).

* bfloat16, 128 tokens per device with the default chunk size (each device's block fits in one
  chunk, the case that crashed XLA:CPU), forward and backward;
* under ``jax_enable_x64``: float32 and float64 inputs, causal zigzag with lengths and segments.

Each result is compared with the float64 reference of ``tests/reference.py``; prints "ALL OK".
"""

from __future__ import annotations

import os
import sys

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
).strip()
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType  # noqa: E402

import attnjax  # noqa: E402
from tests import reference  # noqa: E402


def run(dtype, tol_out, tol_grad, *, T=256, masks=False, layout="contiguous"):
    B, N, K, H = 1, 4, 2, 32
    rng = np.random.default_rng(0)
    q64, k64, v64 = (rng.standard_normal(s) for s in ((B, T, N, H), (B, T, K, H), (B, T, K, H)))
    do64 = rng.standard_normal((B, T, N, H))
    q, k, v, do = (jnp.asarray(x, dtype) for x in (q64, k64, v64, do64))
    q64, k64, v64, do64 = (np.asarray(jnp.asarray(x, jnp.float64 if dtype == jnp.float64
                                                 else jnp.float32), np.float64)
                           for x in (q, k, v, do))
    mesh = jax.make_mesh((2,), ("seq",), axis_types=(AxisType.Explicit,))
    kw, vis_kw = {}, {}
    if masks:
        seg = np.sort(rng.integers(0, 3, (B, T)), axis=1).astype(np.int32)
        lens = np.array([T - 9], np.int32)
        kw = dict(is_causal=True, query_segment_ids=seg, key_value_segment_ids=seg,
                  key_value_seq_lengths=lens)
        vis_kw = dict(is_causal=True, q_segments=seg, kv_segments=seg, kv_lengths=lens)
    P = 2

    def ring(q, k, v):
        args = dict(kw)
        if layout == "zigzag":
            q, k, v = (attnjax.zigzag_permute(x, P) for x in (q, k, v))
            for ids in ("query_segment_ids", "key_value_segment_ids"):
                if ids in args:
                    args[ids] = attnjax.zigzag_permute(args[ids], P)
        out = attnjax.ring_attention_sharded(q, k, v, mesh=mesh, seq_axis="seq", layout=layout,
                                             **args)
        return attnjax.zigzag_unpermute(out, P) if layout == "zigzag" else out

    def fwd_bwd(q, k, v, do):
        out, vjp = jax.vjp(ring, q, k, v)
        return (out, *vjp(do))

    res = jax.block_until_ready(jax.jit(fwd_bwd)(q, k, v, do))
    assert all(r.dtype == dtype for r in res), [r.dtype for r in res]
    vis = reference.visibility_np(B, N, T, T, **vis_kw)
    out, _, cache = reference.attention(q64, k64, v64, vis=vis)
    want = (out, *reference.attention_vjp(cache, do64)[:3])
    for name, got, w, tol in zip(("out", "dq", "dk", "dv"), res, want,
                                 (tol_out, tol_grad, tol_grad, tol_grad), strict=True):
        err = float(np.max(np.abs(np.asarray(jnp.asarray(got, jnp.float64 if dtype == jnp.float64
                                                         else jnp.float32), np.float64) - w)))
        scale = max(1.0, float(np.abs(w).max()) / 10)
        print(f"{np.dtype(dtype).name if dtype != jnp.bfloat16 else 'bfloat16'} masks={masks} "
              f"{layout} {name}: max err {err:.3g}")
        assert err <= tol * scale, (name, err, tol * scale)


if __name__ == "__main__":
    run(jnp.bfloat16, 3e-2, 6e-2)  # 128 tokens per device: one chunk each
    run(jnp.bfloat16, 3e-2, 6e-2, masks=True, layout="zigzag")
    jax.config.update("jax_enable_x64", True)
    run(jnp.float32, 2e-5, 4e-5, masks=True, layout="zigzag")
    run(jnp.float64, 1e-11, 1e-10, masks=True, layout="zigzag")
    print("ALL OK")
