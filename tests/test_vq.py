"""The VQ image tokenizer: shapes, the quantiser's straight-through gradient, codebook lookups,
the tokenizer file round trip, and a short training run with dead-code restarts."""

import dataclasses
import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from medim_jax import errors
from medim_jax.models import vq
from medim_jax.tokenizers import image as image_tokenizers
from medim_jax.training import checkpointing

TINY = vq.VQConfig(channels=8, channel_mult=(1, 2, 2), num_res_blocks=1, attention_levels=(1,),
                   z_channels=8, embed_dim=4, codebook_size=16, num_groups=4)


@pytest.mark.parametrize("l2", [True, False])
def test_shapes_through_encoder_quantiser_decoder(l2):
  cfg = dataclasses.replace(TINY, l2_normalize=l2)
  model = vq.VQModel(cfg, rngs=nnx.Rngs(0))
  images = jax.random.uniform(jax.random.PRNGKey(0), (2, 16, 16, 3), minval=-1, maxval=1)
  run = nnx.jit(lambda m, x: (m(x), m.encode(x), m.decode(m.encode(x))))
  (recon, indices, losses, latents), encoded, decoded = run(model, images)
  assert cfg.downsample == 4
  assert recon.shape == images.shape and indices.shape == (2, 4, 4) and latents.shape == (2, 4, 4, 4)
  assert set(losses) == {"codebook_loss", "commitment_loss"}
  np.testing.assert_array_equal(encoded, indices)
  np.testing.assert_allclose(decoded, recon, atol=1e-5)  # decoding the codes = the forward pass


def test_published_shapes():
  assert vq.CHAMELEON.downsample == 16 and vq.CHAMELEON.codebook_size == 8192
  assert vq.LLAMAGEN_DS16.downsample == 16 and vq.LLAMAGEN_DS8.downsample == 8
  codes = jax.eval_shape(lambda x: vq.VQModel(vq.LLAMAGEN_DS8, rngs=nnx.Rngs(0)).encode(x),
                         jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32))
  assert codes.shape == (1, 32, 32)


def test_quantiser_passes_gradients_straight_through():
  quantiser = vq.Quantizer(dataclasses.replace(TINY, l2_normalize=False), rngs=nnx.Rngs(0))
  z = jax.random.normal(jax.random.PRNGKey(1), (2, 3, 3, 4))
  weights = jax.random.normal(jax.random.PRNGKey(2), z.shape)

  def downstream(z):
    quantised, _, _ = quantiser(z)
    return jnp.sum(quantised * weights)

  np.testing.assert_allclose(jax.grad(downstream)(z), weights, rtol=1e-6)  # identity gradient
  quantised, indices, losses = quantiser(z)
  np.testing.assert_allclose(quantised, quantiser.lookup(indices), rtol=1e-6, atol=1e-6)
  codes = quantiser.codebook()
  expected = np.argmin(((np.asarray(z)[..., None, :] - np.asarray(codes)) ** 2).sum(-1), -1)
  np.testing.assert_array_equal(indices, expected)  # the nearest code, by brute force
  np.testing.assert_allclose(losses["commitment_loss"],
                             0.25 * np.mean((np.asarray(quantised) - np.asarray(z)) ** 2), rtol=1e-5)


def test_codebook_lookup_round_trip():
  """Latents that are codebook vectors quantise to themselves, for plain and l2 codebooks."""
  for l2 in (False, True):
    quantiser = vq.Quantizer(dataclasses.replace(TINY, l2_normalize=l2), rngs=nnx.Rngs(3))
    indices = jax.random.randint(jax.random.PRNGKey(4), (3, 5), 0, TINY.codebook_size)
    latents = quantiser.lookup(indices) * (2.5 if l2 else 1.0)  # l2: the scale must not matter
    np.testing.assert_array_equal(quantiser.nearest(latents), indices)


def test_tokenizer_interface_and_file_round_trip(tmp_path):
  model = vq.VQModel(TINY, rngs=nnx.Rngs(5))
  params = nnx.to_pure_dict(nnx.state(model))
  tokenizer = image_tokenizers.VQTokenizer(TINY, params, image_size=16, batch_size=4)
  images = np.random.default_rng(0).integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
  codes = tokenizer.encode(images)  # 6 images: a full batch of 4 and a padded one
  assert codes.shape == (6, 16) and codes.dtype == np.int32 and tokenizer.tokens_per_image == 16
  direct = nnx.jit(lambda m, x: m.encode(x))(model, jnp.asarray(images, jnp.float32) / 127.5 - 1.0)
  direct = direct.reshape(6, -1)
  np.testing.assert_array_equal(codes, direct)
  decoded = tokenizer.decode(codes)
  assert decoded.shape == images.shape and decoded.dtype == np.uint8

  tokenizer.save(str(tmp_path / "vq.npz"))
  loaded = image_tokenizers.load_image_tokenizer(str(tmp_path / "vq.npz"))
  assert isinstance(loaded, image_tokenizers.VQTokenizer)
  assert loaded.fingerprint == tokenizer.fingerprint and loaded.config == TINY
  np.testing.assert_array_equal(loaded.encode(images), codes)
  # Another batch size compiles other kernels: pixels may round differently by one level.
  assert np.abs(loaded.decode(codes).astype(int) - decoded).max() <= 1


def test_spot_field_is_a_sum_of_gaussians():
  from medim_jax.training import train_vq
  centres = np.array([[[10.0, 20.0], [0.0, 0.0]]])
  field = train_vq.spot_field((32, 32), centres, np.array([[2.0, 1.0]]), np.array([[0.3, -0.2]]))
  assert field.shape == (1, 32, 32)
  np.testing.assert_allclose(field[0, 10, 20], 0.3, rtol=1e-6)         # the other spot adds e^-250
  np.testing.assert_allclose(field[0, 10, 22], 0.3 * np.exp(-0.5), rtol=1e-6)  # one sigma away
  np.testing.assert_allclose(field[0, 0, 0], -0.2 + 0.3 * np.exp(-500 / 8), atol=1e-7)


