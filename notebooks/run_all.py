"""Regenerate the stored outputs of the notebooks: execute each one top to bottom, save in place.

Usage (from the repository root)::

    python notebooks/run_all.py              # every notebook, full mode (the stored outputs)
    python notebooks/run_all.py --only 03    # only notebooks whose name starts with "03"
    python notebooks/run_all.py --quick      # quick mode (ATTNJAX_QUICK=1), e.g. to check they run

Each notebook runs in a fresh kernel on the CPU, with this checkout's ``attnjax`` first on the path
and the notebook's folder as its working directory. Outputs are written back into the ``.ipynb``
(``--quick`` too, so do not commit a quick run). A failing cell stops that notebook, leaves its file
untouched and makes the script exit non-zero; the other notebooks still run.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

import nbclient
import nbformat

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent


def run(path: pathlib.Path, quick: bool, timeout: int) -> bool:
    """Execute ``path`` in a fresh kernel; write its outputs back on success."""
    os.environ["ATTNJAX_QUICK"] = "1" if quick else "0"
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ.pop("MPLBACKEND", None)  # the kernel's inline backend, so figures are stored
    pythonpath = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), pythonpath]))

    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=timeout, kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
    )
    start = time.time()
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as e:
        print(f"{path.name}: FAILED after {time.time() - start:.0f} s\n{e}", file=sys.stderr)
        return False
    nbformat.write(nb, path)
    print(f"{path.name}: ran in {time.time() - start:.0f} s ({'quick' if quick else 'full'} mode), "
          "outputs saved")
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="quick mode (ATTNJAX_QUICK=1)")
    parser.add_argument("--only", action="append", default=[], metavar="PREFIX",
                        help="run only notebooks whose file name starts with PREFIX (repeatable)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds allowed per cell")
    args = parser.parse_args(argv)

    paths = sorted(HERE.glob("*.ipynb"))
    if args.only:
        paths = [p for p in paths if any(p.name.startswith(prefix) for prefix in args.only)]
    if not paths:
        parser.error(f"no notebook in {HERE} matches --only {args.only}")
    ok = [run(p, args.quick, args.timeout) for p in paths]
    return 0 if all(ok) else 1


if __name__ == "__main__":
    sys.exit(main())
