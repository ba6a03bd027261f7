"""The HF Gemma converter on a tiny random checkpoint the test writes (bf16, two shards + index).

Our forward pass with the converted weights (AdaLN set to shift = scale = 0, gate = 1) must match a
bidirectional Gemma forward computed here in numpy from the same tensors, and, where torch is
installed, transformers' own GemmaForCausalLM with the causal mask removed.
"""

import functools
import json
import math
import os

import jax
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from safetensors.numpy import load_file, save_file

from medim_jax.convert import hf_gemma, safetensors_files
from medim_jax.errors import InputError
from medim_jax.models import transformer
from medim_jax.tokenizers.vocab import TokenLayout

HIDDEN, HF_LAYERS, HEADS, KV_HEADS, HEAD_DIM, MLP, HF_VOCAB = 32, 3, 4, 2, 8, 64, 40
LAYERS = 2                  # we take the first 2 of the checkpoint's 3 layers
IMAGE_ROWS = 28             # checkpoint rows 28..39 hold "image codes", as Liquid's 256000.. do
LAYOUT = TokenLayout(text_vocab_size=19, image_vocab_size=12, text_length=5, image_length=4)
TEXT_COLUMNS = np.arange(LAYOUT.text_vocab_size)
IMAGE_COLUMNS = np.arange(LAYOUT.image_offset, LAYOUT.vocab_size)


