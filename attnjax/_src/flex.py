"""Flexible attention: user ``mask_mod`` / ``score_mod`` callables, block masks, block classes.

* :func:`hoist` / :func:`call_mod`: a ``score_mod`` (or ``mask_mod``) may close over arrays (an
  ALiBi slope, a relative-position bias table, document ids). Gradients with respect to those
  arrays must cross the chunked kernel's ``custom_vjp``, which only differentiates its explicit
  operands. :func:`hoist` traces the callable once to find the *traced* arrays it closes over
  (closure conversion, as :func:`jax.closure_convert`, but shape-agnostic); the kernel receives
  them as explicit operands and :func:`call_mod` re-traces the callable at each block's shape,
  substituting the kernel's operands for the closed-over values (matched by identity). Concrete
  (untraced) closed-over arrays are constants and stay where they are. Inside ``shard_map``
  the backward pass casts them to varying (see :func:`_eval_varying`), so their cotangents are
  summed over devices once, not once per block.
* :func:`mod_depends_on`: whether a callable's output depends on each argument (traced data
  dependence); :func:`create_block_mask` uses it to refuse ``B=None`` / ``N=None`` for masks
  that depend on ``b`` / ``h``.
* :class:`BlockMask` and :func:`create_block_mask`: a per-(query block, key block)
  classification (0 empty, 1 partial, 2 full) built block by block, never as a T×S array.
* :func:`block_classes`: the class table ``(nq, nk)`` of one chunked call, combining every mask
  kind that can be classified per block (causal/window/lengths/padding, segment-id ranges, a
  block mask); the chunked kernel then visits partial blocks masked, full blocks unmasked and
  never touches empty ones.

Shape letters: B batch, T query length, S key length, N query heads, K kv heads, G = N // K.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jex_core

Array = jax.Array

EMPTY, PARTIAL, FULL = 0, 1, 2


# ------------------------------------------------------------------------------------------------
# Closure conversion of user callables.


def hoist(fn: Callable, *example_args) -> tuple[tuple, tuple[int, ...]]:
    """The traced arrays ``fn`` closes over when called on ``example_args``, and their ids.

    Returns ``(consts, ids)``: ``consts`` become explicit (differentiable) operands of a
    kernel; ``ids`` (static) let :func:`call_mod` find them again by identity.
    """
    closed = jax.make_jaxpr(fn)(*example_args)
    consts, ids = [], []
    for c in closed.consts:
        if isinstance(c, jax.core.Tracer) and id(c) not in ids:
            consts.append(c)
            ids.append(id(c))
    return tuple(consts), tuple(ids)


def call_mod(fn: Callable, ids: tuple[int, ...], consts, *args):
    """``fn(*args)`` with each closed-over traced array of id ``ids[i]`` replaced by
    ``consts[i]`` (the kernel's own operand). Without hoisted arrays, a plain call."""
    if not ids:
        return fn(*args)
    closed = jax.make_jaxpr(fn)(*args)
    vals = []
    retyped = False
    for c in closed.consts:
        if isinstance(c, jax.core.Tracer):
            try:
                new = consts[ids.index(id(c))]
            except ValueError:
                raise ValueError(
                    "a mask_mod/score_mod closes over a traced array that was not present when "
                    "attnjax first traced it; build the callable once, outside the attention "
                    "call, and do not let it create traced arrays depending on the call"
                ) from None
            retyped |= varying_axes(new) != varying_axes(c)
            vals.append(new)
        else:
            vals.append(c)
    if retyped:
        return _eval_varying(closed.jaxpr, vals, args)[0]
    out = jax.core.eval_jaxpr(closed.jaxpr, vals, *args)
    return out[0]


def varying_axes(x) -> frozenset:
    """The ``shard_map`` mesh axes ``x`` varies over (empty outside ``shard_map``)."""
    aval = jax.typeof(x)
    mat = getattr(aval, "manual_axis_type", None)  # jax >= 0.10
    if mat is not None:
        return frozenset(mat.varying)
    return frozenset(getattr(aval, "vma", ()) or ())


def _to_varying(x, axes):
    extra = tuple(sorted(set(axes) - varying_axes(x), key=str))
    return lax.pcast(x, extra, to="varying") if extra else x


def _eval_varying(jaxpr, consts, args):
    """``eval_jaxpr`` for a jaxpr traced with a closed-over array invariant over some
    ``shard_map`` axes, evaluated with a replacement that varies over them (the backward pass
    casts it, so that its cotangent is not psum-ed once per block): each equation's inputs are
    cast to the axes any of them varies over, as tracing would have done, and the recorded
    ``pvary`` casts skip axes already varying. ``jit`` calls are inlined."""
    env = {}

    def read(v):
        return v.val if isinstance(v, jex_core.Literal) else env[v]

    env.update(zip(jaxpr.constvars, consts, strict=True))
    env.update(zip(jaxpr.invars, args, strict=True))
    for eqn in jaxpr.eqns:
        vals = [read(v) for v in eqn.invars]
        name = eqn.primitive.name
        if name == "pvary":
            outs = [_to_varying(x, eqn.params["axes"]) for x in vals]
        elif name in ("jit", "pjit"):
            inner = eqn.params["jaxpr"]
            outs = _eval_varying(inner.jaxpr, inner.consts, vals)
        else:
            axes = frozenset().union(*(varying_axes(x) for x in vals))
            vals = [_to_varying(x, axes) for x in vals]
            outs = eqn.primitive.bind(*vals, **eqn.primitive.get_bind_params(eqn.params))
            if not eqn.primitive.multiple_results:
                outs = [outs]
        for v, x in zip(eqn.outvars, outs, strict=True):
            env[v] = x
    return [read(v) for v in jaxpr.outvars]


def index_arrays(layout: str, B: int, K: int, G: int, q_pos, k_pos):
    """Broadcast ``(b, h, q_idx, kv_idx)`` int32 index arrays for one score block.

    ``q_pos (Bq, Tc)`` (Bq = 1 or B), ``k_pos (Bk, Sc)``. Layout "qk": block ``(B, K, G, Tc, Sc)``;
    "kq": ``(B, K, Sc, G, Tc)``; "bnts": ``(B, N, T, S)`` (``G`` is then N and ``K`` 1).
    """
    i32 = jnp.int32
    if layout == "qk":
        b = jnp.arange(B, dtype=i32).reshape(B, 1, 1, 1, 1)
        h = jnp.arange(K * G, dtype=i32).reshape(1, K, G, 1, 1)
        q = q_pos[:, None, None, :, None]
        k = k_pos[:, None, None, None, :]
    elif layout == "kq":
        b = jnp.arange(B, dtype=i32).reshape(B, 1, 1, 1, 1)
        h = jnp.arange(K * G, dtype=i32).reshape(1, K, 1, G, 1)
        q = q_pos[:, None, None, None, :]
        k = k_pos[:, None, :, None, None]
    else:
        b = jnp.arange(B, dtype=i32).reshape(B, 1, 1, 1)
        h = jnp.arange(K * G, dtype=i32).reshape(1, K * G, 1, 1)
        q = q_pos[:, None, :, None]
        k = k_pos[:, None, None, :]
    return b, h, q.astype(i32), k.astype(i32)


def check_mods(mask_mod, score_mod, B: int, N: int, T: int, S: int, score_dtype) -> None:
    """Trace ``mask_mod``/``score_mod`` abstractly on the call's index arrays; raise clear
    errors for a non-bool mask, a score of another shape or dtype, or a non-callable."""
    b, h, q, k = index_arrays("bnts", B, 1, N, jnp.arange(T)[None], jnp.arange(S)[None])
    full = (B, N, T, S)
    if mask_mod is not None:
        if not callable(mask_mod):
            raise TypeError(f"mask_mod must be a callable (b, h, q_idx, kv_idx) -> bool, got {mask_mod!r}")
        try:
            out = jax.eval_shape(mask_mod, b, h, q, k)
        except (TypeError, ValueError, IndexError) as e:
            raise TypeError(f"mask_mod(b, h, q_idx, kv_idx) failed on broadcast index arrays: {e}") from e
        if not isinstance(out, jax.ShapeDtypeStruct) or out.dtype != jnp.bool_:
            got = getattr(out, "dtype", type(out).__name__)
            raise TypeError(f"mask_mod must return a bool array (True = attend), got {got}")
        try:
            jnp.broadcast_shapes(out.shape, full)
        except ValueError:
            raise ValueError(
                f"mask_mod returned shape {out.shape}, which does not broadcast to (B, N, T, S) = {full}"
            ) from None
    if score_mod is not None:
        if not callable(score_mod):
            raise TypeError(
                f"score_mod must be a callable (score, b, h, q_idx, kv_idx) -> score, got {score_mod!r}"
            )
        s = jax.ShapeDtypeStruct(full, score_dtype)
        try:
            out = jax.eval_shape(score_mod, s, b, h, q, k)
        except (TypeError, ValueError, IndexError) as e:
            raise TypeError(f"score_mod(score, b, h, q_idx, kv_idx) failed on a score block: {e}") from e
        if not isinstance(out, jax.ShapeDtypeStruct) or out.shape != full or out.dtype != score_dtype:
            got = (f"shape {out.shape} and dtype {out.dtype}" if isinstance(out, jax.ShapeDtypeStruct)
                   else type(out).__name__)
            raise ValueError(
                f"score_mod must return an array of the score's shape {full} and dtype "
                f"{jnp.dtype(score_dtype)}, got {got}"
            )


# ------------------------------------------------------------------------------------------------
# Block masks.


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockMask:
    """Which (query block, key block) pairs of a ``mask_mod`` are empty, partial or full.

    Build it with :func:`attnjax.create_block_mask`; pass it as ``block_mask=`` to
    :func:`attnjax.dot_product_attention` (reusable across layers with the same shapes). Array
    fields are pytree leaves (int32), the rest static. ``Bm`` is B or 1 and ``Nm`` is N or 1
    (broadcast when built with ``B=None`` / ``N=None``); ``nq = ceil(T / block_q)``,
    ``nk = ceil(S / block_k)``.

    Attributes:
      classes: int8 ``(Bm, Nm, nq, nk)``: 0 empty (skipped), 1 partial (masked), 2 full
        (visited without mask work).
      kv_num_blocks: ``(Bm, Nm, nq)``: the number of partial key blocks of each query block;
        kv_indices ``(Bm, Nm, nq, nk)``: their indices first (the rest is padding).
      full_kv_num_blocks, full_kv_indices: the same for full key blocks.
      q_num_blocks, q_indices ``(Bm, Nm, nk, nq)``, full_q_num_blocks, full_q_indices: the
        transposed lists (query blocks of each key block), for backward passes.
      seq_lengths: ``(T, S)``. block_size: ``(block_q, block_k)``.
      mask_mod: the callable it was built from (applied on partial blocks).
      query_offset: the static query offset it was built for (``q_idx = i + query_offset``).
    """

    classes: Array
    kv_num_blocks: Array
    kv_indices: Array
    full_kv_num_blocks: Array
    full_kv_indices: Array
    q_num_blocks: Array
    q_indices: Array
    full_q_num_blocks: Array
    full_q_indices: Array
    seq_lengths: tuple[int, int] = dataclasses.field(metadata=dict(static=True))
    block_size: tuple[int, int] = dataclasses.field(metadata=dict(static=True))
    mask_mod: Callable | None = dataclasses.field(default=None, metadata=dict(static=True))
    query_offset: int = dataclasses.field(default=0, metadata=dict(static=True))

    @property
    def shape(self) -> tuple[int, ...]:
        """``(Bm, Nm, T, S)``."""
        return tuple(self.classes.shape[:2]) + tuple(self.seq_lengths)

    def sparsity(self) -> Array:
        """Fraction of blocks that are empty (skipped)."""
        return jnp.mean((self.classes == EMPTY).astype(jnp.float32))


def _lists(classes, want: int):
    """``classes (..., n)`` -> (count (...), indices (..., n)) of the entries equal to ``want``."""
    hit = classes == want
    order = jnp.argsort(jnp.logical_not(hit), axis=-1, stable=True).astype(jnp.int32)
    return jnp.sum(hit, axis=-1, dtype=jnp.int32), order


def block_mask_from_classes(classes, seq_lengths, block_size, mask_mod=None,
                            query_offset: int = 0) -> BlockMask:
    """A :class:`BlockMask` from a class table ``(Bm, Nm, nq, nk)``."""
    classes = jnp.asarray(classes, jnp.int8)
    t = jnp.swapaxes(classes, -1, -2)
    kn, ki = _lists(classes, PARTIAL)
    fkn, fki = _lists(classes, FULL)
    qn, qi = _lists(t, PARTIAL)
    fqn, fqi = _lists(t, FULL)
    return BlockMask(classes, kn, ki, fkn, fki, qn, qi, fqn, fqi,
                     seq_lengths=tuple(int(x) for x in seq_lengths),
                     block_size=tuple(int(x) for x in block_size), mask_mod=mask_mod,
                     query_offset=int(query_offset))


def mod_depends_on(fn: Callable, *example_args) -> tuple[bool, ...]:
    """Whether the output of ``fn(*example_args)`` is data-dependent on each argument.

    Traces ``fn`` once (:func:`jax.make_jaxpr`, abstract arguments are fine) and propagates
    dependence forward through the equations: an equation's outputs depend on an argument
    when any of its inputs does. Conservative (an equation with a sub-jaxpr counts as depending
    on all its inputs), so ``False`` means the argument certainly does not matter.
    """
    closed = jax.make_jaxpr(fn)(*example_args)
    jaxpr = closed.jaxpr
    result = []
    for var in jaxpr.invars:
        dep = {var}
        for eqn in jaxpr.eqns:
            if any(isinstance(x, jex_core.Var) and x in dep for x in eqn.invars):
                dep.update(eqn.outvars)
        result.append(any(isinstance(x, jex_core.Var) and x in dep for x in jaxpr.outvars))
    return tuple(result)


def _depends_on_b_h(mask_mod: Callable, T: int, S: int) -> tuple[bool, bool]:
    """Whether ``mask_mod``'s output depends on its ``b`` and ``h`` arguments (by tracing)."""
    idx = jax.ShapeDtypeStruct((1, 1, 1, 1), jnp.int32)
    deps = mod_depends_on(mask_mod, idx, idx, jax.ShapeDtypeStruct((1, 1, T, 1), jnp.int32),
                          jax.ShapeDtypeStruct((1, 1, 1, S), jnp.int32))
    return deps[0], deps[1]


def create_block_mask(mask_mod: Callable, B: int | None, N: int | None, T: int, S: int, *,
                      block_size: int | tuple[int, int] | None = None,
                      query_offset: int = 0) -> BlockMask:
    """Classify every (query block, key block) pair of ``mask_mod`` as empty, partial or full.

    ``mask_mod(b, h, q_idx, kv_idx) -> bool`` (True = attend) is evaluated one block pair at a
    time (a ``lax.map`` over blocks), so memory is O(number of blocks + one block), never T×S;
    it works under ``jit`` and for data-dependent mask_mods (closing over arrays). Positions
    past ``T`` / ``S`` (the padding of a last partial block) are ignored.

    ``B=None`` / ``N=None`` build a single row / head (``mask_mod`` is called with ``b = 0`` /
    ``h = 0`` only) and the result broadcasts over every batch row / head of the attention
    call. That is only right for a ``mask_mod`` that ignores ``b`` / ``h``, so a ``mask_mod``
    whose output depends on that argument (found by tracing it) raises ``ValueError``: pass
    the size instead. A block mask built with ``B=1`` (``N=1``) serves a call with more rows
    (heads) only when ``mask_mod`` does not depend on ``b`` (``h``); else the call raises
    ``ValueError`` (build it with the call's size).

    Args:
      mask_mod: the mask, element-wise in jnp operations on broadcast int32 index arrays.
      B: batch size, or ``None`` when the mask is the same for every row (one row is built
        and broadcast; ``mask_mod`` must not depend on ``b``).
      N: query heads, or ``None`` when the mask is the same for every head (one head is
        built and broadcast; ``mask_mod`` must not depend on ``h``).
      T: query length; S: key length.
      block_size: an int, a ``(block_q, block_k)`` pair, or ``None`` for attnjax's default
        chunk size for ``B·N`` (512 for ``B·N <= 8``). It becomes the chunk size of every call
        that uses this block mask. Blocks larger than the sequence are shrunk to it.
      query_offset: a static int: queries sit at ``q_idx = i + query_offset`` (chunked
        prefill); the attention call must pass the same ``query_offset``.

    Returns:
      A :class:`BlockMask`.

    Raises:
      TypeError: a ``mask_mod`` that does not return bool.
      ValueError: sizes that are not positive ints; ``B=None`` (``N=None``) with a
        ``mask_mod`` that depends on ``b`` (``h``).

    Example:
      >>> causal = lambda b, h, q, kv: q >= kv
      >>> bm = create_block_mask(causal, None, None, 1024, 1024, block_size=256)
      >>> bm.classes[0, 0]
      Array([[1, 0, 0, 0],
             [2, 1, 0, 0],
             [2, 2, 1, 0],
             [2, 2, 2, 1]], dtype=int8)
    """
    from attnjax._src.config import as_chunk_size  # noqa: PLC0415 (avoid an import cycle)

    for name, val in (("B", B), ("N", N), ("T", T), ("S", S)):
        if val is None and name in ("B", "N"):
            continue
        if isinstance(val, bool | np.bool_) or not isinstance(val, int | np.integer) or val < 1:
            raise ValueError(f"create_block_mask: {name} must be a positive int, got {val!r}")
    B, N, T, S = (None if x is None else int(x) for x in (B, N, T, S))
    Bm, Nm = B or 1, N or 1
    if block_size is None:
        bq, bk = as_chunk_size(None, Bm * Nm).resolve(T, S)
    else:
        bq, bk = as_chunk_size(block_size).resolve(T, S)
    check_mods(mask_mod, None, Bm, Nm, T, S, jnp.float32)
    if B is None or N is None:
        deps = _depends_on_b_h(mask_mod, T, S)
        for name, size, arg, dep in (("B", B, "b", deps[0]), ("N", N, "h", deps[1])):
            if size is None and dep:
                raise ValueError(
                    f"create_block_mask: mask_mod depends on its {arg!r} argument but {name}=None "
                    f"(one {'row' if arg == 'b' else 'head'} built and broadcast to all); pass "
                    f"{name}=<the attention call's {'batch size' if arg == 'b' else 'query heads'}>"
                )
    nq, nk = -(-T // bq), -(-S // bk)
    bi = jnp.arange(Bm, dtype=jnp.int32).reshape(Bm, 1, 1, 1)
    hi = jnp.arange(Nm, dtype=jnp.int32).reshape(1, Nm, 1, 1)

    def one(ij):
        i, j = ij // nk, ij % nk
        q = (i * bq + jnp.arange(bq, dtype=jnp.int32)).reshape(1, 1, bq, 1)
        real = (q < T)
        q = q + query_offset
        k = (j * bk + jnp.arange(bk, dtype=jnp.int32)).reshape(1, 1, 1, bk)
        real = real & (k < S)
        vis = jnp.broadcast_to(mask_mod(bi, hi, q, k), (Bm, Nm, bq, bk))
        any_vis = jnp.any(vis & real, axis=(2, 3))
        all_vis = jnp.all(vis | ~real, axis=(2, 3))
        return jnp.where(any_vis, jnp.where(all_vis, FULL, PARTIAL), EMPTY).astype(jnp.int8)

    # One block pair per step (a few pairs per step when blocks are small).
    per_step = max(1, min(nq * nk, (1 << 16) // (bq * bk * Bm * Nm) or 1))
    cls = lax.map(one, jnp.arange(nq * nk, dtype=jnp.int32), batch_size=per_step)  # (nq·nk, Bm, Nm)
    classes = jnp.transpose(cls.reshape(nq, nk, Bm, Nm), (2, 3, 0, 1))
    return block_mask_from_classes(classes, (T, S), (bq, bk), mask_mod, query_offset)


def check_block_mask(block_mask, B: int, N: int, T: int, S: int, mask_mod, query_offset) -> None:
    """Raise a clear error when ``block_mask`` was built for other shapes, another mask or
    another query offset."""
    if not isinstance(block_mask, BlockMask):
        raise TypeError(f"block_mask must be an attnjax.BlockMask (create_block_mask), got {type(block_mask).__name__}")
    Bm, Nm = block_mask.classes.shape[:2]
    if tuple(block_mask.seq_lengths) != (T, S) or Bm not in (1, B) or Nm not in (1, N):
        raise ValueError(
            f"block_mask was built for (B, N, T, S) = {block_mask.shape}, which does not match "
            f"this call's (B, N, T, S) = {(B, N, T, S)} (B and N may be 1)"
        )
    if query_offset is None:
        query_offset = 0
    if isinstance(query_offset, jax.Array | np.ndarray) and query_offset.ndim == 0 and not \
            isinstance(query_offset, jax.core.Tracer):
        query_offset = int(query_offset)
    if not isinstance(query_offset, int | np.integer) or int(query_offset) != block_mask.query_offset:
        raise ValueError(
            f"block_mask was built for query_offset={block_mask.query_offset}, got "
            f"query_offset={query_offset!r}; pass the same static int to create_block_mask"
        )
    if mask_mod is not None and block_mask.mask_mod is not None and mask_mod is not block_mask.mask_mod:
        raise ValueError(
            "mask_mod differs from the mask_mod the block_mask was built from; pass the same "
            "callable object to create_block_mask and dot_product_attention (or omit mask_mod)"
        )
    if block_mask.mask_mod is not None and ((Bm == 1 < B) or (Nm == 1 < N)):
        # One row / head of classes broadcast over the call's: right only for a mask_mod that
        # ignores b / h (its classes hold for b = 0 / h = 0 only; full blocks skip the mask).
        deps = _depends_on_b_h(block_mask.mask_mod, T, S)
        for name, built, size, arg, dep in (("B", Bm, B, "b", deps[0]), ("N", Nm, N, "h", deps[1])):
            if built == 1 < size and dep:
                raise ValueError(
                    f"block_mask was built with {name}=1 for a mask_mod that depends on {arg!r}, "
                    f"but this call has {name}={size}: its blocks hold for {arg}=0 only; build it "
                    f"with {name}={size}"
                )


# ------------------------------------------------------------------------------------------------
# The class table of one chunked call.


def collapse(classes, axes) -> Array:
    """Classes per block pair over rows/heads processed together: empty only if empty for all,
    full only if full for all."""
    empty = jnp.all(classes == EMPTY, axis=axes)
    full = jnp.all(classes == FULL, axis=axes)
    return jnp.where(empty, EMPTY, jnp.where(full, FULL, PARTIAL)).astype(jnp.int32)


def segment_classes(q_ids, kv_ids, q_len: int, kv_len: int, cq: int, ck: int, nq: int, nk: int):
    """Classes ``(nq, nk)`` from segment ids ``(B, Tp)``, ``(B, Sp)`` (padded): a block pair whose
    id ranges do not intersect is empty, one with a single equal id on both sides is full.
    Exact for packed documents sorted by id, conservative (partial) otherwise."""
    big = jnp.iinfo(jnp.int32).max
    small = jnp.iinfo(jnp.int32).min

    def ranges(ids, n, c, true_len):
        real = (jnp.arange(n * c) < true_len)[None]
        lo = jnp.where(real, ids, big).reshape(ids.shape[0], n, c).min(-1)
        hi = jnp.where(real, ids, small).reshape(ids.shape[0], n, c).max(-1)
        return lo, hi  # (B, n)

    qlo, qhi = ranges(q_ids, nq, cq, q_len)
    klo, khi = ranges(kv_ids, nk, ck, kv_len)
    qlo, qhi = qlo[:, :, None], qhi[:, :, None]
    klo, khi = klo[:, None, :], khi[:, None, :]
    disjoint = (qhi < klo) | (khi < qlo)
    same = (qlo == qhi) & (klo == khi) & (qlo == klo)
    cls = jnp.where(disjoint, EMPTY, jnp.where(same, FULL, PARTIAL))
    return collapse(cls, 0)


# ------------------------------------------------------------------------------------------------
# Glue for the public entry point.


def mod_fields(mask_mod, score_mod, block_mask, B: int, N: int, K: int, T: int, S: int,
               score_dtype) -> dict:
    """The :class:`~attnjax._src.masks.MaskInfo` fields of the flexible-attention arguments."""
    if mask_mod is None and score_mod is None and block_mask is None:
        return {}
    b, h, q, k = index_arrays("bnts", B, 1, N, jnp.arange(T)[None], jnp.arange(S)[None])
    fields = dict(num_batch=B, num_kv_heads=K, num_groups=N // K)
    if mask_mod is not None:
        consts, ids = hoist(mask_mod, b, h, q, k)
        fields.update(mask_mod=mask_mod, mask_ids=ids, mask_consts=consts)
    if score_mod is not None:
        s = jnp.zeros((1, 1, 1, 1), score_dtype)
        consts, ids = hoist(score_mod, s, b, h, q, k)
        fields.update(score_mod=score_mod, score_ids=ids, score_consts=consts)
    if block_mask is not None:
        fields.update(block_classes=collapse(block_mask.classes, (0, 1)),
                      block_size=tuple(block_mask.block_size))
    return fields


def apply_sinks(out, lse, sinks):
    """Add per-head sink logits to the softmax denominator of a finished attention.

    ``out (B, T, N, Hv)``, ``lse (B, T, N)`` (compute dtype), ``sinks (N,)``. The sink is one
    more "key" of logit ``sinks[n]`` and value zero: ``lse' = logaddexp(lse, sink)`` and
    ``out' = out · exp(lse - lse')``. Exact, differentiable by JAX (the kernels' log-sum-exp is
    differentiable), the same in every implementation; a fully masked row (``lse = -inf``)
    gets ``out' = 0`` and ``lse' = sink``.
    """
    cdt = lse.dtype
    s = sinks.astype(cdt)
    new = jnp.logaddexp(lse, s)
    w = jnp.exp(lse - new)
    return (out.astype(cdt) * w[..., None]).astype(out.dtype), new
