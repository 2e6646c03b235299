"""Test-suite configuration."""

import os

# Keep XLA to the cores pytest-xdist gives each worker; no GPU/TPU probing noise.
os.environ.setdefault("JAX_PLATFORMS", "cpu")


import pytest  # noqa: E402


def pytest_addoption(parser):
    parser.addoption(
        "--full-grid", action="store_true", default=False,
        help="run the whole differential grid of tests/test_harness.py (slow; a seeded sample "
        "of it runs by default)",
    )


def pytest_configure(config):
    config.addinivalue_line("markers", "full_grid: the whole differential grid (--full-grid)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--full-grid"):
        return
    skip = pytest.mark.skip(reason="the full differential grid runs with --full-grid")
    for item in items:
        if "full_grid" in item.keywords:
            item.add_marker(skip)
