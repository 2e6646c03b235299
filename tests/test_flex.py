"""Flexible attention (mask_mod, score_mod, block masks, sinks) against a dense float64 reference.

The reference is written here from the definition: the whole ``(B, N, T, S)`` score array in
float64, the user's callables evaluated densely on full index arrays, the sink as one more
logit of value zero; its gradients (including those of the arrays a ``score_mod`` closes over,
and of ``sinks``) come from ``jax.grad`` in float64.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax
from attnjax import masks
from tests import _batching
from tests import reference as ref_np

B, T, S, N, K, H = 2, 37, 45, 4, 2, 16
CHUNKS = (16, 8)


def _ids(rng, B, L, n_docs):
    return np.sort(rng.integers(0, n_docs, (B, L)), axis=1).astype(np.int32)


# Document ids over the key positions (queries use them at q_idx = i + query_offset).
DOC = _ids(np.random.default_rng(3), B, S, 4)


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    mask: object = None  # name in MASKS
    score: object = None  # name in SCORES
    sinks: bool = False
    offset: int = 0


def _mask(name):
    doc = jnp.asarray(DOC)
    return {
        "causal": masks.causal,
        "window": masks.sliding_window(5, 2),
        "chunked": masks.chunked_causal(8),
        "prefix": masks.prefix_lm(jnp.asarray([10, 3], jnp.int32)),
        "document": masks.document(doc),
        "sink_window": masks.sink_window(2, 6),
        "doc_causal": masks.and_masks(masks.causal, masks.document(doc)),
        "window_or_prefix": masks.or_masks(masks.sliding_window(3), masks.prefix_lm(4)),
        "per_head": lambda b, h, q, k: (q - k <= 3 * h) & (q >= k),
        "empty_rows": lambda b, h, q, k: (q >= k) & (q % 5 != 2) & (b + h >= 0),
    }[name]


CASES = [
    Case("causal", mask="causal"),
    Case("causal_offset", mask="causal", offset=8),
    Case("window", mask="window"),
    Case("chunked", mask="chunked"),
    Case("prefix", mask="prefix"),
    Case("document", mask="document"),
    Case("sink_window", mask="sink_window"),
    Case("doc_causal", mask="doc_causal"),
    Case("window_or_prefix", mask="window_or_prefix"),
    Case("per_head", mask="per_head"),
    Case("alibi", mask="causal", score="alibi"),
    Case("t5", score="t5"),
    Case("softcap", mask="window", score="softcap"),
    Case("sinks", mask="causal", sinks=True),
    Case("sinks_empty_rows", mask="empty_rows", sinks=True, score="alibi"),
    Case("empty_rows", mask="empty_rows"),
]
IMPLS = {
    "xla": dict(implementation="xla"),
    "chunked": dict(implementation="xla_chunked", chunk_size=CHUNKS),
    "chunked_block_mask": dict(implementation="xla_chunked"),
}


def _score(name, params):
    if name == "alibi":
        return masks.alibi(params["slopes"])
    if name == "t5":
        return masks.t5_relative_bias(params["table"], max_distance=20)
    if name == "softcap":
        return masks.soft_cap(2.0)
    return None


def _inputs(case, dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, T, N, H))
    k = rng.standard_normal((B, S, K, H))
    v = rng.standard_normal((B, S, K, H))
    params = dict(slopes=np.asarray(attnjax.masks.alibi_slopes(N), np.float64) * 4,
                  table=rng.standard_normal((16, N)))
    sinks = rng.standard_normal((N,)) if case.sinks else None
    dout = rng.standard_normal((B, T, N, H))
    dlse = rng.standard_normal((B, T, N))
    cast = lambda x: np.asarray(np.asarray(x, np.float32), dtype)  # noqa: E731
    return dict(q=cast(q), k=cast(k), v=cast(v), params={n: cast(x) for n, x in params.items()},
                sinks=None if sinks is None else cast(sinks), dout=dout, dlse=dlse)


def dense_visibility(case):
    """The mask_mod evaluated densely on full index arrays (outside any trace), (B, N, T, S)."""
    if case.mask is None:
        return np.ones((B, N, T, S), bool)
    b = np.arange(B).reshape(B, 1, 1, 1)
    h = np.arange(N).reshape(1, N, 1, 1)
    qi = (np.arange(T) + case.offset).reshape(1, 1, T, 1)
    ki = np.arange(S).reshape(1, 1, 1, S)
    return np.broadcast_to(np.asarray(_mask(case.mask)(b, h, qi, ki)), (B, N, T, S))


def reference(q, k, v, params, sinks, case, vis):
    """Dense float64 attention with mask_mod/score_mod/sinks, from the definition."""
    G = N // K
    kn, vn = jnp.repeat(k, G, axis=2), jnp.repeat(v, G, axis=2)
    s = jnp.einsum("btnh,bsnh->bnts", q, kn) / np.sqrt(H)
    b = jnp.arange(B).reshape(B, 1, 1, 1)
    h = jnp.arange(N).reshape(1, N, 1, 1)
    qi = (jnp.arange(T) + case.offset).reshape(1, 1, T, 1)
    ki = jnp.arange(S).reshape(1, 1, 1, S)
    score = _score(case.score, params)
    if score is not None:
        s = score(s, b, h, qi, ki)
    z = jnp.where(vis, s, -jnp.inf)
    m = jnp.max(z, axis=-1)
    if sinks is not None:
        m = jnp.maximum(m, sinks[None, :, None])
    m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
    p = jnp.exp(z - m[..., None])
    den = jnp.sum(p, axis=-1)
    if sinks is not None:
        den = den + jnp.exp(sinks[None, :, None] - m)
    safe = jnp.where(den > 0, den, 1.0)
    out = jnp.einsum("bnts,bsnh->btnh", p / safe[..., None], vn)
    lse = jnp.where(den > 0, m + jnp.log(safe), -jnp.inf)
    return out, jnp.transpose(lse, (0, 2, 1))


def _loss(fn, dout, dlse):
    def loss(q, k, v, params, sinks):
        out, lse = fn(q, k, v, params, sinks)
        lse_term = jnp.where(jnp.isfinite(lse), lse * dlse.astype(lse.dtype), 0.0)
        return jnp.sum(out.astype(jnp.float64) * dout) + jnp.sum(lse_term.astype(jnp.float64)), (
            out, lse)

    return loss


def _library(case, impl_kw, with_block_mask):
    def fn(q, k, v, params, sinks):
        kw = dict(impl_kw)
        mask_mod = None if case.mask is None else _mask(case.mask)
        if with_block_mask:
            kw["block_mask"] = attnjax.create_block_mask(
                mask_mod, B, N, T, S, block_size=CHUNKS, query_offset=case.offset)
        return attnjax.dot_product_attention(
            q, k, v, mask_mod=mask_mod,
            score_mod=_score(case.score, params), sinks=sinks,
            query_offset=case.offset or None, return_residual=True, **kw)

    return fn


def _grad_problem(fn, data, argnums):
    """``(value_and_grad of the loss of fn, its arguments)``; it returns ``((loss, (out, lse)),
    grads)``."""
    loss = _loss(fn, jnp.asarray(data["dout"]), jnp.asarray(data["dlse"]))
    args = [jnp.asarray(data[n]) for n in ("q", "k", "v")]
    args += [jax.tree.map(jnp.asarray, data["params"]),
             None if data["sinks"] is None else jnp.asarray(data["sinks"])]
    return jax.value_and_grad(loss, argnums=argnums, has_aux=True), args


def reference_grads(case, argnums):
    """The float64 reference's output, lse and gradients, run eagerly: every case has the same
    shapes, so its op-by-op executables are compiled once for the whole table."""
    vg, args = _grad_problem(functools.partial(reference, case=case, vis=dense_visibility(case)),
                             _inputs(case), argnums)
    (_, (out, lse)), grads = vg(*args)
    return out, lse, grads


# The default run: the chunked kernel on every case that is not contained in another one (and on
# "causal", the configuration most users run), a few cases in the others; the rest is slow.
# Contained, so with --run-slow in the chunked kernel too: "document" (in "doc_causal"), "window"
# (the mask of "softcap"), "alibi" and "sinks" (both in "sinks_empty_rows", whose ALiBi slopes are
# checked to receive gradient). ("sinks_empty_rows" in "xla" also carries ALiBi, so "alibi" there
# is with --run-slow.)
CHUNKED_CONTAINED = {"document", "window", "alibi", "sinks"}
QUICK = {
    "chunked": [c.name for c in CASES if c.name not in CHUNKED_CONTAINED],
    "xla": ["t5", "sinks_empty_rows"],
    "chunked_block_mask": ["causal_offset", "doc_causal", "per_head"],
}
# The cases of one implementation that this run selects are computed in batches
# (tests/_batching.py); each test still checks its own case.


def _selected(impl):
    return [c.name for c in CASES if (_batching.RUN_SLOW or c.name in QUICK[impl])
            and not (impl == "chunked_block_mask" and c.mask is None)]


def _grid_marks(case, impl):
    slow = () if case.name in QUICK[impl] else (pytest.mark.slow,)
    return slow + _batching.group(f"flex-{impl}", case.name, _selected(impl))


GRID = [pytest.param(c, impl, id=f"{c.name}-{impl}", marks=_grid_marks(c, impl))
        for impl in IMPLS for c in CASES]
_LIBRARY: dict = {}  # impl -> {case name: (out, lse, grads)} of the library, float32 inputs


def _argnums(case):
    return (0, 1, 2, 3) + ((4,) if case.sinks else ())


def library_grads(case, impl):
    """The library's output, lse and gradients on ``case`` (float32 inputs), computed with the rest
    of its batch under one jit."""
    def prepare(name):
        c = next(c for c in CASES if c.name == name)
        vg, args = _grad_problem(_library(c, IMPLS[impl], impl == "chunked_block_mask"),
                                 _inputs(c, np.float32), _argnums(c))
        return vg, args, lambda r: (*r[0][1], r[1])  # ((loss, (out, lse)), grads)

    return _batching.computed(_LIBRARY.setdefault(impl, {}), case.name, _selected(impl), prepare)


@pytest.mark.parametrize(("case", "impl"), GRID)
def test_matches_dense_float64_reference(case, impl, x64):
    if impl == "chunked_block_mask" and case.mask is None:
        pytest.skip("no mask_mod to build a block mask from")
    want = reference_grads(case, _argnums(case))
    assert_matches_reference(case, library_grads(case, impl), want)


def assert_matches_reference(case, got, want):
    """``got = (out, lse, grads)`` of an implementation against ``want``, the float64
    reference's (:func:`reference_grads`); also run for pallas_gpu (tests/test_pallas_gpu.py)."""
    out, lse = np.asarray(got[0], np.float64), np.asarray(got[1], np.float64)
    np.testing.assert_allclose(out, np.asarray(want[0]), atol=2e-5, rtol=2e-5)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(np.asarray(want[1])))
    fin = np.isfinite(np.asarray(want[1]))
    np.testing.assert_allclose(lse[fin], np.asarray(want[1])[fin], atol=2e-5, rtol=2e-5)
    flat_got, flat_want = jax.tree.leaves(got[2]), jax.tree.leaves(want[2])
    assert len(flat_got) == len(flat_want)
    names = jax.tree_util.tree_flatten_with_path(want[2])[0]
    for (path, w), g in zip(names, flat_got, strict=True):
        w, g = np.asarray(w), np.asarray(g, np.float64)
        assert np.all(np.isfinite(g)), path
        scale = max(1.0, float(np.abs(w).max()) / 10)
        np.testing.assert_allclose(g, w, atol=5e-5 * scale, rtol=5e-5, err_msg=str(path))
    if case.score in ("alibi", "t5"):
        # the closed-over arrays really receive gradient
        assert np.abs(np.asarray(got[2][3]["slopes" if case.score == "alibi" else "table"])).max() > 0


