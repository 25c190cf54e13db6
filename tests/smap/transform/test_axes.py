"""Tests of the axis-specification helpers (``smap.transform._axes``)."""

import jax.numpy as jnp
import pytest

import smap
from smap._tracing import leaf_names
from smap.filter import Everything, OfType
from smap.transform._axes import leaf_axes, normalise_state_axes, resolve_axis, select_axis


def test_normalise_none_is_empty():
    assert normalise_state_axes(None, "state_in_axes") == {}


def test_normalise_bare_class_means_axis_0():
    axes = normalise_state_axes(smap.ShortTermState, "state_in_axes")
    assert list(axes) == [0]
    assert axes[0] == OfType(smap.ShortTermState)
    assert repr(axes) == "{0: OfType(<class 'smap.ShortTermState'>)}"


def test_normalise_bare_instance_and_list():
    a, b, c = (smap.State(jnp.zeros(1)) for _ in range(3))
    one = normalise_state_axes(a, "state_in_axes")
    assert list(one) == [0] and one[0]((), a) and not one[0]((), b)
    some = normalise_state_axes([a, b], "state_in_axes")
    assert list(some) == [0] and some[0]((), a) and some[0]((), b) and not some[0]((), c)


def test_normalise_dict_keeps_axes_and_converts_selectors():
    a = smap.State(jnp.zeros(1))
    axes = normalise_state_axes({1: smap.HiddenState, None: [a], -1: OfType(smap.ParamState)}, "state_in_axes")
    assert set(axes) == {1, None, -1}
    assert axes[1] == OfType(smap.HiddenState)
    assert axes[-1] == OfType(smap.ParamState)
    assert axes[None]((), a) and not axes[None]((), smap.State(jnp.zeros(1)))


def test_normalise_bare_filter_is_kept():
    f = OfType(smap.LongTermState)
    assert normalise_state_axes(f, "state_out_axes") == {0: f}


def test_normalise_user_callable_filter():
    axes = normalise_state_axes(lambda path, state: state.value.ndim == 2, "state_in_axes")
    assert axes[0]((), smap.State(jnp.zeros((2, 2))))
    assert not axes[0]((), smap.State(jnp.zeros(2)))


@pytest.mark.parametrize("key", ["0", 1.0, (0,)])
def test_normalise_rejects_keys_that_are_not_ints(key):
    with pytest.raises(TypeError, match="state_out_axes"):
        normalise_state_axes({key: smap.State}, "state_out_axes")


def test_select_axis():
    shared = smap.ShortTermState(jnp.zeros(3))
    batched = smap.ShortTermState(jnp.zeros(3))
    param = smap.ParamState(jnp.zeros(3))
    axes = normalise_state_axes({1: OfType(smap.ShortTermState), None: [shared]}, "state_in_axes")
    assert select_axis(axes, (), shared) == (True, None)
    assert select_axis(axes, (), batched) == (True, 1)
    assert select_axis(axes, (), param) == (False, None)
    assert select_axis({}, (), param) == (False, None)


def test_select_axis_none_takes_precedence_over_everything():
    state = smap.State(jnp.zeros(3))
    axes = normalise_state_axes({0: Everything(), None: Everything()}, "state_in_axes")
    assert select_axis(axes, (), state) == (True, None)


def test_select_axis_passes_the_path_to_filters():
    seen = []
    axes = normalise_state_axes({2: lambda path, s: seen.append(path) or path == ("layer", "w")}, "x")
    state = smap.State(jnp.zeros(3))
    assert select_axis(axes, ("layer", "w"), state) == (True, 2)
    assert select_axis(axes, ("layer", "b"), state) == (False, None)
    assert seen == [("layer", "w"), ("layer", "b")]


@pytest.mark.parametrize("axis, ndim, expected", [(0, 1, 0), (2, 3, 2), (-1, 3, 2), (-3, 3, 0), (0, 4, 0)])
def test_resolve_axis(axis, ndim, expected):
    assert resolve_axis(axis, ndim, "out_axes") == expected


@pytest.mark.parametrize("axis, ndim", [(1, 1), (3, 3), (-4, 3), (0, 0)])
def test_resolve_axis_out_of_range(axis, ndim):
    with pytest.raises(ValueError, match=rf"out_axes for y.*{axis}.*rank {ndim}"):
        resolve_axis(axis, ndim, "out_axes for y")


def test_leaf_axes_broadcasts_a_prefix():
    tree = ({"a": 1, "b": (2, 3)}, 4, [5, 6])
    assert leaf_axes(0, tree, "in_axes") == [0] * 6
    assert leaf_axes(None, tree, "in_axes") == [None] * 6
    assert leaf_axes(({"a": 1, "b": None}, -1, 0), tree, "in_axes") == [1, None, None, -1, 0, 0]
    assert leaf_axes(({"a": 1, "b": (0, 2)}, None, [0, 1]), tree, "in_axes") == [1, 0, 2, None, 0, 1]


def test_leaf_axes_with_empty_subtrees():
    assert leaf_axes((0, None), (jnp.ones(2), None), "in_axes") == [0]
    assert leaf_axes(0, (), "in_axes") == []
    assert leaf_axes((0, 1), (jnp.ones(2), ()), "in_axes") == [0]


def test_leaf_axes_mismatch_names_the_spec():
    with pytest.raises(ValueError, match="out_axes"):
        leaf_axes((0, 0, 0), (1, 2), "out_axes")
    with pytest.raises(ValueError, match="in_axes"):
        leaf_axes(({"a": 0, "z": 0},), ({"a": 1, "b": 2},), "in_axes")


@pytest.mark.parametrize("bad", ["a", 1.5, object(), True])
def test_leaf_axes_rejects_non_int_entries(bad):
    """As jax.vmap does: True is no axis, though Python counts it an int."""
    with pytest.raises(TypeError, match=rf"in_axes must consist of ints and None, got {bad!r}"):
        leaf_axes((0, bad), (1, 2), "in_axes")


def test_leaf_names():
    tree = ({"a": 1, "b": (2, 3)}, 4)
    assert leaf_names(tree, "args") == ["args[0]['a']", "args[0]['b'][0]", "args[0]['b'][1]", "args[1]"]
    assert leaf_names({"y": 1}, "kwargs") == ["kwargs['y']"]
    assert leaf_names(5, "output") == ["output"]
