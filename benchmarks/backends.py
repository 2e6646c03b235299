"""The implementations under test, behind one small interface.

Every backend turns a :class:`Case` into a :class:`Compiled` (compile time and, for JAX,
XLA's compile-time memory analysis, before any input is allocated), which then makes a runner:
a zero-argument callable that executes the case once and blocks until the result is ready.
"""

from __future__ import annotations

import dataclasses
import importlib
import time
from collections.abc import Callable

import numpy as np

from .flops import MODES


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark cell: shapes in BTNH layout (``T = S``), dtype, causal flag and mode."""

    batch: int
    seq_len: int
    heads: int
    head_dim: int
    dtype: str = "float32"
    causal: bool = False
    mode: str = "fwd"

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        for name in ("batch", "seq_len", "heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.seq_len, self.heads, self.head_dim)


@dataclasses.dataclass
class Compiled:
    """A compiled case. ``temp_bytes``/``total_bytes`` are None where no analysis exists."""

    compile_s: float | None
    temp_bytes: int | None
    total_bytes: int | None
    make_runner: Callable[[int], Callable[[], None]]


class Backend:
    """Base class. ``name`` is what ``--impl`` takes."""

    name: str = ""
    description: str = ""
    has_memory_analysis: bool = False

    def unavailable_reason(self) -> str | None:
        """None when usable, else a one-line reason (e.g. an optional package is missing)."""
        return None

    def compile(self, case: Case) -> Compiled:
        raise NotImplementedError


# ----------------------------------------------------------------------------- JAX


class JaxBackend(Backend):
    """A JAX attention function ``fn(q, k, v, is_causal)``, jitted and compiled ahead of time."""

    has_memory_analysis = True

    def __init__(self, name: str, description: str, fn_factory: Callable[[], Callable]):
        self.name = name
        self.description = description
        self._fn_factory = fn_factory

    def compile(self, case: Case) -> Compiled:
        import jax
        import jax.numpy as jnp

        attn = self._fn_factory()
        causal = case.causal

        def fwd(q, k, v, do):
            del do
            return attn(q, k, v, causal)

        def fwd_bwd(q, k, v, do):
            out, vjp = jax.vjp(lambda q_, k_, v_: attn(q_, k_, v_, causal), q, k, v)
            return out, vjp(do)

        fn = fwd if case.mode == "fwd" else fwd_bwd
        spec = jax.ShapeDtypeStruct(case.shape, jnp.dtype(case.dtype))
        t0 = time.perf_counter()
        compiled = jax.jit(fn).lower(spec, spec, spec, spec).compile()
        compile_s = time.perf_counter() - t0
        temp = total = None
        mem = compiled.memory_analysis()
        if mem is not None:
            temp = int(mem.temp_size_in_bytes)
            total = int(mem.argument_size_in_bytes + mem.output_size_in_bytes
                        - mem.alias_size_in_bytes + mem.temp_size_in_bytes)

        def make_runner(seed: int) -> Callable[[], None]:
            keys = jax.random.split(jax.random.key(seed), 4)
            args = [jax.random.normal(k_, case.shape, jnp.dtype(case.dtype)) for k_ in keys]
            jax.block_until_ready(args)

            def run():
                jax.block_until_ready(compiled(*args))

            return run

        return Compiled(compile_s, temp, total, make_runner)


def _jax_nn(q, k, v, causal):
    import jax

    return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="xla")


def _attnjax(implementation: str):
    def factory():
        import attnjax

        def fn(q, k, v, causal):
            return attnjax.dot_product_attention(q, k, v, is_causal=causal,
                                                 implementation=implementation)

        return fn

    return factory


# ----------------------------------------------------------------------------- torch

_TORCH_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def _import_torch():
    """Import torch; raises ImportError when it is not installed (or blocked in tests)."""
    return importlib.import_module("torch")


class TorchSdpaBackend(Backend):
    """``torch.nn.functional.scaled_dot_product_attention`` on CPU (optional: ``[torch]`` extra).

    Inputs are created directly in torch's native ``[B, N, T, H]`` layout (no transpose is
    timed). Eager mode: there is no compile step and no compile-time memory analysis.
    """

    name = "torch.sdpa"
    description = "torch.nn.functional.scaled_dot_product_attention (CPU, eager)"
    has_memory_analysis = False

    def unavailable_reason(self) -> str | None:
        try:
            torch = _import_torch()
        except ImportError as e:
            return (f"torch is not installed ({e}); install the optional extra "
                    "`pip install -e \".[torch]\"` to compare against torch SDPA")
        if not hasattr(torch.nn.functional, "scaled_dot_product_attention"):
            return f"torch {torch.__version__} has no scaled_dot_product_attention"
        return None

    def compile(self, case: Case) -> Compiled:
        torch = _import_torch()
        if case.dtype not in _TORCH_DTYPES:
            raise ValueError(f"dtype {case.dtype!r} not supported for torch (use one of "
                             f"{sorted(_TORCH_DTYPES)})")
        tdtype = getattr(torch, _TORCH_DTYPES[case.dtype])
        sdpa = torch.nn.functional.scaled_dot_product_attention
        shape = (case.batch, case.heads, case.seq_len, case.head_dim)

        def make_runner(seed: int) -> Callable[[], None]:
            gen = torch.Generator().manual_seed(seed)
            q, k, v, do = (torch.randn(shape, generator=gen, dtype=torch.float32).to(tdtype)
                           for _ in range(4))
            if case.mode == "fwd":
                def run():
                    with torch.no_grad():
                        sdpa(q, k, v, is_causal=case.causal)
            else:
                for t in (q, k, v):
                    t.requires_grad_(True)

                def run():
                    for t in (q, k, v):
                        t.grad = None
                    out = sdpa(q, k, v, is_causal=case.causal)
                    out.backward(do)
            return run

        return Compiled(None, None, None, make_runner)


# ----------------------------------------------------------------------------- registry


def all_backends() -> dict[str, Backend]:
    """Every known backend by name, in table order."""
    backends = [
        JaxBackend("jax.nn", "jax.nn.dot_product_attention(implementation='xla')",
                   lambda: _jax_nn),
        JaxBackend("attnjax.xla", "attnjax.dot_product_attention(implementation='xla')",
                   _attnjax("xla")),
        JaxBackend("attnjax.xla_chunked",
                   "attnjax.dot_product_attention(implementation='xla_chunked')",
                   _attnjax("xla_chunked")),
        TorchSdpaBackend(),
    ]
    return {b.name: b for b in backends}


BACKEND_NAMES = tuple(all_backends())

# Implementations whose memory grows linearly in T: the sweep's long sizes are meant for them.
MEMORY_EFFICIENT = ("attnjax.xla_chunked", "torch.sdpa")


def median_min_max(times: list[float]) -> tuple[float, float, float]:
    arr = np.asarray(times, dtype=np.float64)
    return float(np.median(arr)), float(arr.min()), float(arr.max())