def test_spots_are_grey_bounded_and_a_function_of_seed_and_step():
  from configs import demo as demo_config
  from medim_jax.training import train_vq
  cfg = demo_config.get_config().vq_train
  cfg.batch_size = 64
  images = np.full((5, 24, 24, 3), 128, np.uint8)
  plain = train_vq.batch_at(images, 7, cfg.batch_size, cfg.seed)
  spotted = train_vq.training_batch(images, 7, cfg)
  np.testing.assert_array_equal(spotted, train_vq.training_batch(images, 7, cfg))  # resumable
  change = spotted - plain
  np.testing.assert_array_equal(change[..., 0], change[..., 1])  # grey: the same in every channel
  assert np.abs(change).max() <= cfg.spots_per_image * cfg.spot_contrast
  changed = (np.abs(change) > 1e-3).any(axis=(1, 2, 3))
  assert 0.5 < changed.mean() < 1.0  # 0..3 spots per image: about a quarter get none
  cfg.spots_per_image = 0
  np.testing.assert_array_equal(train_vq.training_batch(images, 7, cfg), plain)
  config = demo_config.get_config()
  config.vq_train.spot_max_sigma = 0.5
  with pytest.raises(errors.InputError, match="spot_max_sigma"):
    train_vq.train_vq(config, "unused")  # before any data is read


def test_train_vq_resume_gives_the_uninterrupted_tokenizer(tmp_path, monkeypatch):
  from medim_jax.training import train_vq
  from tests.test_shards_and_pipeline import folders_config, make_folder
  for name in ("a_train", "b_train"):
    make_folder(tmp_path / name, 12, len(name))
  config = folders_config(tmp_path)  # configs/demo.py:tiny: a 2-level VQ, 4 steps, checkpoint at 2
  config.data.datasets.chest.test = config.data.datasets.pathology.val = ""  # no evaluation here
  train_vq.train_vq(config, str(tmp_path / "a"), progress_bars=False)

  original = train_vq.batch_at

  def dying(images, step, batch_size, seed):
    if step == 4:
      raise KeyboardInterrupt("simulated kill")
    return original(images, step, batch_size, seed)
  monkeypatch.setattr(train_vq, "batch_at", dying)
  with pytest.raises(KeyboardInterrupt):
    train_vq.train_vq(config, str(tmp_path / "b"), progress_bars=False)
  monkeypatch.setattr(train_vq, "batch_at", original)
  train_vq.train_vq(config, str(tmp_path / "b"), progress_bars=False)

  def terminated_at_3(images, step, batch_size, seed):
    if step == 3:  # the handler sees it during step 3, which finishes and is saved
      os.kill(os.getpid(), signal.SIGTERM)
    return original(images, step, batch_size, seed)
  monkeypatch.setattr(train_vq, "batch_at", terminated_at_3)
  with pytest.raises(errors.Preempted, match="after step 3"):
    train_vq.train_vq(config, str(tmp_path / "c"), progress_bars=False)
  assert checkpointing.Checkpointer(str(tmp_path / "c" / "vq" / "checkpoints"), 2).all_steps() == [2, 3]
  monkeypatch.setattr(train_vq, "batch_at", original)
  train_vq.train_vq(config, str(tmp_path / "c"), progress_bars=False)

  a, b, c = (image_tokenizers.load_image_tokenizer(str(tmp_path / run / "vq" / "tokenizer.npz"))
             for run in "abc")
  assert a.fingerprint == b.fingerprint == c.fingerprint  # a hash of every parameter: bit-identical


@pytest.mark.parametrize("policy", ["skip", "stop"])
def test_a_non_finite_vq_step_is_never_applied(tmp_path, monkeypatch, policy):
  from medim_jax.training import train_vq
  from tests.test_shards_and_pipeline import folders_config, make_folder
  for name in ("a_train", "b_train"):
    make_folder(tmp_path / name, 12, len(name))
  config = folders_config(tmp_path)
  config.data.datasets.chest.test = config.data.datasets.pathology.val = ""
  config.vq_train.num_steps, config.vq_train.checkpoint_every = 3, 1
  config.train.on_nonfinite = policy
  original = train_vq.batch_at
  poisoned = lambda images, step, batch_size, seed: (
      original(images, step, batch_size, seed) * (np.nan if step == 3 else 1.0))
  monkeypatch.setattr(train_vq, "batch_at", poisoned)
  directory = str(tmp_path / "vq" / "checkpoints")
  if policy == "stop":
    with pytest.raises(errors.NonFiniteError, match=f"step 3.*Last checkpoint: {directory}/2"):
      train_vq.train_vq(config, str(tmp_path), progress_bars=False)
    assert checkpointing.Checkpointer(directory, 2).all_steps() == [1, 2]
    return
  train_vq.train_vq(config, str(tmp_path), progress_bars=False)
  checkpointer = checkpointing.Checkpointer(directory, 2)
  abstract = train_vq.VQTrainer(config).abstract_state()
  before, after = (checkpointer.restore(abstract, step=step) for step in (2, 3))
  assert int(after.step) == 3
  for name in ("params", "opt_state", "usage"):
    jax.tree.map(np.testing.assert_array_equal, getattr(before, name), getattr(after, name))
  rows = [json.loads(line) for line in open(tmp_path / "vq" / "metrics.jsonl")]
  assert [r["nonfinite"] for r in rows if r["split"] == "train"] == [0.0, 1.0]  # steps 1-2, 3
