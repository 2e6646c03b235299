"""Summary of repeated ``decode_bench.py`` runs: per configuration, the median and range over runs.

One run of ``decode_bench.py`` is one sample of a noisy machine: on a shared VM the same step
moves by up to 2x between runs minutes apart. This script reads the JSON files of several runs
(``decode_bench.py ... --json FILE``) and prints, per configuration (B, K, H, dtype, L, T), a
Markdown table of the medians over runs of the floor and step times, the median and range of
``step / floor`` (and ``step / read`` for bfloat16/float16 caches), the pure-JAX step's time
and how many times slower it is than the step, and for caches of 32k slots and more how many
runs met issue 13's target (``step / floor`` at most 1.5 for one-token steps, 2 for multi-token
steps; both ratios where the run has a read).

Usage::

    for i in 1 2 3 4 5; do
      PYTHONPATH=. python benchmarks/decode_bench.py --tokens 4 --batch 1 --json runs/t4_$i.json
    done
    python benchmarks/decode_summary.py runs/t4_*.json
"""

from __future__ import annotations

import argparse
import json
import statistics

try:  # as part of the package (attnjax.benchmarks) or as a script from benchmarks/
    from .hostinfo import format_host
except ImportError:
    from hostinfo import format_host

TARGET_MIN_LENGTH = 32768  # the target applies to caches of at least this many slots


def target_limit(T: int) -> float:
    """The largest ``step / floor`` the target allows for a step of ``T`` new tokens."""
    return 1.5 if T == 1 else 2.0


def _key(row: dict) -> tuple:
    return (row["B"], row["K"], row.get("H", 64), row["dtype"], row["L"], row["T"])


def summarize(runs: list[list[dict]]) -> list[dict]:
    """Per configuration (in first-seen order), statistics over the runs that measured it.

    ``runs`` holds each run's rows as ``decode_bench.py`` writes them. Each summary has the
    configuration's fields, ``runs`` (how many measured it), ``floor_ms``, ``step_ms`` and
    ``xla_ms`` (medians over runs), ``xla_over_step`` (the median over runs of ``xla_ms /
    step_ms``), ``ratio`` and ``read_ratio`` as ``(median, min, max)`` (``read_ratio`` None
    without a read), and ``met``: how many runs met the target (None where the target does not
    apply).
    """
    groups: dict[tuple, list[dict]] = {}
    for rows in runs:
        for row in rows:
            groups.setdefault(_key(row), []).append(row)
    out = []
    for (B, K, H, dtype, L, T), rows in groups.items():
        ratios = [r["ratio"] for r in rows]
        reads = [r["read_ratio"] for r in rows if r.get("read_ratio") is not None]
        limit = target_limit(T)
        met = None
        if L >= TARGET_MIN_LENGTH:
            met = sum(r["ratio"] <= limit and (r.get("read_ratio") is None
                                               or r["read_ratio"] <= limit) for r in rows)
        out.append({
            "B": B, "K": K, "H": H, "dtype": dtype, "L": L, "T": T, "runs": len(rows),
            "floor_ms": statistics.median(r["floor_ms"] for r in rows),
            "step_ms": statistics.median(r["step_ms"] for r in rows),
            "xla_ms": statistics.median(r["xla_ms"] for r in rows),
            "xla_over_step": statistics.median(r["xla_ms"] / r["step_ms"] for r in rows),
            "ratio": (statistics.median(ratios), min(ratios), max(ratios)),
            "read_ratio": (statistics.median(reads), min(reads), max(reads)) if reads else None,
            "met": met,
        })
    return out


def _length(L: int) -> str:
    return f"{L // 1024}k" if L % 1024 == 0 else str(L)


def _spread(stat) -> str:
    if stat is None:
        return "="
    med, lo, hi = stat
    return f"{med:.2f}× ({lo:.2f}–{hi:.2f})"


def format_summary(summary: list[dict]) -> str:
    """The summary as a Markdown table."""
    lines = [
        "| B | K | H | dtype | L | T | runs | floor ms | step ms | step / floor: median (range) "
        "| step / read: median (range) | target met | pure-JAX step ms | pure-JAX / step |",
        "|--:|--:|--:|:--|--:|--:|--:|--:|--:|:--|:--|:-:|--:|--:|",
    ]
    for s in summary:
        met = "—" if s["met"] is None else f"{s['met']} of {s['runs']}"
        lines.append(
            f"| {s['B']} | {s['K']} | {s['H']} | {s['dtype']} | {_length(s['L'])} | {s['T']} "
            f"| {s['runs']} | {s['floor_ms']:.1f} | {s['step_ms']:.1f} | {_spread(s['ratio'])} "
            f"| {_spread(s['read_ratio'])} | {met} | {s['xla_ms']:.1f} "
            f"| {s['xla_over_step']:.1f}× |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+", help="JSON files written by decode_bench.py --json")
    args = ap.parse_args(argv)
    runs, hosts, modes = [], [], []
    for name in args.files:
        with open(name) as f:
            data = json.load(f)
        if not isinstance(data, dict) or not isinstance(data.get("rows"), list) or not all(
                isinstance(r, dict) and {"B", "K", "dtype", "L", "T"} <= r.keys()
                for r in data["rows"]):
            ap.error(f"{name} is not a JSON file written by decode_bench.py --json (it needs "
                     "'rows' with B, K, dtype, L, T)")
        runs.append(data["rows"])
        host = {k: v for k, v in data.get("host", {}).items() if k != "date_utc"}
        desc = format_host(host) if host else "(no host recorded)"
        if desc not in hosts:
            hosts.append(desc)
        mode = {True: "CPU caches evicted before each timed call", False: "warm (--warm)",
                None: "caches not evicted (decode_bench.py before 2026-12-01)"}[data.get("evict")]
        if mode not in modes:
            modes.append(mode)
    for desc in hosts:
        print(desc)
    print(f"{len(runs)} runs of decode_bench.py; " + "; ".join(modes)
          + (" (mixed: the rows compare unlike runs)" if len(modes) > 1 else ""))
    summary = summarize(runs)
    print(format_summary(summary))
    rows = [s for s in summary if s["met"] is not None]
    if rows:
        every = sum(s["met"] == s["runs"] for s in rows)
        total = sum(s["runs"] for s in rows)
        print(f"\ntarget rows: {len(rows)}; met in every run: {every}; "
              f"measurements meeting it: {sum(s['met'] for s in rows)} of {total}")


if __name__ == "__main__":
    main()
