"""Per-example clipping for differentially private training (DP-SGD).

DP-SGD bounds each example's influence on an update: the example's gradient
is scaled by :func:`clip_factor` of its norm, so that its norm is at most
``clip_norm``; the scaled gradients are summed over the lanes
(``jax.lax.psum``) and Gaussian noise of scale ``noise_multiplier *
clip_norm``, the same on every lane (:class:`smap.random.SharedRandomState`),
is added to the sum. docs/privacy.md writes the whole step; the accounting (which
noise multiplier gives which privacy budget) is left to libraries made for
it, such as ``dp_accounting`` and ``jax_privacy``.

Example:
    >>> import jax, jax.numpy as jnp, smap
    >>> def clipped(g):  # one example's gradient
    ...     factor = smap.privacy.clip_factor(jnp.sqrt(jnp.sum(g**2)), 1.0)
    ...     return jax.lax.psum(factor * g, "batch")
    >>> smap.vmap(clipped, axis_name="batch")(jnp.array([[3.0, 4.0], [0.3, 0.4]]))[0]
    Array([0.90000004, 1.2       ], dtype=float32)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["clip_factor"]


def clip_factor(norm: Any, clip_norm: Any) -> jax.Array:
    """The factor that scales a gradient of norm ``norm`` to a norm of at most ``clip_norm``.

    ``clip_norm / max(norm, clip_norm)``: 1 for a norm up to ``clip_norm``,
    ``clip_norm / norm`` above it. ``norm`` is a lane's gradient norm (a
    scalar, or an array of norms, say one per layer); the factor has its shape
    and float dtype.

    ``clip_norm`` must be a positive, finite number (or an array of them); a
    value known at the call (a Python number, a NumPy or concrete JAX array:
    pass it as a closure or a static argument) that is not is a ``ValueError``
    naming ``clip_norm`` and the value, and — raised while a transform traces
    — leaves every State as it was. A traced ``clip_norm`` is not checked.

    NaN and infinity are not special-cased: a NaN norm gives a NaN factor, an
    infinite norm a factor of 0. Either way a sum of factor × gradient over
    the lanes is NaN where that lane's gradient is NaN or infinite (0 × inf is
    NaN), exactly as when the per-example gradients are materialised, clipped
    and summed: a bad example shows in the update instead of vanishing from it.
    A zero factor could not remove it from the sum anyway.

    Arguments:
        norm: the gradient's norm, e.g. ``optax.global_norm(grads)``.
        clip_norm: the bound, positive and finite.

    Example:
        >>> import jax.numpy as jnp, smap
        >>> smap.privacy.clip_factor(jnp.array([0.5, 2.0, 4.0]), 1.0)
        Array([1.  , 0.5 , 0.25], dtype=float32)
        >>> smap.privacy.clip_factor(jnp.array(2.0), 0.0)
        Traceback (most recent call last):
        ...
        ValueError: clip_factor: clip_norm must be a positive, finite number, got 0.0.
    """
    _check(clip_norm)
    norm = jnp.asarray(norm)
    if not jnp.issubdtype(norm.dtype, jnp.floating):
        norm = norm.astype(jnp.result_type(float))
    return clip_norm / jnp.maximum(norm, clip_norm)


def _check(clip_norm: Any) -> None:
    """A ``ValueError`` if ``clip_norm`` is known now and is not positive and finite."""
    if isinstance(clip_norm, jax.core.Tracer) or not getattr(clip_norm, "is_fully_addressable", True):
        return
    try:
        value = np.asarray(clip_norm)
        numeric = value.dtype != bool and (
            np.issubdtype(value.dtype, np.floating) or np.issubdtype(value.dtype, np.integer)
        )
    except (TypeError, ValueError):
        numeric = False
    if not numeric:
        raise ValueError(f"clip_factor: clip_norm must be a positive, finite number, got {clip_norm!r}.")
    bad = ~(np.isfinite(value) & (value > 0))
    if bad.any():
        at = tuple(int(i) for i in np.argwhere(bad)[0])
        shown = f"{value}" if value.ndim == 0 else f"{value[at]} at index {at}"
        raise ValueError(f"clip_factor: clip_norm must be a positive, finite number, got {shown}.")
