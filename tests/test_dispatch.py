"""The registry: eligibility answers, implementation=None's choice, explain_dispatch, and the
cuDNN translation (exactly the arguments attnjax hands to cuDNN, run through jax.nn's XLA path)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax
from attnjax._src import impl_cudnn, registry
from tests import test_attention as ta


def _features(**kw):
    base = dict(platform="cuda", tpu_interpret=False, dtype="bfloat16", batch=2, q_len=1024,
                kv_len=1024, num_heads=8, num_kv_heads=2, head_dim=128, value_head_dim=128)
    return registry.CallFeatures(**{**base, **kw})


# (features, cuDNN eligible?, words of the reason)
CUDNN_TABLE = [
    (dict(), True, ""),
    (dict(is_causal=True), True, ""),
    (dict(is_causal=True, q_len=16, kv_len=1024), True, ""),  # top-left, as jax.nn
    (dict(window=(64, 0)), True, ""),
    (dict(window=(64, 8), is_causal=True), True, ""),
    (dict(q_lengths=True, kv_lengths=True, is_causal=True), True, ""),
    (dict(mask=True, bias=True), True, ""),
    (dict(dtype="float16", head_dim=64, value_head_dim=64), True, ""),
    (dict(dtype="float32"), False, "dtype float32"),
    (dict(platform="cpu"), False, "runs on cuda"),
    (dict(platform="tpu"), False, "runs on cuda"),
    (dict(window=(64, 8)), False, "right window"),
    (dict(is_causal=True, offset="static", static_offset=8), False, "query_offset=8"),
    (dict(offset="static", static_offset=8), True, ""),  # no causal/window: offset unused
    (dict(is_causal=True, offset="array"), False, "per-row"),
    (dict(segments=True), False, "segment ids"),
    (dict(soft_cap=True), False, "soft cap"),
    (dict(dropout=True), False, "dropout"),
    (dict(return_residual=True), False, "return_residual"),
    (dict(value_head_dim=64), False, "Hv=64"),
    (dict(head_dim=100, value_head_dim=100), False, "head dim"),
    (dict(head_dim=512, value_head_dim=512), False, "head dim"),
    (dict(bias=True, q_len=1023), False, "odd T"),
    (dict(precision=True), False, "precision"),
    (dict(sinks=True), False, "sinks"),  # applied through the lse, which cuDNN does not return
]


@pytest.mark.parametrize("kw,ok,words", CUDNN_TABLE)
def test_cudnn_eligibility_table(kw, ok, words):
    reason = registry.implementations()["cudnn"].unsupported(_features(**kw), auto=True)
    assert (reason is None) == ok, reason
    if not ok:
        assert words in reason


@pytest.mark.parametrize("platform,kw,chosen", [
    ("cuda", dict(is_causal=True), "cudnn"),
    ("cuda", dict(is_causal=True, dtype="float32"), "pallas_gpu"),
    ("cuda", dict(is_causal=True, segments=True), "pallas_gpu"),
    ("cuda", dict(dtype="float64", q_len=16, kv_len=16), "xla"),
    ("cuda", dict(dtype="float64"), "xla_chunked"),
    ("cuda", dict(soft_cap=True, soft_cap_traced=True), "xla_chunked"),
    ("tpu", dict(is_causal=True, segments=True), "splash"),
    ("tpu", dict(bias=True), "xla_chunked"),
    ("cpu", dict(), "xla_chunked"),
    ("cpu", dict(q_len=16, kv_len=16), "xla"),
    ("rocm", dict(is_causal=True), "pallas_gpu"),
    ("cpu", dict(pallas_interpret=True), "xla_chunked"),
    ("cuda", dict(is_causal=True, sinks=True), "pallas_gpu"),
    ("cpu", dict(forward_mode=True), "xla"),  # jax.jvp: the one that JAX differentiates, any size
    ("cuda", dict(is_causal=True, forward_mode=True), "xla"),
])
def test_auto_order_per_platform(platform, kw, chosen):
    assert registry.select(_features(platform=platform, **kw), None).name == chosen


def test_call_features_record_sinks_and_forward_mode(monkeypatch):
    """dot_product_attention sets the features dispatch decides on: sinks (cuDNN passed over on
    CUDA) and forward-mode differentiation (seen by the real call, under jax.jvp)."""
    q = jnp.zeros((1, 16, 4, 64), jnp.bfloat16)
    with attnjax.target_platform("cuda"):
        assert attnjax.explain_dispatch(q, q, q, is_causal=True).chosen == "cudnn"
        report = attnjax.explain_dispatch(q, q, q, is_causal=True, sinks=jnp.zeros(4))
        assert report.chosen == "pallas_gpu" and report.features.sinks
    seen = []
    select = registry.select

    def spy(f, implementation):
        seen.append(f.forward_mode)
        return select(f, implementation)

    monkeypatch.setattr(registry, "select", spy)
    x = jnp.ones((1, 8, 2, 4))
    f = lambda x: attnjax.dot_product_attention(x, x, x)
    jax.block_until_ready(jax.jvp(f, (x,), (x,)))
    jax.block_until_ready(f(x))
    assert seen == [True, False]


def test_auto_on_cpu_is_unchanged():
    """implementation=None on CPU: "xla" while B·N·T·S <= 2**22, else "xla_chunked"."""
    small = jnp.zeros((1, 512, 8, 16), jnp.float32)  # 1·8·512·512 = 2**21
    big = jnp.zeros((1, 1024, 8, 16), jnp.float32)  # 2**23
    assert attnjax.explain_dispatch(small, small, small).chosen == "xla"
    assert attnjax.explain_dispatch(big, big, big).chosen == "xla_chunked"
    report = attnjax.explain_dispatch(big, big, big, is_causal=True)
    rows = {n: (ok, why) for n, ok, why in report.rows}
    assert rows["xla"] == (False, rows["xla"][1]) and "2**22" in rows["xla"][1]
    assert not rows["cudnn"][0] and not rows["splash"][0]
    text = str(report)
    assert "chosen: xla_chunked" in text and "cudnn" in text and "splash" in text


def test_named_implementation_raises_with_reason_and_never_falls_back():
    q = jnp.zeros((1, 64, 2, 16), jnp.float32)
    with pytest.raises(ValueError, match="cudnn.*runs on cuda"):
        attnjax.dot_product_attention(q, q, q, implementation="cudnn")
    with pytest.raises(ValueError, match="implementation must be one of"):
        attnjax.dot_product_attention(q, q, q, implementation="flash")
    report = attnjax.explain_dispatch(q, q, q, implementation="cudnn")
    assert "would raise" in report.chosen


def test_explain_does_not_compute():
    q = jax.ShapeDtypeStruct((4, 32768, 16, 128), jnp.bfloat16)
    with attnjax.target_platform("cuda"):
        report = attnjax.explain_dispatch(q, q, q, is_causal=True)
    assert report.chosen == "cudnn"
    with attnjax.target_platform("cuda"):
        report = attnjax.explain_dispatch(q, q, q, is_causal=True, query_offset=5)
    assert report.chosen == "pallas_gpu"  # cuDNN cannot express the offset; our kernel can
    assert "top-left" in dict((n, w) for n, _, w in report.rows)["cudnn"]


def test_ring_refuses_other_implementations():
    from attnjax._src.ring import _check_ring_implementation

    _check_ring_implementation(None)
    _check_ring_implementation("xla_chunked")
    with pytest.raises(ValueError, match="ring attention"):
        _check_ring_implementation("splash")


# ------------------------------------------------------------------------------------------
# The cuDNN translation, run through jax.nn's XLA path on CPU.

CUDNN_CASES = [
    ta.Case("plain", T=36, S=44),
    ta.Case("causal_T_ne_S", T=20, S=44, is_causal=True),
    ta.Case("causal_T_gt_S", T=44, S=20, is_causal=True),
    ta.Case("window_left", T=36, S=44, window=(7, 0)),
    ta.Case("window_causal", T=36, S=36, window=(7, 3), is_causal=True),
    ta.Case("lengths_causal", T=36, S=44, q_lengths=True, kv_lengths=True, is_causal=True),
    ta.Case("kv_lengths_window", T=36, S=44, kv_lengths=True, window=(5, 0)),
    ta.Case("mask_full", T=36, S=44, mask="full"),
    ta.Case("mask_broadcast", T=36, S=44, mask="ts", is_causal=True),
    ta.Case("bias_full", T=36, S=44, bias="full"),
    ta.Case("bias_broadcast_mqa", T=36, S=44, bias="bcast", K=1),
    ta.Case("scale_mha", T=36, S=44, K=4, scale=0.37),
    ta.Case("empty_rows", T=36, S=44, kv_lengths=True, mask="full", empty_rows=True),
]


@pytest.fixture
def cudnn_as_xla(monkeypatch):
    """Exactly the translated arguments, through jax.nn's XLA path. Its f16/bf16 matmul presets
    (F16_F16_F32) do not compile on XLA:CPU, so q/k/v/bias go in as float32 and the result is
    cast back: the translation (masks, window, lengths, scale) does not depend on the dtype."""

    def xla(query, key, value, *, bias, **kw):
        up = lambda x: None if x is None else x.astype(jnp.float32)
        out = jax.nn.dot_product_attention(up(query), up(key), up(value), bias=up(bias),
                                           implementation="xla", **kw)
        return out.astype(query.dtype)

    monkeypatch.setattr(impl_cudnn, "JAX_NN_CALL", xla)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("case", CUDNN_CASES, ids=lambda c: c.name)
def test_cudnn_translation_matches_reference(case, dtype, cudnn_as_xla):
    if dtype == jnp.bfloat16 and case.name != "empty_rows":
        pytest.skip("bf16: a sample of the cases")
    data = ta._build(case, dtype)
    lib = {**data["lib"], "implementation": "cudnn"}
    arrays = [jnp.asarray(data[n], dtype) for n in ("q", "k", "v")]
    has_bias = data["bias"] is not None
    if has_bias:
        arrays.append(jnp.asarray(data["bias"], dtype))

    def f(*xs):
        return attnjax.dot_product_attention(*xs[:3], xs[3] if has_bias else None, **lib)

    @jax.jit
    def fwd_bwd(xs, dout):
        with attnjax.target_platform("cuda"):
            out, vjp = jax.vjp(f, *xs)
        return out, vjp(dout)

    with attnjax.target_platform("cuda"):
        assert attnjax.explain_dispatch(*arrays[:3], arrays[3] if has_bias else None,
                                        **data["lib"]).chosen == "cudnn"
    out, grads = fwd_bwd(arrays, jnp.asarray(data["dout"], dtype))
    to_np = lambda x: np.asarray(jnp.asarray(x, jnp.float32), np.float64)
    out, grads = to_np(out), [to_np(g) for g in grads]
    ftol, gtol = ta.TOLERANCES[dtype]
    assert np.all(np.isfinite(out)) and all(np.all(np.isfinite(g)) for g in grads)
    np.testing.assert_allclose(out, data["want_out"], atol=ftol, rtol=ftol)
    for name, g, w in zip(("dq", "dk", "dv", "dbias"), grads, data["want_grads"], strict=False):
        tol = gtol * max(1.0, float(np.abs(w).max()) / 10)
        np.testing.assert_allclose(g, w, atol=tol, rtol=tol, err_msg=name)
    if case.empty_rows:
        empty = np.transpose(~data["vis"].any(axis=-1), (0, 2, 1))
        assert empty.any() and np.all(out[empty] == 0.0) and np.all(grads[0][empty] == 0.0)


def test_cudnn_translate_arguments():
    """The window handed to jax.nn is (left, 0): jax.nn turns it into cuDNN's left + 1."""
    q = jnp.zeros((1, 36, 2, 16), jnp.bfloat16)
    seen = {}

    def spy(*args, **kw):
        seen.update(kw)
        return args[0]

    call_kw = dict(local_window_size=(7, 3), is_causal=True,
                   key_value_seq_lengths=np.array([30], np.int32))
    orig = jax.nn.dot_product_attention
    try:
        jax.nn.dot_product_attention = spy
        # disable_jit: an eager call runs under attnjax's internal jit, where the spy would see
        # tracers (and, on a cache hit, not be called at all).
        with attnjax.target_platform("cuda"), jax.disable_jit():
            attnjax.dot_product_attention(q, q, q, implementation="cudnn", **call_kw)
    finally:
        jax.nn.dot_product_attention = orig
    assert seen["local_window_size"] == (7, 0) and seen["is_causal"] is True
    assert seen["implementation"] == "cudnn" and seen["query_seq_lengths"] is None
    np.testing.assert_array_equal(seen["key_value_seq_lengths"], [30])
    assert dataclasses.is_dataclass(registry.CallFeatures)
