"""An independent float64 NumPy reference for attention, forward and backward.

Written from the definition, with explicit loops over positions for the masks; it shares no code
with attnjax. Shapes: q (B,T,N,H), k (B,S,K,H), v (B,S,K,Hv).
"""

from __future__ import annotations

import numpy as np


def visibility(
    B,
    N,
    T,
    S,
    *,
    mask=None,
    is_causal=False,
    window=None,
    query_offset=0,
    q_lengths=None,
    kv_lengths=None,
    q_segments=None,
    kv_segments=None,
):
    """Boolean (B, N, T, S): which logits take part."""
    vis = np.ones((B, N, T, S), dtype=bool)
    offs = np.broadcast_to(np.asarray(query_offset, dtype=np.int64), (B,))
    for b in range(B):
        for i in range(T):
            pos = i + offs[b]
            for j in range(S):
                ok = True
                if is_causal and j > pos:
                    ok = False
                if window is not None:
                    left, right = (window, window) if np.isscalar(window) else window
                    if j < pos - left or j > pos + right:
                        ok = False
                if q_lengths is not None and i >= q_lengths[b]:
                    ok = False
                if kv_lengths is not None and j >= kv_lengths[b]:
                    ok = False
                if q_segments is not None and q_segments[b, i] != kv_segments[b, j]:
                    ok = False
                if not ok:
                    vis[b, :, i, j] = False
    if mask is not None:
        m = np.asarray(mask, dtype=bool)
        m = m.reshape((1,) * (4 - m.ndim) + m.shape)
        vis &= np.broadcast_to(m, vis.shape)
    return vis


def visibility_np(B, N, T, S, *, mask=None, is_causal=False, window=None, query_offset=0,
                  q_lengths=None, kv_lengths=None, q_segments=None, kv_segments=None):
    """The same as :func:`visibility`, by broadcasting instead of loops (for long sequences).

    Written from the definition like the loops (which the test suite checks it against)."""
    offs = np.broadcast_to(np.asarray(query_offset, dtype=np.int64), (B,))
    i = np.arange(T)[None, :, None]
    j = np.arange(S)[None, None, :]
    pos = i + offs[:, None, None]  # (B, T, 1)
    vis = np.ones((B, T, S), dtype=bool)
    if is_causal:
        vis &= j <= pos
    if window is not None:
        left, right = (window, window) if np.isscalar(window) else window
        vis &= (j >= pos - left) & (j <= pos + right)
    if q_lengths is not None:
        vis &= i < np.asarray(q_lengths)[:, None, None]
    if kv_lengths is not None:
        vis &= j < np.asarray(kv_lengths)[:, None, None]
    if q_segments is not None:
        vis &= np.asarray(q_segments)[:, :, None] == np.asarray(kv_segments)[:, None, :]
    vis = np.broadcast_to(vis[:, None], (B, N, T, S)).copy()
    if mask is not None:
        m = np.asarray(mask, dtype=bool)
        m = m.reshape((1,) * (4 - m.ndim) + m.shape)
        vis &= np.broadcast_to(m, vis.shape)
    return vis


def _expand_bias(bias, shape):
    b = np.asarray(bias, dtype=np.float64)
    b = b.reshape((1,) * (4 - b.ndim) + b.shape)
    return np.broadcast_to(b, shape)


def attention(q, k, v, bias=None, *, vis=None, scale=None, softcap=None, keep=None, rate=0.0):
    """Forward. Returns (out (B,T,N,Hv), lse (B,T,N), cache for :func:`attention_vjp`)."""
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    B, T, N, H = q.shape
    K = k.shape[2]
    G = N // K
    if scale is None:
        scale = 1.0 / np.sqrt(H)
    kn = np.repeat(k, G, axis=2)  # head n uses kv head n // G
    vn = np.repeat(v, G, axis=2)
    raw = np.einsum("btnh,bsnh->bnts", q, kn) * scale
    capped = softcap * np.tanh(raw / softcap) if softcap is not None else raw
    z = capped + (_expand_bias(bias, capped.shape) if bias is not None else 0.0)
    if vis is None:
        vis = np.ones(z.shape, dtype=bool)
    z = np.where(vis, z, -np.inf)
    m = z.max(axis=-1, keepdims=True)
    empty = ~np.isfinite(m)
    m = np.where(empty, 0.0, m)
    p = np.exp(z - m)
    denom = p.sum(axis=-1, keepdims=True)
    w = np.where(empty, 0.0, p / np.where(empty, 1.0, denom))
    lse = np.where(empty, -np.inf, np.log(np.where(empty, 1.0, denom)) + m)[..., 0]
    wd = w * keep / (1.0 - rate) if keep is not None else w
    out = np.einsum("bnts,bsnh->btnh", wd, vn)
    cache = dict(
        q=q,
        kn=kn,
        vn=vn,
        raw=raw,
        w=w,
        wd=wd,
        keep=keep,
        rate=rate,
        scale=scale,
        softcap=softcap,
        G=G,
        K=K,
    )
    return out, np.transpose(lse, (0, 2, 1)), cache


def attention_vjp(cache, dout, bias_shape=None):
    """Backward from the definition. Returns (dq, dk, dv, dbias or None)."""
    c = cache
    dout = np.asarray(dout, dtype=np.float64)
    B, T, N, _ = c["q"].shape
    dvn = np.einsum("bnts,btnh->bsnh", c["wd"], dout)
    dwd = np.einsum("btnh,bsnh->bnts", dout, c["vn"])
    dw = dwd * c["keep"] / (1.0 - c["rate"]) if c["keep"] is not None else dwd
    dz = c["w"] * (dw - np.sum(dw * c["w"], axis=-1, keepdims=True))
    dbias = None
    if bias_shape is not None:
        shape4 = (1,) * (4 - len(bias_shape)) + tuple(bias_shape)
        axes = tuple(a for a in range(4) if shape4[a] == 1 and dz.shape[a] != 1)
        dbias = np.sum(dz, axis=axes, keepdims=True).reshape(bias_shape)
    draw = dz * (1.0 - np.tanh(c["raw"] / c["softcap"]) ** 2) if c["softcap"] is not None else dz
    dq = np.einsum("bnts,bsnh->btnh", draw, c["kn"]) * c["scale"]
    dkn = np.einsum("bnts,btnh->bsnh", draw, c["q"]) * c["scale"]
    S = dkn.shape[1]
    G, K = c["G"], c["K"]
    dk = dkn.reshape(B, S, K, G, -1).sum(axis=3)
    dv = dvn.reshape(B, S, K, G, -1).sum(axis=3)
    return dq, dk, dv, dbias
