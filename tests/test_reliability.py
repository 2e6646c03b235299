"""Regressions from the reliability trial, and the configurations users train in.

* bfloat16 backward of ``xla_chunked`` when a sequence fits in one chunk (it crashed XLA:CPU:
  "Unsupported element type for DotThunk::Execute: BF16 x BF16 = F32");
* ``jax_enable_x64``: the bias gradient raised a dynamic_slice index-type error; the rest of the
  library (decode, ring, modules) runs under x64 too;
* float64 inputs were computed in float32 by ``xla_chunked``;
* ``jax_debug_nans`` for every mask kind, fully masked rows included;
* vmap, checkpoint, donation; forward-mode autodiff gives a clear error.
Every result is blocked on.
"""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen, nnx

import attnjax
import attnjax.linen
import attnjax.nnx
from tests import _batching
from tests import reference as ref
from tests.test_harness import Config, _prepare_library, _problem, check_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ref_grads(q, k, v, bias=None, dout=None, **vis_kw):
    B, T, N, _ = q.shape
    S = k.shape[1]
    # bfloat16/float16 go through float32 (NumPy has no bfloat16); float32/64 are exact.
    up = lambda x: x.astype(jnp.float32) if jnp.dtype(x.dtype).itemsize < 4 else x
    q, k, v = (np.asarray(up(jnp.asarray(x)), np.float64) for x in (q, k, v))
    vis = ref.visibility_np(B, N, T, S, **vis_kw)
    out, _, cache = ref.attention(q, k, v, bias, vis=vis)
    dout = np.ones_like(out) if dout is None else dout
    return out, ref.attention_vjp(cache, dout, None if bias is None else np.shape(bias))


# Every mask kind appears here alone or in a combination; rows 0 of "mask_dense" and batch row 0
# of "empty_rows" see no key at all.
DEBUG_NAN_MASKS = ("none", "causal_offset_per_row", "window_causal", "q_lengths", "empty_rows",
                   "mask_dense", "mask_broadcast", "bias", "combo_causal_lengths_segments_bias",
                   "combo_window_mask_softcap_offsets")


# ------------------------------------------------------------------------------------------
# 1. bfloat16, a sequence that fits in one chunk, default chunk size.

def test_bf16_backward_single_chunk_default_chunks_issue_repro():
    rng = np.random.default_rng(0)  # NumPy: jax.random.normal would compile for this shape
    q, k, v = (jnp.asarray(rng.standard_normal((1, 300, 8, 64)), jnp.bfloat16) for _ in range(3))
    g = jax.grad(lambda a, b, c: attnjax.dot_product_attention(
        a, b, c, implementation="xla_chunked").astype(jnp.float32).sum(), (0, 1, 2))(q, k, v)
    g = jax.block_until_ready(g)
    _, want = _ref_grads(q, k, v)
    for got, w in zip(g, want[:3], strict=True):
        np.testing.assert_allclose(np.asarray(got, np.float64), w, atol=0.1, rtol=0.05)


def _one_chunk_params():
    # A half fraction of T x masks x jit by default (each value of each axis twice), all with
    # --run-slow.
    for T in (300, 512):
        for masks, mid in ((False, "plain"), (True, "masked")):
            for jit, jid in ((False, "eager"), (True, "jit")):
                slow = (T == 512) ^ masks ^ jit
                yield pytest.param(T, masks, jit, id=f"{jid}-{mid}-{T}",
                                   marks=pytest.mark.slow if slow else ())


@pytest.mark.parametrize("T,masks,jit", list(_one_chunk_params()))
def test_bf16_backward_one_chunk_shapes(T, masks, jit):
    rng = np.random.default_rng(T)
    q, k, v = (jnp.asarray(rng.standard_normal((2, T, 2, 32)), jnp.bfloat16) for _ in range(3))
    kw = dict(is_causal=True, key_value_seq_lengths=np.array([T - 7, T], np.int32)) if masks else {}

    def loss(a, b, c):
        return attnjax.dot_product_attention(a, b, c, implementation="xla_chunked",
                                             **kw).astype(jnp.float32).sum()

    grad = jax.grad(loss, (0, 1, 2))
    g = jax.block_until_ready((jax.jit(grad) if jit else grad)(q, k, v))
    vis_kw = dict(is_causal=True, kv_lengths=kw["key_value_seq_lengths"]) if masks else {}
    _, want = _ref_grads(q, k, v, **vis_kw)
    for got, w in zip(g, want[:3], strict=True):
        np.testing.assert_allclose(np.asarray(got, np.float64), w, atol=0.1, rtol=0.05)


