"""attnjax.KVCache / attnjax.cached_attention against an independent float64 NumPy reference."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax
from attnjax import KVCache, cached_attention
from attnjax._src import native

B, N, K, H = 3, 4, 2, 8
TOTAL = 24


# The pure-JAX variants run by default for these tests; the others with --run-slow. The default
# run still takes the pure-JAX path through ragged rows, multi-token steps, windows, soft caps and
# ring buffers (test_flat_and_per_head_reads_of_the_cache, its three ways of reading the cache),
# a bfloat16 cache and ring buffer (test_low_precision_cache_matches_reference[bfloat16-xla]),
# float64 (the x64 test) and the flex tests; so by default the pure-JAX variant runs only where it
# checks something of its own: realistic head dims, and its compiled memory (flat in the cache
# length, updated in place; for a float16 cache the same code as for bfloat16).
XLA_BY_DEFAULT = {
    "test_realistic_head_dims[xla-gqa4-h64]",
    "test_step_memory_is_flat_and_cache_updated_in_place[xla-None]",
    "test_step_memory_is_flat_and_cache_updated_in_place[xla-4096]",
    "test_low_precision_cache_step_is_flat_and_in_place[xla-bfloat16]",
}


# Native variants with --run-slow only: gqa2-h64-ring reads a float32 cache of head dim 64, the
# same kernel instantiation as gqa4-h64; its ring buffer and groups of 2 are read by default in
# gqa2-h64-ring-f16, gqa2-h96-bf16 and mqa-h256-ring.
NATIVE_SLOW = {"test_realistic_head_dims[native-gqa2-h64-ring]"}


@pytest.fixture(params=["native", "xla"])
def decode_path(request):
    """Each test twice: steps by the native CPU kernel (where it serves them: float32 compute,
    T <= 8, no mods), and all in XLA (a sample by default, see XLA_BY_DEFAULT). Functions are
    traced inside the fixture, so the choice applies (every test jits a fresh function)."""
    if request.param == "xla":
        if (request.node.name not in XLA_BY_DEFAULT
                and not request.config.getoption("--run-slow")):
            pytest.skip("slow: the pure-JAX variant runs with --run-slow")
        with native.disabled():
            yield "xla"
    else:
        if request.node.name in NATIVE_SLOW and not request.config.getoption("--run-slow"):
            pytest.skip("slow: runs with --run-slow")
        if not native.enabled():
            pytest.skip(f"native decode kernel unavailable: {native.status()['reason']}")
        yield "native"


@pytest.fixture
def xla_decode_path():
    with native.disabled():
        yield


def test_native_kernel_is_built_where_a_compiler_exists():
    """A host with a C++ compiler must get the native kernel: a broken build fails here rather
    than falling back to the slower path unnoticed."""
    import os
    import shutil

    if os.environ.get("ATTNJAX_NATIVE_KERNELS", "1") in ("0", "false", "no", "off"):
        pytest.skip("ATTNJAX_NATIVE_KERNELS disables the native kernel")
    if not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
        pytest.skip("no C++ compiler on this host")
    st = native.status()
    assert st["enabled"], st["reason"]


def _histories(seed=0, total=TOTAL):
    # Drawn by NumPy: jax.random.normal compiles once per shape (and again under x64).
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal((B, total, n, H)), jnp.float32)
                 for n in (N, K, K))


def _ref(q, k, v, b, p, window=None, cap=None):
    """float64 attention output of row b's query at position p over its keys 0..p (the last
    window + 1 of them with a window); q (B, S, N, H), k and v (B, S, K, H)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    N, H, G = q.shape[2], q.shape[3], q.shape[2] // k.shape[2]
    out = np.zeros((N, v.shape[3]))
    for n in range(N):
        s = k[b, : p + 1, n // G] @ q[b, p, n] / np.sqrt(H)
        if cap is not None:
            s = cap * np.tanh(s / cap)
        j = np.arange(p + 1)
        if window is not None:
            s = np.where(j >= p - window, s, -np.inf)
        w = np.exp(s - s.max())
        out[n] = (w / w.sum()) @ v[b, : p + 1, n // G]
    return out


def _run(schedule, cache, q, k, v, step, *, fused=False):
    """Feed ``schedule``: list of (T, per-row counts). Returns {(b, pos): output}.

    ``fused=True``: ``step`` is a plain (not jitted) function, and the whole schedule runs as one
    jitted program (one compile instead of one per step shape)."""
    got = {}
    pos = np.zeros(B, int)
    inputs, p = [], pos.copy()
    for T, counts in schedule:
        take = np.stack([np.minimum(p[b] + np.arange(T), TOTAL - 1) for b in range(B)])
        inputs.append(tuple(jnp.asarray(np.asarray(x)[np.arange(B)[:, None], take])
                            for x in (q, k, v)) + (jnp.asarray(counts, jnp.int32),))
        p += np.asarray(counts)
    if fused:
        def run_all(cache, inputs):
            outs = []
            for x in inputs:
                out, cache = step(*x[:3], cache, x[3])
                outs.append(out)
            return outs, cache

        outs, cache = jax.jit(run_all)(cache, inputs)
    for i, (T, counts) in enumerate(schedule):
        counts = np.asarray(counts)
        if fused:
            out = outs[i]
        else:
            out, cache = step(*inputs[i][:3], cache, inputs[i][3])
        out = np.asarray(out)
        for b in range(B):
            for t in range(T):
                if t < counts[b]:
                    got[(b, pos[b] + t)] = out[b, t]
                else:
                    assert np.all(out[b, t] == 0)  # padding rows output exact zeros
        pos += counts
    np.testing.assert_array_equal(np.asarray(cache.lengths), pos)
    return got, cache


def _check(got, q, k, v, **ref_kw):
    assert got
    for (b, p), o in got.items():
        np.testing.assert_allclose(o, _ref(q, k, v, b, p, **ref_kw), atol=3e-5, rtol=3e-5,
                                   err_msg=f"row {b} position {p}")


def _stepper(jit=True, **kw):
    def step(q, k, v, cache, n):
        return cached_attention(q, k, v, cache, query_seq_lengths=n, **kw)
    return jax.jit(step) if jit else step


@pytest.mark.parametrize("prompt,chunk", [(1, 3), (5, 3), (11, 3), (5, 1024)])
def test_prefill_then_single_steps(prompt, chunk, decode_path):
    q, k, v = _histories()
    schedule = [(prompt, [prompt] * B)] + [(1, [1] * B)] * 6
    cache = KVCache.create(B, 20, K, H)  # 20 is not a multiple of 3: overlapping last chunk
    got, _ = _run(schedule, cache, q, k, v, _stepper(chunk_size=chunk))
    _check(got, q, k, v)


def test_rows_at_different_positions_and_multi_token_steps(decode_path):
    q, k, v = _histories(1)
    schedule = [(6, [6, 2, 0]), (1, [1, 1, 1]), (4, [4, 1, 3]), (3, [0, 3, 2]), (1, [1, 1, 1])]
    got, _ = _run(schedule, KVCache.create(B, 16, K, H), q, k, v, _stepper(chunk_size=4))
    _check(got, q, k, v)


@pytest.mark.parametrize("window", [1, pytest.param(4, marks=pytest.mark.slow), 7])
def test_sliding_window_ring_buffer(window, decode_path):
    q, k, v = _histories(2)
    # prompt longer than the window, single steps that wrap around, multi-token steps shorter
    # and longer than the window, ragged rows
    schedule = [(9, [9, 3, 5]), (1, [1, 1, 1]), (1, [1, 1, 1]), (3, [3, 2, 3]),
                (8, [8, 8, 1]), (1, [1, 1, 1])]
    cache = KVCache.create(B, None, K, H, window=window)
    assert cache.key.shape[1] == window
    got, cache = _run(schedule, cache, q, k, v, _stepper(chunk_size=3))
    _check(got, q, k, v, window=window - 1)  # the last `window` positions, itself included


def test_window_on_plain_cache_and_soft_cap(decode_path):
    q, k, v = _histories(3)
    schedule = [(7, [7, 7, 7])] + [(1, [1, 1, 1])] * 5 + [(3, [3, 3, 3])]
    step = _stepper(chunk_size=2, local_window_size=(3, 0), logits_soft_cap=2.0)
    got, _ = _run(schedule, KVCache.create(B, 18, K, H), q, k, v, step)
    _check(got, q, k, v, window=3, cap=2.0)


def test_matches_full_forward_of_core_bf16_cache(decode_path):
    q, k, v = _histories(4, total=12)
    full = attnjax.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
    cache = KVCache.create(B, 12, K, H, dtype=jnp.bfloat16)
    step = jax.jit(lambda q, k, v, c: cached_attention(q, k, v, c))
    out1, cache = step(q[:, :8], k[:, :8], v[:, :8], cache)
    out2, cache = step(q[:, 8:], k[:, 8:], v[:, 8:], cache)
    assert cache.key.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(jnp.concatenate([out1, out2], 1)), np.asarray(full),
                               atol=3e-2)


def test_overflow_and_bad_input():
    q, k, v = _histories()
    cache = KVCache.create(B, 4, K, H)
    _, cache = cached_attention(q[:, :3], k[:, :3], v[:, :3], cache)
    with pytest.raises(ValueError, match="overflow"):
        cached_attention(q[:, :2], k[:, :2], v[:, :2], cache)
    with pytest.raises(ValueError, match="does not fit"):
        cached_attention(q[:, :5], k[:, :5], v[:, :5], KVCache.create(B, 4, K, H))
    # under jit the overflow cannot raise: the overflowing rows are NaN, never silently wrong
    out, _ = jax.jit(cached_attention)(q[:, :2], k[:, :2], v[:, :2], cache)
    assert np.isnan(np.asarray(out)).all()
    with pytest.raises(ValueError, match="batch mismatch"):
        cached_attention(q[:2, :1], k[:2, :1], v[:2, :1], cache)
    with pytest.raises(ValueError, match="multiple"):
        cached_attention(q[:, :1, :3], k[:, :1], v[:, :1], KVCache.create(B, 4, K, H))
    with pytest.raises(ValueError, match="key/value"):
        cached_attention(q[:, :1], k[:, :1, :1], v[:, :1, :1], KVCache.create(B, 4, K, H))
    with pytest.raises(ValueError, match="window"):
        KVCache.create(B, 4, K, H, window=0)
    with pytest.raises(ValueError, match="query_seq_lengths"):
        cached_attention(q[:, :1], k[:, :1], v[:, :1], KVCache.create(B, 4, K, H),
                         query_seq_lengths=jnp.ones((B + 1,), jnp.int32))
    for bad in (2, -1):  # a step of one token adds 0 or 1 per row
        with pytest.raises(ValueError, match=r"query_seq_lengths must be in \[0, T\] = \[0, 1\]"):
            cached_attention(q[:, :1], k[:, :1], v[:, :1], KVCache.create(B, 4, K, H),
                             query_seq_lengths=jnp.full((B,), bad, jnp.int32))


def _compiled_step(L, T, window=None, chunk=256):
    cache = KVCache.create(1, L, 8, 64, window=window)
    q = jnp.ones((1, T, 8, 64))
    k = v = jnp.ones((1, T, 8, 64))
    f = jax.jit(lambda q, k, v, c: cached_attention(q, k, v, c, chunk_size=chunk),
                donate_argnums=3)
    comp = f.lower(q, k, v, cache).compile()
    return comp, cache.key.nbytes


@pytest.mark.parametrize("window", [None, 4096])
def test_step_memory_is_flat_and_cache_updated_in_place(window, decode_path):
    temps = {}
    for L in (4096, 16384):
        for T in (1, 16):
            if window is not None and (L != 4096 or T != 1):
                continue  # ring buffer: single-token steps are in place (multi-token copy W)
            comp, cache_bytes = _compiled_step(L if window is None else None, T, window)
            ma = comp.memory_analysis()
            temps[(L, T)] = ma.temp_size_in_bytes
            hlo = comp.as_text()
            # the cache buffers are donated and aliased to the outputs
            assert ma.alias_size_in_bytes >= 2 * cache_bytes
            assert "input_output_alias" in hlo
            # no instruction copies a whole cache-shaped buffer
            slots = L if window is None else window
            shape = f"f32[1,{slots},8,64]"
            copies = [ln for ln in hlo.splitlines()
                      if re.search(r"= " + re.escape(shape) + r"\{[^}]*\} copy\(", ln)]
            assert not copies, copies
            # temp memory is far below one cache buffer
            assert ma.temp_size_in_bytes < cache_bytes / 4, (L, T, ma)
    if window is None:
        # does not grow with the cache length (4x longer cache -> same temp)
        assert temps[(16384, 1)] <= temps[(4096, 1)] * 1.1 + 65536
        assert temps[(16384, 16)] <= temps[(4096, 16)] * 1.1 + 65536


@pytest.mark.parametrize("flat_max,reduce_max", [(0, 0), (10**6, 0), (0, 10**6)],
                         ids=["per_head", "flat", "reduce"])
def test_flat_and_per_head_reads_of_the_cache(monkeypatch, flat_max, reduce_max):
    """The three ways of reading a chunk (one block-diagonal product over all heads, one product
    per kv head, or fused multiply-and-sum loops, forced here for every step) against the
    reference: plain cache with a window and a soft-cap, ragged rows, multi-token steps, and a
    ring buffer."""
    from attnjax._src import decode
    monkeypatch.setattr(native._local, "disabled", True, raising=False)  # the XLA reads
    monkeypatch.setattr(decode, "FLAT_MAX_COLUMNS", flat_max)
    monkeypatch.setattr(decode, "REDUCE_MAX_COLUMNS", reduce_max)
    q, k, v = _histories(5)
    schedule = [(5, [5, 2, 4]), (1, [1, 1, 1]), (3, [3, 0, 2]), (1, [1, 1, 1])]
    # Each schedule as one jitted program (the reads are the same as in a jitted step; one
    # compile instead of three).
    step = _stepper(jit=False, chunk_size=3, local_window_size=(4, 0), logits_soft_cap=3.0)
    got, _ = _run(schedule, KVCache.create(B, 14, K, H), q, k, v, step, fused=True)
    _check(got, q, k, v, window=4, cap=3.0)
    got, _ = _run(schedule, KVCache.create(B, None, K, H, window=5), q, k, v,
                  _stepper(jit=False, chunk_size=2), fused=True)
    _check(got, q, k, v, window=4)


def test_multi_query_cache_single_kv_head(decode_path):
    """K = 1 (multi-query): every step takes the all-heads product, long steps included."""
    rng = np.random.default_rng(6)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 20, n, 8)), jnp.float32) for n in (4, 1, 1))
    step = jax.jit(lambda q, k, v, c: cached_attention(q, k, v, c, chunk_size=4))
    cache = KVCache.create(2, 20, 1, 8)
    outs = []
    for a, b in ((0, 9), (9, 10), (10, 18), (18, 20)):
        out, cache = step(q[:, a:b], k[:, a:b], v[:, a:b], cache)
        outs.append(np.asarray(out))
    got = np.concatenate(outs, axis=1)
    qd, kd, vd = (np.asarray(x, np.float64) for x in (q, k, v))
    s = np.einsum("btnh,bsh->bnts", qd, kd[:, :, 0]) / np.sqrt(8)
    s = np.where(np.tril(np.ones((20, 20), bool)), s, -np.inf)
    w = np.exp(s - s.max(-1, keepdims=True))
    ref = np.einsum("bnts,bsh->btnh", w / w.sum(-1, keepdims=True), vd[:, :, 0])
    np.testing.assert_allclose(got, ref, atol=3e-5, rtol=3e-5)


