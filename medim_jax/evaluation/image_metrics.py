"""Image-generation metrics: Fréchet distance (FID) and Inception Score, in NumPy float64.

FID fits a Gaussian to the Inception pool3 features of each image set and takes the Fréchet
(2-Wasserstein) distance between the two,

  |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr sqrt(S1 S2).

S1 S2 is not symmetric, so instead of a general matrix square root (scipy's ``sqrtm``, which can
return complex noise) we use tr sqrt(S1 S2) = tr sqrt(R S2 R) with R = S1^(1/2): R S2 R is symmetric
PSD and has the same eigenvalues as S1 S2, so two ``eigh`` calls give the trace, with round-off
negatives clipped to zero. With fewer samples than feature dimensions the covariances are singular;
the distance is still defined, its round-off grows to about sqrt(machine eps) x |S| per null
direction (1e-4 on Inception features), and FID from few samples is biased upwards anyway: compare
numbers only at equal sample counts.

The Inception Score is exp E_x KL(p(y|x) || p(y)), computed per split of the samples (the
original code's 10 contiguous splits) and reported as mean and standard deviation over splits.

Both are defined by one network, the FID InceptionV3 (``models/inception.py``), whose weights the
user supplies. Without them the metrics are reported as ``{"unavailable": reason}``, never replaced
by something else under their names; a Fréchet distance on other features
(``frechet_distance_of_features``) is reported under a label that names those features.
"""

from __future__ import annotations

import os
from typing import Callable

import numpy as np

# Names that mean the Inception metrics: a distance on other features must not take them.
RESERVED_NAMES = ("fid", "frechet inception distance", "fréchet inception distance",
                  "inception score", "inception_score", "is")

FeatureFn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def gaussian_statistics(features) -> tuple[np.ndarray, np.ndarray]:
  """(N, D) features -> mean (D,) and unbiased covariance (D, D), float64."""
  features = np.asarray(features, np.float64)
  if features.ndim != 2 or len(features) < 2:
    raise ValueError(f"need a (N >= 2, D) feature array, got shape {features.shape}")
  return features.mean(axis=0), np.atleast_2d(np.cov(features, rowvar=False))


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
  eigenvalues, eigenvectors = np.linalg.eigh(matrix)
  return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ eigenvectors.T


