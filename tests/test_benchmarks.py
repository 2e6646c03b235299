"""Unit tests of the benchmark harness (``benchmarks/``) on tiny sizes; no timing is asserted."""

from __future__ import annotations

import csv
import json
import sys

import pytest

from benchmarks import __main__ as cli
from benchmarks.backends import Case, TorchSdpaBackend, all_backends
from benchmarks.flops import attention_flops
from benchmarks.longest import longest_for
from benchmarks.report import format_table, plot
from benchmarks.sweep import SweepConfig, run_cell, run_sweep, speedups

TINY = dict(batch=1, heads=2, head_dim=8)


def _hand_count(b, n, t, s, h, mode):
    """Sum 2·m·k·n over the matmuls of attention, per (batch, head), written out one by one."""
    fwd = [(t, h, s),   # S = Q Kᵀ: (T×H)(H×S)
           (t, s, h)]   # O = P V:  (T×S)(S×H)
    bwd = [(s, t, h),   # dV = Pᵀ dO: (S×T)(T×H)
           (t, h, s),   # dP = dO Vᵀ: (T×H)(H×S)
           (t, s, h),   # dQ = dS K:  (T×S)(S×H)
           (s, t, h)]   # dK = dSᵀ Q: (S×T)(T×H)
    mm = fwd + (bwd if mode == "fwd+bwd" else [])
    return b * n * sum(2 * m * k * nn for m, k, nn in mm)


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("shape", [(1, 8, 4096, 4096, 64), (2, 3, 5, 7, 4)])
def test_flops_match_hand_count(shape, mode):
    assert attention_flops(*shape, mode) == _hand_count(*shape, mode)


def test_flops_known_values():
    # B=1, N=8, H=64, T=S=4096: 4·8·4096²·64 and 3x that.
    assert attention_flops(1, 8, 4096, 4096, 64, "fwd") == 34_359_738_368
    assert attention_flops(1, 8, 4096, 4096, 64, "fwd+bwd") == 3 * 34_359_738_368
    with pytest.raises(ValueError, match="mode"):
        attention_flops(1, 1, 1, 1, 1, "bwd")


def test_cli_parses_options():
    args = cli.build_parser().parse_args(
        ["--sizes", "64,128", "--long-sizes", "", "--dtypes", "float32,bfloat16",
         "--batch", "2", "--heads", "4", "--head-dim", "16", "--impl", "jax.nn,torch.sdpa",
         "--modes", "fwd", "--causal", "yes", "--repeats", "3", "--out", "somewhere",
         "--budget-gib", "2.5"])
    assert args.sizes == (64, 128) and args.long_sizes == ()
    assert args.dtypes == ("float32", "bfloat16")
    assert (args.batch, args.heads, args.head_dim, args.repeats) == (2, 4, 16, 3)
    assert args.impl == ("jax.nn", "torch.sdpa") and args.modes == ("fwd",)
    assert args.causal == "yes" and str(args.out) == "somewhere" and args.budget_gib == 2.5
    assert not args.longest
    defaults = cli.build_parser().parse_args([])
    assert defaults.impl == tuple(all_backends()) and str(defaults.out) == "bench_results"


@pytest.mark.parametrize("bad", [["--impl", "nope"], ["--sizes", "12,x"], ["--sizes", "-4"],
                                 ["--modes", "bwd"], ["--dtypes", "int8"]])
def test_cli_rejects_bad_options(bad, capsys):
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(bad)
    assert "error" in capsys.readouterr().err