# The fused multiply-and-sum reads ("reduce") run by default in
# test_flat_and_per_head_reads_of_the_cache; under x64 with --run-slow.
@pytest.mark.parametrize("reduce_max", [1, pytest.param(10**6, marks=pytest.mark.slow)],
                         ids=["default", "reduce"])
def test_x64_float64_computes_in_float64_and_float32_with_int32_indices(monkeypatch, reduce_max):
    """Under jax_enable_x64: float64 inputs are computed in float64 (agreement far beyond
    float32), float32 inputs stay float32, and the cache lengths stay int32 (also with every
    step read by the fused multiply-and-sum loops)."""
    from attnjax._src import decode
    if reduce_max != 1:
        monkeypatch.setattr(native._local, "disabled", True, raising=False)  # the XLA reads
    monkeypatch.setattr(decode, "REDUCE_MAX_COLUMNS", reduce_max)
    with jax.enable_x64(True):
        q, k, v = (np.asarray(x, np.float64) for x in _histories(7))
        for dtype, tol in ((jnp.float64, 1e-12), (jnp.float32, 3e-5)):
            cache = KVCache.create(B, TOTAL, K, H, dtype=dtype)
            step = _stepper(chunk_size=5)
            qs, ks, vs = (jnp.asarray(x, dtype) for x in (q, k, v))
            got = {}
            out, cache = step(qs[:, :7], ks[:, :7], vs[:, :7], cache,
                              jnp.full((B,), 7, jnp.int32))
            got.update({(b, p): np.asarray(out)[b, p] for b in range(B) for p in range(7)})
            single = jax.jit(lambda *a: cached_attention(*a))  # one compile for the 5 steps
            for p in range(7, 12):
                out, cache = single(
                    qs[:, p:p + 1], ks[:, p:p + 1], vs[:, p:p + 1], cache)
                assert out.dtype == dtype
                got.update({(b, p): np.asarray(out)[b, 0] for b in range(B)})
            assert cache.lengths.dtype == jnp.int32
            np.testing.assert_array_equal(np.asarray(cache.lengths), 12)
            for (b, p), o in got.items():
                np.testing.assert_allclose(o, _ref(q, k, v, b, p), atol=tol, rtol=tol,
                                           err_msg=f"{dtype} row {b} position {p}")


