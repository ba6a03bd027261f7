"""Fréchet distance and Inception Score on closed forms; the FID InceptionV3, its weights file and
the pytorch-fid converter on weights and state dicts made here."""

import math
import os

import jax
import numpy as np
import pytest
from flax import nnx

from medim_jax.convert import inception_checkpoint
from medim_jax.evaluation import image_metrics
from medim_jax.models import inception


# --- Fréchet distance ---------------------------------------------------------------------------

def test_frechet_distance_1d_closed_form():
  # (0 - 3)^2 + 1 + 4 - 2 sqrt(1 * 4) = 10
  assert image_metrics.frechet_distance([0.0], [[1.0]], [3.0], [[4.0]]) == pytest.approx(10.0,
                                                                                         abs=1e-12)


def test_frechet_distance_diagonal_closed_form():
  rng = np.random.default_rng(0)
  mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
  s1, s2 = rng.uniform(0.1, 3.0, 6), rng.uniform(0.1, 3.0, 6)
  expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
  got = image_metrics.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
  assert got == pytest.approx(expected, abs=1e-9)


def test_frechet_distance_non_commuting_2x2_closed_form():
  # For 2x2 PSD S1, S2: tr sqrt(S1 S2) = sqrt(tr(S1 S2) + 2 sqrt(det S1 det S2)).
  s1 = np.array([[2.0, 0.9], [0.9, 1.0]])
  s2 = np.array([[0.5, -0.3], [-0.3, 3.0]])
  assert not np.allclose(s1 @ s2, s2 @ s1)
  trace_sqrt = math.sqrt(np.trace(s1 @ s2) + 2 * math.sqrt(np.linalg.det(s1) * np.linalg.det(s2)))
  mu1, mu2 = np.array([1.0, -2.0]), np.array([0.5, 0.0])
  expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt
  assert image_metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, abs=1e-9)


def test_frechet_distance_of_identical_distributions_is_zero():
  features = np.random.default_rng(1).normal(size=(200, 32)) @ np.random.default_rng(2).normal(
      size=(32, 32))
  mu, sigma = image_metrics.gaussian_statistics(features)
  assert image_metrics.frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-8)
  # Rank-deficient covariance (fewer samples than dimensions, as FID with few images).
  mu, sigma = image_metrics.gaussian_statistics(features[:10])
  assert image_metrics.frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-6)


def test_gaussian_statistics():
  features = np.random.default_rng(3).normal(size=(50, 4)).astype(np.float32)
  mu, sigma = image_metrics.gaussian_statistics(features)
  assert mu.dtype == sigma.dtype == np.float64 and sigma.shape == (4, 4)
  centred = features.astype(np.float64) - features.mean(0, dtype=np.float64)
  np.testing.assert_allclose(sigma, centred.T @ centred / 49, atol=1e-12)
  with pytest.raises(ValueError):
    image_metrics.gaussian_statistics(features[:1])


def test_named_feature_distance_refuses_the_fid_name():
  real = np.random.default_rng(4).normal(size=(40, 3))
  assert image_metrics.frechet_distance_of_features(
      "frechet_distance_vq_encoder", real, real + [1.0, 2.0, 0.0]) == {
          "frechet_distance_vq_encoder": pytest.approx(5.0, abs=1e-9)}
  for name in ("FID", " fid ", "Inception Score"):
    with pytest.raises(ValueError, match="reserved"):
      image_metrics.frechet_distance_of_features(name, real, real)


# --- Inception Score ------------------------------------------------------------------------------

def test_inception_score_of_identical_predictions_is_one():
  p = np.tile(np.random.default_rng(5).dirichlet(np.ones(7)), (40, 1))
  mean, std = image_metrics.inception_score(p, splits=4)
  assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)


