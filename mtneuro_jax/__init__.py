"""mtneuro-jax: the MTNeuro benchmark in JAX/Flax."""
