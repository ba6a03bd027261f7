"""The paper model (configs/medim_liquid7b.py) on a Cloud TPU v5p slice: ``configs/tpu_v5p.py:v5p-16``.

The argument is the slice as gcloud names it (v5p-N has N/2 chips, one JAX device each). Params,
Adam moments and batch are split over up to 8 chips (fsdp); bigger slices add data-parallel groups of
8 chips, one example per chip, so the global batch grows with the slice (the paper's is 8):

  slice     chips  mesh (data x fsdp)  global batch
  v5p-8       4        1 x 4               8
  v5p-16      8        1 x 8               8
  v5p-32     16        2 x 8              16
  v5p-64     32        4 x 8              32

Per-chip memory of the train step (v5p HBM: 95 GiB), for the layout of Liquid's Gemma tokenizer
(256,000 text ids | MASK | 8,192 image codes = 264,193; 256 + 1,024 tokens; 4,156,557,312 params),
bf16 compute, no remat:

  v5p-16  measured by AOT (libtpu 0.0.42.1, python -m medim_jax.aot --topology v5p-16):
          state 5.81 GiB (analytic: 4 B x 4.157e9 x 3 / 8 = 5.81), temporaries 28.73 GiB,
          code 0.37 GiB, total 34.91 GiB per chip.
  v5p-8   measured by AOT (2 examples per chip): state 11.62 GiB (analytic 11.61), temporaries
          33.49 GiB, code 0.42 GiB, total 45.53 GiB per chip.
  v5p-32 and up: analytic state 5.81 GiB per chip (fsdp stays 8); one example per chip as on v5p-16,
          so about 35 GiB per chip expected (analytic; not compiled).
  The original's Llama-2 layout (40,196 ids; 3,468,438,528 params) on v5p-16, measured by AOT
  (--layout llama2): state 4.85 GiB, temporaries 19.92 GiB, total 25.15 GiB per chip.

Check a slice before paying for it:
  python -m medim_jax.aot --config configs/tpu_v5p.py:v5p-16 --topology v5p-16 --libtpu PATH

Data: the paper's two sources as empty slots, ``data.datasets.chest`` (MIMIC-CXR) and
``data.datasets.pathology`` (PathGen); set their folders, the tokenizers and the weights in a config of
your own that imports this one (launch/README.md shows one), so that tokenizing and training read the
same settings.
"""

import ml_collections

from configs import medim_liquid7b

MAX_FSDP = 8          # chips that share one copy of the state; more slices -> data parallel
PAPER_BATCH = 8


def dataset_slots() -> ml_collections.ConfigDict:
  """Paired folders per source (see configs/base.py); a source without a train folder is unused."""
  slot = lambda: ml_collections.ConfigDict(dict(train="", val="", test="", prompt="", weight=1.0))
  return ml_collections.ConfigDict(dict(chest=slot(), pathology=slot()))


def get_config(arg="v5p-16"):
  arg = arg or "v5p-16"
  prefix, _, size = arg.partition("-")
  if prefix != "v5p" or not size.isdigit() or int(size) < 8 or int(size) % 8:
    raise ValueError(f"configs/tpu_v5p.py takes a v5p slice name such as v5p-16, got {arg!r}")
  chips = int(size) // 2  # v5p names count TensorCores; each chip is one device (megacore)
  if chips > MAX_FSDP and chips % MAX_FSDP:
    raise ValueError(f"{arg}: {chips} chips are not a multiple of {MAX_FSDP}")
  config = medim_liquid7b.get_config()
  fsdp = min(chips, MAX_FSDP)
  config.mesh.num_devices = 0
  config.mesh.data = chips // fsdp
  config.mesh.fsdp = fsdp
  config.mesh.tensor = 1
  config.train.batch_size = max(PAPER_BATCH, chips)
  config.model.dtype = "bfloat16"
  config.model.attention_impl = "xla"
  config.data.datasets = dataset_slots()
  return config
