"""Computing several test cases in one XLA program.

XLA:CPU compiles a handful of cases side by side in about half the time of compiling them one by
one (each compile has a large fixed cost), so the wide tables compute the cases a run selects in
batches of ``BATCH`` under one ``jax.jit``; each test still checks its own case. A batch is one
xdist group, so it is computed once, on one worker.
"""

from __future__ import annotations

import os

import jax
import pytest

BATCH = 8
# Whether this run selects the slow cases too (tests/conftest.py sets it before collection, on the
# controller and on every worker), so that the modules know their batches when collected.
RUN_SLOW = os.environ.get("ATTNJAX_RUN_SLOW") == "1"


def jit_together(fns, args):
    """``[fn(*a) for fn, a in zip(fns, args)]`` as one jitted program (one compile)."""
    fns = list(fns)
    return jax.jit(lambda xs: [f(*a) for f, a in zip(fns, xs, strict=True)])(list(args))


def batch(name: str, selected: list[str]) -> list[str]:
    """The names computed together with ``name``: its batch of ``selected`` (``[name]`` if it is
    not selected, e.g. a slow case run by name)."""
    if name not in selected:
        return [name]
    i = selected.index(name) // BATCH * BATCH
    return selected[i:i + BATCH]


def group(prefix: str, name: str, selected: list[str]) -> tuple:
    """The xdist group mark of ``name``'s batch (no mark if it is not selected)."""
    if name not in selected:
        return ()
    return (pytest.mark.xdist_group(f"{prefix}-{selected.index(name) // BATCH}"),)


def computed(cache: dict, name: str, selected: list[str], prepare):
    """``cache[name]``, computing first every case of ``name``'s batch not in ``cache`` under one
    jit: ``prepare(n) -> (fn, args, finish)``, and ``cache[n] = finish(fn(*args))``."""
    if name not in cache:
        todo = [n for n in batch(name, selected) if n not in cache]
        prepared = [prepare(n) for n in todo]
        results = jit_together([fn for fn, _, _ in prepared], [args for _, args, _ in prepared])
        for n, (_, _, finish), r in zip(todo, prepared, results, strict=True):
            cache[n] = finish(r)
    return cache[name]
