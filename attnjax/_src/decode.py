"""Autoregressive decoding: a KV cache pytree and attention of new tokens against it.

A step with ``T`` new tokens (``T = 1`` for ordinary decoding, the whole prompt for prefill, or
anything in between for speculative / chunked steps) computes, for each batch row ``b`` whose
cache already holds ``P[b] = cache.lengths[b]`` tokens:

* the attention of the ``T`` queries over the *cached* keys (positions ``< P[b]``), read in
  chunks of the cache in its own BSKH layout (no transpose of the cache), each chunk with one
  matrix product over all heads for the keys and one for the values (or, for one token
  per kv head, fused multiply-and-sum loops), merged into a running
  log-sum-exp (split-K). Only chunks that hold a visible key are read (the loop's trip count is
  dynamic), so a step over a cache that is 10% full reads 10% of it;
* the causal attention of the ``T`` queries over the ``T`` *new* keys, with the core
  :func:`attnjax.dot_product_attention` (chunked for long prompts);
* the exact combination of the two by their log-sum-exps;
* the write of the new keys/values into the cache (a scatter that XLA performs in place when the
  cache buffer is donated), and ``lengths += query_seq_lengths``.

On the CPU, steps of at most ``NATIVE_MAX_TOKENS`` tokens computed in float32 (float32,
bfloat16 or float16 caches) without ``mask_mod``/``score_mod`` run the write and the read of the
cache (the two middle items) in one native kernel instead (``native.py``, ``decode_cpu.cc``: an
XLA FFI custom call built on first use with the host's C++ compiler), which writes in place and
reads the cache once, at close to the speed of memory; XLA:CPU's own products, reductions and
bfloat16 writes over the cache each cost a multiple of that (README, "Decoding"). Everything
else, and every other platform, takes the pure-JAX path below; both give the same results up to
rounding (the kernel's bfloat16 products round probabilities to bfloat16, as the chunked core
does: see ``cached_attention``).

Temporary memory of a step is O(B·C·K·(H + Hv)) for a chunk of keys and values (``C`` = key
chunk size, about 4 MiB by default), O(B·N·T·C) for its scores, plus O(B·T·N·K·Hv), independent
of the cache length ``S`` (for bfloat16/float16 caches only in steps of at most 8 tokens,
T ≤ 8: see ``_write`` for XLA:CPU's whole-cache float32 conversions).

Computation is in ``max(float32, input dtype)`` (float64 inputs stay float64); index arithmetic
is int32, also under ``jax_enable_x64``.

A sliding-window cache (``window=W``) is a ring buffer of ``W`` slots: position ``p`` lives in
slot ``p % W``. A query at position ``p`` attends to the last ``W`` positions, itself included
(the core's ``local_window_size=(W - 1, 0)`` with ``is_causal=True``), so generation streams
for ever in bounded memory.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from attnjax._src import native, registry
from attnjax._src.attention import _normalise_window, dot_product_attention
from attnjax._src.chunked import merge_partials
from attnjax._src.config import ChunkSize, as_chunk_size
from attnjax._src.numerics import compute_dtype

# Default chunk of a decode step: the power of two of cache slots whose keys and values, in the
# compute dtype and over the batch, take about DECODE_CHUNK_BYTES (1024 slots for B=1, K=8,
# H=64 in float32; 4096 for K=2), within [MIN_DECODE_CHUNK, MAX_DECODE_CHUNK]. On a 2-core AVX2
# host, 4 MiB chunks were faster than 2-4x larger or smaller ones (each chunk is copied out of
# the cache before its matrix products, so it should stay in cache). The chunk is most of the
# step's temp memory, whatever the cache length.
DECODE_CHUNK_BYTES = 4 * 2**20
MIN_DECODE_CHUNK = 256
MAX_DECODE_CHUNK = 8192


def default_decode_chunk(batch: int, kv_heads: int, head_dim: int, value_head_dim: int,
                         itemsize: int) -> int:
    """Cache slots per chunk when ``chunk_size`` is ``None`` (see ``DECODE_CHUNK_BYTES``)."""
    per_slot = batch * kv_heads * (head_dim + value_head_dim) * itemsize
    c = 1 << max(0, (DECODE_CHUNK_BYTES // per_slot).bit_length() - 1)
    return int(min(max(c, MIN_DECODE_CHUNK), MAX_DECODE_CHUNK))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Keys and values of past tokens, per batch row, in BSKH layout.

    Create one with :meth:`KVCache.create`; update it with :func:`cached_attention`, which
    returns a new cache (under ``jax.jit`` with the cache donated, the update is in place).

    Attributes:
      key: ``(B, L, K, H)`` cached keys (``L`` slots, kv heads not repeated per query head).
      value: ``(B, L, K, Hv)`` cached values.
      lengths: int32 ``(B,)``: tokens seen so far by each row, i.e. the position of its next
        token. Rows may be at different positions.
      window: ``None`` for a plain cache (slot ``p`` holds position ``p``; at most ``L`` tokens),
        or ``W`` for a sliding-window ring buffer of ``L = W`` slots (unbounded length; every
        query sees the last ``W`` positions, itself included). Static.
    """

    key: jax.Array
    value: jax.Array
    lengths: jax.Array
    window: int | None = dataclasses.field(default=None, metadata=dict(static=True))

    @classmethod
    def create(cls, batch_size: int, max_length: int | None, num_kv_heads: int, head_dim: int,
               dtype=jnp.float32, *, window: int | None = None,
               value_head_dim: int | None = None) -> KVCache:
        """An empty cache (all lengths 0).

        Args:
          batch_size: B.
          max_length: L, the most tokens a plain cache can hold. Ignored (may be ``None``) when
            ``window`` is given.
          num_kv_heads: K. head_dim: H. value_head_dim: Hv (default H).
          dtype: storage dtype of keys and values.
          window: a positive int ``W`` for a sliding-window ring buffer of ``W`` slots: each
            token attends to the last ``W`` tokens, itself included (the core's
            ``local_window_size=(W - 1, 0)``).

        Raises:
          ValueError: non-positive sizes, or neither ``max_length`` nor ``window``.

        Example:
          >>> cache = KVCache.create(2, 1024, num_kv_heads=2, head_dim=64)
          >>> cache.key.shape, cache.lengths
          ((2, 1024, 2, 64), Array([0, 0], dtype=int32))
        """
        if window is not None:
            if isinstance(window, bool) or not isinstance(window, int | np.integer) or window < 1:
                raise ValueError(f"window must be a positive int or None, got {window!r}")
            slots = int(window)
        else:
            if max_length is None:
                raise ValueError("max_length must be given for a cache without a window, got None")
            slots = int(max_length)
        value_head_dim = head_dim if value_head_dim is None else value_head_dim
        for name, val in (("batch_size", batch_size), ("max_length", slots),
                          ("num_kv_heads", num_kv_heads), ("head_dim", head_dim),
                          ("value_head_dim", value_head_dim)):
            if int(val) < 1:
                raise ValueError(f"{name} must be a positive int, got {val}")
        return cls(
            key=jnp.zeros((batch_size, slots, num_kv_heads, head_dim), dtype),
            value=jnp.zeros((batch_size, slots, num_kv_heads, value_head_dim), dtype),
            lengths=jnp.zeros((batch_size,), jnp.int32),
            window=None if window is None else int(window),
        )

    @property
    def capacity(self) -> int:
        """Number of slots ``L``."""
        return self.key.shape[1]


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def plan_step(cache: KVCache, query_seq_lengths, B: int, T: int):
    """Where a step of ``T`` tokens goes: ``(P, n, overflow, idx)``.

    ``P`` int32 ``(B,)`` the rows' lengths before the step; ``n`` the tokens each row adds
    (:func:`_step_lengths`); ``overflow`` bool ``(B,)``, rows a plain cache cannot hold (``None``
    for a ring buffer; when the lengths are concrete such a row raises ``ValueError`` here);
    ``idx`` int32 ``(B, T)`` the slot of each token, ``L`` (dropped by :func:`_write`) for the
    tokens not written (past ``n``, or overwritten within the step in a ring).
    """
    L = cache.key.shape[1]
    P = cache.lengths.astype(jnp.int32)
    n = _step_lengths(query_seq_lengths, B, T)
    overflow = None
    if cache.window is None:
        overflow = P + n > L
        if _is_concrete(P) and _is_concrete(n):
            bad = np.asarray(overflow)
            if bad.any():
                rows = np.nonzero(bad)[0].tolist()
                raise ValueError(
                    f"cache overflow: rows {rows} hold {np.asarray(P)[rows].tolist()} tokens and "
                    f"this step adds {np.asarray(n)[rows].tolist()}, but max_length is {L}; "
                    "use a larger cache or KVCache.create(..., window=W)"
                )
    t = jnp.arange(T, dtype=jnp.int32)[None, :]
    pos_new = P[:, None] + t
    if cache.window is not None:
        keep = (t < n[:, None]) & (t >= n[:, None] - L)
        idx = jnp.where(keep, jnp.mod(pos_new, L), L)
    else:
        idx = jnp.where(t < n[:, None], pos_new, L)
    return P, n, overflow, idx


