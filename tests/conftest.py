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


def pytest_configure(config):
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
