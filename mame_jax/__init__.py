"""mame-jax: MaMe (matrix-based token merging) and MaRe (restoration) in JAX."""

from mame_jax import cpu

cpu.apply()  # XLA's CPU settings (mame_jax/cpu.py): before anything starts a backend

from mame_jax.models.checkpoints import load_params
from mame_jax.models.load import load_model
from mame_jax.merge import MergeInfo, fusion_weights, mame, similarity_matrix
from mame_jax.models.merging import DiffRateConfig, EViTConfig, MergeConfig, ToMeConfig
from mame_jax.restore import mare, restore  # the function: the module stays mame_jax.restore in sys.modules
from mame_jax.generation import mame_mare
from mame_jax.eval.runner import Runner
from mame_jax.models.vit import Model
from mame_jax.vision_tokens import vision_tokens

__version__ = "0.1.0"

__all__ = ["DiffRateConfig", "EViTConfig", "MergeConfig", "MergeInfo", "Model", "Runner",
           "ToMeConfig", "fusion_weights", "load_model", "load_params", "mame",
           "mame_mare", "mare", "restore", "similarity_matrix", "vision_tokens"]
