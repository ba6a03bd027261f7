"""The paper model (configs/medim_liquid7b.py) on one node of 8 GPUs (H100 80 GB or H200 141 GB).

Params, Adam moments and the batch of 8 (the paper's, one example per GPU) are split over all 8 GPUs
(fsdp=8); bf16 compute; attention through jax.nn.dot_product_attention (cuDNN's fused attention where
it supports the shape, XLA's otherwise). Launch with launch/slurm_gpu.sbatch, or on the node itself:
  python -m medim_jax.main --config configs/gpu_8x.py --workdir DIR

Per-GPU memory of the train step, for the layout of Liquid's Gemma tokenizer (256,000 text ids |
MASK | 8,192 image codes; 256 + 1,024 tokens; 4,156,557,312 params), no remat:
  state: analytic 4 B x 4.157e9 x (params + 2 Adam moments) / 8 = 5.81 GiB; the AOT compile gives the
    same 5.81 GiB of arguments.
  whole step: measured by AOT on 8 fake CPU devices (python -m medim_jax.aot --config
    configs/gpu_8x.py --topology h100-8): 50.90 GiB per device (temporaries 45.10 GiB). XLA:CPU
    plans buffers differently from XLA:GPU, so this is indicative; on a TPU v5p, whose compiler the
    same AOT tool runs, the same step at one example per chip takes 34.91 GiB. Both fit an H100's
    80 GB, even within the 75% JAX preallocates by default (about 60 GiB; launch/slurm_gpu.sbatch
    raises it to 90% with XLA_PYTHON_CLIENT_MEM_FRACTION).

Data: empty slots data.datasets.chest and data.datasets.pathology, as configs/tpu_v5p.py.
"""

from configs import medim_liquid7b, tpu_v5p


def get_config(arg=None):
  del arg
  config = medim_liquid7b.get_config()
  config.mesh.num_devices = 0
  config.mesh.data = 1
  config.mesh.fsdp = 8
  config.mesh.tensor = 1
  config.train.batch_size = 8
  config.model.dtype = "bfloat16"
  config.model.attention_impl = "jax_dot_product"
  config.data.datasets = tpu_v5p.dataset_slots()
  return config
