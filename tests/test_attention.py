"""Every implementation against the independent float64 reference, forward and backward.

One shared table of cases (every mask kind alone and combined, GQA/MQA, T != S, lengths that are
not multiples of the chunk size, T = 1, several head dims) × implementations × dtypes. A new
implementation gets the whole suite by adding one entry to ``IMPLEMENTATIONS``.
"""

from __future__ import annotations

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax
from tests import _batching
from tests import reference as ref

# Every implementation runs the whole table; "xla_chunked" with small chunks so that the cases
# cover several chunks, partial last chunks and skipped blocks.
IMPLEMENTATIONS = {
    "xla": dict(implementation="xla"),
    "xla_chunked": dict(implementation="xla_chunked", chunk_size=(16, 8)),
    "xla_chunked_uneven": dict(implementation="xla_chunked", chunk_size=(5, 7)),
}

# (forward, gradient) tolerances against the float64 reference, per input dtype.
TOLERANCES = {
    jnp.float32: (1e-5, 2e-5),
    jnp.float16: (2e-3, 4e-3),
    jnp.bfloat16: (2e-2, 4e-2),
}


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    B: int = 2
    T: int = 37
    S: int = 45
    N: int = 4
    K: int = 2
    H: int = 16
    Hv: int | None = None
    is_causal: bool = False
    window: object = None
    query_offset: object = None  # int, or "batch" for a per-row offset array
    q_lengths: bool = False
    kv_lengths: bool = False
    segments: bool = False
    mask: object = None  # None, "full" (B,N,T,S) or "ts" (T,S)
    bias: object = None  # None, "full" (B,N,T,S) or "bcast" (1,N,1,S)
    softcap: float | None = None
    scale: float | None = None
    empty_rows: bool = False  # make some rows fully masked on purpose
    unbatched: bool = False


CASES = [
    Case("plain"),
    Case("causal", is_causal=True),
    Case("causal_bottom_right", is_causal=True, query_offset=8),
    Case("causal_offset_per_row", is_causal=True, query_offset="batch"),
    Case("window_symmetric", window=5),
    Case("window_asymmetric", window=(7, 2)),
    Case("window_causal_offset", window=(6, 0), is_causal=True, query_offset=8),
    Case("query_lengths", q_lengths=True),
    Case("kv_lengths", kv_lengths=True),
    Case("lengths_causal", q_lengths=True, kv_lengths=True, is_causal=True),
    Case("segments", segments=True),
    Case("mask_full", mask="full"),
    Case("mask_broadcast", mask="ts"),
    Case("bias_full", bias="full"),
    Case("bias_broadcast", bias="bcast"),
    Case("softcap", softcap=2.0),
    Case("scale", scale=0.37),
    Case("empty_rows", kv_lengths=True, mask="full", empty_rows=True),
    Case(
        "combined",
        is_causal=True,
        window=(9, 3),
        query_offset="batch",
        q_lengths=True,
        kv_lengths=True,
        segments=True,
        mask="full",
        bias="full",
        softcap=3.0,
    ),
    Case("mqa", K=1, is_causal=True),
    Case("mha", K=4, bias="bcast"),
    Case("decode_T1", T=1, S=45, is_causal=True, query_offset=44),
    Case("value_head_dim", Hv=24, is_causal=True),
    Case("head_dim_32", H=32, T=20, S=20, is_causal=True),
    Case("head_dim_64", H=64, T=20, S=29),
    Case("head_dim_128", H=128, T=17, S=17, is_causal=True),
    Case("head_dim_odd", H=33, T=19, S=23, window=4),
    Case("unbatched", B=1, unbatched=True, is_causal=True, bias="bcast"),
]
LOW_PRECISION_CASES = ["plain", "causal", "combined", "mqa", "empty_rows"]


