"""Tests of constructing ``StatefulMapping``/``vmap2``: its arguments, attributes, decorator forms and repr.

Every result is checked against an independent reference: the same
computation written with plain ``jax.vmap`` and explicit state passing, or
values worked out by hand.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from mapping_helpers import rand

import smap
from smap.filter import OfType
from smap.transform import StatefulMapping, vmap2

# -- construction and attributes -------------------------------------------------


def test_public_names():
    assert smap.vmap is vmap2
    assert smap.vmap2 is vmap2
    assert smap.StatefulMapping is StatefulMapping
    assert smap.BatchAxisError is smap.transform.BatchAxisError
    assert issubclass(smap.BatchAxisError, ValueError)
    assert str(StatefulMapping) == "<class 'smap.transform.StatefulMapping'>"


def test_attributes_are_normalised_as_the_tutorial_prints_them():
    accumulator = smap.ShortTermState(jnp.zeros(4))

    def accumulate(x):
        accumulator.value = accumulator.value + x
        return accumulator.value

    mapped = vmap2(accumulate, in_axes=0, out_axes=0, axis_size=4, state_in_axes={0: OfType(smap.ShortTermState)})
    assert isinstance(mapped, StatefulMapping)
    assert str(type(mapped)) == "<class 'smap.transform.StatefulMapping'>"
    assert mapped.origin_fun is accumulate
    assert mapped.in_axes == 0
    assert mapped.out_axes == 0
    assert str(mapped.state_in_axes) == "{0: OfType(<class 'smap.ShortTermState'>)}"
    assert mapped.state_out_axes == {}
    assert str(mapped.state_out_axes) == "{}"
    assert mapped.axis_name is None
    assert mapped.axis_size == 4
    assert mapped.mapping_fn is jax.vmap
    assert mapped.name == "accumulate"


def test_attributes_of_a_direct_statefulmapping():
    mapping_fn = functools.partial(jax.vmap, spmd_axis_name=None)
    mapped = StatefulMapping(
        lambda x: x,
        in_axes=(1,),
        out_axes=-1,
        state_out_axes={1: OfType(smap.LongTermState)},
        axis_name="batch",
        axis_size=3,
        name="custom",
        mapping_fn=mapping_fn,
    )
    assert mapped.in_axes == (1,)
    assert mapped.out_axes == -1
    assert mapped.state_in_axes == {}
    assert str(mapped.state_out_axes) == "{1: OfType(<class 'smap.LongTermState'>)}"
    assert mapped.axis_name == "batch"
    assert mapped.axis_size == 3
    assert mapped.name == "custom"
    assert mapped.mapping_fn is mapping_fn


def test_bare_selector_class_means_axis_0():
    mapped = vmap2(lambda x: x, state_in_axes=smap.ShortTermState, state_out_axes=smap.LongTermState)
    assert str(mapped.state_in_axes) == "{0: OfType(<class 'smap.ShortTermState'>)}"
    assert str(mapped.state_out_axes) == "{0: OfType(<class 'smap.LongTermState'>)}"


def test_bare_selector_instance_and_list_select_exactly_those_states():
    a, b, c = (smap.ShortTermState(jnp.zeros(3)) for _ in range(3))
    one = vmap2(lambda x: x, state_in_axes=a)
    assert list(one.state_in_axes) == [0]
    assert one.state_in_axes[0]((), a) and not one.state_in_axes[0]((), b)
    some = vmap2(lambda x: x, state_in_axes=[a, b])
    assert list(some.state_in_axes) == [0]
    assert some.state_in_axes[0]((), a) and some.state_in_axes[0]((), b)
    assert not some.state_in_axes[0]((), c)


@pytest.mark.parametrize(
    "selector",
    ["class", "instance", "list", "dict", "filter"],
)
def test_bare_selector_forms_batch_the_same_state(selector, close):
    state = smap.ShortTermState(jnp.arange(6.0).reshape(3, 2))
    other = smap.ShortTermState(jnp.ones(2))  # read, selected only by the class-based forms
    spec = {
        "class": smap.HiddenState,  # selects nothing here
        "instance": state,
        "list": [state],
        "dict": {0: state},
        "filter": OfType(smap.ShortTermState) & smap.filter.Not([other]),
    }[selector]

    def step(x):
        state.value = state.value * x + other.value
        return state.value.sum()

    before = np.asarray(state.value)
    xs = jnp.array([1.0, 2.0, 3.0])
    if selector == "class":
        # Not selected: the state is shared and written with a per-lane value.
        out = vmap2(step, state_in_axes=spec)(xs)
        expected_state = jax.vmap(lambda x: before * x + 1.0)(xs)
        close(state.value, expected_state)
        close(out, expected_state.sum(axis=(1, 2)))
        return
    out = vmap2(step, state_in_axes=spec)(xs)
    close(state.value, before * xs[:, None] + 1.0)
    close(out, (before * xs[:, None] + 1.0).sum(axis=1))
    close(other.value, jnp.ones(2))


def test_unknown_policy_is_rejected_at_construction():
    with pytest.raises(ValueError, match="unexpected_out_state_mapping"):
        vmap2(lambda x: x, unexpected_out_state_mapping="explode")
    with pytest.raises(ValueError, match="unexpected_out_state_mapping"):
        StatefulMapping(lambda x: x, unexpected_out_state_mapping="Ignore")


@pytest.mark.parametrize("policy", ["ignore", "warn", "raise"])
def test_known_policies_are_accepted(policy):
    mapped = vmap2(lambda x: x * 2, unexpected_out_state_mapping=policy)
    np.testing.assert_array_equal(mapped(jnp.arange(3.0)), [0.0, 2.0, 4.0])


def test_state_axes_keys_must_be_ints_or_none():
    with pytest.raises((TypeError, ValueError), match="state_in_axes"):
        vmap2(lambda x: x, state_in_axes={"0": smap.ShortTermState})
    with pytest.raises((TypeError, ValueError), match="state_out_axes"):
        vmap2(lambda x: x, state_out_axes={1.0: smap.ShortTermState})


def test_an_unhashable_axis_name_or_mapping_kwargs_not_a_dict_is_named_at_construction():
    """jax.vmap says only "unhashable type: 'list'"; a list of pairs as mapping_kwargs was read as keywords."""
    with pytest.raises(TypeError, match=r"axis_name must be hashable \(a string, say\), got list \['batch'\]"):
        smap.StatefulMapping(lambda x: x, axis_name=["batch"])
    with pytest.raises(TypeError, match=r"mapping_kwargs must be a dict .* got list \[\('devices', None\)\]"):
        smap.StatefulMapping(lambda x: x, mapping_kwargs=[("devices", None)])
    assert smap.StatefulMapping(lambda x: x, axis_name=("a", "b")).axis_name == ("a", "b")


def test_decorator_forms(close):
    @vmap2
    def double(x):
        return x * 2

    @vmap2(in_axes=(0, None))
    def scale(x, w):
        return x * w

    @smap.vmap(in_axes=1, out_axes=1)
    def cumsum(x):
        return jnp.cumsum(x)

    assert isinstance(double, StatefulMapping) and isinstance(scale, StatefulMapping)
    close(double(jnp.arange(3.0)), jnp.arange(3.0) * 2)
    close(scale(jnp.arange(3.0), 4.0), jnp.arange(3.0) * 4)
    m = rand(4, 3)
    close(cumsum(m), jax.vmap(jnp.cumsum, in_axes=1, out_axes=1)(m))


def test_repr_names_the_function():
    def my_function(x):
        return x

    assert "my_function" in repr(vmap2(my_function))
    assert vmap2(my_function).__name__ == "my_function"


# -- static_argnames and axis_size ---------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda f: smap.jit(f, static_argnames="m"),
        lambda f: StatefulMapping(f, static_argnames=("n", "m")),
    ],
)
def test_unknown_static_argnames_are_an_error_as_in_jax_jit(make):
    def f(x, n=1):
        return x * n

    with pytest.raises(ValueError, match="invalid argnames"):
        jax.jit(f, static_argnames="m")
    with pytest.raises(ValueError, match=r"f has invalid argnames \['m'\] in static_argnames.*\['x', 'n'\]"):
        make(f)
    # As in jax.jit, a function taking **kwargs accepts any name.
    g = lambda x, **kw: x * kw.get("m", 1)  # noqa: E731
    assert float(smap.jit(g, static_argnames="m")(2.0, m=3)) == float(jax.jit(g, static_argnames="m")(2.0, m=3))


def test_axis_size_0_is_accepted_as_a_size_0_mapped_argument_is(close):
    w = smap.ParamState(jnp.arange(2.0))
    out = vmap2(lambda: w.value * 2, axis_size=0)()
    assert out.shape == (0, 2)
    close(out, jax.vmap(lambda: jnp.arange(2.0) * 2, axis_size=0)())
    out = vmap2(lambda x: x + w.value, in_axes=None, axis_size=0)(jnp.ones(2))
    assert out.shape == (0, 2)
    assert vmap2(lambda x: x + 1)(jnp.ones((0, 2))).shape == (0, 2)
    with pytest.raises(ValueError, match="axis_size must be a non-negative int, got -1"):
        vmap2(lambda x: x, axis_size=-1)
    for bad in (True, 2.0):
        with pytest.raises(ValueError, match=f"axis_size must be a non-negative int, got {bad}"):
            vmap2(lambda: 1.0, axis_size=bad)


def test_axis_size_may_be_a_numpy_integer_as_in_jax_vmap(close):
    m = vmap2(lambda: jnp.ones(2), axis_size=np.int64(3))
    assert m.axis_size == 3 and type(m.axis_size) is int
    close(m(), jax.vmap(lambda: jnp.ones(2), axis_size=np.int64(3))())


class Cells(smap.nn.Module):
    def __init__(self, h0):
        self.h = smap.HiddenState(h0)
        self.w = smap.ParamState(jnp.array([[0.5, -1.0], [0.3, 0.8]]))

    @functools.partial(StatefulMapping, static_argnums=0, state_in_axes=smap.HiddenState)
    def step(self, x):
        self.h.value = jnp.tanh(self.h.value @ self.w.value + x)
        return self.h.value.sum()

    @functools.partial(StatefulMapping, state_in_axes=smap.HiddenState)
    def step_unmarked(self, x):
        self.h.value = jnp.tanh(self.h.value @ self.w.value + x)
        return self.h.value.sum()


@pytest.mark.parametrize("method", ["step", "step_unmarked"])
def test_a_mapping_defined_in_a_class_body_maps_over_its_instances_states(method):
    """The instance is an argument with no array (in_axes=0 maps none of it); its batched state is split."""
    h0, x = rand(4, 2, seed=1), rand(4, 2)
    cells = Cells(h0)
    want_h = jnp.tanh(h0 @ cells.w.value + x)
    np.testing.assert_allclose(getattr(cells, method)(x), want_h.sum(1), rtol=1e-6)
    np.testing.assert_allclose(cells.h.value, want_h, rtol=1e-6)
