"""Random: seeding, every sampler's shapes, dtypes and values against jax.random."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import smap


def subkeys(seed, n):
    """The keys that n successive draws of a RandomState seeded with `seed` use."""
    key = jax.random.PRNGKey(seed) if isinstance(seed, int) else seed
    out = []
    for _ in range(n):
        key, sub = jax.random.split(key)
        out.append(sub)
    return out


def assert_equal(a, b):
    assert jnp.shape(a) == jnp.shape(b)
    assert jnp.result_type(a) == jnp.result_type(b)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# -- seeding -------------------------------------------------------------------


def test_seed_reproduces_draws():
    smap.random.seed(3)
    a = smap.random.normal(size=4)
    b = smap.random.normal(size=4)
    smap.random.seed(3)
    assert_equal(smap.random.normal(size=4), a)
    assert_equal(smap.random.normal(size=4), b)
    assert not np.array_equal(np.asarray(a), np.asarray(b))


def test_different_seeds_give_different_draws():
    smap.random.seed(1)
    a = smap.random.uniform(size=8)
    smap.random.seed(2)
    assert not np.array_equal(np.asarray(a), np.asarray(smap.random.uniform(size=8)))


def test_seeded_draws_match_jax_random(close):
    smap.random.seed(7)
    k1, k2 = subkeys(7, 2)
    close(smap.random.normal(size=3), jax.random.normal(k1, (3,)))
    close(smap.random.normal(size=3), jax.random.normal(k2, (3,)))


@pytest.mark.parametrize(
    "key",
    [lambda: jax.random.key(11), lambda: jax.random.PRNGKey(11), lambda: np.int64(11)],
    ids=["typed-key", "raw-key", "numpy-int"],
)
def test_seed_with_a_jax_key_equals_seed_with_the_int(key):
    smap.random.seed(11)
    expected = smap.random.normal(size=5)
    smap.random.seed(key())
    assert_equal(smap.random.normal(size=5), expected)


def test_seed_with_a_split_key_uses_that_key():
    key = jax.random.split(jax.random.PRNGKey(0))[1]
    smap.random.seed(key)
    (sub,) = subkeys(key, 1)
    assert_equal(smap.random.uniform(size=2), jax.random.uniform(sub, (2,)))


def test_seed_without_argument_picks_a_fresh_key():
    smap.random.seed()
    a = smap.random.split_key()
    smap.random.seed()
    b = smap.random.split_key()
    # Two fresh 32-bit seeds collide with probability 2**-32.
    assert not np.array_equal(np.asarray(a), np.asarray(b))


def test_seed_rejects_an_array_that_is_not_a_key():
    with pytest.raises(TypeError):
        smap.random.seed(jnp.zeros(2, jnp.float32))
    with pytest.raises(TypeError):
        smap.random.seed(jnp.zeros(3, jnp.uint32))


def test_a_random_state_created_in_smap_jit_draws_per_lane_in_a_mapping_inside(close):
    """Created by the outer trace and first read by the inner one, it gives lane i split(key, n)[i]."""

    def draws(x):
        rng = smap.random.RandomState(3)
        return smap.vmap(lambda y: y + rng.normal())(x)

    lanes = jax.random.split(jax.random.PRNGKey(3), 4)
    expected = jax.vmap(lambda k: jax.random.normal(jax.random.split(k)[1], ()))(lanes)
    close(smap.jit(draws)(jnp.zeros(4)), expected)
    close(draws(jnp.zeros(4)), expected)


def test_seed_takes_an_int_array_traced_or_not_as_jax_random_key_does(close):
    """A step count inside smap.jit, or each lane's index: the key is jax.random.PRNGKey of that int."""
    rng = smap.random.RandomState(0)

    def draw(i):
        rng.seed(i)
        return rng.normal(size=2)

    first = lambda i: jax.random.normal(subkeys(int(i), 1)[0], (2,))  # noqa: E731
    close(smap.jit(draw)(jnp.int32(5)), first(5))
    close(smap.vmap(draw)(jnp.arange(3)), jnp.stack([first(i) for i in range(3)]))
    close(draw(jnp.uint32(9)), first(9))  # concrete: checked as an int
    with pytest.raises(ValueError, match=r"seed -1 is out of range"):
        rng.seed(jnp.int32(-1))


