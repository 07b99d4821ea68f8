"""Plain NumPy transcriptions of the paper's equations, written for the tests.

Loops and float64, one sample at a time, nothing shared with the library: if
the library and this file agree, the library computes eqs. (1)-(13).
"""

import numpy as np


def partition(real, kind="alternating"):
  """Source and destination positions among the real mergeable positions."""
  real = list(real)
  if kind == "alternating":
    return real[0::2], real[1::2]
  n = (len(real) + 1) // 2
  return real[:n], real[n:]


def fusion_weights(s, tau, eps):
  """Eqs. (3)-(8), column by column."""
  m, n = s.shape
  wf = np.zeros((m, n))
  for j in range(n):
    st = np.array([max(s[i, j] - tau, 0.0) for i in range(m)])       # (3)
    w = st / (st.sum() + eps)                                         # (4)
    c = sum(w[i] / (w[i] + eps) for i in range(m))                    # (6)
    zeta = w.sum() / (c + eps)                                        # (5)
    wt = np.array([max(w[i] - zeta, 0.0) for i in range(m)])          # (7)
    wf[:, j] = wt / (wt.sum() + eps)                                  # (8)
  return wf


def cosine(a, b):
  na, nb = np.linalg.norm(a), np.linalg.norm(b)
  if na == 0 or nb == 0:
    return 0.0
  return float(np.clip(a @ b / (na * nb), -1, 1))


def mame(x, tau, num_special=0, eps=1e-6, mask=None, kind="alternating",
         similarity="cosine", metric=None, causal=False, preserve="batch"):
  """Returns (outputs: list of (L_b, D) arrays, per-sample records, the batch-wide
  mask m, or None with ``preserve="sample"``: every sample keeps its own)."""
  x = np.asarray(x, np.float64)
  metric = x if metric is None else np.asarray(metric, np.float64)
  b_size, length, _ = x.shape
  records = []
  for b in range(b_size):
    real = [p for p in range(num_special, length) if mask is None or mask[b, p]]
    src, dst = partition(real, kind)
    s = np.zeros((len(dst), len(src)))
    for i, pi in enumerate(dst):
      for j, pj in enumerate(src):
        s[i, j] = (cosine(metric[b, pi], metric[b, pj]) if similarity == "cosine"
                   else metric[b, pi] @ metric[b, pj])                # (2)
    wf = fusion_weights(s, tau, eps)
    if causal:
      for i, pi in enumerate(dst):
        for j, pj in enumerate(src):
          if pj > pi:
            wf[i, j] = 0.0
    records.append(dict(src=src, dst=dst, wf=wf, preserved=wf.sum(0) == 0))
  # Batch-wide preservation: source slot j is preserved if it is in any sample.
  n_max = max(len(r["src"]) for r in records)
  m = np.zeros(n_max, bool)
  for r in records:
    m[:len(r["src"])] |= r["preserved"]
  if preserve == "sample":
    m = None
  outputs = []
  for b, r in enumerate(records):
    keep = r["preserved"] if m is None else m[:len(r["src"])]
    wf = r["wf"] * (1 - keep)
    r.update(wf=wf, keep=keep)
    xs, xd = x[b, r["src"]], x[b, r["dst"]]
    fused = (xd + wf @ xs) / (1 + wf.sum(1))[:, None]                  # (9)
    outputs.append(np.concatenate([x[b, :num_special], fused, xs[keep]]))  # (10)
  return outputs, records, m


def mare(y, record, num_special, length):
  """Algorithm 2 for one sample: y (L_out, D) -> (length, D), zeros at padding."""
  wf, keep = record["wf"], record["keep"]
  m = len(record["dst"])
  r = 1 + wf.sum(1)
  y_dst = y[num_special:num_special + m]
  y_pres = y[num_special + m:]
  out = np.zeros((length, y.shape[1]))
  out[:num_special] = y[:num_special]
  for i, p in enumerate(record["dst"]):
    out[p] = y_dst[i] / r[i]                                            # (12)
  k = 0
  for j, p in enumerate(record["src"]):
    if keep[j]:
      out[p] = y_pres[k]
      k += 1
    else:
      out[p] = sum(wf[i, j] / r[i] * y_dst[i] for i in range(m))        # (11)
  return out


def clustered_tokens(rng, batch, length, dim, clusters=4, noise=0.15):
  """Tokens scattered around a few directions: merging has work to do."""
  centres = rng.normal(size=(clusters, dim))
  labels = rng.integers(clusters, size=(batch, length))
  return centres[labels] + noise * rng.normal(size=(batch, length, dim))


def photo_patches(names=("astronaut", "coffee", "chelsea", "rocket"), size=48, patch=8):
  """Patches of real photographs from skimage.data, mean-centred per image:
  (len(names), (size/patch)**2, patch*patch*3)."""
  import skimage.data
  import skimage.transform
  out = []
  for name in names:
    img = getattr(skimage.data, name)()[..., :3].astype(np.float64) / 255.0
    img = skimage.transform.resize(img, (size, size), anti_aliasing=True)
    g = size // patch
    p = img.reshape(g, patch, g, patch, 3).transpose(0, 2, 1, 3, 4).reshape(g * g, -1)
    out.append(p - p.mean(0))
  return np.stack(out)
