"""DeiT-B (ViT-B/16, timm ``deit_base_patch16_224.fb_in1k``): Table 1, "ViT-B
(DeiT)".

Paper: Table 1, ViT-B (DeiT): baseline 81.83% / 17.6 GFLOPs / 2130 img/s; MaMe
79.80% / 8.7 / 4117 (1.93x); ToMe 77.84% / 8.8 / 4023 (A100, batch 1024, FP16).

    mame-jax eval --config configs/deit_b.py
    mame-jax eval --config configs/deit_b.py:batch_size=512,dtype=bfloat16 --limit 5000
    mame-jax calibrate --config configs/deit_b.py --target-speedup 2 --limit 10000

Rows: baseline, MaMe (tau = 0.8, the first 8 blocks, the paper's training-free
default) and ToMe (r = 16, every block, proportional attention) -- ToMe's r for
about half the baseline's FLOPs, as its Table 1 row. Our GFLOPs are XLA's count
(2 FLOPs per multiply-add): about twice the paper's fvcore figures. Throughput
depends on the device and dtype: compare the *ratios* (speedup columns) with the
paper's, not the images/s.

Data: ImageNet-1k validation for tfds (``imagenet2012``), prepared once offline
(``tfds build imagenet2012 --file_format=array_record`` with the ILSVRC2012
tarballs in the manual dir); ``:data=imagenette`` or ``--data PATH`` (class
folders) for a quick look.

Checkpoint: The timm weights on the Hugging Face hub
(``timm/deit_base_patch16_224.fb_in1k``), safetensors: they load without torch.
Downloaded once into ``~/.cache/mame_jax`` (``$MAME_JAX_CACHE``); ``--checkpoint
PATH`` uses a local file instead.

``arg``: comma-separated ``key=value`` overrides of batch_size, dtype
(``float32`` | ``bfloat16`` | ``float16``; the paper times FP16), data, tau,
tome_r (0: no ToMe row), limit (0: all images).
"""

from mame_jax.evaluate import table1_config

CHECKPOINT = ("https://huggingface.co/timm/"
              "deit_base_patch16_224.fb_in1k/resolve/main/model.safetensors")


def get_config(arg=None):
  return table1_config(arg, checkpoint=CHECKPOINT, preprocess="timm", tome_r=16)