def test_bf16_default_implementation_one_query_chunk():
    """implementation=None picks the chunked path here (B·N·T·S > 2**22) with one query chunk."""
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((1, 256, 8, 32)), jnp.bfloat16)
    k, v = (jnp.asarray(rng.standard_normal((1, 4096, 8, 32)), jnp.bfloat16) for _ in range(2))
    g = jax.jit(jax.grad(lambda a, b, c: attnjax.dot_product_attention(a, b, c).astype(
        jnp.float32).sum(), (0, 1, 2)))(q, k, v)
    g = jax.block_until_ready(g)
    _, want = _ref_grads(q, k, v)
    for got, w in zip(g, want[:3], strict=True):
        np.testing.assert_allclose(np.asarray(got, np.float64), w, atol=0.1, rtol=0.05)


# Trip counts matter in the chunked kernel's loops: both dtypes there by default; "xla" (no loops)
# with --run-slow.
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("impl", [pytest.param("xla", marks=pytest.mark.slow), "xla_chunked"])
def test_low_precision_every_trip_count(impl, dtype):
    """One-trip and many-trip loops (T, S = 1, 7, 8, 9 around a chunk of 8) forward and grad
    (the four shapes under one jax.jit: one compile)."""
    grad = jax.grad(lambda a, b, c: attnjax.dot_product_attention(
        a, b, c, implementation=impl, chunk_size=8).astype(jnp.float32).sum(), (0, 1, 2))
    inputs = []
    for T, S in [(1, 1), (7, 8), (9, 8), (8, 17)]:
        rng = np.random.default_rng(T * 31 + S)
        q = jnp.asarray(rng.standard_normal((1, T, 2, 8)), dtype)
        k, v = (jnp.asarray(rng.standard_normal((1, S, 1, 8)), dtype) for _ in range(2))
        inputs.append((q, k, v))
    grads = jax.block_until_ready(_batching.jit_together([grad] * len(inputs), inputs))
    for (q, k, v), g in zip(inputs, grads, strict=True):
        _, want = _ref_grads(q, k, v)
        for got, w in zip(g, want[:3], strict=True):
            np.testing.assert_allclose(np.asarray(got, np.float64), w, atol=0.05, rtol=0.05)


# ------------------------------------------------------------------------------------------
# 2. jax_enable_x64.

def _x64_bias_params():
    # A half fraction of dtype x bias shape by default (each value of each axis once: float32 with
    # the full bias, float64 with the broadcast one); the other two with --run-slow.
    for dtype in ("f32", "f64"):
        for shape, sid in (((2, 4, 24, 30), "full"), ((1, 4, 1, 30), "broadcast")):
            slow = (dtype == "f64") != (sid == "broadcast")
            yield pytest.param(shape, dtype, id=f"{dtype}-{sid}",
                               marks=pytest.mark.slow if slow else ())


@pytest.mark.parametrize("bias_shape,dtype", list(_x64_bias_params()))
def test_x64_bias_gradient(bias_shape, dtype):
    with jax.enable_x64(True):
        dt = jnp.float32 if dtype == "f32" else jnp.float64
        rng = np.random.default_rng(1)
        q = jnp.asarray(rng.standard_normal((2, 24, 4, 16)), dt)
        k, v = (jnp.asarray(rng.standard_normal((2, 30, 2, 16)), dt) for _ in range(2))
        bias = jnp.asarray(rng.standard_normal(bias_shape), dt)
        g = jax.grad(lambda b: attnjax.dot_product_attention(
            q, k, v, b, implementation="xla_chunked", chunk_size=8, is_causal=True).sum())(bias)
        g = jax.block_until_ready(g)
        _, want = _ref_grads(q, k, v, np.asarray(bias, np.float64), is_causal=True)
        tol = 1e-10 if dtype == "f64" else 2e-5
        np.testing.assert_allclose(np.asarray(g, np.float64), want[3], atol=tol, rtol=tol)


