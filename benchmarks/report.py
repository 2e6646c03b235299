"""Output of a sweep: the text table, JSON, CSV and the log-log plot."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from .hostinfo import format_host

MIB = 1 << 20

CSV_FIELDS = ("impl", "dtype", "batch", "seq_len", "heads", "head_dim", "mode", "causal",
              "status", "median_s", "min_s", "max_s", "repeats", "flops", "gflops",
              "frac_ceiling", "ceiling_gflops", "ceiling_min_gflops", "ceiling_max_gflops",
              "temp_bytes", "total_bytes", "compile_s", "note")
#: Host columns repeated on every CSV row (see :func:`hostinfo.host_info`), so that a CSV file
#: read on its own still names the machine.
CSV_HOST_FIELDS = ("cpu_model", "cpu_family_model", "isa", "usable_cores", "device", "jax",
                   "torch", "torch_threads", "xla_flags")


def _fmt(x, spec: str, none: str = "-") -> str:
    return none if x is None else format(x, spec)


def _range(lo, hi, spec: str) -> str:
    if lo is None:
        return "-"
    a, b = format(lo, spec), format(hi, spec)
    return a if a == b else f"{a}–{b}"


def format_table(rows: list[dict], meta: dict | None = None) -> str:
    """A fixed-width text table, one line per cell, headed by the host line when ``meta``
    (a :func:`hostinfo.host_info` dict) is given.

    ``%ceil`` is the cell's GFLOP/s over the matmul ceiling measured around it; ``ceil GFLOP/s``
    is the min–max of the measurements bracketing the cell (one value when they agree).
    """
    header = ("impl", "dtype", "T", "mode", "causal", "median s", "min–max s", "GFLOP/s",
              "%ceil", "ceil GFLOP/s", "temp MiB", "compile s", "note")
    lines = []
    for r in rows:
        lines.append((
            r["impl"], r["dtype"], str(r["seq_len"]), r["mode"], "yes" if r["causal"] else "no",
            _fmt(r["median_s"], ".4f"),
            "-" if r["min_s"] is None else f"{r['min_s']:.4f}–{r['max_s']:.4f}",
            _fmt(r["gflops"], ".1f"),
            _fmt(None if r["frac_ceiling"] is None else 100 * r["frac_ceiling"], ".0f"),
            _range(r.get("ceiling_min_gflops"), r.get("ceiling_max_gflops"), ".0f"),
            _fmt(None if r["temp_bytes"] is None else r["temp_bytes"] / MIB, ".0f", "n/a"),
            _fmt(r["compile_s"], ".2f", "n/a"),
            (r["status"] + ": " if r["status"] != "ok" else "") + r["note"]
            + (f" (n={r['repeats']})" if r["status"] == "ok" else ""),
        ))
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h)
              for i, h in enumerate(header)]
    right = {2, 5, 6, 7, 8, 9, 10, 11}

    def fmt_line(cols):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cols, widths, strict=True))).rstrip()

    out = [format_host(meta)] if meta is not None else []
    out += [fmt_line(header), fmt_line(["-" * w for w in widths])]
    prev = None
    for r, line in zip(rows, lines, strict=True):
        group = (r["impl"], r["dtype"])
        if prev is not None and group != prev:
            out.append("")
        prev = group
        out.append(fmt_line(line))
    return "\n".join(out)


def format_speedups(entries: list[dict], target: str = "attnjax.xla_chunked") -> str:
    """Speed of ``target`` relative to the others (>1 = ``target`` is faster)."""
    if not entries:
        return f"(no successful {target} cells to compare)"
    others = [k for k in entries[0] if k.startswith("vs ")]
    header = ["dtype", "T", "mode", "causal", *[f"{target} {o}" for o in others]]
    lines = [[e["dtype"], str(e["seq_len"]), e["mode"], "yes" if e["causal"] else "no",
              *[_fmt(e[o], ".2f") + ("x" if e[o] is not None else "") for o in others]]
             for e in entries]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True))
                     for line in [header, ["-" * w for w in widths], *lines])


def _jsonable(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    return x


def write_json(result: dict, path: Path) -> Path:
    path = Path(path)
    path.write_text(json.dumps(_jsonable(result), indent=2) + "\n")
    return path


def write_csv(rows: list[dict], path: Path, meta: dict | None = None) -> Path:
    """One line per cell; with ``meta``, the host columns :data:`CSV_HOST_FIELDS` on each."""
    path = Path(path)
    host = {}
    if meta is not None:
        host = {k: meta.get(k) for k in CSV_HOST_FIELDS}
        if isinstance(host["isa"], list):
            host["isa"] = " ".join(host["isa"])
    fields = CSV_FIELDS + (CSV_HOST_FIELDS if meta is not None else ())
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({**r, **host})
    return path


def plot(rows: list[dict], path: Path, title: str = "") -> Path:
    """Log-log PNG: median time (top) and XLA temp memory (bottom) against sequence length.

    One column per mode, one colour per implementation; solid = full, dashed = causal.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    ok = [r for r in rows if r["status"] == "ok"]
    modes = [m for m in ("fwd", "fwd+bwd") if any(r["mode"] == m for r in ok)] or ["fwd"]
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, axes = plt.subplots(2, len(modes), figsize=(6 * len(modes), 8), squeeze=False)
    for j, mode in enumerate(modes):
        ax_t, ax_m = axes[0, j], axes[1, j]
        for i, impl in enumerate(impls):
            for dtype in dtypes:
                for causal in (False, True):
                    pts = sorted((r["seq_len"], r["median_s"], r["temp_bytes"]) for r in ok
                                 if r["impl"] == impl and r["mode"] == mode
                                 and r["causal"] == causal and r["dtype"] == dtype)
                    if not pts:
                        continue
                    label = impl + (f" {dtype}" if len(dtypes) > 1 else "") + (
                        " causal" if causal else "")
                    style = dict(color=colours[i % len(colours)], marker="o",
                                 linestyle="--" if causal else "-")
                    ax_t.plot([p[0] for p in pts], [p[1] for p in pts], label=label, **style)
                    mem = [(p[0], p[2] / MIB) for p in pts if p[2] is not None and p[2] > 0]
                    if mem and not causal:
                        ax_m.plot([p[0] for p in mem], [p[1] for p in mem], label=label, **style)
        ax_t.set_title(f"{mode}: median time")
        ax_t.set_ylabel("seconds")
        ax_m.set_title(f"{mode}: XLA temp memory (compile-time analysis)")
        ax_m.set_ylabel("MiB")
        for ax in (ax_t, ax_m):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("sequence length T = S")
            ax.grid(True, which="both", alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
