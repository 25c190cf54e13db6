"""Filters: each selector against hand-worked selections, reprs, errors."""

import jax.numpy as jnp
import pytest

import smap
from smap.filter import All, Any, AtPath, Everything, Not, Nothing, OfType, WithTag, to_filter


def _states():
    """One state of each kind, with the names the expectations use."""
    return {
        "plain": smap.State(jnp.zeros(1)),
        "short": smap.ShortTermState(jnp.zeros(1)),
        "long": smap.LongTermState(jnp.zeros(1)),
        "param": smap.ParamState(jnp.zeros(1), tag="trainable"),
        "hidden": smap.HiddenState(jnp.zeros(1), tag=("recurrent", "frozen")),
        "frozen_param": smap.ParamState(jnp.zeros(1), tag="frozen"),
    }


def _selected(f):
    return {name for name, s in _states().items() if f((), s)}


ALL_NAMES = {"plain", "short", "long", "param", "hidden", "frozen_param"}


@pytest.mark.parametrize(
    "cls, expected",
    [
        (smap.State, ALL_NAMES),
        (smap.ShortTermState, {"short", "hidden"}),
        (smap.HiddenState, {"hidden"}),
        (smap.LongTermState, {"long", "param", "frozen_param"}),
        (smap.ParamState, {"param", "frozen_param"}),
    ],
)
def test_of_type_selects_subclasses(cls, expected):
    assert _selected(OfType(cls)) == expected
    # A bare class is the same selector.
    assert _selected(to_filter(cls)) == expected


def test_of_type_result_is_a_bool():
    assert OfType(smap.ParamState)((), smap.ParamState(jnp.zeros(1))) is True
    assert OfType(smap.ParamState)((), smap.State(jnp.zeros(1))) is False


def test_with_tag():
    assert _selected(WithTag("frozen")) == {"hidden", "frozen_param"}
    assert _selected(WithTag("trainable")) == {"param"}
    assert _selected(WithTag("missing")) == set()
    # A bare string is the same selector.
    assert _selected(to_filter("recurrent")) == {"hidden"}


def test_not():
    assert _selected(Not(OfType(smap.LongTermState))) == {"plain", "short", "hidden"}
    assert _selected(Not(smap.ShortTermState)) == {"plain", "long", "param", "frozen_param"}
    assert _selected(~OfType(smap.ParamState)) == {"plain", "short", "long", "hidden"}


def test_all():
    assert _selected(All(smap.ParamState, Not("frozen"))) == {"param"}
    assert _selected(All(smap.LongTermState, "frozen")) == {"frozen_param"}
    assert _selected(OfType(smap.ShortTermState) & WithTag("frozen")) == {"hidden"}
    assert _selected(All()) == ALL_NAMES


def test_any():
    assert _selected(Any(smap.HiddenState, "trainable")) == {"hidden", "param"}
    assert _selected(OfType(smap.HiddenState) | OfType(smap.LongTermState)) == {
        "hidden",
        "long",
        "param",
        "frozen_param",
    }
    assert _selected(Any()) == set()


def test_everything_and_nothing():
    assert _selected(Everything()) == ALL_NAMES
    assert _selected(Nothing()) == set()
    assert _selected(to_filter(True)) == ALL_NAMES
    assert _selected(to_filter(False)) == set()


def test_state_instance_as_selector():
    a, b = smap.State(jnp.zeros(1)), smap.State(jnp.zeros(1))
    f = to_filter(a)
    assert f((), a) is True
    assert f((), b) is False


@pytest.mark.parametrize("container", [list, tuple, set])
def test_iterable_of_states_as_selector(container):
    a, b, c = (smap.ParamState(jnp.zeros(1)) for _ in range(3))
    f = to_filter(container([a, c]))
    assert [f((), s) for s in (a, b, c)] == [True, False, True]


def test_generator_of_states_as_selector():
    a, b = smap.State(jnp.zeros(1)), smap.State(jnp.zeros(1))
    f = to_filter(s for s in [b])
    assert (f((), a), f((), b)) == (False, True)


