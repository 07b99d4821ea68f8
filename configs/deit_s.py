"""DeiT-S (ViT-S/16, timm ``deit_small_patch16_224.fb_in1k``): Table 1, "ViT-S
(DeiT)".

Paper: Table 1, ViT-S (DeiT): baseline 79.82% / 4.6 GFLOPs / 5039 img/s; MaMe
78.61% / 2.3 / 9015 (1.79x); ToMe 77.99% / 2.3 / 8874; EViT 73.83% / 2.3 / 8950;
DiffRate 78.75% / 2.3 / 8875 (A100, batch 1024, FP16).

    mame-jax eval --config configs/deit_s.py
    mame-jax eval --config configs/deit_s.py:batch_size=512,dtype=bfloat16 --limit 5000
    mame-jax eval --config configs/deit_s.py --config.merge.tau='(0.7,0.9)' --limit 5000
    mame-jax calibrate --config configs/deit_s.py --target-speedup 2 --limit 10000

Rows: baseline, MaMe (tau = 0.8, first 8 blocks), ToMe (r = 16), EViT and
DiffRate (``:evit=0`` / ``:diffrate=none`` leave them out); the
rows, the data, the GFLOPs convention and ``arg`` are described in
``configs/common.py`` (``table1_config``); ``--config.a.b=value`` sets any other
field, and the short flags (``--limit``, ``--tau``, ...) win over both.

Checkpoint: The timm weights on the Hugging Face hub
(``timm/deit_small_patch16_224.fb_in1k``), safetensors: they load without torch.
Downloaded once into ``~/.cache/mame_jax`` (``$MAME_JAX_CACHE``); ``--checkpoint
PATH`` uses a local file instead.
"""

from mame_jax.configs import common

# A name mame_jax.models.load knows: its URL (and checksum) live in one table there.
CHECKPOINT = "deit_s"


def get_config(arg=None):
  return common.table1_config(arg, checkpoint=CHECKPOINT, preprocess="timm", tome_r=16,
                              evit=0.5, evit_layers="3,6,9", diffrate="deit_small@2.3")
