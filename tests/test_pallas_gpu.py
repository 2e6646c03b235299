"""``implementation="pallas_gpu"`` on a machine without a GPU.

* The shared case table of ``tests/test_attention.py`` (same inputs, same float64 reference, same
  tolerances) runs the Pallas kernels in Pallas interpret mode (``attnjax.pallas_interpret()``),
  forward and backward, with 16 × 16 blocks so that every case spans several blocks, partial last
  blocks and skipped blocks. Interpret mode compiles slowly on CPU, so the default run takes a
  subset of the table chosen to cover every mask kind, GQA/MQA, Hv != H, an odd head dim, bias
  gradients with broadcasting and fully masked rows; the whole table runs under ``-m slow``.
* Lowering: ``jax.export`` for CUDA of the forward and of the gradient, per head dim and dtype,
  proves the kernels lower to Triton on this CPU-only machine (Triton's own compilation to PTX
  happens inside XLA on a GPU and is NOT checked here).
* Memory: the compile-time temporary memory of the interpret-mode kernel grows linearly in T.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax
from attnjax._src import dropout as dropout_lib
from attnjax._src import pallas_gpu
from attnjax._src.masks import MaskInfo, to_grouped
from tests import test_attention as ta

PALLAS = dict(implementation="pallas_gpu", chunk_size=16)
# XLA:CPU compiles the interpreted kernels much faster without its backend optimisations; the
# values computed are the same.
_FAST_COMPILE = {"xla_backend_optimization_level": 0}

DEFAULT_F32 = ["combined", "mqa", "value_head_dim", "head_dim_odd"]
DEFAULT_LOW = [("combined", jnp.bfloat16)]
CASE = {c.name: c for c in ta.CASES}


def _run(case: ta.Case, dtype, data, impl_kw=PALLAS, interpret: bool = True):
    """``tests.test_attention._run`` (forward + VJP under one jit), interpreted unless
    ``interpret=False`` (compiled Triton kernels, on a GPU)."""

    def call(fn, *args):
        if not interpret:
            return jax.jit(fn)(*args)
        with attnjax.pallas_interpret():
            return jax.jit(fn, compiler_options=_FAST_COMPILE)(*args)

    return ta._run(case, impl_kw, dtype, data, call=call)


def _check(case: ta.Case, dtype, impl_kw=PALLAS, interpret: bool = True):
    """The assertions of ``tests.test_attention._check``, for the interpreted kernel."""
    data = ta._build(case, dtype)
    out, lse, grads = _run(case, dtype, data, impl_kw, interpret)
    ta.compare_to_reference(data, out, lse, grads, dtype)
    return data, out, lse, grads


# ------------------------------------------------------------------------------------------------
# The shared table, interpreted.


@pytest.mark.parametrize("name", DEFAULT_F32)
def test_table_subset_float32(name):
    _check(CASE[name], jnp.float32)


@pytest.mark.parametrize("name,dtype", DEFAULT_LOW, ids=lambda x: getattr(x, "__name__", x))
def test_table_subset_low_precision(name, dtype):
    _check(CASE[name], dtype)


def test_table_subset_under_x64():
    """Index arithmetic stays int32 with jax_enable_x64 on (float32 inputs; the dbias
    reduction over broadcast dims)."""
    with jax.enable_x64(True):
        _check(CASE["bias_broadcast"], jnp.float32)


@pytest.mark.slow
@pytest.mark.parametrize("case", [c for c in ta.CASES if c.name not in DEFAULT_F32
                                  and c.name != "empty_rows"],  # empty_rows: its own test below
                         ids=lambda c: c.name)
def test_table_full_float32(case):
    _check(case, jnp.float32)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("name", ta.LOW_PRECISION_CASES)
def test_table_full_low_precision(name, dtype):
    if (name, dtype) in DEFAULT_LOW:
        pytest.skip("in the default run")
    _check(CASE[name], dtype)


# On a GPU: the same table with the compiled Triton kernels (skipped elsewhere). This is the check
# that the kernels compile past the lowering stage and compute the right numbers on hardware:
#   python -m pytest tests/test_pallas_gpu.py -k on_gpu
_ON_GPU = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")


@_ON_GPU
@pytest.mark.parametrize("blocks", [16, None], ids=["blocks16", "default_blocks"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16],
                         ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("case", ta.CASES, ids=lambda c: c.name)
def test_table_on_gpu(case, dtype, blocks):
    if dtype != jnp.float32 and case.name not in ta.LOW_PRECISION_CASES:
        pytest.skip("low precision runs the low-precision subset, as in test_attention.py")
    _check(case, dtype, dict(implementation="pallas_gpu", chunk_size=blocks), interpret=False)


def test_fully_masked_rows_are_zero_with_zero_gradients():
    case = CASE["empty_rows"]
    data, out, lse, (dq, dk, dv, _) = _check(case, jnp.float32)
    empty = np.transpose(~data["vis"].any(axis=-1), (0, 2, 1))  # (B, T, N)
    assert empty.any() and not empty.all()
    assert np.all(out[empty] == 0.0) and np.all(np.isneginf(lse[empty]))
    assert np.all(dq[empty] == 0.0)
    assert np.abs(out[~empty]).max() > 0.1
    assert np.all(dk[0] == 0.0) and np.all(dv[0] == 0.0)  # batch row 0 sees no key at all
    assert np.abs(dk[1]).max() > 0.0


def test_dropout_matches_xla_bit_for_bit_mask():
    """The kernel regenerates the same keep-mask as the other implementations: its output and
    gradients match ``"xla"`` with the same key (a different mask would differ by O(1))."""
    case = dataclasses.replace(CASE["causal_offset_per_row"], name="dropout")
    data = ta._build(case, jnp.float32)
    drop = dict(dropout_rate=0.3, dropout_rng=jax.random.key(7))
    data["lib"] = {**data["lib"], **drop}
    out, lse, grads = _run(case, jnp.float32, data)
    want_out, want_lse, want_grads = _run(case, jnp.float32, data, dict(implementation="xla"))
    np.testing.assert_allclose(out, want_out, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(lse, want_lse, atol=1e-5, rtol=1e-5)
    for g, w in zip(grads[:3], want_grads[:3], strict=True):
        np.testing.assert_allclose(g, w, atol=3e-5, rtol=3e-5)
    # Dropout really dropped something: without it the output differs.
    data["lib"] = {k: v for k, v in data["lib"].items() if k not in drop}
    plain, _, _ = _run(case, jnp.float32, data, dict(implementation="xla"))
    assert np.abs(plain - out).max() > 0.1


def test_segment_ids_skip_blocks_of_other_documents():
    """Packed documents: key blocks that share no segment with a query block are never read.

    Values of the last key block (all of document 2) are NaN: a query block of documents 0/1
    that visited it would turn NaN (0 · NaN), even with every weight masked to zero. Those rows
    must stay finite and exact (and so must their dq, which reads V through dO·Vᵀ)."""
    rng = np.random.default_rng(4)
    T = 64
    q = jnp.asarray(rng.standard_normal((1, T, 2, 16)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((1, T, 1, 16)), jnp.float32) for _ in range(2))
    ids = np.array([[0] * 16 + [1] * 24 + [2] * 24], np.int32)
    v_nan = v.at[:, 48:].set(jnp.nan)
    kw = dict(query_segment_ids=ids, key_value_segment_ids=ids)

    def out_and_dq(impl_kw, v):
        f = lambda q: attnjax.dot_product_attention(q, k, v, **kw, **impl_kw)
        out, vjp = jax.vjp(f, q)
        return out, vjp(jnp.ones_like(out))[0]

    with attnjax.pallas_interpret():
        out, dq = jax.jit(lambda v: out_and_dq(PALLAS, v), compiler_options=_FAST_COMPILE)(v_nan)
    want_out, want_dq = jax.jit(lambda v: out_and_dq(dict(implementation="xla"), v))(v)
    rows = slice(0, 32)  # query blocks 0 and 1: documents 0 and 1 only
    for got, want in ((out, want_out), (dq, want_dq)):
        got, want = np.asarray(got)[:, rows], np.asarray(want)[:, rows]
        assert np.all(np.isfinite(got))
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    assert np.isnan(np.asarray(out)[:, 40:]).all()  # document 2 really reads the NaN values


def test_lse_cotangent_matches_xla():
    """The log-sum-exp is differentiable (its cotangent folds into delta): what sinks and
    split-K merges build on. Loss uses the output and the (finite) lse; GQA, causal, lengths."""
    rng = np.random.default_rng(5)
    q = jnp.asarray(rng.standard_normal((2, 19, 4, 16)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((2, 23, 2, 16)), jnp.float32) for _ in range(2))
    kw = dict(is_causal=True, key_value_seq_lengths=np.array([23, 0], np.int32))

    def loss(impl_kw, q, k, v):
        out, lse = attnjax.dot_product_attention(q, k, v, return_residual=True, **kw, **impl_kw)
        return jnp.sum(jnp.sin(out)) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0) ** 2)

    with attnjax.pallas_interpret():
        got = jax.jit(jax.grad(lambda *x: loss(PALLAS, *x), argnums=(0, 1, 2)),
                      compiler_options=_FAST_COMPILE)(q, k, v)
    want = jax.jit(jax.grad(lambda *x: loss(dict(implementation="xla"), *x),
                            argnums=(0, 1, 2)))(q, k, v)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=3e-5, rtol=3e-5)


def test_default_block_sizes():
    """Default (table) block sizes (chunk_size=None), a sequence shorter than one block."""
    rng = np.random.default_rng(3)
    q, k, v = (jnp.asarray(rng.standard_normal((1, 20, 2, 32)), jnp.float32) for _ in range(3))
    with attnjax.pallas_interpret():
        out = jax.jit(lambda q, k, v: attnjax.dot_product_attention(
            q, k, v, is_causal=True, implementation="pallas_gpu"),
            compiler_options=_FAST_COMPILE)(q, k, v)
    want = attnjax.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# Clear failures.


def _qkv(dtype=jnp.float32, H=32):
    x = jnp.ones((1, 16, 2, H), dtype)
    return x, x, x


def test_outside_interpret_on_cpu_raises_with_the_reason():
    if jax.default_backend() == "gpu":
        pytest.skip("a GPU is present")
    with pytest.raises(ValueError, match=r"pallas_interpret\(\)"):
        attnjax.dot_product_attention(*_qkv(), implementation="pallas_gpu")
    # pallas_interpret(False) inside an outer block restores compiled kernels.
    with attnjax.pallas_interpret(), attnjax.pallas_interpret(False):
        with pytest.raises(ValueError, match=r"runs on cuda/rocm.*pallas_interpret\(\)"):
            attnjax.dot_product_attention(*_qkv(), implementation="pallas_gpu")


def test_ineligible_calls_raise():
    with attnjax.pallas_interpret():
        with pytest.raises(ValueError, match="head dims up to 256"):
            attnjax.dot_product_attention(*_qkv(H=320), implementation="pallas_gpu")
        with pytest.raises(ValueError, match="power of two"):
            attnjax.dot_product_attention(*_qkv(), implementation="pallas_gpu", chunk_size=24)
        with pytest.raises(ValueError, match="traced"):
            jax.jit(lambda c: attnjax.dot_product_attention(
                *_qkv(), logits_soft_cap=c, implementation="pallas_gpu"))(jnp.float32(5.0))
    with pytest.raises(ValueError, match="power of two"):
        pallas_gpu.BlockSizes(block_q=48)
    with pytest.raises(TypeError, match="bool"):
        with attnjax.pallas_interpret(1):
            pass


def test_float64_is_ineligible():
    reason = pallas_gpu.unsupported_reason(np.ones((1, 4, 1, 8)), None, np.ones((1, 4, 1, 8)),
                                           interpret=True)
    assert reason is not None and "float64" in reason


# ------------------------------------------------------------------------------------------------
# Block skipping: the in-kernel ranges follow MaskInfo's rules.


def _cfg(**kw):
    base = dict(B=1, T=64, S=64, N=1, K=1, Tp=64, Sp=64, scale=1.0, softcap=None,
                dropout_rate=0.0, causal=False, window=None, has_qlen=False, kv_mask=False,
                has_seg=False, mask_shape=None, bias_shape=None, bq=16, bk=16, bq_dkv=16,
                bk_dkv=16, bq_dq=16, bk_dq=16, num_warps=4, num_stages=2, num_warps_bwd=4,
                num_stages_bwd=2, precision=None, interpret=True)
    return pallas_gpu._Cfg(**{**base, **kw})


@pytest.mark.parametrize("causal,window,bq,bk", [(True, None, 16, 32), (False, (5, 19), 32, 16),
                                                (True, (40, 40), 32, 16)])
def test_block_ranges_follow_mask_info(causal, window, bq, bk):
    """Per batch row (offset, query and key lengths drawn at random), every block's
    ``(lo, full_lo, full_hi, hi)`` equals MaskInfo's for a one-row MaskInfo."""
    nq, nk = 64 // bq, 64 // bk
    cfg = _cfg(causal=causal, window=window, has_qlen=True, kv_mask=True)

    def both(off, ql, kl):
        info = MaskInfo(q_len=64, kv_len=64, is_causal=causal, window=window, query_offset=off,
                        q_lengths=ql[None], kv_lengths=kl[None])
        qs, ks = jnp.arange(nq, dtype=jnp.int32) * bq, jnp.arange(nk, dtype=jnp.int32) * bk
        key = lambda s: (jnp.stack(info.key_block_ranges(s, bq, bk, nk)),
                         jnp.stack(pallas_gpu._key_ranges(cfg, s, bq, bk, nk, off, ql, kl)))
        qry = lambda s: (jnp.stack(info.query_block_ranges(s, bk, bq, nq)),
                         jnp.stack(pallas_gpu._query_ranges(cfg, s, bk, bq, nq, off, ql, kl)))
        return jax.vmap(key)(qs), jax.vmap(qry)(ks)

    rng = np.random.default_rng(0)
    n = 300
    off = jnp.asarray(rng.integers(-40, 70, n), jnp.int32)
    ql = jnp.asarray(rng.integers(0, 65, n), jnp.int32)
    kl = jnp.asarray(rng.integers(0, 65, n), jnp.int32)
    (kw, kg), (qw, qg) = jax.jit(jax.vmap(both))(off, ql, kl)
    np.testing.assert_array_equal(np.asarray(kg), np.asarray(kw))
    np.testing.assert_array_equal(np.asarray(qg), np.asarray(qw))
    # The draw exercises skipping (and, without a window, the fully visible fast path).
    lo, flo, fhi, hi = np.moveaxis(np.asarray(kg), -1, 0)
    assert (hi - lo < nk).any()
    assert window is not None or (fhi > flo).any()


