"""Ahead-of-time compile of the sharded train step (medim_jax/aot.py) on the tests' 8 fake CPU devices."""

import os

import pytest

from configs import medim_liquid7b, smoke
from medim_jax import aot, errors
from medim_jax.parallel import topologies
from medim_jax.tokenizers.vocab import TokenLayout

LAYOUT = TokenLayout(text_vocab_size=30, image_vocab_size=16, text_length=8, image_length=36)


def tiny_config():
  config = smoke.get_config("tiny")
  config.mesh.num_devices = 8
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 4, 1
  config.train.ema_decay = 0.9  # the state then holds four f32 copies of the parameters
  return config


def closed_form_param_count(m, layout: TokenLayout) -> int:
  """Every parameter of models/transformer.py for config.model ``m`` (tied embeddings)."""
  d = m.d_model
  embedding = layout.vocab_size * d
  timestep_mlp = m.time_frequency_dim * d + d + d * d + d
  attention = d * (2 * m.num_heads + 2 * m.num_kv_heads) * m.head_dim   # q, o; k, v
  block = 2 * d + attention + 3 * d * m.mlp_dim + 6 * d * d + 6 * d      # 2 norms, GeGLU, AdaLN
  markers = 2 * d if m.segment_markers else 0
  positions = (layout.seq_length + 2) * d if m.learned_position_embedding else 0
  return embedding + timestep_mlp + m.num_layers * block + markers + positions + d  # + final norm


def test_aot_compiles_the_sharded_train_step_and_reports_its_memory():
  config = tiny_config()
  target = topologies.parse_target("", cpu_devices=8)
  report, _ = aot.compile_train_step(config, LAYOUT, target, topologies.target_devices(target))

  assert report.mesh_shape == {"data": 2, "fsdp": 4, "tensor": 1}
  memory = report.memory
  for key in ("arguments", "outputs", "aliased", "temporaries", "total"):
    assert memory[key] > 0, key
  assert memory["generated_code"] >= 0  # XLA:CPU reports 0
  # The donated state is reused for the new one; the arguments are the state and the batch rows
  # (XLA drops the batch's example_id, which the step does not read).
  assert 0 < memory["aliased"] <= report.sharded_state_bytes
  assert report.sharded_state_bytes <= memory["arguments"] <= report.sharded_state_bytes + report.batch_bytes

  num_params = closed_form_param_count(config.model, LAYOUT)
  assert report.num_params == num_params
  # f32 params + Adam's two moments + EMA, split over fsdp 4 x tensor 1.
  assert report.state_copies == {"params": 1, "adam_moments": 2, "ema": 1}
  assert report.analytic_state_bytes == 4 * num_params * 4 / 4
  assert report.analytic_state_bytes <= report.sharded_state_bytes

  text = aot.format_report(report)
  assert "total (arguments + outputs - aliased + temporaries + code)" in text
  assert "no limit known" in text
  report.device_memory_gib = memory["total"] / 2 / aot.GIB
  with pytest.raises(errors.InputError, match="does not fit"):
    aot.check_fits(report, "configs/smoke.py:tiny")


def test_aot_compiles_the_step_of_a_model_with_a_finding_head_and_its_labelled_batch():
  config = tiny_config()
  target = topologies.parse_target("", cpu_devices=8)
  plain, _ = aot.compile_train_step(config, LAYOUT, target, topologies.target_devices(target))
  config.model.finding_names = "nodule,opacity,effusion"
  report, _ = aot.compile_train_step(config, LAYOUT, target, topologies.target_devices(target))
  assert report.num_params == closed_form_param_count(config.model, LAYOUT) + 3 * config.model.d_model
  rows_per_device = config.train.batch_size // 8  # split over data 2 x fsdp 4
  assert report.batch_bytes - plain.batch_bytes == rows_per_device * (3 * 4 + 1)  # labels, known


def test_the_one_gpu_config_compiles_with_factored_moments_and_counts_them():
  # configs/gpu_1x.py's optimizer settings on the tiny model: the compiled state holds the params,
  # a bfloat16 first moment and only row/column statistics of the second.
  config = tiny_config()
  config.mesh.num_devices, config.mesh.data, config.mesh.fsdp = 1, 1, 1
  config.train.mu_dtype, config.train.second_moment = "bfloat16", "factored"
  config.model.scan_layers, config.model.remat_policy = True, "full"
  config.model.d_model = config.model.mlp_dim = 128  # the MLP kernels are factored (>= 128 x 128)
  target = topologies.parse_target("h100-1", cpu_devices=1)
  report, _ = aot.compile_train_step(config, LAYOUT, target, topologies.target_devices(target))
  assert report.state_copies == {"params": 1, "adam_moments": 0.5, "ema": 1}
  num_params = closed_form_param_count(config.model, LAYOUT)
  assert report.analytic_state_bytes == 4 * num_params * 2.5
  # The factored statistics are small but not nothing: vectors keep a full second moment.
  assert report.analytic_state_bytes < report.sharded_state_bytes < 4 * num_params * 3.5
  assert "0.5 adam_moments" in aot.format_report(report)


def test_targets_and_the_paper_layout():
  v5p = topologies.parse_target("v5p-16", cpu_devices=8)
  assert (v5p.platform, v5p.num_devices, v5p.topology_name, v5p.device_memory_gib) == (
      "tpu", 8, "v5:2x2x2", 95.0)
  h100 = topologies.parse_target("h100-8", cpu_devices=1)
  assert (h100.platform, h100.num_devices, h100.device_memory_gib) == ("cpu", 8, 80.0)
  for bad in ("v5p-12", "tpu9-8"):
    with pytest.raises(errors.InputError, match="--topology"):
      topologies.parse_target(bad, cpu_devices=8)
  layout = aot.layout_for(medim_liquid7b.get_config())  # auto: Liquid's Gemma ids
  assert (layout.vocab_size, layout.text_length, layout.image_length) == (264_193, 256, 1_024)
  assert aot.layout_for(medim_liquid7b.get_config(), "llama2").vocab_size == 40_196


@pytest.mark.skipif(not os.path.isfile(os.environ.get("TPU_LIBRARY_PATH", "")),
                    reason="TPU topologies need libtpu (TPU_LIBRARY_PATH); see medim_jax/aot.py")
def test_aot_compiles_for_a_tpu_topology():
  config = tiny_config()
  target = topologies.parse_target("v5p-16", cpu_devices=8)
  report, _ = aot.compile_train_step(config, LAYOUT, target, topologies.target_devices(target))
  assert report.memory["total"] > 0 and report.flops_per_device > 0
