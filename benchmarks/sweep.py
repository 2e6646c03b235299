"""The sweep: implementation × sequence length × mode × causal, timed with a shared FLOP count."""

from __future__ import annotations

import dataclasses
import time

from .backends import MEMORY_EFFICIENT, Backend, Case, all_backends, median_min_max
from .flops import MODES, attention_flops
from .hostinfo import host_info

GIB = 1 << 30


@dataclasses.dataclass
class SweepConfig:
    """What to run. See ``attnjax-bench --help`` for the meaning of each field.

    ``ceiling_repeats``: timed runs of the ceiling matmul per measurement (their median).
    ``ceiling_reuse_s``: the measurement that ends a cell also opens the next one when that cell
    starts timing less than this many seconds later; otherwise the ceiling is measured again.
    """

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
    ceiling_repeats: int = 3
    ceiling_reuse_s: float = 10.0
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


class MatmulCeiling:
    """The matmul ceiling: a jitted ``n×n @ n×n`` matmul (``2·n³`` FLOPs), compiled once.

    The sweep measures it again and again, right before and right after every timed cell, so
    that a cell's share of the ceiling compares it with what the machine delivered at the same
    time (the load on a shared machine changes during a run). Every measurement is kept in
    :attr:`samples`.
    """

    def __init__(self, n: int = 2048, dtype: str = "float32"):
        import jax
        import jax.numpy as jnp

        self.n, self.dtype = n, dtype
        ka, kb = jax.random.split(jax.random.key(1))
        self._a = jax.random.normal(ka, (n, n), jnp.dtype(dtype))
        self._b = jax.random.normal(kb, (n, n), jnp.dtype(dtype))
        self._f = jax.jit(jnp.dot).lower(self._a, self._b).compile()
        self._block = jax.block_until_ready
        self._block(self._f(self._a, self._b))  # warm-up
        self._t0 = time.perf_counter()
        self.samples: list[dict] = []
        self.seconds = 0.0  # time spent measuring

    def measure(self, repeats: int = 3) -> dict:
        """Time ``repeats`` runs; returns (and keeps) ``{"t_s", "gflops", "median_s", ...}``."""
        start = time.perf_counter()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            self._block(self._f(self._a, self._b))
            times.append(time.perf_counter() - t0)
        med, lo, hi = median_min_max(times)
        sample = {"t_s": start - self._t0, "gflops": 2 * self.n**3 / med / 1e9,
                  "median_s": med, "min_s": lo, "max_s": hi, "repeats": repeats}
        self.samples.append(sample)
        self.seconds += time.perf_counter() - start
        return sample

    def age_s(self) -> float:
        """Seconds since the end of the last measurement (infinite before the first)."""
        if not self.samples:
            return float("inf")
        last = self.samples[-1]
        return time.perf_counter() - self._t0 - last["t_s"] - last["repeats"] * last["median_s"]

    def summary(self) -> dict:
        """All measurements and their spread: ``gflops`` is the median over the samples."""
        g = [s["gflops"] for s in self.samples]
        med, lo, hi = median_min_max(g) if g else (None, None, None)
        return {"n": self.n, "dtype": self.dtype, "gflops": med, "min_gflops": lo,
                "max_gflops": hi, "count": len(g), "seconds": self.seconds,
                "samples": list(self.samples)}


def measure_matmul_ceiling(n: int = 2048, repeats: int = 10, dtype: str = "float32") -> dict:
    """GFLOP/s of a jitted ``n×n @ n×n`` matmul (``2·n³`` FLOPs), median of ``repeats``."""
    return {"n": n, "dtype": dtype, **MatmulCeiling(n, dtype).measure(repeats)}


def machine_info() -> dict:
    """:func:`hostinfo.host_info` plus the attnjax version."""
    info = host_info()
    try:
        import attnjax

        info["attnjax"] = attnjax.__version__
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
        "ceiling_gflops": None, "ceiling_min_gflops": None, "ceiling_max_gflops": None,
        "temp_bytes": None, "total_bytes": None, "compile_s": None,
    }


def run_cell(backend: Backend, case: Case, cfg: SweepConfig, ceiling_gflops: float | None,
             est_s: float | None, *, ceiling: MatmulCeiling | None = None) -> dict:
    """Compile, check the budgets, warm up and time one cell. Never raises.

    The cell's share of the matmul ceiling (``frac_ceiling``) is its GFLOP/s over
    ``ceiling_gflops``, or, when ``ceiling`` is given, over the mean of two measurements of it
    bracketing the timed runs: one right before (or the previous cell's closing one, when it is
    less than ``cfg.ceiling_reuse_s`` old) and one right after. The row keeps the reference used
    (``ceiling_gflops``) and the bracket's ``ceiling_min_gflops`` / ``ceiling_max_gflops``.
    """
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
        bracket = []
        if ceiling is not None:
            bracket.append(ceiling.samples[-1]["gflops"] if ceiling.age_s() < cfg.ceiling_reuse_s
                           else ceiling.measure(cfg.ceiling_repeats)["gflops"])
        times: list[float] = []
        while len(times) < cfg.repeats:
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
            if sum(times) >= cfg.max_cell_s:
                break
        if ceiling is not None:
            bracket.append(ceiling.measure(cfg.ceiling_repeats)["gflops"])
        elif ceiling_gflops:
            bracket.append(ceiling_gflops)
        med, lo, hi = median_min_max(times)
        gflops = flops / med / 1e9
        row.update(median_s=med, min_s=lo, max_s=hi, repeats=len(times), gflops=gflops)
        if bracket:
            ref = sum(bracket) / len(bracket)
            row.update(frac_ceiling=gflops / ref, ceiling_gflops=ref,
                       ceiling_min_gflops=min(bracket), ceiling_max_gflops=max(bracket))
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
    ceiling = MatmulCeiling(cfg.ceiling_n)
    first = ceiling.measure(cfg.ceiling_repeats)
    log(f"matmul ceiling: jitted {cfg.ceiling_n}² float32 dot: {first['gflops']:.0f} GFLOP/s "
        f"(median of {cfg.ceiling_repeats}; measured again around every timed cell)")
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
        row = run_cell(backend, case, cfg, None, est, ceiling=ceiling)
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
    return {"meta": meta, "config": config, "ceiling": ceiling.summary(),
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