def test_sinks_fully_masked_rows(x64):
    """A row that sees no key: output zero, log-sum-exp = the sink."""
    q = k = v = jnp.ones((1, 4, 2, 8), jnp.float32)
    sinks = jnp.asarray([0.5, -1.0], jnp.float32)
    for impl in ("xla", "xla_chunked"):
        out, lse = attnjax.dot_product_attention(
            q, k, v, mask_mod=lambda b, h, qi, ki: (qi >= ki) & (qi != 1), sinks=sinks,
            implementation=impl, chunk_size=2, return_residual=True)
        assert np.all(np.asarray(out[0, 1]) == 0.0)
        np.testing.assert_allclose(np.asarray(lse[0, 1]), [0.5, -1.0], rtol=1e-6)


# bfloat16 with mods in the chunked kernel by default; in "xla" with --run-slow (its bfloat16 and its
# mods are each tested by default elsewhere).
@pytest.mark.parametrize("impl", [pytest.param("xla", marks=pytest.mark.slow), "xla_chunked"])
def test_bf16_flex(impl):
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((1, 40, 4, 16)), jnp.bfloat16)
    k = v = jnp.asarray(rng.standard_normal((1, 40, 2, 16)), jnp.bfloat16)
    slopes = jnp.asarray([0.5, 0.25, 0.1, 0.05], jnp.float32)
    f = lambda q, s: attnjax.dot_product_attention(  # noqa: E731
        q, k, v, mask_mod=masks.causal, score_mod=masks.alibi(s), sinks=jnp.zeros(4),
        implementation=impl, chunk_size=16).astype(jnp.float32)
    g = lambda q, s: attnjax.dot_product_attention(  # noqa: E731
        q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
        mask_mod=masks.causal, score_mod=masks.alibi(s), sinks=jnp.zeros(4),
        implementation="xla")
    # the library call eagerly (as users call it), the float32 comparison under jit
    np.testing.assert_allclose(np.asarray(f(q, slopes)), np.asarray(jax.jit(g)(q, slopes)),
                               atol=3e-2)
    ds = jax.grad(lambda s: jnp.sum(f(q, s)))(slopes)
    ds_ref = jax.jit(jax.grad(lambda s: jnp.sum(g(q, s))))(slopes)
    np.testing.assert_allclose(np.asarray(ds), np.asarray(ds_ref), atol=0.1, rtol=0.05)


