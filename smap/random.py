"""Random numbers drawn from a key held in a State.

Every draw splits the key of a :class:`RandomState` and writes the new key
back, so transforms see draws as ordinary state reads and writes. Inside a
mapping transform each lane gets its own key: lane ``i`` draws from lane ``i``
of ``jax.random.split(key, axis_size)``, and the state's key advances once per
call, whichever ``mapping_fn`` runs the lanes (:meth:`RandomState.lane_values`).

The module functions draw from :data:`DEFAULT`.

Example:
    >>> import smap
    >>> smap.random.seed(0)
    >>> a = smap.random.normal(size=3)
    >>> smap.random.seed(0)
    >>> bool((a == smap.random.normal(size=3)).all())
    True
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import _locks
from ._state import State, active_frames

__all__ = [
    "RandomState",
    "SharedRandomState",
    "DEFAULT",
    "seed",
    "split_key",
    "normal",
    "uniform",
    "bernoulli",
    "randint",
    "choice",
    "permutation",
    "truncated_normal",
    "categorical",
    "exponential",
    "gamma",
]

Size = int | Sequence[int] | None


class _Unseeded:
    """A seed waiting to become a key, so that importing smap starts no backend."""

    __slots__ = ("seed",)

    def __init__(self, seed: int):
        self.seed = seed

    def __repr__(self) -> str:
        return f"<key from seed {self.seed}>"


_SEEDS = 2**32  # an int seed is in [0, 2**32), as NumPy's: each gives its own key


def _int_seed(seed: Any) -> int:
    """``seed`` as an int in ``[0, 2**32)``, or a ``ValueError`` naming it and the range."""
    if isinstance(seed, bool) or not 0 <= seed < _SEEDS:
        raise ValueError(
            f"seed {seed!r} is out of range: an int seed is in [0, 2**32) (0 to {_SEEDS - 1}), "
            f"or pass a JAX key instead."
        )
    return int(seed)


def _as_key(seed_or_key: Any) -> jax.Array:
    if seed_or_key is None:
        seed_or_key = secrets.randbits(32)
    if isinstance(seed_or_key, (int, np.integer)):
        return jax.random.PRNGKey(_int_seed(seed_or_key))
    if not isinstance(seed_or_key, (jax.Array, np.ndarray)):
        raise TypeError(f"seed expects an int or a JAX PRNG key, got {type(seed_or_key).__name__} {seed_or_key!r}.")
    key = jnp.asarray(seed_or_key) if not isinstance(seed_or_key, jax.Array) else seed_or_key
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(key)
    if key.shape == () and jnp.issubdtype(key.dtype, jnp.integer):  # an int, traced (a step count) or not
        if isinstance(key, jax.core.Tracer):
            return jax.random.PRNGKey(key)
        return jax.random.PRNGKey(_int_seed(int(key)))
    default_shape = jax.eval_shape(lambda: jax.random.PRNGKey(0)).shape
    if key.dtype != jnp.uint32 or key.shape != default_shape:
        raise TypeError(
            f"seed expects an int or a JAX PRNG key (a typed key, or uint32{list(default_shape)}), "
            f"got an array of dtype {key.dtype} and shape {key.shape}."
        )
    return key


def _shape(what: str, size: Size, **params: Any) -> tuple[int, ...]:
    """The shape of a draw: ``size``, which the parameters must broadcast to, or theirs broadcast together."""
    shapes = {name: tuple(jnp.shape(p)) for name, p in params.items()}
    if size is None:
        try:
            return tuple(np.broadcast_shapes(*shapes.values()))
        except ValueError:
            listed = ", ".join(f"{name} has shape {shape}" for name, shape in shapes.items())
            raise ValueError(f"{what}: the parameters' shapes do not broadcast together: {listed}.") from None
    dims: Any = (size,) if isinstance(size, (int, np.integer)) else size
    try:
        dims = tuple(dims)
    except TypeError:
        dims = None
    if dims is None or not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 0 for d in dims):
        raise ValueError(f"size must be None, a non-negative int or a tuple of them, got {size!r}.")
    dims = tuple(int(d) for d in dims)
    for name, shape in shapes.items():
        if not _broadcasts_to(shape, dims):
            raise ValueError(
                f"{what}: {name} has shape {shape}, which does not broadcast to size {dims}; "
                f"give {name} a shape that broadcasts to {dims}, or size=None for {name}'s shape."
            )
    return dims


def _broadcasts_to(shape: tuple[int, ...], target: tuple[int, ...]) -> bool:
    """Whether an array of ``shape`` broadcasts to exactly ``target`` (NumPy's rule for ``size``)."""
    if len(shape) > len(target):
        return False
    return all(d in (1, t) for d, t in zip(shape[::-1], target[::-1]))


def _concrete(x: Any) -> np.ndarray | None:
    """``x``'s value when it is known now (a Python or NumPy value is read where it is); None when it
    is traced, in part (a list holding a tracer) or whole, or lies on other processes' devices."""
    for leaf in jax.tree_util.tree_leaves(x):
        if isinstance(leaf, jax.core.Tracer) or not getattr(leaf, "is_fully_addressable", True):
            return None
    return np.asarray(x)


def _check_known(sampler: str, rule: str, ok: Callable[..., np.ndarray], **parameters: Any) -> None:
    """A ``ValueError`` naming the first entry of ``parameters`` (broadcast) where ``ok`` is False, when
    all are known at the call; traced parameters are not checked (the samplers' docstrings say what
    they draw then)."""
    known = [k for k in map(_concrete, parameters.values()) if k is not None]
    if len(known) < len(parameters):
        return
    values = dict(zip(parameters, np.broadcast_arrays(*known)))
    bad = ~np.asarray(ok(**values), bool)
    if bad.any():
        at = _first(bad)
        named = [f"{name}={v[at]!s}" if len(values) > 1 else f"{v[at]!s}" for name, v in values.items()]
        raise ValueError(f"{sampler}: {rule}, got {' and '.join(named)}{_index(at)}.")


class RandomState(State):
    """A State holding a JAX PRNG key, with NumPy-style samplers.

    Arguments:
        seed_or_key: an int seed in ``[0, 2**32)``, a JAX key, or ``None`` for a fresh seed.

    Example:
        >>> import smap
        >>> rng = smap.random.RandomState(42)
        >>> rng.uniform(size=(2,)).shape
        (2,)
        >>> rng.randint(0, 10, size=3).dtype
        dtype('int32')
    """

    __slots__ = ()

    def __init__(self, seed_or_key: Any = None):
        if seed_or_key is None or isinstance(seed_or_key, (int, np.integer)):
            seed = secrets.randbits(32) if seed_or_key is None else _int_seed(seed_or_key)
            super().__init__(_Unseeded(seed))
        else:
            super().__init__(_as_key(seed_or_key))

    def _canonical(self, value: Any) -> Any:
        if type(value) is _Unseeded:
            return value
        return super()._canonical(value)

    def _stored(self) -> Any:
        if type(self._value) is _Unseeded:
            # Possibly inside a trace: the key must be a concrete value all the same.
            with jax.ensure_compile_time_eval():
                self._value = jax.random.PRNGKey(self._value.seed)
        return super()._stored()

    def __repr__(self) -> str:
        if type(self._value) is _Unseeded:
            return f"{type(self).__name__}(seed={self._value.seed})"
        return super().__repr__()

    def lane_values(self, value: Any, axis_size: int) -> tuple[Any, Any] | None:
        """Inside a mapping, lane ``i`` draws from ``split(key, axis_size)[i]``; see :meth:`smap.State.lane_values`.

        After a call whose lanes drew, the state holds ``split(key, axis_size + 1)[axis_size]``,
        a key that no lane used. A batch of keys (``state_in_axes`` selects it) is not split.

        Example:
            >>> import jax, smap
            >>> key = jax.random.PRNGKey(0)
            >>> lanes, after = smap.random.RandomState(0).lane_values(key, 4)
            >>> bool((lanes == jax.random.split(key, 4)).all()), lanes.shape
            (True, (4, 2))
        """
        leaves = jax.tree_util.tree_leaves(value)
        if len(leaves) != 1 or jnp.ndim(leaves[0]) != 1:
            return None
        key = leaves[0]
        config: Any = jax.config  # its flags are attributes that type checkers do not see
        if config.jax_threefry_partitionable and config.jax_default_prng_impl == "threefry2x32":
            # Then split(key, n + 1)[:n] == split(key, n): one split gives both.
            keys = jax.random.split(key, axis_size + 1)
            return keys[:axis_size], keys[axis_size]
        return jax.random.split(key, axis_size), jax.random.split(key, axis_size + 1)[axis_size]

    def seed(self, seed_or_key: Any = None) -> None:
        """Reset the key from an int seed or a JAX key (``None``: a fresh seed).

        An int seed is in ``[0, 2**32)``, as NumPy's, and each gives its own
        key; another int is a ``ValueError`` naming it and the range. Inside a
        transform the seed may be a traced int (as ``jax.random.key(step)``).

        Example:
            >>> import smap
            >>> rng = smap.random.RandomState()
            >>> rng.seed(1); a = rng.normal()
            >>> rng.seed(1); bool(a == rng.normal())
            True
        """
        self.value = _as_key(seed_or_key)

    def split_key(self, n: int | None = None) -> jax.Array:
        """One new key (``n=None``) or ``n`` keys stacked, advancing the state.

        Example:
            >>> import smap
            >>> smap.random.RandomState(0).split_key(4).shape
            (4, 2)
        """
        if n is not None and (not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 0):
            raise ValueError(f"split_key: n must be None or a non-negative int, got {n!r}.")
        return self._draw(lambda key: key if n is None else jax.random.split(key, n))

    def _draw(self, sample: Callable[[jax.Array], Any]) -> Any:
        """``sample(key)`` with a new key; the state's key advances only if it succeeds.

        Outside a transform the read, the draw and the write of the key are one
        step for other threads (inside one, the transform's call is that step).
        """
        lock = contextlib.nullcontext() if active_frames() else _locks.Holding(_locks.group_of(self))
        with lock:
            key, sub = jax.random.split(self.value)
            out = sample(sub)
            self.value = key
        return out

    def normal(self, loc: Any = 0.0, scale: Any = 1.0, size: Size = None, dtype: Any = None) -> jax.Array:
        """Normal draws with mean ``loc`` and standard deviation ``scale``.

        With ``size``, the parameters must broadcast to it (as in NumPy): a
        ``ValueError`` names the parameter, its shape and ``size``. Without
        it, the draws have the parameters' broadcast shape. The other
        samplers read ``size`` the same way. Parameters NumPy refuses (a
        negative ``scale``; ``high`` below ``low`` for ``uniform``) are a
        ``ValueError`` where they are known at the call, as in ``bernoulli``.

        Example:
            >>> import smap
            >>> smap.random.RandomState(0).normal([0.0, 10.0], 1.0).shape
            (2,)
        """
        _check_known("normal", "scale must not be negative", lambda scale: ~(scale < 0), scale=scale)
        loc, scale = jnp.asarray(loc), jnp.asarray(scale)
        dtype = dtype or jnp.result_type(loc, scale, float)
        shape = _shape("normal", size, loc=loc, scale=scale)
        return self._draw(lambda key: (loc + scale * jax.random.normal(key, shape, dtype)).astype(dtype))

    def uniform(self, low: Any = 0.0, high: Any = 1.0, size: Size = None, dtype: Any = None) -> jax.Array:
        """Uniform draws in ``[low, high)``.

        Example:
            >>> import smap
            >>> x = smap.random.RandomState(0).uniform(2.0, 3.0, size=100)
            >>> bool((x >= 2).all() and (x < 3).all())
            True
        """
        _check_known("uniform", "high must not be below low", lambda low, high: ~(high < low), low=low, high=high)
        low, high = jnp.asarray(low), jnp.asarray(high)
        dtype = dtype or jnp.result_type(low, high, float)
        shape = _shape("uniform", size, low=low, high=high)
        return self._draw(lambda key: jax.random.uniform(key, shape, dtype, minval=low, maxval=high))

    def bernoulli(self, p: Any = 0.5, size: Size = None) -> jax.Array:
        """Boolean draws that are ``True`` with probability ``p``.

        A ``p`` outside ``[0, 1]`` (or NaN) is a ``ValueError`` where it is
        known at the call; a traced ``p`` (inside ``smap.jit``, a mapping, or
        computed from traced values) is not checked: then ``p < 0`` and NaN
        draw ``False`` and ``p > 1`` draws ``True``.

        Example:
            >>> import smap
            >>> smap.random.RandomState(0).bernoulli(0.5, size=(2, 3)).dtype
            dtype('bool')
        """
        _check_known("bernoulli", "p must be in [0, 1]", lambda p: (p >= 0) & (p <= 1), p=p)
        p = jnp.asarray(p)
        shape = _shape("bernoulli", size, p=p)
        return self._draw(lambda key: jax.random.bernoulli(key, p, shape))

    def randint(self, low: Any, high: Any = None, size: Size = None, dtype: Any = int) -> jax.Array:
        """Integers in ``[low, high)``, or ``[0, low)`` when ``high`` is None.

        ``high <= low`` (an empty range) is a ``ValueError`` where both are
        known at the call; with traced bounds (inside ``smap.jit``, a
        mapping, or computed from traced values) it is not checked, and the
        draws are ``low``.

        Example:
            >>> import smap
            >>> x = smap.random.RandomState(0).randint(3, size=50)
            >>> int(x.min()) >= 0 and int(x.max()) < 3
            True
        """
        if high is None:
            low, high = 0, low
        _check_known("randint", "high must be greater than low", lambda low, high: high > low, low=low, high=high)
        low, high = jnp.asarray(low), jnp.asarray(high)
        shape = _shape("randint", size, low=low, high=high)
        return self._draw(lambda key: jax.random.randint(key, shape, low, high, dtype))

    def choice(self, a: Any, size: Size = None, replace: bool = True, p: Any = None) -> jax.Array:
        """Draws from the entries of ``a`` (or from ``arange(a)`` for an int).

        Example:
            >>> import smap
            >>> smap.random.RandomState(0).choice(5, size=5, replace=False).sort().tolist()
            [0, 1, 2, 3, 4]
        """
        a = a if isinstance(a, (int, np.integer)) else jnp.asarray(a)
        p = None if p is None else jnp.asarray(p)
        shape = _shape("choice", size)
        return self._draw(lambda key: jax.random.choice(key, a, shape, replace, p))

    def permutation(self, x: Any) -> jax.Array:
        """A random permutation of ``x`` (or of ``arange(x)`` for an int).

        Example:
            >>> import smap
            >>> sorted(smap.random.RandomState(0).permutation(4).tolist())
            [0, 1, 2, 3]
        """
        x = x if isinstance(x, (int, np.integer)) else jnp.asarray(x)
        return self._draw(lambda key: jax.random.permutation(key, x))

    def truncated_normal(
        self, lower: Any, upper: Any, size: Size = None, loc: Any = 0.0, scale: Any = 1.0, dtype: Any = None
    ) -> jax.Array:
        """Normal draws with mean ``loc`` and scale ``scale`` kept in ``[lower, upper]``.

        Example:
            >>> import smap
            >>> x = smap.random.RandomState(0).truncated_normal(-1.0, 1.0, size=100)
            >>> bool((abs(x) <= 1).all())
            True
        """
        _check_known("truncated_normal", "scale must be positive", lambda scale: ~(scale <= 0), scale=scale)
        _check_known(
            "truncated_normal",
            "upper must not be below lower",
            lambda lower, upper: ~(upper < lower),
            lower=lower,
            upper=upper,
        )
        lower, upper, loc, scale = map(jnp.asarray, (lower, upper, loc, scale))
        dtype = dtype or jnp.result_type(loc, scale, float)
        shape = _shape("truncated_normal", size, lower=lower, upper=upper, loc=loc, scale=scale)

        def sample(key: jax.Array) -> jax.Array:
            z = jax.random.truncated_normal(key, (lower - loc) / scale, (upper - loc) / scale, shape, dtype)
            return (loc + scale * z).astype(dtype)

        return self._draw(sample)

    def categorical(self, logits: Any, axis: int = -1, size: Size = None) -> jax.Array:
        """Indices along ``axis`` drawn with the probabilities ``softmax(logits)`` (``jax.random.categorical``).

        The draws have ``size``, to which the logits' shape without ``axis``
        must broadcast; None: that shape (one draw per distribution).

        Example:
            >>> import jax.numpy as jnp, smap
            >>> smap.random.RandomState(0).categorical(jnp.log(jnp.array([0.0, 1.0, 0.0])), size=3).tolist()
            [1, 1, 1]
        """
        logits = jnp.asarray(logits)
        if not -logits.ndim <= axis < logits.ndim:
            raise ValueError(f"categorical: axis {axis} is out of range for logits of shape {logits.shape}.")
        batch = logits.shape[: axis % logits.ndim] + logits.shape[axis % logits.ndim + 1 :]
        shape = _shape("categorical", size, **{"logits (without axis)": jax.ShapeDtypeStruct(batch, bool)})
        return self._draw(lambda key: jax.random.categorical(key, logits, axis, shape))

    def exponential(self, scale: Any = 1.0, size: Size = None, dtype: Any = None) -> jax.Array:
        """Exponential draws of mean ``scale``; a negative ``scale`` known at the call is a ``ValueError``.

        Example:
            >>> import smap
            >>> bool((smap.random.RandomState(0).exponential(2.0, size=100) >= 0).all())
            True
        """
        _check_known("exponential", "scale must not be negative", lambda scale: scale >= 0, scale=scale)
        scale = jnp.asarray(scale)
        dtype = dtype or jnp.result_type(scale, float)
        shape = _shape("exponential", size, scale=scale)
        return self._draw(lambda key: (scale * jax.random.exponential(key, shape, dtype)).astype(dtype))

    def gamma(self, shape: Any, scale: Any = 1.0, size: Size = None, dtype: Any = None) -> jax.Array:
        """Gamma draws of shape ``shape`` and scale ``scale`` (NumPy's parameters); a negative one known at
        the call is a ``ValueError``.

        Example:
            >>> import smap
            >>> smap.random.RandomState(0).gamma(2.0, 0.5, size=(2, 3)).shape
            (2, 3)
        """
        rule = "shape and scale must not be negative"
        _check_known("gamma", rule, lambda shape, scale: (shape >= 0) & (scale >= 0), shape=shape, scale=scale)
        a, scale = jnp.asarray(shape), jnp.asarray(scale)
        dtype = dtype or jnp.result_type(a, scale, float)
        dims = _shape("gamma", size, shape=a, scale=scale)
        return self._draw(lambda key: (scale * jax.random.gamma(key, a, dims, dtype)).astype(dtype))


RandomState.__module__ = "smap.random"


class SharedRandomState(RandomState):
    """A RandomState whose key the lanes of a mapping share: every lane draws the same numbers.

    Outside a mapping it is a :class:`RandomState`. Inside one its key is not
    split per lane (its :meth:`lane_values` is None): it is a shared state
    like any other, a draw is a lane-independent value, and the key advances
    once per draw, as outside a mapping, and is written back as it is. Use it
    for a value the lanes must agree on, such as the noise DP-SGD adds to the
    clipped sum of the gradients (docs/privacy.md). Selected by
    ``state_in_axes``, it is a batch of keys, one per lane, as any state.

    Example:
        >>> import jax.numpy as jnp, smap
        >>> noise = smap.random.SharedRandomState(0)
        >>> draws = smap.vmap(lambda x: x + noise.normal())(jnp.zeros(3))
        >>> bool((draws == draws[0]).all())
        True
    """

    __slots__ = ()

    def lane_values(self, value: Any, axis_size: int) -> None:
        """None: every lane reads the state's own key (see :meth:`smap.State.lane_values`).

        Example:
            >>> import jax, smap
            >>> print(smap.random.SharedRandomState(0).lane_values(jax.random.PRNGKey(0), 4))
            None
        """
        return None


SharedRandomState.__module__ = "smap.random"

DEFAULT = RandomState(0)
"""The RandomState that the module-level samplers draw from."""


def seed(seed_or_key: Any = None) -> None:
    """Reset :data:`DEFAULT` from an int seed in ``[0, 2**32)`` or a JAX key (``None``: a fresh seed).

    Example:
        >>> import smap
        >>> smap.random.seed(42)
    """
    DEFAULT.seed(seed_or_key)


def split_key(n: int | None = None) -> jax.Array:
    """:meth:`RandomState.split_key` on :data:`DEFAULT`.

    Example:
        >>> import smap
        >>> smap.random.split_key().shape
        (2,)
    """
    return DEFAULT.split_key(n)


def normal(loc: Any = 0.0, scale: Any = 1.0, size: Size = None, dtype: Any = None) -> jax.Array:
    """:meth:`RandomState.normal` on :data:`DEFAULT`.

    Example:
        >>> import smap
        >>> smap.random.normal(0.0, 2.0, size=(2, 2)).shape
        (2, 2)
    """
    return DEFAULT.normal(loc, scale, size, dtype)


def uniform(low: Any = 0.0, high: Any = 1.0, size: Size = None, dtype: Any = None) -> jax.Array:
    """:meth:`RandomState.uniform` on :data:`DEFAULT`.

    Example:
        >>> import smap
        >>> smap.random.uniform(size=3).shape
        (3,)
    """
    return DEFAULT.uniform(low, high, size, dtype)


def bernoulli(p: Any = 0.5, size: Size = None) -> jax.Array:
    """:meth:`RandomState.bernoulli` on :data:`DEFAULT`.

    Example:
        >>> import smap
        >>> smap.random.bernoulli(0.1, size=4).shape
        (4,)
    """
    return DEFAULT.bernoulli(p, size)


def _first(mask: np.ndarray) -> tuple[int, ...]:
    """The index of the first True entry of ``mask``."""
    return tuple(int(i) for i in np.argwhere(mask)[0])


def _index(at: tuple[int, ...]) -> str:
    return f" (at index {at})" if at else ""


def randint(low: Any, high: Any = None, size: Size = None, dtype: Any = int) -> jax.Array:
    """:meth:`RandomState.randint` on :data:`DEFAULT`.

    Example:
        >>> import smap
        >>> smap.random.randint(0, 5, size=2).shape
        (2,)
    """
    return DEFAULT.randint(low, high, size, dtype)


def choice(a: Any, size: Size = None, replace: bool = True, p: Any = None) -> jax.Array:
    """:meth:`RandomState.choice` on :data:`DEFAULT`.

    Example:
        >>> import smap
        >>> smap.random.choice(10, size=3).shape
        (3,)
    """
    return DEFAULT.choice(a, size, replace, p)


def permutation(x: Any) -> jax.Array:
    """:meth:`RandomState.permutation` on :data:`DEFAULT`.

    Example:
        >>> import smap
        >>> smap.random.permutation(3).shape
        (3,)
    """
    return DEFAULT.permutation(x)


def truncated_normal(
    lower: Any, upper: Any, size: Size = None, loc: Any = 0.0, scale: Any = 1.0, dtype: Any = None
) -> jax.Array:
    """:meth:`RandomState.truncated_normal` on :data:`DEFAULT`.

    Example:
        >>> import smap
        >>> smap.random.truncated_normal(-2.0, 2.0, size=2).shape
        (2,)
    """
    return DEFAULT.truncated_normal(lower, upper, size, loc, scale, dtype)


def categorical(logits: Any, axis: int = -1, size: Size = None) -> jax.Array:
    """:meth:`RandomState.categorical` on :data:`DEFAULT`.

    Example:
        >>> import jax.numpy as jnp, smap
        >>> smap.random.categorical(jnp.zeros((4, 3))).shape
        (4,)
    """
    return DEFAULT.categorical(logits, axis, size)


def exponential(scale: Any = 1.0, size: Size = None, dtype: Any = None) -> jax.Array:
    """:meth:`RandomState.exponential` on :data:`DEFAULT`.

    Example:
        >>> import smap
        >>> smap.random.exponential(size=2).shape
        (2,)
    """
    return DEFAULT.exponential(scale, size, dtype)


def gamma(shape: Any, scale: Any = 1.0, size: Size = None, dtype: Any = None) -> jax.Array:
    """:meth:`RandomState.gamma` on :data:`DEFAULT`.

    Example:
        >>> import smap
        >>> smap.random.gamma(3.0, size=2).shape
        (2,)
    """
    return DEFAULT.gamma(shape, scale, size, dtype)
