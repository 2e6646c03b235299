"""attnjax: exact attention in memory linear in sequence length, for JAX and Flax.

Public API (import from here; ``attnjax._src`` is private and may change without notice):

* :func:`dot_product_attention`: drop-in for ``jax.nn.dot_product_attention`` with a chunked,
  memory-efficient implementation (``implementation="xla_chunked"``).
* :class:`ChunkSize`: chunk sizes of the chunked implementation.
* :func:`ring_attention`, :func:`ring_attention_sharded`, :func:`zigzag_permute`,
  :func:`zigzag_unpermute`: exact attention over a sequence split across devices.
"""

from attnjax._src.attention import IMPLEMENTATIONS as IMPLEMENTATIONS
from attnjax._src.attention import dot_product_attention as dot_product_attention
from attnjax._src.config import ChunkSize as ChunkSize
from attnjax._src.ring import ring_attention as ring_attention
from attnjax._src.ring import ring_attention_sharded as ring_attention_sharded
from attnjax._src.ring import zigzag_permute as zigzag_permute
from attnjax._src.ring import zigzag_unpermute as zigzag_unpermute

__version__ = "0.1.0"