def _build(case: Case, dtype, seed=0):
    """Inputs, library kwargs and the reference's forward for a case."""
    rng = np.random.default_rng(seed)
    B, T, S, N, K, H = case.B, case.T, case.S, case.N, case.K, case.H
    Hv = case.Hv or H
    q = rng.standard_normal((B, T, N, H))
    k = rng.standard_normal((B, S, K, H))
    v = rng.standard_normal((B, S, K, Hv))
    # Round inputs to the tested dtype, so the reference sees exactly what the library sees.
    q, k, v = (np.asarray(jnp.asarray(x, dtype).astype(jnp.float32), np.float64) for x in (q, k, v))
    lib, vis_kw = {}, {}
    bias = None
    if case.is_causal:
        lib["is_causal"] = vis_kw["is_causal"] = True
    if case.window is not None:
        lib["local_window_size"] = case.window
        vis_kw["window"] = case.window
    if case.query_offset is not None:
        off = np.array([0, 8][:B], np.int32) if case.query_offset == "batch" else case.query_offset
        lib["query_offset"] = off
        vis_kw["query_offset"] = off
    if case.q_lengths:
        ql = np.array([T - 5, T][:B] if not case.empty_rows else [T, 3][:B], np.int32)
        lib["query_seq_lengths"] = ql
        vis_kw["q_lengths"] = ql
    if case.kv_lengths:
        kl = np.array([S - 9, 11][:B] if not case.empty_rows else [0, 11][:B], np.int32)
        lib["key_value_seq_lengths"] = kl
        vis_kw["kv_lengths"] = kl
    if case.segments:
        qs = np.sort(rng.integers(0, 3, (B, T)), axis=1).astype(np.int32)
        ks = np.sort(rng.integers(0, 3, (B, S)), axis=1).astype(np.int32)
        lib["query_segment_ids"], lib["key_value_segment_ids"] = qs, ks
        vis_kw["q_segments"], vis_kw["kv_segments"] = qs, ks
    if case.mask is not None:
        shape = (B, N, T, S) if case.mask == "full" else (T, S)
        m = rng.random(shape) < 0.7
        if case.empty_rows:
            m[..., 2, :] = False  # query row 2 sees nothing, in every batch row and head
        lib["mask"] = m
        vis_kw["mask"] = m
    if case.bias is not None:
        shape = (B, N, T, S) if case.bias == "full" else (1, N, 1, S)
        bias = np.asarray(
            jnp.asarray(rng.standard_normal(shape), dtype).astype(jnp.float32), np.float64
        )
    if case.softcap is not None:
        lib["logits_soft_cap"] = case.softcap
    if case.scale is not None:
        lib["scale"] = case.scale
    vis = ref.visibility(B, N, T, S, **vis_kw)
    want_out, want_lse, cache = ref.attention(
        q, k, v, bias, vis=vis, scale=case.scale, softcap=case.softcap
    )
    dout = rng.standard_normal(want_out.shape)
    dout = np.asarray(jnp.asarray(dout, dtype).astype(jnp.float32), np.float64)
    want_grads = ref.attention_vjp(cache, dout, None if bias is None else bias.shape)
    return dict(
        q=q,
        k=k,
        v=v,
        bias=bias,
        lib=lib,
        dout=dout,
        want_out=want_out,
        want_lse=want_lse,
        want_grads=want_grads,
        vis=vis,
    )


def _prepare(case: Case, impl_kw: dict, dtype, data):
    """``(fwd_bwd, args, finish)``: the library's forward+VJP function of a case, its arguments,
    and ``finish(fwd_bwd(*args)) -> (out, lse, grads)``: the output, lse and VJP (dq, dk, dv,
    dbias) as float64 NumPy arrays of the float32 values."""
    lib = {**data["lib"], **impl_kw}
    arrays = [jnp.asarray(data[n], dtype) for n in ("q", "k", "v")]
    has_bias = data["bias"] is not None
    if has_bias:
        arrays.append(jnp.asarray(data["bias"], dtype))
    dout = jnp.asarray(data["dout"], dtype)
    if case.unbatched:
        arrays = [arrays[0][0], arrays[1][0], arrays[2][0]] + ([arrays[3][0]] if has_bias else [])
        dout = dout[0]
        lib = {
            k: (v[0] if k in ("query_segment_ids", "key_value_segment_ids") else v)
            for k, v in lib.items()
        }

    def f(*xs):
        bias = xs[3] if has_bias else None
        return attnjax.dot_product_attention(xs[0], xs[1], xs[2], bias, return_residual=True, **lib)

    def fwd_bwd(xs, dout):
        (out, lse), vjp = jax.vjp(f, *xs)
        grads = vjp((dout, jnp.zeros_like(lse)))
        return out, lse, grads

    def finish(result):
        out, lse, grads = result
        to_np = lambda x: np.asarray(jnp.asarray(x, jnp.float32), np.float64)
        out, lse, grads = to_np(out), to_np(lse), [to_np(g) for g in grads]
        if case.unbatched:
            out, lse, grads = out[None], lse[None], [g[None] for g in grads]
        if not has_bias:
            grads.append(None)
        return out, lse, grads

    return fwd_bwd, (arrays, dout), finish


