"""Training: state, jitted step, and the loop with logging, validation and checkpoints."""

from __future__ import annotations

import os
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from medim_jax import errors, progress as progress_bars
from medim_jax.data import base as data_base, build as data_build
from medim_jax.diffusion import corruption, loss as loss_lib, schedules
from medim_jax.models import code_embedding, transformer
from medim_jax.parallel import mesh as mesh_lib, sharding
from medim_jax.tokenizers import image as image_tokenizers
from medim_jax.tokenizers.vocab import TokenLayout
from medim_jax.training import checkpointing, loss_watch, preemption
from medim_jax.training.metric_writer import MetricWriter
from medim_jax.training.optimizer import make_optimizer


# fold_in(step key, this) is the dropout key: a stream apart from the time and mask keys' split.
_DROPOUT_STREAM = 0xD0


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any          # pure dict of float32 arrays
  opt_state: Any
  ema_params: Any      # same structure as params, or None when EMA is off
  rng: jax.Array       # raw uint32 key; the step key is fold_in(rng, step)


class Model:
  """The backbone as a pure function of a params dict: ``apply(params, tokens, sigma, key_mask)``."""

  def __init__(self, config, layout: TokenLayout):
    self.config = transformer.TransformerConfig.from_config(
        config.model, layout.vocab_size, (layout.text_length, layout.image_length))
    abstract = nnx.eval_shape(lambda: transformer.MeDiMTransformer(self.config, rngs=nnx.Rngs(0)))
    self.logical_axes = sharding.logical_axes(abstract)
    self.graphdef, abstract_state = nnx.split(abstract)
    self.abstract_params = nnx.to_pure_dict(abstract_state)

  def init(self, seed: int):
    model = transformer.MeDiMTransformer(self.config, rngs=nnx.Rngs(seed))
    return nnx.to_pure_dict(nnx.state(model))

  def bind(self, params) -> transformer.MeDiMTransformer:
    return nnx.merge(self.graphdef, params)

  def apply(self, params, tokens, sigma, key_mask=None):
    return self.bind(params)(tokens, sigma, key_mask)

  def apply_and_context(self, params, tokens, sigma, query: tuple[int, int]):
    """(logits (B, L, V), the condition cache of ``tokens[:, query[0]:query[1]]``): the sampler's
    refresh step (models/transformer.py, ``hidden_and_context``)."""
    module = self.bind(params)
    hidden, context = module.hidden_and_context(tokens, sigma, query)
    return module.logits(hidden), context

  def apply_query(self, params, tokens, sigma, query: tuple[int, int], context, ids=None):
    """Logits (B, query[1] - query[0], V) of the query range only, the rest read from ``context``;
    over the ids [lo, hi) only with ``ids=(lo, hi)``."""
    module = self.bind(params)
    return module.logits(module.query_hidden(tokens, sigma, query, context), ids)

  def apply_with_findings(self, params, tokens, sigma, key_mask=None):
    """(token logits, finding logits (B, L, num_findings)) from one pass."""
    module = nnx.merge(self.graphdef, params)
    hidden = module.hidden(tokens, sigma, key_mask)
    return module.logits(hidden), module.findings(hidden)