def test_iterable_holding_a_non_state_is_rejected():
    with pytest.raises(TypeError, match=r"must hold State instances or jax.Refs, got 3\.$"):
        to_filter([smap.State(jnp.zeros(1)), 3])
    with pytest.raises(TypeError, match=r"got <class 'smap.ParamState'>\. .* smap\.filter\.Any\(OfType"):
        to_filter([smap.ParamState, smap.HiddenState])  # types: the error says how to select by several


def test_user_callable_receives_path_and_state():
    calls = []

    def by_path(path, state):
        calls.append((path, state))
        return bool(path) and path[-1] == "weight"

    w, b = smap.ParamState(jnp.zeros(1)), smap.ParamState(jnp.zeros(1))
    f = to_filter(by_path)
    assert f(("lin", "weight"), w) is True
    assert f(("lin", "bias"), b) is False
    assert calls == [(("lin", "weight"), w), (("lin", "bias"), b)]


def test_user_callable_inside_combinators():
    big = lambda path, state: state.value.size > 1  # noqa: E731
    small, large = smap.ParamState(jnp.zeros(1)), smap.ParamState(jnp.zeros(5))
    f = All(smap.ParamState, big)
    assert (f((), small), f((), large)) == (False, True)
    g = Not(big)
    assert (g((), small), g((), large)) == (True, False)


class Linear(smap.nn.Module):
    def __init__(self):
        self.weight = smap.ParamState(jnp.ones(2))
        self.bias = smap.ParamState(jnp.zeros(2))


def test_filter_used_by_module_states_receives_the_dotted_path():
    class Net(smap.nn.Module):
        def __init__(self):
            self.enc = Linear()
            self.dec = Linear()

    net = Net()
    only_dec = lambda path, state: path[0] == "dec"  # noqa: E731
    assert list(net.states(only_dec)) == ["dec.weight", "dec.bias"]
    weights = lambda path, state: path[-1] == "weight"  # noqa: E731
    assert list(net.states(weights)) == ["enc.weight", "dec.weight"]


def test_at_path_globs_the_dotted_path():
    class Net(smap.nn.Module):
        def __init__(self):
            self.layers = [Linear(), Linear()]
            self.head = {"weight": smap.ParamState(jnp.ones(1))}

    net = Net()
    assert list(net.states(AtPath("layers.1.weight"))) == ["layers.1.weight"]
    assert list(net.states(AtPath("layers.*.weight"))) == ["layers.0.weight", "layers.1.weight"]
    assert list(net.states(AtPath("*weight"))) == ["layers.0.weight", "layers.1.weight", "head.weight"]
    assert list(net.states(AtPath("layers.?.b*"))) == ["layers.0.bias", "layers.1.bias"]
    assert list(net.states(AtPath("layers.1"))) == []  # a whole path, not a prefix
    assert list(net.states(AtPath("Layers.1.weight"))) == []  # case-sensitive
    assert AtPath("*")((), smap.State(jnp.zeros(1))) is False  # a state outside a Module has no path
    assert AtPath("w") == AtPath("w") and AtPath("w") != AtPath("v")
    assert repr(AtPath("layers.*.w")) == "AtPath('layers.*.w')"
    assert list(net.states(AtPath("layers.*") & WithTag("x"))) == []


@pytest.mark.parametrize("bad", [3, "", None])
def test_at_path_needs_a_pattern(bad):
    with pytest.raises(TypeError, match="AtPath expects a non-empty string"):
        AtPath(bad)


@pytest.mark.parametrize(
    "f, text",
    [
        (OfType(smap.ShortTermState), "OfType(<class 'smap.ShortTermState'>)"),
        (OfType(smap.ParamState), "OfType(<class 'smap.ParamState'>)"),
        (WithTag("optimizer"), "WithTag('optimizer')"),
        (Not(smap.ParamState), "Not(OfType(<class 'smap.ParamState'>))"),
        (
            All(smap.LongTermState, "frozen"),
            "All(OfType(<class 'smap.LongTermState'>), WithTag('frozen'))",
        ),
        (
            Any(smap.HiddenState, Not("x")),
            "Any(OfType(<class 'smap.HiddenState'>), Not(WithTag('x')))",
        ),
        (Everything(), "Everything()"),
        (Nothing(), "Nothing()"),
    ],
)
def test_reprs(f, text):
    assert repr(f) == text


