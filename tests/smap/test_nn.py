"""Modules: states() paths, order, containers, filters, sharing, state.path."""

import copy
import gc
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import smap


class Linear(smap.nn.Module):
    def __init__(self, n_in, n_out):
        self.weight = smap.ParamState(jnp.ones((n_in, n_out)))
        self.bias = smap.ParamState(jnp.zeros(n_out))

    def __call__(self, x):
        return x @ self.weight.value + self.bias.value


class Cell(smap.nn.Module):
    def __init__(self):
        self.proj = Linear(2, 3)
        self.h = smap.HiddenState(jnp.zeros(3))
        self.count = smap.ShortTermState(jnp.zeros((), jnp.int32))
        self.mean = smap.LongTermState(jnp.zeros(3))


def test_states_in_attribute_order():
    class M(smap.nn.Module):
        def __init__(self):
            self.z = smap.State(jnp.zeros(1))
            self.a = smap.State(jnp.zeros(2))
            self.m = smap.State(jnp.zeros(3))

    m = M()
    states = m.states()
    assert list(states) == ["z", "a", "m"]
    assert states["z"] is m.z and states["a"] is m.a and states["m"] is m.m


def test_nested_modules_give_dotted_paths():
    cell = Cell()
    states = cell.states()
    assert list(states) == ["proj.weight", "proj.bias", "h", "count", "mean"]
    assert states["proj.weight"] is cell.proj.weight
    assert states["proj.bias"] is cell.proj.bias
    assert states["h"] is cell.h


def test_deeply_nested_modules():
    class Outer(smap.nn.Module):
        def __init__(self):
            self.cell = Cell()
            self.head = Linear(3, 1)

    outer = Outer()
    assert list(outer.states()) == [
        "cell.proj.weight",
        "cell.proj.bias",
        "cell.h",
        "cell.count",
        "cell.mean",
        "head.weight",
        "head.bias",
    ]
    assert outer.states()["cell.proj.weight"] is outer.cell.proj.weight


def test_list_and_tuple_of_modules():
    class MLP(smap.nn.Module):
        def __init__(self):
            self.layers = [Linear(2, 3), Linear(3, 1)]
            self.extra = (smap.State(jnp.zeros(1)), Linear(1, 1))

    mlp = MLP()
    states = mlp.states()
    assert list(states) == [
        "layers.0.weight",
        "layers.0.bias",
        "layers.1.weight",
        "layers.1.bias",
        "extra.0",
        "extra.1.weight",
        "extra.1.bias",
    ]
    assert states["layers.1.weight"] is mlp.layers[1].weight
    assert states["extra.0"] is mlp.extra[0]


def test_dict_of_modules_and_states():
    class Heads(smap.nn.Module):
        def __init__(self):
            self.heads = {"cls": Linear(2, 4), "reg": Linear(2, 1)}
            self.buffers = {"step": smap.State(jnp.zeros((), jnp.int32))}

    heads = Heads()
    states = heads.states()
    assert list(states) == ["heads.cls.weight", "heads.cls.bias", "heads.reg.weight", "heads.reg.bias", "buffers.step"]
    assert states["heads.reg.bias"] is heads.heads["reg"].bias
    assert states["buffers.step"] is heads.buffers["step"]


def test_non_state_attributes_and_private_attributes_are_ignored():
    class M(smap.nn.Module):
        def __init__(self):
            self.size = 3
            self.array = jnp.zeros(3)
            self._private = smap.State(jnp.zeros(1))
            self.public = smap.State(jnp.zeros(1))

    assert list(M().states()) == ["public"]


def test_filter_argument():
    cell = Cell()
    assert list(cell.states(smap.ParamState)) == ["proj.weight", "proj.bias"]
    assert list(cell.states(smap.LongTermState)) == ["proj.weight", "proj.bias", "mean"]
    assert list(cell.states(smap.ShortTermState)) == ["h", "count"]
    assert list(cell.states(smap.filter.Not(smap.LongTermState))) == ["h", "count"]
    assert list(cell.states(smap.filter.Nothing())) == []
    assert list(cell.states(lambda path, s: path[-1] == "bias")) == ["proj.bias"]
    assert list(cell.states([cell.mean, cell.h])) == ["h", "mean"]


def test_filter_by_tag():
    class M(smap.nn.Module):
        def __init__(self):
            self.a = smap.ParamState(jnp.zeros(1), tag="frozen")
            self.b = smap.ParamState(jnp.zeros(1))

    assert list(M().states("frozen")) == ["a"]


def test_shared_submodule_is_listed_once_under_its_first_path():
    class Tied(smap.nn.Module):
        def __init__(self):
            shared = Linear(2, 2)
            self.enc = shared
            self.dec = shared

    tied = Tied()
    states = tied.states()
    assert list(states) == ["enc.weight", "enc.bias"]