@pytest.mark.parametrize("seed", [2**70, 2**32, -1, True])
def test_seed_out_of_range_names_the_seed_and_the_range(seed):
    smap.random.seed(3)
    before = np.asarray(smap.random.DEFAULT.value)
    words = rf"seed {seed!r} is out of range: an int seed is in \[0, 2\*\*32\) \(0 to 4294967295\)"
    with pytest.raises(ValueError, match=words):
        smap.random.seed(seed)
    with pytest.raises(ValueError, match=words):
        smap.random.DEFAULT.seed(seed)
    with pytest.raises(ValueError, match=words):
        smap.random.RandomState(seed)
    assert_equal(smap.random.DEFAULT.value, before)
    # The ends of the range are seeds, each with its own key (2**32 would have been 0's key).
    for ok in (0, 2**32 - 1, np.uint32(2**32 - 1)):
        smap.random.seed(ok)
        assert_equal(smap.random.DEFAULT.value, jax.random.PRNGKey(int(ok)))
    assert not np.array_equal(jax.random.PRNGKey(0), jax.random.PRNGKey(2**32 - 1))


def test_traced_bounds_are_not_checked_and_draw_as_documented():
    # Inside smap.jit the bounds are traced: an empty randint range draws low, and a
    # bernoulli p below 0 (or NaN) draws False, above 1 True (the docstrings say so).
    rng = smap.random.RandomState(0)
    (k1,) = subkeys(0, 1)
    ints = smap.jit(lambda low, high: rng.randint(low, high, size=4))(jnp.int32(5), jnp.int32(2))
    assert_equal(ints, jax.random.randint(k1, (4,), 5, 2))
    assert_equal(ints, jnp.full(4, 5, jnp.int32))
    bits = smap.jit(lambda p: rng.bernoulli(p, size=(3, 2)))(jnp.array([-0.5, 1.5]))
    assert_equal(bits, jnp.tile(jnp.array([False, True]), (3, 1)))
    assert_equal(smap.jit(lambda p: rng.bernoulli(p, size=3))(jnp.float32(jnp.nan)), jnp.zeros(3, bool))
    assert_equal(rng.value, subkeys_after(0, 3))  # three draws, each advanced the key once


def subkeys_after(seed, n):
    """The key a RandomState seeded with `seed` holds after n draws."""
    key = jax.random.PRNGKey(seed)
    for _ in range(n):
        key, _ = jax.random.split(key)
    return key


def test_state_holds_the_advanced_key():
    rng = smap.random.RandomState(4)
    rng.normal()
    expected, _ = jax.random.split(jax.random.PRNGKey(4))
    assert_equal(rng.value, expected)


def test_random_state_is_a_state():
    assert isinstance(smap.random.DEFAULT, smap.random.RandomState)
    assert isinstance(smap.random.DEFAULT, smap.State)
    assert repr(smap.random.RandomState) == "<class 'smap.random.RandomState'>"


# -- RandomState instances -----------------------------------------------------


def test_random_state_from_int_and_from_key_agree():
    a = smap.random.RandomState(5).normal(size=3)
    b = smap.random.RandomState(jax.random.key(5)).normal(size=3)
    c = smap.random.RandomState(jax.random.PRNGKey(5)).normal(size=3)
    assert_equal(a, b)
    assert_equal(a, c)


def test_random_state_method_seed():
    rng = smap.random.RandomState(0)
    rng.seed(9)
    (sub,) = subkeys(9, 1)
    assert_equal(rng.uniform(size=3), jax.random.uniform(sub, (3,)))


