"""The public entry point: :func:`dot_product_attention`, input checks and dispatch."""

from __future__ import annotations

import dataclasses
import functools
import math
import threading
from collections.abc import Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

from attnjax._src import dropout as dropout_lib
from attnjax._src import flex, pallas_config, registry
from attnjax._src.config import ChunkSize, as_chunk_size
from attnjax._src.masks import MaskInfo, to_grouped
from attnjax._src.numerics import compute_dtype
from attnjax._src.registry import AUTO_MATERIALISE_MAX_SCORES as AUTO_MATERIALISE_MAX_SCORES

# Every registered implementation name (see attnjax._src.registry).
IMPLEMENTATIONS = registry.names()


def _shape_str(x) -> str:
    return str(tuple(x.shape))


def _check_float(name: str, x) -> None:
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must have a floating dtype, got {x.dtype}")


def _check_int_array(name: str, x, shape: Sequence[int], what: str) -> jax.Array:
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise TypeError(f"{name} must have an integer dtype, got {x.dtype}")
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)} ({what}), got {_shape_str(x)}")
    return x.astype(jnp.int32)


def _as_4d(name: str, x, full: tuple[int, int, int, int]):
    """Left-pad ``x`` to rank 4 and check it broadcasts to ``full`` = (B, N, T, S)."""
    x = jnp.asarray(x)
    if x.ndim > 4:
        raise ValueError(
            f"{name} must have rank <= 4 and broadcast to (B, N, T, S) = {full}, "
            f"got shape {_shape_str(x)}"
        )
    x4 = x.reshape((1,) * (4 - x.ndim) + tuple(x.shape))
    for got, want in zip(x4.shape, full, strict=True):
        if got not in (1, want):
            raise ValueError(
                f"{name} of shape {_shape_str(x)} does not broadcast to (B, N, T, S) = {full}"
            )
    return x4


def _check_soft_cap(logits_soft_cap):
    """A positive finite Python float, ``None``, or a traced float scalar (kept as an array)."""
    if logits_soft_cap is None:
        return None
    if isinstance(logits_soft_cap, bool) or not isinstance(
        logits_soft_cap, int | float | np.ndarray | np.floating | np.integer | jax.Array
    ):
        raise TypeError(f"logits_soft_cap must be a positive float or None, got {logits_soft_cap!r}")
    if isinstance(logits_soft_cap, np.ndarray | jax.Array):
        dtype = logits_soft_cap.dtype
        if logits_soft_cap.ndim != 0 or not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(
                "logits_soft_cap must be a positive float or a float scalar array, got an array "
                f"of shape {tuple(logits_soft_cap.shape)} and dtype {dtype}"
            )
        if isinstance(logits_soft_cap, jax.core.Tracer):
            return logits_soft_cap  # traced under jit: its value cannot be checked here
    value = float(logits_soft_cap)
    if not value > 0 or not math.isfinite(value):
        raise ValueError(f"logits_soft_cap must be a positive finite float or None, got {value}")
    return value


def _forward_mode(*arrays) -> bool:
    """Whether an input is traced by forward-mode autodiff (``jax.jvp``, ``jax.jacfwd``), also
    beneath other transformations (e.g. ``jax.vmap`` inside ``jax.jvp``)."""
    for x in arrays:
        seen = 0
        while isinstance(x, jax.core.Tracer) and seen < 64:  # outer to inner tracers
            if type(x).__name__ == "JVPTracer":
                return True
            inner = [getattr(x, a) for a in ("val", "primal") if hasattr(x, a)]
            x = inner[0] if inner else None
            seen += 1
    return False


def _reject_forward_mode(implementation: str, *arrays) -> None:
    """Forward-mode autodiff (``jax.jvp``, ``jax.jacfwd``) of a custom-VJP implementation would
    fail deep inside JAX; say which implementation serves it instead."""
    if _forward_mode(*arrays):
        raise TypeError(
            f"implementation={implementation!r} supports reverse-mode differentiation "
            "(jax.grad, jax.vjp, jax.jacrev) but not forward mode (jax.jvp, jax.jacfwd): its "
            "backward pass is a custom VJP. Use implementation='xla' for forward-mode "
            "derivatives (it is differentiated by JAX itself)."
        )