# ------------------------------------------------------------------------------------------
# Block classification.

POOL = [
    lambda r: masks.causal,
    lambda r: masks.sliding_window(int(r.integers(0, 9)), int(r.integers(0, 5))),
    lambda r: masks.chunked_causal(int(r.integers(1, 12))),
    lambda r: masks.prefix_lm(jnp.asarray(r.integers(0, 30, (2,)), jnp.int32)),
    lambda r: masks.document(jnp.asarray(_ids(r, 2, 80, int(r.integers(1, 6))))),
    lambda r: masks.sink_window(int(r.integers(0, 4)), int(r.integers(1, 10))),
    lambda r: (lambda b, h, q, k: (q + k + h) % 3 != 0),
]


def _random_mask(r, depth=0):
    if depth < 2 and r.random() < 0.5:
        parts = [_random_mask(r, depth + 1) for _ in range(int(r.integers(2, 4)))]
        return (masks.and_masks if r.random() < 0.5 else masks.or_masks)(*parts)
    return POOL[int(r.integers(len(POOL)))](r)


# Seeds 0-5 by default, 6-11 with --run-slow.
@pytest.mark.parametrize("seed", [s if s < 6 else pytest.param(s, marks=pytest.mark.slow)
                                  for s in range(12)])
def test_block_classification_is_exact(seed):
    r = np.random.default_rng(seed)
    mask_mod = _random_mask(r)
    Tq, Sk = int(r.integers(1, 70)), int(r.integers(1, 70))
    bq, bk = int(r.integers(1, 20)), int(r.integers(1, 20))
    per_head = bool(r.integers(2))
    try:
        bm = attnjax.create_block_mask(mask_mod, 2, 3 if per_head else None, Tq, Sk,
                                       block_size=(bq, bk))
    except ValueError as e:
        # N=None with a mask that depends on h is refused (test_broadcast_b_h_must_not_...).
        assert not per_head and "depends on its 'h' argument" in str(e), e
        per_head = True
        bm = attnjax.create_block_mask(mask_mod, 2, 3, Tq, Sk, block_size=(bq, bk))
    bq, bk = bm.block_size
    b = np.arange(2).reshape(2, 1, 1, 1)
    h = np.arange(3 if per_head else 1).reshape(1, -1, 1, 1)
    dense = np.broadcast_to(np.asarray(mask_mod(jnp.asarray(b), jnp.asarray(h),
                                                jnp.arange(Tq).reshape(1, 1, Tq, 1),
                                                jnp.arange(Sk).reshape(1, 1, 1, Sk))),
                            (2, h.shape[1], Tq, Sk))
    cls = np.asarray(bm.classes)
    nq, nk = -(-Tq // bq), -(-Sk // bk)
    assert cls.shape == (2, h.shape[1], nq, nk)
    for i in range(nq):
        for j in range(nk):
            blk = dense[:, :, i * bq:(i + 1) * bq, j * bk:(j + 1) * bk]
            anyv, allv = blk.any(axis=(2, 3)), blk.all(axis=(2, 3))
            want = np.where(~anyv, 0, np.where(allv, 2, 1))
            np.testing.assert_array_equal(cls[:, :, i, j], want, err_msg=f"block ({i}, {j})")
    # the index lists agree with the classes
    kn = np.asarray(bm.kv_num_blocks)
    ki = np.asarray(bm.kv_indices)
    fkn = np.asarray(bm.full_q_num_blocks)
    np.testing.assert_array_equal(kn, (cls == 1).sum(-1))
    np.testing.assert_array_equal(fkn, (cls == 2).sum(-2))
    for i in range(nq):
        got = set(ki[0, 0, i, :kn[0, 0, i]].tolist())
        assert got == set(np.nonzero(cls[0, 0, i] == 1)[0].tolist())


def test_broadcast_b_h_must_not_be_used_by_the_mask():
    """B=None / N=None build one row / head and broadcast it: a mask_mod that depends on b / h
    would be misclassified for the other rows / heads, so it is refused, naming the argument."""
    per_head = lambda b, h, q, k: (q >= k) & (q - k <= 8 * h)  # noqa: E731
    with pytest.raises(ValueError, match=r"depends on its 'h' argument but N=None.*pass N="):
        attnjax.create_block_mask(per_head, 2, None, 64, 64, block_size=16)
    with pytest.raises(ValueError, match=r"depends on its 'h' argument but N=None"):
        jax.jit(lambda: attnjax.create_block_mask(per_head, None, None, 64, 64,
                                                  block_size=16).classes)()
    prefix = masks.prefix_lm(jnp.asarray([40, 3], jnp.int32))
    with pytest.raises(ValueError, match=r"depends on its 'b' argument but B=None.*pass B="):
        attnjax.create_block_mask(prefix, None, 4, 64, 64, block_size=16)
    # Dependence through a closed-over, traced array (document ids) is found too.
    doc = jnp.asarray(_ids(np.random.default_rng(4), 2, 64, 3))
    with pytest.raises(ValueError, match=r"'b' argument but B=None"):
        jax.jit(lambda d: attnjax.create_block_mask(masks.document(d), None, None, 64, 64,
                                                    block_size=16).classes)(doc)
    # With the sizes given, the per-row / per-head classes are right (checked densely).
    bm = attnjax.create_block_mask(per_head, 2, 4, 64, 64, block_size=16)
    cls = np.asarray(bm.classes)
    assert cls.shape == (2, 4, 4, 4)
    assert cls[0, 0, 1, 0] == 0 and cls[0, 3, 1, 0] != 0  # head 3 sees 24 back, head 0 none
    # Masks that ignore b and h still broadcast (those that only *mention* them too).
    for mm in (masks.causal, masks.sliding_window(4),
               lambda b, h, q, k: (q >= k) | (jnp.zeros_like(h) > 0)):
        assert attnjax.create_block_mask(mm, None, None, 64, 64, block_size=16).shape == (
            1, 1, 64, 64)


def test_create_block_mask_memory_is_per_block():
    """At T = S = 65536 the mask would be 4 GiB as a bool array; building it stays tiny."""
    L = 65536
    doc = jnp.zeros((1, L), jnp.int32)

    def build(doc):
        return attnjax.create_block_mask(
            masks.and_masks(masks.causal, masks.document(doc)), 1, None, L, L, block_size=512)

    mem = jax.jit(build).lower(doc).compile().memory_analysis()
    total = mem.temp_size_in_bytes + mem.output_size_in_bytes
    assert total < 16 * 2**20, total  # 128 × 128 blocks; a T×S bool would be 4 GiB


def test_segment_ids_skip_blocks():
    """Packed documents given as segment ids: only diagonal blocks are visited."""
    from attnjax._src.masks import MaskInfo

    ids = jnp.repeat(jnp.arange(4, dtype=jnp.int32), 16)[None]
    info = MaskInfo(q_len=64, kv_len=64, is_causal=True, q_segment_ids=ids, kv_segment_ids=ids)
    table = np.asarray(info.block_table(16, 16, 4, 4))
    np.testing.assert_array_equal(table, np.eye(4, dtype=int))  # diagonal partial, rest empty
    info = dataclasses.replace(info, is_causal=False)
    np.testing.assert_array_equal(np.asarray(info.block_table(16, 16, 4, 4)), 2 * np.eye(4))


def test_jit_block_mask_reused_and_data_dependent():
    doc = jnp.asarray(_ids(np.random.default_rng(1), 1, 64, 3))
    q = jnp.asarray(np.random.default_rng(2).standard_normal((1, 64, 2, 8)), jnp.float32)

    @jax.jit
    def f(doc, q):
        mm = masks.and_masks(masks.causal, masks.document(doc))
        bm = attnjax.create_block_mask(mm, 1, None, 64, 64, block_size=16)
        a = attnjax.dot_product_attention(q, q, q, block_mask=bm, implementation="xla_chunked")
        b = attnjax.dot_product_attention(a, a, a, block_mask=bm, implementation="xla_chunked")
        c = attnjax.dot_product_attention(q, q, q, mask_mod=mm, implementation="xla")
        return a, b, c

    a, _, c = f(doc, q)
    np.testing.assert_allclose(np.asarray(a), np.asarray(c), atol=1e-5)


# ------------------------------------------------------------------------------------------
# Clear errors.


def test_errors():
    q = k = v = jnp.ones((1, 8, 2, 4))
    dpa = attnjax.dot_product_attention
    with pytest.raises(TypeError, match="mask_mod must return a bool"):
        dpa(q, k, v, mask_mod=lambda b, h, qi, ki: qi - ki)
    with pytest.raises(ValueError, match="score_mod must return"):
        dpa(q, k, v, score_mod=lambda s, b, h, qi, ki: s[..., :1])
    with pytest.raises(ValueError, match="score_mod must return"):
        dpa(q, k, v, score_mod=lambda s, b, h, qi, ki: s.astype(jnp.float16))
    with pytest.raises(TypeError, match="mask_mod must be a callable"):
        dpa(q, k, v, mask_mod=3)
    with pytest.raises(ValueError, match="sinks must have shape"):
        dpa(q, k, v, sinks=jnp.zeros(3))
    bm = attnjax.create_block_mask(masks.causal, 1, None, 8, 8, block_size=4)
    with pytest.raises(ValueError, match="block_mask was built for"):
        dpa(q[:, :4], k, v, block_mask=bm)
    with pytest.raises(ValueError, match="disagrees with the block_mask"):
        dpa(q, k, v, block_mask=bm, chunk_size=2, implementation="xla_chunked")
    with pytest.raises(ValueError, match="mask_mod differs"):
        dpa(q, k, v, block_mask=bm, mask_mod=lambda b, h, qi, ki: qi >= ki)
    with pytest.raises(TypeError, match="mask_mod must return a bool"):
        attnjax.create_block_mask(lambda b, h, qi, ki: qi, 1, 1, 8, 8)


def test_block_mask_of_one_row_or_head_for_a_mask_that_depends_on_it():
    """A block mask built with B=1 (N=1) broadcasts over a call's rows (heads) only for a
    mask_mod that ignores b (h): its classes hold for b = 0 (h = 0), and full blocks skip the
    mask, so another row's answer would be wrong. Such a call raises; built with the call's
    size, the result matches the dense reference."""
    dpa = attnjax.dot_product_attention
    rng = np.random.default_rng(3)
    q = jnp.asarray(rng.standard_normal((2, 32, 4, 8)), jnp.float32)
    doc = jnp.asarray([[0] * 16 + [1] * 16, [0] * 32], jnp.int32)  # rows differ
    by_row = masks.document(doc)
    by_head = lambda b, h, qi, ki: (ki <= qi) | (h >= 2)
    for mm, b, n, match in ((by_row, 1, None, "B=1 .* depends on 'b'.*B=2"),
                            (by_head, 2, 1, "N=1 .* depends on 'h'.*N=4")):
        bm = attnjax.create_block_mask(mm, b, n, 32, 32, block_size=8)
        with pytest.raises(ValueError, match=match):
            dpa(q, q, q, block_mask=bm, implementation="xla_chunked")
        good = attnjax.create_block_mask(mm, 2, 4, 32, 32, block_size=8)
        got = dpa(q, q, q, block_mask=good, implementation="xla_chunked")
        i, j = np.arange(32)[:, None], np.arange(32)[None, :]
        vis = np.broadcast_to(np.asarray(mm(np.arange(2)[:, None, None, None],
                                            np.arange(4)[None, :, None, None], i, j)),
                              (2, 4, 32, 32))
        want, _, _ = ref_np.attention(q, q, q, vis=vis)
        np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=2e-5)
    # a mask_mod that ignores b and h still broadcasts from one row and head
    bm = attnjax.create_block_mask(masks.causal, np.int64(1), 1, np.int64(32), 32, block_size=8)
    want, _, _ = ref_np.attention(q, q, q, vis=ref_np.visibility(2, 4, 32, 32, is_causal=True))
    np.testing.assert_allclose(np.asarray(dpa(q, q, q, block_mask=bm)), want, atol=2e-5, rtol=2e-5)


