"""AugReg ViT-B/16 (big_vision weights, ImageNet-21k -> 1k): the ablations' model.

Paper: Figure 2 (ablations on AugReg ViT-B/16; default row -- tokens as the
merge feature, cosine similarity, alternating partition, adaptive pruning:
83.35% top-1, 73.06 im/s on a 3090, FP32), Figure 4 (accuracy and throughput
against tau and the number of merging blocks) and Figures 1 / 7 (token merging
in the first 8 blocks).

    mame-jax eval --config configs/augreg_b16.py
    mame-jax eval --config configs/augreg_b16.py --tau 0.6 0.7 0.8 0.9 --limit 10000
    mame-jax eval --config configs/augreg_b16.py --merge-layers 0-3 --tau 0.8

The second command sweeps tau like Figure 4; vary ``--merge-layers`` for its
other axis. The paper does not say at which resolution its AugReg checkpoint
ran; this config uses the 224 px fine-tune (``:res=384`` takes the 384 px one,
with ``--batch-size`` to match your memory). Our GFLOPs are XLA's count (2 per
multiply-add), about twice fvcore's.

Data: ImageNet-1k validation for tfds (``imagenet2012``, prepared once
offline: ``tfds build imagenet2012 --file_format=array_record`` with the
tarballs in the manual dir), or ``:data=imagenette``.

Checkpoint: the big_vision / AugReg ``.npz`` from the public ``vit_models``
bucket (https mirror of gs://vit_models/augreg/), downloaded once into
``~/.cache/mame_jax`` (``$MAME_JAX_CACHE``); big_vision preprocessing
(``resize_small(256)`` area, ``central_crop(224)``, values in [-1, 1]).
"""

from mame_jax.configs.common import parse_config_arg, table1_config

CHECKPOINTS = {
    224: ("https://storage.googleapis.com/vit_models/augreg/B_16-i21k-300ep-lr_0.001-"
          "aug_medium1-wd_0.1-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.01-res_224.npz"),
    384: ("https://storage.googleapis.com/vit_models/augreg/B_16-i21k-300ep-lr_0.001-"
          "aug_medium1-wd_0.1-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.01-res_384.npz"),
}


def get_config(arg=None):
  res = parse_config_arg(arg, res=224, batch_size=0, dtype="", data="", tau=0.0, tome_r=0,
                         limit=0).res
  if res not in CHECKPOINTS:
    raise ValueError(f"res must be one of {sorted(CHECKPOINTS)}; got {res}")
  rest = ",".join(p for p in (arg or "").split(",") if p and not p.startswith("res="))
  return table1_config(rest, checkpoint=CHECKPOINTS[res], preprocess="big_vision", tome_r=16,
                       image_size=res)