def test_shared_state_is_listed_once_under_its_first_path():
    class Tied(smap.nn.Module):
        def __init__(self):
            s = smap.State(jnp.zeros(2))
            self.a = s
            self.b = s

    tied = Tied()
    states = tied.states()
    assert list(states) == ["a"]
    assert states["a"] is tied.a


def test_state_path():
    cell = Cell()
    assert cell.proj.weight.path == ("proj", "weight")
    assert cell.h.path == ("h",)

    class MLP(smap.nn.Module):
        def __init__(self):
            self.layers = [Linear(2, 3), Linear(3, 1)]
            self.heads = {"out": Linear(1, 1)}

    mlp = MLP()
    assert mlp.layers[1].bias.path == ("layers", 1, "bias")
    assert mlp.heads["out"].weight.path == ("heads", "out", "weight")


def test_state_path_matches_the_states_key():
    class Outer(smap.nn.Module):
        def __init__(self):
            self.cell = Cell()
            self.layers = [Linear(1, 1)]

    outer = Outer()
    for key, state in outer.states().items():
        assert ".".join(map(str, state.path)) == key


def test_state_path_of_a_module_appended_to_a_list_attribute():
    class MLP(smap.nn.Module):
        def __init__(self):
            self.layers = []
            self.layers.append(Linear(2, 2))

    mlp = MLP()
    assert list(mlp.states()) == ["layers.0.weight", "layers.0.bias"]
    assert mlp.layers[0].weight.path == ("layers", 0, "weight")


def test_states_of_a_module_without_states():
    class Empty(smap.nn.Module):
        pass

    assert Empty().states() == {}


def test_module_is_callable_and_reads_its_states(close):
    lin = Linear(2, 3)
    lin.bias.value = jnp.array([1.0, 2.0, 3.0])
    close(lin(jnp.array([1.0, 1.0])), jnp.array([3.0, 4.0, 5.0]))


def test_module_class_reports_its_public_location():
    assert repr(smap.nn.Module) == "<class 'smap.nn.Module'>"


class Noisy(smap.nn.Module):
    def __init__(self):
        self.w = smap.ParamState(jnp.arange(3.0), tag="weights")
        self.rng = smap.random.RandomState(5)
        self.rate = 0.25

    def __call__(self, x):
        return x * self.w.value * self.rate


@pytest.mark.parametrize(
    "copy_of", [lambda m: pickle.loads(pickle.dumps(m)), copy.deepcopy], ids=["pickle", "deepcopy"]
)
def test_a_module_pickles_and_deep_copies_with_its_states_values_tags_and_paths(copy_of):
    """As Flax NNX and Equinox modules do: the copy's States are new (their own values and locks), named by
    their paths in the copy, and a RandomState continues with the draws the original would make."""
    net = Cell()
    net.layers = [Linear(2, 2), Noisy()]
    net.layers[1].rng.normal(size=2)  # the key has advanced once
    smap.jit(lambda m, x: m.layers[1](x))(net, jnp.ones(3))  # (a Module that has been an argument too)
    twin = copy_of(net)
    assert list(twin.states()) == list(net.states())
    for path, state in twin.states().items():
        original = net.states()[path]
        assert state is not original and type(state) is type(original) and state._tags == original._tags
        np.testing.assert_array_equal(state.value, original.value)
        assert state.path == tuple(int(p) if p.isdigit() else p for p in path.split("."))
    key = jax.random.split(jax.random.PRNGKey(5))[0]  # the key after one draw
    _, sub = jax.random.split(key)
    np.testing.assert_array_equal(twin.layers[1].rng.normal(size=2), jax.random.normal(sub, (2,)))
    twin.layers[1].w.value = jnp.zeros(3)  # the copy is independent
    np.testing.assert_array_equal(net.layers[1].w.value, jnp.arange(3.0))
    np.testing.assert_allclose(smap.jit(lambda m, x: m.layers[1](x))(twin, jnp.ones(3)), 0.0)
    del net, original
    gc.collect()
    assert twin.layers[1].w.path == ("layers", 1, "w")  # the copy's States belong to the copy, not the original


def test_a_state_backed_by_a_jax_ref_is_refused_by_pickle_with_what_to_do():
    if not hasattr(jax, "new_ref"):
        pytest.skip("this JAX has no jax.Ref")
    w = smap.ParamState(jax.new_ref(jnp.ones(2)))
    with pytest.raises(TypeError, match=r"backed by a jax.Ref, which is not pickled or copied: .*smap.checkpoint"):
        pickle.dumps(w)


def test_a_shallow_copy_shares_the_states_and_leaves_them_named_by_their_owner():
    cell = Cell()
    twin = copy.copy(cell)
    assert twin.proj is cell.proj and twin.h is cell.h
    del twin
    gc.collect()
    assert cell.proj.weight.path == ("proj", "weight") and cell.h.describe() == "state 'h' (HiddenState)"
