"""MAE ViT-B/16, fine-tuned on ImageNet-1k: Table 1, "ViT-B (MAE)".

Paper: Table 1, ViT-B (MAE): baseline 83.72% / 17.6 GFLOPs / 2130 img/s; MaMe
79.83% / 8.7 / 5418 (2.54x); ToMe 78.86% / 8.8 / 4023; EViT 75.15% / 8.7 / 4230;
DiffRate 79.96% / 8.7 / 4150 (A100, batch 1024, FP16).

    mame-jax eval --config configs/mae_b.py
    mame-jax eval --config configs/mae_b.py:batch_size=512,dtype=bfloat16 --limit 5000
    mame-jax eval --config configs/mae_b.py --config.merge.tau='(0.7,0.9)' --limit 5000
    mame-jax calibrate --config configs/mae_b.py --target-speedup 2 --limit 10000

Rows: baseline, MaMe (tau = 0.8, first 8 blocks) and ToMe (r = 16) run by ToMe's
MAE recipe (``merge.tome_recipe = "mae"``: no proportional attention, a
size-weighted global pool); the rows, the data, the GFLOPs convention and
``arg`` are described in ``configs/common.py`` (``table1_config``);
``--config.a.b=value`` sets any other field, and the short flags (``--limit``,
``--tau``, ...) win over both.

EViT (keep rate 0.5 or 0.6, set for about the paper's GFLOPs) and DiffRate (its
published schedule at the paper's GFLOPs) rows too: ``:evit=0`` / ``:diffrate=none``
leave them out (``table1_config``).

Checkpoint: the *fine-tuned* MAE ViT-B/16 classifier the paper evaluates, from
the MAE release (``mae_finetuned_vit_base.pth``). It is a PyTorch ``.pth``:
reading it needs torch (``pip install torch``, CPU build), or convert it once to
safetensors where torch is installed (see ``mame_jax.models.checkpoints``). Note that
``timm/vit_base_patch16_224.mae`` on the hub is the *pretrained* encoder without
a classifier head: it cannot give Table 1's accuracy. Downloaded once into
``~/.cache/mame_jax`` (``$MAME_JAX_CACHE``); ``--checkpoint PATH`` uses a local
file instead.
"""

from mame_jax.configs import common

# A name mame_jax.models.load knows: its URL (and checksum) live in one table there.
CHECKPOINT = "mae_b"


def get_config(arg=None):
  return common.table1_config(arg, checkpoint=CHECKPOINT, preprocess="timm", tome_r=16,
                              tome_recipe="mae",
                              evit=0.5, evit_layers="3,6,9", diffrate="mae_base@8.7")
