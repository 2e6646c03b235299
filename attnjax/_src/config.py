"""Chunk-size configuration of the memory-efficient implementation."""

from __future__ import annotations

import dataclasses

DEFAULT_QUERY_CHUNK = 512
DEFAULT_KEY_CHUNK = 512


@dataclasses.dataclass(frozen=True)
class ChunkSize:
    """Query and key chunk sizes of ``implementation="xla_chunked"``.

    The chunked implementation processes ``query`` rows in blocks of ``query`` and sweeps the
    keys in blocks of ``key``; its temporary memory is about ``B·N·query·key`` float32 scores
    per step plus O(T·H) for inputs, outputs and accumulators. Any sequence length works: the last
    chunk is padded internally (padded keys are masked, padded queries dropped). A chunk larger
    than the sequence is shrunk to the sequence length.

    Defaults (512 × 512) keep a score block of B·N·512·512 float32 (8 MiB for B·N = 8) inside
    the caches of current CPUs; on this library's benchmark machine sizes 512–2048 are within
    about 10% of each other, and blocks over ~32 MB are markedly slower.

    Attributes:
      query: rows of queries per chunk, a positive int.
      key: keys per chunk, a positive int.

    Raises:
      ValueError: if a size is not a positive int.
      TypeError: if a size is not an int.
    """

    query: int = DEFAULT_QUERY_CHUNK
    key: int = DEFAULT_KEY_CHUNK

    def __post_init__(self):
        for name in ("query", "key"):
            val = getattr(self, name)
            if isinstance(val, bool) or not isinstance(val, int):
                raise TypeError(f"ChunkSize.{name} must be an int, got {val!r} ({type(val).__name__})")
            if val <= 0:
                raise ValueError(f"ChunkSize.{name} must be a positive int, got {val}")

    def resolve(self, q_len: int, kv_len: int) -> tuple[int, int]:
        """The chunk sizes actually used for a ``q_len`` × ``kv_len`` attention."""
        return max(1, min(self.query, q_len)), max(1, min(self.key, kv_len))


def as_chunk_size(chunk_size) -> ChunkSize:
    """Accept ``None``, an int (both sizes), a ``(query, key)`` pair or a :class:`ChunkSize`."""
    if chunk_size is None:
        return ChunkSize()
    if isinstance(chunk_size, ChunkSize):
        return chunk_size
    if isinstance(chunk_size, bool):
        raise TypeError(f"chunk_size must be an int, a (query, key) pair or a ChunkSize, got {chunk_size!r}")
    if isinstance(chunk_size, int):
        return ChunkSize(chunk_size, chunk_size)
    if isinstance(chunk_size, tuple | list) and len(chunk_size) == 2:
        return ChunkSize(*chunk_size)
    raise TypeError(
        f"chunk_size must be an int, a (query, key) pair or a ChunkSize, got {chunk_size!r}"
    )