def _check_is_causal(is_causal) -> bool:
    """A static bool: ``True``/``False``, or what ``jax.nn`` also accepts in their place (``0``/
    ``1``, a concrete NumPy or JAX scalar of bool or integer dtype holding 0 or 1)."""
    if isinstance(is_causal, bool | np.bool_):
        return bool(is_causal)
    if isinstance(is_causal, jax.core.Tracer):
        raise TypeError(
            f"is_causal must be a static bool (it decides the mask at trace time), got a traced "
            f"{jnp.result_type(is_causal)} value; pass a Python bool (e.g. mark it static in jax.jit)"
        )
    if isinstance(is_causal, int | np.integer | np.ndarray | jax.Array):
        x = np.asarray(is_causal)
        if x.ndim == 0 and (x.dtype == np.bool_ or np.issubdtype(x.dtype, np.integer)) and x in (0, 1):
            return bool(x)
    raise TypeError(f"is_causal must be a bool, got {is_causal!r}")


def _normalise_window(local_window_size):
    if local_window_size is None:
        return None
    if isinstance(local_window_size, bool):
        raise TypeError(f"local_window_size must be an int or (left, right) pair, got {local_window_size!r}")
    if isinstance(local_window_size, int | np.integer):
        pair = (int(local_window_size), int(local_window_size))
    elif isinstance(local_window_size, Sequence) and len(local_window_size) == 2:
        pair = tuple(int(w) for w in local_window_size)
    else:
        raise TypeError(
            f"local_window_size must be an int or a (left, right) pair of ints, got {local_window_size!r}"
        )
    if pair[0] < 0 or pair[1] < 0:
        raise ValueError(f"local_window_size must be non-negative, got {local_window_size!r}")
    return pair