def test_random_state_is_independent_of_default():
    smap.random.seed(0)
    default_key = smap.random.DEFAULT.value
    rng = smap.random.RandomState(0)
    # Drawing from rng does not advance DEFAULT...
    first = rng.normal(size=2)
    rng.normal(size=2)
    assert_equal(smap.random.DEFAULT.value, default_key)
    # ...and DEFAULT seeded the same way draws the same first numbers.
    assert_equal(smap.random.normal(size=2), first)
    # Drawing from DEFAULT does not advance rng.
    rng_key = rng.value
    smap.random.normal(size=2)
    assert_equal(rng.value, rng_key)


def test_two_random_states_are_independent():
    a, b = smap.random.RandomState(1), smap.random.RandomState(1)
    x = a.normal(size=2)
    a.normal(size=2)
    assert_equal(b.normal(size=2), x)


def test_unseeded_random_states_differ():
    a, b = smap.random.RandomState(), smap.random.RandomState()
    assert not np.array_equal(np.asarray(a.split_key()), np.asarray(b.split_key()))


def test_draws_inside_smap_jit_advance_the_key(close):
    rng = smap.random.RandomState(jax.random.PRNGKey(2))
    draw = smap.jit(lambda: rng.normal(size=3))
    k1, k2, k3 = subkeys(2, 3)
    close(draw(), jax.random.normal(k1, (3,)))
    close(draw(), jax.random.normal(k2, (3,)))
    # Outside the jit the same state continues the same sequence.
    close(rng.normal(size=3), jax.random.normal(k3, (3,)))


def test_int_seeded_random_state_first_used_inside_smap_jit(close):
    rng = smap.random.RandomState(2)
    draw = smap.jit(lambda: rng.normal(size=3))
    k1, k2, k3 = subkeys(2, 3)
    close(draw(), jax.random.normal(k1, (3,)))
    close(draw(), jax.random.normal(k2, (3,)))
    # Outside the jit the same state continues the same sequence.
    close(rng.normal(size=3), jax.random.normal(k3, (3,)))


@pytest.mark.parametrize("transform", [smap.jit, smap.vmap])
def test_an_int_seeded_random_state_created_inside_a_transform_draws_from_its_seed(transform, close):
    """Created in the traced function (a generator per call, say) it draws as jax.random does from the
    seed's key, in every lane; it was refused before ("unexpected PRNG key type")."""
    k1, k2 = subkeys(7, 2)

    def draw(x):
        rng = smap.random.RandomState(7)
        return x + rng.normal(size=2) + rng.uniform(size=2)

    expected = jax.random.normal(k1, (2,)) + jax.random.uniform(k2, (2,))
    x = jnp.zeros((3, 2)) if transform is smap.vmap else jnp.zeros(2)
    close(transform(draw)(x), jnp.broadcast_to(expected, x.shape))


# -- samplers: shapes ----------------------------------------------------------

SIZES = [(None, ()), (3, (3,)), ((2, 3), (2, 3))]


@pytest.mark.parametrize("size, shape", SIZES)
@pytest.mark.parametrize(
    "draw",
    [
        lambda size: smap.random.normal(size=size),
        lambda size: smap.random.uniform(size=size),
        lambda size: smap.random.bernoulli(0.3, size=size),
        lambda size: smap.random.randint(0, 5, size=size),
        lambda size: smap.random.choice(5, size=size),
        lambda size: smap.random.truncated_normal(-1.0, 1.0, size=size),
        lambda size: smap.random.categorical(jnp.zeros(4), size=size),
        lambda size: smap.random.exponential(size=size),
        lambda size: smap.random.gamma(2.0, size=size),
    ],
    ids=[
        "normal",
        "uniform",
        "bernoulli",
        "randint",
        "choice",
        "truncated_normal",
        "categorical",
        "exponential",
        "gamma",
    ],
)
def test_sizes(draw, size, shape):
    assert draw(size).shape == shape


