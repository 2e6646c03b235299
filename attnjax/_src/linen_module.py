"""``attnjax.linen.MultiHeadDotProductAttention``: the stock Linen module, running on attnjax."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import linen as nn

from attnjax._src.decode import KVCache, cached_attention
from attnjax._src.flax_fn import default_kv_inputs, flax_attention_fn
from attnjax._src.flax_fn import first_not_none as _first


class MultiHeadDotProductAttention(nn.MultiHeadDotProductAttention):
    """Multi-head attention for Flax Linen, memory-efficient, with a rich KV cache.

    A subclass of ``flax.linen.MultiHeadDotProductAttention`` with the same attributes and the
    **same parameter tree** (``query``/``key``/``value``/``out`` ``DenseGeneral`` kernels and
    biases, ``query_ln``/``key_ln`` with ``normalize_qk``; same shapes and initialisers), so a
    stock ``params`` dict applies to it unchanged. Attention runs on
    :func:`attnjax.dot_product_attention`.

    Extra attributes:
      num_kv_heads: key/value heads for grouped-query attention (default ``num_heads``; the
        ``key``/``value`` kernels then have shape ``(features, num_kv_heads, head_dim)``).
      implementation, chunk_size: defaults of the core implementation and chunk sizes.
      decode_window: with ``decode=True``: ``None`` for a plain cache whose length is the
        length of the input given to ``init``; an int ``W`` for a sliding-window ring buffer of
        ``W`` slots (each token attends to the last ``W`` tokens, itself included, for ever).

    Decoding (``decode=True``): ``init`` with an input of shape ``(B, max_length, features)``
    allocates the ``'cache'`` collection (``cached_key``, ``cached_value``, and ``cache_index``
    of shape ``(B,)``: one position per row); each later ``apply(..., mutable=['cache'])`` feeds
    any number of tokens (prompt prefill, single- or multi-token steps; ragged rows with
    ``query_seq_lengths``) and attends causally over each row's history.

    Differences from the stock module as for :class:`attnjax.nnx.MultiHeadAttention`:
    ``broadcast_dropout`` is not honoured (per-element dropout), ``sow_weights`` raises, fully
    masked rows output zero, decode mode takes no ``mask`` and is always causal. Attention
    always runs on attnjax: the inherited ``attention_fn`` attribute must stay at its default
    (or ``attnjax.flax_attention_fn``) and ``qk_attn_weights_einsum_cls`` /
    ``attn_weights_value_einsum_cls`` at ``None``, else ``ValueError`` (to keep a stock module
    with attnjax attention, use ``attention_fn=attnjax.flax_attention_fn`` on it).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import attnjax.linen
      >>> layer = attnjax.linen.MultiHeadDotProductAttention(num_heads=4, qkv_features=64)
      >>> x = jnp.ones((2, 1024, 32))
      >>> params = layer.init(jax.random.key(0), x)
      >>> layer.apply(params, x, is_causal=True).shape
      (2, 1024, 32)
    """

    num_kv_heads: int | None = None
    implementation: str | None = None
    chunk_size: Any = None
    decode_window: int | None = None

    @nn.compact
    def __call__(self, inputs_q, inputs_k=None, inputs_v=None, *, inputs_kv=None, mask=None,
                 deterministic: bool | None = None, dropout_rng=None, sow_weights: bool = False,
                 is_causal: bool = False, bias=None, query_segment_ids=None,
                 key_value_segment_ids=None, query_seq_lengths=None, key_value_seq_lengths=None,
                 local_window_size=None, logits_soft_cap: float | None = None,
                 query_offset=None, implementation: str | None = None, chunk_size=None,
                 mask_mod=None, score_mod=None, block_mask=None, sinks=None):
        """Project, attend and project back; arguments as the stock module, plus attnjax's.

        Args:
          inputs_q: ``(batch..., T, features)``.
          inputs_k: default ``inputs_q``; inputs_v: default ``inputs_k``; inputs_kv: deprecated
            alias for both (as the stock module).
          mask: broadcastable to ``(batch..., N, T, S)``; True/nonzero = attend.
          deterministic: ``True`` turns dropout off (merged with the attribute, as stock).
          dropout_rng: optional key; default ``self.make_rng('dropout')``.
          sow_weights: must be False.
          is_causal: causal mask (decode mode is always causal).
          bias, query_segment_ids, key_value_segment_ids, query_seq_lengths,
            key_value_seq_lengths, local_window_size, logits_soft_cap, query_offset,
            implementation, chunk_size: see :func:`attnjax.dot_product_attention`. In decode
            mode only ``query_seq_lengths`` (tokens each row adds), ``local_window_size``,
            ``logits_soft_cap``, ``implementation`` and ``chunk_size`` apply.
          mask_mod, score_mod, block_mask, sinks: flexible attention, see
            :func:`attnjax.dot_product_attention` (decode mode takes ``mask_mod``,
            ``score_mod`` and ``sinks`` with global positions, not ``block_mask``).

        Returns:
          ``(batch..., T, out_features or features)``.

        Raises:
          ValueError: ``qkv_features % num_heads``, ``num_heads % num_kv_heads``, mismatched
            key/value feature sizes, decode batch different from the cache's, overflow of a
            plain cache, dropout or ``mask`` in decode mode, a custom ``attention_fn`` or
            custom einsum classes.
        """
        if self.attention_fn not in (nn.dot_product_attention, flax_attention_fn):
            raise ValueError(
                f"attention_fn={self.attention_fn!r}: attnjax.linen.MultiHeadDotProductAttention "
                "always attends with attnjax (set its implementation/chunk_size attributes); for "
                "a custom attention_fn use the stock flax.linen.MultiHeadDotProductAttention")
        einsums = [n for n in ("qk_attn_weights_einsum_cls", "attn_weights_value_einsum_cls")
                   if getattr(self, n) is not None]
        if einsums:
            raise ValueError(
                f"{einsums} (custom, e.g. quantised, einsums) are not supported: attnjax never "
                "forms the attention weights; use the stock flax.linen.MultiHeadDotProductAttention")
        if inputs_kv is not None:
            if inputs_k is not None or inputs_v is not None:
                raise ValueError("give either inputs_kv or inputs_k/inputs_v, not both")
            inputs_k = inputs_v = inputs_kv
        inputs_k, inputs_v = default_kv_inputs(inputs_q, inputs_k, inputs_v)
        if inputs_k.shape[-1] != inputs_v.shape[-1]:
            raise ValueError(
                f"inputs_k and inputs_v must have the same number of features, got shapes "
                f"{inputs_k.shape} and {inputs_v.shape}"
            )
        features = self.out_features or inputs_q.shape[-1]
        qkv_features = self.qkv_features or inputs_q.shape[-1]
        if qkv_features % self.num_heads != 0:
            raise ValueError(
                f"qkv_features ({qkv_features}) must be divisible by num_heads ({self.num_heads})"
            )
        num_kv_heads = self.num_kv_heads or self.num_heads
        if self.num_heads % num_kv_heads != 0:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be divisible by num_kv_heads ({num_kv_heads})"
            )
        head_dim = qkv_features // self.num_heads

        def dense(name, heads):
            return nn.DenseGeneral(
                axis=-1, dtype=self.dtype, param_dtype=self.param_dtype,
                features=(heads, head_dim), kernel_init=self.kernel_init,
                bias_init=self.bias_init, use_bias=self.use_bias, precision=self.precision,
                dot_general=self.qkv_dot_general, dot_general_cls=self.qkv_dot_general_cls,
                name=name,
            )

        query = dense("query", self.num_heads)(inputs_q)
        key = dense("key", num_kv_heads)(inputs_k)
        value = dense("value", num_kv_heads)(inputs_v)
        if self.normalize_qk:
            query = nn.LayerNorm(name="query_ln", use_bias=False, dtype=self.dtype,
                                 param_dtype=self.param_dtype)(query)
            key = nn.LayerNorm(name="key_ln", use_bias=False, dtype=self.dtype,
                               param_dtype=self.param_dtype)(key)

        if self.dropout_rate > 0.0:
            m_deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
            if not m_deterministic and dropout_rng is None:
                dropout_rng = self.make_rng("dropout")
        else:
            m_deterministic = True

        impl = _first(implementation, self.implementation)
        chunks = _first(chunk_size, self.chunk_size)
        x = None
        if self.decode:
            is_initialized = self.has_variable("cache", "cached_key")
            if query.ndim != 4:
                raise ValueError(
                    f"decode mode needs inputs of shape (batch, T, features), got {inputs_q.shape}"
                )
            B, L = key.shape[0], key.shape[1]
            empty = KVCache.create(B, L, num_kv_heads, head_dim, key.dtype,
                                   window=self.decode_window)
            cached_key = self.variable("cache", "cached_key", lambda: empty.key)
            cached_value = self.variable("cache", "cached_value", lambda: empty.value)
            cache_index = self.variable("cache", "cache_index", lambda: empty.lengths)
            if is_initialized:
                if inputs_k is not inputs_q:
                    raise ValueError("decode mode is self-attention only: inputs_k must be None")
                if mask is not None:
                    raise ValueError(
                        "decode mode does not take `mask`: the cache applies the causal mask; "
                        "use query_seq_lengths / local_window_size"
                    )
                if not m_deterministic:
                    raise ValueError("decode mode has no dropout: call with deterministic=True")
                unsupported = [n for n, v in (("bias", bias),
                                              ("query_segment_ids", query_segment_ids),
                                              ("key_value_segment_ids", key_value_segment_ids),
                                              ("key_value_seq_lengths", key_value_seq_lengths),
                                              ("query_offset", query_offset),
                                              ("block_mask", block_mask)) if v is not None]
                if unsupported:
                    raise ValueError(f"decode mode does not support {unsupported}")
                ck = cached_key.value
                if ck.shape[0] != B:
                    raise ValueError(
                        f"batch mismatch: the cache was initialised for batch {ck.shape[0]}, "
                        f"got inputs of shape {inputs_q.shape}"
                    )
                idx = jnp.broadcast_to(jnp.asarray(cache_index.value, jnp.int32), (B,))
                cache = KVCache(ck, cached_value.value, idx, self.decode_window)
                dtype = self.dtype or jnp.result_type(query, key, value)
                x, cache = cached_attention(
                    query.astype(dtype), key.astype(dtype), value.astype(dtype), cache,
                    query_seq_lengths=query_seq_lengths, local_window_size=local_window_size,
                    logits_soft_cap=logits_soft_cap, implementation=impl, chunk_size=chunks,
                    precision=self.precision, mask_mod=mask_mod, score_mod=score_mod, sinks=sinks,
                )
                cached_key.value = cache.key
                cached_value.value = cache.value
                cache_index.value = cache.lengths
        if x is None:
            x = flax_attention_fn(
                query, key, value, mask=mask, dropout_rng=dropout_rng,
                dropout_rate=self.dropout_rate, deterministic=m_deterministic, dtype=self.dtype,
                precision=self.precision, module=self if sow_weights else None,
                is_causal=is_causal, bias=bias, query_segment_ids=query_segment_ids,
                key_value_segment_ids=key_value_segment_ids,
                query_seq_lengths=query_seq_lengths, key_value_seq_lengths=key_value_seq_lengths,
                local_window_size=local_window_size, logits_soft_cap=logits_soft_cap,
                query_offset=query_offset, implementation=impl, chunk_size=chunks,
                mask_mod=mask_mod, score_mod=score_mod, block_mask=block_mask, sinks=sinks,
            )
        return nn.DenseGeneral(
            features=features, axis=(-2, -1),
            kernel_init=self.out_kernel_init or self.kernel_init,
            bias_init=self.out_bias_init or self.bias_init, use_bias=self.use_bias,
            dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision,
            dot_general=self.out_dot_general, dot_general_cls=self.out_dot_general_cls,
            name="out",
        )(x)
