"""Image-code embeddings that start out knowing what the codes look like.

A freshly initialised model sees its image codes as unrelated symbols, and has to learn from scratch
that two codes of nearly the same grey are nearly the same thing. With
``model.image_embedding_init="codebook"`` each image code's embedding row starts as its random
initialisation plus the code's decoded appearance (tokenizers/image.code_appearance) projected onto
its principal components, so brightness and texture are linear directions of the embedding from
step 0; the text rows and every other weight are unchanged.
"""

from __future__ import annotations

import numpy as np

INITS = ("random", "codebook")


def appearance_coordinates(appearance, d_model: int, std: float) -> np.ndarray:
  """(K, d_model): principal-component coordinates of the codes' appearances, the strongest first
  (zero-padded when the appearances have fewer dimensions), scaled so that their mean square over
  all K x d_model entries is std**2, the energy of the random initialisation they are added to."""
  centred = np.asarray(appearance, np.float64)
  centred = centred - centred.mean(axis=0)
  components = np.linalg.svd(centred, full_matrices=False)[2][:d_model]
  coords = np.zeros((len(centred), d_model))
  coords[:, :len(components)] = centred @ components.T
  energy = np.mean(coords ** 2)
  if energy == 0.0:
    raise ValueError("every image code decodes to the same appearance: nothing to initialise from")
  return (coords * (std / np.sqrt(energy))).astype(np.float32)
