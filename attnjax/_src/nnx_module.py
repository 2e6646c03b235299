"""``attnjax.nnx.MultiHeadAttention``: the stock Flax NNX module, running on attnjax."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import attention as _stock

from attnjax._src.decode import KVCache, _write, cached_attention, plan_step
from attnjax._src.flax_fn import default_kv_inputs, flax_attention_fn
from attnjax._src.flax_fn import first_not_none as _first


class MultiHeadAttention(_stock.MultiHeadAttention):
    """Multi-head attention for Flax NNX, memory-efficient, with a rich KV cache.

    A subclass of ``flax.nnx.MultiHeadAttention`` with the **same constructor arguments, the same
    submodules and parameters** (``query``, ``key``, ``value``, ``out`` ``LinearGeneral`` kernels
    and biases, ``query_ln``/``key_ln`` with ``normalize_qk``; same shapes and initialisers), so
    ``nnx.update(ours, nnx.state(stock))`` loads a stock checkpoint unchanged. Attention runs on
    :func:`attnjax.dot_product_attention` (chunked, memory linear in sequence length).

    Additions:

    * constructor ``implementation`` and ``chunk_size`` (defaults for every call);
    * ``__call__`` pass-through of the core's masks: ``bias``, ``query_segment_ids``,
      ``key_value_segment_ids``, ``query_seq_lengths``, ``key_value_seq_lengths``,
      ``local_window_size``, ``logits_soft_cap``, ``query_offset``, and per-call
      ``implementation`` / ``chunk_size``;
    * decoding (``decode=True`` after :meth:`init_cache`): the cache keeps a per-row position
      (``cache_index`` has shape ``(B,)``), a call may feed any number of tokens (prefill with the
      whole prompt, then single- or multi-token steps), ragged rows via ``query_seq_lengths``, and
      ``init_cache(..., window=W)`` gives a sliding-window ring buffer of ``W`` slots (attention
      to the last ``W`` tokens) that streams for ever. Single-token steps match the stock
      module's decode outputs.

    Differences from the stock module: dropout uses attnjax's per-(b, n, i, j) mask
    (``broadcast_dropout`` is not honoured); ``sow_weights=True`` raises (weights are never
    materialised); fully masked query rows output zero (the stock module averages the values);
    in decode mode ``mask`` is not accepted (use ``query_seq_lengths`` / ``local_window_size``)
    and attention is always causal.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> import attnjax.nnx
      >>> layer = attnjax.nnx.MultiHeadAttention(num_heads=8, in_features=64, num_kv_heads=2,
      ...                                        decode=False, rngs=nnx.Rngs(0))
      >>> x = jnp.ones((2, 4096, 64))
      >>> layer(x, is_causal=True, local_window_size=(256, 0)).shape
      (2, 4096, 64)
    """

    def __init__(self, num_heads: int, in_features: int, qkv_features: int | None = None,
                 out_features: int | None = None, num_kv_heads: int | None = None,
                 in_kv_features: int | None = None, *, attention_fn=None,
                 implementation: str | None = None, chunk_size=None, rngs: nnx.Rngs, **kwargs):
        """Same arguments as ``flax.nnx.MultiHeadAttention``, plus:

        Args:
          attention_fn: ``None`` (default) runs attnjax with all its options; a custom function
            is called exactly as the stock module calls it (attnjax-only call options are then
            rejected), in decode mode too: over the whole cache with a boolean mask of the
            positions each query sees, after this call's keys and values are written (any
            number of tokens per call on a plain cache, one on a ring buffer).
          implementation: default core implementation (``"xla"``, ``"xla_chunked"`` or ``None``
            for auto).
          chunk_size: default :class:`attnjax.ChunkSize` / int / ``(query, key)`` pair.

        Raises:
          ValueError: ``num_heads % num_kv_heads != 0`` or ``qkv_features % num_heads != 0``.
        """
        if num_kv_heads is not None and (num_kv_heads < 1 or num_heads % num_kv_heads != 0):
            raise ValueError(
                f"num_heads ({num_heads}) must be divisible by num_kv_heads ({num_kv_heads})"
            )
        super().__init__(num_heads, in_features, qkv_features, out_features, num_kv_heads,
                         in_kv_features, attention_fn=attention_fn or flax_attention_fn,
                         rngs=rngs, **kwargs)
        self.custom_attention_fn = attention_fn is not None
        self.implementation = implementation
        self.chunk_size = chunk_size
        self.cache_window = None

    def init_cache(self, input_shape, dtype=jnp.float32, *, window: int | None = None):
        """Allocate the decode cache: ``cached_key``/``cached_value`` and ``cache_index``.

        Args:
          input_shape: ``(B, max_length, features)`` as in the stock module.
          dtype: storage dtype of the cached keys and values.
          window: ``None`` for a plain cache of ``max_length`` slots (a step that would overflow
            it raises, or gives NaN under jit); an int ``W`` for a ring buffer of ``W`` slots
            where each token attends to the last ``W`` tokens, itself included (``max_length`` is
            then ignored).

        Raises:
          ValueError: ``input_shape`` not of rank 3, or a bad ``window``.
        """
        if len(input_shape) != 3:
            raise ValueError(
                f"input_shape must be (batch, max_length, features), got {tuple(input_shape)}"
            )
        c = KVCache.create(int(input_shape[0]), int(input_shape[1]), self.num_kv_heads,
                           self.head_dim, dtype, window=window)
        self.cached_key = nnx.Cache(c.key)
        self.cached_value = nnx.Cache(c.value)
        self.cache_index = nnx.Cache(c.lengths)
        self.cache_window = c.window

    def __call__(self, inputs_q, inputs_k=None, inputs_v=None, *, mask=None,
                 deterministic: bool | None = None, rngs=None, sow_weights: bool = False,
                 decode: bool | None = None, is_causal: bool = False, out_sharding=None,
                 qkv_sharding=None, bias=None, query_segment_ids=None,
                 key_value_segment_ids=None, query_seq_lengths=None, key_value_seq_lengths=None,
                 local_window_size=None, logits_soft_cap: float | None = None,
                 query_offset=None, implementation: str | None = None, chunk_size=None,
                 mask_mod=None, score_mod=None, block_mask=None, sinks=None):
        """Project, attend and project back; arguments as the stock module, plus attnjax's.

        Args:
          inputs_q: ``(batch..., T, in_features)``.
          inputs_k: ``(batch..., S, in_kv_features)``, default ``inputs_q``.
          inputs_v: default ``inputs_k``.
          mask: boolean (or 0/1) mask broadcastable to ``(batch..., N, T, S)``; True = attend.
          deterministic: ``True`` turns dropout off (overrides the constructor).
          rngs: dropout rngs (default: those stored at construction).
          sow_weights: must be False (weights are never materialised).
          decode: use the cache (overrides the constructor); see :meth:`init_cache`. Each call
            appends this call's tokens (``T >= 1``) at each row's own position and attends
            causally over the row's history. ``inputs_k``/``inputs_v`` must be None.
          is_causal: causal mask (ignored in decode mode, which is always causal).
          out_sharding, qkv_sharding: as the stock module.
          bias, query_segment_ids, key_value_segment_ids, key_value_seq_lengths,
            local_window_size, logits_soft_cap, query_offset: see
            :func:`attnjax.dot_product_attention` (decode mode accepts ``local_window_size``
            and ``logits_soft_cap`` only).
          query_seq_lengths: valid query tokens per row. In decode mode: how many of this
            call's tokens each row really adds (ragged prompts, rows at different positions).
          implementation, chunk_size: override the constructor's.
          mask_mod, score_mod, block_mask, sinks: flexible attention, see
            :func:`attnjax.dot_product_attention` (``h`` is the query head; decode mode takes
            ``mask_mod``, ``score_mod`` and ``sinks`` with global positions, not
            ``block_mask``). ``sinks`` may be an ``nnx.Param`` of shape ``(num_heads,)``.

        Returns:
          ``(batch..., T, out_features)``.

        Raises:
          ValueError: wrong feature sizes, decoding without :meth:`init_cache`, a batch size
            different from the cache's, a step overflowing a plain cache, dropout or ``mask``
            in decode mode, attnjax options with a custom ``attention_fn``.
        """
        if rngs is None:
            rngs = self.rngs
        elif isinstance(rngs, nnx.Rngs):
            rngs = rngs.dropout
        inputs_k, inputs_v = default_kv_inputs(inputs_q, inputs_k, inputs_v)
        if inputs_q.shape[-1] != self.in_features:
            raise ValueError(
                f"inputs_q has {inputs_q.shape[-1]} features (shape {inputs_q.shape}), "
                f"but the module expects in_features={self.in_features}"
            )
        for name, x in (("inputs_k", inputs_k), ("inputs_v", inputs_v)):
            if x.shape[-1] != self.in_kv_features:
                raise ValueError(
                    f"{name} has {x.shape[-1]} features (shape {x.shape}), but the module "
                    f"expects in_kv_features={self.in_kv_features}"
                )
        decode = _first(decode, self.decode)
        extra = dict(bias=bias, query_segment_ids=query_segment_ids,
                     key_value_segment_ids=key_value_segment_ids,
                     query_seq_lengths=query_seq_lengths,
                     key_value_seq_lengths=key_value_seq_lengths,
                     local_window_size=local_window_size, logits_soft_cap=logits_soft_cap,
                     query_offset=query_offset, implementation=implementation,
                     chunk_size=chunk_size, mask_mod=mask_mod, score_mod=score_mod,
                     block_mask=block_mask,
                     sinks=None if sinks is None else jnp.asarray(sinks[...]))
        if decode and self.cached_key is None:
            raise ValueError(
                "decode=True but the autoregressive cache is not initialised: call "
                "init_cache((batch, max_length, features)) first"
            )

        query = self.query(inputs_q, out_sharding=qkv_sharding)
        key = self.key(inputs_k, out_sharding=qkv_sharding)
        value = self.value(inputs_v, out_sharding=qkv_sharding)
        if self.normalize_qk:
            query = self.query_ln(query)
            key = self.key_ln(key)

        # Dropout settings, as the stock module.
        dropout_rng = None
        deterministic_ = True
        if self.dropout_rate > 0.0:
            deterministic_ = _first(deterministic, self.deterministic)
            if deterministic_ is None:
                raise ValueError(
                    "dropout_rate > 0 needs `deterministic` as a __call__ argument or "
                    "constructor attribute"
                )
            if not deterministic_:
                if rngs is None:
                    raise ValueError("dropout needs rngs: pass rngs= to __call__ (keep_rngs=False)")
                dropout_rng = rngs()

        if decode:
            x = self._decode(query, key, value, inputs_q, inputs_k, mask, deterministic_, extra,
                             sow_weights)
        elif self.custom_attention_fn:
            given = [k for k, v in extra.items() if v is not None]
            if given:
                raise ValueError(
                    f"attnjax options {given} need attention_fn=None (got a custom one)")
            x = self.attention_fn(
                query, key, value, mask=mask, dropout_rng=dropout_rng,
                dropout_rate=self.dropout_rate, broadcast_dropout=self.broadcast_dropout,
                deterministic=deterministic_, dtype=self.dtype, precision=self.precision,
                module=self if sow_weights else None, is_causal=is_causal,
            )
        else:
            extra["implementation"] = _first(implementation, self.implementation)
            extra["chunk_size"] = _first(chunk_size, self.chunk_size)
            x = flax_attention_fn(
                query, key, value, mask=mask, dropout_rng=dropout_rng,
                dropout_rate=self.dropout_rate, deterministic=deterministic_, dtype=self.dtype,
                precision=self.precision, module=self if sow_weights else None,
                is_causal=is_causal, **extra,
            )
        return self.out(x, out_sharding=out_sharding)

    def _decode(self, query, key, value, inputs_q, inputs_k, mask, deterministic, extra,
                sow_weights=False):
        if inputs_k is not inputs_q:
            raise ValueError("decode mode is self-attention only: pass inputs_k=inputs_v=None")
        if mask is not None:
            raise ValueError(
                "decode mode does not take `mask`: the cache applies the causal mask itself; use "
                "query_seq_lengths for ragged rows and local_window_size for sliding windows"
            )
        if not deterministic:
            raise ValueError("decode mode has no dropout: call with deterministic=True")
        unsupported = [k for k in ("bias", "query_segment_ids", "key_value_segment_ids",
                                   "key_value_seq_lengths", "query_offset", "block_mask")
                       if extra[k] is not None]
        if unsupported:
            raise ValueError(f"decode mode does not support {unsupported}")
        if query.ndim != 4:
            raise ValueError(
                f"decode mode needs inputs of shape (batch, T, features), got {inputs_q.shape}"
            )
        ck = self.cached_key[...]
        if ck.shape[0] != query.shape[0]:
            raise ValueError(
                f"batch mismatch: the cache was initialised for batch {ck.shape[0]}, "
                f"got inputs of shape {inputs_q.shape}"
            )
        idx = jnp.broadcast_to(jnp.asarray(self.cache_index[...], jnp.int32), (ck.shape[0],))
        cache = KVCache(ck, self.cached_value[...], idx, self.cache_window)
        dtype = self.dtype or jnp.result_type(query, key, value)
        if self.custom_attention_fn:
            given = [k for k in ("local_window_size", "logits_soft_cap", "implementation",
                                 "chunk_size", "mask_mod", "score_mod", "sinks")
                     if extra[k] is not None]
            if given:
                raise ValueError(
                    f"attnjax options {given} need attention_fn=None (got a custom one)")
            out, cache = _decode_with(self.attention_fn, query, key, value, cache,
                                      extra["query_seq_lengths"], dtype=self.dtype,
                                      precision=self.precision,
                                      module=self if sow_weights else None)
            self.cached_key.set_value(cache.key)
            self.cached_value.set_value(cache.value)
            self.cache_index.set_value(cache.lengths)
            return out
        out, cache = cached_attention(
            query.astype(dtype), key.astype(dtype), value.astype(dtype), cache,
            query_seq_lengths=extra["query_seq_lengths"],
            local_window_size=extra["local_window_size"],
            logits_soft_cap=extra["logits_soft_cap"],
            implementation=_first(extra["implementation"], self.implementation),
            chunk_size=_first(extra["chunk_size"], self.chunk_size), precision=self.precision,
            mask_mod=extra["mask_mod"], score_mod=extra["score_mod"], sinks=extra["sinks"],
        )
        self.cached_key.set_value(cache.key)
        self.cached_value.set_value(cache.value)
        self.cache_index.set_value(cache.lengths)
        return out


def _decode_with(attention_fn, query, key, value, cache: KVCache, query_seq_lengths, *, dtype,
                 precision, module):
    """A decode step through a custom ``attention_fn``, as the stock module decodes: this step's
    keys and values written into the cache at each row's position (ring slots for a ring
    buffer), then ``attention_fn`` over the whole cache with a boolean mask ``(B, 1, T, L)``
    that shows each query the positions written so far up to its own (and, in a ring, the last
    ``W``). Returns ``(out, cache)``. A plain cache that overflows raises when the lengths are
    concrete; under ``jit`` the overflowing rows' outputs are NaN (as ``cached_attention``)."""
    B, T = query.shape[:2]
    L = cache.key.shape[1]
    ring = cache.window is not None
    if ring and T > 1:
        raise ValueError(
            f"decode mode with a custom attention_fn and a ring buffer (window={cache.window}) "
            f"takes one token per call, got T={T}: the step's earlier tokens would need keys its "
            "later ones overwrite (attention_fn=None serves any T)")
    if not ring and T > L:
        raise ValueError(f"a step of T={T} tokens does not fit in a cache of max_length {L}")
    P, n, overflow, idx = plan_step(cache, query_seq_lengths, B, T)  # raises on overflow
    key_cache = _write(cache.key, key, idx)
    value_cache = _write(cache.value, value, idx)
    t = jnp.arange(T, dtype=jnp.int32)[None, :]
    qpos = P[:, None] + t  # (B, T) positions of this step's tokens
    end = P + n  # positions < end are cached after this step
    j = jnp.arange(L, dtype=jnp.int32)[None, :]
    if ring:  # slot j holds the latest position p < end with p % L == j
        pos = j + L * jnp.floor_divide(end[:, None] - 1 - j, L)
    else:
        pos = jnp.broadcast_to(j, (B, L))
    valid = (pos >= 0) & (pos < end[:, None])
    vis = valid[:, None, :] & (pos[:, None, :] <= qpos[:, :, None])
    if ring:
        vis = vis & (pos[:, None, :] > qpos[:, :, None] - cache.window)
    out = attention_fn(query, key_cache, value_cache, mask=vis[:, None], dropout_rng=None,
                       dropout_rate=0.0, broadcast_dropout=False, deterministic=True,
                       dtype=dtype, precision=precision, module=module, is_causal=False)
    out = jnp.where((t < n[:, None])[:, :, None, None], out, 0)  # as cached_attention
    if overflow is not None:
        out = jnp.where(overflow[:, None, None, None], jnp.nan, out)
    return out, KVCache(key_cache, value_cache, end, cache.window)