# ------------------------------------------------------------------------------------------------
# Lowering for CUDA (Triton) on this CPU-only machine.

TRITON_TARGET = "__gpu$xla.gpu.triton"  # the custom call Pallas Triton kernels lower to (jax 0.10)


def _export_everything(H: int, dtype, grad: bool):
    """Export for CUDA a call with every mask kind, bias (broadcast), soft cap and dropout."""
    B, T, S, N, K = 2, 100, 130, 4, 2

    def f(q, k, v, bias, mask, off, ql, kl, qs, ks):
        info = MaskInfo(q_len=T, kv_len=S, is_causal=True, window=(50, 3), query_offset=off,
                        q_lengths=ql, kv_lengths=kl, q_segment_ids=qs, kv_segment_ids=ks,
                        mask=to_grouped(mask, K, T, S, False))
        out, lse = pallas_gpu.attention_pallas_gpu(
            q, k, v, to_grouped(bias, K, T, S, 0), info, scale=0.1, logits_soft_cap=20.0,
            dropout_rate=0.1, seed=dropout_lib.seed_from_key(jax.random.key(0)), precision=None,
            interpret=False)
        return jnp.sum(out.astype(jnp.float32)) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0))

    sds = jax.ShapeDtypeStruct
    i32 = jnp.int32
    args = (sds((B, T, N, H), dtype), sds((B, S, K, H), dtype), sds((B, S, K, H), dtype),
            sds((1, N, 1, S), dtype), sds((B, 1, T, S), jnp.bool_), sds((B,), i32),
            sds((B,), i32), sds((B,), i32), sds((B, T), i32), sds((B, S), i32))
    fn = jax.grad(f, argnums=(0, 1, 2, 3)) if grad else f
    exp = jax.export.export(
        jax.jit(fn), platforms=("cuda",),
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON_TARGET)])(*args)
    return exp.mlir_module()


