"""InceptionV3 in the FID layout (Flax NNX, NHWC): 2048-d pool3 features and 1008-way logits.

FID and the Inception Score are defined by one network: TensorFlow's 2015-12-05 Inception graph, as
ported by pytorch-fid (``pt_inception-2015-12-05-6726825d.pth``). It differs from torchvision's
InceptionV3 in three places, all kept here: the average pools inside the A, C and first E blocks
leave the zero padding out of the mean (TF's pooling), the last E block max-pools its pool branch,
and the classifier has 1008 outputs. Module names follow pytorch-fid (``Mixed_5b.branch5x5_2``), so
the converter (``medim_jax/convert/inception_checkpoint.py``) is a rename plus transposes.

Each conv + batch norm (eps 1e-3, inference statistics) + ReLU is stored as one convolution with a
bias: the converter folds the norm into the kernel, which is exact at inference and leaves nothing
but ``kernel``/``bias`` per layer.

Inputs are images in [0, 1] (or uint8), any size, 1 or 3 channels; as pytorch-fid does, they are
resized to 299x299 bilinearly (half-pixel centres, no antialiasing, like ``F.interpolate(...,
align_corners=False)``) and scaled to [-1, 1]. Weights come only from a local file
(``load_weights``): a flat ``.npz`` whose keys are the parameter paths joined by ``/``
(``Mixed_5b/branch1x1/kernel`` HWIO, ``fc/kernel`` (2048, 1008), ``fc/bias`` (1008,)).
"""

from __future__ import annotations

import functools
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

INPUT_SIZE = 299
FEATURE_DIM = 2048
NUM_CLASSES = 1008


class BasicConv(nnx.Conv):
  """Convolution (batch norm folded into kernel and bias) followed by ReLU."""

  def __call__(self, x):
    return jax.nn.relu(super().__call__(x))


def basic_conv(cin: int, cout: int, kernel, rngs: nnx.Rngs, stride: int = 1, padding=0):
  """Arguments as torch's Conv2d: ``kernel`` and ``padding`` an int or an (h, w) pair."""
  kernel = (kernel, kernel) if isinstance(kernel, int) else tuple(kernel)
  pad_h, pad_w = (padding, padding) if isinstance(padding, int) else padding
  return BasicConv(cin, cout, kernel, strides=stride, padding=((pad_h, pad_h), (pad_w, pad_w)),
                   rngs=rngs)


def max_pool(x, stride: int, padding: int = 0):
  pads = ((0, 0), (padding, padding), (padding, padding), (0, 0))
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, stride, stride, 1), pads)


def avg_pool_without_padding(x):
  """3x3, stride 1, 'same' average that divides by the number of real pixels (TF's avg_pool)."""
  pads = ((0, 0), (1, 1), (1, 1), (0, 0))
  total = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), pads)
  count = jax.lax.reduce_window(jnp.ones((1, *x.shape[1:3], 1), x.dtype), 0.0, jax.lax.add,
                                (1, 3, 3, 1), (1, 1, 1, 1), pads)
  return total / count


class InceptionA(nnx.Module):

  def __init__(self, cin: int, pool_features: int, *, rngs: nnx.Rngs):
    self.branch1x1 = basic_conv(cin, 64, 1, rngs)
    self.branch5x5_1 = basic_conv(cin, 48, 1, rngs)
    self.branch5x5_2 = basic_conv(48, 64, 5, rngs, padding=2)
    self.branch3x3dbl_1 = basic_conv(cin, 64, 1, rngs)
    self.branch3x3dbl_2 = basic_conv(64, 96, 3, rngs, padding=1)
    self.branch3x3dbl_3 = basic_conv(96, 96, 3, rngs, padding=1)
    self.branch_pool = basic_conv(cin, pool_features, 1, rngs)

  def __call__(self, x):
    return jnp.concatenate([
        self.branch1x1(x),
        self.branch5x5_2(self.branch5x5_1(x)),
        self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
        self.branch_pool(avg_pool_without_padding(x))], axis=-1)


