"""Image fidelity against a reference: PSNR and SSIM (scikit-image's
``peak_signal_noise_ratio`` and ``structural_similarity``), the paper's measure of
how far a merged model's samples drift from the baseline's from the same noise.

Images are NumPy ``(B, H, W, C)`` (or ``(H, W, C)``) in ``[-1, 1]``, the models'
range, so ``data_range = 2``. SSIM uses scikit-image's defaults (7 x 7 uniform
window, channels averaged); images smaller than the window are refused by
scikit-image with its own message. Identical images give PSNR ``inf`` and SSIM 1.
"""

from __future__ import annotations

import numpy as np

DATA_RANGE = 2.0  # images in [-1, 1]


def _pair(images, reference):
  a, b = np.asarray(images, np.float64), np.asarray(reference, np.float64)
  if a.shape != b.shape:
    raise ValueError(f"images {a.shape} and reference {b.shape} must have the same shape")
  if a.ndim == 3:
    a, b = a[None], b[None]
  if a.ndim != 4:
    raise ValueError(f"expected images (B, H, W, C) or (H, W, C); got shape {a.shape}")
  return a, b


def psnr(images, reference, data_range: float = DATA_RANGE) -> np.ndarray:
  """(B,) PSNR in dB of each image against its reference (``inf`` where equal)."""
  from skimage.metrics import peak_signal_noise_ratio  # pylint: disable=import-outside-toplevel
  a, b = _pair(images, reference)
  out = []
  for x, r in zip(a, b):
    if np.array_equal(x, r):  # skimage divides by a zero error (and warns)
      out.append(np.inf)
    else:
      out.append(peak_signal_noise_ratio(r, x, data_range=data_range))
  return np.asarray(out)


def ssim(images, reference, data_range: float = DATA_RANGE) -> np.ndarray:
  """(B,) SSIM of each image against its reference (1 where equal)."""
  from skimage.metrics import structural_similarity  # pylint: disable=import-outside-toplevel
  a, b = _pair(images, reference)
  return np.asarray([structural_similarity(r, x, data_range=data_range, channel_axis=-1)
                     for x, r in zip(a, b)])


def summary(images, reference, data_range: float = DATA_RANGE) -> dict:
  """``{"psnr": mean dB over the finite values (inf when all images are equal),
  "ssim": mean}`` of a batch against its reference."""
  p = psnr(images, reference, data_range)
  finite = p[np.isfinite(p)]
  return {"psnr": float(finite.mean()) if finite.size else float("inf"),
          "ssim": float(ssim(images, reference, data_range).mean())}