def test_inception_score_of_evenly_spread_one_hot_classes_is_k():
  k, splits = 6, 5
  labels = np.arange(splits * k * 3) % k  # every split holds each class equally often
  mean, std = image_metrics.inception_score(np.eye(k)[labels], splits=splits)
  assert mean == pytest.approx(k, abs=1e-9) and std == pytest.approx(0.0, abs=1e-9)


def test_inception_score_two_class_closed_form():
  p = np.array([[1.0, 0.0], [0.5, 0.5]])  # p(y) = (0.75, 0.25)
  kl = (math.log(1 / 0.75) + 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)) / 2
  assert image_metrics.inception_score(p, splits=1)[0] == pytest.approx(math.exp(kl), abs=1e-12)
  with pytest.raises(ValueError):
    image_metrics.inception_score(p * 2, splits=1)


# --- the wrapper ----------------------------------------------------------------------------------

def test_without_weights_fid_and_is_are_unavailable_not_numbers(tmp_path):
  images = np.zeros((4, 8, 8, 3), np.uint8)
  for path in (None, "", str(tmp_path / "nowhere.npz")):
    result = image_metrics.inception_metrics(images, images, path)
    assert set(result) == {"fid", "inception_score"}
    for value in result.values():
      assert set(value) == {"unavailable"} and value["unavailable"]
  assert "nowhere.npz" in result["fid"]["unavailable"]


def test_fid_and_inception_score_plumbing():
  def extract(images):  # stand-in network: flattened pixels, class = brightest channel
    flat = images.reshape(len(images), -1).astype(np.float64)
    return flat, np.eye(3)[images.mean(axis=(1, 2)).argmax(-1)]
  rng = np.random.default_rng(6)
  images = rng.random((12, 2, 2, 3))
  images[np.arange(12), :, :, np.arange(12) % 3] += 2.0
  result = image_metrics.fid_and_inception_score(images, images, extract, splits=4)
  assert result["fid"] == pytest.approx(0.0, abs=1e-8)
  assert result["inception_score"] == pytest.approx(3.0) and result["num_generated"] == 12
  by_task = image_metrics.fid_and_inception_score(
      {"same": images, "shifted": images + 1.0, "one": images[:1]}, images, extract, splits=4)
  assert by_task["same"] == result
  # 12 dimensions each moved by 1; the covariance has rank 11, and round-off in its null space
  # costs about sqrt(machine eps) in tr sqrt(S1 S2).
  assert by_task["shifted"]["fid"] == pytest.approx(12.0, abs=1e-6)
  assert set(by_task["one"]["fid"]) == {"unavailable"}


# --- InceptionV3 ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def random_inception():
  """Random weights and one compiled forward of one 32x32 image (the slow part, done once)."""
  params = inception.random_params(seed=0)
  model = inception.from_params(params)
  # Exactly representable in uint8, so the extractor's uint8 path must give the same features.
  image = np.random.default_rng(7).integers(0, 256, (1, 32, 32, 3)).astype(np.float32) / 255
  graphdef, state = nnx.split(model)
  features, probabilities = jax.device_get(
      inception.features_and_probabilities(graphdef, state, image))
  return dict(params=params, model=model, graphdef=graphdef, image=image, features=features,
              probabilities=probabilities)


def test_inception_shapes_from_a_small_image(random_inception):
  features, probabilities = random_inception["features"], random_inception["probabilities"]
  assert features.shape == (1, inception.FEATURE_DIM) and probabilities.shape == (1, 1008)
  assert np.all(np.isfinite(features)) and np.all(features >= 0) and features.std() > 0
  np.testing.assert_allclose(probabilities.sum(), 1.0, atol=1e-5)
  logits = random_inception["model"].logits(features)
  assert logits.shape == (1, inception.NUM_CLASSES)
  assert sum(int(np.prod(v.shape)) for v in random_inception["params"].values()) == 23_833_744


