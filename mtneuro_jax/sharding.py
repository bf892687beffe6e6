"""All device-mesh and sharding logic lives here (one ('data',) mesh, jit + NamedSharding).

Params and optimizer state are replicated; batches are split on their leading
axis over 'data'. Multi-host: each process feeds its process-local slice of the
global batch and ``shard_batch`` assembles the global array.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mtneuro_jax.errors import ConfigError

DATA_AXIS = "data"


def make_mesh(num_devices: int | None = None) -> Mesh:
  """A 1-D mesh over all (or the first ``num_devices``) global devices."""
  n = num_devices or jax.device_count()
  try:
    from jax.sharding import AxisType

    return jax.make_mesh((n,), (DATA_AXIS,), axis_types=(AxisType.Auto,), devices=jax.devices()[:n])
  except (ImportError, TypeError):  # older jax without axis_types
    return Mesh(np.asarray(jax.devices()[:n]), (DATA_AXIS,))


def data_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Places every leaf of ``tree`` replicated on the mesh."""
  return jax.device_put(tree, replicated_sharding(mesh))


def process_batch_size(global_batch_size: int, mesh: Mesh) -> int:
  """Per-process share of a global batch; it must split evenly over devices."""
  n = mesh.devices.size
  if global_batch_size % n:
    raise ConfigError(
      f"global batch size {global_batch_size} is not divisible by the "
      f"{n} devices of the mesh; pick a multiple of {n}"
    )
  return global_batch_size // jax.process_count()


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Process-local numpy batch -> global jax.Arrays sharded on the leading axis."""
  sharding = data_sharding(mesh)
  return {
    k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()
  }
