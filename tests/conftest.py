"""Test-suite configuration."""

import os

# Keep XLA to the cores pytest-xdist gives each worker; no GPU/TPU probing noise.
os.environ.setdefault("JAX_PLATFORMS", "cpu")


import pytest  # noqa: E402


def pytest_addoption(parser):
    parser.addoption(
        "--run-slow", action="store_true", default=False,
        help="also run the cases marked slow (wider tables, long sequences, the two-process ring); "
        "the default run keeps a sample of each table and finishes in a few minutes on 2 cores",
    )
    parser.addoption(
        "--full-grid", action="store_true", default=False,
        help="run the whole differential grid of tests/test_harness.py (slow; a seeded sample "
        "of it runs by default)",
    )


def _prebuild_native_kernel(config):
    """On the xdist controller: build the native decode kernel once, in the background, into the
    kernel cache (``attnjax._src.native``), so that the workers find it instead of each compiling
    it (a worker that gets there first still builds its own: the result is the same file)."""
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    if hasattr(config, "workerinput") or not getattr(config.option, "numprocesses", None):
        return
    if os.environ.get("ATTNJAX_NATIVE_KERNELS", "1").strip().lower() in ("0", "false", "no", "off"):
        return
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get(
        "PYTHONPATH")])))
    config._attnjax_prebuild = subprocess.Popen(
        [sys.executable, "-c", "from attnjax._src import native; native.status()"],
        cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def pytest_unconfigure(config):
    import subprocess  # noqa: PLC0415

    proc = getattr(config, "_attnjax_prebuild", None)
    if proc is not None:
        try:
            proc.wait(timeout=300)
        except subprocess.TimeoutExpired:
            proc.kill()


def pytest_configure(config):
    _prebuild_native_kernel(config)
    # Read by tests/_batching.py when the test modules are collected (the tables batch the cases
    # this run selects); set here, before collection, on the controller and on every worker.
    os.environ["ATTNJAX_RUN_SLOW"] = "1" if config.getoption("--run-slow") else "0"
    # Property tests (tests/test_properties.py): a few examples by default, many with --run-slow.
    from hypothesis import settings

    settings.register_profile("attnjax-default", max_examples=5)
    settings.register_profile("attnjax-slow", max_examples=40)
    settings.load_profile("attnjax-slow" if config.getoption("--run-slow") else "attnjax-default")
    config.addinivalue_line("markers", "full_grid: the whole differential grid (--full-grid)")
    config.addinivalue_line("markers", "slow: long-running cases (--run-slow)")


def pytest_collection_modifyitems(config, items):
    run_slow = config.getoption("--run-slow")
    full_grid = config.getoption("--full-grid")
    skip_grid = pytest.mark.skip(reason="the full differential grid runs with --full-grid")
    skip_slow = pytest.mark.skip(reason="slow: runs with --run-slow")
    for item in items:
        if "full_grid" in item.keywords:
            if not full_grid:
                item.add_marker(skip_grid)
        elif "slow" in item.keywords and not run_slow:
            item.add_marker(skip_slow)


@pytest.fixture
def x64():
    """``jax_enable_x64`` on for one test (restored after it)."""
    import jax  # noqa: PLC0415 (after JAX_PLATFORMS is set above)

    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", False)