def _unfused_instructions(hlo: str) -> str:
    """The HLO text without the bodies of fusions (which compute elements, not buffers)."""
    keep, skip = [], False
    for ln in hlo.splitlines():
        if ln and not ln.startswith(" "):  # a computation header (or its closing brace)
            skip = "fused_computation" in ln or "_computation" in ln.split("(")[0]
        if not skip:
            keep.append(ln)
    return "\n".join(keep)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_cache_step_is_flat_and_in_place(dtype, decode_path):
    """A bfloat16/float16 cache, steps of T ≤ 8 tokens: no whole-cache conversion (XLA:CPU
    has no bf16 scatter or dynamic-slice and used to convert the cache to float32 and back every
    step), no copy of the cache, temp memory independent of the cache length."""
    temps = {}
    for L in (4096, 16384):
        for B, T in ((1, 1), (2, 4)):
            cache = KVCache.create(B, L, 8, 64, dtype)
            q = jnp.ones((B, T, 8, 64), dtype)
            f = jax.jit(lambda q, k, v, c: cached_attention(q, k, v, c, chunk_size=256),
                        donate_argnums=3)
            comp = f.lower(q, q, q, cache).compile()
            ma = comp.memory_analysis()
            hlo = _unfused_instructions(comp.as_text())
            assert ma.alias_size_in_bytes >= 2 * cache.key.nbytes
            short = {"bfloat16": "bf16", "float16": "f16"}[jnp.dtype(dtype).name]
            for ty in (short, "f32"):
                shape = f"{ty}[{B},{L},8,64]"
                big = [ln for ln in hlo.splitlines()
                       if re.search(r"= " + re.escape(shape) + r"\{[^}]*\} (copy|convert)\(", ln)
                       or re.search(r"= f32\[" + f"{B},{L}" + r",8,64\]\{[^}]*\} fusion\(", ln)]
                assert not big, big[:3]
            temps[(L, B, T)] = ma.temp_size_in_bytes
            assert ma.temp_size_in_bytes < cache.key.nbytes / 2, (L, B, T, ma)
    for B, T in ((1, 1), (2, 4)):
        assert temps[(16384, B, T)] <= temps[(4096, B, T)] * 1.1 + 65536


