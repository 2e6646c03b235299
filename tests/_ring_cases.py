"""Multi-device ring-attention checks, run in a subprocess by ``tests/test_ring.py``.

It sets ``--xla_force_host_platform_device_count=8`` before importing jax (so it must run in its
own process: the rest of the suite sees one device) and prints one JSON object with, per case,
the largest absolute differences of the ring's output and gradients from (a) single-device
``attnjax.dot_product_attention(implementation="xla_chunked")`` and (b) the independent float64
NumPy reference of ``tests/reference.py``; plus compile-time memory per device and the messages of
the bad-input checks. The test module makes the assertions.

Usage: ``python tests/_ring_cases.py [cases|cases=NAME,NAME...|memory|errors ...]`` (default:
``cases memory errors``; ``cases`` runs every case of :data:`CASES`, ``cases=...`` the named ones).
"""

from __future__ import annotations

import os
import sys

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import json  # noqa: E402
import zlib  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType  # noqa: E402

import attnjax  # noqa: E402
from tests import reference  # noqa: E402

# name, mesh shape, mesh axis names, seq axis, batch axis, head axis, layout, kwargs, (B,T,S,N,K,H)
BASE = (2, 32, 32, 4, 2, 8)
CASES = [
    ("plain_p2", (2,), ("seq",), "seq", None, None, "contiguous", {}, BASE),
    ("plain_p8", (8,), ("seq",), "seq", None, None, "contiguous", {}, BASE),
    ("causal_contig_p4", (4,), ("seq",), "seq", None, None, "contiguous", {"is_causal": True}, BASE),
    ("causal_zigzag_p2", (2,), ("seq",), "seq", None, None, "zigzag", {"is_causal": True}, BASE),
    ("causal_zigzag_p8", (8,), ("seq",), "seq", None, None, "zigzag", {"is_causal": True}, BASE),
    ("window_contig_p8", (8,), ("seq",), "seq", None, None, "contiguous",
     {"local_window_size": (5, 2)}, BASE),
    ("window_causal_zigzag_p4", (4,), ("seq",), "seq", None, None, "zigzag",
     {"local_window_size": 6, "is_causal": True}, BASE),
    ("segments_causal_zigzag_p4", (4,), ("seq",), "seq", None, None, "zigzag",
     {"segments": True, "is_causal": True}, BASE),
    # MQA, cross-attention lengths (T != S), lengths, offset and soft cap together.
    ("mqa_lengths_offset_softcap_p4", (4,), ("seq",), "seq", None, None, "zigzag",
     {"is_causal": True, "lengths": True, "query_offset": 8, "logits_soft_cap": 2.0},
     (2, 32, 64, 4, 1, 8)),
    ("mesh2x4_batch_causal_zigzag", (2, 4), ("data", "seq"), "seq", "data", None, "zigzag",
     {"is_causal": True}, BASE),
    ("mesh2x4_heads_segments", (2, 4), ("heads", "seq"), "seq", None, "heads", "contiguous",
     {"segments": True}, BASE),
]


def _mesh(shape, names):
    return jax.make_mesh(shape, names, axis_types=(AxisType.Explicit,) * len(shape))


