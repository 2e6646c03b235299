"""Decode-step time of attnjax.cached_attention against the memory floor, measured side by side.

A decoding step must read every cached key and value once; that read is its floor. For each
configuration this benchmark times, alternately in the same run,

* the **floor**: a jitted reduction that reads the cache's K and V once
  (``jnp.sum(k) + jnp.sum(v)``, accumulated in float32), and
* the **step**: ``cached_attention`` of ``T`` new tokens (``T = 1`` ordinary decoding, ``T = 4`` a
  speculative step) against a cache holding ``L - T`` tokens, so the step reads all of it; jitted
  with the cache donated (updated in place), the state threaded from step to step as in a
  generation loop; on the CPU by the native kernel when it is available (the header says), and
* the **xla step**: the same step traced with the native kernel disabled (the pure-JAX path,
  which every other platform runs), side by side;
* for caches stored in bfloat16/float16 also the **read**: the same jitted reduction over a
  float32 array of the cache's byte count (XLA:CPU's reduction of a bfloat16 array is slower
  than memory, so the floor above overstates the cost of reading those bytes; ``step/read`` is
  the stricter ratio),

and prints the medians and their ratio (the median over repeats of step / floor timed back to
back, robust to load that drifts during the run), with the compiled temp memory of the step.
Before every timed call an untimed read of an unrelated buffer (twice the last-level cache, at
least 64 MiB) evicts the CPU caches, so the floor and the step both start cold, as a layer's
cache does in a model whose other layers ran in between. Without it (``--warm``, the bench before
2026-12-01) the step ran right after the floor had read the same cache, and caches that fit in
the last-level cache (here B=1, K=2) read partly from it: on a Zen 4 VM with a 32 MiB L3,
bfloat16 K=2 4-token steps took 12-25 % less time than cold at 32k, 2-13 % at 64k.
Optionally (``--stock``) the stock Flax decode step is timed too: ``dynamic_update_slice`` into
the cache, then ``jax.nn.dot_product_attention`` with a ``(B, 1, 1, L)`` mask over the whole cache.

Usage::

    PYTHONPATH=. python benchmarks/decode_bench.py                 # the full table
    PYTHONPATH=. python benchmarks/decode_bench.py --batch 1 --kv-heads 8 --lengths 65536 \\
        --dtypes float32 --tokens 1 --stock --json out.json
"""

from __future__ import annotations

import argparse
import glob
import json
import statistics
import time

import jax
import jax.numpy as jnp

from attnjax import KVCache, cached_attention
from attnjax._src import native

try:  # as part of the package (attnjax.benchmarks) or as a script from benchmarks/
    from .hostinfo import format_host, host_info
except ImportError:
    from hostinfo import format_host, host_info


@jax.jit
def _floor(k, v):
    return jnp.sum(k, dtype=jnp.float32) + jnp.sum(v, dtype=jnp.float32)


def _last_level_cache_bytes() -> int:
    """The largest CPU cache's size in bytes from Linux's sysfs (0 where unknown)."""
    sizes = [0]
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        digits = text[:-1] if text[-1:] in "KMG" else text
        if digits.isdigit():
            sizes.append(int(digits) * scale)
    return max(sizes)


def _evict_bytes() -> int:
    return max(64 * 2**20, 2 * _last_level_cache_bytes())


_evict_buffer = []
_read = jax.jit(jnp.sum)


