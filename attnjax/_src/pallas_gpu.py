"""attnjax's own fused GPU kernel in Pallas (Triton): ``implementation="pallas_gpu"``.

FlashAttention-2 in Pallas, with the library's full mask semantics evaluated *inside* the kernel
from positions, so calls that cuDNN cannot express (packed documents via segment ids, a soft cap,
per-row ``query_offset``, dropout, float32, a dense boolean mask with any broadcast) still run as
one fused kernel per pass instead of XLA's chain of per-block kernels.

Shape letters: B batch, T query length, S key length, N query heads, K kv heads, G = N // K,
H query/key head dim, Hv value head dim.

Kernels (all race-free, no atomics):

* **Forward** (:func:`_fwd_kernel`): grid ``(T / block_q, B, N)``; one program owns one block of
  query rows of one head and loops over only the key blocks that the masks leave visible
  (:func:`_key_ranges`, the same rules as :meth:`MaskInfo.key_block_ranges`, evaluated per batch
  row from the program ids), split into masked edge blocks and an unmasked fast path for blocks
  that are fully visible. Online softmax in float32; writes ``out`` and the log-sum-exp.
* **dK/dV** (:func:`_dkv_kernel`): grid ``(S / block_k, B, K)``; one program owns one block of
  keys of one kv head, loops over the G query heads that share it and over the query blocks that
  can see it (:func:`_query_ranges`), accumulating dK and dV in registers (GQA without copying
  K/V, and without a separate sum over the group afterwards).
* **dQ** (:func:`_dq_kernel`): grid ``(T / block_q, B, N)``, key blocks inner, like the forward;
  with a ``score_mod`` closing over traced arrays, also their per-program partial gradients.
* **dbias** (:func:`_dbias_kernel`, only when a bias is given): one program per output tile of the
  bias's own (possibly broadcast) shape, summing over the broadcast batch/head/query/key dims in a
  loop, so the gradient of a ``(1, N, 1, S)`` bias never materialises ``B·N·T·S`` values. A simple
  pass without block skipping.

GQA: K/V blocks are indexed by ``head // G`` in the BlockSpec index maps (no copy). Inputs are
padded to whole blocks (sequence dims) and to a power-of-two head dim (>= 16, as Triton's ``dot``
needs); padded keys are masked inside the kernel, padded query rows and head-dim columns are
dropped.

Dropout regenerates the keep-mask of :mod:`attnjax._src.dropout` (the same bits as every other
implementation) from ``(seed, b, n, i, j)`` inside each kernel.

Segment ids (packed documents): per-block ``(min, max)`` ids (:func:`_seg_ranges`, O(T/block)
memory) let every inner loop skip the blocks that share no segment with the program's block and
run blocks of one single shared segment unmasked (:func:`_run_ranges`, a ``lax.switch`` per
block), so packed-sequence attention costs about the sum of the documents' squares.

Flexible attention (``mask_mod`` / ``score_mod`` / sinks / ``BlockMask``):

* ``mask_mod(b, h, q_idx, kv_idx) -> bool`` is one more conjunct in :func:`_visible`, called with
  the program's batch row and query head (int32 scalars) and the ``(block_q, 1)`` /
  ``(1, block_k)`` position vectors (``q_idx = i + query_offset[b]``); without a block mask it
  makes every block "partial" (always masked).
* ``score_mod(score, b, h, q_idx, kv_idx)`` applies in :func:`_logits` after the soft cap and
  before the bias; the backward kernels multiply by its VJP (traced into the kernel).
* The arrays a mod closes over (:func:`_closure`: traced *and* concrete, since a Pallas kernel
  may not capture constants) are whole-array operands of every kernel. :func:`_eval_mod`
  evaluates the mod's jaxpr with each point gather from such an array (``slopes[h]``,
  ``doc[b, q_idx]``, ``table[bucket, h]``) turned into a *ref load* at the clipped indices
  (Triton lowers it as a pointer gather; a gather of a value has no Triton rule); other uses
  load the array whole. Gradients to a ``score_mod``'s traced floating arrays: the dQ kernel
  differentiates the mod with respect to the values it read (elementwise work) and scatters
  their cotangents into one partial sum per program (:func:`_scatter_leaf`: a scalar index adds
  the block's sum, array-indexed dims loop over their extent with one masked sum per element,
  so no two lanes write one address); the partials ``(T / block_q, B, N, *shape)`` are summed
  outside. Race-free, no atomics.
* Which mods lower is decided before dispatch (:func:`mods_lowering_reason`: the mod's jaxpr at
  kernel shapes, and its VJP, against Pallas's Triton lowering rules), so the registry reports
  ``pallas_gpu`` ineligible with the reason instead of failing at lowering.
* A ``BlockMask`` (classes EMPTY / PARTIAL / FULL of ``block_size`` blocks, collapsed over rows
  and heads) is regrouped per kernel's block sizes (:func:`_kernel_table`) into an int32
  ``(nq, nk)`` operand read like the segment ranges: its class of block ``(i, j)`` picks the
  ``lax.switch`` branch in :func:`_run_ranges` (skip / masked / unmasked), combined with the
  positional ranges and the segment classes.
* Sinks need nothing here: ``flex.apply_sinks`` rescales ``(out, lse)`` outside the kernel, and
  the kernel's log-sum-exp is differentiable (its cotangent folds into ``delta``).
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
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jax.extend import core as jcore

from attnjax._src import dropout as dropout_lib
from attnjax._src import pallas_config
from attnjax._src.chunked import _pad_axis as _pad
from attnjax._src.config import as_chunk_size
from attnjax._src.flex import EMPTY, FULL, PARTIAL
from attnjax._src.masks import MaskInfo

MIN_BLOCK = 16  # Triton's dot needs every tile dim >= 16
MAX_HEAD_DIM = 256
SUPPORTED_DTYPES = (jnp.float16, jnp.bfloat16, jnp.float32)


def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def _is_pow2(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


# ------------------------------------------------------------------------------------------------
# Block sizes.


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes and Triton launch settings of ``implementation="pallas_gpu"``.

    Every block size is a power of two >= 16 (Triton tiles); a block longer than the (padded)
    sequence is shrunk to it. Sequences are padded to whole blocks of the largest query (key)
    block, so any length works.

    Attributes:
      block_q, block_k: query rows per program and keys per inner step of the forward kernel.
      block_q_dkv, block_k_dkv: query rows per inner step and keys per program of the dK/dV kernel.
      block_q_dq, block_k_dq: query rows per program and keys per inner step of the dQ (and dbias)
        kernel.
      num_warps, num_stages: Triton launch settings of the forward kernel.
      num_warps_bwd, num_stages_bwd: the same for the backward kernels.
    """

    block_q: int = 64
    block_k: int = 64
    block_q_dkv: int = 32
    block_k_dkv: int = 64
    block_q_dq: int = 64
    block_k_dq: int = 32
    num_warps: int = 4
    num_stages: int = 2
    num_warps_bwd: int = 4
    num_stages_bwd: int = 2

    def __post_init__(self):
        for f in dataclasses.fields(self):
            val = getattr(self, f.name)
            if isinstance(val, bool) or not isinstance(val, int):
                raise TypeError(f"BlockSizes.{f.name} must be an int, got {val!r}")
            if f.name.startswith("block_") and (val < MIN_BLOCK or not _is_pow2(val)):
                raise ValueError(
                    f"BlockSizes.{f.name} must be a power of two >= {MIN_BLOCK}, got {val}")
            if f.name.startswith("num_warps") and val not in (1, 2, 4, 8, 16):
                raise ValueError(f"BlockSizes.{f.name} must be 1, 2, 4, 8 or 16, got {val}")
            if f.name.startswith("num_stages") and val < 1:
                raise ValueError(f"BlockSizes.{f.name} must be >= 1, got {val}")

    @classmethod
    def for_head_dim(cls, head_dim: int) -> BlockSizes:
        """The default for a (padded) head dim: the first row of :data:`BLOCK_TABLE` that fits."""
        for max_dim, sizes in BLOCK_TABLE:
            if head_dim <= max_dim:
                return sizes
        raise ValueError(f"head dim {head_dim} > {MAX_HEAD_DIM} is not supported by pallas_gpu")


# Defaults per head dim. Where the numbers come from: jax's own Pallas Triton attention
# (jax/experimental/pallas/ops/gpu/attention.py: forward 128 x 128, backward 32 x 32, 4 warps up to
# head dim 64 and 8 beyond, 2 stages) and the Triton fused-attention tutorial (forward 128 x 64,
# dK/dV with narrow query steps and wide key blocks, dQ the transpose), shrunk for head dim 256 so
# that the K/V tiles and the float32 accumulators fit in shared memory and registers. They are a
# starting point, NOT measured: the accelerator check has to time them on real GPUs and this
# table should then be replaced by measured values.
BLOCK_TABLE: tuple[tuple[int, BlockSizes], ...] = (
    (64, BlockSizes(block_q=128, block_k=64, block_q_dkv=32, block_k_dkv=64, block_q_dq=64,
                    block_k_dq=32, num_warps=4, num_stages=3, num_warps_bwd=4, num_stages_bwd=2)),
    (128, BlockSizes(block_q=128, block_k=64, block_q_dkv=32, block_k_dkv=64, block_q_dq=64,
                     block_k_dq=32, num_warps=8, num_stages=2, num_warps_bwd=4, num_stages_bwd=2)),
    (256, BlockSizes(block_q=64, block_k=32, block_q_dkv=16, block_k_dkv=32, block_q_dq=32,
                     block_k_dq=16, num_warps=8, num_stages=2, num_warps_bwd=8, num_stages_bwd=1)),
)