def _run(case: Case, impl_kw: dict, dtype, data, call=None):
    """Library forward (output, lse) and VJP (dq, dk, dv, dbias) in float32 NumPy (one case).

    ``call(fn, *args)`` runs the forward+VJP function (default: ``jax.jit(fn)(*args)``)."""
    fwd_bwd, args, finish = _prepare(case, impl_kw, dtype, data)
    call = call or (lambda fn, *args: jax.jit(fn)(*args))
    return finish(call(fwd_bwd, *args))


def _assert_close(name, got, want, tol):
    np.testing.assert_allclose(got, want, atol=tol, rtol=tol, err_msg=name)


# (implementation, dtype name) -> {case name: (data, out, lse, grads)}: the library's results,
# computed in batches of the cases this run selects (tests/_batching.py); each test checks its own
# case against the float64 reference.
_COMPUTED: dict = {}
# (implementation, dtype name) -> the case names this run selects (filled below, at collection).
_SELECTED: dict = {}


def _computed(case: Case, impl: str, dtype):
    key = (impl, jnp.dtype(dtype).name)
    by_name = {**{c.name: c for c in CASES}, case.name: case}  # case: maybe another table's

    def prepare(name):
        data = _build(by_name[name], dtype)
        fn, args, finish = _prepare(by_name[name], IMPLEMENTATIONS[impl], dtype, data)
        return fn, args, lambda r: (data, *finish(r))

    return _batching.computed(_COMPUTED.setdefault(key, {}), case.name, _SELECTED.get(key, []),
                              prepare)


def _check(case: Case, impl: str, dtype):
    data, out, lse, grads = _computed(case, impl, dtype)
    compare_to_reference(data, out, lse, grads, dtype)
    return data, out, grads


def compare_to_reference(data, out, lse, grads, dtype):
    """Output, lse and gradients of one case against the float64 reference's (per-dtype tols)."""
    ftol, gtol = TOLERANCES[dtype]
    chex.assert_shape(out, data["want_out"].shape)
    assert np.all(np.isfinite(out)) and all(np.all(np.isfinite(g)) for g in grads if g is not None)
    _assert_close("output", out, data["want_out"], ftol)
    # lse is returned in the input dtype (as jax.nn does): compare at that dtype's precision.
    want_lse = data["want_lse"]
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(want_lse))
    finite = np.isfinite(want_lse)
    lse_tol = max(ftol, float(jnp.finfo(dtype).eps) * 4)
    np.testing.assert_allclose(lse[finite], want_lse[finite], rtol=lse_tol, atol=lse_tol)
    for name, g, w in zip(("dq", "dk", "dv", "dbias"), grads, data["want_grads"], strict=True):
        if w is None:
            continue
        _assert_close(name, g, w, gtol * max(1.0, float(np.abs(w).max()) / 10))


# The default run: "xla_chunked" (16, 8) runs every case of the table. The other two runs sample
# it; the whole table runs with --run-slow. Rule for the samples: "combined" (every mask argument
# at once: causal, window, per-row offset, both lengths, segments, full mask, full bias, soft
# cap), "empty_rows" (fully masked rows) and "decode_T1" (T = 1, shorter than one chunk) always,
# plus the cases a run needs for what "combined" does not contain.
# Uneven chunks (5, 7) re-run the chunked kernel's block-boundary edge cases: the three above and
# an odd head dim with a window, whose blocks are all partial.
UNEVEN_DEFAULT = {"combined", "decode_T1", "head_dim_odd", "empty_rows"}