DTYPES = [jnp.float16, jnp.bfloat16, jnp.float32]
HEAD_DIMS = [32, 64, 128, 256]


@pytest.mark.parametrize("grad", [False, True], ids=["fwd", "grad"])
def test_lowers_for_cuda_representative(grad):
    text = _export_everything(128, jnp.bfloat16, grad)
    # forward: 1 kernel; gradient: forward + dK/dV + dQ + dbias.
    assert text.count(TRITON_TARGET) == (4 if grad else 1)


@pytest.mark.slow
@pytest.mark.parametrize("grad", [False, True], ids=["fwd", "grad"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("H", HEAD_DIMS)
def test_lowers_for_cuda(H, dtype, grad):
    text = _export_everything(H, dtype, grad)
    assert text.count(TRITON_TARGET) == (4 if grad else 1)


# ------------------------------------------------------------------------------------------------
# Memory.


def _temp_bytes(T: int, grad: bool) -> int:
    spec = jax.ShapeDtypeStruct((1, T, 2, 64), jnp.float32)
    f = lambda q, k, v: jnp.sum(attnjax.dot_product_attention(
        q, k, v, implementation="pallas_gpu", is_causal=True))
    if grad:
        f = jax.grad(f, argnums=(0, 1, 2))
    with attnjax.pallas_interpret():
        lowered = jax.jit(f).lower(spec, spec, spec)
    return lowered.compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("grad", [False, pytest.param(True, marks=pytest.mark.slow)],
                         ids=["forward", "forward+backward"])
def test_interpreted_temp_memory_grows_linearly(grad):
    small, big = _temp_bytes(1024, grad), _temp_bytes(4096, grad)
    # 4x the length: linear growth is ~4x, a T x S score matrix would be 16x.
    assert big / small < 5.0, (small, big)


# ------------------------------------------------------------------------------------------------
# Flexible attention (mask_mod / score_mod / sinks / BlockMask), interpreted, against the dense
# float64 reference of tests/test_flex.py (its cases: built-in masks from attnjax.masks, document
# masks via closed-over ids, prefix-LM, ALiBi and T5 tables with gradients to the closed-over
# arrays, sinks). Interpret mode compiles slowly: two cases by default, the rest under -m slow.

from attnjax import masks  # noqa: E402
from attnjax._src import flex  # noqa: E402
from tests import test_flex as tf  # noqa: E402

FLEX_DEFAULT = {("doc_causal", True), ("sinks_empty_rows", False)}
# The other cases (~10 s each interpreted) run with `pytest --full-grid`.
FULL = pytest.mark.full_grid
FLEX_BLOCK = (16, 16)  # block-mask blocks = kernel blocks (chunk_size must agree)


def _flex_library(case, block_mask: bool):
    def fn(q, k, v, params, sinks):
        mask_mod = None if case.mask is None else tf._mask(case.mask)
        kw = dict(implementation="pallas_gpu", chunk_size=16)
        if block_mask:
            kw["block_mask"] = attnjax.create_block_mask(
                mask_mod, tf.B, tf.N, tf.T, tf.S, block_size=FLEX_BLOCK, query_offset=case.offset)
            kw["chunk_size"] = FLEX_BLOCK
        return attnjax.dot_product_attention(
            q, k, v, mask_mod=mask_mod, score_mod=tf._score(case.score, params), sinks=sinks,
            query_offset=case.offset or None, return_residual=True, **kw)

    return fn


def _flex_grads(fn, data, argnums, interpret: bool = True):
    loss = tf._loss(fn, jnp.asarray(data["dout"]), jnp.asarray(data["dlse"]))
    args = [jnp.asarray(data[n]) for n in ("q", "k", "v")]
    args += [jax.tree.map(jnp.asarray, data["params"]),
             None if data["sinks"] is None else jnp.asarray(data["sinks"])]
    grad = jax.value_and_grad(loss, argnums=argnums, has_aux=True)
    if not interpret:  # compiled Triton kernels, on a GPU
        (_, (out, lse)), grads = jax.jit(grad)(*args)
        return out, lse, grads
    with attnjax.pallas_interpret():
        (_, (out, lse)), grads = jax.jit(grad, compiler_options=_FAST_COMPILE)(*args)
    return out, lse, grads


def _flex_params():
    for c in tf.CASES:
        for bm in (False, True):
            if bm and c.mask is None:
                continue
            marks = () if (c.name, bm) in FLEX_DEFAULT else (pytest.mark.slow, FULL)
            yield pytest.param(c, bm, id=f"{c.name}{'-block_mask' if bm else ''}", marks=marks)


@pytest.mark.parametrize(("case", "block_mask"), list(_flex_params()))
def test_flex_matches_dense_float64_reference(case, block_mask, x64):
    _check_flex(case, block_mask)


@_ON_GPU
@pytest.mark.parametrize(("case", "block_mask"), [
    pytest.param(c, bm, id=f"{c.name}{'-block_mask' if bm else ''}")
    for c in tf.CASES for bm in (False, True) if not (bm and c.mask is None)])
def test_flex_on_gpu(case, block_mask, x64):
    """The flexible-attention cases with the compiled Triton kernels (skipped without a GPU)."""
    _check_flex(case, block_mask, interpret=False)


def _check_flex(case, block_mask: bool, interpret: bool = True):
    argnums = (0, 1, 2, 3) + ((4,) if case.sinks else ())
    want = tf.reference_grads(case, argnums)
    got = _flex_grads(_flex_library(case, block_mask), tf._inputs(case, np.float32), argnums,
                      interpret)
    tf.assert_matches_reference(case, got, want)


@pytest.mark.slow
@FULL
def test_block_mask_classes_are_obeyed_like_xla_chunked():
    """A hand-made block mask whose classes disagree with its mask_mod on purpose: EMPTY blocks
    must be skipped (never read) and FULL blocks run without the mask_mod, exactly as in
    ``xla_chunked`` (forward and gradients)."""
    rng = np.random.default_rng(6)
    T = S = 64
    q = jnp.asarray(rng.standard_normal((1, T, 2, 16)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((1, S, 1, 16)), jnp.float32) for _ in range(2))
    mod = lambda b, h, qi, ki: (qi + ki) % 3 != 0  # noqa: E731
    cls = np.full((1, 1, 4, 4), flex.PARTIAL, np.int8)
    cls[0, 0, 0, 2:] = flex.EMPTY
    cls[0, 0, 3, :2] = flex.FULL
    bm = flex.block_mask_from_classes(cls, (T, S), (16, 16), mod)

    def run(impl, v):
        f = lambda q, k, v: attnjax.dot_product_attention(  # noqa: E731
            q, k, v, block_mask=bm, implementation=impl, chunk_size=16)
        out, vjp = jax.vjp(f, q, k, v)
        return out, vjp(jnp.cos(out))

    v_nan = v.at[:, 32:].set(jnp.nan)  # what query block 0 would read if it visited key blocks 2-3
    with attnjax.pallas_interpret():
        out, grads = jax.jit(lambda v: run("pallas_gpu", v), compiler_options=_FAST_COMPILE)(v)
        out_nan = jax.jit(lambda v: run("pallas_gpu", v)[0],
                          compiler_options=_FAST_COMPILE)(v_nan)
    want, want_grads = jax.jit(lambda v: run("xla_chunked", v))(v)
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), atol=1e-5, rtol=1e-5)
    for g, w in zip(grads, want_grads, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=3e-5, rtol=3e-5)
    assert np.all(np.isfinite(np.asarray(out_nan)[:, :16]))


