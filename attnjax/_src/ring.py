r"""Ring attention: exact attention over a sequence split across devices (sequence parallelism).

Each of the P devices on a mesh axis holds a block of T/P queries and S/P keys/values. The
key/value blocks travel around the ring with :func:`jax.lax.ppermute`; after P steps every device
has seen every key block, and has combined the partial results of its queries exactly with the
log-sum-exp (Liu et al. 2023, "Ring Attention with Blockwise Transformers"):

.. math::

   \ell = \log(e^{\ell_1} + e^{\ell_2}),\qquad
   o = e^{\ell_1 - \ell}\,o_1 + e^{\ell_2 - \ell}\,o_2 .

Every block is computed by attnjax's chunked kernel (:mod:`attnjax._src.chunked`), so the memory
of one device is O((T/P)·H + chunk²) whatever P is. The position of a block pair enters the
kernel's masks only through ``query_offset``: queries at global position ``a`` against keys at
global position ``b`` are a chunked call with ``query_offset = a - b`` (plus the user's offset);
sequence lengths and segment ids are shifted/sliced the same way.

**Layouts.** ``"contiguous"``: device ``d`` holds positions ``[d·T/P, (d+1)·T/P)``. Under a
causal mask the last device then does P times the work of the first. ``"zigzag"`` balances it:
the sequence is cut into 2P chunks of length ``c = T/(2P)`` and device ``d`` holds chunks ``d``
and ``2P-1-d`` (an early and a late one), so every device does the same work. Use
:func:`zigzag_permute` to put a sequence (and anything indexed by position, such as segment ids or
targets) into that order, and :func:`zigzag_unpermute` to bring outputs back.

**Skipping.** A block pair that a causal or window mask (or the sequence lengths) hides entirely
is skipped with :func:`jax.lax.cond` (nothing is computed), forward and backward; inside a computed
pair, the kernel skips hidden chunks and does not mask fully visible ones.

**Backward.** A :func:`jax.custom_vjp` keeps only the local inputs, output and log-sum-exp. The
backward pass runs the ring again: the key/value blocks travel as in the forward pass together
with float32 accumulators of their gradients dK, dV; each device adds its queries' contribution
(FlashAttention-2 style, from the *final* log-sum-exp and ``D = rowsum(dO·O)``) and passes them
on; after P hops dK, dV are back on the device that owns the block. Per-device memory stays
O((T/P)·H) in training too.

**Overlap of compute and communication.** In every ring step the ``ppermute`` that sends the
current key/value block on to the next device (and receives the next one) is issued *before* the
attention on the current block, and nothing in that step's attention depends on its result. The
two are independent operations in XLA's graph, so the scheduler may run the transfer while the
block is being computed (on GPU/TPU the collective is asynchronous: ``collective-permute-start``
before the compute, ``-done`` after it). In the backward pass the key/value transfer overlaps in
the same way; the dK/dV transfer, which needs the step's result, is the one that cannot. The ring
is one ``fori_loop`` of P identical steps (one compiled copy of the kernel per direction), so the
last step's key/value transfer is a spare hop that brings the blocks home, overlapped with the
last block's compute.

**Zigzag pairs.** In the zigzag layout a device's queries and each visiting key block are two
position segments each, so a ring step is four kernel calls (segment pairs), of which a causal
mask always hides the (early queries, late keys) pair and, depending on the step, one more.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from attnjax._src import flex
from attnjax._src.attention import _check_soft_cap, _normalise_window, _reject_forward_mode
from attnjax._src.chunked import (
    _backward,
    _forward,
    _pad_axis,
    _Static,
    _varying,
    _vma,
    kernel_static,
    kv_to_chunks,
    merge_partials,
    q_to_chunks,
    sum_to_vma,
)
from attnjax._src.config import ChunkSize, as_chunk_size
from attnjax._src.masks import MaskInfo
from attnjax._src.numerics import compute_dtype

LAYOUTS = ("contiguous", "zigzag")


# ------------------------------------------------------------------------------------------------
# Layout helpers.


def _check_layout(layout) -> int:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return 1 if layout == "contiguous" else 2


def _zigzag_chunks(num_devices: int) -> list[int]:
    """Natural chunk indices (of 2P) in zigzag order: d and 2P-1-d for d = 0..P-1."""
    order = []
    for d in range(num_devices):
        order += [d, 2 * num_devices - 1 - d]
    return order


def _reorder_chunks(x, axis: int, order: list[int]):
    """Cut ``axis`` into ``len(order)`` equal chunks and concatenate them in ``order``.

    Static slices and one concatenate (no gather/scatter, so it differentiates cleanly under any
    sharding); an axis sharded on an explicit-sharding mesh is gathered first.
    """
    sharding = getattr(jax.typeof(x), "sharding", None)
    spec = getattr(sharding, "spec", None)
    if spec is not None and axis < len(spec) and spec[axis] is not None:
        spec = list(spec)
        spec[axis] = None
        x = jax.reshard(x, NamedSharding(sharding.mesh, P(*spec)))
    c = x.shape[axis] // len(order)
    return jnp.concatenate(
        [lax.slice_in_dim(x, i * c, (i + 1) * c, axis=axis) for i in order], axis=axis)


def _check_zigzag(x, num_devices, axis):
    if isinstance(num_devices, bool) or not isinstance(num_devices, int | np.integer) or num_devices < 1:
        raise ValueError(f"num_devices must be a positive int, got {num_devices!r}")
    x = jnp.asarray(x)
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"axis {axis} out of range for an array of shape {tuple(x.shape)}")
    n = x.shape[axis]
    if n % (2 * num_devices) != 0:
        raise ValueError(
            f"the zigzag layout cuts the sequence into 2 * num_devices = {2 * num_devices} equal "
            f"chunks; the length along axis {axis} is {n}, not a multiple of {2 * num_devices}"
        )
    return x, n


def zigzag_permute(x, num_devices: int, axis: int = 1):
    """Reorder a sequence into the zigzag layout of :func:`ring_attention`.

    The sequence (length L along ``axis``) is cut into ``2P`` chunks of ``L / (2P)`` positions;
    the result holds chunks ``0, 2P-1, 1, 2P-2, …, P-1, P``, so that splitting it into P equal
    contiguous blocks gives device ``d`` the chunks ``d`` and ``2P-1-d``. Apply it to everything
    indexed by sequence position (queries, keys, values, segment ids, targets).

    Args:
      x: array; axis ``axis`` is the sequence (default 1, as in BTNH).
      num_devices: P, the number of devices along the sequence mesh axis.
      axis: the sequence axis.

    Returns:
      ``x`` reordered along ``axis``.

    Raises:
      ValueError: if the length is not a multiple of ``2 * num_devices``.

    Example:
      >>> zigzag_permute(jnp.arange(8)[None], 2)
      Array([[0, 1, 6, 7, 2, 3, 4, 5]], dtype=int32)
    """
    x, _ = _check_zigzag(x, num_devices, axis)
    return _reorder_chunks(x, axis % x.ndim, _zigzag_chunks(int(num_devices)))


def zigzag_unpermute(x, num_devices: int, axis: int = 1):
    """Inverse of :func:`zigzag_permute`: bring a zigzag-ordered sequence back to natural order.

    Args:
      x: array in zigzag order along ``axis``.
      num_devices: P, as given to :func:`zigzag_permute`.
      axis: the sequence axis (default 1).

    Returns:
      ``x`` in natural order.

    Raises:
      ValueError: if the length is not a multiple of ``2 * num_devices``.
    """
    x, _ = _check_zigzag(x, num_devices, axis)
    inv = [int(i) for i in np.argsort(_zigzag_chunks(int(num_devices)))]
    return _reorder_chunks(x, axis % x.ndim, inv)


# ------------------------------------------------------------------------------------------------
# Static settings and per-block masks.


@dataclasses.dataclass(frozen=True)
class _RingStatic:
    axis_name: Any
    num_devices: int
    num_seg: int  # 1 (contiguous) or 2 (zigzag) position segments per device
    q_seg: int  # true query rows per segment
    k_seg: int  # true keys per segment
    is_causal: bool
    window: tuple[int, int] | None
    kernel: _Static
    # flexible attention: static MaskInfo fields (the closed-over arrays travel in ``aux``)
    mods: tuple = ()


def _seg_start(rs: _RingStatic, device, seg, seg_len: int):
    """Global (natural-order) position of the first element of segment ``seg`` of ``device``."""
    if rs.num_seg == 1:
        return device * seg_len
    chunk = jnp.where(seg == 0, device, 2 * rs.num_devices - 1 - device)
    return chunk * seg_len


def _block_info(rs: _RingStatic, aux, kv_seg_ids, sq, sk, qpos, kpos) -> MaskInfo:
    """The masks of queries starting at global ``qpos`` against keys starting at ``kpos``."""
    off = qpos - kpos
    if aux.get("query_offset") is not None:
        off = aux["query_offset"] + off
    q_lengths = kv_lengths = q_ids = kv_ids = None
    if aux.get("q_lengths") is not None:
        q_lengths = jnp.clip(aux["q_lengths"] - qpos, 0, rs.q_seg)
    if aux.get("kv_lengths") is not None:
        kv_lengths = jnp.clip(aux["kv_lengths"] - kpos, 0, rs.k_seg)
    if aux.get("q_segment_ids") is not None:
        q_ids = aux["q_segment_ids"][sq]
        kv_ids = kv_seg_ids[sk]
    mods = dict(rs.mods)
    if mods:
        # mask_mod / score_mod see global positions: key j of this block is at kpos + j.
        mods.update(kv_base=jnp.asarray(kpos, jnp.int32),
                    mask_consts=tuple(aux.get("mask_consts", ())),
                    score_consts=tuple(aux.get("score_consts", ())))
    return MaskInfo(
        q_len=rs.q_seg, kv_len=rs.k_seg, is_causal=rs.is_causal, window=rs.window,
        query_offset=jnp.asarray(off, jnp.int32), q_lengths=q_lengths, kv_lengths=kv_lengths,
        q_segment_ids=q_ids, kv_segment_ids=kv_ids, **mods,
    )


def _any_visible(info: MaskInfo):
    """Whether a block pair can have a visible entry (None: always, nothing to skip).

    Asks the pair's :class:`MaskInfo` (the one definition of the masks) for its key-block range,
    treating the whole query segment and the whole key segment as one block each.
    """
    if not info.has_positional:
        return None
    lo, _, _, hi = info.key_block_ranges(0, info.q_len, info.kv_len, 1)
    return hi > lo


def _maybe(pred, update, acc):
    """``update(acc)`` where ``pred`` (None: always), else ``acc`` unchanged (the pair is skipped)."""
    return update(acc) if pred is None else lax.cond(pred, update, lambda a: a, acc)


def _varying_like(x, *refs):
    """Mark ``x`` (e.g. fresh zeros) as varying over the mesh axes ``refs`` vary over."""
    return _varying(x, _vma(*refs))


# ------------------------------------------------------------------------------------------------
# The ring, forward and backward.


def _ring_perm(n: int):
    return [(i, (i + 1) % n) for i in range(n)]


def _pairs(rs: _RingStatic):
    """The (query segment, key segment) pairs of one ring step: 1 (contiguous) or 4 (zigzag).

    Segments are kept as separate arrays (tuples), never sliced out of a stacked one, so that
    no step copies a segment; the pairs are unrolled.
    """
    return [(sq, sk) for sq in range(rs.num_seg) for sk in range(rs.num_seg)]


def _fwd_step(rs: _RingStatic, qs, kv, aux, me, src, acc):
    ks, vs, kv_ids = kv
    acc_o, acc_l = tuple(acc[0]), tuple(acc[1])
    for sq, sk in _pairs(rs):
        qpos = _seg_start(rs, me, sq, rs.q_seg)
        kpos = _seg_start(rs, src, sk, rs.k_seg)
        info = _block_info(rs, aux, kv_ids, sq, sk, qpos, kpos)

        # The accumulation happens inside the branch; a skipped pair passes the accumulators
        # through untouched (no zero blocks, no extra live buffers).
        def compute(acc_q, ins=(qs[sq], ks[sk], vs[sk]), info=info):
            o, lse = _forward(*ins, None, info, None, rs.kernel)
            return merge_partials(*acc_q, o.astype(lse.dtype), lse)

        acc_q = _maybe(_any_visible(info), compute, (acc_o[sq], acc_l[sq]))
        acc_o = acc_o[:sq] + (acc_q[0],) + acc_o[sq + 1:]
        acc_l = acc_l[:sq] + (acc_q[1],) + acc_l[sq + 1:]
    return acc_o, acc_l


def _ring_forward(qs, ks, vs, aux, rs: _RingStatic):
    """Segments ``qs[s] (nq, B, K, G, cq, H)``, ``ks[s]/vs[s] (nk, B, K, ck, H)`` -> out f32, lse."""
    n = rs.num_devices
    me = lax.axis_index(rs.axis_name)
    nq, B, K, G, cq, _ = qs[0].shape
    Hv = vs[0].shape[-1]
    refs = (qs, ks, vs, aux)
    cdt = compute_dtype(qs[0].dtype)
    acc = (
        tuple(_varying_like(jnp.zeros((nq, B, K, G, cq, Hv), cdt), refs) for _ in qs),
        tuple(_varying_like(jnp.full((nq, B, K, G, cq), -jnp.inf, cdt), refs) for _ in qs),
    )
    kv = (ks, vs, aux.get("kv_segment_ids"))
    perm = _ring_perm(n)

    def body(t, carry):
        kv, acc = carry
        # Send this block on (and receive the next) first: the transfer does not depend on the
        # attention below, so XLA can run the two concurrently. The last step's transfer
        # brings the blocks back home: one spare hop that keeps the loop body a single compiled
        # copy (no peeled last step).
        nxt = lax.ppermute(kv, rs.axis_name, perm)
        acc = _fwd_step(rs, qs, kv, aux, me, (me - t) % n, acc)
        return nxt, acc

    _, acc = lax.fori_loop(0, n, body, (kv, acc))
    return acc


def _diff_consts(aux) -> tuple[int, ...]:
    """Indices of the floating (differentiable) arrays among a score_mod's closed-over arrays."""
    return tuple(i for i, c in enumerate(aux.get("score_consts", ()))
                 if jnp.issubdtype(c.dtype, jnp.inexact))


