"""A shared state written per lane that state_out_axes does not select: the
unexpected-write policy, and a second identical call that succeeds the same way.

Under 'ignore' and 'warn' the first call writes the state back with the lane
axis at 0; the mapping's later calls then map it along axis 0 while it has
that shape. The reference is plain ``jax.vmap`` with the state passed
explicitly: shared (``in_axes=None``) on the first call, mapped along 0 after.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import smap


def values(*states):
    return [np.asarray(s.value) for s in states]


def test_a_scalar_written_per_lane_keeps_its_shape_on_the_next_calls(close):
    total = smap.LongTermState(jnp.asarray(0.0))

    def step(x):
        total.value = x * 2.0
        return x + 1.0

    def lane(s, x):  # the same program with the state passed explicitly
        return x + 1.0, x * 2.0

    mapped = smap.vmap(step)  # default policy: 'ignore'
    xs = jnp.arange(4.0)
    out = mapped(xs)
    ref_out, ref_state = jax.vmap(lane, in_axes=(None, 0))(jnp.asarray(0.0), xs)
    close((out, total.value), (ref_out, ref_state))
    assert total.value.shape == (4,)
    # The second identical call succeeds, and the state keeps shape (4,).
    out = mapped(xs)
    ref_out, ref_state = jax.vmap(lane, in_axes=(0, 0))(ref_state, xs)
    close((out, total.value), (ref_out, ref_state))
    assert total.value.shape == (4,)


def test_a_state_read_and_written_per_lane_carries_each_lanes_value_forward(close):
    total = smap.LongTermState(jnp.array([1.0, 2.0]))

    def step(x):
        total.value = total.value + x
        return (total.value * x).sum()

    def lane(s, x):
        new = s + x
        return (new * x).sum(), new

    mapped = smap.vmap(step)
    xs = jnp.array([1.0, -2.0, 0.5])
    expected_state = total.value
    for call in range(3):
        out = mapped(xs)
        ref_out, expected_state = jax.vmap(lane, in_axes=(None if call == 0 else 0, 0))(expected_state, xs)
        close((out, total.value), (ref_out, expected_state))
        assert total.value.shape == (3, 2)  # never (3, 3, 2): one value per lane, not a growing stack
    close(total.value, jnp.array([1.0, 2.0]) + 3 * xs[:, None])


def test_warn_warns_on_the_call_that_adds_the_lane_axis_only(close):
    total = smap.LongTermState(jnp.asarray(1.0))

    def step(x):
        total.value = total.value * x
        return x

    mapped = smap.vmap(step, unexpected_out_state_mapping="warn")
    xs = jnp.array([2.0, 3.0, 4.0])
    with pytest.warns(UserWarning, match=r"LongTermState float32\[\] is shared .* later calls map it along that axis"):
        mapped(xs)
    close(total.value, xs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the state is now mapped: nothing unexpected
        mapped(xs)
    close(total.value, xs * xs)


def test_raise_refuses_every_call_the_same_way():
    total = smap.LongTermState(jnp.asarray(0.0))

    def step(x):
        total.value = total.value + x
        return x

    mapped = smap.vmap(step, unexpected_out_state_mapping="raise")
    for _ in range(2):
        with pytest.raises(smap.BatchAxisError, match=r"LongTermState float32\[\] is shared by the lanes"):
            mapped(jnp.arange(4.0))
        np.testing.assert_array_equal(total.value, 0.0)
        assert total.value.shape == ()


def test_a_state_reset_to_its_old_shape_is_shared_again(close):
    total = smap.LongTermState(jnp.asarray(0.0))

    def step(x):
        total.value = total.value + x
        return x

    mapped = smap.vmap(step)
    xs = jnp.arange(4.0)
    mapped(xs)
    close(total.value, xs)
    total.reset(jnp.asarray(10.0))  # one shared value again: the first call's rule applies
    mapped(xs)
    close(total.value, 10.0 + xs)
    mapped(xs)
    close(total.value, 10.0 + 2 * xs)


def test_another_batch_size_after_a_per_lane_write_names_the_state_and_changes_nothing():
    total = smap.LongTermState(jnp.asarray(0.0))
    other = smap.ShortTermState(jnp.zeros(()))

    def step(x):
        other.value = other.value + 1.0
        total.value = total.value + x
        return x

    mapped = smap.vmap(step)
    mapped(jnp.arange(4.0))
    before = values(total, other)
    words = (
        r"step: mapped sizes differ: args\[0\] \(axis 0\) has size 5, LongTermState float32\[4\] "
        r"\(axis 0, written per lane by an earlier call\) has size 4"
    )
    with pytest.raises(ValueError, match=words):
        mapped(jnp.arange(5.0))
    for state, old in zip((total, other), before):
        np.testing.assert_array_equal(state.value, old)


def test_a_module_state_written_per_lane_keeps_its_shape(close):
    class Counter(smap.nn.Module):
        def __init__(self):
            self.last = smap.LongTermState(jnp.zeros(2))
            self.scale = smap.ParamState(jnp.asarray(3.0))

        def __call__(self, x):
            self.last.value = self.last.value * 0.5 + x * self.scale.value
            return self.last.value.sum()

    net = Counter()
    mapped = smap.vmap(net)
    xs = jnp.arange(6.0).reshape(3, 2)
    expected = net.last.value
    for call in range(2):
        out = mapped(xs)
        lane = lambda s, x: ((s * 0.5 + x * 3.0).sum(), s * 0.5 + x * 3.0)  # noqa: E731
        ref_out, expected = jax.vmap(lane, in_axes=(None if call == 0 else 0, 0))(expected, xs)
        close((out, net.last.value), (ref_out, expected))
    np.testing.assert_array_equal(net.scale.value, 3.0)  # only read: untouched


@pytest.mark.parametrize("policy", ["ignore", "warn", "raise"])
def test_a_state_marked_shared_and_written_per_lane_is_refused_on_the_first_call(policy):
    # {None: ...} keeps a state shared on every call: it cannot gain the lane axis, so the
    # first call is refused (not the second, as when it took the lanes' values).
    total = smap.LongTermState(jnp.asarray(5.0))
    key = smap.random.DEFAULT.value

    def step(x):
        total.value = x * 2.0 + smap.random.normal()
        return x

    mapped = smap.vmap(step, state_in_axes={None: total}, unexpected_out_state_mapping=policy)
    for _ in range(2):  # every call the same way
        with pytest.raises(smap.BatchAxisError, match=r"LongTermState.*marked shared.*per-lane value"):
            mapped(jnp.arange(4.0))
        assert total.value.shape == () and float(total.value) == 5.0
        np.testing.assert_array_equal(jax.random.key_data(smap.random.DEFAULT.value), jax.random.key_data(key))
