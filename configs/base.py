"""Every knob of medim_jax, with its default and what it means. Other configs start from this one.

Usage: ``python -m medim_jax.main --config configs/base.py --workdir DIR``; any key can be
overridden with ``--config.train.num_steps=100``. The config is locked: unknown keys are errors.
"""

import ml_collections


def get_config(arg=None):
  del arg
  config = ml_collections.ConfigDict()
  config.seed = 42

  # Data: which paired image+report set feeds training, and its token layout.
  config.data = ml_collections.ConfigDict()
  config.data.name = "smoke"            # smoke (in memory) | medim_demo | folders (both via shards)
  config.data.num_train = 4096
  config.data.num_eval = 256
  config.data.image_size = 24           # pixels; smoke images are a 6x6 grid of 4-pixel cells
  config.data.image_patch = 1           # smoke: cells per image token side (1 -> 36 tokens per image)
  config.data.text_length = 8           # report tokens, EOS and padding included

  # medim-demo (data.name="medim_demo"): built once into cache_dir, which git ignores.
  config.data.cache_dir = ".cache/medim-demo"
  config.data.demo_seed = 0
  config.data.demo_parts = "chest,pathology"
  config.data.demo_chest_train_renders = 1  # radiographs per training report (new film each)
  config.data.demo_pathology_counts = ml_collections.ConfigDict(dict(train=1200, val=150, test=150))

  # Paired folders (data.name="folders"): per dataset, NAME.png|jpg + NAME.txt folders per split,
  # a prompt (the report's fixed first words, the joint task's conditioning) and a mixing weight.
  # An empty val folder takes val_fraction of train. medim_demo fills the folders itself.
  config.data.datasets = ml_collections.ConfigDict()
  config.data.val_fraction = 0.05
  config.data.square = "pad"            # pad (black) or crop non-square images to square
  # DICOM (NAME.dcm) display window "center,width" for every file, e.g. "2048,4096"; "": each
  # file's own (VOI LUT or Window Center / Width), or its full range when it has none. The manifest
  # records how every DICOM was displayed (dicom_display).
  config.data.dicom_window = ""
  # data.name="mimic_cxr": MIMIC-CXR-JPG as PhysioNet ships it (files/pXX/... and the
  # mimic-cxr-2.0.0-*.csv.gz tables under root; the reports' files/pXX/.../sYYY.txt under
  # reports_root, default root), converted into W/mimic_cxr_folders by data/mimic_cxr.py and then
  # tokenized as config.data.datasets[dataset] (its prompt and weight).
  config.data.mimic_cxr = ml_collections.ConfigDict(dict(
      root="", reports_root="", section="findings",  # findings | impression | both
      views="PA,AP", all_images=False,              # frontal views; one image per study
      uncertain="negative",                          # CheXpert -1 labels read as negative | positive
      dataset="chest"))
  config.data.on_bad_pair = "skip"      # skip (and summarise) or error on a bad image/report pair

  # Tokenizers used by --mode tokenize; shards record their fingerprints.
  config.data.text_tokenizer = "train"  # train (SentencePiece on the training reports) | a .model | an HF dir
  config.data.text_vocab_size = 1024    # for "train"
  config.data.image_tokenizer = "patch_kmeans"  # patch_kmeans (fitted here) | vq (WORKDIR/vq) | a .npz
  config.data.image_codebook_size = 512
  config.data.patch_pixels = 8          # pixels per image token side (64 px -> 8x8 tokens)
  config.data.truncate_reports = True   # reports longer than the text segment are cut (and counted)

  # Shards and the grain pipeline.
  config.data.verify_shards = True      # check every shard's sha256 before training or sampling
  config.data.shards_dir = ""           # "" -> WORKDIR/shards; several comma-separated dirs are mixed
  config.data.records_per_shard = 1024
  config.data.train_on_padding = True   # padding is generated (reports end by themselves)
  config.data.worker_count = 0          # grain worker processes (0: read in the main process)
  config.data.read_threads = 4
  # Training examples with any finding in their dataset's labels.jsonl are drawn this many times as
  # often as those without (1: as they come). Datasets without labels are unaffected.
  config.data.finding_oversample = 1.0

  # Image tokenizer (--mode train_vq): a VQGAN in the Chameleon/LlamaGen layout (models/vq.py).
  # data.image_tokenizer="vq" then tokenizes with WORKDIR/vq/tokenizer.npz.
  config.vq = ml_collections.ConfigDict()
  config.vq.channels = 32
  config.vq.channel_mult = (1, 2, 2, 4)   # 3 halvings: 8x downsampling (64 px -> 8x8 codes)
  config.vq.num_res_blocks = 1
  config.vq.attention_levels = ()
  config.vq.mid_attention = True
  config.vq.z_channels = 64
  config.vq.embed_dim = 8
  config.vq.codebook_size = 512
  config.vq.l2_normalize = True
  config.vq.commitment_beta = 0.25
  config.vq.num_groups = 32
  config.vq.in_channels = 3
  config.vq_train = ml_collections.ConfigDict()
  config.vq_train.batch_size = 32
  config.vq_train.num_steps = 2000
  config.vq_train.learning_rate = 1e-3
  config.vq_train.warmup_steps = 100
  config.vq_train.l1_weight = 1.0
  config.vq_train.l2_weight = 1.0
  config.vq_train.usage_decay = 0.99
  config.vq_train.restart_every = 50      # 0 disables dead-code restarts
  config.vq_train.dead_code_threshold = 0.03  # running usage below 3% of uniform counts as dead
  # > 0: up to this many random bright/dark spots per training image (train_vq.with_spots), so
  # that local deviations from the average anatomy survive tokenization (README).
  config.vq_train.spots_per_image = 0
  config.vq_train.spot_contrast = 0.5     # largest spot peak, in units of the [-1, 1] pixel range
  config.vq_train.spot_max_sigma = 8.0    # px; sigmas are log-uniform from 0.7 px to this
  config.vq_train.gan_weight = 0.0        # > 0 adds a PatchGAN hinge loss
  config.vq_train.gan_start_step = 1000
  config.vq_train.gan_channels = 32
  config.vq_train.log_every = 100
  config.vq_train.checkpoint_every = 500
  config.vq_train.seed = 0

  # Backbone: a Gemma-style transformer without the causal mask (see configs/medim_liquid7b.py).
  config.model = ml_collections.ConfigDict()
  config.model.d_model = 128
  config.model.num_layers = 4
  config.model.num_heads = 4
  config.model.num_kv_heads = 4         # < num_heads gives grouped-query attention
  config.model.head_dim = 32
  config.model.mlp_dim = 512
  config.model.rope_base = 10_000.0
  config.model.norm_eps = 1e-6
  config.model.time_frequency_dim = 256
  config.model.time_max_period = 10_000.0
  config.model.time_scale = 1.0         # multiplies sigma before the sinusoid (1.0 = original)
  config.model.tie_embeddings = True    # LM head = token embedding, as in the original
  config.model.adaln_gate_init = "zero"  # "zero": AdaLN-zero; "open": gate bias 1 (pretrained active)
  config.model.init_std = 0.02
  # random | codebook: image-code embeddings start knowing what each code looks like
  # (models/code_embedding.py; not with pretrained_dir, whose embeddings are learned already).
  config.model.image_embedding_init = "random"
  config.model.dtype = "float32"        # compute dtype; params and optimizer state stay float32
  # "" = dtype; "float32" with dtype bfloat16: bfloat16 matmul operands only, the residual stream and
  # elementwise work in float32 (faster on a CPU with AMX / AVX512-BF16: BENCHMARKS.md).
  config.model.activation_dtype = ""
  config.model.attention_impl = "xla"   # xla (einsum, f32 softmax) | jax_dot_product (cuDNN on GPU) | splash (TPU)
  config.model.remat_policy = "none"   # none | full | dots | dots_no_batch: recompute in backward
  config.model.scan_layers = False     # one compiled block scanned over stacked layer weights
  config.model.segment_markers = True   # a learned anchor token before the report and the image
  config.model.learned_position_embedding = False  # absolute positions on top of RoPE (from scratch)
  # A local Hugging Face Gemma / Liquid checkpoint directory to start from ("" = from scratch): its
  # first num_layers layers and embedding rows; AdaLN and the timestep MLP start fresh.
  config.model.pretrained_dir = ""
  config.model.pretrained_image_token_offset = -1  # checkpoint row of image code 0 (Liquid: 256000)
  # Comma-separated finding names ("" = none, as the original): adds a finding head trained by the
  # auxiliary finding loss (diffusion.finding_loss_weight) on the examples whose dataset's
  # labels.jsonl has these findings (medim-demo chest: cardiomegaly, pleural_effusion, ...).
  config.model.finding_names = ""
  # > 0: residual 3x3 conv layers over the image tokens' grid before the backbone, a spatial prior
  # for a model trained from scratch on few images (models/image_stem.py; not in the original).
  config.model.image_conv_layers = 0
  # Training only: dropout on each block's attention and MLP outputs (0 = none, as the original); a
  # regulariser for the report side of a model trained from scratch (docs/reading_study.md).
  config.model.dropout_rate = 0.0

  # Diffusion: forward process and loss.
  config.diffusion = ml_collections.ConfigDict()
  config.diffusion.schedule = "loglinear"  # loglinear (paper) | linear | cosine
  config.diffusion.eps = 1e-3
  config.diffusion.t_min = 1e-3         # times are stratified over the batch in [t_min, 1]
  config.diffusion.time_warp = "none"   # none: uniform t (ELBO, paper) | maskgit: more high-t states
  config.diffusion.task_probs = ml_collections.ConfigDict(dict(
      joint=0.6, report_to_image=0.15, image_to_report=0.15, drop_report=0.05, drop_image=0.05))
  config.diffusion.keep_prompt_prob = 0.1  # joint task: keep the report's prompt clean
  # report_to_image / image_to_report: the chance that the target segment is masked whole (t = 1),
  # the state generation starts from; 0 is the original's forward process (diffusion/corruption.py).
  config.diffusion.whole_target_prob = 0.0
  config.diffusion.loss_weighting = "elbo"  # elbo: -alpha'/(1-alpha) (paper) | flat: plain masked CE
  config.diffusion.text_loss_weight = 1.0
  config.diffusion.image_loss_weight = 1.0
  config.diffusion.finding_loss_weight = 1.0  # the finding loss (with model.finding_names) is added x this

  # Devices: a (data, fsdp, tensor) mesh; one axis may be -1 (the devices the others leave).
  config.mesh = ml_collections.ConfigDict()
  config.mesh.num_devices = 0           # 0: every device; N: the first N (one host only)
  config.mesh.data = -1
  config.mesh.fsdp = 1
  config.mesh.tensor = 1
  # Logical axis -> mesh axes ("fsdp", "tensor", "data,fsdp"; "" = replicated). A dimension its
  # axes do not divide is replicated (e.g. one KV head over tensor=2).
  config.mesh.rules = ml_collections.ConfigDict(dict(
      vocab="", embed="fsdp", mlp="tensor", heads="tensor", kv_heads="tensor", head_dim="",
      norm="", adaln_chunk="", embed_out="", time_freq="", segment="", length="", layers="",
      conv_window=""))

  # Optimisation.
  config.train = ml_collections.ConfigDict()
  config.train.batch_size = 32
  config.train.num_steps = 1000
  config.train.learning_rate = 1e-3
  config.train.end_learning_rate_fraction = 0.1  # cosine decays to this fraction of the peak
  config.train.warmup_steps = 50
  config.train.b1 = 0.9
  config.train.b2 = 0.999
  config.train.adam_eps = 1e-8
  config.train.weight_decay = 0.0
  config.train.mu_dtype = "float32"     # Adam's first moment: float32 | bfloat16 (half its memory)
  config.train.second_moment = "full"   # full (Adam) | factored (Adafactor's row/column statistics)
  config.train.grad_clip_norm = 1.0
  config.train.ema_decay = 0.0          # 0 disables EMA; sampling uses EMA params when enabled
  config.train.log_every = 50
  config.train.eval_every = 250
  config.train.num_eval_batches = 4
  config.train.checkpoint_every = 500
  config.train.max_checkpoints_to_keep = 3
  config.train.keep_checkpoint_period = 0  # > 0 also keeps every checkpoint at a multiple of this
  # A checkpoint whose files changed on disk (checked against the sha256 seal written after each
  # save) or cannot be read: "fallback" moves it to checkpoints/corrupt-STEP and resumes from the
  # newest intact one; "error" stops, naming the intact ones. Also the VQ trainer's policy.
  config.train.on_corrupt_checkpoint = "fallback"
  # A non-finite loss or gradient is never applied; then "skip" goes on (stopping after
  # max_consecutive_nonfinite in a row) or "stop" ends the run with the last checkpoint intact.
  config.train.on_nonfinite = "skip"
  config.train.max_consecutive_nonfinite = 10
  config.train.loss_spike_sigma = 6.0   # log steps whose loss exceeds mean + this * std; 0: off
  # jax 0.10.2 CPU collectives can deadlock with several devices unless each step is synced.
  config.train.sync_every_step = "auto"  # "auto" (CPU with >1 device) | "always" | "never"

  # Sampling.
  # --mode eval (and the end of --mode all on shard data): generate on a held-out split and score it.
  config.eval = ml_collections.ConfigDict()
  config.eval.split = "test"
  config.eval.checkpoint_step = 0       # 0: the latest checkpoint
  config.eval.examples_per_dataset = 64  # the first N rows of each dataset in the split
  config.eval.datasets = ""             # comma list of datasets to evaluate; "" = all
  config.eval.tasks = "image_to_report,report_to_image,joint"
  config.eval.inception_weights = ""    # local .npz of FID InceptionV3 weights; "" = FID/IS unavailable
  config.eval.classifier_steps = 600    # the finding classifier (datasets with labels.jsonl)
  # Its seed, apart from config.seed: runs of several seeds are scored by the same classifier.
  config.eval.classifier_seed = 42
  config.eval.export_synthetic = "consistent"  # joint pairs as NAME.png + NAME.txt: "" | all | consistent
  # CheXbert's weights (chexbert.pth, or its tensors as .npz / .safetensors) and a folder with
  # bert-base-uncased's vocab.txt, both local: --mode eval then adds chexpert14_chexbert beside the
  # rule-based CheXpert-14 metrics (evaluation/chexbert.py). "": not used.
  config.eval.chexbert_checkpoint = ""
  config.eval.chexbert_tokenizer = ""
  config.eval.report_metrics = True     # BLEU/METEOR/ROUGE/CIDEr (needs the eval extra; java for COCO)

  config.sample = ml_collections.ConfigDict()
  # confidence (original, MaskGIT-style) | ancestral (MDLM) | adaptive: threshold (Fast-dLLM) |
  # margin | entropy_bound (EB-sampler), which reveal as many tokens a step as the model is sure of
  # and take the step counts below as a maximum.
  config.sample.strategy = "confidence"
  config.sample.text_steps = 128
  config.sample.image_steps = 128
  config.sample.reveal_schedule = "arccos"  # arccos (original) | cosine | linear
  config.sample.cfg_scale = 5.0
  config.sample.cfg_ramp = True         # w(t) = cfg_scale * (1 - t), as in the original
  config.sample.gumbel_scale = 10.0
  config.sample.image_gumbel_scale = -1.0  # >= 0: the image positions' own (< 0: gumbel_scale)
  config.sample.temperature = 1.0
  config.sample.time_input = "mask_ratio"  # mask_ratio | nominal (original)
  config.sample.final_t = 1e-5
  # Adaptive strategies: the drawn token's probability (threshold), top-1 minus top-2 probability
  # (margin), or the entropies revealed in one step summed, in nats (entropy_bound).
  config.sample.reveal_threshold = 0.9
  config.sample.early_exit = True       # end the loop once no row has a MASK left
  # K > 0: image->report / report->image reuse the given segment's keys/values, recomputed every K
  # steps (an approximation; K = 1 is exact). 0: no cache. See diffusion/sampler.py.
  config.sample.condition_cache_every = 0
  # > 1: draw that many samples per row and keep the one the model finds most likely given the
  # condition (diffusion/rerank.py); N times the sampling cost. 1: the sampler's draw as it is.
  config.sample.rerank_candidates = 1
  config.sample.rerank_tasks = "image_to_report,report_to_image,joint"  # the tasks it applies to
  # What it ranks by: "likelihood", log p(sample | condition), or "pmi", that minus log p(sample)
  # (one more pass with the condition masked: the sample the condition raises most).
  config.sample.rerank_score = "likelihood"
  config.sample.rerank_pmi_weight = 1.0  # pmi: log p(sample | condition) - w log p(sample)
  config.sample.tasks = "report_to_image,image_to_report,joint"
  config.sample.num_examples = 64       # per task, from the eval split
  config.sample.batch_size = 64
  config.sample.seed = 0
  config.sample.use_ema = True

  return config
