"""Device meshes and the logical-axis rules that place parameters, state and batches on them."""
