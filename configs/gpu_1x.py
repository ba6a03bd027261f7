"""The paper model (configs/medim_liquid7b.py) on ONE GPU: ``configs/gpu_1x.py`` (80 GB H100) or
``configs/gpu_1x.py:h200`` (141 GB).

The whole state lives on one device, so it must shrink: Adam's float32 moments alone would be 31 GiB
of 4,156,557,312 parameters (Liquid's Gemma layout). Here the second moment is Adafactor's factored
one (row and column statistics) and the first moment bfloat16 (``config.train.second_moment``,
``config.train.mu_dtype``); the params stay float32. Activations are recomputed per block
(``remat_policy=full``), and the layers run as one scanned block. bf16 compute; attention through
jax.nn.dot_product_attention (cuDNN's fused attention where it supports the shape).

Check the fit before renting the GPU (docs/paper_setup.md has the measured table):
  python -m medim_jax.aot --config configs/gpu_1x.py --topology h100-1

Data: empty slots data.datasets.chest and data.datasets.pathology, as configs/tpu_v5p.py.
"""

from configs import medim_liquid7b, tpu_v5p

BATCH = {"h100": 8, "h200": 8}


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
