"""MAE ViT-H/14, fine-tuned on ImageNet-1k: Table 1, "ViT-H (MAE)".

Paper: Table 1, ViT-H (MAE): baseline 86.88% / 167.4 GFLOPs / 299 img/s; MaMe
85.51% / 93.2 / 908 (3.04x); ToMe 85.54% / 99.1 / 512; EViT 86.01% / 92.9 / 500;
DiffRate 86.40% / 93.2 / 504 (A100, batch 1024, FP16).

    mame-jax eval --config configs/mae_h.py
    mame-jax eval --config configs/mae_h.py:batch_size=512,dtype=bfloat16 --limit 5000
    mame-jax eval --config configs/mae_h.py --config.merge.tau='(0.7,0.9)' --limit 5000
    mame-jax calibrate --config configs/mae_h.py --target-speedup 2 --limit 10000

Rows: baseline, MaMe (tau = 0.8, first 8 blocks) and ToMe (r = 7) run by ToMe's
MAE recipe (``merge.tome_recipe = "mae"``: no proportional attention, a
size-weighted global pool); the rows, the data, the GFLOPs convention and
``arg`` are described in ``configs/common.py`` (``table1_config``);
``--config.a.b=value`` sets any other field, and the short flags (``--limit``,
``--tau``, ...) win over both.

EViT (keep rate 0.5 or 0.6, set for about the paper's GFLOPs) and DiffRate (its
published schedule at the paper's GFLOPs) rows too: ``:evit=0`` / ``:diffrate=none``
leave them out (``table1_config``).

Checkpoint: the *fine-tuned* MAE ViT-H/14 classifier the paper evaluates, from
the MAE release (``mae_finetuned_vit_huge.pth``). It is a PyTorch ``.pth``:
reading it needs torch (``pip install torch``, CPU build), or convert it once to
safetensors where torch is installed (see ``mame_jax.models.checkpoints``). Note that
``timm/vit_huge_patch14_224.mae`` on the hub is the *pretrained* encoder without
a classifier head: it cannot give Table 1's accuracy. Downloaded once into
``~/.cache/mame_jax`` (``$MAME_JAX_CACHE``); ``--checkpoint PATH`` uses a local
file instead.
"""

from mame_jax.configs import common

# A name mame_jax.models.load knows: its URL (and checksum) live in one table there.
CHECKPOINT = "mae_h"


def get_config(arg=None):
  return common.table1_config(arg, checkpoint=CHECKPOINT, preprocess="timm", tome_r=7,
                              tome_recipe="mae",
                              evit=0.6, evit_layers="8,16,24", diffrate="mae_huge@93.2")
