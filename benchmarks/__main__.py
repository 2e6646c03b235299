"""``attnjax-bench`` / ``python -m attnjax.benchmarks``: the benchmark sweep, "longest" mode and
the mask sweep (``--masks``).

From a source checkout without installing, ``python -m benchmarks`` (in the repository root).

With no arguments: a quick sweep on the default device (about two minutes on a quiet 2-core
CPU); prints the table and writes JSON, CSV and a PNG plot to ``bench_results/``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .backends import BACKEND_NAMES, all_backends
from .flops import MODES

GIB = 1 << 30


def _ints(text: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None
    if any(v <= 0 for v in vals):
        raise argparse.ArgumentTypeError(f"sizes must be positive, got {text!r}")
    return vals


def _choices(allowed):
    def parse(text: str) -> tuple[str, ...]:
        vals = tuple(x.strip() for x in text.split(",") if x.strip())
        bad = [v for v in vals if v not in allowed]
        if bad or not vals:
            raise argparse.ArgumentTypeError(f"got {text!r}; choose from {', '.join(allowed)}")
        return vals

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="attnjax-bench",
        description="Benchmark attention implementations side by side (method: benchmarks/"
                    "README.md in the attnjax repository).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sizes", type=_ints, default=(1024, 2048, 4096),
                   help="sequence lengths T = S for every implementation")
    p.add_argument("--long-sizes", type=_ints, default=(8192,),
                   help="extra lengths for the memory-efficient implementations only "
                        "(attnjax.xla_chunked, torch.sdpa); '' for none")
    p.add_argument("--dtypes", type=_choices(("float32", "bfloat16", "float16")),
                   default=("float32",), help="comma-separated dtypes")
    p.add_argument("--batch", type=int, default=1, help="B")
    p.add_argument("--heads", type=int, default=8, help="N")
    p.add_argument("--head-dim", type=int, default=64, help="H")
    p.add_argument("--impl", type=_choices(BACKEND_NAMES), default=BACKEND_NAMES,
                   help="comma-separated implementations")
    p.add_argument("--modes", type=_choices(MODES), default=MODES, help="fwd and/or fwd+bwd")
    p.add_argument("--causal", choices=("both", "yes", "no"), default="both")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per cell (at most)")
    p.add_argument("--max-cell-seconds", type=float, default=1.5,
                   help="stop timing a cell once its timed runs add up to this (>= 1 run)")
    p.add_argument("--max-run-seconds", type=float, default=6.0,
                   help="skip a cell whose run time, predicted from the previous size (T² "
                        "scaling), exceeds this")
    p.add_argument("--warmup-max-seconds", type=float, default=1.0,
                   help="do one untimed warm-up run unless the run is predicted longer than this")
    p.add_argument("--budget-gib", type=float, default=None,
                   help="memory budget (default: 75%% of the device's memory or the RAM)")
    p.add_argument("--out", type=Path, default=Path("bench_results"), help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ceiling-size", type=int, default=2048,
                   help="n of the jitted n×n float32 matmul that measures the ceiling")
    p.add_argument("--ceiling-repeats", type=int, default=3,
                   help="timed matmuls per ceiling measurement (their median); the ceiling is "
                        "measured right before and right after every timed cell")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    m = p.add_argument_group("mask sweep")
    m.add_argument("--masks", action="store_true",
                   help="instead of the sweep: the flexible-attention sweep (packed documents as "
                   "segment ids / mask_mod + BlockMask / dense mask, causal as a mask_mod, ALiBi "
                   "as a score_mod), fwd+bwd at T=S=--mask-length (benchmarks/mask_bench.py)")
    m.add_argument("--mask-length", type=int, default=8192, help="T = S of the mask sweep")
    g = p.add_argument_group("longest mode")
    g.add_argument("--longest", action="store_true",
                   help="instead of the sweep: the longest power-of-two T whose fwd+bwd fits "
                        "the memory budget, per implementation")
    g.add_argument("--start-len", type=int, default=1024, help="first T of the search")
    g.add_argument("--max-len", type=int, default=1 << 24, help="last T of the search")
    g.add_argument("--confirm-seconds", type=float, default=60.0,
                   help="longest predicted time of the confirmation run")
    g.add_argument("--no-confirm", action="store_true", help="skip the confirmation runs")
    return p


def _budget(args) -> tuple[int, str]:
    from .sweep import default_budget_bytes

    if args.budget_gib is not None:
        return int(args.budget_gib * GIB), f"{args.budget_gib:g} GiB (--budget-gib)"
    return default_budget_bytes()


def run_longest(args) -> int:
    from .hostinfo import format_host
    from .longest import format_longest, longest_for
    from .report import write_json
    from .sweep import machine_info

    budget, what = _budget(args)
    print(format_host(machine_info()))
    print(f"memory budget: {budget / GIB:.3g} GiB = {what}")
    backends = all_backends()
    results = []
    for name in args.impl:
        b = backends[name]
        reason = b.unavailable_reason()
        if reason is not None:
            print(f"skipping {name}: {reason}")
            continue
        for dtype in args.dtypes:
            print(f"{name} ({dtype}):")
            results.append(longest_for(
                b, budget_bytes=budget, batch=args.batch, heads=args.heads,
                head_dim=args.head_dim, dtype=dtype, start=args.start_len, max_len=args.max_len,
                confirm_max_s=args.confirm_seconds, confirm=not args.no_confirm,
                seed=args.seed))
    print()
    meta = machine_info()  # again: torch's thread count is known once torch is imported
    print(format_longest(results, meta=meta))
    args.out.mkdir(parents=True, exist_ok=True)
    path = write_json({"meta": meta, "budget": what, "results": results},
                      args.out / "longest.json")
    print(f"\nwrote {path}")
    return 0


def run_sweep_cli(args) -> int:
    from .hostinfo import format_host
    from .report import format_speedups, format_table, plot, write_csv, write_json
    from .sweep import SweepConfig, run_sweep, speedups

    budget, what = _budget(args)
    causal = {"both": (False, True), "yes": (True,), "no": (False,)}[args.causal]
    cfg = SweepConfig(sizes=args.sizes, long_sizes=args.long_sizes, dtypes=args.dtypes,
                      batch=args.batch, heads=args.heads, head_dim=args.head_dim,
                      impls=args.impl, modes=args.modes, causal=causal, repeats=args.repeats,
                      max_run_s=args.max_run_seconds, max_cell_s=args.max_cell_seconds,
                      warmup_max_s=args.warmup_max_seconds, budget_bytes=budget,
                      ceiling_n=args.ceiling_size, ceiling_repeats=args.ceiling_repeats,
                      seed=args.seed)
    print(f"attnjax-bench: B={cfg.batch} N={cfg.heads} H={cfg.head_dim} "
          f"T={','.join(map(str, cfg.sizes))} (+{','.join(map(str, cfg.long_sizes)) or 'none'} "
          f"memory-efficient only), {','.join(cfg.dtypes)}; memory budget "
          f"{budget / GIB:.3g} GiB = {what}")
    t0 = time.perf_counter()
    result = run_sweep(cfg, progress=not args.no_progress)
    result["budget"] = what
    ceil = result["ceiling"]
    print()
    print(format_table(result["rows"], meta=result["meta"]))
    print()
    print(f"GFLOP/s from {result['flop_convention']}; %ceil = share of the matmul ceiling "
          f"(jitted {ceil['n']}² {ceil['dtype']} dot, median of {args.ceiling_repeats}) "
          f"measured right before and after the cell (their mean; the two are in 'ceil "
          f"GFLOP/s'). Over this run the ceiling measured {ceil['min_gflops']:.0f}–"
          f"{ceil['max_gflops']:.0f} GFLOP/s (median {ceil['gflops']:.0f}, "
          f"{ceil['count']} measurements, {ceil['seconds']:.0f} s).")
    sp = speedups(result["rows"])
    if sp:
        print("\nspeed of attnjax.xla_chunked relative to the others (>1 = attnjax faster):")
        print(format_speedups(sp))
    result["speedups"] = sp
    for name, reason in result["skipped_impls"].items():
        print(f"\nnot run: {name}: {reason}")
    args.out.mkdir(parents=True, exist_ok=True)
    paths = [write_json(result, args.out / "results.json"),
             write_csv(result["rows"], args.out / "results.csv", meta=result["meta"])]
    if not args.no_plot:
        title = (f"B={cfg.batch} N={cfg.heads} H={cfg.head_dim} {','.join(cfg.dtypes)}; "
                 f"matmul ceiling {ceil['min_gflops']:.0f}–{ceil['max_gflops']:.0f} GFLOP/s\n"
                 + format_host(result["meta"]))
        paths.append(plot(result["rows"], args.out / "results.png", title=title))
    print(f"\nwall time {time.perf_counter() - t0:.0f} s; wrote "
          + ", ".join(str(p) for p in paths))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``attnjax-bench``; ``argv`` defaults to ``sys.argv[1:]``."""
    args = build_parser().parse_args(argv)
    for name in ("batch", "heads", "head_dim", "repeats", "ceiling_size", "ceiling_repeats"):
        if getattr(args, name) <= 0:
            build_parser().error(f"--{name.replace('_', '-')} must be positive, "
                                 f"got {getattr(args, name)}")
    if args.longest:
        return run_longest(args)
    if args.masks:
        from .mask_bench import main as mask_main

        if args.mask_length < 16 or args.mask_length % 16:
            build_parser().error(f"--mask-length must be a positive multiple of 16 (the mask "
                                 f"sweep packs 16 equal documents), got {args.mask_length}")
        print("mask sweep: uses --mask-length, --heads, --head-dim and --repeats (B=1, float32, "
              "16 documents); the sweep's other options do not apply", flush=True)
        args.out.mkdir(parents=True, exist_ok=True)
        mask_main(["--length", str(args.mask_length), "--heads", str(args.heads),
                   "--head-dim", str(args.head_dim), "--repeats", str(args.repeats),
                   "--json", str(args.out / "mask_bench.json")])
        return 0
    return run_sweep_cli(args)

if __name__ == "__main__":
    sys.exit(main())
