"""``implementation="splash"`` in Pallas TPU interpret mode on CPU, against the float64 reference.

Every mask kind splash claims (causal, window, static query_offset, lengths, segment ids, soft
cap, GQA/MQA), T != S, lengths that are not multiples of its 128 block, fully masked rows, float32
and bfloat16, forward and backward (and the gradient through the returned log-sum-exp).
Interpreted kernels compile slowly (~10 s per configuration): the default set is small; the
wider grid runs with ``pytest --full-grid``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

import attnjax
from tests import test_attention as ta

SPLASH = dict(implementation="splash")

# Shapes kept tiny: T, S in {128, 200, 256}, H = 64.
BASE = dict(B=2, T=200, S=256, N=4, K=2, H=64)
CASES = [
    ta.Case("causal_offset_gqa_kv_lengths_empty", **BASE, is_causal=True, query_offset=40,
            kv_lengths=True, empty_rows=True),
    ta.Case("window_segments_q_lengths", **{**BASE, "S": 200, "B": 1}, window=(30, 10),
            segments=True, q_lengths=True),
    ta.Case("softcap_mqa_scale", **{**BASE, "T": 128, "K": 1}, softcap=2.0, scale=0.37),
    ta.Case("window_causal_negative_offset", **{**BASE, "T": 256, "S": 128}, window=(50, 5),
            is_causal=True, query_offset=-20),
    ta.Case("plain_mha_value_dim", **{**BASE, "K": 4, "T": 128, "S": 128}, Hv=32),
    ta.Case("causal_lengths_segments", **BASE, is_causal=True, q_lengths=True, kv_lengths=True,
            segments=True),
]
DEFAULT = {
    ("causal_offset_gqa_kv_lengths_empty", "float32"),
    ("window_segments_q_lengths", "bfloat16"),
    # ("softcap_mqa_scale", "float32"): by default under attnjax.pallas_interpret() instead
    # (test_attnjax_pallas_interpret_switches_splash).
}


# The wide grid (~10-20 s per case in interpret mode) runs with `pytest --full-grid`.
FULL = pytest.mark.full_grid


def _params():
    for case in CASES:
        for dtype in (jnp.float32, jnp.bfloat16):
            marks = () if (case.name, jnp.dtype(dtype).name) in DEFAULT else (pytest.mark.slow, FULL)
            yield pytest.param(case, dtype, id=f"{case.name}-{jnp.dtype(dtype).name}", marks=marks)


ta.IMPLEMENTATIONS.setdefault("splash", SPLASH)  # the shared table's runner, by name


@pytest.mark.parametrize("case,dtype", list(_params()))
def test_splash_matches_reference(case, dtype):
    with pltpu.force_tpu_interpret_mode():
        data, out, grads = ta._check(case, "splash", dtype)
    if case.empty_rows:
        empty = np.transpose(~data["vis"].any(axis=-1), (0, 2, 1))
        assert empty.any()
        assert np.all(out[empty] == 0.0) and np.all(grads[0][empty] == 0.0)


def test_splash_lse_gradient_matches_xla():
    """The returned log-sum-exp is differentiable (splash's own VJP drops its cotangent)."""
    rng = np.random.default_rng(3)
    B, T, S, N, K, H = 1, 128, 128, 2, 1, 64
    q = jnp.asarray(rng.standard_normal((B, T, N, H)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((B, S, K, H)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((B, S, K, H)), jnp.float32)
    g = jnp.asarray(rng.standard_normal((B, T, N)), jnp.float32)
    kw = dict(is_causal=True, query_offset=30, local_window_size=(40, 0))

    def loss(impl, q, k, v):
        out, lse = attnjax.dot_product_attention(q, k, v, implementation=impl,
                                                 return_residual=True, **kw)
        return jnp.sum(out * out) + jnp.sum(jnp.where(jnp.isfinite(lse), lse * g, 0.0))

    want = jax.jit(jax.grad(lambda *a: loss("xla", *a), argnums=(0, 1, 2)))(q, k, v)
    with pltpu.force_tpu_interpret_mode():
        got = jax.jit(jax.grad(lambda *a: loss("splash", *a), argnums=(0, 1, 2)))(q, k, v)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=5e-5, rtol=5e-5)


@pytest.mark.parametrize("kw,reason", [
    (dict(bias=True), "bias"),
    (dict(mask=True), "mask"),
    (dict(dropout_rate=0.1), "dropout"),
    (dict(query_offset=np.array([0, 3], np.int32)), "query_offset"),
    (dict(precision=jax.lax.Precision.HIGHEST), "precision"),
])
def test_splash_refuses_what_it_cannot_express(kw, reason):
    q = k = v = jnp.zeros((2, 128, 2, 64), jnp.float32)
    kw = dict(kw)
    if kw.pop("bias", False):
        kw["bias"] = jnp.zeros((128, 128))
    if kw.pop("mask", False):
        kw["mask"] = jnp.ones((128, 128), bool)
    if "dropout_rate" in kw:
        kw["dropout_rng"] = jax.random.key(0)
    with pltpu.force_tpu_interpret_mode():
        with pytest.raises(ValueError, match=reason):
            attnjax.dot_product_attention(q, k, v, implementation="splash", **kw)
        report = attnjax.explain_dispatch(q, k, v, **kw)
    assert dict((n, ok) for n, ok, _ in report.rows)["splash"] is False


def test_splash_outside_interpret_mode_on_cpu_raises():
    q = k = v = jnp.zeros((1, 128, 1, 64), jnp.float32)
    with pytest.raises(ValueError, match=r"attnjax\.pallas_interpret\(\)"):
        attnjax.dot_product_attention(q, k, v, implementation="splash")
    with attnjax.pallas_interpret(), attnjax.pallas_interpret(False), pytest.raises(
            ValueError, match="force_tpu_interpret_mode"):
        attnjax.dot_product_attention(q, k, v, implementation="splash")


def test_attnjax_pallas_interpret_switches_splash():
    """``attnjax.pallas_interpret()`` alone (no jax TPU context) interprets splash, forward and
    backward (the backward kernels are traced after the forward's context has closed)."""
    case = next(c for c in CASES if c.name == "softcap_mqa_scale")
    with attnjax.pallas_interpret():
        ta._check(case, "splash", jnp.float32)


def test_float16_is_not_claimed():
    q = k = v = jnp.zeros((1, 128, 1, 64), jnp.float16)
    with pltpu.force_tpu_interpret_mode(), pytest.raises(ValueError, match="float16"):
        attnjax.dot_product_attention(q, k, v, implementation="splash")


def test_cases_are_distinct():
    assert len({c.name for c in CASES}) == len(CASES)
    assert all(dataclasses.replace(c).T in (128, 200, 256) for c in CASES)
