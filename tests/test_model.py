"""The backbone: shapes, AdaLN-zero identity, exact Gemma block math, full attention, sizes."""

import importlib
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import helpers
from medim_jax.bench import shapes
from medim_jax.models import conditioning, layers, transformer
from medim_jax.training.train import Model


def numpy_reference(params, cfg, tokens, sigma):
  """A from-scratch numpy forward of a Gemma block stack without causal mask and without markers."""
  p = jax.tree.map(np.asarray, params)
  d = cfg.d_model

  def rms(x, w):
    return x / np.sqrt(np.mean(x ** 2, -1, keepdims=True) + cfg.norm_eps) * (1 + w)

  def rope(x):  # (B, L, H, D)
    half = x.shape[-1] // 2
    inv = 1.0 / cfg.rope_base ** (np.arange(half) * 2 / x.shape[-1])
    ang = np.arange(x.shape[1])[:, None] * inv[None]
    cos, sin = np.cos(ang)[None, :, None], np.sin(ang)[None, :, None]
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)

  def gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))

  half = cfg.time_frequency_dim // 2
  freqs = np.exp(-math.log(cfg.time_max_period) * np.arange(half) / half)
  args = (sigma * cfg.time_scale)[:, None] * freqs[None]
  emb = np.concatenate([np.cos(args), np.sin(args)], -1)
  te = p["time_embedder"]
  h = emb @ te["fc1"]["kernel"] + te["fc1"]["bias"]
  cond = (h / (1 + np.exp(-h))) @ te["fc2"]["kernel"] + te["fc2"]["bias"]

  x = p["embedding"][tokens] * math.sqrt(d)
  groups = cfg.num_heads // cfg.num_kv_heads
  for i in range(cfg.num_layers):
    b = p["blocks"][i]
    mod = np.einsum("bd,dce->bce", cond, b["adaln"]["kernel"]) + b["adaln"]["bias"]
    sa, ca, ga, sm, cm, gm = [mod[:, None, j] for j in range(6)]
    y = rms(x, b["attn_norm"]["scale"]) * (1 + ca) + sa
    q = rope(np.einsum("bld,dhk->blhk", y, b["attn"]["q"]))
    k = np.repeat(rope(np.einsum("bld,dhk->blhk", y, b["attn"]["k"])), groups, axis=2)
    v = np.repeat(np.einsum("bld,dhk->blhk", y, b["attn"]["v"]), groups, axis=2)
    s = np.einsum("bqhk,bshk->bhqs", q, k) / math.sqrt(cfg.head_dim)
    s = np.exp(s - s.max(-1, keepdims=True))
    a = np.einsum("bhqs,bshk->bqhk", s / s.sum(-1, keepdims=True), v)
    x = x + ga * np.einsum("blhk,hkd->bld", a, b["attn"]["o"])
    y = rms(x, b["mlp_norm"]["scale"]) * (1 + cm) + sm
    m = b["mlp"]
    x = x + gm * ((gelu_tanh(y @ m["gate"]["kernel"]) * (y @ m["up"]["kernel"])) @ m["down"]["kernel"])
  x = rms(x, p["final_norm"]["scale"])
  return x @ p["embedding"].T


def test_forward_matches_numpy_reference_of_gemma_blocks():
  cfg = helpers.tiny_config(segment_lengths=(), num_kv_heads=2)
  apply, params = helpers.tiny_model(seed=1, segment_lengths=(), num_kv_heads=2)
  rng = np.random.default_rng(0)
  tokens = helpers.random_tokens(rng, 3)
  sigma = np.array([0.01, 1.0, 5.0], np.float32)
  params = jax.tree.map(lambda x: x + 0.1 * rng.standard_normal(x.shape).astype(np.float32), params)
  got = np.asarray(apply(params, jnp.asarray(tokens), jnp.asarray(sigma)))
  want = numpy_reference(params, cfg, tokens, sigma)
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("markers,positions", [(True, True), (False, False)])
def test_shapes_and_dtypes(dtype, markers, positions):
  layout = helpers.LAYOUT
  seg = (layout.text_length, layout.image_length) if markers else ()
  num_positions = (layout.seq_length + len(seg)) if positions else 0
  apply, params = helpers.tiny_model(dtype=dtype, segment_lengths=seg, learned_positions=num_positions)
  tokens = jnp.asarray(helpers.random_tokens(np.random.default_rng(0), 2))
  logits = apply(params, tokens, jnp.ones((2,)))
  assert logits.shape == (2, layout.seq_length, layout.vocab_size)
  assert logits.dtype == jnp.float32
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  assert np.isfinite(np.asarray(logits)).all()


