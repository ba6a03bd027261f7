"""The paper model (configs/medim_liquid7b.py) on ONE GPU: ``configs/gpu_1x.py`` (80 GB H100) or
``configs/gpu_1x.py:h200`` (141 GB).

The whole state lives on one device, so it must shrink: Adam's float32 moments alone would be 31 GiB
of 4,156,557,312 parameters (Liquid's Gemma layout). Here the second moment is Adafactor's factored
one (row and column statistics) and the first moment bfloat16 (``config.train.second_moment``,
``config.train.mu_dtype``); the params stay float32. Activations are recomputed per block
(``remat_policy=full``), and the layers run as one scanned block. bf16 compute; attention through
jax.nn.dot_product_attention (cuDNN's fused attention where it supports the shape).

Per-GPU memory of the train step (Liquid's Gemma layout, 1,280 tokens), from
``python -m medim_jax.aot --config configs/gpu_1x.py --topology h100-1`` (one CPU device standing in
for the GPU, 2026-12-06): state 23.24 GiB, temporaries 36.24 GiB, total 59.48 GiB at batch 8 (the
paper's); batch 16 needs 65.45 GiB (the H200 default here), batch 32 84.38 GiB. Without the scanned
layers it is 129 GiB; with Adam's full second moment 80-83 GiB (docs/paper_setup.md has the table).
JAX preallocates 75% of a GPU by default: set XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 on an 80 GB card.

Data: empty slots data.datasets.chest and data.datasets.pathology, as configs/tpu_v5p.py.
"""

from configs import medim_liquid7b, tpu_v5p

BATCH = {"h100": 8, "h200": 16}


def get_config(arg="h100"):
  if arg not in BATCH:
    raise ValueError(f"configs/gpu_1x.py:{arg}: choose one of {sorted(BATCH)}")
  config = medim_liquid7b.get_config()
  config.mesh.num_devices = 1
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, 1, 1
  config.train.batch_size = BATCH[arg]
  config.train.mu_dtype = "bfloat16"
  config.train.second_moment = "factored"
  config.model.dtype = "bfloat16"
  config.model.attention_impl = "jax_dot_product"
  config.model.remat_policy = "full"
  config.model.scan_layers = True
  config.data.datasets = tpu_v5p.dataset_slots()
  return config
