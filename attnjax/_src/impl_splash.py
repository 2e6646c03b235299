"""``implementation="splash"``: Pallas splash attention on TPU (and interpreted on CPU).

Translation of attnjax's arguments (jax ``jax.experimental.pallas.ops.tpu.splash_attention``):

* the scale is folded into ``q`` (splash computes ``softmax(q·kᵀ)``);
* the kernel works on one batch row ``(N, T, H)``; the batch is ``vmap``-ped;
* causal / window / a static ``query_offset`` become one static splash mask per head
  (``CausalMask`` or ``LocalMask`` with ``offset``; causal and a window together are the window
  with its right side clipped to 0), shared by all heads (``MultiHeadMask``);
* segment ids are splash segment ids; query/key lengths and the padding of T and S to a multiple of
  128 (its block size) are padding segments (ids no real segment uses, different for queries and
  keys, so padded keys are never visible); the padding is dropped from the result;
* ``logits_soft_cap`` is splash's ``attn_logits_soft_cap``;
* GQA: splash's multi-head form maps query head ``n`` to kv head ``n // G`` itself; ``K = 1``
  uses its multi-query form (``make_splash_mqa``).

Fully masked rows. Splash leaves them undefined (its mask value is a finite ``-0.7·f32max``, so a
row whose visible keys are all masked inside a computed block averages them, and a row whose key
blocks are all skipped divides 0 by 0). Both show in its log-sum-exp (``<= mask_value / 2`` or not
finite; real logits are nowhere near ``-1e38``): those rows get output 0 and lse ``-inf`` here.

Gradients. A ``jax.custom_vjp`` around the kernel keeps the forward's log-sum-exp (splash's own
VJP cannot be taken with ``save_residuals=True``) and calls splash's own backward kernels (dK/dV
and dQ) with ``di = rowsum(o·dO) - dlse``, which also makes the returned log-sum-exp
differentiable. Those kernels are private functions of the installed jax (checked at import; if
they are missing splash reports itself ineligible).

Not served (ineligible, with the reason): ``bias``, a dense ``mask``, dropout, a per-row or
traced ``query_offset``, an explicit ``precision``, float16/float64.
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np

from attnjax._src import pallas_config
from attnjax._src.registry import Call, CallFeatures, Implementation

try:
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as _sk,
    )
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_mask as _sm,
    )

    _BWD_DKV = _sk._splash_attention_bwd_dkv
    _BWD_DQ = _sk._splash_attention_bwd_dq
    _MASK_VALUE = float(_sk.DEFAULT_MASK_VALUE)
    _IMPORT_ERROR = None
except (ImportError, AttributeError) as e:  # pragma: no cover - depends on the jax version
    _IMPORT_ERROR = f"splash attention (or its backward kernels) not found in this jax: {e}"

BLOCK = 128  # T and S are padded to a multiple of this (splash's minimum block, NUM_LANES)
_BLOCK_CHOICES = (512, 256, 128)


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _block(n: int) -> int:
    return next(b for b in _BLOCK_CHOICES if n % b == 0)


class Splash(Implementation):
    name = "splash"
    platforms = ("tpu",)
    dtypes = ("float32", "bfloat16")
    serves = ("causal, window, static int query_offset, q/kv lengths, segment ids, soft cap, "
              "GQA/MQA, any T, S (padded to 128), Hv != H; not: bias, dense mask, dropout, "
              "per-row/traced query_offset, precision")

    def platform_reason(self, f: CallFeatures):
        if f.platform == "tpu" or f.tpu_interpret or f.pallas_interpret:
            return None
        return (f"runs on tpu (or interpreted on CPU inside attnjax.pallas_interpret() or "
                f"jax.experimental.pallas.tpu.force_tpu_interpret_mode()), this call is on "
                f"{f.platform}")

    def unsupported(self, f: CallFeatures, auto: bool):
        reason = super().unsupported(f, auto)
        if reason is not None:
            return reason
        if _IMPORT_ERROR is not None:
            return _IMPORT_ERROR
        for flag, what in (
            (f.bias, "bias"), (f.mask, "a dense boolean mask"), (f.dropout, "dropout"),
            (f.offset == "array", "a per-row or array query_offset (splash masks are static: pass a "
             "Python or NumPy int)"),
            (f.precision, "an explicit precision"),
            (f.soft_cap_traced, "a traced logits_soft_cap (its soft cap is a static float)"),
        ):
            if flag:
                return f"splash does not take {what}"
        return None

    def __call__(self, call: Call):
        f = call.features
        q, k, v = call.query, call.key, call.value
        B, T, N, H = q.shape
        S, K, Hv = k.shape[1], k.shape[2], v.shape[3]
        Tp, Sp = _round_up(T, BLOCK), _round_up(S, BLOCK)
        q = q * jnp.asarray(call.scale, q.dtype) if call.scale != 1.0 else q

        def pad(x, n, axis, value=0):
            if x.shape[axis] == n:
                return x
            widths = [(0, 0)] * x.ndim
            widths[axis] = (0, n - x.shape[axis])
            return jnp.pad(x, widths, constant_values=value)

        qh = jnp.transpose(pad(q, Tp, 1), (0, 2, 1, 3))  # (B, N, Tp, H)
        kh = jnp.transpose(pad(k, Sp, 1), (0, 2, 1, 3))  # (B, K, Sp, H)
        vh = jnp.transpose(pad(v, Sp, 1), (0, 2, 1, 3))  # (B, K, Sp, Hv)
        qs, ks = _segments(call, T, S, Tp, Sp)
        # Inside attnjax.pallas_interpret(): Pallas TPU interpret mode for every kernel call
        # (forward and backward), read now, at trace time.
        key = (Tp, Sp, f.is_causal, f.window, f.static_offset, _soft_cap(call.logits_soft_cap),
               pallas_config.interpret_enabled())
        per_row = f.segments or f.q_lengths or f.kv_lengths
        if not per_row or B == 1:
            # One kernel for the whole batch: batch rows become heads (head b·N + n reads kv head
            # (b·N + n) // G = b·K + n // G, so GQA stays exact); the segment ids (padding only,
            # or a single row's) are the same for every row.
            core = _core(B * N, B * K, *key, qs is not None)
            fold = lambda x: x.reshape(-1, *x.shape[2:])
            seg = () if qs is None else (qs[0], ks[0])
            out, lse = core(fold(qh), _kv(fold(kh), B * K), _kv(fold(vh), B * K), *seg)
            out, lse = out.reshape(B, N, Tp, Hv), lse.reshape(B, N, Tp)
        else:
            # Per-row segment ids: one kernel call per batch row (lax.map; vmap of the kernel
            # fails in TPU interpret mode, whose grid semantics miss the batch dim).
            core = _core(N, K, *key, True)
            out, lse = jax.lax.map(
                lambda xs: core(xs[0], _kv(xs[1], K), _kv(xs[2], K), xs[3], xs[4]),
                (qh, kh, vh, qs, ks))
        out = jnp.transpose(out[:, :, :T], (0, 2, 1, 3))  # (B, T, N, Hv)
        lse = jnp.transpose(lse[:, :, :T], (0, 2, 1))  # (B, T, N)
        empty = ~(lse > 0.5 * _MASK_VALUE)  # also catches NaN and -inf
        out = jnp.where(empty[..., None], jnp.zeros((), out.dtype), out)
        lse = jnp.where(empty, -jnp.inf, lse)
        return out, lse


def _kv(x, num_kv_heads):
    """Splash's multi-query form takes k/v without a head dim."""
    return x[0] if num_kv_heads == 1 else x