def _step_lengths(query_seq_lengths, B: int, T: int):
    """The tokens each row adds in a step of ``T``: int32 ``(B,)``, ``T`` when ``None``.

    Raises ``ValueError`` for a wrong shape or dtype, and (when the values are concrete, i.e.
    outside ``jit``) for values outside ``[0, T]``; traced values are clipped to ``[0, T]``.
    """
    if query_seq_lengths is None:
        return jnp.full((B,), T, jnp.int32)
    n = jnp.asarray(query_seq_lengths)
    if not jnp.issubdtype(n.dtype, jnp.integer) or n.shape != (B,):
        raise ValueError(
            f"query_seq_lengths must be an int array of shape (B,) = ({B},), got "
            f"{n.dtype}{tuple(n.shape)}"
        )
    if _is_concrete(n):
        bad = (np.asarray(n) < 0) | (np.asarray(n) > T)
        if bad.any():
            raise ValueError(
                f"query_seq_lengths must be in [0, T] = [0, {T}] (the tokens each row adds in "
                f"this step of T={T}), got {np.asarray(n).tolist()}"
            )
    return jnp.clip(n.astype(jnp.int32), 0, T)


def _block_update(carry, qg, kb, vb, vis, logits_soft_cap, precision, hook=None, kpos=None):
    """Online-softmax update of ``carry = (m, l, acc)`` with one key block.

    ``qg (B, T, K, G, H)`` scaled queries in the compute dtype, ``kb (B, C, K, H)``,
    ``vb (B, C, K, Hv)``, ``vis`` boolean broadcastable to ``(B, T, C)``. ``hook(s, kpos) -> (s, vis | None)``:
    the flexible-attention hook (``score_mod`` and ``mask_mod`` on the ``(B, K, G, T, C)`` score
    block, keys at positions ``kpos (B, C)``), or ``None``.
    """
    m, den, acc = carry
    cdt = qg.dtype
    s = jnp.einsum("btkgh,bckh->bkgtc", qg, kb.astype(cdt), preferred_element_type=cdt,
                   precision=precision)
    if logits_soft_cap is not None:
        cap = jnp.asarray(logits_soft_cap, cdt)
        s = cap * jnp.tanh(s / cap)
    vis = vis[:, None, None]
    if hook is not None:
        s, extra = hook(s, kpos)
        if extra is not None:
            vis = vis & extra
    s = jnp.where(vis, s, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(s, axis=-1))
    m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    p = jnp.exp(s - m_use[..., None])
    alpha = jnp.exp(m - m_use)
    den = den * alpha + jnp.sum(p, axis=-1)
    pv = jnp.einsum("bkgtc,bckh->bkgth", p, vb.astype(cdt), preferred_element_type=cdt,
                    precision=precision)
    return m_new, den, acc * alpha[..., None] + pv


