"""Training a ViT with MaMe in the loop: the paper's three training settings.

    python train.py --config configs/train.py:variant=Ti/16,merge=mame --workdir DIR \\
        --config.input.data=imagenet2012 --config.total_steps=300000

``merge=``
  * ``none``: the plain ViT (the baseline row).
  * ``mame``: MaMe after attention in blocks 3, 6 and 9 (counted from 1, as the
    paper does; ``merge.layers="2,5,8"``), ``tau = 0.5``, fixed capacity 0, so
    each merge halves the mergeable tokens. From scratch this is the paper's
    ViT-T row (1.94x throughput, -1.3 points); with ``init=`` a checkpoint,
    its fine-tuning row.
  * ``mame_last``: MaMe in the last block only, fine-tuned from ``init``: the
    paper's best accuracy (+1.0 point on ViT-B at 1.1x speed after one epoch).
    Note: with a class-token head (``pool_type="tok"``, the random variants
    here) the last block's merge cannot change the logits -- the class token is
    never merged, it attended before the merge, and the MLP is per token -- so
    the setting matters for pooled heads (``gap``, ``map``) only.
  * ``tome``: ToMe in every block, ``r`` chosen so that the blocks process
    about as many tokens as with ``mame`` (for comparison).

``arg`` keys: variant, merge, data, batch_size, image_size, steps, init
(``""``: from scratch). Anything else: ``--config.FIELD=VALUE``.
"""

from mame_jax.configs import common


def get_config(arg=None):
  arg = common.parse_config_arg(arg, variant="Ti/16", merge="mame", data="imagenet2012",
                                batch_size=256, image_size=224, steps=0, init="")
  config = common.train_config()
  config.model.variant = arg.variant
  config.merge.method = arg.merge
  config.input.data = arg.data
  config.input.batch_size = arg.batch_size
  config.input.image_size = arg.image_size
  if arg.steps:
    config.total_steps = arg.steps
  if arg.init:
    config.init = arg.init
  if arg.merge == "mame_last":
    # The paper's last-block setting fine-tunes briefly at a small learning rate.
    config.lr, config.warmup_steps = 1e-4, 0
  return config