def dot_product_attention(
    query,
    key,
    value,
    bias=None,
    mask=None,
    *,
    scale: float | None = None,
    is_causal: bool = False,
    query_seq_lengths=None,
    key_value_seq_lengths=None,
    local_window_size: int | tuple[int, int] | None = None,
    query_segment_ids=None,
    key_value_segment_ids=None,
    query_offset=None,
    logits_soft_cap: float | None = None,
    dropout_rate: float = 0.0,
    dropout_rng=None,
    implementation: str | None = None,
    chunk_size: ChunkSize | int | tuple[int, int] | None = None,
    precision=None,
    return_residual: bool = False,
    mask_mod=None,
    score_mod=None,
    block_mask: flex.BlockMask | None = None,
    sinks=None,
):
    r"""Scaled dot-product attention, exact, in memory linear in sequence length.

    A drop-in replacement for :func:`jax.nn.dot_product_attention`: every argument the two share
    has the same name, shape and meaning. For each head

    .. math::

       \mathrm{Attention}(Q, K, V) = \mathrm{softmax}\big(\mathrm{cap}(s\,QK^T) + B\big)\,V

    where ``s`` is ``scale`` and ``cap(x) = c·tanh(x / c)`` when ``logits_soft_cap`` is ``c``.

    Shape letters: B batch, T query length, S key/value length, N query heads, K key/value heads,
    G = N // K query heads per kv head, H query/key head dim, Hv value head dim.

    Masks combine with a logical AND; entry ``(b, n, i, j)`` is visible when all of these hold:

    * ``mask[b, n, i, j]`` (boolean, True = attend), if given;
    * ``is_causal``: ``j <= i + query_offset[b]``;
    * ``local_window_size = (left, right)``:
      ``i + query_offset[b] - left <= j <= i + query_offset[b] + right``
      (an int ``w`` means ``(w, w)``);
    * ``i < query_seq_lengths[b]`` and ``j < key_value_seq_lengths[b]``;
    * ``query_segment_ids[b, i] == key_value_segment_ids[b, j]``;
    * ``mask_mod(b, n, i + query_offset[b], j)``, if given.

    **Fully masked rows.** A query row that sees no key at all (by any combination of masks)
    gets an output of exactly zero, zero gradients and a log-sum-exp of ``-inf``, in every dtype
    and implementation. This differs from ``jax.nn.dot_product_attention``, which returns the
    average of all values for such rows (except rows cut off by ``query_seq_lengths``, which it
    also zeroes).

    **Numerics.** Logits, softmax statistics and accumulators are computed in the wider of
    float32 and the input dtype: float32 for float16/bfloat16/float32 inputs, float64 for float64
    inputs (under ``jax_enable_x64``). The output has the input dtype.

    **Differentiation.** Every implementation supports reverse mode (``jax.grad``, ``jax.vjp``)
    with respect to ``query``, ``key``, ``value``, ``bias`` and a traced ``logits_soft_cap``.
    Forward mode (``jax.jvp``, ``jax.jacfwd``) works with ``"xla"``, which ``implementation=None``
    then takes at any size (memory O(B·N·T·S), as ``jax.nn``); the other implementations have a
    custom VJP, and naming one under forward mode raises a ``TypeError`` that points to ``"xla"``.

    **Empty inputs.** ``B``, ``T`` or ``S`` may be 0, as in ``jax.nn``: the result has the same
    shape as ``jax.nn``'s; with ``S = 0`` every row sees no key (zeros, log-sum-exp ``-inf``).

    Args:
      query: ``(BTNH|TNH)`` floating array.
      key: ``(BSKH|SKH)``, same dtype as ``query``; ``N % K == 0`` (GQA/MQA without copying
        K/V per query head).
      value: ``(BSKHv|SKHv)``, same dtype; the value head dim may differ from ``H``.
      bias: optional floating array added to the logits, rank <= 4, broadcastable to
        ``(BNTS|NTS)``. It is differentiable (its gradient is summed over broadcast dims).
      mask: optional boolean array, rank <= 4, broadcastable to ``(BNTS|NTS)``; True = attend.
      scale: logit scale; ``None`` means ``1 / sqrt(H)``.
      is_causal: causal mask, aligned by ``query_offset`` (default top-left, as ``jax.nn``). A
        static bool (``0``/``1`` and concrete bool or int scalars are accepted, as in ``jax.nn``).
      query_seq_lengths: int ``(B)``: query rows ``>=`` the length are masked (output zero).
      key_value_seq_lengths: int ``(B)``: keys ``>=`` the length are masked.
      local_window_size: ``int`` or ``(left, right)`` window around ``i + query_offset``.
      query_segment_ids: int ``(BT|T)``; key_value_segment_ids: int ``(BS|S)``. Give both or
        neither: a query attends only to keys of the same segment (packed sequences).
        No id is special (``0`` is a segment like any other): to hide padding, give it an id
        of its own that no real token uses, or use the sequence lengths.
      query_offset: int or int ``(B)``: the position of query row 0 among the keys, used by the
        causal and window masks. ``0`` (default) is ``jax.nn``'s top-left alignment; ``S - T`` is
        the bottom-right alignment used for decoding and chunked prefill.
      logits_soft_cap: ``c > 0``: logits become ``c * tanh(logits / c)`` before bias and masks.
        ``None`` turns it off. A Python float, or a float scalar array that may be traced
        (e.g. a model-config value under ``jit``); a traced value cannot be checked for
        ``c > 0`` and is differentiable.
      dropout_rate: probability of dropping an attention weight (kept weights are scaled by
        ``1 / (1 - rate)``), in ``[0, 1)``.
      dropout_rng: a PRNG key, required when ``dropout_rate > 0``. The keep-mask is a function of
        the key and the ``(b, n, i, j)`` position only: it is regenerated block by block (never
        stored) and is identical across implementations and chunk sizes.
      implementation: ``"xla"`` (materialised scores; memory O(B·N·T·S)), ``"xla_chunked"``
        (online softmax over chunks; memory O(T·H + chunk²), forward and backward),
        ``"cudnn"`` (NVIDIA GPUs), ``"splash"`` (TPUs), ``"pallas_gpu"`` (attnjax's fused GPU
        kernel; see :func:`attnjax.explain_dispatch` for what each serves), or ``None``:
        ``"xla"`` while ``B·N·T·S <= 2**22`` (small problems, e.g. decoding one token) or under
        forward-mode differentiation, else ``"xla_chunked"`` (on GPUs and TPUs first the fused
        kernels that can serve the call: ``"cudnn"``, ``"pallas_gpu"``, ``"splash"``). A named
        implementation never falls back to another.
      chunk_size: for ``"xla_chunked"``: a :class:`ChunkSize`, an int (both sizes) or a
        ``(query, key)`` pair. Any length works. ``None`` (default) picks square chunks of 512
        when ``B·N <= 8`` and smaller powers of two (down to 64) for larger ``B·N``, so that one
        float32 score block ``B·N·chunk²`` stays within 8 MiB (larger blocks spill the caches).
      precision: passed to the matmuls (``jax.lax.Precision`` or ``None``).
      return_residual: also return the log-sum-exp of the (masked, scaled) logits, shape
        ``(BTN|TN)``, in the input dtype as in ``jax.nn``. Unlike ``jax.nn``, it is
        differentiable.
      mask_mod: ``mask_mod(b, h, q_idx, kv_idx) -> bool`` (True = attend), element-wise in jnp
        operations; attnjax calls it on broadcast int32 index arrays of a whole block. ``h`` is
        the query head, ``kv_idx`` the key position and ``q_idx = i + query_offset`` the query's
        position among the keys. It may index arrays it closes over
        (``doc[b, q_idx] == doc[b, kv_idx]``). ANDed with every other mask. On a GPU,
        ``"pallas_gpu"`` traces it into its Triton kernels when it lowers there (indexing
        closed-over arrays directly does; see :func:`attnjax.explain_dispatch`).
      score_mod: ``score_mod(score, b, h, q_idx, kv_idx) -> score`` on the scaled logits
        after the soft cap and before bias and masks (compute dtype, same shape). Gradients
        flow to every array it closes over (an ALiBi slope, a bias table), in every
        implementation that serves it (``"xla"``, ``"xla_chunked"``, ``"pallas_gpu"``; not
        ``"cudnn"`` or ``"splash"``).
      block_mask: an :class:`attnjax.BlockMask` from :func:`attnjax.create_block_mask`, built
        for this call's ``(B|1, N|1, T, S)``: ``"xla_chunked"`` and ``"pallas_gpu"`` then
        visit only non-empty blocks and skip the mask on full ones; its block size sets the
        chunk size (``"pallas_gpu"`` regroups it for its own block sizes). Its
        ``mask_mod`` applies when ``mask_mod`` is not given (if given, it must be the same
        callable).
      sinks: float ``(N,)`` learnable per-head sink logits: the softmax denominator of head
        ``n`` gains ``exp(sinks[n])`` (no value attached). Differentiable. A fully masked row
        then gives zeros and a log-sum-exp of ``sinks[n]``.

    Returns:
      The attention output ``(BTNHv|TNHv)`` in the input dtype, or ``(output, lse)`` when
      ``return_residual``.

    Raises:
      ValueError: wrong ranks, mismatched batch/length/head dims, ``N % K != 0``, masks, bias,
        segment ids or lengths of the wrong shape, a bad window, soft cap or dropout rate,
        dropout without a key, an unknown implementation, bad chunk sizes.
      TypeError: non-floating or mixed q/k/v dtypes, non-boolean mask, non-integer ids/lengths.

    Example:
      >>> import jax, attnjax
      >>> q = k = v = jax.random.normal(jax.random.key(0), (2, 4096, 8, 64))
      >>> out = attnjax.dot_product_attention(q, k, v, is_causal=True)
      >>> out.shape
      (2, 4096, 8, 64)
    """
    query, key, value = (jnp.asarray(x) for x in (query, key, value))
    for name, x in (("query", query), ("key", key), ("value", value)):
        _check_float(name, x)
    if not (query.dtype == key.dtype == value.dtype):
        raise TypeError(
            "query, key and value must have the same dtype, got "
            f"query={query.dtype}, key={key.dtype}, value={value.dtype}"
        )
    if query.ndim not in (3, 4):
        raise ValueError(f"query must have rank 4 (B, T, N, H) or 3 (T, N, H), got shape {_shape_str(query)}")
    for name, x in (("key", key), ("value", value)):
        if x.ndim != query.ndim:
            raise ValueError(
                f"{name} must have the same rank as query ({query.ndim}), got shape {_shape_str(x)}"
            )
    unbatched = query.ndim == 3
    if unbatched:
        query, key, value = query[None], key[None], value[None]
    B, T, N, H = query.shape
    if key.shape[0] != B or value.shape[0] != B:
        raise ValueError(
            f"batch dims differ: query {_shape_str(query)}, key {_shape_str(key)}, value {_shape_str(value)}"
        )
    S, K = key.shape[1], key.shape[2]
    if key.shape[3] != H:
        raise ValueError(f"key head dim must equal query head dim {H}, got key shape {_shape_str(key)}")
    if value.shape[1] != S or value.shape[2] != K:
        raise ValueError(
            f"value must have shape (B, S, K, Hv) = ({B}, {S}, {K}, Hv) like key, got {_shape_str(value)}"
        )
    if min(N, K, H, value.shape[3]) == 0:
        raise ValueError(
            "head counts and head dims must be non-zero (batch and sequence lengths may be 0), got "
            f"query {_shape_str(query)}, key {_shape_str(key)}, value {_shape_str(value)}"
        )
    if N % K != 0:
        raise ValueError(
            f"the number of query heads N={N} must be a multiple of the number of key/value heads K={K}"
        )
    full = (B, N, T, S)

    # ---- masks ----
    if bias is not None:
        bias = jnp.asarray(bias)
        _check_float("bias", bias)
        bias = _as_4d("bias", bias, full)
    if mask is not None:
        mask = jnp.asarray(mask)
        if mask.dtype != jnp.bool_:
            raise TypeError(f"mask must have dtype bool (True = attend), got {mask.dtype}")
        mask = _as_4d("mask", mask, full)

    def batched_ids(name, x, length, letter):
        if x is None:
            return None
        x = jnp.asarray(x)
        if unbatched and x.ndim == 1:
            x = x[None]
        return _check_int_array(name, x, (B, length), f"(B, {letter})")

    q_seg = batched_ids("query_segment_ids", query_segment_ids, T, "T")
    kv_seg = batched_ids("key_value_segment_ids", key_value_segment_ids, S, "S")
    if (q_seg is None) != (kv_seg is None):
        raise ValueError(
            "query_segment_ids and key_value_segment_ids must be given together, got "
            f"query_segment_ids={'None' if q_seg is None else 'array'}, "
            f"key_value_segment_ids={'None' if kv_seg is None else 'array'}"
        )

    def lengths(name, x, bound):
        if x is None:
            return None
        x = jnp.asarray(x)
        if unbatched and x.ndim == 0:
            x = x[None]
        x = _check_int_array(name, x, (B,), "(B,)")
        return jnp.clip(x, 0, bound)

    q_lens = lengths("query_seq_lengths", query_seq_lengths, T)
    kv_lens = lengths("key_value_seq_lengths", key_value_seq_lengths, S)

    offset = None
    offset_kind, static_offset = "none", 0
    if query_offset is not None:
        if isinstance(query_offset, int | np.integer) and not isinstance(query_offset, bool):
            offset = None if int(query_offset) == 0 else jnp.asarray(int(query_offset), jnp.int32)
            offset_kind = "none" if offset is None else "static"
            static_offset = int(query_offset)
        else:
            off = jnp.asarray(query_offset)
            if not jnp.issubdtype(off.dtype, jnp.integer):
                raise TypeError(f"query_offset must be an int or an integer array, got {off.dtype}")
            offset_kind = "array"
            if off.ndim == 0:
                offset = off.astype(jnp.int32)
            elif off.shape == (B,):
                offset = off.astype(jnp.int32)
            else:
                raise ValueError(f"query_offset must be an int or have shape (B,) = ({B},), got {_shape_str(off)}")

    window = _normalise_window(local_window_size)
    is_causal = _check_is_causal(is_causal)

    logits_soft_cap = _check_soft_cap(logits_soft_cap)

    # ---- dropout ----
    if isinstance(dropout_rate, bool) or not isinstance(dropout_rate, int | float):
        raise TypeError(f"dropout_rate must be a float in [0, 1), got {dropout_rate!r}")
    if not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate}")
    seed = None
    if dropout_rate > 0.0:
        if dropout_rng is None:
            raise ValueError(f"dropout_rate={dropout_rate} > 0 needs a dropout_rng key, got None")
        seed = dropout_lib.seed_from_key(jnp.asarray(dropout_rng))

    # ---- scale, implementation, chunks ----
    if scale is None:
        scale = 1.0 / math.sqrt(H)
    elif isinstance(scale, jax.core.Tracer):
        # A traced scale (as jax.nn allows) cannot be a static kernel setting: fold it into q.
        if not jnp.issubdtype(jnp.result_type(scale), jnp.floating):
            raise TypeError(f"scale must be a float, got {jnp.result_type(scale)}")
        query = query * jnp.asarray(scale, query.dtype)
        scale = 1.0
    else:
        if isinstance(scale, str | bytes):
            raise TypeError(f"scale must be a float or None, got {scale!r}")
        try:
            scale = float(scale)
        except (TypeError, ValueError):
            raise TypeError(f"scale must be a float or None, got {scale!r}") from None
    registry.check_name(implementation)
    # ---- flexible attention: mask_mod, score_mod, block_mask, sinks ----
    if block_mask is not None:
        flex.check_block_mask(block_mask, B, N, T, S, mask_mod, query_offset)
        if mask_mod is None:
            mask_mod = block_mask.mask_mod
    flex.check_mods(mask_mod, score_mod, B, N, T, S, compute_dtype(query.dtype))
    if sinks is not None:
        sinks = jnp.asarray(sinks)
        _check_float("sinks", sinks)
        if sinks.shape != (N,):
            raise ValueError(f"sinks must have shape (N,) = ({N},), got {_shape_str(sinks)}")
    chunks = as_chunk_size(chunk_size, B * N)
    if block_mask is not None:
        if chunk_size is not None and chunks.resolve(T, S) != tuple(block_mask.block_size):
            raise ValueError(
                f"chunk_size={chunk_size!r} disagrees with the block_mask's block size "
                f"{tuple(block_mask.block_size)}; omit chunk_size (the block mask sets it)"
            )
        chunks = ChunkSize(*block_mask.block_size)

    mask5 = None if mask is None else to_grouped(mask, K, T, S, False)
    info = MaskInfo(
        q_len=T, kv_len=S, is_causal=bool(is_causal), window=window, query_offset=offset,
        q_lengths=q_lens, kv_lengths=kv_lens, q_segment_ids=q_seg, kv_segment_ids=kv_seg,
        mask=mask5, **flex.mod_fields(mask_mod, score_mod, block_mask, B, N, K, T, S,
                                      compute_dtype(query.dtype)),
    )
    features = registry.CallFeatures(
        platform=registry.current_platform(), tpu_interpret=registry.tpu_interpret_mode(),
        dtype=registry.dtype_name(query.dtype), batch=B, q_len=T, kv_len=S, num_heads=N,
        num_kv_heads=K, head_dim=H, value_head_dim=value.shape[3], is_causal=bool(is_causal),
        window=window, offset=offset_kind, static_offset=static_offset,
        q_lengths=q_lens is not None, kv_lengths=kv_lens is not None, segments=q_seg is not None,
        mask=mask is not None, bias=bias is not None,
        bias_shape=None if bias is None else tuple(bias.shape),
        soft_cap=logits_soft_cap is not None,
        soft_cap_traced=isinstance(logits_soft_cap, jax.core.Tracer | jax.Array),
        dropout=dropout_rate > 0.0,
        return_residual=bool(return_residual), precision=precision is not None,
        pallas_interpret=pallas_config.interpret_enabled(),
        flex=mask_mod is not None or score_mod is not None or block_mask is not None,
        forward_mode=_forward_mode(query, key, value, bias, logits_soft_cap),
        sinks=sinks is not None,
    )
    if (features.platform in ("cuda", "rocm") and not features.pallas_interpret
            and (mask_mod is not None or score_mod is not None)):
        # Whether the mods lower to Triton (decided here, so that dispatch can say why not).
        from attnjax._src import pallas_gpu  # noqa: PLC0415 (Pallas is imported lazily)

        features = dataclasses.replace(
            features, flex_gpu_reason=pallas_gpu.mods_lowering_reason(mask_mod, score_mod))
    capture = getattr(_explain_state, "capture", None)
    if capture is not None:
        capture.append(features)
        raise _Captured  # explain_dispatch: stop before any implementation is traced
    if min(B, T, S) == 0:
        # Nothing to attend (as jax.nn: an empty output, or S = 0: every row fully masked).
        return _empty(B, T, N, value.shape[3], query.dtype, sinks, (bool(unbatched), bool(return_residual)))
    impl = registry.select(features, implementation)
    call = registry.Call(
        query=query, key=key, value=value, bias=bias, mask=mask, q_lengths=q_lens,
        kv_lengths=kv_lens, q_segment_ids=q_seg, kv_segment_ids=kv_seg, offset=offset, info=info,
        scale=scale, logits_soft_cap=logits_soft_cap, dropout_rate=float(dropout_rate), seed=seed,
        precision=precision, chunks=chunks, features=features, chunk_size=chunk_size,
    )
    if not impl.forward_mode:
        _reject_forward_mode(impl.name, query, key, value, bias, logits_soft_cap)
    # Every check has passed: what is left is array computation. Called eagerly, it runs as one
    # compiled program (see _eager_settings); under a user's jit or vmap it is traced inline.
    post = (bool(unbatched), bool(return_residual))
    settings = _eager_settings(call, sinks)
    if settings is None:
        return _compute(impl, call, sinks, post)
    dynamic = {name: getattr(call, name) for name in _DYNAMIC_FIELDS}
    return _compute_jit(dynamic, sinks, impl=impl, settings=settings, post=post)


