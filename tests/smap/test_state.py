"""States: reads, writes, the shape/dtype/structure rules, reset, tags, repr."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import smap


class Linear(smap.nn.Module):
    def __init__(self, n_in, n_out):
        self.weight = smap.ParamState(jnp.ones((n_in, n_out)))
        self.bias = smap.ParamState(jnp.zeros(n_out))


class Net(smap.nn.Module):
    def __init__(self):
        self.lin = Linear(2, 3)
        self.hidden = smap.HiddenState(jnp.zeros(3))


# -- reading and writing -------------------------------------------------------


def test_read_returns_the_initial_value(close):
    s = smap.State(jnp.arange(3.0))
    close(s.value, np.array([0.0, 1.0, 2.0]))


def test_write_then_read(close):
    s = smap.State(jnp.zeros(3))
    s.value = s.value + jnp.array([1.0, 2.0, 3.0])
    close(s.value, np.array([1.0, 2.0, 3.0]))
    s.value = s.value * 2
    close(s.value, np.array([2.0, 4.0, 6.0]))


def test_pytree_value_read_and_write(close):
    s = smap.State({"a": jnp.zeros(2), "b": (jnp.ones(()), jnp.arange(3))})
    s.value = {"a": jnp.ones(2), "b": (jnp.zeros(()), jnp.arange(3) + 1)}
    close(s.value, {"a": np.ones(2), "b": (np.zeros(()), np.arange(1, 4))})


def test_write_of_numpy_array_is_converted_to_a_jax_array():
    s = smap.State(jnp.zeros(3))
    s.value = np.ones(3, np.float32)
    assert isinstance(s.value, jax.Array)
    np.testing.assert_array_equal(np.asarray(s.value), np.ones(3))


@pytest.mark.parametrize(
    "value, dtype",
    [
        (1.5, jnp.float32),
        (3, jnp.int32),
        (True, jnp.bool_),
        (np.float32(2.0), jnp.float32),
        (np.int32(7), jnp.int32),
        (np.arange(3, dtype=np.float32), jnp.float32),
    ],
)
def test_python_and_numpy_values_become_jax_arrays(value, dtype):
    s = smap.State(value)
    assert isinstance(s.value, jax.Array)
    assert s.value.dtype == dtype
    np.testing.assert_array_equal(np.asarray(s.value), np.asarray(value))


def test_python_scalars_inside_a_pytree_become_arrays():
    s = smap.State({"lr": 0.1, "step": 0})
    assert isinstance(s.value["lr"], jax.Array) and s.value["lr"].dtype == jnp.float32
    assert isinstance(s.value["step"], jax.Array) and s.value["step"].dtype == jnp.int32


# -- structure, shape and dtype rules ------------------------------------------


def test_shape_change_raises_value_error_naming_type_shape_dtype():
    s = smap.State(jnp.zeros(3))
    with pytest.raises(ValueError) as info:
        s.value = jnp.zeros(4)
    message = str(info.value)
    assert "State" in message and "float32[3]" in message
    assert "(4,)" in message and "reset" in message


def test_dtype_change_raises_type_error_naming_the_state():
    s = smap.ShortTermState(jnp.zeros((2, 2)))
    with pytest.raises(TypeError) as info:
        s.value = jnp.zeros((2, 2), jnp.int32)
    message = str(info.value)
    assert "ShortTermState" in message and "float32[2,2]" in message and "int32" in message


def test_tree_structure_change_raises_value_error():
    s = smap.State({"a": jnp.zeros(2)})
    with pytest.raises(ValueError, match="tree structure"):
        s.value = {"b": jnp.zeros(2)}
    with pytest.raises(ValueError, match="tree structure"):
        s.value = {"a": jnp.zeros(2), "b": jnp.zeros(2)}
    with pytest.raises(ValueError, match="tree structure"):
        s.value = jnp.zeros(2)


def test_leaf_shape_change_inside_a_pytree_raises():
    s = smap.State({"a": jnp.zeros(2), "b": jnp.zeros(3)})
    with pytest.raises(ValueError, match=r"\(4,\)"):
        s.value = {"a": jnp.zeros(2), "b": jnp.zeros(4)}


def test_error_names_a_module_state_by_its_dotted_path():
    net = Net()
    with pytest.raises(ValueError, match=r"state 'lin\.weight'"):
        net.lin.weight.value = jnp.ones((3, 3))
    with pytest.raises(TypeError, match=r"state 'lin\.bias'"):
        net.lin.bias.value = jnp.zeros(3, jnp.int32)
    with pytest.raises(ValueError, match=r"state 'hidden'"):
        net.hidden.value = jnp.zeros(4)


def test_error_names_a_state_in_a_list_attribute_by_its_index():
    class Stack(smap.nn.Module):
        def __init__(self):
            self.layers = [Linear(1, 1), Linear(1, 2)]

    stack = Stack()
    with pytest.raises(ValueError, match=r"state 'layers\.1\.bias'"):
        stack.layers[1].bias.value = jnp.zeros(5)


def test_failed_write_keeps_the_old_value(close):
    s = smap.State(jnp.arange(3.0))
    with pytest.raises(ValueError):
        s.value = jnp.zeros(4)
    with pytest.raises(TypeError):
        s.value = jnp.arange(3)
    close(s.value, np.arange(3.0))


def test_reset_allows_new_shape_dtype_and_structure(close):
    s = smap.HiddenState(jnp.zeros(3))
    s.reset(jnp.ones((4, 3)))
    close(s.value, np.ones((4, 3)))
    s.reset(jnp.arange(2))
    assert s.value.dtype == jnp.int32
    s.reset({"a": jnp.zeros(1)})
    close(s.value, {"a": np.zeros(1)})
    # After a reset, writes are checked against the new value.
    s.value = {"a": jnp.ones(1)}
    close(s.value, {"a": np.ones(1)})
    with pytest.raises(ValueError):
        s.value = {"a": jnp.ones(2)}


def test_reset_converts_python_values():
    s = smap.State(jnp.zeros(3))
    s.reset(2.0)
    assert isinstance(s.value, jax.Array) and s.value.shape == ()


# -- invalid values ------------------------------------------------------------


def test_state_as_value_is_a_type_error():
    inner = smap.State(jnp.zeros(2))
    with pytest.raises(TypeError, match="State"):
        smap.State(inner)
    outer = smap.State(jnp.zeros(2))
    with pytest.raises(TypeError, match="State"):
        outer.value = inner
    with pytest.raises(TypeError, match="State"):
        outer.reset(inner)
    np.testing.assert_array_equal(np.asarray(outer.value), np.zeros(2))


def test_state_nested_in_a_pytree_value_is_a_type_error():
    with pytest.raises(TypeError, match="State"):
        smap.State({"a": smap.State(jnp.zeros(2))})


@pytest.mark.parametrize("bad", ["abc", object(), {"a": "text"}])
def test_non_array_value_is_a_type_error(bad):
    with pytest.raises(TypeError):
        smap.State(bad)
    s = smap.State(jnp.zeros(2))
    with pytest.raises(TypeError):
        s.value = bad
    np.testing.assert_array_equal(np.asarray(s.value), np.zeros(2))


# -- classes, tags and repr ----------------------------------------------------


def test_subclass_relations():
    assert issubclass(smap.ParamState, smap.LongTermState)
    assert issubclass(smap.HiddenState, smap.ShortTermState)
    for cls in (smap.ShortTermState, smap.LongTermState, smap.ParamState, smap.HiddenState):
        assert issubclass(cls, smap.State)
    assert not issubclass(smap.ParamState, smap.ShortTermState)
    assert not issubclass(smap.HiddenState, smap.LongTermState)


def test_classes_report_their_public_location():
    assert repr(smap.State) == "<class 'smap.State'>"
    assert repr(smap.ShortTermState) == "<class 'smap.ShortTermState'>"
    assert repr(smap.ParamState) == "<class 'smap.ParamState'>"


def test_tags():
    assert smap.State(jnp.zeros(1)).tags == ()
    assert smap.State(jnp.zeros(1), tag="optimizer").tags == ("optimizer",)
    assert smap.State(jnp.zeros(1), tag=("a", "b")).tags == ("a", "b")
    with pytest.raises(TypeError, match=r"tag must be a string or a tuple of strings, got \('a', 3\)"):
        smap.State(jnp.zeros(1), tag=("a", 3))
    with pytest.raises(TypeError, match="tag must be a string or a tuple of strings, got 3"):
        smap.State(jnp.zeros(1), tag=3)


def test_tags_are_selected_by_with_tag():
    a = smap.State(jnp.zeros(1), tag=("optimizer", "frozen"))
    b = smap.State(jnp.zeros(1), tag="other")
    f = smap.filter.WithTag("frozen")
    assert f((), a) and not f((), b)


@pytest.mark.parametrize(
    "state, text",
    [
        (smap.State(jnp.zeros(3)), "State(float32[3])"),
        (smap.ParamState(jnp.ones((3, 2))), "ParamState(float32[3,2])"),
        (smap.LongTermState(jnp.zeros((), jnp.int32)), "LongTermState(int32[])"),
        (smap.HiddenState(jnp.zeros((1, 2, 3), jnp.bool_)), "HiddenState(bool[1,2,3])"),
    ],
)
def test_repr_shows_type_shape_dtype(state, text):
    assert repr(state) == text


def test_repr_of_a_pytree_value_shows_every_leaf():
    text = repr(smap.State({"a": jnp.zeros(2), "b": jnp.zeros((), jnp.int32)}))
    assert text.startswith("State(")
    assert "'a': float32[2]" in text and "'b': int32[]" in text


def test_repr_shows_tags():
    assert repr(smap.State(jnp.zeros(2), tag="opt")) == "State(float32[2], tag='opt')"
    assert "('a', 'b')" in repr(smap.State(jnp.zeros(2), tag=("a", "b")))


def test_repr_follows_reset():
    s = smap.HiddenState(jnp.zeros(3))
    s.reset(jnp.zeros((8, 3), jnp.float16))
    assert repr(s) == "HiddenState(float16[8,3])"


def test_state_holding_a_typed_prng_key_can_be_written():
    s = smap.State(jax.random.key(0))
    s.value = jax.random.split(s.value)[0]
    expected = jax.random.split(jax.random.key(0))[0]
    np.testing.assert_array_equal(np.asarray(jax.random.key_data(s.value)), np.asarray(jax.random.key_data(expected)))


def test_repr_of_a_state_holding_a_typed_prng_key():
    s = smap.State(jax.random.key(0))
    assert "key" in repr(s)
    with pytest.raises(ValueError, match="shape"):
        s.value = jax.random.split(jax.random.key(0), 3)


def test_path_of_a_free_state_is_empty():
    assert smap.State(jnp.zeros(1)).path == ()


def test_path_of_module_states():
    net = Net()
    assert net.lin.weight.path == ("lin", "weight")
    assert net.hidden.path == ("hidden",)
