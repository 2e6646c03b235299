"""Built-in ``mask_mod`` and ``score_mod`` helpers (public as :mod:`attnjax.masks`).

A ``mask_mod(b, h, q_idx, kv_idx) -> bool`` (True = attend) and a
``score_mod(score, b, h, q_idx, kv_idx) -> score`` are element-wise functions of broadcast
int32 index arrays: ``b`` the batch row, ``h`` the query head, ``q_idx`` the query's position
among the keys (``i + query_offset``) and ``kv_idx`` the key's position. The helpers below
return such callables; combine masks with :func:`and_masks` / :func:`or_masks` and pass them
to :func:`attnjax.dot_product_attention` (``mask_mod=``, ``score_mod=``) or
:func:`attnjax.create_block_mask`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax.numpy as jnp

MaskMod = Callable
ScoreMod = Callable


def causal(b, h, q_idx, kv_idx):
    """Causal mask: a query sees keys at or before its own position."""
    del b, h
    return q_idx >= kv_idx


def sliding_window(left: int, right: int = 0) -> MaskMod:
    """Keys within ``[q_idx - left, q_idx + right]`` (``right=0``: causal sliding window)."""
    def mask_mod(b, h, q_idx, kv_idx):
        del b, h
        return (kv_idx >= q_idx - left) & (kv_idx <= q_idx + right)

    return mask_mod


def chunked_causal(chunk: int) -> MaskMod:
    """Llama 4's chunked attention: causal within chunks of ``chunk`` positions, nothing across."""
    def mask_mod(b, h, q_idx, kv_idx):
        del b, h
        return (q_idx // chunk == kv_idx // chunk) & (q_idx >= kv_idx)

    return mask_mod


def prefix_lm(prefix_lengths) -> MaskMod:
    """Prefix-LM: bidirectional over the first ``prefix_lengths[b]`` keys of row ``b``, causal
    after (``prefix_lengths``: int ``(B,)``, or a scalar for every row)."""
    prefix = jnp.asarray(prefix_lengths)

    def mask_mod(b, h, q_idx, kv_idx):
        del h
        p = prefix[b] if prefix.ndim else prefix
        return (kv_idx < p) | (q_idx >= kv_idx)

    return mask_mod


def document(q_doc_ids, kv_doc_ids=None) -> MaskMod:
    """Packed documents: a query sees only keys of its own document (``q_doc_ids`` indexed by
    ``q_idx``, the query's position among the keys, ``i + query_offset``; ``kv_doc_ids (B, S)``
    by key position; the same array when omitted). Without a ``query_offset``, ``q_doc_ids`` of
    shape ``(B, T)`` works; with one (chunked prefill, decoding) give ids that cover the query
    positions, e.g. the keys' ``(B, S)`` ids as the only argument (JAX clamps an index past an
    array's end, which would silently reuse its last id).
    Combine with :func:`causal` for causal packing."""
    q_ids = jnp.asarray(q_doc_ids)
    kv_ids = q_ids if kv_doc_ids is None else jnp.asarray(kv_doc_ids)

    def mask_mod(b, h, q_idx, kv_idx):
        del h
        return q_ids[b, q_idx] == kv_ids[b, kv_idx]

    return mask_mod


def sink_window(num_sinks: int, window: int) -> MaskMod:
    """StreamingLLM: causal; each query sees the first ``num_sinks`` keys and the last
    ``window`` keys (itself included)."""
    def mask_mod(b, h, q_idx, kv_idx):
        del b, h
        return (q_idx >= kv_idx) & ((kv_idx < num_sinks) | (q_idx - kv_idx < window))

    return mask_mod


def and_masks(*mask_mods: MaskMod) -> MaskMod:
    """Visible where every mask is."""
    if not mask_mods:
        raise ValueError("and_masks needs at least one mask_mod")

    def mask_mod(b, h, q_idx, kv_idx):
        out = mask_mods[0](b, h, q_idx, kv_idx)
        for m in mask_mods[1:]:
            out = out & m(b, h, q_idx, kv_idx)
        return out

    return mask_mod


def or_masks(*mask_mods: MaskMod) -> MaskMod:
    """Visible where any mask is."""
    if not mask_mods:
        raise ValueError("or_masks needs at least one mask_mod")

    def mask_mod(b, h, q_idx, kv_idx):
        out = mask_mods[0](b, h, q_idx, kv_idx)
        for m in mask_mods[1:]:
            out = out | m(b, h, q_idx, kv_idx)
        return out

    return mask_mod


# ------------------------------------------------------------------------------------------------
# Score modifiers.


def alibi_slopes(num_heads: int):
    """The ALiBi slopes of Press et al. (2022): ``2^(-8 (n + 1) / N)``-style geometric
    sequence for ``N`` heads (interleaved as in the paper when ``N`` is not a power of two)."""
    def power_of_2(n):
        start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(num_heads).is_integer():
        s = power_of_2(num_heads)
    else:
        p = 2 ** math.floor(math.log2(num_heads))
        s = power_of_2(p) + power_of_2(2 * p)[0::2][: num_heads - p]
    return jnp.asarray(s, jnp.float32)


def alibi(slopes) -> ScoreMod:
    """ALiBi: ``score - slopes[h] · (q_idx - kv_idx)`` (``slopes``: float ``(N,)``,
    differentiable when traced)."""
    def score_mod(score, b, h, q_idx, kv_idx):
        del b
        dt = score.dtype
        # Convert the (broadcast, small) position vectors before combining them: one int->float
        # conversion per position, not per score entry (exact below 2**24 positions).
        return score - slopes[h].astype(dt) * (q_idx.astype(dt) - kv_idx.astype(dt))

    return score_mod


def _check_t5(num_buckets: int, max_distance: int, bidirectional: bool) -> None:
    """T5's log-spaced buckets need ``max_distance`` beyond the exact ones (else the log scale
    divides by zero and the buckets leave the table)."""
    half = num_buckets // 2 if bidirectional else num_buckets
    max_exact = half // 2
    if max_exact < 1 or max_distance <= max_exact:
        kind = "bidirectional" if bidirectional else "one direction"
        raise ValueError(
            f"t5 buckets ({kind}): num_buckets={num_buckets} gives {max_exact} exact buckets per "
            f"direction; max_distance must exceed that, and num_buckets must be at least "
            f"{4 if bidirectional else 2}; got max_distance={max_distance}")


def t5_bucket(relative_position, num_buckets: int = 32, max_distance: int = 128,
              bidirectional: bool = True):
    """T5's relative-position bucket of ``kv_idx - q_idx`` (int array -> int32 array).

    Raises ``ValueError`` unless ``max_distance`` exceeds the exact buckets (``num_buckets // 4``
    bidirectional, ``num_buckets // 2`` one direction).
    """
    _check_t5(num_buckets, max_distance, bidirectional)
    n = -relative_position
    ret = jnp.zeros_like(n)
    if bidirectional:
        num_buckets //= 2
        ret = ret + (n < 0).astype(n.dtype) * num_buckets
        n = jnp.abs(n)
    else:
        n = jnp.maximum(n, 0)
    max_exact = num_buckets // 2
    nf = jnp.maximum(n, 1).astype(jnp.float32)
    large = max_exact + (jnp.log(nf / max_exact) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).astype(n.dtype)
    large = jnp.minimum(large, num_buckets - 1)
    return (ret + jnp.where(n < max_exact, n, large)).astype(jnp.int32)


def t5_relative_bias(table, *, max_distance: int = 128, bidirectional: bool = True) -> ScoreMod:
    """T5 learned relative position bias: ``score + table[bucket(kv_idx - q_idx), h]``
    (``table``: float ``(num_buckets, N)``, differentiable when traced)."""
    num_buckets = table.shape[0]
    _check_t5(num_buckets, max_distance, bidirectional)

    def score_mod(score, b, h, q_idx, kv_idx):
        del b
        bucket = t5_bucket(kv_idx - q_idx, num_buckets, max_distance, bidirectional)
        return score + table[bucket, h].astype(score.dtype)

    return score_mod


def soft_cap(cap: float) -> ScoreMod:
    """``cap · tanh(score / cap)`` (Gemma 2) as a score_mod."""
    def score_mod(score, b, h, q_idx, kv_idx):
        del b, h, q_idx, kv_idx
        c = jnp.asarray(cap, score.dtype)
        return c * jnp.tanh(score / c)

    return score_mod