# ------------------------------------------------------------------------------------------------
# Static configuration of one call.


@dataclasses.dataclass(frozen=True)
class _Cfg:
    B: int
    T: int
    S: int
    N: int
    K: int
    Tp: int  # padded lengths
    Sp: int
    scale: float
    softcap: float | None
    dropout_rate: float
    causal: bool
    window: tuple[int, int] | None
    has_qlen: bool
    kv_mask: bool  # hide keys >= kv_len[b] (lengths given, or padding added)
    has_seg: bool
    mask_shape: tuple[int, int, int, int] | None  # (Bm, Nm, Tm, Sm) of the padded int8 mask
    bias_shape: tuple[int, int, int, int] | None  # (Bb, Nb, Tb, Sb) of the padded bias
    bq: int
    bk: int
    bq_dkv: int
    bk_dkv: int
    bq_dq: int
    bk_dq: int
    num_warps: int
    num_stages: int
    num_warps_bwd: int
    num_stages_bwd: int
    precision: Any
    interpret: bool
    # Flexible attention (static): the user's callables, the ids of the arrays they close over
    # (kernel operands, in this order), which score-mod arrays get gradients, a block-class table.
    mask_mod: Any = None
    mask_ids: tuple = ()
    score_mod: Any = None
    score_ids: tuple = ()
    dconst: tuple = ()  # per score-mod array: differentiable (a traced float array)
    has_table: bool = False

    @property
    def G(self) -> int:
        return self.N // self.K

    @property
    def positional(self) -> bool:
        return self.causal or self.window is not None or self.has_qlen or self.kv_mask

    @property
    def always_masked(self) -> bool:
        """A dense mask (or a mask_mod without a block mask) can hide any entry of any block: no
        block is known to be fully visible."""
        return self.mask_shape is not None or (self.mask_mod is not None and not self.has_table)

    @property
    def trivial(self) -> bool:
        return not (self.positional or self.has_seg or self.always_masked or self.has_table)

    def params(self, fwd: bool):
        if fwd:
            return plgpu.CompilerParams(num_warps=self.num_warps, num_stages=self.num_stages)
        return plgpu.CompilerParams(num_warps=self.num_warps_bwd, num_stages=self.num_stages_bwd)


# ------------------------------------------------------------------------------------------------
# In-kernel mask logic (scalars per batch row; vectors of positions per block).


def _div(a, b: int):
    """``a // b`` for a non-negative int scalar ``a`` (in ``a``'s dtype, also under x64)."""
    return lax.div(a, jnp.asarray(b, a.dtype))


def _rem(a, b: int):
    return lax.rem(a, jnp.asarray(b, a.dtype))


def _fdiv(a, b: int):
    """Floor division of an int32 scalar by a positive Python int (Triton-friendly)."""
    q = lax.div(a, jnp.int32(b))
    return jnp.where((a < 0) & (q * b != a), q - 1, q)


def _cdiv(a, b: int):
    return -_fdiv(-a, b)


def _clamp(lo, flo, fhi, hi, n: int):
    lo = jnp.clip(lo, 0, n)
    hi = jnp.clip(hi, lo, n)
    flo = jnp.clip(flo, lo, hi)
    fhi = jnp.clip(fhi, flo, hi)
    return lo, flo, fhi, hi


def _key_ranges(cfg: _Cfg, q_start, bq: int, bk: int, nk: int, off, qlen, kvlen):
    """Key blocks a query block needs, for one batch row: ``(lo, full_lo, full_hi, hi)``.

    The rules of :meth:`MaskInfo.key_block_ranges` with this row's offset and lengths (so
    ``min == max``); blocks in ``[full_lo, full_hi)`` are fully visible by the positional masks.
    """
    i32 = jnp.int32
    q_last = q_start + (bq - 1)
    lo, flo, fhi, hi = i32(0), i32(0), i32(nk), i32(nk)
    if cfg.causal:
        hi = jnp.minimum(hi, _fdiv(q_last + off, bk) + 1)
        fhi = jnp.minimum(fhi, _fdiv(q_start + off + 1, bk))
    if cfg.window is not None:
        left, right = cfg.window
        lo = jnp.maximum(lo, _fdiv(q_start + off - left, bk))
        hi = jnp.minimum(hi, _fdiv(q_last + off + right, bk) + 1)
        flo = jnp.maximum(flo, _cdiv(q_last + off - left, bk))
        fhi = jnp.minimum(fhi, _fdiv(q_start + off + right + 1, bk))
    if cfg.kv_mask:
        hi = jnp.minimum(hi, _cdiv(kvlen, bk))
        fhi = jnp.minimum(fhi, _fdiv(kvlen, bk))
    if cfg.has_qlen:
        hi = jnp.where(q_start >= qlen, lo, hi)
        fhi = jnp.where(q_start + bq <= qlen, fhi, flo)
    return _clamp(lo, flo, fhi, hi, nk)


def _query_ranges(cfg: _Cfg, k_start, bk: int, bq: int, nq: int, off, qlen, kvlen):
    """Query blocks that can see a key block, for one batch row (mirror of
    :meth:`MaskInfo.query_block_ranges`)."""
    i32 = jnp.int32
    k_last = k_start + (bk - 1)
    lo, flo, fhi, hi = i32(0), i32(0), i32(nq), i32(nq)
    if cfg.causal:
        lo = jnp.maximum(lo, _fdiv(k_start - off, bq))
        flo = jnp.maximum(flo, _cdiv(k_last - off, bq))
    if cfg.window is not None:
        left, right = cfg.window
        lo = jnp.maximum(lo, _fdiv(k_start - off - right, bq))
        hi = jnp.minimum(hi, _fdiv(k_last - off + left, bq) + 1)
        flo = jnp.maximum(flo, _cdiv(k_last - off - right, bq))
        fhi = jnp.minimum(fhi, _fdiv(k_start - off + left + 1, bq))
    if cfg.has_qlen:
        hi = jnp.minimum(hi, _cdiv(qlen, bq))
        fhi = jnp.minimum(fhi, _fdiv(qlen, bq))
    if cfg.kv_mask:
        fhi = jnp.where(k_start + bk <= kvlen, fhi, flo)
        hi = jnp.where(k_start >= kvlen, lo, hi)
    return _clamp(lo, flo, fhi, hi, nq)


def _visible(cfg: _Cfg, qpos, kpos, off, qlen, kvlen, qseg, kseg, mask_blk, mods=None):
    """Visibility of a ``(bq, bk)`` block from ``qpos (bq, 1)`` and ``kpos (1, bk)``; ``None``
    when nothing is hidden. ``qseg (bq,)``/``kseg (bk,)`` and ``mask_blk`` are optional;
    ``mods``: a :class:`_Mods` (the user's ``mask_mod`` is one more conjunct)."""
    parts = []
    if mods is not None and cfg.mask_mod is not None:
        parts.append(mods.mask(qpos, kpos))
    if cfg.causal or cfg.window is not None:
        qe = qpos + off
        if cfg.causal:
            parts.append(kpos <= qe)
        if cfg.window is not None:
            left, right = cfg.window
            parts.append(kpos >= qe - left)
            parts.append(kpos <= qe + right)
    if cfg.kv_mask:
        parts.append(kpos < kvlen)
    if cfg.has_qlen:
        parts.append(qpos < qlen)
    if qseg is not None:
        parts.append(qseg[:, None] == kseg[None, :])
    if mask_blk is not None:
        parts.append(mask_blk != 0)
    if not parts:
        return None
    vis = parts[0]
    for p in parts[1:]:
        vis = vis & p
    return vis


def _logits(cfg: _Cfg, s, bias_blk, vis, smod=None):
    """Scale, soft cap, score_mod, bias and mask a float32 score block. Returns
    ``(z, tanh or None)``. ``smod``: the user's ``score_mod`` on this block, or ``None``."""
    if cfg.scale != 1.0:
        s = s * cfg.scale
    t = None
    if cfg.softcap is not None:
        t = jnp.tanh(s * (1.0 / cfg.softcap))
        s = t * cfg.softcap
    if smod is not None:
        s = smod(s)
    if bias_blk is not None:
        s = s + bias_blk.astype(jnp.float32)
    if vis is not None:
        s = jnp.where(vis, s, -jnp.inf)
    return s, t


def _keep(cfg: _Cfg, seed_bits, b, n, qpos, kpos):
    """The keep-mask of :func:`attnjax._src.dropout.keep_mask` for one ``(bq, bk)`` block."""
    u32 = jnp.uint32
    mix = dropout_lib._mix
    seed = lax.bitcast_convert_type(seed_bits, u32)
    bn = mix(seed ^ mix(b.astype(u32) * u32(dropout_lib._GOLD) + n.astype(u32) * u32(dropout_lib._M1)))
    hi = mix(qpos.astype(u32) * u32(dropout_lib._M2) + u32(1))
    hj = mix(kpos.astype(u32) * u32(dropout_lib._GOLD) + u32(2))
    x = mix(mix(bn ^ hi) ^ hj)
    threshold = min(int(round(cfg.dropout_rate * 2.0**32)), 2**32 - 1)
    return x >= u32(threshold)


def _dot(a, b, cfg: _Cfg, trans_a=False, trans_b=False):
    return plgpu.dot(a, b, trans_a=trans_a, trans_b=trans_b, precision=cfg.precision)