# ------------------------------------------------------------------------------------------
# Ring attention and decoding honour the mods.


def test_ring_attention_mods_match_single_device():
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, os.path.join(root, "tests", "_flex_ring.py")],
                          capture_output=True, text=True, timeout=600, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    for layout in ("contiguous", "zigzag"):
        # out, dq, dk, dv, dsinks, dslopes against single-device attention (4 devices)
        assert len(res[layout]["diffs"]) == 6 and max(res[layout]["diffs"]) < 2e-4, res
    for axis in ("batch_axis", "head_axis"):
        # mods that depend on b and h, and global sinks, with the batch or heads split too
        assert len(res["batch_head_axes"][axis]) == 6, res
        assert max(res["batch_head_axes"][axis]) < 2e-4, res
        assert res[layout]["dsinks"] > 0 and res[layout]["dslopes"] > 0
    # Gradients w.r.t. the arrays a score_mod closes over (ALiBi slopes, a T5 table) on 2
    # devices, against the float64 reference (f32 gradient tolerance, relative to the size).
    grads = res["closure_grads_p2"]
    assert set(grads) == {"dq", "dk", "dv", "dslopes", "dtable"}, res
    for name, g in grads.items():
        assert g["scale"] > 0.1 and g["err"] <= 2e-5 * max(1.0, g["scale"]), (name, g)
    # The chunked kernel inside a user's shard_map (batch split): a replicated closed-over
    # array's gradient is the sum of the devices' parts, the same as without shard_map.
    sm = res["chunked_in_shard_map"]
    assert sm["dslopes"] > 1 and sm["diffs"][0] < 1e-4 and sm["diffs"][1] <= 1e-5 * sm["dslopes"], sm


