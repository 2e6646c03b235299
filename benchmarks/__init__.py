"""attnjax benchmarks: ``attnjax-bench`` / ``python -m benchmarks``.

See ``benchmarks/README.md`` for the method.
"""
