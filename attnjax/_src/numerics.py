"""Numeric conventions shared by every implementation: the compute dtype and the matmuls.

* **Compute dtype.** Logits, softmax statistics and accumulators are computed in the wider of
  float32 and the input dtype (:func:`compute_dtype`): float32 for float16 / bfloat16 / float32
  inputs, float64 for float64 inputs. Someone who asks for float64 gets float64.
* **Matmuls.** :func:`dot_general` and :func:`einsum` multiply low-precision operands with a wider
  result (``preferred_element_type``), the mixed-precision form that GPUs and TPUs run natively.
  XLA:CPU cannot execute every such dot: when a dot falls outside its fused dot emitters (for
  example a loop of one trip unrolled, which happens whenever a sequence fits in one chunk) its
  generic dot thunk rejects ``BF16 x BF16 = F32`` ("Unsupported element type for
  DotThunk::Execute"). On CPU the operands are therefore cast to the result dtype first (the
  values are identical, since every bfloat16/float16 is exact in float32), chosen at lowering
  time with :func:`jax.lax.platform_dependent`, so GPU and TPU keep their native low-precision
  matmuls and every platform computes the same thing.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax


def compute_dtype(dtype) -> jnp.dtype:
    """``max(float32, dtype)``: the dtype of logits, softmax statistics and accumulators."""
    return jnp.promote_types(dtype, jnp.float32)


def _cpu_safe(native, upcast, a, b, out_dtype):
    if a.dtype == out_dtype and b.dtype == out_dtype:
        return native(a, b)
    return lax.platform_dependent(a, b, cpu=upcast, default=native)


def dot_general(a, b, dimension_numbers, *, precision=None, out_dtype=jnp.float32):
    """``lax.dot_general`` with result dtype ``out_dtype``, executable on every backend."""

    def native(x, y):
        return lax.dot_general(x, y, dimension_numbers, precision=precision,
                               preferred_element_type=out_dtype)

    def upcast(x, y):
        return native(x.astype(out_dtype), y.astype(out_dtype))

    return _cpu_safe(native, upcast, a, b, out_dtype)


def einsum(spec: str, a, b, *, precision=None, out_dtype=jnp.float32):
    """Two-operand ``jnp.einsum`` with result dtype ``out_dtype``, executable on every backend."""

    def native(x, y):
        return jnp.einsum(spec, x, y, precision=precision, preferred_element_type=out_dtype)

    def upcast(x, y):
        return native(x.astype(out_dtype), y.astype(out_dtype))

    return _cpu_safe(native, upcast, a, b, out_dtype)
