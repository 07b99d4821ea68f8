"""SigLIP 2 B/16 at 512 px (big_vision): zero-shot ImageNet-1k.

Paper: Table 3 (zero-shot classification on ImageNet-1k, RTX 3090, FP32, batch
size 1) -- SigLIP2 (ViT-B/16) at 512 px: baseline 43.90 img/s, 78.37% top-1;
ToMe(r=32) 50.89 img/s, 76.46%; ToMe(r=64) 68.07 img/s, 71.60%;
MaMe(tau=0.9) 76.15 img/s, 75.09%; MaMe(tau=0.95) 56.15 img/s, 78.02%
(the abstract's "1.3x with negligible degradation, 78.02 vs. 78.37").

    mame-jax eval --config configs/siglip2_b16_512.py
    mame-jax eval --config configs/siglip2_b16_512.py:tome_r=64,limit=5000
    mame-jax eval --config configs/siglip2_b16_512.py --checkpoint siglip2_b16_512.npz \
        --config.zeroshot.tokenizer=gemma_tokenizer.model

Rows: baseline, MaMe at tau 0.9 and 0.95 in the first 8 blocks of the image
tower (MAP head: no special token) and ToMe(r=32) in every block, classifying
against the 1000 ImageNet class names x the CLIP paper's 80 templates.
Throughput depends on device, dtype and batch size (the paper times batch size
1): compare the speedup ratios. Our GFLOPs are XLA's count (2 per multiply-add).

Checkpoint and tokeniser: ``siglip2_b16_512`` and ``gemma_tokenizer`` (SigLIP 2
uses the Gemma SentencePiece model, 64 tokens, EOS appended, padded with 0)
from big_vision's public bucket, downloaded once into ``~/.cache/mame_jax``
(``$MAME_JAX_CACHE``); the third command takes local copies.

Data: ImageNet-1k validation for tfds (``imagenet2012``, prepared offline as for
Table 1), or ``:data=PATH``.
``arg`` keys: batch_size, dtype, data, tome_r, limit (``common.table3_config``).
"""

from mame_jax.configs import common

TAUS = (0.9, 0.95)


def get_config(arg=None):
  return common.table3_config(arg, checkpoint="siglip2_b16_512", tokenizer="gemma_tokenizer",
                              style="siglip2", taus=TAUS, tome_r=32)