@pytest.mark.parametrize(
    "draw, shape",
    [
        (lambda: smap.random.normal([[0.0], [1.0]], [1.0, 2.0, 3.0]), (2, 3)),
        (lambda: smap.random.normal(jnp.zeros((4, 1)), 1.0), (4, 1)),
        (lambda: smap.random.uniform([0.0, 1.0], 2.0), (2,)),
        (lambda: smap.random.uniform(np.zeros((3, 1)), np.ones(2) * 5), (3, 2)),
        (lambda: smap.random.bernoulli([0.1, 0.5, 0.9]), (3,)),
        (lambda: smap.random.randint([0, 10], [[15], [20], [30]]), (3, 2)),
        (lambda: smap.random.truncated_normal([-1.0, -2.0], 2.0), (2,)),
        (lambda: smap.random.truncated_normal(-1.0, 1.0, loc=jnp.zeros((2, 2))), (2, 2)),
    ],
)
def test_size_none_is_the_broadcast_shape_of_the_parameters(draw, shape):
    assert draw().shape == shape


def test_size_as_list_numpy_int_or_empty_tuple():
    assert smap.random.normal(size=[4]).shape == (4,)
    assert smap.random.uniform(size=np.int64(2)).shape == (2,)
    assert smap.random.randint(0, 3, size=()).shape == ()


def test_parameters_broadcast_against_size():
    assert smap.random.normal([0.0, 10.0, 20.0], 1.0, size=(4, 3)).shape == (4, 3)
    assert smap.random.uniform([0.0, 1.0], 2.0, size=(5, 2)).shape == (5, 2)
    assert smap.random.bernoulli([0.1, 0.9], size=(3, 2)).shape == (3, 2)


@pytest.mark.parametrize(
    "draw, dtype",
    [
        (lambda: smap.random.normal(size=2), jnp.float32),
        (lambda: smap.random.normal(size=2, dtype=jnp.float16), jnp.float16),
        (lambda: smap.random.normal(size=2, dtype=np.dtype("float16")), jnp.float16),
        (lambda: smap.random.normal(1, 2, size=2), jnp.float32),
        (lambda: smap.random.uniform(size=2, dtype=jnp.bfloat16), jnp.bfloat16),
        (lambda: smap.random.uniform(size=2), jnp.float32),
        (lambda: smap.random.bernoulli(0.5, size=2), jnp.bool_),
        (lambda: smap.random.randint(0, 3, size=2), jnp.int32),
        (lambda: smap.random.randint(0, 3, size=2, dtype=jnp.int8), jnp.int8),
        (lambda: smap.random.randint(0, 3, size=2, dtype=np.uint8), jnp.uint8),
        (lambda: smap.random.truncated_normal(-1.0, 1.0, size=2, dtype=jnp.float16), jnp.float16),
        (lambda: smap.random.split_key(), jnp.uint32),
    ],
)
def test_dtypes(draw, dtype):
    assert draw().dtype == dtype


# -- samplers: values against jax.random ---------------------------------------


def test_normal_values(close):
    loc, scale = jnp.array([0.0, 10.0, -5.0]), jnp.array([[1.0], [0.5]])
    k1, k2, k3 = subkeys(0, 3)
    close(smap.random.normal(size=(2, 2)), jax.random.normal(k1, (2, 2)))
    close(smap.random.normal([0.0, 10.0, -5.0], [[1.0], [0.5]]), loc + scale * jax.random.normal(k2, (2, 3)))
    close(smap.random.normal(3.0, 2.0, size=4), 3.0 + 2.0 * jax.random.normal(k3, (4,)))


def test_uniform_values(close):
    k1, k2 = subkeys(0, 2)
    close(smap.random.uniform(size=3), jax.random.uniform(k1, (3,)))
    low, high = jnp.array([0.0, 1.0]), jnp.array([[2.0], [10.0]])
    close(
        smap.random.uniform([0.0, 1.0], [[2.0], [10.0]]),
        jax.random.uniform(k2, (2, 2), minval=low, maxval=high),
    )


