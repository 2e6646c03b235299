"""Ring attention (sequence parallelism).

The multi-device checks run in a subprocess (``tests/_ring_cases.py``) with 8 simulated CPU devices
(``--xla_force_host_platform_device_count=8``), so that the rest of the suite keeps its single
device. That script only computes; the assertions are here. By default it runs a sample of its
cases that covers every behaviour class (:data:`DEFAULT_CASES`); ``--run-slow`` adds the rest in
a second subprocess.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

import attnjax

# One worker runs this whole module, so the 8-device subprocess runs once (see --dist loadgroup).
pytestmark = pytest.mark.xdist_group("ring")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-5  # float32, max abs difference (outputs and gradients are O(1) here)

EXPECTED_CASES = {
    "plain_p2", "plain_p8", "causal_contig_p4", "causal_zigzag_p2", "causal_zigzag_p8",
    "window_contig_p8", "window_causal_zigzag_p4", "segments_causal_zigzag_p4",
    "mqa_lengths_offset_softcap_p4", "mesh2x4_batch_causal_zigzag", "mesh2x4_heads_segments",
}
# The cases of tests/_ring_cases.py run by default: every behaviour class at least once (both
# layouts, causal and not, P = 2, 4, 8, both 2-d meshes, window, segments, lengths, offset,
# soft cap, GQA and MQA, T != S). The rest (the same classes in other combinations) run with
# --run-slow, in a second subprocess.
DEFAULT_CASES = {
    "causal_contig_p4",  # contiguous, causal, P = 4
    "window_contig_p8",  # contiguous, not causal, window, P = 8
    "causal_zigzag_p2",  # zigzag, causal, P = 2
    "mqa_lengths_offset_softcap_p4",  # zigzag, MQA, T != S, lengths, offset, soft cap
    "mesh2x4_batch_causal_zigzag",  # batch axis on a 2-d mesh
    "mesh2x4_heads_segments",  # head axis on a 2-d mesh, segments
}
SLOW_CASES = EXPECTED_CASES - DEFAULT_CASES


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _run_ring_script(*args):
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tests", "_ring_cases.py"), *args],
        capture_output=True, text=True, timeout=400, env=_env(), cwd=ROOT,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RING_RESULT ")]
    assert proc.returncode == 0 and lines, (
        f"ring case script failed (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    )
    return json.loads(lines[-1][len("RING_RESULT "):])


@pytest.fixture(scope="module")
def ring_results():
    return _run_ring_script("cases=" + ",".join(sorted(DEFAULT_CASES)), "memory", "errors")


@pytest.fixture(scope="module")
def ring_slow_results():
    return _run_ring_script("cases=" + ",".join(sorted(SLOW_CASES)))


def test_runs_on_eight_devices(ring_results):
    assert ring_results["num_devices"] == 8


def test_all_cases_present(ring_results):
    assert set(ring_results["all_cases"]) == EXPECTED_CASES
    assert set(ring_results["cases"]) == DEFAULT_CASES


@pytest.mark.slow
def test_all_slow_cases_present(ring_slow_results):
    assert ring_slow_results["num_devices"] == 8
    assert set(ring_slow_results["cases"]) == SLOW_CASES


@pytest.mark.parametrize("which", ["default", pytest.param("slow", marks=pytest.mark.slow)])
@pytest.mark.parametrize("reference", ["vs_xla_chunked", "vs_float64"])
def test_outputs_and_gradients_match(request, which, reference):
    results = request.getfixturevalue("ring_results" if which == "default" else "ring_slow_results")
    bad = {}
    for name, res in results["cases"].items():
        # The compared values are not trivially small, so a zero/garbage result would fail.
        assert res["out_abs_max"] > 0.5 and res["grad_abs_max"] > 0.5, name
        errs = res[reference]
        if max(errs.values()) > TOL:
            bad[name] = errs
    assert not bad, f"ring attention differs from {reference} by more than {TOL}: {bad}"


def test_per_device_memory_falls_as_one_over_p(ring_results):
    # Compile-time temp bytes per device, forward + backward, fixed total length 8192.
    mem = {int(p): b for p, b in ring_results["memory"].items()}
    for p in (2, 4, 8):
        assert mem[p] < 0.75 * mem[p // 2], mem  # falls with every doubling of P
    # From P = 2 on (P = 1 needs no transfer buffers) temp * P is constant within 25%: ~1/P.
    for p in (4, 8):
        assert 0.8 <= mem[p] * p / (mem[2] * 2) <= 1.25, mem
    assert mem[8] < mem[1] / 4, mem


def test_bad_input_messages(ring_results):
    errs = ring_results["errors"]
    assert all(msg is not None for msg in errs.values()), errs
    assert "20" in errs["length_not_divisible"] and "8 devices" in errs["length_not_divisible"]
    assert "16" in errs["zigzag_length_not_divisible_by_2p"]
    assert "sequence" in errs["axis_not_in_mesh"] and "('seq',)" in errs["axis_not_in_mesh"]
    assert "striped" in errs["unknown_layout"]
    assert "24" in errs["zigzag_permute_bad_length"]
    assert "even" in errs["zigzag_odd_local_length_in_shard_map"]
    assert "sequence" in errs["axis_not_bound_in_shard_map"]


# ---- single-process checks (one device) ----


def test_zigzag_permutation_order_and_inverse():
    x = np.arange(2 * 16).reshape(2, 16)
    z = np.asarray(attnjax.zigzag_permute(jnp.asarray(x), 4))
    # 8 chunks of 2; devices get chunks (0, 7), (1, 6), (2, 5), (3, 4).
    chunks = [0, 7, 1, 6, 2, 5, 3, 4]
    want = np.concatenate([x[:, 2 * c:2 * c + 2] for c in chunks], axis=1)
    np.testing.assert_array_equal(z, want)
    np.testing.assert_array_equal(np.asarray(attnjax.zigzag_unpermute(jnp.asarray(z), 4)), x)


def test_ring_attention_outside_shard_map_raises():
    q = jnp.ones((1, 8, 2, 4))
    with pytest.raises(ValueError, match="axis_name 'seq'"):
        attnjax.ring_attention(q, q, q, axis_name="seq")


def test_one_device_ring_matches_dense_reference():
    # A 1-device ring (no transfers) on the main process: zigzag + causal + GQA vs float64.
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 16, 4, 8)).astype(np.float32)
    k = rng.standard_normal((1, 16, 2, 8)).astype(np.float32)
    v = rng.standard_normal((1, 16, 2, 8)).astype(np.float32)
    mesh = jax.make_mesh((1,), ("seq",), axis_types=(AxisType.Explicit,))
    zq, zk, zv = (attnjax.zigzag_permute(x, 1) for x in (q, k, v))
    out, lse = attnjax.ring_attention_sharded(zq, zk, zv, mesh=mesh, seq_axis="seq",
                                              layout="zigzag", is_causal=True, chunk_size=3,
                                              return_residual=True)
    out = np.asarray(attnjax.zigzag_unpermute(out, 1), np.float64)
    lse = np.asarray(attnjax.zigzag_unpermute(lse, 1), np.float64)
    s = np.einsum("btnh,bsnh->bnts", q, np.repeat(k, 2, axis=2)) / np.sqrt(8.0)
    s = np.where(np.tril(np.ones((16, 16), bool)), s, -np.inf)
    m = s.max(-1, keepdims=True)
    w = np.exp(s - m)
    want_lse = (np.log(w.sum(-1, keepdims=True)) + m)[..., 0].transpose(0, 2, 1)
    w /= w.sum(-1, keepdims=True)
    want = np.einsum("bnts,bsnh->btnh", w, np.repeat(v, 2, axis=2))
    np.testing.assert_allclose(out, want, atol=1e-5)
    np.testing.assert_allclose(lse, want_lse, atol=1e-5)


def test_ring_attention_inside_user_shard_map():
    # The documented way: ring_attention inside a user's shard_map (check_vma on, the default),
    # here on an Auto-sharding mesh (the wrapper tests use Explicit ones).
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.standard_normal((1, 8, 2, 4)), jnp.float32)
    mesh = jax.make_mesh((1,), ("seq",), axis_types=(AxisType.Auto,))
    f = jax.shard_map(lambda a: attnjax.ring_attention(a, a, a, axis_name="seq", is_causal=True),
                      mesh=mesh, in_specs=P(None, "seq"), out_specs=P(None, "seq"))
    got = f(q)
    want = attnjax.dot_product_attention(q, q, q, is_causal=True, implementation="xla")
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


# ---- two processes on localhost through jax.distributed ----

_TWO_PROCESS = textwrap.dedent(
    """
    import sys, os
    import numpy as np
    import jax
    pid, port = int(sys.argv[1]), int(sys.argv[2])
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid,
                               initialization_timeout=60)
    import jax.numpy as jnp
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    import attnjax
    assert jax.process_count() == 2 and jax.device_count() == 2, jax.devices()
    mesh = jax.make_mesh((2,), ("seq",), axis_types=(AxisType.Explicit,))
    rng = np.random.default_rng(0)
    B, T, N, H = 1, 16, 2, 8
    q, k, v = (rng.standard_normal((B, T, N, H)).astype(np.float32) for _ in range(3))
    sh = NamedSharding(mesh, P(None, "seq"))
    def glob(x):
        return jax.make_array_from_callback(x.shape, sh, lambda idx: x[idx])
    from tests import reference
    do = rng.standard_normal((B, T, N, H)).astype(np.float32)
    def f(q_, k_, v_):
        return attnjax.ring_attention_sharded(q_, k_, v_, mesh=mesh, seq_axis="seq",
                                              is_causal=True, chunk_size=4)
    out, vjp = jax.vjp(f, glob(q), glob(k), glob(v))
    grads = vjp(glob(do))
    vis = reference.visibility(B, N, T, T, is_causal=True)
    o64, _, cache = reference.attention(q, k, v, vis=vis)
    want = (o64, *reference.attention_vjp(cache, do)[:3])
    err = 0.0
    for got, ref in zip((out, *grads), want):
        for shard in got.addressable_shards:
            err = max(err, float(np.max(np.abs(np.asarray(shard.data) - ref[shard.index]))))
    rows = out.addressable_shards[0].index[1]
    print(f"TWO_PROCESS pid={pid} rows={rows.start}:{rows.stop} max_err(out,dq,dk,dv)={err:.3g}",
          flush=True)
    assert err < 1e-5
    jax.distributed.shutdown()
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_on_localhost(tmp_path):
    script = tmp_path / "two_process.py"
    script.write_text(_TWO_PROCESS)
    port = _free_port()
    env = _env()
    env.pop("XLA_FLAGS", None)
    procs = [
        subprocess.Popen([sys.executable, str(script), str(pid), str(port)], env=env, cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for pid in (0, 1)
    ]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=120)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-4000:]
        assert "TWO_PROCESS" in out, out[-4000:]