# Under x64 by default: the two combinations and the kinds neither contains (window with causal
# and a static offset, fully masked rows, the broadcast mask, the full bias); the kinds the
# combinations contain ("none", per-row offset, query lengths, dense mask) with --run-slow.
X64_MASKS_DEFAULT = {"combo_causal_lengths_segments_bias", "combo_window_mask_softcap_offsets",
                     "window_causal", "empty_rows", "mask_broadcast", "bias"}


# The selected mask kinds are computed in batches (tests/_batching.py), each test checking its
# own kind.
X64_MASKS_SELECTED = [m for m in DEBUG_NAN_MASKS if _batching.RUN_SLOW or m in X64_MASKS_DEFAULT]
_X64_COMPUTED: dict = {}


def _x64_mask_config(mask):
    return Config("xla_chunked", "f32", "uneven8x12", mask, "jit", 13, 29, 4, 2, 16, 16)


def _x64_mask_results(mask):
    def prepare(m):
        data = _problem(_x64_mask_config(m))
        fn, args, finish = _prepare_library(_x64_mask_config(m), data)
        return fn, args, lambda r: (data, finish(r))

    return _batching.computed(_X64_COMPUTED, mask, X64_MASKS_SELECTED, prepare)


@pytest.mark.parametrize("mask", [pytest.param(m, marks=(
    () if m in X64_MASKS_DEFAULT else (pytest.mark.slow,))
    + _batching.group("x64_masks", m, X64_MASKS_SELECTED)) for m in DEBUG_NAN_MASKS])
def test_x64_every_mask_kind_float32_inputs(mask):
    """The same float32 problems with jax_enable_x64 on (index arithmetic must not change)."""
    with jax.enable_x64(True):
        check_config(_x64_mask_config(mask), _x64_mask_results(mask))


# The default run checks cached attention under x64 (float64 and float32 caches, prefill and
# steps) in tests/test_decode.py::test_x64_float64_computes_in_float64_and_float32_with_int32_indices.
@pytest.mark.slow
def test_x64_cached_attention_matches_full_forward():
    with jax.enable_x64(True):
        for dt, tol in ((jnp.float32, 2e-5), (jnp.float64, 1e-11)):
            rng = np.random.default_rng(2)
            x = [jnp.asarray(rng.standard_normal((2, 12, n, 16)), dt) for n in (4, 2, 2)]
            cache = attnjax.KVCache.create(2, 32, 2, 16, dt)
            out1, cache = attnjax.cached_attention(x[0][:, :9], x[1][:, :9], x[2][:, :9], cache)
            out2, cache = attnjax.cached_attention(x[0][:, 9:], x[1][:, 9:], x[2][:, 9:], cache)
            got = np.concatenate([np.asarray(out1), np.asarray(out2)], axis=1)
            assert got.dtype == dt
            want, _ = _ref_grads(*x, is_causal=True)
            np.testing.assert_allclose(got, want, atol=tol, rtol=tol)
            assert np.asarray(cache.lengths).tolist() == [12, 12]