def test_categorical_exponential_and_gamma_values(close):
    """As jax.random draws them from the same keys; NumPy's parameters (gamma's shape and scale)."""
    k1, k2, k3, k4 = subkeys(0, 4)
    logits = jnp.log(jnp.array([[0.2, 0.3, 0.5], [0.6, 0.3, 0.1]]))
    assert_equal(smap.random.categorical(logits), jax.random.categorical(k1, logits, -1, (2,)))
    assert_equal(
        smap.random.categorical(logits.T, axis=0, size=(4, 2)), jax.random.categorical(k2, logits.T, 0, (4, 2))
    )
    close(smap.random.exponential([1.0, 3.0]), jnp.array([1.0, 3.0]) * jax.random.exponential(k3, (2,)))
    close(smap.random.gamma(2.0, 0.5, size=(2, 2)), 0.5 * jax.random.gamma(k4, 2.0, (2, 2)))
    for bad, words in [
        (lambda: smap.random.exponential(-1.0), "exponential: scale must not be negative, got -1.0"),
        (lambda: smap.random.gamma([1.0, -2.0]), r"gamma: shape and scale must not be negative, got shape=-2.0"),
        (lambda: smap.random.categorical(logits, axis=2), r"categorical: axis 2 is out of range"),
    ]:
        with pytest.raises(ValueError, match=words):
            bad()


def test_bernoulli_values():
    k1, k2 = subkeys(0, 2)
    assert_equal(smap.random.bernoulli(0.3, size=(2, 3)), jax.random.bernoulli(k1, 0.3, (2, 3)))
    p = jnp.array([0.0, 1.0, 0.5])
    drawn = smap.random.bernoulli([0.0, 1.0, 0.5])
    assert_equal(drawn, jax.random.bernoulli(k2, p, (3,)))
    assert not bool(drawn[0]) and bool(drawn[1])


def test_randint_values():
    k1, k2, k3 = subkeys(0, 3)
    assert_equal(smap.random.randint(0, 10, size=5), jax.random.randint(k1, (5,), 0, 10))
    # A single bound is the exclusive upper bound, as in NumPy.
    assert_equal(smap.random.randint(4, size=6), jax.random.randint(k2, (6,), 0, 4))
    low, high = jnp.array([0, 100]), jnp.array([[150], [200]])
    assert_equal(smap.random.randint([0, 100], [[150], [200]]), jax.random.randint(k3, (2, 2), low, high))


def test_split_key_values():
    k1, k2 = subkeys(0, 2)
    assert_equal(smap.random.split_key(), k1)
    many = smap.random.split_key(4)
    assert_equal(many, jax.random.split(k2, 4))
    assert many.shape == (4, 2)


def test_choice_values():
    k1, k2, k3 = subkeys(0, 3)
    assert_equal(smap.random.choice(10, size=3), jax.random.choice(k1, 10, (3,)))
    a = jnp.array([5.0, 6.0, 7.0, 8.0])
    assert_equal(smap.random.choice(a, size=(2, 2)), jax.random.choice(k2, a, (2, 2)))
    p = jnp.array([0.0, 0.0, 1.0, 0.0])
    drawn = smap.random.choice(a, size=4, p=p)
    assert_equal(drawn, jax.random.choice(k3, a, (4,), p=p))
    np.testing.assert_array_equal(np.asarray(drawn), np.full(4, 7.0))


def test_choice_without_replacement():
    (k1,) = subkeys(0, 1)
    drawn = smap.random.choice(6, size=6, replace=False)
    assert_equal(drawn, jax.random.choice(k1, 6, (6,), replace=False))
    assert sorted(drawn.tolist()) == list(range(6))


