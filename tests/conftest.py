"""Test-suite configuration."""

import os

# Keep XLA to the cores pytest-xdist gives each worker; no GPU/TPU probing noise.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
