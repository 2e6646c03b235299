"""The sweep: implementation × sequence length × mode × causal, timed with a shared FLOP count."""

from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import time

from benchmarks.backends import MEMORY_EFFICIENT, Backend, Case, all_backends, median_min_max
from benchmarks.flops import MODES, attention_flops

GIB = 1 << 30


@dataclasses.dataclass
class SweepConfig:
    """What to run. See ``python -m benchmarks --help`` for the meaning of each field."""

    sizes: tuple[int, ...] = (1024, 2048, 4096)
    long_sizes: tuple[int, ...] = (8192,)
    dtypes: tuple[str, ...] = ("float32",)
    batch: int = 1
    heads: int = 8
    head_dim: int = 64
    impls: tuple[str, ...] = ("jax.nn", "attnjax.xla", "attnjax.xla_chunked", "torch.sdpa")
    modes: tuple[str, ...] = MODES
    causal: tuple[bool, ...] = (False, True)
    repeats: int = 5
    max_run_s: float = 6.0
    max_cell_s: float = 1.5
    warmup_max_s: float = 1.0
    budget_bytes: int | None = None
    ceiling_n: int = 2048
    seed: int = 0


def machine_memory_bytes() -> tuple[int, str]:
    """Memory of the default device if it reports one, else the machine's RAM."""
    try:
        import jax

        stats = jax.devices()[0].memory_stats() or {}
        if stats.get("bytes_limit"):
            return int(stats["bytes_limit"]), f"{jax.devices()[0].device_kind} memory"
    except Exception:  # noqa: BLE001 - any backend without memory stats falls through
        pass
    try:
        import psutil

        return int(psutil.virtual_memory().total), "RAM (psutil)"
    except ImportError:
        pass
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024, "RAM (/proc/meminfo)"
    raise RuntimeError("cannot determine the machine's memory; pass --budget-gib")


def default_budget_bytes() -> tuple[int, str]:
    total, what = machine_memory_bytes()
    return int(0.75 * total), f"75% of {total / GIB:.1f} GiB {what}"


def measure_matmul_ceiling(n: int = 2048, repeats: int = 10, dtype: str = "float32") -> dict:
    """GFLOP/s of a jitted ``n×n @ n×n`` matmul (``2·n³`` FLOPs), median of ``repeats``."""
    import jax
    import jax.numpy as jnp

    ka, kb = jax.random.split(jax.random.key(1))
    a = jax.random.normal(ka, (n, n), jnp.dtype(dtype))
    b = jax.random.normal(kb, (n, n), jnp.dtype(dtype))
    f = jax.jit(jnp.dot).lower(a, b).compile()
    jax.block_until_ready(f(a, b))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(f(a, b))
        times.append(time.perf_counter() - t0)
    med, lo, hi = median_min_max(times)
    flops = 2 * n**3
    return {"n": n, "dtype": dtype, "median_s": med, "min_s": lo, "max_s": hi,
            "gflops": flops / med / 1e9, "repeats": repeats}