def _visible(pos, valid, qpos, window_left):
    """``(B, T, C)`` visibility of keys at ``pos (B, C)`` (``valid (B, C)``) for ``qpos (B, T)``."""
    vis = valid[:, None, :]
    if window_left is not None:
        vis = vis & (pos[:, None, :] >= qpos[:, :, None] - window_left)
    return vis


# A step reads the cache with one matrix product over all heads per chunk (the queries laid out
# block-diagonally, see _attend_cache) while the query columns N·T stay at most this many, and
# with one product per kv head (the chunk transposed to heads-major by XLA) beyond.
FLAT_MAX_COLUMNS = 16


# Steps with at most this many query columns per kv head (G·T: one token of grouped-query
# attention) read each chunk with fused multiply-and-sum loops instead of matrix products: the
# chunk is read straight from the cache by the loop (no copy of the slice) and no product is
# wasted on the off-diagonal heads.
REDUCE_MAX_COLUMNS = 1


def _sum(x, axis):
    """``x.sum(axis)``, as a reduction XLA:CPU fuses with its producers (the cache slice).

    The reducer ``a - (-b)`` is ``a + b`` exactly; it keeps XLA:CPU from handing the reduction
    to its YNNPACK fusion (which takes plain ``add`` reductions in float32, and there ran
    several times slower and without the slice fused in).
    """
    return lax.reduce(x, jnp.zeros((), x.dtype), lambda a, b: a - (-b), (axis % x.ndim,))