def test_adaln_zero_makes_every_block_the_identity_at_init():
  cfg = helpers.tiny_config(adaln_gate_init="zero")
  model = transformer.MeDiMTransformer(cfg, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 14, cfg.d_model))
  cond = model.time_embedder(jnp.array([0.3, 4.0]), jnp.float32)
  for block in model.blocks:
    np.testing.assert_array_equal(np.asarray(block(x, cond, jnp.arange(14), None)), np.asarray(x))


def test_open_gates_make_the_block_an_unmodulated_gemma_block():
  cfg = helpers.tiny_config(adaln_gate_init="open")
  model = transformer.MeDiMTransformer(cfg, rngs=nnx.Rngs(0))
  block = model.blocks[0]
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 14, cfg.d_model))
  cond = model.time_embedder(jnp.array([0.3, 4.0]), jnp.float32)
  pos = jnp.arange(14)
  h = x + block.attn(block.attn_norm(x), pos, None)
  want = h + block.mlp(block.mlp_norm(h), jnp.float32)
  np.testing.assert_allclose(np.asarray(block(x, cond, pos, None)), np.asarray(want), rtol=1e-6, atol=1e-6)


def test_attention_is_bidirectional_and_respects_the_key_mask():
  apply, params = helpers.tiny_model()
  rng = np.random.default_rng(0)
  tokens = helpers.random_tokens(rng, 1)
  changed = tokens.copy()
  changed[0, -1] = (changed[0, -1] + 1 - helpers.LAYOUT.image_offset) % 7 + helpers.LAYOUT.image_offset
  sigma = jnp.ones((1,))
  a, b = apply(params, jnp.asarray(tokens), sigma), apply(params, jnp.asarray(changed), sigma)
  assert not np.allclose(a[0, 0], b[0, 0]), "the first position must see the last one (no causal mask)"
  key_mask = jnp.ones(tokens.shape, bool).at[0, -1].set(False)
  a, b = apply(params, jnp.asarray(tokens), sigma, key_mask), apply(params, jnp.asarray(changed), sigma, key_mask)
  np.testing.assert_allclose(a[0, :-1], b[0, :-1], rtol=1e-6, atol=1e-6)


def test_time_conditioning_changes_the_output():
  apply, params = helpers.tiny_model()
  tokens = jnp.asarray(helpers.random_tokens(np.random.default_rng(0), 1))
  a, b = apply(params, tokens, jnp.array([0.1])), apply(params, tokens, jnp.array([3.0]))
  assert not np.allclose(a, b)


def test_sinusoidal_embedding_is_cos_first():
  emb = conditioning.sinusoidal_embedding(jnp.array([2.0]), 8, max_period=10_000.0)
  freqs = np.exp(-math.log(10_000.0) * np.arange(4) / 4)
  np.testing.assert_allclose(emb[0], np.concatenate([np.cos(2 * freqs), np.sin(2 * freqs)]), rtol=1e-6)


def test_tied_and_untied_heads():
  tied = nnx.state(transformer.MeDiMTransformer(helpers.tiny_config(), rngs=nnx.Rngs(0)))
  untied = nnx.state(transformer.MeDiMTransformer(helpers.tiny_config(tie_embeddings=False),
                                                  rngs=nnx.Rngs(0)))
  assert "lm_head" not in nnx.to_pure_dict(tied)
  assert nnx.to_pure_dict(untied)["lm_head"].shape == (32, helpers.LAYOUT.vocab_size)


def test_every_parameter_names_its_logical_axes():
  model = transformer.MeDiMTransformer(helpers.tiny_config(), rngs=nnx.Rngs(0))
  for path, var in nnx.to_flat_state(nnx.state(model)):
    axes = var.get_metadata().get("logical_axes")
    assert axes is not None and len(axes) == var.get_value().ndim, path


