"""Small shared builders for the tests."""

import types

import jax.numpy as jnp
import numpy as np
from flax import nnx

from medim_jax.models import transformer
from medim_jax.tokenizers.vocab import TokenLayout

LAYOUT = TokenLayout(text_vocab_size=12, image_vocab_size=7, text_length=5, image_length=9)


def tiny_config(**overrides) -> transformer.TransformerConfig:
  kwargs = dict(vocab_size=LAYOUT.vocab_size, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                head_dim=8, mlp_dim=48, time_frequency_dim=16, adaln_gate_init="open",
                segment_lengths=(LAYOUT.text_length, LAYOUT.image_length))
  kwargs.update(overrides)
  return transformer.TransformerConfig(**kwargs)


def tiny_model(seed=0, **overrides):
  """A random tiny model with non-zero AdaLN weights (so conditioning matters) as (apply, params)."""
  functions = tiny_model_functions(seed, **overrides)
  return functions.apply, functions.params


def tiny_model_functions(seed=0, **overrides):
  """``tiny_model`` as a namespace: params, apply, and the condition cache's apply_and_context and
  apply_query (the methods of training.train.Model the sampler calls)."""
  model = transformer.MeDiMTransformer(tiny_config(**overrides), rngs=nnx.Rngs(seed))
  rng = np.random.default_rng(seed)
  for block in model.blocks:
    shape = block.adaln.kernel.get_value().shape
    block.adaln.kernel.set_value(jnp.asarray(0.05 * rng.standard_normal(shape), jnp.float32))
  graphdef, state = nnx.split(model)

  def apply(params, tokens, sigma, key_mask=None):
    return nnx.merge(graphdef, params)(tokens, sigma, key_mask)

  def apply_and_context(params, tokens, sigma, query):
    module = nnx.merge(graphdef, params)
    hidden, context = module.hidden_and_context(tokens, sigma, query)
    return module.logits(hidden), context

  def apply_query(params, tokens, sigma, query, context, ids=None):
    module = nnx.merge(graphdef, params)
    return module.logits(module.query_hidden(tokens, sigma, query, context), ids)

  return types.SimpleNamespace(params=nnx.to_pure_dict(state), apply=apply,
                               apply_and_context=apply_and_context, apply_query=apply_query)


def random_tokens(rng, batch, layout=LAYOUT):
  return layout.join(rng.integers(0, layout.text_vocab_size, (batch, layout.text_length)),
                     rng.integers(0, layout.image_vocab_size, (batch, layout.image_length)))