def test_cli_rejects_non_positive_batch(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--batch", "0"])
    assert "--batch must be positive" in capsys.readouterr().err


def test_tiny_sweep_writes_table_json_csv_and_plot(tmp_path, capsys):
    out = tmp_path / "res"
    rc = cli.main(["--sizes", "16", "--long-sizes", "32", "--heads", "2", "--head-dim", "8",
                   "--impl", "jax.nn,attnjax.xla_chunked", "--causal", "no", "--repeats", "2",
                   "--ceiling-size", "128", "--out", str(out), "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "median s" in text and "GFLOP/s" in text and "%ceil" in text
    assert "attnjax.xla_chunked vs jax.nn" in text

    result = json.loads((out / "results.json").read_text())
    rows = result["rows"]
    # jax.nn: the size 16 only; xla_chunked: 16 and the long size 32; × 2 modes.
    assert sorted((r["impl"], r["seq_len"], r["mode"]) for r in rows) == [
        ("attnjax.xla_chunked", 16, "fwd"), ("attnjax.xla_chunked", 16, "fwd+bwd"),
        ("attnjax.xla_chunked", 32, "fwd"), ("attnjax.xla_chunked", 32, "fwd+bwd"),
        ("jax.nn", 16, "fwd"), ("jax.nn", 16, "fwd+bwd")]
    for r in rows:
        assert r["status"] == "ok", r
        assert not r["causal"]
        assert r["min_s"] <= r["median_s"] <= r["max_s"] and 1 <= r["repeats"] <= 2
        assert r["flops"] == attention_flops(1, 2, r["seq_len"], r["seq_len"], 8, r["mode"])
        assert r["gflops"] == pytest.approx(r["flops"] / r["median_s"] / 1e9)
        assert r["temp_bytes"] is not None and r["compile_s"] > 0
    assert result["ceiling"]["n"] == 128 and result["ceiling"]["gflops"] > 0

    with (out / "results.csv").open() as f:
        csv_rows = list(csv.DictReader(f))
    assert [(c["impl"], int(c["seq_len"]), c["mode"]) for c in csv_rows] == [
        (r["impl"], r["seq_len"], r["mode"]) for r in rows]

    png = (out / "results.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_plot_from_rows_with_skips(tmp_path):
    rows = []
    for impl, scale in (("jax.nn", 2.0), ("attnjax.xla_chunked", 1.0)):
        for mode in ("fwd", "fwd+bwd"):
            for causal in (False, True):
                for t in (512, 1024, 2048):
                    ok = not (impl == "jax.nn" and t == 2048)
                    rows.append({"impl": impl, "dtype": "float32", "seq_len": t, "mode": mode,
                                 "causal": causal, "status": "ok" if ok else "skipped",
                                 "median_s": scale * (t / 512) ** 2 if ok else None,
                                 "temp_bytes": t * t * 32 if impl == "jax.nn" else t * 1000})
    path = plot(rows, tmp_path / "p.png", title="synthetic")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_torch_is_skipped_with_a_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` raise ImportError
    reason = TorchSdpaBackend().unavailable_reason()
    assert reason is not None and "torch is not installed" in reason and "[torch]" in reason
    logged = []
    cfg = SweepConfig(sizes=(16,), long_sizes=(), impls=("torch.sdpa", "jax.nn"), modes=("fwd",),
                      causal=(False,), repeats=1, ceiling_n=64, **TINY)
    result = run_sweep(cfg, progress=False, log=logged.append)
    assert any(line.startswith("skipping torch.sdpa: torch is not installed") for line in logged)
    assert set(result["skipped_impls"]) == {"torch.sdpa"}
    assert [r["impl"] for r in result["rows"]] == ["jax.nn"]


def test_unknown_implementation_raises():
    with pytest.raises(ValueError, match="unknown implementation"):
        run_sweep(SweepConfig(impls=("nope",)), progress=False, log=lambda _: None)


def test_cell_over_memory_budget_is_skipped_not_run():
    backend = all_backends()["jax.nn"]
    case = Case(1, 32, 2, 8, mode="fwd+bwd")
    cfg = SweepConfig(budget_bytes=1024, **TINY)
    row = run_cell(backend, case, cfg, ceiling_gflops=100.0, est_s=None)
    assert row["status"] == "skipped" and "budget" in row["note"]
    assert row["median_s"] is None and row["total_bytes"] > 1024


def test_cell_predicted_too_slow_is_skipped():
    backend = all_backends()["attnjax.xla_chunked"]
    row = run_cell(backend, Case(1, 32, 2, 8), SweepConfig(max_run_s=2.0, **TINY),
                   ceiling_gflops=None, est_s=5.0)
    assert row["status"] == "skipped" and "--max-run-seconds" in row["note"]
    assert row["compile_s"] is None


def test_table_and_speedups_from_rows():
    def row(impl, med, status="ok", note=""):
        return {"impl": impl, "dtype": "float32", "seq_len": 1024, "mode": "fwd",
                "causal": False, "status": status, "note": note, "median_s": med,
                "min_s": med, "max_s": med, "repeats": 3, "gflops": 1.0,
                "frac_ceiling": 0.5, "temp_bytes": None, "compile_s": None}

    rows = [row("jax.nn", 3.0), row("attnjax.xla_chunked", 1.5), row("torch.sdpa", 1.2),
            row("attnjax.xla", None, "skipped", "est. 9.0 s/run > --max-run-seconds 4")]
    table = format_table(rows)
    assert "skipped: est. 9.0 s/run" in table and "n/a" in table and "50" in table
    (sp,) = speedups(rows)
    assert sp["vs jax.nn"] == pytest.approx(2.0) and sp["vs torch.sdpa"] == pytest.approx(0.8)


def test_longest_search_stops_at_budget():
    backend = all_backends()["jax.nn"]
    total_32 = backend.compile(Case(1, 32, 2, 8, mode="fwd+bwd")).total_bytes
    # q, k, v, dO in and out, dq, dk, dv out: at least 8 arrays of B·T·N·H float32.
    assert total_32 >= 8 * 32 * 2 * 8 * 4
    res = longest_for(backend, budget_bytes=total_32, start=16, max_len=1024, probe_len=16,
                      confirm_max_s=30.0, log=lambda _: None, dtype="float32", **TINY)
    assert res["longest"] == 32 and res["longest_total_bytes"] == total_32
    assert [t["seq_len"] for t in res["tried"]] == [16, 32, 64]
    assert not res["tried"][-1]["fits"] and res["tried"][-1]["total_bytes"] > total_32
    assert res["confirmed_len"] == 32 and res["confirm_s"] > 0


def test_longest_skips_torch_without_memory_analysis():
    res = longest_for(TorchSdpaBackend(), budget_bytes=1 << 30, dtype="float32",
                      log=lambda _: None, **TINY)
    assert res["longest"] is None and "no compile-time memory analysis" in res["note"]


def test_torch_backend_runs_when_installed():
    pytest.importorskip("torch")
    backend = TorchSdpaBackend()
    assert backend.unavailable_reason() is None
    for mode in ("fwd", "fwd+bwd"):
        compiled = backend.compile(Case(1, 16, 2, 8, causal=True, mode=mode))
        assert compiled.temp_bytes is None
        compiled.make_runner(0)()
