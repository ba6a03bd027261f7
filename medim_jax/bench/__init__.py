"""Benchmarks: training step against a PyTorch baseline, sampler against a per-step Python loop.

``python -m medim_jax.bench`` (from the repository root; bench/cli.py) measures, with warm-up and medians of
many timed runs:

- ``peak``: the matmul peak of the device (a large jitted ``jnp.dot``), so achieved FLOP/s reads as
  a fraction of what the hardware does. On a GPU MFU is taken against the card's dense bf16 peak
  (``--peak_tflops`` or ``KNOWN_PEAK_TFLOPS``); on a CPU against this measured peak.
- ``train``: our jitted training step (``train.Trainer``): step time, tokens/s, achieved TFLOP/s.
- ``torch``: the same model and step in PyTorch (``torch_twin``), alternating with ours round by
  round in this process, and the speed ratio JAX/PyTorch.
- ``sampler``: seconds per generated image+report pair (joint task, CFG) of our jitted sampler
  against a Python loop that calls the jitted model once per step, the original's way.

Shapes: ``demo`` (configs/demo.py), ``paper`` (configs/medim_liquid7b.py, an accelerator's job)
and ``paper_cpu`` (the paper's sequence, vocabulary and head size, fewer and narrower layers).
Model FLOPs count every matmul of the model (2 per multiply-add) with attention in full: it is
bidirectional, so QK^T and AV cover the whole sequence. A training step is 3x the forward pass.

XLA CPU flags are read from ``XLA_FLAGS`` as usual (set it on the command line to try some).
"""