def test_filter_classes_report_their_public_location():
    assert repr(OfType) == "<class 'smap.filter.OfType'>"
    assert repr(All) == "<class 'smap.filter.All'>"


def test_to_filter_passes_filters_through():
    f = OfType(smap.ParamState)
    assert to_filter(f) is f


def test_filters_compare_by_value():
    assert OfType(smap.ParamState) == OfType(smap.ParamState)
    assert OfType(smap.ParamState) != OfType(smap.LongTermState)
    assert hash(WithTag("a")) == hash(WithTag("a"))
    assert All(smap.ParamState, "a") == All(OfType(smap.ParamState), WithTag("a"))


@pytest.mark.parametrize("bad", [3, 2.5, None, int, dict])
def test_selector_that_is_not_a_filter_is_rejected(bad):
    with pytest.raises(TypeError):
        to_filter(bad)


def test_non_state_class_error_says_what_was_expected():
    with pytest.raises(TypeError, match="State subclass"):
        to_filter(int)


def test_invalid_selector_inside_a_combinator_is_rejected():
    with pytest.raises(TypeError):
        All(smap.ParamState, 3)
    with pytest.raises(TypeError):
        Not(int)


def test_of_type_needs_a_class():
    with pytest.raises(TypeError):
        OfType(smap.ParamState(jnp.zeros(1)))


def test_with_tag_needs_a_string():
    with pytest.raises(TypeError):
        WithTag(3)


# -- a string that is no State's tag -------------------------------------------------


@pytest.mark.parametrize(
    "string, meant",
    [
        ("param", "smap.ParamState"),
        ("ParamState", "smap.ParamState"),
        ("short_term", "smap.ShortTermState"),
        ("random", "smap.random.RandomState"),
    ],
)
def test_check_tag_string_suggests_the_state_type_a_string_names(string, meant):
    states = list(_states().values())
    with pytest.raises(ValueError) as error:
        smap.filter.check_tag_string(string, "where", states)
    lines = str(error.value).splitlines()
    assert (
        lines[0]
        == f"where is the string {string!r}, which selects the States tagged {string!r}, and no State has that tag."
    )
    type_name = meant.rsplit(".", 1)[1]
    assert f"To select the states of type {type_name}, pass the class {meant}." in lines
    assert any(line.startswith("Tags in use: ") and "'trainable'" in line and "'recurrent'" in line for line in lines)


def test_check_tag_string_lets_tags_and_other_selectors_pass():
    states = list(_states().values())
    for selector in ("trainable", "frozen", OfType(smap.HiddenState), AtPath("nowhere"), None, smap.ParamState):
        assert smap.filter.check_tag_string(selector, "where", states) is None
    # A tag is known once any State has it, even one created after the selector was written.
    with pytest.raises(ValueError, match="no State has that tag"):
        smap.filter.check_tag_string("filter-test-late", "where", states)
    smap.State(jnp.zeros(1), tag=("other", "filter-test-late"))
    assert smap.filter.check_tag_string("filter-test-late", "where", states) is None


def test_check_tag_string_lists_at_most_twelve_paths():
    class Wide(smap.nn.Module):
        def __init__(self):
            self.layers = [smap.ParamState(jnp.zeros(1)) for _ in range(15)]

    wide = Wide()
    with pytest.raises(ValueError, match=r"Paths of the states here: 'layers\.0', .*'layers\.11' and 3 more\."):
        smap.filter.check_tag_string("layers.*", "where", wide.states().values())
    with pytest.raises(ValueError, match=r"pass smap\.filter\.AtPath\('layers\.\*'\)"):
        wide.states("layers.*")
