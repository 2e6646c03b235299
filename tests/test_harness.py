"""Differential test harness: every implementation × dtype × shape × chunking × mask kind × jit
and eager, forward and ``jax.grad`` (q, k, v, bias), against the independent float64 reference.

The grid is the product of implementation (2) × dtype (float32, bfloat16, float16, and float64
under ``jax_enable_x64``) × chunk setting (the default ``None``, square, uneven) × mask kind
(every kind alone and several combined) × execution mode (jit, eager). Each grid point gets its
own seeded shape: query and key lengths drawn from the classes 1, below one chunk, exactly one
chunk, one chunk plus one and several chunks (so T != S is common), MHA/GQA/MQA, and a value head
dim equal to or different from the query head dim. Every result is blocked on (compared).

By default a seeded, stratified sample of the grid runs (every mask kind, dtype, implementation,
chunk setting and mode appears); ``pytest --full-grid`` runs all of it (marked ``slow``).
"""

from __future__ import annotations

import dataclasses
import itertools
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax
from tests import reference as ref

IMPLS = ("xla", "xla_chunked")
DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16, "f16": jnp.float16, "f64": jnp.float64}
# (forward, gradient) tolerances against the float64 reference.
TOLERANCES = {"f32": (2e-5, 4e-5), "bf16": (2e-2, 4e-2), "f16": (3e-3, 6e-3), "f64": (1e-11, 1e-10)}
# Chunk settings: None is the library default (512 x 512 at B·N = 8, the harness's B·N).
CHUNKS = {"default": None, "square16": (16, 16), "uneven8x12": (8, 12)}
MODES = ("jit", "eager")
MASKS = (
    "none", "causal", "causal_bottom_right", "causal_offset_per_row", "window", "window_causal",
    "q_lengths", "kv_lengths", "segments", "mask_dense", "mask_broadcast", "bias", "bias_broadcast",
    "softcap", "scale", "empty_rows", "combo_causal_lengths_segments_bias",
    "combo_window_mask_softcap_offsets",
)
HEADS = ((4, 4), (4, 2), (4, 1))  # (N, K): MHA, GQA, MQA
HEAD_DIMS = ((16, 16), (16, 24), (32, 32))  # (H, Hv)
B = 2


def _length_classes(chunk: int | None) -> list[int]:
    """1, below one chunk, one chunk, one chunk + 1, several chunks."""
    if chunk is None:  # the default: 512 at B·N = 8 ("several" would be slow for the reference)
        return [1, 300, 512, 513]
    return [1, max(2, chunk - 3), chunk, chunk + 1, 3 * chunk + 2]


@dataclasses.dataclass(frozen=True)
class Config:
    impl: str
    dtype: str
    chunk: str
    mask: str
    mode: str
    T: int
    S: int
    N: int
    K: int
    H: int
    Hv: int

    @property
    def id(self) -> str:
        return (f"{self.impl}-{self.dtype}-{self.chunk}-{self.mask}-{self.mode}-"
                f"T{self.T}S{self.S}N{self.N}K{self.K}H{self.H}Hv{self.Hv}")


def _grid() -> list[Config]:
    out = []
    for n, (impl, dtype, chunk, mask, mode) in enumerate(
        itertools.product(IMPLS, DTYPES, CHUNKS, MASKS, MODES)
    ):
        rng = random.Random(n * 7919 + 17)
        cs = CHUNKS[chunk]
        cq, ck = (None, None) if cs is None else cs
        T = rng.choice(_length_classes(cq))
        S = rng.choice(_length_classes(ck))
        N, K = rng.choice(HEADS)
        H, Hv = rng.choice(HEAD_DIMS)
        out.append(Config(impl, dtype, chunk, mask, mode, T, S, N, K, H, Hv))
    return out


GRID = _grid()


def _sample() -> list[Config]:
    """A stratified, seeded sample: 1 jitted config per mask kind, one jitted config per
    (dtype, implementation) on the default chunks (the configuration users run), and one eager
    config per dtype (eager dispatch compiles every op separately: slow, so fewer of them)."""
    rng = random.Random(20261130)
    picked = []
    for mask in MASKS:
        picked += rng.sample([c for c in GRID if c.mask == mask and c.mode == "jit"], 1)
    for dtype, impl in itertools.product(DTYPES, IMPLS):
        pool = [c for c in GRID if c.dtype == dtype and c.impl == impl and c.chunk == "default"
                and c.mode == "jit" and c not in picked]
        picked.append(rng.choice(pool))
    for dtype in DTYPES:
        pool = [c for c in GRID if c.dtype == dtype and c.mode == "eager" and max(c.T, c.S) <= 300]
        picked.append(rng.choice(pool))
    return picked


SAMPLE = _sample()


# ------------------------------------------------------------------------------------------
# One grid point.

