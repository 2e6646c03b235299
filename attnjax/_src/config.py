"""Chunk-size configuration of the memory-efficient implementation."""

from __future__ import annotations

import dataclasses

DEFAULT_QUERY_CHUNK = 512
DEFAULT_KEY_CHUNK = 512
# chunk_size=None keeps one float32 score block, B·N·query·key, at most this many elements
# (8 MiB): 512 × 512 for B·N <= 8, smaller chunks (down to 64) for larger B·N.
SCORE_BLOCK_BUDGET = 1 << 21
MIN_AUTO_CHUNK = 64


@dataclasses.dataclass(frozen=True)
class ChunkSize:
    """Query and key chunk sizes of ``implementation="xla_chunked"``.

    The chunked implementation processes ``query`` rows in blocks of ``query`` and sweeps the
    keys in blocks of ``key``; its temporary memory is about ``B·N·query·key`` float32 scores
    per step plus O(T·H) for inputs, outputs and accumulators. Any sequence length works: the last
    chunk is padded internally (padded keys are masked, padded queries dropped). A chunk larger
    than the sequence is shrunk to the sequence length.

    ``ChunkSize()`` is 512 × 512, which keeps a score block of B·N·512·512 float32 (8 MiB for
    B·N = 8) inside the caches of current CPUs; on this library's benchmark machine sizes
    512–2048 are within about 10% of each other there, and blocks over ~32 MB are markedly
    slower. ``chunk_size=None`` in :func:`attnjax.dot_product_attention` shrinks the chunks for
    large B·N to keep that block at 8 MiB (see ``auto_chunk_size``).

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


def auto_chunk_size(batch_heads: int) -> ChunkSize:
    """The default chunk sizes for ``B·N = batch_heads`` (used when ``chunk_size=None``).

    The largest power of two <= 512 for which the float32 score block ``B·N·c·c`` stays within
    :data:`SCORE_BLOCK_BUDGET` elements (8 MiB), but no smaller than 64. Measured on the benchmark
    CPU, fwd+bwd, causal: B=1, N=8, T=4096 is fastest at 512; B=16, N=4, T=512 (H=16) runs 4x
    faster at 128 than at 512, whose 64 MB block spills the caches.
    """
    c = min(DEFAULT_QUERY_CHUNK, DEFAULT_KEY_CHUNK)
    while c > MIN_AUTO_CHUNK and batch_heads * c * c > SCORE_BLOCK_BUDGET:
        c //= 2
    return ChunkSize(c, c)


def as_chunk_size(chunk_size, batch_heads: int = 1) -> ChunkSize:
    """Accept ``None`` (automatic, see :func:`auto_chunk_size`), an int (both sizes), a
    ``(query, key)`` pair or a :class:`ChunkSize`."""
    if chunk_size is None:
        return auto_chunk_size(batch_heads)
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