def test_x64_flax_modules_forward_and_grad():
    with jax.enable_x64(True):
        x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 40, 32)), jnp.float32)
        layer = attnjax.nnx.MultiHeadAttention(num_heads=4, in_features=32, num_kv_heads=2,
                                               decode=False, implementation="xla_chunked",
                                               chunk_size=16, rngs=nnx.Rngs(0))
        stock = nnx.MultiHeadAttention(num_heads=4, in_features=32, num_kv_heads=2,
                                       decode=False, rngs=nnx.Rngs(0))
        mask = nnx.make_causal_mask(jnp.ones((2, 40)))
        y, y_stock = layer(x, is_causal=True), stock(x, mask=mask)
        np.testing.assert_allclose(np.asarray(y), np.asarray(y_stock), atol=2e-5, rtol=2e-5)
        g = nnx.grad(lambda m: jnp.sum(m(x, is_causal=True) ** 2))(layer)
        leaves = jax.tree_util.tree_leaves(jax.block_until_ready(g))
        assert leaves and all(np.all(np.isfinite(np.asarray(t))) for t in leaves)

        lin = attnjax.linen.MultiHeadDotProductAttention(num_heads=4, qkv_features=32,
                                                         implementation="xla_chunked",
                                                         chunk_size=16)
        params = lin.init(jax.random.key(0), x)
        stock_lin = linen.MultiHeadDotProductAttention(num_heads=4, qkv_features=32)
        y = lin.apply(params, x)
        y_stock = stock_lin.apply(params, x)
        np.testing.assert_allclose(np.asarray(y), np.asarray(y_stock), atol=2e-5, rtol=2e-5)
        g = jax.grad(lambda p: jnp.sum(lin.apply(p, x) ** 2))(params)
        leaves = jax.tree_util.tree_leaves(jax.block_until_ready(g))
        assert all(np.all(np.isfinite(np.asarray(t))) for t in leaves)


@pytest.mark.xdist_group("ring")
def test_ring_bf16_one_chunk_and_x64_in_subprocess():
    """Ring attention (2 simulated devices): bf16 with 128 tokens per device, forward and
    backward; and float32/float64 under jax_enable_x64, against the float64 reference."""
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tests", "_ring_reliability.py")],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "ALL OK" in proc.stdout, proc.stdout[-3000:]


# ------------------------------------------------------------------------------------------
# 3. float64 stays float64.

@pytest.mark.parametrize("impl", ["xla", "xla_chunked"])
def test_float64_inputs_are_computed_in_float64(impl):
    with jax.enable_x64(True):
        rng = np.random.default_rng(4)
        q = rng.standard_normal((2, 40, 4, 16))
        k, v = rng.standard_normal((2, 50, 2, 16)), rng.standard_normal((2, 50, 2, 16))
        out, lse = attnjax.dot_product_attention(
            jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), is_causal=True, query_offset=10,
            implementation=impl, chunk_size=16, return_residual=True)
        assert out.dtype == jnp.float64 and lse.dtype == jnp.float64
        vis = ref.visibility_np(2, 4, 40, 50, is_causal=True, query_offset=10)
        want, want_lse, _ = ref.attention(q, k, v, vis=vis)
        # float32 internals gave 1e-7 to 3e-7 here.
        assert np.abs(np.asarray(out) - want).max() < 1e-12
        assert np.abs(np.asarray(lse) - want_lse).max() < 1e-12


# ------------------------------------------------------------------------------------------
# jax_debug_nans: no NaN anywhere, forward or backward, fully masked rows included.



# Under jit, every mask kind of one implementation is compiled as one program (the ten losses
# side by side: one compile instead of ten). By default both implementations under jit on every
# mask kind, and the chunked kernel eagerly (op by op) on the kinds that NaNs come from: fully
# masked rows and the two combinations (which hold every other mask argument). "xla" eagerly, and
# the chunked kernel eagerly on the remaining kinds, with --run-slow.
DEBUG_NAN_EAGER_DEFAULT = ("empty_rows", "combo_causal_lengths_segments_bias",
                           "combo_window_mask_softcap_offsets")


def _debug_nan_params():
    yield pytest.param("xla", True, DEBUG_NAN_MASKS, id="jit-xla")
    yield pytest.param("xla_chunked", True, DEBUG_NAN_MASKS, id="jit-xla_chunked")
    yield pytest.param("xla_chunked", False, DEBUG_NAN_EAGER_DEFAULT, id="eager-xla_chunked")
    rest = tuple(m for m in DEBUG_NAN_MASKS if m not in DEBUG_NAN_EAGER_DEFAULT)
    yield pytest.param("xla_chunked", False, rest, id="eager-xla_chunked-rest",
                       marks=pytest.mark.slow)
    yield pytest.param("xla", False, DEBUG_NAN_MASKS, id="eager-xla", marks=pytest.mark.slow)


