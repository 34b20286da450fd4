"""Official checkpoints (PyTorch files) -> ardiff_jax parameters, without PyTorch installed."""
