"""MeDiM in JAX: unified medical image + report generation with masked discrete diffusion."""

from medim_jax import host_memory

# Before JAX starts its threads (see host_memory): XLA:CPU's per-call temporaries are reused
# instead of being page-faulted in again on every training step.
host_memory.keep_freed_memory()