# "xla" builds its masks with the same code as the chunked kernel's per-block masks, densely: the
# three above, plus what "combined" lacks: the broadcast (T, S) mask, the broadcast bias and
# rank-3 inputs ("unbatched"), MQA, and Hv != H.
XLA_DEFAULT = {"combined", "empty_rows", "decode_T1", "mask_broadcast", "unbatched", "mqa",
               "value_head_dim"}


def _float32_slow(case: Case, impl: str) -> bool:
    return ((impl == "xla_chunked_uneven" and case.name not in UNEVEN_DEFAULT)
            or (impl == "xla" and case.name not in XLA_DEFAULT))


# Low precision by default: bfloat16 (the training dtype) in the chunked kernel on every case of
# LOW_PRECISION_CASES; float16 in the chunked kernel and bfloat16 in "xla" on the cases that add
# something to float32's table ("combined", "mqa", "empty_rows"); the rest (the same dtypes on
# "plain"/"causal", and float16 in "xla") with --run-slow.
LOW_PRECISION_DEFAULT = {"combined", "mqa", "empty_rows"}

LOW_PRECISION_DTYPES = ((jnp.bfloat16, "bf16"), (jnp.float16, "f16"))


def _low_precision_slow(name: str, impl: str, did: str) -> bool:
    return ((impl == "xla" and did == "f16")
            or (not (impl == "xla_chunked" and did == "bf16")
                and name not in LOW_PRECISION_DEFAULT))


# The cases each batch holds.
for _impl in IMPLEMENTATIONS:
    _SELECTED[(_impl, "float32")] = [c.name for c in CASES
                                     if _batching.RUN_SLOW or not _float32_slow(c, _impl)]
for _impl in ("xla", "xla_chunked"):
    for _dtype, _did in LOW_PRECISION_DTYPES:
        _SELECTED[(_impl, jnp.dtype(_dtype).name)] = [
            n for n in LOW_PRECISION_CASES
            if _batching.RUN_SLOW or not _low_precision_slow(n, _impl, _did)]


def _group(name: str, impl: str, dtype) -> tuple:
    """The xdist group of a selected case (the batch it is computed in), else no mark."""
    dname = jnp.dtype(dtype).name
    return _batching.group(f"attention-{impl}-{dname}", name, _SELECTED.get((impl, dname), []))


def _float32_params():
    for case in CASES:
        for impl in IMPLEMENTATIONS:
            slow = _float32_slow(case, impl)
            marks = ([pytest.mark.slow] if slow else []) + list(_group(case.name, impl,
                                                                       jnp.float32))
            yield pytest.param(case, impl, id=f"{case.name}-{impl}", marks=marks)


@pytest.mark.parametrize("case,impl", list(_float32_params()))
def test_matches_reference_float32(case, impl):
    _check(case, impl, jnp.float32)


def _low_precision_params():
    for name in LOW_PRECISION_CASES:
        for impl in ("xla", "xla_chunked"):
            for dtype, did in LOW_PRECISION_DTYPES:
                slow = _low_precision_slow(name, impl, did)
                marks = ([pytest.mark.slow] if slow else []) + list(_group(name, impl, dtype))
                yield pytest.param(name, impl, dtype, id=f"{name}-{impl}-{did}", marks=marks)


@pytest.mark.parametrize("name,impl,dtype", list(_low_precision_params()))
def test_matches_reference_low_precision(name, impl, dtype):
    case = next(c for c in CASES if c.name == name)
    data, out, _ = _check(case, impl, dtype)


# Shares the float32 table's computation of "empty_rows" (same batch, same xdist group).
@pytest.mark.parametrize("impl", [pytest.param(impl, marks=_group("empty_rows", impl, jnp.float32))
                                  for impl in IMPLEMENTATIONS])
