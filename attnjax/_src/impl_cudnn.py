"""``implementation="cudnn"``: cuDNN flash attention through ``jax.nn.dot_product_attention``.

What the installed jax (0.10.2, ``jax/_src/nn/functions.py`` and
``jax/_src/cudnn/fused_attention_stablehlo.py``) hands to cuDNN, and so what this path serves:

* dtypes float16 and bfloat16 only (``check_layout``); head dim ``H <= 128`` (``<= 256`` from
  Hopper, sm90) and a multiple of 8 (``check_is_flash_attention``); ``Hv == H`` (``jax.nn``
  checks ``value`` against ``key``'s shape); GQA (``N % K == 0``) is passed through;
* ``is_causal`` is cuDNN's causal mask (``MaskType.CAUSAL``/``PADDING_CAUSAL``), which ``jax.nn``
  documents and implements in its XLA path as ``tril`` of the ``(T, S)`` block: **top-left**
  alignment, query row ``i`` sees keys ``j <= i``. attnjax's ``query_offset = o`` means
  ``j <= i + o``, so only ``o = 0`` (a static int or none) is eligible; any other offset (in
  particular bottom-right ``S - T``, or a per-row/traced offset) is not;
* a window ``(left, right)`` becomes cuDNN's ``sliding_window_length = left + 1``, which
  ``jax.nn`` documents as the left window ``(pos - length, pos]``; it is exact for ``right == 0``,
  or with ``is_causal`` (where the right side is hidden anyway);
* ``query_seq_lengths`` / ``key_value_seq_lengths`` become cuDNN's padding mask (``jax.nn`` fills
  the missing one with the full length);
* ``bias`` (cast to the input dtype) and a boolean ``mask`` are passed through, broadcast to full
  T and S dims as cuDNN requires (``jax.nn`` folds the mask into the bias as a large negative
  number; B and N dims may stay broadcast); with a bias, training needs even T and S
  (``check_is_flash_attention``), so odd T or S with a bias is not eligible;
* not served: segment ids, soft cap, dropout, ``Hv != H``, an explicit ``precision``,
  ``return_residual`` (cuDNN's log-sum-exp has no gradient: its VJP drops that cotangent) and
  ``sinks`` (applied through the log-sum-exp).

Fully masked rows (cuDNN leaves them as the mean of the values, or 0 for padded query rows) are
found from the masks themselves: positionally in O(B·T) (causal, window, lengths), and through
the boolean mask and ``-inf`` bias entries when those are given (the user's mask/bias already
hold B·N·T·S entries); those rows get output 0, lse ``-inf`` and zero gradients.

:func:`translate` builds exactly the keyword arguments handed to ``jax.nn.dot_product_attention``;
the tests run them through ``implementation="xla"`` on CPU against the float64 reference. The
cuDNN kernel itself runs only on an NVIDIA GPU (``"cuDNN is not detected"`` elsewhere; it cannot
be lowered with ``jax.export`` on a CPU-only host).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attnjax._src.registry import Call, CallFeatures, Implementation


def _jax_nn_cudnn(query, key, value, **kwargs):
    return jax.nn.dot_product_attention(query, key, value, implementation="cudnn", **kwargs)


# What this path calls with the translated arguments; the tests swap in jax.nn's XLA path to run
# exactly those arguments on CPU (the cuDNN kernel needs an NVIDIA GPU).
JAX_NN_CALL = _jax_nn_cudnn
MAX_HEAD_DIM = 256  # Hopper and later; 128 before (checked by cuDNN/jax at trace time on GPU)


class CuDNN(Implementation):
    name = "cudnn"
    platforms = ("cuda",)
    dtypes = ("float16", "bfloat16")
    serves = ("causal (top-left: query_offset 0), left window (right 0 or causal), q/kv lengths, "
              "bias, dense mask, GQA, H <= 256 (128 before sm90) and H % 8 == 0, Hv == H; "
              "not: segment ids, soft cap, dropout, other query_offset, right window, "
              "return_residual, sinks")

    def unsupported(self, f: CallFeatures, auto: bool):
        reason = super().unsupported(f, auto)
        if reason is not None:
            return reason
        return translation_reason(f)

    def __call__(self, call: Call):
        kwargs = translate(call)
        out = JAX_NN_CALL(call.query, call.key, call.value, **kwargs)
        return finish(call, out)


def translation_reason(f: CallFeatures) -> str | None:
    """Why cuDNN (as reached through ``jax.nn``) cannot express this call exactly, or None."""
    checks = (
        (f.segments, "segment ids"),
        (f.soft_cap, "a logits soft cap"),
        (f.dropout, "dropout"),
        (f.precision, "an explicit precision"),
        (f.return_residual, "return_residual (its log-sum-exp has no gradient)"),
        (f.sinks, "sinks (they rescale by the log-sum-exp, which cuDNN does not return)"),
        (f.value_head_dim != f.head_dim, f"Hv={f.value_head_dim} != H={f.head_dim}"),
        (f.head_dim > MAX_HEAD_DIM or f.head_dim % 8 != 0,
         f"head dim H={f.head_dim} (needs H % 8 == 0 and H <= {MAX_HEAD_DIM})"),
        (f.offset == "array", "a per-row or array query_offset (causal is top-left only)"),
        (f.offset == "static" and f.static_offset != 0 and (f.is_causal or f.window is not None),
         f"query_offset={f.static_offset} (cuDNN's causal/window is top-left: offset 0 only)"),
        (f.window is not None and f.window[1] != 0 and not f.is_causal,
         f"a right window ({f.window and f.window[1]}) without is_causal"),
        (f.bias and (f.q_len % 2 or f.kv_len % 2),
         f"a bias with odd T={f.q_len} or S={f.kv_len} (cuDNN's backward needs even lengths)"),
    )
    for flag, what in checks:
        if flag:
            return f"cuDNN cannot express {what}"
    return None


def translate(call: Call) -> dict:
    """The keyword arguments attnjax hands to ``jax.nn.dot_product_attention`` (besides
    ``query, key, value`` and ``implementation``) for a cuDNN-eligible call."""
    f = call.features
    window = None
    if f.window is not None:
        left, right = f.window
        # right == 0, or causal (which hides the right side): jax.nn passes left + 1 to cuDNN.
        window = (left, 0)
    T, S = call.query.shape[1], call.key.shape[1]

    def full_ts(x, dtype=None):
        # cuDNN takes the bias (the mask is folded into it) with full T and S dims
        # (check_layout), in the input dtype; B and N may stay broadcast.
        if x is None:
            return None
        if dtype is not None:
            x = x.astype(dtype)
        return jnp.broadcast_to(x, (*x.shape[:2], T, S))

    return dict(
        bias=full_ts(call.bias, call.query.dtype),
        mask=full_ts(call.mask),
        scale=call.scale,
        is_causal=f.is_causal,
        query_seq_lengths=call.q_lengths,
        key_value_seq_lengths=call.kv_lengths,
        local_window_size=window,
    )


def empty_rows(call: Call):
    """Bool ``(B, T, N|1)``: query rows that see no key (cuDNN leaves them undefined)."""
    f = call.features
    B, T, N = call.query.shape[:3]
    S = call.key.shape[1]
    i = jnp.arange(T, dtype=jnp.int32)[None, :]  # (1, T)
    hi = jnp.full((B, 1), S - 1, jnp.int32)  # last visible key, positionally
    if call.kv_lengths is not None:
        hi = call.kv_lengths[:, None] - 1
    if f.is_causal or f.window is not None:
        hi = jnp.minimum(hi, i)
    lo = jnp.zeros((1, 1), jnp.int32)
    if f.window is not None:
        lo = jnp.maximum(lo, i - f.window[0])
    empty = lo > hi  # (B|1, T)
    if call.q_lengths is not None:
        empty = empty | (i >= call.q_lengths[:, None])
    empty = jnp.broadcast_to(empty, (B, T))[:, :, None]  # (B, T, 1)
    if call.mask is not None or call.bias is not None:
        vis = jnp.ones((1, 1, 1, 1), bool)
        if call.mask is not None:
            vis = vis & call.mask
        if call.bias is not None:
            vis = vis & (call.bias > -jnp.inf)
        j = jnp.arange(S, dtype=jnp.int32)[None, None, None, :]
        pos_ok = (j >= lo[:, None, :, None]) & (j <= hi[:, None, :, None])  # (B|1, 1, T, S)
        seen = jnp.any(vis & pos_ok, axis=-1)  # (B|1, N|1, T)
        empty = empty | jnp.transpose(~seen, (0, 2, 1))
    return empty


def finish(call: Call, out):
    """Zero the fully masked rows of ``jax.nn``'s output; lse is not available (``None``)."""
    empty = empty_rows(call)
    out = jnp.where(empty[..., None], jnp.zeros((), out.dtype), out)
    B, T, N = call.query.shape[:3]
    lse = jnp.full((B, T, N), jnp.nan, jnp.float32)  # never returned: return_residual ineligible
    return out, lse
