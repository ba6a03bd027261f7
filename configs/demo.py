"""medim-demo on a CPU: chest radiographs + IU reports and H&E patches + captions at 64 px.

``python -m medim_jax.main --config configs/demo.py --workdir workdir/demo --mode all`` builds the
data (cached), tokenizes it into shards, trains and samples. ``configs/demo.py:long`` (``make
demo-long``) trains longer, with half of the conditional examples' targets masked whole, and reveals
generated images without noise on the confidence (the reading study, docs/reading_study.md).
``configs/demo.py:text`` (or ``:long,text``) adds the other IU reports as text without images
(medim-demo's ``chest_text`` part). ``configs/demo.py:tiny`` is for tests.
"""

import ml_collections

from configs import base


def dataset_entry(prompt: str, weight: float = 1.0, text_only: bool = False) -> ml_collections.ConfigDict:
  """One dataset's folders (data.name=folders), prompt and batch weight; ``text_only``: its train
  folder holds reports without images (data/tokenize.py)."""
  return ml_collections.ConfigDict(dict(train="", val="", test="", prompt=prompt, weight=weight,
                                        text_only=text_only))


def get_config(arg=None):
  config = base.get_config()
  config.data.name = "medim_demo"
  config.data.image_size = 64
  config.data.text_length = 80          # 95% of IU reports fit; longer ones are truncated
  # medim_demo fills the folders; with data.name=folders they name your own (see configs/base.py).
  config.data.datasets = ml_collections.ConfigDict(dict(
      chest=dataset_entry("chest x-ray.", weight=2.0), pathology=dataset_entry("histopathology.")))

  # Sized so that `make demo` (install, data, training, evaluation) fits in 20 minutes on 2 cores.
  config.model.d_model = 128
  config.model.num_layers = 4
  config.model.num_heads = 4
  config.model.num_kv_heads = 4
  config.model.head_dim = 32
  config.model.mlp_dim = 512
  config.model.time_scale = 100.0
  config.model.adaln_gate_init = "open"
  config.model.learned_position_embedding = True
  # Image-code embeddings start from what each k-means patch looks like: at 700 steps the held-out
  # losses fall from 1.29 / 3.65 (text / image) to 1.18-1.20 / 3.47 (README: "What was tried").
  config.model.image_embedding_init = "codebook"
  config.diffusion.time_warp = "maskgit"
  # A quarter of the chest reports name a finding, each finding a few percent: draw those 8x as
  # often and weight image->report up, or the small model learns the normal report (README: the
  # one-GPU sweep and the CPU check behind these two settings).
  config.data.finding_oversample = 8.0
  config.diffusion.task_probs = dict(joint=0.2, report_to_image=0.3, image_to_report=0.4,
                                     drop_report=0.05, drop_image=0.05)

  # VQ tokenizer for 64 px (8x8 codes): small enough to train on 2 CPU cores (600 steps with spots:
  # 5 min 11 s on an idle machine, 2026-12-01, then ~3.7 min of test scoring; about twice that when
  # the cores are shared).
  config.vq.channels = 16
  config.vq.channel_mult = (1, 2, 4, 4)
  # Plain (not l2-normalised) codes keep much more of the findings' contrast at this size: cardiomegaly
  # 0.56 -> 0.72, effusion 0.61 -> 0.82, granuloma 0.07 -> 0.20 retained (README, the VQ tokenizer).
  config.vq.l2_normalize = False
  # Random spots on the training images keep local deviations from the average anatomy: two runs
  # retained pneumothorax 0.67 -> 0.72-0.73, effusion 0.78 -> 0.80-0.85 (README, the VQ tokenizer).
  config.vq_train.spots_per_image = 3
  config.vq_train.spot_contrast = 0.5
  config.vq_train.spot_max_sigma = 16.0
  config.vq_train.batch_size = 16
  config.vq_train.num_steps = 600
  config.vq_train.learning_rate = 2e-3
  config.vq_train.warmup_steps = 50
  config.vq_train.usage_decay = 0.95
  config.vq_train.log_every = 50

  config.train.batch_size = 32
  config.train.num_steps = 700
  config.train.learning_rate = 2e-3
  config.train.log_every = 50
  config.train.eval_every = 350
  config.train.checkpoint_every = 350

  config.sample.text_steps = 16
  config.sample.image_steps = 16
  config.sample.cfg_scale = 2.0
  config.sample.num_examples = 32
  config.eval.examples_per_dataset = 180  # all chest test images (a finding has 1-26 positives)

  profiles = set((arg or "").split(",")) - {""}
  if profiles - {"long", "text", "tiny"} or {"long", "tiny"} <= profiles:
    raise ValueError(f"configs/demo.py takes no argument or some of 'long', 'text' and 'tiny' "
                     f"(comma-separated; not long and tiny together), got {arg!r}")
  if "text" in profiles:
    # The 2,118 IU reports the renderer cannot draw a finding of, as report text with no image
    # (1.5x more report text than the 1,449 paired training reports): a sixth of each batch, taken
    # from pathology's share, so the chest pairs keep theirs (two thirds).
    config.data.demo_parts = "chest,pathology,chest_text"
    config.data.datasets.chest_text = dataset_entry("chest x-ray.", weight=0.5)  # text-only: the part
    config.data.datasets.pathology.weight = 0.5
  if "long" in profiles:
    # docs/reading_study.md: with the whole target masked in half of the image->report and
    # report->image examples, the image is the only source of a masked finding word there.
    config.diffusion.whole_target_prob = 0.5
    # Generated images revealed in the order of the model's confidence, without the original's
    # noise on it: report->image 0.276 against 0.161 on the test split, two seeds (reports keep it).
    config.sample.image_gumbel_scale = 0.0
    config.train.num_steps = 2000
    config.train.eval_every = 500
    config.train.checkpoint_every = 500
  if "tiny" in profiles:
    config.mesh.num_devices = 1  # tests run on 8 fake CPU devices; the sharded tests set meshes
    config.vq.channels = 8
    config.vq.channel_mult = (1, 2)
    config.vq.z_channels = 8
    config.vq.embed_dim = 4
    config.vq.codebook_size = 16
    config.vq_train.batch_size = 4
    config.vq_train.num_steps = 4
    config.vq_train.log_every = 2
    config.vq_train.checkpoint_every = 2
    config.vq_train.restart_every = 2
    config.data.text_vocab_size = 256
    config.data.image_codebook_size = 64
    config.data.text_length = 48
    config.model.d_model = 32
    config.model.num_layers = 2
    config.model.num_heads = 2
    config.model.num_kv_heads = 1
    config.model.head_dim = 16
    config.model.mlp_dim = 64
    config.train.batch_size = 8
    config.train.num_steps = 4
    config.train.log_every = 2
    config.train.eval_every = 2
    config.train.num_eval_batches = 1
    config.train.checkpoint_every = 2
    config.sample.text_steps = 3
    config.sample.image_steps = 3
    config.sample.num_examples = 4
    config.sample.batch_size = 4
    config.eval.examples_per_dataset = 4
    config.eval.classifier_steps = 5
  return config
