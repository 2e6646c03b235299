"""``flax_attention_fn``: attnjax as the ``attention_fn`` of the stock Flax attention modules."""

from __future__ import annotations

import math

import jax.numpy as jnp

from attnjax._src.attention import dot_product_attention


def first_not_none(*values):
    """The first argument that is not ``None`` (call-time settings override the module's)."""
    for v in values:
        if v is not None:
            return v
    return None


def default_kv_inputs(inputs_q, inputs_k, inputs_v):
    """Self-attention defaults of the stock Flax modules: k = q and v = k when not given."""
    if inputs_k is None:
        if inputs_v is not None:
            raise ValueError("inputs_k cannot be None if inputs_v is not None")
        inputs_k = inputs_q
    if inputs_v is None:
        inputs_v = inputs_k
    return inputs_k, inputs_v


def promote_qkv(query, key, value, dtype):
    """Cast q/k/v to ``dtype``, or to their common dtype when ``dtype`` is None (as Flax)."""
    query, key, value = (jnp.asarray(x) for x in (query, key, value))
    if dtype is None:
        dtype = jnp.result_type(query, key, value)
    return query.astype(dtype), key.astype(dtype), value.astype(dtype)


def as_bool_mask(mask):
    """Flax masks may be float/int 0/1 (``make_attention_mask``); attnjax wants bool."""
    if mask is None:
        return None
    mask = jnp.asarray(mask)
    return mask if mask.dtype == jnp.bool_ else mask != 0