def _soft_cap(c):
    return None if c is None else float(c)


def _segments(call: Call, T, S, Tp, Sp):
    """Segment ids (B, Tp), (B, Sp) including padding segments, or (None, None)."""
    f = call.features
    if not (f.segments or f.q_lengths or f.kv_lengths or Tp != T or Sp != S):
        return None, None
    B = call.query.shape[0]
    if f.segments:
        qs, ks = call.q_segment_ids, call.kv_segment_ids
        lo = jnp.minimum(jnp.min(qs), jnp.min(ks))
    else:
        qs = jnp.zeros((B, T), jnp.int32)
        ks = jnp.zeros((B, S), jnp.int32)
        lo = jnp.int32(0)
    q_pad, kv_pad = lo - 1, lo - 2  # used by no real segment, and different from each other
    if call.q_lengths is not None:
        qs = jnp.where(jnp.arange(T)[None] < call.q_lengths[:, None], qs, q_pad)
    if call.kv_lengths is not None:
        ks = jnp.where(jnp.arange(S)[None] < call.kv_lengths[:, None], ks, kv_pad)
    qs = jnp.concatenate([qs, jnp.broadcast_to(q_pad, (B, Tp - T)).astype(qs.dtype)], axis=1)
    ks = jnp.concatenate([ks, jnp.broadcast_to(kv_pad, (B, Sp - S)).astype(ks.dtype)], axis=1)
    return qs.astype(jnp.int32), ks.astype(jnp.int32)


def static_mask(Tp: int, Sp: int, is_causal: bool, window, offset: int):
    """The splash mask of one head for attnjax's causal/window/offset (``None`` = no mask)."""
    if window is not None:
        left, right = window
        if is_causal:
            right = min(right, 0)
        return _sm.LocalMask((Tp, Sp), (left, right), offset=offset)
    if is_causal:
        return _sm.CausalMask((Tp, Sp), offset=offset)
    return _sm.FullMask((Tp, Sp))