# The fields of registry.Call that are arrays (or pytrees of arrays: ``info``, a MaskInfo whose
# static fields are the mask settings); every other field is a static setting.
_DYNAMIC_FIELDS = ("query", "key", "value", "bias", "mask", "q_lengths", "kv_lengths",
                   "q_segment_ids", "kv_segment_ids", "offset", "info", "seed")


def _compute(impl, call: registry.Call, sinks, post: tuple[bool, bool]):
    """The array computation of a checked call: the implementation, sinks, unbatching."""
    unbatched, return_residual = post
    out, lse = impl(call)
    if sinks is not None:
        out, lse = flex.apply_sinks(out, lse, sinks)
    B, T, N = call.query.shape[:3]
    chex.assert_shape(out, (B, T, N, call.value.shape[3]))
    chex.assert_shape(lse, (B, T, N))
    if unbatched:
        out, lse = out[0], lse[0]
    if return_residual:
        return out, lse.astype(out.dtype)
    return out


def _empty(B, T, N, Hv, dtype, sinks, post: tuple[bool, bool]):
    """The result of a call with ``B``, ``T`` or ``S`` zero: zeros, and a log-sum-exp of ``-inf``
    (or the sink logits) for rows that see no key."""
    unbatched, return_residual = post
    out = jnp.zeros((B, T, N, Hv), dtype)
    if sinks is None:
        lse = jnp.full((B, T, N), -jnp.inf, dtype)
    else:
        lse = jnp.broadcast_to(sinks.astype(dtype), (B, T, N))
    if unbatched:
        out, lse = out[0], lse[0]
    return (out, lse) if return_residual else out