def test_permutation_values():
    k1, k2 = subkeys(0, 2)
    assert_equal(smap.random.permutation(5), jax.random.permutation(k1, 5))
    x = jnp.arange(12.0).reshape(4, 3)
    permuted = smap.random.permutation(x)
    assert_equal(permuted, jax.random.permutation(k2, x))
    # Rows are permuted, not mixed.
    assert sorted(map(tuple, np.asarray(permuted).tolist())) == sorted(map(tuple, np.asarray(x).tolist()))


LIST_BUG = "smap bug: {} rejects a list parameter (NumPy accepts lists; the contract allows them)"


def test_choice_accepts_lists():
    k1, k2 = subkeys(0, 2)
    assert_equal(smap.random.choice([5, 6, 7], size=2), jax.random.choice(k1, jnp.array([5, 6, 7]), (2,)))
    p = jnp.array([0.0, 1.0, 0.0])
    assert_equal(smap.random.choice(3, size=4, p=[0.0, 1.0, 0.0]), jax.random.choice(k2, 3, (4,), p=p))


def test_permutation_accepts_lists():
    (k1,) = subkeys(0, 1)
    assert_equal(smap.random.permutation([1, 2, 3]), jax.random.permutation(k1, jnp.array([1, 2, 3])))


def test_truncated_normal_values(close):
    k1, k2 = subkeys(0, 2)
    close(smap.random.truncated_normal(-1.0, 2.0, size=3), jax.random.truncated_normal(k1, -1.0, 2.0, (3,)))
    loc, scale = 1.0, 2.0
    lower, upper = jnp.array([-1.0, 0.0]), 3.0
    expected = loc + scale * jax.random.truncated_normal(k2, (lower - loc) / scale, (upper - loc) / scale, (2,))
    close(smap.random.truncated_normal([-1.0, 0.0], 3.0, loc=loc, scale=scale), expected)


def test_truncated_normal_values_lie_in_range():
    x = smap.random.truncated_normal(0.5, 1.5, size=200, loc=1.0, scale=3.0)
    assert float(x.min()) >= 0.5 and float(x.max()) <= 1.5


def test_random_state_methods_match_module_functions():
    rng = smap.random.RandomState(0)
    smap.random.seed(0)
    for name, args in [
        ("normal", (0.0, 1.0, 3)),
        ("uniform", (0.0, 1.0, 3)),
        ("bernoulli", (0.5, 3)),
        ("randint", (0, 9, 3)),
        ("choice", (7, 3)),
        ("permutation", (6,)),
        ("truncated_normal", (-1.0, 1.0, 3)),
        ("categorical", (jnp.zeros((2, 5)), -1, (3, 2))),
        ("exponential", (2.0, 3)),
        ("gamma", (2.0, 0.5, 3)),
        ("split_key", (2,)),
    ]:
        assert_equal(getattr(rng, name)(*args), getattr(smap.random, name)(*args))


# -- importing smap starts no backend ------------------------------------------


def _run_python(code):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_importing_smap_starts_no_jax_backend():
    out = _run_python(
        "import sys, smap\n"
        "from jax._src import xla_bridge\n"
        "print(len(xla_bridge._backends), 'sharding' in sys.modules)\n"
    )
    # No backend, and the sharding layer is not imported either.
    assert out == "0 False"


def test_xla_flags_set_after_importing_smap_take_effect():
    out = _run_python(
        "import os, smap\n"
        "os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=3'\n"
        "import jax\n"
        "print(jax.device_count())\n"
    )
    assert out == "3"


# -- a failed draw leaves the key as it was ------------------------------------

