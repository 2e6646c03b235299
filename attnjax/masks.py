"""Built-in ``mask_mod`` / ``score_mod`` helpers for :func:`attnjax.dot_product_attention`.

Masks: :func:`causal`, :func:`sliding_window`, :func:`chunked_causal`, :func:`prefix_lm`,
:func:`document`, :func:`sink_window`, combined with :func:`and_masks` / :func:`or_masks`.
Score modifiers: :func:`alibi` (with :func:`alibi_slopes`), :func:`t5_relative_bias`
(with :func:`t5_bucket`), :func:`soft_cap`.
"""

from attnjax._src.mask_mods import alibi as alibi
from attnjax._src.mask_mods import alibi_slopes as alibi_slopes
from attnjax._src.mask_mods import and_masks as and_masks
from attnjax._src.mask_mods import causal as causal
from attnjax._src.mask_mods import chunked_causal as chunked_causal
from attnjax._src.mask_mods import document as document
from attnjax._src.mask_mods import or_masks as or_masks
from attnjax._src.mask_mods import prefix_lm as prefix_lm
from attnjax._src.mask_mods import sink_window as sink_window
from attnjax._src.mask_mods import sliding_window as sliding_window
from attnjax._src.mask_mods import soft_cap as soft_cap
from attnjax._src.mask_mods import t5_bucket as t5_bucket
from attnjax._src.mask_mods import t5_relative_bias as t5_relative_bias
