"""Ring attention on simulated CPU devices: per-device memory and time against device count.

Two sweeps over P = 1, 2, 4, 8 devices on one mesh axis (``attnjax.ring_attention_sharded``,
causal, zigzag layout, forward + backward):

* fixed total length T (each device holds T/P): per-device memory should fall as 1/P;
* fixed length per device L (total P·L): per-device memory should stay flat.

Memory is XLA's compile-time ``memory_analysis()`` of the compiled SPMD program, which is per
device: ``temp`` (scratch) and ``args`` (this device's shards of q, k, v). Time is the median
wall time of a jitted forward + backward. The simulated devices (``--xla_force_host_platform_
device_count``) all share this machine's cores, so the time column measures total work plus ring
overhead, not the speed-up real devices would give.

Usage::

    python benchmarks/ring_bench.py                    # defaults below
    python benchmarks/ring_bench.py --total 16384 --per-device 2048 --repeats 3
    python benchmarks/ring_bench.py --no-time          # memory only (compile, never run)
    python -m attnjax.benchmarks.ring_bench            # the same, from an install
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import attnjax  # noqa: E402

try:
    from .hostinfo import format_host
except ImportError:  # run as a file: python benchmarks/ring_bench.py
    from hostinfo import format_host

DEVICE_COUNTS = (1, 2, 4, 8)


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def measure(num_devices: int, total: int, args) -> dict:
    mesh = jax.make_mesh((num_devices,), ("seq",), axis_types=(AxisType.Explicit,))
    sharding = NamedSharding(mesh, P(None, "seq"))
    shape = (args.batch, total, args.heads, args.head_dim)

    def loss(q, k, v):
        out = attnjax.ring_attention_sharded(
            q, k, v, mesh=mesh, seq_axis="seq", layout=args.layout, is_causal=not args.no_causal,
            chunk_size=args.chunk)
        return jnp.sum(out.astype(jnp.float32) ** 2)

    step = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    spec = jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sharding)
    compiled = step.lower(spec, spec, spec).compile()
    mem = compiled.memory_analysis()
    row = {"P": num_devices, "total": total, "per_device": total // num_devices,
           "temp": mem.temp_size_in_bytes, "args": mem.argument_size_in_bytes, "time": None}
    if not args.no_time:
        keys = jax.random.split(jax.random.key(0), 3)
        q, k, v = (jax.device_put(jax.random.normal(kk, shape, jnp.float32), sharding)
                   for kk in keys)
        jax.block_until_ready(compiled(q, k, v))  # warm-up
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(q, k, v))
            times.append(time.perf_counter() - t0)
        row["time"] = statistics.median(times)
    return row


def table(title: str, rows: list[dict]) -> str:
    lines = [f"### {title}", "",
             "| P | total T | T per device | temp / device | args / device | fwd+bwd time |",
             "|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        t = "-" if r["time"] is None else f"{r['time'] * 1e3:.0f} ms"
        lines.append(f"| {r['P']} | {r['total']} | {r['per_device']} | {_mib(r['temp'])} | "
                     f"{_mib(r['args'])} | {t} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--total", type=int, default=8192, help="fixed total length sweep")
    ap.add_argument("--per-device", type=int, default=1024, help="fixed per-device length sweep")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--layout", default="zigzag", choices=("contiguous", "zigzag"))
    ap.add_argument("--no-causal", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-time", action="store_true", help="memory only")
    args = ap.parse_args(argv)
    seg = 2 if args.layout == "zigzag" else 1  # zigzag: two segments per device
    need = seg * max(DEVICE_COUNTS)
    if args.total % need or args.total < need:
        ap.error(f"--total {args.total} must be a positive multiple of {need} ({seg} segment(s) "
                 f"on each of up to {max(DEVICE_COUNTS)} devices, layout {args.layout})")
    if args.per_device % seg or args.per_device < seg:
        ap.error(f"--per-device {args.per_device} must be a positive multiple of {seg} "
                 f"(layout {args.layout})")

    print(f"# {format_host()}\n")
    print(f"# ring attention, simulated CPU devices ({jax.device_count()} available); "
          f"B={args.batch} N={args.heads} H={args.head_dim} float32, "
          f"{'' if args.no_causal else 'causal, '}{args.layout}, chunk {args.chunk}, fwd+bwd\n")
    fixed_total = [measure(p, args.total, args) for p in DEVICE_COUNTS]
    print(table(f"Fixed total length T = {args.total}", fixed_total) + "\n")
    fixed_local = [measure(p, p * args.per_device, args) for p in DEVICE_COUNTS]
    print(table(f"Fixed length per device T/P = {args.per_device}", fixed_local))


if __name__ == "__main__":
    main()
