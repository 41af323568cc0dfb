"""A run end to end: its validated configuration, the training loop with evaluation and checkpoints,
crash-safe files, tracking (CSV and W&B) and sweeps."""