@pytest.mark.parametrize("dtype,path", [(jnp.bfloat16, "native"), (jnp.bfloat16, "xla"),
                                        (jnp.float16, "native")])
def test_low_precision_cache_matches_reference(dtype, path, request):
    """bfloat16/float16 caches, float32 queries: single and 4-token steps, ragged rows, a plain
    cache and a ring buffer, against the float64 reference of the stored (rounded) keys and
    values. (The pure-JAX path treats float16 as it treats bfloat16.)"""
    if path == "native" and not native.enabled():
        pytest.skip(f"native decode kernel unavailable: {native.status()['reason']}")
    if path == "xla":
        request.getfixturevalue("xla_decode_path")
    q, k, v = _histories(8)
    k, v = k.astype(dtype), v.astype(dtype)  # what the cache stores, exactly
    schedule = [(6, [6, 3, 5]), (1, [1, 1, 1]), (4, [4, 2, 0]), (1, [1, 1, 1]), (4, [4, 4, 4])]
    got, cache = _run(schedule, KVCache.create(B, 20, K, H, dtype), q, k, v, _stepper())
    assert cache.key.dtype == dtype
    _check(got, q, k, v)
    got, _ = _run(schedule, KVCache.create(B, None, K, H, dtype, window=6), q, k, v,
                  _stepper())
    _check(got, q, k, v, window=5)


