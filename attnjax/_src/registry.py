"""One registry of implementations, and the dispatch of ``implementation=None``.

Each implementation declares the platforms and dtypes it runs on and answers, for the features of
one validated call (:class:`CallFeatures`), either "yes" (``None``) or the reason it cannot serve
that call. ``implementation=None`` takes, on the current platform, the first eligible name of
:data:`AUTO_ORDER`; a named implementation that cannot serve the call raises ``ValueError`` with
its reason (it never falls back). :func:`explain` reports every answer as a table.

Adding an implementation is one new module defining an :class:`Implementation` and one line in
:func:`_load` (plus, for automatic use, its name in :data:`AUTO_ORDER`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from typing import Any

import jax
import jax.numpy as jnp

from attnjax._src.masks import MaskInfo

# implementation=None: the order tried on each platform ("cuda"/"rocm" are GPUs).
AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "cuda": ("cudnn", "pallas_gpu", "xla", "xla_chunked"),
    "rocm": ("pallas_gpu", "xla", "xla_chunked"),
    "tpu": ("splash", "xla", "xla_chunked"),
    "cpu": ("xla", "xla_chunked"),
}

# implementation=None picks "xla" while the full score tensor B·N·T·S stays at most this many
# elements (16 MiB of float32), and "xla_chunked" beyond.
AUTO_MATERIALISE_MAX_SCORES = 1 << 22


@dataclasses.dataclass(frozen=True)
class CallFeatures:
    """What an implementation needs to know to decide whether it can serve a call.

    Everything here is static (shapes, dtypes, which mask kinds are present), so eligibility is
    decided at trace time and never depends on array values.

    Attributes:
      platform: ``"cpu"``, ``"cuda"``, ``"rocm"`` or ``"tpu"`` (see :func:`current_platform`).
      tpu_interpret: Pallas TPU interpret mode is active
        (``jax.experimental.pallas.tpu.force_tpu_interpret_mode``).
      dtype: the input dtype name (``"float32"``, ``"bfloat16"``, ...).
      batch, q_len, kv_len, num_heads, num_kv_heads, head_dim, value_head_dim: B T S N K H Hv.
      is_causal: causal mask requested.
      window: ``(left, right)`` or ``None``.
      offset: ``"none"``, ``"static"`` (a Python int, value in ``static_offset``) or
        ``"array"`` (a per-row or traced offset).
      static_offset: the int offset when ``offset`` is ``"none"`` (0) or ``"static"``.
      q_lengths, kv_lengths, segments, mask, bias: which of these arguments were given.
      bias_shape: the 4-d (broadcastable) bias shape, or ``None``.
      soft_cap: ``logits_soft_cap`` given; soft_cap_traced: given as a (traced) array.
      dropout: ``dropout_rate > 0``.
      return_residual: the log-sum-exp is returned (and may be differentiated).
      precision: an explicit matmul ``precision`` was given.
      pallas_interpret: inside :func:`attnjax.pallas_interpret` (Pallas kernels interpreted).
      flex: a ``mask_mod``, ``score_mod`` or ``block_mask`` was given.
      sinks: ``sinks`` given (applied to the implementation's output and log-sum-exp).
      forward_mode: the call is differentiated in forward mode (``jax.jvp``, ``jax.jacfwd``): an
        input is a JVP tracer. ``implementation=None`` then takes only implementations that JAX
        differentiates itself (``"xla"``, at any size).
      flex_gpu_reason: on CUDA/ROCm (not interpreted), why the mods cannot run inside a Triton
        kernel (``None``: they can, or not asked).
    """

    platform: str
    tpu_interpret: bool
    dtype: str
    batch: int
    q_len: int
    kv_len: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    value_head_dim: int
    is_causal: bool = False
    window: tuple[int, int] | None = None
    offset: str = "none"
    static_offset: int = 0
    q_lengths: bool = False
    kv_lengths: bool = False
    segments: bool = False
    mask: bool = False
    bias: bool = False
    bias_shape: tuple[int, ...] | None = None
    soft_cap: bool = False
    soft_cap_traced: bool = False
    dropout: bool = False
    return_residual: bool = False
    precision: bool = False
    pallas_interpret: bool = False
    flex: bool = False  # a mask_mod, score_mod or block_mask (callables): see supports_flex
    flex_gpu_reason: str | None = None
    forward_mode: bool = False
    sinks: bool = False

    @property
    def mask_kinds(self) -> tuple[str, ...]:
        """The mask kinds present, by name (for messages and tables)."""
        kinds = [
            ("causal", self.is_causal), ("window", self.window is not None),
            ("query_offset", self.offset != "none"), ("q_lengths", self.q_lengths),
            ("kv_lengths", self.kv_lengths), ("segments", self.segments), ("mask", self.mask),
            ("bias", self.bias), ("soft_cap", self.soft_cap), ("dropout", self.dropout),
        ]
        return tuple(n for n, on in kinds if on)

    @property
    def scores(self) -> int:
        return self.batch * self.num_heads * self.q_len * self.kv_len


@dataclasses.dataclass(frozen=True)
class Call:
    """A validated call: batched arrays, the shared :class:`MaskInfo`, settings and features.

    ``bias`` and ``mask`` are 4-d ``(B|1, N|1, T|1, S|1)``; ``q_lengths``/``kv_lengths`` int32
    ``(B,)`` (clipped); segment ids int32 ``(B, T)``/``(B, S)``; ``offset`` int32 ``()``/``(B,)``.
    """

    query: Any
    key: Any
    value: Any
    bias: Any
    mask: Any
    q_lengths: Any
    kv_lengths: Any
    q_segment_ids: Any
    kv_segment_ids: Any
    offset: Any
    info: MaskInfo
    scale: float
    logits_soft_cap: Any
    dropout_rate: float
    seed: Any
    precision: Any
    chunks: Any
    features: CallFeatures
    chunk_size: Any = None  # the caller's chunk_size argument as given (None: default)


class Implementation:
    """One way of computing attention. Subclasses set the class attributes and two methods.

    Attributes:
      name: the ``implementation=`` string.
      platforms: where it runs (``"cpu"``, ``"cuda"``, ``"rocm"``, ``"tpu"``).
      dtypes: input dtypes it serves.
      serves: one line for the README/explain table: what it serves and what not.
      forward_mode: whether ``jax.jvp`` works through it (False for custom-VJP kernels).
    """

    name: str = ""
    platforms: tuple[str, ...] = ()
    dtypes: tuple[str, ...] = ("float32", "float16", "bfloat16", "float64")
    serves: str = ""
    forward_mode: bool = False

    def platform_reason(self, f: CallFeatures) -> str | None:
        if f.platform not in self.platforms:
            return f"runs on {'/'.join(self.platforms)}, this call is on {f.platform}"
        return None

    def unsupported(self, f: CallFeatures, auto: bool) -> str | None:
        """``None`` when this implementation can serve the call, else the reason it cannot.

        ``auto`` is True when asked by ``implementation=None`` (a size preference may apply).
        """
        reason = self.platform_reason(f)
        if reason is None and f.dtype not in self.dtypes:
            reason = f"dtype {f.dtype} not supported (supports {', '.join(self.dtypes)})"
        if reason is None and f.flex and not getattr(self, "supports_flex", False):
            reason = "mask_mod/score_mod/block_mask (callables) not supported"
        if reason is None and auto and f.forward_mode and not self.forward_mode:
            reason = ("forward-mode differentiation (jax.jvp, jax.jacfwd) not supported: "
                      "its backward pass is a custom VJP")
        return reason

    def __call__(self, call: Call):
        """Returns ``(out (B,T,N,Hv) in the input dtype, lse (B,T,N) float32)``."""
        raise NotImplementedError


# ------------------------------------------------------------------------------------------
# Platform.

_state = threading.local()


@contextlib.contextmanager
def target_platform(platform: str):
    """Dispatch as if running on ``platform`` (``"cpu"``, ``"cuda"``, ``"rocm"``, ``"tpu"``).

    For ahead-of-time lowering on another host, e.g. ``jax.export.export(jax.jit(f),
    platforms=("tpu",))`` on a CPU-only machine: tracing happens on the host, so without this the
    host's platform decides the dispatch. Like every dispatch decision it applies when a function
    is traced: a ``jax.jit`` function already traced (and cached) outside it is not re-dispatched.
    """
    if platform not in AUTO_ORDER:
        raise ValueError(f"platform must be one of {tuple(AUTO_ORDER)}, got {platform!r}")
    prev = getattr(_state, "platform", None)
    _state.platform = platform
    try:
        yield
    finally:
        _state.platform = prev


def current_platform() -> str:
    """The platform dispatch decides for: :func:`target_platform`'s, else the default backend."""
    forced = getattr(_state, "platform", None)
    if forced is not None:
        return forced
    backend = jax.default_backend()
    if backend == "gpu":
        try:
            version = jax.extend.backend.get_backend().platform_version.lower()
        except Exception:  # pragma: no cover - depends on the jax build
            version = "cuda"
        return "rocm" if "rocm" in version else "cuda"
    return backend


def tpu_interpret_mode() -> bool:
    """Whether Pallas TPU kernels currently run in interpret mode (on CPU)."""
    try:
        from jax._src import config as jax_config

        return jax_config.pallas_tpu_interpret_mode_context_manager.value is not None
    except (ImportError, AttributeError):  # pragma: no cover - depends on the jax version
        return False


# ------------------------------------------------------------------------------------------
# The registry.

_REGISTRY: dict[str, Implementation] = {}


def _load() -> dict[str, Implementation]:
    if not _REGISTRY:
        from attnjax._src import impl_cudnn, impl_pallas_gpu, impl_splash, impl_xla

        for impl in (
            impl_xla.XLA(),
            impl_xla.XLAChunked(),
            impl_cudnn.CuDNN(),
            impl_splash.Splash(),
            impl_pallas_gpu.PallasGPU(),
        ):
            _REGISTRY[impl.name] = impl
    return _REGISTRY


def implementations() -> dict[str, Implementation]:
    """Every registered implementation by name (registration order)."""
    return dict(_load())


def names() -> tuple[str, ...]:
    return tuple(_load())


def check_name(implementation) -> None:
    if implementation is None:
        return
    if not isinstance(implementation, str) or implementation not in _load():
        raise ValueError(
            f"implementation must be one of {names()} or None, got {implementation!r}"
        )


def select(f: CallFeatures, implementation: str | None) -> Implementation:
    """The implementation that serves a call: the named one (or ValueError with its reason),
    or for ``None`` the first eligible one of :data:`AUTO_ORDER` on ``f.platform``."""
    registry = _load()
    check_name(implementation)
    if implementation is not None:
        impl = registry[implementation]
        reason = impl.unsupported(f, auto=False)
        if reason is not None:
            raise ValueError(
                f"implementation={implementation!r} cannot serve this call: {reason}. "
                "Use implementation=None to pick one that can "
                "(attnjax.explain_dispatch shows why each was passed over)."
            )
        return impl
    for name in AUTO_ORDER.get(f.platform, AUTO_ORDER["cpu"]):
        impl = registry[name]
        if impl.unsupported(f, auto=True) is None:
            return impl
    return registry["xla_chunked"]  # serves every call; unreachable in practice


@dataclasses.dataclass(frozen=True)
class DispatchReport:
    """What :func:`attnjax.explain_dispatch` returns: the choice and every answer.

    Attributes:
      chosen: the implementation ``implementation=None`` (or the named one) would use.
      platform: the platform decided for.
      features: the call's :class:`CallFeatures`.
      rows: ``(name, eligible, reason)`` for every registered implementation, in the order
        ``implementation=None`` tries them on this platform first, then the rest.
    """

    chosen: str
    platform: str
    features: CallFeatures
    rows: tuple[tuple[str, bool, str], ...]

    def __str__(self) -> str:
        f = self.features
        head = (
            f"platform={self.platform}{' (TPU interpret mode)' if f.tpu_interpret else ''} "
            f"dtype={f.dtype} B={f.batch} T={f.q_len} S={f.kv_len} N={f.num_heads} "
            f"K={f.num_kv_heads} H={f.head_dim} Hv={f.value_head_dim} "
            f"masks={','.join(f.mask_kinds) or 'none'}"
        )
        width = max(len(r[0]) for r in self.rows)
        lines = [head, f"chosen: {self.chosen}"]
        for name, ok, reason in self.rows:
            mark = "*" if name == self.chosen else " "
            lines.append(f"{mark} {name:<{width}}  {'eligible' if ok else 'no'}: {reason}")
        return "\n".join(lines)

    __repr__ = __str__


def explain(f: CallFeatures, implementation: str | None = None) -> DispatchReport:
    registry = _load()
    check_name(implementation)
    order = list(AUTO_ORDER.get(f.platform, AUTO_ORDER["cpu"]))
    order += [n for n in registry if n not in order]
    rows = []
    for name in order:
        reason = registry[name].unsupported(f, auto=implementation is None)
        rows.append((name, reason is None, "serves this call" if reason is None else reason))
    if implementation is not None:
        chosen = implementation if registry[implementation].unsupported(f, False) is None else (
            f"none ({implementation!r} would raise)")
    else:
        chosen = select(f, None).name
    return DispatchReport(chosen=chosen, platform=f.platform, features=f, rows=tuple(rows))


def dtype_name(dtype) -> str:
    return jnp.dtype(dtype).name