def test_feature_extractor_pads_batches_and_reads_uint8(random_inception):
  image = np.round(random_inception["image"] * 255).astype(np.uint8)
  extract = inception.feature_extractor(random_inception["model"], batch_size=1)
  features, probabilities = extract(np.concatenate([image, image]))  # same program as the fixture
  assert features.shape == (2, 2048) and features.dtype == np.float64
  np.testing.assert_allclose(features[0], features[1])
  np.testing.assert_allclose(features[0], random_inception["features"][0], rtol=1e-6)


def test_preprocess_resizes_like_pytorch_fid():
  rng = np.random.default_rng(8)
  gray = rng.random((1, 40, 56, 1), np.float32)
  out = np.asarray(inception.preprocess(gray))
  assert out.shape == (1, 299, 299, 3) and out.min() >= -1 and out.max() <= 1
  np.testing.assert_allclose(out[..., 0], out[..., 2], atol=1e-6)
  np.testing.assert_allclose(np.asarray(inception.preprocess(np.full((1, 9, 9, 3), 0.5))), 0.0,
                             atol=1e-6)
  torch = pytest.importorskip("torch")
  expected = torch.nn.functional.interpolate(torch.from_numpy(gray).permute(0, 3, 1, 2),
                                             size=(299, 299), mode="bilinear", align_corners=False)
  np.testing.assert_allclose(out[..., 0], 2 * expected[:, 0].numpy() - 1, atol=1e-5)


def test_weights_round_trip_and_errors(random_inception, tmp_path):
  path = str(tmp_path / "inception.npz")
  inception.save_weights(random_inception["model"], path)
  with np.load(path) as data:
    assert data["Mixed_6b/branch7x7_2/kernel"].shape == (1, 7, 128, 128)
    assert data["fc/kernel"].shape == (2048, 1008)
  loaded = inception.load_weights(path)
  graphdef, state = nnx.split(loaded)
  assert graphdef == random_inception["graphdef"]
  features, _ = inception.features_and_probabilities(graphdef, state, random_inception["image"])
  np.testing.assert_array_equal(np.asarray(features), random_inception["features"])

  params = dict(random_inception["params"])
  del params["Mixed_7c/branch_pool/kernel"]
  params["Mixed_5b/branch1x1/bias"] = np.zeros(5, np.float32)
  broken = str(tmp_path / "broken.npz")
  np.savez(broken, **params)
  with pytest.raises(ValueError) as error:
    inception.load_weights(broken)
  message = str(error.value)
  assert broken in message and "'Mixed_7c/branch_pool/kernel'" in message
  assert "'Mixed_5b/branch1x1/bias' has shape (5,)" in message
  with pytest.raises(FileNotFoundError, match="missing.npz"):
    inception.load_weights(str(tmp_path / "missing.npz"))


# --- the pytorch-fid converter --------------------------------------------------------------------

def conv_bn_relu_reference(x, weight, gamma, beta, mean, var, stride, padding, eps=1e-3):
  """NCHW numpy: torch's Conv2d (OIHW, no bias) -> BatchNorm2d (eval) -> ReLU, by loops."""
  (pad_h, pad_w) = padding
  x = np.pad(x, ((0, 0), (0, 0), (pad_h, pad_h), (pad_w, pad_w)))
  out_c, _, kh, kw = weight.shape
  out_h, out_w = (x.shape[2] - kh) // stride + 1, (x.shape[3] - kw) // stride + 1
  y = np.zeros((x.shape[0], out_c, out_h, out_w))
  for i in range(out_h):
    for j in range(out_w):
      patch = x[:, :, i * stride:i * stride + kh, j * stride:j * stride + kw]
      y[:, :, i, j] = np.einsum("nchw,ochw->no", patch, weight)
  y = (y - mean[:, None, None]) / np.sqrt(var[:, None, None] + eps) * gamma[:, None, None] \
      + beta[:, None, None]
  return np.maximum(y, 0)