def test_forward_derivative_of_a_step(x64):
    """jax.jvp through a decoding step (the native kernel's derivative is the XLA path's, so one
    run with the default path checks both the wiring and the XLA derivative) against
    a float64 dense reference, with tangents on the query, the new key/value and the cache.
    (Reverse mode is not available: the cache is read by a loop with a dynamic trip count.)"""
    # NumPy draws the data: under x64, jax.random.normal compiles once per shape (seconds each).
    rng = np.random.default_rng(9)
    normal = lambda shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    P = 11
    q, k, v = normal((B, P + 1, N, H)), normal((B, P + 1, K, H)), normal((B, P + 1, K, H))
    kc = np.zeros((B, 16, K, H), np.float32)
    vc = np.zeros((B, 16, K, H), np.float32)
    kc[:, :P], vc[:, :P] = k[:, :P], v[:, :P]
    args = tuple(jnp.asarray(a) for a in (q[:, P:], k[:, P:], v[:, P:], kc, vc))
    tangents = tuple(jnp.asarray(normal(a.shape)) for a in args)

    def step(qt, kt, vt, kc, vc):
        out, _ = cached_attention(qt, kt, vt, KVCache(kc, vc, jnp.full((B,), P, jnp.int32)))
        return out

    out, tan = jax.jit(lambda a, t: jax.jvp(step, a, t))(args, tangents)

    def ref(qt, kt, vt, kc, vc):
        kk = jnp.concatenate([kc[:, :P], kt], 1)
        vv = jnp.concatenate([vc[:, :P], vt], 1)
        G = N // K
        s = jnp.einsum("btnh,bsnh->bnts", qt, jnp.repeat(kk, G, axis=2)) / np.sqrt(H)
        return jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(s, -1), jnp.repeat(vv, G, axis=2))

    f64 = lambda xs: tuple(jnp.asarray(a, jnp.float64) for a in xs)
    out_ref, tan_ref = jax.jvp(ref, f64(args), f64(tangents))
    assert out.dtype == tan.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), np.asarray(out_ref), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(tan), np.asarray(tan_ref), atol=1e-4, rtol=1e-4)


