""""How long can it go": the longest power-of-two sequence whose forward+backward fits a budget.

For each implementation with a compile-time memory analysis, forward+backward is compiled (no
input allocated) at T = start, 2·start, ... until XLA's total (arguments + outputs + temp)
exceeds the budget; the last length that fits is the answer. It is then confirmed by one real
forward+backward run, when that run is bounded in time: the run time is predicted from a timed
run at ``probe_len`` scaled by (T / probe_len)² (attention is quadratic in time, whatever its
memory); when the prediction exceeds ``confirm_max_s`` the confirmation runs at the longest
power of two that fits that time instead, and the report says so.
"""

from __future__ import annotations

import resource
import time

from .backends import Backend, Case
from .hostinfo import format_host

GIB = 1 << 30


def _peak_rss_bytes() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB


def _time_once(compiled, seed: int) -> float:
    run = compiled.make_runner(seed)
    t0 = time.perf_counter()
    run()
    return time.perf_counter() - t0


def longest_for(backend: Backend, *, budget_bytes: int, batch: int, heads: int, head_dim: int,
                dtype: str, causal: bool = False, start: int = 1024, max_len: int = 1 << 24,
                probe_len: int = 1024, confirm_max_s: float = 60.0, confirm: bool = True,
                seed: int = 0, log=print) -> dict:
    """Search and confirm for one backend. Returns a dict (see module docstring)."""
    res = {"impl": backend.name, "budget_bytes": budget_bytes, "causal": causal, "dtype": dtype,
           "batch": batch, "heads": heads, "head_dim": head_dim, "tried": [],
           "longest": None, "longest_total_bytes": None, "longest_temp_bytes": None,
           "confirmed_len": None, "confirm_s": None, "confirm_est_s": None, "note": ""}
    if not backend.has_memory_analysis:
        res["note"] = ("skipped: no compile-time memory analysis (eager torch); "
                       "not estimated")
        return res

    def case(t):
        return Case(batch, t, heads, head_dim, dtype=dtype, causal=causal, mode="fwd+bwd")

    compiled = {}

    def get(t):
        if t not in compiled:
            compiled[t] = backend.compile(case(t))
        return compiled[t]

    t = start
    while t <= max_len:
        c = get(t)
        fits = c.total_bytes is not None and c.total_bytes <= budget_bytes
        res["tried"].append({"seq_len": t, "temp_bytes": c.temp_bytes,
                             "total_bytes": c.total_bytes, "compile_s": c.compile_s,
                             "fits": fits})
        log(f"  {backend.name}: T={t}: total {c.total_bytes / GIB:.2f} GiB "
            f"(temp {c.temp_bytes / GIB:.2f} GiB) {'fits' if fits else 'over budget'}")
        if not fits:
            break
        res.update(longest=t, longest_total_bytes=c.total_bytes, longest_temp_bytes=c.temp_bytes)
        t *= 2
    else:
        res["note"] = f"search stopped at --max-len {max_len}; "
    if res["longest"] is None:
        res["note"] += f"even T={start} does not fit"
        return res
    if not confirm:
        res["note"] += "not confirmed (--no-confirm)"
        return res
    probe = min(probe_len, res["longest"])
    t_probe = _time_once(get(probe), seed)
    target = res["longest"]
    est = t_probe * (target / probe) ** 2
    res["confirm_est_s"] = est
    while target > probe and t_probe * (target / probe) ** 2 > confirm_max_s:
        target //= 2
    if target != res["longest"]:
        res["note"] += (f"a run at T={res['longest']} would take ~{est:.0f} s "
                        f"(> --confirm-seconds {confirm_max_s:g}); confirmed at T={target}")
    try:
        res["confirm_s"] = _time_once(get(target), seed)
        res["confirmed_len"] = target
    except Exception as e:  # noqa: BLE001 - reported, not raised
        res["note"] += f" confirmation run failed: {type(e).__name__}: {e}".splitlines()[0]
    res["peak_rss_bytes"] = _peak_rss_bytes()
    return res


def format_longest(results: list[dict], meta: dict | None = None) -> str:
    """The table of :func:`longest_for` results, headed by the host line when ``meta`` is given."""
    header = ("impl", "longest T", "total GiB", "temp GiB", "confirmed T", "run s", "note")
    lines = []
    for r in results:
        lines.append((
            r["impl"], "-" if r["longest"] is None else str(r["longest"]),
            "-" if r["longest_total_bytes"] is None else f"{r['longest_total_bytes'] / GIB:.2f}",
            "-" if r["longest_temp_bytes"] is None else f"{r['longest_temp_bytes'] / GIB:.2f}",
            "-" if r["confirmed_len"] is None else str(r["confirmed_len"]),
            "-" if r["confirm_s"] is None else f"{r['confirm_s']:.2f}",
            r["note"],
        ))
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    table = ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
             for line in [header, ["-" * w for w in widths], *lines]]
    return "\n".join(([format_host(meta)] if meta is not None else []) + table)
