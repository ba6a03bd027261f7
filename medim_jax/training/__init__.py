"""Training: the MeDiM train step and loop (train.py), its optimizer (optimizer.py) and metrics
(metric_writer.py), checkpoints (checkpointing.py), what stops or guards a run (preemption.py,
loss_watch.py), and the VQ image tokenizer's own training (train_vq.py)."""
