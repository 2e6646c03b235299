"""The machine a benchmark ran on, for the header of every table and the JSON.

CPU timings (and ratios against torch) differ by host: the same code measured 0.7× torch on a
2-core AVX2-only VM and 1.3–1.7× on an AVX-512 host. :func:`host_info` collects what a reader
needs to tell hosts apart (CPU model, the vector ISA flags that matter, usable cores, jax and
torch versions); :func:`format_host` turns it into one line.

Cheap to call: torch is never imported here (its version is read from the installed metadata;
its thread count only when the caller has already imported it).
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import sys

#: The x86 flags (as spelled in ``/proc/cpuinfo``) that decide which kernels XLA and torch use.
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile")


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of ``/proc/cpuinfo`` (Linux); empty where there is none."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    if fields:
                        break
                    continue
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def host_info() -> dict:
    """Describe this machine and the software versions, as a JSON-serialisable dict.

    Returns:
      A dict with ``cpu_model``, ``cpu_family_model`` (x86), ``isa`` (the flags of :data:`ISA_FLAGS` this CPU has, ``None``
      when unknown, e.g. outside Linux), ``avx512`` (bool or ``None``), ``cpu_count`` (logical
      CPUs), ``usable_cores`` (CPUs this process may run on), ``platform``, ``python``, ``jax``,
      ``jaxlib``, ``device`` (JAX's default backend and device kind), ``torch`` (version or ``None``),
      ``torch_threads`` (when torch is already imported), ``xla_flags`` and ``date_utc``.
    """
    cpu = _cpuinfo()
    flags = cpu.get("flags", cpu.get("Features"))
    flags = None if flags is None else set(flags.split())
    info = {
        "cpu_model": cpu.get("model name") or platform.processor() or platform.machine(),
        # x86 family/model numbers name the microarchitecture when a VM hides the model number.
        "cpu_family_model": (f"family {cpu['cpu family']} model {cpu['model']}"
                             if "cpu family" in cpu and "model" in cpu else None),
        "isa": None if flags is None else [f for f in ISA_FLAGS if f in flags],
        "avx512": None if flags is None else "avx512f" in flags,
        "cpu_count": os.cpu_count(),
        "usable_cores": (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                         else os.cpu_count()),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax": _version("jax"),
        "jaxlib": _version("jaxlib"),
        "device": None,
        "torch": _version("torch"),
        "torch_threads": None,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "date_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    try:
        import jax

        info["jax"] = jax.__version__
        kind = jax.devices()[0].device_kind
        backend = jax.default_backend()
        info["device"] = backend if kind == backend else f"{backend} ({kind})"
    except Exception:  # noqa: BLE001 - no JAX backend: leave the device unknown
        pass
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "get_num_threads"):
        info["torch_threads"] = torch.get_num_threads()
    return info


def format_host(info: dict | None = None) -> str:
    """One line naming the host, e.g. for the header of a table.

    Example: ``host: AMD EPYC (family 25 model 1) | AVX2, no AVX-512 (avx2 fma) | 2 cores |
    jax 0.10.2 on cpu | torch 2.5.1 (2 threads)``.
    """
    info = host_info() if info is None else info
    if info.get("isa") is None:
        isa = "ISA flags unknown"
    else:
        vec = ("AVX-512" if info["avx512"] else
               "AVX2, no AVX-512" if "avx2" in info["isa"] else "no AVX2")
        isa = f"{vec} ({' '.join(info['isa']) or 'none of ' + ' '.join(ISA_FLAGS)})"
    cores = f"{info['usable_cores']} cores"
    if info.get("cpu_count") not in (None, info["usable_cores"]):
        cores += f" (of {info['cpu_count']})"
    torch = "torch not installed" if info.get("torch") is None else f"torch {info['torch']}"
    if info.get("torch_threads") is not None:
        torch += f" ({info['torch_threads']} threads)"
    model = info["cpu_model"]
    if info.get("cpu_family_model"):
        model += f" ({info['cpu_family_model']})"
    jax = f"jax {info['jax']}" + (f" on {info['device']}" if info.get("device") else "")
    parts = [f"host: {model}", isa, cores, jax, torch]
    if info.get("xla_flags"):
        parts.append(f"XLA_FLAGS={info['xla_flags']}")
    return " | ".join(parts)


if __name__ == "__main__":
    print(format_host())
