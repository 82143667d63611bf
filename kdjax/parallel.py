"""Device meshes for data parallelism."""
from __future__ import annotations

from typing import Sequence

import jax
import numpy as np

DATA_AXIS = "data"


def make_mesh(devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """A 1-D mesh over ``devices`` (default: all devices of all processes) with the single axis ``"data"``.

    The axis type is Auto, not the Explicit that ``jax.make_mesh`` now defaults to: with Auto, jit and shard_map
    accept unsharded inputs and let the compiler propagate shardings, which is what the data-parallel step expects.
    """
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("make_mesh needs at least one device; got an empty list")
    return jax.sharding.Mesh(np.asarray(devices), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,))