@pytest.mark.parametrize("impl,jit,mask_kinds", list(_debug_nan_params()))
def test_debug_nans_every_mask_kind(impl, jit, mask_kinds):
    problems = []
    for mask in mask_kinds:
        cfg = Config(impl, "f32", "uneven8x12", mask, "jit", 11, 19, 4, 2, 8, 8)
        data = _problem(cfg)
        lib = dict(data["lib"], implementation=impl, chunk_size=(8, 12))
        xs = [jnp.asarray(data[n], jnp.float32) for n in ("q", "k", "v")]
        bias = None if data["bias"] is None else jnp.asarray(data["bias"], jnp.float32)

        def loss(q, k, v, bias, lib=lib):
            out, lse = attnjax.dot_product_attention(q, k, v, bias, return_residual=True, **lib)
            return jnp.sum(out * out) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))

        fn = jax.value_and_grad(loss, (0, 1, 2) if bias is None else (0, 1, 2, 3))
        problems.append((mask, fn, (*xs, bias)))

    with jax.debug_nans(True):
        if jit:  # one program for every mask kind
            results = _batching.jit_together([fn for _, fn, _ in problems],
                                             [a for _, _, a in problems])
        else:
            results = [fn(*a) for _, fn, a in problems]
        results = jax.block_until_ready(results)
    for (mask, _, _), (val, grads) in zip(problems, results, strict=True):
        assert np.isfinite(float(val)), mask
        assert all(np.all(np.isfinite(np.asarray(g))) for g in grads), mask


# ------------------------------------------------------------------------------------------
# Transformations.

# "xla" under vmap runs by default in tests/test_api.py::test_vmap_matches_batched_call; here
# (masks and gradients under vmap) the chunked kernel by default, "xla" with --run-slow.
@pytest.mark.parametrize("impl", [pytest.param("xla", marks=pytest.mark.slow), "xla_chunked"])
def test_vmap_extra_batch_axis_with_masks(impl):
    rng = np.random.default_rng(5)
    q = jnp.asarray(rng.standard_normal((3, 2, 20, 4, 16)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((3, 2, 26, 2, 16)), jnp.float32) for _ in range(2))
    kl = jnp.asarray([[26, 11], [5, 26], [0, 26]], jnp.int32)
    f = lambda q, k, v, kl: attnjax.dot_product_attention(
        q, k, v, is_causal=True, query_offset=6, key_value_seq_lengths=kl, implementation=impl,
        chunk_size=8)
    got = jax.block_until_ready(jax.vmap(f)(q, k, v, kl))
    g = jax.block_until_ready(jax.vmap(jax.grad(lambda *a: f(*a).sum(), (0, 1, 2)))(q, k, v, kl))
    for i in range(3):
        want, wg = _ref_grads(q[i], k[i], v[i], is_causal=True, query_offset=6,
                              kv_lengths=np.asarray(kl[i]))
        np.testing.assert_allclose(np.asarray(got[i]), want, atol=2e-5, rtol=2e-5)
        for x, w in zip(g, wg[:3], strict=True):
            np.testing.assert_allclose(np.asarray(x[i]), w, atol=4e-5, rtol=4e-5)


@pytest.mark.parametrize("impl", ["xla", "xla_chunked"])
def test_checkpoint_and_donated_inputs(impl):
    rng = np.random.default_rng(6)
    q = jnp.asarray(rng.standard_normal((2, 30, 4, 16)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((2, 30, 2, 16)), jnp.float32) for _ in range(2))
    _, want = _ref_grads(q, k, v, is_causal=True)

    @jax.checkpoint
    def f(q, k, v):
        return attnjax.dot_product_attention(q, k, v, is_causal=True, implementation=impl,
                                             chunk_size=8)

    step = jax.jit(jax.grad(lambda q, k, v: f(q, k, v).sum(), (0, 1, 2)), donate_argnums=(0, 1, 2))
    g = jax.block_until_ready(step(jnp.array(q), jnp.array(k), jnp.array(v)))
    for x, w in zip(g, want[:3], strict=True):
        np.testing.assert_allclose(np.asarray(x), w, atol=4e-5, rtol=4e-5)


