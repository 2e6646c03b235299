"""A/B timing of the chunked kernel against other versions of it, torch and jax.nn.

For kernel work, not the user-facing benchmark (that is ``attnjax-bench``). Every candidate runs
in the same process, interleaved repeat by repeat, so that ratios stay meaningful on a shared,
noisy machine; besides the wall-clock median and minimum it prints the median process CPU time,
which is far less sensitive to other processes on the machine than wall time.

    python benchmarks/kernel_profile.py --impls jaxnn,chunked,torch,ceiling
    python benchmarks/kernel_profile.py --impls chunked,file:/tmp/old_chunked.py --chunks 512x512,256x256

``file:PATH`` loads another copy of ``attnjax/_src/chunked.py`` and runs it in place of the
installed one. Configurations: ``f8192`` forward at T = S = 8192, ``fb4096`` forward+backward,
``cfb4096`` causal forward+backward. FLOPs are counted as 4·B·N·T·S·H for the forward and 3.5×
that for forward+backward (the matmuls the chunked kernel runs), halved when causal.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import attnjax
import attnjax._src.impl_xla as _impl_xla

try:
    from .hostinfo import format_host
except ImportError:  # run as a file: python benchmarks/kernel_profile.py
    from hostinfo import format_host

_INSTALLED = _impl_xla.attention_chunked  # what implementation="xla_chunked" calls


def _load_chunked(path: str):
    name = "kernel_profile_" + os.path.basename(path).removesuffix(".py")
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return name, mod.attention_chunked


def _time(fns: dict, reps: int):
    wall = {k: [] for k in fns}
    cpu = {k: [] for k in fns}
    for f in fns.values():
        f()  # compile / warm up
    for _ in range(reps):
        for k, f in fns.items():
            c, t = time.process_time(), time.perf_counter()
            f()
            wall[k].append(time.perf_counter() - t)
            cpu[k].append(time.process_time() - c)
    return {k: (statistics.median(wall[k]), min(wall[k]), statistics.median(cpu[k])) for k in fns}


def _run_config(cfg: str, a, chunks) -> None:
    B, N, H = a.batch, a.heads, a.head_dim
    causal, bwd = cfg.startswith("c"), "fb" in cfg
    T = int(cfg.lstrip("cfb"))
    ks = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(x, (B, T, N, H), jnp.float32) for x in ks)

    def build(fn):
        if bwd:
            g = jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v)), argnums=(0, 1, 2)))
        else:
            g = jax.jit(fn)
        return lambda: jax.block_until_ready(g(q, k, v))

    def chunked(kernel, cq, ck):
        def fn(q, k, v):
            _impl_xla.attention_chunked = kernel  # read at trace time
            try:
                return attnjax.dot_product_attention(
                    q, k, v, is_causal=causal, implementation="xla_chunked", chunk_size=(cq, ck))
            finally:
                _impl_xla.attention_chunked = _INSTALLED
        return fn

    fns = {}
    for impl in a.impls.split(","):
        if impl == "chunked" or impl.startswith("file:"):
            name, kernel = ("chunked", _INSTALLED) if impl == "chunked" else _load_chunked(impl[5:])
            for cq, ck in chunks:
                fns[f"{name}{cq}x{ck}"] = build(chunked(kernel, cq, ck))
        elif impl == "jaxnn":
            fns["jaxnn"] = build(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal))
        elif impl == "torch":
            try:
                import torch
            except ImportError:
                print("torch not installed: skipped")
                continue
            torch.set_num_threads(os.cpu_count() or 1)
            tq, tk, tv = (torch.tensor(np.asarray(x)).transpose(1, 2).contiguous().requires_grad_(bwd)
                          for x in (q, k, v))

            def tf(tq=tq, tk=tk, tv=tv):
                o = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)
                if bwd:
                    o.sum().backward()
            fns["torch"] = tf
        elif impl == "ceiling":
            x = jax.random.normal(jax.random.key(5), (2048, 2048), jnp.float32)
            mm = jax.jit(lambda x: x @ x)
            fns["ceiling"] = lambda x=x, mm=mm: jax.block_until_ready(mm(x))
        else:
            raise SystemExit(f"unknown implementation {impl!r}")
    r = _time(fns, a.reps)
    flops = 4 * B * N * T * T * H * (0.5 if causal else 1.0) * (3.5 if bwd else 1.0)
    ceil = 2 * 2048**3 / r["ceiling"][0] if "ceiling" in r else None
    print(f"== {cfg} B={B} N={N} H={H}  ({flops / 1e9:.1f} GFLOP)")
    for name, (med, mn, cpu) in r.items():
        line = f"  {name:24s} {med * 1e3:9.1f} ms (min {mn * 1e3:8.1f}, cpu {cpu * 1e3:8.1f})"
        if name == "ceiling":
            print(line + f"  {ceil / 1e9:6.1f} GFLOP/s")
            continue
        line += f"  {flops / med / 1e9:6.1f} GFLOP/s"
        for ref in ("torch", "jaxnn"):
            if ref in r and name != ref:
                line += f"  x{ref}={r[ref][0] / med:.2f} (cpu {r[ref][2] / cpu:.2f})"
        if ceil:
            line += f"  of_ceiling={flops / med / ceil:.2f}"
        print(line, flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default="fb4096,cfb4096,f8192")
    p.add_argument("--impls", default="jaxnn,chunked,torch,ceiling")
    p.add_argument("--chunks", default="512x512", help="comma list of QxK chunk sizes")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    a = p.parse_args(argv)
    chunks = [tuple(map(int, c.split("x"))) for c in a.chunks.split(",")]

    print(format_host(), flush=True)
    for cfg in a.configs.split(","):
        _run_config(cfg, a, chunks)


if __name__ == "__main__":
    main()
