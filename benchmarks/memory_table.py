"""Compile-time temp memory of attention, materialised vs chunked, against sequence length.

Usage: python benchmarks/memory_table.py [--max-log2 16] [--heads 8] [--head-dim 64]
(or ``python -m attnjax.benchmarks.memory_table`` from an install)

Nothing is executed: each configuration is only lowered and compiled, and XLA's
``memory_analysis().temp_size_in_bytes`` is read off (deterministic, any machine).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

import attnjax

try:
    from .hostinfo import format_host
except ImportError:  # run as a file: python benchmarks/memory_table.py
    from hostinfo import format_host


def temp_bytes(impl: str, T: int, *, grad: bool, heads: int, head_dim: int, causal=False) -> int:
    spec = jax.ShapeDtypeStruct((1, T, heads, head_dim), jnp.float32)

    def f(q, k, v):
        out = attnjax.dot_product_attention(q, k, v, implementation=impl, is_causal=causal)
        return jnp.sum(out)

    g = jax.grad(f, argnums=(0, 1, 2)) if grad else f
    return jax.jit(g).lower(spec, spec, spec).compile().memory_analysis().temp_size_in_bytes


def _fmt(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--min-log2", type=int, default=10)
    p.add_argument("--max-log2", type=int, default=16)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    a = p.parse_args(argv)
    if a.min_log2 > a.max_log2:
        p.error(f"--min-log2 {a.min_log2} is greater than --max-log2 {a.max_log2}")
    print(format_host())
    print(f"B=1, N={a.heads}, H={a.head_dim}, float32; XLA temp bytes from memory_analysis()")
    print("| T = S | xla fwd | xla fwd+bwd | xla_chunked fwd | xla_chunked fwd+bwd |")
    print("|---:|---:|---:|---:|---:|")
    for e in range(a.min_log2, a.max_log2 + 1):
        T = 2**e
        row = [
            temp_bytes(impl, T, grad=g, heads=a.heads, head_dim=a.head_dim)
            for impl in ("xla", "xla_chunked")
            for g in (False, True)
        ]
        print(f"| {T} | " + " | ".join(_fmt(x) for x in row) + " |", flush=True)


if __name__ == "__main__":
    main()