def test_fully_masked_rows_are_zero_with_zero_gradients(impl):
    case = next(c for c in CASES if c.name == "empty_rows")
    data, out, lse, (dq, dk, dv, _) = _computed(case, impl, jnp.float32)
    empty = ~data["vis"].any(axis=-1)  # (B, N, T)
    empty_btn = np.transpose(empty, (0, 2, 1))
    assert empty_btn.any() and not empty_btn.all()
    assert np.all(out[empty_btn] == 0.0)
    assert np.all(np.isneginf(lse[empty_btn]))
    assert np.all(dq[empty_btn] == 0.0)
    # The non-empty rows still carry signal, so the zeros above are not an accident.
    assert np.abs(out[~empty_btn]).max() > 0.1
    # Batch row 0 has no visible key at all: no gradient reaches its keys and values.
    assert np.all(dk[0] == 0.0) and np.all(dv[0] == 0.0)
    assert np.abs(dk[1]).max() > 0.0


# ------------------------------------------------------------------------------------------
# Parity with jax.nn.dot_product_attention on every feature both have.

PARITY = [
    dict(),
    dict(is_causal=True),
    dict(local_window_size=(4, 2)),
    dict(local_window_size=3, is_causal=True),
    dict(query_seq_lengths=np.array([20, 9], np.int32)),
    dict(key_value_seq_lengths=np.array([20, 9], np.int32)),
    dict(bias="bias"),
    dict(mask="mask"),
    dict(scale=0.2, is_causal=True),
]


def _parity_params():
    # By default every feature in GQA: "plain" and "is_causal" in both implementations, the others
    # in one, alternating down the list (each implementation gets every second one); MHA (the
    # same code with G = 1) on "plain" in the chunked kernel and "is_causal" in "xla". The rest
    # with --run-slow.
    for heads, hid in (((4, 2), "gqa"), ((4, 4), "mha")):
        for i, kw in enumerate(PARITY):
            for j, impl in enumerate(("xla", "xla_chunked")):
                if hid == "gqa":
                    slow = i > 1 and i % 2 != j
                else:
                    slow = i > 1 or i % 2 == j
                yield pytest.param(kw, impl, heads, id=f"{hid}-{'-'.join(kw) or 'plain'}-{impl}",
                                   marks=pytest.mark.slow if slow else ())


@pytest.mark.parametrize("kw,impl,heads", list(_parity_params()))
def test_parity_with_jax_nn(kw, impl, heads):
    rng = np.random.default_rng(1)
    B, T, S, (N, K), H = 2, 24, 24, heads, 16
    q = jnp.asarray(rng.standard_normal((B, T, N, H)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((B, S, K, H)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((B, S, K, H)), jnp.float32)
    kw = dict(kw)
    if kw.get("bias") == "bias":
        kw["bias"] = jnp.asarray(rng.standard_normal((1, N, T, S)), jnp.float32)
    if kw.get("mask") == "mask":
        m = rng.random((B, 1, T, S)) < 0.6
        m[..., 0] = True  # no fully masked rows: there jax.nn and attnjax differ on purpose
        kw["mask"] = jnp.asarray(m)

    def loss(fn, q, k, v):
        out, lse = fn(q, k, v, return_residual=True, **kw)
        return jnp.sum(out * jnp.cos(out)), (out, lse)

    ours = functools.partial(attnjax.dot_product_attention, implementation=impl, chunk_size=8)
    (_, (out, lse)), grads = jax.value_and_grad(
        functools.partial(loss, ours), argnums=(0, 1, 2), has_aux=True
    )(q, k, v)
    (_, (out_j, lse_j)), grads_j = jax.value_and_grad(
        functools.partial(loss, jax.nn.dot_product_attention), argnums=(0, 1, 2), has_aux=True
    )(q, k, v)
    chex.assert_trees_all_close(out, out_j, atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_close(grads, grads_j, atol=3e-5, rtol=3e-5)
    rows = np.ones(lse.shape, bool)
    if "query_seq_lengths" in kw:  # jax.nn's lse of cut-off rows is a large negative constant
        rows = np.arange(T)[None, :, None] < np.asarray(kw["query_seq_lengths"])[:, None, None]
        rows = np.broadcast_to(rows, lse.shape)
    np.testing.assert_allclose(np.asarray(lse)[rows], np.asarray(lse_j)[rows], atol=1e-5, rtol=1e-5)