def _evict():
    """Reads an unrelated buffer of twice the last-level cache (at least 64 MiB)."""
    if not _evict_buffer:
        _evict_buffer.append(jnp.ones((_evict_bytes() // 4,), jnp.float32))
    jax.block_until_ready(_read(_evict_buffer[0]))


def _interleaved(fns, repeats: int, evict: bool = True):
    """Wall times of each ``fn()`` (each blocks on its result), called in turn; with ``evict``,
    each call starts after an untimed read that evicts the CPU caches."""
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if evict:
                _evict()
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def bench(B: int, K: int, L: int, dtype, T: int, repeats: int, chunk: int | None,
          stock: bool, N: int = 8, H: int = 64, evict: bool = True):
    r = jax.random.split(jax.random.key(0), 5)
    q = jax.random.normal(r[0], (B, T, N, H), dtype)
    k = jax.random.normal(r[1], (B, T, K, H), dtype)
    v = jax.random.normal(r[2], (B, T, K, H), dtype)
    fill = jnp.full((B,), L - T, jnp.int32)
    cache = KVCache(jax.random.normal(r[3], (B, L, K, H), dtype),
                    jax.random.normal(r[4], (B, L, K, H), dtype), fill)

    def ours(q, k, v, c):
        out, c = cached_attention(q, k, v, c, chunk_size=chunk)
        # keep the cache full (length L - T) so every timed step reads all of it
        return out, KVCache(c.key, c.value, c.lengths - T, c.window)

    step = jax.jit(ours, donate_argnums=3)
    temp = step.lower(q, k, v, cache).compile().memory_analysis().temp_size_in_bytes
    xstep = jax.jit(lambda *a: ours(*a), donate_argnums=3)  # traced with the pure-JAX path
    state = {"cache": cache, "xcache": KVCache(cache.key + 0, cache.value + 0, fill + 0)}

    def run_step():
        out, state["cache"] = step(q, k, v, state["cache"])
        jax.block_until_ready(out)

    def run_xla():
        with native.disabled():
            out, state["xcache"] = xstep(q, k, v, state["xcache"])
        jax.block_until_ready(out)

    def run_floor():
        jax.block_until_ready(_floor(state["cache"].key, state["cache"].value))

    fns = {"floor": run_floor, "step": run_step, "xla": run_xla}
    narrow = jnp.dtype(dtype).itemsize < 4
    if narrow:  # the same bytes read as float32
        words = B * L * K * H * jnp.dtype(dtype).itemsize // 4
        ka, va = jnp.ones((words,), jnp.float32), jnp.ones((words,), jnp.float32)
        fns["read"] = lambda: jax.block_until_ready(_floor(ka, va))
    if stock:
        st = {"s": (cache.key + 0, cache.value + 0, jnp.int32(L - T))}

        def stock_step(q, k, v, s):
            ck, cv, idx = s
            ck = jax.lax.dynamic_update_slice(ck, k, (0, idx, 0, 0))
            cv = jax.lax.dynamic_update_slice(cv, v, (0, idx, 0, 0))
            # a T-token step sees the cache up to each token's own position
            mask = jnp.arange(L)[None, :] <= idx + jnp.arange(T)[:, None]
            out = jax.nn.dot_product_attention(q, ck, cv,
                                               mask=jnp.broadcast_to(mask, (B, 1, T, L)))
            return out, (ck, cv, idx)

        sstep = jax.jit(stock_step, donate_argnums=3)
        stock_temp = sstep.lower(q, k, v, st["s"]).compile().memory_analysis().temp_size_in_bytes

        def run_stock():
            out, st["s"] = sstep(q, k, v, st["s"])
            jax.block_until_ready(out)

        fns["stock"] = run_stock
    for fn in fns.values():  # compile + warm up
        fn()
    times = _interleaved(fns, repeats, evict)
    row = {
        "B": B, "K": K, "N": N, "H": H, "L": L, "T": T, "dtype": jnp.dtype(dtype).name,
        "cache_MiB": 2 * B * L * K * H * jnp.dtype(dtype).itemsize / 2**20,
        "floor_ms": 1e3 * statistics.median(times["floor"]),
        "step_ms": 1e3 * statistics.median(times["step"]),
        "ratio": statistics.median(s / f for s, f in zip(times["step"], times["floor"], strict=True)),
        "xla_ms": 1e3 * statistics.median(times["xla"]),
        "xla_ratio": statistics.median(
            s / f for s, f in zip(times["xla"], times["floor"], strict=True)),
        "step_temp_MiB": temp / 2**20,
    }
    if narrow:
        row["read_ms"] = 1e3 * statistics.median(times["read"])
        row["read_ratio"] = statistics.median(
            s / f for s, f in zip(times["step"], times["read"], strict=True))
    if stock:
        row["stock_ms"] = 1e3 * statistics.median(times["stock"])
        row["stock_ratio"] = statistics.median(
            s / f for s, f in zip(times["stock"], times["floor"], strict=True))
        row["stock_temp_MiB"] = stock_temp / 2**20
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--kv-heads", type=int, nargs="+", default=[8, 2])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 65536])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 4],
                    help="new tokens per step (1: decoding, 4: a speculative step)")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--chunk", type=int, default=None,
                    help="cache slots per chunk (default: cached_attention's own choice)")
    ap.add_argument("--head-dim", type=int, default=64, help="H (default 64)")
    ap.add_argument("--stock", action="store_true", help="also time the stock Flax-style step")
    ap.add_argument("--warm", action="store_true",
                    help="do not evict the CPU caches before each timed call (see above)")
    ap.add_argument("--json", default=None, help="write the rows to this file")
    args = ap.parse_args(argv)
    info = host_info()
    print(format_host(info))
    st = native.status()
    print(f"native CPU decode kernel: {'on' if st['enabled'] else 'off'} ({st['reason']})")
    print(f"N=8 H={args.head_dim}; step = cached_attention of T new tokens against a full cache, "
          f"jitted, cache donated; floor = jnp.sum(K) + jnp.sum(V), jitted; medians of {args.repeats} "
          "interleaved repeats; ratio = median of step/floor timed back to back; "
          + ("caches not evicted (--warm)" if args.warm else
             f"CPU caches evicted before each timed call ({_evict_bytes() >> 20} MiB read)"))
    head = (f"{'B':>2} {'K':>2} {'dtype':>8} {'L':>6} {'T':>2} {'K+V MiB':>8} | "
            f"{'floor ms':>9} {'step ms':>9} {'ratio':>6} {'temp MiB':>8} | "
            f"{'xla ms':>8} {'ratio':>6} | {'read ms':>8} {'step/read':>9}")
    if args.stock:
        head += f" | {'stock ms':>9} {'ratio':>6} {'temp MiB':>8}"
    print(head, flush=True)
    rows = []
    for T in args.tokens:
        for B in args.batch:
            for K in args.kv_heads:
                for dt in args.dtypes:
                    for L in args.lengths:
                        row = bench(B, K, L, jnp.dtype(dt), T, args.repeats, args.chunk,
                                    args.stock, H=args.head_dim, evict=not args.warm)
                        rows.append(row)
                        line = (f"{B:>2} {K:>2} {row['dtype']:>8} {L:>6} {T:>2} "
                                f"{row['cache_MiB']:>8.0f} | {row['floor_ms']:>9.2f} "
                                f"{row['step_ms']:>9.2f} {row['ratio']:>6.2f} "
                                f"{row['step_temp_MiB']:>8.2f} | {row['xla_ms']:>8.2f} "
                                f"{row['xla_ratio']:>6.2f} | ")
                        line += (f"{row['read_ms']:>8.2f} {row['read_ratio']:>9.2f}"
                                 if "read_ms" in row else f"{'':>8} {'':>9}")
                        if args.stock:
                            line += (f" | {row['stock_ms']:>9.2f} {row['stock_ratio']:>6.2f} "
                                     f"{row['stock_temp_MiB']:>8.2f}")
                        print(line, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"host": info, "native_kernel": st, "evict": not args.warm, "rows": rows},
                      f, indent=1)


if __name__ == "__main__":
    main()