def tiny_state_dict(rng):
  """Two layers in pytorch-fid naming, one with a 1x7 kernel (an H/W swap would show)."""
  state = {}
  for layer, shape in (("Conv2d_1a_3x3", (4, 3, 3, 3)), ("Mixed_6b.branch7x7_2", (5, 3, 1, 7))):
    out = shape[0]
    state[f"{layer}.conv.weight"] = rng.normal(size=shape).astype(np.float32)
    state[f"{layer}.bn.weight"] = rng.uniform(0.5, 2, out).astype(np.float32)
    state[f"{layer}.bn.bias"] = rng.normal(size=out).astype(np.float32)
    state[f"{layer}.bn.running_mean"] = rng.normal(size=out).astype(np.float32)
    state[f"{layer}.bn.running_var"] = rng.uniform(0.1, 2, out).astype(np.float32)
    state[f"{layer}.bn.num_batches_tracked"] = np.array(7)
  state["fc.weight"] = rng.normal(size=(6, 4)).astype(np.float32)
  state["fc.bias"] = rng.normal(size=6).astype(np.float32)
  return state


@pytest.mark.parametrize("layer,kernel,stride,padding", [
    ("Conv2d_1a_3x3", (3, 3), 2, (0, 0)), ("Mixed_6b.branch7x7_2", (1, 7), 1, (0, 3))])
def test_converter_folds_batch_norm_into_the_conv(layer, kernel, stride, padding):
  rng = np.random.default_rng(9)
  state = tiny_state_dict(rng)
  params = inception_checkpoint.convert_state_dict(state)
  target = layer.replace(".", "/")
  weight = state[f"{layer}.conv.weight"]
  assert params[f"{target}/kernel"].shape == (*kernel, weight.shape[1], weight.shape[0])  # HWIO
  conv = nnx.eval_shape(lambda: inception.basic_conv(weight.shape[1], weight.shape[0], kernel,
                                                     nnx.Rngs(0), stride=stride, padding=padding))
  conv.kernel.set_value(params[f"{target}/kernel"])
  conv.bias.set_value(params[f"{target}/bias"])
  x = rng.normal(size=(2, 3, 9, 11)).astype(np.float32)
  expected = conv_bn_relu_reference(
      x.astype(np.float64), weight.astype(np.float64),
      *(state[f"{layer}.bn.{f}"].astype(np.float64)
        for f in ("weight", "bias", "running_mean", "running_var")), stride, padding)
  got = np.asarray(conv(x.transpose(0, 2, 3, 1))).transpose(0, 3, 1, 2)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(params["fc/kernel"], state["fc.weight"].T)
  np.testing.assert_array_equal(params["fc/bias"], state["fc.bias"])


def test_converter_rejects_incomplete_or_foreign_state_dicts(tmp_path):
  state = tiny_state_dict(np.random.default_rng(10))
  source = str(tmp_path / "tiny_fid.npz")
  np.savez(source, **state)
  with pytest.raises(ValueError) as error:
    inception_checkpoint.main([source, str(tmp_path / "out.npz")])
  assert source in str(error.value) and "'Mixed_5b/branch1x1/kernel'" in str(error.value)
  assert not os.path.exists(tmp_path / "out.npz")
  no_norm = {k: v for k, v in state.items() if k != "Conv2d_1a_3x3.bn.running_var"}
  with pytest.raises(ValueError, match="Conv2d_1a_3x3.bn.running_var"):
    inception_checkpoint.convert_state_dict(no_norm)
  foreign = {**state, "Mixed_5b.branch1x1.weight": state["fc.bias"]}  # not a pytorch-fid name
  with pytest.raises(ValueError, match="Mixed_5b.branch1x1.weight"):
    inception_checkpoint.convert_state_dict(foreign)
  assert "AuxLogits" not in str(inception_checkpoint.convert_state_dict(
      {**state, "AuxLogits.fc.weight": state["fc.weight"]}))
