"""The paper's model: the first 10 layers of Liquid_V1_7B (a Gemma-7B), 256 report + 1,024 image tokens.

About 3.47B parameters. The shape matches the original so Liquid's weights load: pass their local
directory with --config.model.pretrained_dir=/path/to/Liquid_V1_7B. Training it needs an accelerator
slice: the mesh below shards params and Adam moments over every device (fsdp = -1).
"""

from configs import base


def get_config(arg=None):
  del arg
  config = base.get_config()
  config.data.name = "folders"
  config.data.image_size = 512
  config.data.text_length = 256
  config.model.d_model = 3072
  config.model.num_layers = 10
  config.model.num_heads = 16
  config.model.num_kv_heads = 16
  config.model.head_dim = 256
  config.model.mlp_dim = 24_576
  config.model.time_scale = 1.0
  config.model.adaln_gate_init = "zero"
  config.model.dtype = "bfloat16"
  config.model.pretrained_image_token_offset = 256_000  # Liquid's VQ codes follow Gemma's text ids

  # ~42 GB of f32 params + Adam moments + EMA: fully sharded, batch split over the same devices.
  config.mesh.data = 1
  config.mesh.fsdp = -1

  # What the original runs (REFERENCE.md): AdamW 1e-5, no weight decay, clip 1.0, global batch 8.
  config.train.batch_size = 8
  config.train.learning_rate = 1e-5
  config.train.warmup_steps = 1250
  config.train.num_steps = 500_000
  config.train.end_learning_rate_fraction = 1e-4
  config.train.log_every = 100
  config.train.eval_every = 10_000
  config.train.checkpoint_every = 10_000

  config.sample.text_steps = 128
  config.sample.image_steps = 128
  config.sample.cfg_scale = 5.0
  config.sample.num_examples = 16
  config.sample.batch_size = 8
  return config