def _bwd_step(rs: _RingStatic, qs, kv, dkv, aux, me, src, out, lse, dout, dlse, dq, dsc):
    ks, vs, kv_ids = kv
    dq, dk, dv = tuple(dq), tuple(dkv[0]), tuple(dkv[1])
    diff = _diff_consts(aux)
    for sq, sk in _pairs(rs):
        qpos = _seg_start(rs, me, sq, rs.q_seg)
        kpos = _seg_start(rs, src, sk, rs.k_seg)
        info = _block_info(rs, aux, kv_ids, sq, sk, qpos, kpos)
        ins = (qs[sq], ks[sk], vs[sk], out[sq], lse[sq], dout[sq], dlse[sq])

        def compute(grads, ins=ins, info=info):
            q_, k_, v_, o_, l_, do_, dl_ = ins
            g = _backward(q_, k_, v_, None, info, None, o_, l_, do_, dl_, rs.kernel,
                          sconsts=info.score_consts if diff else None)
            new = tuple(a + b.astype(a.dtype) for a, b in zip(grads[:3], g[:3], strict=True))
            if diff:
                # This pair's cotangents of the score_mod's closed-over arrays (this device's
                # queries against the visiting keys), summed over pairs and ring steps.
                new += (tuple(a + g[5][i].astype(a.dtype) for a, i in zip(grads[3], diff,
                                                                          strict=True)),)
            return new

        carry = (dq[sq], dk[sk], dv[sk]) + ((dsc,) if diff else ())
        g = _maybe(_any_visible(info), compute, carry)
        dq = dq[:sq] + (g[0],) + dq[sq + 1:]
        dk = dk[:sk] + (g[1],) + dk[sk + 1:]
        dv = dv[:sk] + (g[2],) + dv[sk + 1:]
        if diff:
            dsc = g[3]
    return dq, (dk, dv), dsc