class InceptionB(nnx.Module):
  """35x35 -> 17x17."""

  def __init__(self, cin: int, *, rngs: nnx.Rngs):
    self.branch3x3 = basic_conv(cin, 384, 3, rngs, stride=2)
    self.branch3x3dbl_1 = basic_conv(cin, 64, 1, rngs)
    self.branch3x3dbl_2 = basic_conv(64, 96, 3, rngs, padding=1)
    self.branch3x3dbl_3 = basic_conv(96, 96, 3, rngs, stride=2)

  def __call__(self, x):
    return jnp.concatenate([
        self.branch3x3(x),
        self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
        max_pool(x, stride=2)], axis=-1)


class InceptionC(nnx.Module):
  """Factorised 7x7 convolutions (1x7 then 7x1) at 17x17."""

  def __init__(self, cin: int, channels_7x7: int, *, rngs: nnx.Rngs):
    c7 = channels_7x7
    self.branch1x1 = basic_conv(cin, 192, 1, rngs)
    self.branch7x7_1 = basic_conv(cin, c7, 1, rngs)
    self.branch7x7_2 = basic_conv(c7, c7, (1, 7), rngs, padding=(0, 3))
    self.branch7x7_3 = basic_conv(c7, 192, (7, 1), rngs, padding=(3, 0))
    self.branch7x7dbl_1 = basic_conv(cin, c7, 1, rngs)
    self.branch7x7dbl_2 = basic_conv(c7, c7, (7, 1), rngs, padding=(3, 0))
    self.branch7x7dbl_3 = basic_conv(c7, c7, (1, 7), rngs, padding=(0, 3))
    self.branch7x7dbl_4 = basic_conv(c7, c7, (7, 1), rngs, padding=(3, 0))
    self.branch7x7dbl_5 = basic_conv(c7, 192, (1, 7), rngs, padding=(0, 3))
    self.branch_pool = basic_conv(cin, 192, 1, rngs)

  def __call__(self, x):
    double = x
    for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                 self.branch7x7dbl_4, self.branch7x7dbl_5):
      double = conv(double)
    return jnp.concatenate([
        self.branch1x1(x),
        self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
        double,
        self.branch_pool(avg_pool_without_padding(x))], axis=-1)


