"""The memory-efficient implementation (``implementation="xla_chunked"``).

Online-softmax attention over key chunks (Rabe & Staats 2021; FlashAttention), query chunks
processed independently, with a ``jax.custom_vjp`` whose residuals are only the inputs, the output
and the log-sum-exp; the backward pass recomputes each score block (FlashAttention-2 style).
Temporary memory is O(T·H + B·N·chunk²), forward and backward.

Layout. Inputs are transposed once to a chunk-major layout of rank-3 blocks, queries
``(nq, B·K, G·cq, H)`` and keys/values ``(nk, B·K, ck, H)``, so that every matmul is a plain
batched matmul over B·K with no copy of K/V per query head (GQA). Score blocks are
``(B·K, G·cq, ck)`` with no size-1 dims (5-d blocks with B = 1 or G = 1 made XLA:CPU's layout
assignment copy every score block once more); masks, bias and dropout view them as 5-d
``(B, K, G, cq, ck)`` through free reshapes. (:func:`_forward` and :func:`_backward` take and
return the 5-d/6-d chunk-major layouts, which ring attention shares, and reshape them to rank 3
for free.) Masks are built per block from positions by
:class:`~attnjax._src.masks.MaskInfo`; key blocks a causal/window/length mask hides entirely are
never computed, and blocks it shows entirely skip the masking work.

Backward. Key blocks are the outer loop (dK, dV accumulate in registers), query blocks the inner
loop. Scores are recomputed transposed, ``sᵀ = K·Qᵀ``, so that every product is of the form
``A·B`` or ``A·Bᵀ`` and none needs a transposed left operand (those fall off XLA:CPU's fast
matmul path): ``dV += Pᵀ·dO``, ``dK += dSᵀ·Q``, and ``dQᵀ += Kᵀ·dSᵀ`` (``Kᵀ`` of one block
transposed once per outer step; ``dQ`` is kept transposed and fixed up at the end). The
``A·Bᵀ`` products take the row-major ``B`` block as it is (only its dynamic slice is copied);
transposing ``Q``/``dO``/``K`` once up front was measured no faster and costs O(T·H) more
temporary memory.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from attnjax._src import dropout as dropout_lib
from attnjax._src import flex
from attnjax._src.masks import KQ, QK, MaskInfo, slice_block
from attnjax._src.numerics import compute_dtype, dot_general


@dataclasses.dataclass(frozen=True)
class _Static:
    """Hashable, static settings of one chunked call."""

    scale: float  # applied inside the kernel (1.0 when folded into q beforehand)
    logits_soft_cap: float | None
    dropout_rate: float
    precision: Any
    num_q: int  # number of query chunks
    num_k: int  # number of key chunks
    q_chunk: int
    k_chunk: int
    kv_len: int  # true S (keys >= S are padding)


def _pad_axis(x, axis: int, size: int, value=0):
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    pads = [(0, 0)] * x.ndim
    pads[axis] = (0, extra)
    return jnp.pad(x, pads, constant_values=value)


def _mm(a, b, contract_a: int, contract_b: int, precision, cdt):
    """Batched matmul over the leading (B·K) dim of two rank-3 blocks, result in ``cdt``."""
    return dot_general(a, b, (((contract_a,), (contract_b,)), ((0,), (0,))),
                       precision=precision, out_dtype=cdt)


def _logits(s, st: _Static, bias_blk, vis, cap=None, smod=None):
    """Scale, soft-cap, score_mod, bias and mask one raw score block (in its compute dtype).

    ``cap`` is a traced soft cap (a scalar array), used instead of ``st.logits_soft_cap``.
    ``smod``: the user's ``score_mod`` on this block (a function of the block), or ``None``.
    Returns ``(logits, t, u)``: ``t = tanh(u)`` and ``u`` = the scaled score over the cap, or
    ``None, None`` without a soft cap."""
    cdt = s.dtype
    if st.scale != 1.0:
        s = s * jnp.asarray(st.scale, cdt)
    t = u = None
    if cap is not None or st.logits_soft_cap is not None:
        c = jnp.asarray(st.logits_soft_cap if cap is None else cap, cdt)
        u = s / c
        t = jnp.tanh(u)
        s = c * t
    if smod is not None:
        s = smod(s)
    if bias_blk is not None:
        s = s + bias_blk.astype(cdt)
    if vis is not None:
        s = jnp.where(vis, s, -jnp.inf)
    return s, t, u


def _table_loops(counts, idx, masked_body, plain_body, carry):
    """Visit the partial blocks ``idx[0][:counts[0]]`` masked, then the full blocks
    ``idx[1][:counts[1]]`` unmasked (a block-sparse row of a class table)."""
    (pn, fn), (pi, fi) = counts, idx
    carry = lax.fori_loop(0, pn, lambda t, c: masked_body(pi[t], c), carry)
    return lax.fori_loop(0, fn, lambda t, c: plain_body(fi[t], c), carry)


def _row_lists(table):
    """Per row of a class table: (partial count, full count), (partial idx, full idx)."""
    pn, pi = flex._lists(table, flex.PARTIAL)
    fn, fi = flex._lists(table, flex.FULL)
    return (pn, fn), (pi, fi)


def _three_loops(ranges, masked_body, plain_body, carry, always_masked: bool):
    """Run blocks ``[lo, flo)`` and ``[fhi, hi)`` masked and ``[flo, fhi)`` unmasked."""
    lo, flo, fhi, hi = ranges
    if always_masked:
        return lax.fori_loop(lo, hi, masked_body, carry)
    carry = lax.fori_loop(lo, flo, masked_body, carry)
    carry = lax.fori_loop(flo, fhi, plain_body, carry)
    return lax.fori_loop(fhi, hi, masked_body, carry)


_varying_axes = flex.varying_axes


def _vma(*trees) -> tuple:
    """Mesh axes that some leaf of ``trees`` varies over (inside ``shard_map``); () elsewhere."""
    axes = set()
    for leaf in jax.tree_util.tree_leaves(trees):
        axes |= _varying_axes(leaf)
    return tuple(sorted(axes, key=str))


def _varying(x, axes: tuple):
    """Mark a fresh loop-carry init as varying over ``axes``, so that ``fori_loop``/``scan``
    carries keep one type under ``shard_map(check_vma=True)``. A no-op outside ``shard_map``."""
    have = _varying_axes(x)
    extra = tuple(a for a in axes if a not in have)
    return lax.pcast(x, extra, to="varying") if extra else x


def _needs_mask(info: MaskInfo, st: _Static) -> bool:
    return not info.is_trivial(st.num_k * st.k_chunk)


def _forward(qc, kc, vc, bias5, info: MaskInfo, seed, st: _Static, cap=None, sconsts=None):
    """Chunked forward on ``qc (nq, B, K, G, cq, H)``, ``kc/vc (nk, B, K, ck, H|Hv)``.

    ``cap``: a traced soft cap (scalar array), or ``None`` (``st.logits_soft_cap`` applies).
    ``sconsts``: the arrays ``info.score_mod`` closes over, as kernel operands (or ``None``:
    ``info.score_consts``).

    Returns ``out (nq, B, K, G, cq, Hv)`` (q's dtype) and ``lse (nq, B, K, G, cq)`` (f32).
    """
    nq, B, K, G, cq, H = qc.shape
    nk, ck = st.num_k, st.k_chunk
    Hv = vc.shape[-1]
    BK, R = B * K, G * cq
    padded_kv = nk * ck
    needs_mask = _needs_mask(info, st)
    cdt = compute_dtype(qc.dtype)
    vma = _vma(qc, kc, vc, bias5, info, seed)
    custom = (st.scale != 1.0 or st.logits_soft_cap is not None or cap is not None
              or bias5 is not None or info.score_mod is not None)
    table = info.block_table(cq, ck, nq, nk) if needs_mask else None
    lists = None if table is None else _row_lists(table)
    # Rank-3 blocks (free reshapes of the row-major 5-d/6-d layouts).
    qc = qc.reshape(nq, BK, R, H)
    kc = kc.reshape(nk, BK, ck, H)
    vc = vc.reshape(nk, BK, ck, Hv)

    def q_step(xs):
        i, qb, row = xs
        q_start = i * cq

        def make_body(masked: bool):
            def body(j, carry):
                m, l, acc = carry
                kb = lax.dynamic_index_in_dim(kc, j, keepdims=False)
                vb = lax.dynamic_index_in_dim(vc, j, keepdims=False)
                k_start = j * ck
                s = _mm(qb, kb, 2, 2, st.precision, cdt)  # (BK, G·cq, ck)
                vis = info.visible(q_start, cq, k_start, ck, QK, padded_kv) if masked else None
                if custom or vis is not None:
                    bias_blk = (None if bias5 is None
                                else slice_block(bias5, q_start, cq, k_start, ck, QK))
                    smod = None
                    if info.score_mod is not None:
                        def smod(x):
                            return info.apply_score_mod(x, q_start, cq, k_start, ck, QK, sconsts)
                    s5, _, _ = _logits(s.reshape(B, K, G, cq, ck), st, bias_blk, vis, cap, smod)
                    s = s5.reshape(BK, R, ck)
                m_new = jnp.maximum(m, jnp.max(s, axis=-1))
                m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
                p = jnp.exp(s - m_use[..., None])
                alpha = jnp.exp(m - m_use)
                l = l * alpha + jnp.sum(p, axis=-1)
                if st.dropout_rate > 0.0:
                    keep = dropout_lib.keep_mask(seed, K, G, B, q_start, cq, k_start, ck,
                                                 st.dropout_rate, QK).reshape(BK, R, ck)
                    p = jnp.where(keep, p * jnp.asarray(1.0 / (1.0 - st.dropout_rate), cdt), 0.0)
                pv = _mm(p.astype(vc.dtype), vb, 2, 1, st.precision, cdt)  # (BK, G·cq, Hv)
                acc = acc * alpha[..., None] + pv
                return m_new, l, acc

            return body

        carry = tuple(_varying(x, vma) for x in (
            jnp.full((BK, R), -jnp.inf, cdt),
            jnp.zeros((BK, R), cdt),
            jnp.zeros((BK, R, Hv), cdt),
        ))
        if row is not None:
            carry = _table_loops(*row, make_body(True), make_body(False), carry)
        elif needs_mask:
            ranges = info.key_block_ranges(q_start, cq, ck, nk)
            carry = _three_loops(ranges, make_body(True), make_body(False), carry, info.has_dense)
        else:
            carry = lax.fori_loop(0, nk, make_body(False), carry)
        m, l, acc = carry
        safe_l = jnp.where(l > 0, l, 1.0)
        out = acc / safe_l[..., None]
        lse = jnp.where(l > 0, m + jnp.log(safe_l), -jnp.inf)
        return out.astype(qc.dtype), lse

    out, lse = lax.map(q_step, (jnp.arange(nq, dtype=jnp.int32), qc, lists))
    return out.reshape(nq, B, K, G, cq, Hv), lse.reshape(nq, B, K, G, cq)


def _backward(qc, kc, vc, bias5, info: MaskInfo, seed, out, lse, dout, dlse, st: _Static,
              cap=None, sconsts=None):
    """Chunked backward (key blocks outer), same layouts as :func:`_forward`.

    Returns ``dqc, dkc, dvc, dbias5, dcap`` in the layouts (and dtypes) of
    ``qc, kc, vc, bias5, cap`` (``dcap`` is ``None`` without a traced ``cap``), and, when
    ``sconsts`` (the arrays ``info.score_mod`` closes over) is given, a sixth item: their
    cotangents (float0 zeros for integer arrays).
    """
    nq, B, K, G, cq, H = qc.shape
    nk, ck = st.num_k, st.k_chunk
    Hv = vc.shape[-1]
    BK, R = B * K, G * cq
    padded_kv = nk * ck
    needs_mask = _needs_mask(info, st)
    dt = qc.dtype
    cdt = compute_dtype(dt)
    custom = (st.scale != 1.0 or st.logits_soft_cap is not None or cap is not None
              or bias5 is not None or info.score_mod is not None)
    table = info.block_table(cq, ck, nq, nk) if needs_mask else None
    lists = None if table is None else _row_lists(table.T)
    want_dconsts = sconsts is not None
    sconsts = info.score_consts if sconsts is None else tuple(sconsts)
    # Cotangents of the score_mod's closed-over arrays: accumulated for floating ones only.
    diff = tuple(i for i, c in enumerate(sconsts) if jnp.issubdtype(c.dtype, jnp.inexact))
    # Rank-3 blocks (free reshapes of the row-major 5-d/6-d layouts).
    qc = qc.reshape(nq, BK, R, H)
    kc = kc.reshape(nk, BK, ck, H)
    vc = vc.reshape(nk, BK, ck, Hv)
    out = out.reshape(nq, BK, R, Hv)
    dout = dout.reshape(nq, BK, R, Hv)
    lse = lse.reshape(nq, BK, R)
    dlse = dlse.reshape(nq, BK, R)

    # D_i = rowsum(dO_i * O_i) - dlse_i (the log-sum-exp's own cotangent folds in here).
    delta = jnp.sum(dout.astype(cdt) * out.astype(cdt), axis=-1) - dlse.astype(cdt)
    # Fully hidden rows have lse = -inf; exp(s - inf) = 0 gives them zero weights and gradients.
    lse_use = jnp.where(jnp.isfinite(lse), lse, jnp.inf)
    vma = _vma(qc, kc, vc, bias5, info, seed, out, lse, dout, dlse)
    # Inside shard_map, a closed-over array that is invariant over a mesh axis would be cast to
    # varying implicitly in each block's score_mod, and the VJP of that cast is a psum, once
    # per block (a collective inside data-dependent loops: wrong counts, or a deadlock). Cast
    # it once here instead: the cotangents stay per device and :func:`sum_to_vma` sums them
    # once, at the end.
    sconsts = tuple(_varying(c, vma) for c in sconsts)
    dq_t0 = _varying(jnp.zeros((nq, BK, H, R), cdt), vma)
    dbias0 = None if bias5 is None else _varying(jnp.zeros(bias5.shape, cdt), vma)
    dcap0 = None if cap is None else _varying(jnp.zeros((), cdt), vma)
    dsc0 = tuple(_varying(jnp.zeros(sconsts[i].shape, compute_dtype(sconsts[i].dtype)), vma)
                 for i in diff)

    def k_step(carry, xs):
        dq_t, (dbias, dcap, dsc) = carry
        j, kb, vb, row = xs
        k_start = j * ck
        k_t = jnp.swapaxes(kb, -1, -2)  # (BK, H, ck): one small transpose per key block

        def make_body(masked: bool):
            def body(i, c):
                dk, dv, dq_t, (dbias, dcap, dsc) = c
                qb = lax.dynamic_index_in_dim(qc, i, keepdims=False)
                dob = lax.dynamic_index_in_dim(dout, i, keepdims=False)
                lse_b = lax.dynamic_index_in_dim(lse_use, i, keepdims=False)
                d_b = lax.dynamic_index_in_dim(delta, i, keepdims=False)
                q_start = i * cq
                s_t = _mm(kb, qb, 2, 2, st.precision, cdt)  # (BK, ck, G·cq)
                vis = info.visible(q_start, cq, k_start, ck, KQ, padded_kv) if masked else None
                t = u = None
                mod_vjp = []
                if custom or vis is not None:
                    bias_blk = (None if bias5 is None
                                else slice_block(bias5, q_start, cq, k_start, ck, KQ))
                    smod = None
                    if info.score_mod is not None:
                        def smod(x):
                            def f(x, cs):
                                return info.apply_score_mod(x, q_start, cq, k_start, ck, KQ, cs)

                            y, fn = jax.vjp(f, x, sconsts)
                            mod_vjp.append(fn)
                            return y
                    z5, t, u = _logits(s_t.reshape(B, K, ck, G, cq), st, bias_blk, vis, cap, smod)
                    s_t = z5.reshape(BK, ck, R)
                    if t is not None:
                        t, u = t.reshape(BK, ck, R), u.reshape(BK, ck, R)
                p_t = jnp.exp(s_t - lse_b[:, None, :])
                if st.dropout_rate > 0.0:
                    keep = dropout_lib.keep_mask(seed, K, G, B, q_start, cq, k_start, ck,
                                                 st.dropout_rate, KQ).reshape(BK, ck, R)
                    inv = jnp.asarray(1.0 / (1.0 - st.dropout_rate), cdt)
                    pd_t = jnp.where(keep, p_t * inv, 0.0)
                else:
                    pd_t = p_t
                dv = dv + _mm(pd_t.astype(vc.dtype), dob, 2, 1, st.precision, cdt)  # (BK, ck, Hv)
                dp_t = _mm(vb, dob, 2, 2, st.precision, cdt)  # (BK, ck, G·cq)
                if st.dropout_rate > 0.0:
                    dp_t = jnp.where(keep, dp_t * inv, 0.0)
                ds_t = p_t * (dp_t - d_b[:, None, :])
                if dbias is not None:
                    dbias = _add_dbias(dbias, ds_t.reshape(B, K, ck, G, cq), q_start, cq,
                                       k_start, ck)
                if mod_vjp:
                    ds5, dcs = mod_vjp[0](ds_t.reshape(B, K, ck, G, cq))
                    ds_t = ds5.reshape(BK, ck, R)
                    dsc = tuple(a + dcs[i].astype(a.dtype) for a, i in zip(dsc, diff, strict=True))
                if dcap is not None:
                    # d(c·tanh(x/c))/dc = tanh(u) - u·(1 - tanh(u)²), u = x/c
                    dcap = dcap + jnp.sum(ds_t * (t - u * (1.0 - t * t)))
                if t is not None:
                    ds_t = ds_t * (1.0 - t * t)
                if st.scale != 1.0:
                    ds_t = ds_t * jnp.asarray(st.scale, cdt)
                ds_c = ds_t.astype(dt)
                dk = dk + _mm(ds_c, qb, 2, 1, st.precision, cdt)  # (BK, ck, H)
                dq_blk = _mm(k_t, ds_c, 2, 1, st.precision, cdt)  # (BK, H, G·cq)
                prev = lax.dynamic_index_in_dim(dq_t, i, keepdims=False)
                dq_t = lax.dynamic_update_index_in_dim(dq_t, prev + dq_blk, i, 0)
                return dk, dv, dq_t, (dbias, dcap, dsc)

            return body

        c = (_varying(jnp.zeros((BK, ck, H), cdt), vma),
             _varying(jnp.zeros((BK, ck, Hv), cdt), vma), dq_t, (dbias, dcap, dsc))
        if row is not None:
            c = _table_loops(*row, make_body(True), make_body(False), c)
        elif needs_mask:
            ranges = info.query_block_ranges(k_start, ck, cq, nq)
            c = _three_loops(ranges, make_body(True), make_body(False), c, info.has_dense)
        else:
            c = lax.fori_loop(0, nq, make_body(False), c)
        dk, dv, dq_t, (dbias, dcap, dsc) = c
        return (dq_t, (dbias, dcap, dsc)), (dk.astype(kc.dtype), dv.astype(vc.dtype))

    (dq_t, (dbias, dcap, dsc)), (dkc, dvc) = lax.scan(
        k_step, (dq_t0, (dbias0, dcap0, dsc0)), (jnp.arange(nk, dtype=jnp.int32), kc, vc, lists)
    )
    dqc = jnp.swapaxes(dq_t, -1, -2).astype(dt).reshape(nq, B, K, G, cq, H)
    if dbias is not None:
        dbias = dbias.astype(bias5.dtype)
    if dcap is not None:
        dcap = dcap.astype(cap.dtype)
    grads = (dqc, dkc.reshape(nk, B, K, ck, H), dvc.reshape(nk, B, K, ck, Hv), dbias, dcap)
    if not want_dconsts:
        return grads
    dconsts = [np.zeros(c.shape, jax.dtypes.float0) for c in sconsts]
    for a, i in zip(dsc, diff, strict=True):
        dconsts[i] = a.astype(sconsts[i].dtype)
    return grads + (tuple(dconsts),)


def _add_dbias(dbias, ds_t, q_start, cq, k_start, ck):
    """Add one block's bias gradient (summed over the bias's broadcast dims) into ``dbias``."""
    g = jnp.transpose(ds_t, (0, 1, 3, 4, 2))  # (B, K, G, cq, ck)
    axes = tuple(a for a in range(5) if dbias.shape[a] == 1 and g.shape[a] != 1)
    if axes:
        g = jnp.sum(g, axis=axes, keepdims=True)
    # One index dtype for every start (int32), whether or not jax_enable_x64 is on.
    zero = jnp.int32(0)
    starts = (zero, zero, zero,
              jnp.asarray(q_start if dbias.shape[3] != 1 else 0, jnp.int32),
              jnp.asarray(k_start if dbias.shape[4] != 1 else 0, jnp.int32))
    prev = lax.dynamic_slice(dbias, starts, g.shape)
    return lax.dynamic_update_slice(dbias, prev + g, starts)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _core(qc, kc, vc, bias5, info, seed, st, cap, sconsts):
    return _forward(qc, kc, vc, bias5, info, seed, st, cap, sconsts)


def _core_fwd(qc, kc, vc, bias5, info, seed, st, cap, sconsts):
    out, lse = _forward(qc, kc, vc, bias5, info, seed, st, cap, sconsts)
    return (out, lse), (qc, kc, vc, bias5, info, seed, cap, sconsts, out, lse)


def _core_bwd(st, res, cts):
    qc, kc, vc, bias5, info, seed, cap, sconsts, out, lse = res
    dout, dlse = cts
    dqc, dkc, dvc, dbias, dcap, dsc = _backward(qc, kc, vc, bias5, info, seed, out, lse, dout,
                                                dlse, st, cap, sconsts)
    dsc = tuple(sum_to_vma(d, c) for d, c in zip(dsc, sconsts, strict=True))
    return dqc, dkc, dvc, dbias, None, None, dcap, dsc


def sum_to_vma(ct, primal):
    """The cotangent ``ct`` of ``primal`` summed (``psum``) over the ``shard_map`` mesh axes
    that ``ct`` varies over and ``primal`` does not: a value that is the same on every device
    of an axis is one value, whose cotangent is the sum of every device's part. A no-op
    outside ``shard_map`` and for float0 cotangents."""
    if getattr(ct, "dtype", None) == jax.dtypes.float0:
        return ct
    extra = tuple(a for a in _vma(ct) if a not in _varying_axes(primal))
    return lax.psum(ct, extra) if extra else ct


_core.defvjp(_core_fwd, _core_bwd)


def merge_partials(o1, lse1, o2, lse2):
    """Exact merge of two normalised partial attentions over disjoint key sets.

    ``o (..., Hv)`` with log-sum-exps ``lse (...)``; ``-inf`` means "saw no key". Returns the
    merged ``(out, lse)``; rows that saw no key in either part stay zero with ``lse = -inf``.
    Used by split-K decoding and by ring attention.
    """
    m = jnp.maximum(lse1, lse2)
    m_use = jnp.where(jnp.isfinite(m), m, 0.0)
    w1, w2 = jnp.exp(lse1 - m_use), jnp.exp(lse2 - m_use)
    s = w1 + w2
    safe = jnp.where(s > 0, s, 1.0)
    lse = jnp.where(s > 0, m_use + jnp.log(safe), -jnp.inf)
    inv = jnp.where(s > 0, 1.0 / safe, 0.0)
    return o1 * (w1 * inv)[..., None] + o2 * (w2 * inv)[..., None], lse


def kernel_static(q, *, scale, logits_soft_cap, dropout_rate, precision, num_q, num_k,
                  q_chunk, k_chunk, kv_len):
    """The kernel's static settings, and ``q`` with the scale folded in where that is exact
    enough (float32/64); in lower precision the scale is applied per block instead."""
    fold = jnp.dtype(q.dtype).itemsize >= 4
    if fold:
        q = q * jnp.asarray(scale, q.dtype)
    st = _Static(
        scale=1.0 if fold else float(scale),
        logits_soft_cap=None if logits_soft_cap is None else float(logits_soft_cap),
        dropout_rate=float(dropout_rate),
        precision=precision,
        num_q=num_q, num_k=num_k, q_chunk=q_chunk, k_chunk=k_chunk, kv_len=kv_len,
    )
    return q, st


def q_to_chunks(x, num_chunks: int, chunk: int, num_kv_heads: int):
    """``(B, T, N, H)`` -> ``(nq, B, K, G, cq, H)``, padded to whole chunks."""
    B, _, N, H = x.shape
    x = _pad_axis(x, 1, num_chunks * chunk)
    x = x.reshape(B, num_chunks, chunk, num_kv_heads, N // num_kv_heads, H)
    return x.transpose(1, 0, 3, 4, 2, 5)


def kv_to_chunks(x, num_chunks: int, chunk: int):
    """``(B, S, K, H)`` -> ``(nk, B, K, ck, H)``, padded to whole chunks."""
    B, _, K, H = x.shape
    x = _pad_axis(x, 1, num_chunks * chunk).reshape(B, num_chunks, chunk, K, H)
    return x.transpose(1, 0, 3, 2, 4)


def attention_chunked(q, k, v, bias5, info: MaskInfo, *, scale: float, logits_soft_cap,
                      dropout_rate: float, seed, precision, q_chunk: int, k_chunk: int):
    """Chunked attention on validated inputs.

    Args:
      q: ``(B, T, N, H)``; k: ``(B, S, K, H)``; v: ``(B, S, K, Hv)``.
      bias5: ``None`` or ``(Bb, Kb, Gb, Tb, Sb)`` (grouped, unpadded, each dim 1 or full).
      info: the masks, with a grouped (unpadded) dense mask.
      seed: uint32 scalar dropout seed, or None.
      logits_soft_cap: a Python float, ``None``, or a scalar array (traced under ``jit``;
        then it is a differentiable operand of the kernel).

    Returns:
      ``out (B, T, N, Hv)`` in q's dtype and ``lse (B, T, N)`` in the compute dtype
      (float32, or float64 for float64 inputs).
    """
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    Hv = v.shape[-1]
    nq, nk = -(-T // q_chunk), -(-S // k_chunk)
    tp, sp = nq * q_chunk, nk * k_chunk

    cap = None
    if isinstance(logits_soft_cap, jax.Array):
        # A traced soft cap is an operand of the kernel (differentiable), not a static setting.
        cap = jnp.asarray(logits_soft_cap, compute_dtype(q.dtype))
        logits_soft_cap = None
    q, st = kernel_static(q, scale=scale, logits_soft_cap=logits_soft_cap,
                          dropout_rate=dropout_rate, precision=precision, num_q=nq, num_k=nk,
                          q_chunk=q_chunk, k_chunk=k_chunk, kv_len=S)
    qc = q_to_chunks(q, nq, q_chunk, K)
    kc = kv_to_chunks(k, nk, k_chunk)
    vc = kv_to_chunks(v, nk, k_chunk)
    if bias5 is not None:
        if bias5.shape[3] != 1:
            bias5 = _pad_axis(bias5, 3, tp)
        if bias5.shape[4] != 1:
            bias5 = _pad_axis(bias5, 4, sp)
    info = _pad_info(info, tp, sp)
    # The score_mod's closed-over arrays are explicit (differentiable) operands of the kernel.
    sconsts = info.score_consts
    info = dataclasses.replace(info, score_consts=())
    out, lse = _core(qc, kc, vc, bias5, info, seed, st, cap, sconsts)
    out = out.transpose(1, 0, 4, 2, 3, 5).reshape(B, tp, N, Hv)[:, :T]
    lse = lse.transpose(1, 0, 4, 2, 3).reshape(B, tp, N)[:, :T]
    return out, lse


def _pad_info(info: MaskInfo, tp: int, sp: int) -> MaskInfo:
    """Pad the per-position arrays of ``info`` to the chunk-padded lengths."""
    changes = {}
    if info.q_segment_ids is not None:
        changes["q_segment_ids"] = _pad_axis(info.q_segment_ids, 1, tp)
        changes["kv_segment_ids"] = _pad_axis(info.kv_segment_ids, 1, sp)
    if info.mask is not None:
        m = info.mask
        if m.shape[3] != 1:
            m = _pad_axis(m, 3, tp, False)
        if m.shape[4] != 1:
            m = _pad_axis(m, 4, sp, False)
        changes["mask"] = m
    return dataclasses.replace(info, **changes) if changes else info
