"""The one FLOP count shared by every implementation.

Convention (see ``benchmarks/README.md``): only the matrix products a full (unmasked) attention
needs are counted, each ``(m×k)·(k×n)`` product as ``2·m·k·n`` FLOPs:

* forward: ``S = QKᵀ`` and ``O = PV``: ``2 · 2·B·N·T·S·H = 4·B·N·T·S·H``;
* backward: ``dV = PᵀdO``, ``dP = dO·Vᵀ``, ``dQ = dS·K``, ``dK = dSᵀQ``: ``8·B·N·T·S·H``
  (twice the forward; recomputing ``QKᵀ`` in the backward, as memory-efficient kernels do, is an
  implementation cost and is not counted);
* forward+backward: ``12·B·N·T·S·H`` (3× the forward).

Softmax, scaling and masking are not counted. Causal attention is counted as full attention
(the same count, so a causal run that skips masked blocks shows a higher GFLOP/s).
"""

from __future__ import annotations

MODES = ("fwd", "fwd+bwd")

_MATMULS = {"fwd": 2, "fwd+bwd": 6}


def attention_flops(batch: int, heads: int, q_len: int, kv_len: int, head_dim: int,
                    mode: str) -> int:
    """FLOPs of full attention: ``4·B·N·T·S·H`` forward, ``12·B·N·T·S·H`` forward+backward.

    Args:
      batch: B. heads: N (query heads). q_len: T. kv_len: S. head_dim: H.
      mode: ``"fwd"`` or ``"fwd+bwd"``.

    Returns:
      The FLOP count as a Python int.

    Raises:
      ValueError: unknown ``mode``.
    """
    if mode not in _MATMULS:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return _MATMULS[mode] * 2 * batch * heads * q_len * kv_len * head_dim
