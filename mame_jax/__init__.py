"""mame-jax: MaMe (matrix-based token merging) and MaRe (restoration) in JAX."""

from mame_jax.merge import MergeInfo, fusion_weights, mame, similarity_matrix
from mame_jax.restore import mare

__version__ = "0.1.0"

__all__ = ["MergeInfo", "fusion_weights", "mame", "mare", "similarity_matrix"]
