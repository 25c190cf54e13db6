"""Meshes over the available devices, and CPU device emulation."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from typing import Any

import jax
from jax.sharding import AxisType, Mesh

import smap

__all__ = ["make_mesh", "emulate_cpu_devices"]

_COUNT_FLAG = "--xla_force_host_platform_device_count"


def make_mesh(*, devices: Sequence[Any] | None = None, **axes: int) -> Mesh:
    """A mesh with the named axes, over all devices (or the ``devices`` given).

    The axes' sizes must multiply to the number of devices. Axes are of type
    ``Auto``: XLA places values freely around the mapped program.

    Arguments:
        devices: the devices to use; all of ``jax.devices()`` by default.
        **axes: axis name to size, in mesh order (``data=4, model=2``).

    Example:
        >>> import jax, sharding
        >>> mesh = sharding.make_mesh(data=jax.device_count())
        >>> mesh.axis_names
        ('data',)
    """
    if not axes:
        raise ValueError("make_mesh needs at least one axis, such as make_mesh(data=8).")
    for name, size in axes.items():
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"make_mesh: axis {name!r} must have a positive int size, got {size!r}.")
    devices = list(jax.devices() if devices is None else devices)
    repeated = sorted({str(d) for d in devices if devices.count(d) > 1})
    if repeated:
        raise ValueError(
            f"make_mesh: devices lists {', '.join(repeated)} more than once; a mesh holds each device once."
        )
    total = math.prod(axes.values())
    if total != len(devices):
        shape = ", ".join(f"{k}={v}" for k, v in axes.items())
        raise ValueError(
            f"make_mesh({shape}) needs {total} devices, but {len(devices)} are available. "
            f"Give axis sizes that multiply to {len(devices)}, pass devices=..., or emulate CPU "
            f"devices with sharding.emulate_cpu_devices(n) before JAX starts."
        )
    return jax.make_mesh(tuple(axes.values()), tuple(axes), axis_types=(AxisType.Auto,) * len(axes), devices=devices)


def emulate_cpu_devices(n: int) -> None:
    """Make JAX's CPU backend expose ``n`` devices; call before JAX starts.

    Sets ``--xla_force_host_platform_device_count`` in ``XLA_FLAGS``. After
    the backend has started, the device count is fixed: then this only
    checks that at least ``n`` CPU devices exist, and raises otherwise.

    Example:
        >>> import sharding
        >>> sharding.emulate_cpu_devices(8)   # before the first JAX computation
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"emulate_cpu_devices needs a positive int, got {n!r}.")
    if smap.devices.backend_started():
        have = len(jax.devices("cpu"))
        if have < n:
            raise RuntimeError(
                f"emulate_cpu_devices({n}): JAX has already started with {have} CPU device(s), and "
                f"the count cannot change in a running process. Call it before the first JAX "
                f"computation, or set XLA_FLAGS={_COUNT_FLAG}={n} before starting Python."
            )
        return
    flags = re.sub(rf"{_COUNT_FLAG}=\S+", "", os.environ.get("XLA_FLAGS", "")).split()
    os.environ["XLA_FLAGS"] = " ".join([*flags, f"{_COUNT_FLAG}={n}"])
