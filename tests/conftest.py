"""Test setup: 8 fake CPU devices for sharded code (must be set before jax imports)."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
