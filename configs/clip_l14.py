"""CLIP ViT-L/14 at 224 px (OpenAI, transformers folder): zero-shot ImageNet-1k.

Paper: Table 3 (zero-shot classification on ImageNet-1k, RTX 3090, FP32, batch
size 1) -- CLIP (ViT-L/14): baseline 51.22 img/s, 70.34% top-1; ToMe(r=12)
52.86 img/s, 66.00%; MaMe(tau=0.8) 64.01 img/s, 69.95%.

    mame-jax eval --config configs/clip_l14.py
    mame-jax eval --config configs/clip_l14.py:limit=5000,batch_size=32
    mame-jax eval --config configs/clip_l14.py --checkpoint clip-vit-large-patch14 \
        --config.zeroshot.tokenizer=clip-vit-large-patch14

Rows: baseline, MaMe at tau 0.7 and 0.8 in the first 8 blocks of the image
tower (the class token is the special token, never merged) and ToMe with r = 8
and r = 12 in every block. Each image embedding is classified against the 1000
ImageNet class names x the CLIP paper's 80 templates (class embeddings computed
once); CLIP was trained with a softmax over these logits. Throughput depends on
device, dtype and batch size (the paper times batch size 1): compare the speedup
ratios. Our GFLOPs are XLA's count (2 per multiply-add).

Checkpoint and tokeniser: ``clip_l14`` (``openai/clip-vit-large-patch14`` on the
Hugging Face hub: config.json, model.safetensors and tokenizer.json, downloaded
once into ``~/.cache/mame_jax``, ``$MAME_JAX_CACHE``); the third command takes a
local folder (``save_pretrained`` layout) for both. CLIP preprocessing: the short
side resized to 224 (bicubic), a central 224 crop, CLIP's mean / std inside the
model; texts are 77 BPE tokens.

Data: ImageNet-1k validation for tfds (``imagenet2012``, prepared offline as for
Table 1), or ``:data=PATH``. ``arg`` keys: batch_size, dtype, data, tome_r (one
ToMe row instead of r = 8 and 12; 0: none), limit (``common.table3_config``).
"""

from mame_jax.configs import common

TAUS = (0.7, 0.8)
TOME_R = (8, 12)


def get_config(arg=None):
  config = common.table3_config(arg, checkpoint="clip_l14", tokenizer="clip_l14",
                                style="clip", taus=TAUS, tome_r=-1, image_size=224)
  if tuple(config.merge.tome_r) == (-1,):  # no tome_r in arg: the paper's two rows
    config.merge.tome_r = TOME_R
  config.model.preprocess = "clip"
  config.zeroshot.length = 77
  return config