FAILING_DRAWS = {
    "uniform with an int dtype": (lambda r: r.uniform(0, 1, size=3, dtype=jnp.int32), "dtype"),
    "normal with size=-1": (lambda r: r.normal(size=-1), "size"),
    "normal with size=2.5": (lambda r: r.normal(size=2.5), "size"),
    "bernoulli with size=(2, -3)": (lambda r: r.bernoulli(0.5, size=(2, -3)), "size"),
    "normal with parameters that do not broadcast": (lambda r: r.normal(jnp.zeros(2), jnp.ones(3)), "shapes"),
    "normal with a size that loc does not broadcast to": (
        lambda r: r.normal(jnp.zeros(2), size=3),
        r"normal: loc has shape \(2,\), which does not broadcast to size \(3,\)",
    ),
    "normal with a size smaller than loc's shape": (
        lambda r: r.normal(size=(2, 1), loc=jnp.zeros(3)),
        r"normal: loc has shape \(3,\), which does not broadcast to size \(2, 1\)",
    ),
    "normal with a size that scale does not broadcast to": (
        lambda r: r.normal(0.0, jnp.ones((4, 2)), size=(4, 3)),
        r"normal: scale has shape \(4, 2\), which does not broadcast to size \(4, 3\)",
    ),
    "truncated_normal with a size the bounds do not broadcast to": (
        lambda r: r.truncated_normal(jnp.zeros(2), 1.0, size=3),
        r"truncated_normal: lower has shape \(2,\), which does not broadcast to size \(3,\)",
    ),
    "randint with high equal to low": (
        lambda r: r.randint(5, 5),
        r"randint: high must be greater than low, got low=5 and high=5\.",
    ),
    "randint with high below low": (lambda r: r.randint(5, 2, size=3), r"got low=5 and high=2\."),
    "randint with one empty range among arrays": (
        lambda r: r.randint(jnp.array([0, 3]), jnp.array([2, 3])),
        r"got low=3 and high=3 \(at index \(1,\)\)",
    ),
    "randint with a single bound of 0": (lambda r: r.randint(0), r"got low=0 and high=0"),
    "bernoulli with p above 1": (lambda r: r.bernoulli(1.5), r"bernoulli: p must be in \[0, 1\], got 1\.5\."),
    "bernoulli with a negative p among several": (
        lambda r: r.bernoulli(np.array([0.5, -0.25]), size=(3, 2)),
        r"got -0\.25 \(at index \(1,\)\)",
    ),
    "bernoulli with p NaN": (lambda r: r.bernoulli(float("nan")), r"p must be in \[0, 1\], got nan"),
    "choice of 5 from 3 without replacement": (lambda r: r.choice(3, size=5, replace=False), "larger sample"),
    "choice with p of the wrong length": (lambda r: r.choice(3, p=[0.5, 0.5]), "p "),
    "randint with a float dtype": (lambda r: r.randint(0, 3, size=2, dtype=jnp.float32), "dtype"),
    "split_key with n=-1": (lambda r: r.split_key(-1), "n must be"),
    # where NumPy's Generator raises, with the value at fault
    "normal with a negative scale": (
        lambda r: r.normal(0.0, np.array([1.0, -2.0])),
        r"normal: scale must not be negative, got -2\.0 \(at index \(1,\)\)\.",
    ),
    "uniform with high below low": (
        lambda r: r.uniform(2.0, 1.0, size=3),
        r"uniform: high must not be below low, got low=2\.0 and high=1\.0\.",
    ),
    "truncated_normal with a scale of 0": (
        lambda r: r.truncated_normal(-1.0, 1.0, scale=0.0),
        r"truncated_normal: scale must be positive, got 0\.0\.",
    ),
    "truncated_normal with upper below lower": (
        lambda r: r.truncated_normal(1.0, -1.0),
        r"upper must not be below lower, got lower=1\.0 and upper=-1\.0\.",
    ),
}


@pytest.mark.parametrize("name", list(FAILING_DRAWS))
def test_failed_draw_leaves_the_key_unchanged(name):
    draw, words = FAILING_DRAWS[name]
    rng = smap.random.RandomState(5)
    before = np.asarray(rng.value)
    with pytest.raises((ValueError, TypeError), match=words):
        draw(rng)
    np.testing.assert_array_equal(np.asarray(rng.value), before)
    # The next draw is the first one the seed gives.
    assert_equal(rng.split_key(), subkeys(5, 1)[0])