def _ring_backward(qs, ks, vs, aux, out, lse, dout, dlse, rs: _RingStatic):
    n = rs.num_devices
    me = lax.axis_index(rs.axis_name)
    perm = _ring_perm(n)
    refs = (qs, ks, vs, aux, out, lse, dout, dlse)
    cdt = compute_dtype(qs[0].dtype)
    dq = tuple(_varying_like(jnp.zeros(x.shape, cdt), refs) for x in qs)
    dkv = (tuple(_varying_like(jnp.zeros(x.shape, cdt), refs) for x in ks),
           tuple(_varying_like(jnp.zeros(x.shape, cdt), refs) for x in vs))
    kv = (ks, vs, aux.get("kv_segment_ids"))
    consts = aux.get("score_consts", ())
    diff = _diff_consts(aux)
    dsc = tuple(_varying_like(jnp.zeros(consts[i].shape, compute_dtype(consts[i].dtype)), refs)
                for i in diff)

    def body(t, carry):
        kv, dkv, dq, dsc = carry
        nxt = lax.ppermute(kv, rs.axis_name, perm)  # overlaps with the step below
        dq, dkv, dsc = _bwd_step(rs, qs, kv, dkv, aux, me, (me - t) % n, out, lse, dout, dlse,
                                 dq, dsc)
        dkv = lax.ppermute(dkv, rs.axis_name, perm)  # gradients follow their block
        return nxt, dkv, dq, dsc

    # After P steps (P hops) the blocks and their gradients are back on their owners.
    _, (dk, dv), dq, dsc = lax.fori_loop(0, n, body, (kv, dkv, dq, dsc))
    # Each device holds the cotangent of its own queries' use of a closed-over array. An array
    # that is the same (invariant) on every device of a mesh axis is one value, so its
    # cotangent is the sum over that axis (psum); over axes it varies on, each device's copy
    # keeps its own part.
    dconsts = [None if jnp.issubdtype(c.dtype, jnp.inexact)
               else np.zeros(c.shape, jax.dtypes.float0) for c in consts]
    for a, i in zip(dsc, diff, strict=True):
        dconsts[i] = sum_to_vma(a, consts[i]).astype(consts[i].dtype)
    return dq, dk, dv, tuple(dconsts)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _ring_core(qs, ks, vs, aux, rs):
    out, lse = _ring_forward(qs, ks, vs, aux, rs)
    return tuple(o.astype(q.dtype) for o, q in zip(out, qs, strict=True)), lse