def machine_info() -> dict:
    import jax

    info = {
        "date_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "device": str(jax.devices()[0]),
        "device_kind": jax.devices()[0].device_kind,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import attnjax

        info["attnjax"] = attnjax.__version__
    except ImportError:
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    return info


def plan(cfg: SweepConfig, backends: dict[str, Backend]) -> list[tuple[Backend, Case]]:
    """All cells in run order: per dtype and implementation, by mode, causal, then size."""
    cells = []
    for dtype in cfg.dtypes:
        for name in cfg.impls:
            backend = backends[name]
            sizes = sorted(set(cfg.sizes) | (set(cfg.long_sizes) if name in MEMORY_EFFICIENT
                                             else set()))
            for mode in cfg.modes:
                for causal in cfg.causal:
                    for t in sizes:
                        cells.append((backend, Case(cfg.batch, t, cfg.heads, cfg.head_dim,
                                                    dtype=dtype, causal=causal, mode=mode)))
    return cells


def _row(backend: Backend, case: Case, flops: int) -> dict:
    return {
        "impl": backend.name, "dtype": case.dtype, "batch": case.batch, "seq_len": case.seq_len,
        "heads": case.heads, "head_dim": case.head_dim, "mode": case.mode, "causal": case.causal,
        "status": "ok", "note": "", "median_s": None, "min_s": None, "max_s": None,
        "repeats": 0, "flops": flops, "gflops": None, "frac_ceiling": None,
        "temp_bytes": None, "total_bytes": None, "compile_s": None,
    }


def run_cell(backend: Backend, case: Case, cfg: SweepConfig, ceiling_gflops: float | None,
             est_s: float | None) -> dict:
    """Compile, check the budgets, warm up and time one cell. Never raises."""
    flops = attention_flops(case.batch, case.heads, case.seq_len, case.seq_len, case.head_dim,
                            case.mode)
    row = _row(backend, case, flops)
    if est_s is not None and est_s > cfg.max_run_s:
        row.update(status="skipped",
                   note=f"est. {est_s:.1f} s/run > --max-run-seconds {cfg.max_run_s:g}")
        return row
    try:
        compiled = backend.compile(case)
        row.update(compile_s=compiled.compile_s, temp_bytes=compiled.temp_bytes,
                   total_bytes=compiled.total_bytes)
        if (cfg.budget_bytes is not None and compiled.total_bytes is not None
                and compiled.total_bytes > cfg.budget_bytes):
            row.update(status="skipped",
                       note=f"needs {compiled.total_bytes / GIB:.1f} GiB > budget "
                            f"{cfg.budget_bytes / GIB:.1f} GiB")
            return row
        run = compiled.make_runner(cfg.seed)
        if est_s is None or est_s <= cfg.warmup_max_s:
            run()  # warm-up, untimed
        times: list[float] = []
        while len(times) < cfg.repeats:
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
            if sum(times) >= cfg.max_cell_s:
                break
        med, lo, hi = median_min_max(times)
        gflops = flops / med / 1e9
        row.update(median_s=med, min_s=lo, max_s=hi, repeats=len(times), gflops=gflops,
                   frac_ceiling=(gflops / ceiling_gflops) if ceiling_gflops else None)
    except Exception as e:  # noqa: BLE001 - a failing cell is reported, the sweep goes on
        msg = f"{type(e).__name__}: {e}".splitlines()[0]
        row.update(status="error", note=msg[:160])
    return row


def run_sweep(cfg: SweepConfig, *, progress: bool = True, log=print,
              backends: dict[str, Backend] | None = None) -> dict:
    """Run the sweep; returns ``{"meta", "config", "ceiling", "skipped_impls", "rows"}``."""
    backends = all_backends() if backends is None else backends
    unknown = [n for n in cfg.impls if n not in backends]
    if unknown:
        raise ValueError(f"unknown implementation(s) {unknown}; choose from {list(backends)}")
    skipped_impls = {}
    usable = []
    for name in cfg.impls:
        reason = backends[name].unavailable_reason()
        if reason is None:
            usable.append(name)
        else:
            skipped_impls[name] = reason
            log(f"skipping {name}: {reason}")
    cfg = dataclasses.replace(cfg, impls=tuple(usable))
    t_start = time.perf_counter()
    ceiling = measure_matmul_ceiling(cfg.ceiling_n)
    log(f"matmul ceiling: jitted {cfg.ceiling_n}² float32 dot: {ceiling['gflops']:.0f} GFLOP/s "
        f"(median of {ceiling['repeats']})")
    cells = plan(cfg, backends)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(cells), unit="cell", dynamic_ncols=True)
    rows = []
    last: dict[tuple, tuple[int, float]] = {}
    for backend, case in cells:
        if bar is not None:
            bar.set_postfix_str(f"{backend.name} T={case.seq_len} {case.mode}"
                                f"{' causal' if case.causal else ''}")
        key = (backend.name, case.dtype, case.mode, case.causal)
        est = None
        if key in last:
            t_prev, s_prev = last[key]
            est = s_prev * (case.seq_len / t_prev) ** 2
        row = run_cell(backend, case, cfg, ceiling["gflops"], est)
        if row["status"] == "ok":
            last[key] = (case.seq_len, row["median_s"])
        elif row["status"] == "skipped" and est is not None:
            last[key] = (case.seq_len, est)
        rows.append(row)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    config = dataclasses.asdict(cfg)
    meta = machine_info()
    meta["wall_s"] = time.perf_counter() - t_start
    meta["budget_bytes"] = cfg.budget_bytes
    return {"meta": meta, "config": config, "ceiling": ceiling,
            "skipped_impls": skipped_impls, "rows": rows,
            "flop_convention": "fwd 4·B·N·T·S·H, fwd+bwd 12·B·N·T·S·H (causal: same count)"}


def speedups(rows: list[dict], target: str = "attnjax.xla_chunked",
             against: tuple[str, ...] = ("jax.nn", "torch.sdpa")) -> list[dict]:
    """Speed of ``target`` relative to each of ``against`` (>1 = target faster), per cell."""
    ok = {(r["impl"], r["dtype"], r["seq_len"], r["mode"], r["causal"]): r["median_s"]
          for r in rows if r["status"] == "ok"}
    out = []
    for (impl, dtype, t, mode, causal), med in sorted(ok.items(),
                                                      key=lambda kv: (kv[0][1], kv[0][3],
                                                                      kv[0][4], kv[0][2])):
        if impl != target:
            continue
        entry = {"dtype": dtype, "seq_len": t, "mode": mode, "causal": causal}
        for other in against:
            o = ok.get((other, dtype, t, mode, causal))
            entry[f"vs {other}"] = (o / med) if o is not None else None
        if any(entry[f"vs {other}"] is not None for other in against):
            out.append(entry)
    return out