@functools.partial(jax.jit, static_argnames=("impl", "settings", "post"))
def _compute_jit(dynamic, sinks, *, impl, settings, post):
    return _compute(impl, registry.Call(**dynamic, **dict(settings)), sinks, post)


def _eager_settings(call: registry.Call, sinks) -> tuple | None:
    """The static settings of ``call`` (a hashable tuple) when it may run under an internal
    ``jax.jit``, else ``None``.

    An eager call would otherwise dispatch (and compile) each of its many operations one by one;
    as one jitted program it compiles once per shape and setting. It is used only when that
    changes nothing but speed:

    * no input is traced by a staging transformation (the caller's ``jit``, ``eval_shape``, a
      ``vmap``): there the computation is traced into the caller's program as before. Inputs
      traced by reverse-mode autodiff over concrete values (eager ``jax.grad``/``jax.vjp``) are
      fine: JAX differentiates a jitted function like any other;
    * no ``mask_mod``/``score_mod``/``block_mask`` and no array ``logits_soft_cap`` (it is
      differentiated or traced): the callables would be part of the cache key, hashed by
      identity, so a closure created afresh for every call would recompile every call;
    * every static setting is hashable (``precision``, the caller's ``chunk_size``);
    * ``jax_debug_nans``/``jax_debug_infs`` are off: eagerly, they check every operation's
      result (a jitted program only has its outputs checked).
    """
    if call.features.flex or call.features.soft_cap_traced:
        return None
    if jax.config.jax_debug_nans or jax.config.jax_debug_infs:
        return None
    leaves = jax.tree_util.tree_leaves(([getattr(call, name) for name in _DYNAMIC_FIELDS], sinks))
    try:
        from jax._src import core as jax_core  # noqa: PLC0415

        if jax_core.unsafe_am_i_under_a_jit() or not all(map(jax_core.is_concrete, leaves)):
            return None
    except (ImportError, AttributeError):  # pragma: no cover - depends on the jax version
        return None
    settings = tuple((f.name, getattr(call, f.name)) for f in dataclasses.fields(call)
                     if f.name not in _DYNAMIC_FIELDS)
    try:
        hash(settings)
    except TypeError:
        return None
    return settings