def _ring_core_fwd(qs, ks, vs, aux, rs):
    out, lse = _ring_core(qs, ks, vs, aux, rs)
    return (out, lse), (qs, ks, vs, aux, out, lse)


def _ring_core_bwd(rs, res, cts):
    qs, ks, vs, aux, out, lse = res
    dout, dlse = cts
    dq, dk, dv, dconsts = _ring_backward(qs, ks, vs, aux, out, lse, dout, dlse, rs)

    def cast(gs, xs):
        return tuple(g.astype(x.dtype) for g, x in zip(gs, xs, strict=True))

    daux = None
    if aux.get("score_consts"):
        daux = {name: None for name in aux}
        daux["score_consts"] = dconsts
    return cast(dq, qs), cast(dk, ks), cast(dv, vs), daux


_ring_core.defvjp(_ring_core_fwd, _ring_core_bwd)


# ------------------------------------------------------------------------------------------------
# Public functions.


def _axis_size(axis_name) -> int:
    try:
        return int(lax.axis_size(axis_name))
    except NameError as e:
        raise ValueError(
            f"axis_name {axis_name!r} is not a mesh axis bound here: ring_attention must be called "
            f"inside jax.shard_map over a mesh with that axis (or use ring_attention_sharded) ({e})"
        ) from None


