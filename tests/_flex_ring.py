"""Ring attention with mask_mod / score_mod / sinks on 4 simulated CPU devices (subprocess of
``tests/test_flex.py``): prints the largest differences from single-device attention and, for
the gradients of the arrays a score_mod closes over (ALiBi slopes, a T5 bias table) on 2
devices, from the float64 NumPy reference of ``tests/reference.py``."""

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
from jax.sharding import PartitionSpec as P  # noqa: E402

import attnjax  # noqa: E402
from attnjax import masks  # noqa: E402
from tests import reference  # noqa: E402


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
    def single(q, k, v, sinks, slopes):
        mm = masks.and_masks(masks.causal, masks.document(doc))
        out = attnjax.dot_product_attention(q, k, v, mask_mod=mm, score_mod=masks.alibi(slopes),
                                            sinks=sinks, implementation="xla")
        return jnp.sum(out * dout)

    args = (q, k, v, sinks, slopes)
    # single-device attention: the same for both layouts, so computed (compiled) once
    want = jax.jit(jax.value_and_grad(single, argnums=(0, 1, 2, 3, 4)))(*args)
    results = {}
    for layout in ("contiguous", "zigzag"):
        def ring(q, k, v, sinks, slopes, layout=layout):
            mm = masks.and_masks(masks.causal, masks.document(doc))
            perm = (lambda x: attnjax.zigzag_permute(x, P)) if layout == "zigzag" else (lambda x: x)
            unperm = ((lambda x: attnjax.zigzag_unpermute(x, P)) if layout == "zigzag"
                      else (lambda x: x))
            out = attnjax.ring_attention_sharded(
                perm(q), perm(k), perm(v), mesh=mesh, seq_axis="seq", layout=layout,
                mask_mod=mm, score_mod=masks.alibi(slopes), sinks=sinks, chunk_size=4,
                is_causal=True)
            return jnp.sum(unperm(out) * dout)

        got = jax.jit(jax.value_and_grad(ring, argnums=(0, 1, 2, 3, 4)))(*args)
        diffs = [float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(got),
                                                                 jax.tree.leaves(want), strict=True)]
        results[layout] = dict(diffs=diffs, dsinks=float(jnp.max(jnp.abs(got[1][3]))),
                               dslopes=float(jnp.max(jnp.abs(got[1][4]))))
    results["closure_grads_p2"] = closure_grads(q, k, v, dout, slopes * 4)
    results["batch_head_axes"] = batch_head_axes(q, k, v, dout, doc, slopes, sinks)
    results["chunked_in_shard_map"] = chunked_in_shard_map(q, slopes * 4)
    print(json.dumps(results))


def batch_head_axes(q, k, v, dout, doc, slopes, sinks):
    """ring_attention_sharded with the batch (then the heads) split over a second mesh axis:
    mods that depend on ``b`` (per-row documents) and ``h`` (ALiBi, a head-dependent mask) and
    the global ``(N,)`` sinks, against single-device attention. Returns the largest differences
    of (loss, dq, dk, dv, dsinks, dslopes) per axis."""
    def mods(slopes):
        mm = masks.and_masks(masks.document(doc),
                             masks.or_masks(masks.causal, lambda b, h, qi, ki: h >= 2))
        return dict(mask_mod=mm, score_mod=masks.alibi(slopes))

    def single(q, k, v, sinks, slopes):
        out = attnjax.dot_product_attention(q, k, v, sinks=sinks, implementation="xla",
                                            **mods(slopes))
        return jnp.sum(out * dout)

    args = (q, k, v, sinks, slopes)
    want = jax.jit(jax.value_and_grad(single, argnums=(0, 1, 2, 3, 4)))(*args)
    res = {}
    for axis in ("batch_axis", "head_axis"):
        mesh = jax.make_mesh((2, 2), ("other", "seq"), axis_types=(AxisType.Explicit,) * 2)

        def ring(q, k, v, sinks, slopes, axis=axis, mesh=mesh):
            out = attnjax.ring_attention_sharded(q, k, v, mesh=mesh, seq_axis="seq",
                                                 **{axis: "other"}, sinks=sinks, chunk_size=4,
                                                 **mods(slopes))
            return jnp.sum(out * dout)

        with jax.set_mesh(mesh):
            got = jax.jit(jax.value_and_grad(ring, argnums=(0, 1, 2, 3, 4)))(*args)
        res[axis] = [float(jnp.max(jnp.abs(a - b))) for a, b in
                     zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)]
    return res