def test_forward_mode_of_chunked_names_the_implementation_that_supports_it():
    q = jnp.ones((1, 8, 2, 4))
    f = lambda x: attnjax.dot_product_attention(x, x, x, implementation="xla_chunked")
    for transform in (lambda: jax.jvp(f, (q,), (q,)), lambda: jax.jacfwd(f)(q),
                      lambda: jax.jit(lambda a: jax.jvp(f, (a,), (a,)))(q)):
        with pytest.raises(TypeError, match=r"implementation='xla_chunked'.*implementation='xla'"):
            transform()
    # ... and "xla" does serve it, against a central difference.
    g = lambda x: attnjax.dot_product_attention(x, x, x, implementation="xla")
    x = jnp.asarray(np.random.default_rng(7).standard_normal((1, 8, 2, 4)), jnp.float32)
    t = jnp.asarray(np.random.default_rng(8).standard_normal(x.shape), jnp.float32)
    _, tangent = jax.block_until_ready(jax.jvp(g, (x,), (t,)))
    fd = (g(x + 1e-3 * t) - g(x - 1e-3 * t)) / 2e-3
    np.testing.assert_allclose(np.asarray(tangent), np.asarray(fd), atol=2e-3, rtol=2e-3)


def test_forward_mode_with_default_dispatch_at_any_size():
    """implementation=None under jax.jvp takes "xla" even above the size where it would take
    "xla_chunked" (which has no forward mode), as jax.nn serves jax.jvp at any size; also with
    jax.vmap inside jax.jvp. Against a central difference of the float64 reference."""
    rng = np.random.default_rng(11)
    q, k, v, t = (rng.standard_normal((1, 2050, 1, 8)) for _ in range(4))  # B·N·T·S > 2**22
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    assert attnjax.explain_dispatch(f32(q), f32(k), f32(v)).chosen == "xla_chunked"
    f = lambda x: ref.attention(x, k, v)[0]
    want = (f(q + 1e-5 * t) - f(q - 1e-5 * t)) / 2e-5
    g = lambda x: attnjax.dot_product_attention(x, f32(k), f32(v))
    _, tangent = jax.jit(lambda a, b: jax.jvp(g, (a,), (b,)))(f32(q), f32(t))
    np.testing.assert_allclose(np.asarray(tangent), want, atol=1e-4, rtol=1e-4)
    g1 = jax.vmap(lambda x: attnjax.dot_product_attention(x, f32(k[0]), f32(v[0])))
    _, tangent = jax.jvp(g1, (f32(q),), (f32(t),))
    np.testing.assert_allclose(np.asarray(tangent), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("impl", ["xla", "xla_chunked"])
def test_traced_logits_soft_cap_under_jit_and_its_gradient(impl):
    rng = np.random.default_rng(9)
    q = jnp.asarray(rng.standard_normal((2, 20, 4, 16)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((2, 24, 2, 16)), jnp.float32) for _ in range(2))

    def f(cap):
        out = attnjax.dot_product_attention(q, k, v, is_causal=True, logits_soft_cap=cap,
                                            implementation=impl, chunk_size=8)
        return jnp.sum(jnp.sin(out))

    val, dcap = jax.block_until_ready(jax.jit(jax.value_and_grad(f))(jnp.float32(1.5)))
    vis = ref.visibility_np(2, 4, 20, 24, is_causal=True)
    q64, k64, v64 = (np.asarray(x, np.float64) for x in (q, k, v))
    want = ref.attention(q64, k64, v64, vis=vis, softcap=1.5)[0]
    np.testing.assert_allclose(float(val), np.sum(np.sin(want)), rtol=1e-5)
    eps = 1e-4
    fd = (np.sum(np.sin(ref.attention(q64, k64, v64, vis=vis, softcap=1.5 + eps)[0]))
          - np.sum(np.sin(ref.attention(q64, k64, v64, vis=vis, softcap=1.5 - eps)[0]))) / (2 * eps)
    np.testing.assert_allclose(float(dcap), fd, rtol=1e-3, atol=1e-4)