_explain_state = threading.local()


class _Captured(Exception):
    pass


def explain_dispatch(query, key, value, bias=None, mask=None, **kwargs) -> registry.DispatchReport:
    """Which implementation :func:`dot_product_attention` would use for this call, and why.

    Takes exactly the arguments of :func:`dot_product_attention` (arrays or
    ``jax.ShapeDtypeStruct``-like arrays; nothing is computed: the call is traced abstractly) and
    returns a :class:`~attnjax._src.registry.DispatchReport`; ``print`` it for a table with, for
    every registered implementation, whether it can serve the call and, if not, why.
    ``report.chosen`` is the name ``implementation=None`` picks (or, for a named
    ``implementation``, that name, or a note that the call would raise).

    Example:
      >>> import jax.numpy as jnp, attnjax
      >>> q = k = v = jnp.zeros((2, 1024, 8, 64), jnp.bfloat16)
      >>> report = attnjax.explain_dispatch(q, k, v, is_causal=True)
      >>> report.chosen   # on CPU: B·N·T·S = 2**24 > 2**22
      'xla_chunked'
      >>> print(report)   # the table: every implementation, eligible or why not
    """
    implementation = kwargs.get("implementation")
    registry.check_name(implementation)
    captured: list = []
    _explain_state.capture = captured

    def trace(query, key, value, bias, mask):
        try:
            dot_product_attention(query, key, value, bias, mask, **kwargs)
        except _Captured:
            pass

    try:
        jax.eval_shape(trace, query, key, value, bias, mask)
    finally:
        _explain_state.capture = None
    return registry.explain(captured[0], implementation)