@pytest.mark.parametrize("block,kernel,has_full", [
    pytest.param((16, 8), (32, 32), True, marks=FULL),
    ((37, 20), (16, 16), False),
    pytest.param((8, 8), (64, 16), None, marks=FULL)])
def test_kernel_block_table_regroups_block_mask_classes(block, kernel, has_full):
    """The block mask's classes regrouped for other kernel blocks: a kernel block is empty
    (full) exactly when every element it covers is (checked element by element)."""
    T, S = 75, 90
    qi, ki = np.arange(T)[:, None], np.arange(S)[None, :]
    dense = (ki >= qi - 60) & (ki <= qi + 3)  # a sliding window, element by element
    cq, ck = block
    cls = np.array([[flex.EMPTY if not blk.any() else flex.FULL if blk.all() else flex.PARTIAL
                     for blk in (dense[i:i + cq, j:j + ck] for j in range(0, S, ck))]
                    for i in range(0, T, cq)], np.int32)
    bq, bk = kernel
    Tp, Sp = -(-T // bq) * bq, -(-S // bk) * bk
    table = np.asarray(pallas_gpu._kernel_table(jnp.asarray(cls), block, bq, bk, Tp, Sp))
    # Element classes of the block mask, expanded (PARTIAL where the block is partial).
    elem = cls[np.minimum(np.arange(Tp) // cq, cls.shape[0] - 1)][
        :, np.minimum(np.arange(Sp) // ck, cls.shape[1] - 1)]
    real = (np.arange(Tp)[:, None] < T) & (np.arange(Sp)[None, :] < S)
    for i in range(Tp // bq):
        for j in range(Sp // bk):
            e = elem[i * bq:(i + 1) * bq, j * bk:(j + 1) * bk][real[i * bq:(i + 1) * bq,
                                                                    j * bk:(j + 1) * bk]]
            want = (flex.EMPTY if e.size == 0 or np.all(e == flex.EMPTY)
                    else flex.FULL if np.all(e == flex.FULL) else flex.PARTIAL)
            assert table[i, j] == want, (i, j)
    assert (table == flex.EMPTY).any() and (table == flex.PARTIAL).any()
    if has_full is not None:
        assert (table == flex.FULL).any() == has_full


def test_flex_registry_eligibility():
    """pallas_gpu serves mods it can lower (point gathers from closed-over arrays); a mod that
    gathers from a computed array is reported ineligible on CUDA with the reason (never a
    lowering failure), and runs interpreted."""
    q = jnp.zeros((1, 64, 4, 32), jnp.bfloat16)
    k = v = jnp.zeros((1, 64, 2, 32), jnp.bfloat16)
    slopes = jnp.ones(4)
    doc = jnp.zeros((1, 64), jnp.int32)
    bad = lambda s, b, h, qi, ki: s - (slopes * 2)[h] * (qi - ki)  # noqa: E731
    with attnjax.target_platform("cuda"):
        good = attnjax.explain_dispatch(q, k, v, score_mod=masks.alibi(slopes),
                                        mask_mod=masks.document(doc))
        assert good.chosen == "pallas_gpu"
        report = attnjax.explain_dispatch(q, k, v, score_mod=bad)
        assert report.chosen != "pallas_gpu"
        with pytest.raises(ValueError, match="cannot run inside the Triton kernel"):
            attnjax.dot_product_attention(q, k, v, score_mod=bad, implementation="pallas_gpu")
    with attnjax.pallas_interpret():
        assert attnjax.explain_dispatch(q, k, v, score_mod=bad,
                                        implementation="pallas_gpu").chosen == "pallas_gpu"


@pytest.mark.slow
@FULL
def test_flex_bfloat16_matches_float32_xla():
    """bfloat16 inputs with a mask_mod, an ALiBi score_mod (slope gradients) and sinks, against
    ``"xla"`` on the same values in float32 (bf16 tolerances)."""
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((1, 40, 4, 16)), jnp.bfloat16)
    k = v = jnp.asarray(rng.standard_normal((1, 40, 2, 16)), jnp.bfloat16)
    slopes = jnp.asarray([0.5, 0.25, 0.1, 0.05], jnp.float32)

    def f(impl, dtype, q, s):
        return attnjax.dot_product_attention(
            q.astype(dtype), k.astype(dtype), v.astype(dtype), mask_mod=masks.causal,
            score_mod=masks.alibi(s), sinks=jnp.zeros(4), implementation=impl,
            chunk_size=16 if impl == "pallas_gpu" else None).astype(jnp.float32)

    def both(impl, dtype):
        out = f(impl, dtype, q, slopes)
        ds = jax.grad(lambda s: jnp.sum(f(impl, dtype, q, s)))(slopes)
        return out, ds

    with attnjax.pallas_interpret():
        out, ds = jax.jit(lambda: both("pallas_gpu", jnp.bfloat16),
                          compiler_options=_FAST_COMPILE)()
    want, ds_ref = jax.jit(lambda: both("xla", jnp.float32))()
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), atol=3e-2)
    np.testing.assert_allclose(np.asarray(ds), np.asarray(ds_ref), atol=0.1, rtol=0.05)
