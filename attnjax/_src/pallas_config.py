"""Where attnjax's Pallas kernels run: compiled for their accelerator, or interpreted on CPU.

:func:`pallas_interpret` turns on Pallas interpret mode for every Pallas implementation of
attnjax (``"pallas_gpu"``: Pallas's interpreter; ``"splash"``: Pallas TPU interpret mode,
``jax.experimental.pallas.tpu.force_tpu_interpret_mode`` around its forward and backward kernel
calls): the kernel bodies are then evaluated as ordinary XLA operations, so they run (slowly) on
CPU with exactly the kernel's semantics. This is how the kernels are tested on
machines without an accelerator. Outside the context manager a Pallas implementation asked to run
on a backend it cannot compile for raises a ``ValueError`` that says why.

The setting is read when a call is *traced*: a function already compiled by ``jax.jit`` outside
the context keeps the mode it was traced with (call ``jax.clear_caches()`` or trace afresh).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

_INTERPRET: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "attnjax_pallas_interpret", default=False
)


@contextlib.contextmanager
def pallas_interpret(enabled: bool = True) -> Iterator[None]:
    """Run attnjax's Pallas implementations in Pallas interpret mode inside the ``with`` block.

    Args:
      enabled: ``True`` (default) interprets; ``False`` restores compiled kernels inside an outer
        ``pallas_interpret()`` block.

    Example:
      >>> import jax, attnjax
      >>> q = k = v = jax.random.normal(jax.random.key(0), (1, 64, 2, 32))
      >>> with attnjax.pallas_interpret():  # on CPU: the Triton kernel, interpreted
      ...     out = attnjax.dot_product_attention(q, k, v, implementation="pallas_gpu")
    """
    if not isinstance(enabled, bool):
        raise TypeError(f"pallas_interpret(enabled) must be a bool, got {enabled!r}")
    token = _INTERPRET.set(enabled)
    try:
        yield
    finally:
        _INTERPRET.reset(token)


def interpret_enabled() -> bool:
    """Whether the calling code is inside :func:`pallas_interpret` (read at trace time)."""
    return _INTERPRET.get()