def _round(x, dtype):
    """Round float64 data to ``dtype`` and back, so the reference sees what the library sees."""
    with jax.enable_x64(True):
        return np.asarray(jnp.asarray(x, dtype).astype(jnp.float64))


def _problem(cfg: Config, seed: int = 0):
    rng = np.random.default_rng(seed)
    T, S, N, K, H, Hv = cfg.T, cfg.S, cfg.N, cfg.K, cfg.H, cfg.Hv
    dtype = DTYPES[cfg.dtype]
    q = _round(rng.standard_normal((B, T, N, H)), dtype)
    k = _round(rng.standard_normal((B, S, K, H)), dtype)
    v = _round(rng.standard_normal((B, S, K, Hv)), dtype)
    lib, vis_kw, bias, scale, softcap = {}, {}, None, None, None
    m = cfg.mask

    def causal(offset=None):
        lib["is_causal"] = vis_kw["is_causal"] = True
        if offset is not None:
            lib["query_offset"] = vis_kw["query_offset"] = offset

    def per_row_offset():
        return np.array([0, max(0, S - T)], np.int32)

    if m == "causal":
        causal()
    elif m == "causal_bottom_right":
        causal(S - T)
    elif m == "causal_offset_per_row":
        causal(per_row_offset())
    elif m in ("window", "combo_window_mask_softcap_offsets"):
        w = (max(1, S // 7), 2)
        lib["local_window_size"] = vis_kw["window"] = w
    elif m == "window_causal":
        w = (max(1, S // 5), 0)
        lib["local_window_size"] = vis_kw["window"] = w
        causal(S - T)
    if m in ("q_lengths", "combo_window_mask_softcap_offsets"):
        ql = np.array([T // 2, T], np.int32)
        lib["query_seq_lengths"] = vis_kw["q_lengths"] = ql
    if m in ("kv_lengths", "combo_causal_lengths_segments_bias"):
        kl = np.array([max(1, S // 3), S], np.int32)
        lib["key_value_seq_lengths"] = vis_kw["kv_lengths"] = kl
    if m == "empty_rows":  # batch row 0 sees no key at all
        kl = np.array([0, S], np.int32)
        lib["key_value_seq_lengths"] = vis_kw["kv_lengths"] = kl
    if m in ("segments", "combo_causal_lengths_segments_bias"):
        qs = np.sort(rng.integers(0, 3, (B, T)), axis=1).astype(np.int32)
        ks = np.sort(rng.integers(0, 3, (B, S)), axis=1).astype(np.int32)
        lib["query_segment_ids"], lib["key_value_segment_ids"] = qs, ks
        vis_kw["q_segments"], vis_kw["kv_segments"] = qs, ks
    if m == "combo_causal_lengths_segments_bias":
        causal()
    if m in ("mask_dense", "combo_window_mask_softcap_offsets"):
        mk = rng.random((B, N, T, S)) < 0.7
        mk[:, :, 0, :] = False  # query row 0 sees nothing
        lib["mask"] = vis_kw["mask"] = mk
    if m == "combo_window_mask_softcap_offsets":
        lib["query_offset"] = vis_kw["query_offset"] = per_row_offset()
        softcap = 2.5
    if m == "mask_broadcast":
        mk = rng.random((T, S)) < 0.6
        lib["mask"] = vis_kw["mask"] = mk
    if m == "bias":
        bias = _round(rng.standard_normal((B, N, T, S)), dtype)
    if m in ("bias_broadcast", "combo_causal_lengths_segments_bias"):
        bias = _round(rng.standard_normal((1, N, 1, S)), dtype)
    if m == "softcap":
        softcap = 2.0
    if m == "scale":
        scale = 0.3
    if softcap is not None:
        lib["logits_soft_cap"] = softcap
    if scale is not None:
        lib["scale"] = scale
    vis = ref.visibility_np(B, N, T, S, **vis_kw)
    want_out, want_lse, cache = ref.attention(q, k, v, bias, vis=vis, scale=scale, softcap=softcap)
    dout = _round(rng.standard_normal(want_out.shape), dtype)
    want_grads = ref.attention_vjp(cache, dout, None if bias is None else bias.shape)
    return dict(q=q, k=k, v=v, bias=bias, lib=lib, dout=dout, want_out=want_out,
                want_lse=want_lse, want_grads=want_grads, vis=vis)


def _prepare_library(cfg: Config, data):
    """``(fwd_bwd, args, finish)``: the library's forward+VJP of one grid point, its arguments,
    and ``finish(result) -> (out, lse, grads)`` in float64 NumPy (see :func:`_run_library`)."""
    dtype = DTYPES[cfg.dtype]
    lib = dict(data["lib"], implementation=cfg.impl, chunk_size=CHUNKS[cfg.chunk])
    has_bias = data["bias"] is not None
    xs = [jnp.asarray(data[n], dtype) for n in ("q", "k", "v")]
    if has_bias:
        xs.append(jnp.asarray(data["bias"], dtype))
    dout = jnp.asarray(data["dout"], dtype)

    def f(*xs):
        return attnjax.dot_product_attention(*xs[:3], xs[3] if has_bias else None,
                                             return_residual=True, **lib)

    def fwd_bwd(xs, dout):
        (out, lse), vjp = jax.vjp(f, *xs)
        return out, lse, vjp((dout, jnp.zeros_like(lse)))

    def finish(result):
        out, lse, grads = jax.block_until_ready(result)
        assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
        to64 = lambda x: np.asarray(
            jnp.asarray(x, jnp.float32 if cfg.dtype != "f64" else x.dtype), np.float64)
        grads = [to64(g) for g in grads] + ([] if has_bias else [None])
        return to64(out), to64(lse), grads

    return fwd_bwd, (xs, dout), finish


def _run_library(cfg: Config, data):
    fwd_bwd, args, finish = _prepare_library(cfg, data)
    if cfg.mode == "jit":
        fwd_bwd = jax.jit(fwd_bwd)
    return finish(fwd_bwd(*args))


def check_config(cfg: Config, computed=None):
    """``cfg`` against the float64 reference; ``computed = (data, (out, lse, grads))`` where the
    library's results were computed already (e.g. with other grid points under one jit)."""
    if computed is None:
        data = _problem(cfg)
        out, lse, grads = _run_library(cfg, data)
    else:
        data, (out, lse, grads) = computed
    ftol, gtol = TOLERANCES[cfg.dtype]
    assert np.all(np.isfinite(out)), "non-finite output"
    np.testing.assert_allclose(out, data["want_out"], atol=ftol, rtol=ftol, err_msg="output")
    want_lse = data["want_lse"]
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(want_lse), err_msg="lse -inf rows")
    fin = np.isfinite(want_lse)
    lse_tol = max(ftol, 4 * float(jnp.finfo(DTYPES[cfg.dtype]).eps))
    np.testing.assert_allclose(lse[fin], want_lse[fin], atol=lse_tol, rtol=lse_tol, err_msg="lse")
    for name, g, w in zip(("dq", "dk", "dv", "dbias"), grads, data["want_grads"], strict=True):
        if w is None:
            continue
        assert np.all(np.isfinite(g)), f"non-finite {name}"
        tol = gtol * max(1.0, float(np.abs(w).max()) / 10)
        np.testing.assert_allclose(g, w, atol=tol, rtol=tol, err_msg=name)


def _x64(cfg: Config):
    return jax.enable_x64(cfg.dtype == "f64")


@pytest.mark.parametrize("cfg", SAMPLE, ids=lambda c: c.id)
def test_grid_sample(cfg):
    with _x64(cfg):
        check_config(cfg)


@pytest.mark.slow
@pytest.mark.full_grid
@pytest.mark.parametrize("cfg", GRID, ids=lambda c: c.id)
def test_full_grid(cfg):
    with _x64(cfg):
        check_config(cfg)


def test_grid_covers_every_axis():
    """The default sample touches every value of every axis, and the grid is what it says."""
    assert len(GRID) == len(IMPLS) * len(DTYPES) * len(CHUNKS) * len(MASKS) * len(MODES)
    for field, values in (("impl", IMPLS), ("dtype", DTYPES), ("chunk", CHUNKS),
                          ("mask", MASKS), ("mode", MODES)):
        assert {getattr(c, field) for c in SAMPLE} == set(values), field
    # Length classes: one, below / at / just past one chunk, several chunks, and T != S.
    lengths = {c.T for c in GRID} | {c.S for c in GRID}
    assert {1, 300, 512, 513, 13, 16, 17, 50}.issubset(lengths)
    assert any(c.T != c.S for c in SAMPLE)
    assert {(c.N, c.K) for c in SAMPLE} == set(HEADS)
    assert any(c.H != c.Hv for c in SAMPLE)


def test_vectorised_reference_visibility_equals_loops():
    rng = np.random.default_rng(3)
    for _ in range(5):
        Bv, Nv, Tv, Sv = 2, 2, int(rng.integers(1, 9)), int(rng.integers(1, 11))
        kw = dict(
            mask=rng.random((Bv, Nv, Tv, Sv)) < 0.8, is_causal=bool(rng.integers(2)),
            window=(int(rng.integers(0, 4)), int(rng.integers(0, 4))),
            query_offset=rng.integers(-2, 4, Bv), q_lengths=rng.integers(0, Tv + 1, Bv),
            kv_lengths=rng.integers(0, Sv + 1, Bv), q_segments=rng.integers(0, 2, (Bv, Tv)),
            kv_segments=rng.integers(0, 2, (Bv, Sv)),
        )
        np.testing.assert_array_equal(ref.visibility_np(Bv, Nv, Tv, Sv, **kw),
                                      ref.visibility(Bv, Nv, Tv, Sv, **kw))