def _iota(n: int, axis: int):
    shape = (n, 1) if axis == 0 else (1, n)
    return lax.broadcasted_iota(jnp.int32, shape, axis)


def _run_ranges(cfg: _Cfg, ranges, make_body, carry, n_blocks: int, seg_class=None):
    """Loop ``make_body(masked)`` over the block ranges: masked edges, unmasked middle.

    ``seg_class(j) -> (empty, full)``: with segment ids, whether inner block ``j`` shares no
    segment with this program's block (skipped) or both are one and the same segment (then a
    positionally full block needs no mask at all)."""
    if cfg.trivial:
        return lax.fori_loop(0, n_blocks, make_body(False), carry)
    masked_body, plain_body = make_body(True), make_body(False)
    masked, plain = masked_body, plain_body
    if seg_class is not None:
        i32 = jnp.int32
        skip = lambda j, c: c

        def masked_seg(j, c):
            empty, _ = seg_class(j)
            return lax.switch(jnp.where(empty, i32(0), i32(1)), (skip, masked_body), j, c)

        def plain_seg(j, c):
            empty, full = seg_class(j)
            idx = jnp.where(empty, i32(0), jnp.where(full, i32(2), i32(1)))
            return lax.switch(idx, (skip, masked_body, plain_body), j, c)

        masked, plain = masked_seg, plain_seg
    lo, flo, fhi, hi = ranges
    if cfg.always_masked:
        return lax.fori_loop(lo, hi, masked, carry)
    carry = lax.fori_loop(lo, flo, masked, carry)
    carry = lax.fori_loop(flo, fhi, plain, carry)
    return lax.fori_loop(fhi, hi, masked, carry)


def _seg_class_fn(own_min, own_max, other_ref):
    """``seg_class`` for :func:`_run_ranges`: ``other_ref (2, n)`` holds per-block min/max ids."""

    def seg_class(j):
        omin, omax = other_ref[0, j], other_ref[1, j]
        empty = (omax < own_min) | (omin > own_max)
        full = (own_min == own_max) & (omin == omax) & (own_min == omin)
        return empty, full

    return seg_class


def _table_class_fn(table_ref, own: int, own_is_row: bool):
    """``seg_class``-style ``(empty, full)`` of inner block ``j`` from a block-class table
    ``(nq, nk)`` (row = query block), for the program's own block ``own``."""

    def table_class(j):
        c = table_ref[own, j] if own_is_row else table_ref[j, own]
        return c == EMPTY, c == FULL

    return table_class


def _both(f1, f2):
    """Combine two ``(empty, full)`` classifiers: empty if either says so, full if both do."""
    if f1 is None or f2 is None:
        return f1 if f2 is None else f2

    def f(j):
        e1, u1 = f1(j)
        e2, u2 = f2(j)
        return e1 | e2, u1 & u2

    return f


