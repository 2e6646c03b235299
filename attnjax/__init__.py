"""attnjax: exact attention in memory linear in sequence length, for JAX and Flax.

Public API (import from here; ``attnjax._src`` is private and may change without notice):

* :func:`dot_product_attention`: drop-in for ``jax.nn.dot_product_attention`` with a chunked,
  memory-efficient implementation (``implementation="xla_chunked"``).
* :func:`explain_dispatch`: which implementation a call would use, and why the others were passed
  over; :func:`target_platform`: dispatch for another platform (ahead-of-time lowering).
* :class:`ChunkSize`: chunk sizes of the chunked implementation.
* :func:`flax_attention_fn`: attnjax as the ``attention_fn`` of the stock Flax modules.
* :class:`KVCache` and :func:`cached_attention`: autoregressive decoding (per-row positions,
  multi-token steps, sliding-window ring buffer, split-K reads of the cache).
* Submodules :mod:`attnjax.nnx` (``MultiHeadAttention``) and :mod:`attnjax.linen`
  (``MultiHeadDotProductAttention``): drop-in Flax modules.
* :func:`create_block_mask`, :class:`BlockMask` and the module :mod:`attnjax.masks`: flexible
  attention (``mask_mod`` / ``score_mod`` / ``sinks`` of :func:`dot_product_attention`) with
  block skipping.
* :func:`ring_attention`, :func:`ring_attention_sharded`, :func:`zigzag_permute`,
  :func:`zigzag_unpermute`: exact attention over a sequence split across devices.
* :func:`pallas_interpret`: run the Pallas kernels (``implementation="pallas_gpu"``) in Pallas
  interpret mode, e.g. on CPU for testing.
"""

from attnjax import linen as linen
from attnjax import masks as masks
from attnjax import nnx as nnx
from attnjax._src.attention import IMPLEMENTATIONS as IMPLEMENTATIONS
from attnjax._src.attention import dot_product_attention as dot_product_attention
from attnjax._src.attention import explain_dispatch as explain_dispatch
from attnjax._src.config import ChunkSize as ChunkSize
from attnjax._src.decode import KVCache as KVCache
from attnjax._src.decode import cached_attention as cached_attention
from attnjax._src.flax_fn import flax_attention_fn as flax_attention_fn
from attnjax._src.flex import BlockMask as BlockMask
from attnjax._src.flex import create_block_mask as create_block_mask
from attnjax._src.pallas_config import pallas_interpret as pallas_interpret
from attnjax._src.registry import target_platform as target_platform
from attnjax._src.ring import ring_attention as ring_attention
from attnjax._src.ring import ring_attention_sharded as ring_attention_sharded
from attnjax._src.ring import zigzag_permute as zigzag_permute
from attnjax._src.ring import zigzag_unpermute as zigzag_unpermute

__version__ = "0.1.0"