def _attend_cache(q, key, value, P, P_end, window_left, ring: bool, chunk: int,
                  logits_soft_cap, precision, hook=None):
    """Attention of ``q (B, T, N, H)`` (scaled, in the compute dtype) over the cached positions
    ``< P`` still present in the (already updated) buffers ``key (B, L, K, H)``/``value``, which
    hold every position ``< P_end`` that fits.

    Returns ``(out (B, T, N, Hv), lse (B, T, N), key, value)``; the buffers come back from the
    loop unchanged (see ``carry_cache`` below) and are the ones to store in the new cache.

    Chunks of ``C`` slots are read in place with ``dynamic_slice`` (BSKH: a chunk is one
    contiguous ``(C, K·H)`` block per batch row); the loop runs only over chunks that can hold a
    visible position (dynamic trip count). Per chunk, with ``Y = N·T`` query columns:

    * ``reduce`` (``G·T <= REDUCE_MAX_COLUMNS``, i.e. one token with one query head per kv
      head): logits and the value sum as fused multiply-and-sum loops (``_sum``), which XLA:CPU
      runs on the cache slice in place (no copy of the chunk, no wasted products).
    * ``flat`` (``Y <= FLAT_MAX_COLUMNS`` or ``K = 1``): one product ``(C, K·H) @ (K·H, Y)`` over
      all heads, the queries placed block-diagonally (query column ``(k, g, t)`` is zero outside
      kv head ``k``'s rows), and one ``(Y, C) @ (C, K·Hv)`` for the values, whose off-diagonal
      blocks are dropped at the end. This computes ``K`` times the useful products but reads the
      chunk in its own layout with two plain matrix products, which XLA:CPU runs far faster than
      ``K`` strided per-head products.
    * otherwise (long multi-token steps, prefill): one product per kv head.
    """
    B, T, N, H = q.shape
    L, K = key.shape[1], key.shape[2]
    Hv = value.shape[-1]
    G = N // K
    Y = N * T
    cdt = q.dtype
    C = min(chunk, L)
    mode = ("reduce" if G * T <= REDUCE_MAX_COLUMNS
            else "flat" if K == 1 or Y <= FLAT_MAX_COLUMNS else "heads")
    flat = mode == "flat"
    filled = jnp.minimum(P, L)  # slots holding a position < P (in order, for a plain cache)
    hi = (jnp.max(filled) + C - 1) // C
    lo = jnp.int32(0)
    if window_left is not None and not ring:
        # Keys before min(P) - window_left are hidden from every query: skip their chunks.
        lo = jnp.maximum(jnp.min(P) - window_left, 0) // C
    if ring:
        hi = jnp.int32(-(-L // C))
    qpos = P[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]  # (B, T)
    Pc = P[:, None]

    qg = q.reshape(B, T, K, G, H)
    if flat:
        # qx[b, (k, h), (j, g, t)] = q[b, t, j·G + g, h] if k == j else 0
        qt = jnp.transpose(qg, (0, 4, 2, 3, 1))  # (B, H, K, G, T)
        diag = jnp.eye(K, dtype=bool)[None, :, None, :, None, None]
        qx = jnp.where(diag, qt[:, None], jnp.zeros((), cdt)).reshape(B, K * H, Y)
        Z = K * Hv
    elif mode == "reduce":
        qx = jnp.transpose(qg, (0, 2, 3, 1, 4)).reshape(B, 1, K, G * T, H)
        Z = Hv
    else:
        qx = qg
        Z = Hv

    # A cache stored below the compute dtype (bfloat16, float16) is carried through the loop
    # behind an optimization barrier: otherwise XLA:CPU (which has no bfloat16 dynamic-slice)
    # converts the whole cache to float32 before the loop, every step.
    carry_cache = jnp.dtype(key.dtype) != cdt or jnp.dtype(value.dtype) != cdt
    kf, vf = key, value  # sliced 4-d and reshaped per chunk (a reshape here would make XLA
    # duplicate the in-place scatter that produced them, and copy the cache)

    def body(c, carry):
        if carry_cache:
            m, den, acc, kf_, vf_ = carry
            kf_, vf_ = lax.optimization_barrier((kf_, vf_))
        else:
            (m, den, acc), kf_, vf_ = carry, kf, vf
        start = jnp.minimum(c * C, L - C)  # the last chunk overlaps the previous one
        kb = lax.dynamic_slice_in_dim(kf_, start, C, axis=1).astype(cdt).reshape(B, C, K * H)
        vb = lax.dynamic_slice_in_dim(vf_, start, C, axis=1).astype(cdt).reshape(B, C, K * Hv)
        if flat:
            s = jnp.einsum("bcx,bxy->bcy", kb, qx, preferred_element_type=cdt,
                           precision=precision)
        elif mode == "reduce":
            s = _sum(kb.reshape(B, C, K, 1, H) * qx, 4).reshape(B, C, Y)
        else:
            s = jnp.einsum("btkgh,bckh->bckgt", qx, kb.reshape(B, C, K, H),
                           preferred_element_type=cdt, precision=precision).reshape(B, C, Y)
        if logits_soft_cap is not None:
            cap = jnp.asarray(logits_soft_cap, cdt)
            s = cap * jnp.tanh(s / cap)
        slots = start + jnp.arange(C, dtype=jnp.int32)
        if ring:
            # the slot holds its newest position < P_end; those >= P are this step's tokens
            last = P_end[:, None] - 1
            pos = last - jnp.mod(last - slots[None, :], L)
            valid = (pos >= 0) & (pos < Pc)
        else:
            pos = jnp.broadcast_to(slots[None, :], (B, C))
            valid = pos < Pc
        valid = valid & (slots >= c * C)[None, :]  # overlap of the last chunk: counted already
        vis = jnp.swapaxes(_visible(pos, valid, qpos, window_left), 1, 2)  # (B, C, T or 1)
        if hook is not None:
            # the flexible-attention mods see the block as (B, K, G, T, C)
            s5, extra = hook(jnp.moveaxis(s.reshape(B, C, K, G, T), 1, -1), pos)
            s = jnp.moveaxis(s5, -1, 1).reshape(B, C, Y)
            if extra is not None:
                extra = jnp.broadcast_to(extra, (B, K, G, T, C))
                s = jnp.where(jnp.moveaxis(extra, -1, 1).reshape(B, C, Y), s, -jnp.inf)
        s = jnp.where(vis[:, :, None, :], s.reshape(B, C, K * G, T), -jnp.inf).reshape(B, C, Y)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        p = jnp.exp(s - m_use[:, None, :])
        alpha = jnp.exp(m - m_use)
        den = den * alpha + jnp.sum(p, axis=1)
        if flat:
            pv = jnp.einsum("bcy,bcz->byz", p, vb, preferred_element_type=cdt,
                            precision=precision)
        elif mode == "reduce":
            pv = _sum(p.reshape(B, C, K, G * T, 1) * vb.reshape(B, C, K, 1, Hv), 1)
            pv = pv.reshape(B, Y, Hv)
        else:
            pv = jnp.einsum("bckz,bckh->bkzh", p.reshape(B, C, K, G * T),
                            vb.reshape(B, C, K, Hv), preferred_element_type=cdt,
                            precision=precision).reshape(B, Y, Hv)
        out = (m_new, den, acc * alpha[..., None] + pv)
        return out + (kf_, vf_) if carry_cache else out

    init = (jnp.full((B, Y), -jnp.inf, cdt), jnp.zeros((B, Y), cdt), jnp.zeros((B, Y, Z), cdt))
    if carry_cache:
        m, den, acc, key, value = lax.fori_loop(lo, hi, body, init + (kf, vf))
    else:
        m, den, acc = lax.fori_loop(lo, hi, body, init)
    if flat:
        # keep the diagonal blocks: query column (k, g, t) with value head k
        acc = jnp.diagonal(acc.reshape(B, K, G, T, K, Hv), axis1=1, axis2=4)  # (B,G,T,Hv,K)
        acc = jnp.moveaxis(acc, -1, 1)  # (B, K, G, T, Hv)
    acc = acc.reshape(B, K, G, T, Hv)
    den = den.reshape(B, K, G, T)
    m = m.reshape(B, K, G, T)
    out, lse = _finish((m, den, acc))
    return out.reshape(B, T, N, Hv), lse.reshape(B, T, N), key, value


_NARROW_TOKEN_WRITES = 8


def _write(buf, new, idx):
    """``buf (B, L, K, H)`` with ``new (B, T, K, H)`` written at slots ``idx (B, T)`` (``L``:
    dropped), in place when ``buf`` is donated.

    One scatter for float32/float64 buffers. XLA:CPU has no bfloat16/float16 scatter or
    update-slice: it converts the whole cache to float32 and back around them (a scatter also
    holds a float32 copy of the cache, temp memory O(L); each update-slice rewrites the whole
    buffer). For steps of at most ``_NARROW_TOKEN_WRITES`` tokens a narrower buffer is instead
    rewritten once, elementwise (one select per token, fused into a single pass over the cache
    that XLA performs in place): one read and one write of the cache whatever ``B``, no temp
    memory. Longer steps (prefill) use the scatter.
    """
    B, T = idx.shape
    L = buf.shape[1]
    new = new.astype(buf.dtype)
    if jnp.dtype(buf.dtype).itemsize >= 4 or T > _NARROW_TOKEN_WRITES:
        rows = jnp.broadcast_to(jnp.arange(B, dtype=jnp.int32)[:, None], (B, T))
        return buf.at[rows, idx].set(new, mode="drop")
    slots = lax.broadcasted_iota(jnp.int32, (1, L, 1, 1), 1)
    for t in range(T):  # later tokens last: of two tokens for one slot (a ring), the newest wins
        hit = slots == idx[:, t, None, None, None]
        buf = jnp.where(hit, new[:, t:t + 1], buf)
    return buf


# The native CPU kernel (native.py, decode_cpu.cc) serves steps of at most this many tokens
# (decoding, speculative steps); longer ones (prefill) read the cache with matrix products.
NATIVE_MAX_TOKENS = 8
_NATIVE_DTYPES = ("float32", "bfloat16", "float16")


def _native_reason(cdt, cache: KVCache, T: int, hook, logits_soft_cap) -> str | None:
    """Why the native CPU kernel cannot serve this step (``None``: it can)."""
    if registry.current_platform() != "cpu":
        return f"platform is {registry.current_platform()}, not cpu"
    if jnp.dtype(cdt) != jnp.float32:
        return f"compute dtype is {jnp.dtype(cdt).name}, not float32"
    if (jnp.dtype(cache.key.dtype) != jnp.dtype(cache.value.dtype)
            or jnp.dtype(cache.key.dtype).name not in _NATIVE_DTYPES):
        return f"cache dtypes {cache.key.dtype}/{cache.value.dtype} (needs one of {_NATIVE_DTYPES})"
    if T > NATIVE_MAX_TOKENS:
        return f"a step of {T} tokens (> {NATIVE_MAX_TOKENS})"
    if hook is not None:
        return "mask_mod/score_mod"
    if logits_soft_cap is not None and not isinstance(logits_soft_cap, int | float):
        return "a traced or array logits_soft_cap"
    st = native.status()
    return None if st["enabled"] else st["reason"]


def _xla_write_attend(qs, key, value, key_cache, value_cache, idx, P, P_end, window_left, ring,
                      logits_soft_cap, chunk, precision, hook=None):
    """The step's write and its read of the cache, in XLA: ``(out, lse, key_cache, value_cache)``."""
    new_key = _write(key_cache, key, idx)
    new_value = _write(value_cache, value, idx)
    return _attend_cache(qs, new_key, new_value, P, P_end, window_left, ring, chunk,
                         logits_soft_cap, precision, hook)


@functools.partial(jax.custom_jvp, nondiff_argnums=(8, 9, 10, 11, 12, 13))
def _native_write_attend(q, key, value, key_cache, value_cache, idx, P, P_end, window_left, ring,
                         logits_soft_cap, chunk, precision, scale):
    """:func:`_xla_write_attend` of ``q * scale`` by the native CPU kernel (differentiated through
    the XLA path). The kernel scales the queries itself, so that bfloat16 queries reach it as
    bfloat16 numbers (its bfloat16 products need them exact)."""
    kc, vc, out, lse = native.decode_step(
        q, key.astype(key_cache.dtype), value.astype(value_cache.dtype), key_cache, value_cache,
        idx, P, P_end, window_left=window_left, ring=ring, soft_cap=logits_soft_cap, scale=scale)
    return out, lse, kc, vc


@_native_write_attend.defjvp
def _native_write_attend_jvp(window_left, ring, logits_soft_cap, chunk, precision, scale, primals,
                             tangents):
    def xla(q, *args):
        return _xla_write_attend(q * jnp.asarray(scale, q.dtype), *args, window_left, ring,
                                 logits_soft_cap, chunk, precision)

    return jax.jvp(xla, primals, tangents)


def _finish(carry):
    """``(m, l, acc)`` -> normalised ``out (B, T, K, G, Hv)`` and ``lse (B, T, K, G)``."""
    m, den, acc = carry
    safe = jnp.where(den > 0, den, 1.0)
    out = acc / safe[..., None]
    lse = jnp.where(den > 0, m + jnp.log(safe), -jnp.inf)
    return jnp.transpose(out, (0, 3, 1, 2, 4)), jnp.transpose(lse, (0, 3, 1, 2))


def cached_attention(
    query,
    key,
    value,
    cache: KVCache,
    *,
    query_seq_lengths=None,
    scale: float | None = None,
    local_window_size: int | tuple[int, int] | None = None,
    logits_soft_cap: float | None = None,
    implementation: str | None = None,
    chunk_size: ChunkSize | int | tuple[int, int] | None = None,
    precision=None,
    mask_mod=None,
    score_mod=None,
    sinks=None,
):
    r"""Causal attention of ``T`` new tokens against a :class:`KVCache`, and the cache update.

    Row ``b``'s new tokens sit at positions ``P[b] + t`` (``P = cache.lengths``,
    ``t < T``). Each attends causally to all earlier positions of its row (the cached ones and
    the new ones before it) and to itself; with ``cache.window = W`` only to positions
    ``> P[b] + t - W`` (the last ``W``), with ``local_window_size = w`` only to positions
    ``>= P[b] + t - w``. The result
    equals ``dot_product_attention(q_all, k_all, v_all, is_causal=True)`` restricted to the new
    rows, where ``*_all`` hold the row's whole history (prefill with an empty cache and a prompt
    of any length, single-token steps, multi-token steps all use this one function).

    The cached part is read in chunks of the cache (only chunks that hold a visible position) and
    merged by log-sum-exp (split-K): a step's temporary memory is O(B·N·T·C), ``C`` the key chunk
    size, independent of the cache length.

    Args:
      query: ``(B, T, N, H)`` new queries.
      key: ``(B, T, K, H)`` new keys; value: ``(B, T, K, Hv)`` new values (cast to the cache
        dtype when stored).
      cache: the cache; ``B``, ``K``, ``H``, ``Hv`` must match.
      query_seq_lengths: optional int ``(B,)``: row ``b`` has only its first
        ``query_seq_lengths[b]`` tokens valid (ragged prompts padded on the right, or rows that
        sit out a step with 0). Only valid tokens are written and counted; outputs of the others
        are zero. Values outside ``[0, T]`` raise when concrete (outside ``jit``) and are
        clipped to it under ``jit``.
      scale: logit scale, default ``1/sqrt(H)``.
      local_window_size: ``w`` or ``(w, right)`` (``right`` is irrelevant under the causal
        mask): sliding-window attention over a plain cache (the cache still stores everything).
      logits_soft_cap: as in :func:`attnjax.dot_product_attention`.
      implementation: core implementation for the new-token part (``None`` = auto).
      chunk_size: a :class:`attnjax.ChunkSize`/int/pair; its ``key`` size is the number of
        cache slots read per chunk (when ``None``: a power of two sized so that a chunk's keys
        and values take about 4 MiB, e.g. 1024 slots for B=1, K=8, H=64 in float32) and both
        sizes drive the core for the new-token part.
      precision: matmul precision.
      mask_mod, score_mod, sinks: as in :func:`attnjax.dot_product_attention`, with global
        positions: ``q_idx = P[b] + t``, ``kv_idx`` the cached or new key's position; combined
        with the causal (and window) mask by AND.

    Returns:
      ``(out, new_cache)``: ``out (B, T, N, Hv)`` in the query dtype, and the updated cache.

    On the CPU, steps of at most 8 tokens computed in float32 (float32/bfloat16/float16 caches,
    no ``mask_mod``/``score_mod``) run the cache write and read in attnjax's native kernel,
    compiled on first use with the host's C++ compiler; without one, or with
    ``ATTNJAX_NATIVE_KERNELS=0``, they take the pure-JAX path (same results, slower). On CPUs
    with AVX512-BF16, the kernel reads a bfloat16 cache for bfloat16 queries with bfloat16
    products where a kv head has a multiple of 16 query columns (``N // K * T``, e.g. 4-token
    steps with 4 query heads per kv head, where the step is bound by arithmetic): the scores are
    exact products summed in float32, and the probabilities are rounded to bfloat16 before their
    product with the values, as :func:`attnjax.dot_product_attention` and
    ``jax.nn.dot_product_attention`` round them to the values' dtype (each weight moves by at
    most ``2**-9`` of itself); the pure-JAX path keeps them in float32. A step is
    differentiable in forward mode (``jax.jvp``); reverse mode (``jax.grad``) works only
    eagerly, with concrete lengths (under ``jit`` JAX refuses it: the cache is read by a loop
    whose trip count depends on the lengths).

    Raises:
      ValueError: shape mismatches with the cache (batch, heads, head dims), ``N % K != 0``,
        ``T`` larger than a plain cache, or (when lengths are concrete, i.e. outside ``jit``) a
        step that would overflow a plain cache. Under ``jit`` an overflowing row cannot raise:
        its output is NaN (and stays NaN) instead of silently wrong.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> cache = KVCache.create(1, 128, num_kv_heads=2, head_dim=16)
      >>> q = jnp.ones((1, 5, 4, 16)); k = v = jnp.ones((1, 5, 2, 16))
      >>> out, cache = cached_attention(q, k, v, cache)           # prefill 5 tokens
      >>> out, cache = cached_attention(q[:, :1], k[:, :1], v[:, :1], cache)  # one step
      >>> cache.lengths
      Array([6], dtype=int32)
    """
    if not isinstance(cache, KVCache):
        raise TypeError(f"cache must be a KVCache, got {type(cache).__name__}")
    query, key, value = (jnp.asarray(x) for x in (query, key, value))
    for name, x in (("query", query), ("key", key), ("value", value)):
        if x.ndim != 4:
            raise ValueError(f"{name} must have rank 4 (B, T, heads, dim), got shape {x.shape}")
    B, T, N, H = query.shape
    cB, L, K, cH = cache.key.shape
    Hv = cache.value.shape[-1]
    if cB != B or key.shape[0] != B or value.shape[0] != B:
        raise ValueError(
            f"batch mismatch: cache holds {cB} rows, got query {query.shape}, key {key.shape}, "
            f"value {value.shape}"
        )
    if key.shape != (B, T, K, cH) or value.shape != (B, T, K, Hv):
        raise ValueError(
            f"key/value must have shapes {(B, T, K, cH)} and {(B, T, K, Hv)} to match the query "
            f"and the cache (K={K}, H={cH}, Hv={Hv}), got key {key.shape}, value {value.shape}"
        )
    if H != cH:
        raise ValueError(f"query head dim {H} must equal the cache head dim {cH}")
    if N % K != 0:
        raise ValueError(f"query heads N={N} must be a multiple of the cache's kv heads K={K}")
    ring = cache.window is not None
    if not ring and T > L:
        raise ValueError(f"a step of T={T} tokens does not fit in a cache of max_length {L}")
    window = _normalise_window(local_window_size)
    window_left = None if window is None else window[0]
    if ring:
        # a ring of W slots: each token sees itself and the W - 1 previous tokens
        w = cache.window - 1
        window_left = w if window_left is None else min(window_left, w)

    P, n, overflow, idx = plan_step(cache, query_seq_lengths, B, T)

    chunks = as_chunk_size(chunk_size)
    if scale is None:
        scale = 1.0 / math.sqrt(H)

    G = N // K
    cdt = compute_dtype(jnp.result_type(query.dtype, key.dtype, value.dtype, cache.key.dtype,
                                        cache.value.dtype))
    decode_chunk = (default_decode_chunk(B, K, H, Hv, jnp.dtype(cdt).itemsize)
                    if chunk_size is None else chunks.key)
    qs = query.astype(cdt) * jnp.asarray(scale, cdt)  # scaled queries in the compute dtype
    qpos = P[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
    t = jnp.arange(T, dtype=jnp.int32)[None, :]
    pos_new = P[:, None] + t  # (B, T)
    rows = jnp.broadcast_to(jnp.arange(B, dtype=jnp.int32)[:, None], (B, T))
    parts = []  # partial (out (B, T, N, Hv), lse (B, T, N)) over disjoint key sets

    # Flexible attention: one hook applied to every score block read from the cache (and the
    # same mods, shifted to global positions, for the new-token part through the core).
    hook = None
    if mask_mod is not None or score_mod is not None:
        from attnjax._src import flex  # noqa: PLC0415

        flex.check_mods(mask_mod, score_mod, B, N, T, T, cdt)
        bi = jnp.arange(B, dtype=jnp.int32).reshape(B, 1, 1, 1, 1)
        hi = jnp.arange(N, dtype=jnp.int32).reshape(1, K, G, 1, 1)
        qi = qpos[:, None, None, :, None]

        def hook(s, kpos):
            ki = kpos.astype(jnp.int32)[:, None, None, None, :]
            if score_mod is not None:
                s = score_mod(s, bi, hi, qi, ki)
            return s, (None if mask_mod is None else mask_mod(bi, hi, qi, ki))

    def shifted(fn, nargs):
        # the core sees the new tokens at positions 0..T-1; the mods see P[b] + t
        if fn is None:
            return None
        if nargs == 4:
            return lambda b, h, q, k: fn(b, h, q + P[b], k + P[b])
        return lambda s, b, h, q, k: fn(s, b, h, q + P[b], k + P[b])

    # 1. Ring buffer, multi-token step: the old entries this step overwrites (still visible to
    #    its earlier queries) are gathered first (T slots) and attended to separately. XLA then
    #    keeps the old buffer alive with one copy of the ring (W slots). Single-token steps need
    #    no old entry (the one overwritten, position P - W, is outside every window) and update
    #    the ring in place.
    if ring and T > 1:
        E = min(T, L)
        te = t[:, :E]
        slot_e = jnp.mod(pos_new[:, :E], L)
        ke = cache.key[rows[:, :E], slot_e]  # (B, E, K, H)
        ve = cache.value[rows[:, :E], slot_e]
        pos_e = pos_new[:, :E] - L
        valid_e = (pos_e >= 0) & ((n[:, None] >= L) | (te < n[:, None]))
        carry = (
            jnp.full((B, K, G, T), -jnp.inf, cdt),
            jnp.zeros((B, K, G, T), cdt),
            jnp.zeros((B, K, G, T, Hv), cdt),
        )
        carry = _block_update(carry, qs.reshape(B, T, K, G, H), ke, ve,
                              _visible(pos_e, valid_e, qpos, window_left), logits_soft_cap,
                              precision, hook, pos_e)
        o_e, lse_e = _finish(carry)
        parts.append((o_e.reshape(B, T, N, Hv), lse_e.reshape(B, T, N)))

    # 2. Write the valid new tokens into their slots first (out-of-range indices are dropped):
    #    writing before reading lets XLA update a donated cache in place, with no copy.
    # 3. The cached positions < P still in the buffer, read chunk by chunk (split-K).
    static = (window_left, ring, logits_soft_cap, decode_chunk, precision)
    args = (qs, key, value, cache.key, cache.value, idx, P, P + n)
    if _native_reason(cdt, cache, T, hook, logits_soft_cap) is None:
        # a Python scale is applied by the kernel (bfloat16 queries stay bfloat16 numbers)
        q_n, scale_n = ((query.astype(cdt), float(scale)) if isinstance(scale, int | float)
                        else (qs, 1.0))
        o_old, lse_old, new_key, new_value = _native_write_attend(q_n, *args[1:], *static,
                                                                  scale_n)
    else:
        o_old, lse_old, new_key, new_value = _xla_write_attend(*args, *static, hook=hook)
    parts.append((o_old, lse_old))

    # 4. Causal attention over the T new tokens, through the core, in the compute dtype.
    o_new, lse_new = dot_product_attention(
        query.astype(cdt), key.astype(cdt), value.astype(cdt), scale=scale, is_causal=True,
        local_window_size=None if window_left is None else (window_left, 0),
        key_value_seq_lengths=None if query_seq_lengths is None else n,
        logits_soft_cap=logits_soft_cap, implementation=implementation,
        chunk_size=chunk_size, precision=precision, return_residual=True,
        mask_mod=shifted(mask_mod, 4), score_mod=shifted(score_mod, 5),
    )

    # 5. Exact merge by log-sum-exp.
    out, lse = o_new.astype(cdt), lse_new.astype(cdt)
    for o_p, lse_p in parts:
        out, lse = merge_partials(o_p, lse_p, out, lse)
    if sinks is not None:
        from attnjax._src import flex  # noqa: PLC0415

        sinks = jnp.asarray(sinks)
        if not jnp.issubdtype(sinks.dtype, jnp.floating) or sinks.shape != (N,):
            raise ValueError(
                f"sinks must be a float array of shape (N,) = ({N},), got {sinks.dtype}{sinks.shape}")
        out, _ = flex.apply_sinks(out, lse, sinks)
    row_ok = t < n[:, None]  # (B, T)
    out = jnp.where(row_ok[..., None, None], out, 0.0)
    if overflow is not None:
        out = jnp.where(overflow[:, None, None, None], jnp.nan, out)
    out = out.astype(query.dtype)
    new_cache = dataclasses.replace(cache, key=new_key, value=new_value, lengths=P + n)
    return out, new_cache
