"""``--mode train_vq``: train the VQ image tokenizer on the training images of the configured data.

Loss: L1 + L2 reconstruction, codebook and commitment terms, and optionally a PatchGAN hinge loss
after ``vq_train.gan_start_step``; training images can carry random spots (``with_spots``). Codes
whose running usage falls below a threshold are restarted on encoder outputs of the current batch
(dead-code restarts). Codebook usage and perplexity are logged; checkpoints resume exactly (batches,
spots included, depend only on the seed and the step). As in MeDiM training, a non-finite step is
never applied (``config.train.on_nonfinite`` decides whether to go on) and SIGTERM / Ctrl-C finish the
step, save a checkpoint and stop (exit 143 / 130). At the end the tokenizer is exported to
``WORKDIR/vq/tokenizer.npz`` and evaluated on the test split: PSNR of the decoded uint8 images,
codebook usage and perplexity, next to the k-means patch stand-in at the same token count, with a PNG
of originals beside reconstructions; on medim-demo also how much of each finding's contrast both keep
(``evaluation/finding_visibility.py``), with a PNG of what each passes on.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from medim_jax import errors, progress, visualize
from medim_jax.data import demo
from medim_jax.models import vq
from medim_jax.tokenizers import image as image_tokenizers
from medim_jax.training import checkpointing, loss_watch, metric_writer, preemption


@flax.struct.dataclass
class VQTrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  disc_params: Any        # PatchGAN discriminator, or None
  disc_opt_state: Any
  usage: jax.Array        # running share of each code, x codebook size (uniform use = 1)


class PatchDiscriminator(nnx.Module):
  """A small PatchGAN: strided 4x4 convolutions to a map of real/fake logits."""

  def __init__(self, channels: int, *, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(3, channels, (4, 4), strides=2, rngs=rngs)
    self.conv2 = nnx.Conv(channels, 2 * channels, (4, 4), strides=2, rngs=rngs)
    self.norm2 = nnx.GroupNorm(2 * channels, num_groups=min(32, 2 * channels), rngs=rngs)
    self.conv3 = nnx.Conv(2 * channels, 1, (4, 4), rngs=rngs)

  def __call__(self, x):
    x = jax.nn.leaky_relu(self.conv1(x), 0.2)
    x = jax.nn.leaky_relu(self.norm2(self.conv2(x)), 0.2)
    return self.conv3(x)


def psnr(a, b) -> np.ndarray:
  """Per-image PSNR in dB of uint8 images (peak 255)."""
  mse = ((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2).mean(axis=(1, 2, 3))
  return 10.0 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-10))


def code_statistics(codes, codebook_size: int) -> dict[str, float]:
  counts = np.bincount(np.asarray(codes).ravel(), minlength=codebook_size)
  p = counts / counts.sum()
  entropy = -(p[p > 0] * np.log(p[p > 0])).sum()
  return {"codebook_usage": float((counts > 0).mean()), "perplexity": float(np.exp(entropy))}


class VQTrainer:

  def __init__(self, config):
    self.config, self.train_cfg = config, config.vq_train
    self.vq_config = vq.VQConfig.from_config(config.vq)
    abstract = nnx.eval_shape(lambda: vq.VQModel(self.vq_config, rngs=nnx.Rngs(0)))
    self.graphdef, _ = nnx.split(abstract)
    cfg = self.train_cfg
    self.tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(
        optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, cfg.warmup_steps,
                                           max(cfg.num_steps, cfg.warmup_steps + 1),
                                           cfg.learning_rate * 0.1), b1=0.5, b2=0.9))
    self.use_gan = cfg.gan_weight > 0
    if self.use_gan:
      disc = nnx.eval_shape(lambda: PatchDiscriminator(cfg.gan_channels, rngs=nnx.Rngs(0)))
      self.disc_graphdef, _ = nnx.split(disc)
      self.disc_tx = optax.adam(cfg.learning_rate, b1=0.5, b2=0.9)
    self.train_step = jax.jit(self._train_step, donate_argnums=(0,))

  def init_state(self, seed: int) -> VQTrainState:
    def init():
      params = nnx.to_pure_dict(nnx.state(vq.VQModel(self.vq_config, rngs=nnx.Rngs(seed))))
      disc = disc_opt = None
      if self.use_gan:
        disc = nnx.to_pure_dict(nnx.state(PatchDiscriminator(self.train_cfg.gan_channels,
                                                              rngs=nnx.Rngs(seed + 1))))
        disc_opt = self.disc_tx.init(disc)
      return VQTrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=self.tx.init(params), disc_params=disc, disc_opt_state=disc_opt,
                          usage=jnp.ones((self.vq_config.codebook_size,), jnp.float32))
    return jax.jit(init)()

  def abstract_state(self) -> VQTrainState:
    return jax.eval_shape(lambda: self.init_state(0))

  def _generator_loss(self, params, disc_params, images, gan_on):
    cfg = self.train_cfg
    recon, indices, losses, latents = nnx.merge(self.graphdef, params)(images)
    l1 = jnp.mean(jnp.abs(recon - images))
    l2 = jnp.mean((recon - images) ** 2)
    loss = cfg.l1_weight * l1 + cfg.l2_weight * l2 + losses["codebook_loss"] + losses["commitment_loss"]
    metrics = {"l1": l1, "l2": l2, **losses}
    if self.use_gan:
      fake_logits = nnx.merge(self.disc_graphdef, disc_params)(recon)
      gan = -jnp.mean(fake_logits)
      loss = loss + gan_on * cfg.gan_weight * gan
      metrics["generator_gan_loss"] = gan
    metrics["loss"] = loss
    return loss, (metrics, indices, latents, recon)

  def _train_step(self, state: VQTrainState, images, key):
    cfg, k = self.train_cfg, self.vq_config.codebook_size
    gan_on = (state.step >= cfg.gan_start_step).astype(jnp.float32)
    grads, (metrics, indices, latents, recon) = jax.grad(self._generator_loss, has_aux=True)(
        state.params, state.disc_params, images, gan_on)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)

    counts = jnp.bincount(indices.ravel(), length=k).astype(jnp.float32)
    usage = cfg.usage_decay * state.usage + (1 - cfg.usage_decay) * counts * k / counts.sum()
    restart = (cfg.restart_every > 0) & ((state.step + 1) % max(cfg.restart_every, 1) == 0)
    dead = restart & (usage < cfg.dead_code_threshold)
    flat = latents.reshape(-1, latents.shape[-1])
    replacement = flat[jax.random.randint(key, (k,), 0, flat.shape[0])]
    embedding = params["quantize"]["embedding"]
    params["quantize"]["embedding"] = jnp.where(dead[:, None], replacement, embedding)
    usage = jnp.where(dead, 1.0, usage)

    disc_params, disc_opt_state = state.disc_params, state.disc_opt_state
    if self.use_gan:
      def disc_loss(d):
        disc = nnx.merge(self.disc_graphdef, d)
        real, fake = disc(images), disc(jax.lax.stop_gradient(recon))
        return gan_on * (jnp.mean(jax.nn.relu(1 - real)) + jnp.mean(jax.nn.relu(1 + fake)))
      d_loss, d_grads = jax.value_and_grad(disc_loss)(disc_params)
      d_updates, disc_opt_state = self.disc_tx.update(d_grads, disc_opt_state, disc_params)
      disc_params = optax.apply_updates(disc_params, d_updates)
      metrics["discriminator_loss"] = d_loss

    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(optax.tree.norm(grads))
    if self.use_gan:
      finite &= jnp.isfinite(d_loss)
    # A non-finite step changes nothing (params, codebook restarts, usage, discriminator); the
    # step counter still advances so the batches move on, and the host-side loss watch decides.
    params, opt_state, usage, disc_params, disc_opt_state = loss_watch.applied_if_finite(
        finite, (params, opt_state, usage, disc_params, disc_opt_state),
        (state.params, state.opt_state, state.usage, state.disc_params, state.disc_opt_state))
    metrics["nonfinite"] = jnp.logical_not(finite).astype(jnp.float32)

    p = counts / counts.sum()
    metrics["perplexity"] = jnp.exp(-jnp.sum(jnp.where(p > 0, p * jnp.log(p), 0.0)))
    metrics["batch_codebook_usage"] = jnp.mean(counts > 0)
    metrics["dead_codes_restarted"] = jnp.sum(dead)
    metrics["psnr"] = 10.0 * jnp.log10(4.0 / jnp.maximum(metrics["l2"], 1e-10))
    new_state = VQTrainState(step=state.step + 1, params=params, opt_state=opt_state,
                             disc_params=disc_params, disc_opt_state=disc_opt_state, usage=usage)
    return new_state, metrics

  def tokenizer(self, state: VQTrainState, image_size: int) -> image_tokenizers.VQTokenizer:
    return image_tokenizers.VQTokenizer(self.vq_config, state.params, image_size)


class NoImagesError(errors.InputError):
  pass


def load_split_images(config, split: str) -> tuple[np.ndarray, list[str]]:
  """All images of one split of the configured datasets, and which dataset each came from."""
  from medim_jax.data import dicom, folders, tokenize
  images, names = [], []
  for name, source in tokenize.source_folders(config, progress=False).items():
    folder = source[split] or (source["val"] if split == "test" else "")
    if not folder or source.get("text_only"):
      continue
    data = folders.load(folder, config.data.image_size, config.data.square, config.data.on_bad_pair,
                        dicom_window=dicom.config_window(config.data))
    images.append(data.images)
    names += [name] * len(data)
  if not images:
    raise NoImagesError(f"no {split} folder in the configured datasets")
  return np.concatenate(images), names


def batch_at(images: np.ndarray, step: int, batch_size: int, seed: int) -> np.ndarray:
  """Batch ``step``: random rows and random horizontal flips, a function of (seed, step) only."""
  rng = np.random.default_rng([seed, step])
  rows = rng.integers(0, len(images), batch_size)
  batch = images[rows].astype(np.float32) / 127.5 - 1.0
  flip = rng.random(batch_size) < 0.5
  batch[flip] = batch[flip, :, ::-1]
  return batch


MIN_SPOT_SIGMA = 0.7  # px: a spot one or two pixels wide, a granuloma's size at 64 px


def spot_field(size: tuple[int, int], centres, sigmas, amplitudes) -> np.ndarray:
  """Sums of Gaussian spots, one image per row: (N, H, W) from (N, K, 2) centres (y, x) in pixels
  and (N, K) sigmas and amplitudes."""
  y, x = np.mgrid[:size[0], :size[1]].astype(np.float32)
  squared = ((y - centres[..., 0, None, None]) ** 2 + (x - centres[..., 1, None, None]) ** 2)
  spots = amplitudes[..., None, None] * np.exp(-squared / (2 * sigmas[..., None, None] ** 2))
  return spots.sum(axis=1).astype(np.float32)


def with_spots(batch: np.ndarray, rng: np.random.Generator, max_count: int, contrast: float,
               max_sigma: float) -> np.ndarray:
  """``batch`` (N, H, W, C in [-1, 1]) with 0..max_count random grey spots per image: bright or dark,
  peak 0.1-1 x ``contrast``, Gaussian sigma log-uniform in [MIN_SPOT_SIGMA, max_sigma], anywhere.

  Trained on plain images, the tokenizer learns the average anatomy so well that a small deviation
  from it (a nodule, a blunted angle) is snapped back to normal; spots that can sit anywhere teach
  it to pass local contrast through (README: the VQ image tokenizer)."""
  n, h, w = batch.shape[:3]
  count = rng.integers(0, max_count + 1, n)
  centres = rng.uniform(0, (h, w), (n, max_count, 2))
  sigmas = np.exp(rng.uniform(np.log(MIN_SPOT_SIGMA), np.log(max_sigma), (n, max_count)))
  amplitudes = (rng.uniform(0.1 * contrast, contrast, (n, max_count))
                * rng.choice([-1.0, 1.0], (n, max_count))
                * (np.arange(max_count) < count[:, None]))
  field = spot_field((h, w), centres, sigmas, amplitudes)
  return np.clip(batch + field[..., None], -1.0, 1.0)


def training_batch(images: np.ndarray, step: int, cfg) -> np.ndarray:
  """Batch ``step`` of VQ training, spots included: a function of (seed, step) only."""
  batch = batch_at(images, step, cfg.batch_size, cfg.seed)
  if cfg.spots_per_image > 0:
    batch = with_spots(batch, np.random.default_rng([cfg.seed, step, 1]), cfg.spots_per_image,
                       cfg.spot_contrast, cfg.spot_max_sigma)
  return batch


def tokenizer_path(workdir: str) -> str:
  return os.path.join(workdir, "vq", "tokenizer.npz")


def training_settings(config) -> dict:
  """What a trained tokenizer depends on (its record is written beside it)."""
  from medim_jax.data import tokenize
  data = tokenize.settings(config)
  training = {k: v for k, v in config.vq_train.to_dict().items()
              if k not in ("log_every", "checkpoint_every")}
  return json.loads(json.dumps({
      "vq": config.vq.to_dict(), "vq_train": training,
      "data": {k: data[k] for k in ("name", "image_size", "square", "datasets", "demo") if k in data}},
      default=list))


def is_trained(config, workdir: str) -> bool:
  """Whether W/vq holds a tokenizer trained with these settings; an error if with other ones."""
  record = os.path.join(workdir, "vq", "trained_with.json")
  if not (os.path.exists(tokenizer_path(workdir)) and os.path.exists(record)):
    return False
  with open(record) as f:
    saved = json.load(f)
  current = training_settings(config)
  if saved != current:
    differ = sorted(f"{group}.{k}" for group in current for k in
                    set(current[group]) | set(saved.get(group, {}))
                    if current[group].get(k) != saved.get(group, {}).get(k))
    raise ValueError(f"{os.path.join(workdir, 'vq')} holds a VQ tokenizer trained with other "
                     f"settings (differing: {', '.join(differ)}): use another --workdir, or delete "
                     "that folder (and the shards made with it) to retrain")
  return True


def train_vq(config, workdir: str, progress_bars: bool = True) -> dict:
  if config.data.name not in ("medim_demo", "folders"):
    raise ValueError(f"--mode train_vq trains on medim_demo or folders images; config.data.name is "
                     f"{config.data.name!r} (the smoke data has its own exact palette tokenizer)")
  cfg = config.vq_train
  if cfg.spots_per_image < 0 or (cfg.spots_per_image > 0 and not (
      cfg.spot_contrast > 0 and cfg.spot_max_sigma >= MIN_SPOT_SIGMA)):
    raise errors.InputError(
        f"vq_train spots need spots_per_image >= 0, spot_contrast > 0 and spot_max_sigma >= "
        f"{MIN_SPOT_SIGMA}; got {cfg.spots_per_image}, {cfg.spot_contrast}, {cfg.spot_max_sigma}")
  out_dir = os.path.join(workdir, "vq")
  os.makedirs(out_dir, exist_ok=True)
  train_images, _ = load_split_images(config, "train")
  trainer = VQTrainer(config)
  checkpointer = checkpointing.Checkpointer(os.path.join(out_dir, "checkpoints"), 2,
                                            remove_half_written=True,
                                            on_corrupt=config.train.on_corrupt_checkpoint)
  watch = loss_watch.LossWatch.from_config(config.train)  # the same policy as MeDiM training
  if checkpointer.latest_step() is not None:
    state = checkpointer.restore(trainer.abstract_state())
    print(f"Resumed VQ training from {checkpointer.directory}/{int(state.step)}")
  else:
    state = trainer.init_state(cfg.seed)
    count = sum(np.size(x) for x in jax.tree.leaves(state.params))
    print(f"New VQ tokenizer: {count:,} parameters, {trainer.vq_config.downsample}x downsampling, "
          f"codebook {trainer.vq_config.codebook_size}; {len(train_images)} training images")
  writer = metric_writer.MetricWriter(out_dir, resume_step=int(state.step))
  bar = progress.bar(cfg.num_steps, "train_vq", "step", progress_bars, initial=int(state.step))
  window, unread, start = [], [], time.perf_counter()
  key = jax.random.PRNGKey(cfg.seed)
  try:
    with preemption.StopRequests() as stop_requests:
      for step in range(int(state.step) + 1, cfg.num_steps + 1):
        batch = training_batch(train_images, step, cfg)
        state, metrics = trainer.train_step(state, batch, jax.random.fold_in(key, step))
        unread.append((step, metrics))
        bar.update(1)
        stopping = stop_requests.requested or checkpointer.reached_preemption(step)
        last = step == cfg.num_steps
        is_log, is_save = (step % every == 0 or last for every in (cfg.log_every,
                                                                   cfg.checkpoint_every))
        if not (is_log or is_save or stopping):
          continue
        window += loss_watch.read_and_watch(watch, unread, checkpointer,
                                            lambda step, note, metrics: bar.write(f"vq {note}"))
        unread = []
        if is_log:
          log_window(writer, bar, step, window, start)
          window, start = [], time.perf_counter()
        if is_save or stopping:
          checkpointer.save(step, state)
        if stopping and not last:
          raise stop_requests.preempted(step, checkpointer)
  finally:
    bar.close()
    checkpointer.close()
    writer.close()

  tokenizer = trainer.tokenizer(state, config.data.image_size)
  path = tokenizer_path(workdir)
  tokenizer.save(path)
  with open(os.path.join(out_dir, "trained_with.json"), "w") as f:
    json.dump(training_settings(config), f, indent=1)
  try:
    report = evaluate(config, tokenizer, out_dir, train_images)
  except NoImagesError as e:
    print(f"VQ tokenizer saved to {path}; not evaluated: {e}")
    return {}
  print(f"VQ tokenizer saved to {path}\n{describe(report)}")
  return report


def log_window(writer, bar, step: int, window: list[dict], start: float) -> None:
  summary = {k: float(np.mean([m[k] for m in window])) for k in window[0]}
  for counted in ("dead_codes_restarted", "nonfinite"):
    summary[counted] = float(np.sum([m[counted] for m in window]))
  summary["steps_per_s"] = len(window) / (time.perf_counter() - start)
  writer.write(step, "train", summary)
  bar.write(f"vq step {step}: loss={summary['loss']:.4f} psnr={summary['psnr']:.2f}dB "
            f"perplexity={summary['perplexity']:.1f} usage={summary['batch_codebook_usage']:.3f} "
            f"restarted={summary['dead_codes_restarted']:.0f}"
            + (f" non-finite steps skipped={summary['nonfinite']:.0f}" if summary["nonfinite"] else ""))


def evaluate(config, tokenizer, out_dir: str, train_images) -> dict:
  """Test-split PSNR, usage and perplexity of the VQ tokenizer and of the k-means stand-in."""
  test_images, datasets = load_split_images(config, "test")
  codes = tokenizer.encode(test_images)
  recon = tokenizer.decode(codes)
  stand_in = image_tokenizers.PatchKMeansTokenizer.fit(
      train_images, config.data.image_codebook_size,
      config.data.image_size // int(np.sqrt(tokenizer.tokens_per_image)), seed=0)
  stand_in_recon = stand_in.decode(stand_in.encode(test_images))
  names = sorted(set(datasets))
  members = {n: np.array([d == n for d in datasets]) for n in names}

  def quality(reconstructions):
    scores = psnr(test_images, reconstructions)
    return {"psnr_db": float(scores.mean()),
            "per_dataset_psnr_db": {n: float(scores[m].mean()) for n, m in members.items()}}

  report = {"test_images": len(test_images), "tokens_per_image": tokenizer.tokens_per_image,
            "vq": {**quality(recon), **code_statistics(codes, tokenizer.codebook_size)},
            "patch_kmeans_stand_in": {**quality(stand_in_recon),
                                      **code_statistics(stand_in.encode(test_images),
                                                        stand_in.codebook_size)}}
  if config.data.name == "medim_demo" and "chest" in demo.parts(config.data):
    from medim_jax.data import demo_chest
    from medim_jax.evaluation.demo import finding_visibility
    phantom = demo_chest.ChestPhantom.from_ct(*demo_chest.ct_paths())
    for name, tok in (("vq", tokenizer), ("patch_kmeans_stand_in", stand_in)):
      report[name]["finding_contrast_retained"] = finding_visibility.finding_visibility(
          tok, config.data.image_size, phantom=phantom)
    finding_visibility.difference_sheet({"VQ": tokenizer, "k-means": stand_in},
                                        config.data.image_size,
                                        os.path.join(out_dir, "finding_visibility.png"), phantom)
  with open(os.path.join(out_dir, "test_metrics.json"), "w") as f:
    json.dump(report, f, indent=1)
  shown = [i for n in names for i in [j for j, d in enumerate(datasets) if d == n][:6]]
  visualize.comparison_grid([test_images[shown], recon[shown], stand_in_recon[shown]],
                            ["original", "VQ tokenizer", "k-means patches"],
                            os.path.join(out_dir, "reconstructions.png"))
  return report


def describe(report: dict) -> str:
  lines = [f"  test split: {report['test_images']} images, {report['tokens_per_image']} tokens each"]
  for name, label in (("vq", "VQ tokenizer"), ("patch_kmeans_stand_in", "k-means patches")):
    r = report[name]
    per = ", ".join(f"{k} {x:.2f} dB" for k, x in r["per_dataset_psnr_db"].items())
    lines.append(f"  {label}: PSNR {r['psnr_db']:.2f} dB ({per}); codebook usage "
                 f"{r['codebook_usage']:.3f}, perplexity {r['perplexity']:.1f}")
    if "finding_contrast_retained" in r:
      lines.append("    finding contrast retained: " + ", ".join(
          f"{k} {v:.2f}" for k, v in r["finding_contrast_retained"].items()))
  lines.append("  originals beside reconstructions: reconstructions.png")
  if "finding_contrast_retained" in report["vq"]:
    lines.append("  each finding as the tokenizers pass it on: finding_visibility.png")
  return "\n".join(lines)