def chunked_in_shard_map(q, slopes):
    """dot_product_attention("xla_chunked") inside a user's shard_map over the batch, with a
    replicated ALiBi slope vector: its gradient equals the one without shard_map (the devices'
    parts summed once). Returns the largest differences (dq, dslopes) and the dslopes size."""
    mesh = jax.make_mesh((2,), ("data",), axis_types=(AxisType.Explicit,),
                         devices=jax.devices()[:2])

    def attn(q, s):
        return attnjax.dot_product_attention(q, q, q, score_mod=masks.alibi(s), is_causal=True,
                                             implementation="xla_chunked", chunk_size=8)

    def loss_sm(q, s):
        f = jax.shard_map(lambda q: attn(q, s), mesh=mesh, in_specs=P("data"),
                          out_specs=P("data"))
        return jnp.sum(f(q) ** 2)

    qs = jax.device_put(q, jax.sharding.NamedSharding(mesh, P("data")))
    got = jax.jit(jax.grad(loss_sm, argnums=(0, 1)))(qs, slopes)
    want = jax.jit(jax.grad(lambda q, s: jnp.sum(attn(q, s) ** 2), argnums=(0, 1)))(q, slopes)
    return dict(diffs=[float(jnp.max(jnp.abs(a - b))) for a, b in zip(got, want, strict=True)],
                dslopes=float(jnp.max(jnp.abs(want[1]))))


def t5_bucket_np(rel, num_buckets, max_distance):
    """T5's bidirectional bucket of ``rel = kv_idx - q_idx``, from the definition (NumPy)."""
    half = num_buckets // 2
    out = np.where(rel > 0, half, 0)
    n = np.abs(rel)
    exact = half // 2
    big = exact + (np.log(np.maximum(n, 1) / exact) / np.log(max_distance / exact)
                   * (half - exact)).astype(np.int64)
    return out + np.where(n < exact, n, np.minimum(big, half - 1))


def closure_grads(q, k, v, dout, slopes):
    """Gradients w.r.t. q, k, v and the arrays a score_mod closes over (ALiBi slopes and a T5
    table, one score_mod), ring on 2 devices (zigzag, causal) against float64 NumPy."""
    B, L, N, H = q.shape
    table = jnp.asarray(np.random.default_rng(5).standard_normal((16, N)), jnp.float32)
    mesh = jax.make_mesh((2,), ("seq",), axis_types=(AxisType.Explicit,),
                         devices=jax.devices()[:2])

    def loss(q, k, v, slopes, table):
        alibi, t5 = masks.alibi(slopes), masks.t5_relative_bias(table, max_distance=20)
        out = attnjax.ring_attention_sharded(
            *(attnjax.zigzag_permute(x, 2) for x in (q, k, v)), mesh=mesh, seq_axis="seq",
            layout="zigzag", is_causal=True, chunk_size=4,
            score_mod=lambda s, b, h, qi, ki: t5(alibi(s, b, h, qi, ki), b, h, qi, ki))
        return jnp.sum(attnjax.zigzag_unpermute(out, 2) * dout)

    got = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))(q, k, v, slopes, table)
    i, j = np.arange(L)[:, None], np.arange(L)[None, :]
    s64, t64 = np.asarray(slopes, np.float64), np.asarray(table, np.float64)
    bucket = t5_bucket_np(j - i, 16, 20)  # (T, S)
    bias = -s64[:, None, None] * (i - j)[None] + np.transpose(t64[bucket], (2, 0, 1))
    vis = reference.visibility(B, N, L, L, is_causal=True)
    _, _, cache = reference.attention(q, k, v, bias[None], vis=vis)
    dq, dk, dv, dbias = reference.attention_vjp(cache, dout, bias_shape=(B, N, L, L))
    dslopes = np.einsum("bnts,ts->n", dbias, -(i - j).astype(np.float64))
    dtable = np.zeros((16, N))
    np.add.at(dtable, bucket, np.transpose(dbias.sum(0), (1, 2, 0)))
    want = (dq, dk, dv, dslopes, dtable)
    names = ("dq", "dk", "dv", "dslopes", "dtable")
    return {n: dict(err=float(np.max(np.abs(np.asarray(a, np.float64) - b))),
                    scale=float(np.max(np.abs(b)))) for n, a, b in zip(names, got, want,
                                                                       strict=True)}


if __name__ == "__main__":
    main()