def _seg_ranges(seg, block: int):
    """Per-block ``(min, max)`` segment ids: ``(B, L)`` -> ``(B, 2, L / block)`` int32."""
    B, L = seg.shape
    s = seg.reshape(B, L // block, block)
    return jnp.stack([jnp.min(s, axis=-1), jnp.max(s, axis=-1)], axis=1)


def _tile_grads(cfg: _Cfg, s, lse, delta, dp, bias_blk, vis, keep, mods=None, qpos=None,
                kpos=None, leaf_grads=None):
    """Recomputed probabilities and score gradients of one ``(bq, bk)`` block.

    Returns ``(pd, dz, ds)``: the dropped-out weights (for dV), the gradient w.r.t. the logits
    ``z`` (= dbias) and w.r.t. the raw scores ``q·k`` (for dQ, dK). With a ``score_mod``
    (``mods``), ``ds`` goes through its VJP; ``leaf_grads`` (a list) then receives
    ``(leaf, cotangent)`` of the arrays it read (for the dQ kernel's partial sums)."""
    smod, pullback = None, []
    if mods is not None and cfg.score_mod is not None:
        def smod(x):
            y, fn, leaves = mods.score_vjp(x, qpos, kpos, leaf_grads is not None)
            pullback.append((fn, leaves))
            return y
    z, t = _logits(cfg, s, bias_blk, vis, smod)
    p = jnp.exp(z - lse[:, None])  # lse = +inf on fully masked rows: p = 0
    pd = p
    if keep is not None:
        inv = 1.0 / (1.0 - cfg.dropout_rate)
        pd = jnp.where(keep, p * inv, 0.0)
        dp = jnp.where(keep, dp * inv, 0.0)
    dz = p * (dp - delta[:, None])
    ds = dz
    if pullback:
        fn, leaves = pullback[0]
        ds, dleaves = fn(dz)
        if leaf_grads is not None:
            leaf_grads.extend(zip(leaves, dleaves, strict=True))
    if t is not None:
        ds = ds * (1.0 - t * t)
    if cfg.scale != 1.0:
        ds = ds * cfg.scale
    return pd, dz, ds


def _split_refs(cfg: _Cfg, refs, n_fixed: int, seg_ranges: bool = True):
    """Split kernel refs into fixed ones, (qseg, kseg), mask, bias, and the outputs; with
    ``seg_ranges`` the per-block segment ranges (qr, kr) follow the segment ids."""
    refs = list(refs)
    fixed, rest = refs[:n_fixed], refs[n_fixed:]
    qseg = kseg = mask = bias = None
    ranges = (None, None)
    if cfg.has_seg:
        qseg, kseg, *rest = rest
        if seg_ranges:
            ranges = tuple(rest[:2])
            rest = rest[2:]
    if cfg.mask_shape is not None:
        mask, *rest = rest
    if cfg.bias_shape is not None:
        bias, *rest = rest
    table = None
    if cfg.has_table and seg_ranges:
        table, *rest = rest
    nm, ns = len(cfg.mask_ids), len(cfg.score_ids)
    fx = _FlexRefs(table, tuple(rest[:nm]), tuple(rest[nm:nm + ns]))
    rest = rest[nm + ns:]
    if seg_ranges:
        return fixed, (qseg, *ranges), kseg, mask, bias, fx, rest
    return fixed, qseg, kseg, mask, bias, fx, rest


def _qk_tile(ref, shape, q_sl, k_sl, lead=()):
    """Load the ``(bq|1, bk|1)`` tile of a mask/bias ref whose last two dims are T|1, S|1."""
    t_full, s_full = shape[-2] != 1, shape[-1] != 1
    idx = (*lead, q_sl if t_full else slice(None), k_sl if s_full else slice(None))
    return ref[idx]


# ------------------------------------------------------------------------------------------------
# User mods (mask_mod / score_mod) inside the kernels.
#
# A mod's closed-over arrays (traced or concrete) are whole-array operands of every kernel. The
# mod's jaxpr is evaluated by :func:`_eval_mod`, which turns each point-gather from such an array
# (``slopes[h]``, ``doc[b, q_idx]``, ``table[bucket, h]``: jnp indexing by integer arrays) into a
# *ref load* at the clipped indices, which Triton lowers as a pointer gather (a gather of a value
# does not lower); any other use of the array loads it whole. The loaded values are the "leaves"
# of the mod: the backward differentiates the mod with respect to them (elementwise work only) and
# scatters their cotangents back into per-program partial sums (:func:`_scatter_leaf`).


def _closure(fn, *args):
    """Every array ``fn`` closes over (traced or concrete) when called on ``args``, and their
    ids (static), in the order of the traced jaxpr's constants."""
    closed = jax.make_jaxpr(fn)(*args)
    return tuple(closed.consts), tuple(id(c) for c in closed.consts)


@dataclasses.dataclass(frozen=True)
class _Leaf:
    const: int  # which closed-over array
    idx: tuple | None  # per-dim index (scalars or arrays of the leaf's shape); None: whole array


def _producer(jaxpr):
    return {v: e for e in jaxpr.eqns for v in e.outvars}


def _point_gather_parts(eqn, producers):
    """The per-index-dim index atoms of a point gather ``x[i, j, ...]`` (every operand dim
    collapsed, slices of 1; indices concatenated from one array per dim, as jnp builds them),
    or ``None`` when the gather has another form."""
    dn = eqn.params["dimension_numbers"]
    operand, indices = eqn.invars
    nd = len(operand.aval.shape)
    if (dn.offset_dims or dn.operand_batching_dims or tuple(sorted(dn.collapsed_slice_dims))
            != tuple(range(nd)) or any(s != 1 for s in eqn.params["slice_sizes"])
            or len(dn.start_index_map) != nd or indices.aval.shape[-1] != nd):
        return None
    prod = producers.get(indices) if isinstance(indices, jcore.Var) else None
    if (prod is not None and prod.primitive is lax.concatenate_p
            and prod.params["dimension"] == len(indices.aval.shape) - 1
            and all(x.aval.shape[-1] == 1 for x in prod.invars) and len(prod.invars) == nd):
        return list(prod.invars)
    if nd == 1:
        return [indices]
    return None


def _point_gather_dims(eqn, producers, env, read):
    """Per-operand-dim index values of a point gather, or ``None`` (another form)."""
    dn = eqn.params["dimension_numbers"]
    atoms = _point_gather_parts(eqn, producers)
    if atoms is None:
        return None
    out_shape = tuple(eqn.invars[1].aval.shape[:-1])
    nd = len(atoms)
    parts = [read(x).reshape(out_shape) for x in atoms]
    dims = [None] * nd
    for m, d in enumerate(dn.start_index_map):
        dims[d] = parts[m]
    return dims


def _mod_plan(jaxpr, const_vars):
    """Static check of a mod's jaxpr for Triton: the first primitive that cannot lower (a gather
    of a computed array, a scatter, ...), or ``None``."""
    from jax._src.pallas.triton import lowering as tl  # noqa: PLC0415 (private, lazy)

    producers = _producer(jaxpr)
    consts = set(const_vars)
    for eqn in jaxpr.eqns:
        uses = [v for v in eqn.invars if isinstance(v, jcore.Var) and v in consts]
        if uses:
            if eqn.primitive is lax.gather_p and eqn.invars[0] in consts:
                if _point_gather_parts(eqn, producers) is not None:
                    continue
                return "a gather from a closed-over array in a form other than x[i, j, ...]"
            if (eqn.primitive is lax.dynamic_slice_p and eqn.invars[0] in consts
                    and all(x == 1 for x in eqn.params["slice_sizes"])):
                continue
            # Loaded whole: Triton needs power-of-two block shapes.
            for v in uses:
                if any(not _is_pow2(d) for d in v.aval.shape):
                    return (f"a closed-over array of shape {tuple(v.aval.shape)} used whole "
                            "(Triton loads power-of-two shapes only)")
        for sub in jcore.jaxprs_in_params(eqn.params):
            inner = _mod_plan(sub, ())
            if inner is not None:
                return inner
        if eqn.primitive not in tl.triton_lowering_rules:
            return f"the primitive {eqn.primitive.name!r}, which Pallas cannot lower to Triton"
    return None


def mods_lowering_reason(mask_mod, score_mod) -> str | None:
    """Why the kernels cannot lower these mods to Triton (a sentence), or ``None``.

    Traced at a kernel block's shapes (scalar ``b``, ``h``; ``(16, 1)`` / ``(1, 16)``
    positions); a ``score_mod`` also through its VJP with respect to the score. Point gathers
    ``x[i, j, ...]`` from a closed-over array are fine (ref loads); a gather from a computed
    array, a sort, a scatter are not.
    """
    i32 = jnp.int32
    b = h = jnp.int32(0)
    q, k = jnp.zeros((16, 1), i32), jnp.zeros((1, 16), i32)
    s = jnp.zeros((16, 16), jnp.float32)
    checks = []
    if mask_mod is not None:
        checks.append(("mask_mod", lambda: jax.make_jaxpr(mask_mod)(b, h, q, k)))
    if score_mod is not None:
        def grad(x):
            y, fn = jax.vjp(lambda x: score_mod(x, b, h, q, k), x)
            return y, fn(jnp.ones_like(y))
        checks.append(("score_mod", lambda: jax.make_jaxpr(grad)(s)))
    for name, trace in checks:
        closed = trace()
        why = _mod_plan(closed.jaxpr, closed.jaxpr.constvars)
        if why is not None:
            return (f"the {name} cannot run inside the Triton kernel: it uses {why}; index "
                    "closed-over arrays directly (x[h], x[b, q_idx]) or use "
                    "implementation='xla_chunked'")
    return None


def _eval_mod(fn, ids, refs, args, overrides=None, leaves=None):
    """``fn(*args)`` inside a kernel, with its closed-over arrays read from ``refs`` (matched
    by ``ids``). Each ref read is a leaf: appended to ``leaves`` (``_Leaf``s, with values), or
    replaced by ``overrides[k]`` (to differentiate with respect to the leaves)."""
    closed = jax.make_jaxpr(fn)(*args)
    jaxpr = closed.jaxpr
    const_of = {}
    env = {}
    for p, (var, c) in enumerate(zip(jaxpr.constvars, closed.consts, strict=True)):
        if id(c) in ids:
            const_of[var] = ids.index(id(c))
        elif (not isinstance(c, jax.core.Tracer) and p < len(refs)
              and tuple(refs[p].shape) == tuple(c.shape) and refs[p].dtype == c.dtype):
            # A concrete array the mod creates afresh on every call (a new object each
            # trace): the same position in the same jaxpr. (A kernel may not capture it.)
            const_of[var] = p
        elif isinstance(c, jax.core.Tracer):
            raise ValueError(
                "a mask_mod/score_mod closes over a traced array that was not present when "
                "attnjax first traced it; build the callable once, outside the attention call")
        else:
            env[var] = c
    for var, a in zip(jaxpr.invars, args, strict=True):
        env[var] = a
    producers = _producer(jaxpr)
    count = [0]
    whole = {}

    def read(v):
        return v.val if isinstance(v, jcore.Literal) else env[v]

    def leaf(ci, idx, load):
        k = count[0]
        count[0] += 1
        val = load() if overrides is None else overrides[k]
        if leaves is not None:
            leaves.append((_Leaf(ci, idx), val))
        return val

    def load_whole(ci):
        if ci not in whole:
            whole[ci] = leaf(ci, None, lambda: refs[ci][...])
        return whole[ci]

    for eqn in jaxpr.eqns:
        op = eqn.invars[0] if eqn.invars else None
        if isinstance(op, jcore.Var) and op in const_of and eqn.primitive in (
                lax.gather_p, lax.dynamic_slice_p):
            ci = const_of[op]
            shape = op.aval.shape
            out = None
            if eqn.primitive is lax.gather_p:
                dims = _point_gather_dims(eqn, producers, env, read)
                if dims is not None:
                    idx = tuple(jnp.broadcast_to(jnp.clip(d.astype(jnp.int32), 0, n - 1),
                                                 eqn.outvars[0].aval.shape)
                                for d, n in zip(dims, shape, strict=True))
                    out = leaf(ci, idx, lambda idx=idx, ci=ci: refs[ci][idx])
            elif all(s == 1 for s in eqn.params["slice_sizes"]):
                idx = tuple(jnp.clip(read(s).astype(jnp.int32), 0, n - 1)
                            for s, n in zip(eqn.invars[1:], shape, strict=True))
                out = leaf(ci, idx, lambda idx=idx, ci=ci: refs[ci][idx]).reshape(
                    (1,) * len(shape))
            if out is not None:
                env[eqn.outvars[0]] = out
                continue
        invals = []
        for v in eqn.invars:
            if isinstance(v, jcore.Var) and v in const_of:
                invals.append(load_whole(const_of[v]))
            else:
                invals.append(read(v))
        with eqn.ctx.manager:
            outs = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
        if not eqn.primitive.multiple_results:
            outs = [outs]
        for v, o in zip(eqn.outvars, outs, strict=True):
            env[v] = o
    return read(jaxpr.outvars[0])


@dataclasses.dataclass(frozen=True)
class _FlexRefs:
    table: Any  # int32 (nq, nk) block classes of this kernel's blocks, or None
    mask: tuple  # refs of the arrays mask_mod closes over
    score: tuple  # refs of the arrays score_mod closes over


@dataclasses.dataclass(frozen=True)
class _Mods:
    """The user's mods of one program: batch row ``b``, query head ``h``, query offset ``off``
    (``q_idx = qpos + off``, ``kv_idx = kpos``)."""

    cfg: Any
    fx: _FlexRefs
    b: Any
    h: Any
    off: Any

    def _args(self, qpos, kpos):
        i32 = jnp.int32
        return (jnp.asarray(self.b, i32), jnp.asarray(self.h, i32), qpos + self.off, kpos)

    def mask(self, qpos, kpos):
        return _eval_mod(self.cfg.mask_mod, self.cfg.mask_ids, self.fx.mask,
                         self._args(qpos, kpos))

    def score(self, x, qpos, kpos):
        return _eval_mod(self.cfg.score_mod, self.cfg.score_ids, self.fx.score,
                         (x, *self._args(qpos, kpos)))

    def score_vjp(self, x, qpos, kpos, with_leaves: bool = True):
        """``(y, pullback, leaves)``: ``pullback(dy) -> (dx, [d leaf])`` over the floating leaves
        (the arrays' values read by the mod); ``leaves``: their :class:`_Leaf` records."""
        args = self._args(qpos, kpos)
        cfg, refs = self.cfg, self.fx.score
        found = []
        _eval_mod(cfg.score_mod, cfg.score_ids, refs, (x, *args), leaves=found)
        vals = [v for _, v in found]
        diff = [k for k, (lf, v) in enumerate(found) if with_leaves
                and cfg.dconst[lf.const] and jnp.issubdtype(v.dtype, jnp.inexact)]

        def f(x, dvals):
            over = list(vals)
            for k, v in zip(diff, dvals, strict=True):
                over[k] = v
            return _eval_mod(cfg.score_mod, cfg.score_ids, refs, (x, *args), overrides=over)

        y, fn = jax.vjp(f, x, [vals[k] for k in diff])

        def pullback(dy):
            dx, dv = fn(dy)
            return dx, list(dv)

        return y, pullback, [found[k][0] for k in diff]


def _zero_ref(ref):
    """Zero a whole ref: one store for power-of-two shapes, else one scalar store per element
    (Triton blocks are powers of two)."""
    if all(_is_pow2(d) for d in ref.shape):
        ref[...] = jnp.zeros(ref.shape, ref.dtype)
        return
    shape = ref.shape

    def body(c, _):
        idx = []
        for d in reversed(shape):
            idx.append(lax.rem(c, jnp.int32(d)))
            c = lax.div(c, jnp.int32(d))
        ref[tuple(reversed(idx))] = jnp.zeros((), ref.dtype)

    # No carry (a literal carry does not lower to Triton's scf.yield).
    lax.fori_loop(jnp.int32(0), jnp.int32(math.prod(shape)), body, None)


def _scatter_leaf(ref, leaf: _Leaf, g):
    """``ref[leaf.idx] += g`` summed over duplicates, race-free inside one program: a scalar
    index adds ``sum(g)``; array-indexed dims loop over the array's extent (one masked sum per
    element) so that no two lanes write one address."""
    g = g.astype(jnp.float32)
    if leaf.idx is None:
        ref[...] = ref[...] + g
        return
    arr = [d for d, x in enumerate(leaf.idx) if jnp.ndim(x) > 0]
    if not arr:
        ref[leaf.idx] = ref[leaf.idx] + jnp.sum(g)
        return
    extents = [ref.shape[d] for d in arr]
    total = 1
    for e in extents:
        total *= e

    def body(c, _):
        r, hit, idx = c, None, list(leaf.idx)
        for d, e in zip(reversed(arr), reversed(extents), strict=True):
            cd = lax.rem(r, jnp.int32(e))
            r = lax.div(r, jnp.int32(e))
            h = leaf.idx[d] == cd
            hit = h if hit is None else hit & h
            idx[d] = cd
        idx = tuple(idx)
        ref[idx] = ref[idx] + jnp.sum(jnp.where(hit, g, 0.0))

    lax.fori_loop(jnp.int32(0), jnp.int32(total), body, None)


# ------------------------------------------------------------------------------------------------
# Kernels.


def _key_block_masks(cfg: _Cfg, masked: bool, k_sl, qpos, kpos, off, qlen, kvlen, qseg,
                     kseg_ref, mask_ref, bias_ref, mods):
    """Visibility (``None`` for an unmasked block) and bias tile of one ``(block_q, block_k)``
    tile of a kernel whose program owns a query block and loops over key blocks (the forward
    and the dQ kernels)."""
    vis = None
    if masked:
        kseg = None if kseg_ref is None else kseg_ref[k_sl]
        mblk = None if mask_ref is None else _qk_tile(
            mask_ref, cfg.mask_shape, slice(None), k_sl)
        vis = _visible(cfg, qpos, kpos, off, qlen, kvlen, qseg, kseg, mblk, mods)
    bblk = None if bias_ref is None else _qk_tile(bias_ref, cfg.bias_shape, slice(None), k_sl)
    return vis, bblk


def _fwd_kernel(*refs, cfg: _Cfg):
    (q_ref, k_ref, v_ref, row_ref), (qseg_ref, qr_ref, kr_ref), kseg_ref, mask_ref, bias_ref, \
        fx, (o_ref, lse_ref) = _split_refs(cfg, refs, 4)
    bq, bk = cfg.bq, cfg.bk
    nk = cfg.Sp // bk
    i, b, n = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    off, qlen, kvlen, seed_bits = row_ref[0], row_ref[1], row_ref[2], row_ref[3]
    q_start = i * bq
    q = q_ref[...]
    qpos = q_start + _iota(bq, 0)
    qseg = None if qseg_ref is None else qseg_ref[...]
    hv = o_ref.shape[-1]
    mods = _Mods(cfg, fx, b, n, off)

    def make_body(masked: bool):
        def body(j, carry):
            m, l, acc = carry
            ks = pl.multiple_of(j * bk, bk)
            k_sl = pl.ds(ks, bk)
            kpos = ks + _iota(bk, 1)
            s = _dot(q, k_ref[k_sl, :], cfg, trans_b=True)
            vis, bblk = _key_block_masks(cfg, masked, k_sl, qpos, kpos, off, qlen, kvlen, qseg,
                                         kseg_ref, mask_ref, bias_ref, mods)
            smod = None if cfg.score_mod is None else (
                lambda x: mods.score(x, qpos, kpos))  # noqa: B023 (called in this iteration)
            z, _ = _logits(cfg, s, bblk, vis, smod)
            m_new = jnp.maximum(m, jnp.max(z, axis=1))
            m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
            p = jnp.exp(z - m_use[:, None])
            alpha = jnp.exp(m - m_use)
            l = l * alpha + jnp.sum(p, axis=1)
            if cfg.dropout_rate > 0.0:
                keep = _keep(cfg, seed_bits, b, n, qpos, kpos)
                p = jnp.where(keep, p * (1.0 / (1.0 - cfg.dropout_rate)), 0.0)
            v = v_ref[k_sl, :]
            acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v, cfg)
            return m_new, l, acc

        return body

    carry = (jnp.full((bq,), -jnp.inf, jnp.float32), jnp.zeros((bq,), jnp.float32),
             jnp.zeros((bq, hv), jnp.float32))
    ranges = None if cfg.trivial else _key_ranges(cfg, q_start, bq, bk, nk, off, qlen, kvlen)
    seg_class = None if qr_ref is None else _seg_class_fn(qr_ref[0, i], qr_ref[1, i], kr_ref)
    if fx.table is not None:
        seg_class = _both(seg_class, _table_class_fn(fx.table, i, True))
    m, l, acc = _run_ranges(cfg, ranges, make_body, carry, nk, seg_class)
    safe = jnp.where(l > 0.0, l, 1.0)
    o_ref[...] = (acc / safe[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(l > 0.0, m + jnp.log(safe), -jnp.inf)


def _dkv_kernel(*refs, cfg: _Cfg):
    (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, row_ref), (qseg_ref, qr_ref, kr_ref), \
        kseg_ref, mask_ref, bias_ref, fx, (dk_ref, dv_ref) = _split_refs(cfg, refs, 7)
    bq, bk, G = cfg.bq_dkv, cfg.bk_dkv, cfg.G
    nq = cfg.Tp // bq
    j, b, kh = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    off, qlen, kvlen, seed_bits = row_ref[0], row_ref[1], row_ref[2], row_ref[3]
    k_start = j * bk
    k = k_ref[...]
    v = v_ref[...]
    kpos = k_start + _iota(bk, 1)
    kseg = None if kseg_ref is None else kseg_ref[...]

    def head_loop(g, carry):
        mods = _Mods(cfg, fx, b, kh * G + g, off)

        def make_body(masked: bool):
            def body(i, c):
                dk, dv = c
                qs = pl.multiple_of(i * bq, bq)
                q_sl = pl.ds(qs, bq)
                qpos = qs + _iota(bq, 0)
                q = q_ref[q_sl, g, :]
                do = do_ref[q_sl, g, :]
                s = _dot(q, k, cfg, trans_b=True)
                dp = _dot(do, v, cfg, trans_b=True)
                vis = None
                if masked:
                    qseg = None if qseg_ref is None else qseg_ref[q_sl]
                    mblk = None if mask_ref is None else _qk_tile(
                        mask_ref, cfg.mask_shape, q_sl, slice(None),
                        (g if cfg.mask_shape[1] != 1 else 0,))
                    vis = _visible(cfg, qpos, kpos, off, qlen, kvlen, qseg, kseg, mblk, mods)
                bblk = None if bias_ref is None else _qk_tile(
                    bias_ref, cfg.bias_shape, q_sl, slice(None),
                    (g if cfg.bias_shape[1] != 1 else 0,))
                keep = (None if cfg.dropout_rate == 0.0
                        else _keep(cfg, seed_bits, b, kh * G + g, qpos, kpos))
                pd, _, ds = _tile_grads(cfg, s, lse_ref[g, q_sl], delta_ref[g, q_sl], dp,
                                        bblk, vis, keep, mods, qpos, kpos)
                dv = dv + _dot(pd.astype(do.dtype), do, cfg, trans_a=True)
                dk = dk + _dot(ds.astype(q.dtype), q, cfg, trans_a=True)
                return dk, dv

            return body

        return _run_ranges(cfg, ranges, make_body, carry, nq, seg_class)

    ranges = None if cfg.trivial else _query_ranges(cfg, k_start, bk, bq, nq, off, qlen, kvlen)
    seg_class = None if kr_ref is None else _seg_class_fn(kr_ref[0, j], kr_ref[1, j], qr_ref)
    if fx.table is not None:
        seg_class = _both(seg_class, _table_class_fn(fx.table, j, False))
    carry = (jnp.zeros((bk, dk_ref.shape[-1]), jnp.float32),
             jnp.zeros((bk, dv_ref.shape[-1]), jnp.float32))
    if G == 1:
        dk, dv = head_loop(0, carry)
    else:
        dk, dv = lax.fori_loop(0, G, head_loop, carry)
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(*refs, cfg: _Cfg):
    (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, row_ref), (qseg_ref, qr_ref, kr_ref), \
        kseg_ref, mask_ref, bias_ref, fx, (dq_ref, *dc_refs) = _split_refs(cfg, refs, 7)
    bq, bk = cfg.bq_dq, cfg.bk_dq
    nk = cfg.Sp // bk
    i, b, n = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    off, qlen, kvlen, seed_bits = row_ref[0], row_ref[1], row_ref[2], row_ref[3]
    q_start = i * bq
    q = q_ref[...]
    do = do_ref[...]
    lse = lse_ref[...]
    delta = delta_ref[...]
    qpos = q_start + _iota(bq, 0)
    qseg = None if qseg_ref is None else qseg_ref[...]
    mods = _Mods(cfg, fx, b, n, off)
    # Partial sums of the score_mod arrays' gradients: one slot per program, summed outside.
    dc_of = dict(zip([c for c, d in enumerate(cfg.dconst) if d], dc_refs, strict=True))
    for ref in dc_refs:
        _zero_ref(ref)

    def make_body(masked: bool):
        def body(j, dq):
            ks = pl.multiple_of(j * bk, bk)
            k_sl = pl.ds(ks, bk)
            kpos = ks + _iota(bk, 1)
            k = k_ref[k_sl, :]
            s = _dot(q, k, cfg, trans_b=True)
            dp = _dot(do, v_ref[k_sl, :], cfg, trans_b=True)
            vis, bblk = _key_block_masks(cfg, masked, k_sl, qpos, kpos, off, qlen, kvlen, qseg,
                                         kseg_ref, mask_ref, bias_ref, mods)
            keep = None if cfg.dropout_rate == 0.0 else _keep(cfg, seed_bits, b, n, qpos, kpos)
            leaf_grads = []
            _, _, ds = _tile_grads(cfg, s, lse, delta, dp, bblk, vis, keep, mods, qpos, kpos,
                                   leaf_grads)
            for leaf, g in leaf_grads:
                _scatter_leaf(dc_of[leaf.const], leaf, g)
            return dq + _dot(ds.astype(k.dtype), k, cfg)

        return body

    ranges = None if cfg.trivial else _key_ranges(cfg, q_start, bq, bk, nk, off, qlen, kvlen)
    seg_class = None if qr_ref is None else _seg_class_fn(qr_ref[0, i], qr_ref[1, i], kr_ref)
    if fx.table is not None:
        seg_class = _both(seg_class, _table_class_fn(fx.table, i, True))
    dq = _run_ranges(cfg, ranges, make_body, jnp.zeros((bq, dq_ref.shape[-1]), jnp.float32), nk,
                     seg_class)
    dq_ref[...] = dq.astype(dq_ref.dtype)


def _dbias_kernel(*refs, cfg: _Cfg):
    """One ``(tq, tk)`` tile of dbias, summed over the bias's broadcast dims (whole-array refs)."""
    (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, row_ref), qseg_ref, kseg_ref, mask_ref, \
        bias_ref, fx, (db_ref,) = _split_refs(cfg, refs, 7, seg_ranges=False)
    B, N, G = cfg.B, cfg.N, cfg.G
    Bb, Nb, Tb, Sb = cfg.bias_shape
    bq, bk = cfg.bq_dq, cfg.bk_dq
    it, js, bn = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bb, nb = _div(bn, Nb), _rem(bn, Nb)
    # Loop extents: batch rows / heads / query blocks / key blocks summed into this tile.
    loop_b = B if (Bb == 1 and B > 1) else 1
    loop_n = N if (Nb == 1 and N > 1) else 1
    loop_q = cfg.Tp // bq if Tb == 1 else 1
    loop_k = cfg.Sp // bk if Sb == 1 else 1
    total = loop_b * loop_n * loop_q * loop_k

    def body(t, acc):
        r = t
        kk = _rem(r, loop_k)
        r = _div(r, loop_k)
        qq = _rem(r, loop_q)
        r = _div(r, loop_q)
        nn = _rem(r, loop_n)
        b_ = _div(r, loop_n)
        b = b_ if loop_b > 1 else bb
        n = nn if loop_n > 1 else nb
        i = qq if loop_q > 1 else it
        j = kk if loop_k > 1 else js
        qs = pl.multiple_of(i * bq, bq)
        ks = pl.multiple_of(j * bk, bk)
        q_sl, k_sl = pl.ds(qs, bq), pl.ds(ks, bk)
        qpos = qs + _iota(bq, 0)
        kpos = ks + _iota(bk, 1)
        kh = _div(n, G)
        q = q_ref[b, q_sl, n, :]
        k = k_ref[b, k_sl, kh, :]
        do = do_ref[b, q_sl, n, :]
        v = v_ref[b, k_sl, kh, :]
        off, qlen, kvlen, seed_bits = row_ref[b, 0], row_ref[b, 1], row_ref[b, 2], row_ref[b, 3]
        s = _dot(q, k, cfg, trans_b=True)
        dp = _dot(do, v, cfg, trans_b=True)
        qseg = None if qseg_ref is None else qseg_ref[b, q_sl]
        kseg = None if kseg_ref is None else kseg_ref[b, k_sl]
        mblk = None
        if mask_ref is not None:
            Bm, Nm = cfg.mask_shape[:2]
            mblk = _qk_tile(mask_ref, cfg.mask_shape, q_sl, k_sl,
                            (b if Bm != 1 else 0, n if Nm != 1 else 0))
        mods = _Mods(cfg, fx, b, n, off)
        vis = _visible(cfg, qpos, kpos, off, qlen, kvlen, qseg, kseg, mblk, mods)
        bblk = _qk_tile(bias_ref, cfg.bias_shape, q_sl, k_sl,
                        (b if Bb != 1 else 0, n if Nb != 1 else 0))
        keep = None if cfg.dropout_rate == 0.0 else _keep(cfg, seed_bits, b, n, qpos, kpos)
        _, dz, _ = _tile_grads(cfg, s, lse_ref[b, n, q_sl], delta_ref[b, n, q_sl], dp, bblk,
                               vis, keep, mods, qpos, kpos)
        if Tb == 1:
            dz = jnp.sum(dz, axis=0, keepdims=True)
        if Sb == 1:
            dz = jnp.sum(dz, axis=1, keepdims=True)
        return acc + dz

    tq, tk = (bq if Tb != 1 else 1), (bk if Sb != 1 else 1)
    acc = lax.fori_loop(0, total, body, jnp.zeros((tq, tk), jnp.float32))
    db_ref[...] = acc.astype(db_ref.dtype)


# ------------------------------------------------------------------------------------------------
# pallas_calls.


def _full_spec(x):
    return pl.BlockSpec(x.shape, lambda *_: (0,) * x.ndim)


def _extra_specs(cfg: _Cfg, extras, kind: str, table: int = 0):
    """BlockSpecs of (qseg, kseg, mask, bias, block tables, mod arrays) for the grid ``kind``
    ('q': (i, b, n) with query blocks of ``bq``; 'k': (j, b, kh) with key blocks of ``bk``);
    ``table`` picks this kernel's block-class table (0 forward, 1 dK/dV, 2 dQ)."""
    qseg, kseg, mask, bias, tables, mconsts, sconsts = extras
    specs, args = [], []
    bq = cfg.bq
    if cfg.has_seg:
        # The ids, then per-block (min, max) ids of the program's and the inner loop's blocks.
        if kind == "q":
            bk = cfg.bk
            specs += [pl.BlockSpec((None, bq), lambda i, b, n: (b, i)),
                      pl.BlockSpec((None, cfg.Sp), lambda i, b, n: (b, 0))]
        else:
            bq, bk = cfg.bq_dkv, cfg.bk_dkv
            specs += [pl.BlockSpec((None, cfg.Tp), lambda j, b, h: (b, 0)),
                      pl.BlockSpec((None, bk), lambda j, b, h: (b, j))]
        qr, kr = _seg_ranges(qseg, bq), _seg_ranges(kseg, bk)
        specs += [pl.BlockSpec((None, 2, qr.shape[-1]), lambda x, b, y: (b, 0, 0)),
                  pl.BlockSpec((None, 2, kr.shape[-1]), lambda x, b, y: (b, 0, 0))]
        args += [qseg, kseg, qr, kr]
    for x in (mask, bias):
        if x is None:
            continue
        Bx, Nx, Tx, Sx = x.shape
        if kind == "q":
            blk = (None, None, bq if Tx != 1 else 1, Sx)

            def imap(i, b, n, Bx=Bx, Nx=Nx, Tx=Tx):
                return (b if Bx != 1 else 0, n if Nx != 1 else 0, i if Tx != 1 else 0, 0)
        else:
            G = cfg.G
            bk = cfg.bk_dkv
            blk = (None, G if Nx != 1 else 1, Tx, bk if Sx != 1 else 1)

            def imap(j, b, h, Bx=Bx, Nx=Nx, Sx=Sx):
                return (b if Bx != 1 else 0, h if Nx != 1 else 0, 0, j if Sx != 1 else 0)
        specs.append(pl.BlockSpec(blk, imap))
        args.append(x)
    flex_args = ([] if tables is None else [tables[table]]) + list(mconsts) + list(sconsts)
    return specs + [_full_spec(x) for x in flex_args], args + flex_args


def _with_bq(cfg: _Cfg, bq: int, bk: int) -> _Cfg:
    """A copy whose forward block sizes are ``bq, bk`` (to reuse the 'q' specs for dQ)."""
    return dataclasses.replace(cfg, bq=bq, bk=bk)


def _fwd_call(cfg: _Cfg, q, k, v, row, extras):
    B, Tp, N, Hp = q.shape
    Sp, Hvp = v.shape[1], v.shape[3]
    G, bq = cfg.G, cfg.bq
    specs = [
        pl.BlockSpec((None, bq, None, Hp), lambda i, b, n: (b, i, n, 0)),
        pl.BlockSpec((None, Sp, None, Hp), lambda i, b, n: (b, 0, _div(n, G), 0)),
        pl.BlockSpec((None, Sp, None, Hvp), lambda i, b, n: (b, 0, _div(n, G), 0)),
        pl.BlockSpec((None, 4), lambda i, b, n: (b, 0)),
    ]
    xspecs, xargs = _extra_specs(cfg, extras, "q")
    return pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg),
        grid=(Tp // bq, B, N),
        in_specs=specs + xspecs,
        out_specs=[pl.BlockSpec((None, bq, None, Hvp), lambda i, b, n: (b, i, n, 0)),
                   pl.BlockSpec((None, None, bq), lambda i, b, n: (b, n, i))],
        out_shape=[jax.ShapeDtypeStruct((B, Tp, N, Hvp), q.dtype),
                   jax.ShapeDtypeStruct((B, N, Tp), jnp.float32)],
        compiler_params=cfg.params(fwd=True),
        interpret=cfg.interpret,
        name="attnjax_fwd",
    )(q, k, v, row, *xargs)


def _bwd_calls(cfg: _Cfg, q, k, v, row, extras, dout, lse, delta):
    B, Tp, N, Hp = q.shape
    Sp, K, Hvp = v.shape[1], v.shape[2], v.shape[3]
    G = cfg.G
    # dK, dV: grid over key blocks × batch × kv heads; all G query heads of the group per program.
    bk = cfg.bk_dkv
    specs = [
        pl.BlockSpec((None, Tp, G, Hp), lambda j, b, h: (b, 0, h, 0)),
        pl.BlockSpec((None, bk, None, Hp), lambda j, b, h: (b, j, h, 0)),
        pl.BlockSpec((None, bk, None, Hvp), lambda j, b, h: (b, j, h, 0)),
        pl.BlockSpec((None, Tp, G, Hvp), lambda j, b, h: (b, 0, h, 0)),
        pl.BlockSpec((None, G, Tp), lambda j, b, h: (b, h, 0)),
        pl.BlockSpec((None, G, Tp), lambda j, b, h: (b, h, 0)),
        pl.BlockSpec((None, 4), lambda j, b, h: (b, 0)),
    ]
    xspecs, xargs = _extra_specs(cfg, extras, "k", 1)
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, cfg=cfg),
        grid=(Sp // bk, B, K),
        in_specs=specs + xspecs,
        out_specs=[pl.BlockSpec((None, bk, None, Hp), lambda j, b, h: (b, j, h, 0)),
                   pl.BlockSpec((None, bk, None, Hvp), lambda j, b, h: (b, j, h, 0))],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype),
                   jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=cfg.params(fwd=False),
        interpret=cfg.interpret,
        name="attnjax_bwd_dkv",
    )(q, k, v, dout, lse, delta, row, *xargs)

    # dQ: grid over query blocks × batch × heads, key blocks inner.
    bq = cfg.bq_dq
    cq = _with_bq(cfg, bq, cfg.bk_dq)
    specs = [
        pl.BlockSpec((None, bq, None, Hp), lambda i, b, n: (b, i, n, 0)),
        pl.BlockSpec((None, Sp, None, Hp), lambda i, b, n: (b, 0, _div(n, G), 0)),
        pl.BlockSpec((None, Sp, None, Hvp), lambda i, b, n: (b, 0, _div(n, G), 0)),
        pl.BlockSpec((None, bq, None, Hvp), lambda i, b, n: (b, i, n, 0)),
        pl.BlockSpec((None, None, bq), lambda i, b, n: (b, n, i)),
        pl.BlockSpec((None, None, bq), lambda i, b, n: (b, n, i)),
        pl.BlockSpec((None, 4), lambda i, b, n: (b, 0)),
    ]
    xspecs, xargs = _extra_specs(cq, extras, "q", 2)
    # Per-program partial gradients of the score_mod's differentiable arrays (summed below).
    dcs = [c for c, d in zip(extras[6], cfg.dconst, strict=True) if d]

    def slot(nd):
        return lambda i, b, n: (i, b, n) + (0,) * nd

    dc_specs = [pl.BlockSpec((None, None, None, *c.shape), slot(c.ndim)) for c in dcs]
    dc_shapes = [jax.ShapeDtypeStruct((Tp // bq, B, N, *c.shape), jnp.float32) for c in dcs]
    dq, *dc_parts = pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg),
        grid=(Tp // bq, B, N),
        in_specs=specs + xspecs,
        out_specs=[pl.BlockSpec((None, bq, None, Hp), lambda i, b, n: (b, i, n, 0)), *dc_specs],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), *dc_shapes],
        compiler_params=cfg.params(fwd=False),
        interpret=cfg.interpret,
        name="attnjax_bwd_dq",
    )(q, k, v, dout, lse, delta, row, *xargs)
    dcs_out = iter(jnp.sum(x, axis=(0, 1, 2)) for x in dc_parts)
    dsconsts = tuple(
        next(dcs_out).astype(c.dtype) if d else (
            jnp.zeros(c.shape, c.dtype) if jnp.issubdtype(c.dtype, jnp.inexact)
            else np.zeros(c.shape, jax.dtypes.float0))
        for c, d in zip(extras[6], cfg.dconst, strict=True))

    dbias = None
    bias = extras[3]
    if bias is not None:
        Bb, Nb, Tb, Sb = bias.shape
        tq = cfg.bq_dq if Tb != 1 else 1
        tk = cfg.bk_dq if Sb != 1 else 1
        args = [q, k, v, dout, lse, delta, row] + [x for x in extras[:4] if x is not None]
        args += list(extras[5]) + list(extras[6])
        dbias = pl.pallas_call(
            functools.partial(_dbias_kernel, cfg=cfg),
            grid=(Tb // tq, Sb // tk, Bb * Nb),
            in_specs=[_full_spec(x) for x in args],
            out_specs=pl.BlockSpec((None, None, tq, tk),
                                   lambda it, js, bn: (_div(bn, Nb), _rem(bn, Nb), it, js)),
            out_shape=jax.ShapeDtypeStruct(bias.shape, jnp.float32),
            compiler_params=cfg.params(fwd=False),
            interpret=cfg.interpret,
            name="attnjax_bwd_dbias",
        )(*args)
        dbias = dbias.astype(bias.dtype)
    return dq, dk, dv, dbias, dsconsts


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _core(cfg: _Cfg, q, k, v, row, qseg, kseg, mask, bias, tables, mconsts, sconsts):
    return _fwd_call(cfg, q, k, v, row, (qseg, kseg, mask, bias, tables, mconsts, sconsts))


def _core_fwd(cfg, q, k, v, row, qseg, kseg, mask, bias, tables, mconsts, sconsts):
    extras = (qseg, kseg, mask, bias, tables, mconsts, sconsts)
    out, lse = _fwd_call(cfg, q, k, v, row, extras)
    return (out, lse), (q, k, v, row, extras, out, lse)


def _zero_cts(xs):
    return None if xs is None else jax.tree.map(
        lambda x: jnp.zeros(x.shape, x.dtype) if jnp.issubdtype(x.dtype, jnp.inexact)
        else np.zeros(x.shape, jax.dtypes.float0), xs)


def _core_bwd(cfg, res, cts):
    q, k, v, row, extras, out, lse = res
    dout, dlse = cts
    # delta_i = rowsum(dO_i · O_i) - dlse_i (the log-sum-exp's own cotangent folds in here).
    delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
    delta = jnp.transpose(delta, (0, 2, 1)) - dlse.astype(jnp.float32)  # (B, N, Tp)
    lse_use = jnp.where(jnp.isfinite(lse), lse, jnp.inf)
    dq, dk, dv, dbias, dsconsts = _bwd_calls(cfg, q, k, v, row, extras, dout.astype(q.dtype),
                                             lse_use, delta)
    return (dq, dk, dv, None, None, None, None, dbias, _zero_cts(extras[4]),
            _zero_cts(extras[5]), dsconsts)


_core.defvjp(_core_fwd, _core_bwd)


# ------------------------------------------------------------------------------------------------
# Entry point.


def unsupported_reason(q, k, v, *, logits_soft_cap=None, interpret: bool | None = None) -> str | None:
    """Why ``pallas_gpu`` cannot serve this call (a sentence), or ``None`` when it can."""
    if q.dtype not in [jnp.dtype(d) for d in SUPPORTED_DTYPES]:
        return (f"pallas_gpu supports float16, bfloat16 and float32 inputs, got {q.dtype} "
                "(use implementation='xla_chunked' for float64)")
    H, Hv = q.shape[-1], v.shape[-1]
    if max(H, Hv) > MAX_HEAD_DIM:
        return f"pallas_gpu supports head dims up to {MAX_HEAD_DIM}, got H={H}, Hv={Hv}"
    if isinstance(logits_soft_cap, jax.Array):
        return ("pallas_gpu needs logits_soft_cap as a Python float (a static kernel constant), "
                "got a traced array; use implementation='xla_chunked' for a traced soft cap")
    # An explicit ``interpret=False`` (e.g. ``jax.export`` for CUDA from a CPU host) skips the
    # backend check: the caller lowers for a GPU platform of its choosing.
    if interpret is None and not pallas_config.interpret_enabled():
        backend = jax.default_backend()
        if backend != "gpu":
            return (f"pallas_gpu compiles a Triton kernel for NVIDIA/AMD GPUs, but JAX's default "
                    f"backend is {backend!r}; on CPU run it in Pallas interpret mode inside "
                    "`with attnjax.pallas_interpret():` (slow; for testing)")
    return None


def as_block_sizes(block_sizes, head_dim: int) -> BlockSizes:
    """Accept ``None`` (the :data:`BLOCK_TABLE` default for ``head_dim``), a :class:`BlockSizes`,
    or a chunk size as ``dot_product_attention(chunk_size=...)`` takes it (an int, a
    ``(query, key)`` pair or a :class:`~attnjax.ChunkSize`): then every query block is the query
    size and every key block the key size, with the table's warps and stages."""
    if isinstance(block_sizes, BlockSizes):
        return block_sizes
    default = BlockSizes.for_head_dim(head_dim)
    if block_sizes is None:
        return default
    cs = as_chunk_size(block_sizes)
    for name, val in (("query", cs.query), ("key", cs.key)):
        if val < MIN_BLOCK or not _is_pow2(val):
            raise ValueError(f"chunk_size {name}={val} is not a valid pallas_gpu block size: "
                             f"it must be a power of two >= {MIN_BLOCK}")
    return dataclasses.replace(default, block_q=cs.query, block_k=cs.key, block_q_dkv=cs.query,
                               block_k_dkv=cs.key, block_q_dq=cs.query, block_k_dq=cs.key)


def _kernel_table(classes, block_size, bq: int, bk: int, Tp: int, Sp: int):
    """A block mask's classes ``(nqm, nkm)`` (blocks of ``block_size``) regrouped for kernel
    blocks ``bq × bk``: a kernel block is empty (full) when every block-mask block it overlaps
    is; 2-d prefix sums, O(table) work. Kernel blocks past the sequence are empty."""
    cm_q, cm_k = block_size
    nqm, nkm = classes.shape
    i32 = jnp.int32

    def prefix(x):
        x = jnp.pad(x.astype(i32), ((1, 0), (1, 0)))
        return jnp.cumsum(jnp.cumsum(x, axis=0), axis=1)

    def span(n, blk, cm, nm):
        start = jnp.arange(n, dtype=i32) * blk
        lo = jnp.minimum(start // cm, nm)
        hi = jnp.minimum((start + blk - 1) // cm + 1, nm)
        return lo, hi

    qlo, qhi = span(Tp // bq, bq, cm_q, nqm)
    klo, khi = span(Sp // bk, bk, cm_k, nkm)

    def rect(P):
        return (P[qhi][:, khi] - P[qlo][:, khi] - P[qhi][:, klo] + P[qlo][:, klo])

    area = (qhi - qlo)[:, None] * (khi - klo)[None, :]
    empty = rect(prefix(classes == EMPTY)) == area
    full = (rect(prefix(classes == FULL)) == area) & (area > 0)
    return jnp.where(empty, EMPTY, jnp.where(full, FULL, PARTIAL)).astype(i32)


def _fit(block: int, length: int) -> int:
    return max(MIN_BLOCK, min(block, _next_pow2(length)))


def attention_pallas_gpu(q, k, v, bias5, info: MaskInfo, *, scale: float, logits_soft_cap,
                         dropout_rate: float, seed, precision,
                         block_sizes: BlockSizes | None = None, interpret: bool | None = None):
    """The fused Pallas (Triton) kernel on validated inputs.

    Same contract as :func:`attnjax._src.chunked.attention_chunked`.

    Args:
      q: ``(B, T, N, H)``; k: ``(B, S, K, H)``; v: ``(B, S, K, Hv)``; float16/bfloat16/float32.
      bias5: ``None`` or ``(Bb, Kb, Gb, Tb, Sb)`` (grouped, unpadded, each dim 1 or full).
      info: the masks, with a grouped (unpadded) dense mask.
      scale: logit scale (a Python float).
      logits_soft_cap: a Python float or ``None`` (a traced cap is not supported here).
      dropout_rate: in ``[0, 1)``; seed: uint32 scalar dropout seed, or None.
      precision: passed to the kernel's matmuls.
      block_sizes: :class:`BlockSizes`, a chunk size (see :func:`as_block_sizes`), or ``None``
        (the per-head-dim table, :meth:`BlockSizes.for_head_dim`).
      interpret: run in Pallas interpret mode; ``None`` reads :func:`attnjax.pallas_interpret`.

    Returns:
      ``out (B, T, N, Hv)`` in q's dtype and ``lse (B, T, N)`` float32.

    Raises:
      ValueError: if the call cannot run here (see :func:`unsupported_reason`).
    """
    reason = unsupported_reason(q, k, v, logits_soft_cap=logits_soft_cap, interpret=interpret)
    if reason is not None:
        raise ValueError(reason)
    if interpret is None:
        interpret = pallas_config.interpret_enabled()
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    Hv = v.shape[-1]
    Hp, Hvp = _next_pow2(max(H, MIN_BLOCK)), _next_pow2(max(Hv, MIN_BLOCK))
    bs = as_block_sizes(block_sizes, max(Hp, Hvp))
    bq, bq_dkv, bq_dq = (_fit(x, T) for x in (bs.block_q, bs.block_q_dkv, bs.block_q_dq))
    bk, bk_dkv, bk_dq = (_fit(x, S) for x in (bs.block_k, bs.block_k_dkv, bs.block_k_dq))
    qmult, kmult = max(bq, bq_dkv, bq_dq), max(bk, bk_dkv, bk_dq)
    Tp, Sp = -(-T // qmult) * qmult, -(-S // kmult) * kmult

    qp = _pad(_pad(q, 3, Hp), 1, Tp)
    kp = _pad(_pad(k, 3, Hp), 1, Sp)
    vp = _pad(_pad(v, 3, Hvp), 1, Sp)

    i32 = jnp.int32
    off = jnp.zeros((B,), i32) if info.query_offset is None else jnp.broadcast_to(
        jnp.reshape(info.query_offset, (-1,)).astype(i32), (B,))
    qlen = jnp.full((B,), T, i32) if info.q_lengths is None else info.q_lengths.astype(i32)
    kvlen = jnp.full((B,), S, i32) if info.kv_lengths is None else info.kv_lengths.astype(i32)
    seed_bits = jnp.zeros((B,), i32) if seed is None else jnp.broadcast_to(
        lax.bitcast_convert_type(jnp.asarray(seed, jnp.uint32), i32), (B,))
    row = jnp.stack([off, qlen, kvlen, seed_bits], axis=1)

    qseg = kseg = None
    if info.q_segment_ids is not None:
        # Edge padding: padded positions repeat the last id, so that they do not widen the
        # per-block id ranges used for block skipping (padded keys are masked anyway).
        qseg = jnp.pad(info.q_segment_ids[:, :T].astype(i32), ((0, 0), (0, Tp - T)), mode="edge")
        kseg = jnp.pad(info.kv_segment_ids[:, :S].astype(i32), ((0, 0), (0, Sp - S)), mode="edge")

    def heads4(x, pad_value):
        bx, kx, gx, tx, sx = x.shape
        x = x.reshape(bx, kx * gx, tx, sx)
        if tx != 1:
            x = _pad(x[:, :, :T], 2, Tp, pad_value)
        if sx != 1:
            x = _pad(x[:, :, :, :S], 3, Sp, pad_value)
        return x

    mask = None if info.mask is None else heads4(info.mask.astype(jnp.int8), 0)
    bias = None if bias5 is None else heads4(bias5, 0)

    # Flexible attention: the mods' closed-over arrays (kernel operands) and block-class tables.
    if info.kv_base is not None:
        raise ValueError("pallas_gpu does not take a kv_base (ring attention / decoding)")
    b0, h0 = jnp.int32(0), jnp.int32(0)
    qi, ki = jnp.zeros((bq, 1), i32), jnp.zeros((1, bk), i32)
    mconsts = mids = sconsts = sids = ()
    if info.mask_mod is not None:
        mconsts, mids = _closure(info.mask_mod, b0, h0, qi, ki)
    if info.score_mod is not None:
        sconsts, sids = _closure(info.score_mod, jnp.zeros((bq, bk), jnp.float32), b0, h0, qi, ki)
    dconst = tuple(isinstance(c, jax.core.Tracer) and jnp.issubdtype(c.dtype, jnp.inexact)
                   for c in sconsts)
    tables = None
    if info.block_classes is not None:
        tables = tuple(_kernel_table(info.block_classes, info.block_size, a, c, Tp, Sp)
                       for a, c in ((bq, bk), (bq_dkv, bk_dkv), (bq_dq, bk_dq)))

    cfg = _Cfg(
        B=B, T=T, S=S, N=N, K=K, Tp=Tp, Sp=Sp,
        scale=float(scale),
        softcap=None if logits_soft_cap is None else float(logits_soft_cap),
        dropout_rate=float(dropout_rate),
        causal=bool(info.is_causal), window=info.window,
        has_qlen=info.q_lengths is not None,
        kv_mask=info.kv_lengths is not None or Sp != S,
        has_seg=qseg is not None,
        mask_shape=None if mask is None else tuple(mask.shape),
        bias_shape=None if bias is None else tuple(bias.shape),
        bq=bq, bk=bk, bq_dkv=bq_dkv, bk_dkv=bk_dkv, bq_dq=bq_dq, bk_dq=bk_dq,
        num_warps=bs.num_warps, num_stages=bs.num_stages,
        num_warps_bwd=bs.num_warps_bwd, num_stages_bwd=bs.num_stages_bwd,
        precision=precision, interpret=bool(interpret),
        mask_mod=info.mask_mod, mask_ids=mids, score_mod=info.score_mod, score_ids=sids,
        dconst=dconst, has_table=tables is not None,
    )
    out, lse = _core(cfg, qp, kp, vp, row, qseg, kseg, mask, bias, tables, mconsts, sconsts)
    out = out[:, :T, :, :Hv]
    lse = jnp.transpose(lse[:, :, :T], (0, 2, 1))
    return out, lse