def _max_err(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def run_case(name, mesh_shape, names, seq_axis, batch_axis, head_axis, layout, kw, dims):
    B, T, S, N, K, H = dims
    kw = dict(kw)
    rng = np.random.default_rng(zlib.crc32(name.encode()))  # the same data in every process
    q = rng.standard_normal((B, T, N, H)).astype(np.float32)
    k = rng.standard_normal((B, S, K, H)).astype(np.float32)
    v = rng.standard_normal((B, S, K, H)).astype(np.float32)
    do = rng.standard_normal((B, T, N, H)).astype(np.float32)
    mesh = _mesh(mesh_shape, names)
    P = mesh.shape[seq_axis]
    zig = layout == "zigzag"

    glob = {}  # global (natural order) mask arguments
    if kw.pop("segments", False):
        qs = np.sort(rng.integers(0, 3, (B, T)), axis=1).astype(np.int32)
        glob["query_segment_ids"] = qs
        glob["key_value_segment_ids"] = qs if S == T else np.sort(rng.integers(0, 3, (B, S)), 1)
    if kw.pop("lengths", False):
        glob["query_seq_lengths"] = np.array([T, T - 5], np.int32)
        glob["key_value_seq_lengths"] = np.array([S - 3, S // 2 + 1], np.int32)
    if "query_offset" in kw:
        glob["query_offset"] = kw.pop("query_offset")

    def ring(q, k, v):
        args = dict(glob)
        if zig:
            q, k, v = (attnjax.zigzag_permute(x, P) for x in (q, k, v))
            for ids in ("query_segment_ids", "key_value_segment_ids"):
                if ids in args:
                    args[ids] = attnjax.zigzag_permute(args[ids], P)
        out = attnjax.ring_attention_sharded(
            q, k, v, mesh=mesh, seq_axis=seq_axis, batch_axis=batch_axis, head_axis=head_axis,
            layout=layout, chunk_size=3, **args, **kw)
        return attnjax.zigzag_unpermute(out, P) if zig else out

    def single(q, k, v):
        return attnjax.dot_product_attention(q, k, v, implementation="xla_chunked", chunk_size=8,
                                             **glob, **kw)

    def fwd_bwd(f):
        out, vjp = jax.vjp(f, q, k, v)
        return (out, *vjp(do))

    ring_res = jax.jit(lambda: fwd_bwd(ring))()
    single_res = jax.jit(lambda: fwd_bwd(single))()

    off = glob.get("query_offset", 0)
    vis = reference.visibility(
        B, N, T, S, is_causal=kw.get("is_causal", False), window=kw.get("local_window_size"),
        query_offset=off, q_lengths=glob.get("query_seq_lengths"),
        kv_lengths=glob.get("key_value_seq_lengths"), q_segments=glob.get("query_segment_ids"),
        kv_segments=glob.get("key_value_segment_ids"))
    out64, _, cache = reference.attention(q, k, v, vis=vis, softcap=kw.get("logits_soft_cap"))
    dq64, dk64, dv64, _ = reference.attention_vjp(cache, do)
    ref_res = (out64, dq64, dk64, dv64)
    labels = ("out", "dq", "dk", "dv")
    return {
        "vs_xla_chunked": {lab: _max_err(a, b) for lab, a, b in zip(labels, ring_res, single_res, strict=True)},
        "vs_float64": {lab: _max_err(a, b) for lab, a, b in zip(labels, ring_res, ref_res, strict=True)},
        "out_abs_max": float(np.max(np.abs(out64))),
        "grad_abs_max": float(max(np.max(np.abs(g)) for g in (dq64, dk64, dv64))),
    }


def memory(total=8192, B=1, N=4, H=32, chunk=128):
    """Compile-time temp bytes per device of forward+backward, fixed total length, P = 1..8."""
    res = {}
    for P in (1, 2, 4, 8):
        mesh = _mesh((P,), ("seq",))
        spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "seq"))
        x = jax.ShapeDtypeStruct((B, total, N, H), jnp.float32, sharding=spec)

        def loss(q, k, v, mesh=mesh):
            out = attnjax.ring_attention_sharded(q, k, v, mesh=mesh, seq_axis="seq",
                                                 layout="zigzag", is_causal=True, chunk_size=chunk)
            return jnp.sum(out * out)

        c = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, x, x).compile()
        res[P] = int(c.memory_analysis().temp_size_in_bytes)
    return res


def errors():
    """Messages of the bad-input checks (None where no ValueError was raised)."""
    q = jnp.ones((1, 24, 2, 4))
    mesh = _mesh((8,), ("seq",))
    out = {}

    def catch(key, f):
        try:
            f()
            out[key] = None
        except ValueError as e:
            out[key] = str(e)

    catch("length_not_divisible",
          lambda: attnjax.ring_attention_sharded(q[:, :20], q[:, :20], q[:, :20], mesh=mesh,
                                                 seq_axis="seq"))
    catch("zigzag_length_not_divisible_by_2p",
          lambda: attnjax.ring_attention_sharded(q, q, q, mesh=mesh, seq_axis="seq",
                                                 layout="zigzag"))
    catch("axis_not_in_mesh",
          lambda: attnjax.ring_attention_sharded(q, q, q, mesh=mesh, seq_axis="sequence"))
    catch("unknown_layout",
          lambda: attnjax.ring_attention_sharded(q, q, q, mesh=mesh, seq_axis="seq",
                                                 layout="striped"))
    catch("zigzag_permute_bad_length", lambda: attnjax.zigzag_permute(q, 8))

    def odd_local():
        f = jax.shard_map(
            lambda a: attnjax.ring_attention(a, a, a, axis_name="seq", layout="zigzag"),
            mesh=mesh, in_specs=jax.sharding.PartitionSpec(None, "seq"),
            out_specs=jax.sharding.PartitionSpec(None, "seq"))
        f(jax.device_put(q, jax.sharding.NamedSharding(
            mesh, jax.sharding.PartitionSpec(None, "seq"))))

    catch("zigzag_odd_local_length_in_shard_map", odd_local)

    def wrong_axis_in_shard_map():
        f = jax.shard_map(
            lambda a: attnjax.ring_attention(a, a, a, axis_name="sequence"),
            mesh=mesh, in_specs=jax.sharding.PartitionSpec(None, "seq"),
            out_specs=jax.sharding.PartitionSpec(None, "seq"))
        f(jax.device_put(q, jax.sharding.NamedSharding(
            mesh, jax.sharding.PartitionSpec(None, "seq"))))

    catch("axis_not_bound_in_shard_map", wrong_axis_in_shard_map)
    return out


def main(argv):
    what = argv or ["cases", "memory", "errors"]
    result = {"num_devices": jax.device_count(), "all_cases": [c[0] for c in CASES]}
    names = [c[0] for c in CASES] if "cases" in what else []
    for arg in what:
        if arg.startswith("cases="):
            names += arg[len("cases="):].split(",")
    unknown = set(names) - {c[0] for c in CASES}
    if unknown:
        raise SystemExit(f"unknown case names {sorted(unknown)}; known: {[c[0] for c in CASES]}")
    if names:
        result["cases"] = {c[0]: run_case(*c) for c in CASES if c[0] in names}
    if "memory" in what:
        result["memory"] = memory()
    if "errors" in what:
        result["errors"] = errors()
    print("RING_RESULT " + json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