def test_without_a_working_compiler_decoding_falls_back_to_the_pure_jax_path(tmp_path):
    """A host whose compiler fails (here $CXX=false, an empty kernel cache): status() says why, and
    cached_attention still gives the reference's results, by the pure-JAX path."""
    import os
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import json, numpy as np, jax, jax.numpy as jnp
        from attnjax import KVCache, cached_attention
        from attnjax._src import native
        q = jnp.asarray(np.random.default_rng(0).standard_normal((1, 5, 2, 4)), jnp.float32)
        cache = KVCache.create(1, 8, 1, 4)
        out, cache = jax.jit(cached_attention)(q, q[:, :, :1], q[:, :, :1], cache)
        print(json.dumps(dict(status=native.status(), out=np.asarray(out).tolist())))
    """)
    env = dict(os.environ, CXX="false", ATTNJAX_CACHE_DIR=str(tmp_path), JAX_PLATFORMS="cpu")
    env["PATH"] = "/nonexistent"  # no c++/g++/clang++ either: only $CXX, which fails
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not res["status"]["enabled"]
    assert "compil" in res["status"]["reason"] or "compiler" in res["status"]["reason"]
    q = np.random.default_rng(0).standard_normal((1, 5, 2, 4))
    ref = np.stack([_ref(q, q[:, :, :1], q[:, :, :1], 0, p) for p in range(5)])
    np.testing.assert_allclose(np.asarray(res["out"])[0], ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n,k,h,window,dtype", [
    (8, 2, 64, None, "float32"), (6, 3, 64, 70, "float32"), (4, 4, 128, None, "float32"),
    (8, 2, 64, None, "bfloat16"), (4, 4, 128, None, "bfloat16"), (6, 3, 64, 70, "float16"),
    (4, 2, 96, None, "bfloat16"), (4, 1, 256, 70, "float32"), (8, 2, 80, None, "bfloat16"),
    (4, 4, 80, 70, "float32"), (4, 1, 32, None, "float16"), (4, 2, 112, None, "bfloat16"),
    (6, 3, 48, 70, "float32"), (8, 2, 64, None, "float16")],
    ids=["gqa4-h64", "gqa2-h64-ring", "mha-h128", "gqa4-h64-bf16", "mha-h128-bf16",
         "gqa2-h64-ring-f16", "gqa2-h96-bf16", "mqa-h256-ring", "gqa4-h80-bf16", "mha-h80-ring",
         "mqa-h32-f16", "gqa2-h112-bf16", "gqa2-h48-ring", "gqa4-h64-f16"])
def test_realistic_head_dims(n, k, h, window, dtype, decode_path):
    """Head dims 32, 64, 80, 96, 128 and 256 (the native kernel's vector code, compiled for each)
    and 48, 112 (the same code with the head dim known at run time; the other tests use H=8, the
    generic path), one query head per kv head and groups of 2 and 4, caches whose length is
    not a multiple of the kernel's blocks, steps of 1 and 4 tokens, ragged rows, float32 and
    bfloat16/float16 caches (read by their own code in the kernel); against a float64 reference
    of the stored values."""
    b, total = 2, 150
    rng = np.random.default_rng(10)
    q = jnp.asarray(rng.standard_normal((b, total, n, h)), jnp.float32)
    # what the cache stores, exactly (the reference sees the rounded values)
    kk, vv = (jnp.asarray(rng.standard_normal((b, total, k, h)), jnp.float32).astype(dtype)
              for _ in range(2))
    cache = KVCache.create(b, None if window else 145, k, h, dtype=dtype, window=window)
    step = jax.jit(lambda q, k, v, c, m: cached_attention(q, k, v, c, query_seq_lengths=m))
    schedule = [(8, [8, 5])] + [(1, [1, 1])] * 3 + [(4, [4, 3])] + [(8, [8, 8])] * 15 + \
        [(1, [1, 1]), (4, [4, 4]), (4, [2, 4])]
    pos = np.zeros(b, int)
    qd, kd, vd = (np.asarray(x, np.float64) for x in (q, kk, vv))
    checked = 0
    for T, counts in schedule:
        idx = np.stack([np.minimum(pos[i] + np.arange(T), total - 1) for i in range(b)])
        rows = np.arange(b)[:, None]
        out, cache = step(q[rows, idx], kk[rows, idx], vv[rows, idx], cache,
                          jnp.asarray(counts, jnp.int32))
        out = np.asarray(out)
        for i in range(b):
            for t in range(counts[i]):
                p = pos[i] + t
                # a ring of `window` slots: the last `window` positions, itself included
                ref = _ref(qd, kd, vd, i, p, window=None if window is None else window - 1)
                np.testing.assert_allclose(out[i, t], ref, atol=2e-5, rtol=2e-5,
                                           err_msg=f"row {i} position {p}")
                checked += 1
        pos += counts
    assert pos.max() >= 140 and checked > 200


def _ref_weights(q, k, v, scale):
    """float64 softmax weights and output of queries q (n, H) over keys/values k, v (S, H)."""
    s = q @ k.T * scale
    w = np.exp(s - s.max(axis=-1, keepdims=True))
    w /= w.sum(axis=-1, keepdims=True)
    return w, w @ v


# (N, K, H, T, cache slots, per-row cached lengths, ring): 16 query columns per kv head (G*T) or
# 32, which AVX-512 hosts read with 16 columns per vector (with AVX512-BF16, bfloat16 products
# for bfloat16 caches read by bfloat16 queries; float16 caches, and bfloat16 ones read by float32
# queries, converted to float32 block by block); blocks of 64 slots with an odd last one, several
# pieces per row (over 1024 slots), an empty row, a ring buffer that wraps inside a block
COLUMNS16_CASES = [
    (8, 2, 64, 4, 2600, [2599, 131], False),
    (16, 1, 128, 1, 300, [300, 0], False),
    (8, 2, 256, 8, 200, [150, 199], False),
    (4, 1, 32, 4, 100, [250, 137], True),
]


@pytest.mark.parametrize("dtype", ["bfloat16", "float32", "float16", "bfloat16-f32-queries"])
@pytest.mark.parametrize("n,k,h,T,L,P,ring", COLUMNS16_CASES,
                         ids=["gqa4-h64-t4", "mqa16-h128-t1", "gqa4-h256-t8", "mqa4-h32-ring"])
def test_native_kernel_16_query_columns_per_kv_head(n, k, h, T, L, P, ring, dtype):
    """The native kernel's read of the cache where a kv head has 16 or 32 query columns, against
    float64. A bfloat16 cache: queries that are bfloat16 numbers (what a bfloat16 model passes);
    with AVX512-BF16 the kernel multiplies in bfloat16 pairs and rounds the probabilities to
    bfloat16 before the product with the values (as the chunked path and
    jax.nn.dot_product_attention do): each weight moves by at most 2**-9 of itself, so output
    value d may move by 2**-9 * sum_i w_i |v_id|. float32 queries (a float32, float16 or
    bfloat16 cache; the latter two converted to float32 block by block): float32 accuracy."""
    if not native.enabled():
        pytest.skip(f"native decode kernel unavailable: {native.status()['reason']}")
    rng = np.random.default_rng(3)
    B, G, scale = len(P), n // k, 1.0 / np.sqrt(h)
    q = jnp.asarray(rng.standard_normal((B, T, n, h)), jnp.float32)
    if dtype == "bfloat16":
        q = q.astype(jnp.bfloat16).astype(jnp.float32)
    cache_dtype = dtype.split("-")[0]
    kc, vc = (jnp.asarray(rng.standard_normal((B, L, k, h)) * 2, cache_dtype) for _ in range(2))
    none = jnp.zeros((B, T, k, h), cache_dtype)
    idx = jnp.full((B, T), -1, jnp.int32)  # nothing written: only the read is tested
    Pj = jnp.asarray(P, jnp.int32)
    step = jax.jit(lambda q, kc, vc: native.decode_step(
        q, none, none, kc, vc, idx, Pj, Pj, window_left=None, ring=ring, soft_cap=None,
        scale=scale))
    _, _, out, lse = step(q, kc, vc)
    out, lse = np.asarray(out), np.asarray(lse)
    qd, kd, vd = (np.asarray(x, np.float64) for x in (q, kc, vc))
    for b in range(B):
        lo = max(0, P[b] - L) if ring else 0
        pos = np.arange(lo, P[b])
        slots = pos % L if ring else pos
        if not len(pos):
            np.testing.assert_array_equal(out[b], 0.0)
            assert np.all(np.isneginf(lse[b]))
            continue
        for j in range(k):
            qj = qd[b, :, j * G:(j + 1) * G].reshape(T * G, h)
            w, ref = _ref_weights(qj, kd[b, slots, j], vd[b, slots, j], scale)
            if dtype == "bfloat16":
                bound = 2.0**-9 * (w @ np.abs(vd[b, slots, j])) * 1.05 + 1e-5
            else:
                bound = 2e-5 * (1 + np.abs(ref))
            got = out[b, :, j * G:(j + 1) * G].reshape(T * G, h)
            err = np.abs(got - ref)
            assert np.all(err <= bound), (b, j, float(err.max()), float(bound.min()))


def test_bfloat16_model_steps_against_float64(decode_path):
    """A bfloat16 model's decoding (bfloat16 queries, keys, values and cache; 16 query columns
    per kv head, so AVX512-BF16 hosts take the kernel's bfloat16 products): prefill, then 4- and
    1-token steps, against float64. Bound per output value: the probabilities' bfloat16
    rounding (see above) plus the output's own rounding to bfloat16."""
    b, n, k, h, total = 2, 8, 2, 64, 300
    rng = np.random.default_rng(4)
    q, kk, vv = (jnp.asarray(rng.standard_normal((b, total, m, h)), jnp.bfloat16)
                 for m in (n, k, k))
    cache = KVCache.create(b, total, k, h, dtype=jnp.bfloat16)
    step = jax.jit(lambda q, k, v, c, m: cached_attention(q, k, v, c, query_seq_lengths=m))
    qd, kd, vd = (np.asarray(x, np.float64) for x in (q, kk, vv))
    pos, checked = np.zeros(b, int), 0
    for T, counts in [(200, [200, 131])] + [(4, [4, 4])] * 3 + [(1, [1, 1]), (4, [3, 4])]:
        idx = np.stack([np.minimum(pos[i] + np.arange(T), total - 1) for i in range(b)])
        rows = np.arange(b)[:, None]
        out, cache = step(q[rows, idx], kk[rows, idx], vv[rows, idx], cache,
                          jnp.asarray(counts, jnp.int32))
        assert out.dtype == jnp.bfloat16
        out = np.asarray(out, np.float64)
        for i in range(b):
            for t in range(counts[i] if T < 200 else 0):
                p = pos[i] + t
                for j in range(k):
                    heads = slice(j * n // k, (j + 1) * n // k)
                    w, ref = _ref_weights(qd[i, p, heads], kd[i, :p + 1, j], vd[i, :p + 1, j],
                                          1 / np.sqrt(h))
                    bound = 2.0**-9 * (w @ np.abs(vd[i, :p + 1, j])) * 1.05 + \
                        2.0**-8 * np.abs(ref) + 1e-5
                    assert np.all(np.abs(out[i, t, heads] - ref) <= bound), (i, p, j)
                    checked += 1
        pos += counts
    assert checked >= 2 * 2 * 15
