"""Property tests: random shapes, chunk sizes and masks; the chunked path equals the reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnjax
from tests import reference as ref


@st.composite
def problems(draw):
    B = draw(st.integers(1, 2))
    K = draw(st.sampled_from([1, 2]))
    G = draw(st.sampled_from([1, 2]))
    T = draw(st.integers(1, 33))
    S = draw(st.integers(1, 33))
    H = draw(st.sampled_from([4, 8, 12]))
    cq = draw(st.integers(1, 40))
    ck = draw(st.integers(1, 40))
    kw, vis = {}, {}
    if draw(st.booleans()):
        kw["is_causal"] = vis["is_causal"] = True
    if draw(st.booleans()):
        w = (draw(st.integers(0, 10)), draw(st.integers(0, 10)))
        kw["local_window_size"] = vis["window"] = w
    if draw(st.booleans()):
        off = draw(st.integers(-5, 20))
        kw["query_offset"] = vis["query_offset"] = off
    if draw(st.booleans()):
        kl = np.array([draw(st.integers(0, S)) for _ in range(B)], np.int32)
        kw["key_value_seq_lengths"] = vis["kv_lengths"] = kl
    if draw(st.booleans()):
        ql = np.array([draw(st.integers(0, T)) for _ in range(B)], np.int32)
        kw["query_seq_lengths"] = vis["q_lengths"] = ql
    seed = draw(st.integers(0, 2**16))
    if draw(st.booleans()):
        r = np.random.default_rng(seed + 1)
        qs = np.sort(r.integers(0, 3, (B, T)), axis=1).astype(np.int32)
        ks = np.sort(r.integers(0, 3, (B, S)), axis=1).astype(np.int32)
        kw["query_segment_ids"], kw["key_value_segment_ids"] = qs, ks
        vis["q_segments"], vis["kv_segments"] = qs, ks
    if draw(st.booleans()):
        m = np.random.default_rng(seed + 2).random((1, K * G, T, S)) < 0.8
        kw["mask"] = vis["mask"] = m
    return (B, T, S, K * G, K, H), (cq, ck), kw, vis, seed


# Each example compiles a forward and backward pass (seconds on 2 cores): 5 examples by default,
# 40 with --run-slow (tests/conftest.py picks the hypothesis profile).
@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_chunked_equals_reference(problem):
    (B, T, S, N, K, H), chunk, kw, vis_kw, seed = problem
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, T, N, H)).astype(np.float32)
    k = rng.standard_normal((B, S, K, H)).astype(np.float32)
    v = rng.standard_normal((B, S, K, H)).astype(np.float32)
    dout = rng.standard_normal((B, T, N, H)).astype(np.float32)
    vis = ref.visibility(B, N, T, S, **vis_kw)
    want, _, cache = ref.attention(q, k, v, vis=vis)
    want_grads = ref.attention_vjp(cache, dout)[:3]

    f = lambda q, k, v: attnjax.dot_product_attention(
        q, k, v, implementation="xla_chunked", chunk_size=chunk, **kw
    )
    out, vjp = jax.vjp(f, jnp.asarray(q), jnp.asarray(k), jnp.asarray(v))
    grads = vjp(jnp.asarray(dout))
    np.testing.assert_allclose(np.asarray(out), want, atol=2e-5, rtol=2e-5)
    for g, w in zip(grads, want_grads, strict=True):
        np.testing.assert_allclose(np.asarray(g), w, atol=5e-5, rtol=5e-5)
