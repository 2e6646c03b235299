"""attnjax benchmarks: ``attnjax-bench`` / ``python -m attnjax.benchmarks``.

This folder (``benchmarks/`` in the repository) installs as ``attnjax.benchmarks``; from a source
checkout without installing, ``python -m benchmarks`` in the repository root. Modules import each
other relatively. See ``benchmarks/README.md`` in the repository for the method.
"""
