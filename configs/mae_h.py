"""MAE ViT-H/14, fine-tuned on ImageNet-1k: Table 1, "ViT-H (MAE)".

Paper: Table 1, ViT-H (MAE): baseline 86.88% / 167.4 GFLOPs / 299 img/s; MaMe
85.51% / 93.2 / 908 (3.04x); ToMe 85.54% / 99.1 / 512 (A100, batch 1024, FP16).

    mame-jax eval --config configs/mae_h.py
    mame-jax eval --config configs/mae_h.py:batch_size=512,dtype=bfloat16 --limit 5000
    mame-jax calibrate --config configs/mae_h.py --target-speedup 2 --limit 10000

Rows: baseline, MaMe (tau = 0.8, the first 8 blocks, the paper's training-free
default) and ToMe (r = 7, every block, proportional attention) -- ToMe's r for
about half the baseline's FLOPs, as its Table 1 row. Our GFLOPs are XLA's count
(2 FLOPs per multiply-add): about twice the paper's fvcore figures. Throughput
depends on the device and dtype: compare the *ratios* (speedup columns) with the
paper's, not the images/s.

Data: ImageNet-1k validation for tfds (``imagenet2012``), prepared once offline
(``tfds build imagenet2012 --file_format=array_record`` with the ILSVRC2012
tarballs in the manual dir); ``:data=imagenette`` or ``--data PATH`` (class
folders) for a quick look.

Checkpoint: the *fine-tuned* MAE ViT-H/14 classifier the paper evaluates, from
the MAE release (``mae_finetuned_vit_huge.pth``). It is a PyTorch ``.pth``:
reading it needs torch (``pip install torch``, CPU build), or convert it once to
safetensors where torch is installed (see ``mame_jax.checkpoints``). Note that
``timm/vit_huge_patch14_224.mae`` on the hub is the *pretrained* encoder without
a classifier head: it cannot give Table 1's accuracy. Downloaded once into
``~/.cache/mame_jax`` (``$MAME_JAX_CACHE``); ``--checkpoint PATH`` uses a local
file instead.

``arg``: comma-separated ``key=value`` overrides of batch_size, dtype
(``float32`` | ``bfloat16`` | ``float16``; the paper times FP16), data, tau,
tome_r (0: no ToMe row), limit (0: all images).
"""

from mame_jax.evaluate import table1_config

CHECKPOINT = "https://dl.fbaipublicfiles.com/mae/finetune/mae_finetuned_vit_huge.pth"


def get_config(arg=None):
  return table1_config(arg, checkpoint=CHECKPOINT, preprocess="timm", tome_r=7)