@pytest.mark.parametrize("name", ["normal with size=-1", "choice of 5 from 3 without replacement"])
def test_failed_module_level_draw_leaves_default_unchanged(name):
    draw, words = FAILING_DRAWS[name]
    module = type("Module", (), {n: staticmethod(getattr(smap.random, n)) for n in ("normal", "choice")})
    smap.random.seed(11)
    before = np.asarray(smap.random.DEFAULT.value)
    with pytest.raises((ValueError, TypeError), match=words):
        draw(module)
    np.testing.assert_array_equal(np.asarray(smap.random.DEFAULT.value), before)
    assert_equal(smap.random.split_key(), subkeys(11, 1)[0])


@pytest.mark.parametrize("bad", ["abc", 1.5, [1, 2]])
def test_seed_names_what_it_expects(bad):
    rng = smap.random.RandomState(2)
    before = np.asarray(rng.value)
    with pytest.raises(TypeError, match=r"seed expects an int or a JAX PRNG key, got (str|float|list)"):
        rng.seed(bad)
    np.testing.assert_array_equal(np.asarray(rng.value), before)
    with pytest.raises(TypeError, match="seed expects"):
        smap.random.seed(bad)


# -- a random state the lanes share ------------------------------------------------


def _shared_draw_mappings():
    import sharding

    mesh = sharding.make_mesh(data=8)
    return {
        "vmap": {},
        "pmap-4": {"mapping_fn": jax.pmap, "mapping_kwargs": {"devices": jax.devices()[:4]}},
        "shard_map-8": {"mapping_fn": sharding.shard_map(mesh, axis="data")},
    }


@pytest.mark.parametrize("mapping", ["vmap", "pmap-4", "shard_map-8"])
def test_a_shared_random_state_gives_every_lane_the_draws_made_outside_a_mapping(mapping):
    lanes = 8 if mapping != "pmap-4" else 4
    noise = smap.random.SharedRandomState(9)

    def add_noise(x):
        return x + noise.normal(0.0, 2.0, size=3), noise.uniform()

    m = smap.StatefulMapping(add_noise, **_shared_draw_mappings()[mapping])
    xs = jnp.arange(lanes, dtype=jnp.float32)[:, None] * jnp.ones(3)
    got, uniforms = m(xs)
    k1, k2 = subkeys(9, 2)
    expected = 2.0 * jax.random.normal(k1, (3,))
    np.testing.assert_allclose(np.asarray(got), np.asarray(xs + expected), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(uniforms), np.full(lanes, jax.random.uniform(k2, ())))
    # The key advanced as two draws outside a mapping advance it, and was written back unbatched.
    outside = smap.random.SharedRandomState(9)
    outside.normal(size=3), outside.uniform()
    assert_equal(noise.value, outside.value)


def test_a_shared_random_state_selected_by_state_in_axes_is_a_batch_of_keys():
    keys = jax.random.split(jax.random.PRNGKey(4), 3)
    noise = smap.random.SharedRandomState(keys[0])
    noise.reset(keys)  # a batch of keys, as a state split by state_in_axes holds
    draws = smap.vmap(lambda: noise.normal(), axis_size=3, in_axes=(), state_in_axes={0: noise})()
    expected = [jax.random.normal(jax.random.split(k)[1], ()) for k in keys]
    np.testing.assert_allclose(np.asarray(draws), np.asarray(expected), rtol=1e-6)
    assert noise.value.shape == (3, 2)


def test_a_shared_random_state_reports_its_type():
    assert repr(smap.random.SharedRandomState(1)) == "SharedRandomState(seed=1)"
    assert str(smap.random.SharedRandomState) == "<class 'smap.random.SharedRandomState'>"
    assert isinstance(smap.random.SharedRandomState(1), smap.random.RandomState)
