"""What a mask means, in one place.

Every attnjax implementation (materialised, chunked, decode, ring) asks the same small pytree,
:class:`MaskInfo`, two questions about a block of queries × keys:

* "which entries are visible?" (:meth:`MaskInfo.visible`), built from positions with
  ``lax.broadcasted_iota``-style index vectors, never from a stored T×S array (a user's dense
  boolean ``mask`` is the one exception: it is sliced per block);
* "which key blocks can a query block see at all, and which of them are fully visible?"
  (:meth:`MaskInfo.key_block_ranges` and, for the backward pass, :meth:`MaskInfo.query_block_ranges`),
  so that hidden blocks are skipped and fully visible blocks skip the masking work.

Shape letters (as in ``jax.nn``): B batch, T query length, S key length, N query heads,
K kv heads, G = N // K, H head dim. Blocks are laid out ``(B, K, G, Tc, Sc)`` ("qk") in the
forward pass and ``(B, K, Sc, G, Tc)`` ("kq", transposed scores) in the backward pass.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from attnjax._src import flex

Array = jax.Array

# Layouts of a score block.
QK = "qk"  # (B, K, G, Tc, Sc)
KQ = "kq"  # (B, K, Sc, G, Tc)


def _floordiv(a, b: int):
    return jnp.floor_divide(a, b)


def _ceildiv(a, b: int):
    return -jnp.floor_divide(-a, b)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MaskInfo:
    """Every mask kind of one attention call, for a batch of B rows.

    Array fields are pytree children; the rest is static.

    Attributes:
      q_len: T, the true (unpadded) query length.
      kv_len: S, the true (unpadded) key length. Keys at positions >= S (padding added by a
        chunked implementation) are never visible.
      is_causal: a query at position ``i`` sees keys ``j <= i + query_offset``.
      window: ``(left, right)``: a query sees keys with
        ``i + query_offset - left <= j <= i + query_offset + right``.
      query_offset: int32 ``(B,)`` or ``()``: position of query row 0 among the keys.
      q_lengths: int32 ``(B,)``: rows ``i >= q_lengths[b]`` see nothing.
      kv_lengths: int32 ``(B,)``: keys ``j >= kv_lengths[b]`` are hidden.
      q_segment_ids: int ``(B, Tp)``; kv_segment_ids: int ``(B, Sp)``: a query sees only keys of
        its own segment.
      mask: bool ``(Bm, Km, Gm, Tm, Sm)``, each dim 1 or full (T and S padded): True = visible.
      mask_mod: a user ``mask_mod(b, h, q_idx, kv_idx) -> bool`` (static), called with global
        positions ``q_idx = i + query_offset + kv_base``, ``kv_idx = j + kv_base``;
        ``mask_ids``/``mask_consts``: the traced arrays it closes over (see :func:`flex.hoist`).
      score_mod: a user ``score_mod(score, b, h, q_idx, kv_idx) -> score`` (static), with
        ``score_ids``/``score_consts`` as for the mask.
      kv_base: int32 ``()`` or ``(B,)``: global position of key 0 (ring attention, decoding),
        used only by the mods.
      block_classes: int32 ``(nq, nk)``: the classes (0 empty, 1 partial, 2 full) of a user
        block mask, collapsed over rows and heads, for chunks of ``block_size``.
      num_batch, num_kv_heads, num_groups: B, K, G (static; the index arrays of the mods).
    """

    q_len: int = dataclasses.field(metadata=dict(static=True))
    kv_len: int = dataclasses.field(metadata=dict(static=True))
    is_causal: bool = dataclasses.field(default=False, metadata=dict(static=True))
    window: tuple[int, int] | None = dataclasses.field(default=None, metadata=dict(static=True))
    query_offset: Array | None = None
    q_lengths: Array | None = None
    kv_lengths: Array | None = None
    q_segment_ids: Array | None = None
    kv_segment_ids: Array | None = None
    mask: Array | None = None
    mask_mod: Callable | None = dataclasses.field(default=None, metadata=dict(static=True))
    mask_ids: tuple = dataclasses.field(default=(), metadata=dict(static=True))
    mask_consts: tuple = ()
    score_mod: Callable | None = dataclasses.field(default=None, metadata=dict(static=True))
    score_ids: tuple = dataclasses.field(default=(), metadata=dict(static=True))
    score_consts: tuple = ()
    kv_base: Array | None = None
    block_classes: Array | None = None
    block_size: tuple[int, int] | None = dataclasses.field(default=None, metadata=dict(static=True))
    num_batch: int = dataclasses.field(default=1, metadata=dict(static=True))
    num_kv_heads: int = dataclasses.field(default=1, metadata=dict(static=True))
    num_groups: int = dataclasses.field(default=1, metadata=dict(static=True))

    # ----------------------------------------------------------------------------------------
    # Static questions.

    @property
    def has_positional(self) -> bool:
        """Whether any mask kind is described by positions (so block ranges matter)."""
        return (
            self.is_causal
            or self.window is not None
            or self.q_lengths is not None
            or self.kv_lengths is not None
        )

    @property
    def has_dense(self) -> bool:
        """Whether a mask kind can hide arbitrary entries of a block (segments, a bool mask)."""
        return (self.q_segment_ids is not None or self.mask is not None
                or self.mask_mod is not None)

    def is_trivial(self, padded_kv_len: int | None = None) -> bool:
        """True when nothing at all is hidden (and no key padding needs hiding)."""
        padded = padded_kv_len is not None and padded_kv_len != self.kv_len
        return not (self.has_positional or self.has_dense or padded)

    # ----------------------------------------------------------------------------------------
    # Offsets.

    def _offset(self):
        if self.query_offset is None:
            return jnp.zeros((1,), jnp.int32)
        return jnp.reshape(self.query_offset, (-1,)).astype(jnp.int32)

    def _offset_minmax(self):
        off = self._offset()
        return jnp.min(off), jnp.max(off)

    # ----------------------------------------------------------------------------------------
    # Which entries are visible.

    def visible(self, q_start, q_size: int, k_start, k_size: int, layout: str = QK,
                padded_kv_len: int | None = None):
        """Boolean visibility of the block ``[q_start, q_start+q_size) × [k_start, k_start+k_size)``.

        Returns an array broadcastable to ``(B, K, G, Tc, Sc)`` (layout "qk") or
        ``(B, K, Sc, G, Tc)`` (layout "kq"), or ``None`` when nothing is hidden.
        """
        qpos = q_start + jnp.arange(q_size, dtype=jnp.int32)  # (Tc,)
        kpos = k_start + jnp.arange(k_size, dtype=jnp.int32)  # (Sc,)

        def qk(xq, xk):
            # xq: (Bq, Tc), xk: (Bk, Sc) -> two arrays broadcastable in the block layout.
            if layout == QK:
                return xq[:, None, None, :, None], xk[:, None, None, None, :]
            return xq[:, None, None, None, :], xk[:, None, :, None, None]

        parts = []
        if self.is_causal or self.window is not None:
            qeff = qpos[None, :] + self._offset()[:, None]  # (B|1, Tc)
            qe, ke = qk(qeff, kpos[None, :])
            if self.is_causal:
                parts.append(ke <= qe)
            if self.window is not None:
                left, right = self.window
                parts.append(ke >= qe - left)
                parts.append(ke <= qe + right)
        if self.kv_lengths is not None:
            _, ke = qk(qpos[None, :], kpos[None, :] < self.kv_lengths[:, None])
            parts.append(ke)
        elif padded_kv_len is not None and padded_kv_len != self.kv_len:
            _, ke = qk(qpos[None, :], kpos[None, :] < self.kv_len)
            parts.append(ke)
        if self.q_lengths is not None:
            qe, _ = qk(qpos[None, :] < self.q_lengths[:, None], kpos[None, :])
            parts.append(qe)
        if self.q_segment_ids is not None:
            qs = jax.lax.dynamic_slice_in_dim(self.q_segment_ids, q_start, q_size, axis=1)
            ks = jax.lax.dynamic_slice_in_dim(self.kv_segment_ids, k_start, k_size, axis=1)
            qe, ke = qk(qs, ks)
            parts.append(qe == ke)
        if self.mask is not None:
            parts.append(slice_block(self.mask, q_start, q_size, k_start, k_size, layout))
        if self.mask_mod is not None:
            idx = self.mod_indices(q_start, q_size, k_start, k_size, layout)
            parts.append(flex.call_mod(self.mask_mod, self.mask_ids, self.mask_consts, *idx))
        if not parts:
            return None
        out = parts[0]
        for p in parts[1:]:
            out = jnp.logical_and(out, p)
        return out

    # ----------------------------------------------------------------------------------------
    # User callables.

    def mod_indices(self, q_start, q_size: int, k_start, k_size: int, layout: str = QK):
        """Broadcast ``(b, h, q_idx, kv_idx)`` of one block (global positions) for the mods."""
        qpos = q_start + jnp.arange(q_size, dtype=jnp.int32)
        kpos = k_start + jnp.arange(k_size, dtype=jnp.int32)
        base = jnp.zeros((1,), jnp.int32) if self.kv_base is None else jnp.reshape(
            self.kv_base, (-1,)).astype(jnp.int32)
        qe = qpos[None, :] + (self._offset() + base)[:, None]
        ke = kpos[None, :] + base[:, None]
        return flex.index_arrays(layout, self.num_batch, self.num_kv_heads, self.num_groups, qe, ke)

    def apply_score_mod(self, s, q_start, q_size: int, k_start, k_size: int, layout: str = QK,
                        consts=None):
        """``score_mod`` on a block ``s`` in ``layout`` (``consts`` replaces ``score_consts``)."""
        if self.score_mod is None:
            return s
        idx = self.mod_indices(q_start, q_size, k_start, k_size, layout)
        consts = self.score_consts if consts is None else consts
        return flex.call_mod(self.score_mod, self.score_ids, consts, s, *idx)

    def block_table(self, q_block: int, k_block: int, num_q_blocks: int, num_k_blocks: int):
        """The class table ``(nq, nk)`` int32 (0 empty, 1 partial, 2 full) of a chunked call, or
        ``None`` when only positional masks apply (then the contiguous ranges of
        :meth:`key_block_ranges` are used instead). Combines the positional ranges, segment-id
        ranges, a dense mask and a ``mask_mod`` (partial wherever visible) and a block mask."""
        if self.block_classes is None and self.q_segment_ids is None:
            return None
        ranges = jax.vmap(lambda i: self.key_block_ranges(i * q_block, q_block, k_block,
                                                          num_k_blocks))(
            jnp.arange(num_q_blocks, dtype=jnp.int32))
        lo, flo, fhi, hi = (r[:, None] for r in ranges)
        j = jnp.arange(num_k_blocks, dtype=jnp.int32)[None, :]
        cls = jnp.where((j >= lo) & (j < hi),
                        jnp.where((j >= flo) & (j < fhi), flex.FULL, flex.PARTIAL), flex.EMPTY)
        if self.q_segment_ids is not None:
            cls = jnp.minimum(cls, flex.segment_classes(
                self.q_segment_ids, self.kv_segment_ids, self.q_len, self.kv_len, q_block,
                k_block, num_q_blocks, num_k_blocks))
        if self.mask is not None:
            cls = jnp.minimum(cls, flex.PARTIAL)
        if self.block_classes is not None:
            cls = jnp.minimum(cls, self.block_classes)
        elif self.mask_mod is not None:
            cls = jnp.minimum(cls, flex.PARTIAL)
        return cls.astype(jnp.int32)

    # ----------------------------------------------------------------------------------------
    # Which blocks can be skipped, and which need no mask.

    def key_block_ranges(self, q_start, q_size: int, k_block: int, num_k_blocks: int):
        """Key blocks a query block ``[q_start, q_start + q_size)`` needs.

        Returns ``(lo, full_lo, full_hi, hi)`` int32 scalars with
        ``lo <= full_lo <= full_hi <= hi``: blocks outside ``[lo, hi)`` are entirely hidden and
        skipped; blocks in ``[full_lo, full_hi)`` are entirely visible (no mask to apply) as far as
        the positional masks go (segments and a dense mask are applied regardless).
        """
        q_last = q_start + q_size - 1
        omin, omax = self._offset_minmax()
        lo = jnp.int32(0)
        hi = jnp.int32(num_k_blocks)
        flo = jnp.int32(0)
        fhi = jnp.int32(num_k_blocks)
        if self.is_causal:
            hi = jnp.minimum(hi, _floordiv(q_last + omax, k_block) + 1)
            fhi = jnp.minimum(fhi, _floordiv(q_start + omin + 1, k_block))
        if self.window is not None:
            left, right = self.window
            lo = jnp.maximum(lo, _floordiv(q_start + omin - left, k_block))
            hi = jnp.minimum(hi, _floordiv(q_last + omax + right, k_block) + 1)
            flo = jnp.maximum(flo, _ceildiv(q_last + omax - left, k_block))
            fhi = jnp.minimum(fhi, _floordiv(q_start + omin + right + 1, k_block))
        if self.kv_lengths is not None:
            hi = jnp.minimum(hi, _ceildiv(jnp.max(self.kv_lengths), k_block))
            fhi = jnp.minimum(fhi, _floordiv(jnp.min(self.kv_lengths), k_block))
        else:
            fhi = jnp.minimum(fhi, _floordiv(jnp.int32(self.kv_len), k_block))
        if self.q_lengths is not None:
            # Rows past every length see nothing; a block with some such row is not full.
            hi = jnp.where(q_start >= jnp.max(self.q_lengths), lo, hi)
            fhi = jnp.where(q_start + q_size <= jnp.min(self.q_lengths), fhi, flo)
        return _clamp_ranges(lo, flo, fhi, hi, num_k_blocks)

    def query_block_ranges(self, k_start, k_size: int, q_block: int, num_q_blocks: int):
        """Query blocks that can see a key block ``[k_start, k_start + k_size)``.

        The mirror of :meth:`key_block_ranges`, for the backward pass (key blocks outer).
        Returns ``(lo, full_lo, full_hi, hi)``.
        """
        k_last = k_start + k_size - 1
        omin, omax = self._offset_minmax()
        lo = jnp.int32(0)
        hi = jnp.int32(num_q_blocks)
        flo = jnp.int32(0)
        fhi = jnp.int32(num_q_blocks)
        if self.is_causal:
            lo = jnp.maximum(lo, _floordiv(k_start - omax, q_block))
            flo = jnp.maximum(flo, _ceildiv(k_last - omin, q_block))
        if self.window is not None:
            left, right = self.window
            lo = jnp.maximum(lo, _floordiv(k_start - omax - right, q_block))
            hi = jnp.minimum(hi, _floordiv(k_last - omin + left, q_block) + 1)
            flo = jnp.maximum(flo, _ceildiv(k_last - omin - right, q_block))
            fhi = jnp.minimum(fhi, _floordiv(k_start - omax + left + 1, q_block))
        if self.q_lengths is not None:
            hi = jnp.minimum(hi, _ceildiv(jnp.max(self.q_lengths), q_block))
            fhi = jnp.minimum(fhi, _floordiv(jnp.min(self.q_lengths), q_block))
        kv_min = jnp.int32(self.kv_len) if self.kv_lengths is None else jnp.min(self.kv_lengths)
        fhi = jnp.where(k_start + k_size <= kv_min, fhi, flo)
        if self.kv_lengths is not None:
            hi = jnp.where(k_start >= jnp.max(self.kv_lengths), lo, hi)
        return _clamp_ranges(lo, flo, fhi, hi, num_q_blocks)


def _clamp_ranges(lo, flo, fhi, hi, n):
    lo = jnp.clip(lo, 0, n).astype(jnp.int32)
    hi = jnp.clip(hi, lo, n).astype(jnp.int32)
    flo = jnp.clip(flo, lo, hi).astype(jnp.int32)
    fhi = jnp.clip(fhi, flo, hi).astype(jnp.int32)
    return lo, flo, fhi, hi


def slice_block(x, q_start, q_size: int, k_start, k_size: int, layout: str = QK):
    """Slice a ``(Bx, Kx, Gx, Tx, Sx)`` array (Tx, Sx each 1 or full) to one block.

    Broadcast (size-1) dims are kept. Returns the block in the requested layout.
    """
    if x.shape[3] != 1:
        x = jax.lax.dynamic_slice_in_dim(x, q_start, q_size, axis=3)
    if x.shape[4] != 1:
        x = jax.lax.dynamic_slice_in_dim(x, k_start, k_size, axis=4)
    if layout == KQ:
        x = jnp.transpose(x, (0, 1, 4, 2, 3))
    return x


def to_grouped(x, num_kv_heads: int, padded_q: int, padded_kv: int, pad_value):
    """``(Bx, Nx, Tx, Sx)`` (each dim 1 or full) -> ``(Bx, Kx, Gx, Tp|1, Sp|1)``, padded."""
    bx, nx, tx, sx = x.shape
    if nx == 1:
        x = x.reshape(bx, 1, 1, tx, sx)
    else:
        x = x.reshape(bx, num_kv_heads, nx // num_kv_heads, tx, sx)
    pads = [(0, 0)] * 3 + [(0, padded_q - tx if tx != 1 else 0), (0, padded_kv - sx if sx != 1 else 0)]
    if any(p != (0, 0) for p in pads):
        x = jnp.pad(x, pads, constant_values=pad_value)
    return x


def from_grouped(x, shape):
    """Inverse of :func:`to_grouped` (drops padding) for a gradient of shape ``shape``."""
    bx, nx, tx, sx = shape
    x = x[:, :, :, :tx, :sx]
    return x.reshape(shape)

