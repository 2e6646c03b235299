"""The native CPU kernel of a decoding step (``decode_cpu.cc``): build, load, call.

XLA:CPU cannot run a decoding step at the speed of memory (see ``decode.py``): its matrix
products over the cache, its long reductions and its bfloat16 cache writes each cost a multiple
of one read of the cache. ``decode_cpu.cc`` is an XLA FFI custom call that writes the step's keys
and values into the cache in place (in every storage dtype) and reads the cache once, in its own
layout, on XLA's CPU thread pool.

It is compiled on first use with the host's C++ compiler (``$CXX``, else ``c++``, ``g++``,
``clang++``) against the FFI headers that ship with jaxlib, for the host's CPU
(``-march=native``), and cached in ``$ATTNJAX_CACHE_DIR`` (default
``$XDG_CACHE_HOME/attnjax`` or ``~/.cache/attnjax``), keyed by the source, jaxlib's version, the
compiler and the CPU. Nothing is compiled at install time. When it cannot be built (no compiler,
a failed build) or ``ATTNJAX_NATIVE_KERNELS=0`` is set, decoding uses the pure-JAX path: the same
results, slower. :func:`status` says which, and why.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import jax
import numpy as np

TARGET = "attnjax_decode_cpu"
_SOURCE = Path(__file__).with_name("decode_cpu.cc")
_ENV_SWITCH = "ATTNJAX_NATIVE_KERNELS"
_FLAG_SETS = (
    ["-O3", "-march=native"],
    ["-O3"],  # compilers/hosts without -march=native (e.g. some ARM toolchains)
)
_COMMON_FLAGS = ["-std=c++17", "-shared", "-fPIC", "-fno-math-errno",
                 "-fno-trapping-math", "-fassociative-math", "-fno-signed-zeros"]

_log = logging.getLogger("attnjax")
_lock = threading.Lock()
_state: dict = {}
_local = threading.local()


def _cache_dir() -> Path:
    root = os.environ.get("ATTNJAX_CACHE_DIR")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "attnjax"


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_signature() -> str:
    """Model and feature flags of this CPU (the library is built for it)."""
    text = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "flags", "Features")):
                    text += line
                    if line.startswith(("flags", "Features")):
                        break
    except OSError:
        text += platform.processor()
    return text


def _build() -> Path:
    """Compile (or find in the cache) the shared library; raises ``RuntimeError`` with the reason."""
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found ($CXX, c++, g++, clang++)")
    import jaxlib  # noqa: PLC0415

    include = jax.ffi.include_dir()
    key = hashlib.sha256()
    for part in (_SOURCE.read_bytes(), jaxlib.__version__.encode(), cxx.encode(),
                 _cpu_signature().encode(), " ".join(_COMMON_FLAGS).encode()):
        key.update(part)
    out = _cache_dir() / f"decode_cpu-{key.hexdigest()[:16]}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    _log.info("attnjax: compiling the native CPU decode kernel into %s (once per host)", out)
    errors = []
    for flags in _FLAG_SETS:
        # build under a temporary name, then rename: concurrent builders never see a partial file
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
        os.close(fd)
        cmd = [cxx, *flags, *_COMMON_FLAGS, "-isystem", include, str(_SOURCE), "-o", tmp]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired) as e:
            errors.append(f"{' '.join(cmd)}: {e}")
            Path(tmp).unlink(missing_ok=True)
            continue
        if proc.returncode == 0:
            os.replace(tmp, out)
            return out
        Path(tmp).unlink(missing_ok=True)
        errors.append(f"{' '.join(cmd)}:\n{proc.stderr[-2000:]}")
    raise RuntimeError("compiling the native decode kernel failed:\n" + "\n".join(errors))


def _load() -> tuple[bool, str]:
    with _lock:
        if "ok" not in _state:
            try:
                path = _build()
                lib = ctypes.cdll.LoadLibrary(str(path))
                jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.AttnjaxDecodeCpu),
                                            platform="cpu")
                _state.update(ok=True, reason=f"built at {path}", lib=lib)
            except Exception as e:  # noqa: BLE001 - any failure means: use the pure-JAX path
                _state.update(ok=False, reason=f"{type(e).__name__}: {e}")
        return _state["ok"], _state["reason"]


def status() -> dict:
    """``{"enabled": bool, "reason": str}``: whether the native decode kernel is in use, and why
    (builds it on first call)."""
    if getattr(_local, "disabled", False):
        return dict(enabled=False, reason="disabled by attnjax._src.native.disabled()")
    if os.environ.get(_ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
        return dict(enabled=False, reason=f"{_ENV_SWITCH}={os.environ[_ENV_SWITCH]}")
    ok, reason = _load()
    return dict(enabled=ok, reason=reason)


def enabled() -> bool:
    """Whether decoding on the CPU may use the native kernel (builds it on first call)."""
    return status()["enabled"]


class disabled:
    """Context manager: trace decoding steps with the pure-JAX path (tests, comparisons).

    Like every dispatch decision it applies when a function is traced.
    """

    def __enter__(self):
        self._prev = getattr(_local, "disabled", False)
        _local.disabled = True

    def __exit__(self, *exc):
        _local.disabled = self._prev


def decode_step(q, k_new, v_new, k_cache, v_cache, idx, P, P_end, *, window_left, ring,
                soft_cap, scale=1.0):
    """The native step: ``(k_cache, v_cache, out, lse)``.

    ``q (B, T, N, H)`` float32, multiplied by ``scale`` in the kernel; ``k_new (B, T, K, H)`` /
    ``v_new`` in the cache dtype; ``idx (B, T)`` int32 slots to write (``< 0`` or ``>= L``: not
    written); ``P``, ``P_end`` ``(B,)`` int32 lengths before and after the step.
    ``out (B, T, N, Hv)`` float32 is the attention over the cached positions ``< P`` still in the
    buffers (zeros where none is visible), ``lse (B, T, N)`` its log-sum-exp (``-inf`` there).
    The cache buffers are aliased in and out (in place when donated).
    """
    B, T, N, _ = q.shape
    Hv = v_cache.shape[-1]
    f32 = np.dtype(np.float32)
    return jax.ffi.ffi_call(
        TARGET,
        (jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype),
         jax.ShapeDtypeStruct(v_cache.shape, v_cache.dtype),
         jax.ShapeDtypeStruct((B, T, N, Hv), f32),
         jax.ShapeDtypeStruct((B, T, N), f32)),
        input_output_aliases={3: 0, 4: 1},
        vmap_method="sequential",
    )(q, k_new, v_new, k_cache, v_cache, idx, P, P_end,
      window_left=np.int64(-1 if window_left is None else int(window_left)),
      ring=np.int64(bool(ring)), soft_cap=np.float32(soft_cap or 0.0),
      scale=np.float32(scale))