def test_bad_head_configuration_is_a_clear_error():
  with pytest.raises(ValueError, match="multiple of num_kv_heads"):
    helpers.tiny_config(num_heads=4, num_kv_heads=3)


CONFIGS = sorted(p.stem for p in pathlib.Path(__file__).parent.parent.glob("configs/*.py")
                 if p.stem not in ("__init__",))


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_builds_a_model_of_the_right_shape(name):
  config = importlib.import_module(f"configs.{name}").get_config()
  layout = helpers.LAYOUT if name != "medim_liquid7b" else type(helpers.LAYOUT)(32003, 8192, 256, 1024)
  model = Model(config, layout)
  shapes = jax.eval_shape(lambda params: model.apply(
      params, jnp.zeros((2, layout.seq_length), jnp.int32), jnp.ones((2,))), model.abstract_params)
  assert shapes.shape == (2, layout.seq_length, layout.vocab_size)
  assert shapes.dtype == jnp.float32


def test_paper_config_has_the_original_parameter_count():
  config = importlib.import_module("configs.medim_liquid7b").get_config()
  layout = type(helpers.LAYOUT)(32003, 8192, 256, 1024)  # Llama-2 + 3 specials | MASK | 8192 codes
  assert layout.vocab_size == 40196 and layout.mask_id == 32003 and layout.image_offset == 32004
  count = transformer.count_params(Model(config, layout).abstract_params)
  # 10 Gemma-7B layers with AdaLN (3.335B) + 40,196 x 3,072 tied embedding + time MLP, plus 2 markers.
  assert count == 3_468_432_384 + 2 * 3072


@pytest.mark.parametrize("policy", ["dots"])
def test_remat_recomputes_without_changing_the_gradients(policy):
  apply, params = helpers.tiny_model()
  remat_apply, _ = helpers.tiny_model(remat_policy=policy)
  rng = np.random.default_rng(0)
  tokens, sigma = helpers.random_tokens(rng, 2), jnp.asarray([0.5, 2.0])

  def loss(apply_fn):
    return jax.grad(lambda p: jnp.mean(apply_fn(p, tokens, sigma) ** 2))(params)

  for want, got in zip(jax.tree.leaves(loss(apply)), jax.tree.leaves(loss(remat_apply))):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-7)
  jaxpr = str(jax.make_jaxpr(lambda p: jax.grad(lambda q: jnp.sum(remat_apply(q, tokens, sigma)))(p))(
      params))
  assert "remat" in jaxpr or "checkpoint" in jaxpr


def test_scan_over_layers_computes_what_the_layer_loop_does():
  looped, params = helpers.tiny_model()
  cfg = helpers.tiny_config(scan_layers=True, remat_policy="full")
  scanned_model = nnx.eval_shape(lambda: transformer.MeDiMTransformer(cfg, rngs=nnx.Rngs(0)))
  graphdef, abstract = nnx.split(scanned_model)
  blocks = [params["blocks"][i] for i in range(cfg.num_layers)]
  stacked = dict(params, blocks=jax.tree.map(lambda *layers: jnp.stack(layers), *blocks))
  assert jax.tree.map(jnp.shape, stacked) == jax.tree.map(jnp.shape, nnx.to_pure_dict(abstract))
  rng = np.random.default_rng(1)
  tokens, sigma = helpers.random_tokens(rng, 2), jnp.asarray([0.3, 4.0])
  want = looped(params, tokens, sigma)
  got = nnx.merge(graphdef, stacked)(tokens, sigma)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)



def _stem_model(num_layers):
  cfg = helpers.tiny_config(image_conv_layers=num_layers,
                            image_segment=(helpers.LAYOUT.text_length, helpers.LAYOUT.image_length))
  return transformer.MeDiMTransformer(cfg, rngs=nnx.Rngs(0))


