"""The training loop, fit (epochs, checkpoints, resume), the run's runtime and processes."""