def _cached_mods_params():
    # A half fraction of cache kind x cache read by default (each value of each axis once: the
    # plain cache with the default reads, the ring buffer with the fused multiply-and-sum loops);
    # the other two with --run-slow.
    for window, wid in ((None, "plain_cache"), (8, "ring_buffer")):
        for reduce_max, rid in ((1, "default"), (10**6, "reduce")):
            slow = (window is None) != (rid == "default")
            yield pytest.param(window, reduce_max, id=f"{wid}-{rid}",
                               marks=pytest.mark.slow if slow else ())


@pytest.mark.parametrize("window,reduce_max", list(_cached_mods_params()))
def test_cached_attention_honours_mods(window, reduce_max, monkeypatch):
    """Prefill, single-token and multi-token steps with mask_mod/score_mod/sinks equal full
    causal attention over the whole history with the same mods (also with every cache read by
    decode's fused multiply-and-sum loops)."""
    from attnjax._src import decode
    monkeypatch.setattr(decode, "REDUCE_MAX_COLUMNS", reduce_max)
    rng = np.random.default_rng(0)
    Bc, L, Nc, Kc, Hc = 2, 24, 4, 2, 8
    q = jnp.asarray(rng.standard_normal((Bc, L, Nc, Hc)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((Bc, L, Kc, Hc)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((Bc, L, Kc, Hc)), jnp.float32)
    doc = jnp.asarray(_ids(rng, Bc, L, 3))
    mm = masks.or_masks(masks.sink_window(2, 5), masks.document(doc))
    sm = masks.alibi(masks.alibi_slopes(Nc))
    sinks = jnp.asarray(rng.standard_normal((Nc,)), jnp.float32)
    # under jit: eager, the mods run op by op (5 s here); eager mods are tested elsewhere
    want = jax.jit(lambda q, k, v: attnjax.dot_product_attention(
        q, k, v, is_causal=True, local_window_size=None if window is None else (window - 1, 0),
        mask_mod=mm, score_mod=sm, sinks=sinks, implementation="xla"))(q, k, v)
    cache = attnjax.KVCache.create(Bc, L, Kc, Hc, window=window)
    step = jax.jit(functools.partial(attnjax.cached_attention, mask_mod=mm, score_mod=sm,
                                     sinks=sinks, chunk_size=4))
    outs, t = [], 0
    for n in (10, 1, 3, 1, 9):
        o, cache = step(q[:, t:t + n], k[:, t:t + n], v[:, t:t + n], cache)
        outs.append(o)
        t += n
    np.testing.assert_allclose(np.asarray(jnp.concatenate(outs, 1)), np.asarray(want), atol=2e-5)


def test_flax_modules_pass_mods_through():
    from flax import linen as nn
    from flax import nnx

    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 12, 16)), jnp.float32)
    doc = jnp.asarray(_ids(np.random.default_rng(1), 2, 12, 3))
    mm = masks.and_masks(masks.causal, masks.document(doc))
    sm = masks.alibi(masks.alibi_slopes(4))
    sinks = jnp.asarray([0.3, -0.2, 0.1, 1.0])

    layer = attnjax.nnx.MultiHeadAttention(num_heads=4, in_features=16, decode=False,
                                           rngs=nnx.Rngs(0))
    got = layer(x, mask_mod=mm, score_mod=sm, sinks=nnx.Param(sinks))
    seg = doc  # the same mask via the existing arguments; the score_mod via bias
    bias = -masks.alibi_slopes(4)[:, None, None] * (jnp.arange(12)[:, None] - jnp.arange(12))
    want = layer(x, is_causal=True, query_segment_ids=seg, key_value_segment_ids=seg,
                 bias=bias, sinks=sinks)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
    without = layer(x, is_causal=True, query_segment_ids=seg, key_value_segment_ids=seg, bias=bias)
    assert np.abs(np.asarray(without) - np.asarray(got)).max() > 1e-3  # sinks matter

    lin = attnjax.linen.MultiHeadDotProductAttention(num_heads=4)
    params = lin.init(jax.random.key(0), x)
    got = lin.apply(params, x, mask_mod=mm, score_mod=sm, sinks=sinks)
    want = lin.apply(params, x, is_causal=True, query_segment_ids=seg,
                     key_value_segment_ids=seg, bias=bias, sinks=sinks)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
    del nn


