"""PyTorch re-implementations of reference models (for weight-import tests and benchmarks)."""