def flax_attention_fn(
    query,
    key,
    value,
    bias=None,
    mask=None,
    broadcast_dropout: bool = True,
    dropout_rng=None,
    dropout_rate: float = 0.0,
    deterministic: bool = False,
    dtype=None,
    precision=None,
    module=None,
    promote_dtype=None,
    is_causal: bool = False,
    force_fp32_for_softmax: bool = False,
    einsum_dot_general=None,
    qk_attn_weights_einsum=None,
    attn_weights_value_einsum=None,
    **attnjax_kwargs,
):
    """attnjax attention with the signature of ``flax.linen/nnx.dot_product_attention``.

    Pass it as ``attention_fn=attnjax.flax_attention_fn`` to the stock
    ``flax.nnx.MultiHeadAttention`` or ``flax.linen.MultiHeadDotProductAttention`` to make them
    memory-efficient without touching their parameters; or use ``functools.partial`` to add
    attnjax options, e.g. ``partial(attnjax.flax_attention_fn, implementation="xla_chunked",
    chunk_size=1024)``.

    Differences from the stock function (documented, never silent on the result):

    * ``broadcast_dropout`` cannot be honoured: attnjax's dropout mask is a hash of
      ``(key, b, n, i, j)`` and is never stored, so every (batch, head) row gets its own
      independent mask (like ``broadcast_dropout=False``). The expected value is the same.
    * ``module`` (the stock modules pass it when ``sow_weights=True``) raises ``ValueError``:
      attnjax never materialises the attention weights, so it cannot sow them.
    * ``einsum_dot_general`` / ``qk_attn_weights_einsum`` / ``attn_weights_value_einsum``
      (custom, e.g. quantised, einsums) raise ``ValueError`` when not ``None``.
    * ``force_fp32_for_softmax`` is accepted and always effectively on: attnjax computes the
      softmax in float32.
    * A query row whose every key is masked gets an output of zero (the stock function gives
      the mean of the values).

    Args:
      query: ``(batch..., T, N, H)``; key: ``(batch..., S, K, H)``; value:
        ``(batch..., S, K, Hv)``. Any number of batch dims; ``N % K == 0`` (GQA).
      bias: optional, broadcastable to ``(batch..., N, T, S)``.
      mask: optional, broadcastable to ``(batch..., N, T, S)``; nonzero/True = attend.
      broadcast_dropout: accepted, see above.
      dropout_rng: PRNG key, needed when dropout is active.
      dropout_rate: attention dropout probability.
      deterministic: ``True`` turns dropout off.
      dtype: computation dtype (default: the common dtype of q, k, v).
      precision: matmul precision.
      module: must be ``None`` (see above).
      promote_dtype: optional ``fn((q, k, v), dtype=...) -> (q, k, v)`` as in Flax nnx.
      is_causal: causal mask (top-left aligned, as Flax).
      force_fp32_for_softmax: accepted (always float32 softmax).
      einsum_dot_general, qk_attn_weights_einsum, attn_weights_value_einsum: must be ``None``.
      **attnjax_kwargs: any other keyword of :func:`attnjax.dot_product_attention`
        (``implementation``, ``chunk_size``, ``local_window_size``, ``logits_soft_cap``,
        ``query_offset``, segment ids, sequence lengths, ``scale``).

    Returns:
      ``(batch..., T, N, Hv)`` attention output in the computation dtype.

    Raises:
      ValueError: ``module`` or a custom einsum given; any ValueError of
        :func:`attnjax.dot_product_attention` (shapes, masks, GQA head counts).

    Example:
      >>> from flax import nnx
      >>> import attnjax
      >>> layer = nnx.MultiHeadAttention(num_heads=4, in_features=32, decode=False,
      ...                                attention_fn=attnjax.flax_attention_fn,
      ...                                rngs=nnx.Rngs(0))
    """
    del broadcast_dropout, force_fp32_for_softmax  # see the docstring
    if module is not None:
        raise ValueError(
            "flax_attention_fn got module=... (sow_weights=True): attnjax never materialises the "
            "attention weights, so they cannot be sown; call with sow_weights=False"
        )
    for name, fn in (("einsum_dot_general", einsum_dot_general),
                     ("qk_attn_weights_einsum", qk_attn_weights_einsum),
                     ("attn_weights_value_einsum", attn_weights_value_einsum)):
        if fn is not None:
            raise ValueError(f"flax_attention_fn does not support a custom {name}, got {fn!r}")
    if promote_dtype is not None:
        query, key, value = promote_dtype((query, key, value), dtype=dtype)
    else:
        query, key, value = promote_qkv(query, key, value, dtype)
    query, key, value = (jnp.asarray(x) for x in (query, key, value))
    if not (query.ndim == key.ndim == value.ndim) or query.ndim < 3:
        raise ValueError(
            "query, key and value must have the same rank >= 3, got shapes "
            f"{query.shape}, {key.shape}, {value.shape}"
        )
    batch_shape = query.shape[:-3]
    if key.shape[:-3] != batch_shape or value.shape[:-3] != batch_shape:
        raise ValueError(
            f"query, key and value batch dims must match, got shapes {query.shape}, "
            f"{key.shape}, {value.shape}"
        )
    if not deterministic and dropout_rate > 0.0:
        rate = float(dropout_rate)
    else:
        rate, dropout_rng = 0.0, None
    mask = as_bool_mask(mask)
    if len(batch_shape) > 1:
        # Flatten extra batch dims; masks/bias are broadcast to the batch first.
        nb = len(batch_shape)

        def flat(x, tail):
            if x is None:
                return None
            x = jnp.asarray(x)
            x = x.reshape((1,) * (nb + tail - x.ndim) + x.shape)
            x = jnp.broadcast_to(x, batch_shape + x.shape[nb:])
            return x.reshape((math.prod(batch_shape),) + x.shape[nb:])

        query, key, value = flat(query, 3), flat(key, 3), flat(value, 3)
        bias, mask = flat(bias, 3), flat(mask, 3)
    out = dot_product_attention(
        query, key, value, bias=bias, mask=mask, is_causal=bool(is_causal),
        dropout_rate=rate, dropout_rng=dropout_rng, precision=precision, **attnjax_kwargs,
    )
    if len(batch_shape) > 1:
        out = out.reshape(batch_shape + out.shape[1:])
    return out
