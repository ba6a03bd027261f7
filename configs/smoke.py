"""Smoke run: procedural coloured shapes with sentences; trains and samples in minutes on 2 CPU cores.

``configs/smoke.py`` is the demo length; ``configs/smoke.py:tiny`` shrinks everything for tests.
"""

from configs import base


def get_config(arg=None):
  config = base.get_config()
  config.model.d_model = 128
  config.model.num_layers = 3
  config.model.num_heads = 4
  config.model.num_kv_heads = 4
  config.model.head_dim = 32
  config.model.mlp_dim = 384
  config.model.time_scale = 100.0      # sigma in [0, 7] needs spreading for a model trained from scratch
  config.model.adaln_gate_init = "open"
  config.model.learned_position_embedding = True

  # Generation starts from fully masked segments: train the cross-modal tasks and heavily masked
  # states more than the paper's ELBO mix does (a small model on a CPU budget needs the help).
  config.diffusion.time_warp = "maskgit"
  config.diffusion.task_probs = dict(joint=0.2, report_to_image=0.35, image_to_report=0.35,
                                     drop_report=0.05, drop_image=0.05)

  config.train.batch_size = 32
  config.train.num_steps = 800
  config.train.learning_rate = 3e-3
  config.train.warmup_steps = 50
  config.train.log_every = 100
  config.train.eval_every = 400
  config.train.checkpoint_every = 400

  config.sample.text_steps = 10
  config.sample.image_steps = 16
  config.sample.cfg_scale = 2.0
  config.sample.num_examples = 64

  if arg == "tiny":
    config.mesh.num_devices = 1  # tests run on 8 fake CPU devices; the sharded tests set meshes
    config.data.num_train = 256
    config.data.num_eval = 32
    config.model.d_model = 32
    config.model.num_layers = 2
    config.model.num_heads = 2
    config.model.num_kv_heads = 1
    config.model.head_dim = 16
    config.model.mlp_dim = 64
    config.train.batch_size = 8
    config.train.num_steps = 6
    config.train.log_every = 2
    config.train.eval_every = 3
    config.train.num_eval_batches = 1
    config.train.checkpoint_every = 3
    config.sample.text_steps = 3
    config.sample.image_steps = 4
    config.sample.num_examples = 4
    config.sample.batch_size = 4
  elif arg:
    raise ValueError(f"configs/smoke.py takes no argument or 'tiny', got {arg!r}")
  return config
