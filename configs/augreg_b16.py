"""AugReg ViT-B/16 (big_vision weights, ImageNet-21k -> 1k): the ablations' model.

Paper: Figure 2 (ablations on AugReg ViT-B/16; default row -- tokens as the
merge feature, cosine similarity, alternating partition, adaptive pruning:
83.35% top-1, 73.06 im/s on a 3090, FP32), Figure 4 (accuracy and throughput
against tau and the number of merging blocks) and Figures 1 / 7 (token merging
in the first 8 blocks).

    mame-jax eval --config configs/augreg_b16.py
    mame-jax eval --config configs/augreg_b16.py --tau 0.6 0.7 0.8 0.9 --limit 10000
    mame-jax eval --config configs/augreg_b16.py --merge-layers 0-3 --tau 0.8
    mame-jax eval --config configs/augreg_b16.py:res=384 --config.input.batch_size=64

The second command sweeps tau like Figure 4; vary ``--merge-layers``
(``merge.layers``) for its other axis. The paper does not say at which
resolution its AugReg checkpoint ran; this config uses the 224 px fine-tune
(``:res=384`` takes the 384 px one, with ``--batch-size`` or
``--config.input.batch_size`` to match your memory). Our GFLOPs are XLA's count
(2 per multiply-add), about twice fvcore's. The ``arg`` keys are those of
``common.table1_config`` plus ``res``.

Data: ImageNet-1k validation for tfds (``imagenet2012``, prepared once
offline: ``tfds build imagenet2012 --file_format=array_record`` with the
tarballs in the manual dir), or ``:data=imagenette``.

Checkpoint: the big_vision / AugReg ``.npz`` from the public ``vit_models``
bucket (https mirror of gs://vit_models/augreg/), downloaded once into
``~/.cache/mame_jax`` (``$MAME_JAX_CACHE``); big_vision preprocessing
(``resize_small(256)`` area, ``central_crop(224)``, values in [-1, 1]).
"""

from mame_jax.configs import common

CHECKPOINTS = {224: "augreg_b16", 384: "augreg_b16_384"}  # names mame_jax.models.load knows


def get_config(arg=None):
  arg = common.table1_arg(arg, tome_r=16, res=224)
  if arg.res not in CHECKPOINTS:
    raise ValueError(f"res must be one of {sorted(CHECKPOINTS)}; got {arg.res}")
  return common.table1_config(arg, checkpoint=CHECKPOINTS[arg.res], preprocess="big_vision",
                              tome_r=16, image_size=arg.res)
