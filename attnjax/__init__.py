"""attnjax: exact attention in memory linear in sequence length, for JAX and Flax.

Public API (import from here; ``attnjax._src`` is private and may change without notice):

* :func:`dot_product_attention`: drop-in for ``jax.nn.dot_product_attention`` with a chunked,
  memory-efficient implementation (``implementation="xla_chunked"``).
* :class:`ChunkSize`: chunk sizes of the chunked implementation.
"""

from attnjax._src.attention import IMPLEMENTATIONS as IMPLEMENTATIONS
from attnjax._src.attention import dot_product_attention as dot_product_attention
from attnjax._src.config import ChunkSize as ChunkSize

__version__ = "0.1.0"