def hf_config(**overrides):
  config = {  # the shape of Liquid_V1_7B's config.json, tiny
      "architectures": ["GemmaForCausalLM"], "model_type": "gemma", "hidden_size": HIDDEN,
      "intermediate_size": MLP, "num_hidden_layers": HF_LAYERS, "num_attention_heads": HEADS,
      "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM, "vocab_size": HF_VOCAB,
      "hidden_act": "gelu", "hidden_activation": None, "rope_theta": 10000.0,
      "rms_norm_eps": 1e-6, "max_position_embeddings": 64, "torch_dtype": "bfloat16",
      "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 1}
  config.update(overrides)
  return config


def random_tensors(seed=0) -> dict:
  rng = np.random.default_rng(seed)
  normal = lambda shape, std: (std * rng.standard_normal(shape)).astype(ml_dtypes.bfloat16)
  tensors = {"model.embed_tokens.weight": normal((HF_VOCAB, HIDDEN), 0.5),
             "model.norm.weight": normal((HIDDEN,), 0.2)}
  for i in range(HF_LAYERS):
    p = f"model.layers.{i}."
    tensors.update({
        p + "self_attn.q_proj.weight": normal((HEADS * HEAD_DIM, HIDDEN), 0.3),
        p + "self_attn.k_proj.weight": normal((KV_HEADS * HEAD_DIM, HIDDEN), 0.3),
        p + "self_attn.v_proj.weight": normal((KV_HEADS * HEAD_DIM, HIDDEN), 0.3),
        p + "self_attn.o_proj.weight": normal((HIDDEN, HEADS * HEAD_DIM), 0.3),
        p + "mlp.gate_proj.weight": normal((MLP, HIDDEN), 0.3),
        p + "mlp.up_proj.weight": normal((MLP, HIDDEN), 0.3),
        p + "mlp.down_proj.weight": normal((HIDDEN, MLP), 0.2),
        p + "input_layernorm.weight": normal((HIDDEN,), 0.2),
        p + "post_attention_layernorm.weight": normal((HIDDEN,), 0.2)})
  return tensors


def write_checkpoint(directory, tensors, config=None):
  """Two safetensors shards and their index, as save_pretrained writes a sharded checkpoint."""
  os.makedirs(directory, exist_ok=True)
  names = sorted(tensors)
  halves = {"model-00001-of-00002.safetensors": names[:len(names) // 2],
            "model-00002-of-00002.safetensors": names[len(names) // 2:]}
  weight_map = {}
  for file, part in halves.items():
    save_file({n: tensors[n] for n in part}, os.path.join(directory, file),
              metadata={"format": "pt"})
    weight_map.update({n: file for n in part})
  with open(os.path.join(directory, safetensors_files.INDEX_FILE), "w") as f:
    json.dump({"metadata": {}, "weight_map": weight_map}, f)
  with open(os.path.join(directory, hf_gemma.CONFIG_FILE), "w") as f:
    json.dump(config or hf_config(), f)
  return str(directory)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  return write_checkpoint(tmp_path_factory.mktemp("gemma"), random_tensors())


def our_config(**overrides):
  fields = dict(vocab_size=LAYOUT.vocab_size, d_model=HIDDEN, num_layers=LAYERS, num_heads=HEADS,
                num_kv_heads=KV_HEADS, head_dim=HEAD_DIM, mlp_dim=MLP, adaln_gate_init="zero")
  fields.update(overrides)
  return transformer.TransformerConfig(**fields)


def open_adaln(params):
  """shift = scale = 0, gate = 1 in every block (chunks: shift_a, scale_a, gate_a, shift_m, ...):
  each block is then exactly a non-causal Gemma block."""
  for block in params["blocks"].values():
    block["adaln"]["kernel"] = np.zeros_like(block["adaln"]["kernel"])
    block["adaln"]["bias"] = np.zeros_like(block["adaln"]["bias"]).copy()
    block["adaln"]["bias"][[2, 5]] = 1.0
  return params


@functools.cache
def jitted_forward(cfg):
  abstract = nnx.eval_shape(lambda: transformer.MeDiMTransformer(cfg, rngs=nnx.Rngs(0)))
  graphdef = nnx.graphdef(abstract)
  return jax.jit(lambda params, tokens, sigma: nnx.merge(graphdef, params)(tokens, sigma))


def our_logits(cfg, params, tokens):
  sigma = np.full((tokens.shape[0],), 0.7, np.float32)
  return np.asarray(jitted_forward(cfg)(params, tokens, sigma), np.float64)


def to_hf_ids(tokens):
  """Our joint ids (text | MASK | image) -> checkpoint ids (text, then image rows at IMAGE_ROWS)."""
  return np.where(tokens >= LAYOUT.image_offset, tokens - LAYOUT.image_offset + IMAGE_ROWS, tokens)


def reference_logits(tensors, hf_ids, num_layers, eps=1e-6, theta=10000.0):
  """Gemma written out in float64 from the HF tensors ((out, in) weights), no causal mask."""
  t = {k: np.asarray(v, np.float64) for k, v in tensors.items()}
  batch, length = hf_ids.shape

  def norm(x, w):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * (1 + w)

  inv_freq = 1.0 / theta ** (np.arange(0, HEAD_DIM, 2) / HEAD_DIM)
  angles = np.arange(length)[:, None] * inv_freq[None]
  cos, sin = np.cos(np.concatenate([angles] * 2, -1)), np.sin(np.concatenate([angles] * 2, -1))

  def rope(x):  # (B, H, L, D), rotate_half as HF
    half = HEAD_DIM // 2
    return x * cos + np.concatenate([-x[..., half:], x[..., :half]], -1) * sin

  def heads(y, n):
    return y.reshape(batch, length, n, HEAD_DIM).transpose(0, 2, 1, 3)

  x = t["model.embed_tokens.weight"][hf_ids] * math.sqrt(HIDDEN)
  for i in range(num_layers):
    prefix = f"model.layers.{i}."
    w = {k[len(prefix):]: v for k, v in t.items() if k.startswith(prefix)}
    h = norm(x, w["input_layernorm.weight"])
    q = rope(heads(h @ w["self_attn.q_proj.weight"].T, HEADS))
    k = np.repeat(rope(heads(h @ w["self_attn.k_proj.weight"].T, KV_HEADS)), HEADS // KV_HEADS, 1)
    v = np.repeat(heads(h @ w["self_attn.v_proj.weight"].T, KV_HEADS), HEADS // KV_HEADS, 1)
    scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(HEAD_DIM)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    attn = (probs @ v).transpose(0, 2, 1, 3).reshape(batch, length, HEADS * HEAD_DIM)
    x = x + attn @ w["self_attn.o_proj.weight"].T
    h = norm(x, w["post_attention_layernorm.weight"])
    gate = h @ w["mlp.gate_proj.weight"].T
    gelu = 0.5 * gate * (1 + np.tanh(math.sqrt(2 / math.pi) * (gate + 0.044715 * gate ** 3)))
    x = x + (gelu * (h @ w["mlp.up_proj.weight"].T)) @ w["mlp.down_proj.weight"].T
  return norm(x, t["model.norm.weight"]) @ t["model.embed_tokens.weight"].T


def sample_tokens(seed=1):
  rng = np.random.default_rng(seed)
  text = rng.integers(0, LAYOUT.text_vocab_size, (2, LAYOUT.text_length))
  image = rng.integers(0, LAYOUT.image_vocab_size, (2, LAYOUT.image_length))
  return LAYOUT.join(text, image)


def assert_logits_close(ours, reference):
  """Our (B, L, joint vocab) logits against the checkpoint's (B, L, HF vocab), on rows both have."""
  np.testing.assert_allclose(ours[..., TEXT_COLUMNS], reference[..., TEXT_COLUMNS], rtol=1e-4,
                             atol=1e-4)
  np.testing.assert_allclose(ours[..., IMAGE_COLUMNS],
                             reference[..., IMAGE_ROWS:IMAGE_ROWS + LAYOUT.image_vocab_size],
                             rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def loaded(checkpoint):
  cfg = our_config()
  params = hf_gemma.load(checkpoint, cfg, LAYOUT, seed=3, image_token_offset=IMAGE_ROWS)
  return cfg, jax.tree.map(np.asarray, params)


def test_forward_matches_numpy_gemma(checkpoint, loaded):
  cfg, params = loaded
  tensors = load_file(os.path.join(checkpoint, "model-00001-of-00002.safetensors"))
  tensors.update(load_file(os.path.join(checkpoint, "model-00002-of-00002.safetensors")))
  tokens = sample_tokens()
  ours = our_logits(cfg, open_adaln(jax.tree.map(np.copy, params)), tokens)
  assert_logits_close(ours, reference_logits(tensors, to_hf_ids(tokens), LAYERS))


def test_rows_and_new_parameters(checkpoint, loaded):
  cfg, params = loaded
  embed = np.asarray(random_tensors()["model.embed_tokens.weight"], np.float32)
  np.testing.assert_array_equal(params["embedding"][TEXT_COLUMNS], embed[TEXT_COLUMNS])
  np.testing.assert_array_equal(params["embedding"][IMAGE_COLUMNS], embed[IMAGE_ROWS:])
  mask_row = params["embedding"][LAYOUT.mask_id]
  assert 0.005 < mask_row.std() < 0.05  # drawn with init_std 0.02, not copied from row 19
  # Without an image offset the image rows are drawn too; the same seed draws the same rows.
  # This model also has segment markers and learned positions, which no checkpoint holds, and an
  # untied head, which starts from the (tied) checkpoint's embedding.
  marked = our_config(segment_lengths=(LAYOUT.text_length, LAYOUT.image_length),
                      learned_positions=LAYOUT.seq_length + 2, tie_embeddings=False)
  fresh = jax.tree.map(np.asarray, hf_gemma.load(checkpoint, marked, LAYOUT, seed=3))
  np.testing.assert_array_equal(fresh["embedding"][LAYOUT.mask_id], mask_row)
  assert 0.005 < fresh["embedding"][IMAGE_COLUMNS].std() < 0.05
  np.testing.assert_array_equal(fresh["lm_head"][:, TEXT_COLUMNS], embed[TEXT_COLUMNS].T)
  assert 0.005 < fresh["lm_head"][:, LAYOUT.mask_id].std() < 0.05
  # Parameters the checkpoint lacks are what our model initialises with the same seed (under jit,
  # as training initialises, and only these leaves: a whole random init compiles for seconds; XLA
  # may round differently fused programs 1 ulp apart).
  def initial(model):
    return (model.time_embedder.fc1.kernel[...], model.blocks[1].adaln.bias[...],
            model.markers[...], model.positions[...])
  expected = jax.jit(lambda: initial(transformer.MeDiMTransformer(marked, rngs=nnx.Rngs(3))))()
  found = (fresh["time_embedder"]["fc1"]["kernel"], fresh["blocks"][1]["adaln"]["bias"],
           fresh["markers"], fresh["positions"])
  for ours, theirs in zip(found, expected):
    np.testing.assert_allclose(ours, np.asarray(theirs), rtol=1e-6, atol=1e-9)


def test_matches_transformers_gemma_without_causal_mask(checkpoint, loaded):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  model = transformers.GemmaForCausalLM.from_pretrained(
      checkpoint, num_hidden_layers=LAYERS, dtype=torch.float32, attn_implementation="eager")
  model.eval()
  tokens = sample_tokens()
  ids = torch.as_tensor(to_hf_ids(tokens))
  no_mask = torch.zeros((ids.shape[0], 1, ids.shape[1], ids.shape[1]))  # additive: attend to all

  def hf_logits(ids, mask):
    with torch.no_grad():
      return model(input_ids=ids, attention_mask=mask).logits.double().numpy()

  reference = hf_logits(ids, no_mask)
  # The all-zero 4D mask really is bidirectional: position 0 sees a change to the last token,
  # which it cannot under HF's default causal mask.
  changed = ids.clone()
  changed[:, -1] = (changed[:, -1] + 1) % LAYOUT.text_vocab_size
  assert np.abs(hf_logits(changed, no_mask)[:, 0] - reference[:, 0]).max() > 1e-3
  np.testing.assert_allclose(hf_logits(changed, None)[:, 0], hf_logits(ids, None)[:, 0], atol=1e-6)
  cfg, params = loaded
  assert_logits_close(our_logits(cfg, open_adaln(jax.tree.map(np.copy, params)), tokens), reference)


def test_sharded_load_matches_unsharded(checkpoint, loaded):
  cfg, params = loaded
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("x", "y"))

  def spec(shape):  # "y" (4 ways) then "x" (2 ways) on the first dimensions they divide
    parts, free = [], ["y", "x"]
    for size in shape:
      axis = next((a for a in free if size % mesh.shape[a] == 0), None)
      parts.append(axis)
      free = [a for a in free if a != axis]
    return NamedSharding(mesh, PartitionSpec(*parts))

  shardings = jax.tree.map(lambda x: spec(x.shape), params)
  assert shardings["embedding"].spec == PartitionSpec("y", "x")        # MASK row inside a shard
  assert shardings["blocks"][0]["attn"]["o"].spec == PartitionSpec("y", "x", None)  # head_dim split
  sharded = hf_gemma.load(checkpoint, cfg, LAYOUT, seed=3, shardings=shardings,
                          image_token_offset=IMAGE_ROWS)
  for array, sharding, value in zip(jax.tree.leaves(sharded), jax.tree.leaves(shardings),
                                    jax.tree.leaves(params)):
    assert array.sharding == sharding
    np.testing.assert_array_equal(np.asarray(array), value)


def test_scanned_layers_load_the_same_weights_stacked_and_give_the_same_logits(checkpoint, loaded):
  cfg, params = loaded
  scanned_cfg = our_config(scan_layers=True)
  mesh = Mesh(np.array(jax.devices()[:2]), ("x",))
  layer_split = NamedSharding(mesh, PartitionSpec("x"))  # each device reads only its layer
  shardings = jax.tree.map(lambda _: NamedSharding(mesh, PartitionSpec()), params)
  scanned_abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(
      lambda: transformer.MeDiMTransformer(scanned_cfg, rngs=nnx.Rngs(3)))))
  shardings = {**shardings, "blocks": jax.tree.map(lambda _: layer_split, scanned_abstract["blocks"])}
  scanned = hf_gemma.load(checkpoint, scanned_cfg, LAYOUT, seed=3, shardings=shardings,
                          image_token_offset=IMAGE_ROWS)
  for path, value in jax.tree_util.tree_leaves_with_path(scanned["blocks"]):
    keys = tuple(k.key for k in path)
    if keys[0] == "adaln":
      continue  # fresh parameters: drawn per layer by the scanned init, not read
    per_layer = [np.asarray(functools.reduce(lambda t, k: t[k], keys, params["blocks"][i]))
                 for i in range(LAYERS)]
    np.testing.assert_array_equal(np.asarray(value), np.stack(per_layer))
  for name in ("embedding", "final_norm"):
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, scanned[name]), params[name])
  scanned = jax.tree.map(np.array, scanned)
  scanned["blocks"]["adaln"]["kernel"][:] = 0.0
  scanned["blocks"]["adaln"]["bias"][:] = 0.0
  scanned["blocks"]["adaln"]["bias"][:, [2, 5]] = 1.0
  tokens = sample_tokens()
  np.testing.assert_allclose(our_logits(scanned_cfg, scanned, tokens),
                             our_logits(cfg, open_adaln(jax.tree.map(np.copy, params)), tokens),
                             rtol=1e-5, atol=1e-5)


def test_single_file_without_index_or_prefix(tmp_path, loaded):
  """One model.safetensors as a bare GemmaModel saves it ("layers.0...", no "model." prefix)."""
  cfg, params = loaded
  directory = tmp_path / "gemma"
  directory.mkdir()
  tensors = {name[len("model."):]: value for name, value in random_tensors().items()}
  save_file(tensors, str(directory / "model.safetensors"))
  (directory / hf_gemma.CONFIG_FILE).write_text(json.dumps(hf_config()))
  single = hf_gemma.load(str(directory), cfg, LAYOUT, seed=3, image_token_offset=IMAGE_ROWS)
  for ours, theirs in zip(jax.tree.leaves(single), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(ours), theirs)


def test_missing_tensor_is_named(tmp_path):
  tensors = random_tensors()
  del tensors["model.layers.1.mlp.up_proj.weight"]
  directory = write_checkpoint(tmp_path / "gemma", tensors)
  with pytest.raises(InputError, match=r"model\.safetensors\.index\.json: no tensor "
                                       r"model\.layers\.1\.mlp\.up_proj\.weight"):
    hf_gemma.load(directory, our_config(), LAYOUT)


def test_config_mismatches_are_named(tmp_path, checkpoint):
  with pytest.raises(InputError, match="does not exist"):
    hf_gemma.load(str(tmp_path / "absent"), our_config(), LAYOUT)
  with pytest.raises(InputError, match=r"head_dim: 16 in our config, 8 in the checkpoint"):
    hf_gemma.load(checkpoint, our_config(head_dim=16), LAYOUT)
  with pytest.raises(InputError, match=r"num_layers: 4 requested, the checkpoint has 3"):
    hf_gemma.load(checkpoint, our_config(num_layers=4), LAYOUT)
  with pytest.raises(InputError, match=r"image rows \[30, 42\)"):
    hf_gemma.load(checkpoint, our_config(), LAYOUT, image_token_offset=30)
  fields = hf_gemma.model_fields(hf_gemma.read_hf_config(checkpoint))
  assert fields == dict(d_model=HIDDEN, num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM,
                        mlp_dim=MLP, rope_base=10000.0, norm_eps=1e-6, tie_embeddings=True)


def test_training_starts_from_the_checkpoint_on_a_mesh(checkpoint):
  from configs import smoke
  from medim_jax.data import build as data_build
  from medim_jax.training import train
  config = smoke.get_config("tiny")
  config.model.update(dict(d_model=HIDDEN, num_layers=LAYERS, num_heads=HEADS, num_kv_heads=KV_HEADS,
                           head_dim=HEAD_DIM, mlp_dim=MLP, pretrained_dir=checkpoint,
                           pretrained_image_token_offset=IMAGE_ROWS))
  config.mesh.update(dict(num_devices=8, data=2, fsdp=4, tensor=1))
  config.train.ema_decay = 0.9
  dataset = data_build.build_dataset(config)
  trainer = train.Trainer(config, dataset.layout)
  state = trainer.init_state(0)
  expected = hf_gemma.load(checkpoint, trainer.model.config, dataset.layout, seed=0,
                           image_token_offset=IMAGE_ROWS)
  for got, ema, want, sharding in zip(jax.tree.leaves(state.params), jax.tree.leaves(state.ema_params),
                                      jax.tree.leaves(expected),
                                      jax.tree.leaves(trainer.state_shardings.params)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    np.testing.assert_array_equal(np.asarray(ema), np.asarray(want))
    assert got.sharding == sharding
  _, metrics = trainer.train_step(state, next(dataset.train_iterator(8, seed=0)))
  assert np.isfinite(float(metrics["loss"])) and float(metrics["nonfinite"]) == 0