class InceptionD(nnx.Module):
  """17x17 -> 8x8."""

  def __init__(self, cin: int, *, rngs: nnx.Rngs):
    self.branch3x3_1 = basic_conv(cin, 192, 1, rngs)
    self.branch3x3_2 = basic_conv(192, 320, 3, rngs, stride=2)
    self.branch7x7x3_1 = basic_conv(cin, 192, 1, rngs)
    self.branch7x7x3_2 = basic_conv(192, 192, (1, 7), rngs, padding=(0, 3))
    self.branch7x7x3_3 = basic_conv(192, 192, (7, 1), rngs, padding=(3, 0))
    self.branch7x7x3_4 = basic_conv(192, 192, 3, rngs, stride=2)

  def __call__(self, x):
    seven = x
    for conv in (self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
      seven = conv(seven)
    return jnp.concatenate([self.branch3x3_2(self.branch3x3_1(x)), seven, max_pool(x, stride=2)],
                           axis=-1)


class InceptionE(nnx.Module):
  """8x8 blocks; ``pool`` is 'avg' for Mixed_7b and 'max' for Mixed_7c (the FID graph's quirk)."""

  def __init__(self, cin: int, pool: str, *, rngs: nnx.Rngs):
    if pool not in ("avg", "max"):
      raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
    self.pool = pool
    self.branch1x1 = basic_conv(cin, 320, 1, rngs)
    self.branch3x3_1 = basic_conv(cin, 384, 1, rngs)
    self.branch3x3_2a = basic_conv(384, 384, (1, 3), rngs, padding=(0, 1))
    self.branch3x3_2b = basic_conv(384, 384, (3, 1), rngs, padding=(1, 0))
    self.branch3x3dbl_1 = basic_conv(cin, 448, 1, rngs)
    self.branch3x3dbl_2 = basic_conv(448, 384, 3, rngs, padding=1)
    self.branch3x3dbl_3a = basic_conv(384, 384, (1, 3), rngs, padding=(0, 1))
    self.branch3x3dbl_3b = basic_conv(384, 384, (3, 1), rngs, padding=(1, 0))
    self.branch_pool = basic_conv(cin, 192, 1, rngs)

  def __call__(self, x):
    single = self.branch3x3_1(x)
    double = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    pooled = avg_pool_without_padding(x) if self.pool == "avg" else max_pool(x, 1, padding=1)
    return jnp.concatenate([
        self.branch1x1(x),
        self.branch3x3_2a(single), self.branch3x3_2b(single),
        self.branch3x3dbl_3a(double), self.branch3x3dbl_3b(double),
        self.branch_pool(pooled)], axis=-1)


def preprocess(images):
  """(N, H, W, C) in [0, 1], C in {1, 3} -> (N, 299, 299, 3) in [-1, 1], as pytorch-fid."""
  images = jnp.asarray(images, jnp.float32)
  if images.shape[-1] == 1:
    images = jnp.repeat(images, 3, axis=-1)
  n, h, w, c = images.shape
  if c != 3:
    raise ValueError(f"expected 1 or 3 channels, got images of shape {images.shape}")
  if (h, w) != (INPUT_SIZE, INPUT_SIZE):
    images = jax.image.resize(images, (n, INPUT_SIZE, INPUT_SIZE, 3), "bilinear", antialias=False)
  return 2.0 * images - 1.0


class InceptionV3(nnx.Module):
  """``model(images)`` -> pool3 features (N, 2048); ``model.logits(features)`` -> (N, 1008)."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.Conv2d_1a_3x3 = basic_conv(3, 32, 3, rngs, stride=2)
    self.Conv2d_2a_3x3 = basic_conv(32, 32, 3, rngs)
    self.Conv2d_2b_3x3 = basic_conv(32, 64, 3, rngs, padding=1)
    self.Conv2d_3b_1x1 = basic_conv(64, 80, 1, rngs)
    self.Conv2d_4a_3x3 = basic_conv(80, 192, 3, rngs)
    self.Mixed_5b = InceptionA(192, 32, rngs=rngs)
    self.Mixed_5c = InceptionA(256, 64, rngs=rngs)
    self.Mixed_5d = InceptionA(288, 64, rngs=rngs)
    self.Mixed_6a = InceptionB(288, rngs=rngs)
    self.Mixed_6b = InceptionC(768, 128, rngs=rngs)
    self.Mixed_6c = InceptionC(768, 160, rngs=rngs)
    self.Mixed_6d = InceptionC(768, 160, rngs=rngs)
    self.Mixed_6e = InceptionC(768, 192, rngs=rngs)
    self.Mixed_7a = InceptionD(768, rngs=rngs)
    self.Mixed_7b = InceptionE(1280, "avg", rngs=rngs)
    self.Mixed_7c = InceptionE(2048, "max", rngs=rngs)
    self.fc = nnx.Linear(FEATURE_DIM, NUM_CLASSES, rngs=rngs)

  def __call__(self, images):
    x = preprocess(images)
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
    x = max_pool(x, stride=2)
    x = max_pool(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), stride=2)
    for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
                  self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b,
                  self.Mixed_7c):
      x = block(x)
    return jnp.mean(x, axis=(1, 2))

  def logits(self, features, with_bias: bool = True):
    """The original Inception Score code used ``pool3 @ W`` without the bias: ``with_bias=False``."""
    logits = features @ self.fc.kernel[...]
    return logits + self.fc.bias[...] if with_bias else logits


def _flat_params(model: InceptionV3) -> dict[str, object]:
  flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
  return {"/".join(str(part) for part in path): variable.get_value() for path, variable in flat}


def parameter_shapes() -> dict[str, tuple[int, ...]]:
  """Every parameter's flat key and shape, without creating any weights."""
  return dict(_parameter_shapes())


@functools.cache
def _parameter_shapes() -> tuple:
  abstract = nnx.eval_shape(lambda: InceptionV3(rngs=nnx.Rngs(0)))
  return tuple((key, tuple(value.shape)) for key, value in _flat_params(abstract).items())


def random_params(seed: int = 0) -> dict[str, np.ndarray]:
  """He-normal kernels and zero biases, drawn with NumPy: XLA on CPU takes minutes to compile
  the 190 initialisers of ``InceptionV3(rngs=...)``, and random weights only serve tests."""
  rng = np.random.default_rng(seed)
  params = {}
  for key, shape in parameter_shapes().items():
    fan_in = int(np.prod(shape[:-1]))
    params[key] = (np.zeros(shape, np.float32) if key.endswith("bias") else
                   (rng.standard_normal(shape, np.float32) * np.sqrt(2.0 / fan_in)))
  return params


def check_params(params: dict[str, np.ndarray], source: str = "the given parameters") -> None:
  """Raises ValueError naming ``source`` and each missing, misshaped or unexpected key."""
  expected = parameter_shapes()
  problems = [f"missing key {key!r} (shape {shape})" for key, shape in expected.items()
              if key not in params]
  problems += [f"key {key!r} has shape {tuple(np.shape(params[key]))}, expected {shape}"
               for key, shape in expected.items()
               if key in params and tuple(np.shape(params[key])) != shape]
  problems += [f"unexpected key {key!r}" for key in params if key not in expected]
  if problems:
    shown = "\n  ".join(problems[:12])
    more = f"\n  ... and {len(problems) - 12} more" if len(problems) > 12 else ""
    raise ValueError(f"{source} does not fit the FID InceptionV3 ({len(problems)} problems):\n  "
                     f"{shown}{more}")


def from_params(params: dict[str, np.ndarray], source: str = "the given parameters"
                ) -> InceptionV3:
  """An InceptionV3 with exactly these flat parameters (every key present, with its shape)."""
  check_params(params, source)
  abstract = nnx.eval_shape(lambda: InceptionV3(rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  flat = nnx.to_flat_state(state)
  for key_path, variable in flat:
    variable.set_value(jnp.asarray(params["/".join(str(p) for p in key_path)], jnp.float32))
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def save_weights(model: InceptionV3, path: str) -> None:
  """One float32 array per parameter, keyed by its path joined with '/' (see the module doc)."""
  params = _flat_params(model)
  np.savez(path, **{key: np.asarray(value, np.float32) for key, value in params.items()})


def load_weights(path: str) -> InceptionV3:
  """An InceptionV3 whose every parameter comes from the ``.npz`` at ``path``."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"Inception weights file {path} does not exist")
  with np.load(path) as data:
    params = {key: np.asarray(data[key]) for key in data.files}
  return from_params(params, source=f"Inception weights file {path}")


@functools.partial(jax.jit, static_argnums=0)
def features_and_probabilities(graphdef, state, images):
  """pool3 features and the softmax of the bias-free logits (what the original Inception Score
  used), as one compiled program shared by every model with this graph."""
  net = nnx.merge(graphdef, state)
  features = net(images)
  return features, jax.nn.softmax(net.logits(features, with_bias=False), axis=-1)


def feature_extractor(model: InceptionV3, batch_size: int = 50
                      ) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
  """images (N, H, W, C), uint8 or float in [0, 1] -> (pool3 features (N, 2048), class
  probabilities (N, 1008)), float64. The last batch is padded so one program serves all batches.
  """
  graphdef, state = nnx.split(model)

  def extract(images):
    images = np.asarray(images)
    images = images.astype(np.float32) / 255.0 if images.dtype == np.uint8 else \
        images.astype(np.float32)
    features, probabilities = [], []
    for start in range(0, len(images), batch_size):
      batch = images[start:start + batch_size]
      padding = np.zeros((batch_size - len(batch), *batch.shape[1:]), np.float32)
      f, p = jax.device_get(features_and_probabilities(graphdef, state,
                                                       np.concatenate([batch, padding])))
      features.append(f[:len(batch)])
      probabilities.append(p[:len(batch)])
    return (np.concatenate(features).astype(np.float64),
            np.concatenate(probabilities).astype(np.float64))

  return extract