def test_image_stem_mixes_each_image_position_with_its_grid_neighbours_only():
  model, text_length = _stem_model(1), helpers.LAYOUT.text_length
  tokens = helpers.random_tokens(np.random.default_rng(0), 1)
  changed = np.array(tokens)
  changed[0, text_length] = (changed[0, text_length] + 1) % helpers.LAYOUT.vocab_size
  moved = np.abs(np.asarray(model._embed_tokens(changed) - model._embed_tokens(tokens))).max(-1)[0]
  assert not moved[:text_length].any()               # the report is not touched
  grid = moved[text_length:].reshape(3, 3)           # image code (0, 0) of the 3 x 3 grid changed
  assert grid[:2, :2].all() and not grid[2].any() and not grid[:, 2].any()
  deeper = _stem_model(2)
  two_layers = np.abs(np.asarray(deeper._embed_tokens(changed) - deeper._embed_tokens(tokens))).max(-1)[0]
  assert two_layers[text_length:].all()              # two 3x3 layers reach across the 3 x 3 grid


def test_image_stem_keeps_the_condition_cache_exact_and_refuses_a_cut_image():
  model = _stem_model(2)
  tokens, sigma = helpers.random_tokens(np.random.default_rng(1), 2), jnp.asarray([0.4, 3.0])
  for query in ((0, helpers.LAYOUT.text_length), (helpers.LAYOUT.text_length, helpers.LAYOUT.seq_length)):
    hidden, context = model.hidden_and_context(tokens, sigma, query)
    np.testing.assert_allclose(np.asarray(model.query_hidden(tokens, sigma, query, context)),
                               np.asarray(hidden[:, query[0]:query[1]]), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="cut the image segment"):
    model._embed_tokens(tokens[:, 6:], 6)
  with pytest.raises(ValueError, match="square token grid"):
    transformer.MeDiMTransformer(helpers.tiny_config(image_conv_layers=1, image_segment=(5, 8)),
                                 rngs=nnx.Rngs(0))


@pytest.mark.parametrize("transpose_b", [False, True])
def test_low_precision_matmul_accumulates_in_float32_both_ways(transpose_b):
  rng = np.random.default_rng(0)
  a = jnp.asarray(rng.standard_normal((6, 40)), jnp.bfloat16)
  b = jnp.asarray(rng.standard_normal((5, 40) if transpose_b else (40, 5)), jnp.bfloat16)
  weights = jnp.asarray(rng.standard_normal((6, 5)), jnp.float32)

  def exact(a, b):  # the same products in float32 throughout
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return a @ (b.T if transpose_b else b)

  def loss(matmul):
    return lambda a, b: jnp.sum(matmul(a, b).astype(jnp.float32) * weights)

  out = layers.matmul_f32_accumulate(a, b, transpose_b, jnp.float32)
  np.testing.assert_allclose(np.asarray(out), np.asarray(exact(a, b)), rtol=1e-6, atol=1e-5)
  got = jax.grad(loss(lambda a, b: layers.matmul_f32_accumulate(a, b, transpose_b, jnp.float32)),
                 argnums=(0, 1))(a, b)
  want = jax.grad(loss(exact), argnums=(0, 1))(a, b)
  for g, w, primal in zip(got, want, (a, b)):
    assert g.dtype == primal.dtype and g.shape == primal.shape
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w), rtol=1e-2, atol=1e-2)
  # Every matmul of the pass and its gradient multiplies bfloat16 by bfloat16 into float32 (the
  # form that runs on a CPU's bf16 units); autodiff alone would give float32 x bfloat16.
  jaxpr = jax.make_jaxpr(jax.grad(loss(lambda a, b: layers.matmul_f32_accumulate(
      a, b, transpose_b, jnp.bfloat16)), argnums=(0, 1)))(a, b)
  dots = [e for e, _ in shapes.dot_equations(jaxpr.jaxpr)]
  assert len(dots) == 3
  for eqn in dots:
    assert [v.aval.dtype for v in eqn.invars] == [jnp.bfloat16] * 2
    assert eqn.params["preferred_element_type"] == jnp.float32