def trace_sqrt_product(sigma1, sigma2) -> float:
  """tr sqrt(S1 S2) for symmetric PSD S1, S2, via the symmetric form R S2 R, R = S1^(1/2)."""
  root = _sqrt_psd(sigma1)
  inner = root @ sigma2 @ root
  eigenvalues = np.linalg.eigvalsh((inner + inner.T) / 2.0)
  return float(np.sqrt(np.clip(eigenvalues, 0.0, None)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2)."""
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  dim = mu1.shape[0]
  if mu1.shape != (dim,) or mu2.shape != (dim,) or sigma1.shape != (dim, dim) or \
      sigma2.shape != (dim, dim):
    raise ValueError(f"shapes do not match: mu {mu1.shape} {mu2.shape}, "
                     f"sigma {sigma1.shape} {sigma2.shape}")
  distance = (np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2)
              - 2.0 * trace_sqrt_product(sigma1, sigma2))
  return max(float(distance), 0.0)  # the distance is >= 0; only round-off goes below


def inception_score(probabilities, splits: int = 10) -> tuple[float, float]:
  """(N, K) class probabilities p(y|x) -> (mean, std) over ``splits`` contiguous splits of
  exp(mean_x KL(p(y|x) || p(y))), p(y) the split's mean prediction."""
  p = np.asarray(probabilities, np.float64)
  if p.ndim != 2 or len(p) < splits or splits < 1:
    raise ValueError(f"need (N >= splits, K) probabilities, got shape {p.shape}, splits={splits}")
  if np.any(p < 0) or not np.allclose(p.sum(axis=1), 1.0, atol=1e-4):
    raise ValueError("each row must be a probability distribution (non-negative, sums to 1)")
  scores = []
  for i in range(splits):
    part = p[i * len(p) // splits:(i + 1) * len(p) // splits]
    marginal = part.mean(axis=0, keepdims=True)
    # 0 log 0 = 0; where p > 0 the marginal is > 0 too.
    terms = np.where(part > 0, part * (np.log(np.where(part > 0, part, 1.0))
                                       - np.log(np.where(part > 0, marginal, 1.0))), 0.0)
    scores.append(np.exp(terms.sum(axis=1).mean()))
  return float(np.mean(scores)), float(np.std(scores))


def _scores(real_statistics, num_reference: int, images, extract: FeatureFn, splits: int) -> dict:
  if len(images) < 2:
    reason = f"FID needs at least 2 images per set, got {len(images)} generated"
    return {"fid": {"unavailable": reason}, "inception_score": {"unavailable": reason}}
  features, probabilities = extract(images)
  splits = min(splits, len(probabilities))
  score, spread = inception_score(probabilities, splits)
  return {"fid": frechet_distance(*real_statistics, *gaussian_statistics(features)),
          "inception_score": score, "inception_score_std": spread, "inception_score_splits": splits,
          "num_generated": len(features), "num_reference": num_reference}


def fid_and_inception_score(generated, reference, extract: FeatureFn, splits: int = 10) -> dict:
  """FID of generated images against ``reference`` and their IS. ``generated``: an image array,
  or {name: image array} for several sets (the result is then keyed the same way and the
  reference goes through the network once).

  ``extract`` maps images to (pool3 features, class probabilities) and must be the FID
  InceptionV3 (``inception.feature_extractor``): these names mean that network's numbers.
  """
  real_features, _ = extract(reference)
  real_statistics = gaussian_statistics(real_features)
  if isinstance(generated, dict):
    return {name: _scores(real_statistics, len(real_features), images, extract, splits)
            for name, images in generated.items()}
  return _scores(real_statistics, len(real_features), generated, extract, splits)


def inception_weights_problem(weights_path: str | None) -> str | None:
  """Why FID/IS cannot run with these weights, or None when they can."""
  if not weights_path:
    return ("no Inception weights configured: convert pytorch-fid's "
            "pt_inception-2015-12-05-6726825d.pth with `python -m "
            "medim_jax.convert.inception_checkpoint IN.pth OUT.npz` and pass OUT.npz")
  if not os.path.exists(weights_path):
    return f"Inception weights file {weights_path} does not exist"
  return None


def inception_metrics(generated, reference, weights_path: str | None, batch_size: int = 50,
                      splits: int = 10) -> dict:
  """FID and IS (``fid_and_inception_score``) with the FID InceptionV3 from ``weights_path`` (a
  converted ``.npz``); without weights, ``{"fid": {"unavailable": reason}, "inception_score":
  {"unavailable": reason}}``.

  Images: (N, H, W, C) uint8, or float in [0, 1]; C in {1, 3}; resized to 299 inside the network.
  """
  reason = inception_weights_problem(weights_path)
  if reason is None and len(reference) < 2:
    reason = f"FID needs at least 2 reference images, got {len(reference)}"
  if reason is not None:
    return {"fid": {"unavailable": reason}, "inception_score": {"unavailable": reason}}
  from medim_jax.models import inception  # JAX and the network only when they will run
  extract = inception.feature_extractor(inception.load_weights(weights_path), batch_size)
  return fid_and_inception_score(generated, reference, extract, splits)


def frechet_distance_of_features(name: str, real_features, fake_features) -> dict[str, float]:
  """{name: Fréchet distance between Gaussians fitted to two (N, D) feature sets}, e.g. on our
  VQ encoder's features. ``name`` must say which features; the FID/IS names are refused."""
  if name.strip().lower() in RESERVED_NAMES:
    raise ValueError(f"{name!r} is reserved for the Inception metrics; name the features used, e.g. "
                     "'frechet_distance_vq_encoder_features'")
  return {name: frechet_distance(*gaussian_statistics(real_features),
                                 *gaussian_statistics(fake_features))}