class Trainer:
  """Everything a run needs that follows from the config: model, optimizer, mesh, jitted steps.

  The state lives on the mesh as config.mesh.rules say (params and Adam moments by their logical
  axes, the rest replicated); batches are split over the mesh's data and fsdp axes.
  """

  def __init__(self, config, layout: TokenLayout, devices=None, finding_positive_weight=None):
    """``devices``: the mesh's devices when not jax.devices() (ahead-of-time compilation).
    ``finding_positive_weight`` (K,): with a finding head, the positive weights of the finding
    loss (data/finding_labels.py); batches with ``finding_labels`` then train the head."""
    self.config, self.layout = config, layout
    self.model = Model(config, layout)
    self.finding_positive_weight = (None if finding_positive_weight is None else
                                    jnp.asarray(finding_positive_weight, jnp.float32))
    self.schedule = schedules.get_schedule(config.diffusion.schedule, config.diffusion.eps)
    self.task_mix = corruption.TaskMix.from_config(config.diffusion)
    self.modality_weights = (config.diffusion.text_loss_weight, config.diffusion.image_loss_weight)
    self.tx, self.learning_rate = make_optimizer(config.train)
    self.mesh = mesh_lib.make_mesh(config.mesh, devices)
    self.state_shardings = self._state_shardings(sharding.rules_from_config(config.mesh.rules))
    replicated = sharding.replicated(self.mesh)
    self._jit_train_step = jax.jit(self._train_step, donate_argnums=(0,),
                                   out_shardings=(self.state_shardings, replicated))
    self._jit_eval_step = jax.jit(self._eval_step, out_shardings=replicated)

  def _new_state(self, seed: int, image_code_coordinates=None) -> TrainState:
    params = self.model.init(seed)
    if image_code_coordinates is not None:
      rows = slice(self.layout.image_offset, self.layout.image_offset + self.layout.image_vocab_size)
      params = {**params, "embedding": params["embedding"].at[rows].add(image_code_coordinates)}
    return self._state_around(params, seed)

  def _state_around(self, params, seed: int) -> TrainState:
    ema = params if self.config.train.ema_decay > 0 else None
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params),
                      ema_params=ema, rng=jax.random.PRNGKey(seed + 1))

  def _state_shardings(self, rules) -> TrainState:
    abstract = jax.eval_shape(lambda: self._new_state(0))
    params = sharding.param_shardings(abstract.params, self.model.logical_axes, rules, self.mesh)
    replicated = sharding.replicated(self.mesh)
    return TrainState(
        step=replicated, params=params,
        opt_state=sharding.optimizer_shardings(self.tx, abstract.opt_state, abstract.params, params,
                                                 self.mesh),
        ema_params=params if abstract.ema_params is not None else None, rng=replicated)

  def init_state(self, seed: int, image_tokenizer=None) -> TrainState:
    """A new state, created in place on the mesh (never whole on one device); its params come
    from config.model.pretrained_dir (a Hugging Face Gemma / Liquid checkpoint) when set.

    ``image_tokenizer`` (the data's) is what config.model.image_embedding_init="codebook" starts
    the image-code embeddings from; other settings do not look at it.
    """
    pretrained = self.config.model.pretrained_dir
    coordinates = self._image_code_coordinates(image_tokenizer)
    if not pretrained:
      with jax.set_mesh(self.mesh):
        return jax.jit(lambda: self._new_state(seed, coordinates),
                       out_shardings=self.state_shardings)()
    from medim_jax.convert import hf_gemma
    offset = self.config.model.pretrained_image_token_offset
    params = hf_gemma.load(pretrained, self.model.config, self.layout, seed=seed,
                           shardings=self.state_shardings.params,
                           image_token_offset=offset if offset >= 0 else None)
    print(f"Initialised from {pretrained} (first {self.model.config.num_layers} layers)")
    with jax.set_mesh(self.mesh):
      return jax.jit(lambda p: self._state_around(p, seed),
                     out_shardings=self.state_shardings)(params)

  def _image_code_coordinates(self, image_tokenizer):
    init = self.config.model.image_embedding_init
    if init not in code_embedding.INITS:
      raise errors.InputError(f"config.model.image_embedding_init must be one of "
                              f"{code_embedding.INITS}, got {init!r}")
    if init == "random":
      return None
    if self.config.model.pretrained_dir:
      raise errors.InputError("config.model.image_embedding_init='codebook' starts fresh image-code "
                              "embeddings; config.model.pretrained_dir brings its own: use one")
    if image_tokenizer is None:
      raise errors.InputError("config.model.image_embedding_init='codebook' needs the image "
                              "tokenizer (train_and_evaluate passes the data's)")
    if image_tokenizer.codebook_size != self.layout.image_vocab_size:
      raise errors.InputError(f"the image tokenizer has {image_tokenizer.codebook_size} codes, the "
                              f"token layout {self.layout.image_vocab_size}")
    return jnp.asarray(code_embedding.appearance_coordinates(
        image_tokenizers.code_appearance(image_tokenizer), self.model.config.d_model,
        self.config.model.init_std))

  def abstract_state(self) -> TrainState:
    """Shapes, dtypes and target shardings: what a checkpoint restores into, on any mesh."""
    abstract = jax.eval_shape(lambda: self._new_state(0))
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, self.state_shardings)

  def train_step(self, state: TrainState, batch) -> tuple[TrainState, dict]:
    """One optimizer step on a (host-local) batch; the state passed in is donated."""
    with jax.set_mesh(self.mesh):  # layers that run per shard (splash attention) read the mesh
      return self._jit_train_step(state, sharding.place_batch(batch, self.mesh))

  def eval_step(self, params, batch, index):
    with jax.set_mesh(self.mesh):
      return self._jit_eval_step(params, sharding.place_batch(batch, self.mesh), index)

  def _loss(self, params, batch, key, training: bool = True):
    """The loss and its metrics; ``training``: with dropout (config.model.dropout_rate), whose key
    is folded from ``key`` so the times and masks drawn are the same with and without it."""
    time_key, mask_key = jax.random.split(key)
    tokens = batch["tokens"]
    t = schedules.stratified_times(time_key, tokens.shape[0], self.config.diffusion.t_min,
                                   self.config.diffusion.time_warp)
    corrupted = corruption.corrupt(mask_key, tokens, batch["valid"], batch["prompt_length"], t,
                                   self.schedule, self.layout, self.task_mix)
    t = corrupted.t  # whole-target rows (diffusion.whole_target_prob) are at t = 1
    sigma = self.schedule.sigma(t)
    trains_findings = self.model.config.num_findings > 0 and "finding_labels" in batch
    module = self.model.bind(params)
    # Training on padding, every position is valid (data/pipeline.py): no key mask to apply.
    key_mask = None if self.config.data.train_on_padding else batch["valid"]
    dropout_key = jax.random.fold_in(key, _DROPOUT_STREAM) if training else None
    hidden = module.hidden(corrupted.noisy, sigma, key_mask, dropout_key)
    segment_logits = [module.logits(hidden[:, positions], (lo, hi))
                      for positions, lo, hi in self.layout.segments()]
    nll, best = loss_lib.segment_target_nll(segment_logits, tokens, self.layout)
    loss, metrics = loss_lib.weighted_diffusion_loss(
        nll, best, corrupted, t, self.schedule, self.layout, self.modality_weights,
        self.config.diffusion.loss_weighting)
    if trains_findings:
      finding_logits = module.findings(hidden)
      if self.finding_positive_weight is None:
        raise ValueError("a batch with finding labels needs Trainer(finding_positive_weight=...)")
      finding, finding_metrics = loss_lib.finding_loss(
          finding_logits, batch["finding_labels"], batch["finding_known"], corrupted, self.layout,
          self.finding_positive_weight)
      loss = loss + self.config.diffusion.finding_loss_weight * finding
      metrics = {**metrics, **finding_metrics, "loss": loss}
    return loss, metrics

  def _train_step(self, state: TrainState, batch):
    key = jax.random.fold_in(state.rng, state.step)
    (_, metrics), grads = jax.value_and_grad(self._loss, has_aux=True)(state.params, batch, key)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state.ema_params
    if ema is not None:
      decay = self.config.train.ema_decay
      ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
    # A non-finite loss or gradient never reaches the state: the step keeps what it had (the step
    # counter still advances, so the data and keys move on); loss_watch decides whether to go on.
    params, opt_state, ema = loss_watch.applied_if_finite(
        finite, (params, opt_state, ema), (state.params, state.opt_state, state.ema_params))
    metrics = dict(metrics, grad_norm=grad_norm, learning_rate=self.learning_rate(state.step),
                   nonfinite=jnp.logical_not(finite).astype(jnp.float32))
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema), metrics

  def _eval_step(self, params, batch, index):
    # A fixed key per eval batch, so validation losses are comparable across steps and runs.
    return self._loss(params, batch, jax.random.fold_in(jax.random.PRNGKey(0), index),
                      training=False)[1]

  def evaluate(self, params, batches) -> dict[str, float]:
    totals = [self.eval_step(params, b, i) for i, b in enumerate(batches)]
    return {k: float(np.mean([m[k] for m in totals])) for k in totals[0]}