def _check_ring_implementation(implementation) -> None:
    from attnjax._src import registry

    registry.check_name(implementation)
    if implementation not in (None, "xla_chunked"):
        raise ValueError(
            f"ring attention runs its blocks with implementation='xla_chunked' (it merges the "
            f"blocks' online-softmax statistics); implementation={implementation!r} cannot serve "
            "it. Use None or 'xla_chunked'."
        )


def ring_attention(
    query,
    key,
    value,
    *,
    axis_name,
    layout: str = "contiguous",
    scale: float | None = None,
    is_causal: bool = False,
    query_offset=None,
    local_window_size: int | tuple[int, int] | None = None,
    query_seq_lengths=None,
    key_value_seq_lengths=None,
    query_segment_ids=None,
    key_value_segment_ids=None,
    logits_soft_cap: float | None = None,
    chunk_size: ChunkSize | int | tuple[int, int] | None = None,
    precision=None,
    return_residual: bool = False,
    implementation: str | None = None,
    mask_mod=None,
    score_mod=None,
    sinks=None,
):
    r"""Exact attention over a sequence sharded along the mesh axis ``axis_name``.

    Call it inside :func:`jax.shard_map` (or use :func:`ring_attention_sharded`, which sets the
    ``shard_map`` up). With P devices on ``axis_name``, each device passes its own block of
    ``T/P`` queries and ``S/P`` keys/values; the result on each device is its queries' rows of
    the attention over the *whole* sequence,

    .. math::

       \mathrm{softmax}\big(\mathrm{cap}(s\,Q_d K^T)\big)\,V ,

    exactly (combined across key blocks by the log-sum-exp; see the module docs for the ring,
    the skipping of hidden blocks, the backward pass and how transfers overlap with compute).
    Every argument has the meaning it has in :func:`attnjax.dot_product_attention`, over
    *global* positions in natural order:

    * ``is_causal``: key ``j`` visible from query ``i`` when ``j <= i + query_offset``;
    * ``local_window_size = (left, right)``: ``i + off - left <= j <= i + off + right``;
    * ``query_seq_lengths`` / ``key_value_seq_lengths`` ``(B,)``: global lengths;
    * segment ids: the device's own ``(B, T/P)`` / ``(B, S/P)`` blocks (they travel with K/V).

    Shapes (per device): ``query (B, T/P, N, H)``, ``key (B, S/P, K, H)``,
    ``value (B, S/P, K, Hv)``, ``N % K == 0`` (GQA without copying K/V).

    Args:
      query, key, value: this device's blocks, same floating dtype.
      axis_name: the mesh axis (name, as in ``shard_map``) the sequence is split over.
      layout: ``"contiguous"`` (device d holds the d-th block of the sequence) or ``"zigzag"``
        (device d holds chunks d and 2P-1-d of 2P; the same work per device under a causal
        mask; see :func:`zigzag_permute`). It must describe how the data was actually split.
      scale: logit scale; ``None`` means ``1 / sqrt(H)``.
      is_causal, query_offset, local_window_size: as above (``query_offset`` an int or int
        ``(B,)``).
      query_seq_lengths, key_value_seq_lengths: optional int ``(B,)`` global lengths.
      query_segment_ids, key_value_segment_ids: optional int ``(B, T/P)``, ``(B, S/P)``.
      logits_soft_cap: ``c > 0``: logits become ``c·tanh(logits/c)``.
      chunk_size: chunk sizes of the per-block kernel (see :class:`attnjax.ChunkSize`).
      precision: passed to the matmuls.
      return_residual: also return the float32 log-sum-exp ``(B, T/P, N)``.
      mask_mod, score_mod, sinks: as in :func:`attnjax.dot_product_attention`, over global
        positions (``q_idx`` = global query position + ``query_offset``, ``kv_idx`` = global
        key position); arrays they close over must be the same on every device. Gradients flow
        to q, k, v, ``sinks`` and the floating arrays a ``score_mod`` closes over (each
        device's queries contribute their part; for an array that is invariant over a mesh
        axis, as a replicated one is, the parts are summed over that axis with ``psum``).
      implementation: the per-block kernel: ``None`` or ``"xla_chunked"`` (the only one that
        returns the per-block log-sum-exp and accepts the carried statistics the ring merges);
        any other registered name raises ``ValueError`` with that reason.

    Returns:
      This device's output rows ``(B, T/P, N, Hv)`` (the same order as ``query``), or
      ``(output, lse)``.

    Raises:
      ValueError: ``axis_name`` not bound by an enclosing ``shard_map``; bad ranks or shapes;
        ``N % K != 0``; an unknown ``layout``, or ``"zigzag"`` with an odd local length.
      TypeError: non-floating or mixed dtypes, non-integer ids/lengths.

    Example:
      >>> mesh = jax.make_mesh((8,), ("seq",))
      >>> f = jax.jit(jax.shard_map(
      ...     functools.partial(attnjax.ring_attention, axis_name="seq", is_causal=True),
      ...     mesh=mesh, in_specs=P(None, "seq"), out_specs=P(None, "seq")))
      >>> # q, k, v: (B, T, N, H) global arrays, T % 8 == 0, sharded like in_specs
      >>> q, k, v = (jax.device_put(x, jax.NamedSharding(mesh, P(None, "seq"))) for x in (q, k, v))
      >>> out = f(q, k, v)
    """
    num_seg = _check_layout(layout)
    n = _axis_size(axis_name)
    q, k, v = (jnp.asarray(x) for x in (query, key, value))
    for name, x in (("query", q), ("key", k), ("value", v)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"{name} must have a floating dtype, got {x.dtype}")
        if x.ndim != 4:
            raise ValueError(f"{name} must have rank 4 (B, L, heads, dim) per device, got {x.shape}")
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"query, key, value must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    if k.shape[0] != B or v.shape[0] != B or k.shape[3] != H or v.shape[:3] != k.shape[:3]:
        raise ValueError(
            f"shapes do not match: query {q.shape} (B, T, N, H), key {k.shape} (B, S, K, H), "
            f"value {v.shape} (B, S, K, Hv)"
        )
    if N % K:
        raise ValueError(f"query heads N={N} must be a multiple of key/value heads K={K}")
    if num_seg == 2 and (T % 2 or S % 2):
        raise ValueError(
            f"layout='zigzag' holds two equal chunks per device, so the per-device lengths must be "
            f"even; got T/P={T}, S/P={S} on axis {axis_name!r} with {n} devices (global lengths "
            f"must be multiples of 2P = {2 * n})"
        )
    Hv = v.shape[3]
    q_seg, k_seg = T // num_seg, S // num_seg

    # ---- masks ----
    aux = {}
    if query_offset is not None:
        off = jnp.asarray(query_offset)
        if not jnp.issubdtype(off.dtype, jnp.integer) or off.shape not in ((), (B,)):
            raise ValueError(f"query_offset must be an int or int (B,) = ({B},), got {off.dtype}{off.shape}")
        aux["query_offset"] = off.astype(jnp.int32)
    for name, x, key_ in (("query_seq_lengths", query_seq_lengths, "q_lengths"),
                          ("key_value_seq_lengths", key_value_seq_lengths, "kv_lengths")):
        if x is not None:
            x = jnp.asarray(x)
            if not jnp.issubdtype(x.dtype, jnp.integer):
                raise TypeError(f"{name} must have an integer dtype, got {x.dtype}")
            if x.shape != (B,):
                raise ValueError(f"{name} must have shape (B,) = ({B},), got {x.shape}")
            aux[key_] = x.astype(jnp.int32)
    if (query_segment_ids is None) != (key_value_segment_ids is None):
        raise ValueError("query_segment_ids and key_value_segment_ids must be given together")
    window = _normalise_window(local_window_size)
    logits_soft_cap = _check_soft_cap(logits_soft_cap)
    if isinstance(logits_soft_cap, jax.Array):
        raise TypeError(
            "ring_attention needs logits_soft_cap as a Python float (a static kernel setting), "
            f"got a traced value {logits_soft_cap!r}; dot_product_attention accepts a traced one"
        )
    _reject_forward_mode("ring_attention", q, k, v)
    if scale is None:
        scale = 1.0 / math.sqrt(H)
    _check_ring_implementation(implementation)
    chunks = as_chunk_size(chunk_size)
    cq, ck = chunks.resolve(q_seg, k_seg)
    nq, nk = -(-q_seg // cq), -(-k_seg // ck)
    tp, sp = nq * cq, nk * ck

    if query_segment_ids is not None:
        for name, x, length, pad in (("query_segment_ids", query_segment_ids, T, tp),
                                     ("key_value_segment_ids", key_value_segment_ids, S, sp)):
            x = jnp.asarray(x)
            if not jnp.issubdtype(x.dtype, jnp.integer):
                raise TypeError(f"{name} must have an integer dtype, got {x.dtype}")
            if x.shape != (B, length):
                raise ValueError(f"{name} must have this device's shape (B, L) = ({B}, {length}), got {x.shape}")
            aux["q_segment_ids" if name[0] == "q" else "kv_segment_ids"] = tuple(
                _pad_axis(part.astype(jnp.int32), 1, pad) for part in jnp.split(x, num_seg, axis=1))

    q, kernel = kernel_static(q, scale=scale, logits_soft_cap=logits_soft_cap, dropout_rate=0.0,
                              precision=precision, num_q=nq, num_k=nk, q_chunk=cq, k_chunk=ck,
                              kv_len=k_seg)
    mods = ()
    if mask_mod is not None or score_mod is not None:
        cdt = compute_dtype(q.dtype)
        flex.check_mods(mask_mod, score_mod, B, N, T, S, cdt)
        fields = flex.mod_fields(mask_mod, score_mod, None, B, N, K, T, S, cdt)
        aux["mask_consts"] = fields.pop("mask_consts", ())
        aux["score_consts"] = fields.pop("score_consts", ())
        mods = tuple(sorted(fields.items()))
    if sinks is not None:
        sinks = jnp.asarray(sinks)
        if not jnp.issubdtype(sinks.dtype, jnp.floating) or sinks.shape != (N,):
            raise ValueError(
                f"sinks must be a float array of shape (N,) = ({N},), got {sinks.dtype}{sinks.shape}")
    rs = _RingStatic(axis_name=axis_name, num_devices=n, num_seg=num_seg, q_seg=q_seg, k_seg=k_seg,
                     is_causal=bool(is_causal), window=window, kernel=kernel, mods=mods)

    # (B, L, heads, dim) -> one array per position segment, (nchunks, B, K, [G,] chunk, dim),
    # each segment padded to whole chunks on its own.
    def q_layout(x):
        return q_to_chunks(x, nq, cq, K)

    def kv_layout(x):
        return kv_to_chunks(x, nk, ck)

    def segments(x, fn):
        # split (not slicing): its transpose is one concatenate, not a zero-padded sum.
        return tuple(fn(part) for part in jnp.split(x, num_seg, axis=1))

    out, lse = _ring_core(segments(q, q_layout), segments(k, kv_layout), segments(v, kv_layout),
                          aux, rs)
    out = jnp.concatenate(
        [o.transpose(1, 0, 4, 2, 3, 5).reshape(B, tp, N, Hv)[:, :q_seg] for o in out], axis=1)
    lse = jnp.concatenate(
        [x.transpose(1, 0, 4, 2, 3).reshape(B, tp, N)[:, :q_seg] for x in lse], axis=1)
    if sinks is not None:
        out, lse = flex.apply_sinks(out, lse, sinks)
    return (out, lse) if return_residual else out


def ring_attention_sharded(
    query,
    key,
    value,
    *,
    mesh: Mesh,
    seq_axis: str,
    batch_axis: str | None = None,
    head_axis: str | None = None,
    layout: str = "contiguous",
    query_seq_lengths=None,
    key_value_seq_lengths=None,
    query_segment_ids=None,
    key_value_segment_ids=None,
    query_offset=None,
    **kwargs,
):
    """Ring attention on global arrays: splits the sequence over ``mesh`` axis ``seq_axis``.

    Sets up :func:`jax.shard_map` around :func:`ring_attention`: the sequence dim of
    ``query``/``key``/``value`` (and of the segment ids) is split over ``seq_axis``, the batch
    over ``batch_axis`` and the heads over ``head_axis`` when given (other mesh axes replicate).
    The arrays must already be in ``layout`` order along the sequence (for ``"zigzag"``, apply
    :func:`zigzag_permute` with ``P = mesh.shape[seq_axis]`` to inputs and segment ids, and
    :func:`zigzag_unpermute` to the output); lengths and ``query_offset`` are always in natural
    positions.

    Args:
      query: ``(B, T, N, H)``; key: ``(B, S, K, H)``; value: ``(B, S, K, Hv)`` global arrays.
      mesh: a :class:`jax.sharding.Mesh`.
      seq_axis: name of the mesh axis the sequence is split over (P devices; ``T`` and ``S``
        must be multiples of P, of 2P for ``"zigzag"``).
      batch_axis: optional mesh axis for the batch (``B`` a multiple of its size).
      head_axis: optional mesh axis for the heads (``N`` and ``K`` multiples of its size).
      layout: ``"contiguous"`` or ``"zigzag"``; see :func:`ring_attention`.
      query_seq_lengths, key_value_seq_lengths, query_segment_ids, key_value_segment_ids,
        query_offset: global versions of :func:`ring_attention`'s arguments (``(B,)``,
        ``(B, T)``, ``(B, S)``, int or ``(B,)``).
      **kwargs: the other keyword arguments of :func:`ring_attention` (``is_causal``,
        ``local_window_size``, ``scale``, ``logits_soft_cap``, ``chunk_size``, ``precision``,
        ``return_residual``, ``implementation``, ``mask_mod``, ``score_mod``, ``sinks``).
        ``mask_mod``/``score_mod`` see global batch rows, heads and positions (also with
        ``batch_axis``/``head_axis``); ``sinks`` is the global ``(N,)``.

    Returns:
      The global output ``(B, T, N, Hv)`` in ``layout`` order, sharded like ``query``
      (and the lse ``(B, T, N)`` when ``return_residual``).

    Raises:
      ValueError: an axis name not in ``mesh``, lengths/batch/heads not divisible by the axis
        sizes, a bad ``layout``, and everything :func:`ring_attention` raises.

    Example:
      >>> mesh = jax.make_mesh((2, 4), ("data", "seq"))
      >>> out = attnjax.ring_attention_sharded(q, k, v, mesh=mesh, seq_axis="seq",
      ...                                      batch_axis="data", is_causal=True)
    """
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    num_seg = _check_layout(layout)
    names = tuple(mesh.axis_names)
    for arg, ax in (("seq_axis", seq_axis), ("batch_axis", batch_axis), ("head_axis", head_axis)):
        if ax is not None and ax not in names:
            raise ValueError(f"{arg}={ax!r} is not an axis of the mesh, whose axes are {names}")
    used = [a for a in (seq_axis, batch_axis, head_axis) if a is not None]
    if len(set(used)) != len(used):
        raise ValueError(f"seq_axis, batch_axis and head_axis must be different axes, got {used}")
    q, k, v = (jnp.asarray(x) for x in (query, key, value))
    for name, x in (("query", q), ("key", k), ("value", v)):
        if x.ndim != 4:
            raise ValueError(f"{name} must have rank 4 (B, L, heads, dim), got shape {x.shape}")
    n = mesh.shape[seq_axis]
    need = n * num_seg
    for name, length in (("query", q.shape[1]), ("key/value", k.shape[1])):
        if length % need:
            raise ValueError(
                f"{name} sequence length {length} must be a multiple of "
                + (f"the {n} devices on mesh axis {seq_axis!r}" if num_seg == 1 else
                   f"2 * {n} = {need} (layout='zigzag' on mesh axis {seq_axis!r} of {n} devices)")
                + "; pad the sequence (and mask the padding with key_value_seq_lengths)"
            )
    if batch_axis is not None and q.shape[0] % mesh.shape[batch_axis]:
        raise ValueError(f"batch {q.shape[0]} must be a multiple of the {mesh.shape[batch_axis]} "
                         f"devices on batch_axis {batch_axis!r}")
    if head_axis is not None:
        hs = mesh.shape[head_axis]
        if q.shape[2] % hs or k.shape[2] % hs:
            raise ValueError(f"query heads {q.shape[2]} and key/value heads {k.shape[2]} must be "
                             f"multiples of the {hs} devices on head_axis {head_axis!r}")

    seq_spec = P(batch_axis, seq_axis, head_axis, None)
    arrays = {"query": q, "key": k, "value": v}
    specs = {"query": seq_spec, "key": seq_spec, "value": seq_spec}
    for name, x, spec in (("query_seq_lengths", query_seq_lengths, P(batch_axis)),
                          ("key_value_seq_lengths", key_value_seq_lengths, P(batch_axis)),
                          ("query_segment_ids", query_segment_ids, P(batch_axis, seq_axis)),
                          ("key_value_segment_ids", key_value_segment_ids, P(batch_axis, seq_axis))):
        if x is not None:
            arrays[name] = jnp.asarray(x)
            specs[name] = spec
    if query_offset is not None:
        off = jnp.asarray(query_offset)
        if off.ndim == 0:
            arrays["query_offset"] = off
            specs["query_offset"] = P()
        else:
            arrays["query_offset"] = off
            specs["query_offset"] = P(batch_axis)
    kwargs = dict(kwargs)
    if kwargs.get("sinks") is not None:  # global (N,): each device takes its heads' sinks
        sinks = jnp.asarray(kwargs.pop("sinks"))
        if not jnp.issubdtype(sinks.dtype, jnp.floating) or sinks.shape != (q.shape[2],):
            raise ValueError(f"sinks must be a float array of shape (N,) = ({q.shape[2]},), got "
                             f"{sinks.dtype}{sinks.shape}")
        arrays["sinks"] = sinks
        specs["sinks"] = P(head_axis)
    return_residual = kwargs.get("return_residual", False)
    out_specs = (seq_spec, P(batch_axis, seq_axis, head_axis)) if return_residual else seq_spec
    b_local = q.shape[0] // (mesh.shape[batch_axis] if batch_axis is not None else 1)
    n_local = q.shape[2] // (mesh.shape[head_axis] if head_axis is not None else 1)

    def local(a):
        a = dict(a)
        q_, k_, v_ = a.pop("query"), a.pop("key"), a.pop("value")
        kw = dict(kwargs)
        if batch_axis is not None or head_axis is not None:
            # the mods see global batch rows and heads: this device's first ones are b0 and h0
            b0 = 0 if batch_axis is None else lax.axis_index(batch_axis) * b_local
            h0 = 0 if head_axis is None else lax.axis_index(head_axis) * n_local
            if kw.get("mask_mod") is not None:
                mm = kw["mask_mod"]
                kw["mask_mod"] = lambda b, h, qi, ki: mm(b + b0, h + h0, qi, ki)
            if kw.get("score_mod") is not None:
                sm = kw["score_mod"]
                kw["score_mod"] = lambda s, b, h, qi, ki: sm(s, b + b0, h + h0, qi, ki)
        return ring_attention(q_, k_, v_, axis_name=seq_axis, layout=layout, **a, **kw)

    if any(t == AxisType.Explicit for t in mesh.axis_types):
        # Arrays on an explicit-sharding mesh carry their sharding in their type, and shard_map
        # insists that it match in_specs: move them there first (a no-op when they already are).
        arrays = {name: jax.reshard(x, NamedSharding(mesh, specs[name])) for name, x in arrays.items()}
    f = jax.shard_map(local, mesh=mesh, in_specs=(specs,), out_specs=out_specs)
    return f(arrays)
