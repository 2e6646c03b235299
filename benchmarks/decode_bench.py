"""Per-step decode time and compiled temp memory of attnjax.cached_attention.

One new token (T=1) against a cache holding ``L - 1`` tokens (so the step reads the whole cache),
for cache lengths 1k, 8k, 64k; B=1, N=8 query heads, H=64, float32; MHA (K=8) and GQA (K=2).
The step is jitted with the cache donated (updated in place). For comparison, the same step the
way the stock Flax decode path does it: ``dynamic_update_slice`` into the cache, then
``jax.nn.dot_product_attention`` with a ``(B, 1, 1, L)`` validity mask over the whole cache.

Usage::

    PYTHONPATH=. python benchmarks/decode_bench.py [--lengths 1024 8192 65536] [--steps 50]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from attnjax import KVCache, cached_attention


def _time_steps(step, state, args, steps: int):
    """Median wall time of one step (state threaded through, as in a generation loop)."""
    out, state = step(*args, state)  # compile + warm up
    jax.block_until_ready(out)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        out, state = step(*args, state)
        jax.block_until_ready(out)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), state


def bench(L: int, K: int, steps: int, chunk: int | None, B=1, N=8, H=64):
    q = jnp.ones((B, 1, N, H), jnp.float32)
    k = v = jnp.ones((B, 1, K, H), jnp.float32)
    rows = {}

    # attnjax: split-K read of the cache, in-place update.
    cache = KVCache.create(B, L, K, H)
    cache = KVCache(jax.random.normal(jax.random.key(0), cache.key.shape),
                    jax.random.normal(jax.random.key(1), cache.value.shape),
                    jnp.full((B,), L - 1, jnp.int32))

    def ours(q, k, v, c):
        out, c = cached_attention(q, k, v, c, chunk_size=chunk)
        # keep the cache full (length L - 1) so every timed step reads all of it
        return out, KVCache(c.key, c.value, c.lengths - 1, c.window)

    step = jax.jit(ours, donate_argnums=3)
    temp = step.lower(q, k, v, cache).compile().memory_analysis().temp_size_in_bytes
    t, _ = _time_steps(step, cache, (q, k, v), steps)
    rows["attnjax"] = (t, temp)

    # stock-Flax-style step: write, then attend over the whole cache with a mask.
    ck = jax.random.normal(jax.random.key(0), (B, L, K, H))
    cv = jax.random.normal(jax.random.key(1), (B, L, K, H))
    state = (ck, cv, jnp.int32(L - 1))

    def stock(q, k, v, st):
        ck, cv, idx = st
        ck = jax.lax.dynamic_update_slice(ck, k, (0, idx, 0, 0))
        cv = jax.lax.dynamic_update_slice(cv, v, (0, idx, 0, 0))
        mask = jnp.broadcast_to(jnp.arange(L) <= idx, (B, 1, 1, L))
        out = jax.nn.dot_product_attention(q, ck, cv, mask=mask)
        return out, (ck, cv, idx)

    step = jax.jit(stock, donate_argnums=3)
    temp = step.lower(q, k, v, state).compile().memory_analysis().temp_size_in_bytes
    t, _ = _time_steps(step, state, (q, k, v), steps)
    rows["stock-style"] = (t, temp)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 8192, 65536])
    ap.add_argument("--kv-heads", type=int, nargs="+", default=[8, 2])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--chunk", type=int, default=None, help="cache slots per chunk (default 1024)")
    args = ap.parse_args(argv)
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, device {jax.devices()[0]}")
    print("B=1 N=8 H=64 float32, one-token step against a full cache, median of "
          f"{args.steps} steps")
    cache_mib = lambda L, K: 2 * L * K * 64 * 4 / 2**20  # noqa: E731
    print(f"{'cache L':>8} {'K':>2} {'cache MiB':>9} | {'impl':<11} {'ms/step':>8} "
          f"{'temp MiB':>9}")
    for K in args.kv_heads:
        for L in args.lengths:
            rows = bench(L, K, args.steps, args.chunk)
            for name, (t, temp) in rows.items():
                print(f"{L:>8} {K:>2} {cache_mib(L, K):>9.1f} | {name:<11} {t * 1e3:>8.3f} "
                      f"{temp / 2**20:>9.2f}", flush=True)


if __name__ == "__main__":
    main()