@functools.lru_cache(maxsize=64)
def _kernels(N, K, Tp, Sp, is_causal, window, offset, soft_cap):
    head = static_mask(Tp, Sp, is_causal, window, offset)
    mask = _sm.MultiHeadMask([head] * N)
    bq, bkv = _block(Tp), _block(Sp)
    sizes = _sk.BlockSizes(
        block_q=bq, block_kv=bkv, block_kv_compute=bkv,
        block_q_dkv=bq, block_kv_dkv=bkv, block_kv_dkv_compute=bkv,
        block_q_dq=bq, block_kv_dq=bkv,
    )
    make = _sk.make_splash_mqa_single_device if K == 1 else _sk.make_splash_mha_single_device
    # The kernel holds its block-sparsity tables as arrays: build them as constants even when
    # first asked inside a jit trace, so the cached kernel never holds a tracer.
    with jax.ensure_compile_time_eval():
        return make(mask, block_sizes=sizes, save_residuals=True, attn_logits_soft_cap=soft_cap)


def _collapse(info):
    if info is None or info.partial_mask_blocks is None:
        return info
    blocks = info.partial_mask_blocks
    return info._replace(partial_mask_blocks=blocks.reshape(-1, *blocks.shape[-2:]))


def _interpreting(interpret: bool):
    """Pallas TPU interpret mode around kernel calls (``attnjax.pallas_interpret()``)."""
    if not interpret:
        return contextlib.nullcontext()
    from jax.experimental.pallas import tpu as pltpu  # noqa: PLC0415 (lazy, like _sk)

    return pltpu.force_tpu_interpret_mode()


@functools.lru_cache(maxsize=64)
def _core(N, K, Tp, Sp, is_causal, window, offset, soft_cap, interpret, segmented):
    """A per-batch-row ``(q (N,Tp,H), k, v[, qs (Tp,), ks (Sp,)]) -> (out, lse (N,Tp) f32)``
    with a custom VJP that runs splash's backward kernels (and differentiates the lse);
    ``interpret``: every kernel call in Pallas TPU interpret mode."""
    kernel = _kernels(N, K, Tp, Sp, is_causal, window, offset, soft_cap)

    def forward(q, k, v, *seg):
        segment_ids = _sk.SegmentIds(q=seg[0], kv=seg[1]) if segmented else None
        with _interpreting(interpret):
            out, (lse,) = kernel(q, k, v, segment_ids=segment_ids)
        return out, lse

    @jax.custom_vjp
    def core(q, k, v, *seg):
        return forward(q, k, v, *seg)

    def fwd(q, k, v, *seg):
        out, lse = forward(q, k, v, *seg)
        # Rows whose key blocks were all skipped hold 0/0; keep the residual finite.
        o_res = jnp.where(jnp.isfinite(out), out, jnp.zeros((), out.dtype))
        return (out, lse), (q, k, v, seg, o_res, lse)

    def bwd(res, cts):
        q, k, v, seg, o, lse = res
        do, dlse = cts
        kw = kernel.kwargs
        sizes = kw["block_sizes"]
        segment_ids = _sk.SegmentIds(q=seg[0], kv=seg[1]) if segmented else None
        di = jnp.einsum("hsd,hsd->hs", o.astype(jnp.float32), do.astype(jnp.float32))
        # d lse_i / d s_ij = p_ij: the lse cotangent enters as dS = P ∘ (dP - (di - dlse)).
        di = di - dlse.astype(jnp.float32)
        common = dict(
            is_mqa=kw["is_mqa"], mask_value=kw["mask_value"],
            attn_logits_soft_cap=kw["attn_logits_soft_cap"], q_layout=sizes.q_layout,
            k_layout=sizes.k_layout, v_layout=sizes.v_layout,
            mask_function=kw["mask_function"], interpret=kw["interpret"],
        )
        with _interpreting(interpret):
            dq, dk, dv = _BWD_DKV(
                q, k, v, segment_ids, None, lse, do, di, bq=sizes.block_q_dkv,
                bkv=sizes.block_kv_dkv, bkv_compute=sizes.block_kv_dkv_compute,
                mask_info=_collapse(kernel.dkv_mask_info),
                use_fused_bwd_kernel=sizes.use_fused_bwd_kernel, **common,
            )
            if dq is None:
                dq = _BWD_DQ(
                    q, k, v, segment_ids, None, lse, do, di, bq=sizes.block_q_dq,
                    bkv=sizes.block_kv_dq, mask_info=_collapse(kernel.dq_mask_info), **common,
                )
        seg_ct = tuple(np.zeros(s.shape, jax.dtypes.float0) for s in seg)
        return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), *seg_ct)

    core.defvjp(fwd, bwd)
    return core