def _should_sync_every_step(setting: str) -> bool:
  if setting == "auto":
    return jax.default_backend() == "cpu" and jax.device_count() > 1
  if setting in ("always", "never"):
    return setting == "always"
  raise errors.InputError(f"config.train.sync_every_step must be 'auto', 'always' or 'never', got "
                          f"{setting!r}")


def _format(metrics: dict[str, float]) -> str:
  keys = ("loss", "text_loss", "image_loss", "finding_loss", "text_accuracy", "image_accuracy",
          "learning_rate", "steps_per_s", "tokens_per_s")
  return " ".join(f"{k}={metrics[k]:.4g}" for k in keys if k in metrics)


def finding_labels_for(config, dataset):
  """The data's finding labels (data/finding_labels.py) when the model has a finding head
  (config.model.finding_names), else None."""
  names = transformer.finding_names(config.model)
  if not names:
    return None
  if not hasattr(dataset, "finding_labels"):
    raise errors.InputError(f"config.model.finding_names ({', '.join(names)}) needs labelled "
                            f"shards (data.name medim_demo or folders with labels.jsonl); "
                            f"data.name={config.data.name!r} has none")
  return dataset.finding_labels(names)


def train_and_evaluate(config, workdir: str, dataset: data_base.PairedDataset | None = None,
                       progress: bool = True) -> TrainState:
  """Train (resuming from the latest checkpoint in workdir) up to config.train.num_steps.

  On SIGTERM/SIGINT the current step finishes, a checkpoint is saved and ``errors.Preempted`` is
  raised; a non-finite step is handled as config.train.on_nonfinite says (see loss_watch).
  """
  dataset = dataset or data_build.build_dataset(config, workdir)
  train_cfg = config.train
  finding_labels = finding_labels_for(config, dataset)
  with_labels = (lambda batch: batch) if finding_labels is None else finding_labels
  trainer = Trainer(config, dataset.layout, finding_positive_weight=(
      None if finding_labels is None else finding_labels.positive_weight))
  watch = loss_watch.LossWatch.from_config(train_cfg)
  data_iter = dataset.train_iterator(train_cfg.batch_size, config.seed)
  eval_batches = [with_labels(b) for b in dataset.eval_batches(train_cfg.batch_size,
                                                               train_cfg.num_eval_batches)]
  checkpointer = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"),
                                            train_cfg.max_checkpoints_to_keep,
                                            train_cfg.keep_checkpoint_period,
                                            remove_half_written=True,
                                            on_corrupt=train_cfg.on_corrupt_checkpoint)
  sync = _should_sync_every_step(train_cfg.sync_every_step)

  if checkpointer.latest_step() is not None:
    state = checkpointer.restore(trainer.abstract_state(), data_iter)
    print(f"Resumed from {checkpointer.directory}/{int(state.step)}")
  else:
    state = trainer.init_state(config.seed, dataset.image_tokenizer)
    num_params = transformer.count_params(state.params)
    print(f"New run: {num_params:,} parameters, sequence length {dataset.layout.seq_length}, "
          f"vocabulary {dataset.layout.vocab_size}")
  first_step = int(state.step)
  writer = MetricWriter(workdir, resume_step=first_step)
  tokens_per_batch = train_cfg.batch_size * dataset.layout.seq_length

  is_main = jax.process_index() == 0
  bar = progress_bars.bar(train_cfg.num_steps, "train", "step", progress and is_main,
                          initial=first_step)
  log = bar.write if is_main else lambda line: None

  def log_loss_event(step, note, metrics) -> None:
    log(note)
    writer.write(step, "loss_event", {"loss": float(metrics["loss"]),
                                      "nonfinite": float(metrics["nonfinite"])})
  window_start, window_steps, window_metrics = time.perf_counter(), 0, []
  unread = []  # (step, device metrics) not yet looked at on the host: reading them waits for the step
  try:
    with preemption.StopRequests() as stop_requests:
      for step in range(first_step + 1, train_cfg.num_steps + 1):
        state, metrics = trainer.train_step(state, with_labels(next(data_iter)))
        unread.append((step, metrics))
        window_steps += 1
        if sync:
          jax.block_until_ready(state)
        bar.update(1)
        stopping = stop_requests.requested or checkpointer.reached_preemption(step)
        last = step == train_cfg.num_steps
        is_log, is_eval, is_save = (step % every == 0 or last for every in (
            train_cfg.log_every, train_cfg.eval_every, train_cfg.checkpoint_every))
        if not (is_log or is_eval or is_save or stopping):
          continue
        window_metrics += loss_watch.read_and_watch(watch, unread, checkpointer, log_loss_event)
        unread = []
        if is_log:
          summary = {k: float(np.mean([m[k] for m in window_metrics])) for k in window_metrics[0]}
          summary["nonfinite"] = float(np.sum([m["nonfinite"] for m in window_metrics]))
          elapsed = time.perf_counter() - window_start
          summary["steps_per_s"] = window_steps / elapsed
          summary["tokens_per_s"] = window_steps * tokens_per_batch / elapsed
          writer.write(step, "train", summary)
          bar.set_postfix(loss=f"{summary['loss']:.3f}")
          log(f"step {step}: {_format(summary)}")
          window_start, window_steps, window_metrics = time.perf_counter(), 0, []
        if is_eval:
          eval_metrics = trainer.evaluate(state.params, eval_batches)
          writer.write(step, "eval", eval_metrics)
          log(f"step {step} validation: {_format(eval_metrics)}")
        if is_save or (stopping and checkpointer.latest_step() != step):
          checkpointer.save(step, state, data_iter)
        if stopping and not last:
          raise stop_requests.preempted(step, checkpointer)
  finally:
    bar.close()
    checkpointer.close()
    writer.close()
  return state
