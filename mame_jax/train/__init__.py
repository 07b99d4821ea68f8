"""Training with MaMe in the loop (``train.py``): optimiser, data, checkpoints
and the loop. See :mod:`mame_jax.train.loop`."""
