"""The optimizer of a run: warmup + cosine learning rate, global-norm clipping, AdamW (or a
factored second moment), all from config.train."""

from __future__ import annotations

import jax.numpy as jnp
import optax

from medim_jax import errors


# Adam's first moment in bfloat16 halves its memory (2 bytes per parameter saved: 8.3 GB for the
# paper model); the second moment and the params stay float32.
MU_DTYPES = {"float32": None, "bfloat16": jnp.bfloat16}
# "full": Adam's per-parameter second moment. "factored": Adafactor's (Shazeer & Stern, 2018): a
# matrix keeps only its row and column means of g^2, so the second moment of the paper model
# shrinks from 16.6 GB to a few MB; vectors and small matrices keep the full one.
SECOND_MOMENTS = ("full", "factored")


def make_optimizer(train_config):
  learning_rate = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=train_config.learning_rate,
      warmup_steps=train_config.warmup_steps,
      decay_steps=max(train_config.num_steps, train_config.warmup_steps + 1),
      end_value=train_config.learning_rate * train_config.end_learning_rate_fraction)
  mu_dtype = train_config.get("mu_dtype", "float32")
  if mu_dtype not in MU_DTYPES:
    raise errors.InputError(f"config.train.mu_dtype must be one of {sorted(MU_DTYPES)}, got "
                            f"{mu_dtype!r}")
  second_moment = train_config.get("second_moment", "full")
  if second_moment not in SECOND_MOMENTS:
    raise errors.InputError(f"config.train.second_moment must be one of {SECOND_MOMENTS}, got "
                            f"{second_moment!r}")
  clip = optax.clip_by_global_norm(train_config.grad_clip_norm)
  if second_moment == "full":
    tx = optax.chain(clip, optax.adamw(
        learning_rate, b1=train_config.b1, b2=train_config.b2, eps=train_config.adam_eps,
        weight_decay=train_config.weight_decay, mu_dtype=MU_DTYPES[mu_dtype]))
  else:
    # Adafactor's normalisation, then Adam's debiased momentum (b1) of the normalised update, then
    # AdamW's decoupled weight decay; b2 and adam_eps are Adam's and do not apply.
    tx = optax.chain(clip, optax.scale_by_factored_rms(),
                     optax.ema(train_config.b1, debias=True, accumulator_dtype=MU_DTYPES[mu_dtype]),
                     optax.add_decayed_weights(train_config.weight_decay),
                     optax.scale_by_learning_rate(learning_rate))
  return tx, learning_rate