@pytest.mark.parametrize("num_buckets,max_distance,bidirectional", [
    (16, 8, False), (32, 8, True), (2, 8, True), (1, 8, False)])
def test_t5_buckets_refuse_a_max_distance_within_the_exact_buckets(num_buckets, max_distance,
                                                                  bidirectional):
    """max_distance <= the exact buckets made T5's log scale divide by log(1) = 0: the buckets
    fell near INT32_MIN and indexed the bias table out of range (JAX clamps: silently another
    entry). Refused now; one past the exact buckets stays inside [0, num_buckets)."""
    with pytest.raises(ValueError, match="max_distance must exceed"):
        masks.t5_bucket(jnp.arange(-20, 21), num_buckets, max_distance, bidirectional)
    with pytest.raises(ValueError, match="max_distance must exceed"):
        masks.t5_relative_bias(jnp.zeros((num_buckets, 2)), max_distance=max_distance,
                               bidirectional=bidirectional)
    if num_buckets >= (4 if bidirectional else 2):
        exact = (num_buckets // 2 if bidirectional else num_buckets) // 2
        got = np.asarray(masks.t5_bucket(jnp.arange(-200, 201), num_buckets, exact + 1,
                                         bidirectional))
        assert got.min() == 0 and got.max() == num_buckets - 1