def test_float32_activations_keep_the_residual_stream_float32_and_only_matmuls_bfloat16():
  rng = np.random.default_rng(2)
  tokens, sigma = jnp.asarray(helpers.random_tokens(rng, 2)), jnp.asarray([0.5, 2.0])
  models = {name: transformer.MeDiMTransformer(helpers.tiny_config(**kw), rngs=nnx.Rngs(0))
            for name, kw in (("float32", {}), ("bfloat16", dict(dtype="bfloat16")),
                             ("mixed", dict(dtype="bfloat16", activation_dtype="float32")))}
  hidden = {name: model.hidden(tokens, sigma) for name, model in models.items()}
  assert hidden["mixed"].dtype == jnp.float32 and hidden["bfloat16"].dtype == jnp.bfloat16
  exact = np.asarray(hidden["float32"])
  mixed_error = np.abs(np.asarray(hidden["mixed"]) - exact).max()
  bf16_error = np.abs(np.asarray(hidden["bfloat16"], np.float32) - exact).max()
  assert 0 < mixed_error < bf16_error  # rounded at the matmuls only, so closer to float32
  graphdef, state = nnx.split(models["mixed"])
  params = nnx.to_pure_dict(state)
  loss = lambda p: jnp.sum(nnx.merge(graphdef, p)(tokens, sigma) ** 2)
  # Every token-level matmul (2-D: projections, MLP, head; forward and backward) in bfloat16; the
  # per-example AdaLN projection (a 3-D kernel) stays in the activations' dtype.
  dots = [e for e, _ in shapes.dot_equations(jax.make_jaxpr(jax.grad(loss))(params).jaxpr)
          if all(v.aval.ndim == 2 for v in e.invars)]
  assert len(dots) > 20 and all([v.aval.dtype for v in e.invars] == [jnp.bfloat16] * 2 for e in dots)
  with pytest.raises(ValueError, match="activation_dtype"):
    helpers.tiny_config(activation_dtype="float64")


def test_dropout_zeroes_elements_at_its_rate_and_keeps_the_mean():
  x = jnp.ones((200, 500), jnp.float32)
  dropped = np.asarray(transformer._dropout(x, 0.25, jax.random.PRNGKey(0)))
  assert abs(np.mean(dropped == 0) - 0.25) < 0.01
  np.testing.assert_allclose(dropped[dropped != 0], 1 / 0.75, rtol=1e-6)
  assert abs(dropped.mean() - 1.0) < 0.02


def test_dropout_acts_only_with_a_key_and_splits_it_the_same_way_under_scan():
  params = helpers.tiny_model_functions().params

  def bound(**overrides):  # the same weights in a model built with these settings
    model = nnx.eval_shape(lambda: transformer.MeDiMTransformer(helpers.tiny_config(**overrides),
                                                                rngs=nnx.Rngs(0)))
    return nnx.merge(nnx.split(model)[0], params)

  rng = np.random.default_rng(2)
  tokens, sigma = helpers.random_tokens(rng, 2), jnp.asarray([0.3, 4.0])
  key, other_key = jax.random.PRNGKey(7), jax.random.PRNGKey(8)
  plain, dropping = bound(), bound(dropout_rate=0.3)
  without = np.asarray(plain.hidden(tokens, sigma))
  # Without a key (evaluation, sampling) the model is the one without dropout; a rate of 0
  # ignores the key.
  np.testing.assert_array_equal(np.asarray(dropping.hidden(tokens, sigma)), without)
  np.testing.assert_array_equal(np.asarray(plain.hidden(tokens, sigma, None, key)), without)
  dropped = np.asarray(dropping.hidden(tokens, sigma, None, key))
  assert not np.allclose(dropped, without, atol=1e-3)
  np.testing.assert_array_equal(np.asarray(dropping.hidden(tokens, sigma, None, key)), dropped)
  assert not np.allclose(np.asarray(dropping.hidden(tokens, sigma, None, other_key)), dropped,
                         atol=1e-3)
  # Scanned layers draw each layer's mask from the same per-layer key as the loop.
  num_layers = helpers.tiny_config().num_layers
  stacked = dict(params, blocks=jax.tree.map(lambda *layers: jnp.stack(layers),
                                             *[params["blocks"][i] for i in range(num_layers)]))
  scan_model = nnx.eval_shape(lambda: transformer.MeDiMTransformer(
      helpers.tiny_config(dropout_rate=0.3, scan_layers=True), rngs=nnx.Rngs(0)))
  scanned = nnx.merge(nnx.split(scan_model)[0], stacked).hidden(tokens, sigma, None, key)
  np.testing.assert_allclose(np.asarray(scanned), dropped, rtol=1e-5, atol=1e-5)


def test_dropout_rate_outside_zero_to_one_is_a_clear_error():
  with pytest.raises(ValueError, match="dropout_rate"):
    helpers.tiny_config(dropout_rate=1.0)
