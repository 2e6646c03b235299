"""A fast variant of the accelerator check (the full one: ``attnjax-accel-check``)."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from attnjax._src import accel_check


def test_accel_check_cpu_quick(tmp_path):
    out = tmp_path / "check.json"
    rc = accel_check.main(["--no-timing", "--masks", "empty_rows",
                           "--dtypes", "float32", "--json", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["device"]["backend"] == "cpu"
    rows = result["correctness"]
    by_impl = {(r["implementation"], r["mask"]): r["status"] for r in rows}
    assert by_impl[("xla_chunked", "empty_rows")] == "ok"
    assert by_impl[("xla", "empty_rows")] == "ok"
    assert {r["implementation"] for r in rows} == {"xla", "xla_chunked"}  # CPU implementations


def test_accel_check_fails_on_mismatch(tmp_path, monkeypatch):
    real = accel_check.reference

    def wrong(*a, **kw):
        out, lse, dq, dk, dv = real(*a, **kw)
        return out + 0.1, lse, dq, dk, dv

    monkeypatch.setattr(accel_check, "reference", wrong)
    rc = accel_check.main(["--no-timing", "--masks", "causal", "--dtypes", "float32",
                           "--json", str(tmp_path / "c.json")])
    assert rc == 1


def test_timing_rows_side_by_side_with_jax_nn():
    rows = accel_check.timing([64], B=1, N=2, H=16, dtype=jnp.float32, impls=["xla_chunked"],
                              reps=1, jax_nn_paths=["xla"], causals=(True,))
    names = {r["name"] for r in rows}
    assert "attnjax:xla_chunked" in names and "jax.nn:xla" in names
    assert any(n.startswith("attnjax:auto(") for n in names)
    assert all(r["tflops"] is not None and np.isfinite(r["tflops"]) for r in rows)
    assert {r["mode"] for r in rows} == {"fwd", "fwd+bwd"}


def test_accel_check_cpu_says_pallas_gpu_is_skipped(tmp_path, capsys):
    out = tmp_path / "check.json"
    assert accel_check.main(["--no-timing", "--masks", "plain", "--dtypes", "float32",
                             "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert "pallas_gpu" in result["skipped"] and "--pallas-interpret" in result["skipped"]["pallas_gpu"]
    assert "pallas_gpu: skipped" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.full_grid  # ~35 s: four implementations' correctness, two of them interpreted
def test_accel_check_cpu_pallas_interpret(tmp_path, capsys):
    """``--pallas-interpret``: the Pallas kernels' correctness, interpreted; their timing is
    skipped (interpreted kernels have no speed worth reporting)."""
    out = tmp_path / "check.json"
    rc = accel_check.main(["--pallas-interpret", "--masks", "causal", "--dtypes", "float32",
                           "--sizes", "64", "--reps", "1", "--json", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    by_impl = {r["implementation"]: r["status"] for r in result["correctness"]}
    assert by_impl["pallas_gpu"] == "ok" and by_impl["splash"] == "ok"
    assert set(result["interpreted"]) == {"pallas_gpu", "splash"}
    assert not any("pallas_gpu" in r["name"] or "splash" in r["name"] for r in result["timing"])
    assert "timing skips pallas_gpu, splash" in capsys.readouterr().out
